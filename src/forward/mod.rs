//! The candle forward pass with an observer for router and expert values
//! (SPEC §9). Layers are loaded one at a time from the mmap (on the CPU
//! bf16/f16 matrices as stored, read by the kernels of `expert_gemm`;
//! everything else converted to f32 once per layer), every prompt goes
//! through a layer before the next layer is loaded, and the layer's pages are
//! released afterwards: memory holds one layer of weights plus the prompts'
//! hidden states, whatever the depth. [`Forward::resident_if_fits`] keeps
//! every layer loaded instead when the weights fit in memory and will be
//! read more than once.

mod attention;
mod awake;
pub mod config;
pub mod decode;
pub mod deepseek_v32;
mod glm;
pub mod heap;
mod matvec;
internal_mod!(expert_gemm);
pub mod gpt_oss;
pub mod llama4;
mod moe;
pub mod observer;
pub(crate) mod packed_bf16;
pub mod qwen3_next;
pub mod routing;
pub mod weights;

use expert_gemm::Activation;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result, ValueKind};
use crate::model::Model;
use attention::{rope_tables, rope_tables_from, ATTENTION_BLOCK_BYTES};
use config::{AttentionKind, ForwardConfig};
pub use moe::use_cpu_kernel;
use observer::{Observer, Wants};
use weights::{ce, Ffn, HeadWeights, LayerWeights, MlpWeights};

pub use expert_gemm::Compute;

/// A forward pass over a model on a device.
pub struct Forward<'m> {
    model: &'m Model,
    /// The forward configuration derived from the model's config.json (family rules included).
    pub cfg: ForwardConfig,
    device: Device,
    /// With [`Forward::keep_weights`]: every layer's weights, loaded on
    /// first use and kept (for repeated runs on a model that fits in memory).
    resident: Option<std::sync::Mutex<Vec<Option<std::sync::Arc<LayerWeights>>>>>,
    head: std::sync::OnceLock<std::sync::Arc<HeadWeights>>,
    /// Run the top-k dispatch as tensor ops on the device even on the CPU.
    tensor_dispatch: bool,
    /// How the CPU matrix products treat the activations ([`Forward::compute`]).
    compute: Compute,
    /// The decision of [`Forward::resident_if_fits`], when it was asked.
    residency: Option<Residency>,
}

/// Whether a forward pass keeps its weights resident or streams them layer
/// by layer, and why ([`Forward::resident_if_fits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    /// The weights are loaded once and kept (in their stored dtype on the
    /// CPU for bf16/f16 matrices).
    pub resident: bool,
    /// Bytes the resident weights take.
    pub weight_bytes: u64,
    /// Bytes of memory available when decided (`MemAvailable`, capped by
    /// the cgroup limit and `--max-memory`); `None` where none could be read.
    pub available: Option<u64>,
    /// The device is not the CPU: weights are streamed to it per run.
    pub device: bool,
    /// How many times the weights will be read ([`Passes`]).
    pub passes: Passes,
}

/// How many forward passes a [`Forward`] will run over the same weights,
/// which decides whether a resident copy can pay
/// ([`Forward::resident_if_fits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// One pass (`trace`, a golden snapshot, the dynamic analyses): the
    /// pass runs layer by layer over every prompt, so each layer's weights
    /// are read once whatever the residency, and a resident copy would only
    /// add its copy and its memory. Measured on the scaled Mixtral-layout
    /// checkpoint (818 MB bf16), `trace` of 256 tokens: 0.63–1.91 s and
    /// 913 MiB resident against 0.50–0.64 s and 410 MiB streamed.
    One,
    /// Repeated passes (benchmarks, decoding): the copy is made once and
    /// every later pass reads it instead of the checkpoint.
    Repeated,
}

