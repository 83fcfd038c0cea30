//! The quantisation report of `diff --baseline BASE --candidate QUANT`
//! (SPEC §10): per MoE layer and expert, what quantisation (or any
//! conversion) did to the experts.
//!
//! - **Relative weight error** `‖W′ − W‖ / ‖W‖` (Frobenius, f64 accumulation,
//!   streamed from both checkpoints) of each expert matrix and of the router
//!   (whole matrix and row by row) and of the shared expert, after the experts are matched as `check`
//!   matches them ([`match_experts`]): when the candidate's experts were
//!   relabelled consistently, baseline expert `i` is compared with the
//!   candidate's expert `matching[i]`.
//! - **Routing agreement** on the prompts: top-1 agreement, top-k set
//!   overlap and the mean per-token Jensen–Shannon divergence of the router
//!   distributions (the same definitions as `check`'s rows).
//! - **Attribution** of every routing change. Over tokens × MoE layers, a
//!   *flip* is a token whose candidate top-k set differs from the baseline's.
//!   It is a *router flip* when the baseline router, applied to the
//!   candidate's own layer input (with the baseline's routing rule: softmax
//!   or sigmoid, group limits, correction bias), picks a different set than
//!   the candidate's router does on that input; otherwise an *upstream flip*
//!   (the hidden state drifted in earlier layers). `router_share =
//!   router_flips / flips`, 0 when there are no flips. Both routers are
//!   applied by the same host code (f64 dot products, then the family rule of
//!   [`Routing`]), so bit-identical routers never produce a router flip.
//! - **Calibration coverage**: tokens each expert received on the prompts
//!   (baseline and candidate); experts that received fewer than a threshold
//!   (default [`DEFAULT_COVERAGE_THRESHOLD`]) in either model are flagged:
//!   GPTQ-style tools calibrate an expert on the tokens routed to it, and
//!   leave experts without tokens unquantised or badly calibrated.
//!
//! The dynamic part runs one forward pass of each model (the candidate's
//! observes each MoE layer's input) on the prompts of `diff`.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::analysis::results::PerMatrix;
use crate::analysis::Progress;
use crate::error::{Error, Result};
use crate::forward::config::ForwardConfig;
use crate::forward::observer::{MoeObservation, Observer, Wants};
use crate::forward::routing::Routing;
use crate::forward::Forward;
use crate::golden::compare::{jsd, match_experts, Matching};
use crate::golden::Snapshot;
use crate::model::{Matrix, Model, TensorView};

/// Experts that received fewer tokens than this on the prompts are flagged
/// by default: 1, i.e. experts that received no token at all.
pub const DEFAULT_COVERAGE_THRESHOLD: u64 = 1;

/// How many routing changes the router's own quantisation explains.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Attribution {
    /// Tokens (× MoE layers) whose candidate top-k set differs from the baseline's.
    pub flips: u64,
    /// Flips where the baseline router on the candidate's input picks another
    /// set than the candidate's router.
    pub router_flips: u64,
    /// The other flips: the layer input drifted upstream.
    pub upstream_flips: u64,
    /// `router_flips / flips` (0 when there are no flips).
    pub router_share: f64,
}

impl Attribution {
    fn new(flips: u64, router_flips: u64) -> Attribution {
        Attribution {
            flips,
            router_flips,
            upstream_flips: flips - router_flips,
            router_share: if flips > 0 {
                router_flips as f64 / flips as f64
            } else {
                0.0
            },
        }
    }
}

/// Routing agreement of one MoE layer on the prompts (baseline labels).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoutingAgreement {
    /// Share of tokens whose top-1 expert is the same.
    pub top1: f64,
    /// Mean share of the baseline's top-k experts also in the candidate's top-k.
    pub topk_overlap: f64,
    /// Mean per-token Jensen–Shannon divergence of the router distributions (nats).
    pub jsd: f64,
}

/// Tokens each expert received on the prompts (indexed by baseline expert).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    /// Tokens routed to each expert by the baseline.
    pub baseline: Vec<u64>,
    /// Tokens routed to each (matched) expert by the candidate.
    pub candidate: Vec<u64>,
    /// Experts with fewer tokens than the threshold in either model.
    pub flagged: Vec<usize>,
}

