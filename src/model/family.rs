//! Family adapters: map each family's config keys and hub tensor names onto
//! one view (SPEC §4). Nothing outside this file knows a tensor name.

use crate::error::{Error, Result};
use crate::model::config::{limits, Config};

/// The supported MoE model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Mixtral (`mixtral`).
    Mixtral,
    /// DeepSeekMoE (`deepseek`).
    DeepSeekMoe,
    /// Grok-1 (`grok-1`).
    Grok1,
    /// Qwen2-MoE / Qwen1.5-MoE (`qwen2_moe`).
    Qwen2Moe,
    /// Qwen3-MoE (`qwen3_moe`).
    Qwen3Moe,
    /// OLMoE (`olmoe`).
    Olmoe,
    /// DeepSeek-V2 (`deepseek_v2`).
    DeepSeekV2,
    /// DeepSeek-V3 (`deepseek_v3`).
    DeepSeekV3,
}

/// One row of `cargo moe-inspect models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FamilyDescription {
    /// Family id.
    pub family: &'static str,
    /// The `model_type` of its config.json.
    pub model_type: &'static str,
    /// Example checkpoints.
    pub examples: &'static str,
    /// Tensor naming layout of the experts.
    pub layout: &'static str,
    /// Whether it has shared experts.
    pub shared_experts: bool,
    /// Which layers are dense rather than MoE.
    pub dense_layers: &'static str,
}

impl Family {
    /// All families, in the order `models` lists them.
    pub const ALL: [Family; 8] = [
        Family::Mixtral,
        Family::DeepSeekMoe,
        Family::Grok1,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Olmoe,
        Family::DeepSeekV2,
        Family::DeepSeekV3,
    ];

