//! One MoE layer, three ways: the forward pass's sparse top-k dispatch
//! (tokens grouped by expert, one matmul per active expert), its all-experts
//! mode (every expert on every token, what the dynamic analyses observe), and
//! the naive per-expert `index_select` / `index_add` loop a first
//! implementation would write, as the reference point. With the `cuda`
//! feature, candle's fused MoE GEMM kernels (`candle_nn::moe::moe_gemm`,
//! bf16/f16 only) run the same layer on the GPU.

use candle_core::{Device, Tensor};

use crate::bench::routing::{route_logits, Routed};
use crate::bench::synthetic::{FullModel, Geometry};
use crate::error::{Error, Result};
use crate::forward::observer::{Observer, Wants};
use crate::forward::weights::{ce, Ffn, LayerWeights, MlpWeights};
use crate::forward::Forward;
use crate::model::Family;

type R<T> = std::result::Result<T, candle_core::Error>;

/// The observer of the all-experts mode: asks for every expert's output.
pub struct AllExpertOutputs;

impl Observer for AllExpertOutputs {
    fn wants(&self) -> Wants {
        Wants {
            all_expert_outputs: true,
            ..Wants::default()
        }
    }
}

/// A synthetic one-layer model with a real model's MoE layer shape.
#[derive(Debug, Clone)]
pub struct LayerGeometry {
    /// Benchmark-name label, e.g. `olmoe-1b-7b`.
    pub label: &'static str,
    /// The layer's geometry.
    pub geometry: Geometry,
    /// The whole synthetic model the layer belongs to.
    pub full: FullModel,
    /// Also benchmark the all-experts mode by default (it costs E/k times the top-k work).
    pub all_experts: bool,
}

fn layer(
    label: &'static str,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    dtype: &'static str,
) -> LayerGeometry {
    LayerGeometry {
        label,
        geometry: Geometry {
            layers: 1,
            experts,
            top_k,
            hidden,
            intermediate: inter,
            dtype,
        },
        full: FullModel {
            vocab: 256,
            heads: hidden / 128,
            kv_heads: (hidden / 128 / 4).max(1),
        },
        all_experts: false,
    }
}

/// The real-geometry layers benchmarked by default (one layer each, random
/// weights in `dtype` on disk, f32 compute): OLMoE-1B-7B (64 experts, top-8,
/// 2048 × 1024), Qwen3-30B-A3B (128, top-8, 2048 × 768) and DeepSeekMoE-16B's
/// routed experts (64, top-6, 2048 × 1408; its two shared experts are not
/// modelled). With `full_size`, Mixtral-8x7B's layer (8, top-2, 4096 × 14336:
/// 5.6 GB in f32). The Mixtral-scaled layer (8, top-2, 1024 × 3584) is layer 0
/// of the full-model benchmark's model and is added by the suite.
pub fn real_geometries(full_size: bool, dtype: &'static str) -> Vec<LayerGeometry> {
    let mut v = vec![
        layer("olmoe-1b-7b", 64, 8, 2048, 1024, dtype),
        layer("qwen3-30b-a3b", 128, 8, 2048, 768, dtype),
        layer("deepseek-moe-16b", 64, 6, 2048, 1408, dtype),
    ];
    if full_size {
        v.push(layer("mixtral-8x7b", 8, 2, 4096, 14336, dtype));
    }
    v
}

fn act(family: Family, x: &Tensor) -> R<Tensor> {
    if family.spec().activation == crate::model::family::Activation::Gelu {
        x.gelu_erf()
    } else {
        x.silu()
    }
}

/// `x · W` for a weight in the forward pass's layout (transposed or hub).
fn lin(transposed: bool, x: &Tensor, w: &Tensor) -> R<Tensor> {
    crate::forward::weights::linear_any(x, w, transposed)
}

fn ffn(family: Family, f: &Ffn, x: &Tensor) -> R<Tensor> {
    let h = (act(family, &f.lin(x, &f.gate)?)? * f.lin(x, &f.up)?)?;
    f.lin(&h, &f.down)
}

