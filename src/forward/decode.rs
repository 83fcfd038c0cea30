//! Token-by-token decoding with a key/value cache ([`Decoder`]): the prompt
//! goes through [`Forward::run`]'s code path once (the prefill), which keeps
//! every layer's rotated keys and values; each further token then runs
//! through the layers alone, on the host, attending to the cached keys and
//! values of the positions before it: nothing of an earlier position is
//! recomputed. The cache is allocated once, for a capacity fixed when the
//! decoder is made; a step allocates nothing of the weights' size.
//!
//! Covered: grouped-query attention ([`AttentionKind::Standard`]) with
//! everything the families add to it (q/k/v biases, q/k norms per head or
//! over the projection, partial rotary embeddings, Grok-1's soft-capped
//! logits and extra norms, Granite's multipliers), dense and MoE layers,
//! shared experts. Not covered, refused by [`Forward::decoder`] with an error
//! saying so: DeepSeek's multi-head latent attention (its cache would hold
//! the latent, not per-head keys), gpt-oss (attention sinks and sliding
//! windows), and devices other than the CPU. Those models decode through
//! [`Forward::run`] over the whole sequence.

use candle_core::{Device, Tensor};

use super::config::{AttentionKind, QkNorm};
use super::observer::Observer;
use super::weights::{self, ce, AttnWeights, HostData, HostMatrix, LayerWeights, MlpWeights};
use super::{Forward, R};
use crate::error::{Error, Result};

/// One layer's cached keys and values: `[kv_heads, capacity, head_dim]`
/// each, f32, keys after the rotary embedding (and any q/k norm).
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
}

impl LayerKv {
    fn new(kv_heads: usize, head_dim: usize, capacity: usize) -> LayerKv {
        let n = kv_heads * capacity * head_dim;
        LayerKv {
            k: vec![0f32; n],
            v: vec![0f32; n],
            kv_heads,
            head_dim,
            capacity,
        }
    }

    /// Stores the prefill's keys and values, `[kv_heads, tokens, head_dim]`
    /// each, at positions `0..tokens`.
    pub(super) fn store_prefix(&mut self, k: &Tensor, v: &Tensor) -> R<()> {
        let (h, t, d) = k.dims3()?;
        if (h, d) != (self.kv_heads, self.head_dim) || v.dims3()? != (h, t, d) {
            candle_core::bail!(
                "keys {:?} / values {:?} do not fit a cache of {} heads × {} dims",
                k.dims(),
                v.dims(),
                self.kv_heads,
                self.head_dim
            );
        }
        if t > self.capacity {
            candle_core::bail!(
                "{t} tokens do not fit the key/value cache of {} positions",
                self.capacity
            );
        }
        let kh: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let vh: Vec<f32> = v.flatten_all()?.to_vec1()?;
        for g in 0..h {
            let dst = g * self.capacity * d;
            let src = g * t * d;
            self.k[dst..dst + t * d].copy_from_slice(&kh[src..src + t * d]);
            self.v[dst..dst + t * d].copy_from_slice(&vh[src..src + t * d]);
        }
        Ok(())
    }

    /// The key and value rows of head `g` at position `pos`.
    fn at_mut(&mut self, g: usize, pos: usize) -> (&mut [f32], &mut [f32]) {
        let at = (g * self.capacity + pos) * self.head_dim;
        let d = self.head_dim;
        (&mut self.k[at..at + d], &mut self.v[at..at + d])
    }
}

/// Every layer's cached keys and values (see [`Decoder`]).
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    pub(super) fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers[layer]
    }
}

