//! Bad inputs: each gets one clear error on stderr that names the file (and
//! tensor or key) and the problem, exit code 2, and never a panic.

use moe_inspect_testkit as common;

use std::path::Path;
use std::process::Command;

use common::{copy_fixture, edit_config, fixture, rewrite_safetensors};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `analyze --model dir` and checks: exit 2, nothing on stdout, one
/// `error:` line containing every `needle`, no panic.
fn assert_input_error(dir: &Path, needles: &[&str]) {
    let (code, stdout, stderr) = run(&["analyze", "--model", dir.to_str().unwrap()]);
    assert_eq!(code, 2, "stderr: {stderr}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
}

#[test]
fn missing_model_directory() {
    assert_input_error(
        Path::new("/nonexistent/model"),
        &["/nonexistent/model", "not found"],
    );
}

#[test]
fn missing_config_json() {
    let dir = copy_fixture("mixtral");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_input_error(dir.path(), &["no config.json"]);
}

#[test]
fn malformed_config_json() {
    let dir = copy_fixture("mixtral");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"mixtral\",",
    )
    .unwrap();
    assert_input_error(dir.path(), &["config.json", "malformed config.json"]);
}

#[test]
fn unknown_model_type_without_moe_tensors() {
    // A dense checkpoint under an unknown family: nothing MoE-shaped to infer.
    // (An MoE checkpoint under an unknown name is inferred: tests/families.rs.)
    let dir = copy_fixture("mistral-dense");
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "gpt2".into());
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    });
    assert_input_error(
        dir.path(),
        &[
            "config.json",
            "unknown model family `gpt2`",
            "no MoE structure could be inferred",
        ],
    );
}

#[test]
fn unknown_model_type_with_a_known_architecture_is_that_architecture() {
    // Kimi-K2 style: `kimi_k2`-like unknown model_type, DeepseekV3ForCausalLM.
    let dir = copy_fixture("mixtral");
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "my_mixtral".into());
    });
    let (code, stdout, stderr) = run(&["analyze", "--model", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("mixtral"), "{stdout}");
    assert!(!stderr.contains("notice"), "{stderr}");
}

#[test]
fn config_value_of_the_wrong_type() {
    let dir = copy_fixture("mixtral");
    edit_config(dir.path(), |c| {
        c.insert("num_local_experts".into(), "eight".into());
    });
    assert_input_error(
        dir.path(),
        &[
            "config.json",
            "`num_local_experts`",
            "expected a non-negative integer",
        ],
    );
}

#[test]
fn missing_required_config_key() {
    let dir = copy_fixture("deepseek-moe");
    edit_config(dir.path(), |c| {
        c.remove("moe_intermediate_size");
    });
    assert_input_error(
        dir.path(),
        &["config.json", "`moe_intermediate_size`", "missing"],
    );
}

#[test]
fn truncated_shard() {
    let dir = copy_fixture("qwen3-moe");
    let shard = dir.path().join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len - 1000).unwrap();
    assert_input_error(
        dir.path(),
        &[
            "model-00002-of-00003.safetensors",
            "truncated",
            "needs bytes",
        ],
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = copy_fixture("mixtral");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#';
    std::fs::write(&path, bytes).unwrap();
    assert_input_error(
        dir.path(),
        &["model.safetensors", "header is not valid JSON"],
    );
}

#[test]
fn tensor_missing_from_the_index() {
    let dir = copy_fixture("qwen3-moe");
    let index = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let name = "model.layers.2.mlp.experts.3.up_proj.weight";
    assert!(v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove(name)
        .is_some());
    std::fs::write(&index, v.to_string()).unwrap();
    assert_input_error(dir.path(), &[&format!("tensor `{name}` is missing")]);
}

#[test]
fn tensor_missing_from_a_single_file() {
    let dir = copy_fixture("grok-1");
    let name = "model.layers.1.moe_block.experts.5.linear_1.weight";
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, _| {
        if spec.name == name {
            spec.name = "unrelated.weight".into();
        }
    });
    assert_input_error(dir.path(), &[&format!("tensor `{name}` is missing")]);
}

#[test]
fn shape_that_does_not_match_the_config() {
    let dir = copy_fixture("mixtral");
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), 50.into());
    });
    assert_input_error(
        dir.path(),
        &[
            "model.safetensors",
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "[48, 32]",
            "[50, 32]",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    let dir = copy_fixture("mixtral");
    let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == name {
            // Same bytes read as i32: a dtype the analyses cannot read.
            spec.dtype = "I32".into();
            assert_eq!(bytes.len(), spec.nbytes());
        }
    });
    assert_input_error(
        dir.path(),
        &["model.safetensors", name, "dtype I32", "not supported"],
    );
}

#[test]
fn nan_weights() {
    let dir = copy_fixture("olmoe");
    let name = "model.layers.1.mlp.experts.4.down_proj.weight";
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == name {
            // A bf16 NaN in the middle of the tensor.
            bytes[10..12].copy_from_slice(&0x7fc0u16.to_le_bytes());
        }
    });
    assert_input_error(dir.path(), &["model.safetensors", name, "NaN"]);
}

#[test]
fn no_safetensors_in_the_directory() {
    let dir = copy_fixture("mixtral");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_input_error(dir.path(), &["no model.safetensors"]);
}

#[test]
fn dense_reference_of_the_wrong_shape() {
    let (code, _, stderr) = run(&[
        "analyze",
        "--model",
        fixture("qwen2-moe").to_str().unwrap(),
        "--dense-reference",
        fixture("mistral-dense").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("mistral-dense/config.json"), "{stderr}");
    assert!(
        stderr.contains("dense reference has hidden 32 × intermediate 48"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for (args, needle) in [
        (vec!["analyze", "--layers", "3..1"], "--layers"),
        (vec!["analyze", "--layers", "40"], "layer 40 does not exist"),
        (
            vec!["analyze", "--analyses", "nonsense"],
            "unknown analysis `nonsense`",
        ),
        (vec!["analyze", "--device", "tpu"], "--device"),
        (vec!["analyze", "--format", "yaml"], "yaml"),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let (code, _, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