    /// Stable identifier used in reports (the config `model_type`).
    pub fn id(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::DeepSeekMoe => "deepseek",
            Family::Grok1 => "grok-1",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::DeepSeekV2 => "deepseek_v2",
            Family::DeepSeekV3 => "deepseek_v3",
        }
    }

    /// What `models` prints about the family.
    pub fn describe(self) -> FamilyDescription {
        let (examples, layout, dense) = match self {
            Family::Mixtral => (
                "Mixtral-8x7B, Mixtral-8x22B",
                "block_sparse_moe.gate, experts.{e}.w1/w3/w2",
                "none",
            ),
            Family::DeepSeekMoe => (
                "deepseek-moe-16b",
                "mlp.gate, mlp.experts.{e}.*_proj, mlp.shared_experts",
                "first_k_dense_replace, moe_layer_freq",
            ),
            Family::Grok1 => (
                "Grok-1 (hpcai-tech)",
                "moe_block.gate, experts.{e}.linear/linear_v/linear_1",
                "none",
            ),
            Family::Qwen2Moe => (
                "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
                "mlp.gate, mlp.experts.{e}.*_proj, mlp.shared_expert(+_gate)",
                "mlp_only_layers, decoder_sparse_step",
            ),
            Family::Qwen3Moe => (
                "Qwen3-30B-A3B, Qwen3-235B-A22B",
                "mlp.gate, mlp.experts.{e}.*_proj",
                "mlp_only_layers, decoder_sparse_step",
            ),
            Family::Olmoe => ("OLMoE-1B-7B", "mlp.gate, mlp.experts.{e}.*_proj", "none"),
            Family::DeepSeekV2 => (
                "DeepSeek-V2, DeepSeek-V2-Lite",
                "mlp.gate, mlp.experts.{e}.*_proj, mlp.shared_experts",
                "first_k_dense_replace, moe_layer_freq",
            ),
            Family::DeepSeekV3 => (
                "DeepSeek-V3, DeepSeek-R1",
                "mlp.gate(+e_score_correction_bias), mlp.experts.{e}.*_proj, mlp.shared_experts",
                "first_k_dense_replace, moe_layer_freq",
            ),
        };
        FamilyDescription {
            family: self.id(),
            model_type: self.id(),
            examples,
            layout,
            shared_experts: self.has_shared(),
            dense_layers: dense,
        }
    }

    /// Detects the family from `model_type`, or from `architectures` when a
    /// release has no `model_type` (hpcai-tech's Grok-1).
    pub fn detect(config: &Config) -> Result<Family> {
        let supported = || {
            Family::ALL
                .iter()
                .map(|f| f.id())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(mt) = config.str("model_type")? {
            return Family::from_model_type(mt).ok_or_else(|| Error::UnknownFamily {
                path: config.path().to_path_buf(),
                found: mt.to_string(),
                supported: supported(),
            });
        }
        let arch = config.architecture().unwrap_or("");
        let family = match arch {
            "MixtralForCausalLM" => Some(Family::Mixtral),
            "DeepseekForCausalLM" => Some(Family::DeepSeekMoe),
            "Grok1ModelForCausalLM" | "Grok1ForCausalLM" => Some(Family::Grok1),
            "Qwen2MoeForCausalLM" => Some(Family::Qwen2Moe),
            "Qwen3MoeForCausalLM" => Some(Family::Qwen3Moe),
            "OlmoeForCausalLM" => Some(Family::Olmoe),
            "DeepseekV2ForCausalLM" => Some(Family::DeepSeekV2),
            "DeepseekV3ForCausalLM" => Some(Family::DeepSeekV3),
            _ => None,
        };
        family.ok_or_else(|| Error::UnknownFamily {
            path: config.path().to_path_buf(),
            found: if arch.is_empty() {
                "(no model_type or architectures)".to_string()
            } else {
                arch.to_string()
            },
            supported: supported(),
        })
    }

    /// Maps a config `model_type` onto a family.
    pub fn from_model_type(mt: &str) -> Option<Family> {
        Some(match mt {
            "mixtral" => Family::Mixtral,
            "deepseek" => Family::DeepSeekMoe,
            "grok-1" | "grok1" | "grok" => Family::Grok1,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "olmoe" => Family::Olmoe,
            "deepseek_v2" => Family::DeepSeekV2,
            "deepseek_v3" => Family::DeepSeekV3,
            _ => return None,
        })
    }

    fn has_shared(self) -> bool {
        matches!(
            self,
            Family::DeepSeekMoe | Family::Qwen2Moe | Family::DeepSeekV2 | Family::DeepSeekV3
        )
    }

    /// Tensor name of the router matrix `[E, hidden]` of a layer.
    pub fn router_name(self, layer: usize) -> String {
        match self {
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe.gate.weight"),
            Family::Grok1 => format!("model.layers.{layer}.moe_block.gate.weight"),
            _ => format!("model.layers.{layer}.mlp.gate.weight"),
        }
    }

    /// Tensor names `[gate, up, down]` of routed expert `e` in a layer.
    pub fn expert_names(self, layer: usize, e: usize) -> [String; 3] {
        match self {
            Family::Mixtral => {
                let p = format!("model.layers.{layer}.block_sparse_moe.experts.{e}");
                [
                    format!("{p}.w1.weight"),
                    format!("{p}.w3.weight"),
                    format!("{p}.w2.weight"),
                ]
            }
            Family::Grok1 => {
                let p = format!("model.layers.{layer}.moe_block.experts.{e}");
                [
                    format!("{p}.linear.weight"),
                    format!("{p}.linear_v.weight"),
                    format!("{p}.linear_1.weight"),
                ]
            }
            _ => swiglu_names(&format!("model.layers.{layer}.mlp.experts.{e}")),
        }
    }

    /// Tensor names `[gate, up, down]` of the shared expert(s) of a layer, if the family has them.
    pub fn shared_names(self, layer: usize) -> Option<[String; 3]> {
        match self {
            Family::Qwen2Moe => Some(swiglu_names(&format!(
                "model.layers.{layer}.mlp.shared_expert"
            ))),
            Family::DeepSeekMoe | Family::DeepSeekV2 | Family::DeepSeekV3 => Some(swiglu_names(
                &format!("model.layers.{layer}.mlp.shared_experts"),
            )),
            _ => None,
        }
    }

    /// Tensor names `[gate, up, down]` of a dense (non-MoE) layer's MLP.
    pub fn dense_names(self, layer: usize) -> [String; 3] {
        swiglu_names(&format!("model.layers.{layer}.mlp"))
    }
}

/// The layer index of a per-layer tensor name (`model.layers.{i}.…`).
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    let (index, _) = rest.split_once('.')?;
    index.parse().ok()
}

/// `{prefix}.gate_proj.weight`, `up_proj`, `down_proj`.
pub(crate) fn swiglu_names(prefix: &str) -> [String; 3] {
    [
        format!("{prefix}.gate_proj.weight"),
        format!("{prefix}.up_proj.weight"),
        format!("{prefix}.down_proj.weight"),
    ]
}

