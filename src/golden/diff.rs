//! `diff`: two checkpoints of the same family and shape (base vs fine-tune,
//! bf16 vs quantized). Besides the drift metrics of [`super::compare`] (with
//! the router divergence taken token by token, since both models run live),
//! the cosine between corresponding experts' weight matrices, read from both
//! checkpoints one layer at a time; and the quantisation report
//! ([`super::quant_report`]).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::analysis::results::PerMatrix;
use crate::analysis::Progress;
use crate::error::{Error, Result};
use crate::golden::compare::{compare, Comparison};
use crate::golden::quant_report::{quant_report, QuantOptions, QuantReport};
use crate::golden::{build, dir_name, prompt_ids, BuildOptions, Selection, Tolerances};
use crate::model::{Matrix, Model, TensorView};

/// Per MoE layer, the cosine of each expert's flattened matrices (baseline vs candidate).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertCosines {
    /// The checkpoint's layer index.
    pub layer: usize,
    #[serde(flatten)]
    /// Cosine of each expert's matrix between the two models, per matrix.
    pub matrices: PerMatrix<Vec<f64>>,
}

const CHUNK: usize = 1 << 15;

/// Cosine of two tensors of one shape, streamed in chunks (f64 accumulation).
fn cosine(a: &TensorView<'_>, b: &TensorView<'_>) -> Result<f64> {
    if a.shape != b.shape {
        return Err(Error::Incompatible {
            path: b.path.to_path_buf(),
            reason: format!(
                "tensor `{}` has shape {:?}, but the baseline's `{}` has {:?}",
                b.name, b.shape, a.name, a.shape
            ),
        });
    }
    let n = a.numel();
    let (ab, aa, bb) = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let start = c * CHUNK;
            let len = CHUNK.min(n - start);
            let (mut x, mut y) = (vec![0f32; len], vec![0f32; len]);
            a.read_f32(start, &mut x);
            b.read_f32(start, &mut y);
            x.iter()
                .zip(&y)
                .fold((0.0, 0.0, 0.0), |(ab, aa, bb), (&p, &q)| {
                    let (p, q) = (p as f64, q as f64);
                    (ab + p * q, aa + p * p, bb + q * q)
                })
        })
        .reduce(|| (0.0, 0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1, x.2 + y.2));
    if !(ab.is_finite() && aa.is_finite() && bb.is_finite()) {
        let bad = if aa.is_finite() { b } else { a };
        return Err(Error::NonFinite {
            path: bad.path.to_path_buf(),
            tensor: bad.name.to_string(),
        });
    }
    Ok(if aa > 0.0 && bb > 0.0 {
        ab / (aa.sqrt() * bb.sqrt())
    } else {
        0.0
    })
}

/// Expert-by-expert weight cosines of every MoE layer.
pub fn expert_cosines(baseline: &Model, candidate: &Model) -> Result<Vec<ExpertCosines>> {
    let mut out = Vec::new();
    for &layer in &baseline.info.moe_layers {
        let va = baseline.moe_layer(layer)?;
        let vb = candidate.moe_layer(layer)?;
        let mut matrices = PerMatrix::from_fn(|_| Vec::new());
        for m in Matrix::ALL {
            let v = va
                .experts
                .iter()
                .zip(&vb.experts)
                .map(|(a, b)| cosine(&a.matrix(m), &b.matrix(m)))
                .collect::<Result<Vec<f64>>>()?;
            match m {
                Matrix::Up => matrices.up = v,
                Matrix::Gate => matrices.gate = v,
                Matrix::Down => matrices.down = v,
            }
        }
        drop((va, vb));
        baseline.release_layer(layer);
        candidate.release_layer(layer);
        out.push(ExpertCosines { layer, matrices });
    }
    Ok(out)
}

/// What to compare in [`diff`].
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// What to record on both models.
    pub selection: Selection,
    /// Tolerances of the comparison.
    pub tolerances: Tolerances,
    /// A prompt text file (default: the baseline's own prompts, if any).
    pub prompts: Option<PathBuf>,
    /// A token-id file.
    pub token_ids: Option<PathBuf>,
    /// Device of the forward passes (`cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// Calibration coverage: experts with fewer tokens are flagged
    /// (default [`super::quant_report::DEFAULT_COVERAGE_THRESHOLD`]).
    pub coverage_threshold: u64,
}

