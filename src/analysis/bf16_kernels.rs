//! Kernels for bf16 checkpoints (most released MoE models) on CPUs with
//! AVX-512 BF16: the streaming pass reads the mmapped bf16 words directly,
//! with no f32 copy. `vdpbf16ps` multiplies pairs of bf16 values exactly and
//! accumulates in f32; within blocks of 2048 positions the sums stay in f32,
//! across blocks they are added in f64. (The instruction treats bf16
//! subnormals, below 1.2e-38, as zero.)
//!
//! Everything here is checked at run time ([`available`]); other CPUs and
//! dtypes take the portable path in [`super::stream`].

/// Whether the CPU has the instructions these kernels use.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Positions per f32 accumulation block: each of the 16 f32 lanes sums 128
/// products (`vdpbf16ps` adds two per lane and step) before the block's sums
/// move to f64. (512 positions spent more time in the per-block reductions than in
/// the products at E = 8.)
const BLOCK: usize = 2048;

/// Adds the lower triangle (with the diagonal) of the Gram matrix of `rows`
/// (bf16 bit patterns, all of length `len`) into `gram` (`e×e` row-major).
/// `zeros` must hold at least `len` zero words (used to pad the row count to
/// a multiple of 4). Returns `false` (and does nothing) if [`available`] is false.
pub fn gram_lower_add(rows: &[&[u16]], zeros: &[u16], len: usize, gram: &mut [f64]) -> bool {
    let e = rows.len();
    assert_eq!(gram.len(), e * e);
    assert!(rows.iter().all(|r| r.len() >= len) && zeros.len() >= len);
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut padded: Vec<&[u16]> = rows.to_vec();
        while !padded.len().is_multiple_of(4) {
            padded.push(zeros);
        }
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked above) and
        // every row holds at least `len` words (asserted above).
        unsafe { gram_avx512(&padded, e, len, gram) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn bf16(x: u16) -> f64 {
    f32::from_bits((x as u32) << 16) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn gram_avx512(rows: &[&[u16]], e: usize, len: usize, gram: &mut [f64]) {
    use crate::analysis::linalg::{lane_sum, tile_pairs};
    use std::arch::x86_64::*;
    let load = |r: &[u16], p: usize| -> __m512bh {
        // SAFETY: p + 32 <= len <= r.len().
        unsafe { std::mem::transmute(_mm512_loadu_si512(r.as_ptr().add(p) as *const _)) }
    };
    let mut b = 0;
    while b < len {
        let end = (b + BLOCK).min(len);
        let full = b + (end - b) / 32 * 32;
        for i0 in (0..e).step_by(4) {
            for j0 in (0..=i0).step_by(4) {
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut p = b;
                while p < full {
                    let xi = [
                        load(rows[i0], p),
                        load(rows[i0 + 1], p),
                        load(rows[i0 + 2], p),
                        load(rows[i0 + 3], p),
                    ];
                    for c in 0..4 {
                        let y = load(rows[j0 + c], p);
                        for a in 0..4 {
                            acc[a * 4 + c] = _mm512_dpbf16_ps(acc[a * 4 + c], xi[a], y);
                        }
                    }
                    p += 32;
                }
                for (a, c, i, j) in tile_pairs(e, i0, j0, 4, 4) {
                    let mut lanes = [0f32; 16];
                    // SAFETY: `lanes` holds the 16 f32 of one register.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[a * 4 + c]) };
                    let tail: f64 = rows[i][full..end]
                        .iter()
                        .zip(&rows[j][full..end])
                        .map(|(&x, &y)| bf16(x) * bf16(y))
                        .sum();
                    gram[i * e + j] += lane_sum(&lanes) + tail;
                }
            }
        }
        b = end;
    }
}

/// Sum of bf16 values (f32 within blocks, f64 across). `None` if [`available`] is false.
pub fn sum(x: &[u16]) -> Option<f64> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked above).
        Some(unsafe { sum_avx512(x) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn sum_avx512(x: &[u16]) -> f64 {
    use std::arch::x86_64::*;
    // bf16 1.0 in every lane: dpbf16(acc, x, ones) adds pairs of x.
    // SAFETY: __m512i and __m512bh are both 512 bits of plain lanes.
    let ones: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(0x3F80)) };
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let mut acc = _mm512_setzero_ps();
        let mut it = block.chunks_exact(32);
        for c in &mut it {
            // SAFETY: `c` holds 32 words (64 bytes, an unaligned load); the
            // transmute reinterprets 512 bits of lanes.
            let v: __m512bh =
                unsafe { std::mem::transmute(_mm512_loadu_si512(c.as_ptr() as *const _)) };
            acc = _mm512_dpbf16_ps(acc, v, ones);
        }
        total += _mm512_reduce_add_ps(acc) as f64;
        total += it.remainder().iter().map(|&v| bf16(v)).sum::<f64>();
    }
    total
}

