//! The analyses of Lo et al. (2024), one file each, and the driver that runs
//! a selection of them over a model one layer at a time.

pub mod assignment;
pub mod linalg;
pub mod neurons;
#[path = "static/mod.rs"]
pub mod statics;
pub mod stream;

use crate::error::{Error, Result};
use crate::layers::LayerSelection;
use crate::model::{DenseModel, Matrix, Model};
use crate::report::schema::{
    Analyses, GateEmbedding, MatrixSimilarity, ModelSummary, NeuronReorder, Projection, Report,
    REPORT_SCHEMA,
};
use stream::{MatrixStats, Needs};

/// An analysis that can be selected with `--analyses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnalysisKind {
    ExpertSimilarity,
    NeuronSimilarity,
    NeuronReorder,
    GateEmbedding,
    Projection,
}

impl AnalysisKind {
    /// Every analysis this build implements.
    pub const ALL: [AnalysisKind; 5] = [
        AnalysisKind::ExpertSimilarity,
        AnalysisKind::NeuronSimilarity,
        AnalysisKind::NeuronReorder,
        AnalysisKind::GateEmbedding,
        AnalysisKind::Projection,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            AnalysisKind::ExpertSimilarity => "expert-similarity",
            AnalysisKind::NeuronSimilarity => "neuron-similarity",
            AnalysisKind::NeuronReorder => "neuron-reorder",
            AnalysisKind::GateEmbedding => "gate-embedding",
            AnalysisKind::Projection => "projection",
        }
    }

    /// Whether it needs only the weights.
    pub fn is_static(self) -> bool {
        true
    }

    /// Parses `static`, `dynamic`, `all` or a comma-separated list of names.
    pub fn parse_selection(spec: &str) -> Result<Vec<AnalysisKind>> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim) {
            match part {
                "all" => out.extend(AnalysisKind::ALL),
                "static" => out.extend(AnalysisKind::ALL.into_iter().filter(|a| a.is_static())),
                "dynamic" => {
                    return Err(Error::Usage(
                        "--analyses dynamic: the dynamic analyses need the forward pass, which this build does not have yet".into(),
                    ))
                }
                name => out.push(
                    AnalysisKind::ALL
                        .into_iter()
                        .find(|a| a.name() == name)
                        .ok_or_else(|| {
                            Error::Usage(format!(
                                "--analyses: unknown analysis `{name}` (available: static, all, {})",
                                AnalysisKind::ALL.map(|a| a.name()).join(", ")
                            ))
                        })?,
                ),
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// What to run.
pub struct AnalyzeOptions<'a> {
    pub analyses: Vec<AnalysisKind>,
    /// `None`: every MoE layer.
    pub layers: Option<LayerSelection>,
    /// `--dense-reference`: its FFN becomes row/column `F`.
    pub dense: Option<&'a DenseModel>,
}

/// Receives progress, one step per finished layer (the CLI draws a bar).
pub trait Progress {
    fn start(&self, _total: usize) {}
    fn layer_done(&self, _layer: usize) {}
    fn finish(&self) {}
}

/// No progress output.
impl Progress for () {}

/// The summary block of a report.
pub fn model_summary(model: &Model) -> ModelSummary {
    let info = &model.info;
    ModelSummary {
        family: info.family.id().to_string(),
        path: model.label().to_string(),
        num_layers: info.num_layers,
        moe_layers: info.moe_layers.clone(),
        num_experts: info.num_experts,
        top_k: info.top_k,
        hidden_size: info.hidden_size,
        intermediate_size: info.expert_intermediate,
        dtype: model.dtype().name().to_string(),
    }
}

/// The MoE layers an analysis run covers, and the selected dense layers it skips.
pub fn selected_layers(
    model: &Model,
    sel: Option<&LayerSelection>,
) -> Result<(Vec<usize>, Vec<usize>)> {
    match sel {
        None => Ok((model.info.moe_layers.clone(), Vec::new())),
        Some(sel) => sel.resolve(model.info.num_layers, &model.info.moe_layers),
    }
}

/// Runs the selected analyses layer by layer; each layer's pages are released
/// before the next is read, so memory stays near one layer whatever the depth.
/// `neuron-reorder` runs on the selected layers, or by default on the first,
/// middle and last MoE layer only (it costs one n×n assignment per expert pair).
pub fn run(model: &Model, opts: &AnalyzeOptions<'_>, progress: &dyn Progress) -> Result<Report> {
    let (layers, _) = selected_layers(model, opts.layers.as_ref())?;
    if let Some(dense) = opts.dense {
        dense.check_compatible(&model.info)?;
    }
    let want = |k| opts.analyses.contains(&k);
    let reorder_layers = match &opts.layers {
        Some(_) => layers.clone(),
        None => statics::neuron_reorder::default_layers(&model.info.moe_layers),
    };
    let needs = Needs {
        neuron_sum: want(AnalysisKind::NeuronSimilarity) || want(AnalysisKind::GateEmbedding),
        standardized_gram: want(AnalysisKind::Projection) && opts.dense.is_none(),
    };
    let streamed = want(AnalysisKind::ExpertSimilarity)
        || want(AnalysisKind::NeuronSimilarity)
        || want(AnalysisKind::GateEmbedding)
        || want(AnalysisKind::Projection);
    let experts = model.info.num_experts;
    let mut labels: Vec<String> = (0..experts).map(|e| e.to_string()).collect();
    if opts.dense.is_some() {
        labels.push("F".to_string());
    }
    let (mut expert_sim, mut neuron_sim, mut gate, mut proj, mut reorder) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    progress.start(layers.len());
    for &layer in &layers {
        let view = model.moe_layer(layer)?;
        let dense = opts.dense.map(|d| d.ffn(layer)).transpose()?;
        let mut stats: [MatrixStats; 3] = Default::default();
        if streamed {
            for (slot, m) in stats.iter_mut().zip(Matrix::ALL) {
                let mut views: Vec<_> = view.experts.iter().map(|x| x.matrix(m)).collect();
                views.extend(dense.map(|d| d.matrix(m)));
                *slot = stream::stream(&views, neurons::axis(m), needs)?;
                if want(AnalysisKind::Projection) && opts.dense.is_some() {
                    // Standardise over the experts only, without the dense FFN.
                    let only = Needs {
                        neuron_sum: false,
                        standardized_gram: true,
                    };
                    slot.standardized_gram =
                        stream::stream(&views[..experts], neurons::axis(m), only)?
                            .standardized_gram;
                }
            }
        }
        if want(AnalysisKind::ExpertSimilarity) {
            expert_sim.push(statics::expert_similarity::from_stats(
                layer, &labels, &stats,
            ));
        }
        if want(AnalysisKind::NeuronSimilarity) || want(AnalysisKind::GateEmbedding) {
            let ns = statics::neuron_similarity::from_stats(layer, &labels, &stats);
            if want(AnalysisKind::GateEmbedding) {
                gate.push(statics::gate_embedding::layer(&view.router, &ns, experts)?);
            }
            if want(AnalysisKind::NeuronSimilarity) {
                neuron_sim.push(ns);
            }
        }
        if want(AnalysisKind::Projection) {
            proj.push(statics::projection::layer(&view, &stats)?);
        }
        if want(AnalysisKind::NeuronReorder) && reorder_layers.contains(&layer) {
            reorder.push(statics::neuron_reorder::layer(&view)?);
        }
        drop(view);
        model.release_layer(layer);
        if let Some(d) = opts.dense {
            d.release_layer(layer);
        }
        progress.layer_done(layer);
    }
    progress.finish();
    Ok(Report {
        schema: REPORT_SCHEMA.to_string(),
        model: model_summary(model),
        analyses: Analyses {
            expert_similarity: want(AnalysisKind::ExpertSimilarity)
                .then_some(MatrixSimilarity { layers: expert_sim }),
            neuron_similarity: want(AnalysisKind::NeuronSimilarity)
                .then_some(MatrixSimilarity { layers: neuron_sim }),
            neuron_reorder: want(AnalysisKind::NeuronReorder)
                .then_some(NeuronReorder { layers: reorder }),
            gate_embedding: want(AnalysisKind::GateEmbedding).then(|| GateEmbedding {
                r2_avg: statics::gate_embedding::r2_avg(&gate),
                layers: gate,
            }),
            projection: want(AnalysisKind::Projection).then_some(Projection { layers: proj }),
        },
    })
}
