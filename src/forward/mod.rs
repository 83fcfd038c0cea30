//! The candle forward pass with an observer for router and expert values
//! (SPEC §9). Layers are loaded one at a time from the mmap (f32 conversion
//! once per layer), every prompt goes through a layer before the next layer is
//! loaded, and the layer's pages are released afterwards: memory holds one
//! layer of weights plus the prompts' hidden states, whatever the depth.

pub mod config;
internal_mod!(expert_gemm);
pub mod observer;
pub mod routing;
pub mod weights;

use expert_gemm::Activation;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result, ValueKind};
use crate::model::Model;
use config::{AttentionKind, ForwardConfig, QkNorm};
use observer::{MoeObservation, Observer, Wants};
use weights::{ce, AttnWeights, Ffn, HeadWeights, LayerWeights, MlpWeights};

/// A forward pass over a model on a device.
pub struct Forward<'m> {
    model: &'m Model,
    /// The forward configuration derived from the model's config.json (family rules included).
    pub cfg: ForwardConfig,
    device: Device,
    /// With [`Forward::keep_weights`]: every layer's f32 weights, loaded on
    /// first use and kept (for repeated runs on a model that fits in memory).
    resident: Option<std::sync::Mutex<Vec<Option<std::sync::Arc<LayerWeights>>>>>,
    head: std::sync::OnceLock<std::sync::Arc<HeadWeights>>,
    /// Run the top-k dispatch as tensor ops on the device even on the CPU.
    tensor_dispatch: bool,
}

/// Output of [`Forward::run`].
pub struct ForwardOutput {
    /// Final logits `[tokens, vocab]` per prompt, when asked for.
    pub logits: Vec<Tensor>,
}

type R<T> = std::result::Result<T, candle_core::Error>;

