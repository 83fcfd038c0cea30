//! Quantised inputs through the binary: a GGUF file (or a folder holding
//! one) is a model like a Hugging Face directory; a truncated GGUF, a GGUF
//! tensor type candle cannot dequantise and an unknown `quant_method` each
//! exit 2 with one `error:` line naming the file and the tensor or key.

use moe_inspect_testkit as common;

use std::process::Command;

use common::{copy_fixture, edit_config, fixture};

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

fn assert_error(model: &std::path::Path, needles: &[&str]) {
    let (code, stdout, stderr) = run(&["analyze", "--model", model.to_str().unwrap()]);
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
fn a_gguf_file_or_its_folder_is_analysed() {
    let file = fixture("qwen3-moe-gguf").join("model.gguf");
    for model in [file.clone(), fixture("qwen3-moe-gguf")] {
        let (code, stdout, stderr) = run(&[
            "analyze",
            "--model",
            model.to_str().unwrap(),
            "--format",
            "json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["model"]["family"], "qwen3_moe", "{stdout}");
        assert_eq!(v["model"]["dtype"], "q4_0", "{stdout}");
    }
}

#[test]
fn truncated_and_unreadable_ggufs_exit_2_naming_file_and_tensor() {
    let bytes = std::fs::read(fixture("qwen3-moe-gguf").join("model.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 4096]).unwrap();
    assert_error(&cut, &["cut.gguf", "truncated", "tensor `blk."]);
    assert_error(
        &fixture("gguf-blocks").join("iq2_xxs.gguf"),
        &["iq2_xxs.gguf", "`blk.1.ffn_gate_exps.weight`", "IQ2_XXS"],
    );
}

#[test]
fn an_unknown_quant_method_exits_2_naming_config_and_value() {
    let dir = copy_fixture("qwen3-moe-fp8");
    edit_config(dir.path(), |c| {
        c["quantization_config"]["quant_method"] = "hqq".into();
    });
    assert_error(dir.path(), &["config.json", "quant_method", "`hqq`"]);
}

#[test]
fn a_mixtral_gguf_has_no_forward_pass_and_says_which_tensor() {
    // llama.cpp permutes Q/K rows for llama; attention is left unmapped.
    let model = fixture("mixtral-gguf").join("model.gguf");
    let ids = common::repo_root().join("golden/fixture-token-ids.txt");
    let (code, _, stderr) = run(&[
        "analyze",
        "--model",
        model.to_str().unwrap(),
        "--analyses",
        "dynamic",
        "--token-ids",
        ids.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("model.gguf") && stderr.contains("self_attn.q_proj.weight"),
        "{stderr}"
    );
    let (code, stdout, stderr) = run(&[
        "analyze",
        "--model",
        model.to_str().unwrap(),
        "--analyses",
        "static",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("mixtral") && stdout.contains("q8_0"),
        "{stdout}"
    );
}
