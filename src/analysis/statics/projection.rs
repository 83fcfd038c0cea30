//! `projection` (paper §3.2, Fig. 3): 2-D PCA of the experts (each flattened
//! matrix, standardised per coordinate with the sample std) and of all
//! experts' neurons (each a hidden-size vector, centred).
//!
//! Neither route forms a covariance of the large side:
//! - experts: E samples of dimension I·hidden (58 M for Mixtral), so the E×E
//!   Gram matrix of the standardised experts, accumulated in the streaming
//!   pass, is eigen-decomposed (`gram`);
//! - neurons: E·I samples (114 688 for Mixtral) of dimension hidden, so the
//!   hidden×hidden covariance is the small side: formed exactly when hidden ≤
//!   64 (`covariance`), otherwise the top components come from randomised
//!   subspace iteration (16 columns, 8 power iterations, `randomized`).

use rayon::prelude::*;

use crate::analysis::linalg::{matmul, symmetric_eigen, Op};
use crate::analysis::neurons;
use crate::analysis::results::{PcaResult, PerMatrix, ProjectionLayer, ProjectionMatrix};
use crate::analysis::stream::MatrixStats;
use crate::error::Result;
use crate::model::{Matrix, MoeLayerView};

/// Largest hidden size for which the neuron covariance is formed exactly.
pub const EXACT_MAX_HIDDEN: usize = 64;
const SUBSPACE: usize = 16;
const POWER_ITERATIONS: usize = 8;

/// Experts PCA from the standardised Gram matrix: (ratios, points).
pub fn experts_pca(std_gram: &[Vec<f64>]) -> (Vec<f64>, Vec<[f64; 2]>) {
    let e = std_gram.len();
    let total: f64 = (0..e).map(|i| std_gram[i][i]).sum();
    let (values, vectors) = symmetric_eigen(std_gram);
    let comp = |k: usize| -> (f64, Vec<f64>) {
        match (values.get(k), vectors.get(k)) {
            (Some(&l), Some(u)) if l > 0.0 => (l, u.iter().map(|x| x * l.sqrt()).collect()),
            _ => (0.0, vec![0.0; e]),
        }
    };
    let (l0, c0) = comp(0);
    let (l1, c1) = comp(1);
    let ratio = |l: f64| if total > 0.0 { l / total } else { 0.0 };
    let points = (0..e).map(|i| [c0[i], c1[i]]).collect();
    (vec![ratio(l0), ratio(l1)], points)
}

/// Neuron PCA of stacked neurons `x` (`[n, hidden]`, f32, consumed: centred in place).
pub fn neurons_pca(x: Vec<f32>, n: usize, hidden: usize) -> PcaResult {
    neurons_pca_with(x, n, hidden, hidden > EXACT_MAX_HIDDEN)
}

fn neurons_pca_with(mut x: Vec<f32>, n: usize, hidden: usize, randomized: bool) -> PcaResult {
    let mut mean = vec![0f64; hidden];
    for row in x.chunks(hidden) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let mut total = 0f64;
    for row in x.chunks_mut(hidden) {
        for (v, m) in row.iter_mut().zip(&mean) {
            let d = *v as f64 - m;
            total += d * d;
            *v = d as f32;
        }
    }
    let dof = (n.max(2) - 1) as f64;
    total /= dof;
    // Components as hidden-size columns of `basis` (hidden × k) and the k×k
    // covariance restricted to them.
    let (basis, k, method) = if !randomized {
        let eye: Vec<f64> = (0..hidden * hidden)
            .map(|i| if i / hidden == i % hidden { 1.0 } else { 0.0 })
            .collect();
        (eye, hidden, "covariance")
    } else {
        (randomized_basis(&x, n, hidden), SUBSPACE, "randomized")
    };
    // B = X_c · basis (n × k): in f64 for the exact route; in f32 for the
    // randomised one, whose inputs are too large for an f64 copy.
    let b: Vec<f64> = if method == "covariance" {
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        drop(x);
        matmul(&xd, Op::N, &basis, Op::N, n, hidden, k, 1.0)
    } else {
        let basis32: Vec<f32> = basis.iter().map(|&v| v as f32).collect();
        let b32 = matmul(&x, Op::N, &basis32, Op::N, n, hidden, k, 1.0);
        drop(x);
        b32.iter().map(|&v| v as f64).collect()
    };
    let m = matmul(&b, Op::T, &b, Op::N, k, n, k, 1.0);
    let m: Vec<Vec<f64>> = m
        .chunks(k)
        .map(|r| r.iter().map(|v| v / dof).collect())
        .collect();
    let (values, vectors) = symmetric_eigen(&m);
    let mut ratios = Vec::new();
    let mut cols: Vec<Vec<f64>> = Vec::new();
    for c in 0..2 {
        let (l, w) = match (values.get(c), vectors.get(c)) {
            (Some(&l), Some(w)) => (l.max(0.0), w.clone()),
            _ => (0.0, vec![0.0; k]),
        };
        ratios.push(if total > 0.0 { l / total } else { 0.0 });
        // Scores: B · w.
        cols.push(
            b.chunks(k)
                .map(|row| row.iter().zip(&w).map(|(x, y)| x * y).sum())
                .collect(),
        );
    }
    PcaResult {
        explained_variance: ratios,
        points: (0..n).map(|i| [cols[0][i], cols[1][i]]).collect(),
        method: method.to_string(),
    }
}