/// `x · Wᵀ (+ b)` for `W` in the hub layout `[out, in]`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> R<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x · W (+ b)` for `W` stored transposed, `[in, out]`.
fn linear_t(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> R<Tensor> {
    let y = x.matmul(w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// RMSNorm over the last axis, in f32: `x / sqrt(mean(x²) + eps) * w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> R<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// `cos`, `sin` of `[tokens, d/2]` for positions `0..tokens`.
fn rope_tables(tokens: usize, dim: usize, theta: f64, device: &Device) -> R<(Tensor, Tensor)> {
    let half = dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32)
        .collect();
    let mut cos = Vec::with_capacity(tokens * half);
    let mut sin = Vec::with_capacity(tokens * half);
    for t in 0..tokens {
        for &f in &inv {
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

/// Half-split (`rotate_half`) rotary embedding of `x` `[heads, tokens, d]`.
fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
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
fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
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
const ATTENTION_BLOCK_BYTES: usize = 16 << 20;

/// Query rows per attention block for `heads` heads over `tokens` keys.
fn query_block(heads: usize, tokens: usize) -> usize {
    let per_row = heads.max(1).saturating_mul(tokens.max(1)).saturating_mul(4);
    (ATTENTION_BLOCK_BYTES / per_row).clamp(1, tokens.max(1))
}

/// `[T, heads·d]` → `[heads, T, d]`.
fn split_heads(x: &Tensor, heads: usize) -> R<Tensor> {
    let (t, w) = x.dims2()?;
    x.reshape((t, heads, w / heads))?
        .transpose(0, 1)?
        .contiguous()
}

/// Causal scaled dot-product attention over `[heads, T, d]` (k/v already per
/// query head). Queries are processed in blocks ([`query_block`]) over the
/// keys they can see, so the scores never hold `heads × T × T` values at once;
/// a prompt that fits in one block is computed exactly as a single matmul.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, softcap: Option<f64>) -> R<Tensor> {
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

/// Whether every value of `x` is finite (`sum(x · 0)` is NaN otherwise).
fn all_finite(x: &Tensor) -> R<bool> {
    let z = (x * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(z.is_finite())
}

/// Repeats `[kv_heads, T, d]` to `[kv_heads·rep, T, d]` (GQA).
fn repeat_kv(x: &Tensor, rep: usize) -> R<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (h, t, d) = x.dims3()?;
    x.unsqueeze(1)?
        .expand((h, rep, t, d))?
        .reshape((h * rep, t, d))
}

impl<'m> Forward<'m> {
    /// Prepares a forward pass of `model` on `device`.
    pub fn new(model: &'m Model, device: Device) -> Result<Forward<'m>> {
        let cfg = ForwardConfig::from_config(&model.config, &model.info)?;
        Ok(Forward {
            model,
            cfg,
            device,
            resident: None,
            head: std::sync::OnceLock::new(),
            tensor_dispatch: false,
        })
    }

    /// Runs the top-k dispatch as the GPU does (tensor ops: one gather, a
    /// matmul chain per active expert, one scatter-add) also on the CPU,
    /// instead of the CPU's grouped kernels: to test the GPU path on any
    /// machine and to compare the two.
    pub fn tensor_dispatch(mut self) -> Self {
        self.tensor_dispatch = true;
        self
    }

    /// Keeps every layer's converted f32 weights after first use instead of
    /// streaming them from the mmap on each run: for repeated runs (serving,
    /// benchmarks) on a model whose f32 weights fit in memory. The default
    /// streams one layer at a time, with memory bounded by one layer.
    pub fn keep_weights(mut self) -> Self {
        self.resident = Some(std::sync::Mutex::new(
            (0..self.model.info.num_layers).map(|_| None).collect(),
        ));
        self
    }

    fn layer_weights(&self, layer: usize) -> Result<std::sync::Arc<LayerWeights>> {
        let Some(cache) = &self.resident else {
            return Ok(std::sync::Arc::new(self.load_layer(layer)?));
        };
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = &cache[layer] {
            return Ok(w.clone());
        }
        let w = std::sync::Arc::new(self.load_layer(layer)?);
        cache[layer] = Some(w.clone());
        Ok(w)
    }

    /// A projection with a weight loaded by this forward pass.
    fn lin(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> R<Tensor> {
        if self.resident.is_some() {
            linear_t(x, w, b)
        } else {
            linear(x, w, b)
        }
    }

    /// Whether loaded matrices are stored transposed, `[in, out]`
    /// (with [`Forward::keep_weights`]), rather than in the hub layout `[out, in]`.
    pub fn weights_transposed(&self) -> bool {
        self.resident.is_some()
    }

    /// The geometry of the model.
    pub fn model_info(&self) -> &crate::model::ModelInfo {
        &self.model.info
    }

    /// The device computations run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn act(&self, x: &Tensor) -> R<Tensor> {
        if self.cfg.family.spec().activation == crate::model::family::Activation::Gelu {
            x.gelu_erf()
        } else {
            x.silu()
        }
    }

    /// `act(gate·x)` and the FFN output `down(act(gate·x) * up·x)`.
    fn ffn(&self, f: &Ffn, x: &Tensor) -> R<(Tensor, Tensor)> {
        let a = self.act(&f.lin(x, &f.gate)?)?;
        let h = (&a * f.lin(x, &f.up)?)?;
        let y = f.lin(&h, &f.down)?;
        Ok((a, y))
    }

    /// The experts' activation, for the grouped CPU kernels.
    /// An estimate (from above) of the memory a run over `prompts` needs
    /// besides the weights: every prompt's hidden state, the working set of
    /// one prompt through one layer (projections, per-head q/k/v, the routed
    /// or, when observed, all experts' activations and outputs), one
    /// attention block's scores. Saturates instead of wrapping.
    fn working_bytes(&self, prompts: &[Vec<u32>], wants: Wants) -> u64 {
        use crate::memory::product;
        let info = &self.model.info;
        let f32s = 4usize;
        let (heads, qk, v) = match &self.cfg.attention {
            AttentionKind::Standard {
                heads, head_dim, ..
            } => (*heads, *head_dim, *head_dim),
            AttentionKind::Mla {
                heads,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
                ..
            } => (
                *heads,
                qk_nope_head_dim.saturating_add(*qk_rope_head_dim),
                *v_head_dim,
            ),
        };
        let all_tokens: usize = prompts.iter().map(Vec::len).sum();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let experts_evaluated = if wants.all_expert_outputs || wants.activations {
            info.num_experts
        } else {
            info.top_k
        };
        let widest = info
            .expert_intermediate
            .max(info.shared_intermediate)
            .max(info.dense_intermediate.unwrap_or(0));
        // Per token of the prompt in flight: ~12 hidden-wide temporaries,
        // q/k/v per query head (three copies: projection, rotated, repeated),
        // gate/up/act per evaluated expert and its output, router scores.
        let per_token = [
            product(&[12, info.hidden_size]),
            product(&[3, heads, qk.saturating_mul(2).saturating_add(v)]),
            product(&[
                experts_evaluated,
                widest.saturating_mul(3).saturating_add(info.hidden_size),
            ]),
            product(&[2, info.num_experts]),
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b));
        let kept = product(&[all_tokens, info.hidden_size, f32s]);
        let layer = product(&[longest, f32s]).saturating_mul(per_token);
        kept.saturating_add(layer)
            .saturating_add(4 * ATTENTION_BLOCK_BYTES as u64)
    }

    fn diverged(&self, layer: usize, what: &str) -> Error {
        Error::Diverged {
            path: self.model.weights().dir().to_path_buf(),
            layer,
            what: what.to_string(),
        }
    }

    fn activation(&self) -> Activation {
        if self.cfg.family.spec().activation == crate::model::family::Activation::Gelu {
            Activation::GeluErf
        } else {
            Activation::Silu
        }
    }

    /// Loads one decoder layer's weights (for benchmarks of a single block).
    pub fn load_layer(&self, layer: usize) -> Result<LayerWeights> {
        LayerWeights::load(
            self.model,
            &self.cfg,
            layer,
            &self.device,
            self.resident.is_some(),
        )
    }

    /// The MoE block of `layer` on `x` `[tokens, hidden]` (already normed),
    /// reporting to `observer`; `Err` for a dense layer.
    pub fn moe_block(
        &self,
        layer: usize,
        lw: &LayerWeights,
        x: &Tensor,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        if !matches!(lw.mlp, MlpWeights::Moe { .. }) {
            return Err(Error::Usage(format!("layer {layer} is not an MoE layer")));
        }
        let wants = observer.wants();
        self.moe(layer, 0, x, &lw.mlp, wants, observer)
    }

    /// Runs the prompts (token ids) through the model. `observer` receives every
    /// MoE layer's routing (and what it asks for); `logits` keeps the final logits.
    ///
    /// ```rust
    /// use moe_inspect::forward::observer::{MoeObservation, Observer};
    /// use moe_inspect::forward::{parse_device, Forward};
    /// use moe_inspect::model::Model;
    ///
    /// /// Counts how often expert 0 is among the selected experts.
    /// struct Expert0(usize);
    /// impl Observer for Expert0 {
    ///     fn moe_layer(&mut self, o: &MoeObservation<'_>) {
    ///         self.0 += o.selected.iter().filter(|&&e| e == 0).count();
    ///     }
    /// }
    ///
    /// let model = Model::demo()?;
    /// let fwd = Forward::new(&model, parse_device("cpu")?)?;
    /// let mut counter = Expert0(0);
    /// let out = fwd.run(&[vec![1, 5, 9, 42]], &mut counter, true)?;
    /// assert_eq!(out.logits.len(), 1);
    /// assert!(counter.0 <= 4 * model.info.moe_layers.len());
    /// // `&mut ()` observes nothing (routing only, no extra work).
    /// fwd.run(&[vec![1, 2, 3]], &mut (), false)?;
    /// # Ok::<(), moe_inspect::Error>(())
    /// ```
    pub fn run(
        &self,
        prompts: &[Vec<u32>],
        observer: &mut dyn Observer,
        logits: bool,
    ) -> Result<ForwardOutput> {
        let model = self.model;
        let dev = &self.device;
        let vocab = self.cfg.vocab_size;
        for (p, ids) in prompts.iter().enumerate() {
            if ids.is_empty() {
                return Err(Error::Usage(format!("prompt {p} has no tokens")));
            }
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::Usage(format!(
                    "prompt {p}: token id {bad} is outside the vocabulary (vocab_size {vocab})"
                )));
            }
        }
        crate::memory::ensure_fits(
            &format!(
                "the forward pass over {} prompt(s) of {} tokens (longest {})",
                prompts.len(),
                prompts.iter().map(Vec::len).sum::<usize>(),
                prompts.iter().map(Vec::len).max().unwrap_or(0)
            ),
            self.working_bytes(prompts, observer.wants()),
        )?;
        let mut hidden = Vec::with_capacity(prompts.len());
        for ids in prompts {
            let h = weights::embed(model, ids, dev)?;
            hidden.push(if self.cfg.embedding_multiplier != 1.0 {
                (h * self.cfg.embedding_multiplier).map_err(ce("embeddings"))?
            } else {
                h
            });
        }
        let max_t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let rope_dim = match &self.cfg.attention {
            AttentionKind::Standard { head_dim, .. } => *head_dim,
            AttentionKind::Mla {
                qk_rope_head_dim, ..
            } => *qk_rope_head_dim,
        };
        let (cos, sin) =
            rope_tables(max_t, rope_dim, self.cfg.rope_theta, dev).map_err(ce("rotary tables"))?;
        let wants = observer.wants();
        for layer in 0..model.info.num_layers {
            let lw = self.layer_weights(layer)?;
            for (p, h) in hidden.iter_mut().enumerate() {
                let t = h.dim(0).map_err(ce("hidden state"))?;
                let (c, s) =
                    (|| Ok::<_, candle_core::Error>((cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?)))(
                    )
                    .map_err(ce("rotary tables"))?;
                *h = self.layer(layer, p, h, &lw, &c, &s, wants, observer)?;
                if !all_finite(h).map_err(ce("hidden state"))? {
                    return Err(self.diverged(layer, "hidden states"));
                }
            }
            drop(lw);
            observer.layer_done(layer);
            if self.resident.is_none() {
                let names = weights::layer_tensor_names(model.weights(), layer);
                model.weights().release(names.iter().map(String::as_str));
            }
        }
        let mut out = Vec::new();
        if logits {
            let head = match (&self.resident, self.head.get()) {
                (Some(_), Some(h)) => h.clone(),
                _ => {
                    let h = std::sync::Arc::new(HeadWeights::load(
                        model,
                        &self.cfg,
                        dev,
                        self.resident.is_some(),
                    )?);
                    if self.resident.is_some() {
                        let _ = self.head.set(h.clone());
                    }
                    h
                }
            };
            for h in &hidden {
                let l = (|| {
                    let n = rms_norm(h, &head.norm, self.cfg.rms_eps)?;
                    let l = self.lin(&n, &head.lm_head, None)?;
                    if self.cfg.output_multiplier != 1.0 {
                        l * self.cfg.output_multiplier
                    } else {
                        Ok(l)
                    }
                })()
                .map_err(ce("final logits"))?;
                out.push(l);
            }
        }
        Ok(ForwardOutput { logits: out })
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
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
        let mut attn = self.attention(&a, &lw.attn, cos, sin).map_err(ce(&what))?;
        if let Some(n) = &lw.post_attn_norm {
            attn = rms_norm(&attn, n, eps).map_err(ce(&what))?;
        }
        let rm = self.cfg.residual_multiplier;
        if rm != 1.0 {
            attn = (attn * rm).map_err(ce(&what))?;
        }
        let h = (h + attn).map_err(ce(&what))?;
        let m = rms_norm(&h, &lw.mlp_norm, eps).map_err(ce(&what))?;
        let mut y = match &lw.mlp {
            MlpWeights::Dense(f) => self.ffn(f, &m).map_err(ce(&what))?.1,
            MlpWeights::Moe { .. } => self.moe(layer, prompt, &m, &lw.mlp, wants, observer)?,
        };
        if let Some(n) = &lw.post_mlp_norm {
            y = rms_norm(&y, n, eps).map_err(ce(&what))?;
        }
        if rm != 1.0 {
            y = (y * rm).map_err(ce(&what))?;
        }
        (h + y).map_err(ce(&what))
    }

    fn attention(&self, x: &Tensor, w: &AttnWeights, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
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
                let mut qx = self.lin(x, q, q_bias.as_ref())?;
                let mut kx = self.lin(x, k, k_bias.as_ref())?;
                let vx = self.lin(x, v, v_bias.as_ref())?;
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
                let qh = rope_half(&qh, cos, sin)?;
                let kh = rope_half(&kh, cos, sin)?;
                let rep = heads / kv_heads;
                let kh = repeat_kv(&kh, rep)?;
                let vh = repeat_kv(&split_heads(&vx, *kv_heads)?, rep)?;
                let scale = self
                    .cfg
                    .attn_output_multiplier
                    .unwrap_or(1.0 / (*head_dim as f64).sqrt());
                let out = attend(&qh, &kh, &vh, scale, self.cfg.max_attn_value)?;
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
                },
            ) => {
                // The latent norms use eps 1e-6 whatever rms_norm_eps says (as the reference does).
                let latent_eps = 1e-6;
                let qx = match (q, q_a, q_a_norm, q_b) {
                    (Some(q), _, _, _) => self.lin(x, q, None)?,
                    (None, Some(a), Some(n), Some(b)) => {
                        self.lin(&rms_norm(&self.lin(x, a, None)?, n, latent_eps)?, b, None)?
                    }
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
                let scale = 1.0 / ((nope + rope) as f64).sqrt();
                let out = attend(&query, &key, &vh, scale, None)?;
                self.lin(&out, o, None)
            }
            _ => candle_core::bail!("attention weights do not match the attention kind"),
        }
    }

    /// The MoE block: routing on the host, tokens grouped by expert (one
    /// matmul per active expert over its token block), accumulation in place.
    /// All experts are evaluated on every token only when the observer asks.
    fn moe(
        &self,
        layer: usize,
        prompt: usize,
        x: &Tensor,
        mlp: &MlpWeights,
        wants: Wants,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let MlpWeights::Moe {
            bias,
            experts,
            shared,
            shared_gate,
            ..
        } = mlp
        else {
            unreachable!("moe() is called for MoE layers only")
        };
        let what = format!("MoE layer {layer}");
        let e_count = experts.len();
        let k = self.model.info.top_k;
        let (t, hdim) = x.dims2().map_err(ce(&what))?;
        // On the CPU the experts run through the grouped kernels, straight
        // from the token rows and the weights in their hub layout (the
        // activations observer, which wants `act(gate·x)` alone, takes the
        // tensor path); the router too.
        let on_device = !x.device().is_cpu() || self.tensor_dispatch;
        let all = wants.all_expert_outputs || wants.activations;
        let x_host = host_copy(x, !on_device && !wants.activations, &what)?;
        let logits = self.logits_of(mlp, x, x_host.as_deref())?;
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(self.diverged(layer, "router logits"));
        }
        let mut scores = Vec::with_capacity(t * e_count);
        let mut selected = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e_count];
        // Every token's rule, tokens in parallel (the per-token sort is the
        // host's share of a layer: with 2048 tokens and 128 experts it costs
        // milliseconds on one core).
        let per_token: Vec<(Vec<f64>, routing::TokenRoute)> = {
            use rayon::prelude::*;
            logits
                .par_chunks(e_count.max(1))
                .with_min_len(32)
                .map(|row| {
                    let s = self.cfg.routing.scores(row);
                    let r = self.cfg.routing.route_scores(&s, k, bias.as_deref());
                    (s, r)
                })
                .collect()
        };
        for (tok, (token_scores, route)) in per_token.iter().enumerate() {
            scores.extend(token_scores.iter().map(|&s| s as f32));
            for (&e, &w) in route.experts.iter().zip(&route.weights) {
                selected.push(e as u32);
                weights.push(w);
                by_expert[e].push((tok as u32, w));
            }
        }
        let mut out = vec![0f32; t * hdim];
        let mut all_out: Vec<f32> = Vec::new();
        let mut all_act: Vec<f32> = Vec::new();
        let inter = self.model.info.expert_intermediate;
        let act = self.activation();
        // On a GPU the top-k dispatch stays on the device: one gather of the
        // routed tokens, grouped by expert, one matmul chain per active
        // expert on its slice, one weighted scatter-add into the output.
        let mut out_dev: Option<Tensor> = None;
        if on_device && !all {
            out_dev = Some(
                self.grouped_on_device(x, experts, &by_expert)
                    .map_err(ce(&what))?,
            );
        }
        if out_dev.is_none() {
            for (e, f) in experts.iter().enumerate() {
                let host = x_host.as_deref().zip(f.host_hub()).filter(|(_, hf)| {
                    let i = hf.gate.rows;
                    (hf.gate.cols, hf.up.rows, hf.up.cols) == (hdim, i, hdim)
                        && (hf.down.rows, hf.down.cols) == (hdim, i)
                });
                if let Some((xh, hf)) = host {
                    let i = hf.gate.rows;
                    let gu = expert_gemm::GateUp {
                        gate: hf.gate.data(),
                        up: hf.up.data(),
                        inter: i,
                        act,
                    };
                    let d = hf.down.data();
                    if all {
                        let rows: Vec<u32> = (0..t as u32).collect();
                        let mut h = vec![0f32; t * i];
                        expert_gemm::gate_up(xh, hdim, &rows, gu, &mut h);
                        let mut y = vec![0f32; t * hdim];
                        expert_gemm::matmul_xwt(&h, t, i, d, hdim, &mut y);
                        add_weighted_rows(&mut out, &y, hdim, &by_expert[e], true);
                        if wants.all_expert_outputs {
                            all_out.extend_from_slice(&y);
                        }
                    } else if !by_expert[e].is_empty() {
                        let rows: Vec<u32> = by_expert[e].iter().map(|&(tok, _)| tok).collect();
                        let scale: Vec<f32> = by_expert[e].iter().map(|&(_, w)| w).collect();
                        let mut h = vec![0f32; rows.len() * i];
                        expert_gemm::gate_up(xh, hdim, &rows, gu, &mut h);
                        expert_gemm::down_scatter_add(&h, i, d, hdim, &rows, &scale, &mut out);
                    }
                    continue;
                }
                if all {
                    let (a, y) = self.ffn(f, x).map_err(ce(&what))?;
                    let y: Vec<f32> = y
                        .flatten_all()
                        .and_then(|y| y.to_vec1())
                        .map_err(ce(&what))?;
                    add_weighted_rows(&mut out, &y, hdim, &by_expert[e], true);
                    if wants.all_expert_outputs {
                        all_out.extend_from_slice(&y);
                    }
                    if wants.activations {
                        let a: Vec<f32> = a
                            .flatten_all()
                            .and_then(|a| a.to_vec1())
                            .map_err(ce(&what))?;
                        all_act.extend_from_slice(&a);
                    }
                } else if !by_expert[e].is_empty() {
                    let toks: Vec<u32> = by_expert[e].iter().map(|&(tok, _)| tok).collect();
                    let idx = Tensor::new(toks.as_slice(), x.device()).map_err(ce(&what))?;
                    let y: Vec<f32> = x
                        .index_select(&idx, 0)
                        .and_then(|xe| self.ffn(f, &xe))
                        .and_then(|(_, y)| y.flatten_all()?.to_vec1())
                        .map_err(ce(&what))?;
                    add_weighted_rows(&mut out, &y, hdim, &by_expert[e], false);
                }
            }
        }
        let mut shared_host: Option<Vec<f32>> = None;
        if let (Some(f), Some(routed)) = (shared, out_dev.as_ref()) {
            let (y, total) = (|| {
                let y = self.ffn(f, x)?.1;
                let gated = match shared_gate {
                    Some(g) => {
                        y.broadcast_mul(&candle_nn::ops::sigmoid(&self.lin(x, g, None)?)?)?
                    }
                    None => y.clone(),
                };
                Ok((y, (routed + gated)?))
            })()
            .map_err(ce(&what))?;
            if wants.shared_output {
                shared_host = Some(
                    y.flatten_all()
                        .and_then(|y| y.to_vec1())
                        .map_err(ce(&what))?,
                );
            }
            out_dev = Some(total);
        } else if let Some(f) = shared {
            let y = self.ffn(f, x).map_err(ce(&what))?.1;
            let y_host: Vec<f32> = y
                .flatten_all()
                .and_then(|y| y.to_vec1())
                .map_err(ce(&what))?;
            let gate: Option<Vec<f32>> = match shared_gate {
                Some(g) => Some(
                    candle_nn::ops::sigmoid(&self.lin(x, g, None).map_err(ce(&what))?)
                        .and_then(|s| s.flatten_all()?.to_vec1())
                        .map_err(ce(&what))?,
                ),
                None => None,
            };
            for tok in 0..t {
                let g = gate.as_ref().map_or(1.0, |g| g[tok]);
                for (o, v) in out[tok * hdim..(tok + 1) * hdim]
                    .iter_mut()
                    .zip(&y_host[tok * hdim..(tok + 1) * hdim])
                {
                    *o += g * v;
                }
            }
            if wants.shared_output {
                shared_host = Some(y_host);
            }
        }
        let input = host_copy(x, wants.input, &what)?;
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
            intermediate: inter,
            shared_output: shared_host.as_deref(),
        });
        match out_dev {
            Some(y) => Ok(y),
            None => Tensor::from_vec(out, (t, hdim), x.device()).map_err(ce(&what)),
        }
    }

    /// The router logits `[tokens, experts]` of an MoE layer's input `x`, on
    /// the host: from the CPU kernel on the CPU for few tokens or experts
    /// ([`use_cpu_kernel`]), else from candle's matmul.
    pub fn router_logits(&self, mlp: &MlpWeights, x: &Tensor) -> Result<Vec<f32>> {
        let t = x.dim(0).map_err(ce("router input"))?;
        let wanted = x.device().is_cpu() && use_cpu_kernel(t, self.model.info.num_experts);
        let host = host_copy(x, wanted, "router input")?;
        self.logits_of(mlp, x, host.as_deref())
    }

    fn logits_of(&self, mlp: &MlpWeights, x: &Tensor, x_host: Option<&[f32]>) -> Result<Vec<f32>> {
        let MlpWeights::Moe {
            router,
            router_transposed,
            router_hub,
            ..
        } = mlp
        else {
            return Err(Error::Usage("not an MoE layer".into()));
        };
        let what = "router logits";
        let (t, h) = x.dims2().map_err(ce(what))?;
        // A few tokens (decode, small batches) or a few experts: the CPU
        // kernel on the hub layout; else a packed GEMM (candle's) wins.
        let hub = if *router_transposed {
            router_hub.as_ref()
        } else {
            Some(router)
        };
        let e = self.model.info.num_experts;
        if let (Some(xh), Some(hub)) = (x_host.filter(|_| use_cpu_kernel(t, e)), hub) {
            if let Some(r) = weights::HostMatrix::of(hub).filter(|r| r.cols == h) {
                let mut logits = vec![0f32; t * r.rows];
                expert_gemm::matmul_xwt(xh, t, h, r.data(), r.rows, &mut logits);
                return Ok(logits);
            }
        }
        let l = if *router_transposed {
            x.matmul(router)
        } else {
            router.t().and_then(|w| x.matmul(&w))
        };
        l.and_then(|l| l.flatten_all()?.to_vec1()).map_err(ce(what))
    }

    /// The top-k dispatch on the device (see [`Forward::moe`]): the routed
    /// experts' weighted outputs, `[tokens, hidden]`.
    fn grouped_on_device(
        &self,
        x: &Tensor,
        experts: &[Ffn],
        by_expert: &[Vec<(u32, f32)>],
    ) -> R<Tensor> {
        let dev = x.device();
        let (mut toks, mut ws, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for (e, pairs) in by_expert.iter().enumerate() {
            if !pairs.is_empty() {
                spans.push((e, toks.len(), pairs.len()));
                toks.extend(pairs.iter().map(|&(t, _)| t));
                ws.extend(pairs.iter().map(|&(_, w)| w));
            }
        }
        if toks.is_empty() {
            return x.zeros_like();
        }
        let idx = Tensor::new(toks.as_slice(), dev)?;
        let xs = x.index_select(&idx, 0)?;
        let ys = spans
            .iter()
            .map(|&(e, at, n)| Ok(self.ffn(&experts[e], &xs.narrow(0, at, n)?)?.1))
            .collect::<R<Vec<_>>>()?;
        let n = toks.len();
        let y = Tensor::cat(&ys, 0)?.broadcast_mul(&Tensor::from_vec(ws, (n, 1), dev)?)?;
        // Every token has k rows in `y`: gather them back into token order,
        // `[tokens, k, hidden]`, and sum over k (fully parallel kernels; a
        // scatter-add into the output serialises over the rows it adds).
        let (t, h) = x.dims2()?;
        let k = self.model.info.top_k;
        let mut seen = vec![0usize; t];
        let mut back = vec![0u32; t * k];
        for (p, &tok) in toks.iter().enumerate() {
            let tok = tok as usize;
            if seen[tok] < k {
                back[tok * k + seen[tok]] = p as u32;
            }
            seen[tok] += 1;
        }
        if seen.iter().all(|&c| c == k) {
            y.index_select(&Tensor::new(back.as_slice(), dev)?, 0)?
                .reshape((t, k, h))?
                .sum(1)
        } else {
            x.zeros_like()?.index_add(&idx, &y, 0)
        }
    }
}

