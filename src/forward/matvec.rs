//! The single-token matrix–vector product of decoding (`y = W·x`, `W` in
//! the hub layout `[out, in]`, read as stored: f32, bf16 or f16).
//!
//! Decoding is bound by reading the weights once per token, so this kernel
//! is shaped for the read stream rather than arithmetic: the rows are cut
//! into one contiguous range per thread (no more pool hand-offs than cores),
//! and each thread reads its range front to back, one row after the other
//! with four accumulators, a single sequential stream that the hardware
//! prefetcher follows at the core's full read rate. Values
//! are widened to f32 in registers and accumulated in f32 (as the grouped
//! kernels of `expert_gemm` do), so the result is the exact f32 product up
//! to summation order.

use rayon::prelude::*;

use std::any::TypeId;

use half::bf16;

use super::expert_gemm::{current_compute, Compute, WeightElem};

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
    let x16 = rounded::<W>(x);
    let x = Input::new(x, x16.as_deref());
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

/// `ys[m] = ws[m]·x` for several matrices that read the same `x` (`ws[m]`
/// is `[ys[m].len(), x.len()]`), in one pass over the cores: every thread
/// reads the same share of each matrix's rows, front to back, so the
/// products cost one hand-off to the pool instead of one each.
pub fn matvec_many<W: WeightElem>(x: &[f32], ws: &[&[W]], ys: &mut [&mut [f32]]) {
    let k = x.len();
    assert_eq!(ws.len(), ys.len(), "one output per matrix");
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(w.len(), y.len() * k, "w is not [n, k]");
    }
    let total: usize = ws.iter().map(|w| w.len()).sum();
    let x16 = rounded::<W>(x);
    let x = Input::new(x, x16.as_deref());
    let threads = if total < 1 << 18 {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    if threads == 1 {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            rows(x, w, y);
        }
        return;
    }
    // Thread i's rows of matrix m: the i-th of `threads` runs of whole
    // groups of ROWS.
    let share = |n: usize, i: usize| {
        let per = n.div_ceil(threads).div_ceil(ROWS) * ROWS;
        (i * per).min(n)..((i + 1) * per).min(n)
    };
    let parts: Vec<Vec<Vec<f32>>> = (0..threads)
        .into_par_iter()
        .map(|i| {
            ws.iter()
                .map(|w| {
                    let r = share(w.len() / k, i);
                    let mut y = vec![0f32; r.len()];
                    rows(x, &w[r.start * k..r.end * k], &mut y);
                    y
                })
                .collect()
        })
        .collect();
    for (i, part) in parts.iter().enumerate() {
        for (y, p) in ys.iter_mut().zip(part) {
            let n = y.len();
            y[share(n, i)].copy_from_slice(p);
        }
    }
}

/// One expert chosen for a token: its projections in the hub layout
/// (`gate`, `up`: `[inter, hidden]`; `down`: `[hidden, inter]`) and its
/// routing weight.
pub struct TokenExpert<'a, W> {
    /// Gate projection rows.
    pub gate: &'a [W],
    /// Up projection rows.
    pub up: &'a [W],
    /// Down projection rows.
    pub down: &'a [W],
    /// The routing weight that scales its output.
    pub weight: f32,
}

