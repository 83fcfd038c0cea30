//! The analyses of Lo et al. (2024), one file each, and the driver that runs
//! a selection of them over a model one layer at a time.

internal_mod!(assignment);
internal_mod!(bf16_kernels);
pub mod dynamic;
internal_mod!(linalg);
internal_mod!(neurons);
pub mod results;
pub mod statics;
internal_mod!(stream);

use crate::analysis::results::{
    Analyses, GateEmbedding, MatrixSimilarity, ModelSummary, NeuronReorder, Projection, Report,
    REPORT_SCHEMA,
};
use crate::error::{Error, Result};
use crate::layers::LayerSelection;
use crate::model::{DenseModel, Matrix, Model};
use stream::{MatrixStats, Needs};

/// An analysis that can be selected with `--analyses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnalysisKind {
    /// `expert-similarity`: cosine similarity of the experts' flattened matrices.
    ExpertSimilarity,
    /// `neuron-similarity`: similarity of the experts' neurons.
    NeuronSimilarity,
    /// `neuron-reorder`: expert similarity after optimally permuting neurons.
    NeuronReorder,
    /// `gate-embedding`: router-row similarity and its correlation with neuron similarity.
    GateEmbedding,
    /// `projection`: 2-D PCA of experts and of their neurons.
    Projection,
    /// `output-similarity`: angular similarity of the experts' outputs (dynamic).
    OutputSimilarity,
    /// `norm-score`: gate scores against output norms (dynamic).
    NormScore,
    /// `intermediate`: the experts' intermediate activations (dynamic).
    Intermediate,
    /// `chosen-experts`: routing statistics (dynamic).
    ChosenExperts,
}

impl AnalysisKind {
    /// Every analysis this build implements.
    pub const ALL: [AnalysisKind; 9] = [
        AnalysisKind::ExpertSimilarity,
        AnalysisKind::NeuronSimilarity,
        AnalysisKind::NeuronReorder,
        AnalysisKind::GateEmbedding,
        AnalysisKind::Projection,
        AnalysisKind::OutputSimilarity,
        AnalysisKind::NormScore,
        AnalysisKind::Intermediate,
        AnalysisKind::ChosenExperts,
    ];

    /// The name used on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            AnalysisKind::ExpertSimilarity => "expert-similarity",
            AnalysisKind::NeuronSimilarity => "neuron-similarity",
            AnalysisKind::NeuronReorder => "neuron-reorder",
            AnalysisKind::GateEmbedding => "gate-embedding",
            AnalysisKind::Projection => "projection",
            AnalysisKind::OutputSimilarity => "output-similarity",
            AnalysisKind::NormScore => "norm-score",
            AnalysisKind::Intermediate => "intermediate",
            AnalysisKind::ChosenExperts => "chosen-experts",
        }
    }

    /// Whether it needs only the weights (else a forward pass over prompts).
    pub fn is_static(self) -> bool {
        !matches!(
            self,
            AnalysisKind::OutputSimilarity
                | AnalysisKind::NormScore
                | AnalysisKind::Intermediate
                | AnalysisKind::ChosenExperts
        )
    }

    /// The analysis called `name` on the command line and in reports.
    pub fn from_name(name: &str) -> Option<AnalysisKind> {
        AnalysisKind::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The analyses of a group name: `static`, `dynamic` or `all`.
    pub fn group(name: &str) -> Option<Vec<AnalysisKind>> {
        let all = AnalysisKind::ALL.into_iter();
        match name {
            "all" => Some(all.collect()),
            "static" => Some(all.filter(|a| a.is_static()).collect()),
            "dynamic" => Some(all.filter(|a| !a.is_static()).collect()),
            _ => None,
        }
    }

    /// Parses `static`, `dynamic`, `all` or a comma-separated list of names.
    pub fn parse_selection(spec: &str) -> Result<Vec<AnalysisKind>> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim) {
            if let Some(group) = AnalysisKind::group(part) {
                out.extend(group);
                continue;
            }
            out.push(AnalysisKind::from_name(part).ok_or_else(|| {
                Error::bad_value(
                    crate::error::ValueKind::Analyses,
                    "",
                    format!(
                        "unknown analysis `{part}` (available: static, dynamic, all, {})",
                        AnalysisKind::ALL.map(|a| a.name()).join(", ")
                    ),
                )
            })?);
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// What to run.
pub struct AnalyzeOptions<'a> {
    /// The analyses to run (see [`AnalysisKind::parse_selection`]).
    pub analyses: Vec<AnalysisKind>,
    /// `None`: every MoE layer.
    pub layers: Option<LayerSelection>,
    /// `--dense-reference`: its FFN becomes row/column `F`.
    pub dense: Option<&'a DenseModel>,
    /// The forward pass and prompts for the dynamic analyses.
    pub dynamic: Option<DynamicInput<'a>>,
}

