//! The expert matrix products of the grouped MoE dispatch on the CPU, for
//! the few tokens routed to one expert, against the weights in the
//! checkpoint's own layout `[out, in]` (rows contiguous along the reduction
//! axis).
//!
//! A general GEMM gathers the expert's tokens into a matrix, packs the
//! weight into panels, multiplies, and leaves the result for a scatter.
//! With the 1–64 tokens an expert sees per layer, those copies move about
//! as many bytes as the product reads. Here nothing is copied: register
//! tiles of up to 4 tokens × 4 weight rows take dot products along the
//! reduction axis straight from the token rows (addressed through the
//! routing's token indices) and the weight rows (AVX-512F with 16 lanes, or
//! AVX2+FMA with 8, checked at run time; a portable loop otherwise), the
//! rows of the weight are split across the cores, and the tile's results
//! go straight where they belong:
//!
//! - [`gate_up`]: `act(x·Gᵀ) ⊙ (x·Uᵀ)`, gate and up rows side by side in one
//!   tile, so each token row is read once for both and the activation is
//!   applied in registers;
//! - [`down_scatter_add`]: `out[token] += weight · (h·Dᵀ)`, the routing
//!   weight and the scatter into the layer output applied as the tile ends.
//!
//! Each weight element is loaded from memory once per call: the product is
//! memory-bound for a single token and compute-bound from a few tokens on.

use half::{bf16, f16};
use rayon::prelude::*;

/// A weight element the kernels read as stored: f32, or bf16/f16 widened
/// to f32 in registers (exactly: every bf16 and f16 value is an f32 value),
/// so the products and their summation order are those of the f32 kernel
/// on the converted weights, at half the bytes read per weight.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// Whether the AVX2 kernel needs F16C to widen this type.
    const NEEDS_F16C: bool;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
    /// 16 values from `p` widened to f32.
    ///
    /// # Safety
    /// `p` must point to 16 readable values; the CPU must have AVX-512F
    /// (the caller is compiled with it, so this is inlined there).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 values from `p` widened to f32.
    ///
    /// # Safety
    /// `p` must point to 8 readable values; the CPU must have AVX2 (and F16C
    /// when [`WeightElem::NEEDS_F16C`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    const NEEDS_F16C: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract (16 values, AVX-512F).
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract (8 values, AVX).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl WeightElem for bf16 {
    const NEEDS_F16C: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 values = 32 bytes, AVX-512F):
        // zero-extend each 16-bit word and move it to the f32's high half.
        unsafe {
            let w = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(w)))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (8 values = 16 bytes, AVX2).
        unsafe {
            let w = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w)))
        }
    }
}

impl WeightElem for f16 {
    const NEEDS_F16C: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 values = 32 bytes, AVX-512F,
        // whose `vcvtph2ps` converts every f16 exactly).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (8 values = 16 bytes, AVX2 and F16C).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// How the CPU matrix products on bf16 weights treat the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    /// f32 activations against the bf16 weights widened to f32, f32 FMA:
    /// the products and their order are those of the f32 kernel on the
    /// converted weights (every forward reference holds at its f32
    /// tolerance). The default.
    #[default]
    Exact,
    /// Activations rounded to bf16 (round to nearest even) and multiplied
    /// with the bf16 weights by AVX-512 BF16 `vdpbf16ps` (pairs of bf16
    /// products summed into f32 lanes), as llama.cpp computes a bf16
    /// model on the CPU: twice the multiply throughput of f32 FMA, at the
    /// cost of the activations' rounding (a relative error up to 2⁻⁹ per
    /// activation, ~3 significant digits). Opt-in; applies to bf16
    /// weights on a CPU with `avx512bf16` (checked at run time), every
    /// other product stays [`Compute::Exact`].
    Bf16,
}

impl Compute {
    /// Parses `exact` or `bf16` (`--compute`).
    pub fn parse(s: &str) -> Option<Compute> {
        match s {
            "exact" | "f32" => Some(Compute::Exact),
            "bf16" => Some(Compute::Bf16),
            _ => None,
        }
    }

    /// Whether this CPU runs [`Compute::Bf16`] (AVX-512F and AVX-512 BF16).
    pub fn bf16_supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

thread_local! {
    static COMPUTE: std::cell::Cell<Compute> = const { std::cell::Cell::new(Compute::Exact) };
}

/// Runs `f` with the products started on this thread in mode `c` (read
/// when a product starts, on the calling thread; the cores it splits the
/// product across follow it). Restores the previous mode after.
pub fn with_compute<T>(c: Compute, f: impl FnOnce() -> T) -> T {
    struct Restore(Compute);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPUTE.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(COMPUTE.with(|m| m.replace(c)));
    f()
}

/// The mode products started on this thread use ([`with_compute`]).
pub fn current_compute() -> Compute {
    COMPUTE.with(|m| m.get())
}

/// Weight rows per register tile.
const C: usize = 4;
/// Most tokens per register tile.
const R: usize = 4;

/// The expert's activation on the gate projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(x)` (every family but Grok-1).
    Silu,
    /// `x · Φ(x)` with the exact error function (Grok-1).
    GeluErf,
}

impl Activation {
    /// The activation as candle computes it on the CPU (same formula, same rounding).
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Silu => v / (1.0 + (-v).exp()),
            Activation::GeluErf => {
                (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                    * 0.5
                    * v
            }
        }
    }

    /// `g[i] ← act(g[i]) · u[i]`: SiLU sixteen at a time where the CPU
    /// has AVX-512F (`silu_gated_avx512`, within 2 ulp of
    /// [`Activation::apply`] before the product), [`Activation::apply`] on
    /// each value otherwise; long slices split across the pool.
    pub fn apply_gated(self, g: &mut [f32], u: &[f32]) {
        assert_eq!(g.len(), u.len(), "gate and up values differ in length");
        const PER: usize = 1 << 14;
        let run = |g: &mut [f32], u: &[f32]| {
            #[cfg(target_arch = "x86_64")]
            if self == Activation::Silu && std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked).
                unsafe { silu_gated_avx512(g, u) };
                return;
            }
            for (g, &u) in g.iter_mut().zip(u) {
                *g = self.apply(*g) * u;
            }
        };
        if g.len() <= PER {
            run(g, u);
        } else {
            g.par_chunks_mut(PER)
                .zip(u.par_chunks(PER))
                .for_each(|(g, u)| run(g, u));
        }
    }
}

/// `e^x` on 16 lanes: Cody–Waite range reduction and Cephes' degree-7
/// `expf` polynomial (within 1–2 ulp of the correctly rounded exponential),
/// scaled by `vscalefps`, so that large arguments overflow to infinity and
/// small ones underflow to zero as `expf` does. NaN stays NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let s = _mm512_set1_ps;
    // x within [-104, 89] (beyond them e^x is 0 or ∞ in f32 either way);
    // `max`/`min` return their second operand when one is NaN, so NaN passes.
    let x = _mm512_min_ps(s(89.0), _mm512_max_ps(s(-104.0), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        s(std::f32::consts::LOG2_E),
    ));
    // r = x - n ln 2, ln 2 in two parts (the first exact in n's bits).
    let r = _mm512_fnmadd_ps(n, s(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, s(-2.121_944_4e-4), r);
    let mut p = s(1.987_569_1e-4);
    // Cephes' last coefficient, 5.0000001201e-1, is 0.5 in f32.
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, s(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), s(1.0));
    _mm512_scalef_ps(e, n)
}

/// `g ← g / (1 + e^-g) · u`, sixteen at a time, `e^-g` by [`exp_avx512`]
/// (candle's scalar [`Activation::apply`] uses libm's `expf`).
///
/// # Safety
/// The CPU must have AVX-512F; `u` is as long as `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_gated_avx512(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    for (g, u) in g.chunks_mut(16).zip(u.chunks(16)) {
        let mask: __mmask16 = if g.len() == 16 { !0 } else { (1u16 << g.len()) - 1 };
        // SAFETY: the mask covers g.len() = u.len() ≤ 16 values of each.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, g.as_ptr());
            let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v));
            let y = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            let y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mask, u.as_ptr()));
            _mm512_mask_storeu_ps(g.as_mut_ptr(), mask, y);
        }
    }
}

/// `y = x · Wᵀ`: `x` is `[m, k]`, `w` is `[n, k]`, `y` is `[m, n]`, all
/// row-major and contiguous.
pub fn matmul_xwt<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, y: &mut [f32]) {
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    matmul_xwt_many(x, m, k, &[w], &mut [y]);
}

