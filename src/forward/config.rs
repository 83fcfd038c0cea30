//! Forward-pass hyper-parameters per family, read from config.json with the
//! spellings of released checkpoints and of transformers 5 (SPEC §9).

use crate::error::{Error, Result};
use crate::forward::routing::Routing;
use crate::model::{Config, Family, ModelInfo};

/// How attention is computed.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionKind {
    /// Grouped-query attention with per-head projections (`q_proj`...).
    Standard {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        /// q/k/v biases (Qwen2-MoE).
        bias: bool,
        /// RMSNorm on q and k: per head (Qwen3-MoE) or over the whole projection (OLMoE).
        qk_norm: QkNorm,
    },
    /// DeepSeek-V2/V3 multi-head latent attention.
    Mla {
        heads: usize,
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
        /// Rotary dims interleaved (even/odd pairs), as DeepSeek's reference applies them.
        rope_interleave: bool,
    },
}

/// Where q/k RMSNorms apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    PerHead,
    Full,
}

/// Everything the forward pass needs beyond [`ModelInfo`].
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub attention: AttentionKind,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub routing: Routing,
    pub tie_embeddings: bool,
    /// Grok-1: embeddings × this.
    pub embedding_multiplier: f64,
    /// Grok-1: logits × this.
    pub output_multiplier: f64,
    /// Grok-1: attention logits × this (instead of 1/sqrt(head_dim)), then soft-capped.
    pub attn_output_multiplier: Option<f64>,
    pub max_attn_value: Option<f64>,
    /// Qwen2-MoE: shared expert scaled by sigmoid(shared_expert_gate·x).
    pub shared_expert_gate: bool,
}

fn rope_theta(c: &Config) -> Result<f64> {
    if let Some(t) = c.f64_opt("rope_theta")? {
        return Ok(t);
    }
    // transformers 5: rope_parameters: {rope_theta, rope_type}.
    if let Some(p) = c.get("rope_parameters").and_then(|v| v.get("rope_theta")) {
        return p.as_f64().ok_or_else(|| {
            Error::key(c.path(), "rope_parameters.rope_theta", "expected a number")
        });
    }
    Ok(10000.0)
}

impl ForwardConfig {
    /// Reads the forward-pass settings of a model.
    pub fn from_config(c: &Config, info: &ModelInfo) -> Result<ForwardConfig> {
        let fam = info.family;
        let heads = c.usize("num_attention_heads")?;
        let kv_heads = c.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match fam {
            // DeepSeek configs written by transformers 5 carry head_dim = qk_rope_head_dim.
            Family::DeepSeekV2 | Family::DeepSeekV3 => 0,
            _ => c
                .usize_opt("head_dim")?
                .unwrap_or(info.hidden_size / heads.max(1)),
        };
        let norm_topk = c.bool_opt("norm_topk_prob")?;
        let scale = c.f64_opt("routed_scaling_factor")?.unwrap_or(1.0);
        let n_group = c.usize_opt("n_group")?.unwrap_or(1);
        let topk_group = c.usize_opt("topk_group")?.unwrap_or(n_group);
        let routing = match fam {
            Family::Mixtral => Routing::SoftmaxTopK {
                renormalize: true,
                scale: 1.0,
            },
            Family::Grok1 => Routing::SoftmaxTopK {
                renormalize: false,
                scale: 1.0,
            },
            Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe | Family::DeepSeekMoe => {
                Routing::SoftmaxTopK {
                    renormalize: norm_topk.unwrap_or(false),
                    scale: 1.0,
                }
            }
            Family::DeepSeekV2 => {
                let method = c.str("topk_method")?.unwrap_or("greedy");
                Routing::DeepSeekV2 {
                    group_limited: method == "group_limited_greedy",
                    n_group,
                    topk_group,
                    renormalize: norm_topk.unwrap_or(false),
                    scale,
                }
            }
            Family::DeepSeekV3 => Routing::DeepSeekV3 {
                n_group,
                topk_group,
                renormalize: norm_topk.unwrap_or(true),
                scale,
            },
        };
        let attention = match fam {
            Family::DeepSeekV2 | Family::DeepSeekV3 => AttentionKind::Mla {
                heads,
                q_lora_rank: c.usize_opt("q_lora_rank")?,
                kv_lora_rank: c.usize("kv_lora_rank")?,
                qk_nope_head_dim: c.usize("qk_nope_head_dim")?,
                qk_rope_head_dim: c.usize("qk_rope_head_dim")?,
                v_head_dim: c.usize("v_head_dim")?,
                rope_interleave: c.bool_opt("rope_interleave")?.unwrap_or(true),
            },
            _ => AttentionKind::Standard {
                heads,
                kv_heads,
                head_dim,
                bias: fam == Family::Qwen2Moe || c.bool_opt("attention_bias")?.unwrap_or(false),
                qk_norm: match fam {
                    Family::Qwen3Moe => QkNorm::PerHead,
                    Family::Olmoe => QkNorm::Full,
                    _ => QkNorm::None,
                },
            },
        };
        let grok = fam == Family::Grok1;
        Ok(ForwardConfig {
            family: fam,
            vocab_size: c.usize("vocab_size")?,
            attention,
            rope_theta: rope_theta(c)?,
            rms_eps: c
                .f64_opt("rms_norm_eps")?
                .unwrap_or(if grok { 1e-5 } else { 1e-6 }),
            routing,
            tie_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(grok),
            embedding_multiplier: if grok {
                c.f64_opt("embedding_multiplier_scale")?.unwrap_or(1.0)
            } else {
                1.0
            },
            output_multiplier: if grok {
                c.f64_opt("output_multiplier_scale")?.unwrap_or(1.0)
            } else {
                1.0
            },
            attn_output_multiplier: if grok {
                c.f64_opt("attn_output_multiplier")?
            } else {
                None
            },
            max_attn_value: if grok {
                c.f64_opt("max_attn_value")?
            } else {
                None
            },
            shared_expert_gate: fam == Family::Qwen2Moe,
        })
    }
}
