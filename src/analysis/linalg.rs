//! Small dense linear algebra for the analyses: blocked Gram matrices,
//! cosine matrices, Pearson correlation, a Jacobi eigensolver for small
//! symmetric matrices, and f32/f64 matrix products through `gemm` (all cores).

/// Rows per tile of [`gram_lower_add`]: row tiles of 2, column tiles of 4.
pub const GRAM_ROW_PAD: usize = 4;

/// Adds the lower triangle (with the diagonal) of the Gram matrix of `e`
/// rows into `gram` (`e×e`, row-major, f64): row `r` is
/// `buf[r * stride..r * stride + len]`. `buf` must hold `e` rounded up to
/// [`GRAM_ROW_PAD`] rows, the extra ones zero. Register tiles of 2×4 rows
/// and 8 f32 lanes over blocks of 256 positions (f64 across blocks), so every
/// element is loaded a few times from L1 instead of once per pair; AVX2+FMA
/// when the CPU has them (checked at run time).
pub fn gram_lower_add(buf: &[f32], stride: usize, len: usize, e: usize, gram: &mut [f64]) {
    assert!(
        len <= stride && buf.len() >= e.next_multiple_of(GRAM_ROW_PAD) * stride - (stride - len)
    );
    assert_eq!(gram.len(), e * e);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { gram_avx2_fma(buf, stride, len, e, gram) };
            return;
        }
    }
    gram_tiles(buf, stride, len, e, gram, |x, y, acc| x * y + acc)
}

/// The pairs `(a, c, i, j)` of an `r×c` register tile at rows `i0`, columns
/// `j0` (`i = i0 + a`, `j = j0 + c`) that lie in the lower triangle of an
/// `e×e` Gram matrix: the entries a finished tile adds to.
pub(crate) fn tile_pairs(
    e: usize,
    i0: usize,
    j0: usize,
    r: usize,
    c: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (0..r)
        .flat_map(move |a| (0..c).map(move |b| (a, b, i0 + a, j0 + b)))
        .filter(move |&(_, _, i, j)| i < e && j <= i)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gram_avx2_fma(buf: &[f32], stride: usize, len: usize, e: usize, gram: &mut [f64]) {
    use std::arch::x86_64::*;
    const BLOCK: usize = 256;
    let base = buf.as_ptr();
    let mut b = 0;
    while b < len {
        let end = (b + BLOCK).min(len);
        let full = b + (end - b) / 8 * 8;
        for i0 in (0..e).step_by(2) {
            for j0 in (0..=(i0 + 1).min(e - 1)).step_by(4) {
                let mut acc = [_mm256_setzero_ps(); 8];
                // SAFETY: `buf` holds `e` rounded up to GRAM_ROW_PAD rows of
                // `stride` (asserted by `gram_lower_add`), so rows i0 + 1 and
                // j0 + 3 exist; the loads below, at p + 8 <= len <= stride,
                // stay inside each row.
                let (pi0, pi1) = unsafe { (base.add(i0 * stride), base.add((i0 + 1) * stride)) };
                // SAFETY: as above.
                let pj = unsafe {
                    [
                        base.add(j0 * stride),
                        base.add((j0 + 1) * stride),
                        base.add((j0 + 2) * stride),
                        base.add((j0 + 3) * stride),
                    ]
                };
                let mut p = b;
                while p < full {
                    // SAFETY: rows i0+1 and j0+3 exist (padded buffer, checked by
                    // the caller) and p + 8 <= len <= stride.
                    let (a0, a1) =
                        unsafe { (_mm256_loadu_ps(pi0.add(p)), _mm256_loadu_ps(pi1.add(p))) };
                    for c in 0..4 {
                        // SAFETY: as above, for column row j0 + c.
                        let x = unsafe { _mm256_loadu_ps(pj[c].add(p)) };
                        acc[c] = _mm256_fmadd_ps(a0, x, acc[c]);
                        acc[4 + c] = _mm256_fmadd_ps(a1, x, acc[4 + c]);
                    }
                    p += 8;
                }
                for (a, c, i, j) in tile_pairs(e, i0, j0, 2, 4) {
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds the 8 f32 of one register.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a * 4 + c]) };
                    gram[i * e + j] += lane_sum(&lanes) + tail_dot(buf, stride, i, j, full..end);
                }
            }
        }
        b = end;
    }
}

/// Sum of f32 lanes in f64.
pub(crate) fn lane_sum(lanes: &[f32]) -> f64 {
    lanes.iter().map(|&v| v as f64).sum()
}

/// Dot product of rows `i` and `j` over `range` (the positions a tile's
/// vector loop did not cover), in f64.
fn tail_dot(buf: &[f32], stride: usize, i: usize, j: usize, range: std::ops::Range<usize>) -> f64 {
    range
        .map(|q| buf[i * stride + q] as f64 * buf[j * stride + q] as f64)
        .sum()
}

