//! The command line end to end: text output pinned with insta, JSON and
//! Markdown reports checked for content.

use moe_inspect_testkit as common;

use std::process::Command;

use common::{matrix, max_abs_diff, reference, repo_root};

/// Runs the binary from the repository root (so fixture paths in the output are stable).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .current_dir(repo_root())
        .env("NO_COLOR", "1")
        .env_remove("CARGO_TERM_COLOR")
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

#[test]
fn help_texts() {
    insta::assert_snapshot!("help", ok(&["--help"]));
    insta::assert_snapshot!("analyze_help", ok(&["analyze", "--help"]));
    insta::assert_snapshot!("snapshot_help", ok(&["snapshot", "--help"]));
    insta::assert_snapshot!("check_help", ok(&["check", "--help"]));
    insta::assert_snapshot!("review_help", ok(&["review", "--help"]));
    insta::assert_snapshot!("diff_help", ok(&["diff", "--help"]));
}

#[test]
fn runs_as_a_cargo_subcommand_and_directly() {
    // cargo passes the subcommand name as argv[1].
    assert_eq!(ok(&["moe-inspect", "models"]), ok(&["models"]));
}

#[test]
fn models_lists_every_family() {
    insta::assert_snapshot!("models", ok(&["models"]));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["models", "--format", "json"])).unwrap();
    let ids: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model_type"].as_str().unwrap())
        .collect();
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
            "phimoe",
            "llama4",
            "ernie4_5_moe",
            "hunyuan_v1_moe",
            "granitemoe",
            "flex_olmo",
            "dbrx",
            "longcat_flash"
        ]
    );
    // A format `models` cannot write is refused, not answered with the table.
    let (code, stdout, stderr) = run(&["models", "--format", "markdown"]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stderr.contains("invalid value 'markdown'"), "{stderr}");
}

#[test]
fn analyze_table_for_one_layer() {
    insta::assert_snapshot!(
        "analyze_mixtral_layer1_with_dense",
        ok(&[
            "analyze",
            "--model",
            "fixtures/mixtral",
            "--layers",
            "1",
            "--dense-reference",
            "fixtures/mistral-dense"
        ])
    );
}

