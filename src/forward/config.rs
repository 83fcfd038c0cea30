//! Forward-pass hyper-parameters per family, read from config.json with the
//! spellings of released checkpoints and of transformers 5 (SPEC §9).

use crate::error::{Error, Result};
use crate::forward::routing::Routing;
use crate::model::config::limits;
use crate::model::{Config, Family, ModelInfo};

/// How attention is computed.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionKind {
    /// Grouped-query attention with per-head projections (`q_proj`...).
    Standard {
        /// Query heads.
        heads: usize,
        /// Key/value heads (GQA groups).
        kv_heads: usize,
        /// Dimension of one head.
        head_dim: usize,
        /// q/k/v biases (Qwen2-MoE).
        bias: bool,
        /// RMSNorm on q and k: per head (Qwen3-MoE) or over the whole projection (OLMoE).
        qk_norm: QkNorm,
    },
    /// DeepSeek-V2/V3 multi-head latent attention.
    Mla {
        /// Attention heads.
        heads: usize,
        /// Rank of the query compression (`None`: full-rank q).
        q_lora_rank: Option<usize>,
        /// Rank of the key/value compression.
        kv_lora_rank: usize,
        /// Per-head q/k dims without rotary.
        qk_nope_head_dim: usize,
        /// Per-head q/k dims with rotary.
        qk_rope_head_dim: usize,
        /// Per-head value dims.
        v_head_dim: usize,
        /// Rotary dims interleaved (even/odd pairs), as DeepSeek's reference applies them.
        rope_interleave: bool,
    },
}

/// Where q/k RMSNorms apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// No q/k norm.
    None,
    /// One RMSNorm per head.
    PerHead,
    /// One RMSNorm over the whole projection.
    Full,
}

/// Everything the forward pass needs beyond [`ModelInfo`].
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardConfig {
    /// The model family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// How attention is computed.
    pub attention: AttentionKind,
    /// Rotary base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// How tokens are routed to experts.
    pub routing: Routing,
    /// The output head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// Grok-1: embeddings × this.
    pub embedding_multiplier: f64,
    /// Grok-1: logits × this.
    pub output_multiplier: f64,
    /// Grok-1: attention logits × this (instead of 1/sqrt(head_dim)), then soft-capped.
    pub attn_output_multiplier: Option<f64>,
    /// Grok-1: soft cap of attention logits (`tanh` scaled to this).
    pub max_attn_value: Option<f64>,
    /// Qwen2-MoE: shared expert scaled by sigmoid(shared_expert_gate·x).
    pub shared_expert_gate: bool,
    /// Granite: attention and MLP outputs × this before the residual add.
    pub residual_multiplier: f64,
    /// GLM-4.5: rotary embeddings on the first this many dims of each head
    /// only (`partial_rotary_factor`); `None`: the whole head.
    pub rotary_dim: Option<usize>,
    /// gpt-oss: sinks, sliding windows, YaRN, biased router, clamped SwiGLU.
    pub gpt_oss: Option<crate::forward::gpt_oss::GptOssConfig>,
    /// DeepSeek-V3.2: the sparse-attention (DSA) lightning indexer.
    pub dsa: Option<crate::forward::deepseek_v32::IndexerConfig>,
    /// Multi-head latent attention under YaRN `rope_scaling` (the released
    /// DeepSeek-V2/V3/V3.2 and Kimi-K2 configs): the corrected rotary
    /// frequencies and the factor on cos/sin, as transformers'
    /// `_compute_yarn_parameters`; `None` for the default rope.
    pub rope_yarn: Option<(Vec<f32>, f32)>,
    /// Factor on the MLA softmax scale: `yarn_get_mscale(factor,
    /// mscale_all_dim)²` under YaRN (transformers' `yarn_apply_mscale`), else 1.
    pub mla_softmax_factor: f64,
    /// Qwen3-Next / Qwen3.5: the Gated DeltaNet + gated attention stack.
    pub hybrid: Option<crate::forward::qwen3_next::HybridConfig>,
    /// Llama 4: chunked attention, no-rope layers, temperature tuning, q/k
    /// L2 norm, llama3 rope; the sigmoid weight scales the expert input.
    pub llama4: Option<crate::forward::llama4::Llama4Config>,
}