/// `sums[k] += x[k]` for bf16 `x`, in f32 ([`add_rows_to_f32`] of one row).
/// Returns `false` if [`available`] is false.
pub fn add_to_f32(sums: &mut [f32], x: &[u16]) -> bool {
    assert_eq!(sums.len(), x.len());
    add_rows_to_f32(sums, &[x])
}

/// `sums += Σ rows` elementwise, the bf16 rows widened to f32 (each sum
/// read and written once for all the rows). `false` if [`available`] is false.
pub fn add_rows_to_f32(sums: &mut [f32], rows: &[&[u16]]) -> bool {
    assert!(rows.iter().all(|r| r.len() == sums.len()));
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (checked above); lengths are equal.
        unsafe { add_rows_to_f32_avx512(sums, rows) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn add_rows_to_f32_avx512(sums: &mut [f32], rows: &[&[u16]]) {
    use std::arch::x86_64::*;
    let n = sums.len() / 16 * 16;
    let mut k = 0;
    while k < n {
        // SAFETY: k + 16 <= n <= sums.len(): 16 f32 inside `sums`.
        let s = unsafe { sums.as_mut_ptr().add(k) };
        // SAFETY: as above, an unaligned load of those 16 f32.
        let mut acc = unsafe { _mm512_loadu_ps(s) };
        for r in rows {
            // SAFETY: every row is as long as `sums` (asserted by the
            // caller), so its words k..k + 16 exist.
            let h = unsafe { _mm256_loadu_si256(r.as_ptr().add(k) as *const _) };
            let f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            acc = _mm512_add_ps(acc, f);
        }
        // SAFETY: the same 16 f32 of `sums`, written back.
        unsafe { _mm512_storeu_ps(s, acc) };
        k += 16;
    }
    for q in n..sums.len() {
        for r in rows {
            sums[q] += f32::from_bits((r[q] as u32) << 16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_bf16(x: f32) -> u16 {
        (x.to_bits() >> 16) as u16
    }

    #[test]
    fn kernels_match_f64_loops() {
        if !available() {
            crate::test_support::skip(
                "bf16_kernels::kernels_match_f64_loops",
                "avx512bf16",
                "no AVX-512 BF16 on this CPU",
            );
            return;
        }
        for (e, len) in [(1usize, 7usize), (3, 600), (8, 2048), (6, 1031), (9, 100)] {
            let rows: Vec<Vec<u16>> = (0..e)
                .map(|r| {
                    (0..len)
                        .map(|q| to_bf16((((r * 7919 + q * 104729) % 1000) as f32 - 500.0) / 256.0))
                        .collect()
                })
                .collect();
            let refs: Vec<&[u16]> = rows.iter().map(Vec::as_slice).collect();
            let zeros = vec![0u16; len];
            let mut gram = vec![0f64; e * e];
            assert!(gram_lower_add(&refs, &zeros, len, &mut gram));
            for i in 0..e {
                for j in 0..e {
                    let want = if j <= i {
                        (0..len)
                            .map(|q| bf16(rows[i][q]) * bf16(rows[j][q]))
                            .sum::<f64>()
                    } else {
                        0.0
                    };
                    let got = gram[i * e + j];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "({i},{j}) {got} vs {want}"
                    );
                }
            }
            let want: f64 = rows[0].iter().map(|&v| bf16(v)).sum();
            assert!((sum(&rows[0]).unwrap() - want).abs() <= 1e-5 * want.abs().max(1.0));
            let mut sums = vec![1.0f32; len];
            assert!(add_to_f32(&mut sums, &rows[0]));
            for (s, &v) in sums.iter().zip(&rows[0]) {
                assert_eq!(*s, 1.0 + bf16(v) as f32);
            }
            // Rows added in order, in f32, as one add_to_f32 per row would.
            let mut sums = vec![1.0f32; len];
            assert!(add_rows_to_f32(&mut sums, &refs[..e.min(4)]));
            for (q, s) in sums.iter().enumerate() {
                let want = refs[..e.min(4)]
                    .iter()
                    .fold(1.0f32, |acc, r| acc + bf16(r[q]) as f32);
                assert_eq!(*s, want, "add_rows_to_f32 at {q}");
            }
        }
    }
}
