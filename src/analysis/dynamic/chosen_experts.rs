//! `chosen-experts` (paper §4.4, Fig. 8): which experts the router selects;
//! per layer the expert load, balancedness (mean/max load), coefficient of
//! variation, dead-expert share, normalised routing entropy exp(H)/E and the
//! co-activation counts, and across layers min/p50/p90/max of those.

use crate::analysis::results::{ChosenExperts, ChosenExpertsLayer, ChosenSummary, Quantiles};

#[derive(Debug, Clone)]
/// Accumulates one layer's routing over tokens.
pub struct Accumulator {
    e: usize,
    load: Vec<u64>,
    coact: Vec<u64>,
}

impl Accumulator {
    /// An empty accumulator for `e` experts.
    pub fn new(e: usize) -> Accumulator {
        Accumulator {
            e,
            load: vec![0; e],
            coact: vec![0; e * e],
        }
    }

    /// Adds one token's selected experts.
    pub fn add(&mut self, selected: &[u32]) {
        for (a, &i) in selected.iter().enumerate() {
            let i = i as usize;
            self.load[i] += 1;
            self.coact[i * self.e + i] += 1;
            for &j in &selected[..a] {
                let j = j as usize;
                if j != i {
                    self.coact[i * self.e + j] += 1;
                    self.coact[j * self.e + i] += 1;
                }
            }
        }
    }

    /// The statistics of `layer` so far.
    pub fn finish(&self, layer: usize) -> ChosenExpertsLayer {
        let e = self.e as f64;
        let load: Vec<f64> = self.load.iter().map(|&l| l as f64).collect();
        let total: f64 = load.iter().sum();
        let mean = total / e;
        let max = load.iter().copied().fold(0.0, f64::max);
        let var = load.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / e;
        let h: f64 = load
            .iter()
            .filter(|&&l| l > 0.0)
            .map(|&l| {
                let p = l / total;
                -p * p.ln()
            })
            .sum();
        ChosenExpertsLayer {
            layer,
            load: self.load.clone(),
            balancedness: if max > 0.0 { mean / max } else { 0.0 },
            cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
            dead_share: self.load.iter().filter(|&&l| l == 0).count() as f64 / e,
            entropy_ratio: if total > 0.0 { h.exp() / e } else { 0.0 },
            coactivation: self.coact.chunks(self.e).map(<[u64]>::to_vec).collect(),
        }
    }
}

/// `chosen-experts` from a trace's routing ([`crate::trace::read`]), without
/// running the model, on the MoE layers in `layers` (all when `None`).
/// Per-token records give every statistic; a counts-only trace (an engine
/// that records bincounts) gives the load statistics, with an empty
/// co-activation matrix; its `tokens` is the first layer's selections / top-k
/// (each token selects top-k experts), 0 when the top-k is unknown.
pub fn from_routing(r: &crate::trace::Routing, layers: Option<&[usize]>) -> ChosenExperts {
    let (l, e, k) = (r.moe_layers.len(), r.num_experts, r.top_k);
    let wanted = |layer: usize| layers.is_none_or(|s| s.contains(&layer));
    let mut acc: Vec<Accumulator> = (0..l).map(|_| Accumulator::new(e)).collect();
    match (&r.selected, &r.expert_counts) {
        (Some(sel), _) => {
            for row in sel.chunks_exact(l * k) {
                for (li, a) in acc.iter_mut().enumerate() {
                    if wanted(r.moe_layers[li]) {
                        let ids: Vec<u32> = row[li * k..(li + 1) * k]
                            .iter()
                            .map(|&x| u32::from(x))
                            .collect();
                        a.add(&ids);
                    }
                }
            }
        }
        (None, Some(counts)) => {
            for (a, c) in acc.iter_mut().zip(counts.chunks_exact(e)) {
                a.load.copy_from_slice(c);
                a.coact.clear();
            }
        }
        (None, None) => {}
    }
    let layers: Vec<ChosenExpertsLayer> = r
        .moe_layers
        .iter()
        .zip(&acc)
        .filter(|(&layer, _)| wanted(layer))
        .map(|(&layer, a)| a.finish(layer))
        .collect();
    ChosenExperts {
        summary: summary(&layers),
        layers,
        tokens: match (&r.selected, &r.expert_counts) {
            (Some(_), _) => r.tokens(),
            (None, Some(c)) if k > 0 => (c.iter().take(e).sum::<u64>() / k as u64) as usize,
            _ => 0,
        },
    }
}

/// numpy's default (linear) percentile of unsorted values.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

fn quantiles(values: &[f64]) -> Quantiles {
    Quantiles {
        min: percentile(values, 0.0),
        p50: percentile(values, 50.0),
        p90: percentile(values, 90.0),
        max: percentile(values, 100.0),
    }
}

/// min / p50 / p90 / max over layers.
pub fn summary(layers: &[ChosenExpertsLayer]) -> ChosenSummary {
    let of =
        |f: fn(&ChosenExpertsLayer) -> f64| quantiles(&layers.iter().map(f).collect::<Vec<_>>());
    ChosenSummary {
        balancedness: of(|l| l.balancedness),
        cv: of(|l| l.cv),
        dead_share: of(|l| l.dead_share),
        entropy_ratio: of(|l| l.entropy_ratio),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_a_small_routing() {
        let mut a = Accumulator::new(4);
        a.add(&[0, 1]);
        a.add(&[1, 0]);
        a.add(&[1, 2]);
        let l = a.finish(3);
        assert_eq!(l.load, vec![2, 3, 1, 0]);
        assert_eq!(l.dead_share, 0.25);
        assert!((l.balancedness - 1.5 / 3.0).abs() < 1e-12);
        assert_eq!(l.coactivation[0][1], 2);
        assert_eq!(l.coactivation[1][2], 1);
        assert_eq!(l.coactivation[1][1], 3);
        let p = [2.0 / 6.0, 3.0 / 6.0, 1.0 / 6.0];
        let h: f64 = p.iter().map(|x: &f64| -x * x.ln()).sum();
        assert!((l.entropy_ratio - h.exp() / 4.0).abs() < 1e-12);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }
}
