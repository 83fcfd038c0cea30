//! Loading one decoder layer's weights (attention, norms, MLP or MoE) from the
//! mmap into candle tensors (on the CPU bf16/f16 matrices in their stored
//! dtype, everything else f32), once per layer and forward run, or once when
//! kept resident. Hub names of
//! the attention and norm tensors per family live here; router and expert
//! names come from the family adapter.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::forward::config::{AttentionKind, ForwardConfig, QkNorm};
use crate::model::{ExpertView, Family, Model, TensorView, Weights};

/// Converts a candle error into the crate's error, naming what was computed.
pub fn ce(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Compute {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// Loads a tensor on `device`. On the CPU a bf16 or f16 matrix keeps its
/// stored dtype and the hub layout `[out, in]` (whatever `transposed` says):
/// the CPU kernels ([`host_linear`], the grouped expert kernels) read it as
/// stored and accumulate in f32. Everything else is converted to f32 once,
/// here (FP8 and quantised encodings, vectors, every tensor on a GPU);
/// those matrices keep the hub layout, or with `transposed` are stored
/// `[in, out]`: a copy that pays off when weights stay resident across runs
/// (the matrix products then read a contiguous right-hand side).
pub fn load(weights: &Weights, name: &str, device: &Device, transposed: bool) -> Result<Tensor> {
    load_view(&weights.tensor(name)?, device, transposed)
}

/// [`load`] of a view (one expert of a fused tensor is a view, not a name).
pub fn load_view(view: &TensorView<'_>, device: &Device, transposed: bool) -> Result<Tensor> {
    let name = view.name;
    if let Some(t) = load_half(view, device)? {
        return Ok(t);
    }
    let data = view.to_f32_vec();
    if data.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            path: view.path.to_path_buf(),
            tensor: name.to_string(),
        });
    }
    match view.shape[..] {
        [rows, cols] if transposed => {
            Tensor::from_vec(transpose(&data, rows, cols), (cols, rows), device).map_err(ce(name))
        }
        _ => Tensor::from_vec(data, view.shape.to_vec(), device).map_err(ce(name)),
    }
}

/// A 2-D bf16 or f16 matrix on the CPU in its stored dtype (one copy of the
/// bytes, no conversion), checked for NaN and infinities; `None` for other
/// tensors.
fn load_half(view: &TensorView<'_>, device: &Device) -> Result<Option<Tensor>> {
    use crate::model::Dtype;
    use half::vec::HalfBitsVecExt;
    let (&[rows, cols], true) = (&view.shape[..], view.is_contiguous()) else {
        return Ok(None);
    };
    if !device.is_cpu() || !matches!(view.dtype, Dtype::BF16 | Dtype::F16) {
        return Ok(None);
    }
    let bytes = view.bytes();
    let Some(n) = rows
        .checked_mul(cols)
        .filter(|n| n.checked_mul(2) == Some(bytes.len()))
    else {
        return Ok(None);
    };
    // One pass on all cores: the stored words copied, NaN/infinity (an
    // all-ones exponent) checked on the way.
    let (t, finite) = if view.dtype == Dtype::BF16 {
        let (v, ok) = copy_words(bytes, n, 0x7f80);
        let v: Vec<half::bf16> = v.reinterpret_into();
        (Tensor::from_vec(v, (rows, cols), device), ok)
    } else {
        let (v, ok) = copy_words(bytes, n, 0x7c00);
        let v: Vec<half::f16> = v.reinterpret_into();
        (Tensor::from_vec(v, (rows, cols), device), ok)
    };
    if !finite {
        return Err(Error::NonFinite {
            path: view.path.to_path_buf(),
            tensor: view.name.to_string(),
        });
    }
    t.map(Some).map_err(ce(view.name))
}

