//! gpt-oss (`GptOssForCausalLM`, transformers 5.24 `modeling_gpt_oss.py`):
//! what differs from the shared decoder layer.
//!
//! - attention: q/k/v/o biases; a learned logit per head (`sinks`) joins each
//!   query's softmax as one more column and is dropped after it (it only
//!   adds to the denominator); sliding-window layers (`layer_types`) see the
//!   keys `j` with `i − sliding_window < j ≤ i`, full layers every `j ≤ i`;
//!   half-split rotary with YaRN-corrected frequencies and `cos`, `sin` both
//!   × the YaRN attention factor; scale `head_dim^−½`.
//! - router: `logits = x·Wᵀ + b`; top-k on the logits, softmax over the k.
//! - experts (`gate_up_proj [E, H, 2I]`, gate the even columns, up the odd;
//!   biases): `g = min(x·W_g + b_g, limit)`, `u = clamp(x·W_u + b_u, ±limit)`,
//!   `glu = g·sigmoid(alpha·g)`, `y = ((u + 1)·glu)·W_d + b_d`. The observed
//!   activation of an expert is `glu`.

use candle_core::{Device, Tensor, D};
use serde_json::Value;

use super::attention::{query_block, repeat_kv, rope_half, split_heads};
use super::observer::{MoeObservation, Observer, Wants};
use super::weights::{ce, AttnWeights, Ffn, LayerWeights, MlpWeights};
use super::{rms_norm, Forward, R};
use crate::error::{Error, Result};
use crate::model::{Config, Model};

/// gpt-oss settings beyond the shared [`super::config::ForwardConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct GptOssConfig {
    /// Per decoder layer: the sliding window (`sliding_attention`), or `None` (`full_attention`).
    pub window: Vec<Option<usize>>,
    /// Rotary inverse frequencies (`head_dim / 2`), YaRN-corrected when `rope_type` is `yarn`.
    pub inv_freq: Vec<f32>,
    /// Factor on `cos` and `sin` (YaRN's attention factor; 1 for the default rope).
    pub attention_scaling: f32,
    /// `swiglu_alpha` (1.702).
    pub alpha: f32,
    /// `swiglu_limit` (7.0).
    pub limit: f32,
}

/// A number of the rope parameters object, or an error naming `prefix.key`.
pub(super) fn rope_num(c: &Config, prefix: &str, p: &Value, key: &str) -> Result<Option<f64>> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(Error::key(
                c.path(),
                &format!("{prefix}.{key}"),
                format!("is {v}, expected a finite number"),
            )),
        },
    }
}

impl GptOssConfig {
    /// Reads the gpt-oss keys of `c` (defaults as transformers' `GptOssConfig`).
    pub fn from_config(
        c: &Config,
        head_dim: usize,
        theta: f64,
        num_layers: usize,
    ) -> Result<GptOssConfig> {
        // `null`: every layer attends to the whole prefix (as transformers does).
        let window = match c.map().get("sliding_window") {
            Some(Value::Null) => None,
            _ => Some(
                c.usize_opt_in("sliding_window", 1, usize::MAX)?
                    .unwrap_or(128),
            ),
        };
        let types: Vec<bool> = c
            .layer_flags(num_layers, "sliding_attention", "full_attention")?
            .unwrap_or_else(|| (0..num_layers).map(|i| (i + 1) % 2 == 1).collect());
        let positive = |key: &str, default: f64| -> Result<f32> {
            Ok(
                c.f64_opt_where(key, "a positive finite number", |v| v > 0.0)?
                    .unwrap_or(default) as f32,
            )
        };
        let (inv_freq, attention_scaling) = rope(c, head_dim, theta)?;
        Ok(GptOssConfig {
            window: types
                .iter()
                .map(|&s| if s { window } else { None })
                .collect(),
            inv_freq,
            attention_scaling,
            alpha: positive("swiglu_alpha", 1.702)?,
            limit: positive("swiglu_limit", 7.0)?,
        })
    }

    /// `cos`, `sin` `[tokens, head_dim/2]` for positions `0..tokens`, × the attention factor.
    pub(super) fn rope_tables(&self, tokens: usize, device: &Device) -> R<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for t in 0..tokens {
            for &f in &self.inv_freq {
                let a = t as f32 * f;
                cos.push(a.cos() * self.attention_scaling);
                sin.push(a.sin() * self.attention_scaling);
            }
        }
        Ok((
            Tensor::from_vec(cos, (tokens, half), device)?,
            Tensor::from_vec(sin, (tokens, half), device)?,
        ))
    }
}

