//! Llama 4 text (`llama4_text`, and the text model of the multimodal
//! `llama4` releases under `language_model.`; transformers 5.24
//! `modeling_llama4.py`): what differs from the shared decoder layer.
//!
//! - attention: on the rope layers (`no_rope_layers[i] == 1`) the complex
//!   (interleaved-pair) rotary embedding with llama3-scaled frequencies
//!   (`rope_parameters`/`rope_scaling` of type `llama3`), then, with
//!   `use_qk_norm`, an L2 norm without weight on q and k,
//!   `x / sqrt(mean(x²) + rms_norm_eps)`; on the no-rope layers neither, but with
//!   `attn_temperature_tuning` the queries times
//!   `log1p(floor((pos + 1) / floor_scale)) · attn_scale + 1`. Layers of type
//!   `chunked_attention` (`layer_types`; by default the rope layers when
//!   `attention_chunk_size` is set) see the keys `j ≤ i` of their own chunk
//!   (`j / chunk == i / chunk`), the others every `j ≤ i`. Scale `head_dim^−½`.
//! - MoE layers (`moe_layers`, else every `interleave_moe_layer_step`-th):
//!   router logits `x·Wᵀ`, top-k on the logits, weight `sigmoid(logit)` of
//!   each kept expert, which scales the expert's INPUT: the block's output
//!   is `shared(x) + Σ expert_e(w_e · x)`. Experts are `gate_up_proj [E, H,
//!   2I]` (gate the first I columns) and `down_proj [E, I, H]`; the other
//!   layers are a dense SwiGLU of width `intermediate_size_mlp`.
//!
//! What the observer gets on an MoE layer: `scores` = the sigmoid of every
//! logit (the weight each expert would get if kept), `weights` = those of the
//! kept experts, `expert_outputs` and `activations` = every expert on the
//! unscaled layer input (as for every family: the expert as a function,
//! before routing), `shared_output` = the shared expert's output. Since the
//! weight scales the input of a non-linear expert, `Σ w · expert_outputs` is
//! not the block's output here.

use candle_core::{Device, Tensor, D};
use serde_json::Value;

use super::attention::{query_block, repeat_kv, rope_interleaved, split_heads};
use super::observer::{MoeObservation, Observer, Wants};
use super::weights::{ce, AttnWeights, LayerWeights, MlpWeights};
use super::{rms_norm, Forward, R};
use crate::error::{Error, Result};
use crate::model::Config;

/// Llama 4 settings beyond the shared [`super::config::ForwardConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct Llama4Config {
    /// Per decoder layer: rotary embeddings (and the q/k L2 norm) apply
    /// (`no_rope_layers[i] == 1`).
    pub rope: Vec<bool>,
    /// Per decoder layer: the attention chunk of a `chunked_attention`
    /// layer, `None` for full causal attention.
    pub chunk: Vec<Option<usize>>,
    /// `use_qk_norm`: L2 norm of q and k on the rope layers.
    pub qk_norm: bool,
    /// `attn_temperature_tuning` on the no-rope layers: `(floor_scale, attn_scale)`.
    pub temperature: Option<(f32, f32)>,
    /// Rotary inverse frequencies (`head_dim / 2`), llama3-scaled when `rope_type` is `llama3`.
    pub inv_freq: Vec<f32>,
}

/// transformers' `Llama4TextConfig.default_theta`.
const DEFAULT_THETA: f64 = 500000.0;

fn bad(c: &Config, key: &str, why: String) -> Error {
    Error::key(c.path(), key, why)
}

