//! `output-similarity` (paper §4.1, Fig. 5): per MoE layer and token, the
//! cosine similarity of all experts' outputs (before routing weights) on the
//! layer's real input; over all tokens, the mean angular similarity
//! `1 - acos(cos)/π`. A shared expert adds row/column `SE`, a dense reference `F`.

use crate::analysis::results::OutputSimilarityLayer;

/// Running sum of angular similarities of one layer.
#[derive(Debug, Clone)]
pub struct Accumulator {
    n: usize,
    sum: Vec<f64>,
    tokens: usize,
}

impl Accumulator {
    /// An empty accumulator for `n` outputs (experts, then shared/dense).
    pub fn new(n: usize) -> Accumulator {
        Accumulator {
            n,
            sum: vec![0.0; n * n],
            tokens: 0,
        }
    }

    /// Adds one token: `outputs[i]` is output vector `i` (experts, then SE/F).
    pub fn add(&mut self, outputs: &[&[f32]]) {
        debug_assert_eq!(outputs.len(), self.n);
        let norms: Vec<f64> = outputs
            .iter()
            .map(|v| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
            .collect();
        for i in 0..self.n {
            for j in 0..i {
                let dot: f64 = outputs[i]
                    .iter()
                    .zip(outputs[j])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let cos = if norms[i] > 0.0 && norms[j] > 0.0 {
                    (dot / (norms[i] * norms[j])).clamp(-1.0, 1.0)
                } else {
                    0.0
                };
                let ang = 1.0 - cos.acos() / std::f64::consts::PI;
                self.sum[i * self.n + j] += ang;
                self.sum[j * self.n + i] += ang;
            }
        }
        self.tokens += 1;
    }

    /// The mean matrix (diagonal 1).
    pub fn finish(&self, layer: usize, labels: Vec<String>) -> OutputSimilarityLayer {
        let t = self.tokens.max(1) as f64;
        let mean_angular = (0..self.n)
            .map(|i| {
                (0..self.n)
                    .map(|j| {
                        if i == j {
                            1.0
                        } else {
                            self.sum[i * self.n + j] / t
                        }
                    })
                    .collect()
            })
            .collect();
        OutputSimilarityLayer {
            layer,
            labels,
            mean_angular,
        }
    }
}