/// `n` little-endian 16-bit words of `bytes`, and whether
/// none has the exponent bits `exp` all set (infinity or NaN). One pass on
/// all cores into zeroed (lazily mapped) memory: a plain copy where the
/// bytes are aligned on a little-endian machine, a word-by-word read
/// elsewhere; the check reads the copy.
fn copy_words(bytes: &[u8], n: usize, exp: u16) -> (Vec<u16>, bool) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    let mut bits = vec![0u16; n];
    advise_huge_pages(&mut bits);
    let finite = bits
        .par_chunks_mut(CHUNK)
        .zip(bytes[..2 * n].par_chunks(2 * CHUNK))
        .map(|(dst, src)| {
            match bytemuck::try_cast_slice::<u8, u16>(src) {
                Ok(words) if cfg!(target_endian = "little") => dst.copy_from_slice(words),
                _ => {
                    for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *o = u16::from_le_bytes([b[0], b[1]]);
                    }
                }
            }
            !dst.iter().fold(false, |bad, &w| bad | (w & exp == exp))
        })
        .reduce(|| true, |a, b| a && b);
    (bits, finite)
}

/// Asks Linux for transparent huge pages (2 MiB) for the whole 2 MiB blocks
/// of a large buffer before it is first written (a fresh allocation of
/// this size is mapped lazily, so the pages are chosen at the first write).
/// Weights kept resident are then read with far fewer TLB misses: on two
/// Zen 4 cores (THP `madvise` mode) a sequential read of a 262 MB buffer went
/// from 25 to 31–42 GB/s. Advice only: where the kernel declines (THP off,
/// no free huge page), nothing changes.
pub(crate) fn advise_huge_pages<T>(v: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let Some(end) = start.checked_add(std::mem::size_of_val(v)) else {
            return;
        };
        let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `v`'s allocation, which this
            // function borrows mutably; MADV_HUGEPAGE changes how pages are
            // backed, never their contents.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// `x · Wᵀ` on the CPU for a weight kept in its stored bf16 or f16 dtype
/// (hub layout `[out, in]`, see [`load`]): the f32 activations against the
/// stored weights, f32 accumulation (the grouped kernels' `matmul_xwt`:
/// AVX-512 or AVX2 widening in registers, a portable loop elsewhere), on
/// all cores split by output rows. `None` when `w` is not such a weight.
pub fn host_linear(x: &Tensor, w: &Tensor) -> Option<candle_core::Result<Tensor>> {
    host_linears(x, &[w]).map(|r| r.map(|mut ys| ys.remove(0)))
}

/// [`host_linear`] of one `x` with several weights (a layer's query, key
/// and value projections) in one pass over the cores; `None` unless every
/// weight is a stored bf16/f16 matrix, all of one dtype.
pub fn host_linears(x: &Tensor, ws: &[&Tensor]) -> Option<candle_core::Result<Vec<Tensor>>> {
    let wms: Vec<HostMatrix> = ws
        .iter()
        .map(|w| HostMatrix::of(w))
        .collect::<Option<_>>()?;
    let first = wms.first()?;
    let same = |a: &HostData, b: &HostData| {
        matches!(
            (a, b),
            (HostData::Bf16(_), HostData::Bf16(_)) | (HostData::F16(_), HostData::F16(_))
        )
    };
    if !wms.iter().all(|w| same(&first.data(), &w.data())) {
        return None;
    }
    Some((|| {
        let k = first.cols;
        let dims = x.dims().to_vec();
        for wm in &wms {
            if dims.last() != Some(&wm.cols) {
                candle_core::bail!(
                    "input {dims:?} does not match the weight [{}, {}]",
                    wm.rows,
                    wm.cols
                );
            }
        }
        let xs: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let m = xs.len() / k.max(1);
        let mut ys: Vec<Vec<f32>> = wms.iter().map(|w| vec![0f32; m * w.rows]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        fn all<'a, W>(
            wms: &'a [HostMatrix],
            pick: impl Fn(HostData<'a>) -> Option<&'a [W]>,
        ) -> Vec<&'a [W]> {
            wms.iter()
                .map(|w| pick(w.data()).expect("one dtype, checked above"))
                .collect()
        }
        match first.data() {
            HostData::Bf16(_) => {
                let ws = all(&wms, |d| match d {
                    HostData::Bf16(v) => Some(v),
                    _ => None,
                });
                super::expert_gemm::matmul_xwt_many(&xs, m, k, &ws, &mut outs)
            }
            HostData::F16(_) => {
                let ws = all(&wms, |d| match d {
                    HostData::F16(v) => Some(v),
                    _ => None,
                });
                super::expert_gemm::matmul_xwt_many(&xs, m, k, &ws, &mut outs)
            }
            HostData::F32(_) => unreachable!("f32 weights take candle's matmul"),
        }
        ys.into_iter()
            .zip(&wms)
            .map(|(y, w)| {
                let mut out = dims.clone();
                *out.last_mut().expect("checked above") = w.rows;
                Tensor::from_vec(y, out, x.device())
            })
            .collect()
    })())
}

/// `x · Wᵀ` for a weight in the forward pass's layout: a stored bf16/f16
/// matrix through [`host_linear`], else `[in, out]` when `transposed`, else
/// the hub layout `[out, in]`.
pub fn linear_any(x: &Tensor, w: &Tensor, transposed: bool) -> candle_core::Result<Tensor> {
    if let Some(y) = host_linear(x, w) {
        return y;
    }
    if transposed {
        x.matmul(w)
    } else {
        x.matmul(&w.t()?)
    }
}

/// Row-major `rows × cols` → `cols × rows`, in cache-sized tiles on all cores.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut out = vec![0f32; data.len()];
    // Each task owns TILE output rows (= input columns c0..c0+TILE).
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(tile, dst)| {
            let c0 = tile * TILE;
            let width = dst.len() / rows.max(1);
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let src = &data[r * cols + c0..r * cols + c0 + width];
                    for (dc, &v) in src.iter().enumerate() {
                        dst[dc * rows + r] = v;
                    }
                }
            }
        });
    out
}