/// The naive loop's own copy of a layer's routed experts, stored `[in, out]`
/// (the layout candle's CPU matmul is fastest with; the forward pass keeps
/// routed experts in the hub layout for its grouped kernels), so that the
/// reference point is the best a per-expert candle loop can do.
pub struct NaiveExperts(Vec<Ffn>);

impl NaiveExperts {
    /// Copies the experts of `lw` for the naive loop.
    pub fn new(lw: &LayerWeights) -> Result<NaiveExperts> {
        let MlpWeights::Moe { experts, .. } = &lw.mlp else {
            return Err(Error::Usage("not an MoE layer".into()));
        };
        // bf16/f16 matrices kept as stored on the CPU are in the hub layout
        // (whatever `transposed` says): the naive loop gets f32 `[in, out]`.
        let tr = |w: &Tensor, t: bool| {
            if w.dtype() != candle_core::DType::F32 {
                w.to_dtype(candle_core::DType::F32)?.t()?.contiguous()
            } else if t {
                Ok(w.clone())
            } else {
                w.t()?.contiguous()
            }
        };
        experts
            .iter()
            .map(|f| {
                Ok(Ffn {
                    gate: tr(&f.gate, f.transposed)?,
                    up: tr(&f.up, f.transposed)?,
                    down: tr(&f.down, f.transposed)?,
                    transposed: true,
                })
            })
            .collect::<R<Vec<_>>>()
            .map(NaiveExperts)
            .map_err(ce("transposing experts for the naive loop"))
    }
}

/// Routes `x` with the layer's router and the model's rule.
pub fn route(fwd: &Forward<'_>, lw: &LayerWeights, x: &Tensor) -> Result<Routed> {
    let MlpWeights::Moe { bias, .. } = &lw.mlp else {
        return Err(Error::Usage("not an MoE layer".into()));
    };
    let logits = fwd.router_logits(&lw.mlp, x)?;
    let e = fwd.model_info().num_experts;
    Ok(route_logits(
        &fwd.cfg.routing,
        &logits,
        e,
        fwd.model_info().top_k,
        bias.as_deref(),
    ))
}

/// The naive reference: for each expert, `index_select` its tokens, run the
/// expert, scale by the routing weights and `index_add` into the output.
pub fn naive(
    fwd: &Forward<'_>,
    lw: &LayerWeights,
    experts: &NaiveExperts,
    x: &Tensor,
) -> Result<Tensor> {
    let MlpWeights::Moe {
        shared,
        shared_gate,
        ..
    } = &lw.mlp
    else {
        return Err(Error::Usage("not an MoE layer".into()));
    };
    let routed = route(fwd, lw, x)?;
    let k = fwd.model_info().top_k;
    let (t, fam) = (fwd.weights_transposed(), fwd.cfg.family);
    let dev = x.device();
    let what = "naive MoE loop";
    let mut out = x.zeros_like().map_err(ce(what))?;
    for (e, f) in experts.0.iter().enumerate() {
        let mut toks = Vec::new();
        let mut ws = Vec::new();
        for (i, (&ex, &w)) in routed.experts.iter().zip(&routed.weights).enumerate() {
            if ex as usize == e {
                toks.push((i / k) as u32);
                ws.push(w);
            }
        }
        if toks.is_empty() {
            continue;
        }
        let n = toks.len();
        out = (|| {
            let idx = Tensor::new(toks.as_slice(), dev)?;
            let y = ffn(fam, f, &x.index_select(&idx, 0)?)?;
            let y = y.broadcast_mul(&Tensor::from_vec(ws, (n, 1), dev)?)?;
            out.index_add(&idx, &y, 0)
        })()
        .map_err(ce(what))?;
    }
    if let Some(f) = shared {
        out = (|| {
            let y = ffn(fam, f, x)?;
            let y = match shared_gate {
                Some(g) => y.broadcast_mul(&candle_nn::ops::sigmoid(&lin(t, x, g)?)?)?,
                None => y,
            };
            out + y
        })()
        .map_err(ce(what))?;
    }
    Ok(out)
}

