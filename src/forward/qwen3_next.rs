//! Qwen3-Next (`qwen3_next`) and Qwen3.5-MoE (`qwen3_5_moe`,
//! `qwen3_5_moe_text`): the hybrid stack of Gated DeltaNet (linear
//! attention) and gated full-attention layers. References: transformers 5.24
//! `modeling_qwen3_next.py`, `modeling_qwen3_5_moe.py`.
//!
//! - layers: `layer_types` (`linear_attention` / `full_attention`), or every
//!   `full_attention_interval`-th layer (default 4) full, the others linear.
//! - norms: every RMSNorm is zero-centred, `x̂ · (1 + w)` (input,
//!   post-attention, q/k and final norms; loaded here as `1 + w` so the
//!   shared RMSNorm applies them); the Gated DeltaNet's output norm is not:
//!   `x̂ · w · silu(z)`.
//! - Gated DeltaNet: projections (Qwen3-Next `in_proj_qkvz`, `in_proj_ba`,
//!   grouped per key head: for key head `g`, `[q_g | k_g | v_g | z_g]` with
//!   the `r = value_heads / key_heads` value heads of the group, and
//!   `[b_g | a_g]`; Qwen3.5 `in_proj_qkv`, `in_proj_z`, `in_proj_b`,
//!   `in_proj_a`, in plain order) → a causal depthwise conv (`conv1d`,
//!   kernel `linear_conv_kernel_dim`, zero history) over `[q | k | v]`,
//!   SiLU → q and k L2-normed (eps 1e-6), q × `key_dim^−½`; `β = sigmoid(b)`,
//!   `g = −exp(A_log) · softplus(a + dt_bias)`; value head `h` reads key head
//!   `h / r`; the gated delta rule, recurrently per token from a zero state
//!   `S [key_dim, value_dim]`: `S ← exp(g)·S`, `S ← S + k ⊗ β(v − Sᵀk)`,
//!   `o = Sᵀq` (in f32; transformers' chunked torch fallback computes the same
//!   sums in another order) → the gated RMSNorm → `out_proj`.
//! - full attention: `q_proj` emits, per head, the query and a gate of
//!   `head_dim` each; q/k RMSNorm per head, partial rotary (the leading
//!   `partial_rotary_factor` of each head, default 0.25), causal softmax
//!   attention, the output × `sigmoid(gate)` before `o_proj`.
//! - MoE (the shared code path): softmax, top-k, renormalised
//!   (Qwen3-Next: `norm_topk_prob`), plus the shared expert ×
//!   `sigmoid(shared_expert_gate · x)`; Qwen3-Next's `mlp_only_layers` are dense.
//!
//! The forward pass processes whole prompts; there is no decoding state.

use candle_core::{DType, Device, Tensor};

use super::attention::{attend, repeat_kv, split_heads};
use super::config::AttentionKind;
use super::glm::rope_leading;
use super::observer::{Observer, Wants};
use super::weights::{ce, load, AttnWeights, LayerWeights, MlpWeights};
use super::{rms_norm, Forward, R};
use crate::error::{Error, Result};
use crate::model::config::limits;
use crate::model::{Config, Family, Model};

/// Largest causal-conv kernel accepted (`linear_conv_kernel_dim`; released models use 4).
const CONV_KERNEL: usize = 1 << 10;

/// The hybrid stack's settings beyond [`super::config::ForwardConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct HybridConfig {
    /// Per decoder layer: Gated DeltaNet (`true`) or full attention.
    pub linear: Vec<bool>,
    /// `linear_num_key_heads`.
    pub key_heads: usize,
    /// `linear_num_value_heads` (a multiple of the key heads).
    pub value_heads: usize,
    /// `linear_key_head_dim`.
    pub key_dim: usize,
    /// `linear_value_head_dim`.
    pub value_dim: usize,
    /// `linear_conv_kernel_dim`.
    pub conv_kernel: usize,
}