fn load_opt(weights: &Weights, name: &str, device: &Device, t: bool) -> Result<Option<Tensor>> {
    if weights.contains(name) {
        load(weights, name, device, t).map(Some)
    } else {
        Ok(None)
    }
}

/// A SwiGLU (or GeGLU) block: `down(act(gate·x) * up·x)`.
pub struct Ffn {
    /// Gate projection `[intermediate, hidden]`.
    pub gate: Tensor,
    /// Up projection `[intermediate, hidden]`.
    pub up: Tensor,
    /// Down projection `[hidden, intermediate]`.
    pub down: Tensor,
    /// The matrices are stored `[in, out]` rather than in the hub layout `[out, in]`.
    pub transposed: bool,
}

impl Ffn {
    fn load(weights: &Weights, names: &[String; 3], device: &Device, t: bool) -> Result<Ffn> {
        Ok(Ffn {
            gate: load(weights, &names[0], device, t)?,
            up: load(weights, &names[1], device, t)?,
            down: load(weights, &names[2], device, t)?,
            transposed: t,
        })
    }

    /// Loads an expert from its views (separate tensors or parts of fused ones).
    pub fn from_view(x: &ExpertView<'_>, device: &Device, t: bool) -> Result<Ffn> {
        Ok(Ffn {
            gate: load_view(&x.gate, device, t)?,
            up: load_view(&x.up, device, t)?,
            down: load_view(&x.down, device, t)?,
            transposed: t,
        })
    }

    /// `x · Wᵀ` for one of the block's matrices, in whichever layout it is stored.
    pub fn lin(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        linear_any(x, w, self.transposed)
    }

    /// The three matrices as host slices in the hub layout `[out, in]`, when
    /// they are on the CPU in that layout: f32, or bf16/f16 as stored (what
    /// the grouped CPU kernels read).
    pub fn host_hub(&self) -> Option<HostFfn<'_>> {
        let half = |t: &Tensor| t.dtype() != candle_core::DType::F32;
        if self.transposed && !(half(&self.gate) && half(&self.up) && half(&self.down)) {
            return None;
        }
        Some(HostFfn {
            gate: HostMatrix::of(&self.gate)?,
            up: HostMatrix::of(&self.up)?,
            down: HostMatrix::of(&self.down)?,
        })
    }
}

