//! Drift metrics between two snapshots (golden vs now, or baseline vs
//! candidate), per MoE layer, each with a tolerance and a verdict.
//!
//! Experts are matched first: per layer, a linear assignment on the cosine of
//! the experts' fingerprints finds which expert of `now` is which expert of
//! the golden. A consistent relabelling (weights and router rows moved
//! together) computes the same function: it is reported as a notice and every
//! metric of that layer is compared under the matching. Expert weights that
//! moved without their router rows change the function: that is drift
//! (`expert-assignment`), and the layer is compared as stored.

use serde::Serialize;

use crate::analysis::assignment;
use crate::error::{Error, Result};
use crate::golden::{LayerSnapshot, Snapshot, Tolerances};
use crate::model::Matrix;

/// How a metric is held to its tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Limit {
    /// `now ≥ tolerance` (agreements).
    Min,
    /// `now ≤ tolerance` (divergences, distances, counts).
    Max,
    /// `|now − golden| ≤ tolerance`.
    AbsDelta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
/// Whether a drift row is within tolerance.
pub enum Verdict {
    /// Within tolerance.
    Ok,
    /// Beyond tolerance.
    Drift,
}

/// One line of the drift table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftRow {
    /// Metric name (e.g. `expert_similarity.up`).
    pub metric: String,
    /// The checkpoint's layer index.
    pub layer: usize,
    /// Value in the golden snapshot.
    pub golden: f64,
    /// Value now.
    pub now: f64,
    /// The change, as the metric measures it.
    pub delta: f64,
    /// The tolerance it is held to.
    pub tolerance: f64,
    /// How the tolerance applies.
    pub limit: Limit,
    /// Within tolerance or not.
    pub verdict: Verdict,
    /// Where in a matrix the largest change is, or other context.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl DriftRow {
    fn new(
        metric: &str,
        layer: usize,
        golden: f64,
        now: f64,
        tolerance: f64,
        limit: Limit,
    ) -> Self {
        let delta = now - golden;
        let ok = match limit {
            Limit::Min => now >= tolerance,
            Limit::Max => now <= tolerance,
            Limit::AbsDelta => delta.abs() <= tolerance,
        };
        DriftRow {
            metric: metric.to_string(),
            layer,
            golden,
            now,
            delta,
            tolerance,
            limit,
            verdict: if ok && now.is_finite() {
                Verdict::Ok
            } else {
                Verdict::Drift
            },
            detail: String::new(),
        }
    }

    /// The tolerance as shown in tables: `≥ 0.99`, `≤ 0.005`, `± 0.001`.
    pub fn tolerance_text(&self) -> String {
        let sign = match self.limit {
            Limit::Min => "≥",
            Limit::Max => "≤",
            Limit::AbsDelta => "±",
        };
        format!("{sign} {}", self.tolerance)
    }
}

/// Something worth knowing that is not drift by itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The layer it concerns, if any.
    pub layer: Option<usize>,
    /// What happened, in words.
    pub message: String,
}

/// The result of comparing two snapshots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The snapshot's name.
    pub name: String,
    /// One row per metric and layer.
    pub rows: Vec<DriftRow>,
    /// Notices that are not drift.
    pub notices: Vec<Notice>,
}

impl Comparison {
    /// Whether any metric is beyond its tolerance.
    pub fn drift(&self) -> bool {
        self.rows.iter().any(|r| r.verdict == Verdict::Drift)
    }

    /// The rows beyond tolerance.
    pub fn drifted(&self) -> impl Iterator<Item = &DriftRow> {
        self.rows.iter().filter(|r| r.verdict == Verdict::Drift)
    }
}

