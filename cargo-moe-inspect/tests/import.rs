//! `import` (issue 15): each engine's routing record, written in the engine's
//! own layout by fixtures/engine-traces/make_engine_traces.py from a
//! transformers forward pass of fixtures/qwen3-moe, converts into a trace
//! whose chosen-experts load equals the transformers reference and this
//! tool's own `trace` of the same token ids; mismatches with the model exit 2.

use moe_inspect_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, repo_root};
use serde_json::Value;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn traces() -> PathBuf {
    repo_root().join("fixtures/engine-traces")
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(traces().join("expected.json")).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (per-layer load, tokens) of a chosen-experts JSON report.
fn loads(json: &str) -> (Vec<Vec<u64>>, u64) {
    let v: Value = serde_json::from_str(json).unwrap();
    let c = &v["analyses"]["chosen-experts"];
    let layers = c["layers"].as_array().unwrap();
    let load = layers
        .iter()
        .map(|l| {
            l["load"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect();
    for l in layers {
        for key in ["balancedness", "cv", "dead_share", "entropy_ratio"] {
            assert!(l[key].as_f64().unwrap().is_finite(), "{key} not finite");
        }
    }
    (load, c["tokens"].as_u64().unwrap())
}

fn expected_load() -> Vec<Vec<u64>> {
    let e = expected();
    e["load"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect()
}

fn import(from: &str, path: &Path, model: &Path, out: &Path) -> (i32, String) {
    let (code, _, stderr) = run(&[
        "import",
        "--from",
        from,
        s(path),
        "--model",
        s(model),
        "--output",
        s(out),
    ]);
    (code, stderr)
}

fn analyze_trace(trace: &Path, model: Option<&Path>) -> (Vec<Vec<u64>>, u64) {
    let mut args = vec![
        "analyze",
        "--trace",
        s(trace),
        "--analyses",
        "chosen-experts",
        "--format",
        "json",
    ];
    if let Some(m) = model {
        args.extend(["--model", s(m)]);
    }
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stderr}");
    loads(&stdout)
}

/// Every engine's record, per-token and counts-only, gives the load of the
/// transformers reference, which is also what this tool's own `trace` and
/// forward pass give on the same token ids.
#[test]
fn every_engine_import_gives_the_load_of_the_models_own_trace() {
    let model = fixture("qwen3-moe");
    let dir = tempfile::tempdir().unwrap();
    let want = expected_load();
    assert_eq!(want.len(), 2);
    assert_eq!(
        want.iter()
            .map(|l| l.iter().sum::<u64>())
            .collect::<Vec<_>>(),
        vec![84, 84]
    );

    // The tool's own trace and forward pass of the same token ids.
    let own = dir.path().join("own.safetensors");
    let ids = traces().join("prompts.txt");
    let (code, _, stderr) = run(&[
        "trace",
        "--model",
        s(&model),
        "--token-ids",
        s(&ids),
        "--output",
        s(&own),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(analyze_trace(&own, None), (want.clone(), 42));
    let (code, stdout, stderr) = run(&[
        "analyze",
        "--model",
        s(&model),
        "--token-ids",
        s(&ids),
        "--analyses",
        "chosen-experts",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(loads(&stdout), (want.clone(), 42));

    let cases: [(&str, &str, bool); 9] = [
        ("vllm", "vllm/responses.jsonl", true),
        ("sglang", "sglang/requests.jsonl", true),
        ("vllm", "vllm/npy", true),
        ("sglang", "sglang/per_token", true),
        ("sglang", "sglang/per_token_tp", true),
        ("sglang", "sglang/per_pass", false),
        ("sglang", "sglang/stat", false),
        ("megatron", "megatron", true),
        ("trtllm", "trtllm", false),
    ];
    for (from, path, per_token) in cases {
        let out = dir
            .path()
            .join(format!("{}.safetensors", path.replace('/', "_")));
        let (code, stderr) = import(from, &traces().join(path), &model, &out);
        assert_eq!(code, 0, "{from} {path}: {stderr}");
        assert!(stderr.contains("wrote"), "{stderr}");
        let (load, tokens) = analyze_trace(&out, Some(&model));
        assert_eq!(load, want, "{from} {path}");
        assert_eq!(tokens, 42, "{from} {path}");
        // Without --model the trace alone says how many experts there are.
        assert_eq!(analyze_trace(&out, None).0, want, "{from} {path}");
        let r = moe_inspect::trace::read(&out, None).unwrap();
        assert_eq!(r.selected.is_some(), per_token, "{from} {path}");
        assert_eq!(r.expert_counts.is_some(), !per_token, "{from} {path}");
        assert_eq!(r.source, from);
    }
}

/// Per-token imports hold the transformers top-2 of every token, in prompt
/// order, with the token ids where the engine records them (Megatron: none)
/// and Megatron's bf16 logits sidecar within bf16 rounding of the tool's own
/// router logits.
#[test]
fn per_token_imports_hold_each_tokens_experts_and_ids() {
    let model = fixture("qwen3-moe");
    let dir = tempfile::tempdir().unwrap();
    let e = expected();
    let prompts: Vec<Vec<i64>> = e["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect();
    // [prompt][token][layer] → sorted pair
    let want: Vec<Vec<u16>> = e["selected"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p.as_array().unwrap().clone())
        .map(|tok| {
            tok.as_array()
                .unwrap()
                .iter()
                .flat_map(|layer| {
                    let mut v: Vec<u16> = layer
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u16)
                        .collect();
                    v.sort_unstable();
                    v
                })
                .collect()
        })
        .collect();
    assert_eq!(want.len(), 42);
    let own = dir.path().join("own.safetensors");
    let (code, _, stderr) = run(&[
        "trace",
        "--model",
        s(&model),
        "--token-ids",
        s(&traces().join("prompts.txt")),
        "--output",
        s(&own),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let own = moe_inspect::trace::read(&own, None).unwrap();
    for (from, path, ids) in [
        ("vllm", "vllm/responses.jsonl", true),
        ("vllm", "vllm/npy", true),
        ("sglang", "sglang/per_token", true),
        ("sglang", "sglang/per_token_tp", true),
        ("sglang", "sglang/requests.jsonl", false),
        ("megatron", "megatron", false),
    ] {
        let out = dir.path().join("t.safetensors");
        let (code, stderr) = import(from, &traces().join(path), &model, &out);
        assert_eq!(code, 0, "{stderr}");
        let r = moe_inspect::trace::read(&out, None).unwrap();
        assert_eq!(r.prompt_lengths, vec![20, 13, 9], "{from} {path}");
        assert_eq!(
            (r.num_experts, r.top_k, r.moe_layers.clone()),
            (8, 2, vec![1, 2])
        );
        let sel = r.selected.as_ref().unwrap();
        assert_eq!(sel.len(), 42 * 2 * 2);
        let got: Vec<Vec<u16>> = sel
            .chunks_exact(4)
            .map(|t| {
                let mut a = t[..2].to_vec();
                let mut b = t[2..].to_vec();
                a.sort_unstable();
                b.sort_unstable();
                [a, b].concat()
            })
            .collect();
        assert_eq!(got, want, "{from} {path}");
        if ids {
            assert_eq!(
                r.token_ids.as_ref().unwrap(),
                &prompts.concat(),
                "{from} {path}"
            );
        } else {
            assert!(r.token_ids.is_none(), "{from}: token ids invented");
        }
        match from {
            "megatron" => {
                let got = r.router_logits.as_ref().unwrap();
                let own = own.router_logits.as_ref().unwrap();
                assert_eq!(got.len(), own.len());
                for (a, b) in got.iter().zip(own) {
                    assert!(
                        a.is_finite() && (a - b).abs() <= b.abs() / 128.0 + 1e-6,
                        "{a} vs {b}"
                    );
                }
            }
            _ => assert!(r.router_logits.is_none(), "{from}: logits invented"),
        }
        assert!(r.routing_weights.is_none());
    }
}

/// A record that does not match the model is one exit-2 error naming the
/// file and the mismatch, for each engine.
#[test]
fn records_that_do_not_match_the_model_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.safetensors");
    let t = traces();
    // mixtral: 2 layers, both MoE; qwen2-moe: 6 experts. (vLLM records only
    // MoE-layer columns, so a same-shaped model is indistinguishable.)
    let cases: [(&str, PathBuf, &str, &str, &str); 9] = [
        (
            "sglang",
            t.join("sglang/requests.jsonl"),
            "mixtral",
            "requests.jsonl",
            "recorded with another layer count or top-k?",
        ),
        (
            "vllm",
            t.join("vllm/responses.jsonl"),
            "qwen2-moe",
            "responses.jsonl",
            "expert id 6 is out of range (the model has 6 experts)",
        ),
        (
            "vllm",
            t.join("vllm/npy"),
            "qwen2-moe",
            "response0.json",
            "out of range (the model has 6 experts)",
        ),
        (
            "sglang",
            t.join("sglang/per_token"),
            "mixtral",
            ".pt",
            "the model has 2 layers",
        ),
        (
            "sglang",
            t.join("sglang/per_token"),
            "qwen2-moe",
            ".pt",
            "out of range (the model has 6 experts)",
        ),
        (
            "sglang",
            t.join("sglang/stat"),
            "qwen2-moe",
            ".pt",
            "6 experts",
        ),
        (
            "megatron",
            t.join("megatron"),
            "mixtral",
            "router_trace_rank0.jsonl",
            "line 2: layer 2 is not an MoE layer of the model (MoE layers [0, 1])",
        ),
        (
            "trtllm",
            t.join("trtllm"),
            "mixtral",
            "rank0.safetensors",
            "tensor `0_2`: layer 2 is not an MoE layer of the model (MoE layers [0, 1])",
        ),
        (
            "trtllm",
            t.join("trtllm"),
            "qwen2-moe",
            "meta_info.json",
            "`num_experts` is 8, the model has 6 experts",
        ),
    ];
    for (from, path, model, file, what) in cases {
        let (code, stderr) = import(from, &path, &fixture(model), &out);
        assert_eq!(code, 2, "{from} on {model}: {stderr}");
        assert!(
            stderr.contains(file) && stderr.contains(what),
            "{from} on {model}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!out.exists(), "nothing written on error");
    }

    // Edited records: wrong top-k, wrong layer count, a dense layer.
    let line = std::fs::read_to_string(t.join("vllm/responses.jsonl")).unwrap();
    let mut v: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let routes = v["prompt_routed_experts"].clone();
    let one_expert: Vec<Value> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|tok| {
            Value::Array(
                tok.as_array()
                    .unwrap()
                    .iter()
                    .map(|l| Value::Array(vec![l[0].clone()]))
                    .collect(),
            )
        })
        .collect();
    v["prompt_routed_experts"] = Value::Array(one_expert);
    let f = dir.path().join("topk.json");
    std::fs::write(&f, v.to_string()).unwrap();
    let (code, stderr) = import("vllm", &f, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("topk.json")
            && stderr.contains("selects 1 experts per token, the model's top-k is 2"),
        "{stderr}"
    );

    let three_layers: Vec<Value> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|tok| {
            let mut l = tok.as_array().unwrap().clone();
            l.push(l[0].clone());
            Value::Array(l)
        })
        .collect();
    v["prompt_routed_experts"] = Value::Array(three_layers);
    let f = dir.path().join("layers.json");
    std::fs::write(&f, v.to_string()).unwrap();
    let (code, stderr) = import("vllm", &f, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("layers.json") && stderr.contains("covers 3 MoE layers, the model has 2"),
        "{stderr}"
    );

    let mega = std::fs::read_to_string(t.join("megatron/router_trace_rank1.jsonl")).unwrap();
    let m = dir.path().join("router_trace_rank1.jsonl");
    std::fs::write(&m, mega.replacen("\"layer\": 1", "\"layer\": 0", 1)).unwrap();
    let (code, stderr) = import("megatron", &m, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("line 1: layer 0 is not an MoE layer"),
        "{stderr}"
    );
    let second_layer_only: String = mega.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&m, second_layer_only).unwrap();
    let (code, stderr) = import("megatron", &m, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("rank 1, step 0: no record of MoE layers [1]"),
        "{stderr}"
    );
    std::fs::write(&m, mega.replacen("[[", "[[9, 1], [", 1)).unwrap();
    let (code, stderr) = import("megatron", &m, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("`top_indices` has 10 rows, `num_tokens` is 9"),
        "{stderr}"
    );

    // A logits sidecar offset past the end of the sidecar.
    std::fs::copy(
        t.join("megatron/logits_rank1.bin"),
        dir.path().join("logits_rank1.bin"),
    )
    .unwrap();
    std::fs::write(
        &m,
        mega.replacen("\"logit_offset\": 0", "\"logit_offset\": 100000", 1),
    )
    .unwrap();
    let (code, stderr) = import("megatron", &m, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("logits_rank1.bin") && stderr.contains("past the end of the file"),
        "{stderr}"
    );
    std::fs::write(&m, &mega).unwrap();
    let (code, stderr) = import("megatron", &m, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 0, "the unedited copy imports: {stderr}");

    // Garbage instead of a torch.save archive.
    let pt = dir.path().join("x.pt");
    std::fs::write(&pt, b"not a zip").unwrap();
    let (code, stderr) = import("sglang", &pt, &fixture("qwen3-moe"), &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("x.pt") && stderr.contains("not a torch.save zip archive"),
        "{stderr}"
    );
}

/// `analyze --trace` runs only what needs routing, and checks the trace
/// against --model.
#[test]
fn analyze_trace_refuses_what_needs_the_model_and_mismatched_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.safetensors");
    let (code, stderr) = import(
        "trtllm",
        &traces().join("trtllm"),
        &fixture("qwen3-moe"),
        &out,
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run(&[
        "analyze",
        "--trace",
        s(&out),
        "--analyses",
        "expert-similarity",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("`expert-similarity` needs the model's weights"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&[
        "analyze",
        "--trace",
        s(&out),
        "--model",
        s(&fixture("mixtral")),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("t.safetensors") && stderr.contains("the model's MoE layers are [0, 1]"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&[
        "analyze",
        "--trace",
        s(&out),
        "--model",
        s(&fixture("qwen2-moe")),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("the trace has 8 experts per layer, the model 6"),
        "{stderr}"
    );
    // --layers selects MoE layers of the trace.
    let (code, stdout, stderr) = run(&[
        "analyze",
        "--trace",
        s(&out),
        "--layers",
        "2",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (load, _) = loads(&stdout);
    assert_eq!(load, vec![expected_load()[1].clone()]);
    // The output may not replace the input record.
    let (code, stderr) = import(
        "trtllm",
        &traces().join("trtllm"),
        &fixture("qwen3-moe"),
        &traces().join("trtllm/rank0.safetensors"),
    );
    assert_eq!(code, 2, "{stderr}");
}

fn run_env(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .env("MOE_INSPECT_UPDATE", "no")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `snapshot --trace` records the routing of a trace; `check --trace` exits 0
/// on the same routing (this tool's trace, or an engine's import of the same
/// prompts) and 1 when one layer's routing was altered, naming only that layer.
#[test]
fn check_trace_exits_1_when_one_layers_routing_was_altered() {
    let model = fixture("qwen3-moe");
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden");
    std::fs::create_dir(&golden).unwrap();
    let own = dir.path().join("own.safetensors");
    let (code, _, stderr) = run(&[
        "trace",
        "--model",
        s(&model),
        "--token-ids",
        s(&traces().join("prompts.txt")),
        "--output",
        s(&own),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let common = [
        "--model",
        s(&model),
        "--golden-dir",
        s(&golden),
        "--format",
        "json",
    ];
    let (code, _, stderr) =
        run_env(&[&["snapshot", "--trace", s(&own)][..], &common[..4]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(golden.join("qwen3-moe.json").exists());

    let check = |trace: &Path| -> (i32, Value) {
        let (code, stdout, stderr) =
            run_env(&[&["check", "--trace", s(trace)][..], &common[..]].concat());
        assert!(code == 0 || code == 1, "{stderr}");
        (
            code,
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}")),
        )
    };
    let metrics = |v: &Value| -> Vec<(String, u64, String)> {
        v["models"][0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["metric"].as_str().unwrap().to_string(),
                    r["layer"].as_u64().unwrap(),
                    r["verdict"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let (code, v) = check(&own);
    assert_eq!(code, 0);
    let rows = metrics(&v);
    assert_eq!(
        rows.len(),
        8,
        "top-1, top-k, jsd, load-shift × 2 layers: {rows:?}"
    );
    assert!(rows.iter().all(|r| r.2 == "ok"));

    // SGLang's import of the same prompts: the same routing.
    let sg = dir.path().join("sglang.safetensors");
    let (code, stderr) = import("sglang", &traces().join("sglang/per_token"), &model, &sg);
    assert_eq!(code, 0, "{stderr}");
    let (code, v) = check(&sg);
    assert_eq!(code, 0, "{v}");
    assert_eq!(metrics(&v).len(), 8);

    // Layer 2's routing altered: every token's experts shifted by one.
    let mut r = moe_inspect::trace::read(&own, None).unwrap();
    let sel = r.selected.as_mut().unwrap();
    for tok in sel.chunks_exact_mut(4) {
        for x in &mut tok[2..] {
            *x = (*x + 1) % 8;
        }
    }
    let altered = dir.path().join("altered.safetensors");
    moe_inspect::trace::write(&r, &altered).unwrap();
    let (code, v) = check(&altered);
    assert_eq!(code, 1, "{v}");
    let rows = metrics(&v);
    assert_eq!(rows.len(), 8);
    let drifted: Vec<_> = rows.iter().filter(|r| r.2 != "ok").collect();
    assert!(!drifted.is_empty());
    assert!(
        drifted.iter().all(|r| r.1 == 2),
        "only layer 2 drifts: {drifted:?}"
    );
    assert!(
        drifted.iter().any(|r| r.0 == "routing-topk-agreement"),
        "{drifted:?}"
    );

    // A golden recorded from the model's own forward pass (all analyses) on
    // the same token ids: an engine's trace is gated on routing, the rest is
    // noted as not recomputed.
    let g2 = dir.path().join("golden2");
    std::fs::create_dir(&g2).unwrap();
    let (code, _, stderr) = run_env(&[
        "snapshot",
        "--model",
        s(&model),
        "--token-ids",
        s(&traces().join("prompts.txt")),
        "--golden-dir",
        s(&g2),
    ]);
    assert_eq!(code, 0, "{stderr}");
    for (trace, want) in [(&sg, 0), (&altered, 1)] {
        let (code, stdout, stderr) = run_env(&[
            "check",
            "--trace",
            s(trace),
            "--model",
            s(&model),
            "--golden-dir",
            s(&g2),
            "--format",
            "json",
        ]);
        assert_eq!(code, want, "{stdout} {stderr}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(metrics(&v).len(), 8, "{v}");
        let notices = v["models"][0]["notices"].to_string();
        assert!(
            notices.contains("not recomputed, so not compared: expert-similarity"),
            "{notices}"
        );
    }

    // A counts-only trace gates load-shift and the load JSD only.
    let trt = dir.path().join("trt.safetensors");
    let (code, stderr) = import("trtllm", &traces().join("trtllm"), &model, &trt);
    assert_eq!(code, 0, "{stderr}");
    let (code, v) = check(&trt);
    assert_eq!(code, 0, "{v}");
    let names: Vec<String> = metrics(&v).into_iter().map(|r| r.0).collect();
    assert_eq!(
        names,
        ["router-jsd", "load-shift", "router-jsd", "load-shift"]
    );
}

/// vLLM's whole-sequence form: without `prompt_routed_experts`,
/// `choices[0].routed_experts` holds prompt + generated − 1 rows and is split
/// at the prompt length; a row count that does not fit is refused.
#[test]
fn vllm_whole_sequence_routing_is_split_at_the_prompt() {
    let model = fixture("qwen3-moe");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(traces().join("vllm/responses.jsonl")).unwrap();
    let mut lines = Vec::new();
    for line in text.lines() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        let mut rows = v["prompt_routed_experts"].as_array().unwrap().clone();
        let gen = v["choices"][0]["routed_experts"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(
            gen.len() + 1,
            v["choices"][0]["token_ids"].as_array().unwrap().len()
        );
        rows.extend(gen);
        v["choices"][0]["routed_experts"] = Value::Array(rows);
        v.as_object_mut().unwrap().remove("prompt_routed_experts");
        lines.push(v.to_string());
    }
    let f = dir.path().join("whole.jsonl");
    std::fs::write(&f, lines.join("\n")).unwrap();
    let out = dir.path().join("t.safetensors");
    let (code, stderr) = import("vllm", &f, &model, &out);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("6 generated tokens' routing"), "{stderr}");
    assert_eq!(analyze_trace(&out, Some(&model)), (expected_load(), 42));

    // One row short: refused, naming the counts.
    let mut v: Value = serde_json::from_str(&lines[0]).unwrap();
    v["choices"][0]["routed_experts"]
        .as_array_mut()
        .unwrap()
        .pop();
    std::fs::write(&f, v.to_string()).unwrap();
    let (code, stderr) = import("vllm", &f, &model, &out);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("has 21 rows; 20 prompt + 3 generated tokens need 22"),
        "{stderr}"
    );
}

/// `diff --trace A --trace B --model DIR`: two routing records of one model
/// compared without reading weights; exit 0 on the same routing (the tool's
/// own trace vs SGLang's import of the same prompts), 1 when one layer's
/// routing was altered, and only that layer drifts.
#[test]
fn diff_of_two_traces_compares_their_routing() {
    let model = fixture("qwen3-moe");
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.safetensors");
    let (code, _, stderr) = run(&[
        "trace",
        "--model",
        s(&model),
        "--token-ids",
        s(&traces().join("prompts.txt")),
        "--output",
        s(&own),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let sg = dir.path().join("sglang.safetensors");
    let (code, stderr) = import("sglang", &traces().join("sglang/per_token"), &model, &sg);
    assert_eq!(code, 0, "{stderr}");
    let mut r = moe_inspect::trace::read(&own, None).unwrap();
    for tok in r.selected.as_mut().unwrap().chunks_exact_mut(4) {
        for x in &mut tok[2..] {
            *x = (*x + 1) % 8;
        }
    }
    let altered = dir.path().join("altered.safetensors");
    moe_inspect::trace::write(&r, &altered).unwrap();

    let diff = |b: &Path| -> (i32, Value) {
        let (code, stdout, stderr) = run_env(&[
            "diff",
            "--trace",
            s(&own),
            "--trace",
            s(b),
            "--model",
            s(&model),
            "--format",
            "json",
        ]);
        assert!(code == 0 || code == 1, "{stderr}");
        (code, serde_json::from_str(&stdout).unwrap())
    };
    let (code, v) = diff(&sg);
    assert_eq!(code, 0, "{v}");
    let rows = v["comparison"]["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        8,
        "top-1, top-k, jsd, load-shift × 2 layers: {v}"
    );
    assert!(rows.iter().all(|r| r["verdict"] == "ok"), "{v}");
    assert_eq!(v["expert_cosine"].as_array().map(Vec::len), Some(0));

    let (code, v) = diff(&altered);
    assert_eq!(code, 1, "{v}");
    let rows = v["comparison"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    let drifted: Vec<&Value> = rows.iter().filter(|r| r["verdict"] != "ok").collect();
    assert!(!drifted.is_empty(), "{v}");
    assert!(drifted.iter().all(|r| r["layer"] == 2), "{drifted:?}");

    // One trace, or traces without --model, are usage errors.
    let (code, _, stderr) = run_env(&["diff", "--trace", s(&own), "--model", s(&model)]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("exactly two traces"), "{stderr}");
    let (code, _, stderr) = run_env(&["diff", "--trace", s(&own), "--trace", s(&sg)]);
    assert_eq!(code, 2, "{stderr}");
}