/// A host matrix's values, in their dtype.
#[derive(Clone, Copy)]
pub enum HostData<'a> {
    /// f32.
    F32(&'a [f32]),
    /// bfloat16, as stored in the checkpoint.
    Bf16(&'a [half::bf16]),
    /// float16, as stored in the checkpoint.
    F16(&'a [half::f16]),
}

/// A matrix's storage on the CPU (f32, bf16 or f16), borrowed (row-major, contiguous).
pub struct HostMatrix<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl<'a> HostMatrix<'a> {
    /// The tensor's storage, if it is a contiguous f32, bf16 or f16 matrix on the CPU.
    pub fn of(t: &'a Tensor) -> Option<HostMatrix<'a>> {
        use candle_core::{CpuStorage, Storage};
        let (rows, cols) = t.dims2().ok()?;
        let (guard, layout) = t.storage_and_layout();
        let start = layout.contiguous_offsets()?.0;
        let len = match &*guard {
            Storage::Cpu(CpuStorage::F32(v)) => v.len(),
            Storage::Cpu(CpuStorage::BF16(v)) => v.len(),
            Storage::Cpu(CpuStorage::F16(v)) => v.len(),
            _ => return None,
        };
        if len < start + rows * cols {
            return None;
        }
        Some(HostMatrix {
            guard,
            start,
            rows,
            cols,
        })
    }

    /// The values, `rows × cols`, in their dtype.
    pub fn data(&self) -> HostData<'_> {
        use candle_core::{CpuStorage, Storage};
        let span = self.start..self.start + self.rows * self.cols;
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => HostData::F32(&v[span]),
            Storage::Cpu(CpuStorage::BF16(v)) => HostData::Bf16(&v[span]),
            Storage::Cpu(CpuStorage::F16(v)) => HostData::F16(&v[span]),
            _ => unreachable!("checked to be f32, bf16 or f16 on the CPU when borrowed"),
        }
    }

    /// The values, when they are f32.
    pub fn f32_data(&self) -> Option<&[f32]> {
        match self.data() {
            HostData::F32(v) => Some(v),
            _ => None,
        }
    }
}

/// An FFN block's matrices on the host, hub layout: `gate`, `up` are
/// `[inter, hidden]`, `down` is `[hidden, inter]`.
pub struct HostFfn<'a> {
    /// Gate projection.
    pub gate: HostMatrix<'a>,
    /// Up projection.
    pub up: HostMatrix<'a>,
    /// Down projection.
    pub down: HostMatrix<'a>,
}

/// Attention projections.
pub enum AttnWeights {
    /// Per-head projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
    Standard {
        /// Query projection.
        q: Tensor,
        /// Key projection.
        k: Tensor,
        /// Value projection.
        v: Tensor,
        /// Output projection.
        o: Tensor,
        /// Query bias, if the family has one.
        q_bias: Option<Tensor>,
        /// Key bias, if the family has one.
        k_bias: Option<Tensor>,
        /// Value bias, if the family has one.
        v_bias: Option<Tensor>,
        /// RMSNorm weight on q, if the family has one.
        q_norm: Option<Tensor>,
        /// RMSNorm weight on k, if the family has one.
        k_norm: Option<Tensor>,
    },
    /// Qwen3-Next / Qwen3.5 linear attention (the gated attention layers are `Standard`).
    GatedDeltaNet(Box<crate::forward::qwen3_next::DeltaNetWeights>),
    /// DeepSeek multi-head latent attention.
    Mla {
        /// `q_proj`, or `q_a_proj` → `q_a_layernorm` → `q_b_proj`.
        q: Option<Tensor>,
        /// `q_a_proj` (low-rank query down-projection), if the model uses one.
        q_a: Option<Tensor>,
        /// `q_a_layernorm`, with `q_a`.
        q_a_norm: Option<Tensor>,
        /// `q_b_proj` (query up-projection), with `q_a`.
        q_b: Option<Tensor>,
        /// `kv_a_proj_with_mqa`: joint key/value down-projection plus the rotary key part.
        kv_a: Tensor,
        /// RMSNorm after the key/value down-projection.
        kv_a_norm: Tensor,
        /// Key/value up-projection.
        kv_b: Tensor,
        /// Output projection.
        o: Tensor,
        /// DeepSeek-V3.2: the sparse-attention lightning indexer.
        indexer: Option<crate::forward::deepseek_v32::IndexerWeights>,
    },
}