/// Inverse frequencies and attention factor, as transformers'
/// `_compute_yarn_parameters` (`rope_type: yarn`, gpt-oss's default) or the
/// default rope computes them (in f32 where it does).
pub(super) fn rope(c: &Config, head_dim: usize, theta: f64) -> Result<(Vec<f32>, f32)> {
    let (prefix, p) = match (c.get("rope_parameters"), c.get("rope_scaling")) {
        (Some(p @ Value::Object(_)), _) => ("rope_parameters", Some(p)),
        (_, Some(p @ Value::Object(_))) => ("rope_scaling", Some(p)),
        _ => ("rope_parameters", None),
    };
    let ty = match p {
        // transformers' GptOssConfig default: YaRN, factor 32 over 4096 positions.
        None => "yarn",
        Some(p) => p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default"),
    };
    let dim = head_dim as f32;
    let pos_freqs: Vec<f32> = (0..head_dim / 2)
        .map(|i| (theta as f32).powf((2 * i) as f32 / dim))
        .collect();
    match ty {
        "default" => return Ok((pos_freqs.iter().map(|&p| 1.0 / p).collect(), 1.0)),
        "yarn" => {}
        other => {
            return Err(Error::key(
                c.path(),
                &format!("{prefix}.rope_type"),
                format!("is `{other}`; the gpt-oss forward pass reads `yarn` and `default`"),
            ))
        }
    }
    // transformers' GptOssConfig default when the config has no rope parameters.
    let default = serde_json::json!({
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": false, "original_max_position_embeddings": 4096,
    });
    let p = p.unwrap_or(&default);
    let num = |k: &str| rope_num(c, prefix, p, k);
    if let Some(f) = num("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(Error::key(
                c.path(),
                &format!("{prefix}.partial_rotary_factor"),
                format!("is {f}; the YaRN rope of this forward pass rotates whole heads"),
            ));
        }
    }
    let original = match num("original_max_position_embeddings")? {
        Some(o) if o >= 1.0 => o,
        v => {
            return Err(Error::key(
                c.path(),
                &format!("{prefix}.original_max_position_embeddings"),
                format!("is {v:?}; YaRN needs the pretraining context length (≥ 1)"),
            ))
        }
    };
    let factor = match num("factor")? {
        Some(f) => f,
        None => {
            let max = c.usize_in("max_position_embeddings", 1, usize::MAX)?;
            max as f64 / original
        }
    };
    if factor <= 0.0 {
        return Err(Error::key(
            c.path(),
            &format!("{prefix}.factor"),
            format!("is {factor}, must be positive"),
        ));
    }
    let get_mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention_factor = match num("attention_factor")? {
        Some(a) => a,
        None => match (num("mscale")?, num("mscale_all_dim")?) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, a)
            }
            _ => get_mscale(factor, 1.0),
        },
    };
    let beta_fast = num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0);
    let beta_slow = num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0);
    let truncate = match p.get("truncate") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::key(
                c.path(),
                &format!("{prefix}.truncate"),
                format!("is {v}, expected true or false"),
            ))
        }
    };
    let d = head_dim as f64;
    let correction_dim =
        |rot: f64| (d * (original / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * theta.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    let inv = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &pf)| {
            let extrapolation = 1.0 / pf;
            let interpolation = 1.0 / (factor as f32 * pf);
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extra = 1.0 - ramp;
            interpolation * (1.0 - extra) + extrapolation * extra
        })
        .collect();
    Ok((inv, attention_factor as f32))
}

/// One gpt-oss layer's tensors beyond [`LayerWeights`]' shared ones.
pub struct GptOssLayer {
    /// Per-head attention sink logits `[heads, 1, 1]`.
    pub sinks: Tensor,
    /// `o_proj.bias` `[hidden]`, if stored.
    pub o_bias: Option<Tensor>,
    /// `mlp.router.bias` `[experts]`.
    pub router_bias: Tensor,
    /// Per expert: gate bias `[I]`, up bias `[I]` (the even / odd entries of
    /// `gate_up_proj_bias`), down bias `[H]`.
    pub expert_bias: Vec<(Tensor, Tensor, Tensor)>,
}

