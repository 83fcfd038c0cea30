//! The family table: every MoE family's config keys and hub tensor names, as
//! data (SPEC §4). Nothing outside this file knows a tensor name; a checkpoint
//! of a family the table does not know is read through [`crate::model::infer`].

use crate::error::{Error, Result};
use crate::model::config::{limits, Config};

/// A model family: a handle into [`FAMILIES`]. It is `Copy` and compares by
/// identity; the families with a native forward pass have named constants
/// (`Family::Mixtral`...), which `match` accepts as patterns.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Family(u8);

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.spec().name)
    }
}

/// How a family's routed experts are stored per layer, one tensor per expert
/// and matrix: `{prefix}.{e}.{mats[k]}.weight` for gate, up, down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerExpert {
    /// Name of the expert list under the layer (`mlp.experts`).
    pub prefix: &'static str,
    /// Module names of gate, up and down (`gate_proj`, `up_proj`, `down_proj`).
    pub mats: [&'static str; 3],
}

/// How the two stacked tensors of a fused-expert layout hold each expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedKind {
    /// transformers 5 (`integrations/moe.py`): `gate_up [E, 2I, H]`, gate in
    /// rows `0..I`, up in rows `I..2I`; `down [E, H, I]`.
    GateUpRows,
    /// gpt-oss: `gate_up [E, H, 2I]` input-major, gate in the even columns,
    /// up in the odd ones; `down [E, I, H]`; both with biases.
    InterleavedColumns,
    /// Llama 4: `gate_up [E, H, 2I]` input-major, gate in columns `0..I`,
    /// up in `I..2I`; `down [E, I, H]`.
    ConcatColumns,
    /// DBRX: gate (`w1`), up (`v1`, this tensor under the layer) and down
    /// (`w2`) each `[E·I, H]`, expert `e` in rows `e·I..(e+1)·I`; the down
    /// rows are the down matrix transposed (`x · w2[e]`, not `x · w2[e]ᵀ`).
    RowStacks {
        /// The stacked up tensor under the layer.
        up: &'static str,
    },
}

/// A fused-expert layout: the router and the two stacked expert tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fused {
    /// Router weight under the layer (`mlp.gate.weight`).
    pub router: &'static str,
    /// Stacked gate/up tensor under the layer.
    pub gate_up: &'static str,
    /// Stacked down tensor under the layer.
    pub down: &'static str,
    /// How the experts lie in them.
    pub kind: FusedKind,
}

/// The transformers-5 fused layout of the `mlp.experts` families.
const FUSED_MLP: Fused = Fused {
    router: "mlp.gate.weight",
    gate_up: "mlp.experts.gate_up_proj",
    down: "mlp.experts.down_proj",
    kind: FusedKind::GateUpRows,
};

/// How the width of the shared expert(s) follows from config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// No shared experts.
    None,
    /// One shared block whose width is this key (Qwen2-MoE).
    Width(&'static str),
    /// This many shared experts (key), each of the routed experts' width, fused into one block.
    Count(&'static str),
    /// One shared expert of the routed experts' width (Llama 4, Hunyuan).
    One,
}

/// Which layers hold an MoE block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRule {
    /// Every layer.
    All,
    /// Qwen: not in `mlp_only_layers`, and `(l + 1) % decoder_sparse_step == 0`.
    QwenSparse,
    /// DeepSeek: `l >= first_k_dense_replace` and `l % moe_layer_freq == 0`.
    FirstKDense,
    /// Llama 4: the `moe_layers` list, else every `interleave_moe_layer_step`-th layer.
    Interleaved,
    /// ERNIE 4.5: `moe_layer_start_index..=moe_layer_end_index`, every `moe_layer_interval`-th.
    StartEnd,
}

/// The expert activation (between `gate·x` and the product with `up·x`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// exact (erf) GELU (Grok-1's GeGLU).
    Gelu,
    /// gpt-oss: clamped SwiGLU, `(up + 1) · gate · sigmoid(alpha · gate)`.
    ClampedSwiglu,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::ClampedSwiglu => "clamped swiglu (alpha, limit, up + 1)",
        }
    }
}

/// Group-limited routing settings to validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Groups {
    /// None.
    None,
    /// `n_group`/`topk_group` always route (DeepSeek-V3, GLM-4.5).
    Always,
    /// Only with `topk_method: group_limited_greedy` (DeepSeek-V2).
    WhenGreedy,
}

/// One row of the family table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FamilySpec {
    /// Stable id used in reports (the main `model_type`).
    pub id: &'static str,
    /// Name for `Debug`.
    pub name: &'static str,
    /// `model_type` values of config.json that are this family (text and multimodal).
    pub model_types: &'static [&'static str],
    /// `architectures` classes that are this family when `model_type` is unknown or absent.
    pub architectures: &'static [&'static str],
    /// Example checkpoints.
    pub examples: &'static str,
    /// Keys of the routed expert count, first present wins.
    pub experts_keys: &'static [&'static str],
    /// Keys of experts per token.
    pub top_k_keys: &'static [&'static str],
    /// Keys of the routed expert width.
    pub width_keys: &'static [&'static str],
    /// Key of the dense MLP width of non-MoE layers.
    pub dense_width_key: &'static str,
    /// Key of the number of decoder layers (`num_hidden_layers`; DBRX `n_layers`).
    pub layers_key: &'static str,
    /// Key of the hidden size (`hidden_size`; DBRX `d_model`).
    pub hidden_key: &'static str,
    /// Key of the number of zero-computation (identity) experts routed beside
    /// the FFN experts (LongCat-Flash `zero_expert_num`): the router has that
    /// many extra rows, after the routed experts'.
    pub zero_experts_key: Option<&'static str>,
    /// Shared experts.
    pub shared: Shared,
    /// Which layers are MoE.
    pub layers: LayerRule,
    /// Router weight under the layer, per-expert layout.
    pub router: &'static str,
    /// Per-expert layout, if the family has one.
    pub per_expert: Option<PerExpert>,
    /// Fused layouts (the family's own, and the one transformers 5 writes).
    pub fused: &'static [Fused],
    /// Shared expert module under the layer (`mlp.shared_experts`).
    pub shared_prefix: Option<&'static str>,
    /// Dense MLP module under the layer.
    pub dense_prefix: &'static str,
    /// The `[1, H]` sigmoid gate of the shared expert under the layer (Qwen2-MoE, Qwen3-Next).
    pub shared_gate: Option<&'static str>,
    /// The routing-correction bias `[E]` under the layer (DeepSeek-V3, GLM-4.5, MiniMax-M2, ERNIE 4.5).
    pub correction_bias: Option<&'static str>,
    /// The expert activation.
    pub activation: Activation,
    /// How router logits become selected experts and weights, in words.
    pub router_rule: &'static str,
    /// Group routing settings to validate.
    pub groups: Groups,
    /// Whether the forward pass (observer, trace, dynamic analyses) is native.
    pub native_forward: bool,
    /// Which layers are dense, in words (for `models`).
    pub dense_from: &'static str,
}