impl HybridConfig {
    /// Reads the hybrid keys of `c` (the text config), with transformers' defaults.
    pub fn from_config(c: &Config, num_layers: usize) -> Result<HybridConfig> {
        let linear = match c.layer_flags(num_layers, "linear_attention", "full_attention")? {
            Some(flags) => flags,
            None => {
                let every = c
                    .usize_opt_in("full_attention_interval", 1, usize::MAX)?
                    .unwrap_or(4);
                (0..num_layers).map(|i| (i + 1) % every != 0).collect()
            }
        };
        let key_heads = c
            .usize_opt_in("linear_num_key_heads", 1, limits::HEADS)?
            .unwrap_or(16);
        let value_heads = c
            .usize_opt_in("linear_num_value_heads", 1, limits::HEADS)?
            .unwrap_or(32);
        if value_heads % key_heads != 0 {
            return Err(Error::key(
                c.path(),
                "linear_num_value_heads",
                format!(
                    "is {value_heads}, must be a multiple of linear_num_key_heads ({key_heads}): \
                     each key head serves a whole group of value heads"
                ),
            ));
        }
        let key_dim = c
            .usize_opt_in("linear_key_head_dim", 1, limits::HEAD_DIM)?
            .unwrap_or(128);
        let value_dim = c
            .usize_opt_in("linear_value_head_dim", 1, limits::HEAD_DIM)?
            .unwrap_or(128);
        for (key, heads, dim) in [
            ("linear_key_head_dim", key_heads, key_dim),
            ("linear_value_head_dim", value_heads, value_dim),
        ] {
            // q, k, v and z together: 2·nk·dk + 2·nv·dv.
            if heads
                .checked_mul(dim)
                .and_then(|w| w.checked_mul(4))
                .is_none_or(|w| w > limits::WIDTH)
            {
                return Err(Error::key(
                    c.path(),
                    key,
                    format!(
                        "is {dim}: the linear-attention projections of {heads} heads × {dim} \
                         exceed the limit of {} for one projection",
                        limits::WIDTH
                    ),
                ));
            }
        }
        let conv_kernel = c
            .usize_opt_in("linear_conv_kernel_dim", 1, CONV_KERNEL)?
            .unwrap_or(4);
        if c.bool_opt("attention_bias")?.unwrap_or(false) {
            return Err(Error::key(
                c.path(),
                "attention_bias",
                "is true; the Qwen3-Next / Qwen3.5 forward pass reads unbiased projections \
                 (as the released models are)",
            ));
        }
        if let Some(ty) = c
            .get("rope_parameters")
            .or_else(|| c.get("rope_scaling"))
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        {
            if ty.as_str() != Some("default") {
                return Err(Error::key(
                    c.path(),
                    "rope_parameters.rope_type",
                    format!("is {ty}; the Qwen3-Next / Qwen3.5 forward pass reads `default`"),
                ));
            }
        }
        Ok(HybridConfig {
            linear,
            key_heads,
            value_heads,
            key_dim,
            value_dim,
            conv_kernel,
        })
    }

    fn conv_channels(&self) -> usize {
        2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim
    }
}

/// Whether `family` runs the hybrid forward pass of this module.
pub(super) fn is_hybrid(family: Family) -> bool {
    family == Family::Qwen3Next || family == Family::Qwen35Moe
}

/// The rotary dims of a head: `partial_rotary_factor` as
/// [`super::glm::rotary_dim`] reads it, with these families' default 0.25.
pub(super) fn rotary_dim(c: &Config, head_dim: usize) -> Result<Option<usize>> {
    let given = c.get("partial_rotary_factor").is_some()
        || c.get("rope_parameters.partial_rotary_factor").is_some();
    if given {
        return super::glm::rotary_dim(c, head_dim);
    }
    // Python's int(head_dim × 0.25).
    let dim = head_dim / 4;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(Error::key(
            c.path(),
            "head_dim",
            format!(
                "is {head_dim}: the default partial_rotary_factor 0.25 would rotate {dim} dims, \
                 which must be even and not 0"
            ),
        ));
    }
    Ok(Some(dim))
}

/// A zero-centred RMSNorm weight `w` as the factor it applies, `1 + w`
/// (these families), or `w` unchanged (the others).
pub(super) fn norm_weight(family: Family, w: Tensor, name: &str) -> Result<Tensor> {
    if is_hybrid(family) {
        (w + 1.0).map_err(ce(name))
    } else {
        Ok(w)
    }
}