// Index loops keep the register tile explicit for the vectoriser.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn gram_tiles(
    buf: &[f32],
    stride: usize,
    len: usize,
    e: usize,
    gram: &mut [f64],
    fma: impl Fn(f32, f32, f32) -> f32 + Copy,
) {
    const BLOCK: usize = 256;
    const L: usize = 8;
    let row = |r: usize, p: usize| -> &[f32; L] {
        // In bounds: p + L <= len <= stride, r < padded row count.
        buf[r * stride + p..r * stride + p + L].try_into().unwrap()
    };
    let mut b = 0;
    while b < len {
        let end = (b + BLOCK).min(len);
        let full = b + (end - b) / L * L;
        for i0 in (0..e).step_by(2) {
            for j0 in (0..=(i0 + 1).min(e - 1)).step_by(4) {
                let mut acc = [[[0f32; L]; 4]; 2];
                let mut p = b;
                while p < full {
                    let xi = [row(i0, p), row(i0 + 1, p)];
                    let xj = [row(j0, p), row(j0 + 1, p), row(j0 + 2, p), row(j0 + 3, p)];
                    for a in 0..2 {
                        for c in 0..4 {
                            for l in 0..L {
                                acc[a][c][l] = fma(xi[a][l], xj[c][l], acc[a][c][l]);
                            }
                        }
                    }
                    p += L;
                }
                for (a, c, i, j) in tile_pairs(e, i0, j0, 2, 4) {
                    gram[i * e + j] +=
                        lane_sum(&acc[a][c]) + tail_dot(buf, stride, i, j, full..end);
                }
            }
        }
        b = end;
    }
}

/// Sum of `a` with f32 lanes per block of 256 and f64 across blocks
/// (vectorised, unlike a sequential f64 sum).
pub fn sum(a: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for c in a.chunks(256) {
        let mut lanes = [0f32; LANES];
        let mut it = c.chunks_exact(LANES);
        for x in &mut it {
            for k in 0..LANES {
                lanes[k] += x[k];
            }
        }
        total += lanes.iter().map(|&v| v as f64).sum::<f64>()
            + it.remainder().iter().map(|&v| v as f64).sum::<f64>();
    }
    total
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

/// Cosine similarity matrix of vectors (rows).
pub fn cosine_of_rows(rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let g: Vec<Vec<f64>> = rows
        .iter()
        .map(|a| {
            rows.iter()
                .map(|b| a.iter().zip(b).map(|(x, y)| x * y).sum())
                .collect()
        })
        .collect();
    cosine_from_gram(&g)
}

/// Values of the strict lower triangle, row by row (numpy's `tril_indices(n, -1)` order).
pub fn strict_lower(m: &[Vec<f64>]) -> Vec<f64> {
    m.iter()
        .enumerate()
        .flat_map(|(i, row)| row[..i].iter().copied())
        .collect()
}

/// Pearson correlation; `None` when undefined (fewer than 2 points or a constant side).
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len();
    if n < 2 || b.len() != n {
        return None;
    }
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return None;
    }
    Some((sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0))
}

/// Eigen-decomposition of a small symmetric matrix by cyclic Jacobi rotations.
/// Returns eigenvalues in decreasing order and the matching unit eigenvectors
/// (`vectors[k]` belongs to `values[k]`).
pub fn symmetric_eigen(m: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = m.len();
    let mut a: Vec<Vec<f64>> = m.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    let scale: f64 = a
        .iter()
        .flatten()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (lo, hi) = a.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (apk, aqk) = (*x, *y);
                    *x = c * apk - s * aqk;
                    *y = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y][y].total_cmp(&a[x][x]));
    let values = order.iter().map(|&k| a[k][k]).collect();
    let vectors = order
        .iter()
        .map(|&k| (0..n).map(|i| v[i][k]).collect())
        .collect();
    (values, vectors)
}

/// Whether an operand of [`matmul`] is used as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `A` is stored `m×k` (or `B` stored `k×n`).
    N,
    /// `A` is stored `k×m` and used as `Aᵀ` (or `B` stored `n×k`, used as `Bᵀ`).
    T,
}