/// `‖a − b‖ / ‖b‖` over all elements (in f64 on the host); `∞` when `b` is zero and `a` is not.
pub fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(ce("comparing outputs"))
    };
    let (a, b) = (host(a)?, host(b)?);
    if a.len() != b.len() {
        return Err(Error::Compute {
            what: "comparing outputs".into(),
            reason: format!("{} values vs {}", a.len(), b.len()),
        });
    }
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(&b) {
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    Ok(if n > 0.0 {
        (d / n).sqrt()
    } else if d > 0.0 {
        f64::INFINITY
    } else {
        0.0
    })
}

/// Whether the layer has shared experts (which the fused kernels leave out).
pub fn has_shared_experts(lw: &LayerWeights) -> bool {
    matches!(
        &lw.mlp,
        MlpWeights::Moe {
            shared: Some(_),
            ..
        }
    )
}

/// FLOPs and bytes of one MoE layer call on `tokens` tokens: the router, the
/// expert matmuls of `pairs` (token, expert) pairs over `active` distinct
/// experts, and shared experts. `weight_bytes` per weight (4 for f32).
#[derive(Debug, Clone, Copy)]
pub struct LayerWork {
    /// Floating-point operations per run.
    pub flops: f64,
    /// Bytes of weights and activations moved per run.
    pub bytes: f64,
}

/// The work of the top-k layer for a routing (`all = true`: every expert on every token).
pub fn layer_work(
    fwd: &Forward<'_>,
    tokens: usize,
    routed: &Routed,
    all: bool,
    weight_bytes: f64,
) -> LayerWork {
    let info = fwd.model_info();
    let (t, h, i, e) = (
        tokens as f64,
        info.hidden_size as f64,
        info.expert_intermediate as f64,
        info.num_experts as f64,
    );
    let (pairs, active) = if all {
        (t * e, e)
    } else {
        let mut used = vec![false; info.num_experts];
        for &x in &routed.experts {
            if let Some(u) = used.get_mut(x as usize) {
                *u = true;
            }
        }
        (
            routed.experts.len() as f64,
            used.iter().filter(|&&u| u).count() as f64,
        )
    };
    let s = info.shared_intermediate as f64;
    LayerWork {
        flops: 2.0 * t * h * e + 6.0 * h * i * pairs + 6.0 * t * h * s,
        bytes: weight_bytes * (e * h + 3.0 * h * i * active + 3.0 * h * s) + 4.0 * 2.0 * t * h,
    }
}

/// candle's fused MoE GEMM (`candle_nn::moe::moe_gemm`) on a layer's experts,
/// stacked `[E, out, in]` in bf16 (the kernels accept f16/bf16 only).
#[cfg(feature = "cuda")]
pub struct FusedExperts {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

#[cfg(feature = "cuda")]
impl FusedExperts {
    /// Stacks the layer's routed experts for the fused kernels.
    pub fn new(lw: &LayerWeights) -> Result<FusedExperts> {
        let MlpWeights::Moe { experts, .. } = &lw.mlp else {
            return Err(Error::Usage("not an MoE layer".into()));
        };
        // 0: gate, 1: up, 2: down.
        let stack = |which: usize| -> R<Tensor> {
            let ws = experts
                .iter()
                .map(|f| {
                    let w = match which {
                        0 => &f.gate,
                        1 => &f.up,
                        _ => &f.down,
                    };
                    if f.transposed {
                        w.t()?.contiguous()
                    } else {
                        Ok(w.clone())
                    }
                })
                .collect::<R<Vec<_>>>()?;
            Tensor::stack(&ws, 0)?.to_dtype(candle_core::DType::BF16)
        };
        (|| {
            Ok(FusedExperts {
                gate: stack(0)?,
                up: stack(1)?,
                down: stack(2)?,
            })
        })()
        .map_err(ce("stacking experts for the fused kernels"))
    }

