//! `gate-embedding` (paper §3.3, Table 3): the E×E cosine similarity of the
//! router rows, and per matrix the Pearson r (and r²) between its strict
//! lower triangle and that of the experts' `neuron-similarity` matrix.

use crate::analysis::linalg::{cosine_of_rows, pearson, strict_lower};
use crate::analysis::results::{GateEmbeddingLayer, LayerMatrices, PerMatrix};
use crate::error::{Error, Result};
use crate::model::{Matrix, TensorView};

/// One layer; `neuron` is the layer's neuron-similarity over routed experts
/// only (without the dense `F` row, which has no router row).
pub fn layer(
    router: &TensorView<'_>,
    neuron: &LayerMatrices,
    experts: usize,
) -> Result<GateEmbeddingLayer> {
    let data = router.to_f32_vec();
    if data.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            path: router.path.to_path_buf(),
            tensor: router.name.to_string(),
        });
    }
    let hidden = router.shape.get(1).copied().unwrap_or(0);
    let rows: Vec<Vec<f64>> = data
        .chunks(hidden.max(1))
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect();
    let similarity = cosine_of_rows(&rows);
    let gate_tri = strict_lower(&similarity);
    let r = PerMatrix::from_fn(|m: Matrix| {
        let full = neuron.get(m);
        let experts_only: Vec<Vec<f64>> = full[..experts]
            .iter()
            .map(|row| row[..experts].to_vec())
            .collect();
        pearson(&gate_tri, &strict_lower(&experts_only))
    });
    let r2 = PerMatrix::from_fn(|m| r.get(m).map(|x| x * x));
    Ok(GateEmbeddingLayer {
        layer: neuron.layer,
        similarity,
        r,
        r2,
    })
}

/// Mean r² over the layers, per matrix (`None` if no layer has a defined r).
pub fn r2_avg(layers: &[GateEmbeddingLayer]) -> PerMatrix<Option<f64>> {
    PerMatrix::from_fn(|m| {
        let vals: Vec<f64> = layers.iter().filter_map(|l| *l.r2.get(m)).collect();
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    })
}