/// The quantisation report of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// The candidate's expert matched to each baseline expert, when the
    /// candidate's experts were relabelled (absent: expert `i` is expert `i`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matching: Option<Vec<usize>>,
    /// Relative error of the whole router matrix.
    pub router_error: f64,
    /// Relative error of each expert's router row.
    pub router_row_error: Vec<f64>,
    /// Relative error of each expert's matrices (per matrix, per baseline expert).
    pub weight_error: PerMatrix<Vec<f64>>,
    /// Relative error of the shared expert's matrices, if the family has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_error: Option<PerMatrix<f64>>,
    /// Routing agreement on the prompts (absent without prompts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingAgreement>,
    /// Attribution of this layer's flips (absent without prompts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    /// Calibration coverage (absent without prompts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
}

/// The quantisation report of `diff`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantReport {
    /// Experts with fewer tokens than this are flagged.
    pub coverage_threshold: u64,
    /// Tokens of the prompts (0 without prompts).
    pub tokens: usize,
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<QuantLayer>,
    /// Attribution over all tokens × MoE layers (absent without prompts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
}

impl QuantReport {
    /// Every flagged (layer, expert) of the calibration coverage.
    pub fn flagged(&self) -> Vec<(usize, usize)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.coverage
                    .iter()
                    .flat_map(move |c| c.flagged.iter().map(move |&e| (l.layer, e)))
            })
            .collect()
    }
}

const CHUNK: usize = 1 << 15;

/// `(Σ (b − a)², Σ a²)` over rows `rows_a` of `a` and `rows_b` of `b`
/// (row length `width`), in f64.
fn sq_sums(
    a: &TensorView<'_>,
    b: &TensorView<'_>,
    width: usize,
    rows: &[(usize, usize)],
) -> Result<(f64, f64)> {
    let mut x = vec![0f32; width];
    let mut y = vec![0f32; width];
    let (mut d2, mut a2) = (0.0f64, 0.0f64);
    for &(ra, rb) in rows {
        a.read_f32(ra * width, &mut x);
        b.read_f32(rb * width, &mut y);
        for (&p, &q) in x.iter().zip(&y) {
            let (p, q) = (p as f64, q as f64);
            d2 += (q - p) * (q - p);
            a2 += p * p;
        }
    }
    Ok((d2, a2))
}

fn same_shape(a: &TensorView<'_>, b: &TensorView<'_>) -> Result<()> {
    if a.shape != b.shape {
        return Err(Error::Incompatible {
            path: b.path.to_path_buf(),
            reason: format!(
                "tensor `{}` has shape {:?}, but the baseline's `{}` has {:?}",
                b.name, b.shape, a.name, a.shape
            ),
        });
    }
    Ok(())
}

/// The relative error of sums `(Σ (b − a)², Σ a²)`, or the non-finite
/// tensor named (the baseline's when its own sum is not finite).
fn checked(d2: f64, a2: f64, a: &TensorView<'_>, b: &TensorView<'_>) -> Result<f64> {
    if !(a2.is_finite() && d2.is_finite()) {
        let bad = if a2.is_finite() { b } else { a };
        return Err(Error::NonFinite {
            path: bad.path.to_path_buf(),
            tensor: bad.name.to_string(),
        });
    }
    Ok(relative(d2, a2))
}

/// `‖b − a‖ / ‖a‖`; 0 when both are zero, ∞ (JSON `null`) when only `a` is.
fn relative(d2: f64, a2: f64) -> f64 {
    if a2 > 0.0 {
        (d2 / a2).sqrt()
    } else if d2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Relative error `‖b − a‖ / ‖a‖` of two tensors of one shape, streamed in
/// chunks with f64 accumulation.
pub fn relative_error(a: &TensorView<'_>, b: &TensorView<'_>) -> Result<f64> {
    same_shape(a, b)?;
    let n = a.numel();
    let (d2, a2) = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let start = c * CHUNK;
            let len = CHUNK.min(n - start);
            let (mut x, mut y) = (vec![0f32; len], vec![0f32; len]);
            a.read_f32(start, &mut x);
            b.read_f32(start, &mut y);
            x.iter().zip(&y).fold((0.0, 0.0), |(d2, a2), (&p, &q)| {
                let (p, q) = (p as f64, q as f64);
                (d2 + (q - p) * (q - p), a2 + p * p)
            })
        })
        .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1));
    checked(d2, a2, a, b)
}