/// The input projections of a Gated DeltaNet layer.
pub enum DeltaNetProjections {
    /// Qwen3-Next: `in_proj_qkvz`, `in_proj_ba`, grouped per key head.
    Grouped {
        /// `[2·nk·dk + 2·nv·dv, hidden]`.
        qkvz: Tensor,
        /// `[2·nv, hidden]`.
        ba: Tensor,
    },
    /// Qwen3.5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Separate {
        /// `[2·nk·dk + nv·dv, hidden]`: q, k, v in order.
        qkv: Tensor,
        /// `[nv·dv, hidden]`.
        z: Tensor,
        /// `[nv, hidden]`.
        b: Tensor,
        /// `[nv, hidden]`.
        a: Tensor,
    },
}

/// One Gated DeltaNet layer's weights (the vectors on the host, f32).
pub struct DeltaNetWeights {
    /// Input projections.
    pub proj: DeltaNetProjections,
    /// Causal depthwise conv weights `[channels, kernel]`.
    pub conv: Vec<f32>,
    /// Conv bias `[channels]`, if stored.
    pub conv_bias: Option<Vec<f32>>,
    /// `A_log` `[value_heads]`.
    pub a_log: Vec<f32>,
    /// `dt_bias` `[value_heads]`.
    pub dt_bias: Vec<f32>,
    /// The gated RMSNorm's weight `[value_dim]` (applied as is, not `1 + w`).
    pub norm: Vec<f32>,
    /// `out_proj` `[hidden, value_heads·value_dim]`.
    pub out: Tensor,
}

/// A vector (or small tensor) of `model` as f32 with the expected shape, finite.
fn host(model: &Model, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let w = model.weights();
    w.expect_shape(name, shape)?;
    let view = w.tensor(name)?;
    let v = view.to_f32_vec();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            path: view.path.to_path_buf(),
            tensor: name.to_string(),
        });
    }
    Ok(v)
}

/// Loads the token mixer of layer `layer` (prefix `p`, `….layers.{layer}`):
/// a Gated DeltaNet, or the gated attention's projections and (`1 + w`) q/k norms.
pub(super) fn load_mixer(
    model: &Model,
    cfg: &super::config::ForwardConfig,
    p: &str,
    layer: usize,
    device: &Device,
    t: bool,
) -> Result<AttnWeights> {
    let Some(hc) = &cfg.hybrid else {
        return Err(Error::Usage("not a Qwen3-Next / Qwen3.5 model".into()));
    };
    let w = model.weights();
    let h = model.info.hidden_size;
    if !hc.linear.get(layer).copied().unwrap_or(false) {
        let AttentionKind::Standard {
            heads,
            kv_heads,
            head_dim,
            ..
        } = cfg.attention
        else {
            return Err(Error::Usage("hybrid models have standard attention".into()));
        };
        let a = format!("{p}.self_attn");
        let get = |n: &str, shape: &[usize]| {
            let name = format!("{a}.{n}");
            w.expect_shape(&name, shape)?;
            load(w, &name, device, t)
        };
        let norm = |n: &str| {
            let name = format!("{a}.{n}");
            w.expect_shape(&name, &[head_dim])?;
            norm_weight(cfg.family, load(w, &name, device, t)?, &name)
        };
        return Ok(AttnWeights::Standard {
            q: get("q_proj.weight", &[2 * heads * head_dim, h])?,
            k: get("k_proj.weight", &[kv_heads * head_dim, h])?,
            v: get("v_proj.weight", &[kv_heads * head_dim, h])?,
            o: get("o_proj.weight", &[h, heads * head_dim])?,
            q_bias: None,
            k_bias: None,
            v_bias: None,
            q_norm: Some(norm("q_norm.weight")?),
            k_norm: Some(norm("k_norm.weight")?),
        });
    }
    let a = format!("{p}.linear_attn");
    let (nk, nv, dk, dv) = (hc.key_heads, hc.value_heads, hc.key_dim, hc.value_dim);
    let get = |n: &str, shape: &[usize]| {
        let name = format!("{a}.{n}");
        w.expect_shape(&name, shape)?;
        load(w, &name, device, t)
    };
    let proj = if w.contains(&format!("{a}.in_proj_qkvz.weight")) {
        DeltaNetProjections::Grouped {
            qkvz: get("in_proj_qkvz.weight", &[2 * nk * dk + 2 * nv * dv, h])?,
            ba: get("in_proj_ba.weight", &[2 * nv, h])?,
        }
    } else {
        DeltaNetProjections::Separate {
            qkv: get("in_proj_qkv.weight", &[2 * nk * dk + nv * dv, h])?,
            z: get("in_proj_z.weight", &[nv * dv, h])?,
            b: get("in_proj_b.weight", &[nv, h])?,
            a: get("in_proj_a.weight", &[nv, h])?,
        }
    };
    let ch = hc.conv_channels();
    let conv_bias_name = format!("{a}.conv1d.bias");
    Ok(AttnWeights::GatedDeltaNet(Box::new(DeltaNetWeights {
        proj,
        conv: host(
            model,
            &format!("{a}.conv1d.weight"),
            &[ch, 1, hc.conv_kernel],
        )?,
        conv_bias: if w.contains(&conv_bias_name) {
            Some(host(model, &conv_bias_name, &[ch])?)
        } else {
            None
        },
        a_log: host(model, &format!("{a}.A_log"), &[nv])?,
        dt_bias: host(model, &format!("{a}.dt_bias"), &[nv])?,
        norm: host(model, &format!("{a}.norm.weight"), &[dv])?,
        out: get("out_proj.weight", &[h, nv * dv])?,
    })))
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torch's `softplus` (beta 1, threshold 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x / sqrt(Σx² + 1e-6)` in place (the FLA-compatible `l2norm`).
fn l2norm(x: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss + 1e-6).sqrt();
    for v in x {
        *v *= inv;
    }
}