impl Llama4Config {
    /// Reads the Llama 4 keys of `c` (the text config; defaults as
    /// transformers' `Llama4TextConfig`). `theta` is the rope base read by
    /// the shared code (10000 when absent, where Llama 4's default is 500000).
    pub fn from_config(
        c: &Config,
        head_dim: usize,
        theta: f64,
        num_layers: usize,
    ) -> Result<Llama4Config> {
        let has_theta = c.get("rope_theta").is_some()
            || ["rope_parameters", "rope_scaling"]
                .iter()
                .any(|k| c.get(k).and_then(|p| p.get("rope_theta")).is_some());
        let theta = if has_theta { theta } else { DEFAULT_THETA };
        // `no_rope_layers`: 1 = rope layer; absent or empty: a no-rope layer
        // every `no_rope_layer_interval` layers.
        let rope: Vec<bool> = match c.get("no_rope_layers") {
            Some(Value::Array(a)) if !a.is_empty() => {
                if a.len() < num_layers {
                    return Err(bad(
                        c,
                        "no_rope_layers",
                        format!(
                            "has {} entries, fewer than num_hidden_layers ({num_layers})",
                            a.len()
                        ),
                    ));
                }
                a[..num_layers]
                    .iter()
                    .map(|v| match v.as_u64() {
                        Some(0) => Ok(false),
                        Some(1) => Ok(true),
                        _ => Err(bad(
                            c,
                            "no_rope_layers",
                            format!("has {v}; expected 1 (rope layer) or 0 (no-rope layer)"),
                        )),
                    })
                    .collect::<Result<_>>()?
            }
            None | Some(Value::Null) | Some(Value::Array(_)) => {
                let every = c
                    .usize_opt_in("no_rope_layer_interval", 1, usize::MAX)?
                    .unwrap_or(4);
                (0..num_layers).map(|i| (i + 1) % every != 0).collect()
            }
            Some(v) => {
                return Err(bad(
                    c,
                    "no_rope_layers",
                    format!("is {v}, expected a list of 0/1"),
                ))
            }
        };
        // `null` (not absent: `Config::get` hides nulls): no chunked attention.
        let chunk_size = match c.map().get("attention_chunk_size") {
            Some(Value::Null) => None,
            _ => Some(
                c.usize_opt_in("attention_chunk_size", 1, usize::MAX)?
                    .unwrap_or(8192),
            ),
        };
        let chunked: Vec<bool> = match c.get("layer_types") {
            None | Some(Value::Null) => rope.iter().map(|&r| r && chunk_size.is_some()).collect(),
            Some(Value::Array(a)) if a.len() == num_layers => a
                .iter()
                .map(|v| match v.as_str() {
                    Some("chunked_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(bad(
                        c,
                        "layer_types",
                        format!("has {v}; expected \"chunked_attention\" or \"full_attention\""),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(bad(
                    c,
                    "layer_types",
                    format!(
                        "is not a list of {num_layers} layer types (num_hidden_layers), found {}",
                        match v {
                            Value::Array(a) => format!("{} entries", a.len()),
                            other => other.to_string(),
                        }
                    ),
                ))
            }
        };
        let chunk = chunked
            .iter()
            .map(|&ch| match (ch, chunk_size) {
                (false, _) => Ok(None),
                (true, Some(s)) => Ok(Some(s)),
                (true, None) => Err(bad(
                    c,
                    "attention_chunk_size",
                    "is null, but layer_types has chunked_attention layers".to_string(),
                )),
            })
            .collect::<Result<_>>()?;
        // Released Scout configs write `attn_temperature_tuning: 4` (truthy).
        let tuning = match c.get("attn_temperature_tuning") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => x != 0.0,
                _ => {
                    return Err(bad(
                        c,
                        "attn_temperature_tuning",
                        format!("is {v}, expected true or false"),
                    ))
                }
            },
        };
        let floor_scale = c
            .f64_opt_where("floor_scale", "a positive finite number", |v| v > 0.0)?
            .unwrap_or(8192.0);
        let attn_scale = c
            .f64_opt_where("attn_scale", "a finite number", |_| true)?
            .unwrap_or(0.1);
        Ok(Llama4Config {
            rope,
            chunk,
            qk_norm: c.bool_opt("use_qk_norm")?.unwrap_or(true),
            temperature: tuning.then_some((floor_scale as f32, attn_scale as f32)),
            inv_freq: inv_freq(c, head_dim, theta)?,
        })
    }

    /// `cos`, `sin` `[tokens, head_dim/2]` for positions `0..tokens`.
    pub(super) fn rope_tables(&self, tokens: usize, device: &Device) -> R<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for t in 0..tokens {
            for &f in &self.inv_freq {
                let a = t as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (tokens, half), device)?,
            Tensor::from_vec(sin, (tokens, half), device)?,
        ))
    }

    /// The temperature-tuning factors of positions `0..tokens` (transformers
    /// computes them in f32, as here).
    fn temperature_scales(&self, tokens: usize) -> Option<Vec<f32>> {
        let (floor_scale, attn_scale) = self.temperature?;
        Some(
            (0..tokens)
                .map(|p| ((p as f32 + 1.0) / floor_scale).floor().ln_1p() * attn_scale + 1.0)
                .collect(),
        )
    }
}