const STD: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
const W132: [&str; 3] = ["w1", "w3", "w2"];
const MLP_EXPERTS: PerExpert = PerExpert {
    prefix: "mlp.experts",
    mats: STD,
};
const BSM_EXPERTS: PerExpert = PerExpert {
    prefix: "block_sparse_moe.experts",
    mats: W132,
};
const E_LOCAL: &[&str] = &["num_local_experts", "num_experts"];
const E_NUM: &[&str] = &["num_experts", "num_local_experts"];
const E_ROUTED: &[&str] = &["n_routed_experts", "num_local_experts", "num_experts"];
const TOPK: &[&str] = &["num_experts_per_tok"];
const W_INTER: &[&str] = &["intermediate_size"];
const W_MOE: &[&str] = &["moe_intermediate_size"];

/// A table row with the common defaults (transformers-5 `mlp.experts` layout).
const BASE: FamilySpec = FamilySpec {
    id: "",
    name: "",
    model_types: &[],
    architectures: &[],
    examples: "",
    experts_keys: E_NUM,
    top_k_keys: TOPK,
    width_keys: W_MOE,
    dense_width_key: "intermediate_size",
    layers_key: "num_hidden_layers",
    hidden_key: "hidden_size",
    zero_experts_key: None,
    shared: Shared::None,
    layers: LayerRule::All,
    router: "mlp.gate.weight",
    per_expert: Some(MLP_EXPERTS),
    fused: &[FUSED_MLP],
    shared_prefix: None,
    dense_prefix: "mlp",
    shared_gate: None,
    correction_bias: None,
    activation: Activation::Silu,
    router_rule: "softmax, top-k",
    groups: Groups::None,
    native_forward: false,
    dense_from: "none",
};