/// `out += Σₑ wₑ · downₑ · (act(gateₑ·x) ⊙ (upₑ·x))` for one token `x` over
/// its chosen experts (in the order given, which sets the order of the sum).
///
/// Two passes over the cores instead of two per expert: the gate and up rows
/// of every chosen expert, cut into one contiguous range per thread, then
/// the output rows, each thread reading its rows of every expert's down
/// projection and summing the weighted products before the single add into
/// `out`. Each dot product is the one [`matvec`] computes, so the result
/// equals expert-by-expert `matvec`s added in the same order.
pub fn experts_one_token<W: WeightElem>(
    x: &[f32],
    experts: &[TokenExpert<'_, W>],
    inter: usize,
    act: super::expert_gemm::Activation,
    out: &mut [f32],
) {
    let (hidden, k) = (x.len(), experts.len());
    assert_eq!(out.len(), hidden, "out is not [hidden]");
    for e in experts {
        assert_eq!(e.gate.len(), inter * hidden, "gate is not [inter, hidden]");
        assert_eq!(e.up.len(), inter * hidden, "up is not [inter, hidden]");
        assert_eq!(e.down.len(), hidden * inter, "down is not [hidden, inter]");
    }
    if k == 0 || inter == 0 || hidden == 0 {
        return;
    }
    let x16 = rounded::<W>(x);
    let xin = Input::new(x, x16.as_deref());
    let bytes_per_row = 3 * k * hidden;
    let threads = if bytes_per_row * inter < 1 << 18 {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    // Every thread reads one row range of each matrix front to back: the
    // same range of every chosen expert's gate and up rows in pass 1, its
    // range of every down projection in pass 2.
    let ranges = |n: usize| -> Vec<std::ops::Range<usize>> {
        let per = n.div_ceil(threads).div_ceil(ROWS) * ROWS;
        (0..n.div_ceil(per))
            .map(|i| i * per..((i + 1) * per).min(n))
            .collect()
    };
    let sweep = |v: Input,
                 w: &[W],
                 cols: usize,
                 rows: std::ops::Range<usize>,
                 f: &mut dyn FnMut(usize, f32)| {
        let mut j = rows.start;
        while j < rows.end {
            let c = (rows.end - j).min(ROWS);
            let s = dot_rows(v, &row_ptrs(w, cols, j, c), cols);
            for (r, &v) in s.iter().enumerate().take(c) {
                f(j + r, v);
            }
            j += c;
        }
    };
    // Pass 1: h[e·inter + j] = act(gate_e[j]·x) · (up_e[j]·x).
    let first = |rows: std::ops::Range<usize>| -> Vec<f32> {
        let (lo, len) = (rows.start, rows.len());
        let mut hs = vec![0f32; k * len];
        for (e, ex) in experts.iter().enumerate() {
            let he = &mut hs[e * len..(e + 1) * len];
            sweep(xin, ex.gate, hidden, rows.clone(), &mut |j, g| {
                he[j - lo] = act.apply(g)
            });
            sweep(xin, ex.up, hidden, rows.clone(), &mut |j, u| {
                he[j - lo] *= u
            });
        }
        hs
    };
    let parts: Vec<(std::ops::Range<usize>, Vec<f32>)> = if threads == 1 {
        vec![(0..inter, first(0..inter))]
    } else {
        ranges(inter)
            .into_par_iter()
            .map(|r| (r.clone(), first(r)))
            .collect()
    };
    let mut h = vec![0f32; k * inter];
    for (rows, hs) in &parts {
        for e in 0..k {
            h[e * inter + rows.start..e * inter + rows.end]
                .copy_from_slice(&hs[e * rows.len()..(e + 1) * rows.len()]);
        }
    }
    // Pass 2: out[j] += Σₑ wₑ · (down_e[j]·hₑ), the sum over the experts
    // made before the single add into `out`.
    let h16 = rounded::<W>(&h);
    let second = |lo: usize, os: &mut [f32]| {
        let mut acc = vec![0f32; os.len()];
        for (e, ex) in experts.iter().enumerate() {
            let span = e * inter..(e + 1) * inter;
            let he = Input::new(&h[span.clone()], h16.as_deref().map(|v| &v[span]));
            let wgt = ex.weight;
            sweep(he, ex.down, inter, lo..lo + os.len(), &mut |j, v| {
                acc[j - lo] += wgt * v
            });
        }
        for (o, a) in os.iter_mut().zip(&acc) {
            *o += a;
        }
    };
    if threads == 1 {
        second(0, out);
    } else {
        let per = hidden.div_ceil(threads).div_ceil(ROWS) * ROWS;
        out.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, os)| second(i * per, os));
    }
}

/// Pointers to rows `j..j + c` of `w` (`[_, k]`, `c` in `1..=ROWS`); a short
/// group repeats its last row (only the first `c` results are used).
fn row_ptrs<W>(w: &[W], k: usize, j: usize, c: usize) -> [*const W; ROWS] {
    assert!(
        (1..=ROWS).contains(&c) && (j + c) * k <= w.len(),
        "rows outside w"
    );
    std::array::from_fn(|r| w[(j + r.min(c - 1)) * k..].as_ptr())
}