/// The rope parameters object of `c` and the key it sits under
/// (`rope_parameters` of transformers 5, or the released `rope_scaling`).
fn rope_params(c: &Config) -> (&'static str, Option<&serde_json::Value>) {
    use serde_json::Value;
    match (c.get("rope_parameters"), c.get("rope_scaling")) {
        (Some(p @ Value::Object(_)), _) => ("rope_parameters", Some(p)),
        (_, Some(p @ Value::Object(_))) => ("rope_scaling", Some(p)),
        _ => ("rope_parameters", None),
    }
}

/// The rope type of `c` (`default` when none is given) and the key that
/// gave it (`rope_parameters.rope_type`, `rope_scaling.type`, ...).
fn rope_type(c: &Config) -> (String, String) {
    let (prefix, p) = rope_params(c);
    for k in ["rope_type", "type"] {
        if let Some(ty) = p.and_then(|p| p.get(k)).and_then(serde_json::Value::as_str) {
            return (format!("{prefix}.{k}"), ty.to_string());
        }
    }
    (format!("{prefix}.rope_type"), "default".to_string())
}

/// The MLA families' rope: default, or YaRN with its frequencies, cos/sin
/// factor and softmax-scale factor (transformers' DeepSeek-V2/V3/V3.2
/// attention); any other type is refused naming the key.
/// YaRN frequencies with their cos/sin factor, and the softmax-scale factor.
type MlaRope = (Option<(Vec<f32>, f32)>, f64);

fn mla_rope(c: &Config, rope_dim: usize, theta: f64) -> Result<MlaRope> {
    let (key, ty) = rope_type(c);
    let prefix = rope_params(c).0;
    match ty.as_str() {
        "default" => Ok((None, 1.0)),
        "yarn" => {
            let p = rope_params(c).1.expect("a rope type comes from an object");
            let num = |k: &str| crate::forward::gpt_oss::rope_num(c, prefix, p, k);
            let factor = match num("factor")? {
                Some(f) if f > 0.0 => f,
                v => {
                    return Err(Error::key(
                        c.path(),
                        &format!("{prefix}.factor"),
                        format!("is {v:?}; YaRN needs a positive factor"),
                    ))
                }
            };
            let (inv, cos_sin) = crate::forward::gpt_oss::rope(c, rope_dim, theta)?;
            let softmax = match num("mscale_all_dim")? {
                Some(m) if m != 0.0 && factor > 1.0 => {
                    let s = 0.1 * m * factor.ln() + 1.0;
                    s * s
                }
                _ => 1.0,
            };
            Ok((Some((inv, cos_sin)), softmax))
        }
        other => Err(Error::key(
            c.path(),
            &key,
            format!("is `{other}`; the multi-head latent attention reads `default` and `yarn`"),
        )),
    }
}

fn rope_theta(c: &Config) -> Result<f64> {
    let (key, theta) = if let Some(t) = c.f64_opt("rope_theta")? {
        ("rope_theta", t)
    } else if let Some(p) = c.get("rope_parameters").and_then(|v| v.get("rope_theta")) {
        // transformers 5: rope_parameters: {rope_theta, rope_type}.
        let t = p.as_f64().ok_or_else(|| {
            Error::key(c.path(), "rope_parameters.rope_theta", "expected a number")
        })?;
        ("rope_parameters.rope_theta", t)
    } else {
        return Ok(10000.0);
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::key(
            c.path(),
            key,
            format!("is {theta}, must be a positive finite number"),
        ));
    }
    Ok(theta)
}

/// A per-head dimension: `1..=limits::HEAD_DIM`, and even where rotary
/// embeddings rotate pairs of it.
fn head_dim_in(c: &Config, key: &str, v: usize, rotary: bool) -> Result<usize> {
    c.check_range(key, v, 1, limits::HEAD_DIM)?;
    if rotary && !v.is_multiple_of(2) {
        return Err(Error::key(
            c.path(),
            key,
            format!("is {v}, must be even (rotary embeddings rotate pairs of dimensions)"),
        ));
    }
    Ok(v)
}

/// `heads × dim` within `limits::WIDTH` (checked, so nothing wraps).
fn width(c: &Config, key: &str, heads: usize, dim: usize) -> Result<()> {
    match heads.checked_mul(dim) {
        Some(w) if w <= limits::WIDTH => Ok(()),
        _ => Err(Error::key(
            c.path(),
            key,
            format!(
                "is {dim}: {heads} heads × {dim} exceeds the limit of {} for one projection",
                limits::WIDTH
            ),
        )),
    }
}

