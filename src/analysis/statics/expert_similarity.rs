//! `expert-similarity` (paper §3.1, Fig. 1): per MoE layer and matrix, the E×E
//! cosine similarity of the flattened expert matrices; with a dense reference
//! its FFN is appended as row/column `F`.

use crate::analysis::linalg::cosine_from_gram;
use crate::analysis::results::LayerMatrices;
use crate::analysis::stream::MatrixStats;

/// From one layer's streaming statistics (`up`, `gate`, `down` order).
pub fn from_stats(layer: usize, labels: &[String], stats: &[MatrixStats; 3]) -> LayerMatrices {
    let [up, gate, down] = stats.each_ref().map(|s| cosine_from_gram(&s.gram));
    LayerMatrices {
        layer,
        labels: labels.to_vec(),
        up,
        gate,
        down,
    }
}