    /// The routed experts' output (shared experts are not included).
    pub fn forward(&self, fwd: &Forward<'_>, lw: &LayerWeights, x: &Tensor) -> Result<Tensor> {
        use candle_nn::moe::moe_gemm;
        let routed = route(fwd, lw, x)?;
        let k = fwd.model_info().top_k;
        let dev = x.device();
        let (tokens, hidden) = x.dims2().map_err(ce("fused MoE"))?;
        let mut order: Vec<u32> = (0..routed.experts.len() as u32).collect();
        order.sort_by_key(|&p| routed.experts[p as usize]);
        let sorted_experts: Vec<u32> = order.iter().map(|&p| routed.experts[p as usize]).collect();
        (|| {
            let sorted = Tensor::new(order.as_slice(), dev)?;
            let ids = Tensor::new(sorted_experts.as_slice(), dev)?;
            let w = Some(Tensor::new(routed.weights.as_slice(), dev)?);
            let prefill = tokens > 1;
            let xb = x.to_dtype(candle_core::DType::BF16)?;
            let g = moe_gemm(&xb, &self.gate, &None, &sorted, &ids, k, prefill)?;
            let u = moe_gemm(&xb, &self.up, &None, &sorted, &ids, k, prefill)?;
            let h = (g.silu()? * u)?;
            let y = moe_gemm(&h, &self.down, &w, &sorted, &ids, k, prefill)?;
            y.reshape((tokens, k, hidden))?
                .sum(1)?
                .to_dtype(candle_core::DType::F32)
        })()
        .map_err(ce("fused MoE"))
    }
}

/// Random layer input `[tokens, hidden]` (unit-RMS, as after the pre-MoE norm).
pub fn random_input(tokens: usize, hidden: usize, device: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, (tokens, hidden), device).map_err(ce("random layer input"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::synthetic::write_model;
    use crate::model::Model;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn naive_grouped_and_all_experts_agree() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry {
            layers: 1,
            experts: 8,
            top_k: 2,
            hidden: 64,
            intermediate: 96,
            dtype: "F32",
        };
        let full = FullModel {
            vocab: 32,
            heads: 4,
            kv_heads: 2,
        };
        write_model(dir.path(), &g, Some(full), 3).unwrap();
        let model = Model::open(dir.path()).unwrap();
        for resident in [false, true] {
            let fwd = Forward::new(&model, Device::Cpu).unwrap();
            let fwd = if resident { fwd.keep_weights() } else { fwd };
            let lw = fwd.load_layer(0).unwrap();
            let x = random_input(37, 64, &Device::Cpu).unwrap();
            let grouped = fwd.moe_block(0, &lw, &x, &mut ()).unwrap();
            let all = fwd.moe_block(0, &lw, &x, &mut AllExpertOutputs).unwrap();
            let reference = naive(&fwd, &lw, &NaiveExperts::new(&lw).unwrap(), &x).unwrap();
            assert!(max_abs(&grouped, &reference) < 1e-4);
            assert!(max_abs(&all, &reference) < 1e-4);
            // Not trivially zero: the layer does something.
            let norm: f32 = reference
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(norm > 1e-3, "{norm}");
            let routed = route(&fwd, &lw, &x).unwrap();
            let w = layer_work(&fwd, 37, &routed, false, 4.0);
            let w_all = layer_work(&fwd, 37, &routed, true, 4.0);
            assert!(w.flops > 0.0 && w_all.flops > 3.0 * w.flops);
        }
    }

    /// On a CUDA build with a GPU: the device dispatch (one gather, grouped
    /// matmuls, one gather-sum), the all-experts mode, the naive loop and
    /// candle's fused kernels compute what the CPU kernels compute, on a
    /// synthetic layer and on fixtures with shared experts and biased
    /// routing; and whole forward passes give the same logits. Without a GPU
    /// the test says so and returns.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_matches_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            crate::test_support::skip("cuda_matches_the_cpu", "cuda", "no CUDA device");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry {
            layers: 1,
            experts: 16,
            top_k: 4,
            hidden: 256,
            intermediate: 384,
            dtype: "BF16",
        };
        let full = FullModel {
            vocab: 64,
            heads: 4,
            kv_heads: 2,
        };
        write_model(dir.path(), &g, Some(full), 5).unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut dirs = vec![dir.path().to_path_buf()];
        for family in ["deepseek-moe", "deepseek-v3", "qwen2-moe", "grok-1"] {
            dirs.push(root.join(family));
        }
        for d in &dirs {
            let model = Model::open(d).unwrap();
            let layer = model.info.moe_layers[0];
            let cpu = Forward::new(&model, Device::Cpu).unwrap();
            let cuda = Forward::new(&model, gpu.clone()).unwrap().keep_weights();
            let (lc, lg) = (
                cpu.load_layer(layer).unwrap(),
                cuda.load_layer(layer).unwrap(),
            );
            let x = random_input(57, model.info.hidden_size, &Device::Cpu).unwrap();
            let xg = x.to_device(&gpu).unwrap();
            let want = cpu.moe_block(layer, &lc, &x, &mut ()).unwrap();
            let rel = |y: &Tensor| relative_error(y, &want).unwrap();
            let topk = cuda.moe_block(layer, &lg, &xg, &mut ()).unwrap();
            let all = cuda
                .moe_block(layer, &lg, &xg, &mut AllExpertOutputs)
                .unwrap();
            let naive = naive(&cuda, &lg, &NaiveExperts::new(&lg).unwrap(), &xg).unwrap();
            for (what, y) in [("topk", &topk), ("all-experts", &all), ("naive", &naive)] {
                assert!(rel(y) < 1e-4, "{} {what}: {}", d.display(), rel(y));
            }
            if !has_shared_experts(&lg) && model.info.family != Family::Grok1 {
                let fused = FusedExperts::new(&lg).unwrap();
                let y = fused.forward(&cuda, &lg, &xg).unwrap();
                assert!(rel(&y) < 3e-2, "{} fused: {}", d.display(), rel(&y));
            }
            let ids = vec![(0..23u32).map(|i| i * 5 % 60).collect::<Vec<_>>()];
            let lc = cpu.run(&ids, &mut (), true).unwrap().logits;
            let lg = cuda.run(&ids, &mut (), true).unwrap().logits;
            let r = relative_error(&lg[0], &lc[0]).unwrap();
            assert!(r < 1e-4, "{} logits: {r}", d.display());
        }
    }

    #[test]
    fn naive_matches_the_forward_pass_on_every_family_fixture() {
        // Shared experts (DeepSeekMoE, Qwen2-MoE with its gate), DeepSeek-V3's
        // biased group-limited routing, Grok-1's GELU experts.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for family in [
            "mixtral",
            "deepseek-moe",
            "qwen2-moe",
            "qwen3-moe",
            "olmoe",
            "grok-1",
            "deepseek-v2",
            "deepseek-v3",
        ] {
            let model = Model::open(&root.join(family)).unwrap();
            let fwd = Forward::new(&model, Device::Cpu).unwrap().keep_weights();
            let layer = model.info.moe_layers[0];
            let lw = fwd.load_layer(layer).unwrap();
            let x = random_input(11, model.info.hidden_size, &Device::Cpu).unwrap();
            let grouped = fwd.moe_block(layer, &lw, &x, &mut ()).unwrap();
            // The GPU's tensor dispatch, run on the CPU.
            let tensor = Forward::new(&model, Device::Cpu)
                .unwrap()
                .keep_weights()
                .tensor_dispatch()
                .moe_block(layer, &lw, &x, &mut ())
                .unwrap();
            assert!(
                relative_error(&tensor, &grouped).unwrap() < 1e-5,
                "{family}"
            );
            let all = fwd
                .moe_block(layer, &lw, &x, &mut AllExpertOutputs)
                .unwrap();
            let reference = naive(&fwd, &lw, &NaiveExperts::new(&lw).unwrap(), &x).unwrap();
            assert!(max_abs(&grouped, &reference) < 1e-4, "{family}");
            assert!(
                relative_error(&grouped, &reference).unwrap() < 1e-5,
                "{family}"
            );
            assert!(max_abs(&all, &reference) < 1e-4, "{family}");
        }
    }
}
