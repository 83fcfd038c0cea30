//! DeepSeek-V3.2 (`deepseek_v32`, transformers 5.24 `modeling_deepseek_v32.py`):
//! DeepSeek-V3 (multi-head latent attention with interleaved rope, sigmoid
//! routing with `e_score_correction_bias`, group-limited top-k,
//! `routed_scaling_factor`, shared experts, dense first layers) plus the
//! DeepSeek Sparse Attention (DSA) *lightning indexer* in every layer, which
//! picks the keys each query may attend to:
//!
//! - `q = wq_b(q_resid)` per indexer head (`q_resid` = the MLA's
//!   `q_a_layernorm(q_a_proj(x))`), `k = LayerNorm(wk(x))` (one head, weight
//!   and bias, eps 1e-6);
//! - half-split (not interleaved, unlike the MLA) rope on the first
//!   `qk_rope_head_dim` dims of both, the other dims passed through;
//! - `score(s, t) = Σ_h relu(q_h(s)·k(t) / √index_head_dim) · w_h(s)` with
//!   `w = weights_proj(x) / √index_n_heads`;
//! - each query keeps the `index_topk` causal keys of highest score (all of
//!   them when it sees no more than that), and the MLA softmax runs over
//!   those keys only.
//!
//! As transformers, the indexer is computed in f32 without the released
//! inference code's FP8 quantisation of q/k and its Hadamard rotation (an
//! orthogonal map: it leaves the dot products unchanged). Where scores tie
//! at the top-k boundary the lower key index is kept.

use candle_core::{Tensor, D};

use super::attention::{query_block, split_heads};
use super::glm::rope_leading;
use super::weights::load;
use super::{Forward, R};
use crate::error::{Error, Result};
use crate::model::config::limits;
use crate::model::{Config, Weights};

/// The lightning indexer's settings (config.json `index_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexerConfig {
    /// `index_n_heads` (64 in the release).
    pub heads: usize,
    /// `index_head_dim` (128).
    pub head_dim: usize,
    /// `index_topk`: keys kept per query (2048).
    pub topk: usize,
    /// Rotary dims at the start of each indexer head (`qk_rope_head_dim`).
    pub rope_dim: usize,
    /// Width of the query residual it projects (`q_lora_rank`).
    pub q_lora_rank: usize,
}

impl IndexerConfig {
    /// Reads the indexer keys of `c` (defaults as transformers' `DeepseekV32Config`).
    pub fn from_config(
        c: &Config,
        rope_dim: usize,
        q_lora_rank: Option<usize>,
    ) -> Result<IndexerConfig> {
        let heads = c
            .usize_opt_in("index_n_heads", 1, limits::HEADS)?
            .unwrap_or(64);
        let head_dim = c
            .usize_opt_in("index_head_dim", 1, limits::HEAD_DIM)?
            .unwrap_or(128);
        if rope_dim > head_dim {
            return Err(Error::key(
                c.path(),
                "index_head_dim",
                format!(
                    "is {head_dim}, less than qk_rope_head_dim ({rope_dim}): the indexer \
                     rotates the first qk_rope_head_dim dims of its heads"
                ),
            ));
        }
        if heads
            .checked_mul(head_dim)
            .is_none_or(|w| w > limits::WIDTH)
        {
            return Err(Error::key(
                c.path(),
                "index_head_dim",
                format!(
                    "is {head_dim}: {heads} indexer heads × {head_dim} exceeds the limit of {} \
                     for one projection",
                    limits::WIDTH
                ),
            ));
        }
        let topk = c.usize_opt_in("index_topk", 1, usize::MAX)?.unwrap_or(2048);
        let Some(q_lora_rank) = q_lora_rank else {
            return Err(Error::key(
                c.path(),
                "q_lora_rank",
                "is missing or null; DeepSeek-V3.2's indexer projects the low-rank query \
                 (q_a_layernorm(q_a_proj(x)))",
            ));
        };
        Ok(IndexerConfig {
            heads,
            head_dim,
            topk,
            rope_dim,
            q_lora_rank,
        })
    }
}

