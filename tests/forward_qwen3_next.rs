//! The native forward pass of the hybrid Gated DeltaNet + gated-attention
//! families against transformers: Qwen3-Next (`families/qwen3_next`, f32)
//! and Qwen3.5-MoE (`families/qwen3_5_moe`, `qwen3_5_moe_text`, bf16,
//! sharded; and the same weights as the multimodal release names them).
//! References: fixtures/make_qwen3_next_forward_ref.py (Qwen3NextForCausalLM,
//! Qwen3_5MoeForCausalLM in float32, eager attention, the torch fallbacks of
//! the DeltaNet kernels), see fixtures/FORWARD.md.

use moe_inspect_testkit as common;

use common::fixture;
use common::forward::{check_forward, MaxErrors, Reference};
use moe_inspect::forward::{parse_device, to_host, Forward};
use moe_inspect::model::Model;

/// Max-abs tolerance: the references are f32 computations of the same
/// weights (bf16 ones upcast exactly); this forward computes in f32 too,
/// summing in other orders (the delta rule recurrently, transformers in
/// chunks of 64).
const TOL: f32 = 1e-5;

fn reference(name: &str) -> Reference {
    Reference::open(name, "forward_reference.safetensors")
}

fn check(name: &str) -> MaxErrors {
    let r = reference(name);
    let lengths: Vec<usize> = r.prompts().iter().map(Vec::len).collect();
    // At least 32 tokens each, one beyond the reference's 64-token chunk.
    assert!(
        lengths.iter().all(|&t| t >= 32) && lengths.iter().any(|&t| t > 64),
        "{name}: prompt lengths {lengths:?}"
    );
    let m = check_forward(&fixture(name), &r, TOL);
    eprintln!("{name}: max |diff| {m:?}");
    m
}

/// Qwen3-Next: layers 0-2 Gated DeltaNet (`in_proj_qkvz` / `in_proj_ba`
/// grouped per key head, 2 key heads serving 4 value heads), layer 3 gated
/// full attention (partial rotary 0.25), layer 0 dense, MoE layers 1-3 with
/// a shared expert behind its sigmoid gate; zero-centred norms away from 0.
#[test]
fn qwen3_next() {
    let m = check("families/qwen3_next");
    assert!(m.shared > 0.0 || m.logits > 0.0, "something was compared");
}

/// Qwen3.5-MoE (`qwen3_5_moe_text`, bf16 weights, three shards): the
/// separate `in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a`, every
/// layer MoE, routing always renormalised.
#[test]
fn qwen3_5_moe_bf16() {
    check("families/qwen3_5_moe");
}

/// The multimodal release layout (`model_type: qwen3_5_moe`, the text model's
/// keys in `text_config`, its tensors under `model.language_model.`): the same
/// numbers as the text-only checkpoint.
#[test]
fn qwen3_5_moe_multimodal_release() {
    let name = "families/qwen3_5_moe";
    let dir = common::copy_fixture(name);
    std::fs::remove_file(dir.path().join("forward_reference.safetensors")).unwrap();
    common::edit_config(dir.path(), |c| {
        let mut text = std::mem::take(c);
        text.remove("architectures");
        c.insert(
            "architectures".into(),
            serde_json::json!(["Qwen3_5MoeForConditionalGeneration"]),
        );
        c.insert("model_type".into(), "qwen3_5_moe".into());
        c.insert("tie_word_embeddings".into(), false.into());
        c.insert("text_config".into(), serde_json::Value::Object(text));
    });
    let rename = |n: &str| match n.strip_prefix("model.") {
        Some(rest) => format!("model.language_model.{rest}"),
        None => n.to_string(),
    };
    let mut renamed = 0;
    for shard in 1..=3 {
        let file = format!("model-0000{shard}-of-00003.safetensors");
        common::rewrite_safetensors(dir.path(), &file, |spec, _| {
            if spec.name.starts_with("model.") {
                spec.name = rename(&spec.name);
                renamed += 1;
            }
        });
    }
    let index = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let map = v["weight_map"].as_object().unwrap().clone();
    v["weight_map"] = map.into_iter().map(|(k, f)| (rename(&k), f)).collect();
    std::fs::write(&index, v.to_string()).unwrap();
    let model = Model::open(dir.path()).unwrap();
    assert_eq!(model.naming().prefix, "model.language_model.layers.");
    assert!(renamed > 4 * model.info.num_layers, "{renamed} renamed");
    drop(model);
    let m = check_forward(dir.path(), &reference(name), TOL);
    eprintln!("{name} as the multimodal release: max |diff| {m:?}");
}

/// Weights kept resident (f32 matrices transposed, bf16 ones as stored)
/// give the streamed run's logits.
#[test]
fn resident_weights_give_the_same_results_as_streaming() {
    for name in ["families/qwen3_next", "families/qwen3_5_moe"] {
        let model = Model::open(&fixture(name)).unwrap();
        let ids = reference(name).prompts().remove(1);
        let cpu = || parse_device("cpu").unwrap();
        let logits = |f: &Forward| {
            to_host(
                &f.run(std::slice::from_ref(&ids), &mut (), true)
                    .unwrap()
                    .logits[0],
            )
            .unwrap()
            .concat()
        };
        let a = logits(&Forward::new(&model, cpu()).unwrap());
        let resident = Forward::new(&model, cpu()).unwrap().keep_weights();
        for _ in 0..2 {
            let d = common::max_abs_diff_flat(name, &a, &logits(&resident));
            assert!(d <= 1e-5, "{name}: resident run differs by {d:e}");
        }
    }
}

/// A Gated DeltaNet tensor of the wrong shape is refused naming the file and
/// the tensor (not a panic or a wrong number).
#[test]
fn a_linear_attention_tensor_of_the_wrong_shape_is_named() {
    let dir = common::copy_fixture("families/qwen3_next");
    let bad = "model.layers.1.linear_attn.A_log";
    common::rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == bad {
            spec.shape = vec![3];
            bytes.truncate(12);
        }
    });
    let model = Model::open(dir.path()).unwrap();
    let fwd = Forward::new(&model, parse_device("cpu").unwrap()).unwrap();
    let e = fwd
        .run(&[vec![5, 6, 7]], &mut (), true)
        .err()
        .expect("a wrong shape is an error")
        .to_string();
    assert!(e.contains(bad) && e.contains("model.safetensors"), "{e}");
}