/// The vector a product reads: its f32 values and, when the product runs
/// in [`Compute::Bf16`] mode (bf16 weights, a CPU with AVX-512 BF16), the
/// same values rounded to bf16 once, which the kernels then read instead.
#[derive(Clone, Copy)]
struct Input<'a> {
    f: &'a [f32],
    b16: Option<&'a [bf16]>,
}

impl<'a> Input<'a> {
    fn new(f: &'a [f32], b16: Option<&'a [bf16]>) -> Input<'a> {
        if let Some(b) = b16 {
            assert_eq!(b.len(), f.len(), "the bf16 copy is not the vector's length");
        }
        Input { f, b16 }
    }
}

/// `x` rounded to bf16 (round to nearest even, as the grouped kernels'
/// [`Compute::Bf16`] mode rounds its token rows) when products of weights
/// of type `W` started on this thread run in that mode: `W` is bf16, the
/// mode is set ([`current_compute`], read here on the calling thread) and
/// the CPU has AVX-512 BF16. `None`: the exact kernels.
fn rounded<W: WeightElem>(x: &[f32]) -> Option<Vec<bf16>> {
    (TypeId::of::<W>() == TypeId::of::<bf16>()
        && current_compute() == Compute::Bf16
        && Compute::bf16_supported())
    .then(|| x.iter().map(|&v| bf16::from_f32(v)).collect())
}

/// `p` as a bf16 pointer; `W` must be bf16 (checked).
fn bf16_ptr<W: WeightElem>(p: *const W) -> *const bf16 {
    assert!(
        TypeId::of::<W>() == TypeId::of::<bf16>(),
        "not bf16 weights"
    );
    p as *const bf16
}

/// The dot products of `x` (`k` values) with the eight rows at `wp`, with
/// the widest kernel the CPU has.
fn dot_rows<W: WeightElem>(x: Input, wp: &[*const W; ROWS], k: usize) -> [f32; ROWS] {
    debug_assert_eq!(x.f.len(), k);
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(x16) = x.b16 {
            // `rounded` gave a bf16 copy: W is bf16 and the CPU has
            // AVX-512F and AVX-512 BF16.
            return std::array::from_fn(|r| {
                // SAFETY: as checked by `rounded`; every pointer comes from
                // `row_ptrs`, which checked that its row holds k values.
                unsafe { dot1_dpbf16(x16.as_ptr(), bf16_ptr(wp[r]), k) }
            });
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked); every pointer comes
            // from `row_ptrs`, which checked that its row holds k values.
            return unsafe { dot8_avx512(x.f.as_ptr(), wp, k) };
        }
    }
    std::array::from_fn(|r| {
        // SAFETY: as above, every row holds k values.
        let row = unsafe { std::slice::from_raw_parts(wp[r], k) };
        row.iter()
            .zip(x.f)
            .fold(0f32, |s, (&a, &b)| b.mul_add(a.to_f32(), s))
    })
}

/// `y[j] = w[j]·x` for the rows of `w` (`[y.len(), x.len()]`), with the widest
/// kernel the CPU has.
fn rows<W: WeightElem>(x: Input, w: &[W], y: &mut [f32]) {
    let k = x.f.len();
    assert_eq!(w.len(), y.len() * k, "w is not [y.len(), x.len()]");
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(x16) = x.b16 {
            for (j, out) in y.iter_mut().enumerate() {
                // SAFETY: `rounded` gave a bf16 copy, so W is bf16 and the
                // CPU has AVX-512F and AVX-512 BF16; row j holds k values
                // (asserted above).
                *out = unsafe { dot1_dpbf16(x16.as_ptr(), bf16_ptr(w[j * k..].as_ptr()), k) };
            }
            return;
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked); `w` holds y.len() rows of
            // x.len() values (asserted above).
            unsafe { rows_avx512(x.f, w, y) };
            return;
        }
    }
    rows_portable(x.f, w, y);
}