/// The family table, in the order `models` lists it. The first eight have a
/// native forward pass and keep their indices (the named constants).
pub static FAMILIES: &[FamilySpec] = &[
    FamilySpec {
        id: "mixtral",
        name: "Mixtral",
        model_types: &["mixtral"],
        architectures: &["MixtralForCausalLM"],
        examples: "Mixtral-8x7B, Mixtral-8x22B",
        experts_keys: E_LOCAL,
        width_keys: W_INTER,
        router: "block_sparse_moe.gate.weight",
        per_expert: Some(BSM_EXPERTS),
        router_rule: "softmax, top-k, renormalised",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "deepseek",
        name: "DeepSeekMoe",
        model_types: &["deepseek"],
        architectures: &["DeepseekForCausalLM"],
        examples: "deepseek-moe-16b",
        experts_keys: E_ROUTED,
        shared: Shared::Count("n_shared_experts"),
        layers: LayerRule::FirstKDense,
        shared_prefix: Some("mlp.shared_experts"),
        router_rule: "softmax, top-k (norm_topk_prob)",
        native_forward: true,
        dense_from: "first_k_dense_replace, moe_layer_freq",
        ..BASE
    },
    FamilySpec {
        id: "grok-1",
        name: "Grok1",
        model_types: &["grok-1", "grok1", "grok"],
        architectures: &["Grok1ModelForCausalLM", "Grok1ForCausalLM"],
        examples: "Grok-1 (hpcai-tech)",
        experts_keys: E_NUM,
        width_keys: W_INTER,
        router: "moe_block.gate.weight",
        per_expert: Some(PerExpert {
            prefix: "moe_block.experts",
            mats: ["linear", "linear_v", "linear_1"],
        }),
        fused: &[],
        activation: Activation::Gelu,
        router_rule: "softmax, top-k, not renormalised",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "qwen2_moe",
        name: "Qwen2Moe",
        model_types: &["qwen2_moe"],
        architectures: &["Qwen2MoeForCausalLM"],
        examples: "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
        shared: Shared::Width("shared_expert_intermediate_size"),
        layers: LayerRule::QwenSparse,
        shared_prefix: Some("mlp.shared_expert"),
        shared_gate: Some("mlp.shared_expert_gate.weight"),
        router_rule: "softmax, top-k (norm_topk_prob); shared expert × sigmoid gate",
        native_forward: true,
        dense_from: "mlp_only_layers, decoder_sparse_step",
        ..BASE
    },
    FamilySpec {
        id: "qwen3_moe",
        name: "Qwen3Moe",
        model_types: &["qwen3_moe"],
        architectures: &["Qwen3MoeForCausalLM"],
        examples: "Qwen3-30B-A3B, Qwen3-235B-A22B",
        layers: LayerRule::QwenSparse,
        router_rule: "softmax, top-k (norm_topk_prob)",
        native_forward: true,
        dense_from: "mlp_only_layers, decoder_sparse_step",
        ..BASE
    },
    FamilySpec {
        id: "olmoe",
        name: "Olmoe",
        model_types: &["olmoe"],
        architectures: &["OlmoeForCausalLM"],
        examples: "OLMoE-1B-7B",
        width_keys: W_INTER,
        router_rule: "softmax, top-k (norm_topk_prob)",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "deepseek_v2",
        name: "DeepSeekV2",
        model_types: &["deepseek_v2"],
        architectures: &["DeepseekV2ForCausalLM"],
        examples: "DeepSeek-V2, DeepSeek-V2-Lite",
        experts_keys: E_ROUTED,
        shared: Shared::Count("n_shared_experts"),
        layers: LayerRule::FirstKDense,
        shared_prefix: Some("mlp.shared_experts"),
        router_rule: "softmax, top-k or group-limited greedy, × routed_scaling_factor",
        groups: Groups::WhenGreedy,
        native_forward: true,
        dense_from: "first_k_dense_replace, moe_layer_freq",
        ..BASE
    },
    FamilySpec {
        id: "deepseek_v3",
        name: "DeepSeekV3",
        model_types: &["deepseek_v3", "kimi_k2"],
        architectures: &["DeepseekV3ForCausalLM"],
        examples: "DeepSeek-V3, DeepSeek-R1, Kimi-K2",
        experts_keys: E_ROUTED,
        shared: Shared::Count("n_shared_experts"),
        layers: LayerRule::FirstKDense,
        shared_prefix: Some("mlp.shared_experts"),
        correction_bias: Some("mlp.gate.e_score_correction_bias"),
        router_rule: "sigmoid + e_score_correction_bias, group-limited top-k, renormalised, × routed_scaling_factor",
        groups: Groups::Always,
        native_forward: true,
        dense_from: "first_k_dense_replace, moe_layer_freq",
        ..BASE
    },
    FamilySpec {
        id: "gpt_oss",
        name: "GptOss",
        model_types: &["gpt_oss"],
        architectures: &["GptOssForCausalLM"],
        examples: "gpt-oss-20b, gpt-oss-120b",
        experts_keys: E_LOCAL,
        top_k_keys: &["num_experts_per_tok", "experts_per_token"],
        width_keys: W_INTER,
        router: "mlp.router.weight",
        per_expert: None,
        fused: &[Fused {
            router: "mlp.router.weight",
            gate_up: "mlp.experts.gate_up_proj",
            down: "mlp.experts.down_proj",
            kind: FusedKind::InterleavedColumns,
        }],
        activation: Activation::ClampedSwiglu,
        router_rule: "linear with bias, top-k on logits, softmax over the k",
        native_forward: true,
        ..BASE
    },
    // ---- static analyses only (an engine trace for the dynamic ones) ----
    FamilySpec {
        id: "glm4_moe",
        name: "Glm4Moe",
        model_types: &["glm4_moe"],
        architectures: &["Glm4MoeForCausalLM"],
        examples: "GLM-4.5, GLM-4.6, GLM-4.5-Air",
        experts_keys: E_ROUTED,
        shared: Shared::Count("n_shared_experts"),
        layers: LayerRule::FirstKDense,
        shared_prefix: Some("mlp.shared_experts"),
        correction_bias: Some("mlp.gate.e_score_correction_bias"),
        router_rule: "sigmoid + e_score_correction_bias, group-limited top-k, renormalised, × routed_scaling_factor",
        groups: Groups::Always,
        native_forward: true,
        dense_from: "first_k_dense_replace",
        ..BASE
    },
    FamilySpec {
        id: "deepseek_v32",
        name: "DeepSeekV32",
        model_types: &["deepseek_v32"],
        architectures: &["DeepseekV32ForCausalLM"],
        examples: "DeepSeek-V3.2-Exp, DeepSeek-V3.2",
        experts_keys: E_ROUTED,
        shared: Shared::Count("n_shared_experts"),
        layers: LayerRule::FirstKDense,
        shared_prefix: Some("mlp.shared_experts"),
        correction_bias: Some("mlp.gate.e_score_correction_bias"),
        router_rule: "sigmoid + e_score_correction_bias, group-limited top-k, renormalised, × routed_scaling_factor",
        groups: Groups::Always,
        native_forward: true,
        dense_from: "first_k_dense_replace, moe_layer_freq",
        ..BASE
    },
    FamilySpec {
        id: "qwen3_next",
        name: "Qwen3Next",
        model_types: &["qwen3_next"],
        architectures: &["Qwen3NextForCausalLM"],
        examples: "Qwen3-Next-80B-A3B",
        shared: Shared::Width("shared_expert_intermediate_size"),
        layers: LayerRule::QwenSparse,
        shared_prefix: Some("mlp.shared_expert"),
        shared_gate: Some("mlp.shared_expert_gate.weight"),
        router_rule: "softmax, top-k (norm_topk_prob); shared expert × sigmoid gate",
        native_forward: true,
        dense_from: "mlp_only_layers, decoder_sparse_step",
        ..BASE
    },
    FamilySpec {
        id: "qwen3_5_moe",
        name: "Qwen35Moe",
        model_types: &["qwen3_5_moe", "qwen3_5_moe_text"],
        architectures: &[
            "Qwen3_5MoeForConditionalGeneration",
            "Qwen3_5MoeForCausalLM",
        ],
        examples: "Qwen3.5-397B-A17B, Qwen3.5-35B-A3B",
        shared: Shared::Width("shared_expert_intermediate_size"),
        shared_prefix: Some("mlp.shared_expert"),
        shared_gate: Some("mlp.shared_expert_gate.weight"),
        router_rule: "softmax, top-k, renormalised; shared expert × sigmoid gate",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "minimax_m2",
        name: "MiniMaxM2",
        model_types: &["minimax_m2"],
        architectures: &["MiniMaxM2ForCausalLM"],
        examples: "MiniMax-M2, MiniMax-M2.1",
        experts_keys: E_LOCAL,
        width_keys: W_INTER,
        router: "block_sparse_moe.gate.weight",
        per_expert: Some(BSM_EXPERTS),
        correction_bias: Some("block_sparse_moe.e_score_correction_bias"),
        router_rule: "sigmoid + e_score_correction_bias, top-k, renormalised",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "phimoe",
        name: "PhiMoe",
        model_types: &["phimoe"],
        architectures: &["PhimoeForCausalLM"],
        examples: "Phi-3.5-MoE-instruct",
        experts_keys: E_LOCAL,
        width_keys: W_INTER,
        router: "block_sparse_moe.gate.weight",
        per_expert: Some(BSM_EXPERTS),
        fused: &[Fused {
            router: "mlp.router.weight",
            ..FUSED_MLP
        }],
        router_rule: "sparsemixer (top-2 by masked softmax)",
        ..BASE
    },
    FamilySpec {
        id: "llama4",
        name: "Llama4",
        model_types: &["llama4", "llama4_text"],
        architectures: &["Llama4ForConditionalGeneration", "Llama4ForCausalLM"],
        examples: "Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E",
        experts_keys: E_LOCAL,
        width_keys: W_INTER,
        dense_width_key: "intermediate_size_mlp",
        shared: Shared::One,
        layers: LayerRule::Interleaved,
        router: "feed_forward.router.weight",
        per_expert: None,
        fused: &[Fused {
            router: "feed_forward.router.weight",
            gate_up: "feed_forward.experts.gate_up_proj",
            down: "feed_forward.experts.down_proj",
            kind: FusedKind::ConcatColumns,
        }],
        shared_prefix: Some("feed_forward.shared_expert"),
        dense_prefix: "feed_forward",
        router_rule: "top-k on logits, sigmoid of the kept logits scales the expert input",
        dense_from: "moe_layers, interleave_moe_layer_step",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "ernie4_5_moe",
        name: "Ernie45Moe",
        model_types: &["ernie4_5_moe"],
        architectures: &["Ernie4_5_MoeForCausalLM"],
        examples: "ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B",
        experts_keys: &["moe_num_experts"],
        top_k_keys: &["moe_k"],
        shared: Shared::Count("moe_num_shared_experts"),
        layers: LayerRule::StartEnd,
        shared_prefix: Some("mlp.shared_experts"),
        correction_bias: Some("mlp.moe_statics.e_score_correction_bias"),
        router_rule: "softmax, top-k by softmax + e_score_correction_bias, renormalised",
        dense_from: "moe_layer_start_index, moe_layer_end_index, moe_layer_interval",
        ..BASE
    },
    FamilySpec {
        id: "hunyuan_v1_moe",
        name: "HunYuanMoeV1",
        model_types: &["hunyuan_v1_moe"],
        architectures: &["HunYuanMoEV1ForCausalLM"],
        examples: "Hunyuan-A13B",
        experts_keys: E_NUM,
        top_k_keys: &["moe_topk"],
        width_keys: W_INTER,
        shared: Shared::One,
        router: "mlp.gate.wg.weight",
        fused: &[Fused {
            router: "mlp.gate.wg.weight",
            ..FUSED_MLP
        }],
        shared_prefix: Some("mlp.shared_mlp"),
        router_rule: "softmax, top-k, renormalised; shared MLP always on",
        ..BASE
    },
    FamilySpec {
        id: "granitemoe",
        name: "GraniteMoe",
        model_types: &["granitemoe"],
        architectures: &["GraniteMoeForCausalLM"],
        examples: "granite-3.0-1b-a400m, granite-3.0-3b-a800m",
        experts_keys: E_LOCAL,
        width_keys: W_INTER,
        router: "block_sparse_moe.router.layer.weight",
        per_expert: None,
        fused: &[
            Fused {
                router: "block_sparse_moe.router.layer.weight",
                gate_up: "block_sparse_moe.input_linear.weight",
                down: "block_sparse_moe.output_linear.weight",
                kind: FusedKind::GateUpRows,
            },
            Fused {
                router: "block_sparse_moe.router.weight",
                gate_up: "block_sparse_moe.experts.gate_up_proj",
                down: "block_sparse_moe.experts.down_proj",
                kind: FusedKind::GateUpRows,
            },
        ],
        router_rule: "top-k on logits, softmax over the k",
        native_forward: true,
        ..BASE
    },
    FamilySpec {
        id: "flex_olmo",
        name: "FlexOlmo",
        model_types: &["flex_olmo"],
        architectures: &["FlexOlmoForCausalLM"],
        examples: "FlexOlmo-7x7B-1T",
        width_keys: W_INTER,
        router_rule: "softmax, top-k (norm_topk_prob)",
        ..BASE
    },
    FamilySpec {
        id: "dbrx",
        name: "Dbrx",
        model_types: &["dbrx"],
        architectures: &["DbrxForCausalLM"],
        examples: "dbrx-base, dbrx-instruct",
        experts_keys: &["ffn_config.moe_num_experts"],
        top_k_keys: &["ffn_config.moe_top_k"],
        width_keys: &["ffn_config.ffn_hidden_size"],
        layers_key: "n_layers",
        hidden_key: "d_model",
        router: "ffn.router.layer.weight",
        per_expert: None,
        fused: &[Fused {
            router: "ffn.router.layer.weight",
            gate_up: "ffn.experts.mlp.w1",
            down: "ffn.experts.mlp.w2",
            kind: FusedKind::RowStacks {
                up: "ffn.experts.mlp.v1",
            },
        }],
        router_rule: "softmax, top-k, divided by their p-norm (moe_normalize_expert_weights)",
        ..BASE
    },
    FamilySpec {
        id: "longcat_flash",
        name: "LongcatFlash",
        model_types: &["longcat_flash"],
        architectures: &["LongcatFlashForCausalLM"],
        examples: "LongCat-Flash-Chat, LongCat-Flash-Thinking",
        experts_keys: &["n_routed_experts"],
        top_k_keys: &["moe_topk"],
        width_keys: &["expert_ffn_hidden_size"],
        layers_key: "num_layers",
        zero_experts_key: Some("zero_expert_num"),
        router: "mlp.router.classifier.weight",
        fused: &[Fused {
            router: "mlp.router.classifier.weight",
            ..FUSED_MLP
        }],
        correction_bias: Some("mlp.router.e_score_correction_bias"),
        router_rule: "softmax over routed + zero (identity) experts, top-k by softmax + \
                      e_score_correction_bias, × routed_scaling_factor; a zero expert returns its input",
        ..BASE
    },
];

