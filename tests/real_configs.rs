//! The released `config.json` files of real checkpoints (copied byte for byte
//! from shared/real-configs into tests/data/real-configs) parse unchanged into
//! the view the analyses use.

use std::path::{Path, PathBuf};

use moe_inspect::model::{Config, DenseInfo, Family, ModelInfo};

fn config(name: &str) -> Config {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/real-configs")
        .join(name);
    Config::parse(&path, &std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn mixtral_8x7b_instruct() {
    let info = ModelInfo::from_config(&config("mixtral-8x7b-instruct-v0.1.json")).unwrap();
    assert_eq!(info.family, Family::Mixtral);
    assert_eq!(info.num_layers, 32);
    assert_eq!(info.moe_layers, (0..32).collect::<Vec<_>>());
    assert!(info.dense_layers.is_empty());
    assert_eq!((info.num_experts, info.top_k), (8, 2));
    assert_eq!((info.hidden_size, info.expert_intermediate), (4096, 14336));
    assert_eq!(info.shared_intermediate, 0);
}

#[test]
fn deepseek_moe_16b_has_a_dense_first_layer_and_two_shared_experts() {
    let info = ModelInfo::from_config(&config("deepseek-moe-16b-base.json")).unwrap();
    assert_eq!(info.family, Family::DeepSeekMoe);
    assert_eq!(info.num_layers, 28);
    assert_eq!(info.dense_layers, vec![0]);
    assert_eq!(info.moe_layers, (1..28).collect::<Vec<_>>());
    assert_eq!((info.num_experts, info.top_k), (64, 6));
    assert_eq!((info.hidden_size, info.expert_intermediate), (2048, 1408));
    assert_eq!(info.shared_intermediate, 2 * 1408);
    assert_eq!(info.dense_intermediate, Some(10944));
}

#[test]
fn grok_1_without_model_type_is_recognised_by_architecture() {
    let cfg = config("grok-1-hpcai-tech.json");
    assert!(cfg.get("model_type").is_none());
    let info = ModelInfo::from_config(&cfg).unwrap();
    assert_eq!(info.family, Family::Grok1);
    assert_eq!(info.num_layers, 64);
    assert_eq!(info.moe_layers.len(), 64);
    assert_eq!((info.num_experts, info.top_k), (8, 2));
    assert_eq!((info.hidden_size, info.expert_intermediate), (6144, 32768));
}

#[test]
fn qwen3_30b_a3b_reads_num_experts_and_moe_intermediate_size() {
    let info = ModelInfo::from_config(&config("qwen3-30b-a3b.json")).unwrap();
    assert_eq!(info.family, Family::Qwen3Moe);
    assert_eq!(info.num_layers, 48);
    assert_eq!(info.moe_layers.len(), 48);
    assert_eq!((info.num_experts, info.top_k), (128, 8));
    assert_eq!((info.hidden_size, info.expert_intermediate), (2048, 768));
}

#[test]
fn mistral_7b_is_a_dense_reference_not_an_moe_model() {
    let cfg = config("mistral-7b-v0.1.json");
    let err = ModelInfo::from_config(&cfg).unwrap_err().to_string();
    assert!(err.contains("unknown model family `mistral`"), "{err}");
    let dense = DenseInfo::from_config(&cfg).unwrap();
    assert_eq!(
        (dense.num_layers, dense.hidden_size, dense.intermediate_size),
        (32, 4096, 14336)
    );
}

#[test]
fn transformers_5_spellings_are_accepted() {
    // transformers 5 writes `num_local_experts` for Qwen3-MoE, `dtype`,
    // `rope_parameters` and `head_dim: null`.
    let path = Path::new("config.json");
    let cfg = Config::parse(
        path,
        br#"{"model_type": "qwen3_moe", "num_hidden_layers": 4, "hidden_size": 64,
             "num_local_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
             "intermediate_size": 128, "mlp_only_layers": [0], "decoder_sparse_step": 1,
             "dtype": "bfloat16", "head_dim": null, "sliding_window": null,
             "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}"#,
    )
    .unwrap();
    let info = ModelInfo::from_config(&cfg).unwrap();
    assert_eq!(info.num_experts, 16);
    assert_eq!(info.moe_layers, vec![1, 2, 3]);
    assert_eq!(info.dense_layers, vec![0]);
    assert_eq!(info.dense_intermediate, Some(128));
}

#[test]
fn qwen_decoder_sparse_step_and_deepseek_moe_layer_freq_select_layers() {
    let path = Path::new("config.json");
    let qwen = Config::parse(
        path,
        br#"{"model_type": "qwen2_moe", "num_hidden_layers": 6, "hidden_size": 8,
             "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
             "intermediate_size": 16, "decoder_sparse_step": 2, "mlp_only_layers": [5]}"#,
    )
    .unwrap();
    // Sparse when (l + 1) % step == 0 and l not in mlp_only_layers.
    assert_eq!(
        ModelInfo::from_config(&qwen).unwrap().moe_layers,
        vec![1, 3]
    );
    let ds = Config::parse(
        path,
        br#"{"model_type": "deepseek_v2", "num_hidden_layers": 7, "hidden_size": 8,
             "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
             "intermediate_size": 16, "first_k_dense_replace": 2, "moe_layer_freq": 2,
             "n_shared_experts": null}"#,
    )
    .unwrap();
    let info = ModelInfo::from_config(&ds).unwrap();
    assert_eq!(info.moe_layers, vec![2, 4, 6]);
    assert_eq!(info.shared_intermediate, 0);
}