#[test]
fn analyze_summarises_when_many_layers_are_selected() {
    let dir = tempfile::tempdir().unwrap();
    let g = moe_inspect::bench::synthetic::Geometry {
        layers: 6,
        experts: 4,
        top_k: 2,
        hidden: 16,
        intermediate: 24,
        dtype: "F32",
    };
    moe_inspect::bench::synthetic::write_checkpoint(dir.path(), &g, 3).unwrap();
    let out = ok(&[
        "analyze",
        "--analyses",
        "expert-similarity",
        "--model",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.contains("expert-similarity · 6 layers (summary"),
        "{out}"
    );
    // One row per layer and matrix.
    assert_eq!(out.matches("│ up ").count(), 6, "{out}");
    let out = ok(&[
        "analyze",
        "--analyses",
        "expert-similarity",
        "--model",
        dir.path().to_str().unwrap(),
        "--layers",
        "2..4",
    ]);
    assert!(out.contains("layer 3 · down"), "{out}");
    assert!(!out.contains("layer 4"), "{out}");
}

#[test]
fn json_report_follows_the_schema_and_matches_numpy() {
    let out_dir = tempfile::tempdir().unwrap();
    let stdout = ok(&[
        "analyze",
        "--model",
        "fixtures/grok-1",
        "--format",
        "json",
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json, written);
    assert_eq!(json["schema"], "moe-inspect/report/v1");
    let m = &json["model"];
    assert_eq!(m["family"], "grok-1");
    assert_eq!(m["path"], "fixtures/grok-1");
    assert_eq!(m["moe_layers"], serde_json::json!([0, 1]));
    assert_eq!(m["num_experts"], 8);
    assert_eq!(m["top_k"], 2);
    assert_eq!(m["hidden_size"], 32);
    assert_eq!(m["intermediate_size"], 56);
    assert_eq!(m["dtype"], "f32");
    let r = reference("grok-1");
    for l in json["analyses"]["expert-similarity"]["layers"]
        .as_array()
        .unwrap()
    {
        assert_eq!(l["labels"].as_array().unwrap().len(), 8);
        let want = &r["expert_similarity"][l["layer"].to_string()];
        for name in ["up", "gate", "down"] {
            assert!(max_abs_diff(&matrix(&l[name]), &matrix(&want[name])) <= 1e-5);
        }
    }
}

#[test]
fn markdown_report_writes_one_heatmap_per_layer() {
    let out_dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(&[
        "analyze",
        "--model",
        "fixtures/deepseek-moe",
        "--format",
        "markdown",
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let md = std::fs::read_to_string(out_dir.path().join("report.md")).unwrap();
    for layer in [1, 2] {
        let svg_name = format!("expert-similarity-layer{layer}.svg");
        assert!(md.contains(&format!("]({svg_name})")), "{md}");
        let svg = std::fs::read_to_string(out_dir.path().join(&svg_name)).unwrap();
        // 3 panels (up, gate, down) of 8×8 cells.
        assert_eq!(svg.matches("<title>").count(), 3 * 64);
    }
    // Every static analysis has its figures: neuron similarity heatmaps, the
    // gate-vs-neuron scatter (28 expert pairs per panel), PCA scatters, reorder heatmaps.
    for name in [
        "neuron-similarity-layer2.svg",
        "gate-embedding-layer1.svg",
        "neuron-reorder-layer2.svg",
        "projection-experts-layer1.svg",
        "projection-neurons-layer2.svg",
    ] {
        assert!(md.contains(&format!("]({name})")), "{name} not linked");
        assert!(out_dir.path().join(name).exists(), "{name} not written");
    }
    let scatter =
        std::fs::read_to_string(out_dir.path().join("gate-vs-neuron-layer1.svg")).unwrap();
    assert_eq!(scatter.matches("<circle").count(), 3 * 28);
    assert_eq!(scatter.matches("<line").count(), 3);
    assert!(
        md.contains("| model | up | gate | down |"),
        "Table 3 layout"
    );
    assert!(!out_dir.path().join("expert-similarity-layer0.svg").exists());
}

#[test]
fn dynamic_analyses_on_the_demo_model_from_one_forward_pass() {
    let out_dir = tempfile::tempdir().unwrap();
    let stdout = ok(&[
        "analyze",
        "--analyses",
        "dynamic",
        "--format",
        "json",
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let a = &json["analyses"];
    for name in [
        "output-similarity",
        "norm-score",
        "intermediate",
        "chosen-experts",
    ] {
        assert!(a.get(name).is_some(), "{name} missing");
    }
    assert!(
        a.get("expert-similarity").is_none(),
        "static analyses were not asked for"
    );
    let tokens = a["chosen-experts"]["tokens"].as_u64().unwrap();
    // Every token selects top-2 experts in each of the 4 layers.
    for l in a["chosen-experts"]["layers"].as_array().unwrap() {
        let load: u64 = l["load"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        assert_eq!(load, 2 * tokens);
    }
    // The counts of each layer cover every (token, expert) pair once.
    for l in a["norm-score"]["layers"].as_array().unwrap() {
        let total: u64 = l["counts"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
            .sum();
        assert_eq!(total, 8 * tokens);
    }
    let rate = a["norm-score"]["top1_match_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));
    // Markdown: the figures with decoded tokens on the axis.
    let md_dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(&[
        "analyze",
        "--analyses",
        "chosen-experts,norm-score",
        "--format",
        "markdown",
        "--out",
        md_dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let svg = std::fs::read_to_string(md_dir.path().join("chosen-experts-layer0.svg")).unwrap();
    assert!(svg.contains("&lt;s&gt;"), "decoded BOS token on the axis");
    assert!(md_dir.path().join("norm-score-ranks.svg").exists());
}

#[test]
fn dynamic_analyses_on_a_model_need_prompts() {
    let (code, _, stderr) = run(&[
        "analyze",
        "--analyses",
        "norm-score",
        "--model",
        "fixtures/mixtral",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--prompts FILE"), "{stderr}");
}

/// Shell completions (clap_complete) and the man page (clap_mangen) cover
/// every command.
#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["completions", shell]);
        for word in [
            "analyze",
            "snapshot",
            "check",
            "pending",
            "bench",
            "golden-dir",
        ] {
            assert!(script.contains(word), "{shell}: `{word}` missing");
        }
    }
    let (code, _, stderr) = run(&["completions", "cmd.exe"]);
    assert_eq!(code, 2, "{stderr}");
    let man = ok(&["man"]);
    assert!(man.contains(".TH cargo-moe-inspect 1"), "{man}");
    assert!(man.contains("snapshot") && man.contains("review"), "{man}");
}
