//! `intermediate` (paper §4.3, Fig. 7): the experts' intermediate activations
//! `act(gate·x)`; per layer and expert the mean |a|, the share of (token,
//! neuron) entries with |a| above a threshold (a fraction of the layer's
//! largest |a|), and the neurons with the largest mean |a|.
//!
//! The threshold is only known at the end, so the accumulator keeps, per
//! expert, the values above `fraction × running max`: since the max only
//! grows, every value that can exceed the final threshold is kept, and memory
//! stays bounded by the large activations rather than by the token count.

use crate::analysis::results::{IntermediateExpert, IntermediateLayer};

/// How many top neurons are reported per expert.
pub const TOP_NEURONS: usize = 5;

#[derive(Debug, Clone)]
/// Accumulates one layer's intermediate activations over tokens.
pub struct Accumulator {
    experts: usize,
    neurons: usize,
    fraction: f64,
    max: f32,
    /// Per expert: sum of |a| per neuron.
    sums: Vec<f64>,
    /// Per expert: |a| values above `fraction × max` seen so far.
    large: Vec<Vec<f32>>,
    tokens: u64,
}

impl Accumulator {
    /// An empty accumulator; `fraction` sets the threshold relative to the largest |a|.
    pub fn new(experts: usize, neurons: usize, fraction: f64) -> Accumulator {
        Accumulator {
            experts,
            neurons,
            fraction,
            max: 0.0,
            sums: vec![0.0; experts * neurons],
            large: vec![Vec::new(); experts],
            tokens: 0,
        }
    }

    /// Adds activations `[experts, tokens, neurons]` of `tokens` tokens.
    pub fn add(&mut self, acts: &[f32], tokens: usize) {
        let (e, n) = (self.experts, self.neurons);
        let batch_max = acts.iter().fold(0f32, |m, &a| m.max(a.abs()));
        if batch_max > self.max {
            self.max = batch_max;
            let floor = (self.fraction * self.max as f64) as f32;
            for l in &mut self.large {
                l.retain(|&v| v > floor);
            }
        }
        let floor = (self.fraction * self.max as f64) as f32;
        for x in 0..e {
            for t in 0..tokens {
                let row = &acts[(x * tokens + t) * n..(x * tokens + t + 1) * n];
                let sums = &mut self.sums[x * n..(x + 1) * n];
                for (s, &a) in sums.iter_mut().zip(row) {
                    let v = a.abs();
                    *s += v as f64;
                    if v > floor {
                        self.large[x].push(v);
                    }
                }
            }
        }
        self.tokens += tokens as u64;
    }

    /// The statistics of `layer` so far.
    pub fn finish(&self, layer: usize) -> IntermediateLayer {
        let n = self.neurons;
        let threshold = self.fraction * self.max as f64;
        let entries = (self.tokens as f64 * n as f64).max(1.0);
        let experts = (0..self.experts)
            .map(|x| {
                let sums = &self.sums[x * n..(x + 1) * n];
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
                order.truncate(TOP_NEURONS);
                let above = self.large[x]
                    .iter()
                    .filter(|&&v| v as f64 > threshold)
                    .count();
                IntermediateExpert {
                    mean_abs: sums.iter().sum::<f64>() / entries,
                    share_above: above as f64 / entries,
                    top_neurons: order,
                }
            })
            .collect();
        IntermediateLayer {
            layer,
            threshold,
            experts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_follows_the_final_max_across_batches() {
        let mut a = Accumulator::new(1, 2, 0.5);
        // Batch 1: max 1.0, keeps values > 0.5.
        a.add(&[0.6, 0.1, 1.0, 0.2], 2);
        // Batch 2: max 2.0 → threshold 1.0; 0.6 is no longer above.
        a.add(&[2.0, -1.5], 1);
        let l = a.finish(0);
        assert_eq!(l.threshold, 1.0);
        // Entries above 1.0: 2.0 and 1.5 out of 3 tokens × 2 neurons.
        assert!((l.experts[0].share_above - 2.0 / 6.0).abs() < 1e-12);
        assert!((l.experts[0].mean_abs - (0.6 + 0.1 + 1.0 + 0.2 + 2.0 + 1.5) / 6.0).abs() < 1e-6);
        assert_eq!(l.experts[0].top_neurons, vec![0, 1]);
    }
}