/// Decodes one token at a time after a prefill, reusing the cached keys and
/// values of the earlier positions (see the module documentation).
///
/// ```rust
/// use moe_inspect::forward::{parse_device, Forward};
/// use moe_inspect::model::Model;
///
/// let model = Model::demo()?;
/// let fwd = Forward::new(&model, parse_device("cpu")?)?.keep_weights();
/// let mut dec = fwd.decoder(8)?;
/// let prompt = dec.prefill(&[1, 5, 9], &mut ())?; // [3, vocab] logits
/// assert_eq!(prompt.dims()[0], 3);
/// let next = dec.step(42, &mut ())?; // the logits of position 3
/// assert_eq!(next.len(), fwd.cfg.vocab_size);
/// assert_eq!(dec.len(), 4);
/// # Ok::<(), moe_inspect::Error>(())
/// ```
pub struct Decoder<'f, 'm> {
    fwd: &'f Forward<'m>,
    cache: KvCache,
    len: usize,
    capacity: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Rotary dims of a head (the leading ones), and their frequencies.
    inv_freq: Vec<f32>,
    scale: f32,
    softcap: Option<f64>,
    qk_norm: QkNorm,
    // Per-step buffers, allocated once.
    h: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
}

impl<'m> Forward<'m> {
    /// Why [`Forward::decoder`] cannot decode this model with a key/value
    /// cache, or `None` when it can.
    pub fn kv_cache_unsupported(&self) -> Option<&'static str> {
        if !self.device.is_cpu() {
            Some("decoding with a key/value cache runs on the CPU only")
        } else if self.cfg.gpt_oss.is_some() {
            Some(
                "decoding with a key/value cache is not implemented for gpt-oss \
                 (attention sinks, sliding windows)",
            )
        } else if self.cfg.llama4.is_some() {
            Some(
                "decoding with a key/value cache is not implemented for Llama 4 \
                 (chunked attention, no-rope layers, temperature tuning)",
            )
        } else if self.cfg.hybrid.is_some() {
            Some(
                "decoding with a key/value cache is not implemented for Qwen3-Next / \
                 Qwen3.5-MoE (the Gated DeltaNet layers keep a recurrent state)",
            )
        } else if matches!(self.cfg.attention, AttentionKind::Mla { .. }) {
            Some(
                "decoding with a key/value cache is not implemented for multi-head \
                 latent attention (DeepSeek-V2/V3)",
            )
        } else {
            None
        }
    }

    /// A decoder with a key/value cache of `capacity` positions (prompt
    /// and generated tokens together), allocated here once. Refused, with
    /// the reason, for the models [`Forward::kv_cache_unsupported`] names,
    /// and when the cache would not fit in memory.
    pub fn decoder(&self, capacity: usize) -> Result<Decoder<'_, 'm>> {
        if let Some(why) = self.kv_cache_unsupported() {
            return Err(Error::Usage(format!(
                "{why}; run the whole sequence through Forward::run instead"
            )));
        }
        let AttentionKind::Standard {
            heads,
            kv_heads,
            head_dim,
            qk_norm,
            ..
        } = self.cfg.attention
        else {
            unreachable!("checked by kv_cache_unsupported")
        };
        if capacity == 0 {
            return Err(Error::Usage(
                "a key/value cache needs room for at least one token".into(),
            ));
        }
        let layers = self.model.info.num_layers;
        crate::memory::ensure_fits(
            &format!("a key/value cache of {capacity} positions"),
            crate::memory::product(&[2, layers, kv_heads, capacity, head_dim, 4]),
        )?;
        let rope_dim = self.cfg.rotary_dim.unwrap_or(head_dim);
        let hidden = self.model.info.hidden_size;
        Ok(Decoder {
            fwd: self,
            cache: KvCache {
                layers: (0..layers)
                    .map(|_| LayerKv::new(kv_heads, head_dim, capacity))
                    .collect(),
            },
            len: 0,
            capacity,
            heads,
            kv_heads,
            head_dim,
            inv_freq: super::attention::inv_freq(rope_dim, self.cfg.rope_theta),
            scale: self
                .cfg
                .attn_output_multiplier
                .unwrap_or(1.0 / (head_dim as f64).sqrt()) as f32,
            softcap: self.cfg.max_attn_value,
            qk_norm,
            h: Vec::with_capacity(hidden),
            a: Vec::with_capacity(hidden),
            q: Vec::with_capacity(heads * head_dim),
            k: Vec::with_capacity(kv_heads * head_dim),
            v: Vec::with_capacity(kv_heads * head_dim),
            att: vec![0f32; heads * head_dim],
            o: Vec::with_capacity(hidden),
            scores: Vec::with_capacity(capacity),
            logits: Vec::with_capacity(self.cfg.vocab_size),
        })
    }
}

