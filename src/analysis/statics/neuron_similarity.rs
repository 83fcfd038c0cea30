//! `neuron-similarity` (paper §3.1): each expert reduced to its mean neuron
//! (mean over the neuron axis: rows of `gate`/`up`, columns of `down`), then
//! the E×E cosine similarity per matrix; a dense reference adds `F`.

use crate::analysis::linalg::cosine_of_rows;
use crate::analysis::results::LayerMatrices;
use crate::analysis::stream::MatrixStats;

/// From one layer's streaming statistics (`up`, `gate`, `down` order).
/// The cosine of neuron sums equals the cosine of mean neurons.
pub fn from_stats(layer: usize, labels: &[String], stats: &[MatrixStats; 3]) -> LayerMatrices {
    let [up, gate, down] = stats.each_ref().map(|s| cosine_of_rows(&s.neuron_sum));
    LayerMatrices {
        layer,
        labels: labels.to_vec(),
        up,
        gate,
        down,
    }
}