/// `x`'s values on the host, flattened, when `wanted`.
fn host_copy(x: &Tensor, wanted: bool, what: &str) -> Result<Option<Vec<f32>>> {
    if !wanted {
        return Ok(None);
    }
    x.flatten_all()
        .and_then(|x| x.to_vec1())
        .map(Some)
        .map_err(ce(what))
}

/// Whether the CPU computes router logits for `tokens` tokens and `experts`
/// experts with its own kernel (`expert_gemm`) rather than candle's GEMM,
/// whose packing pays off only for many rows and columns (crossover measured
/// on a 2-core AVX-512 machine: between 16 and 64 tokens at 64–256 experts;
/// never, up to 256 tokens, at 8 experts).
pub fn use_cpu_kernel(tokens: usize, experts: usize) -> bool {
    tokens <= 32 || experts < 32
}

/// `out[tok] += w · y[row]` for each `(tok, w)` of an expert's tokens, where
/// `row` is the token itself (`y` holds every token) or its place in the list.
fn add_weighted_rows(out: &mut [f32], y: &[f32], hdim: usize, pairs: &[(u32, f32)], all: bool) {
    for (row, &(tok, w)) in pairs.iter().enumerate() {
        let tok = tok as usize;
        let row = if all { tok } else { row };
        let src = &y[row * hdim..(row + 1) * hdim];
        for (o, v) in out[tok * hdim..(tok + 1) * hdim].iter_mut().zip(src) {
            *o += w * v;
        }
    }
}

/// Parses `--device cpu|cuda[:N]`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            let ordinal = match d.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::bad_value(ValueKind::Device, d, "expected cuda:N"))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                return Err(Error::bad_value(
                    ValueKind::Device,
                    d,
                    "this build has no CUDA support (rebuild with `--features cuda`)",
                ));
            }
            Device::new_cuda(ordinal)
                .map_err(|e| Error::bad_value(ValueKind::Device, d, e.to_string()))
        }
        d => Err(Error::bad_value(
            ValueKind::Device,
            d,
            "expected `cpu` or `cuda[:N]`",
        )),
    }
}

/// Reads a `[tokens, vocab]` logits tensor to the host.
pub fn to_host(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_vec2())
        .map_err(ce("copying to the host"))
}
