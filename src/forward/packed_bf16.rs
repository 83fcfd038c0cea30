//! `y = x · Wᵀ` for large bf16 matrices (the neuron cosines of
//! neuron-reorder: 14336 × 14336 × 4096 at Mixtral-8x7B size) as a packed
//! GEMM: both operands are copied once into micro-panels, and a 12 × 32
//! register tile multiplies a broadcast pair of `x` values with 32 columns
//! of `w` per `vdpbf16ps`.
//!
//! The dot-product tiles of [`super::expert_gemm`] (4 rows × 4 columns, each
//! accumulator a 16-lane partial sum over `k`) load 32 bytes per `vdpbf16ps`;
//! this tile loads 7.3 (two 64-byte column loads and twelve 4-byte
//! broadcasts per 24 instructions), so the cores' L2 caches feed it at the
//! instruction rate: 5.1–5.4 s for the 14336 × 14336 × 4096 product on two
//! Zen 4 cores (≈ 80 G multiply-adds/s per core), where the dot-product
//! tiles took 7.9–8.8 s. A tile of 8 rows measured 5.3 s. The rows of `x`
//! go in blocks that stay in L2 together with one column panel; every
//! thread takes its own column panels.
//!
//! Every product is exact (bf16 × bf16 fits f32); the sums are f32, each
//! accumulator summing at most [`FLUSH`] pairs before it is added into the
//! tile's running f32 sum, so the rounding stays that of sums of ~100
//! terms, as in the dot-product tiles.

// Only x86_64 has the kernel (`vdpbf16ps`); elsewhere `matmul_bf16_xwt`
// declines before reaching this module.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use half::bf16;
use rayon::prelude::*;

use super::expert_gemm::Out;
use crate::memory::Recycler;

/// The packed copies, kept from one product to the next (two per product;
/// 235 MB for a pair at Mixtral-8x7B size): see [`Recycler`].
static PANELS: Recycler<u32> = Recycler::new(64);

/// Frees the packed copies kept for the next product.
pub(crate) fn release() {
    PANELS.clear();
}

/// Rows of `x` in a micro-panel (one broadcast each per step).
const MR: usize = 12;
/// Columns of `w` in a micro-panel (two 16-lane registers).
const NR: usize = 32;
/// Pair-steps summed in registers before they are added to the tile's sum.
const FLUSH: usize = 64;

/// `y[i·n + j] = Σ_p x[i·k + p] · w[j·k + p]` (`x` `[m, k]`, `w` `[n, k]`),
/// products exact, sums in f32.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn xwt(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(y.len(), m * n, "y is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let steps = k.div_ceil(2);
    let a = pack(x, m, k, MR);
    let b = pack(w, n, k, NR);
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // Rows per block: the block's panels (steps × MR × 4 bytes each) in
    // about 512 KiB, beside a column panel (steps × NR × 4 bytes) in L2.
    let block = ((512 << 10) / (steps * MR * 4).max(1)).clamp(1, row_panels);
    let threads = rayon::current_num_threads().max(1);
    let per = col_panels.div_ceil(threads * 2).max(1);
    let out = Out(y.as_mut_ptr());
    (0..col_panels.div_ceil(per))
        .into_par_iter()
        .for_each(|chunk| {
            let cols = chunk * per..((chunk + 1) * per).min(col_panels);
            let mut r0 = 0;
            while r0 < row_panels {
                let r1 = (r0 + block).min(row_panels);
                for cp in cols.clone() {
                    let bp = &b[cp * steps * NR..(cp + 1) * steps * NR];
                    for rp in r0..r1 {
                        let ap = &a[rp * steps * MR..(rp + 1) * steps * MR];
                        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (the
                        // caller's contract); the panels hold `steps` steps.
                        let tile = unsafe { tile(ap, bp, steps) };
                        let (i0, j0) = (rp * MR, cp * NR);
                        for (r, row) in tile.iter().enumerate().take(m - i0) {
                            let c = (n - j0).min(NR);
                            // SAFETY: rows i0 + r < m, columns j0..j0 + c <= n:
                            // inside y; each (row panel, column panel) pair is
                            // one tile, written by the one chunk that owns the
                            // column panel.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    row.as_ptr(),
                                    out.at((i0 + r) * n + j0),
                                    c,
                                )
                            };
                        }
                    }
                }
                r0 = r1;
            }
        });
    PANELS.give(a);
    PANELS.give(b);
}

/// The rows of `v` (`[rows, k]`) in panels of `width` rows: panel `q`,
/// step `s`, row `r` is the pair `(v[i, 2s], v[i, 2s + 1])` of row
/// `i = q·width + r` as one u32 (low half first, as `vdpbf16ps` reads a
/// lane); rows past `rows` and the value past an odd `k` are zero.
fn pack(v: &[bf16], rows: usize, k: usize, width: usize) -> Vec<u32> {
    let steps = k.div_ceil(2);
    let panels = rows.div_ceil(width);
    let mut out = PANELS.take(panels * steps * width);
    out.par_chunks_mut((steps * width).max(1))
        .enumerate()
        .for_each(|(q, panel)| {
            for r in 0..width {
                let i = q * width + r;
                if i >= rows {
                    break;
                }
                let row = &v[i * k..(i + 1) * k];
                for (s, pair) in row.chunks(2).enumerate() {
                    let lo = pair[0].to_bits() as u32;
                    let hi = pair.get(1).map_or(0, |h| h.to_bits() as u32);
                    panel[s * width + r] = lo | (hi << 16);
                }
            }
        });
    out
}

/// One 12 × 32 tile over all `steps`: `a` is a row panel (`steps × MR`),
/// `b` a column panel (`steps × NR`).
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(a: &[u32], b: &[u32], steps: usize) -> [[f32; NR]; MR] {
    use std::arch::x86_64::{
        __m512, __m512bh, __m512i, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_si512,
        _mm512_set1_epi32, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    assert!(
        a.len() >= steps * MR && b.len() >= steps * NR,
        "short panels"
    );
    let bh = |v: __m512i| -> __m512bh {
        // SAFETY: __m512bh is 32 bf16 in a 512-bit register, the bits as
        // stored; any bits are a valid value.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    };
    let z = _mm512_setzero_ps();
    let mut sum = [[z; 2]; MR];
    let mut s = 0;
    while s < steps {
        let end = (s + FLUSH).min(steps);
        let mut acc = [[z; 2]; MR];
        while s < end {
            // SAFETY: s < steps: the step's NR columns and MR rows are
            // inside the panels (asserted above).
            unsafe {
                let bp = b.as_ptr().add(s * NR);
                let b0 = bh(_mm512_loadu_si512(bp as *const __m512i));
                let b1 = bh(_mm512_loadu_si512(bp.add(16) as *const __m512i));
                let ap = a.as_ptr().add(s * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = bh(_mm512_set1_epi32(*ap.add(r) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
            s += 1;
        }
        for (t, v) in sum.iter_mut().zip(&acc) {
            t[0] = _mm512_add_ps(t[0], v[0]);
            t[1] = _mm512_add_ps(t[1], v[1]);
        }
    }
    let mut out = [[0f32; NR]; MR];
    for (o, t) in out.iter_mut().zip(&sum) {
        let t: [__m512; 2] = *t;
        // SAFETY: each row holds NR = 32 floats: two stores of 16.
        unsafe {
            _mm512_storeu_ps(o.as_mut_ptr(), t[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), t[1]);
        }
    }
    out
}