/// One row of `cargo moe-inspect models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FamilyDescription {
    /// Family id.
    pub family: &'static str,
    /// The `model_type` of its config.json.
    pub model_type: &'static str,
    /// Every `model_type` (and `architectures` class) read as this family.
    pub aliases: Vec<&'static str>,
    /// Example checkpoints.
    pub examples: &'static str,
    /// Tensor naming layout(s) of the experts, per-expert and fused.
    pub layout: String,
    /// Whether it has shared experts.
    pub shared_experts: bool,
    /// Which layers are dense rather than MoE.
    pub dense_layers: &'static str,
    /// How router logits become selected experts.
    pub router_rule: &'static str,
    /// The expert activation.
    pub activation: &'static str,
    /// `native` (forward pass, dynamic analyses) or `trace` (static analyses
    /// natively; dynamic ones from an engine trace).
    pub forward: &'static str,
}

#[allow(non_upper_case_globals)]
impl Family {
    /// Mixtral (`mixtral`).
    pub const Mixtral: Family = Family(0);
    /// DeepSeekMoE (`deepseek`).
    pub const DeepSeekMoe: Family = Family(1);
    /// Grok-1 (`grok-1`).
    pub const Grok1: Family = Family(2);
    /// Qwen2-MoE / Qwen1.5-MoE (`qwen2_moe`).
    pub const Qwen2Moe: Family = Family(3);
    /// Qwen3-MoE (`qwen3_moe`).
    pub const Qwen3Moe: Family = Family(4);
    /// OLMoE (`olmoe`).
    pub const Olmoe: Family = Family(5);
    /// DeepSeek-V2 (`deepseek_v2`).
    pub const DeepSeekV2: Family = Family(6);
    /// DeepSeek-V3 (`deepseek_v3`, and Kimi-K2).
    pub const DeepSeekV3: Family = Family(7);
    /// gpt-oss (`gpt_oss`).
    pub const GptOss: Family = Family(8);
    /// GLM-4.5 / GLM-4.6 (`glm4_moe`).
    pub const Glm4Moe: Family = Family(9);
    /// DeepSeek-V3.2 (`deepseek_v32`): DeepSeek-V3 with the DSA indexer.
    pub const DeepSeekV32: Family = Family(10);
    /// Qwen3-Next (`qwen3_next`).
    pub const Qwen3Next: Family = Family(11);
    /// Qwen3.5-MoE (`qwen3_5_moe`, `qwen3_5_moe_text`).
    pub const Qwen35Moe: Family = Family(12);
    /// MiniMax-M2 (`minimax_m2`).
    pub const MiniMaxM2: Family = Family(13);
    /// Llama 4 (`llama4`, `llama4_text`).
    pub const Llama4: Family = Family(15);
    /// IBM Granite MoE (`granitemoe`).
    pub const GraniteMoe: Family = Family(18);