impl Decoder<'_, '_> {
    /// Tokens held in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position from `len` on (the next step decodes at
    /// position `len`); the cache's memory is kept.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Runs `ids` through the model as [`Forward::run`] does, starting at
    /// position 0 of an empty cache, and keeps their keys and values:
    /// the logits of every position, `[ids.len(), vocab]`.
    pub fn prefill(&mut self, ids: &[u32], observer: &mut dyn Observer) -> Result<Tensor> {
        if self.len != 0 {
            return Err(Error::Usage(format!(
                "the prefill starts an empty cache, which holds {} tokens (truncate(0) first)",
                self.len
            )));
        }
        if ids.len() > self.capacity {
            return Err(Error::Usage(format!(
                "a prompt of {} tokens does not fit the key/value cache of {} positions",
                ids.len(),
                self.capacity
            )));
        }
        let mut out = self.fwd.run_cached(
            &[ids.to_vec()],
            observer,
            super::LogitRows::All,
            Some(&mut self.cache),
        )?;
        self.len = ids.len();
        out.logits
            .pop()
            .ok_or_else(|| Error::Usage("the prefill gave no logits".into()))
    }

    /// Feeds token `id` at the next position: every layer on this token
    /// alone, attending to the cached positions; the token's logits
    /// (`vocab` values). `observer` sees each MoE layer with one token.
    /// The products follow the forward pass's [`super::Forward::compute`]
    /// mode, as its full forward does.
    pub fn step(&mut self, id: u32, observer: &mut dyn Observer) -> Result<&[f32]> {
        let compute = self.fwd.compute;
        // A step is a burst of ~20 small parallel products (a few hundred
        // microseconds each): the pool's other threads spin between them
        // instead of going to sleep and being woken for each.
        super::awake::with_awake_pool(|| {
            super::expert_gemm::with_compute(compute, || self.step_in_mode(id, observer))
        })
    }

    fn step_in_mode(&mut self, id: u32, observer: &mut dyn Observer) -> Result<&[f32]> {
        let fwd = self.fwd;
        let vocab = fwd.cfg.vocab_size;
        if id as usize >= vocab {
            return Err(Error::Usage(format!(
                "token id {id} is outside the vocabulary (vocab_size {vocab})"
            )));
        }
        if self.len >= self.capacity {
            return Err(Error::Usage(format!(
                "the key/value cache is full ({} positions)",
                self.capacity
            )));
        }
        let e = weights::embed(fwd.model, &[id], &Device::Cpu)?;
        self.h.clear();
        self.h.extend(
            e.flatten_all()
                .and_then(|e| e.to_vec1::<f32>())
                .map_err(ce("embeddings"))?,
        );
        let em = fwd.cfg.embedding_multiplier;
        if em != 1.0 {
            let em = em as f32;
            self.h.iter_mut().for_each(|v| *v *= em);
        }
        let wants = observer.wants();
        for layer in 0..fwd.model.info.num_layers {
            let lw = fwd.layer_weights(layer)?;
            self.layer(layer, &lw, wants, observer)?;
            drop(lw);
            if self.h.iter().any(|v| !v.is_finite()) {
                return Err(fwd.diverged(layer, "hidden states"));
            }
            observer.layer_done(layer);
            if fwd.resident.is_none() {
                fwd.release_layer_pages(layer);
            }
        }
        let head = fwd.head_weights()?;
        let what = "final logits";
        let mut n = std::mem::take(&mut self.a);
        with_host(&head.norm, |w| {
            rms_norm(&self.h, w, fwd.cfg.rms_eps, &mut n)
        })
        .map_err(ce(what))?;
        let mut logits = std::mem::take(&mut self.logits);
        let r = self.matvec(&n, &head.lm_head, None, &mut logits);
        self.a = n;
        self.logits = logits;
        r.map_err(ce(what))?;
        let om = fwd.cfg.output_multiplier;
        if om != 1.0 {
            let om = om as f32;
            self.logits.iter_mut().for_each(|v| *v *= om);
        }
        self.len += 1;
        Ok(&self.logits)
    }

