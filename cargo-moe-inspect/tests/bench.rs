//! `cargo moe-inspect bench` end to end, kept fast: one small routing
//! benchmark with `--quick` (tiny probes, few samples). Checks the report
//! files, the bench.json schema, baselines and the exit code on a regression.

use std::path::Path;
use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"));
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("CARGO_TERM_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BENCH: &str = "routing/softmax-topk/e8-k2/";

fn quick(out: &Path, baselines: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "bench",
        "--quick",
        "--filter",
        BENCH,
        "--tokens",
        "4,32",
        "--out",
        out.to_str().unwrap(),
        "--baseline-dir",
        baselines.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args, &[])
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn help() {
    let (code, stdout, _) = run(&["bench", "--help"], &[]);
    assert_eq!(code, 0);
    insta::assert_snapshot!("bench_help", stdout);
}

#[test]
fn writes_the_report_and_flags_a_regression_against_a_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, baselines) = (tmp.path().join("report"), tmp.path().join("baselines"));
    let (code, stdout, stderr) = quick(&out, &baselines, &["--save-baseline", "before"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("cpu/routing/softmax-topk/e8-k2/n4"),
        "{stdout}"
    );
    assert!(stdout.contains("tokens/s") && stdout.contains("measured peak"));

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("`cpu/routing/softmax-topk/e8-k2/n32`"), "{md}");
    assert!(md.contains("throughput-routing.svg") && md.contains("roofline.svg"));
    for svg in ["throughput-routing.svg", "roofline.svg"] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }

    let json = read_json(&out.join("bench.json"));
    assert_eq!(json["schema"], "moe-inspect/bench/v1");
    assert_eq!(json["device"], "cpu");
    assert!(json["machine"]["peak_gflops"].as_f64().unwrap() > 0.0);
    assert!(json["machine"]["peak_gbs"].as_f64().unwrap() > 0.0);
    let benches = json["benchmarks"].as_array().unwrap();
    assert_eq!(benches.len(), 2);
    let b = &benches[1];
    assert_eq!(b["name"], "cpu/routing/softmax-topk/e8-k2/n32");
    assert_eq!(b["group"], "routing");
    assert_eq!(b["variant"], "softmax-topk");
    assert_eq!(b["model"], "e8-k2");
    assert_eq!(b["tokens"], 32);
    let mean = b["mean_s"].as_f64().unwrap();
    assert!(b["ci_low_s"].as_f64().unwrap() <= mean && mean <= b["ci_high_s"].as_f64().unwrap());
    assert!(b["samples_s"].as_array().unwrap().len() >= 3);
    assert!((b["tokens_per_s"].as_f64().unwrap() - 32.0 / mean).abs() < 1e-6 * 32.0 / mean);
    // 2·T·H·E for the router matmul, plus the softmax/top-k estimate.
    assert_eq!(
        b["flops"].as_f64().unwrap(),
        2.0 * 32.0 * 4096.0 * 8.0 + 8.0 * 32.0 * 8.0
    );
    for key in ["gflops", "gbs", "flops_share", "bw_share", "bytes"] {
        assert!(b[key].as_f64().unwrap() > 0.0, "{key}");
    }

    // Verdicts on injected timings (never on this machine's speed): the
    // saved run's samples are replaced by fixed ones, and "now" is the same
    // run made 10x slower, loaded instead of measured.
    let path = baselines.join("before.json");
    let mut base = read_json(&path);
    assert!(base.get("baseline").is_none());
    let set = |file: &mut serde_json::Value, scale: f64| {
        for b in file["benchmarks"].as_array_mut().unwrap() {
            let samples: Vec<f64> = [1.00, 1.02, 0.98, 1.01, 0.99]
                .iter()
                .map(|x| x * 1e-3 * scale)
                .collect();
            b["mean_s"] = (1e-3 * scale).into();
            b["ci_low_s"] = (0.98e-3 * scale).into();
            b["ci_high_s"] = (1.02e-3 * scale).into();
            b["samples_s"] = serde_json::json!(samples);
            b["iters_per_sample"] = 1.into();
        }
    };
    set(&mut base, 1.0);
    std::fs::write(&path, serde_json::to_string(&base).unwrap()).unwrap();
    let mut slow = base.clone();
    set(&mut slow, 10.0);
    let slow_path = tmp.path().join("slow.json");
    std::fs::write(&slow_path, serde_json::to_string(&slow).unwrap()).unwrap();
    let load = ["--load-baseline", slow_path.to_str().unwrap()];
    let (code, stdout, stderr) = quick(
        &out,
        &baselines,
        &[&load[..], &["--compare-baseline", "before"]].concat(),
    );
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("regressed"), "{stderr}");
    assert!(stdout.contains("regressed +"), "{stdout}");
    let json = read_json(&out.join("bench.json"));
    assert_eq!(json["baseline"]["name"], "before");
    assert_eq!(json["baseline"]["threshold"], 0.05);
    let verdicts = json["baseline"]["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2);
    for v in verdicts {
        assert_eq!(v["status"], "regressed", "{v}");
        assert!(v["change_low"].as_f64().unwrap() > 0.05);
    }

    // The same timings on both sides: no regression, exit 0.
    let (code, _, stderr) = quick(
        &out,
        &baselines,
        &["--load-baseline", "before", "--compare-baseline", "before"],
    );
    assert_eq!(code, 0, "{stderr}");
    let json = read_json(&out.join("bench.json"));
    for v in json["baseline"]["verdicts"].as_array().unwrap() {
        assert_ne!(v["status"], "regressed", "{v}");
        assert_ne!(v["status"], "new", "{v}");
    }

    // A baseline by path, holding only one of the two benchmarks: the other is new.
    let mut one = base.clone();
    one["benchmarks"].as_array_mut().unwrap().truncate(1);
    let one_path = tmp.path().join("one.json");
    std::fs::write(&one_path, serde_json::to_string(&one).unwrap()).unwrap();
    let (code, _, stderr) = quick(
        &out,
        &baselines,
        &[
            &load[..],
            &["--compare-baseline", one_path.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{stderr}");
    let json = read_json(&out.join("bench.json"));
    let verdicts = json["baseline"]["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2);
    assert_eq!(verdicts[0]["status"], "regressed");
    assert_eq!(verdicts[1]["status"], "new");
}

/// criterion parity: `--list` names what would run and runs nothing; a
/// missing baseline names the saved ones (was a bare "No such file").
#[test]
fn list_and_missing_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(
        &[
            "bench",
            "--list",
            "--tokens",
            "4,32",
            "--filter",
            "routing/softmax-topk/e8",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "cpu/routing/softmax-topk/e8-k2/n4",
            "cpu/routing/softmax-topk/e8-k2/n32"
        ]
    );
    std::fs::write(tmp.path().join("main.json"), "{}").unwrap();
    let (code, stdout, stderr) = run(
        &[
            "bench",
            "--quick",
            "--filter",
            BENCH,
            "--compare-baseline",
            "nope",
            "--baseline-dir",
            tmp.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("no such baseline `nope`"), "{stderr}");
    assert!(stderr.contains(": main)"), "{stderr}");
    assert!(stderr.contains("--save-baseline nope"), "{stderr}");
}

#[test]
fn shows_a_peer_side_by_side_and_skips_torch_without_python() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, baselines) = (tmp.path().join("report"), tmp.path().join("baselines"));
    // A peer file in the bench.json shape, with one matching benchmark.
    let peer = serde_json::json!({
        "schema": "moe-inspect/bench/v1",
        "tool": "torch 0.0-test",
        "device": "cpu",
        "benchmarks": [{
            "name": "cpu/routing/softmax-topk/e8-k2/n32", "group": "routing",
            "variant": "softmax-topk", "model": "e8-k2", "tokens": 32,
            "samples_s": [1.0, 1.0], "mean_s": 1.0, "ci_low_s": 1.0, "ci_high_s": 1.0,
            "tokens_per_s": 32.0
        }]
    });
    let peer_path = tmp.path().join("torch.json");
    std::fs::write(&peer_path, peer.to_string()).unwrap();
    let (code, stdout, stderr) = quick(&out, &baselines, &["--peer", peer_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("│ torch") && stdout.contains("ratio"),
        "{stdout}"
    );
    assert!(stdout.contains("1.000 s"), "{stdout}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Peer: torch 0.0-test"), "{md}");

    let (code, _, stderr) = run(
        &[
            "bench",
            "--quick",
            "--filter",
            BENCH,
            "--tokens",
            "4",
            "--peer",
            "torch",
            "--out",
            out.to_str().unwrap(),
        ],
        &[("MOE_INSPECT_PYTHON", "/nonexistent/python3")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("note: skipped the PyTorch comparison"),
        "{stderr}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("skipped the PyTorch comparison"), "{md}");
}

#[test]
fn bad_arguments_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [&[&str]; 5] = [
        &["bench", "--tokens", "0"],
        &["bench", "--tokens", "1,x"],
        &["bench", "--filter", "no-such-benchmark", "--quick"],
        &["bench", "--device", "tpu"],
        &["bench", "--save-baseline", "../escape"],
    ];
    for args in cases {
        let (code, _, stderr) = run(args, &[]);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
    let missing = tmp.path().join("nope.json");
    let (code, _, stderr) = run(
        &[
            "bench",
            "--quick",
            "--compare-baseline",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("nope.json"), "{stderr}");
}

#[test]
fn benchmarks_a_real_checkpoint_of_every_family() {
    // The fixtures are tiny checkpoints in hub layout: shared experts
    // (DeepSeekMoE, Qwen2-MoE), group-limited sigmoid routing (DeepSeek-V3),
    // GELU experts (Grok-1), MLA attention (DeepSeek-V2/V3).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let tmp = tempfile::tempdir().unwrap();
    for family in [
        "mixtral",
        "deepseek-moe",
        "qwen2-moe",
        "qwen3-moe",
        "olmoe",
        "grok-1",
        "deepseek-v2",
        "deepseek-v3",
    ] {
        let out = tmp.path().join(family);
        let (code, stdout, stderr) = run(
            &[
                "bench",
                "--quick",
                "--model",
                root.join(family).to_str().unwrap(),
                "--tokens",
                "3",
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "{family}: {stderr}");
        for name in [
            format!("cpu/routing/model/{family}/n3"),
            format!("cpu/moe-layer/topk/{family}/n3"),
            format!("cpu/moe-layer/naive/{family}/n3"),
            format!("cpu/moe-layer/all-experts/{family}/n3"),
            format!("cpu/forward/prefill/{family}/n3"),
            format!("cpu/forward/decode/{family}"),
        ] {
            assert!(stdout.contains(&name), "{family}: {name} missing\n{stdout}");
        }
        let json = read_json(&out.join("bench.json"));
        for b in json["benchmarks"].as_array().unwrap() {
            assert!(b["flops"].as_f64().unwrap() > 0.0, "{family}: {b}");
            assert!(b["bytes"].as_f64().unwrap() > 0.0, "{family}: {b}");
        }
    }
}

/// `--peer llama.cpp` runs `llama-bench` (here a stand-in script that checks
/// its arguments and prints llama-bench's JSON for them) on the GGUF with
/// our thread and token counts, and shows its timings beside ours; without
/// `--gguf` it exits 2, and a failing llama-bench is skipped with a note.
#[cfg(unix)]
#[test]
fn runs_llama_bench_as_a_peer() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("model.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let args_file = tmp.path().join("args.txt");
    let test = |n_prompt: usize, n_gen: usize, ns: &str| {
        format!(
            r#"{{"build_commit": "test", "build_number": 9, "cpu_info": "cpu", "n_threads": 2, "n_prompt": {n_prompt}, "n_gen": {n_gen}, "n_depth": 0, "avg_ns": {ns}, "samples_ns": [ {ns}, {ns} ], "samples_ts": [ 1, 1 ]}}"#
        )
    };
    let json = format!(
        "[\n{},\n{}\n]",
        test(3, 0, "2000000000"),
        test(0, 16, "1600000000")
    );
    let script = tmp.path().join("llama-bench");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\ncat <<'JSON'\n{json}\nJSON\n",
            args_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/mixtral");
    let base = [
        "bench",
        "--quick",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "3",
        "--filter",
        "forward",
    ];
    let report = tmp.path().join("report");
    let mut args = base.to_vec();
    args.extend([
        "--out",
        report.to_str().unwrap(),
        "--peer",
        "llama.cpp",
        "--gguf",
        gguf.to_str().unwrap(),
        "--llama-bench",
        script.to_str().unwrap(),
    ]);
    let (code, stdout, stderr) = run(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    let called = std::fs::read_to_string(&args_file).unwrap();
    assert!(
        called.contains(&format!("-m {}", gguf.display()))
            && called.contains("-p 3 -n 16 -o json")
            && called.contains("-t "),
        "{called}"
    );
    // 2 s for the 3-token prompt, 0.1 s per decoded token (the table may
    // wrap its cells at 80 columns).
    assert!(
        stdout.contains("│ llama.cp") && stdout.contains("2.000 s") && stdout.contains("100.00 m"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("Peer: llama.cpp build 9 (test)"), "{md}");
    for name in [
        "cpu/forward/prefill/mixtral/n3",
        "cpu/forward/decode/mixtral",
    ] {
        assert!(md.contains(name), "{name}: {md}");
    }

    // Without --gguf; --gguf without the peer.
    let mut no_gguf = base.to_vec();
    no_gguf.extend(["--peer", "llama.cpp"]);
    let (code, _, stderr) = run(&no_gguf, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--gguf"), "{stderr}");
    let mut stray = base.to_vec();
    stray.extend(["--gguf", gguf.to_str().unwrap()]);
    let (code, _, stderr) = run(&stray, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--peer llama.cpp"), "{stderr}");

    // A llama-bench that fails.
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'failed to load model' >&2\nexit 1\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("skipped the llama.cpp comparison")
            && stderr.contains("failed to load model"),
        "{stderr}"
    );
}
