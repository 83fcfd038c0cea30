//! The routing benchmark: router matmul `x·Wᵀ` on the device, then the
//! family's rule (softmax, top-k, renormalise; or DeepSeek-V3's
//! group-limited sigmoid routing). On the CPU the logits come from the
//! forward pass's CPU kernel (`expert_gemm`) and the rule runs per token as
//! the forward pass routes, split over tokens on all cores. On a GPU it stays on
//! the device as tensor ops (softmax or sigmoid, top-k by a row sort, a
//! gather, the renormalisation), as a serving stack routes, and only the
//! `[tokens, k]` choices come back to the host. (The forward pass routes on
//! the host on every device: its observers read every token's scores.)

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::forward::routing::Routing;
use crate::forward::weights::ce;

/// A router: its weight (stored transposed, `[hidden, experts]`), rule and k.
pub struct Router {
    /// Router weight `[hidden, experts]`.
    pub weight_t: Tensor,
    /// On the CPU, the weight in the hub layout `[experts, hidden]` on the
    /// host, for the forward pass's CPU kernel.
    weight_host: Option<Vec<f32>>,
    /// DeepSeek-V3 score-correction bias.
    pub bias: Option<Vec<f32>>,
    /// The routing rule.
    pub routing: Routing,
    /// Routed experts.
    pub experts: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Experts selected per token.
    pub top_k: usize,
}

/// Selected experts `[tokens, k]` and their weights.
pub struct Routed {
    /// Selected experts `[tokens, k]`, row-major.
    pub experts: Vec<u32>,
    /// Their routing weights `[tokens, k]`.
    pub weights: Vec<f32>,
}

/// One routing geometry of the benchmark suite.
#[derive(Debug, Clone)]
pub struct RoutingCase {
    /// `softmax-topk` or `sigmoid-group`.
    pub variant: &'static str,
    /// e.g. `e256-k8`.
    pub label: String,
    /// Hidden size.
    pub hidden: usize,
    /// Routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// The routing rule.
    pub routing: Routing,
}

/// The default routing geometries: E = 8, 64, 256 with k = 2, 6, 8 (hidden
/// sizes of Mixtral-8x7B, DeepSeekMoE-16B and DeepSeek-V3), and DeepSeek-V3's
/// group-limited sigmoid routing (8 groups, 4 kept, renormalised, × 2.5).
pub fn default_cases() -> Vec<RoutingCase> {
    let softmax = Routing::SoftmaxTopK {
        renormalize: true,
        scale: 1.0,
    };
    let mut cases: Vec<RoutingCase> = [(8, 2, 4096), (64, 6, 2048), (256, 8, 7168)]
        .into_iter()
        .map(|(e, k, h)| RoutingCase {
            variant: "softmax-topk",
            label: format!("e{e}-k{k}"),
            hidden: h,
            experts: e,
            top_k: k,
            routing: softmax.clone(),
        })
        .collect();
    cases.push(RoutingCase {
        variant: "sigmoid-group",
        label: "e256-k8".into(),
        hidden: 7168,
        experts: 256,
        top_k: 8,
        routing: Routing::DeepSeekV3 {
            n_group: 8,
            topk_group: 4,
            renormalize: true,
            scale: 2.5,
        },
    });
    cases
}

impl Router {
    /// A random router for `case` on `device`.
    pub fn random(case: &RoutingCase, device: &Device) -> Result<Router> {
        let scale = 1.0 / (case.hidden as f64).sqrt();
        let weight_t = Tensor::randn(0f32, scale as f32, (case.hidden, case.experts), device)
            .map_err(ce("random router"))?;
        let bias = matches!(case.routing, Routing::DeepSeekV3 { .. }).then(|| {
            (0..case.experts)
                .map(|e| ((e * 37) % 11) as f32 * 0.01)
                .collect()
        });
        let weight_host = if device.is_cpu() {
            let w: Vec<f32> = weight_t
                .t()
                .and_then(|w| w.contiguous()?.flatten_all()?.to_vec1())
                .map_err(ce("random router"))?;
            Some(w)
        } else {
            None
        };
        Ok(Router {
            weight_t,
            weight_host,
            bias,
            routing: case.routing.clone(),
            experts: case.experts,
            hidden: case.hidden,
            top_k: case.top_k,
        })
    }