    /// Every family of the table, in the order `models` lists them.
    pub fn all() -> impl Iterator<Item = Family> {
        (0..FAMILIES.len()).map(|i| Family(i as u8))
    }

    /// The families with a native forward pass (the named constants).
    pub const ALL: [Family; 16] = [
        Family::Mixtral,
        Family::DeepSeekMoe,
        Family::Grok1,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Olmoe,
        Family::DeepSeekV2,
        Family::DeepSeekV3,
        Family::GptOss,
        Family::Glm4Moe,
        Family::DeepSeekV32,
        Family::Qwen3Next,
        Family::Qwen35Moe,
        Family::MiniMaxM2,
        Family::Llama4,
        Family::GraniteMoe,
    ];

    /// The table row of this family (or of a family inferred from a checkpoint).
    pub fn spec(self) -> &'static FamilySpec {
        let i = self.0 as usize;
        match FAMILIES.get(i) {
            Some(s) => s,
            None => {
                let inferred = inferred().lock().unwrap_or_else(|e| e.into_inner());
                inferred[i - FAMILIES.len()]
            }
        }
    }

    /// A handle for a family inferred from a checkpoint's tensors (see
    /// [`crate::model::infer`]); the same row twice gets the same handle.
    pub fn register(spec: FamilySpec) -> Result<Family> {
        let mut inferred = inferred().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = inferred.iter().position(|s| **s == spec) {
            return Ok(Family((FAMILIES.len() + i) as u8));
        }
        let i = FAMILIES.len() + inferred.len();
        if i > u8::MAX as usize {
            return Err(Error::Usage(
                "too many different inferred model families in one process".to_string(),
            ));
        }
        inferred.push(Box::leak(Box::new(spec)));
        Ok(Family(i as u8))
    }

    /// The family of this id (`gpt_oss`...).
    pub fn by_id(id: &str) -> Option<Family> {
        Family::all().find(|f| f.id() == id)
    }

    /// Stable identifier used in reports (the config `model_type`).
    pub fn id(self) -> &'static str {
        self.spec().id
    }

    /// Whether the forward pass (observer, trace, dynamic analyses, bench) is native.
    pub fn native_forward(self) -> bool {
        self.spec().native_forward
    }

    /// What `models` prints about the family.
    pub fn describe(self) -> FamilyDescription {
        let s = self.spec();
        let mut layouts = Vec::new();
        if let Some(p) = s.per_expert {
            let mut t = format!(
                "{}, {}.{{e}}.{}",
                s.router.trim_end_matches(".weight"),
                p.prefix,
                p.mats.join("/")
            );
            if let Some(sh) = s.shared_prefix {
                t.push_str(&format!(", {sh}"));
            }
            layouts.push(t);
        }
        for f in s.fused {
            let shape = match f.kind {
                FusedKind::GateUpRows => "[E,2I,H] gate|up rows, [E,H,I]",
                FusedKind::InterleavedColumns => "[E,H,2I] gate/up interleaved, [E,I,H], biases",
                FusedKind::ConcatColumns => "[E,H,2I] gate|up columns, [E,I,H]",
                FusedKind::RowStacks { up } => {
                    layouts.push(format!(
                        "fused: {}, {} (gate) + {up} (up) + {} (down, transposed) each [E·I,H]",
                        f.router.trim_end_matches(".weight"),
                        f.gate_up,
                        f.down
                    ));
                    continue;
                }
            };
            let mut t = format!(
                "fused: {}, {} + {} {shape}",
                f.router.trim_end_matches(".weight"),
                f.gate_up,
                f.down
            );
            if s.per_expert.is_none() {
                if let Some(sh) = s.shared_prefix {
                    t.push_str(&format!(", {sh}"));
                }
            }
            layouts.push(t);
        }
        let mut aliases: Vec<&'static str> = s.model_types.to_vec();
        aliases.extend(s.architectures);
        FamilyDescription {
            family: s.id,
            model_type: s.id,
            aliases,
            examples: s.examples,
            layout: layouts.join("; "),
            shared_experts: s.shared != Shared::None,
            dense_layers: s.dense_from,
            router_rule: s.router_rule,
            activation: s.activation.name(),
            forward: if s.native_forward { "native" } else { "trace" },
        }
    }

    /// Detects the family from `model_type`, or from `architectures` when
    /// `model_type` is absent (hpcai-tech's Grok-1) or unknown (Kimi-K2's
    /// `kimi_k2` with `DeepseekV3ForCausalLM`).
    pub fn detect(config: &Config) -> Result<Family> {
        match Family::recognise(config)? {
            Some(f) => Ok(f),
            None => Err(Family::unknown(config)),
        }
    }

    /// The family a config names, if the table knows it.
    pub fn recognise(config: &Config) -> Result<Option<Family>> {
        if let Some(f) = config.str("model_type")?.and_then(Family::from_model_type) {
            return Ok(Some(f));
        }
        let arch = config.architecture().unwrap_or("");
        Ok(Family::all().find(|f| f.spec().architectures.contains(&arch)))
    }

    /// The error for a config whose family the table does not know.
    pub fn unknown(config: &Config) -> Error {
        let supported = Family::all().map(|f| f.id()).collect::<Vec<_>>().join(", ");
        let found = match config.str("model_type") {
            Ok(Some(mt)) => mt.to_string(),
            _ => match config.architecture() {
                Some(a) if !a.is_empty() => a.to_string(),
                _ => "(no model_type or architectures)".to_string(),
            },
        };
        Error::UnknownFamily {
            path: config.path().to_path_buf(),
            found,
            supported,
        }
    }

    /// Maps a config `model_type` onto a family.
    pub fn from_model_type(mt: &str) -> Option<Family> {
        Family::all().find(|f| f.spec().model_types.contains(&mt))
    }

    /// The canonical naming (`model.layers.`, the per-expert layout where the
    /// family has one, else its fused layout).
    pub fn naming(self) -> Naming {
        Naming {
            family: self,
            prefix: LAYER_PREFIXES[0],
            fused: if self.spec().per_expert.is_none() {
                Some(0)
            } else {
                None
            },
        }
    }

    /// Tensor name of the router matrix `[E, hidden]` of a layer (canonical naming).
    pub fn router_name(self, layer: usize) -> String {
        self.naming().router(layer)
    }

    /// Tensor names `[gate, up, down]` of routed expert `e` in a layer
    /// (canonical naming). For a family stored fused only, the names of the
    /// stacked tensors that hold it: `[gate_up, gate_up, down]`.
    pub fn expert_names(self, layer: usize, e: usize) -> [String; 3] {
        self.naming().expert(layer, e)
    }

    /// Tensor names `[gate, up, down]` of the shared expert(s) of a layer, if the family has them.
    pub fn shared_names(self, layer: usize) -> Option<[String; 3]> {
        self.naming().shared(layer)
    }

    /// Tensor names `[gate, up, down]` of a dense (non-MoE) layer's MLP.
    pub fn dense_names(self, layer: usize) -> [String; 3] {
        self.naming().dense(layer)
    }
}