/// The MLP part of a layer.
pub enum MlpWeights {
    /// A dense FFN (a dense layer of an MoE model).
    Dense(Ffn),
    /// A routed MoE block.
    Moe {
        /// Router matrix.
        router: Tensor,
        /// The router is stored `[hidden, experts]` rather than `[experts, hidden]`.
        router_transposed: bool,
        /// On the CPU, when `router` is transposed: a copy in the hub layout.
        router_hub: Option<Tensor>,
        /// DeepSeek-V3 `e_score_correction_bias`, on the host.
        bias: Option<Vec<f32>>,
        /// Routed experts in checkpoint order.
        experts: Vec<Ffn>,
        /// Shared expert(s), fused into one FFN, if the family has them.
        shared: Option<Ffn>,
        /// Qwen2-MoE `shared_expert_gate` `[1, hidden]`.
        shared_gate: Option<Tensor>,
    },
}

/// One decoder layer's weights.
pub struct LayerWeights {
    /// Norm before attention (`input_layernorm`, Grok `pre_attn_norm`).
    pub attn_norm: Tensor,
    /// Grok-1 only: norm after attention (`post_attn_norm`).
    pub post_attn_norm: Option<Tensor>,
    /// Norm before the MLP (`post_attention_layernorm`, Grok `pre_moe_norm`).
    pub mlp_norm: Tensor,
    /// Grok-1 only: norm after the MoE (`post_moe_norm`).
    pub post_mlp_norm: Option<Tensor>,
    /// Attention weights.
    pub attn: AttnWeights,
    /// MLP weights.
    pub mlp: MlpWeights,
    /// gpt-oss: attention sinks, `o_proj`, router and expert biases.
    pub gpt_oss: Option<crate::forward::gpt_oss::GptOssLayer>,
}

