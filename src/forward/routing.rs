//! Router semantics per family (SPEC §9), on the host: router logits are
//! small (tokens × experts), and every family's rule is a few lines here.

/// How a family turns router logits into selected experts and weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, top-k of the probabilities, renormalised over
    /// the k if `renormalize` (Mixtral: always; Qwen/OLMoE/DeepSeekMoE: iff
    /// `norm_topk_prob`; Grok-1: never), then × `scale`.
    SoftmaxTopK {
        /// Renormalise the k weights.
        renormalize: bool,
        /// Weight scale.
        scale: f64,
    },
    /// DeepSeek-V2: softmax; greedy top-k, or group-limited greedy (the
    /// `topk_group` groups with the highest max score); renormalised iff
    /// `norm_topk_prob`, else × `routed_scaling_factor`.
    DeepSeekV2 {
        /// Group-limited greedy selection (`topk_method = group_limited_greedy`).
        group_limited: bool,
        /// Number of expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Renormalise the k weights.
        renormalize: bool,
        /// Weight scale (`routed_scaling_factor`).
        scale: f64,
    },
    /// DeepSeek-V3: sigmoid scores; selection on score + bias, within the
    /// `topk_group` groups whose two best biased scores sum highest; weights
    /// are the unbiased scores, renormalised iff `norm_topk_prob`, × scale.
    DeepSeekV3 {
        /// Number of expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Renormalise the k weights.
        renormalize: bool,
        /// Weight scale (`routed_scaling_factor`).
        scale: f64,
    },
}

/// Routing result of one token: experts by decreasing weight, and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoute {
    /// Selected experts, by decreasing weight.
    pub experts: Vec<usize>,
    /// Their weights.
    pub weights: Vec<f32>,
}

/// Softmax in f64 of a logits row.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|e| *e /= sum);
    p
}

fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-(x as f64)).exp())
}

/// Indices of the `k` largest values, in decreasing order (ties: lower index
/// first; values ordered by `f64::total_cmp`).
///
/// One pass with a sorted list of the best `k` so far (k ≤ 32: an
/// insertion is cheaper than sorting every expert per token); a full sort
/// for larger k.
pub fn top_k(values: &[f64], k: usize) -> Vec<usize> {
    use std::cmp::Ordering::{Greater, Less};
    let k = k.min(values.len());
    if k > 32 {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        idx.truncate(k);
        return idx;
    }
    let mut best: Vec<usize> = Vec::with_capacity(k);
    if k == 0 {
        return best;
    }
    for (i, v) in values.iter().enumerate() {
        if best.len() == k {
            // A later index displaces only a strictly greater value.
            if v.total_cmp(&values[best[k - 1]]) != Greater {
                continue;
            }
            best.pop();
        }
        let at = best
            .iter()
            .position(|&j| values[j].total_cmp(v) == Less)
            .unwrap_or(best.len());
        best.insert(at, i);
    }
    best
}

/// Keeps only the experts of the `topk_group` best groups (by `group_score`);
/// the others are set to `masked`.
fn group_mask(
    values: &[f64],
    n_group: usize,
    topk_group: usize,
    masked: f64,
    group_score: impl Fn(&[f64]) -> f64,
) -> Vec<f64> {
    let per = values.len() / n_group.max(1);
    let scores: Vec<f64> = values.chunks(per.max(1)).map(&group_score).collect();
    let keep = top_k(&scores, topk_group);
    values
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            if keep.contains(&(e / per.max(1))) {
                v
            } else {
                masked
            }
        })
        .collect()
}

impl Routing {
    /// The gate scores the paper's norm-score analysis ranks experts by:
    /// softmax of the logits, or (DeepSeek-V3) the sigmoid scores.
    pub fn scores(&self, logits: &[f32]) -> Vec<f64> {
        match self {
            Routing::DeepSeekV3 { .. } => logits.iter().map(|&l| sigmoid(l)).collect(),
            _ => softmax(logits),
        }
    }

    /// Routes one token. `bias` is DeepSeek-V3's `e_score_correction_bias`.
    pub fn route(&self, logits: &[f32], k: usize, bias: Option<&[f32]>) -> TokenRoute {
        self.route_scores(&self.scores(logits), k, bias)
    }