/// One layer's indexer weights (`self_attn.indexer.*`).
pub struct IndexerWeights {
    /// `wq_b` `[heads·head_dim, q_lora_rank]`.
    pub wq_b: Tensor,
    /// `wk` `[head_dim, hidden]`.
    pub wk: Tensor,
    /// `k_norm.weight` `[head_dim]`.
    pub k_norm_weight: Tensor,
    /// `k_norm.bias` `[head_dim]`.
    pub k_norm_bias: Tensor,
    /// `weights_proj` `[heads, hidden]`.
    pub weights_proj: Tensor,
}

impl IndexerWeights {
    /// Loads the indexer under `attn` (`model.layers.N.self_attn`), shapes checked.
    pub(super) fn load(
        w: &Weights,
        attn: &str,
        cfg: &IndexerConfig,
        hidden: usize,
        device: &candle_core::Device,
        t: bool,
    ) -> Result<IndexerWeights> {
        let get = |n: &str, shape: &[usize]| {
            let name = format!("{attn}.indexer.{n}");
            w.expect_shape(&name, shape)?;
            load(w, &name, device, t)
        };
        let d = cfg.head_dim;
        Ok(IndexerWeights {
            wq_b: get("wq_b.weight", &[cfg.heads * d, cfg.q_lora_rank])?,
            wk: get("wk.weight", &[d, hidden])?,
            k_norm_weight: get("k_norm.weight", &[d])?,
            k_norm_bias: get("k_norm.bias", &[d])?,
            weights_proj: get("weights_proj.weight", &[cfg.heads, hidden])?,
        })
    }
}

/// LayerNorm over the last axis (biased variance), `· w + b`.
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> R<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// The keys query `i` keeps: every causal key `0..=i` when there are at most
/// `topk` of them, else the `topk` of highest `scores[..=i]` (ties: the lower
/// index). Returned as a row of the additive mask over `keys` columns.
fn keep_row(i: usize, scores: &[f32], topk: usize, keys: usize, row: &mut Vec<f32>) {
    row.clear();
    row.resize(keys, f32::NEG_INFINITY);
    if i < topk {
        row[..=i].iter_mut().for_each(|m| *m = 0.0);
        return;
    }
    let mut order: Vec<usize> = (0..=i).collect();
    let by_score = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    order.select_nth_unstable_by(topk - 1, by_score);
    for &j in &order[..topk] {
        row[j] = 0.0;
    }
}