/// The outcome of [`diff`]: the drift comparison and the weight cosines.
#[derive(Debug, Clone)]
pub struct DiffOutcome {
    /// The baseline checkpoint.
    pub baseline: PathBuf,
    /// The candidate checkpoint.
    pub candidate: PathBuf,
    /// Drift metrics, baseline (as golden) vs candidate.
    pub comparison: Comparison,
    /// Expert-by-expert weight cosines.
    pub expert_cosine: Vec<ExpertCosines>,
    /// The quantisation report (two live checkpoints only; `None` for traces).
    pub quant: Option<QuantReport>,
}

impl DiffOutcome {
    /// Whether the candidate drifted beyond the tolerances.
    pub fn drift(&self) -> bool {
        self.comparison.drift()
    }
}

/// Compares two routing traces of one model (`model_dir`'s config.json
/// describes it; no weights are read): their routing snapshots are compared
/// as `check` compares a golden file. The outcome has no weight cosines.
pub fn diff_traces(
    model_dir: &Path,
    baseline: &Path,
    candidate: &Path,
    tolerances: Tolerances,
) -> Result<DiffOutcome> {
    let config = crate::model::Config::read_dir(model_dir)?;
    let info = crate::model::ModelInfo::from_config(&config)?;
    let snap = |file: &Path, name: String| -> Result<crate::golden::Snapshot> {
        let routing = crate::trace::read(file, Some(info.num_experts))?;
        crate::import::check_model(&routing, &info, file)?;
        crate::golden::from_trace(&routing, &config, &name, tolerances)
    };
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "trace".into())
    };
    let sa = snap(
        baseline,
        format!("{} → {}", name(baseline), name(candidate)),
    )?;
    let sb = snap(candidate, name(candidate))?;
    let comparison = compare(&sa, &sb, &tolerances).map_err(|e| e.at(candidate))?;
    Ok(DiffOutcome {
        baseline: baseline.to_path_buf(),
        candidate: candidate.to_path_buf(),
        comparison,
        expert_cosine: Vec::new(),
        quant: None,
    })
}

/// Compares two live checkpoints: both are recorded on the same prompts
/// (router distributions kept token by token), compared as `check` compares
/// a golden file, and their expert weights compared expert by expert.
pub fn diff(
    baseline: &Path,
    candidate: &Path,
    opts: &DiffOptions,
    progress: &dyn Fn(&Path) -> Box<dyn Progress>,
) -> Result<DiffOutcome> {
    let device = crate::forward::parse_device(&opts.device)?;
    let a = Model::open(baseline)?;
    let b = Model::open(candidate)?;
    for (m, path) in [(&a, baseline), (&b, candidate)] {
        if let Some(n) = m.notice() {
            progress(path).notice(n);
        }
    }
    let prompts = prompt_ids(
        Some(baseline),
        opts.prompts.as_deref(),
        opts.token_ids.as_deref(),
        opts.selection,
    )?;
    let record = |model: &Model, name: String, path: &Path| {
        build(
            model,
            &BuildOptions {
                name,
                selection: opts.selection,
                prompts: prompts.as_deref(),
                device: device.clone(),
                tolerances: opts.tolerances,
                keep_router_probs: true,
            },
            progress(path).as_ref(),
        )
    };
    let label = format!("{} → {}", dir_name(baseline), dir_name(candidate));
    let sa = record(&a, label, baseline)?;
    let sb = record(&b, dir_name(candidate), candidate)?;
    let comparison = compare(&sa, &sb, &opts.tolerances).map_err(|e| e.at(candidate))?;
    let expert_cosine = expert_cosines(&a, &b)?;
    let quant = quant_report(
        &a,
        &b,
        &sa,
        &sb,
        &QuantOptions {
            prompts: prompts.as_deref(),
            device,
            coverage_threshold: opts.coverage_threshold,
        },
        [progress(baseline).as_ref(), progress(candidate).as_ref()],
    )?;
    Ok(DiffOutcome {
        baseline: baseline.to_path_buf(),
        candidate: candidate.to_path_buf(),
        comparison,
        expert_cosine,
        quant: Some(quant),
    })
}