/// Row-major `C (m×n) = op(A) · op(B)`, f32 or f64, parallel on all cores.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Copy + Default + 'static>(
    a: &[T],
    op_a: Op,
    b: &[T],
    op_b: Op,
    m: usize,
    k: usize,
    n: usize,
    one: T,
) -> Vec<T> {
    assert_eq!(
        a.len(),
        m * k,
        "matmul: A has {} elements, expected {m}×{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: B has {} elements, expected {k}×{n}",
        b.len()
    );
    let mut c = vec![T::default(); m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    // (column stride, row stride) of op(A) (m×k) and op(B) (k×n).
    let (a_cs, a_rs) = match op_a {
        Op::N => (1, k as isize),
        Op::T => (m as isize, 1),
    };
    let (b_cs, b_rs) = match op_b {
        Op::N => (1, n as isize),
        Op::T => (k as isize, 1),
    };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: with these strides the pointers address exactly m×k, k×n and
    // m×n elements (lengths checked above); `c` is fresh and aliases nothing.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::default(),
            one,
            false,
            false,
            false,
            par,
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_gram_matches_pairwise_dots() {
        for (e, len) in [(1usize, 5usize), (3, 300), (8, 1000), (6, 257), (9, 64)] {
            let stride = len + 3;
            let rows = e.next_multiple_of(GRAM_ROW_PAD);
            let mut buf = vec![0f32; rows * stride];
            for r in 0..e {
                for q in 0..len {
                    buf[r * stride + q] = (((r * 7919 + q * 104729) % 1000) as f32 - 500.0) / 250.0;
                }
            }
            let mut gram = vec![0f64; e * e];
            gram_lower_add(&buf, stride, len, e, &mut gram);
            // The portable kernel (used without AVX2+FMA) gives the same.
            let mut portable = vec![0f64; e * e];
            gram_tiles(&buf, stride, len, e, &mut portable, |x, y, a| x * y + a);
            for (p, g) in portable.iter().zip(&gram) {
                assert!((p - g).abs() <= 1e-5 * g.abs().max(1.0));
            }
            for i in 0..e {
                for j in 0..e {
                    let want = if j <= i {
                        (0..len)
                            .map(|q| buf[i * stride + q] as f64 * buf[j * stride + q] as f64)
                            .sum::<f64>()
                    } else {
                        0.0
                    };
                    let got = gram[i * e + j];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{e} {len} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
        let v: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5).collect();
        assert_eq!(sum(&v), 250250.0);
    }

    #[test]
    fn jacobi_recovers_a_known_spectrum() {
        // Q diag(5, 2, -1) Qᵀ with a rotation Q.
        let (c, s) = (0.6f64, 0.8f64);
        let q = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
        let d = [5.0, 2.0, -1.0];
        let m: Vec<Vec<f64>> = (0..3)
            .map(|i| {
                (0..3)
                    .map(|j| (0..3).map(|k| q[i][k] * d[k] * q[j][k]).sum())
                    .collect()
            })
            .collect();
        let (vals, vecs) = symmetric_eigen(&m);
        for (got, want) in vals.iter().zip(d) {
            assert!((got - want).abs() < 1e-12);
        }
        // First eigenvector is ±(c, s, 0).
        assert!((vecs[0][0].abs() - c).abs() < 1e-12 && (vecs[0][1].abs() - s).abs() < 1e-12);
    }

    #[test]
    fn matmul_matches_naive_products() {
        let a: Vec<f64> = (0..6).map(|x| x as f64).collect(); // 2×3
        let b: Vec<f64> = (0..12).map(|x| (x as f64) - 3.0).collect(); // 3×4
        let c = matmul(&a, Op::N, &b, Op::N, 2, 3, 4, 1.0);
        for i in 0..2 {
            for j in 0..4 {
                let want: f64 = (0..3).map(|k| a[i * 3 + k] * b[k * 4 + j]).sum();
                assert_eq!(c[i * 4 + j], want);
            }
        }
        // Aᵀ·B with A given as 3×2.
        let at: Vec<f64> = (0..6).map(|x| x as f64).collect();
        let c = matmul(&at, Op::T, &b, Op::N, 2, 3, 4, 1.0);
        for i in 0..2 {
            for j in 0..4 {
                let want: f64 = (0..3).map(|k| at[k * 2 + i] * b[k * 4 + j]).sum();
                assert_eq!(c[i * 4 + j], want);
            }
        }
        // A·Bᵀ with B given as 4×3.
        let bt: Vec<f64> = (0..12).map(|x| (x as f64) * 0.5).collect();
        let c = matmul(&a, Op::N, &bt, Op::T, 2, 3, 4, 1.0);
        for i in 0..2 {
            for j in 0..4 {
                let want: f64 = (0..3).map(|k| a[i * 3 + k] * bt[j * 3 + k]).sum();
                assert_eq!(c[i * 4 + j], want);
            }
        }
    }

    #[test]
    fn pearson_is_none_for_constant_input() {
        assert_eq!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        let r = pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]).unwrap();
        assert!((r - 0.9933992677987828).abs() < 1e-12);
    }

    #[test]
    fn cosine_of_zero_vector_is_zero_off_diagonal() {
        let g = vec![vec![4.0, 0.0], vec![0.0, 0.0]];
        assert_eq!(cosine_from_gram(&g), vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
    }
}