impl std::fmt::Display for Residency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::memory::human;
        let avail = self.available.map_or("unknown".to_string(), human);
        if self.resident {
            write!(
                f,
                "weights resident: {} loaded once and kept (available memory {avail})",
                human(self.weight_bytes)
            )
        } else if self.device {
            write!(f, "weights streamed layer by layer to the device")
        } else if self.passes == Passes::One {
            write!(
                f,
                "weights streamed layer by layer: one pass reads each layer once, \
                 so a resident copy ({}) would add memory and no speed",
                human(self.weight_bytes)
            )
        } else {
            write!(
                f,
                "weights streamed layer by layer: {} would take more than {} of \
                 the available memory ({avail})",
                human(self.weight_bytes),
                RESIDENT_SHARE
            )
        }
    }
}

/// Share of the available memory resident weights may take (the rest is
/// for the working set, the mmap's transient pages and the page cache).
const RESIDENT_SHARE: &str = "3/4";

/// Output of [`Forward::run`].
pub struct ForwardOutput {
    /// Final logits per prompt, when asked for: `[tokens, vocab]` with
    /// [`LogitRows::All`], `[1, vocab]` (the last position) with
    /// [`LogitRows::Last`].
    pub logits: Vec<Tensor>,
}

/// Which positions' final logits a forward pass computes
/// ([`Forward::run_logits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// No logits (the final norm and the head are skipped).
    None,
    /// Every position's (`model(ids).logits`).
    All,
    /// The last position's only, the next-token prediction: what a prompt
    /// prefill needs, and what llama.cpp's `llama-bench` computes for its
    /// prompt-processing figure. The head's cost is then one row instead
    /// of one per token (on a 32000-word vocabulary at hidden 1024, a
    /// quarter of the forward's arithmetic).
    Last,
}

type R<T> = std::result::Result<T, candle_core::Error>;