/// The geometry of a model as the analyses see it, derived from config.json alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The model family.
    pub family: Family,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Width of one routed expert (rows of `gate`/`up`).
    pub expert_intermediate: usize,
    /// Width of the dense MLP of non-MoE layers, if the model has any.
    pub dense_intermediate: Option<usize>,
    /// Width of the shared expert(s) (0 when none).
    pub shared_intermediate: usize,
    /// Layer indices with an MoE block, ascending.
    pub moe_layers: Vec<usize>,
    /// Layer indices with a dense MLP, ascending.
    pub dense_layers: Vec<usize>,
}

impl ModelInfo {
    /// Reads the geometry from a config; accepts released and transformers-5 spellings.
    /// Sizes are bounded by [`limits`], products are checked, DeepSeek's group
    /// routing settings must be consistent, and at least one layer must be MoE.
    pub fn from_config(config: &Config) -> Result<ModelInfo> {
        let family = Family::detect(config)?;
        let path = config.path();
        let num_layers = config.usize_in("num_hidden_layers", 0, limits::LAYERS)?;
        let hidden_size = config.usize_in("hidden_size", 1, limits::WIDTH)?;
        let experts_keys: &[&str] = match family {
            Family::Mixtral => &["num_local_experts", "num_experts"],
            Family::DeepSeekMoe | Family::DeepSeekV2 | Family::DeepSeekV3 => {
                &["n_routed_experts", "num_local_experts", "num_experts"]
            }
            _ => &["num_experts", "num_local_experts"],
        };
        let num_experts = config.usize_any_req(experts_keys)?;
        if num_experts == 0 {
            return Err(Error::key(path, experts_keys[0], "is 0: not an MoE model"));
        }
        let experts_key = experts_keys
            .iter()
            .find(|k| config.get(k).is_some())
            .unwrap_or(&experts_keys[0]);
        config.check_range(experts_key, num_experts, 1, limits::EXPERTS)?;
        let top_k = config.usize("num_experts_per_tok")?;
        if top_k == 0 || top_k > num_experts {
            return Err(Error::key(
                path,
                "num_experts_per_tok",
                format!("is {top_k}, must be between 1 and the number of experts ({num_experts})"),
            ));
        }
        let intermediate = config.usize_opt_in("intermediate_size", 1, limits::WIDTH)?;
        let expert_intermediate = match family {
            Family::Mixtral | Family::Grok1 | Family::Olmoe => {
                config.usize_in("intermediate_size", 1, limits::WIDTH)?
            }
            _ => config.usize_in("moe_intermediate_size", 1, limits::WIDTH)?,
        };
        let shared_intermediate = match family {
            Family::Qwen2Moe => config
                .usize_opt_in("shared_expert_intermediate_size", 0, limits::WIDTH)?
                .unwrap_or(0),
            Family::DeepSeekMoe | Family::DeepSeekV2 | Family::DeepSeekV3 => {
                let n = config
                    .usize_opt_in("n_shared_experts", 0, limits::EXPERTS)?
                    .unwrap_or(0);
                n.checked_mul(expert_intermediate)
                    .filter(|&w| w <= limits::WIDTH)
                    .ok_or_else(|| {
                        Error::key(
                            path,
                            "n_shared_experts",
                            format!(
                                "is {n}: {n} shared experts × moe_intermediate_size \
                                 {expert_intermediate} exceeds the limit of {} for one block",
                                limits::WIDTH
                            ),
                        )
                    })?
            }
            _ => 0,
        };
        if matches!(family, Family::DeepSeekV2 | Family::DeepSeekV3) {
            check_groups(config, family, num_experts, top_k)?;
        }

        // Which layers are MoE, and which key made the others dense (for the
        // error when none is left).
        let (moe_layers, dense_layers, dense_key): (Vec<usize>, Vec<usize>, &str) = match family {
            Family::Mixtral | Family::Grok1 | Family::Olmoe => {
                ((0..num_layers).collect(), Vec::new(), "num_hidden_layers")
            }
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let only: std::collections::BTreeSet<usize> =
                    config.usize_list("mlp_only_layers")?.into_iter().collect();
                let step = config.usize_opt("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(Error::key(
                        path,
                        "decoder_sparse_step",
                        "must be at least 1",
                    ));
                }
                let (moe, dense) =
                    (0..num_layers).partition(|l| !only.contains(l) && (l + 1) % step == 0);
                let key = if (0..num_layers).all(|l| only.contains(&l)) {
                    "mlp_only_layers"
                } else {
                    "decoder_sparse_step"
                };
                (moe, dense, key)
            }
            Family::DeepSeekMoe | Family::DeepSeekV2 | Family::DeepSeekV3 => {
                let first = config.usize_opt("first_k_dense_replace")?.unwrap_or(0);
                let freq = config.usize_opt("moe_layer_freq")?.unwrap_or(1);
                if freq == 0 {
                    return Err(Error::key(path, "moe_layer_freq", "must be at least 1"));
                }
                let (moe, dense) = (0..num_layers).partition(|&l| l >= first && l % freq == 0);
                let key = if first >= num_layers {
                    "first_k_dense_replace"
                } else {
                    "moe_layer_freq"
                };
                (moe, dense, key)
            }
        };
        if moe_layers.is_empty() {
            let key = if num_layers == 0 {
                "num_hidden_layers"
            } else {
                dense_key
            };
            let value = config
                .get(key)
                .map_or_else(|| "absent".to_string(), short_value);
            return Err(Error::key(
                path,
                key,
                format!(
                    "is {value}: no MoE layer among the {num_layers} layers (num_hidden_layers); \
                     there is nothing to analyse"
                ),
            ));
        }
        let dense_intermediate = if dense_layers.is_empty() {
            None
        } else {
            Some(intermediate.ok_or_else(|| {
                Error::key(
                    path,
                    "intermediate_size",
                    "missing (needed for the dense layers)",
                )
            })?)
        };
        Ok(ModelInfo {
            family,
            num_layers,
            hidden_size,
            num_experts,
            top_k,
            expert_intermediate,
            dense_intermediate,
            shared_intermediate,
            moe_layers,
            dense_layers,
        })
    }
}