/// The [`Compute::Bf16`] dot product of the rounded vector `x` with one
/// bf16 weight row (`k` values): `vdpbf16ps` over blocks of 32, two
/// accumulators, the tail in f32 (as the grouped kernels' bf16 tile).
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16; `x` and `w` must hold `k`
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot1_dpbf16(x: *const bf16, w: *const bf16, k: usize) -> f32 {
    use std::arch::x86_64::{
        __m512bh, __m512i, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_si512,
        _mm512_reduce_add_ps, _mm512_setzero_ps,
    };
    #[inline(always)]
    unsafe fn ld(p: *const bf16) -> __m512bh {
        // SAFETY: the caller's contract (32 readable values); __m512bh is
        // 32 bf16 in a 512-bit register, the bits as stored.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i)) }
    }
    let z = _mm512_setzero_ps();
    let (mut a, mut b) = (z, z);
    let mut q = 0;
    // Every load below reads within the k values of x and w (loop bounds).
    while q + 64 <= k {
        // SAFETY: the loop bound keeps every load inside the k values.
        unsafe {
            a = _mm512_dpbf16_ps(a, ld(x.add(q)), ld(w.add(q)));
            b = _mm512_dpbf16_ps(b, ld(x.add(q + 32)), ld(w.add(q + 32)));
        }
        q += 64;
    }
    while q + 32 <= k {
        // SAFETY: the loop bound keeps every load inside the k values.
        unsafe {
            a = _mm512_dpbf16_ps(a, ld(x.add(q)), ld(w.add(q)));
        }
        q += 32;
    }
    let mut v = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    while q < k {
        // SAFETY: q < k.
        v = unsafe { (*x.add(q)).to_f32().mul_add((*w.add(q)).to_f32(), v) };
        q += 1;
    }
    v
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
    assert_eq!(w.len(), y.len() * k, "w is not [y.len(), x.len()]");
    for (j, out) in y.iter_mut().enumerate() {
        // SAFETY: the CPU has AVX-512F (the caller's contract); row j holds
        // k values (asserted above).
        *out = unsafe { dot1_avx512(x.as_ptr(), w[j * k..].as_ptr(), k) };
    }
}

/// The dot products of `x` with eight weight rows (`k` values each), row
/// after row: each row is one sequential read stream (the rows a thread is
/// given are contiguous, so its whole range is read front to back), which
/// the hardware prefetcher follows at the core's full read rate. Eight rows
/// read at once in interleaved columns were measured 35% slower (17.7 vs
/// 26.6 GB/s on two Zen 4 cores, a [32000, 1024] bf16 matrix).
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
    // SAFETY: the caller's contract, row by row.
    std::array::from_fn(|r| unsafe { dot1_avx512(xp, wp[r], k) })
}