impl Forward<'_> {
    /// MLA attention restricted to the indexer's keys: `query`, `key`
    /// `[heads, T, dq]`, `value` `[heads, T, dv]` (rope applied); `x` the
    /// normed layer input `[T, hidden]`, `q_resid` `[T, q_lora_rank]`.
    /// Processed in query blocks, so neither the index scores nor the
    /// attention scores ever hold `T × T` values per head at once.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn indexed_attention(
        &self,
        x: &Tensor,
        q_resid: &Tensor,
        w: &IndexerWeights,
        cfg: &IndexerConfig,
        (query, key, value): (&Tensor, &Tensor, &Tensor),
        scale: f64,
        cos: &Tensor,
        sin: &Tensor,
    ) -> R<Tensor> {
        let (heads, t, _) = query.dims3()?;
        let iq = split_heads(&self.lin(q_resid, &w.wq_b, None)?, cfg.heads)?; // [Hi, T, D]
        let ik = layer_norm(
            &self.lin(x, &w.wk, None)?,
            &w.k_norm_weight,
            &w.k_norm_bias,
            1e-6,
        )?; // [T, D]
            // Half-split rope on the first rope_dim dims (the tables cover rope_dim).
        let iq = rope_leading(&iq, cos, sin)?;
        let ik = rope_leading(&ik.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        let ikt = ik.t()?.contiguous()?; // [D, T]
        let hw = (self.lin(x, &w.weights_proj, None)? * (cfg.heads as f64).powf(-0.5))?;
        let hw = hw.t()?.contiguous()?.unsqueeze(2)?; // [Hi, T, 1]
        let index_scale = (cfg.head_dim as f64).powf(-0.5);
        let block = query_block(heads.max(cfg.heads), t);
        let mut outs = Vec::with_capacity(t.div_ceil(block));
        let mut row = Vec::new();
        let mut r0 = 0;
        while r0 < t {
            let r1 = (r0 + block).min(t);
            let rows = r1 - r0;
            let s = iq
                .narrow(1, r0, rows)?
                .contiguous()?
                .broadcast_matmul(&ikt.narrow(1, 0, r1)?.contiguous()?)?; // [Hi, rows, r1]
            let s = (s * index_scale)?.relu()?;
            let index = s.broadcast_mul(&hw.narrow(1, r0, rows)?)?.sum(0)?; // [rows, r1]
            let index: Vec<Vec<f32>> = index.to_vec2()?;
            let mut mask = Vec::with_capacity(rows * r1);
            for (ri, sc) in index.iter().enumerate() {
                keep_row(r0 + ri, sc, cfg.topk, r1, &mut row);
                mask.extend_from_slice(&row);
            }
            let mask = Tensor::from_vec(mask, (rows, r1), query.device())?;
            let qb = query.narrow(1, r0, rows)?.contiguous()?;
            let kb = key.narrow(1, 0, r1)?.transpose(1, 2)?.contiguous()?;
            let sc = (qb.matmul(&kb)? * scale)?.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax_last_dim(&sc)?;
            outs.push(p.matmul(&value.narrow(1, 0, r1)?.contiguous()?)?); // [H, rows, dv]
            r0 = r1;
        }
        let o = Tensor::cat(&outs, 1)?;
        let (h, t, dv) = o.dims3()?;
        o.transpose(0, 1)?.contiguous()?.reshape((t, h * dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn keep_row_keeps_every_causal_key_up_to_topk_then_the_best() {
        let mut row = Vec::new();
        // Query 2 sees 3 keys, top-4: all three, nothing after it.
        keep_row(2, &[0.0, -5.0, 1.0, 9.0, 9.0], 4, 5, &mut row);
        assert_eq!(row[..3], [0.0; 3]);
        assert!(row[3..].iter().all(|m| *m == f32::NEG_INFINITY));
        // Query 4 sees 5 keys, top-2: the two highest (future keys never).
        keep_row(4, &[0.1, 0.7, 0.3, 0.9, 0.2, 5.0], 2, 6, &mut row);
        let kept: Vec<usize> = (0..6).filter(|&j| row[j] == 0.0).collect();
        assert_eq!(kept, [1, 3]);
        // A tie at the boundary keeps the lower index.
        keep_row(3, &[0.5, 0.5, 0.5, 0.1], 2, 4, &mut row);
        let kept: Vec<usize> = (0..4).filter(|&j| row[j] == 0.0).collect();
        assert_eq!(kept, [0, 1]);
    }

    #[test]
    fn indexer_keys_are_validated() {
        let c = |json: &str| Config::parse(Path::new("m/config.json"), json.as_bytes()).unwrap();
        let ok = IndexerConfig::from_config(&c("{}"), 64, Some(1536)).unwrap();
        assert_eq!((ok.heads, ok.head_dim, ok.topk), (64, 128, 2048));
        let e = IndexerConfig::from_config(&c(r#"{"index_head_dim": 4}"#), 8, Some(16))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains("index_head_dim"),
            "{e}"
        );
        let e = IndexerConfig::from_config(&c(r#"{"index_topk": 0}"#), 8, Some(16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("index_topk") && e.contains("is 0"), "{e}");
        let e = IndexerConfig::from_config(&c("{}"), 8, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("q_lora_rank"), "{e}");
        let e = IndexerConfig::from_config(
            &c(r#"{"index_n_heads": 4096, "index_head_dim": 4096}"#),
            8,
            Some(16),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exceeds the limit"), "{e}");
    }
}