/// A number of the rope parameters object, or an error naming `prefix.key`.
fn rope_num(c: &Config, prefix: &str, p: &Value, key: &str) -> Result<Option<f64>> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(bad(
                c,
                &format!("{prefix}.{key}"),
                format!("is {v}, expected a finite number"),
            )),
        },
    }
}

/// Inverse frequencies as transformers computes them (f32): the default
/// rope, or `_compute_llama3_parameters` (`rope_type: llama3`, the released
/// checkpoints'). The attention factor of both is 1.
fn inv_freq(c: &Config, head_dim: usize, theta: f64) -> Result<Vec<f32>> {
    let (prefix, p) = match (c.get("rope_parameters"), c.get("rope_scaling")) {
        (Some(p @ Value::Object(_)), _) => ("rope_parameters", Some(p)),
        (_, Some(p @ Value::Object(_))) => ("rope_scaling", Some(p)),
        _ => ("rope_parameters", None),
    };
    let ty = p
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if let Some(p) = p {
        if let Some(f) = rope_num(c, prefix, p, "partial_rotary_factor")? {
            if f != 1.0 {
                return Err(bad(
                    c,
                    &format!("{prefix}.partial_rotary_factor"),
                    format!("is {f}; the Llama 4 forward pass rotates whole heads"),
                ));
            }
        }
    }
    let dim = head_dim as f32;
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / dim))
        .collect();
    match (ty, p) {
        ("default", _) => Ok(base),
        ("llama3", Some(p)) => {
            let req = |key: &str| -> Result<f64> {
                rope_num(c, prefix, p, key)?.ok_or_else(|| {
                    bad(
                        c,
                        &format!("{prefix}.{key}"),
                        "is missing; llama3 rope scaling needs it".to_string(),
                    )
                })
            };
            let factor = req("factor")?;
            let low = req("low_freq_factor")?;
            let high = req("high_freq_factor")?;
            let old = match rope_num(c, prefix, p, "original_max_position_embeddings")? {
                Some(o) => o,
                None => c.usize_in("max_position_embeddings", 1, usize::MAX)? as f64,
            };
            if !(factor > 0.0 && low > 0.0 && high > low && old >= 1.0) {
                return Err(bad(
                    c,
                    prefix,
                    format!(
                        "has factor {factor}, low_freq_factor {low}, high_freq_factor {high}, \
                         original_max_position_embeddings {old}; llama3 scaling needs \
                         positive values with high_freq_factor > low_freq_factor"
                    ),
                ));
            }
            let (factor, low, high, old) = (factor as f32, low as f32, high as f32, old as f32);
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            Ok(base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let smooth = (old / wavelen - low) / (high - low);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    // transformers: `~(wavelen < high) * ~(wavelen > low)`.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                })
                .collect())
        }
        (other, _) => Err(bad(
            c,
            &format!("{prefix}.rope_type"),
            format!("is `{other}`; the Llama 4 forward pass reads `llama3` and `default`"),
        )),
    }
}