/// The dot product of `x` with one weight row (`k` values), four
/// independent accumulators over blocks of 64 values.
///
/// # Safety
/// The CPU must have AVX-512F; `x` and `w` must hold `k` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot1_avx512<W: WeightElem>(xp: *const f32, w: *const W, k: usize) -> f32 {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    let (mut a, mut b, mut c, mut d) = (z, z, z, z);
    let mut q = 0;
    // Every load below reads within the k values of x and w (loop bounds).
    while q + 64 <= k {
        // SAFETY: the loop bound keeps every load inside the k values.
        unsafe {
            a = _mm512_fmadd_ps(W::load16(w.add(q)), _mm512_loadu_ps(xp.add(q)), a);
            b = _mm512_fmadd_ps(W::load16(w.add(q + 16)), _mm512_loadu_ps(xp.add(q + 16)), b);
            c = _mm512_fmadd_ps(W::load16(w.add(q + 32)), _mm512_loadu_ps(xp.add(q + 32)), c);
            d = _mm512_fmadd_ps(W::load16(w.add(q + 48)), _mm512_loadu_ps(xp.add(q + 48)), d);
        }
        q += 64;
    }
    while q + 16 <= k {
        // SAFETY: the loop bound keeps every load inside the k values.
        unsafe {
            a = _mm512_fmadd_ps(W::load16(w.add(q)), _mm512_loadu_ps(xp.add(q)), a);
        }
        q += 16;
    }
    let mut v = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
    while q < k {
        // SAFETY: q < k.
        v = unsafe { (*xp.add(q)).mul_add((*w.add(q)).to_f32(), v) };
        q += 1;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Reproducible values in [-0.5, 0.5) (a 64-bit LCG).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    /// Every row, every length (tails of 0–15, row counts not a multiple of
    /// eight, one and several threads) against an f64 dot product of the
    /// same widened values.
    #[test]
    fn matvec_equals_the_f64_product_of_the_stored_values() {
        let mut next = uniform(1);
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

    /// The fused experts of one token against an f64 computation of the
    /// same widened weights: one, two and three experts, widths that are
    /// not multiples of eight, thread ranges that cross from one expert to
    /// the next, and the add into a non-zero `out`.
    #[test]
    fn experts_of_one_token_equal_the_f64_sum_of_their_products() {
        use super::super::expert_gemm::Activation;
        let mut next = uniform(7);
        let mut compared = 0;
        let mut expected = 0;
        for (k, hidden, inter) in [(1, 16, 8), (2, 37, 13), (3, 256, 200), (2, 1024, 360)] {
            let x: Vec<f32> = (0..hidden).map(|_| next()).collect();
            let mats: Vec<[Vec<bf16>; 3]> = (0..k)
                .map(|_| {
                    std::array::from_fn(|_| {
                        (0..hidden * inter)
                            .map(|_| bf16::from_f32(next()))
                            .collect()
                    })
                })
                .collect();
            let weights: Vec<f32> = (0..k).map(|e| 0.3 + 0.2 * e as f32).collect();
            let list: Vec<TokenExpert<bf16>> = mats
                .iter()
                .zip(&weights)
                .map(|(m, &weight)| TokenExpert {
                    gate: &m[0],
                    up: &m[1],
                    down: &m[2],
                    weight,
                })
                .collect();
            let base: Vec<f32> = (0..hidden).map(|_| next()).collect();
            let mut out = base.clone();
            experts_one_token(&x, &list, inter, Activation::Silu, &mut out);
            let dot = |w: &[bf16], v: &[f64], row: usize, n: usize| -> f64 {
                (0..n).map(|p| w[row * n + p].to_f32() as f64 * v[p]).sum()
            };
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut want: Vec<f64> = base.iter().map(|&v| v as f64).collect();
            for (m, &w) in mats.iter().zip(&weights) {
                let h: Vec<f64> = (0..inter)
                    .map(|j| {
                        let g = dot(&m[0], &xd, j, hidden);
                        g / (1.0 + (-g).exp()) * dot(&m[1], &xd, j, hidden)
                    })
                    .collect();
                for (j, o) in want.iter_mut().enumerate() {
                    *o += w as f64 * dot(&m[2], &h, j, inter);
                }
            }
            for (j, (&got, &w)) in out.iter().zip(&want).enumerate() {
                assert!(got.is_finite(), "k={k} hidden={hidden} row {j}: {got}");
                let tol = 1e-5 * (inter as f64 * hidden as f64).sqrt();
                assert!(
                    (got as f64 - w).abs() <= tol,
                    "k={k} hidden={hidden} inter={inter} row {j}: {got} vs {w}"
                );
                compared += 1;
            }
            expected += hidden;
        }
        assert_eq!(compared, expected);
        assert_eq!(compared, 16 + 37 + 256 + 1024);
    }

    /// Several matrices in one pass equal one `matvec` each, for sizes
    /// below and above the threading threshold and row counts that do not
    /// split evenly; every output is compared.
    #[test]
    fn matvec_many_equals_one_matvec_per_matrix() {
        let mut next = uniform(3);
        let mut compared = 0;
        for (k, ns) in [
            (16, vec![8, 3, 5]),
            (1024, vec![1024, 512, 520]),
            (100, vec![4099]),
        ] {
            let x: Vec<f32> = (0..k).map(|_| next()).collect();
            let ws: Vec<Vec<bf16>> = ns
                .iter()
                .map(|&n| (0..n * k).map(|_| bf16::from_f32(next())).collect())
                .collect();
            let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; n]).collect();
            let wr: Vec<&[bf16]> = ws.iter().map(|w| w.as_slice()).collect();
            let mut yr: Vec<&mut [f32]> = outs.iter_mut().map(|y| y.as_mut_slice()).collect();
            matvec_many(&x, &wr, &mut yr);
            for ((w, y), &n) in ws.iter().zip(&outs).zip(&ns) {
                let mut want = vec![0f32; n];
                matvec(&x, w, n, &mut want);
                for (a, b) in y.iter().zip(&want) {
                    assert!(a.is_finite(), "k={k}: {a}");
                    assert_eq!(a, b, "k={k} n={n}");
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 16 + 2056 + 4099);
    }

    /// In [`Compute::Bf16`] mode (bf16 weights, a CPU with AVX-512 BF16)
    /// the single-token products read `x` rounded to bf16: `matvec`,
    /// `matvec_many` and the fused experts equal an f64 computation on the
    /// rounded vector, and differ from the exact products (so the mode is
    /// taken). f32 weights stay exact in the mode.
    #[test]
    fn bf16_mode_rounds_the_vector_of_bf16_weights_only() {
        use super::super::expert_gemm::{with_compute, Activation};
        if !Compute::bf16_supported() {
            eprintln!("no AVX-512 BF16 on this CPU: the mode is the exact kernels here");
            return;
        }
        let mut next = uniform(11);
        let (n, k) = (600, 1000);
        let x: Vec<f32> = (0..k).map(|_| next()).collect();
        let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(next())).collect();
        let xr: Vec<f64> = x
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32() as f64)
            .collect();
        let dot = |w: &[bf16], v: &[f64], row: usize, len: usize| -> f64 {
            (0..len)
                .map(|p| w[row * len + p].to_f32() as f64 * v[p])
                .sum()
        };
        let mut exact = vec![0f32; n];
        matvec(&x, &w, n, &mut exact);
        let mut y = vec![f32::NAN; n];
        let mut y2 = vec![f32::NAN; n];
        with_compute(Compute::Bf16, || {
            matvec(&x, &w, n, &mut y);
            matvec_many(&x, &[&w], &mut [&mut y2]);
        });
        let mut moved = 0f64;
        for j in 0..n {
            let want = dot(&w, &xr, j, k);
            assert!(y[j].is_finite());
            assert!(
                (y[j] as f64 - want).abs() <= 1e-4,
                "row {j}: {} vs {want}",
                y[j]
            );
            assert_eq!(y[j], y2[j], "row {j}");
            moved = moved.max((y[j] - exact[j]).abs() as f64);
        }
        assert!(
            moved > 1e-4,
            "the bf16 mode left every product exact ({moved})"
        );
        // f32 weights: exact in the mode.
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        matvec(&x, &wf, n, &mut a);
        with_compute(Compute::Bf16, || matvec(&x, &wf, n, &mut b));
        assert_eq!(a, b);
        // The fused experts: x rounded for gate/up, h rounded for down.
        let (hidden, inter) = (256, 200);
        let mats: Vec<Vec<bf16>> = (0..3)
            .map(|_| {
                (0..hidden * inter)
                    .map(|_| bf16::from_f32(next()))
                    .collect()
            })
            .collect();
        let xs: Vec<f32> = (0..hidden).map(|_| next()).collect();
        let list = [TokenExpert {
            gate: &mats[0][..],
            up: &mats[1][..],
            down: &mats[2][..],
            weight: 0.75,
        }];
        let mut out = vec![0f32; hidden];
        with_compute(Compute::Bf16, || {
            experts_one_token(&xs, &list, inter, Activation::Silu, &mut out)
        });
        let r = |v: f64| bf16::from_f32(v as f32).to_f32() as f64;
        let xd: Vec<f64> = xs.iter().map(|&v| r(v as f64)).collect();
        let h: Vec<f64> = (0..inter)
            .map(|j| {
                let g = dot(&mats[0], &xd, j, hidden) as f32;
                let u = dot(&mats[1], &xd, j, hidden) as f32;
                r((Activation::Silu.apply(g) * u) as f64)
            })
            .collect();
        let mut compared = 0;
        for (j, &o) in out.iter().enumerate() {
            let want = 0.75 * dot(&mats[2], &h, j, inter);
            assert!(o.is_finite());
            assert!((o as f64 - want).abs() <= 2e-3, "row {j}: {o} vs {want}");
            compared += 1;
        }
        assert_eq!(compared, hidden);
    }
}