/// An orthonormal hidden × SUBSPACE basis of the dominant subspace of X_cᵀX_c.
fn randomized_basis(x: &[f32], n: usize, hidden: usize) -> Vec<f64> {
    let k = SUBSPACE;
    let mut seed = 0x5eed_u64;
    let mut q: Vec<f32> = (0..hidden * k)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    orthonormalize(&mut q, hidden, k);
    for _ in 0..POWER_ITERATIONS {
        q = gram_times(x, n, hidden, &q);
        orthonormalize(&mut q, hidden, k);
    }
    q.iter().map(|&v| v as f64).collect()
}

/// Rows of x per task of [`gram_times`].
const GRAM_BLOCK: usize = 256;

/// `Xᵀ(X·q)` for `x` (`[n, hidden]`) and `q` (`[hidden, SUBSPACE]`), both
/// row-major, in one pass over x: each block of rows computes its rows'
/// `x_r·q` and adds `x_rᵀ(x_r·q)` into its own f32 sum while the rows are
/// in cache; the blocks' sums are added in f64. (Two matrix products read
/// x twice, the second time column-wise.)
fn gram_times(x: &[f32], n: usize, hidden: usize, q: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), n * hidden, "x is not [n, hidden]");
    assert_eq!(q.len(), hidden * SUBSPACE, "q is not [hidden, {SUBSPACE}]");
    if hidden == 0 {
        return Vec::new();
    }
    let sum = x
        .par_chunks(GRAM_BLOCK * hidden)
        .map(|rows| {
            let mut acc = vec![0f32; hidden * SUBSPACE];
            gram_block(rows, hidden, q, &mut acc);
            acc.into_iter().map(f64::from).collect::<Vec<f64>>()
        })
        .reduce(
            || vec![0f64; hidden * SUBSPACE],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    sum.into_iter().map(|v| v as f32).collect()
}

/// [`gram_times`] on one block of rows, with the widest instructions the
/// CPU has (the loops over the 16 columns are one vector each).
fn gram_block(rows: &[f32], hidden: usize, q: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked).
        unsafe { gram_block_avx512(rows, hidden, q, acc) };
        return;
    }
    gram_block_portable(rows, hidden, q, acc);
}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// `h` indexes the eight rows, q and acc at once.
#[allow(clippy::needless_range_loop)]
unsafe fn gram_block_avx512(rows: &[f32], hidden: usize, q: &[f32], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    const { assert!(SUBSPACE == 16, "one zmm register per row of q") };
    assert!(q.len() == hidden * SUBSPACE && acc.len() == hidden * SUBSPACE);
    // Eight rows at a time: each row of q and of acc (L2-resident at
    // hidden 1024 and above) is then read once per eight rows.
    const G: usize = 8;
    let (qp, ap) = (q.as_ptr(), acc.as_mut_ptr());
    let mut groups = rows.chunks_exact(G * hidden);
    for g in &mut groups {
        let r: [&[f32]; G] = std::array::from_fn(|i| &g[i * hidden..(i + 1) * hidden]);
        let mut b = [_mm512_setzero_ps(); G];
        for h in 0..hidden {
            // SAFETY: h < hidden and q holds hidden rows of 16 (asserted).
            let qv = unsafe { _mm512_loadu_ps(qp.add(h * 16)) };
            for i in 0..G {
                b[i] = _mm512_fmadd_ps(_mm512_set1_ps(r[i][h]), qv, b[i]);
            }
        }
        for h in 0..hidden {
            // SAFETY: h < hidden and acc holds hidden rows of 16 (asserted).
            unsafe {
                let a = ap.add(h * 16);
                let mut lo = _mm512_loadu_ps(a);
                let mut hi = _mm512_setzero_ps();
                for i in 0..G / 2 {
                    lo = _mm512_fmadd_ps(_mm512_set1_ps(r[i][h]), b[i], lo);
                    hi = _mm512_fmadd_ps(_mm512_set1_ps(r[i + G / 2][h]), b[i + G / 2], hi);
                }
                _mm512_storeu_ps(a, _mm512_add_ps(lo, hi));
            }
        }
    }
    gram_block_portable(groups.remainder(), hidden, q, acc);
}

