//! Definitions for the static-analysis benchmarks: the reference cost of
//! streaming a layer's bytes from the mmap, against which the analyses'
//! time is reported (they are bound by reading the weights).

use rayon::prelude::*;

use crate::model::{Matrix, Model};

/// Reads every byte of a MoE layer's expert matrices and router from the
/// mmap (a parallel sum of 64-bit words) and releases the pages afterwards,
/// as the analyses do. Returns the sum so the work cannot be optimised away.
pub fn stream_layer(model: &Model, layer: usize) -> crate::Result<u64> {
    let view = model.moe_layer(layer)?;
    let mut tensors = vec![view.router];
    for x in &view.experts {
        tensors.extend(Matrix::ALL.map(|m| x.matrix(m)));
    }
    let total = tensors
        .iter()
        .map(|t| {
            t.bytes()
                .par_chunks(1 << 16)
                .map(|c| {
                    let mut words = c.chunks_exact(8);
                    let mut s = 0u64;
                    for w in &mut words {
                        s = s.wrapping_add(u64::from_le_bytes([
                            w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
                        ]));
                    }
                    words
                        .remainder()
                        .iter()
                        .fold(s, |a, &b| a.wrapping_add(b as u64))
                })
                .reduce(|| 0, u64::wrapping_add)
        })
        .fold(0u64, u64::wrapping_add);
    drop(view);
    model.release_layer(layer);
    Ok(total)
}

/// Bytes of a MoE layer's router and routed experts.
pub fn layer_bytes(model: &Model, layer: usize) -> crate::Result<usize> {
    let view = model.moe_layer(layer)?;
    Ok(view.router.bytes().len()
        + view
            .experts
            .iter()
            .map(|x| {
                Matrix::ALL
                    .map(|m| x.matrix(m).bytes().len())
                    .iter()
                    .sum::<usize>()
            })
            .sum::<usize>())
}