    /// One decoder layer on the hidden state `self.h` of the token at
    /// position `self.len`, in place.
    fn layer(
        &mut self,
        layer: usize,
        lw: &LayerWeights,
        wants: super::observer::Wants,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let fwd = self.fwd;
        let eps = fwd.cfg.rms_eps;
        let what = format!("layer {layer}");
        let mut a = std::mem::take(&mut self.a);
        let r = with_host(&lw.attn_norm, |w| rms_norm(&self.h, w, eps, &mut a));
        self.a = a;
        r.map_err(ce(&what))?;
        self.attention(layer, &lw.attn).map_err(ce(&what))?;
        let rm = fwd.cfg.residual_multiplier as f32;
        let mut o = std::mem::take(&mut self.o);
        let r = (|| {
            if let Some(n) = &lw.post_attn_norm {
                let mut t = Vec::with_capacity(o.len());
                with_host(n, |w| rms_norm(&o, w, eps, &mut t))?;
                o = t;
            }
            Ok(())
        })();
        r.map_err(ce(&what))?;
        for (h, &v) in self.h.iter_mut().zip(&o) {
            *h += if rm != 1.0 { v * rm } else { v };
        }
        self.o = o;
        let mut m = std::mem::take(&mut self.a);
        let r = with_host(&lw.mlp_norm, |w| rms_norm(&self.h, w, eps, &mut m));
        self.a = m;
        r.map_err(ce(&what))?;
        let x = Tensor::from_slice(&self.a, (1, self.a.len()), &Device::Cpu).map_err(ce(&what))?;
        let y = match &lw.mlp {
            MlpWeights::Dense(f) => fwd.ffn(f, &x).map_err(ce(&what))?.1,
            MlpWeights::Moe { .. } => fwd.moe(layer, 0, &x, &lw.mlp, wants, observer)?,
        };
        let mut y: Vec<f32> = y
            .flatten_all()
            .and_then(|y| y.to_vec1())
            .map_err(ce(&what))?;
        if let Some(n) = &lw.post_mlp_norm {
            let mut t = Vec::with_capacity(y.len());
            with_host(n, |w| rms_norm(&y, w, eps, &mut t)).map_err(ce(&what))?;
            y = t;
        }
        for (h, &v) in self.h.iter_mut().zip(&y) {
            *h += if rm != 1.0 { v * rm } else { v };
        }
        Ok(())
    }

