//! The family table end to end: fused-expert twins give the same analyses
//! and forward as their per-expert originals, the new families run the static
//! analyses and refuse forward-needing commands with a clear exit-2 error.

use moe_inspect_testkit as common;

use std::process::Command;

use common::{copy_fixture, edit_config, repo_root, FAMILY_FIXTURES};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .current_dir(repo_root())
        .env("NO_COLOR", "1")
        .env_remove("CARGO_TERM_COLOR")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("MOE_INSPECT_UPDATE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stdout
}

/// `analyze --format json`, with the model directory (the one thing that
/// differs between twins) replaced by a placeholder.
fn analysis_json(dir: &str, analyses: &str) -> String {
    let out = ok(&[
        "analyze",
        "--model",
        dir,
        "--analyses",
        analyses,
        "--token-ids",
        "golden/fixture-token-ids.txt",
        "--format",
        "json",
    ]);
    assert!(out.contains(dir), "the report names its model");
    out.replace(dir, "<model>")
}

#[test]
fn a_fused_twin_gives_byte_identical_analyses_and_forward() {
    for name in ["mixtral", "qwen3-moe"] {
        let per_expert = format!("fixtures/{name}");
        let fused = format!("fixtures/fused/{name}");
        // Static and dynamic (a forward pass over the prompts) analyses.
        let a = analysis_json(&per_expert, "all");
        let b = analysis_json(&fused, "all");
        assert!(
            a.contains("\"output-similarity\""),
            "{name}: dynamic analyses ran"
        );
        assert_eq!(a, b, "{name}: fused twin differs");
    }
}

#[test]
fn granite_hub_and_transformers_5_layouts_give_the_same_analyses() {
    // Hub: block_sparse_moe.input_linear/output_linear + router.layer;
    // transformers 5: block_sparse_moe.experts.gate_up_proj/down_proj + router.
    let a = analysis_json("fixtures/families/granitemoe", "static");
    let b = analysis_json("fixtures/fused/granitemoe", "static");
    assert!(a.contains("\"expert-similarity\""));
    assert_eq!(a, b);
}

#[test]
fn longcat_hub_and_transformers_5_layouts_give_the_same_analyses() {
    // Hub: per-expert, with unused gate/up slots of the 3 zero experts;
    // transformers 5: gate_up_proj [8 + 3, 2I, H], down_proj [8, H, I].
    let a = analysis_json("fixtures/families/longcat_flash", "static");
    let b = analysis_json("fixtures/fused/longcat_flash", "static");
    assert!(a.contains("\"gate-embedding\""));
    assert_eq!(a, b);
}

#[test]
fn the_fused_twin_traces_the_same_routing() {
    let dir = tempfile::tempdir().unwrap();
    let mut traces = Vec::new();
    for (i, model) in ["fixtures/qwen3-moe", "fixtures/fused/qwen3-moe"]
        .iter()
        .enumerate()
    {
        let out = dir.path().join(format!("t{i}.safetensors"));
        ok(&[
            "trace",
            "--model",
            model,
            "--token-ids",
            "golden/fixture-token-ids.txt",
            "--output",
            out.to_str().unwrap(),
        ]);
        let w = moe_inspect::model::Weights::open_file(&out).unwrap();
        let mut tensors: Vec<(String, Vec<u8>)> = w
            .names()
            .into_iter()
            .map(|n| (n.to_string(), w.raw(n).unwrap().2.to_vec()))
            .collect();
        tensors.sort();
        assert!(tensors.len() > 1);
        traces.push(tensors);
    }
    assert_eq!(traces[0], traces[1]);
}

#[test]
fn every_new_family_runs_the_static_analyses() {
    for name in FAMILY_FIXTURES {
        let dir = format!("fixtures/{name}");
        let json: serde_json::Value = serde_json::from_str(&analysis_json(&dir, "static")).unwrap();
        let text = json.to_string();
        assert!(text.contains("\"expert-similarity\""), "{name}");
        assert!(!text.contains("NaN"), "{name}");
    }
}