/// [`matmul_xwt`] of one `x` (`[m, k]`) with several weights `ws[i]`
/// (`[nᵢ, k]`) into `ys[i]` (`[m, nᵢ]`), in one pass over the cores (the
/// query, key and value projections of a layer): the same results as one
/// product after another.
pub fn matmul_xwt_many<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[&[W]],
    ys: &mut [&mut [f32]],
) {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(ws.len(), ys.len(), "one output per weight");
    let ns: Vec<usize> = ws
        .iter()
        .zip(ys.iter())
        .map(|(w, y)| {
            let n = w.len().checked_div(k).unwrap_or(0);
            assert_eq!(w.len(), n * k, "w is not [n, k]");
            assert_eq!(y.len(), m * n, "y is not [m, n]");
            n
        })
        .collect();
    let xr: Vec<Ptr> = (0..m).map(|i| Ptr(x[i * k..].as_ptr())).collect();
    let w_rows: Vec<WRow<'_, W>> = ws
        .iter()
        .map(|&w| Box::new(move |j: usize| w[j * k..].as_ptr()) as WRow<'_, W>)
        .collect();
    let sinks: Vec<Box<Sink<'_>>> = ys
        .iter_mut()
        .zip(&ns)
        .map(|(y, &n)| {
            let out = Out(y.as_mut_ptr());
            Box::new(move |i0: usize, r: usize, j0: usize, c: usize, s: &[[f32; C]; R]| {
                for (a, row) in s.iter().enumerate().take(r) {
                    for (b, &v) in row.iter().enumerate().take(c) {
                        // SAFETY: i0 + a < m, j0 + b < n: inside y, written
                        // by the one chunk holding column j0 + b.
                        unsafe { *out.at((i0 + a) * n + j0 + b) = v };
                    }
                }
            }) as Box<Sink<'_>>
        })
        .collect();
    let jobs: Vec<_> = (0..ws.len())
        .map(|i| {
            (
                xr.as_slice(),
                k,
                ns[i],
                &*w_rows[i] as &(dyn Fn(usize) -> *const W + Sync),
                &*sinks[i] as &Sink<'_>,
            )
        })
        .collect();
    // SAFETY: rows of x and of every w hold k values (lengths asserted
    // above); each sink writes its own y, borrowed mutably for the call.
    unsafe { products(&jobs, false) };
}

/// `y = x · Wᵀ` for bf16 `x` (`[m, k]`) and bf16 `w` (`[n, k]`), `y`
/// `[m, n]`: every product exact (`vdpbf16ps` multiplies bf16 pairs into
/// f32 without rounding), the sums in f32, as the [`Compute::Bf16`] tile
/// computes them, here on values that need no rounding (bf16 subnormals,
/// below 1.2e-38, count as zero), in a packed GEMM
/// (`super::packed_bf16`). Returns `false`, leaving `y` untouched, on a CPU without AVX-512
/// BF16.
pub fn matmul_bf16_xwt(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, y: &mut [f32]) -> bool {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(y.len(), m * n, "y is not [m, n]");
    if !Compute::bf16_supported() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked).
        unsafe { super::packed_bf16::xwt(x, m, k, w, n, y) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        unreachable!("bf16_supported is false off x86_64")
    }
}

/// An expert's gate and up projections, `[inter, k]` each, and its activation.
#[derive(Clone, Copy)]
pub struct GateUp<'a, W: WeightElem = f32> {
    /// Gate projection, row-major.
    pub gate: &'a [W],
    /// Up projection, row-major.
    pub up: &'a [W],
    /// Intermediate size.
    pub inter: usize,
    /// The activation function.
    pub act: Activation,
}

/// The expert's hidden activations for the tokens `rows` of `x`
/// (`[tokens, k]`): `h[i] = act(x[rows[i]]·Gᵀ) ⊙ (x[rows[i]]·Uᵀ)`, `h` is
/// `[rows.len(), inter]`.
pub fn gate_up<W: WeightElem>(x: &[f32], k: usize, rows: &[u32], w: GateUp<'_, W>, h: &mut [f32]) {
    let GateUp {
        gate,
        up,
        inter,
        act,
    } = w;
    assert_eq!(gate.len(), inter * k, "gate is not [inter, k]");
    assert_eq!(up.len(), inter * k, "up is not [inter, k]");
    assert_eq!(h.len(), rows.len() * inter, "h is not [rows, inter]");
    let xr = gathered(x, k, rows);
    // The up projections, until the activation pass multiplies them in.
    let mut u = vec![0f32; h.len()];
    let (w_row, sink) = gate_up_parts(w, k, Out(h.as_mut_ptr()), Out(u.as_mut_ptr()));
    // SAFETY: token rows are checked by `gathered`, weight rows hold k values
    // (lengths asserted above); h and u hold rows.len() × inter values,
    // borrowed mutably for the whole call.
    unsafe { product(&xr, k, 2 * inter, &*w_row, &*sink) };
    // The activation over whole rows (sixteen lanes at a time), not per
    // tile: per tile it took 5% of a prefill, as the scalar one had.
    act.apply_gated(h, &u);
}

/// Adds the expert's output for its tokens into the layer output:
/// `out[rows[i]] += scale[i] · (h[i]·Dᵀ)`; `h` is `[rows.len(), inter]`,
/// `down` is `[hidden, inter]`, `out` is `[tokens, hidden]`.
pub fn down_scatter_add<W: WeightElem>(
    h: &[f32],
    inter: usize,
    down: &[W],
    hidden: usize,
    rows: &[u32],
    scale: &[f32],
    out: &mut [f32],
) {
    assert_eq!(down.len(), hidden * inter, "down is not [hidden, inter]");
    assert_eq!(h.len(), rows.len() * inter, "h is not [rows, inter]");
    assert_eq!(scale.len(), rows.len(), "one scale per row");
    assert!(
        rows.iter().all(|&t| (t as usize + 1) * hidden <= out.len()),
        "a row index is outside the output"
    );
    let hr: Vec<Ptr> = (0..rows.len())
        .map(|i| Ptr(h[i * inter..].as_ptr()))
        .collect();
    let (w_row, sink) = down_parts(down, inter, hidden, rows, scale, Out(out.as_mut_ptr()));
    // SAFETY: rows of h and down hold `inter` values; output rows were
    // checked above, and `out` is borrowed mutably for the whole call.
    unsafe { product(&hr, inter, hidden, &*w_row, &*sink) };
}

/// A boxed weight-row lookup, for [`products`].
type WRow<'a, W> = Box<dyn Fn(usize) -> *const W + Sync + 'a>;

/// The weight rows and the sink of an expert's gate/up product. Column
/// 2j is gate row j, column 2j + 1 up row j: a tile of 4 columns holds two
/// (gate, up) pairs and a chunk of whole tiles never splits one. The sink
/// stores row i's gate values at `g[i · inter + j]`, its up values at
/// `u[i · inter + j]`: `g` and `u` must hold `rows × inter` values, and
/// nothing else may use them while the product runs.
fn gate_up_parts<'a, W: WeightElem>(
    w: GateUp<'a, W>,
    k: usize,
    g: Out,
    u: Out,
) -> (WRow<'a, W>, Box<Sink<'a>>) {
    let GateUp {
        gate, up, inter, ..
    } = w;
    let w_row = Box::new(move |c: usize| {
        let m = if c.is_multiple_of(2) { gate } else { up };
        m[(c / 2) * k..].as_ptr()
    });
    let sink = Box::new(move |i0: usize, r: usize, c0: usize, c: usize, s: &[[f32; C]; R]| {
        for (a, row) in s.iter().enumerate().take(r) {
            for b in (0..c).step_by(2) {
                let at = (i0 + a) * inter + (c0 + b) / 2;
                // SAFETY: i0 + a < rows and (c0 + b) / 2 < inter: inside g
                // and u (this function's contract), each element written by
                // the one chunk holding its column.
                unsafe {
                    *g.at(at) = row[b];
                    *u.at(at) = row[b + 1];
                }
            }
        }
    });
    (w_row, sink)
}

/// The weight rows and the sink of an expert's down product, adding
/// `scale[i] · (h[i]·Dᵀ)` into row `rows[i]` of `out` (`[_, hidden]`):
/// every `rows[i]` must be a row of `out`, and nothing else may use
/// `out` while the product runs but other such sinks, in the ordered
/// passes of [`products`] (a chunk's elements written by that chunk alone;
/// a token listed twice is added twice, in order, by the same chunk).
fn down_parts<'a, W: WeightElem>(
    down: &'a [W],
    inter: usize,
    hidden: usize,
    rows: &'a [u32],
    scale: &'a [f32],
    out: Out,
) -> (WRow<'a, W>, Box<Sink<'a>>) {
    let w_row = Box::new(move |j: usize| down[j * inter..].as_ptr());
    let sink = Box::new(move |i0: usize, r: usize, j0: usize, c: usize, s: &[[f32; C]; R]| {
        for (a, row) in s.iter().enumerate().take(r) {
            let (t, g) = (rows[i0 + a] as usize, scale[i0 + a]);
            for (b, &v) in row.iter().enumerate().take(c) {
                // SAFETY: row t of `out`, column j0 + b < hidden (this
                // function's contract), in this task's column chunk.
                unsafe { *out.at(t * hidden + j0 + b) += g * v };
            }
        }
    });
    (w_row, sink)
}

/// One routed expert of a layer, for [`routed_experts`]: its weights, the
/// token rows routed to it and their routing weights (`scale`, one per row).
#[derive(Clone, Copy)]
pub struct Routed<'a, W: WeightElem = f32> {
    /// Gate and up projections and the activation.
    pub gate_up: GateUp<'a, W>,
    /// Down projection `[hidden, inter]`, row-major.
    pub down: &'a [W],
    /// The token rows of `x` routed to the expert.
    pub rows: &'a [u32],
    /// The routing weight of each row.
    pub scale: &'a [f32],
}