/// How the experts of one layer correspond.
#[derive(Debug, Clone, PartialEq)]
pub enum Matching {
    /// Expert `i` is expert `i`.
    Same,
    /// `perm[i]` of `now` is expert `i` of the golden; router rows moved too.
    Relabelled(Vec<usize>),
    /// The weights of expert `i` are now at `perm[i]`, but the router rows stayed.
    WeightsMoved(Vec<usize>),
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Matches the experts of one layer by their fingerprints.
pub fn match_experts(gold: &LayerSnapshot, now: &LayerSnapshot) -> Matching {
    let (Some(g), Some(n)) = (&gold.fingerprint, &now.fingerprint) else {
        return Matching::Same;
    };
    let e = g.router.len();
    if e < 2 || n.router.len() != e {
        return Matching::Same;
    }
    let mut c = vec![0.0f64; e * e];
    for i in 0..e {
        for j in 0..e {
            c[i * e + j] = Matrix::ALL
                .iter()
                .map(|&m| dot(&g.experts.get(m)[i], &n.experts.get(m)[j]))
                .sum::<f64>()
                / 3.0;
        }
    }
    let Some(perm) = assignment::maximize(&c, e) else {
        return Matching::Same;
    };
    let moved: Vec<usize> = (0..e).filter(|&i| perm[i] != i).collect();
    // Only a clear, strong match counts as a move (never noise between look-alikes).
    let clear = moved
        .iter()
        .all(|&i| c[i * e + perm[i]] > 0.9 && c[i * e + perm[i]] > c[i * e + i] + 0.05);
    if moved.is_empty() || !clear {
        return Matching::Same;
    }
    let router_followed = moved
        .iter()
        .all(|&i| dot(&g.router[i], &n.router[perm[i]]) > dot(&g.router[i], &n.router[i]));
    if router_followed {
        Matching::Relabelled(perm)
    } else {
        Matching::WeightsMoved(perm)
    }
}

fn describe(perm: &[usize]) -> String {
    perm.iter()
        .enumerate()
        .filter(|(i, p)| *i != **p)
        .map(|(i, p)| format!("{i}→{p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Largest change between two E×E matrices under `perm` (now's `perm[i]` is golden's `i`).
fn matrix_row(
    metric: &str,
    layer: usize,
    gold: &[Vec<f32>],
    now: &[Vec<f32>],
    perm: &[usize],
    tol: f64,
) -> DriftRow {
    let mut best = (0.0f64, 0usize, 0usize);
    for (i, row) in gold.iter().enumerate() {
        for (j, &g) in row.iter().enumerate() {
            let n = now[perm[i]][perm[j]];
            let d = (n as f64 - g as f64).abs();
            if d > best.0 || !d.is_finite() {
                best = (if d.is_finite() { d } else { f64::INFINITY }, i, j);
            }
        }
    }
    let (_, i, j) = best;
    let g = gold[i][j] as f64;
    let n = now[perm[i]][perm[j]] as f64;
    let mut row = DriftRow::new(metric, layer, g, n, tol, Limit::AbsDelta);
    row.detail = format!("entry ({i}, {j})");
    row
}

/// Jensen–Shannon divergence in nats.
pub fn jsd(p: &[f64], q: &[f64]) -> f64 {
    let kl = |a: &[f64], m: &[f64]| -> f64 {
        a.iter()
            .zip(m)
            .filter(|(&x, _)| x > 0.0)
            .map(|(&x, &y)| x * (x / y).ln())
            .sum()
    };
    let m: Vec<f64> = p.iter().zip(q).map(|(a, b)| 0.5 * (a + b)).collect();
    (0.5 * kl(p, &m) + 0.5 * kl(q, &m)).max(0.0)
}

/// Total-variation distance `½ Σ |p − q|` of two distributions.
pub fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    0.5 * p.iter().zip(q).map(|(x, y)| (x - y).abs()).sum::<f64>()
}

fn normalised(v: &[f64]) -> Vec<f64> {
    let s: f64 = v.iter().sum();
    v.iter()
        .map(|x| if s > 0.0 { x / s } else { 0.0 })
        .collect()
}

/// Compares `now` with `gold`. Fails with [`Error::NotComparable`] when they
/// describe different model shapes or were recorded on different prompts
/// ([`Error::at`] names the file).
pub fn compare(gold: &Snapshot, now: &Snapshot, tol: &Tolerances) -> Result<Comparison> {
    compare_snapshots(gold, now, tol).map_err(Error::NotComparable)
}

/// Top-k ids of both snapshots, decoded: `(golden, now, [tokens, layers, k])`.
type TopKIds = (Vec<i16>, Vec<i16>, [usize; 3]);

fn compare_snapshots(
    gold: &Snapshot,
    now: &Snapshot,
    tol: &Tolerances,
) -> std::result::Result<Comparison, String> {
    check_same_shape(&gold.model, &now.model)?;
    let mut notices = identity_notices(gold, now);
    check_same_prompts(gold, now)?;
    let ids = decode_top_k_ids(gold, now)?;
    if gold.layers.len() != now.layers.len() {
        return Err(format!(
            "{} MoE layers recorded, {} now",
            gold.layers.len(),
            now.layers.len()
        ));
    }
    let mut rows = Vec::new();
    for (li, (gl, nl)) in gold.layers.iter().zip(&now.layers).enumerate() {
        let layer = LayerPair {
            index: li,
            gold: gl,
            now: nl,
        };
        compare_layer(
            gold,
            now,
            &layer,
            ids.as_ref(),
            tol,
            &mut rows,
            &mut notices,
        );
    }
    if rows.is_empty() {
        return Err(format!(
            "nothing to compare: the golden snapshot records {} and this run computed {}; no metric was checked",
            list_or_nothing(&gold.analyses),
            list_or_nothing(&now.analyses)
        ));
    }
    Ok(Comparison {
        name: gold.name.clone(),
        rows,
        notices,
    })
}

/// Both snapshots describe the same model shape (family, layers, experts, sizes).
fn check_same_shape(
    g: &crate::golden::Identity,
    n: &crate::golden::Identity,
) -> std::result::Result<(), String> {
    let shape = |m: &crate::golden::Identity| {
        (
            m.family.clone(),
            m.moe_layers.clone(),
            m.num_experts,
            m.top_k,
            m.hidden_size,
            m.intermediate_size,
        )
    };
    if shape(g) != shape(n) {
        return Err(format!(
            "not the same model shape: recorded {} with {} experts (top-{}), hidden {}, intermediate {}, MoE layers {:?}; compared {} with {} experts (top-{}), hidden {}, intermediate {}, MoE layers {:?}",
            g.family, g.num_experts, g.top_k, g.hidden_size, g.intermediate_size, g.moe_layers,
            n.family, n.num_experts, n.top_k, n.hidden_size, n.intermediate_size, n.moe_layers
        ));
    }
    Ok(())
}

fn notice(layer: Option<usize>, message: String) -> Notice {
    Notice { layer, message }
}

/// What changed about the checkpoint without being drift: dtype, config,
/// tensor index, and analyses the golden has that were not recomputed.
fn identity_notices(gold: &Snapshot, now: &Snapshot) -> Vec<Notice> {
    let (g, n) = (&gold.model, &now.model);
    let mut notices = Vec::new();
    if g.dtype != n.dtype {
        notices.push(notice(
            None,
            format!("expert dtype changed: {} → {}", g.dtype, n.dtype),
        ));
    }
    if g.config_hash != n.config_hash {
        notices.push(notice(
            None,
            format!(
                "config.json changed (hash {} → {})",
                g.config_hash, n.config_hash
            ),
        ));
    }
    if g.tensor_index_hash != n.tensor_index_hash {
        notices.push(notice(
            None,
            format!(
                "tensor index changed: names, dtypes or shapes (hash {} → {})",
                g.tensor_index_hash, n.tensor_index_hash
            ),
        ));
    }
    let missing: Vec<&String> = gold
        .analyses
        .iter()
        .filter(|a| !now.analyses.contains(a))
        .collect();
    if !missing.is_empty() {
        notices.push(notice(
            None,
            format!(
                "not recomputed, so not compared: {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    notices
}

/// Dynamic metrics of both snapshots must come from the same prompts.
fn check_same_prompts(gold: &Snapshot, now: &Snapshot) -> std::result::Result<(), String> {
    let routing_both = gold.top_k_ids.is_some() && now.top_k_ids.is_some();
    let dynamic_both = routing_both
        || gold.layers.iter().any(|l| l.norm_score.is_some())
            && now.layers.iter().any(|l| l.norm_score.is_some());
    if dynamic_both
        && gold.prompts.as_ref().map(|p| &p.hash) != now.prompts.as_ref().map(|p| &p.hash)
    {
        return Err(format!(
            "recorded on different prompts ({} prompts, {} tokens, hash {}; now {} prompts, {} tokens, hash {}): compare on the same prompts, or record the snapshot again",
            gold.prompts.as_ref().map_or(0, |p| p.count),
            gold.prompts.as_ref().map_or(0, |p| p.tokens),
            gold.prompts.as_ref().map_or("-", |p| p.hash.as_str()),
            now.prompts.as_ref().map_or(0, |p| p.count),
            now.prompts.as_ref().map_or(0, |p| p.tokens),
            now.prompts.as_ref().map_or("-", |p| p.hash.as_str()),
        ));
    }
    Ok(())
}

/// The top-k ids of both snapshots when both have them, of the same shape.
fn decode_top_k_ids(
    gold: &Snapshot,
    now: &Snapshot,
) -> std::result::Result<Option<TopKIds>, String> {
    match (&gold.top_k_ids, &now.top_k_ids) {
        (Some(a), Some(b)) if a.shape != b.shape => Err(format!(
            "top-k ids of shape {:?} (tokens, layers, k) recorded, but {:?} now: the snapshot was recorded on other prompts or edited",
            a.shape, b.shape
        )),
        (Some(a), Some(b)) => Ok(Some((a.decode_str()?, b.decode_str()?, a.shape))),
        _ => Ok(None),
    }
}

/// One MoE layer of both snapshots; `index` is its position among the MoE layers.
struct LayerPair<'a> {
    index: usize,
    gold: &'a LayerSnapshot,
    now: &'a LayerSnapshot,
}

/// Every metric of one layer, in table order: expert matching, similarities,
/// gate R², the router-precision notice, routing agreement, routing
/// distributions, norm score.
fn compare_layer(
    gold: &Snapshot,
    now: &Snapshot,
    pair: &LayerPair<'_>,
    ids: Option<&TopKIds>,
    tol: &Tolerances,
    rows: &mut Vec<DriftRow>,
    notices: &mut Vec<Notice>,
) {
    let (gl, nl, layer) = (pair.gold, pair.now, pair.gold.layer);
    let e = gold.model.num_experts;
    let perm = layer_matching(gl, nl, e, rows, notices);
    similarity_rows(gl, nl, &perm, tol, rows);
    gate_r2_rows(gl, nl, tol, rows);
    if let Some(n) = router_bits_notice(gl, nl) {
        notices.push(n);
    }
    if let Some(ids) = ids {
        rows.extend(routing_agreement_rows(pair, ids, e, &perm, tol));
    }
    rows.extend(routing_distribution_rows(gold, now, pair, e, &perm, tol));
    if let (Some(a), Some(b)) = (&gl.norm_score, &nl.norm_score) {
        rows.push(DriftRow::new(
            "norm-score-top1",
            layer,
            a.top1_match_rate as f64,
            b.top1_match_rate as f64,
            tol.norm_score_top1,
            Limit::AbsDelta,
        ));
    }
}

/// How the layer's experts correspond (now's `perm[i]` is golden's `i`): a
/// consistent relabelling is a notice; weights moved without their router
/// rows are an `expert-assignment` drift row, and the layer is compared as stored.
fn layer_matching(
    gl: &LayerSnapshot,
    nl: &LayerSnapshot,
    experts: usize,
    rows: &mut Vec<DriftRow>,
    notices: &mut Vec<Notice>,
) -> Vec<usize> {
    let layer = gl.layer;
    let identity: Vec<usize> = (0..experts).collect();
    match match_experts(gl, nl) {
        Matching::Same => identity,
        Matching::Relabelled(p) => {
            notices.push(notice(
                Some(layer),
                format!("experts relabelled consistently (golden→now: {}); their weights and router rows moved together, so the layer computes the same function; compared under this matching", describe(&p)),
            ));
            p
        }
        Matching::WeightsMoved(p) => {
            let moved = p.iter().enumerate().filter(|(i, x)| i != *x).count();
            let mut row = DriftRow::new(
                "expert-assignment",
                layer,
                0.0,
                moved as f64,
                0.0,
                Limit::Max,
            );
            row.detail = format!(
                "expert weights moved without their router rows (golden→now: {})",
                describe(&p)
            );
            rows.push(row);
            identity
        }
    }
}

/// Expert, neuron and gate similarity matrices: the largest change of each.
fn similarity_rows(
    gl: &LayerSnapshot,
    nl: &LayerSnapshot,
    perm: &[usize],
    tol: &Tolerances,
    rows: &mut Vec<DriftRow>,
) {
    let layer = gl.layer;
    for (name, a, b) in [
        (
            "expert-similarity",
            &gl.expert_similarity,
            &nl.expert_similarity,
        ),
        (
            "neuron-similarity",
            &gl.neuron_similarity,
            &nl.neuron_similarity,
        ),
    ] {
        if let (Some(a), Some(b)) = (a, b) {
            for m in Matrix::ALL {
                let metric = format!("{name}.{}", m.name());
                rows.push(matrix_row(
                    &metric,
                    layer,
                    a.get(m),
                    b.get(m),
                    perm,
                    tol.similarity,
                ));
            }
        }
    }
    if let (Some(a), Some(b)) = (&gl.gate_similarity, &nl.gate_similarity) {
        rows.push(matrix_row(
            "gate-similarity",
            layer,
            a,
            b,
            perm,
            tol.similarity,
        ));
    }
}

/// The gate-embedding R² of each matrix.
fn gate_r2_rows(
    gl: &LayerSnapshot,
    nl: &LayerSnapshot,
    tol: &Tolerances,
    rows: &mut Vec<DriftRow>,
) {
    if let (Some(a), Some(b)) = (&gl.gate_r2, &nl.gate_r2) {
        for m in Matrix::ALL {
            if let (Some(x), Some(y)) = (a.get(m), b.get(m)) {
                let metric = format!("gate-r2.{}", m.name());
                rows.push(DriftRow::new(
                    &metric,
                    gl.layer,
                    *x as f64,
                    *y as f64,
                    tol.gate_r2,
                    Limit::AbsDelta,
                ));
            }
        }
    }
}

/// A router stored below 8 bits (a known cause of expert flips).
fn router_bits_notice(gl: &LayerSnapshot, nl: &LayerSnapshot) -> Option<Notice> {
    let f = nl.fingerprint.as_ref().filter(|f| f.router_bits < 8)?;
    let was = gl.fingerprint.as_ref().map(|x| x.router_bits);
    Some(notice(
        Some(gl.layer),
        format!(
            "router stored below 8 bits: its rows hold at most {} distinct values (effectively {}-bit{}); a quantized router is a known cause of expert flips",
            1u64 << f.router_bits,
            f.router_bits,
            was.map(|b| format!(", golden {b}-bit")).unwrap_or_default()
        ),
    ))
}

/// Top-1 and top-k agreement of the routed experts, token by token, under `perm`.
fn routing_agreement_rows(
    pair: &LayerPair<'_>,
    (a, b, [tokens, nlay, k]): &TopKIds,
    e: usize,
    perm: &[usize],
    tol: &Tolerances,
) -> [DriftRow; 2] {
    // Now's expert `perm[i]` is golden's expert `i`.
    let mut inv = vec![0usize; e];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    let (mut top1, mut overlap) = (0usize, 0usize);
    for t in 0..*tokens {
        let base = (t * nlay + pair.index) * k;
        let gs = &a[base..base + k];
        let ns: Vec<usize> = b[base..base + k].iter().map(|&x| inv[x as usize]).collect();
        if gs[0] as usize == ns[0] {
            top1 += 1;
        }
        overlap += gs.iter().filter(|&&x| ns.contains(&(x as usize))).count();
    }
    let tk = (*tokens).max(1) as f64;
    let layer = pair.gold.layer;
    [
        DriftRow::new(
            "routing-top1-agreement",
            layer,
            1.0,
            top1 as f64 / tk,
            tol.routing_top1_agreement,
            Limit::Min,
        ),
        DriftRow::new(
            "routing-topk-agreement",
            layer,
            1.0,
            overlap as f64 / (tk * *k as f64),
            tol.routing_topk_agreement,
            Limit::Min,
        ),
    ]
}

/// Router divergence (`router-jsd`) and load shift (total variation of the
/// load), under `perm`; nothing when either snapshot has no routing.
fn routing_distribution_rows(
    gold: &Snapshot,
    now: &Snapshot,
    pair: &LayerPair<'_>,
    e: usize,
    perm: &[usize],
    tol: &Tolerances,
) -> Vec<DriftRow> {
    let (Some(ra), Some(rb)) = (&pair.gold.routing, &pair.now.routing) else {
        return Vec::new();
    };
    let layer = pair.gold.layer;
    let load_a = normalised(&ra.load.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let load_b: Vec<f64> = normalised(&(0..e).map(|i| rb.load[perm[i]] as f64).collect::<Vec<_>>());
    let tv = total_variation(&load_a, &load_b);
    let (pa, pb) = (gold.router_probs.get(&layer), now.router_probs.get(&layer));
    let (div, detail) = match (pa, pb) {
        (Some(pa), Some(pb)) if !pa.is_empty() && pa.len() == pb.len() => {
            (mean_token_jsd(pa, pb, e, perm), "mean over tokens")
        }
        // A trace without router logits records no mean distribution
        // (issue 15): compare the load distributions instead.
        _ if ra.mean_probs.len() != e || rb.mean_probs.len() != e => (
            jsd(&load_a, &load_b),
            "of the load distributions (no router logits recorded)",
        ),
        _ => {
            let p: Vec<f64> = ra.mean_probs.iter().map(|&x| x as f64).collect();
            let q: Vec<f64> = (0..e).map(|i| rb.mean_probs[perm[i]] as f64).collect();
            (
                jsd(&normalised(&p), &normalised(&q)),
                "of the mean router distribution",
            )
        }
    };
    let mut row = DriftRow::new("router-jsd", layer, 0.0, div, tol.router_jsd, Limit::Max);
    row.detail = detail.to_string();
    vec![
        row,
        DriftRow::new("load-shift", layer, 0.0, tv, tol.load_shift, Limit::Max),
    ]
}

/// Mean per-token Jensen–Shannon divergence of two `[tokens, E]` router
/// distributions, now's expert `perm[i]` read as golden's `i`.
fn mean_token_jsd(pa: &[f32], pb: &[f32], e: usize, perm: &[usize]) -> f64 {
    let n_tok = pa.len() / e;
    let mut sum = 0.0;
    for t in 0..n_tok {
        let p: Vec<f64> = pa[t * e..(t + 1) * e].iter().map(|&x| x as f64).collect();
        let q: Vec<f64> = (0..e).map(|i| pb[t * e + perm[i]] as f64).collect();
        sum += jsd(&p, &q);
    }
    sum / n_tok.max(1) as f64
}

fn list_or_nothing(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsd_is_zero_for_equal_and_ln2_for_disjoint() {
        assert!(jsd(&[0.5, 0.5], &[0.5, 0.5]).abs() < 1e-15);
        assert!((jsd(&[1.0, 0.0], &[0.0, 1.0]) - std::f64::consts::LN_2).abs() < 1e-12);
    }

    /// Against scipy (fixtures/make_golden_refs.py), to 1e-12.
    #[test]
    fn jsd_and_total_variation_match_scipy() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/golden_reference.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let vec = |x: &serde_json::Value| -> Vec<f64> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|y| y.as_f64().unwrap())
                .collect()
        };
        let cases = v["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for c in cases {
            let (p, q) = (vec(&c["p"]), vec(&c["q"]));
            let want = c["jsd"].as_f64().unwrap();
            assert!(
                (jsd(&p, &q) - want).abs() < 1e-12,
                "{} vs {want}",
                jsd(&p, &q)
            );
            let tv = c["total_variation"].as_f64().unwrap();
            assert!((total_variation(&p, &q) - tv).abs() < 1e-12);
        }
    }

    #[test]
    fn limits_decide_the_verdict() {
        assert_eq!(
            DriftRow::new("a", 0, 1.0, 0.98, 0.99, Limit::Min).verdict,
            Verdict::Drift
        );
        assert_eq!(
            DriftRow::new("a", 0, 1.0, 0.995, 0.99, Limit::Min).verdict,
            Verdict::Ok
        );
        assert_eq!(
            DriftRow::new("a", 0, 0.0, 0.02, 0.01, Limit::Max).verdict,
            Verdict::Drift
        );
        assert_eq!(
            DriftRow::new("a", 0, 0.5, 0.5009, 1e-3, Limit::AbsDelta).verdict,
            Verdict::Ok
        );
        assert_eq!(
            DriftRow::new("a", 0, 0.5, 0.502, 1e-3, Limit::AbsDelta).verdict,
            Verdict::Drift
        );
        assert_eq!(
            DriftRow::new("a", 0, 0.5, f64::NAN, 1e-3, Limit::AbsDelta).verdict,
            Verdict::Drift
        );
    }
}