/// A bias vector of `model` as f32 with the expected shape, finite.
fn vector(model: &Model, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
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

impl GptOssLayer {
    /// Loads layer `layer`'s sinks and biases onto `device`.
    pub fn load(model: &Model, layer: usize, heads: usize, device: &Device) -> Result<GptOssLayer> {
        let info = &model.info;
        let naming = model.naming();
        let (e, h, i) = (info.num_experts, info.hidden_size, info.expert_intermediate);
        let t = |v: Vec<f32>, shape: &[usize], name: &str| {
            Tensor::from_vec(v, shape, device).map_err(ce(name))
        };
        let sinks_name = naming.layer_tensor(layer, "self_attn.sinks");
        let sinks = t(
            vector(model, &sinks_name, &[heads])?,
            &[heads, 1, 1],
            &sinks_name,
        )?;
        let o_name = naming.layer_tensor(layer, "self_attn.o_proj.bias");
        let o_bias = if model.weights().contains(&o_name) {
            Some(t(vector(model, &o_name, &[h])?, &[h], &o_name)?)
        } else {
            None
        };
        let router = naming.router(layer);
        let rb_name = format!("{}.bias", router.trim_end_matches(".weight"));
        let router_bias = t(vector(model, &rb_name, &[e])?, &[e], &rb_name)?;
        let gu_name = naming.layer_tensor(layer, "mlp.experts.gate_up_proj_bias");
        let d_name = naming.layer_tensor(layer, "mlp.experts.down_proj_bias");
        let two_i = i.checked_mul(2).ok_or_else(|| Error::Compute {
            what: gu_name.clone(),
            reason: "2 × intermediate_size overflows".into(),
        })?;
        let gu = vector(model, &gu_name, &[e, two_i])?;
        let dn = vector(model, &d_name, &[e, h])?;
        let expert_bias = (0..e)
            .map(|x| {
                let row = &gu[x * two_i..(x + 1) * two_i];
                let gate: Vec<f32> = row.iter().step_by(2).copied().collect();
                let up: Vec<f32> = row.iter().skip(1).step_by(2).copied().collect();
                Ok((
                    t(gate, &[i], &gu_name)?,
                    t(up, &[i], &gu_name)?,
                    t(dn[x * h..(x + 1) * h].to_vec(), &[h], &d_name)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GptOssLayer {
            sinks,
            o_bias,
            router_bias,
            expert_bias,
        })
    }
}

/// The additive mask of query rows `rows` over keys `0..keys`: causal, and
/// with a `window` only the keys `j > i − window`.
fn mask(
    rows: std::ops::Range<usize>,
    keys: usize,
    window: Option<usize>,
    device: &Device,
) -> R<Tensor> {
    let n = rows.len();
    let m: Vec<f32> = rows
        .flat_map(|i| {
            (0..keys).map(move |j| {
                let seen = j <= i && window.is_none_or(|w| j + w > i);
                if seen {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (n, keys), device)
}

/// Attention with sinks over `[heads, T, d]` (k/v per query head), in query
/// blocks as the shared attention does.
fn attend_with_sinks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sinks: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> R<Tensor> {
    let (h, t, _) = q.dims3()?;
    let block = query_block(h, t);
    let mut outs = Vec::with_capacity(t.div_ceil(block));
    let mut r0 = 0;
    while r0 < t {
        let r1 = (r0 + block).min(t);
        let qb = q.narrow(1, r0, r1 - r0)?;
        let kb = k.narrow(1, 0, r1)?.contiguous()?;
        let vb = v.narrow(1, 0, r1)?.contiguous()?;
        let s = (qb.matmul(&kb.transpose(1, 2)?.contiguous()?)? * scale)?;
        let s = s.broadcast_add(&mask(r0..r1, r1, window, q.device())?)?;
        let sink = sinks.broadcast_as((h, r1 - r0, 1))?;
        let s = Tensor::cat(&[s, sink.contiguous()?], D::Minus1)?.contiguous()?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let p = p.narrow(D::Minus1, 0, r1)?.contiguous()?;
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

impl Forward<'_> {
    fn gpt_oss_cfg(&self) -> &GptOssConfig {
        self.cfg
            .gpt_oss
            .as_ref()
            .expect("called for gpt-oss models only")
    }

    /// One gpt-oss decoder layer: `h + attn(norm(h))`, then `+ moe(norm(h))`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gpt_oss_layer(
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
            .gpt_oss_attention(layer, &a, lw, cos, sin)
            .map_err(ce(&what))?;
        let h = (h + attn).map_err(ce(&what))?;
        let m = rms_norm(&h, &lw.mlp_norm, eps).map_err(ce(&what))?;
        let y = self.gpt_oss_moe(layer, prompt, &m, lw, wants, observer)?;
        (h + y).map_err(ce(&what))
    }

    fn gpt_oss_attention(
        &self,
        layer: usize,
        x: &Tensor,
        lw: &LayerWeights,
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
            Some(g),
        ) = (&self.cfg.attention, &lw.attn, &lw.gpt_oss)
        else {
            candle_core::bail!("gpt-oss attention weights incomplete")
        };
        let qh = rope_half(
            &split_heads(&self.lin(x, q, q_bias.as_ref())?, *heads)?,
            cos,
            sin,
        )?;
        let kh = rope_half(
            &split_heads(&self.lin(x, k, k_bias.as_ref())?, *kv_heads)?,
            cos,
            sin,
        )?;
        let rep = heads / kv_heads;
        let kh = repeat_kv(&kh, rep)?;
        let vh = repeat_kv(
            &split_heads(&self.lin(x, v, v_bias.as_ref())?, *kv_heads)?,
            rep,
        )?;
        let window = self.gpt_oss_cfg().window.get(layer).copied().flatten();
        let scale = 1.0 / (*head_dim as f64).sqrt();
        let out = attend_with_sinks(&qh, &kh, &vh, &g.sinks, scale, window)?;
        self.lin(&out, o, g.o_bias.as_ref())
    }

    /// The gpt-oss expert on `x`: `(glu, y)` (see the module doc).
    fn gpt_oss_expert(
        &self,
        f: &Ffn,
        bias: &(Tensor, Tensor, Tensor),
        x: &Tensor,
    ) -> R<(Tensor, Tensor)> {
        let c = self.gpt_oss_cfg();
        let gate = f
            .lin(x, &f.gate)?
            .broadcast_add(&bias.0)?
            .minimum(c.limit)?;
        let up = f
            .lin(x, &f.up)?
            .broadcast_add(&bias.1)?
            .clamp(-c.limit, c.limit)?;
        let glu = (&gate * candle_nn::ops::sigmoid(&(&gate * c.alpha as f64)?)?)?;
        let hid = ((up + 1.0)? * &glu)?;
        let y = f.lin(&hid, &f.down)?.broadcast_add(&bias.2)?;
        Ok((glu, y))
    }

    /// The gpt-oss MoE block on `x` `[tokens, hidden]` (already normed),
    /// reporting to `observer`.
    pub(super) fn gpt_oss_moe(
        &self,
        layer: usize,
        prompt: usize,
        x: &Tensor,
        lw: &LayerWeights,
        wants: Wants,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let what = format!("MoE layer {layer}");
        let (
            MlpWeights::Moe {
                router,
                router_transposed,
                experts,
                ..
            },
            Some(g),
        ) = (&lw.mlp, &lw.gpt_oss)
        else {
            return Err(Error::Usage(format!("layer {layer} is not an MoE layer")));
        };
        let (t, hdim) = x.dims2().map_err(ce(&what))?;
        let e_count = experts.len();
        let k = self.model.info.top_k;
        let logits: Vec<f32> = (|| {
            let l = super::weights::linear_any(x, router, *router_transposed)?;
            l.broadcast_add(&g.router_bias)?.flatten_all()?.to_vec1()
        })()
        .map_err(ce(&what))?;
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(self.diverged(layer, "router logits"));
        }
        let mut scores = Vec::with_capacity(t * e_count);
        let mut selected = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e_count];
        for (tok, row) in logits.chunks(e_count.max(1)).enumerate() {
            // Softmax over all, top-k, renormalised: the softmax over the k largest logits.
            let s = self.cfg.routing.scores(row);
            let r = self.cfg.routing.route_scores(&s, k, None);
            scores.extend(s.iter().map(|&v| v as f32));
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                selected.push(e as u32);
                weights.push(w);
                by_expert[e].push((tok as u32, w));
            }
        }
        let all = wants.all_expert_outputs || wants.activations;
        let mut out = vec![0f32; t * hdim];
        let mut all_out: Vec<f32> = Vec::new();
        let mut all_act: Vec<f32> = Vec::new();
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            t.flatten_all().and_then(|t| t.to_vec1()).map_err(ce(&what))
        };
        for (e, f) in experts.iter().enumerate() {
            let pairs = &by_expert[e];
            if all {
                let (a, y) = self
                    .gpt_oss_expert(f, &g.expert_bias[e], x)
                    .map_err(ce(&what))?;
                let y = host(&y)?;
                for &(tok, w) in pairs {
                    let tok = tok as usize;
                    let src = &y[tok * hdim..(tok + 1) * hdim];
                    for (o, v) in out[tok * hdim..(tok + 1) * hdim].iter_mut().zip(src) {
                        *o += w * v;
                    }
                }
                if wants.all_expert_outputs {
                    all_out.extend_from_slice(&y);
                }
                if wants.activations {
                    all_act.extend_from_slice(&host(&a)?);
                }
            } else if !pairs.is_empty() {
                let toks: Vec<u32> = pairs.iter().map(|&(tok, _)| tok).collect();
                let y = Tensor::new(toks.as_slice(), x.device())
                    .and_then(|idx| x.index_select(&idx, 0))
                    .and_then(|xe| self.gpt_oss_expert(f, &g.expert_bias[e], &xe))
                    .map_err(ce(&what))?
                    .1;
                let y = host(&y)?;
                for (row, &(tok, w)) in pairs.iter().enumerate() {
                    let tok = tok as usize;
                    let src = &y[row * hdim..(row + 1) * hdim];
                    for (o, v) in out[tok * hdim..(tok + 1) * hdim].iter_mut().zip(src) {
                        *o += w * v;
                    }
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
            shared_output: None,
        });
        Tensor::from_vec(out, (t, hdim), x.device()).map_err(ce(&what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use std::path::Path;

    fn cfg(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<GptOssConfig> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/families/gpt_oss/config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        let c = Config::parse(Path::new("m/config.json"), v.to_string().as_bytes())?;
        GptOssConfig::from_config(&c, 8, 150000.0, 2)
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                ((*g as f64) - w).abs() <= 1e-6 * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }

    /// Inverse frequencies and attention factor as transformers'
    /// `ROPE_INIT_FUNCTIONS["yarn"]` gives them for the fixture's config (and
    /// with `truncate: true`).
    #[test]
    fn yarn_matches_transformers() {
        let g = cfg(|_| {}).unwrap();
        close(
            &g.inv_freq,
            &[
                1.0,
                0.05081327259540558,
                0.0004564839182421565,
                4.099978468730114e-06,
            ],
        );
        assert!((g.attention_scaling as f64 - 1.3465735902799727).abs() < 1e-7);
        assert_eq!(g.window, vec![Some(4), None]);
        assert_eq!((g.alpha, g.limit), (1.702, 0.2));
        let t = cfg(|c| {
            c["rope_parameters"]["truncate"] = Value::Bool(true);
        })
        .unwrap();
        close(
            &t.inv_freq,
            &[
                1.0,
                0.05081327259540558,
                0.001331338076852262,
                4.099978468730114e-06,
            ],
        );
        // No rope parameters: transformers' GptOssConfig default (the same YaRN).
        let d = cfg(|c| {
            c.remove("rope_parameters");
        })
        .unwrap();
        assert_eq!(d.inv_freq, g.inv_freq);
        // No layer_types: sliding on even layers; no swiglu keys: 1.702 / 7.
        let d = cfg(|c| {
            c.remove("layer_types");
            c.remove("swiglu_limit");
            c.insert("sliding_window".into(), Value::Null);
        })
        .unwrap();
        assert_eq!((d.window, d.limit), (vec![None, None], 7.0));
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
            &["`layer_types`", "2 layer types", "1 entries"],
        );
        err(
            |c| {
                c["layer_types"] = serde_json::json!(["full_attention", "chunked"]);
            },
            &["`layer_types`", "chunked"],
        );
        err(
            |c| {
                c["rope_parameters"]["rope_type"] = Value::from("longrope");
            },
            &["`rope_parameters.rope_type`", "longrope"],
        );
        err(
            |c| {
                c["rope_parameters"]["factor"] = Value::from("x");
            },
            &["`rope_parameters.factor`"],
        );
        err(
            |c| {
                c["swiglu_limit"] = Value::from(-1.0);
            },
            &["`swiglu_limit`"],
        );
        err(
            |c| {
                c["sliding_window"] = Value::from(0);
            },
            &["`sliding_window`", "is 0"],
        );
    }

    #[test]
    fn sliding_mask_keeps_the_last_window_keys() {
        let m = mask(0..6, 6, Some(3), &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        for (i, row) in m.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let seen = j <= i && i - j < 3;
                assert_eq!(v == 0.0, seen, "({i}, {j})");
            }
        }
    }
}