/// The inputs of the gated delta rule for one prompt, on the host.
struct DeltaInputs {
    /// L2-normed, scaled queries `[T, nk, dk]`.
    q: Vec<f32>,
    /// L2-normed keys `[T, nk, dk]`.
    k: Vec<f32>,
    /// Values `[T, nv, dv]`.
    v: Vec<f32>,
    /// Log decays `[T, nv]`.
    g: Vec<f32>,
    /// Write strengths `[T, nv]`.
    beta: Vec<f32>,
}

/// The gated delta rule, recurrently per value head (heads in parallel):
/// the output `[T, nv, dv]`.
fn gated_delta_rule(hc: &HybridConfig, t: usize, d: &DeltaInputs) -> Vec<f32> {
    use rayon::prelude::*;
    let (nk, nv, dk, dv) = (hc.key_heads, hc.value_heads, hc.key_dim, hc.value_dim);
    let r = nv / nk;
    let per_head: Vec<Vec<f32>> = (0..nv)
        .into_par_iter()
        .map(|h| {
            let kh = h / r;
            let mut s = vec![0f32; dk * dv];
            let mut out = vec![0f32; t * dv];
            let mut delta = vec![0f32; dv];
            for tok in 0..t {
                let q = &d.q[(tok * nk + kh) * dk..][..dk];
                let k = &d.k[(tok * nk + kh) * dk..][..dk];
                let v = &d.v[(tok * nv + h) * dv..][..dv];
                let decay = d.g[tok * nv + h].exp();
                let beta = d.beta[tok * nv + h];
                for x in s.iter_mut() {
                    *x *= decay;
                }
                // delta = β (v − Sᵀk)
                delta.copy_from_slice(v);
                for (i, &ki) in k.iter().enumerate() {
                    for (dj, &sij) in delta.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
                        *dj -= sij * ki;
                    }
                }
                for dj in delta.iter_mut() {
                    *dj *= beta;
                }
                // S += k ⊗ delta; o = Sᵀq
                let o = &mut out[tok * dv..(tok + 1) * dv];
                for (i, (&ki, &qi)) in k.iter().zip(q).enumerate() {
                    let row = &mut s[i * dv..(i + 1) * dv];
                    for ((sij, &dj), oj) in row.iter_mut().zip(&delta).zip(o.iter_mut()) {
                        *sij += ki * dj;
                        *oj += *sij * qi;
                    }
                }
            }
            out
        })
        .collect();
    let mut out = vec![0f32; t * nv * dv];
    for (h, o) in per_head.iter().enumerate() {
        for tok in 0..t {
            out[(tok * nv + h) * dv..][..dv].copy_from_slice(&o[tok * dv..(tok + 1) * dv]);
        }
    }
    out
}