/// Rows of families inferred from checkpoints, after [`FAMILIES`].
fn inferred() -> &'static std::sync::Mutex<Vec<&'static FamilySpec>> {
    static INFERRED: std::sync::OnceLock<std::sync::Mutex<Vec<&'static FamilySpec>>> =
        std::sync::OnceLock::new();
    INFERRED.get_or_init(Default::default)
}

/// Where decoder layers live: text checkpoints, and the text part of the
/// multimodal releases (transformers 5, and the original Llama 4 / Qwen3.5 layout).
pub const LAYER_PREFIXES: [&str; 4] = [
    "model.layers.",
    "model.language_model.layers.",
    "language_model.model.layers.",
    "transformer.blocks.",
];

/// The tensor names of one checkpoint: its family, where its layers live,
/// and whether its experts are stored fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    /// The family.
    pub family: Family,
    /// Layer prefix, one of [`LAYER_PREFIXES`].
    pub prefix: &'static str,
    /// The experts are stacked: which of the family's fused layouts.
    pub fused: Option<u8>,
}

/// Where a routed expert's three matrices are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSource {
    /// One tensor per matrix: `[gate, up, down]`.
    Separate([String; 3]),
    /// Expert `index` of the stacked tensors.
    Fused {
        /// The stacked gate/up tensor.
        gate_up: String,
        /// The stacked down tensor.
        down: String,
        /// How the experts lie in them.
        kind: FusedKind,
        /// The expert.
        index: usize,
    },
}