#[test]
fn forward_commands_on_a_family_without_native_forward_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.safetensors");
    for args in [
        vec![
            "trace",
            "--model",
            "fixtures/families/hunyuan_v1_moe",
            "--token-ids",
            "golden/fixture-token-ids.txt",
            "--output",
            out.to_str().unwrap(),
        ],
        vec![
            "analyze",
            "--model",
            "fixtures/families/phimoe",
            "--analyses",
            "dynamic",
            "--token-ids",
            "golden/fixture-token-ids.txt",
        ],
    ] {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stdout}");
        assert!(
            stderr.contains("static analyses only") && stderr.contains("engine trace"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn glm_and_minimax_run_the_dynamic_analyses_natively() {
    // Their forward pass matches transformers (tests/forward_reference.rs,
    // tests/forward_deepseek_v32.rs, tests/forward_llama4.rs); here the
    // commands that need it run end to end.
    for name in [
        "glm4_moe",
        "minimax_m2",
        "deepseek_v32",
        "llama4",
        "llama4_multimodal",
    ] {
        let dir = format!("fixtures/families/{name}");
        let json: serde_json::Value = serde_json::from_str(&analysis_json(&dir, "all")).unwrap();
        let text = json.to_string();
        assert!(
            text.contains("\"output-similarity\"") && text.contains("\"expert-similarity\""),
            "{name}: {text}"
        );
        assert!(!text.contains("NaN"), "{name}");
    }
}

#[test]
fn models_lists_every_family_of_the_table() {
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["models", "--format", "json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), moe_inspect::model::family::FAMILIES.len());
    for r in rows {
        let forward = r["forward"].as_str().unwrap();
        assert!(forward == "native" || forward == "trace", "{r}");
        assert!(!r["router_rule"].as_str().unwrap().is_empty(), "{r}");
        assert!(!r["layout"].as_str().unwrap().is_empty(), "{r}");
    }
    let native: Vec<&str> = rows
        .iter()
        .filter(|r| r["forward"] == "native")
        .map(|r| r["model_type"].as_str().unwrap())
        .collect();
    assert_eq!(native.len(), 16);
    for f in [
        "granitemoe",
        "glm4_moe",
        "minimax_m2",
        "gpt_oss",
        "deepseek_v32",
        "llama4",
        "qwen3_next",
        "qwen3_5_moe",
    ] {
        assert!(native.contains(&f), "{f}");
    }
}

/// The `analyses` part of `analyze --format json` (the rest names the model and family).
fn analyses_of(json: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let a = v["analyses"].clone();
    assert!(a.is_object(), "{v}");
    a
}

#[test]
fn a_family_the_table_does_not_know_is_inferred_from_its_tensors() {
    // Per-expert (qwen3-moe: a dense layer 0, sharded), fused (gpt-oss's
    // interleaved layout is not inferable; the fused qwen3-moe twin is), and a
    // Mixtral-named one (w1/w3/w2 under block_sparse_moe).
    for name in [
        "qwen3-moe",
        "fused/qwen3-moe",
        "mixtral",
        "families/hunyuan_v1_moe",
    ] {
        let dir = copy_fixture(name);
        edit_config(dir.path(), |c| {
            c.insert("model_type".into(), "brand_new_moe".into());
            c.insert(
                "architectures".into(),
                serde_json::json!(["BrandNewMoeForCausalLM"]),
            );
        });
        let path = dir.path().to_str().unwrap();
        let args = |d: &str| {
            vec![
                "analyze".to_string(),
                "--model".to_string(),
                d.to_string(),
                "--format".to_string(),
                "json".to_string(),
            ]
        };
        let a: Vec<String> = args(path);
        let (code, stdout, stderr) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{name}: {stderr}");
        assert!(
            stderr.contains("notice:")
                && stderr.contains("brand_new_moe")
                && stderr.contains("inferred")
                && stderr.contains("router"),
            "{name}: {stderr}"
        );
        let original = ok(&args(&format!("fixtures/{name}"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
        assert_eq!(
            analyses_of(&stdout),
            analyses_of(&original),
            "{name}: inferred analyses differ from the known family's"
        );
    }
}

#[test]
fn snapshot_of_a_static_only_family_records_the_static_analyses() {
    let golden = tempfile::tempdir().unwrap();
    let g = golden.path().to_str().unwrap();
    let (code, _, stderr) = run(&[
        "snapshot",
        "--model",
        "fixtures/families/hunyuan_v1_moe",
        "--golden-dir",
        g,
        "--name",
        "glm",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("static analyses only"), "{stderr}");
    let (code, stdout, stderr) = run(&[
        "check",
        "--model",
        "fixtures/families/hunyuan_v1_moe",
        "--golden-dir",
        g,
        "--name",
        "glm",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Asked for explicitly, routing needs a forward pass: exit 2.
    let (code, _, stderr) = run(&[
        "snapshot",
        "--model",
        "fixtures/families/hunyuan_v1_moe",
        "--golden-dir",
        g,
        "--name",
        "glm2",
        "--analyses",
        "all",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("static analyses only"), "{stderr}");
}