/// The matching `check` uses: `perm[i]` of the candidate is expert `i` of
/// the baseline (identity unless consistently relabelled).
fn matching(sa: &Snapshot, sb: &Snapshot, li: usize, e: usize) -> (Vec<usize>, bool) {
    match (sa.layers.get(li), sb.layers.get(li)) {
        (Some(ga), Some(gb)) => match match_experts(ga, gb) {
            Matching::Relabelled(p) if p.len() == e => (p, true),
            _ => ((0..e).collect(), false),
        },
        _ => ((0..e).collect(), false),
    }
}

/// Router (whole, per row), expert and shared-expert errors of one layer.
type LayerErrors = (f64, Vec<f64>, PerMatrix<Vec<f64>>, Option<PerMatrix<f64>>);

/// Weight errors of one MoE layer under `perm`.
fn layer_errors(
    baseline: &Model,
    candidate: &Model,
    layer: usize,
    perm: &[usize],
) -> Result<LayerErrors> {
    let va = baseline.moe_layer(layer)?;
    let vb = candidate.moe_layer(layer)?;
    if va.experts.len() != perm.len() || vb.experts.len() != perm.len() {
        return Err(Error::Incompatible {
            path: vb.router.path.to_path_buf(),
            reason: format!(
                "layer {layer}: {} experts, but the baseline has {}",
                vb.experts.len(),
                va.experts.len()
            ),
        });
    }
    let mut weight = PerMatrix::from_fn(|_| Vec::new());
    for m in Matrix::ALL {
        let v = (0..perm.len())
            .map(|i| relative_error(&va.experts[i].matrix(m), &vb.experts[perm[i]].matrix(m)))
            .collect::<Result<Vec<f64>>>()?;
        match m {
            Matrix::Up => weight.up = v,
            Matrix::Gate => weight.gate = v,
            Matrix::Down => weight.down = v,
        }
    }
    let (ra, rb) = (&va.router, &vb.router);
    same_shape(ra, rb)?;
    let width = ra.shape.last().copied().unwrap_or(0);
    if ra.shape.len() != 2 || ra.shape[0] != perm.len() {
        return Err(Error::Incompatible {
            path: ra.path.to_path_buf(),
            reason: format!(
                "router `{}` has shape {:?}, expected [{}, hidden]",
                ra.name,
                ra.shape,
                perm.len()
            ),
        });
    }
    let (mut d2, mut a2) = (0.0, 0.0);
    let mut rows = Vec::with_capacity(perm.len());
    for (i, &p) in perm.iter().enumerate() {
        let (d, a) = sq_sums(ra, rb, width, &[(i, p)])?;
        rows.push(checked(d, a, ra, rb)?);
        d2 += d;
        a2 += a;
    }
    let router = checked(d2, a2, ra, rb)?;
    let shared = match (&va.shared, &vb.shared) {
        (Some(sa), Some(sb)) => {
            let mut out = PerMatrix::from_fn(|_| 0.0);
            for m in Matrix::ALL {
                let v = relative_error(&sa.matrix(m), &sb.matrix(m))?;
                match m {
                    Matrix::Up => out.up = v,
                    Matrix::Gate => out.gate = v,
                    Matrix::Down => out.down = v,
                }
            }
            Some(out)
        }
        _ => None,
    };
    drop((va, vb));
    baseline.release_layer(layer);
    candidate.release_layer(layer);
    Ok((router, rows, weight, shared))
}

/// What one model's forward pass recorded per MoE layer.
#[derive(Default)]
struct Recorded {
    /// `[tokens, k]`, prompts in order.
    selected: Vec<u32>,
    /// `[tokens, experts]` router distributions.
    probs: Vec<f32>,
    /// Per token (candidate only): whether the two routers disagree on its input.
    router_differs: Vec<bool>,
}

/// One router as the forward pass applies it.
struct RouterRule {
    /// `[E, hidden]`.
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
}