impl Naming {
    fn layer(&self, layer: usize, rest: &str) -> String {
        format!("{}{layer}.{rest}", self.prefix)
    }

    /// Router matrix `[E, hidden]`.
    pub fn router(&self, layer: usize) -> String {
        let s = self.family.spec();
        match self.fused_layout() {
            Some(f) => self.layer(layer, f.router),
            None => self.layer(layer, s.router),
        }
    }

    /// Where routed expert `e` is.
    pub fn expert_source(&self, layer: usize, e: usize) -> ExpertSource {
        let s = self.family.spec();
        match (self.fused_layout(), s.per_expert) {
            (Some(f), _) => ExpertSource::Fused {
                gate_up: self.layer(layer, f.gate_up),
                down: self.layer(layer, f.down),
                kind: f.kind,
                index: e,
            },
            (None, Some(p)) => ExpertSource::Separate(
                p.mats
                    .map(|m| self.layer(layer, &format!("{}.{e}.{m}.weight", p.prefix))),
            ),
            (None, None) => unreachable!("a family without a per-expert layout is named fused"),
        }
    }

    /// The fused layout in use, if the experts are stacked.
    pub fn fused_layout(&self) -> Option<&'static Fused> {
        self.family.spec().fused.get(usize::from(self.fused?))
    }

    /// Tensor names of expert `e` (for a fused layout, `[gate_up, gate_up, down]`).
    pub fn expert(&self, layer: usize, e: usize) -> [String; 3] {
        match self.expert_source(layer, e) {
            ExpertSource::Separate(n) => n,
            ExpertSource::Fused { gate_up, down, .. } => [gate_up.clone(), gate_up, down],
        }
    }

    /// Every tensor of the routed experts of a layer (fused: the two stacked ones).
    pub fn expert_tensors(&self, layer: usize, experts: usize) -> Vec<String> {
        if let Some(f) = self.fused_layout() {
            let [g, _, d] = self.expert(layer, 0);
            let mut names = vec![format!("{g}_bias"), format!("{d}_bias"), g, d];
            if let FusedKind::RowStacks { up } = f.kind {
                names.push(self.layer(layer, up));
            }
            names
        } else {
            (0..experts).flat_map(|e| self.expert(layer, e)).collect()
        }
    }

    /// Shared expert(s) `[gate, up, down]`, if the family has them.
    pub fn shared(&self, layer: usize) -> Option<[String; 3]> {
        let p = self.family.spec().shared_prefix?;
        Some(STD.map(|m| self.layer(layer, &format!("{p}.{m}.weight"))))
    }

    /// A per-layer tensor of the table (`shared_gate`, `correction_bias`) under this naming's prefix.
    pub fn layer_tensor(&self, layer: usize, rest: &str) -> String {
        self.layer(layer, rest)
    }

    /// Dense MLP `[gate, up, down]`.
    pub fn dense(&self, layer: usize) -> [String; 3] {
        let p = self.family.spec().dense_prefix;
        STD.map(|m| self.layer(layer, &format!("{p}.{m}.weight")))
    }
}

