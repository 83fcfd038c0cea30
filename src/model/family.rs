//! Family adapters: map each family's config keys and hub tensor names onto
//! one view (SPEC §4). Nothing outside this file knows a tensor name.

use crate::error::{Error, Result};
use crate::model::config::Config;

/// The supported MoE model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Mixtral,
    DeepSeekMoe,
    Grok1,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepSeekV2,
    DeepSeekV3,
}

/// One row of `cargo moe-inspect models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FamilyDescription {
    pub family: &'static str,
    pub model_type: &'static str,
    pub examples: &'static str,
    pub layout: &'static str,
    pub shared_experts: bool,
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
    pub family: Family,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_experts: usize,
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
    pub fn from_config(config: &Config) -> Result<ModelInfo> {
        let family = Family::detect(config)?;
        let path = config.path();
        let num_layers = config.usize("num_hidden_layers")?;
        let hidden_size = config.usize("hidden_size")?;
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
        let top_k = config.usize("num_experts_per_tok")?;
        if top_k == 0 || top_k > num_experts {
            return Err(Error::key(
                path,
                "num_experts_per_tok",
                format!("is {top_k}, must be between 1 and the number of experts ({num_experts})"),
            ));
        }
        let intermediate = config.usize_opt("intermediate_size")?;
        let expert_intermediate = match family {
            Family::Mixtral | Family::Grok1 | Family::Olmoe => config.usize("intermediate_size")?,
            _ => config.usize("moe_intermediate_size")?,
        };
        let shared_intermediate = match family {
            Family::Qwen2Moe => config
                .usize_opt("shared_expert_intermediate_size")?
                .unwrap_or(0),
            Family::DeepSeekMoe | Family::DeepSeekV2 | Family::DeepSeekV3 => {
                config.usize_opt("n_shared_experts")?.unwrap_or(0) * expert_intermediate
            }
            _ => 0,
        };

        let is_moe: Box<dyn Fn(usize) -> bool> = match family {
            Family::Mixtral | Family::Grok1 | Family::Olmoe => Box::new(|_| true),
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let only = config.usize_list("mlp_only_layers")?;
                let step = config.usize_opt("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(Error::key(
                        path,
                        "decoder_sparse_step",
                        "must be at least 1",
                    ));
                }
                Box::new(move |l| !only.contains(&l) && (l + 1) % step == 0)
            }
            Family::DeepSeekMoe | Family::DeepSeekV2 | Family::DeepSeekV3 => {
                let first = config.usize_opt("first_k_dense_replace")?.unwrap_or(0);
                let freq = config.usize_opt("moe_layer_freq")?.unwrap_or(1);
                if freq == 0 {
                    return Err(Error::key(path, "moe_layer_freq", "must be at least 1"));
                }
                Box::new(move |l| l >= first && l % freq == 0)
            }
        };
        let (moe_layers, dense_layers): (Vec<usize>, Vec<usize>) =
            (0..num_layers).partition(|&l| is_moe(l));
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

/// Geometry of a dense reference model (Mistral, Llama, Qwen2...): its FFN is
/// compared with the experts as the extra `F` row/column.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseInfo {
    pub model_type: String,
    pub num_layers: usize,
    pub hidden_size: usize,
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
            num_layers: config.usize("num_hidden_layers")?,
            hidden_size: config.usize("hidden_size")?,
            intermediate_size: config.usize("intermediate_size")?,
        })
    }
}