/// RMSNorm over the last axis, in f32: `x / sqrt(mean(x²) + eps) * w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> R<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Whether every value of `x` is finite (`sum(x · 0)` is NaN otherwise).
fn all_finite(x: &Tensor) -> R<bool> {
    let z = (x * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(z.is_finite())
}

impl<'m> Forward<'m> {
    /// Prepares a forward pass of `model` on `device`, and keeps the
    /// process's freed buffers in its heap for the layers to reuse
    /// ([`heap::keep_freed_buffers`]).
    pub fn new(model: &'m Model, device: Device) -> Result<Forward<'m>> {
        let cfg = ForwardConfig::from_config(&model.config, &model.info)?;
        // Its layers reuse each other's freed buffers (see `heap`).
        heap::keep_freed_buffers();
        Ok(Forward {
            model,
            cfg,
            device,
            resident: None,
            head: std::sync::OnceLock::new(),
            tensor_dispatch: false,
            compute: Compute::Exact,
            residency: None,
        })
    }

    /// How the CPU matrix products on stored bf16 weights treat the
    /// activations: [`Compute::Exact`] (the default: f32 activations, the
    /// f32 kernel's products) or [`Compute::Bf16`] (activations rounded to
    /// bf16, as llama.cpp computes on bf16 weights; opt-in, see
    /// [`Compute`]).
    pub fn compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    /// Bytes every layer's and the head's weights take when kept resident:
    /// bf16/f16 matrices as stored on the CPU, everything else in f32.
    pub fn resident_weight_bytes(&self) -> u64 {
        use crate::model::Dtype;
        let w = self.model.weights();
        let cpu = self.device.is_cpu();
        w.names()
            .into_iter()
            .filter_map(|n| w.tensor(n).ok())
            .map(|v| {
                let size = match v.dtype {
                    Dtype::BF16 | Dtype::F16 if cpu && v.shape.len() == 2 => 2,
                    _ => 4,
                };
                crate::memory::product(&[v.numel(), size])
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Keeps the weights resident ([`Forward::keep_weights`]) when that
    /// pays and they fit: [`Passes::Repeated`] on the CPU, when they take at
    /// most 3/4 of the memory available now ([`crate::memory::available`]:
    /// `MemAvailable`, the cgroup limit, `--max-memory`); otherwise (a
    /// single pass, larger than memory, no reading of the available memory,
    /// a GPU) streams them layer by layer with memory bounded by one layer.
    /// The decision is in [`Forward::residency`].
    pub fn resident_if_fits(self, passes: Passes) -> Self {
        let weight_bytes = self.resident_weight_bytes();
        let available = crate::memory::available();
        let device = !self.device.is_cpu();
        let resident = !device
            && passes == Passes::Repeated
            && available.is_some_and(|a| weight_bytes <= a / 4 * 3);
        let decision = Residency {
            resident,
            weight_bytes,
            available,
            device,
            passes,
        };
        let mut f = if resident { self.keep_weights() } else { self };
        f.residency = Some(decision);
        f
    }

    /// The decision of [`Forward::resident_if_fits`], when it was made.
    pub fn residency(&self) -> Option<&Residency> {
        self.residency.as_ref()
    }

    /// Runs the top-k dispatch as the GPU does (tensor ops: one gather, a
    /// matmul chain per active expert, one scatter-add) also on the CPU,
    /// instead of the CPU's grouped kernels: to test the GPU path on any
    /// machine and to compare the two.
    pub fn tensor_dispatch(mut self) -> Self {
        self.tensor_dispatch = true;
        self
    }

    /// Keeps every layer's weights after first use instead of streaming
    /// them from the mmap on each run: for repeated runs (serving,
    /// benchmarks) on a model whose weights fit in memory. On the CPU the
    /// bf16/f16 matrices are kept as stored (the kernels read them so),
    /// everything else in f32. The default streams one layer at a time, with
    /// memory bounded by one layer; [`Forward::resident_if_fits`] decides
    /// from the model's size and the available memory.
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
        // The kept weights are a copy: the mmap's pages of the layer are not
        // read again.
        self.release_layer_pages(layer);
        Ok(w)
    }

    /// A projection with a weight loaded by this forward pass.
    fn lin(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> R<Tensor> {
        let y = weights::linear_any(x, w, self.resident.is_some())?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// [`Forward::lin`] of one `x` with several weights (a layer's query,
    /// key and value projections): stored bf16/f16 weights in one pass over
    /// the cores.
    fn lins<const N: usize>(
        &self,
        x: &Tensor,
        ws: [&Tensor; N],
        bs: [Option<&Tensor>; N],
    ) -> R<[Tensor; N]> {
        let ys: Vec<Tensor> = match weights::host_linears(x, &ws) {
            Some(ys) => ys?,
            None => ws
                .iter()
                .map(|w| weights::linear_any(x, w, self.resident.is_some()))
                .collect::<R<_>>()?,
        };
        let ys = ys
            .into_iter()
            .zip(bs)
            .map(|(y, b)| match b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            })
            .collect::<R<Vec<_>>>()?;
        Ok(ys.try_into().expect("one output per weight"))
    }

    /// Whether the weights are kept resident across runs ([`Forward::keep_weights`]).
    pub fn weights_resident(&self) -> bool {
        self.resident.is_some()
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

    /// Drops the mmap's pages of `layer` from the process (see `Weights::release`).
    fn release_layer_pages(&self, layer: usize) {
        let names =
            weights::layer_tensor_names(self.model.weights(), self.model.naming().prefix, layer);
        self.model
            .weights()
            .release(names.iter().map(String::as_str));
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
        if self.cfg.gpt_oss.is_some() {
            return self.gpt_oss_moe(layer, 0, x, lw, wants, observer);
        }
        if self.cfg.llama4.is_some() {
            return self.llama4_moe(layer, 0, x, &lw.mlp, wants, observer);
        }
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
        let rows = if logits {
            LogitRows::All
        } else {
            LogitRows::None
        };
        self.run_logits(prompts, observer, rows)
    }

    /// [`Forward::run`], with the final logits of the positions `rows`
    /// only (every layer still runs on every position: the observer sees
    /// the same routing).
    pub fn run_logits(
        &self,
        prompts: &[Vec<u32>],
        observer: &mut dyn Observer,
        rows: LogitRows,
    ) -> Result<ForwardOutput> {
        crate::forward::expert_gemm::with_compute(self.compute, || {
            self.run_cached(prompts, observer, rows, None)
        })
    }

    /// [`Forward::run_logits`], keeping every layer's keys and values of the
    /// (single) prompt in `cache` when given (the prefill of
    /// [`decode::Decoder`]).
    fn run_cached(
        &self,
        prompts: &[Vec<u32>],
        observer: &mut dyn Observer,
        rows: LogitRows,
        mut cache: Option<&mut decode::KvCache>,
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
            AttentionKind::Standard { head_dim, .. } => self.cfg.rotary_dim.unwrap_or(*head_dim),
            AttentionKind::Mla {
                qk_rope_head_dim, ..
            } => *qk_rope_head_dim,
        };
        let (cos, sin) = match (&self.cfg.gpt_oss, &self.cfg.llama4) {
            (Some(g), _) => g.rope_tables(max_t, dev),
            (None, Some(l)) => l.rope_tables(max_t, dev),
            _ => match &self.cfg.rope_yarn {
                Some((inv, factor)) => rope_tables_from(max_t, inv, *factor, dev),
                None => rope_tables(max_t, rope_dim, self.cfg.rope_theta, dev),
            },
        }
        .map_err(ce("rotary tables"))?;
        let wants = observer.wants();
        for layer in 0..model.info.num_layers {
            let lw = self.layer_weights(layer)?;
            for (p, h) in hidden.iter_mut().enumerate() {
                let t = h.dim(0).map_err(ce("hidden state"))?;
                let (c, s) =
                    (|| Ok::<_, candle_core::Error>((cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?)))(
                    )
                    .map_err(ce("rotary tables"))?;
                let kv = cache.as_deref_mut().map(|c| c.layer_mut(layer));
                *h = self.layer(layer, p, h, &lw, &c, &s, wants, observer, kv)?;
                if !all_finite(h).map_err(ce("hidden state"))? {
                    return Err(self.diverged(layer, "hidden states"));
                }
            }
            drop(lw);
            observer.layer_done(layer);
            if self.resident.is_none() {
                self.release_layer_pages(layer);
            }
        }
        let mut out = Vec::new();
        if rows != LogitRows::None {
            let head = self.head_weights()?;
            for h in &hidden {
                let l = (|| {
                    let t = h.dim(0)?;
                    let h = match rows {
                        LogitRows::Last if t > 1 => h.narrow(0, t - 1, 1)?,
                        _ => h.clone(),
                    };
                    let n = rms_norm(&h, &head.norm, self.cfg.rms_eps)?;
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

    /// The final norm and output head: loaded once when the weights are
    /// resident, else per call (and the mmap's pages dropped).
    fn head_weights(&self) -> Result<std::sync::Arc<HeadWeights>> {
        if let (Some(_), Some(h)) = (&self.resident, self.head.get()) {
            return Ok(h.clone());
        }
        let model = self.model;
        let h = std::sync::Arc::new(HeadWeights::load(
            model,
            &self.cfg,
            &self.device,
            self.resident.is_some(),
        )?);
        // Loaded as a copy: drop the mmap's pages of the head.
        let head = weights::OuterNames::of(model).lm_head;
        model.weights().release([head.as_str()]);
        if self.resident.is_some() {
            let _ = self.head.set(h.clone());
        }
        Ok(h)
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
        kv: Option<&mut decode::LayerKv>,
    ) -> Result<Tensor> {
        if self.cfg.gpt_oss.is_some() {
            return self.gpt_oss_layer(layer, prompt, h, lw, cos, sin, wants, observer);
        }
        if self.cfg.llama4.is_some() {
            return self.llama4_layer(layer, prompt, h, lw, cos, sin, wants, observer);
        }
        if self.cfg.hybrid.is_some() {
            return self.hybrid_layer(layer, prompt, h, lw, cos, sin, wants, observer);
        }
        let eps = self.cfg.rms_eps;
        let what = format!("layer {layer}");
        let a = rms_norm(h, &lw.attn_norm, eps).map_err(ce(&what))?;
        let mut attn = self
            .attention(&a, &lw.attn, cos, sin, kv)
            .map_err(ce(&what))?;
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