/// Names of every tensor of a layer whose decoder layers live under
/// `layers` (`model.layers.`, a multimodal release's
/// `language_model.model.layers.`...), for releasing its pages afterwards.
pub fn layer_tensor_names(weights: &Weights, layers: &str, layer: usize) -> Vec<String> {
    let prefix = format!("{layers}{layer}.");
    weights
        .names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

impl LayerWeights {
    /// Loads layer `layer` of `model`.
    pub fn load(
        model: &Model,
        cfg: &ForwardConfig,
        layer: usize,
        device: &Device,
        t: bool,
    ) -> Result<LayerWeights> {
        let w = model.weights();
        let p = format!("{}{layer}", model.naming().prefix);
        let fam = cfg.family;
        let grok = fam == Family::Grok1;
        let norm = |name: &str| {
            let name = format!("{p}.{name}");
            super::qwen3_next::norm_weight(fam, load(w, &name, device, t)?, &name)
        };
        let (attn_norm, post_attn_norm, mlp_norm, post_mlp_norm) = if grok {
            (
                norm("pre_attn_norm.scale")?,
                Some(norm("post_attn_norm.scale")?),
                norm("pre_moe_norm.scale")?,
                Some(norm("post_moe_norm.scale")?),
            )
        } else {
            (
                norm("input_layernorm.weight")?,
                None,
                norm("post_attention_layernorm.weight")?,
                None,
            )
        };
        let a = if grok {
            format!("{p}.attn")
        } else {
            format!("{p}.self_attn")
        };
        let attn = match &cfg.attention {
            _ if cfg.hybrid.is_some() => {
                super::qwen3_next::load_mixer(model, cfg, &p, layer, device, t)?
            }
            AttentionKind::Standard { qk_norm, .. } => {
                let get = |n: &str| load(w, &format!("{a}.{n}"), device, t);
                let opt = |n: &str| load_opt(w, &format!("{a}.{n}"), device, t);
                AttnWeights::Standard {
                    q: get("q_proj.weight")?,
                    k: get("k_proj.weight")?,
                    v: get("v_proj.weight")?,
                    o: get("o_proj.weight")?,
                    q_bias: opt("q_proj.bias")?,
                    k_bias: opt("k_proj.bias")?,
                    v_bias: opt("v_proj.bias")?,
                    q_norm: match qk_norm {
                        QkNorm::None => None,
                        _ => Some(get("q_norm.weight")?),
                    },
                    k_norm: match qk_norm {
                        QkNorm::None => None,
                        _ => Some(get("k_norm.weight")?),
                    },
                }
            }
            AttentionKind::Mla { q_lora_rank, .. } => {
                let get = |n: &str| load(w, &format!("{a}.{n}"), device, t);
                let lora = q_lora_rank.is_some();
                AttnWeights::Mla {
                    q: if lora {
                        None
                    } else {
                        Some(get("q_proj.weight")?)
                    },
                    q_a: if lora {
                        Some(get("q_a_proj.weight")?)
                    } else {
                        None
                    },
                    q_a_norm: if lora {
                        Some(get("q_a_layernorm.weight")?)
                    } else {
                        None
                    },
                    q_b: if lora {
                        Some(get("q_b_proj.weight")?)
                    } else {
                        None
                    },
                    kv_a: get("kv_a_proj_with_mqa.weight")?,
                    kv_a_norm: get("kv_a_layernorm.weight")?,
                    kv_b: get("kv_b_proj.weight")?,
                    o: get("o_proj.weight")?,
                    indexer: match &cfg.dsa {
                        Some(ix) => Some(crate::forward::deepseek_v32::IndexerWeights::load(
                            w,
                            &a,
                            ix,
                            model.info.hidden_size,
                            device,
                            t,
                        )?),
                        None => None,
                    },
                }
            }
        };
        let info = &model.info;
        let mlp = if info.moe_layers.contains(&layer) {
            // Routed experts stay in the hub layout on the CPU: the grouped
            // kernels (`expert_gemm`) read their rows directly.
            let te = t && !device.is_cpu();
            let naming = model.naming();
            let experts = (0..info.num_experts)
                .map(|e| Ffn::from_view(&model.expert(layer, e)?, device, te))
                .collect::<Result<Vec<_>>>()?;
            let shared = match naming.shared(layer) {
                Some(names) if info.shared_intermediate > 0 => {
                    Some(Ffn::load(w, &names, device, t)?)
                }
                _ => None,
            };
            let router_name = naming.router(layer);
            let bias_name = fam
                .spec()
                .correction_bias
                .map(|b| naming.layer_tensor(layer, b))
                .unwrap_or_default();
            let bias = if w.contains(&bias_name) {
                w.expect_shape(&bias_name, &[info.num_experts])?;
                let view = w.tensor(&bias_name)?;
                let b = view.to_f32_vec();
                if b.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        path: view.path.to_path_buf(),
                        tensor: bias_name,
                    });
                }
                Some(b)
            } else {
                None
            };
            MlpWeights::Moe {
                router: load(w, &router_name, device, t)?,
                router_transposed: t,
                // The CPU's kernel for few tokens reads the hub layout.
                router_hub: if t && device.is_cpu() {
                    Some(load(w, &router_name, device, false)?)
                } else {
                    None
                },
                bias,
                experts,
                shared,
                shared_gate: match fam.spec().shared_gate {
                    Some(g) if cfg.shared_expert_gate => {
                        load_opt(w, &naming.layer_tensor(layer, g), device, t)?
                    }
                    _ => None,
                },
            }
        } else {
            MlpWeights::Dense(Ffn::load(w, &model.naming().dense(layer), device, t)?)
        };
        let gpt_oss = match (&cfg.gpt_oss, &cfg.attention) {
            (Some(_), AttentionKind::Standard { heads, .. }) => Some(
                crate::forward::gpt_oss::GptOssLayer::load(model, layer, *heads, device)?,
            ),
            _ => None,
        };
        Ok(LayerWeights {
            attn_norm,
            post_attn_norm,
            mlp_norm,
            post_mlp_norm,
            attn,
            mlp,
            gpt_oss,
        })
    }
}