/// DeepSeek-V2/V3 group-limited routing: `n_group` groups of `E / n_group`
/// experts, of which the best `topk_group` stay eligible; those must hold at
/// least `top_k` experts. V3 always routes by groups; V2 only with
/// `topk_method: group_limited_greedy` (the keys are still checked when given).
fn check_groups(config: &Config, family: Family, experts: usize, top_k: usize) -> Result<()> {
    let path = config.path();
    let n_group = config.usize_opt("n_group")?.unwrap_or(1);
    if n_group == 0 || n_group > experts || !experts.is_multiple_of(n_group) {
        return Err(Error::key(
            path,
            "n_group",
            format!(
                "is {n_group}, must be at least 1 and divide the {experts} routed experts (n_routed_experts)"
            ),
        ));
    }
    let topk_group = config.usize_opt("topk_group")?.unwrap_or(n_group);
    if topk_group == 0 || topk_group > n_group {
        return Err(Error::key(
            path,
            "topk_group",
            format!("is {topk_group}, must be between 1 and n_group ({n_group})"),
        ));
    }
    let grouped =
        family == Family::DeepSeekV3 || config.str("topk_method")? == Some("group_limited_greedy");
    let eligible = topk_group * (experts / n_group);
    if grouped && eligible < top_k {
        return Err(Error::key(
            path,
            "topk_group",
            format!(
                "is {topk_group}: {topk_group} of {n_group} groups hold {eligible} experts, \
                 fewer than num_experts_per_tok ({top_k})"
            ),
        ));
    }
    Ok(())
}

fn short_value(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Geometry of a dense reference model (Mistral, Llama, Qwen2...): its FFN is
/// compared with the experts as the extra `F` row/column.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseInfo {
    /// The `model_type` of its config.json.
    pub model_type: String,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
}