/// A layer's routed experts added into `out` (`[tokens, hidden]`):
/// [`gate_up`] then [`down_scatter_add`] for each expert in the order
/// given, with the same results bit for bit, in two passes over the cores
/// instead of two per expert: the gate/up products of every expert in one
/// (their column chunks in any order), the activations of all, then the
/// down products in one, each task one column chunk of every expert in
/// turn (so each output element gets the experts' terms in the given order).
/// The hidden activations of all the experts are held at once
/// (`2 × rows × inter` f32 per expert).
pub fn routed_experts<W: WeightElem>(
    x: &[f32],
    k: usize,
    hidden: usize,
    experts: &[Routed<'_, W>],
    out: &mut [f32],
) {
    let live: Vec<&Routed<'_, W>> = experts.iter().filter(|e| !e.rows.is_empty()).collect();
    for e in &live {
        let inter = e.gate_up.inter;
        assert_eq!(e.gate_up.gate.len(), inter * k, "gate is not [inter, k]");
        assert_eq!(e.gate_up.up.len(), inter * k, "up is not [inter, k]");
        assert_eq!(e.down.len(), hidden * inter, "down is not [hidden, inter]");
        assert_eq!(e.scale.len(), e.rows.len(), "one scale per row");
        assert!(
            e.rows.iter().all(|&t| (t as usize + 1) * hidden <= out.len()),
            "a row index is outside the output"
        );
    }
    let xrs: Vec<Vec<Ptr>> = live.iter().map(|e| gathered(x, k, e.rows)).collect();
    let mut hs: Vec<Vec<f32>> = live
        .iter()
        .map(|e| vec![0f32; e.rows.len() * e.gate_up.inter])
        .collect();
    let mut us: Vec<Vec<f32>> = hs.iter().map(|h| vec![0f32; h.len()]).collect();
    {
        let (w_rows, sinks): (Vec<_>, Vec<_>) = live
            .iter()
            .zip(&mut hs)
            .zip(&mut us)
            .map(|((e, h), u)| gate_up_parts(e.gate_up, k, Out(h.as_mut_ptr()), Out(u.as_mut_ptr())))
            .unzip();
        let jobs: Vec<_> = live
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    xrs[i].as_slice(),
                    k,
                    2 * e.gate_up.inter,
                    &*w_rows[i] as &(dyn Fn(usize) -> *const W + Sync),
                    &*sinks[i] as &Sink<'_>,
                )
            })
            .collect();
        // SAFETY: token rows checked by `gathered`, weight rows hold k values
        // (asserted above); each sink writes its own expert's h and u, rows
        // < rows.len() and columns < inter, borrowed mutably until the block ends.
        unsafe { products(&jobs, false) };
    }
    hs.par_iter_mut()
        .zip(&us)
        .zip(&live)
        .for_each(|((h, u), e)| e.gate_up.act.apply_gated(h, u));
    drop(us);
    let hrs: Vec<Vec<Ptr>> = live
        .iter()
        .zip(&hs)
        .map(|(e, h)| {
            (0..e.rows.len())
                .map(|i| Ptr(h[i * e.gate_up.inter..].as_ptr()))
                .collect()
        })
        .collect();
    let dst = Out(out.as_mut_ptr());
    let (w_rows, sinks): (Vec<_>, Vec<_>) = live
        .iter()
        .map(|e| down_parts(e.down, e.gate_up.inter, hidden, e.rows, e.scale, dst))
        .unzip();
    let jobs: Vec<_> = live
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                hrs[i].as_slice(),
                e.gate_up.inter,
                hidden,
                &*w_rows[i] as &(dyn Fn(usize) -> *const W + Sync),
                &*sinks[i] as &Sink<'_>,
            )
        })
        .collect();
    // SAFETY: rows of h hold `inter` values, rows of down too (asserted);
    // output rows checked above; every product has n = hidden, so in the
    // ordered pass each output element is written by one task only, and
    // `out` is borrowed mutably for the whole call.
    unsafe { products(&jobs, true) };
}

/// Pointers to the rows `rows` of `x` (`[_, k]`), each checked to hold `k` values.
fn gathered(x: &[f32], k: usize, rows: &[u32]) -> Vec<Ptr> {
    rows.iter()
        .map(|&t| {
            let t = t as usize;
            assert!((t + 1) * k <= x.len(), "token row {t} is outside x");
            Ptr(x[t * k..].as_ptr())
        })
        .collect()
}

/// A row pointer shared by the column chunks (read only).
#[derive(Clone, Copy)]
struct Ptr(*const f32);

impl Ptr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *const f32 {
        self.0
    }
}
// SAFETY: the rows are only read while the borrow they come from lives.
unsafe impl Send for Ptr {}
// SAFETY: as for `Send`: shared, read-only access to live rows.
unsafe impl Sync for Ptr {}

/// The output, written by the column chunks, each its own columns (here
/// and in `super::packed_bf16`).
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: the chunks write disjoint elements (see `product`).
unsafe impl Send for Out {}
// SAFETY: as for `Send`: no element is written by two chunks.
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `i` must be inside the output and written by one chunk only.
    pub(super) unsafe fn at(self, i: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(i) }
    }
}

/// A finished tile: `(i0, r, j0, c, sums)`, `sums[a][b]` the dot product of
/// token row `i0 + a` (`a < r`) and weight row `j0 + b` (`b < c`).
type Sink<'a> = dyn Fn(usize, usize, usize, usize, &[[f32; C]; R]) + Sync + 'a;

/// Dot products of every token row `xr` with the `n` weight rows `w_row(j)`
/// (all `k` long), tile by tile into `sink`; the columns are split into
/// chunks of whole tiles across the cores.
///
/// # Safety
/// Every `xr[i]` and `w_row(j)`, `j < n`, must point to `k` readable f32.
unsafe fn product<W: WeightElem>(
    xr: &[Ptr],
    k: usize,
    n: usize,
    w_row: &(dyn Fn(usize) -> *const W + Sync),
    sink: &Sink<'_>,
) {
    if xr.is_empty() || n == 0 {
        return;
    }
    let threads = threads_for(xr.len(), k, n);
    // One token (decoding): bound by reading the weights, so the single-row
    // kernel of `matvec` (one sequential range per core).
    #[cfg(target_arch = "x86_64")]
    if is_single_row(xr.len()) {
        // SAFETY: the CPU has AVX-512F (checked); the caller's contract.
        unsafe { single_row(xr[0], k, n, threads, w_row, sink) };
        return;
    }
    let job = Job::new(xr, k, n, threads, w_row, sink);
    if job.chunks == 1 {
        // SAFETY: the caller's contract.
        unsafe { job.run(0) };
    } else {
        // SAFETY: the caller's contract.
        (0..job.chunks).into_par_iter().for_each(|c| unsafe { job.run(c) });
    }
}