    /// Attention of the token at position `self.len` over the cache and
    /// itself (its key and value stored first), output projection included:
    /// `self.a` (normed) in, `self.o` out.
    fn attention(&mut self, layer: usize, w: &AttnWeights) -> R<()> {
        let AttnWeights::Standard {
            q,
            k,
            v,
            o,
            q_bias,
            k_bias,
            v_bias,
            q_norm,
            k_norm,
        } = w
        else {
            candle_core::bail!("attention weights do not match the attention kind")
        };
        let eps = self.fwd.cfg.rms_eps;
        let (heads, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let a = std::mem::take(&mut self.a);
        let (mut qv, mut kv, mut vv) = (
            std::mem::take(&mut self.q),
            std::mem::take(&mut self.k),
            std::mem::take(&mut self.v),
        );
        let r = (|| {
            self.matvec_qkv(
                &a,
                [q, k, v],
                [q_bias.as_ref(), k_bias.as_ref(), v_bias.as_ref()],
                [&mut qv, &mut kv, &mut vv],
            )?;
            if qv.len() != heads * d || kv.len() != kvh * d || vv.len() != kvh * d {
                candle_core::bail!(
                    "q/k/v projections give {}/{}/{} values, expected {}/{}/{}",
                    qv.len(),
                    kv.len(),
                    vv.len(),
                    heads * d,
                    kvh * d,
                    kvh * d
                );
            }
            match self.qk_norm {
                QkNorm::None => {}
                QkNorm::Full | QkNorm::PerHead => {
                    let chunk = if self.qk_norm == QkNorm::Full {
                        usize::MAX
                    } else {
                        d
                    };
                    let (qn, kn) = (
                        q_norm.as_ref().expect("loaded with a q/k norm"),
                        k_norm.as_ref().expect("loaded with a q/k norm"),
                    );
                    with_host(qn, |w| norm_chunks(&mut qv, w, chunk, eps))?;
                    with_host(kn, |w| norm_chunks(&mut kv, w, chunk, eps))?;
                }
            }
            let pos = self.len;
            rope(&mut qv, d, &self.inv_freq, pos);
            rope(&mut kv, d, &self.inv_freq, pos);
            let cache = self.cache.layer_mut(layer);
            for g in 0..kvh {
                let (kd, vd) = cache.at_mut(g, pos);
                kd.copy_from_slice(&kv[g * d..(g + 1) * d]);
                vd.copy_from_slice(&vv[g * d..(g + 1) * d]);
            }
            let cache = &self.cache.layers[layer];
            attend(
                &qv,
                cache,
                pos + 1,
                heads,
                self.scale,
                self.softcap,
                &mut self.scores,
                &mut self.att,
            );
            let mut out = std::mem::take(&mut self.o);
            let r = self.matvec(&self.att, o, None, &mut out);
            self.o = out;
            r
        })();
        self.a = a;
        (self.q, self.k, self.v) = (qv, kv, vv);
        r
    }

    /// The q, k and v projections of one token: through
    /// [`super::matvec::matvec_many`] (one hand-off to the pool for the
    /// three) when all three are hub-layout matrices of one dtype, else one
    /// [`Self::matvec`] each.
    fn matvec_qkv(
        &self,
        x: &[f32],
        ws: [&Tensor; 3],
        bs: [Option<&Tensor>; 3],
        ys: [&mut Vec<f32>; 3],
    ) -> R<()> {
        let hubs: Option<Vec<HostMatrix>> = ws
            .iter()
            .map(|w| HostMatrix::of(w).filter(|m| self.hub_usable(m, x.len())))
            .collect();
        let [y0, y1, y2] = ys;
        let done = match hubs.as_deref() {
            Some([a, b, c]) => {
                for (y, m) in [&mut *y0, &mut *y1, &mut *y2].into_iter().zip([a, b, c]) {
                    y.clear();
                    y.resize(m.rows, 0.0);
                }
                let mut outs = [y0.as_mut_slice(), y1.as_mut_slice(), y2.as_mut_slice()];
                match (a.data(), b.data(), c.data()) {
                    (HostData::F32(a), HostData::F32(b), HostData::F32(c)) => {
                        super::matvec::matvec_many(x, &[a, b, c], &mut outs);
                        true
                    }
                    (HostData::Bf16(a), HostData::Bf16(b), HostData::Bf16(c)) => {
                        super::matvec::matvec_many(x, &[a, b, c], &mut outs);
                        true
                    }
                    (HostData::F16(a), HostData::F16(b), HostData::F16(c)) => {
                        super::matvec::matvec_many(x, &[a, b, c], &mut outs);
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        for ((w, b), y) in ws.into_iter().zip(bs).zip([y0, y1, y2]) {
            if done {
                add_bias(y, b)?;
            } else {
                self.matvec(x, w, b, y)?;
            }
        }
        Ok(())
    }

    /// Whether a matrix is read by the single-token kernels: in the hub
    /// layout with `cols` columns (an f32 matrix kept transposed for
    /// candle's matmul is not).
    fn hub_usable(&self, m: &HostMatrix, cols: usize) -> bool {
        m.cols == cols && (!matches!(m.data(), HostData::F32(_)) || !self.fwd.weights_transposed())
    }

    /// `y = x · Wᵀ (+ b)` for one token: a matrix in the hub layout `[out,
    /// in]` (every bf16/f16 matrix on the CPU; f32 when streamed) through
    /// the single-token kernel; an f32 matrix kept transposed (resident f32
    /// weights) through candle's matmul.
    fn matvec(&self, x: &[f32], w: &Tensor, b: Option<&Tensor>, y: &mut Vec<f32>) -> R<()> {
        let hub = HostMatrix::of(w).filter(|m| self.hub_usable(m, x.len()));
        match hub {
            Some(m) => {
                y.clear();
                y.resize(m.rows, 0.0);
                match m.data() {
                    HostData::F32(d) => super::matvec::matvec(x, d, m.rows, y),
                    HostData::Bf16(d) => super::matvec::matvec(x, d, m.rows, y),
                    HostData::F16(d) => super::matvec::matvec(x, d, m.rows, y),
                }
            }
            None => {
                let xt = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
                let r = self
                    .fwd
                    .lin(&xt, w, None)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                y.clear();
                y.extend_from_slice(&r);
            }
        }
        add_bias(y, b)
    }
}

/// `y += b` where there is a bias.
fn add_bias(y: &mut [f32], b: Option<&Tensor>) -> R<()> {
    if let Some(b) = b {
        with_host(b, |b| {
            for (y, &b) in y.iter_mut().zip(b) {
                *y += b;
            }
        })?;
    }
    Ok(())
}

/// Runs `f` on the f32 values of `t` (a vector of the CPU forward pass),
/// borrowed where they are f32 already.
fn with_host<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> R<T> {
    let n = t.elem_count();
    let flat = t.reshape((1, n))?;
    if let Some(v) = HostMatrix::of(&flat)
        .as_ref()
        .and_then(HostMatrix::f32_data)
    {
        return Ok(f(v));
    }
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(f(&v))
}

/// RMSNorm of `x` into `out` as the forward pass computes it:
/// `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut Vec<f32>) {
    let n = x.len();
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let r = (ss * (1.0 / n as f64) as f32 + eps as f32).sqrt();
    out.clear();
    out.extend(x.iter().zip(w).map(|(&v, &w)| v / r * w));
}

/// RMSNorm of every `chunk` values of `x` in place (one weight per chunk
/// position; `usize::MAX`: the whole of `x`).
fn norm_chunks(x: &mut [f32], w: &[f32], chunk: usize, eps: f64) {
    let chunk = chunk.min(x.len()).max(1);
    let mut t = Vec::with_capacity(chunk);
    for c in x.chunks_mut(chunk) {
        rms_norm(c, w, eps, &mut t);
        c.copy_from_slice(&t);
    }
}

/// Half-split rotary embedding of the leading `2 · inv_freq.len()` dims of
/// every `d`-wide head of `x` at position `pos`, in place (the rest pass
/// through), with the angles of the prefill's tables.
fn rope(x: &mut [f32], d: usize, inv_freq: &[f32], pos: usize) {
    let half = inv_freq.len();
    for head in x.chunks_mut(d) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = pos as f32 * f;
            let (c, s) = (a.cos(), a.sin());
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * c - x2 * s;
            head[i + half] = x2 * c + x1 * s;
        }
    }
}

/// Attention of one token's query heads `q` over the first `n` cached
/// positions: `out[h] = softmax(scale · q[h]·K[g]ᵀ) · V[g]`, `g` the
/// key/value head of query head `h`, logits soft-capped when asked.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    cache: &LayerKv,
    n: usize,
    heads: usize,
    scale: f32,
    softcap: Option<f64>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = cache.head_dim;
    let rep = heads / cache.kv_heads;
    for (h, o) in out.chunks_mut(d).enumerate().take(heads) {
        let g = h / rep;
        let qh = &q[h * d..(h + 1) * d];
        let base = g * cache.capacity * d;
        let keys = &cache.k[base..base + n * d];
        let vals = &cache.v[base..base + n * d];
        scores.clear();
        scores.extend(keys.chunks_exact(d).map(|k| {
            let s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            match softcap {
                Some(cap) => ((s as f64 / cap).tanh() * cap) as f32,
                None => s,
            }
        }));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (&p, v) in scores.iter().zip(vals.chunks_exact(d)) {
            let p = p / sum;
            for (o, &v) in o.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
}
