//! Attention: rotary embeddings, causal masks, grouped-query and latent
//! (MLA) attention, computed in query blocks so memory stays linear in the
//! prompt.

use candle_core::{Device, Tensor, D};

use super::config::{AttentionKind, QkNorm};
use super::weights::AttnWeights;
use super::{rms_norm, Forward, R};

/// `cos`, `sin` of `[tokens, d/2]` for positions `0..tokens`.
pub(super) fn rope_tables(
    tokens: usize,
    dim: usize,
    theta: f64,
    device: &Device,
) -> R<(Tensor, Tensor)> {
    rope_tables_from(tokens, &inv_freq(dim, theta), 1.0, device)
}

/// cos/sin tables `[tokens, inv.len()]` of the given inverse frequencies,
/// multiplied by `factor` (YaRN's attention factor; 1 otherwise).
pub(super) fn rope_tables_from(
    tokens: usize,
    inv: &[f32],
    factor: f32,
    device: &Device,
) -> R<(Tensor, Tensor)> {
    let half = inv.len();
    let mut cos = Vec::with_capacity(tokens * half);
    let mut sin = Vec::with_capacity(tokens * half);
    for t in 0..tokens {
        for &f in inv {
            let a = t as f32 * f;
            cos.push(a.cos() * factor);
            sin.push(a.sin() * factor);
        }
    }
    Ok((
        Tensor::from_vec(cos, (tokens, half), device)?,
        Tensor::from_vec(sin, (tokens, half), device)?,
    ))
}

/// The rotary frequencies `1 / theta^(2i/dim)`, `i < dim/2`.
pub(super) fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32)
        .collect()
}

/// Half-split (`rotate_half`) rotary embedding of `x` `[heads, tokens, d]`.
pub(super) fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    );
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// Interleaved rotary embedding (pairs (2i, 2i+1)), returned de-interleaved
/// (`[evens | odds]`): the same permutation for q and k leaves q·k unchanged.
pub(super) fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
    let dims = x.dims().to_vec();
    let d = dims[dims.len() - 1];
    let mut split = dims[..dims.len() - 1].to_vec();
    split.extend([d / 2, 2]);
    let pairs = x.reshape(split)?;
    let last = pairs.rank() - 1;
    let even = pairs.narrow(last, 0, 1)?.squeeze(last)?;
    let odd = pairs.narrow(last, 1, 1)?.squeeze(last)?;
    rope_half(&Tensor::cat(&[even, odd], D::Minus1)?, cos, sin)
}

/// The additive causal mask of query rows `rows` (absolute positions) over
/// keys `0..keys`: 0 where the key is at or before the query, -inf after.
fn causal_mask(rows: std::ops::Range<usize>, keys: usize, device: &Device) -> R<Tensor> {
    let n = rows.len();
    let m: Vec<f32> = rows
        .flat_map(|i| (0..keys).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (n, keys), device)
}

/// Bytes of attention scores one query block may hold (`heads × rows × keys`
/// f32, a few copies live at once): bounds attention memory on long prompts,
/// which otherwise grows with the square of the prompt length.
pub(super) const ATTENTION_BLOCK_BYTES: usize = 16 << 20;

/// Query rows per attention block for `heads` heads over `tokens` keys.
pub(super) fn query_block(heads: usize, tokens: usize) -> usize {
    let per_row = heads.max(1).saturating_mul(tokens.max(1)).saturating_mul(4);
    (ATTENTION_BLOCK_BYTES / per_row).clamp(1, tokens.max(1))
}

/// `[T, heads·d]` → `[heads, T, d]`.
pub(super) fn split_heads(x: &Tensor, heads: usize) -> R<Tensor> {
    let (t, w) = x.dims2()?;
    x.reshape((t, heads, w / heads))?
        .transpose(0, 1)?
        .contiguous()
}