// ---- families of the table (issue 13); provenance in tests/data/real-configs/README.md ----

/// The family of a real config, by its id, with the geometry the analyses use.
fn family_info(name: &str) -> ModelInfo {
    ModelInfo::from_config(&config(name)).unwrap()
}

#[test]
fn gpt_oss_20b_reads_num_local_experts_and_four_per_token() {
    let info = family_info("gpt-oss-20b.json");
    assert_eq!(info.family.id(), "gpt_oss");
    assert_eq!(info.num_layers, 24);
    // Every layer is MoE (gpt-oss has no dense layers; sliding/full alternate in attention only).
    assert_eq!(info.moe_layers, (0..24).collect::<Vec<_>>());
    assert!(info.dense_layers.is_empty());
    assert_eq!((info.num_experts, info.top_k), (32, 4));
    assert_eq!((info.hidden_size, info.expert_intermediate), (2880, 2880));
    assert_eq!(info.shared_intermediate, 0);
    assert_eq!(info.dense_intermediate, None);
}

#[test]
fn gpt_oss_120b_has_128_experts_over_36_layers() {
    let info = family_info("gpt-oss-120b.json");
    assert_eq!(info.family.id(), "gpt_oss");
    assert_eq!(info.num_layers, 36);
    assert_eq!(info.moe_layers, (0..36).collect::<Vec<_>>());
    assert_eq!((info.num_experts, info.top_k), (128, 4));
    assert_eq!((info.hidden_size, info.expert_intermediate), (2880, 2880));
}

#[test]
fn glm_4_5_air_has_a_dense_first_layer_and_one_shared_expert() {
    let info = family_info("glm-4.5-air.json");
    assert_eq!(info.family.id(), "glm4_moe");
    assert_eq!(info.num_layers, 46);
    assert_eq!(info.dense_layers, vec![0]);
    assert_eq!(info.moe_layers, (1..46).collect::<Vec<_>>());
    assert_eq!((info.num_experts, info.top_k), (128, 8));
    assert_eq!((info.hidden_size, info.expert_intermediate), (4096, 1408));
    assert_eq!(info.shared_intermediate, 1408);
    assert_eq!(info.dense_intermediate, Some(10944));
}

#[test]
fn a_released_config_with_an_unknown_model_type_is_its_architectures_class() {
    // Kimi-K2 ships `model_type: kimi_k2` with `DeepseekV3ForCausalLM`; the
    // same rule reads GLM-4.5-Air renamed as its architectures class.
    let path = Path::new("tests/data/real-configs/glm-4.5-air.json");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    let renamed = text.replace("\"glm4_moe\"", "\"glm4_moe_renamed\"");
    assert_ne!(renamed, text);
    let info = ModelInfo::from_config(&Config::parse(path, renamed.as_bytes()).unwrap()).unwrap();
    assert_eq!(info.family.id(), "glm4_moe");
    assert_eq!(info.moe_layers.len(), 45);
}