/// How many cores a product of `m × k` by `k × n` is split across: small
/// products (a router on one token) run on the calling thread, where
/// handing them to the pool costs more than the arithmetic.
fn threads_for(m: usize, k: usize, n: usize) -> usize {
    if m.saturating_mul(n).saturating_mul(k) < 1 << 18 {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// Whether a product of `m` token rows takes [`single_row`]'s path.
#[cfg(target_arch = "x86_64")]
fn is_single_row(m: usize) -> bool {
    m == 1 && current_compute() == Compute::Exact && std::is_x86_feature_detected!("avx512f")
}

/// Column chunks per core in a product. The cores finish a pass together
/// to within one chunk: with 4 per core the 256-token prefill of the
/// scaled checkpoint took 317–324 ms (median of six runs, three rounds),
/// with 16 308–323 ms, 6 of 6 rounds no slower; 32 gave nothing more.
const CHUNKS_PER_THREAD: usize = 16;

/// One [`product`] split into column chunks of whole tiles (several per
/// core, so that uneven cores balance), each computed by [`Job::run`].
struct Job<'a, W: WeightElem> {
    xr: &'a [Ptr],
    k: usize,
    n: usize,
    per: usize,
    chunks: usize,
    w_row: &'a (dyn Fn(usize) -> *const W + Sync),
    sink: &'a Sink<'a>,
    /// Bf16 mode on bf16 weights: the token rows rounded to bf16 once.
    #[cfg(target_arch = "x86_64")]
    x16: Option<Vec<bf16>>,
}

impl<'a, W: WeightElem> Job<'a, W> {
    /// The chunks of a product of `xr` (not empty) with `n` (> 0) weight rows on `threads` cores.
    fn new(
        xr: &'a [Ptr],
        k: usize,
        n: usize,
        threads: usize,
        w_row: &'a (dyn Fn(usize) -> *const W + Sync),
        sink: &'a Sink<'a>,
    ) -> Self {
        let tiles = n.div_ceil(C);
        let per = if threads == 1 {
            n
        } else {
            tiles.div_ceil(threads * CHUNKS_PER_THREAD).max(1) * C
        };
        #[cfg(target_arch = "x86_64")]
        let x16: Option<Vec<bf16>> = (std::any::TypeId::of::<W>()
            == std::any::TypeId::of::<bf16>()
            && current_compute() == Compute::Bf16
            && Compute::bf16_supported())
        .then(|| {
            let mut v = Vec::with_capacity(xr.len() * k);
            for p in xr {
                // SAFETY: the caller's contract (k readable f32 per row).
                let row = unsafe { std::slice::from_raw_parts(p.0, k) };
                v.extend(row.iter().map(|&x| bf16::from_f32(x)));
            }
            v
        });
        Job {
            xr,
            k,
            n,
            per,
            chunks: n.div_ceil(per),
            w_row,
            sink,
            #[cfg(target_arch = "x86_64")]
            x16,
        }
    }

    /// Computes column chunk `chunk` (< `self.chunks`).
    ///
    /// # Safety
    /// As [`product`], for the job's rows, weights and sink.
    unsafe fn run(&self, chunk: usize) {
        let cols = chunk * self.per..((chunk + 1) * self.per).min(self.n);
        #[cfg(target_arch = "x86_64")]
        if let Some(x16) = &self.x16 {
            // W is bf16 (checked in `new`): the same pointers, retyped.
            let w16 = |j: usize| (self.w_row)(j) as *const bf16;
            // SAFETY: x16 holds xr.len() rows of k values; the caller's
            // contract for the weights and the sink; the CPU has
            // AVX-512F and AVX-512 BF16 (checked in `new`).
            unsafe { columns_dpbf16(x16, self.xr.len(), self.k, cols, &w16, self.sink) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { columns(self.xr, self.k, cols, self.w_row, self.sink) };
    }
}

/// Several [`product`]s in one pass over the cores (one join instead of
/// one per product). With `ordered`, the products share their sink's
/// output and must have the same `n`: each task runs one column chunk of
/// every product in turn, so every output element is written by one task,
/// products in the order given, as the products one after another would;
/// a one-token product ([`single_row`]'s kernel) ends a pass and runs
/// alone, keeping that order. Without `ordered`, the products write
/// disjoint outputs and their chunks run in any order.
///
/// # Safety
/// As [`product`], for each `(xr, k, n, w_row, sink)`.
#[allow(clippy::type_complexity)]
unsafe fn products<W: WeightElem>(
    jobs: &[(
        &[Ptr],
        usize,
        usize,
        &(dyn Fn(usize) -> *const W + Sync),
        &Sink<'_>,
    )],
    ordered: bool,
) {
    let threads = rayon::current_num_threads().max(1);
    let mut pending: Vec<Job<'_, W>> = Vec::new();
    let flush = |pending: &mut Vec<Job<'_, W>>| {
        if pending.is_empty() {
            return;
        }
        if ordered {
            let chunks = pending.iter().map(|j| j.chunks).max().unwrap_or(0);
            (0..chunks).into_par_iter().for_each(|c| {
                for j in pending.iter().filter(|j| c < j.chunks) {
                    // SAFETY: the caller's contract; chunk c of every
                    // product covers the same columns (same n, same plan).
                    unsafe { j.run(c) };
                }
            });
        } else {
            let tasks: Vec<(usize, usize)> = pending
                .iter()
                .enumerate()
                .flat_map(|(i, j)| (0..j.chunks).map(move |c| (i, c)))
                .collect();
            // SAFETY: the caller's contract (disjoint outputs).
            tasks
                .into_par_iter()
                .for_each(|(i, c)| unsafe { pending[i].run(c) });
        }
        pending.clear();
    };
    for &(xr, k, n, w_row, sink) in jobs {
        if xr.is_empty() || n == 0 {
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if is_single_row(xr.len()) {
            if ordered {
                flush(&mut pending);
            }
            // SAFETY: the caller's contract.
            unsafe { product(xr, k, n, w_row, sink) };
            continue;
        }
        pending.push(Job::new(xr, k, n, threads, w_row, sink));
    }
    flush(&mut pending);
}

/// [`product`] for one token row: the columns in one contiguous range per
/// thread, eight weight rows at a time through [`super::matvec::dot8_avx512`].
///
/// # Safety
/// As [`product`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
unsafe fn single_row<W: WeightElem>(
    x: Ptr,
    k: usize,
    n: usize,
    threads: usize,
    w_row: &(dyn Fn(usize) -> *const W + Sync),
    sink: &Sink<'_>,
) {
    use super::matvec::{dot8_avx512, ROWS};
    let per = n.div_ceil(threads).div_ceil(ROWS) * ROWS;
    let run = |chunk: usize| {
        let end = ((chunk + 1) * per).min(n);
        let mut j = chunk * per;
        while j < end {
            let c = (end - j).min(ROWS);
            // A short last group repeats its last row; only `c` are used.
            let wp: [*const W; ROWS] = std::array::from_fn(|r| w_row(j + r.min(c - 1)));
            // SAFETY: the caller's contract (k values per row); AVX-512F.
            let s = unsafe { dot8_avx512(x.get(), &wp, k) };
            for half in 0..ROWS.div_ceil(C) {
                let j0 = half * C;
                if j0 >= c {
                    break;
                }
                let mut tile = [[0f32; C]; R];
                tile[0].copy_from_slice(&s[j0..j0 + C]);
                sink(0, 1, j + j0, (c - j0).min(C), &tile);
            }
            j += c;
        }
    };
    let chunks = n.div_ceil(per);
    if chunks == 1 {
        run(0);
    } else {
        (0..chunks).into_par_iter().for_each(run);
    }
}

/// One column chunk, with the widest kernel the CPU has.
///
/// # Safety
/// As [`product`].
unsafe fn columns<W: WeightElem>(
    xr: &[Ptr],
    k: usize,
    cols: std::ops::Range<usize>,
    w_row: &(dyn Fn(usize) -> *const W + Sync),
    sink: &Sink<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked); the caller's contract.
            unsafe { columns_avx512(xr, k, cols, w_row, sink) };
            return;
        }
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked); the caller's contract.
            unsafe { columns_avx2(xr, k, cols, w_row, sink) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { columns_with(xr, k, cols, w_row, sink, tile_portable::<W, R>) };
}

/// A register-tile kernel: `R` token rows × [`C`] weight rows, `k` long.
type Tile<W> = unsafe fn(&[*const f32; R], usize, &[*const W; C], usize) -> [[f32; C]; R];

/// The tile loop: blocks of 4 weight rows outside (they stay in L1), token
/// tiles inside; a short last block (1–3 rows) repeats its last row and
/// hands only the real columns to `sink`.
///
/// # Safety
/// As [`product`]; `tile` must be safe to call on this CPU.
#[inline(always)]
unsafe fn columns_with<W: WeightElem>(
    xr: &[Ptr],
    k: usize,
    cols: std::ops::Range<usize>,
    w_row: &(dyn Fn(usize) -> *const W + Sync),
    sink: &Sink<'_>,
    tile: Tile<W>,
) {
    let m = xr.len();
    // The next block's weight rows are prefetched into L2 a share per
    // token tile, so that its first tile does not wait on memory (weights
    // are read once per pass, never cache-hot): 89 → 96–103 GFLOP/s on a
    // single core at k = 1024 and 64 tokens, no change at k = 3584.
    let row_lines = (k * std::mem::size_of::<W>()).div_ceil(64);
    let tiles = m.div_ceil(R);
    let mut j0 = cols.start;
    while j0 < cols.end {
        let c = (cols.end - j0).min(C);
        let wp: [*const W; C] = std::array::from_fn(|b| w_row(j0 + b.min(c - 1)));
        let next = j0 + c;
        let nc = cols.end.saturating_sub(next).min(C);
        let np: [*const W; C] = std::array::from_fn(|b| {
            if b < nc {
                w_row(next + b)
            } else {
                std::ptr::null()
            }
        });
        let lines = nc * row_lines;
        let per = lines.div_ceil(tiles);
        let mut line = 0;
        let mut i0 = 0;
        while i0 < m {
            let end = (line + per).min(lines);
            for l in line..end {
                prefetch_l2(np[l / row_lines].cast::<u8>().wrapping_add(l % row_lines * 64));
            }
            line = end;
            let r = (m - i0).min(R);
            let xp: [*const f32; R] = std::array::from_fn(|a| xr[i0 + a.min(r - 1)].0);
            // SAFETY: every pointer is a valid row (the caller's contract);
            // rows repeated to fill the tile are computed and not used.
            let sums = unsafe { tile(&xp, r, &wp, k) };
            sink(i0, r, j0, c, &sums);
            i0 += r;
        }
        j0 += c;
    }
}

/// A hint to bring the cache line of `p` into L2 (nothing off x86_64);
/// never faults, whatever `p`.
#[inline(always)]
fn prefetch_l2(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing architecturally and
    // does not fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns_avx512<W: WeightElem>(
    xr: &[Ptr],
    k: usize,
    cols: std::ops::Range<usize>,
    w_row: &(dyn Fn(usize) -> *const W + Sync),
    sink: &Sink<'_>,
) {
    // SAFETY: the caller's contract; this CPU has AVX-512F.
    unsafe { columns_with(xr, k, cols, w_row, sink, tile_avx512::<W>) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<W: WeightElem>(
    xr: &[Ptr],
    k: usize,
    cols: std::ops::Range<usize>,
    w_row: &(dyn Fn(usize) -> *const W + Sync),
    sink: &Sink<'_>,
) {
    // SAFETY: the caller's contract; this CPU has AVX2, FMA and F16C.
    unsafe { columns_with(xr, k, cols, w_row, sink, tile_avx2::<W>) };
}

/// The scalar tail of a tile (`q` from `from` to `k`) added to its sums.
///
/// # Safety
/// The pointers must hold `k` f32.
#[inline(always)]
unsafe fn tail<W: WeightElem>(
    xp: &[*const f32; R],
    r: usize,
    wp: &[*const W; C],
    from: usize,
    k: usize,
    out: &mut [[f32; C]; R],
) {
    for (a, row) in out.iter_mut().enumerate().take(r) {
        for (b, s) in row.iter_mut().enumerate() {
            for q in from..k {
                // SAFETY: q < k.
                *s = unsafe { (*xp[a].add(q)).mul_add((*wp[b].add(q)).to_f32(), *s) };
            }
        }
    }
}

/// The AVX-512 tile: 16 lanes, up to 16 accumulators (8 loads per 16
/// FMAs); a tile of fewer token rows (`r < 4`, a single token in decode)
/// runs a kernel of that many rows rather than repeating one.
///
/// # Safety
/// The CPU must have AVX-512F; the pointers must hold `k` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<W: WeightElem>(
    xp: &[*const f32; R],
    r: usize,
    wp: &[*const W; C],
    k: usize,
) -> [[f32; C]; R] {
    // SAFETY: the caller's contract.
    unsafe {
        match r {
            1 => tile_avx512_rows::<W, 1>(xp, r, wp, k),
            2 => tile_avx512_rows::<W, 2>(xp, r, wp, k),
            3 => tile_avx512_rows::<W, 3>(xp, r, wp, k),
            _ => tile_avx512_full(xp, wp, k),
        }
    }
}

/// [`tile_avx512`] on a full 4 × 4 tile, its 16 accumulators named one by
/// one: held in an array, LLVM keeps one of them on the stack (a store and
/// a reload in the loop's critical path; 64% of the FMA peak instead of
/// ~95%). The loop is fragile: the same loop as a separate
/// (`#[inline(never)]`) function, or with a software-prefetch branch for
/// the next block, measured 105-130 GFLOP/s instead of ~188 on the 2-core
/// Zen 4 machine; check `examples/expert_gemm_probe.rs` after touching it.
///
/// # Safety
/// As [`tile_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512_full<W: WeightElem>(
    xp: &[*const f32; R],
    wp: &[*const W; C],
    k: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    let (mut s00, mut s01, mut s02, mut s03) = (z, z, z, z);
    let (mut s10, mut s11, mut s12, mut s13) = (z, z, z, z);
    let (mut s20, mut s21, mut s22, mut s23) = (z, z, z, z);
    let (mut s30, mut s31, mut s32, mut s33) = (z, z, z, z);
    let full = k / 16 * 16;
    let mut p = 0;
    while p < full {
        // SAFETY: p + 16 <= k.
        unsafe {
            let w0 = W::load16(wp[0].add(p));
            let w1 = W::load16(wp[1].add(p));
            let w2 = W::load16(wp[2].add(p));
            let w3 = W::load16(wp[3].add(p));
            let x = _mm512_loadu_ps(xp[0].add(p));
            s00 = _mm512_fmadd_ps(x, w0, s00);
            s01 = _mm512_fmadd_ps(x, w1, s01);
            s02 = _mm512_fmadd_ps(x, w2, s02);
            s03 = _mm512_fmadd_ps(x, w3, s03);
            let x = _mm512_loadu_ps(xp[1].add(p));
            s10 = _mm512_fmadd_ps(x, w0, s10);
            s11 = _mm512_fmadd_ps(x, w1, s11);
            s12 = _mm512_fmadd_ps(x, w2, s12);
            s13 = _mm512_fmadd_ps(x, w3, s13);
            let x = _mm512_loadu_ps(xp[2].add(p));
            s20 = _mm512_fmadd_ps(x, w0, s20);
            s21 = _mm512_fmadd_ps(x, w1, s21);
            s22 = _mm512_fmadd_ps(x, w2, s22);
            s23 = _mm512_fmadd_ps(x, w3, s23);
            let x = _mm512_loadu_ps(xp[3].add(p));
            s30 = _mm512_fmadd_ps(x, w0, s30);
            s31 = _mm512_fmadd_ps(x, w1, s31);
            s32 = _mm512_fmadd_ps(x, w2, s32);
            s33 = _mm512_fmadd_ps(x, w3, s33);
        }
        p += 16;
    }
    let mut out = reduce_tile([
        [s00, s01, s02, s03],
        [s10, s11, s12, s13],
        [s20, s21, s22, s23],
        [s30, s31, s32, s33],
    ]);
    // SAFETY: the caller's contract.
    unsafe { tail(xp, R, wp, full, k, &mut out) };
    out
}

/// The lane sums of a tile's 16 accumulators, all at once: the same
/// halving order as `_mm512_reduce_add_ps` on each (lane `i` + lane
/// `i + 8`, then `+ 4`, `+ 2`, `+ 1`), so the same bits, but each step adds
/// two or four accumulators' halves in one instruction: 30 shuffles and 15
/// adds for the tile against 16 × 7 dependent steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce_tile(acc: [[std::arch::x86_64::__m512; C]; R]) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let v: [__m512; 16] = std::array::from_fn(|i| acc[i / C][i % C]);
    // Lane i + lane i + 8: the 256-bit halves of v[2i] and v[2i + 1],
    // side by side (128-bit blocks: v[2i]'s two, then v[2i + 1]'s).
    let l1: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    });
    // + 4: block j of l2[i] holds the four partial sums of v[4i + j].
    let l2: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (l1[2 * i], l1[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    });
    // + 2, within each 128-bit block.
    let l3: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (l2[2 * i], l2[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
        )
    });
    // + 1: block j holds the sums of v[j], v[4 + j], v[8 + j], v[12 + j].
    let s = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(l3[0], l3[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(l3[0], l3[1]),
    );
    let mut t = [0f32; 16];
    // SAFETY: `t` holds 16 f32.
    unsafe { _mm512_storeu_ps(t.as_mut_ptr(), s) };
    std::array::from_fn(|a| std::array::from_fn(|b| t[b * 4 + a]))
}