    /// Routes one token from its [`Routing::scores`] (for callers that keep them).
    pub fn route_scores(&self, scores: &[f64], k: usize, bias: Option<&[f32]>) -> TokenRoute {
        let (experts, renormalize, scale) = match self {
            Routing::SoftmaxTopK { renormalize, scale } => (top_k(scores, k), *renormalize, *scale),
            Routing::DeepSeekV2 {
                group_limited,
                n_group,
                topk_group,
                renormalize,
                scale,
            } => {
                let chosen = if *group_limited && *n_group > 1 {
                    let masked =
                        group_mask(scores, *n_group, *topk_group, f64::NEG_INFINITY, |g| {
                            g.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                        });
                    top_k(&masked, k)
                } else {
                    top_k(scores, k)
                };
                // V2 applies the scaling factor only when not renormalising.
                let scale = if *renormalize && k > 1 { 1.0 } else { *scale };
                (chosen, *renormalize && k > 1, scale)
            }
            Routing::DeepSeekV3 {
                n_group,
                topk_group,
                renormalize,
                scale,
            } => {
                let biased: Vec<f64> = scores
                    .iter()
                    .enumerate()
                    .map(|(e, s)| s + bias.map_or(0.0, |b| b[e] as f64))
                    .collect();
                let masked = if *n_group > 1 {
                    group_mask(&biased, *n_group, *topk_group, f64::NEG_INFINITY, |g| {
                        let t = top_k(g, 2);
                        t.iter().map(|&i| g[i]).sum()
                    })
                } else {
                    biased
                };
                (top_k(&masked, k), *renormalize, *scale)
            }
        };
        let mut weights: Vec<f64> = experts.iter().map(|&e| scores[e]).collect();
        if renormalize {
            let sum: f64 = weights.iter().sum::<f64>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        // Report by decreasing applied weight (DeepSeek-V3 selects on biased
        // scores, so the selection order can differ from the weight order).
        let mut pairs: Vec<(usize, f64)> = experts.into_iter().zip(weights).collect();
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        TokenRoute {
            experts: pairs.iter().map(|p| p.0).collect(),
            weights: pairs.iter().map(|p| (p.1 * scale) as f32).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_a_full_sort_with_ties_and_every_k() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for n in [1usize, 2, 7, 8, 64, 257] {
            // Few distinct values, so ties are common; NaN and infinities too.
            let mut v: Vec<f64> = (0..n).map(|_| (next() % 9) as f64 / 4.0 - 1.0).collect();
            if n > 7 {
                v[3] = f64::NAN;
                v[5] = f64::NEG_INFINITY;
                v[6] = f64::INFINITY;
            }
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
            for k in [0usize, 1, 2, 6, 8, 33, n, n + 3] {
                let k_eff = k.min(n);
                assert_eq!(top_k(&v, k), want[..k_eff].to_vec(), "n={n} k={k}");
            }
        }
    }

    #[test]
    fn mixtral_renormalises_over_the_selected_experts() {
        let r = Routing::SoftmaxTopK {
            renormalize: true,
            scale: 1.0,
        };
        let t = r.route(&[0.0, 2.0, 1.0, -1.0], 2, None);
        assert_eq!(t.experts, vec![1, 2]);
        let (a, b) = ((2.0f64).exp(), (1.0f64).exp());
        assert!((t.weights[0] as f64 - a / (a + b)).abs() < 1e-6);
        assert!((t.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn grok_keeps_the_unnormalised_probabilities() {
        let r = Routing::SoftmaxTopK {
            renormalize: false,
            scale: 1.0,
        };
        let t = r.route(&[0.0, 2.0, 1.0, -1.0], 2, None);
        let p = softmax(&[0.0, 2.0, 1.0, -1.0]);
        assert!((t.weights[0] as f64 - p[1]).abs() < 1e-6);
        assert!(t.weights.iter().sum::<f32>() < 1.0);
    }

    #[test]
    fn deepseek_v3_selects_on_biased_scores_but_weighs_unbiased() {
        let r = Routing::DeepSeekV3 {
            n_group: 2,
            topk_group: 1,
            renormalize: true,
            scale: 2.5,
        };
        // Group 0 = experts 0,1; group 1 = experts 2,3. The bias lifts group 1.
        let logits = [3.0, 2.0, 0.0, 0.1];
        let bias = [0.0, 0.0, 1.0, 1.0];
        let t = r.route(&logits, 2, Some(&bias));
        assert_eq!(t.experts, vec![3, 2]);
        let (s2, s3) = (sigmoid(0.0), sigmoid(0.1));
        assert!((t.weights[0] as f64 - 2.5 * s3 / (s2 + s3)).abs() < 1e-6);
    }

    #[test]
    fn deepseek_v2_group_limited_greedy_masks_weak_groups() {
        let r = Routing::DeepSeekV2 {
            group_limited: true,
            n_group: 2,
            topk_group: 1,
            renormalize: false,
            scale: 16.0,
        };
        let logits = [5.0, -9.0, 4.0, 4.5];
        let t = r.route(&logits, 2, None);
        // Group 0's max (expert 0) beats group 1's, so only experts 0 and 1 remain.
        assert_eq!(t.experts, vec![0, 1]);
        let p = softmax(&logits);
        assert!((t.weights[1] as f64 - 16.0 * p[1]).abs() < 1e-5);
    }
}