/// The additive mask of query rows `rows` over keys `keys` (absolute
/// positions): causal, and with a `chunk` only the keys of the query's chunk.
fn mask(
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    chunk: Option<usize>,
    device: &Device,
) -> R<Tensor> {
    let (n, m) = (rows.len(), keys.len());
    let v: Vec<f32> = rows
        .flat_map(|i| {
            keys.clone().map(move |j| {
                let seen = j <= i && chunk.is_none_or(|c| j / c == i / c);
                if seen {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(v, (n, m), device)
}

/// Causal (and, with a `chunk`, chunked) attention over `[heads, T, d]`
/// (k/v per query head), in query blocks over the keys each block can see.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, chunk: Option<usize>) -> R<Tensor> {
    let (h, t, _) = q.dims3()?;
    let block = query_block(h, t);
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + block).min(t);
        // The first key any row of the block sees.
        let k0 = chunk.map_or(0, |c| r0 / c * c);
        let qb = q.narrow(1, r0, r1 - r0)?.contiguous()?;
        let kb = k.narrow(1, k0, r1 - k0)?.contiguous()?;
        let vb = v.narrow(1, k0, r1 - k0)?.contiguous()?;
        let s = (qb.matmul(&kb.transpose(1, 2)?.contiguous()?)? * scale)?;
        let s = s.broadcast_add(&mask(r0..r1, k0..r1, chunk, q.device())?)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        outs.push(p.matmul(&vb)?);
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

/// `x / sqrt(mean(x²) + eps)` over the last axis (no weight).
fn l2_norm(x: &Tensor, eps: f64) -> R<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)
}

fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

impl Forward<'_> {
    fn llama4_cfg(&self) -> &Llama4Config {
        self.cfg
            .llama4
            .as_ref()
            .expect("called for Llama 4 models only")
    }

    /// One Llama 4 decoder layer: `h + attn(norm(h))`, then `+ ffn(norm(h))`
    /// (the MoE block on MoE layers, the dense MLP on the others).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn llama4_layer(
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
        let attn = self
            .llama4_attention(layer, &a, &lw.attn, cos, sin)
            .map_err(ce(&what))?;
        let h = (h + attn).map_err(ce(&what))?;
        let m = rms_norm(&h, &lw.mlp_norm, eps).map_err(ce(&what))?;
        let y = match &lw.mlp {
            MlpWeights::Dense(f) => self.ffn(f, &m).map_err(ce(&what))?.1,
            MlpWeights::Moe { .. } => {
                self.llama4_moe(layer, prompt, &m, &lw.mlp, wants, observer)?
            }
        };
        (h + y).map_err(ce(&what))
    }

    fn llama4_attention(
        &self,
        layer: usize,
        x: &Tensor,
        w: &AttnWeights,
        cos: &Tensor,
        sin: &Tensor,
    ) -> R<Tensor> {
        let (
            super::config::AttentionKind::Standard {
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
                q_bias,
                k_bias,
                v_bias,
                ..
            },
        ) = (&self.cfg.attention, w)
        else {
            candle_core::bail!("Llama 4 attention weights incomplete")
        };
        let c = self.llama4_cfg();
        let t = x.dim(0)?;
        let mut qh = split_heads(&self.lin(x, q, q_bias.as_ref())?, *heads)?;
        let mut kh = split_heads(&self.lin(x, k, k_bias.as_ref())?, *kv_heads)?;
        let use_rope = c.rope.get(layer).copied().unwrap_or(true);
        if use_rope {
            // Returned de-interleaved ([evens | odds]) for q and k alike: q·k
            // and the L2 norm are unchanged by the common permutation.
            qh = rope_interleaved(&qh, cos, sin)?;
            kh = rope_interleaved(&kh, cos, sin)?;
            if c.qk_norm {
                qh = l2_norm(&qh, self.cfg.rms_eps)?;
                kh = l2_norm(&kh, self.cfg.rms_eps)?;
            }
        } else if let Some(s) = c.temperature_scales(t) {
            let s = Tensor::from_vec(s, (1, t, 1), x.device())?;
            qh = qh.broadcast_mul(&s)?;
        }
        let rep = heads / kv_heads;
        let kh = repeat_kv(&kh, rep)?;
        let vh = repeat_kv(
            &split_heads(&self.lin(x, v, v_bias.as_ref())?, *kv_heads)?,
            rep,
        )?;
        let chunk = c.chunk.get(layer).copied().flatten();
        let scale = 1.0 / (*head_dim as f64).sqrt();
        let out = attend(&qh, &kh, &vh, scale, chunk)?;
        self.lin(&out, o, None)
    }

    /// The Llama 4 MoE block on `x` `[tokens, hidden]` (already normed),
    /// reporting to `observer` (see the module doc for what it gets).
    pub(super) fn llama4_moe(
        &self,
        layer: usize,
        prompt: usize,
        x: &Tensor,
        mlp: &MlpWeights,
        wants: Wants,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let what = format!("MoE layer {layer}");
        let MlpWeights::Moe {
            router,
            router_transposed,
            experts,
            shared,
            ..
        } = mlp
        else {
            return Err(Error::Usage(format!("layer {layer} is not an MoE layer")));
        };
        let (t, hdim) = x.dims2().map_err(ce(&what))?;
        let e_count = experts.len();
        let k = self.model.info.top_k;
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            t.flatten_all().and_then(|t| t.to_vec1()).map_err(ce(&what))
        };
        let logits =
            host(&super::weights::linear_any(x, router, *router_transposed).map_err(ce(&what))?)?;
        if logits.len() != t * e_count {
            return Err(Error::Compute {
                what,
                reason: format!(
                    "{} router logits for {t} tokens × {e_count} experts",
                    logits.len()
                ),
            });
        }
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(self.diverged(layer, "router logits"));
        }
        let mut scores = Vec::with_capacity(t * e_count);
        let mut selected = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e_count];
        for (tok, row) in logits.chunks(e_count.max(1)).enumerate() {
            // Top-k on the logits (not on the saturating sigmoid), then the
            // sigmoid of each kept logit.
            let l: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            scores.extend(row.iter().map(|&v| sigmoid(v)));
            for e in super::routing::top_k(&l, k) {
                let w = sigmoid(row[e]);
                selected.push(e as u32);
                weights.push(w);
                by_expert[e].push((tok as u32, w));
            }
        }
        let shared_out = match shared {
            Some(f) => Some(host(&self.ffn(f, x).map_err(ce(&what))?.1)?),
            None => None,
        };
        let mut out = shared_out.clone().unwrap_or_else(|| vec![0f32; t * hdim]);
        let all = wants.all_expert_outputs || wants.activations;
        let mut all_out: Vec<f32> = Vec::new();
        let mut all_act: Vec<f32> = Vec::new();
        for (e, f) in experts.iter().enumerate() {
            if all {
                // The expert on the unscaled input, for the observer.
                let (a, y) = self.ffn(f, x).map_err(ce(&what))?;
                if wants.all_expert_outputs {
                    all_out.extend_from_slice(&host(&y)?);
                }
                if wants.activations {
                    all_act.extend_from_slice(&host(&a)?);
                }
            }
            let pairs = &by_expert[e];
            if pairs.is_empty() {
                continue;
            }
            // The routed contribution: the expert on its input × the weight.
            let toks: Vec<u32> = pairs.iter().map(|&(tok, _)| tok).collect();
            let ws: Vec<f32> = pairs.iter().map(|&(_, w)| w).collect();
            let y = (|| {
                let idx = Tensor::new(toks.as_slice(), x.device())?;
                let w = Tensor::from_vec(ws, (toks.len(), 1), x.device())?;
                let xe = x.index_select(&idx, 0)?.broadcast_mul(&w)?;
                Ok::<_, candle_core::Error>(self.ffn(f, &xe)?.1)
            })()
            .map_err(ce(&what))?;
            let y = host(&y)?;
            for (row, &tok) in toks.iter().enumerate() {
                let tok = tok as usize;
                let src = &y[row * hdim..(row + 1) * hdim];
                for (o, v) in out[tok * hdim..(tok + 1) * hdim].iter_mut().zip(src) {
                    *o += v;
                }
            }
        }
        let input = if wants.input { Some(host(x)?) } else { None };
        observer.moe_layer(&MoeObservation {
            layer,
            prompt,
            tokens: t,
            hidden: hdim,
            experts: e_count,
            top_k: k,
            input: input.as_deref(),
            router_logits: &logits,
            scores: &scores,
            selected: &selected,
            weights: &weights,
            expert_outputs: wants.all_expert_outputs.then_some(all_out.as_slice()),
            activations: wants.activations.then_some(all_act.as_slice()),
            intermediate: self.model.info.expert_intermediate,
            shared_output: if wants.shared_output {
                shared_out.as_deref()
            } else {
                None
            },
        });
        Tensor::from_vec(out, (t, hdim), x.device()).map_err(ce(&what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use std::path::Path;

    fn cfg(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<Llama4Config> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/families/llama4/config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        let c = Config::parse(Path::new("m/config.json"), v.to_string().as_bytes())?;
        Llama4Config::from_config(&c, 8, 500000.0, 4)
    }

    /// The fixture's settings, and llama3 inverse frequencies as transformers'
    /// `ROPE_INIT_FUNCTIONS["llama3"]` gives them for its config (one
    /// frequency kept, one smoothed, two divided by the factor).
    #[test]
    fn fixture_config_and_llama3_frequencies_match_transformers() {
        let g = cfg(|_| {}).unwrap();
        assert_eq!(g.rope, vec![true, true, true, false]);
        assert_eq!(g.chunk, vec![Some(8), Some(8), Some(8), None]);
        assert!(g.qk_norm);
        assert_eq!(g.temperature, Some((4.0, 0.1)));
        let want = [
            1.0,
            0.010_538_230_650_126_934,
            0.000_176_776_680_746_115_74,
            6.647_869_668_086_059e-6,
        ];
        for (got, w) in g.inv_freq.iter().zip(want) {
            assert!(((*got as f64) - w).abs() <= 1e-6 * w, "{:?}", g.inv_freq);
        }
        // Temperature: 1 + 0.1 · log1p(floor((p + 1) / 4)).
        let s = g.temperature_scales(9).unwrap();
        assert_eq!(s[..3], [1.0, 1.0, 1.0]);
        assert!((s[3] - (1.0 + 0.1 * 2f32.ln())).abs() < 1e-7);
        assert!((s[8] - (1.0 + 0.1 * 3f32.ln())).abs() < 1e-7);
    }

    #[test]
    fn defaults_follow_transformers() {
        // No no_rope_layers / layer_types / chunk keys: a no-rope layer every
        // 4th, chunks of 8192 on the rope layers; released Scout configs'
        // `attn_temperature_tuning: 4` is on.
        let d = cfg(|c| {
            for k in ["no_rope_layers", "layer_types", "attention_chunk_size"] {
                c.remove(k);
            }
            c.insert("no_rope_layers".into(), Value::Array(vec![]));
            c.insert("attn_temperature_tuning".into(), Value::from(4));
            c.remove("rope_parameters");
        })
        .unwrap();
        assert_eq!(d.rope, vec![true, true, true, false]);
        assert_eq!(d.chunk, vec![Some(8192), Some(8192), Some(8192), None]);
        assert_eq!(d.temperature, Some((4.0, 0.1)));
        assert_eq!(d.inv_freq[0], 1.0);
        let off = cfg(|c| {
            c.insert("attn_temperature_tuning".into(), Value::Bool(false));
            c.insert("attention_chunk_size".into(), Value::Null);
            c.remove("layer_types");
        })
        .unwrap();
        assert_eq!((off.temperature, off.chunk), (None, vec![None; 4]));
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
                c["no_rope_layers"] = serde_json::json!([1, 1]);
            },
            &["`no_rope_layers`", "2 entries"],
        );
        err(
            |c| {
                c["no_rope_layers"] = serde_json::json!([1, 2, 1, 0]);
            },
            &["`no_rope_layers`", "has 2"],
        );
        err(
            |c| {
                c["layer_types"] = serde_json::json!(["full_attention", "sliding", "x", "y"]);
            },
            &["`layer_types`", "sliding"],
        );
        err(
            |c| {
                c["attention_chunk_size"] = Value::Null;
            },
            &["`attention_chunk_size`", "chunked_attention"],
        );
        err(
            |c| {
                c["attention_chunk_size"] = Value::from(0);
            },
            &["`attention_chunk_size`", "is 0"],
        );
        err(
            |c| {
                c["rope_parameters"]["rope_type"] = Value::from("yarn");
            },
            &["`rope_parameters.rope_type`", "yarn"],
        );
        err(
            |c| {
                c["rope_parameters"]
                    .as_object_mut()
                    .unwrap()
                    .remove("low_freq_factor");
            },
            &["`rope_parameters.low_freq_factor`", "missing"],
        );
        err(
            |c| {
                c["floor_scale"] = Value::from(0);
            },
            &["`floor_scale`"],
        );
    }

    #[test]
    fn chunked_mask_keeps_the_keys_of_the_query_chunk() {
        let m: Vec<Vec<f32>> = mask(5..11, 4..11, Some(4), &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (r, row) in m.iter().enumerate() {
            let i = 5 + r;
            for (c, &v) in row.iter().enumerate() {
                let j = 4 + c;
                assert_eq!(v == 0.0, j <= i && j / 4 == i / 4, "({i}, {j})");
            }
        }
    }
}