/// [`tile_avx512`] on the first `RR` token rows.
///
/// # Safety
/// As [`tile_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512_rows<W: WeightElem, const RR: usize>(
    xp: &[*const f32; R],
    r: usize,
    wp: &[*const W; C],
    k: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; RR];
    let full = k / 16 * 16;
    let mut p = 0;
    while p < full {
        // SAFETY: p + 16 <= k.
        unsafe {
            let wv: [__m512; C] = std::array::from_fn(|b| W::load16(wp[b].add(p)));
            for (a, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp[a].add(p));
                for (acc, &wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_fmadd_ps(xv, wv, *acc);
                }
            }
        }
        p += 16;
    }
    let mut out = [[0f32; C]; R];
    for a in 0..RR {
        for b in 0..C {
            out[a][b] = _mm512_reduce_add_ps(acc[a][b]);
        }
    }
    // SAFETY: the caller's contract.
    unsafe { tail(xp, r.min(RR), wp, full, k, &mut out) };
    out
}

/// The [`Compute::Bf16`] column chunk: tiles of 4 token rows (`x16`,
/// `m` rows of `k` bf16) × 4 weight rows, `vdpbf16ps` on 32 values of the
/// reduction axis at a time (16 accumulators; 8 loads per 16 instructions
/// of 32 multiply-adds each), a scalar tail of the bf16 values in f32.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16; `x16` holds `m × k`
/// values; every `w_row(j)`, `j` in `cols`, points to `k` readable bf16;
/// `sink` as in [`product`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn columns_dpbf16(
    x16: &[bf16],
    m: usize,
    k: usize,
    cols: std::ops::Range<usize>,
    w_row: &(dyn Fn(usize) -> *const bf16 + Sync),
    sink: &Sink<'_>,
) {
    let mut j0 = cols.start;
    while j0 < cols.end {
        let c = (cols.end - j0).min(C);
        let wp: [*const bf16; C] = std::array::from_fn(|b| w_row(j0 + b.min(c - 1)));
        let mut i0 = 0;
        while i0 < m {
            let r = (m - i0).min(R);
            let xp: [*const bf16; R] = std::array::from_fn(|a| x16[(i0 + a.min(r - 1)) * k..].as_ptr());
            // SAFETY: every pointer is a valid row of k values; rows
            // repeated to fill the tile are computed and not used.
            let sums = unsafe { tile_dpbf16(&xp, &wp, k) };
            sink(i0, r, j0, c, &sums);
            i0 += r;
        }
        j0 += c;
    }
}

/// One 4 × 4 [`Compute::Bf16`] tile (accumulators named one by one, as in
/// [`tile_avx512_full`]).
///
/// # Safety
/// As [`columns_dpbf16`]; the pointers hold `k` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn tile_dpbf16(xp: &[*const bf16; R], wp: &[*const bf16; C], k: usize) -> [[f32; C]; R] {
    use std::arch::x86_64::{
        __m512bh, __m512i, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_setzero_ps,
    };
    #[inline(always)]
    unsafe fn ld(p: *const bf16) -> __m512bh {
        // SAFETY: the caller's contract (32 readable values); __m512bh is
        // 32 bf16 in a 512-bit register, the bits as stored.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i)) }
    }
    let z = _mm512_setzero_ps();
    let (mut s00, mut s01, mut s02, mut s03) = (z, z, z, z);
    let (mut s10, mut s11, mut s12, mut s13) = (z, z, z, z);
    let (mut s20, mut s21, mut s22, mut s23) = (z, z, z, z);
    let (mut s30, mut s31, mut s32, mut s33) = (z, z, z, z);
    let full = k / 32 * 32;
    let mut p = 0;
    while p < full {
        // SAFETY: p + 32 <= k.
        unsafe {
            let w0 = ld(wp[0].add(p));
            let w1 = ld(wp[1].add(p));
            let w2 = ld(wp[2].add(p));
            let w3 = ld(wp[3].add(p));
            let x = ld(xp[0].add(p));
            s00 = _mm512_dpbf16_ps(s00, x, w0);
            s01 = _mm512_dpbf16_ps(s01, x, w1);
            s02 = _mm512_dpbf16_ps(s02, x, w2);
            s03 = _mm512_dpbf16_ps(s03, x, w3);
            let x = ld(xp[1].add(p));
            s10 = _mm512_dpbf16_ps(s10, x, w0);
            s11 = _mm512_dpbf16_ps(s11, x, w1);
            s12 = _mm512_dpbf16_ps(s12, x, w2);
            s13 = _mm512_dpbf16_ps(s13, x, w3);
            let x = ld(xp[2].add(p));
            s20 = _mm512_dpbf16_ps(s20, x, w0);
            s21 = _mm512_dpbf16_ps(s21, x, w1);
            s22 = _mm512_dpbf16_ps(s22, x, w2);
            s23 = _mm512_dpbf16_ps(s23, x, w3);
            let x = ld(xp[3].add(p));
            s30 = _mm512_dpbf16_ps(s30, x, w0);
            s31 = _mm512_dpbf16_ps(s31, x, w1);
            s32 = _mm512_dpbf16_ps(s32, x, w2);
            s33 = _mm512_dpbf16_ps(s33, x, w3);
        }
        p += 32;
    }
    let mut out = reduce_tile([
        [s00, s01, s02, s03],
        [s10, s11, s12, s13],
        [s20, s21, s22, s23],
        [s30, s31, s32, s33],
    ]);
    for (a, o) in out.iter_mut().enumerate() {
        for (b, o) in o.iter_mut().enumerate() {
            let mut s = *o;
            for q in full..k {
                // SAFETY: q < k.
                s = unsafe { (*xp[a].add(q)).to_f32().mul_add((*wp[b].add(q)).to_f32(), s) };
            }
            *o = s;
        }
    }
    out
}