#[inline(always)]
fn gram_block_portable(rows: &[f32], hidden: usize, q: &[f32], acc: &mut [f32]) {
    for row in rows.chunks_exact(hidden) {
        // Four partial sums, so that the additions do not wait on each other.
        let mut part = [[0f32; SUBSPACE]; 4];
        let mut qs = q.chunks_exact(4 * SUBSPACE);
        let mut vs = row.chunks_exact(4);
        for (v4, q4) in (&mut vs).zip(&mut qs) {
            for (u, (p, qr)) in part.iter_mut().zip(q4.chunks_exact(SUBSPACE)).enumerate() {
                for (p, &w) in p.iter_mut().zip(qr) {
                    *p += v4[u] * w;
                }
            }
        }
        let tail = vs.remainder();
        for (&v, qr) in tail
            .iter()
            .zip(q[(hidden - tail.len()) * SUBSPACE..].chunks_exact(SUBSPACE))
        {
            for (p, &w) in part[0].iter_mut().zip(qr) {
                *p += v * w;
            }
        }
        let mut b = [0f32; SUBSPACE];
        for (c, b) in b.iter_mut().enumerate() {
            *b = (part[0][c] + part[1][c]) + (part[2][c] + part[3][c]);
        }
        for (&v, a) in row.iter().zip(acc.chunks_exact_mut(SUBSPACE)) {
            for (a, &w) in a.iter_mut().zip(&b) {
                *a += v * w;
            }
        }
    }
}

/// Modified Gram-Schmidt on the columns of a row-major `rows × k` matrix (twice, for stability).
fn orthonormalize(q: &mut [f32], rows: usize, k: usize) {
    for _ in 0..2 {
        for c in 0..k {
            for p in 0..c {
                let d: f64 = (0..rows)
                    .map(|r| q[r * k + c] as f64 * q[r * k + p] as f64)
                    .sum();
                for r in 0..rows {
                    q[r * k + c] -= (d * q[r * k + p] as f64) as f32;
                }
            }
            let norm: f64 = (0..rows)
                .map(|r| (q[r * k + c] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            for r in 0..rows {
                q[r * k + c] = (q[r * k + c] as f64 * inv) as f32;
            }
        }
    }
}

/// Runs the analysis on one layer, given that layer's streaming statistics
/// (with `standardized_gram`), in `up`, `gate`, `down` order.
pub fn layer(layer: &MoeLayerView<'_>, stats: &[MatrixStats; 3]) -> Result<ProjectionLayer> {
    let one = |m: Matrix, s: &MatrixStats| -> Result<ProjectionMatrix> {
        let (explained_variance, points) = experts_pca(&s.standardized_gram);
        let mut stacked = Vec::new();
        let (mut total, mut hidden) = (0, 0);
        for x in &layer.experts {
            let (data, count, h) = neurons::load(&x.matrix(m), neurons::axis(m))?;
            stacked.extend_from_slice(&data);
            total += count;
            hidden = h;
        }
        Ok(ProjectionMatrix {
            explained_variance,
            points,
            neurons: neurons_pca(stacked, total, hidden),
        })
    };
    Ok(ProjectionLayer {
        layer: layer.layer,
        matrices: PerMatrix {
            up: one(Matrix::Up, &stats[0])?,
            gate: one(Matrix::Gate, &stats[1])?,
            down: one(Matrix::Down, &stats[2])?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neurons with a known dominant 2-D structure plus isotropic noise.
    fn synthetic(n: usize, hidden: usize) -> Vec<f32> {
        let mut seed = 99u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let dir1: Vec<f32> = (0..hidden).map(|_| rnd()).collect();
        let dir2: Vec<f32> = (0..hidden).map(|_| rnd()).collect();
        let mut x = Vec::with_capacity(n * hidden);
        for _ in 0..n {
            let (a, b) = (rnd() * 6.0, rnd() * 3.0);
            for h in 0..hidden {
                x.push(a * dir1[h] + b * dir2[h] + 0.2 * rnd());
            }
        }
        x
    }

    #[test]
    fn randomized_route_agrees_with_the_exact_covariance() {
        let (n, hidden) = (2000, 300);
        let x = synthetic(n, hidden);
        let exact = neurons_pca_with(x.clone(), n, hidden, false);
        let fast = neurons_pca_with(x, n, hidden, true);
        assert_eq!(
            (exact.method.as_str(), fast.method.as_str()),
            ("covariance", "randomized")
        );
        for (a, b) in exact
            .explained_variance
            .iter()
            .zip(&fast.explained_variance)
        {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for c in 0..2 {
            let dot: f64 = exact
                .points
                .iter()
                .zip(&fast.points)
                .map(|(p, q)| p[c] * q[c])
                .sum();
            let s = dot.signum();
            let d = exact
                .points
                .iter()
                .zip(&fast.points)
                .map(|(p, q)| (p[c] - s * q[c]).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-3, "component {c}: {d}");
        }
    }

    #[test]
    fn experts_pca_of_a_rank_one_gram_has_one_component() {
        // Two experts, standardised: z = ±1/sqrt(2)... per coordinate.
        let g = vec![vec![2.0, -2.0], vec![-2.0, 2.0]];
        let (ratios, points) = experts_pca(&g);
        assert!((ratios[0] - 1.0).abs() < 1e-12 && ratios[1].abs() < 1e-12);
        assert!((points[0][0] + points[1][0]).abs() < 1e-12);
        assert!((points[0][0].abs() - 2f64.sqrt()).abs() < 1e-12);
    }
}