/// Causal scaled dot-product attention over `[heads, T, d]` (k/v already per
/// query head). Queries are processed in blocks ([`query_block`]) over the
/// keys they can see, so the scores never hold `heads × T × T` values at once;
/// a prompt that fits in one block is computed exactly as a single matmul.
pub(super) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> R<Tensor> {
    let (h, t, _) = q.dims3()?;
    let block = query_block(h, t);
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + block).min(t);
        let (qb, kb, vb) = if r0 == 0 && r1 == t {
            (q.clone(), k.clone(), v.clone())
        } else {
            (
                q.narrow(1, r0, r1 - r0)?,
                k.narrow(1, 0, r1)?,
                v.narrow(1, 0, r1)?,
            )
        };
        let mut s = (qb.matmul(&kb.transpose(1, 2)?.contiguous()?)? * scale)?;
        if let Some(cap) = softcap {
            s = ((s / cap)?.tanh()? * cap)?;
        }
        let s = s.broadcast_add(&causal_mask(r0..r1, r1, q.device())?)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        drop(s);
        outs.push(p.matmul(&vb.contiguous()?)?); // [heads, rows, dv]
        r0 = r1;
    }
    let o = if outs.len() == 1 {
        outs.pop().expect("one block")
    } else {
        Tensor::cat(&outs, 1)?
    };
    let (h, t, dv) = o.dims3()?;
    o.transpose(0, 1)?.contiguous()?.reshape((t, h * dv))
}

/// Query rows per task of [`attend_host`].
const HOST_BLOCK: usize = 64;

/// The shapes of [`attend_host`]'s operands.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostAttention {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`; query head `h` reads key/value
    /// head `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Positions.
    pub tokens: usize,
    /// Query/key head width.
    pub d: usize,
    /// Value head width.
    pub dv: usize,
}

/// Causal attention on the host, as [`attend`] computes it on unrepeated
/// keys and values: `q` is `[heads, T, d]`, `k` `[kv_heads, T, d]`, `v`
/// `[kv_heads, T, dv]` (row-major f32); returns `[T, heads·dv]`.
///
/// One task per (head, block of [`HOST_BLOCK`] query rows), in parallel on
/// the pool: a single-threaded GEMM of its rows' scores over the keys the
/// block can see, then scale, cap (`softcap`: `tanh(s / cap) · cap`),
/// causal mask and a softmax per row (exponentials 16 at a time where the
/// CPU has AVX-512F), and a GEMM of the weights with the values into its
/// rows and head's columns of the output. Candle's batched matmuls split
/// each head's small products across the threads and the elementwise
/// steps allocate `heads × T × T` scores several times over: on the scaled
/// Mixtral checkpoint (256 tokens, 16 heads) that took 28–35 ms of a
/// 350–450 ms prefill. Memory: a task holds `64 × T` scores.
pub(super) fn attend_host(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: HostAttention,
    scale: f32,
    softcap: Option<f32>,
) -> Vec<f32> {
    use rayon::prelude::*;
    let HostAttention {
        heads,
        kv_heads,
        tokens: t,
        d,
        dv,
    } = shape;
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "heads not a multiple of kv heads"
    );
    assert_eq!(q.len(), heads * t * d, "q is not [heads, T, d]");
    assert_eq!(k.len(), kv_heads * t * d, "k is not [kv_heads, T, d]");
    assert_eq!(v.len(), kv_heads * t * dv, "v is not [kv_heads, T, dv]");
    let mut out = vec![0f32; t * heads * dv];
    if t == 0 || heads == 0 || dv == 0 {
        return out;
    }
    let rep = heads / kv_heads;
    let blocks = t.div_ceil(HOST_BLOCK);
    let dst = super::expert_gemm::Out(out.as_mut_ptr());
    (0..heads * blocks).into_par_iter().for_each(|task| {
        let (h, b) = (task / blocks, task % blocks);
        let (r0, r1) = (b * HOST_BLOCK, ((b + 1) * HOST_BLOCK).min(t));
        let rows = r1 - r0;
        let kvh = h / rep;
        // Scores of rows r0..r1 over keys 0..r1 (the later ones are masked).
        let mut sc = vec![0f32; rows * r1];
        // SAFETY: q's rows r0..r1 of head h, k's rows 0..r1 of head kvh
        // (read as Kᵀ: column stride d, row stride 1) and sc (rows × r1)
        // are in bounds (lengths asserted above).
        unsafe {
            gemm_one_thread(
                (rows, r1, d),
                (sc.as_mut_ptr(), r1),
                (q[(h * t + r0) * d..].as_ptr(), 1, d),
                (k[kvh * t * d..].as_ptr(), d, 1),
            )
        };
        for (i, row) in sc.chunks_exact_mut(r1).enumerate() {
            // Row r0 + i sees keys 0..=r0 + i.
            let seen = r0 + i + 1;
            let (row, masked) = row.split_at_mut(seen);
            for s in row.iter_mut() {
                *s *= scale;
                if let Some(cap) = softcap {
                    *s = (*s / cap).tanh() * cap;
                }
            }
            softmax_in_place(row);
            masked.fill(0.0);
        }
        // SAFETY: sc is rows × r1, v's rows 0..r1 of head kvh are in
        // bounds; the destination rows r0..r1, columns h·dv..(h+1)·dv of
        // `out` (row stride heads·dv) belong to this task alone.
        unsafe {
            gemm_one_thread(
                (rows, dv, r1),
                (dst.at(r0 * heads * dv + h * dv), heads * dv),
                (sc.as_ptr(), 1, r1),
                (v[kvh * t * dv..].as_ptr(), 1, dv),
            )
        };
    });
    out
}