fn load_router(model: &Model, cfg: &ForwardConfig, layer: usize) -> Result<RouterRule> {
    let view = model.moe_layer(layer)?;
    let weight = view.router.to_f32_vec();
    if weight.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            path: view.router.path.to_path_buf(),
            tensor: view.router.name.to_string(),
        });
    }
    drop(view);
    let bias = match cfg.family.spec().correction_bias {
        Some(rest) => {
            let name = model.naming().layer_tensor(layer, rest);
            let w = model.weights();
            if w.contains(&name) {
                w.expect_shape(&name, &[model.info.num_experts])?;
                let t = w.tensor(&name)?;
                let b = t.to_f32_vec();
                if b.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        path: t.path.to_path_buf(),
                        tensor: name,
                    });
                }
                Some(b)
            } else {
                None
            }
        }
        None => None,
    };
    Ok(RouterRule { weight, bias })
}

/// Records routing; for the candidate also applies both routers to each
/// MoE layer's input.
struct Pass<'a> {
    layers: BTreeMap<usize, Recorded>,
    progress: &'a dyn Progress,
    /// With the candidate: the baseline (model, rule) and the candidate's rule.
    attribution: Option<Attributor<'a>>,
    error: Option<Error>,
}

struct Attributor<'a> {
    baseline: &'a Model,
    candidate: &'a Model,
    base_cfg: ForwardConfig,
    cand_cfg: ForwardConfig,
    /// Per layer: inverse matching (candidate expert → baseline expert).
    inv: BTreeMap<usize, Vec<usize>>,
    /// The routers of the layer being observed.
    current: Option<(usize, RouterRule, RouterRule)>,
}

fn logits(weight: &[f32], x: &[f32]) -> Vec<f32> {
    weight
        .chunks(x.len().max(1))
        .map(|row| {
            row.iter()
                .zip(x)
                .map(|(&w, &v)| w as f64 * v as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

impl Attributor<'_> {
    /// Whether the two routers pick different sets, token by token.
    fn differs(&mut self, o: &MoeObservation<'_>, input: &[f32]) -> Result<Vec<bool>> {
        if self.current.as_ref().map(|c| c.0) != Some(o.layer) {
            let b = load_router(self.baseline, &self.base_cfg, o.layer)?;
            self.baseline.release_layer(o.layer);
            let c = load_router(self.candidate, &self.cand_cfg, o.layer)?;
            self.current = Some((o.layer, b, c));
        }
        let Some((_, rb, rc)) = &self.current else {
            unreachable!("set above")
        };
        let (h, e, k) = (o.hidden, o.experts, o.top_k);
        for r in [rb, rc] {
            if r.weight.len() != e * h {
                return Err(Error::Compute {
                    what: "quantisation report".into(),
                    reason: format!(
                        "layer {}: router of {} values, expected {e} × {h}",
                        o.layer,
                        r.weight.len()
                    ),
                });
            }
        }
        let inv = self.inv.get(&o.layer).cloned().unwrap_or_default();
        if inv.len() != e {
            return Err(Error::Compute {
                what: "quantisation report".into(),
                reason: format!("layer {}: no expert matching", o.layer),
            });
        }
        let (base_rule, cand_rule): (&Routing, &Routing) =
            (&self.base_cfg.routing, &self.cand_cfg.routing);
        Ok(input
            .par_chunks(h.max(1))
            .map(|x| {
                let mut sb = base_rule
                    .route(&logits(&rb.weight, x), k, rb.bias.as_deref())
                    .experts;
                let mut sc: Vec<usize> = cand_rule
                    .route(&logits(&rc.weight, x), k, rc.bias.as_deref())
                    .experts
                    .into_iter()
                    .map(|c| inv[c])
                    .collect();
                sb.sort_unstable();
                sc.sort_unstable();
                sb != sc
            })
            .collect())
    }
}

impl Observer for Pass<'_> {
    fn layer_done(&mut self, layer: usize) {
        self.progress.layer_done(layer);
    }

    fn wants(&self) -> Wants {
        Wants {
            input: self.attribution.is_some(),
            ..Wants::default()
        }
    }

    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        if self.error.is_some() {
            return;
        }
        let e = o.experts;
        let differs = match (&mut self.attribution, o.input) {
            (Some(a), Some(input)) => match a.differs(o, input) {
                Ok(d) => Some(d),
                Err(err) => {
                    self.error = Some(err);
                    return;
                }
            },
            (Some(_), None) => {
                self.error = Some(Error::Compute {
                    what: "quantisation report".into(),
                    reason: format!("the forward pass gave no input of MoE layer {}", o.layer),
                });
                return;
            }
            _ => None,
        };
        let rec = self.layers.entry(o.layer).or_default();
        rec.selected.extend_from_slice(o.selected);
        for t in 0..o.tokens {
            let s = &o.scores[t * e..(t + 1) * e];
            let total: f64 = s.iter().map(|&x| x as f64).sum();
            rec.probs.extend(s.iter().map(|&x| {
                if total > 0.0 {
                    (x as f64 / total) as f32
                } else {
                    0.0
                }
            }));
        }
        if let Some(d) = differs {
            rec.router_differs.extend(d);
        }
    }
}

fn sorted(v: &[u32]) -> Vec<u32> {
    let mut s = v.to_vec();
    s.sort_unstable();
    s
}

/// What [`quant_report`] runs on.
#[derive(Debug, Clone)]
pub struct QuantOptions<'a> {
    /// Token ids of the prompts (without them only the weight errors are computed).
    pub prompts: Option<&'a [Vec<u32>]>,
    /// Device of the forward passes.
    pub device: candle_core::Device,
    /// Experts with fewer tokens than this are flagged.
    pub coverage_threshold: u64,
}

