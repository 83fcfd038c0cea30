//! Streaming reductions over mmapped tensors: each byte is read once, converted
//! to f32 in bounded chunks, and reduced with f64 accumulation on all cores.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::TensorView;

/// Elements converted per chunk and tensor (64 KiB of f32).
const CHUNK: usize = 1 << 14;

/// Dot product with 8 f32 lanes per block of 256 and f64 across blocks, so
/// long vectors keep about f64-level relative accuracy at f32 speed.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut total = 0f64;
    for (ca, cb) in a.chunks(256).zip(b.chunks(256)) {
        let mut lanes = [0f32; 8];
        let mut ia = ca.chunks_exact(8);
        let mut ib = cb.chunks_exact(8);
        for (x, y) in (&mut ia).zip(&mut ib) {
            for k in 0..8 {
                lanes[k] += x[k] * y[k];
            }
        }
        let mut block: f64 = lanes.iter().map(|&v| v as f64).sum();
        for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
            block += (*x as f64) * (*y as f64);
        }
        total += block;
    }
    total
}

/// The Gram matrix `G[i][j] = <v_i, v_j>` of tensors with the same number of
/// elements (flattened row-major). Fails on NaN/inf, naming the tensor.
pub fn gram(vs: &[TensorView<'_>]) -> Result<Vec<Vec<f64>>> {
    let e = vs.len();
    let n = vs.first().map_or(0, |v| v.numel());
    if let Some(v) = vs.iter().find(|v| v.numel() != n) {
        return Err(Error::Incompatible {
            path: v.path.to_path_buf(),
            reason: format!(
                "tensor `{}` has {} elements, expected {n} like `{}`",
                v.name,
                v.numel(),
                vs[0].name
            ),
        });
    }
    let chunks = n.div_ceil(CHUNK);
    let flat = (0..chunks)
        .into_par_iter()
        .fold(
            || (vec![0f64; e * e], vec![0f32; e * CHUNK]),
            |(mut g, mut buf), c| {
                let start = c * CHUNK;
                let len = CHUNK.min(n - start);
                for (k, v) in vs.iter().enumerate() {
                    v.read_f32(start, &mut buf[k * CHUNK..k * CHUNK + len]);
                }
                for i in 0..e {
                    let a = &buf[i * CHUNK..i * CHUNK + len];
                    for j in 0..=i {
                        g[i * e + j] += dot(a, &buf[j * CHUNK..j * CHUNK + len]);
                    }
                }
                (g, buf)
            },
        )
        .map(|(g, _)| g)
        .reduce(
            || vec![0f64; e * e],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let mut out = vec![vec![0f64; e]; e];
    for i in 0..e {
        if !flat[i * e + i].is_finite() {
            return Err(Error::NonFinite {
                path: vs[i].path.to_path_buf(),
                tensor: vs[i].name.to_string(),
            });
        }
        for j in 0..=i {
            out[i][j] = flat[i * e + j];
            out[j][i] = flat[i * e + j];
        }
    }
    Ok(out)
}

/// Cosine similarities from a Gram matrix; a zero vector has similarity 0 to
/// everything but itself (1), so the result never holds NaN.
pub fn cosine_from_gram(g: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let e = g.len();
    let norms: Vec<f64> = (0..e).map(|i| g[i][i].sqrt()).collect();
    (0..e)
        .map(|i| {
            (0..e)
                .map(|j| {
                    if i == j {
                        1.0
                    } else if norms[i] == 0.0 || norms[j] == 0.0 {
                        0.0
                    } else {
                        (g[i][j] / (norms[i] * norms[j])).clamp(-1.0, 1.0)
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64_reference_on_long_vectors() {
        let a: Vec<f32> = (0..100_003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..100_003)
            .map(|i| ((i * 11 % 53) as f32 - 26.0) / 3.0)
            .collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let scale: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64 * *y as f64).abs())
            .sum();
        let got = dot(&a, &b);
        // f32 products and 32-term f32 partial sums: error ≪ 1e-6 of Σ|a·b|.
        assert!((got - exact).abs() <= 1e-6 * scale, "{got} vs {exact}");
    }

    #[test]
    fn cosine_of_zero_vector_is_zero_off_diagonal() {
        let g = vec![vec![4.0, 0.0], vec![0.0, 0.0]];
        assert_eq!(cosine_from_gram(&g), vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
    }
}