/// `dst = lhs · rhs` on the calling thread: `(m, n, k)`; `dst` `m × n`
/// with the given row stride (columns contiguous); `lhs` (`m × k`) and
/// `rhs` (`k × n`) as (pointer, column stride, row stride).
///
/// # Safety
/// Every pointer must address its matrix's elements at those strides, and
/// `dst` none of the others'.
unsafe fn gemm_one_thread(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
) {
    // SAFETY: the caller's contract; `read_dst` false: dst is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `row ← softmax(row)`: `e^(s - max) / Σ`, as candle's `softmax_last_dim`
/// (the sum in a different order).
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked).
        let sum = unsafe { exp_sub_avx512(row, max) };
        row.iter_mut().for_each(|s| *s /= sum);
        return;
    }
    let mut sum = 0f32;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    row.iter_mut().for_each(|s| *s /= sum);
}

/// `row ← e^(row - max)`, 16 at a time; returns the sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_sub_avx512(row: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(max);
    let mut acc = _mm512_setzero_ps();
    for c in row.chunks_mut(16) {
        let mask: __mmask16 = if c.len() == 16 {
            !0
        } else {
            (1u16 << c.len()) - 1
        };
        // SAFETY: the mask covers c.len() ≤ 16 values of `c`.
        unsafe {
            let e = super::expert_gemm::exp_avx512(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(mask, c.as_ptr()),
                m,
            ));
            let e = _mm512_maskz_mov_ps(mask, e);
            _mm512_mask_storeu_ps(c.as_mut_ptr(), mask, e);
            acc = _mm512_add_ps(acc, e);
        }
    }
    _mm512_reduce_add_ps(acc)
}

/// Repeats `[kv_heads, T, d]` to `[kv_heads·rep, T, d]` (GQA).
pub(super) fn repeat_kv(x: &Tensor, rep: usize) -> R<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (h, t, d) = x.dims3()?;
    x.unsqueeze(1)?
        .expand((h, rep, t, d))?
        .reshape((h * rep, t, d))
}