fn to_host(x: &Tensor) -> R<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl Forward<'_> {
    fn hybrid_cfg(&self) -> &HybridConfig {
        self.cfg
            .hybrid
            .as_ref()
            .expect("called for Qwen3-Next / Qwen3.5 models only")
    }

    /// One decoder layer: `h + mixer(norm(h))`, then `+ mlp(norm(h))`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hybrid_layer(
        &self,
        layer: usize,
        prompt: usize,
        h: &Tensor,
        lw: &LayerWeights,
        cos: &Tensor,
        sin: &Tensor,
        wants: Wants,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_eps;
        let what = format!("layer {layer}");
        let a = rms_norm(h, &lw.attn_norm, eps).map_err(ce(&what))?;
        let mixed = match &lw.attn {
            AttnWeights::GatedDeltaNet(d) => self.gated_delta_net(d, &a),
            w => self.gated_attention(&a, w, cos, sin),
        }
        .map_err(ce(&what))?;
        let h = (h + mixed).map_err(ce(&what))?;
        let m = rms_norm(&h, &lw.mlp_norm, eps).map_err(ce(&what))?;
        let y = match &lw.mlp {
            MlpWeights::Dense(f) => self.ffn(f, &m).map_err(ce(&what))?.1,
            MlpWeights::Moe { .. } => self.moe(layer, prompt, &m, &lw.mlp, wants, observer)?,
        };
        (h + y).map_err(ce(&what))
    }

    /// Gated full attention on `x` `[T, hidden]` (already normed).
    fn gated_attention(
        &self,
        x: &Tensor,
        w: &AttnWeights,
        cos: &Tensor,
        sin: &Tensor,
    ) -> R<Tensor> {
        let (
            AttentionKind::Standard {
                heads,
                kv_heads,
                head_dim,
                ..
            },
            AttnWeights::Standard {
                q,
                k,
                v,
                o,
                q_norm: Some(q_norm),
                k_norm: Some(k_norm),
                ..
            },
        ) = (&self.cfg.attention, w)
        else {
            candle_core::bail!("gated attention weights incomplete")
        };
        let (heads, kv_heads, hd) = (*heads, *kv_heads, *head_dim);
        let eps = self.cfg.rms_eps;
        let t = x.dim(0)?;
        // Per head: [query | gate], head_dim each.
        let qg = self.lin(x, q, None)?.reshape((t, heads, 2 * hd))?;
        let qh = qg.narrow(2, 0, hd)?.transpose(0, 1)?.contiguous()?;
        let gate = qg
            .narrow(2, hd, hd)?
            .contiguous()?
            .reshape((t, heads * hd))?;
        let qh = rope_leading(&rms_norm(&qh, q_norm, eps)?, cos, sin)?;
        let kh = split_heads(&self.lin(x, k, None)?, kv_heads)?;
        let kh = rope_leading(&rms_norm(&kh, k_norm, eps)?, cos, sin)?;
        let rep = heads / kv_heads;
        let kh = repeat_kv(&kh, rep)?;
        let vh = repeat_kv(&split_heads(&self.lin(x, v, None)?, kv_heads)?, rep)?;
        let out = attend(&qh, &kh, &vh, 1.0 / (hd as f64).sqrt(), None)?;
        let out = (out * candle_nn::ops::sigmoid(&gate)?)?;
        self.lin(&out, o, None)
    }

    /// A Gated DeltaNet layer on `x` `[T, hidden]` (already normed).
    fn gated_delta_net(&self, d: &DeltaNetWeights, x: &Tensor) -> R<Tensor> {
        let hc = self.hybrid_cfg();
        let (nk, nv, dk, dv) = (hc.key_heads, hc.value_heads, hc.key_dim, hc.value_dim);
        let r = nv / nk;
        let t = x.dim(0)?;
        let (kd, vd) = (nk * dk, nv * dv);
        let ch = hc.conv_channels();
        // mixed [T, q | k | v], z [T, nv·dv], b and a [T, nv].
        let (mixed, z, b, a) = match &d.proj {
            DeltaNetProjections::Separate { qkv, z, b, a } => (
                to_host(&self.lin(x, qkv, None)?)?,
                to_host(&self.lin(x, z, None)?)?,
                to_host(&self.lin(x, b, None)?)?,
                to_host(&self.lin(x, a, None)?)?,
            ),
            DeltaNetProjections::Grouped { qkvz, ba } => {
                let p = to_host(&self.lin(x, qkvz, None)?)?;
                let pba = to_host(&self.lin(x, ba, None)?)?;
                let (gw, rv) = (2 * dk + 2 * r * dv, r * dv);
                let mut mixed = vec![0f32; t * ch];
                let mut z = vec![0f32; t * vd];
                let mut b = vec![0f32; t * nv];
                let mut a = vec![0f32; t * nv];
                for tok in 0..t {
                    let m = &mut mixed[tok * ch..(tok + 1) * ch];
                    for g in 0..nk {
                        let src = &p[(tok * nk + g) * gw..][..gw];
                        m[g * dk..][..dk].copy_from_slice(&src[..dk]);
                        m[kd + g * dk..][..dk].copy_from_slice(&src[dk..2 * dk]);
                        m[2 * kd + g * rv..][..rv].copy_from_slice(&src[2 * dk..2 * dk + rv]);
                        z[tok * vd + g * rv..][..rv].copy_from_slice(&src[2 * dk + rv..]);
                        let sba = &pba[(tok * nk + g) * 2 * r..][..2 * r];
                        b[tok * nv + g * r..][..r].copy_from_slice(&sba[..r]);
                        a[tok * nv + g * r..][..r].copy_from_slice(&sba[r..]);
                    }
                }
                (mixed, z, b, a)
            }
        };
        // Causal depthwise conv (zero history), SiLU.
        let kern = hc.conv_kernel;
        let mut conv = vec![0f32; t * ch];
        for tok in 0..t {
            for c in 0..ch {
                let w = &d.conv[c * kern..(c + 1) * kern];
                let mut acc = d.conv_bias.as_ref().map_or(0.0, |b| b[c]);
                for (j, &wj) in w.iter().enumerate() {
                    // Input position tok + j − (kern − 1).
                    if let Some(src) = (tok + j).checked_sub(kern - 1) {
                        acc += wj * mixed[src * ch + c];
                    }
                }
                conv[tok * ch + c] = silu(acc);
            }
        }
        let scale = 1.0 / (dk as f32).sqrt();
        let mut q = vec![0f32; t * kd];
        let mut k = vec![0f32; t * kd];
        for tok in 0..t {
            let row = &conv[tok * ch..(tok + 1) * ch];
            q[tok * kd..(tok + 1) * kd].copy_from_slice(&row[..kd]);
            k[tok * kd..(tok + 1) * kd].copy_from_slice(&row[kd..2 * kd]);
        }
        for head in q.chunks_mut(dk) {
            l2norm(head);
            for v in head {
                *v *= scale;
            }
        }
        for head in k.chunks_mut(dk) {
            l2norm(head);
        }
        let v: Vec<f32> = (0..t)
            .flat_map(|tok| conv[tok * ch + 2 * kd..(tok + 1) * ch].iter().copied())
            .collect();
        let mut g = vec![0f32; t * nv];
        let mut beta = vec![0f32; t * nv];
        for i in 0..t * nv {
            let h = i % nv;
            beta[i] = sigmoid(b[i]);
            g[i] = -d.a_log[h].exp() * softplus(a[i] + d.dt_bias[h]);
        }
        let mut core = gated_delta_rule(hc, t, &DeltaInputs { q, k, v, g, beta });
        // Gated RMSNorm per (token, value head): x̂ · w · silu(z).
        let eps = self.cfg.rms_eps as f32;
        for (o, zs) in core.chunks_mut(dv).zip(z.chunks(dv)) {
            let ms = o.iter().map(|v| v * v).sum::<f32>() / dv as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((v, &w), &zv) in o.iter_mut().zip(&d.norm).zip(zs) {
                *v = *v * inv * w * silu(zv);
            }
        }
        let o = Tensor::from_vec(core, (t, vd), x.device())?;
        self.lin(&o, &d.out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};
    use std::path::Path;

    fn cfg(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<HybridConfig> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/families/qwen3_next/config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        let c = Config::parse(Path::new("m/config.json"), v.to_string().as_bytes())?;
        HybridConfig::from_config(&c, 4)
    }

    #[test]
    fn layer_types_and_interval() {
        let c = cfg(|_| {}).unwrap();
        assert_eq!(c.linear, [true, true, true, false]);
        assert_eq!(
            (
                c.key_heads,
                c.value_heads,
                c.key_dim,
                c.value_dim,
                c.conv_kernel
            ),
            (2, 4, 8, 8, 4)
        );
        // No layer_types: every full_attention_interval-th layer is full (default 4).
        let c = cfg(|c| {
            c.remove("layer_types");
            c.insert("full_attention_interval".into(), 2.into());
        })
        .unwrap();
        assert_eq!(c.linear, [true, false, true, false]);
        let c = cfg(|c| {
            c.remove("layer_types");
        })
        .unwrap();
        assert_eq!(c.linear, [true, true, true, false]);
    }

    #[test]
    fn bad_values_are_named() {
        let err = |edit: fn(&mut Map<String, Value>), needles: &[&str]| {
            let e = cfg(edit).unwrap_err().to_string();
            assert!(e.contains("m/config.json"), "{e}");
            for n in needles {
                assert!(e.contains(n), "`{n}` not in {e}");
            }
        };
        err(
            |c| {
                c["layer_types"] = serde_json::json!(["full_attention"]);
            },
            &["`layer_types`", "4 layer types", "1 entries"],
        );
        err(
            |c| {
                c["layer_types"] = serde_json::json!(["full_attention", "mamba", "x", "y"]);
            },
            &["`layer_types`", "mamba"],
        );
        err(
            |c| {
                c["linear_num_value_heads"] = 3.into();
            },
            &["`linear_num_value_heads`", "is 3", "multiple"],
        );
        err(
            |c| {
                c["linear_key_head_dim"] = 0.into();
            },
            &["`linear_key_head_dim`", "is 0"],
        );
        err(
            |c| {
                c["linear_conv_kernel_dim"] = (1u64 << 40).into();
            },
            &["`linear_conv_kernel_dim`"],
        );
        err(
            |c| {
                c["attention_bias"] = true.into();
            },
            &["`attention_bias`"],
        );
        err(
            |c| {
                c["rope_parameters"]["rope_type"] = "yarn".into();
            },
            &["`rope_parameters.rope_type`", "yarn"],
        );
    }

    #[test]
    fn rotary_dim_defaults_to_a_quarter_of_the_head() {
        let parse =
            |json: &str| Config::parse(Path::new("m/config.json"), json.as_bytes()).unwrap();
        assert_eq!(rotary_dim(&parse("{}"), 256).unwrap(), Some(64));
        assert_eq!(
            rotary_dim(
                &parse(r#"{"rope_parameters": {"partial_rotary_factor": 0.5}}"#),
                16
            )
            .unwrap(),
            Some(8)
        );
        let e = rotary_dim(&parse("{}"), 12).unwrap_err().to_string();
        assert!(e.contains("`head_dim`") && e.contains("rotate 3"), "{e}");
    }

    /// The recurrence against the gated delta rule written out for one head
    /// and two tokens.
    #[test]
    fn gated_delta_rule_by_hand() {
        let hc = HybridConfig {
            linear: vec![true],
            key_heads: 1,
            value_heads: 1,
            key_dim: 2,
            value_dim: 1,
            conv_kernel: 1,
        };
        let d = DeltaInputs {
            q: vec![1.0, 0.0, 0.5, 0.5],
            k: vec![0.6, 0.8, 1.0, 0.0],
            v: vec![2.0, -1.0],
            g: vec![0.0, (0.5f32).ln()],
            beta: vec![0.5, 1.0],
        };
        let out = gated_delta_rule(&hc, 2, &d);
        // t0: S = 0.5·2·k0 = [0.6, 0.8]; o = S·q0 = 0.6.
        // t1: S = 0.5·S = [0.3, 0.4]; Sᵀk1 = 0.3; delta = 1·(−1 − 0.3) = −1.3;
        //     S = [0.3 − 1.3, 0.4] = [−1.0, 0.4]; o = −0.5 + 0.2 = −0.3.
        assert!((out[0] - 0.6).abs() < 1e-6, "{out:?}");
        assert!((out[1] + 0.3).abs() < 1e-6, "{out:?}");
    }
}