#[test]
fn qwen3_next_80b_a3b_has_512_experts_top_10_and_a_gated_shared_expert() {
    let info = family_info("qwen3-next-80b-a3b-instruct.json");
    assert_eq!(info.family.id(), "qwen3_next");
    assert_eq!(info.num_layers, 48);
    // mlp_only_layers [] and decoder_sparse_step 1: every layer is MoE (the
    // linear/full attention hybrid is attention only).
    assert_eq!(info.moe_layers, (0..48).collect::<Vec<_>>());
    assert!(info.dense_layers.is_empty());
    assert_eq!((info.num_experts, info.top_k), (512, 10));
    assert_eq!((info.hidden_size, info.expert_intermediate), (2048, 512));
    assert_eq!(info.shared_intermediate, 512);
    assert_eq!(info.dense_intermediate, None);
}

#[test]
fn qwen3_5_35b_a3b_is_read_from_the_multimodal_text_config() {
    let cfg = config("qwen3.5-35b-a3b.json");
    // The release is the multimodal class: the text model's keys are nested.
    assert_eq!(
        cfg.get("model_type").and_then(|v| v.as_str()),
        Some("qwen3_5_moe")
    );
    assert!(cfg.get("num_hidden_layers").is_none());
    let info = ModelInfo::from_config(&cfg).unwrap();
    assert_eq!(info.family.id(), "qwen3_5_moe");
    assert_eq!(info.num_layers, 40);
    assert_eq!(info.moe_layers, (0..40).collect::<Vec<_>>());
    assert!(info.dense_layers.is_empty());
    assert_eq!((info.num_experts, info.top_k), (256, 8));
    assert_eq!((info.hidden_size, info.expert_intermediate), (2048, 512));
    assert_eq!(info.shared_intermediate, 512);
    assert_eq!(info.dense_intermediate, None);
}

#[test]
fn qwen3_5_397b_a17b_has_512_experts_top_10_over_60_layers() {
    let info = family_info("qwen3.5-397b-a17b.json");
    assert_eq!(info.family.id(), "qwen3_5_moe");
    assert_eq!(info.num_layers, 60);
    assert_eq!(info.moe_layers, (0..60).collect::<Vec<_>>());
    assert!(info.dense_layers.is_empty());
    assert_eq!((info.num_experts, info.top_k), (512, 10));
    assert_eq!((info.hidden_size, info.expert_intermediate), (4096, 1024));
    assert_eq!(info.shared_intermediate, 1024);
    assert_eq!(info.dense_intermediate, None);
}

#[test]
fn minimax_m2_7_reads_num_local_experts_and_intermediate_size_without_a_shared_expert() {
    let cfg = config("minimax-m2.7.json");
    // The release is FP8 (block 128×128); the geometry does not depend on it.
    assert!(cfg.get("quantization_config").is_some());
    let info = ModelInfo::from_config(&cfg).unwrap();
    assert_eq!(info.family.id(), "minimax_m2");
    assert_eq!(info.num_layers, 62);
    assert_eq!(info.moe_layers, (0..62).collect::<Vec<_>>());
    assert!(info.dense_layers.is_empty());
    assert_eq!((info.num_experts, info.top_k), (256, 8));
    // MiniMax-M2 spells the expert width `intermediate_size` (Mixtral's key).
    assert_eq!((info.hidden_size, info.expert_intermediate), (3072, 1536));
    // `shared_intermediate_size: 0`: no shared expert.
    assert_eq!(info.shared_intermediate, 0);
    assert_eq!(info.dense_intermediate, None);
}

#[test]
fn deepseek_v3_2_has_three_dense_layers_and_the_indexer_geometry() {
    let cfg = config("deepseek-v3.2.json");
    let info = ModelInfo::from_config(&cfg).unwrap();
    assert_eq!(info.family, Family::DeepSeekV32);
    assert_eq!(info.num_layers, 61);
    assert_eq!(info.dense_layers, vec![0, 1, 2]);
    assert_eq!(info.moe_layers, (3..61).collect::<Vec<_>>());
    assert_eq!((info.num_experts, info.top_k), (256, 8));
    assert_eq!((info.hidden_size, info.expert_intermediate), (7168, 2048));
    assert_eq!(info.shared_intermediate, 2048);
    assert_eq!(info.dense_intermediate, Some(18432));
    let f = moe_inspect::forward::config::ForwardConfig::from_config(&cfg, &info).unwrap();
    let ix = f.dsa.expect("the DSA indexer");
    assert_eq!(
        (ix.heads, ix.head_dim, ix.topk, ix.rope_dim, ix.q_lora_rank),
        (64, 128, 2048, 64, 1536)
    );
}