/// Computes the quantisation report of `candidate` against `baseline`.
/// `sa` and `sb` are their snapshots (for the expert matching); `progress`
/// reports the forward pass of each model (baseline, candidate).
pub fn quant_report(
    baseline: &Model,
    candidate: &Model,
    sa: &Snapshot,
    sb: &Snapshot,
    opts: &QuantOptions<'_>,
    progress: [&dyn Progress; 2],
) -> Result<QuantReport> {
    let (prompts, device, threshold) = (opts.prompts, &opts.device, opts.coverage_threshold);
    let info = &baseline.info;
    let e = info.num_experts;
    let k = info.top_k;
    if candidate.info.moe_layers != info.moe_layers
        || candidate.info.num_experts != e
        || candidate.info.top_k != k
    {
        return Err(Error::NotComparable(format!(
            "not the same MoE geometry: baseline MoE layers {:?} with {e} experts (top-{k}), candidate {:?} with {} (top-{})",
            info.moe_layers, candidate.info.moe_layers, candidate.info.num_experts, candidate.info.top_k
        )));
    }
    let mut layers = Vec::with_capacity(info.moe_layers.len());
    let mut perms = BTreeMap::new();
    for (li, &layer) in info.moe_layers.iter().enumerate() {
        let (perm, relabelled) = matching(sa, sb, li, e);
        let (router_error, router_row_error, weight_error, shared_error) =
            layer_errors(baseline, candidate, layer, &perm)?;
        layers.push(QuantLayer {
            layer,
            matching: relabelled.then(|| perm.clone()),
            router_error,
            router_row_error,
            weight_error,
            shared_error,
            routing: None,
            attribution: None,
            coverage: None,
        });
        perms.insert(layer, perm);
    }
    let Some(prompts) = prompts else {
        return Ok(QuantReport {
            coverage_threshold: threshold,
            tokens: 0,
            layers,
            attribution: None,
        });
    };
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let run = |model: &Model,
               attribution: Option<Attributor<'_>>,
               progress: &dyn Progress|
     -> Result<_> {
        let fwd = Forward::new(model, device.clone())?;
        let mut pass = Pass {
            layers: BTreeMap::new(),
            progress,
            attribution,
            error: None,
        };
        progress.start(model.info.num_layers);
        fwd.run(prompts, &mut pass, false)?;
        progress.finish();
        match pass.error {
            Some(err) => Err(err),
            None => Ok(pass.layers),
        }
    };
    let base = run(baseline, None, progress[0])?;
    let inv = perms
        .iter()
        .map(|(&l, p)| {
            let mut inv = vec![0usize; e];
            for (i, &c) in p.iter().enumerate() {
                inv[c] = i;
            }
            (l, inv)
        })
        .collect();
    let cand = run(
        candidate,
        Some(Attributor {
            baseline,
            candidate,
            base_cfg: ForwardConfig::from_config(&baseline.config, &baseline.info)?,
            cand_cfg: ForwardConfig::from_config(&candidate.config, &candidate.info)?,
            inv,
            current: None,
        }),
        progress[1],
    )?;
    let (mut flips_total, mut router_total) = (0u64, 0u64);
    for slot in &mut layers {
        let layer = slot.layer;
        let missing = || Error::Compute {
            what: "quantisation report".into(),
            reason: format!("the forward pass did not report MoE layer {layer}"),
        };
        let (ra, rb) = (
            base.get(&layer).ok_or_else(missing)?,
            cand.get(&layer).ok_or_else(missing)?,
        );
        if ra.selected.len() != tokens * k
            || rb.selected.len() != tokens * k
            || ra.probs.len() != tokens * e
            || rb.probs.len() != tokens * e
            || rb.router_differs.len() != tokens
        {
            return Err(Error::Compute {
                what: "quantisation report".into(),
                reason: format!("layer {layer}: the forward passes reported a different number of tokens than the {tokens} of the prompts"),
            });
        }
        let perm = &perms[&layer];
        let mut inv = vec![0usize; e];
        for (i, &c) in perm.iter().enumerate() {
            inv[c] = i;
        }
        let (mut top1, mut overlap, mut div) = (0usize, 0usize, 0.0f64);
        let (mut flips, mut router_flips) = (0u64, 0u64);
        let (mut load_a, mut load_c) = (vec![0u64; e], vec![0u64; e]);
        for t in 0..tokens {
            let ga = &ra.selected[t * k..(t + 1) * k];
            let gc: Vec<u32> = rb.selected[t * k..(t + 1) * k]
                .iter()
                .map(|&c| inv[c as usize] as u32)
                .collect();
            if k > 0 && ga[0] == gc[0] {
                top1 += 1;
            }
            overlap += ga.iter().filter(|x| gc.contains(x)).count();
            if sorted(ga) != sorted(&gc) {
                flips += 1;
                if rb.router_differs[t] {
                    router_flips += 1;
                }
            }
            for &x in ga {
                load_a[x as usize] += 1;
            }
            for &x in &gc {
                load_c[x as usize] += 1;
            }
            let p: Vec<f64> = ra.probs[t * e..(t + 1) * e]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let q: Vec<f64> = (0..e).map(|i| rb.probs[t * e + perm[i]] as f64).collect();
            div += jsd(&p, &q);
        }
        let tk = tokens.max(1) as f64;
        let routing = RoutingAgreement {
            top1: top1 as f64 / tk,
            topk_overlap: overlap as f64 / (tk * k.max(1) as f64),
            jsd: div / tk,
        };
        if !(routing.top1.is_finite()
            && routing.topk_overlap.is_finite()
            && routing.jsd.is_finite())
        {
            return Err(Error::Compute {
                what: "quantisation report".into(),
                reason: format!("layer {layer}: non-finite routing agreement"),
            });
        }
        slot.routing = Some(routing);
        slot.attribution = Some(Attribution::new(flips, router_flips));
        let flagged = (0..e)
            .filter(|&i| load_a[i] < threshold || load_c[i] < threshold)
            .collect();
        slot.coverage = Some(Coverage {
            baseline: load_a,
            candidate: load_c,
            flagged,
        });
        flips_total += flips;
        router_total += router_flips;
    }
    Ok(QuantReport {
        coverage_threshold: threshold,
        tokens,
        layers,
        attribution: Some(Attribution::new(flips_total, router_total)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_of_zero_matrices_and_attribution_shares() {
        assert_eq!(relative(0.0, 0.0), 0.0);
        assert_eq!(relative(1.0, 0.0), f64::INFINITY);
        assert!((relative(1.0, 4.0) - 0.5).abs() < 1e-15);
        let a = Attribution::new(8, 6);
        assert_eq!((a.upstream_flips, a.router_share), (2, 0.75));
        assert_eq!(Attribution::new(0, 0).router_share, 0.0);
    }

    #[test]
    fn f64_logits_are_the_dot_products_of_the_router_rows() {
        let w = [1.0f32, 2.0, -1.0, 0.5, 0.0, 3.0];
        assert_eq!(logits(&w, &[2.0, 1.0, 1.0]), vec![3.0, 4.0]);
    }
}