/// Final norm and output head (embeddings are gathered row by row from the mmap).
pub struct HeadWeights {
    /// Final RMSNorm weight.
    pub norm: Tensor,
    /// The output matrix: `lm_head`, or the embeddings when tied.
    pub lm_head: Tensor,
}

impl HeadWeights {
    /// Loads the final norm and output head of `model` onto `device` (`t`: transposed layout).
    pub fn load(
        model: &Model,
        cfg: &ForwardConfig,
        device: &Device,
        t: bool,
    ) -> Result<HeadWeights> {
        let w = model.weights();
        let names = OuterNames::of(model);
        let norm_name = if cfg.family == Family::Grok1 {
            "model.norm.scale".to_string()
        } else {
            names.norm
        };
        let head = if cfg.tie_embeddings && !w.contains(&names.lm_head) {
            names.embed
        } else {
            names.lm_head
        };
        let norm = load(w, &norm_name, device, t)?;
        Ok(HeadWeights {
            norm: super::qwen3_next::norm_weight(cfg.family, norm, &norm_name)?,
            lm_head: load(w, &head, device, t)?,
        })
    }
}

/// The names of the tensors outside the decoder layers, beside the layers'
/// prefix: `model.layers.` → `model.embed_tokens.weight`,
/// `model.norm.weight`, `lm_head.weight`; a multimodal release's
/// `language_model.model.layers.` → `language_model.model.embed_tokens.weight`,
/// `language_model.model.norm.weight`, `language_model.lm_head.weight`;
/// `model.language_model.layers.` → `model.language_model.…`, `lm_head.weight`.
pub struct OuterNames {
    /// The token embedding `[vocab, hidden]`.
    pub embed: String,
    /// The final norm.
    pub norm: String,
    /// The output head.
    pub lm_head: String,
}

impl OuterNames {
    /// The names for `model`'s layer prefix.
    pub fn of(model: &Model) -> OuterNames {
        let layers = model.naming().prefix;
        let base = layers.strip_suffix("layers.").unwrap_or("model.");
        // `language_model.model.` → `language_model.lm_head.weight`.
        let head_base = match base.strip_suffix("model.") {
            Some(b) if b.is_empty() || b.ends_with('.') => b,
            _ => "",
        };
        OuterNames {
            embed: format!("{base}embed_tokens.weight"),
            norm: format!("{base}norm.weight"),
            lm_head: format!("{head_base}lm_head.weight"),
        }
    }
}

/// Embeddings of token ids `[tokens, hidden]`, read row by row from the mmap.
pub fn embed(model: &Model, ids: &[u32], device: &Device) -> Result<Tensor> {
    let names = OuterNames::of(model);
    let name = names.embed.as_str();
    let view = model.weights().tensor(name)?;
    let (rows, hidden) = match view.shape[..] {
        [rows, hidden] => (rows, hidden),
        ref other => {
            return Err(Error::Safetensors {
                path: view.path.to_path_buf(),
                reason: format!(
                "tensor `{name}` has shape {other:?}; a 2-D [vocab, hidden] embedding is expected"
            ),
            })
        }
    };
    // config.json's vocab_size was checked already; the embedding itself may
    // hold fewer rows than it claims.
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= rows) {
        return Err(Error::Input {
            path: view.path.to_path_buf(),
            reason: format!(
                "token id {bad} is outside the embedding `{name}`, which has {rows} rows"
            ),
        });
    }
    let rows = view.gather_rows(ids);
    if rows.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            path: view.path.to_path_buf(),
            tensor: name.to_string(),
        });
    }
    Tensor::from_vec(rows, (ids.len(), hidden), device).map_err(ce(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_of_non_tile_multiples() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (100, 1)] {
            let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&data, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], data[r * cols + c]);
                }
            }
        }
    }
}
