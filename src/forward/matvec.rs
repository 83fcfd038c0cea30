//! The single-token matrix–vector product of decoding (`y = W·x`, `W` in
//! the hub layout `[out, in]`, read as stored: f32, bf16 or f16).
//!
//! Decoding is bound by reading the weights once per token, so this kernel
//! is shaped for memory-level parallelism rather than arithmetic: the rows
//! are cut into one contiguous range per thread (no more pool hand-offs than
//! cores), and each thread streams eight rows at once, one accumulator
//! each, so eight independent read streams are in flight per core. Values
//! are widened to f32 in registers and accumulated in f32 (as the grouped
//! kernels of `expert_gemm` do), so the result is the exact f32 product up
//! to summation order.

use rayon::prelude::*;

use super::expert_gemm::WeightElem;

/// Rows streamed together by one thread.
pub(super) const ROWS: usize = 8;

/// `y = W·x`: `w` is `[n, x.len()]` row-major, `y` is `[n]`.
pub fn matvec<W: WeightElem>(x: &[f32], w: &[W], n: usize, y: &mut [f32]) {
    let k = x.len();
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(y.len(), n, "y is not [n]");
    if n == 0 {
        return;
    }
    // Small products (a router, a k/v projection) stay on the calling thread.
    let threads = if n * k < 1 << 18 {
        1
    } else {
        rayon::current_num_threads().clamp(1, n.div_ceil(ROWS))
    };
    if threads == 1 {
        rows(x, w, y);
        return;
    }
    let per = n.div_ceil(threads).div_ceil(ROWS) * ROWS;
    y.par_chunks_mut(per)
        .zip(w.par_chunks(per * k))
        .for_each(|(ys, ws)| rows(x, ws, ys));
}

/// `y[j] = w[j]·x` for the rows of `w` (`[y.len(), x.len()]`), with the widest
/// kernel the CPU has.
fn rows<W: WeightElem>(x: &[f32], w: &[W], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked); `w` holds y.len() rows of
            // x.len() values (asserted by the caller's chunking).
            unsafe { rows_avx512(x, w, y) };
            return;
        }
    }
    rows_portable(x, w, y);
}

fn rows_portable<W: WeightElem>(x: &[f32], w: &[W], y: &mut [f32]) {
    let k = x.len();
    for (j, out) in y.iter_mut().enumerate() {
        *out = w[j * k..(j + 1) * k]
            .iter()
            .zip(x)
            .fold(0f32, |s, (&a, &b)| b.mul_add(a.to_f32(), s));
    }
}

/// # Safety
/// The CPU must have AVX-512F; `w.len() == y.len() * x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512<W: WeightElem>(x: &[f32], w: &[W], y: &mut [f32]) {
    let k = x.len();
    debug_assert_eq!(w.len(), y.len() * k);
    let mut j = 0;
    while j + ROWS <= y.len() {
        let wp: [*const W; ROWS] = std::array::from_fn(|r| w[(j + r) * k..].as_ptr());
        // SAFETY: the caller's contract; every row holds k values.
        y[j..j + ROWS].copy_from_slice(&unsafe { dot8_avx512(x.as_ptr(), &wp, k) });
        j += ROWS;
    }
    rows_portable(x, &w[j * k..], &mut y[j..]);
}

/// The dot products of `x` with eight weight rows (`k` values each), one
/// AVX-512 accumulator per row: eight read streams in flight.
///
/// # Safety
/// The CPU must have AVX-512F; `x` and every `wp[r]` must hold `k` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dot8_avx512<W: WeightElem>(
    xp: *const f32,
    wp: &[*const W; ROWS],
    k: usize,
) -> [f32; ROWS] {
    use std::arch::x86_64::*;
    let full = k / 16 * 16;
    let z = _mm512_setzero_ps();
    let (mut s0, mut s1, mut s2, mut s3) = (z, z, z, z);
    let (mut s4, mut s5, mut s6, mut s7) = (z, z, z, z);
    let mut q = 0;
    while q < full {
        // SAFETY: q + 16 <= k, every row holds k values.
        unsafe {
            let xv = _mm512_loadu_ps(xp.add(q));
            s0 = _mm512_fmadd_ps(W::load16(wp[0].add(q)), xv, s0);
            s1 = _mm512_fmadd_ps(W::load16(wp[1].add(q)), xv, s1);
            s2 = _mm512_fmadd_ps(W::load16(wp[2].add(q)), xv, s2);
            s3 = _mm512_fmadd_ps(W::load16(wp[3].add(q)), xv, s3);
            s4 = _mm512_fmadd_ps(W::load16(wp[4].add(q)), xv, s4);
            s5 = _mm512_fmadd_ps(W::load16(wp[5].add(q)), xv, s5);
            s6 = _mm512_fmadd_ps(W::load16(wp[6].add(q)), xv, s6);
            s7 = _mm512_fmadd_ps(W::load16(wp[7].add(q)), xv, s7);
        }
        q += 16;
    }
    let sums = [s0, s1, s2, s3, s4, s5, s6, s7];
    std::array::from_fn(|r| {
        let mut v = _mm512_reduce_add_ps(sums[r]);
        for p in full..k {
            // SAFETY: p < k.
            v = unsafe { (*xp.add(p)).mul_add((*wp[r].add(p)).to_f32(), v) };
        }
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Every row, every length (tails of 0–15, row counts not a multiple of
    /// eight, one and several threads) against an f64 dot product of the
    /// same widened values.
    #[test]
    fn matvec_equals_the_f64_product_of_the_stored_values() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut compared = 0;
        for (n, k) in [(1, 1), (7, 17), (8, 16), (13, 33), (300, 1000), (4100, 96)] {
            let x: Vec<f32> = (0..k).map(|_| next()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(next())).collect();
            let mut y = vec![f32::NAN; n];
            matvec(&x, &w, n, &mut y);
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| x[p] as f64 * w[j * k + p].to_f32() as f64)
                    .sum();
                let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                assert!(y[j].is_finite(), "n={n} k={k} row {j}: {}", y[j]);
                assert!(
                    (y[j] as f64 - want).abs() <= tol,
                    "n={n} k={k} row {j}: {} vs {want}",
                    y[j]
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 1 + 7 + 8 + 13 + 300 + 4100);
    }
}