    /// Routes `x` `[tokens, hidden]`.
    pub fn route(&self, x: &Tensor) -> Result<Routed> {
        let Some(w) = &self.weight_host else {
            return self.route_on_device(x);
        };
        // As the forward pass computes router logits on the CPU: its kernel
        // for a few tokens or experts, candle's GEMM otherwise.
        let t = x.dim(0).map_err(ce("router input"))?;
        let logits: Vec<f32> = if crate::forward::use_cpu_kernel(t, self.experts) {
            // The input's own storage when it is a contiguous f32 matrix on
            // the host (as in the benchmark), a copy otherwise.
            let borrowed = crate::forward::weights::HostMatrix::of(x);
            let copied: Vec<f32>;
            let xh: &[f32] = match borrowed.as_ref().and_then(|m| m.f32_data()) {
                Some(v) => v,
                None => {
                    copied = x
                        .flatten_all()
                        .and_then(|x| x.to_vec1())
                        .map_err(ce("router input"))?;
                    &copied
                }
            };
            let mut logits = vec![0f32; t * self.experts];
            crate::forward::expert_gemm::matmul_xwt(
                xh,
                t,
                self.hidden,
                w,
                self.experts,
                &mut logits,
            );
            logits
        } else {
            x.matmul(&self.weight_t)
                .and_then(|l| l.flatten_all()?.to_vec1())
                .map_err(ce("router logits"))?
        };
        Ok(route_logits(
            &self.routing,
            &logits,
            self.experts,
            self.top_k,
            self.bias.as_deref(),
        ))
    }

    /// Routes `x` with tensor ops on its device (the GPU path; runs on any
    /// device). Selection ties fall to the sort's order, not to the lower
    /// index as on the host: they do not occur with real-valued scores.
    pub fn route_on_device(&self, x: &Tensor) -> Result<Routed> {
        let (ids, w) = (|| {
            let logits = x.matmul(&self.weight_t)?;
            let bias = match &self.bias {
                Some(b) => Some(Tensor::new(b.as_slice(), x.device())?),
                None => None,
            };
            let (ids, w) = device_rule(&self.routing, &logits, self.top_k, bias.as_ref())?;
            Ok::<_, candle_core::Error>((
                ids.flatten_all()?.to_vec1::<u32>()?,
                w.flatten_all()?.to_vec1::<f32>()?,
            ))
        })()
        .map_err(ce("routing on the device"))?;
        Ok(Routed {
            experts: ids,
            weights: w,
        })
    }

    /// Floating-point operations of routing `tokens` tokens (matmul, plus
    /// about 8 per score for the softmax/sigmoid and selection).
    pub fn flops(&self, tokens: usize) -> f64 {
        let (t, h, e) = (tokens as f64, self.hidden as f64, self.experts as f64);
        2.0 * t * h * e + 8.0 * t * e
    }

    /// Bytes moved: the activations, the router weight and the logits (f32).
    pub fn bytes(&self, tokens: usize) -> f64 {
        let (t, h, e) = (tokens as f64, self.hidden as f64, self.experts as f64);
        4.0 * (t * h + h * e + t * e)
    }
}

/// The top `k` of each row of `v` `[tokens, n]`: indices (u32) and values.
fn top_k_rows(v: &Tensor, k: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let idx = v.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
    let vals = v.gather(&idx, 1)?;
    Ok((idx, vals))
}

/// A routing rule as tensor ops on `logits` `[tokens, experts]`: the chosen
/// experts `[tokens, k]` (u32, by decreasing weight) and their
/// weights (f32). DeepSeek-V2's rule has no device form here (it routes on the host).
fn device_rule(
    routing: &Routing,
    logits: &Tensor,
    k: usize,
    bias: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (ids, w, renormalize, scale) = match routing {
        Routing::SoftmaxTopK { renormalize, scale } => {
            let probs = candle_nn::ops::softmax_last_dim(logits)?;
            let (ids, w) = top_k_rows(&probs, k)?;
            (ids, w, *renormalize, *scale)
        }
        Routing::DeepSeekV3 {
            n_group,
            topk_group,
            renormalize,
            scale,
        } => {
            let (t, e) = logits.dims2()?;
            let scores = candle_nn::ops::sigmoid(logits)?;
            let biased = match bias {
                Some(b) => scores.broadcast_add(b)?,
                None => scores.clone(),
            };
            let g = (*n_group).max(1);
            // A group's score: the sum of its two best biased scores; the
            // `topk_group` best groups stay, the others are masked out.
            let per_group = biased.reshape((t, g, e / g))?;
            let best2 = per_group
                .arg_sort_last_dim(false)?
                .narrow(2, 0, 2.min(e / g))?
                .contiguous()?;
            let group_scores = per_group.gather(&best2, 2)?.sum(2)?;
            let (_, kept) = top_k_rows(&group_scores, (*topk_group).min(g))?;
            let threshold = kept.narrow(1, (*topk_group).min(g) - 1, 1)?;
            let keep = group_scores
                .broadcast_ge(&threshold)?
                .unsqueeze(2)?
                .broadcast_as((t, g, e / g))?
                .reshape((t, e))?;
            let masked = keep.where_cond(&biased, &biased.ones_like()?.affine(0.0, -1e30)?)?;
            let ids = masked
                .arg_sort_last_dim(false)?
                .narrow(1, 0, k)?
                .contiguous()?;
            let w = scores.gather(&ids, 1)?;
            // By decreasing weight (the unbiased score), as on the host.
            let order = w.arg_sort_last_dim(false)?;
            (
                ids.gather(&order, 1)?,
                w.gather(&order, 1)?,
                *renormalize,
                *scale,
            )
        }
        Routing::DeepSeekV2 { .. } => {
            return Err(candle_core::Error::Msg(
                "DeepSeek-V2 routing runs on the host".into(),
            ))
        }
    };
    let w = if renormalize {
        w.broadcast_div(&w.sum_keepdim(1)?)?
    } else {
        w
    };
    let w = if scale != 1.0 {
        w.affine(scale, 0.0)?
    } else {
        w
    };
    Ok((ids, w))
}