impl ForwardConfig {
    /// Reads the forward-pass settings of a model.
    pub fn from_config(c: &Config, info: &ModelInfo) -> Result<ForwardConfig> {
        let fam = info.family;
        // A multimodal release (Llama 4, Qwen3.5): the text model's keys.
        let text = c.text_config();
        let c = text.as_ref().unwrap_or(c);
        if !fam.native_forward() {
            return Err(Error::NoNativeForward {
                path: c.path().to_path_buf(),
                family: fam.id().to_string(),
                native: Family::ALL.map(Family::id).join(", "),
            });
        }
        let mla = matches!(
            fam,
            Family::DeepSeekV2 | Family::DeepSeekV3 | Family::DeepSeekV32
        );
        let heads = c.usize_in("num_attention_heads", 1, limits::HEADS)?;
        let kv_heads = c
            .usize_opt_in("num_key_value_heads", 1, heads)?
            .unwrap_or(heads);
        if !mla && heads % kv_heads != 0 {
            return Err(Error::key(
                c.path(),
                "num_key_value_heads",
                format!(
                    "is {kv_heads}, must divide num_attention_heads ({heads}): each key/value head serves a whole group of query heads"
                ),
            ));
        }
        let head_dim = if mla {
            // DeepSeek configs written by transformers 5 carry head_dim = qk_rope_head_dim.
            0
        } else {
            let d = match c.usize_opt("head_dim")? {
                Some(d) => head_dim_in(c, "head_dim", d, true)?,
                None if info.hidden_size / heads == 0 => {
                    return Err(Error::key(
                        c.path(),
                        "num_attention_heads",
                        format!(
                            "is {heads}, more than hidden_size ({}): the head dimension would be 0",
                            info.hidden_size
                        ),
                    ))
                }
                None => head_dim_in(c, "hidden_size", info.hidden_size / heads, true)?,
            };
            width(c, "head_dim", heads, d)?;
            d
        };
        let norm_topk = c.bool_opt("norm_topk_prob")?;
        let scale = c
            .f64_opt_where("routed_scaling_factor", "a positive finite number", |v| {
                v > 0.0
            })?
            .unwrap_or(1.0);
        // Consistency with the number of experts and top_k is checked by ModelInfo.
        let n_group = c.usize_opt_in("n_group", 1, info.num_experts)?.unwrap_or(1);
        let topk_group = c.usize_opt_in("topk_group", 1, n_group)?.unwrap_or(n_group);
        let routing = match fam {
            // Granite, gpt-oss: softmax over the top-k logits, the same weights.
            Family::Mixtral | Family::GraniteMoe | Family::GptOss => Routing::SoftmaxTopK {
                renormalize: true,
                scale: 1.0,
            },
            Family::Grok1 => Routing::SoftmaxTopK {
                renormalize: false,
                scale: 1.0,
            },
            // Qwen3.5 always renormalises (its router has no norm_topk_prob).
            Family::Qwen35Moe => Routing::SoftmaxTopK {
                renormalize: true,
                scale: 1.0,
            },
            Family::Qwen3Next => Routing::SoftmaxTopK {
                renormalize: norm_topk.unwrap_or(true),
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
            // MiniMax-M2: sigmoid + correction bias, top-k, renormalised: V3's
            // rule with one group and no scaling.
            Family::MiniMaxM2 => Routing::DeepSeekV3 {
                n_group: 1,
                topk_group: 1,
                renormalize: true,
                scale: 1.0,
            },
            // Llama 4: top-k of the logits (= of their sigmoids), weights
            // the sigmoids, neither renormalised nor scaled (applied to the
            // expert input by the forward pass, src/forward/llama4.rs).
            Family::Llama4 => Routing::DeepSeekV3 {
                n_group: 1,
                topk_group: 1,
                renormalize: false,
                scale: 1.0,
            },
            // DeepSeek-V3 (Kimi-K2), V3.2 and GLM-4.5 (the remaining native
            // families, checked above): sigmoid + correction bias, groups.
            _ => Routing::DeepSeekV3 {
                n_group,
                topk_group,
                renormalize: norm_topk.unwrap_or(true),
                scale,
            },
        };
        let attention = match fam {
            Family::DeepSeekV2 | Family::DeepSeekV3 | Family::DeepSeekV32 => {
                let nope = c.usize_in("qk_nope_head_dim", 0, limits::HEAD_DIM)?;
                let rope = head_dim_in(c, "qk_rope_head_dim", c.usize("qk_rope_head_dim")?, true)?;
                let v = head_dim_in(c, "v_head_dim", c.usize("v_head_dim")?, false)?;
                width(c, "qk_rope_head_dim", heads, nope + rope)?;
                width(c, "v_head_dim", heads, v)?;
                AttentionKind::Mla {
                    heads,
                    q_lora_rank: c.usize_opt_in("q_lora_rank", 1, limits::WIDTH)?,
                    kv_lora_rank: c.usize_in("kv_lora_rank", 1, limits::WIDTH)?,
                    qk_nope_head_dim: nope,
                    qk_rope_head_dim: rope,
                    v_head_dim: v,
                    rope_interleave: c.bool_opt("rope_interleave")?.unwrap_or(true),
                }
            }
            _ => AttentionKind::Standard {
                heads,
                kv_heads,
                head_dim,
                bias: fam == Family::Qwen2Moe
                    || c.bool_opt("attention_bias")?
                        .unwrap_or(fam == Family::GptOss),
                qk_norm: match fam {
                    Family::Qwen3Moe | Family::Qwen3Next | Family::Qwen35Moe => QkNorm::PerHead,
                    Family::Olmoe => QkNorm::Full,
                    Family::Glm4Moe => super::glm::qk_norm(c)?,
                    // MiniMax-M2 always norms q and k over the whole projection.
                    Family::MiniMaxM2 => QkNorm::Full,
                    _ => QkNorm::None,
                },
            },
        };
        let grok = fam == Family::Grok1;
        let granite = fam == Family::GraniteMoe;
        let rope_theta = rope_theta(c)?;
        let gpt_oss = if fam == Family::GptOss {
            Some(crate::forward::gpt_oss::GptOssConfig::from_config(
                c,
                head_dim,
                rope_theta,
                info.num_layers,
            )?)
        } else {
            None
        };
        let dsa = match (&attention, fam) {
            (
                AttentionKind::Mla {
                    qk_rope_head_dim,
                    q_lora_rank,
                    ..
                },
                Family::DeepSeekV32,
            ) => Some(crate::forward::deepseek_v32::IndexerConfig::from_config(
                c,
                *qk_rope_head_dim,
                *q_lora_rank,
            )?),
            _ => None,
        };
        let (rope_yarn, mla_softmax_factor) = match &attention {
            AttentionKind::Mla {
                qk_rope_head_dim, ..
            } => mla_rope(c, *qk_rope_head_dim, rope_theta)?,
            AttentionKind::Standard { .. } => {
                // Families whose forward reads its own rope parameters
                // (gpt-oss: YaRN; Llama 4: llama3) are checked there; the shared rope is
                // the default one, so another type would be silently wrong.
                let (key, ty) = rope_type(c);
                if fam != Family::GptOss && fam != Family::Llama4 && ty != "default" {
                    return Err(Error::key(
                        c.path(),
                        &key,
                        format!(
                            "is `{ty}`; the {} forward pass reads only the default rope",
                            fam.spec().name
                        ),
                    ));
                }
                (None, 1.0)
            }
        };
        let llama4 = if fam == Family::Llama4 {
            Some(crate::forward::llama4::Llama4Config::from_config(
                c,
                head_dim,
                rope_theta,
                info.num_layers,
            )?)
        } else {
            None
        };
        let finite = |key: &str| c.f64_opt_where(key, "a finite number", |_| true);
        let positive = |key: &str| c.f64_opt_where(key, "a positive finite number", |v| v > 0.0);
        Ok(ForwardConfig {
            family: fam,
            vocab_size: c.usize_in("vocab_size", 1, limits::VOCAB)?,
            attention,
            rope_theta,
            rope_yarn,
            mla_softmax_factor,
            rms_eps: c
                .f64_opt_where("rms_norm_eps", "a finite number from 0 to 1", |v| {
                    (0.0..=1.0).contains(&v)
                })?
                .unwrap_or(if grok || fam == Family::Llama4 {
                    1e-5
                } else {
                    1e-6
                }),
            routing,
            tie_embeddings: c.bool_opt("tie_word_embeddings")?.unwrap_or(grok),
            embedding_multiplier: if grok {
                finite("embedding_multiplier_scale")?.unwrap_or(1.0)
            } else if granite {
                finite("embedding_multiplier")?.unwrap_or(1.0)
            } else {
                1.0
            },
            output_multiplier: if grok {
                finite("output_multiplier_scale")?.unwrap_or(1.0)
            } else if granite {
                1.0 / positive("logits_scaling")?.unwrap_or(1.0)
            } else {
                1.0
            },
            attn_output_multiplier: if grok {
                finite("attn_output_multiplier")?
            } else if granite {
                finite("attention_multiplier")?
            } else {
                None
            },
            max_attn_value: if grok {
                positive("max_attn_value")?
            } else {
                None
            },
            shared_expert_gate: fam.spec().shared_gate.is_some(),
            residual_multiplier: if granite {
                finite("residual_multiplier")?.unwrap_or(1.0)
            } else {
                1.0
            },
            rotary_dim: if fam == Family::Glm4Moe || fam == Family::MiniMaxM2 {
                super::glm::rotary_dim(c, head_dim)?
            } else if super::qwen3_next::is_hybrid(fam) {
                super::qwen3_next::rotary_dim(c, head_dim)?
            } else {
                None
            },
            gpt_oss,
            dsa,
            llama4,
            hybrid: if super::qwen3_next::is_hybrid(fam) {
                Some(super::qwen3_next::HybridConfig::from_config(
                    c,
                    info.num_layers,
                )?)
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};
    use std::path::Path;

    fn fixture_config(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name)
            .join("config.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn forward(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ForwardConfig> {
        let mut v = fixture_config(name);
        edit(v.as_object_mut().unwrap());
        let config = Config::parse(Path::new("m/config.json"), v.to_string().as_bytes())?;
        let info = ModelInfo::from_config(&config)?;
        ForwardConfig::from_config(&config, &info)
    }

    fn assert_key_error(r: Result<ForwardConfig>, key: &str, needles: &[&str]) {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains(&format!("`{key}`")),
            "{e}"
        );
        for n in needles {
            assert!(e.contains(n), "`{n}` not in {e}");
        }
    }

    fn set(key: &'static str, v: impl Into<Value>) -> impl FnOnce(&mut Map<String, Value>) {
        let v = v.into();
        move |c| {
            c.insert(key.into(), v);
        }
    }

    #[test]
    fn every_fixture_and_real_config_is_accepted() {
        for name in [
            "mixtral",
            "qwen2-moe",
            "qwen3-moe",
            "olmoe",
            "deepseek-v2",
            "deepseek-v3",
            "deepseek-v3-fp8",
            "deepseek-moe",
            "grok-1",
        ] {
            forward(name, |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/real-configs");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let config = Config::parse(&path, &std::fs::read(&path).unwrap()).unwrap();
            let Ok(info) = ModelInfo::from_config(&config) else {
                continue; // the dense reference
            };
            if !info.family.native_forward() {
                continue; // static analyses only (gpt-oss)
            }
            ForwardConfig::from_config(&config, &info)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn attention_heads_are_validated() {
        assert_key_error(
            forward("mixtral", set("num_attention_heads", 0)),
            "num_attention_heads",
            &["is 0"],
        );
        assert_key_error(
            forward("mixtral", set("num_key_value_heads", 0)),
            "num_key_value_heads",
            &["is 0"],
        );
        assert_key_error(
            forward("mixtral", set("num_key_value_heads", 3)),
            "num_key_value_heads",
            &["is 3", "divide"],
        );
        assert_key_error(
            forward("mixtral", set("num_key_value_heads", 8)),
            "num_key_value_heads",
            &["is 8"],
        );
        assert_key_error(
            forward("mixtral", set("num_attention_heads", 64)),
            "num_attention_heads",
            &["is 64", "head dimension would be 0"],
        );
        assert_key_error(
            forward("mixtral", set("num_attention_heads", 1u64 << 40)),
            "num_attention_heads",
            &["is 1099511627776"],
        );
        assert_key_error(
            forward("deepseek-v3", set("num_attention_heads", 0)),
            "num_attention_heads",
            &["is 0"],
        );
    }

    #[test]
    fn head_dimensions_are_validated() {
        for v in [0u64, 1 << 40, u64::MAX, 7] {
            assert_key_error(
                forward("qwen3-moe", set("head_dim", v)),
                "head_dim",
                &[&format!("is {v}")],
            );
        }
        // 4 heads × 4096 is within the limits.
        assert!(forward("qwen3-moe", set("head_dim", 4096)).is_ok());
        for v in [0u64, 1 << 40, 3] {
            assert_key_error(
                forward("deepseek-v3", set("qk_rope_head_dim", v)),
                "qk_rope_head_dim",
                &[&format!("is {v}")],
            );
        }
        assert_key_error(
            forward("deepseek-v2", set("v_head_dim", 0)),
            "v_head_dim",
            &["is 0"],
        );
        assert_key_error(
            forward("deepseek-v2", set("kv_lora_rank", 1u64 << 40)),
            "kv_lora_rank",
            &["is 1099511627776"],
        );
        assert_key_error(
            forward("deepseek-v2", set("qk_nope_head_dim", 1u64 << 40)),
            "qk_nope_head_dim",
            &["is 1099511627776"],
        );
        assert_key_error(
            forward("mixtral", set("vocab_size", 0)),
            "vocab_size",
            &["is 0"],
        );
    }

    #[test]
    fn numbers_are_validated() {
        for v in [0.0, -1.0] {
            assert_key_error(
                forward("mixtral", set("rope_theta", v)),
                "rope_theta",
                &[&format!("is {v}")],
            );
            assert_key_error(
                forward("deepseek-v3", |c| {
                    c.insert(
                        "rope_parameters".into(),
                        serde_json::json!({"rope_theta": v}),
                    );
                }),
                "rope_parameters.rope_theta",
                &["positive"],
            );
            assert_key_error(
                forward("deepseek-v3", set("routed_scaling_factor", v)),
                "routed_scaling_factor",
                &["positive"],
            );
            assert_key_error(
                forward("grok-1", set("max_attn_value", v)),
                "max_attn_value",
                &["positive"],
            );
        }
        for v in [-1e-6, 2.0] {
            assert_key_error(
                forward("olmoe", set("rms_norm_eps", v)),
                "rms_norm_eps",
                &[&format!("is {v}")],
            );
        }
        assert!(forward("olmoe", set("rms_norm_eps", 0.0)).is_ok());
        // A rope type the shared rope does not compute is refused, never
        // silently replaced by the default rope.
        let scaling = |ty: &str| {
            set(
                "rope_scaling",
                serde_json::json!({"type": ty, "factor": 4.0, "original_max_position_embeddings": 16}),
            )
        };
        let no_params = |c: &mut Map<String, Value>| {
            c.remove("rope_parameters");
        };
        for (name, ty) in [
            ("mixtral", "yarn"),
            ("qwen3-moe", "dynamic"),
            ("deepseek-v3", "longrope"),
        ] {
            assert_key_error(
                forward(name, |c| {
                    no_params(c);
                    scaling(ty)(c)
                }),
                "rope_scaling.type",
                &[ty],
            );
        }
        // YaRN on the MLA families: the released DeepSeek-V3 form.
        let cfg = forward("deepseek-v3", |c| {
            no_params(c);
            c.insert("rope_theta".into(), 10000.0.into());
            scaling("yarn")(c);
            c["rope_scaling"]["mscale_all_dim"] = 1.0.into();
        })
        .unwrap();
        let (inv, _) = cfg.rope_yarn.expect("yarn frequencies");
        assert_eq!(inv.len(), 2);
        let m = 0.1 * 4f64.ln() + 1.0;
        assert!((cfg.mla_softmax_factor - m * m).abs() < 1e-12);
        assert_key_error(
            forward("deepseek-v3", |c| {
                no_params(c);
                c.insert("rope_scaling".into(), serde_json::json!({"type": "yarn"}));
            }),
            "rope_scaling.factor",
            &["positive factor"],
        );
        assert_key_error(
            forward("deepseek-v3", set("topk_group", 0)),
            "topk_group",
            &["is 0"],
        );
    }
}