/// What the dynamic analyses run on.
pub struct DynamicInput<'a> {
    /// The forward pass the prompts run through.
    pub forward: &'a crate::forward::Forward<'a>,
    /// Token ids, one vector per prompt.
    pub prompts: &'a [Vec<u32>],
    /// `intermediate`: threshold as a fraction of the layer's largest |a| (0.1).
    pub threshold_fraction: f64,
}

/// Receives progress, one step per finished layer (the CLI draws a bar).
pub trait Progress {
    /// Called once before the first layer with the number of layers.
    fn start(&self, _total: usize) {}
    /// Called when `layer` is finished.
    fn layer_done(&self, _layer: usize) {}
    /// What is being computed within the current layer (the expert pairs
    /// neuron-reorder is aligning, with the time left), for the bar's message.
    fn detail(&self, _text: &str) {}
    /// Called after the last layer.
    fn finish(&self) {}
    /// Something the user should know about the run (what was inferred
    /// about a model, an analysis left out): one line, without a prefix.
    fn notice(&self, _text: &str) {}
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
/// `neuron-reorder` runs on the selected layers, or by default on the middle
/// MoE layer only (it costs one n×n assignment per expert pair and matrix).
///
/// ```rust
/// use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions};
/// use moe_inspect::layers::LayerSelection;
/// use moe_inspect::model::Model;
///
/// let model = Model::demo()?;
/// let opts = AnalyzeOptions {
///     analyses: AnalysisKind::parse_selection("expert-similarity")?,
///     layers: Some(LayerSelection::parse("0")?),
///     dense: None,
///     dynamic: None,
/// };
/// // `&()` reports no progress.
/// let report = analysis::run(&model, &opts, &())?;
/// assert_eq!(report.model.num_experts, 8);
/// # Ok::<(), moe_inspect::Error>(())
/// ```
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
    let dynamic_wanted = opts.analyses.iter().any(|a| !a.is_static());
    let dynamic = match (&opts.dynamic, dynamic_wanted) {
        (Some(d), true) => Some(dynamic::run_with_progress(
            d.forward,
            d.prompts,
            &dynamic::DynamicOptions {
                output_similarity: want(AnalysisKind::OutputSimilarity),
                norm_score: want(AnalysisKind::NormScore),
                intermediate: want(AnalysisKind::Intermediate),
                chosen_experts: want(AnalysisKind::ChosenExperts),
                layers: layers.clone(),
                threshold_fraction: d.threshold_fraction,
            },
            opts.dense,
            progress,
        )?),
        (None, true) => {
            return Err(Error::Usage(
                "the dynamic analyses need prompts and a forward pass".into(),
            ))
        }
        _ => None,
    };
    let static_wanted = opts.analyses.iter().any(|a| a.is_static());
    let layers = if static_wanted { layers } else { Vec::new() };
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
            reorder.push(statics::neuron_reorder::layer_with_progress(
                &view, progress,
            )?);
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
            output_similarity: dynamic.as_ref().and_then(|d| d.output_similarity.clone()),
            norm_score: dynamic.as_ref().and_then(|d| d.norm_score.clone()),
            intermediate: dynamic.as_ref().and_then(|d| d.intermediate.clone()),
            chosen_experts: dynamic.as_ref().and_then(|d| d.chosen_experts.clone()),
        },
        maps: dynamic.map(|d| d.maps).unwrap_or_default(),
        token_labels: Vec::new(),
    })
}
