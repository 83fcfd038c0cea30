//! The analyses of Lo et al. (2024), one file each, and the driver that runs
//! a selection of them over a model one layer at a time.

pub mod linalg;
#[path = "static/mod.rs"]
pub mod statics;

use crate::error::{Error, Result};
use crate::layers::LayerSelection;
use crate::model::{DenseModel, Model};
use crate::report::schema::{Analyses, MatrixSimilarity, ModelSummary, Report, REPORT_SCHEMA};

/// An analysis that can be selected with `--analyses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnalysisKind {
    ExpertSimilarity,
}

impl AnalysisKind {
    /// Every analysis this build implements.
    pub const ALL: [AnalysisKind; 1] = [AnalysisKind::ExpertSimilarity];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            AnalysisKind::ExpertSimilarity => "expert-similarity",
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
pub fn run(model: &Model, opts: &AnalyzeOptions<'_>, progress: &dyn Progress) -> Result<Report> {
    let (layers, _) = selected_layers(model, opts.layers.as_ref())?;
    if let Some(dense) = opts.dense {
        dense.check_compatible(&model.info)?;
    }
    let want = |k| opts.analyses.contains(&k);
    let mut expert_sim = Vec::new();
    progress.start(layers.len());
    for &layer in &layers {
        let view = model.moe_layer(layer)?;
        let dense = opts.dense.map(|d| d.ffn(layer)).transpose()?;
        if want(AnalysisKind::ExpertSimilarity) {
            expert_sim.push(statics::expert_similarity(&view, dense.as_ref())?);
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
        },
    })
}
