//! `expert-similarity` (paper §3.1, Fig. 1): per MoE layer and matrix, the E×E
//! cosine similarity of the flattened expert matrices; with a dense reference
//! its FFN is appended as row/column `F`.

use crate::analysis::linalg::{cosine_from_gram, gram};
use crate::error::Result;
use crate::model::{ExpertView, Matrix, MoeLayerView};
use crate::report::schema::LayerMatrices;

/// Computes one layer's matrices, streaming each matrix type once over the mmap.
pub fn expert_similarity(
    layer: &MoeLayerView<'_>,
    dense: Option<&ExpertView<'_>>,
) -> Result<LayerMatrices> {
    let mut labels: Vec<String> = (0..layer.experts.len()).map(|e| e.to_string()).collect();
    if dense.is_some() {
        labels.push("F".to_string());
    }
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for (slot, m) in out.iter_mut().zip(Matrix::ALL) {
        let mut views: Vec<_> = layer.experts.iter().map(|x| x.matrix(m)).collect();
        views.extend(dense.map(|d| d.matrix(m)));
        *slot = cosine_from_gram(&gram(&views)?);
    }
    let [up, gate, down] = out;
    Ok(LayerMatrices {
        layer: layer.layer,
        labels,
        up,
        gate,
        down,
    })
}