/// Applies `routing` to host logits `[tokens, experts]`, tokens in parallel.
pub fn route_logits(
    routing: &Routing,
    logits: &[f32],
    experts: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Routed {
    let kk = k.min(experts);
    let tokens = logits.len() / experts.max(1);
    let mut out = Routed {
        experts: vec![0; tokens * kk],
        weights: vec![0.0; tokens * kk],
    };
    if kk == 0 {
        return out;
    }
    debug_assert_eq!(
        logits.len() % experts,
        0,
        "logits are not [tokens, experts]"
    );
    out.experts
        .par_chunks_mut(kk)
        .zip(out.weights.par_chunks_mut(kk))
        .zip(logits.par_chunks(experts))
        .with_min_len(64)
        .for_each(|((e, w), row)| {
            let r = routing.route(row, k, bias);
            for (e, &r) in e.iter_mut().zip(&r.experts) {
                *e = r as u32;
            }
            w.copy_from_slice(&r.weights);
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router's logits for `x`, through candle (on `x`'s device), on the host.
    fn candle_logits(r: &Router, x: &Tensor) -> Vec<f32> {
        x.matmul(&r.weight_t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Same experts in the same order, weights equal to f32 rounding.
    fn assert_same_routes(a: &Routed, b: &Routed, what: &str) {
        assert_eq!(a.experts, b.experts, "{what}");
        for (x, y) in a.weights.iter().zip(&b.weights) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    }

    #[test]
    fn routes_every_token_like_the_forward_pass() {
        for case in default_cases() {
            let small = RoutingCase {
                hidden: 32,
                ..case.clone()
            };
            let r = Router::random(&small, &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (5, 32), &Device::Cpu).unwrap();
            let routed = r.route(&x).unwrap();
            assert_eq!(routed.experts.len(), 5 * small.top_k);
            let logits = candle_logits(&r, &x);
            for t in 0..5 {
                let want = small.routing.route(
                    &logits[t * small.experts..(t + 1) * small.experts],
                    small.top_k,
                    r.bias.as_deref(),
                );
                let got: Vec<usize> = routed.experts[t * small.top_k..(t + 1) * small.top_k]
                    .iter()
                    .map(|&e| e as usize)
                    .collect();
                assert_eq!(got, want.experts, "{}", case.variant);
            }
        }
    }

    /// On a CUDA build with a GPU: the routing benchmark's device path on
    /// the GPU chooses and weighs as the host rule does on the same logits.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_routing_matches_the_host() {
        let Ok(gpu) = Device::new_cuda(0) else {
            crate::test_support::skip("cuda_routing_matches_the_host", "cuda", "no CUDA device");
            return;
        };
        for case in default_cases() {
            let small = RoutingCase {
                hidden: 64,
                ..case.clone()
            };
            let r = Router::random(&small, &gpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (300, 64), &gpu).unwrap();
            let dev = r.route(&x).unwrap();
            let logits = candle_logits(&r, &x);
            let host = route_logits(&r.routing, &logits, r.experts, r.top_k, r.bias.as_deref());
            assert_same_routes(&dev, &host, case.variant);
        }
    }

    #[test]
    fn device_rules_choose_and_weigh_like_the_host() {
        // The GPU's tensor-op routing, run on the CPU, against the forward
        // pass's per-token rule: same experts, same weights (f32 vs f64).
        for case in default_cases() {
            let small = RoutingCase {
                hidden: 48,
                ..case.clone()
            };
            let r = Router::random(&small, &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (37, 48), &Device::Cpu).unwrap();
            let host = r.route(&x).unwrap();
            let dev = r.route_on_device(&x).unwrap();
            assert_same_routes(&dev, &host, case.variant);
        }
    }
}