impl Forward<'_> {
    pub(super) fn attention(
        &self,
        x: &Tensor,
        w: &AttnWeights,
        cos: &Tensor,
        sin: &Tensor,
        kv: Option<&mut super::decode::LayerKv>,
    ) -> R<Tensor> {
        let t = x.dim(0)?;
        match (&self.cfg.attention, w) {
            (
                AttentionKind::Standard {
                    heads,
                    kv_heads,
                    head_dim,
                    qk_norm,
                    ..
                },
                AttnWeights::Standard {
                    q,
                    k,
                    v,
                    o,
                    q_bias,
                    k_bias,
                    v_bias,
                    q_norm,
                    k_norm,
                },
            ) => {
                let eps = self.cfg.rms_eps;
                let [mut qx, mut kx, vx] = self.lins(
                    x,
                    [q, k, v],
                    [q_bias.as_ref(), k_bias.as_ref(), v_bias.as_ref()],
                )?;
                if *qk_norm == QkNorm::Full {
                    qx = rms_norm(&qx, q_norm.as_ref().expect("loaded with QkNorm::Full"), eps)?;
                    kx = rms_norm(&kx, k_norm.as_ref().expect("loaded with QkNorm::Full"), eps)?;
                }
                let mut qh = split_heads(&qx, *heads)?;
                let mut kh = split_heads(&kx, *kv_heads)?;
                if *qk_norm == QkNorm::PerHead {
                    qh = rms_norm(
                        &qh,
                        q_norm.as_ref().expect("loaded with QkNorm::PerHead"),
                        eps,
                    )?;
                    kh = rms_norm(
                        &kh,
                        k_norm.as_ref().expect("loaded with QkNorm::PerHead"),
                        eps,
                    )?;
                }
                // The whole head, or its first dims (GLM-4.5's partial rotary).
                let qh = super::glm::rope_leading(&qh, cos, sin)?;
                let kh = super::glm::rope_leading(&kh, cos, sin)?;
                let vh = split_heads(&vx, *kv_heads)?;
                if let Some(kv) = kv {
                    kv.store_prefix(&kh, &vh)?;
                }
                let scale = self
                    .cfg
                    .attn_output_multiplier
                    .unwrap_or(1.0 / (*head_dim as f64).sqrt());
                let out = if qh.device().is_cpu() && qh.dtype() == candle_core::DType::F32 {
                    let (hq, t, d) = qh.dims3()?;
                    let (hkv, _, dv) = vh.dims3()?;
                    let host = |x: &Tensor| x.contiguous()?.flatten_all()?.to_vec1::<f32>();
                    let o = attend_host(
                        &host(&qh)?,
                        &host(&kh)?,
                        &host(&vh)?,
                        HostAttention {
                            heads: hq,
                            kv_heads: hkv,
                            tokens: t,
                            d,
                            dv,
                        },
                        scale as f32,
                        self.cfg.max_attn_value.map(|c| c as f32),
                    );
                    Tensor::from_vec(o, (t, hq * dv), qh.device())?
                } else {
                    let rep = heads / kv_heads;
                    let kh = repeat_kv(&kh, rep)?;
                    let vh = repeat_kv(&vh, rep)?;
                    attend(&qh, &kh, &vh, scale, self.cfg.max_attn_value)?
                };
                self.lin(&out, o, None)
            }
            (
                AttentionKind::Mla {
                    heads,
                    kv_lora_rank,
                    qk_nope_head_dim: nope,
                    qk_rope_head_dim: rope,
                    v_head_dim,
                    rope_interleave,
                    ..
                },
                AttnWeights::Mla {
                    q,
                    q_a,
                    q_a_norm,
                    q_b,
                    kv_a,
                    kv_a_norm,
                    kv_b,
                    o,
                    indexer,
                },
            ) => {
                if kv.is_some() {
                    candle_core::bail!("no key/value cache for multi-head latent attention");
                }
                // The latent norms use eps 1e-6 whatever rms_norm_eps says (as the reference does).
                let latent_eps = 1e-6;
                let q_resid = match (q, q_a, q_a_norm) {
                    (None, Some(a), Some(n)) => {
                        Some(rms_norm(&self.lin(x, a, None)?, n, latent_eps)?)
                    }
                    _ => None,
                };
                let qx = match (q, &q_resid, q_b) {
                    (Some(q), _, _) => self.lin(x, q, None)?,
                    (None, Some(r), Some(b)) => self.lin(r, b, None)?,
                    _ => candle_core::bail!("MLA query weights incomplete"),
                };
                let qh = split_heads(&qx, *heads)?; // [H, T, nope+rope]
                let q_nope = qh.narrow(D::Minus1, 0, *nope)?;
                let q_pe = qh.narrow(D::Minus1, *nope, *rope)?;
                let ckv = self.lin(x, kv_a, None)?;
                let c = ckv.narrow(1, 0, *kv_lora_rank)?;
                let k_pe = ckv.narrow(1, *kv_lora_rank, *rope)?.unsqueeze(0)?; // [1, T, rope]
                let kv = self.lin(&rms_norm(&c, kv_a_norm, latent_eps)?, kv_b, None)?;
                let kvh = split_heads(&kv, *heads)?; // [H, T, nope+v]
                let k_nope = kvh.narrow(D::Minus1, 0, *nope)?;
                let vh = kvh.narrow(D::Minus1, *nope, *v_head_dim)?.contiguous()?;
                let rot = |x: &Tensor| {
                    if *rope_interleave {
                        rope_interleaved(x, cos, sin)
                    } else {
                        rope_half(x, cos, sin)
                    }
                };
                let q_pe = rot(&q_pe.contiguous()?)?;
                let k_pe = rot(&k_pe.contiguous()?)?.broadcast_as((*heads, t, *rope))?;
                let query = Tensor::cat(&[q_nope, q_pe], D::Minus1)?.contiguous()?;
                let key = Tensor::cat(&[k_nope, k_pe], D::Minus1)?.contiguous()?;
                let scale = self.cfg.mla_softmax_factor / ((nope + rope) as f64).sqrt();
                let out = match (indexer, &self.cfg.dsa, &q_resid) {
                    // DeepSeek-V3.2: only the keys its indexer keeps.
                    (Some(iw), Some(ic), Some(r)) => {
                        self.indexed_attention(x, r, iw, ic, (&query, &key, &vh), scale, cos, sin)?
                    }
                    (None, None, _) => attend(&query, &key, &vh, scale, None)?,
                    _ => candle_core::bail!("DeepSeek-V3.2 indexer weights incomplete"),
                };
                self.lin(&out, o, None)
            }
            _ => candle_core::bail!("attention weights do not match the attention kind"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The host attention equals candle's [`attend`] on the repeated keys
    /// and values: grouped queries, several query blocks and a partial one,
    /// value width ≠ key width, with and without a cap.
    #[test]
    fn host_attention_is_candles_attention() {
        let mut rng = Rng(5);
        for (heads, kv_heads, t, d, dv, softcap) in [
            (4, 2, 150, 16, 8, None),
            (3, 3, 64, 8, 8, Some(2.0f32)),
            (2, 1, 1, 4, 4, None),
            (6, 2, 200, 32, 24, Some(30.0)),
        ] {
            let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform(2.0)).collect() };
            let (q, k, v) = (r(heads * t * d), r(kv_heads * t * d), r(kv_heads * t * dv));
            let scale = 1.0 / (d as f64).sqrt();
            let got = attend_host(
                &q,
                &k,
                &v,
                HostAttention {
                    heads,
                    kv_heads,
                    tokens: t,
                    d,
                    dv,
                },
                scale as f32,
                softcap,
            );
            let dev = Device::Cpu;
            let qt = Tensor::from_vec(q, (heads, t, d), &dev).unwrap();
            let kt = Tensor::from_vec(k, (kv_heads, t, d), &dev).unwrap();
            let vt = Tensor::from_vec(v, (kv_heads, t, dv), &dev).unwrap();
            let rep = heads / kv_heads;
            let want = attend(
                &qt,
                &repeat_kv(&kt, rep).unwrap(),
                &repeat_kv(&vt, rep).unwrap(),
                scale,
                softcap.map(f64::from),
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            assert_eq!(got.len(), want.len());
            assert_eq!(got.len(), t * heads * dv);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(g.is_finite() && w.is_finite(), "{i}: {g} vs {w}");
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{heads}/{kv_heads} heads, T {t}, [{i}]: {g} vs {w}"
                );
            }
        }
    }
}