/// The layer index of a per-layer tensor name (`model.layers.{i}.…`, or a
/// multimodal release's `model.language_model.layers.{i}.…`).
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    let rest = LAYER_PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
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
    /// A multimodal release's `text_config` is read for the text model.
    pub fn from_config(config: &Config) -> Result<ModelInfo> {
        let family = Family::detect(config)?;
        let text = config.text_config();
        ModelInfo::read(text.as_ref().unwrap_or(config), family)
    }

    /// Reads the geometry of `family` from a (text) config.
    pub fn read(config: &Config, family: Family) -> Result<ModelInfo> {
        let spec = family.spec();
        let path = config.path();
        let num_layers = config.usize_in(spec.layers_key, 0, limits::LAYERS)?;
        let hidden_size = config.usize_in(spec.hidden_key, 1, limits::WIDTH)?;
        let experts_keys = spec.experts_keys;
        let num_experts = if experts_keys.len() == 1 {
            config.usize(experts_keys[0])?
        } else {
            config.usize_any_req(experts_keys)?
        };
        if num_experts == 0 {
            return Err(Error::key(path, experts_keys[0], "is 0: not an MoE model"));
        }
        let experts_key = experts_keys
            .iter()
            .find(|k| config.get(k).is_some())
            .unwrap_or(&experts_keys[0]);
        config.check_range(experts_key, num_experts, 1, limits::EXPERTS)?;
        let top_k_key = spec
            .top_k_keys
            .iter()
            .find(|k| config.get(k).is_some())
            .unwrap_or(&spec.top_k_keys[0]);
        let top_k = config.usize_uniform(top_k_key)?;
        if top_k == 0 || top_k > num_experts {
            return Err(Error::key(
                path,
                top_k_key,
                format!("is {top_k}, must be between 1 and the number of experts ({num_experts})"),
            ));
        }
        let intermediate = config.usize_opt_in(spec.dense_width_key, 1, limits::WIDTH)?;
        let width_key = spec
            .width_keys
            .iter()
            .find(|k| config.get(k).is_some())
            .unwrap_or(&spec.width_keys[0]);
        let expert_intermediate = config.usize_in(width_key, 1, limits::WIDTH)?;
        let shared_intermediate = match spec.shared {
            Shared::None => 0,
            Shared::One => expert_intermediate,
            Shared::Width(key) => config.usize_opt_in(key, 0, limits::WIDTH)?.unwrap_or(0),
            Shared::Count(key) => {
                let n = config.usize_opt_in(key, 0, limits::EXPERTS)?.unwrap_or(0);
                n.checked_mul(expert_intermediate)
                    .filter(|&w| w <= limits::WIDTH)
                    .ok_or_else(|| {
                        Error::key(
                            path,
                            key,
                            format!(
                                "is {n}: {n} shared experts × {width_key} \
                                 {expert_intermediate} exceeds the limit of {} for one block",
                                limits::WIDTH
                            ),
                        )
                    })?
            }
        };
        if spec.groups != Groups::None {
            check_groups(config, spec.groups, num_experts, top_k)?;
        }

        // Which layers are MoE, and which key made the others dense (for the
        // error when none is left).
        let (moe_layers, dense_layers, dense_key): (Vec<usize>, Vec<usize>, &str) =
            match spec.layers {
                LayerRule::All => ((0..num_layers).collect(), Vec::new(), spec.layers_key),
                LayerRule::QwenSparse => {
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
                LayerRule::FirstKDense => {
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
                LayerRule::Interleaved => {
                    let listed: std::collections::BTreeSet<usize> =
                        if config.get("moe_layers").is_some() {
                            config.usize_list("moe_layers")?.into_iter().collect()
                        } else {
                            let step = config.usize_opt("interleave_moe_layer_step")?.unwrap_or(1);
                            if step == 0 {
                                return Err(Error::key(
                                    path,
                                    "interleave_moe_layer_step",
                                    "must be at least 1",
                                ));
                            }
                            (step - 1..num_layers).step_by(step).collect()
                        };
                    let (moe, dense) = (0..num_layers).partition(|l| listed.contains(l));
                    (moe, dense, "moe_layers")
                }
                LayerRule::StartEnd => {
                    let start = config.usize_opt("moe_layer_start_index")?.unwrap_or(0);
                    // -1 (the default) is the last layer.
                    let end = match config.get("moe_layer_end_index").and_then(|v| v.as_i64()) {
                        Some(e) if e >= 0 => e as usize,
                        _ => num_layers.saturating_sub(1),
                    };
                    let every = config.usize_opt("moe_layer_interval")?.unwrap_or(1);
                    if every == 0 {
                        return Err(Error::key(path, "moe_layer_interval", "must be at least 1"));
                    }
                    let (moe, dense) = (0..num_layers)
                        .partition(|&l| (l + 1) % every == 0 && l >= start && l <= end);
                    (moe, dense, "moe_layer_start_index")
                }
            };
        // transformers 5 configs may spell the layer kinds out (`mlp_layer_types`:
        // "dense" / "sparse" per layer, DeepSeek-V3.2 and later); that list wins.
        let (moe_layers, dense_layers, dense_key) = match config.get("mlp_layer_types") {
            Some(serde_json::Value::Array(kinds)) => {
                if kinds.len() != num_layers {
                    return Err(Error::key(
                        path,
                        "mlp_layer_types",
                        format!(
                            "has {} entries for {num_layers} layers (num_hidden_layers)",
                            kinds.len()
                        ),
                    ));
                }
                let mut moe = Vec::new();
                let mut dense = Vec::new();
                for (l, k) in kinds.iter().enumerate() {
                    match k.as_str() {
                        Some("sparse" | "moe") => moe.push(l),
                        Some("dense") => dense.push(l),
                        _ => {
                            return Err(Error::key(
                                path,
                                "mlp_layer_types",
                                format!(
                                    "entry {l} is {}, expected \"dense\" or \"sparse\"",
                                    short_value(k)
                                ),
                            ))
                        }
                    }
                }
                (moe, dense, "mlp_layer_types")
            }
            _ => (moe_layers, dense_layers, dense_key),
        };
        if moe_layers.is_empty() {
            let key = if num_layers == 0 {
                spec.layers_key
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
                    "is {value}: no MoE layer among the {num_layers} layers ({}); \
                     there is nothing to analyse",
                    spec.layers_key
                ),
            ));
        }
        let dense_intermediate = if dense_layers.is_empty() {
            None
        } else {
            Some(intermediate.ok_or_else(|| {
                Error::key(
                    path,
                    spec.dense_width_key,
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
fn check_groups(config: &Config, groups: Groups, experts: usize, top_k: usize) -> Result<()> {
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
        groups == Groups::Always || config.str("topk_method")? == Some("group_limited_greedy");
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
    fn named_constants_are_their_table_rows() {
        let ids = Family::ALL.map(Family::id);
        assert_eq!(
            ids,
            [
                "mixtral",
                "deepseek",
                "grok-1",
                "qwen2_moe",
                "qwen3_moe",
                "olmoe",
                "deepseek_v2",
                "deepseek_v3",
                "gpt_oss",
                "glm4_moe",
                "deepseek_v32",
                "qwen3_next",
                "qwen3_5_moe",
                "minimax_m2",
                "llama4",
                "granitemoe"
            ]
        );
        let native: Vec<Family> = Family::all().filter(|f| f.native_forward()).collect();
        assert_eq!(native, Family::ALL.to_vec());
    }

    #[test]
    fn layer_of_reads_the_index() {
        assert_eq!(layer_of("model.layers.12.mlp.gate.weight"), Some(12));
        assert_eq!(layer_of("model.layers.x.mlp"), None);
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
    }
}