/// The AVX2 tile: 8 lanes, two passes of 2 token rows × 4 weight rows (8
/// accumulators, 6 loads per 8 FMAs, within the 16 ymm registers).
///
/// # Safety
/// The CPU must have AVX2 and FMA; the pointers must hold `k` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<W: WeightElem>(
    xp: &[*const f32; R],
    r: usize,
    wp: &[*const W; C],
    k: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    // Two passes of 2 token rows keep the tile within 16 registers.
    let mut out = [[0f32; C]; R];
    let full = k / 8 * 8;
    for half in 0..R / 2 {
        let mut acc = [[_mm256_setzero_ps(); C]; 2];
        let mut p = 0;
        while p < full {
            // SAFETY: p + 8 <= k.
            unsafe {
                let x0 = _mm256_loadu_ps(xp[2 * half].add(p));
                let x1 = _mm256_loadu_ps(xp[2 * half + 1].add(p));
                for b in 0..C {
                    let wv = W::load8(wp[b].add(p));
                    acc[0][b] = _mm256_fmadd_ps(x0, wv, acc[0][b]);
                    acc[1][b] = _mm256_fmadd_ps(x1, wv, acc[1][b]);
                }
            }
            p += 8;
        }
        for a in 0..2 {
            for b in 0..C {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 f32.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
                out[2 * half + a][b] = lanes.iter().sum();
            }
        }
        if 2 * half + 2 >= r {
            break;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { tail(xp, r, wp, full, k, &mut out) };
    out
}

/// The portable tile: `RR` token rows × 4 weight rows of 8-lane arrays (the
/// compiler vectorises them where it can).
///
/// # Safety
/// The pointers must hold `k` f32.
#[allow(clippy::needless_range_loop)]
unsafe fn tile_portable<W: WeightElem, const RR: usize>(
    xp: &[*const f32; R],
    r: usize,
    wp: &[*const W; C],
    k: usize,
) -> [[f32; C]; R] {
    let mut acc = [[[0f32; 8]; C]; R];
    let full = k / 8 * 8;
    for p in (0..full).step_by(8) {
        for a in 0..r.min(RR) {
            for b in 0..C {
                for l in 0..8 {
                    // SAFETY: p + l < k.
                    let (x, w) = unsafe { (*xp[a].add(p + l), (*wp[b].add(p + l)).to_f32()) };
                    acc[a][b][l] += x * w;
                }
            }
        }
    }
    let mut out = [[0f32; C]; R];
    for a in 0..R {
        for b in 0..C {
            out[a][b] = acc[a][b].iter().sum();
        }
    }
    // SAFETY: the caller's contract.
    unsafe { tail(xp, r, wp, full, k, &mut out) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform(1.0)).collect()
    }

    #[test]
    fn bf16_products_are_exact_products_summed_in_f32() {
        let mut rng = Rng(17);
        let mut compared = 0;
        // Row counts crossing the row blocks (120 rows at k = 2048), short
        // tiles, odd reduction lengths, 66 pair-steps (a register flush
        // after 64), several column panels (of 32) and chunks.
        for (m, k, n) in [
            (1, 1, 1),
            (3, 33, 5),
            (9, 70, 7),
            (130, 2048, 6),
            (13, 131, 70),
            (25, 64, 257),
        ] {
            let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.uniform(1.0))).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rng.uniform(1.0))).collect();
            let mut y = vec![f32::NAN; m * n];
            if !matmul_bf16_xwt(&x, m, k, &w, n, &mut y) {
                assert!(!Compute::bf16_supported());
                assert!(y.iter().all(|v| v.is_nan()), "y written without the kernels");
                continue;
            }
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            for i in 0..m {
                for j in 0..n {
                    let want = dot64(&xf[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k]);
                    let got = y[i * n + j] as f64;
                    assert!(got.is_finite(), "({i}, {j}) of {m}×{n}×{k}");
                    assert!((got - want).abs() <= tol(k), "({i}, {j}) of {m}×{n}×{k}: {got} vs {want}");
                    compared += 1;
                }
            }
        }
        if Compute::bf16_supported() {
            assert_eq!(compared, 1 + 15 + 63 + 130 * 6 + 13 * 70 + 25 * 257);
        }
    }

    /// The vectorised gated SiLU is within 2 ulp of an f64 SiLU of the same
    /// input from -110 to 110 (dense near 0, where most activations are),
    /// overflows and underflows as candle's scalar one does, keeps NaN, and
    /// multiplies by the up values; a length that is not a multiple of 16
    /// covers the masked tail, and one above the split length the pool.
    #[test]
    fn the_vectorised_gated_silu_is_within_two_ulp_of_silu() {
        let mut inputs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 1000.0).collect();
        inputs.extend((-1100..=1100).map(|i| i as f32 / 10.0));
        inputs.extend([0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7, 89.5, -89.5, 104.0, -104.0, 1e30, -1e30]);
        inputs.extend([f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE]);
        for _ in 0..2 {
            inputs.extend_from_within(..);
        }
        inputs.push(0.5);
        assert!(inputs.len() > 1 << 14 && !inputs.len().is_multiple_of(16));
        let mut got = inputs.clone();
        Activation::Silu.apply_gated(&mut got, &vec![1.0; inputs.len()]);
        let mut compared = 0;
        for (&x, &g) in inputs.iter().zip(&got) {
            let s = Activation::Silu.apply(x);
            if !(-88.72..=104.0).contains(&x) {
                // Beyond the exponential's range: both give x (e^-x = 0)
                // or a zero (e^-x = ∞); NaN for -∞ (−∞/∞) in both.
                assert!(g == s || (g.is_nan() && s.is_nan()), "{x}: {g} vs {s}");
                compared += 1;
                continue;
            }
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(g.is_finite(), "{x}: {g}");
            let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            assert!((g as f64 - want).abs() <= 2.0 * ulp, "{x}: {g} vs {want}");
            compared += 1;
        }
        assert_eq!(compared, inputs.len());
        // The up values multiply in (one more rounding).
        let mut rng = Rng(2);
        let x: Vec<f32> = (0..37).map(|_| rng.uniform(6.0)).collect();
        let u: Vec<f32> = (0..37).map(|_| rng.uniform(3.0)).collect();
        let mut g = x.clone();
        Activation::Silu.apply_gated(&mut g, &u);
        for ((&x, &u), &g) in x.iter().zip(&u).zip(&g) {
            let want = x as f64 / (1.0 + (-(x as f64)).exp()) * u as f64;
            assert!(
                (g as f64 - want).abs() <= 4e-7 * want.abs() + 1e-30,
                "{x}·{u}: {g} vs {want}"
            );
        }
        let mut nan = [f32::NAN; 5];
        Activation::Silu.apply_gated(&mut nan, &[1.0; 5]);
        assert!(nan.iter().all(|v| v.is_nan()));
        // GELU has no vector kernel: the scalar one on each value.
        let v = [-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0, 7.0];
        let mut g = v;
        Activation::GeluErf.apply_gated(&mut g, &[2.0; 8]);
        assert_eq!(g, v.map(|v| Activation::GeluErf.apply(v) * 2.0));
    }

    /// The tile's all-at-once reduction gives each accumulator the bits of
    /// `_mm512_reduce_add_ps` (and of the halving order written out in
    /// scalar code), on lanes of mixed magnitudes where the order of the
    /// additions changes the result.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_tile_reduction_is_the_per_accumulator_reduction() {
        use std::arch::x86_64::{__m512, _mm512_loadu_ps, _mm512_reduce_add_ps};
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        fn halving(l: &[f32; 16]) -> f32 {
            let mut v = *l;
            for step in [8, 4, 2, 1] {
                for i in 0..step {
                    v[i] += v[i + step];
                }
            }
            v[0]
        }
        let mut rng = Rng(11);
        let mut order_mattered = 0;
        for _ in 0..200 {
            let lanes: [[[f32; 16]; C]; R] = std::array::from_fn(|_| {
                std::array::from_fn(|_| {
                    std::array::from_fn(|_| rng.uniform(1.0) * 10f32.powi((rng.next() % 13) as i32 - 6))
                })
            });
            // SAFETY: the CPU has AVX-512F (checked); each array holds 16 f32.
            let (acc, want): ([[__m512; C]; R], [[f32; C]; R]) = unsafe {
                (
                    std::array::from_fn(|a| std::array::from_fn(|b| _mm512_loadu_ps(lanes[a][b].as_ptr()))),
                    std::array::from_fn(|a| {
                        std::array::from_fn(|b| _mm512_reduce_add_ps(_mm512_loadu_ps(lanes[a][b].as_ptr())))
                    }),
                )
            };
            // SAFETY: the CPU has AVX-512F (checked).
            let got = unsafe { reduce_tile(acc) };
            for a in 0..R {
                for b in 0..C {
                    assert!(got[a][b].is_finite());
                    assert_eq!(got[a][b].to_bits(), want[a][b].to_bits(), "({a}, {b})");
                    assert_eq!(got[a][b].to_bits(), halving(&lanes[a][b]).to_bits(), "({a}, {b})");
                    let sequential: f32 = lanes[a][b].iter().sum();
                    order_mattered += usize::from(sequential.to_bits() != got[a][b].to_bits());
                }
            }
        }
        // The check would be vacuous if every order gave the same bits.
        assert!(order_mattered > 100, "{order_mattered}");
    }

    fn dot64(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// f32 accumulation of `k` products of values in [-1, 1).
    fn tol(k: usize) -> f64 {
        4e-6 * (k as f64).sqrt() + 1e-6
    }

    // Odd token counts (tiles of 1–3 rows), widths leaving 1–3 weight rows
    // for a short last block, reduction lengths with and without a lane tail.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 8, 4),
        (1, 13, 1),
        (2, 64, 5),
        (3, 67, 6),
        (5, 128, 7),
        (7, 200, 33),
        (32, 256, 96),
        (64, 96, 130),
        (9, 2048, 64),
    ];

    #[test]
    fn matmul_matches_an_f64_reference_on_every_tile_shape_and_tail() {
        let mut rng = Rng(7);
        for (m, k, n) in SHAPES {
            let x = rand(&mut rng, m * k);
            let w = rand(&mut rng, n * k);
            let mut y = vec![f32::NAN; m * n];
            matmul_xwt(&x, m, k, &w, n, &mut y);
            for i in 0..m {
                for j in 0..n {
                    let r = dot64(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                    let v = y[i * n + j] as f64;
                    assert!(
                        (v - r).abs() <= tol(k),
                        "m={m} k={k} n={n} ({i},{j}): {v} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn portable_and_avx2_tiles_agree_with_the_dispatched_one() {
        tiles_agree::<f32>(|v| v);
        tiles_agree::<bf16>(bf16::from_f32);
        tiles_agree::<f16>(f16::from_f32);
    }

    /// Every kernel this CPU can run, on weights of type `W` (`to_w`
    /// rounds), against an f64 reference on the rounded weights.
    fn tiles_agree<W: WeightElem>(to_w: fn(f32) -> W) {
        // The dispatched kernel is AVX-512 on this CPU when it has it: the
        // narrower kernels must give the same products (to rounding).
        let mut rng = Rng(11);
        for k in [75, 16, 8, 3, 33] {
            let m = 4;
            let x = rand(&mut rng, m * k);
            let w: Vec<W> = rand(&mut rng, C * k).into_iter().map(to_w).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let xp: [*const f32; R] = std::array::from_fn(|a| x[a * k..].as_ptr());
            let wp: [*const W; C] = std::array::from_fn(|b| w[b * k..].as_ptr());
            let mut kernels: Vec<Tile<W>> = vec![tile_portable::<W, R>];
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
                {
                    kernels.push(tile_avx2::<W>);
                }
                if std::is_x86_feature_detected!("avx512f") {
                    kernels.push(tile_avx512::<W>);
                }
            }
            for (ki, tile) in kernels.into_iter().enumerate() {
                for r in 1..=R {
                    // SAFETY: the kernels were checked against the CPU above;
                    // the rows hold k values.
                    let s = unsafe { tile(&xp, r, &wp, k) };
                    for a in 0..r {
                        for b in 0..C {
                            let want = dot64(&x[a * k..(a + 1) * k], &wf[b * k..(b + 1) * k]);
                            let got = s[a][b] as f64;
                            assert!(got.is_finite(), "kernel {ki} k={k} r={r}: {got}");
                            assert!(
                                (got - want).abs() <= tol(k),
                                "kernel {ki} k={k} r={r} ({a},{b}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The dispatched product with bf16 and f16 weights read as stored:
    /// every tile shape and tail, against an f64 reference on the same
    /// (rounded) weights; and the same numbers as the f32 kernel on the
    /// widened weights (the widening is exact, the order of the sums the same).
    #[test]
    fn half_precision_weights_match_an_f64_reference_and_the_f32_kernel() {
        fn check<W: WeightElem>(to_w: fn(f32) -> W, name: &str) {
            let mut rng = Rng(29);
            for (m, k, n) in SHAPES {
                let x = rand(&mut rng, m * k);
                let w: Vec<W> = rand(&mut rng, n * k).into_iter().map(to_w).collect();
                let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                let mut y = vec![f32::NAN; m * n];
                matmul_xwt(&x, m, k, &w, n, &mut y);
                let mut yf = vec![f32::NAN; m * n];
                matmul_xwt(&x, m, k, &wf, n, &mut yf);
                let mut compared = 0;
                for i in 0..m {
                    for j in 0..n {
                        let r = dot64(&x[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k]);
                        let v = y[i * n + j] as f64;
                        assert!(v.is_finite(), "{name} m={m} k={k} n={n} ({i},{j}): {v}");
                        assert!(
                            (v - r).abs() <= tol(k),
                            "{name} m={m} k={k} n={n} ({i},{j}): {v} vs {r}"
                        );
                        assert_eq!(y[i * n + j].to_bits(), yf[i * n + j].to_bits(), "{name}");
                        compared += 1;
                    }
                }
                assert_eq!(compared, m * n);
            }
        }
        check(bf16::from_f32, "bf16");
        check(f16::from_f32, "f16");
    }

    #[test]
    fn bf16_expert_kernels_equal_the_f32_ones_on_widened_weights() {
        let mut rng = Rng(5);
        let (tokens, hidden, inter) = (7, 72, 37);
        let x = rand(&mut rng, tokens * hidden);
        let to = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
        let (g, u, d) = (
            to(rand(&mut rng, inter * hidden)),
            to(rand(&mut rng, inter * hidden)),
            to(rand(&mut rng, hidden * inter)),
        );
        let wide = |v: &[bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
        let (gf, uf, df) = (wide(&g), wide(&u), wide(&d));
        let rows: Vec<u32> = vec![0, 3, 6, 2, 5];
        let scale = vec![0.5f32, 0.25, 1.0, 0.75, 0.125];
        let mut h = vec![f32::NAN; rows.len() * inter];
        let mut hf = vec![f32::NAN; rows.len() * inter];
        let act = Activation::Silu;
        gate_up(&x, hidden, &rows, GateUp { gate: &g, up: &u, inter, act }, &mut h);
        gate_up(&x, hidden, &rows, GateUp { gate: &gf, up: &uf, inter, act }, &mut hf);
        assert!(h.iter().all(|v| v.is_finite()));
        assert_eq!(h, hf);
        let mut out = vec![0f32; tokens * hidden];
        let mut outf = vec![0f32; tokens * hidden];
        down_scatter_add(&h, inter, &d, hidden, &rows, &scale, &mut out);
        down_scatter_add(&hf, inter, &df, hidden, &rows, &scale, &mut outf);
        assert!(out.iter().all(|v| v.is_finite()));
        assert_eq!(out, outf);
        assert!(out.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn gate_up_and_down_scatter_compute_the_expert() {
        let mut rng = Rng(3);
        for (act, (tokens, hidden, inter)) in [
            (Activation::Silu, (9, 40, 24)),
            (Activation::GeluErf, (6, 33, 7)),
            (Activation::Silu, (40, 128, 90)),
        ] {
            let x = rand(&mut rng, tokens * hidden);
            let (g, u, d) = (
                rand(&mut rng, inter * hidden),
                rand(&mut rng, inter * hidden),
                rand(&mut rng, hidden * inter),
            );
            // Some tokens twice (two slots routed to one expert never
            // happens, but the sums must still be right), some not at all.
            let rows: Vec<u32> = (0..tokens as u32)
                .filter(|t| t % 3 != 1)
                .chain([0])
                .collect();
            let scale: Vec<f32> = rows.iter().map(|&t| 0.25 + t as f32 / 16.0).collect();
            let mut h = vec![f32::NAN; rows.len() * inter];
            gate_up(
                &x,
                hidden,
                &rows,
                GateUp {
                    gate: &g,
                    up: &u,
                    inter,
                    act,
                },
                &mut h,
            );
            let before = rand(&mut rng, tokens * hidden);
            let mut out = before.clone();
            down_scatter_add(&h, inter, &d, hidden, &rows, &scale, &mut out);

            let mut want: Vec<f64> = before.iter().map(|&v| v as f64).collect();
            for (i, &t) in rows.iter().enumerate() {
                let xt = &x[t as usize * hidden..(t as usize + 1) * hidden];
                let hi: Vec<f64> = (0..inter)
                    .map(|j| {
                        let gv = dot64(xt, &g[j * hidden..(j + 1) * hidden]);
                        let uv = dot64(xt, &u[j * hidden..(j + 1) * hidden]);
                        let a = match act {
                            Activation::Silu => gv / (1.0 + (-gv).exp()),
                            Activation::GeluErf => {
                                0.5 * gv * (1.0 + erf64(gv / std::f64::consts::SQRT_2))
                            }
                        };
                        a * uv
                    })
                    .collect();
                for (j, &v) in h[i * inter..(i + 1) * inter].iter().enumerate() {
                    assert!(
                        (v as f64 - hi[j]).abs() <= 1e-4 * (1.0 + hi[j].abs()),
                        "{act:?} h"
                    );
                }
                for c in 0..hidden {
                    let y: f64 = (0..inter).map(|j| hi[j] * d[c * inter + j] as f64).sum();
                    want[t as usize * hidden + c] += scale[i] as f64 * y;
                }
            }
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (o as f64 - w).abs() <= 1e-3 * (1.0 + w.abs()),
                    "{act:?} out {i}: {o} vs {w}"
                );
            }
            // Untouched tokens keep their values exactly.
            for t in (0..tokens).filter(|t| t % 3 == 1 && *t != 0) {
                assert_eq!(
                    out[t * hidden..(t + 1) * hidden],
                    before[t * hidden..(t + 1) * hidden]
                );
            }
        }
    }

    /// All the routed experts in two passes give the bits of `gate_up`
    /// then `down_scatter_add` expert after expert: bf16 weights in both
    /// compute modes, an expert with no tokens, one with a single token
    /// (`single_row`'s kernel, which ends an ordered pass), many tokens
    /// (several column chunks per expert), and the output's prior values
    /// kept under the additions. Every output element is compared.
    #[test]
    fn routed_experts_are_the_experts_one_after_another() {
        let mut rng = Rng(41);
        let (tokens, hidden, inter) = (37, 96, 200);
        let x = rand(&mut rng, tokens * hidden);
        let experts = 5;
        let mats: Vec<[Vec<bf16>; 3]> = (0..experts)
            .map(|_| {
                std::array::from_fn(|_| {
                    rand(&mut rng, inter * hidden)
                        .into_iter()
                        .map(bf16::from_f32)
                        .collect()
                })
            })
            .collect();
        // Expert 1 gets no token, expert 3 one; tokens are routed to two each.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); experts];
        for t in 0..tokens as u32 {
            let a = [0, 2, 4][t as usize % 3];
            let b = if t == 5 { 3 } else { [2, 4, 0][t as usize % 3] };
            rows[a].push(t);
            rows[b].push(t);
        }
        assert!(rows[1].is_empty() && rows[3].len() == 1);
        let scales: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| r.iter().map(|&t| 0.5 + t as f32 / 64.0).collect())
            .collect();
        let before = rand(&mut rng, tokens * hidden);
        for mode in [Compute::Exact, Compute::Bf16] {
            let routed: Vec<Routed<bf16>> = (0..experts)
                .map(|e| Routed {
                    gate_up: GateUp {
                        gate: &mats[e][0],
                        up: &mats[e][1],
                        inter,
                        act: Activation::Silu,
                    },
                    down: &mats[e][2],
                    rows: &rows[e],
                    scale: &scales[e],
                })
                .collect();
            let mut want = before.clone();
            let mut got = before.clone();
            with_compute(mode, || {
                for r in &routed {
                    if r.rows.is_empty() {
                        continue;
                    }
                    let mut h = vec![f32::NAN; r.rows.len() * inter];
                    gate_up(&x, hidden, r.rows, r.gate_up, &mut h);
                    down_scatter_add(&h, inter, r.down, hidden, r.rows, r.scale, &mut want);
                }
                routed_experts(&x, hidden, hidden, &routed, &mut got);
            });
            assert_eq!(got.len(), tokens * hidden);
            assert!(got.iter().all(|v| v.is_finite()), "{mode:?}");
            assert!(
                got.iter().zip(&before).filter(|(a, b)| a != b).count() == got.len(),
                "{mode:?}: every token got its experts' terms"
            );
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{mode:?} element {i}: {a} vs {b}");
            }
        }
    }

    /// Several weights in one pass give each product's own bits, for one
    /// token (`single_row`'s kernel) and for many, widths with partial
    /// tiles, and an empty weight; every element of every output compared.
    #[test]
    fn products_of_one_x_with_several_weights_are_the_products() {
        let mut rng = Rng(43);
        let k = 72;
        for m in [1, 3, 29] {
            let x = rand(&mut rng, m * k);
            let ws: Vec<Vec<bf16>> = [130, 0, 64, 7]
                .iter()
                .map(|&n| rand(&mut rng, n * k).into_iter().map(bf16::from_f32).collect())
                .collect();
            let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * (w.len() / k)]).collect();
            let refs: Vec<&[bf16]> = ws.iter().map(|w| w.as_slice()).collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
            matmul_xwt_many(&x, m, k, &refs, &mut outs);
            let mut compared = 0;
            for (w, y) in ws.iter().zip(&ys) {
                let n = w.len() / k;
                let mut want = vec![f32::NAN; m * n];
                // One product alone, through the single-product path.
                let xr: Vec<Ptr> = (0..m).map(|i| Ptr(x[i * k..].as_ptr())).collect();
                let out = Out(want.as_mut_ptr());
                // SAFETY: rows hold k values; the sink writes want[i, j], i < m, j < n.
                unsafe {
                    product(&xr, k, n, &|j| w[j * k..].as_ptr(), &|i0, r, j0, c, s| {
                        for (a, row) in s.iter().enumerate().take(r) {
                            for (b, &v) in row.iter().enumerate().take(c) {
                                *out.at((i0 + a) * n + j0 + b) = v;
                            }
                        }
                    })
                };
                for (a, b) in y.iter().zip(&want) {
                    assert!(a.is_finite(), "m={m} n={n}");
                    assert_eq!(a.to_bits(), b.to_bits(), "m={m} n={n}");
                    compared += 1;
                }
            }
            assert_eq!(compared, m * (130 + 64 + 7));
        }
    }

    /// erf to ~1e-7 (Abramowitz–Stegun 7.1.26 is too coarse; series/continued fraction).
    fn erf64(x: f64) -> f64 {
        if x.abs() < 3.0 {
            // Maclaurin series, converges fast for |x| < 3.
            let mut sum = x;
            let mut term = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            x.signum()
        }
    }

    /// `Compute::Bf16` on bf16 weights is the product of the activations
    /// rounded to bf16 (nearest even) with the weights: against an f64
    /// reference on the rounded activations, at the f32 accumulation
    /// tolerance (every tile shape, tails of the 32-wide step); and
    /// against the exact path within the rounding of the activations
    /// (relative 2⁻⁹ each: at most 2⁻⁸ of Σ|x·w|). `Exact` inside
    /// `with_compute` stays bit-identical to the default.
    #[test]
    fn bf16_compute_rounds_the_activations_and_nothing_else() {
        let mut rng = Rng(23);
        for (m, k, n) in SHAPES.iter().copied().chain([(6, 1024, 9), (4, 95, 4)]) {
            let x = rand(&mut rng, m * k);
            let w: Vec<bf16> = rand(&mut rng, n * k).into_iter().map(bf16::from_f32).collect();
            let mut exact = vec![f32::NAN; m * n];
            matmul_xwt(&x, m, k, &w, n, &mut exact);
            let mut same = vec![f32::NAN; m * n];
            with_compute(Compute::Exact, || matmul_xwt(&x, m, k, &w, n, &mut same));
            assert_eq!(
                exact.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                same.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let mut y = vec![f32::NAN; m * n];
            with_compute(Compute::Bf16, || matmul_xwt(&x, m, k, &w, n, &mut y));
            assert_eq!(current_compute(), Compute::Exact, "the mode is restored");
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            for i in 0..m {
                for j in 0..n {
                    let (xi, wj) = (&x[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k]);
                    let v = y[i * n + j] as f64;
                    assert!(v.is_finite());
                    let abs: f64 = xi.iter().zip(wj).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let e = exact[i * n + j] as f64;
                    assert!(
                        (v - e).abs() <= abs / 256.0 + tol(k),
                        "m={m} k={k} n={n} ({i},{j}): bf16 {v} vs exact {e}"
                    );
                    if Compute::bf16_supported() {
                        let r = dot64(&xr[i * k..(i + 1) * k], wj);
                        assert!(
                            (v - r).abs() <= tol(k),
                            "m={m} k={k} n={n} ({i},{j}): {v} vs rounded-x reference {r}"
                        );
                    } else {
                        assert_eq!(v, e, "no AVX-512 BF16: exact");
                    }
                }
            }
        }
    }

    #[test]
    fn empty_products_write_nothing() {
        let mut y: Vec<f32> = Vec::new();
        matmul_xwt(&[], 0, 4, &[1.0; 8], 2, &mut y);
        matmul_xwt::<f32>(&[1.0; 4], 1, 4, &[], 0, &mut y);
        assert!(y.is_empty());
    }

    #[test]
    #[should_panic(expected = "outside x")]
    fn a_token_index_outside_x_is_refused() {
        let mut h = vec![0f32; 4];
        let w = GateUp {
            gate: &[0.0; 16],
            up: &[0.0; 16],
            inter: 4,
            act: Activation::Silu,
        };
        gate_up(&[0.0; 8], 4, &[2], w, &mut h);
    }
}