impl DenseInfo {
    /// Reads a dense model's geometry; rejects MoE configs.
    pub fn from_config(config: &Config) -> Result<DenseInfo> {
        let model_type = config.str("model_type")?.unwrap_or("").to_string();
        if Family::from_model_type(&model_type).is_some() {
            return Err(Error::key(
                config.path(),
                "model_type",
                format!("`{model_type}` is an MoE family; --dense-reference needs a dense model (e.g. Mistral-7B for Mixtral)"),
            ));
        }
        Ok(DenseInfo {
            model_type,
            num_layers: config.usize_in("num_hidden_layers", 1, limits::LAYERS)?,
            hidden_size: config.usize_in("hidden_size", 1, limits::WIDTH)?,
            intermediate_size: config.usize_in("intermediate_size", 1, limits::WIDTH)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The DeepSeek-V3 fixture's config (8 experts, top 2, 4 groups, 2 kept, 3 layers), edited.
    fn v3(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Result<ModelInfo> {
        let text = include_str!("../../fixtures/deepseek-v3/config.json");
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        edit(v.as_object_mut().unwrap());
        let config = Config::parse(Path::new("m/config.json"), v.to_string().as_bytes())?;
        ModelInfo::from_config(&config)
    }

    /// The error names config.json, the key and every needle.
    fn assert_key_error(r: Result<ModelInfo>, key: &str, needles: &[&str]) {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains(&format!("`{key}`")),
            "{e}"
        );
        for n in needles {
            assert!(e.contains(n), "`{n}` not in {e}");
        }
    }

    #[test]
    fn deepseek_group_routing_is_validated() {
        assert!(v3(|_| {}).is_ok());
        assert_key_error(
            v3(|c| {
                c.insert("topk_group".into(), 0.into());
            }),
            "topk_group",
            &["is 0"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("topk_group".into(), 5.into());
            }),
            "topk_group",
            &["is 5", "n_group (4)"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("n_group".into(), 3.into());
            }),
            "n_group",
            &["is 3", "divide"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("n_group".into(), 0.into());
            }),
            "n_group",
            &["is 0"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("n_group".into(), 16.into());
            }),
            "n_group",
            &["is 16"],
        );
        // 1 group of 2 experts cannot supply 3 experts per token.
        assert_key_error(
            v3(|c| {
                c.insert("topk_group".into(), 1.into());
                c.insert("num_experts_per_tok".into(), 3.into());
            }),
            "topk_group",
            &["2 experts", "num_experts_per_tok (3)"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("num_experts_per_tok".into(), 9.into());
            }),
            "num_experts_per_tok",
            &["is 9"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("num_experts_per_tok".into(), 0.into());
            }),
            "num_experts_per_tok",
            &["is 0"],
        );
    }

    #[test]
    fn shared_expert_width_cannot_wrap() {
        // 2^60 shared experts × 48 wraps to 0 in u64 arithmetic.
        for n in [1u64 << 60, 1 << 20, u64::MAX] {
            assert_key_error(
                v3(|c| {
                    c.insert("n_shared_experts".into(), n.into());
                }),
                "n_shared_experts",
                &[&format!("is {n}")],
            );
        }
        assert_eq!(
            v3(|c| {
                c.insert("n_shared_experts".into(), 2.into());
            })
            .unwrap()
            .shared_intermediate,
            96
        );
    }

    #[test]
    fn sizes_are_bounded() {
        for (key, v) in [
            ("num_hidden_layers", 10_000_000_000u64),
            ("hidden_size", 1 << 40),
            ("hidden_size", 0),
            ("moe_intermediate_size", u64::MAX),
            ("n_routed_experts", 1 << 40),
        ] {
            assert_key_error(
                v3(|c| {
                    c.insert(key.into(), v.into());
                }),
                key,
                &[&format!("is {v}")],
            );
        }
    }

    #[test]
    fn a_layout_without_moe_layers_is_an_error() {
        assert_key_error(
            v3(|c| {
                c.insert("first_k_dense_replace".into(), 3.into());
            }),
            "first_k_dense_replace",
            &["is 3", "no MoE layer"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("moe_layer_freq".into(), 7.into());
            }),
            "moe_layer_freq",
            &["is 7", "no MoE layer"],
        );
        assert_key_error(
            v3(|c| {
                c.insert("num_hidden_layers".into(), 0.into());
            }),
            "num_hidden_layers",
            &["no MoE layer"],
        );
        let qwen = |only: &str, step: usize| {
            let text = format!(
                r#"{{"model_type": "qwen3_moe", "num_hidden_layers": 3, "hidden_size": 8,
                    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
                    "intermediate_size": 16, "mlp_only_layers": {only}, "decoder_sparse_step": {step}}}"#
            );
            ModelInfo::from_config(&Config::parse(Path::new("m/config.json"), text.as_bytes())?)
        };
        assert_eq!(qwen("[0, 2]", 1).unwrap().moe_layers, vec![1]);
        assert_key_error(
            qwen("[0, 1, 2]", 1),
            "mlp_only_layers",
            &["[0,1,2]", "no MoE layer"],
        );
        assert_key_error(
            qwen("[]", 4),
            "decoder_sparse_step",
            &["is 4", "no MoE layer"],
        );
    }

    #[test]
    fn layer_of_reads_the_index() {
        assert_eq!(layer_of("model.layers.12.mlp.gate.weight"), Some(12));
        assert_eq!(layer_of("model.layers.x.mlp"), None);
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
    }
}
