//! The routing benchmark: router matmul `x·Wᵀ` on the device, then the
//! family's rule (softmax, top-k, renormalise; or DeepSeek-V3's
//! group-limited sigmoid routing) on the host for every token, as the forward
//! pass routes. Work is split over tokens on all cores.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::forward::routing::Routing;
use crate::forward::weights::ce;

/// A router: its weight (stored transposed, `[hidden, experts]`), rule and k.
pub struct Router {
    pub weight_t: Tensor,
    pub bias: Option<Vec<f32>>,
    pub routing: Routing,
    pub experts: usize,
    pub hidden: usize,
    pub top_k: usize,
}

/// Selected experts `[tokens, k]` and their weights.
pub struct Routed {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// One routing geometry of the benchmark suite.
#[derive(Debug, Clone)]
pub struct RoutingCase {
    /// `softmax-topk` or `sigmoid-group`.
    pub variant: &'static str,
    /// e.g. `e256-k8`.
    pub label: String,
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
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
        Ok(Router {
            weight_t,
            bias,
            routing: case.routing.clone(),
            experts: case.experts,
            hidden: case.hidden,
            top_k: case.top_k,
        })
    }

    /// Routes `x` `[tokens, hidden]`.
    pub fn route(&self, x: &Tensor) -> Result<Routed> {
        let logits: Vec<f32> = x
            .matmul(&self.weight_t)
            .and_then(|l| l.flatten_all()?.to_vec1())
            .map_err(ce("router logits"))?;
        Ok(route_logits(
            &self.routing,
            &logits,
            self.experts,
            self.top_k,
            self.bias.as_deref(),
        ))
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

/// Applies `routing` to host logits `[tokens, experts]`, tokens in parallel.
pub fn route_logits(
    routing: &Routing,
    logits: &[f32],
    experts: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Routed {
    let per: Vec<(Vec<u32>, Vec<f32>)> = logits
        .par_chunks(experts.max(1))
        .with_min_len(64)
        .map(|row| {
            let r = routing.route(row, k, bias);
            (r.experts.iter().map(|&e| e as u32).collect(), r.weights)
        })
        .collect();
    let mut out = Routed {
        experts: Vec::with_capacity(per.len() * k),
        weights: Vec::with_capacity(per.len() * k),
    };
    for (e, w) in per {
        out.experts.extend(e);
        out.weights.extend(w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let logits: Vec<f32> = x
                .matmul(&r.weight_t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
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
}
