//! The drift gate end to end: `snapshot` a fixture, perturb a copy of it the
//! way conversions and quantizations go wrong, and `check` must fail naming
//! the layer and the metric (and must not fail for a consistent relabelling
//! of experts, which computes the same function).

use moe_inspect_testkit as common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{copy_fixture, fixture, repo_root, rewrite_safetensors};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `cwd` (a directory outside any cargo project unless the
/// test says otherwise), with CI and GitHub variables cleared.
fn run_in(cwd: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"));
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r
}

fn token_ids() -> PathBuf {
    repo_root().join("golden/fixture-token-ids.txt")
}

/// A scratch workspace: `golden/` for snapshots, outside any cargo project.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn golden(&self) -> PathBuf {
        self.path().join("golden")
    }

    /// `snapshot` or `check` of `model` under the name `fixture`.
    fn cmd(&self, command: &str, model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
        let ids = token_ids();
        let mut args = vec![
            command,
            "--model",
            model.to_str().unwrap(),
            "--golden-dir",
            "golden",
            "--name",
            "fixture",
            "--token-ids",
            ids.to_str().unwrap(),
        ];
        args.extend(extra);
        run_in(self.path(), &args, env, None)
    }

    fn snapshot(&self, model: &Path) {
        let r = self.cmd("snapshot", model, &[], &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }

    /// `check --format json`: exit code and parsed report.
    fn check_json(&self, model: &Path) -> (i32, serde_json::Value, String) {
        let r = self.cmd("check", model, &["--format", "json"], &[]);
        let v = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", r.stdout, r.stderr));
        (r.code, v, r.stderr)
    }
}

/// `(metric, layer)` of every drifted row.
fn drifted(v: &serde_json::Value) -> Vec<(String, u64)> {
    v["models"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verdict"] == "drift")
        .map(|r| {
            (
                r["metric"].as_str().unwrap().to_string(),
                r["layer"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn notices(v: &serde_json::Value) -> Vec<(Option<u64>, String)> {
    v["models"][0]["notices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["layer"].as_u64(),
                n["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn router(layer: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.gate.weight")
}

fn expert(layer: usize, e: usize, w: &str) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight")
}

/// A copy of the Mixtral fixture with `edit(name, values)` applied to every f32 tensor.
fn perturbed(mut edit: impl FnMut(&str, &mut Vec<f32>)) -> tempfile::TempDir {
    let dir = copy_fixture("mixtral");
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        let mut v = f32s(bytes);
        edit(&spec.name, &mut v);
        *bytes = to_bytes(&v);
    });
    dir
}

/// Swaps two tensors of a copy of the Mixtral fixture (pairs of names).
fn swapped(pairs: &[(String, String)]) -> tempfile::TempDir {
    let src = moe_inspect::model::Weights::open_dir(&fixture("mixtral")).unwrap();
    let dir = copy_fixture("mixtral");
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        for (a, b) in pairs {
            let other = if spec.name == *a {
                b
            } else if spec.name == *b {
                a
            } else {
                continue;
            };
            *bytes = src.tensor(other).unwrap().bytes().to_vec();
        }
    });
    dir
}

#[test]
fn unchanged_model_passes_and_snapshots_are_byte_identical() {
    let s = Scratch::new();
    let model = fixture("mixtral");
    s.snapshot(&model);
    let first = std::fs::read(s.golden().join("fixture.json")).unwrap();
    s.snapshot(&model);
    let second = std::fs::read(s.golden().join("fixture.json")).unwrap();
    assert_eq!(first, second, "two snapshots of one model differ");
    let (code, v, stderr) = s.check_json(&model);
    assert_eq!(code, 0, "{stderr}");
    assert!(drifted(&v).is_empty());
    assert_eq!(v["drift"], false);
    // Every metric family is there for both MoE layers.
    let rows = v["models"][0]["rows"].as_array().unwrap();
    for metric in [
        "expert-similarity.down",
        "neuron-similarity.up",
        "gate-similarity",
        "gate-r2.gate",
        "routing-top1-agreement",
        "routing-topk-agreement",
        "router-jsd",
        "load-shift",
        "norm-score-top1",
    ] {
        for layer in [0, 1] {
            assert!(
                rows.iter()
                    .any(|r| r["metric"] == metric && r["layer"] == layer),
                "{metric} layer {layer} missing"
            );
        }
    }
    assert!(!s.golden().join("fixture.json.new").exists());
}

#[test]
fn one_router_row_scaled_is_routing_drift_at_that_layer() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let hidden = 32;
    let model = perturbed(|name, v| {
        if name == router(1) {
            for x in &mut v[2 * hidden..3 * hidden] {
                *x *= 4.0;
            }
        }
    });
    let (code, v, _) = s.check_json(model.path());
    assert_eq!(code, 1);
    let d = drifted(&v);
    assert!(d.contains(&("routing-top1-agreement".into(), 1)), "{d:?}");
    assert!(d.contains(&("load-shift".into(), 1)), "{d:?}");
    assert!(d.iter().all(|(_, l)| *l == 1), "only layer 1 drifts: {d:?}");
    assert!(s.golden().join("fixture.json.new").exists());
}

#[test]
fn router_quantized_to_4_bits_is_drift_and_warned() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let hidden = 32;
    let model = perturbed(|name, v| {
        if name == router(0) {
            for row in v.chunks_mut(hidden) {
                let scale = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0;
                for x in row {
                    *x = (*x / scale).round().clamp(-7.0, 7.0) * scale;
                }
            }
        }
    });
    let (code, v, _) = s.check_json(model.path());
    assert_eq!(code, 1);
    let d = drifted(&v);
    assert!(d.contains(&("gate-similarity".into(), 0)), "{d:?}");
    assert!(
        d.iter().any(|(m, l)| m.starts_with("routing-") && *l == 0),
        "{d:?}"
    );
    let n = notices(&v);
    assert!(
        n.iter()
            .any(|(l, m)| *l == Some(0) && m.contains("router stored below 8 bits")),
        "{n:?}"
    );
}

#[test]
fn experts_swapped_without_their_router_rows_is_drift() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let pairs: Vec<(String, String)> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| (expert(0, 1, w), expert(0, 5, w)))
        .collect();
    let model = swapped(&pairs);
    let (code, v, _) = s.check_json(model.path());
    assert_eq!(code, 1);
    let d = drifted(&v);
    assert!(d.contains(&("expert-assignment".into(), 0)), "{d:?}");
    assert!(d.contains(&("expert-similarity.up".into(), 0)), "{d:?}");
    let row = v["models"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == "expert-assignment")
        .unwrap();
    assert!(
        row["detail"].as_str().unwrap().contains("1→5, 5→1"),
        "{row}"
    );
}

#[test]
fn consistent_relabelling_is_a_notice_not_drift() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let src = moe_inspect::model::Weights::open_dir(&fixture("mixtral")).unwrap();
    let gate = f32s(src.tensor(&router(0)).unwrap().bytes());
    let hidden = 32;
    let pairs: Vec<(String, String)> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| (expert(0, 1, w), expert(0, 5, w)))
        .collect();
    let dir = swapped(&pairs);
    // Swap router rows 1 and 5 as well.
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == router(0) {
            let mut g = gate.clone();
            for c in 0..hidden {
                g.swap(hidden + c, 5 * hidden + c);
            }
            *bytes = to_bytes(&g);
        }
    });
    let (code, v, stderr) = s.check_json(dir.path());
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert!(drifted(&v).is_empty());
    let n = notices(&v);
    assert!(
        n.iter()
            .any(|(l, m)| *l == Some(0) && m.contains("relabelled") && m.contains("1→5, 5→1")),
        "{n:?}"
    );
}

#[test]
fn noise_on_one_experts_down_matrix_is_similarity_drift() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let mut state = 7u64;
    let model = perturbed(|name, v| {
        if name == expert(1, 2, "w2") {
            for x in v.iter_mut() {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                *x += 0.1 * u;
            }
        }
    });
    let (code, v, _) = s.check_json(model.path());
    assert_eq!(code, 1);
    let d = drifted(&v);
    assert!(d.contains(&("expert-similarity.down".into(), 1)), "{d:?}");
    assert!(!d.contains(&("expert-similarity.up".into(), 1)), "{d:?}");
    assert!(!d.iter().any(|(_, l)| *l == 0), "layer 0 untouched: {d:?}");
}

#[test]
fn drift_table_names_layer_and_metric() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let model = perturbed(|name, v| {
        if name == router(1) {
            for x in &mut v[2 * 32..3 * 32] {
                *x *= 4.0;
            }
        }
    });
    let r = s.cmd("check", model.path(), &[], &[]);
    assert_eq!(r.code, 1);
    insta::assert_snapshot!("drift_table_router_row_scaled", r.stdout);
}

#[test]
fn missing_or_corrupt_golden_is_an_input_error() {
    let s = Scratch::new();
    let model = fixture("mixtral");
    let r = s.cmd("check", &model, &[], &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("fixture.json"), "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);

    s.snapshot(&model);
    let path = s.golden().join("fixture.json");
    let text = std::fs::read_to_string(&path).unwrap();
    for (what, corrupt, needle) in [
        (
            "truncated",
            text[..text.len() / 2].to_string(),
            "corrupt golden snapshot",
        ),
        ("not json", "hello".to_string(), "corrupt golden snapshot"),
        (
            "wrong schema",
            text.replace("moe-inspect/golden/v1", "moe-inspect/golden/v9"),
            "schema",
        ),
        (
            "bad top-k data",
            text.replace("\"dtype\": \"i16\"", "\"dtype\": \"i8\""),
            "top_k_ids.dtype",
        ),
    ] {
        std::fs::write(&path, &corrupt).unwrap();
        let r = s.cmd("check", &model, &[], &[]);
        assert_eq!(r.code, 2, "{what}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        assert!(r.stderr.contains("fixture.json"), "{what}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{what}: {}", r.stderr);
    }
}

#[test]
fn on_ci_nothing_is_written_and_pending_never_replaces_golden() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let golden = std::fs::read(s.golden().join("fixture.json")).unwrap();
    let model = perturbed(|name, v| {
        if name == router(1) {
            for x in &mut v[..32] {
                *x *= 4.0;
            }
        }
    });
    let r = s.cmd("check", model.path(), &[], &[("CI", "true")]);
    assert_eq!(r.code, 1);
    assert!(!s.golden().join("fixture.json.new").exists());
    // Locally a pending file is written; on CI it is not accepted.
    let r = s.cmd("check", model.path(), &[], &[]);
    assert_eq!(r.code, 1);
    assert!(s.golden().join("fixture.json.new").exists());
    let r = run_in(
        s.path(),
        &["accept", "--golden-dir", "golden"],
        &[("CI", "1")],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        std::fs::read(s.golden().join("fixture.json")).unwrap(),
        golden
    );
    assert!(s.golden().join("fixture.json.new").exists());
}

#[test]
fn review_accept_and_reject_pending_snapshots() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let model = perturbed(|name, v| {
        if name == router(0) {
            for x in &mut v[3 * 32..4 * 32] {
                *x *= 4.0;
            }
        }
    });
    assert_eq!(s.cmd("check", model.path(), &[], &[]).code, 1);
    let r = run_in(s.path(), &["reject", "--golden-dir", "golden"], &[], None);
    assert_eq!(r.code, 0);
    assert!(!s.golden().join("fixture.json.new").exists());

    assert_eq!(s.cmd("check", model.path(), &[], &[]).code, 1);
    // Review: skip first (nothing changes), then accept.
    let r = run_in(
        s.path(),
        &["review", "--golden-dir", "golden"],
        &[],
        Some("s\n"),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("routing-top1-agreement"), "{}", r.stdout);
    assert!(s.golden().join("fixture.json.new").exists());
    let r = run_in(
        s.path(),
        &["review", "--golden-dir", "golden"],
        &[],
        Some("a\n"),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!s.golden().join("fixture.json.new").exists());
    // The accepted snapshot is the new truth.
    let (code, v, _) = s.check_json(model.path());
    assert_eq!(code, 0, "{v}");
}

/// On a terminal, `review` takes one key per pending snapshot, without
/// Enter (as cargo-insta's review), and leaves the terminal as it was. The
/// terminal is a pseudo-terminal from util-linux's `script`.
#[test]
fn review_on_a_terminal_takes_single_keys() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` (util-linux) to give review a terminal");
        return;
    }
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let model = perturbed(|name, v| {
        if name == router(0) {
            for x in &mut v[3 * 32..4 * 32] {
                *x *= 4.0;
            }
        }
    });
    assert_eq!(s.cmd("check", model.path(), &[], &[]).code, 1);
    let pending = s.golden().join("fixture.json.new");
    assert!(pending.exists());
    let cmdline = format!(
        "{} review --golden-dir golden",
        env!("CARGO_BIN_EXE_cargo-moe-inspect")
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .current_dir(s.path())
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // One key, no newline, and the input kept open: a review that reads
    // lines would wait for Enter until the guard below gives up; a
    // single-key review accepts and exits. (The guard is a hang limit, not
    // a speed measurement.)
    let mut input = child.stdin.take().unwrap();
    {
        use std::io::Write;
        input.write_all(b"a").unwrap();
        input.flush().unwrap();
    }
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("review waited for more than one key");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("accepted"), "{text}");
    assert!(text.contains("1 accepted, 0 rejected, 0 skipped"), "{text}");
    assert!(!pending.exists(), "{text}");
}

/// A stale pending snapshot (from a check that failed before the model was
/// fixed) is removed when the check passes, so `accept` cannot make the
/// broken model golden; a pending file older than its golden is refused.
#[test]
fn a_passing_check_removes_the_stale_pending_snapshot() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let broken = perturbed(|name, v| {
        if name == router(0) {
            for x in &mut v[3 * 32..4 * 32] {
                *x *= 4.0;
            }
        }
    });
    let pending = s.golden().join("fixture.json.new");
    assert_eq!(s.cmd("check", broken.path(), &[], &[]).code, 1);
    assert!(pending.exists());
    // Fixed: the check passes and the pending file is gone.
    let r = s.cmd("check", &fixture("mixtral"), &[], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!pending.exists(), "stale pending snapshot kept");
    assert!(r.stderr.contains("stale"), "{}", r.stderr);
    let r = run_in(s.path(), &["accept", "--golden-dir", "golden"], &[], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (code, v, _) = s.check_json(&fixture("mixtral"));
    assert_eq!(code, 0, "the broken model became golden: {v}");

    // On CI a passing check touches nothing.
    assert_eq!(s.cmd("check", broken.path(), &[], &[]).code, 1);
    assert!(pending.exists());
    let r = s.cmd("check", &fixture("mixtral"), &[], &[("CI", "true")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(pending.exists());

    // Golden recorded again after the pending file was written: accept refuses.
    std::thread::sleep(std::time::Duration::from_millis(20));
    s.snapshot(&fixture("mixtral"));
    let r = run_in(s.path(), &["accept", "--golden-dir", "golden"], &[], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("older than its golden"), "{}", r.stderr);
    assert!(pending.exists());
}

/// `review` with nothing to answer (no terminal, stdin exhausted) fails
/// instead of skipping everything with exit 0; answers end with a summary.
#[test]
fn review_without_answers_fails_and_answers_are_summarised() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let broken = perturbed(|name, v| {
        if name == router(0) {
            for x in &mut v[3 * 32..4 * 32] {
                *x *= 4.0;
            }
        }
    });
    assert_eq!(s.cmd("check", broken.path(), &[], &[]).code, 1);
    let pending = s.golden().join("fixture.json.new");
    let r = run_in(s.path(), &["review", "--golden-dir", "golden"], &[], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("stdin is not a terminal"), "{}", r.stderr);
    assert!(r.stderr.contains("accept") && r.stderr.contains("reject"));
    assert!(pending.exists());
    let r = run_in(
        s.path(),
        &["review", "--golden-dir", "golden"],
        &[],
        Some("s\n"),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("reviewed 1: 0 accepted, 0 rejected, 1 skipped"),
        "{}",
        r.stderr
    );
    assert!(pending.exists());
}

/// Every `--format` value `diff` accepts is honoured (junit was a table).
#[test]
fn diff_formats_are_honoured() {
    let s = Scratch::new();
    let ids = token_ids();
    let base = fixture("mixtral");
    let args = |format: &'static str| {
        vec![
            "diff".to_string(),
            "--baseline".into(),
            base.to_str().unwrap().into(),
            "--candidate".into(),
            base.to_str().unwrap().into(),
            "--token-ids".into(),
            ids.to_str().unwrap().into(),
            "--format".into(),
            format.into(),
        ]
    };
    let run = |format| {
        let a = args(format);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_in(s.path(), &a, &[], None)
    };
    let junit = run("junit");
    assert_eq!(junit.code, 0, "{}", junit.stderr);
    assert!(junit.stdout.starts_with("<?xml"), "{}", junit.stdout);
    assert!(junit.stdout.contains("<testsuite"), "{}", junit.stdout);
    let json = run("json");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["schema"], "moe-inspect/diff/v1");
    let table = run("table");
    assert!(table.stdout.contains("expert weights"), "{}", table.stdout);
    let md = run("markdown");
    assert_eq!(md.code, 0, "{}", md.stderr);
    let report = std::fs::read_to_string(s.path().join("moe-inspect-diff/report.md")).unwrap();
    assert!(report.contains("# Quantisation report"), "{report}");
    let bad = run("html");
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("invalid value"), "{}", bad.stderr);
}

/// cargo-insta parity: `pending`, `check --accept`, `MOE_INSPECT_UPDATE`,
/// `--junit FILE`.
#[test]
fn accept_update_modes_pending_list_and_junit_file() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let broken = perturbed(|name, v| {
        if name == router(0) {
            for x in &mut v[3 * 32..4 * 32] {
                *x *= 4.0;
            }
        }
    });
    let golden = s.golden().join("fixture.json");
    let pending = s.golden().join("fixture.json.new");
    let original = std::fs::read(&golden).unwrap();

    // `no`: drift, nothing written.
    let r = s.cmd("check", broken.path(), &[], &[("MOE_INSPECT_UPDATE", "no")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!pending.exists());
    // A value it does not know is an error.
    let r = s.cmd(
        "check",
        broken.path(),
        &[],
        &[("MOE_INSPECT_UPDATE", "sometimes")],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("MOE_INSPECT_UPDATE=sometimes"),
        "{}",
        r.stderr
    );
    // Default: a pending file, listed by `pending`; JUnit written to a file.
    let junit = s.path().join("reports/junit.xml");
    std::fs::create_dir_all(junit.parent().unwrap()).unwrap();
    let r = s.cmd(
        "check",
        broken.path(),
        &["--junit", junit.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.starts_with("<?xml") && xml.contains("<failure"),
        "{xml}"
    );
    let r = run_in(s.path(), &["pending", "--golden-dir", "golden"], &[], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("fixture\t"), "{}", r.stdout);
    assert!(
        r.stdout.contains("replaces the golden file"),
        "{}",
        r.stdout
    );
    assert_eq!(std::fs::read(&golden).unwrap(), original);

    // --accept on CI: the golden is replaced, exit 0, and the model now passes.
    let r = s.cmd("check", broken.path(), &["--accept"], &[("CI", "true")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("drift accepted"), "{}", r.stderr);
    assert_ne!(std::fs::read(&golden).unwrap(), original);
    let (code, v, _) = s.check_json(broken.path());
    assert_eq!(code, 0, "{v}");
    // `always`: back to the original model.
    let r = s.cmd(
        "check",
        &fixture("mixtral"),
        &[],
        &[("MOE_INSPECT_UPDATE", "always")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&golden).unwrap(), original);
    // On CI the variable cannot make check write.
    let r = s.cmd(
        "check",
        broken.path(),
        &[],
        &[("MOE_INSPECT_UPDATE", "always"), ("CI", "true")],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(std::fs::read(&golden).unwrap(), original);
    // --accept records a missing golden file.
    std::fs::remove_file(&golden).unwrap();
    let r = s.cmd("check", &fixture("mixtral"), &["--accept"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&golden).unwrap(), original);
}

/// `init` appends a commented block that is valid as written and once
/// uncommented; a second `init` is refused.
#[test]
fn init_writes_a_commented_configuration_block() {
    let s = Scratch::new();
    let manifest = s.path().join("Cargo.toml");
    std::fs::write(
        &manifest,
        "[package]\nname = \"probe\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::create_dir(s.path().join("src")).unwrap();
    std::fs::write(s.path().join("src/lib.rs"), "").unwrap();
    let r = run_in(s.path(), &["init"], &[], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.starts_with("[package]\nname = \"probe\""), "{text}");
    assert!(
        text.contains("\n[package.metadata.moe-inspect]\n"),
        "{text}"
    );
    for key in [
        "golden-dir",
        "prompts",
        "token-ids",
        "analyses",
        "models",
        "similarity",
        "norm-score-top1",
    ] {
        assert!(text.contains(key), "`{key}` not documented: {text}");
    }
    let r = run_in(s.path(), &["init"], &[], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("already has"), "{}", r.stderr);
    // Uncommented: golden-dir, one demo model, the tolerances.
    let edited: String = text
        .lines()
        .map(|l| {
            let uncomment = ["# golden-dir", "# [package.metadata.moe-inspect.tolerance]"]
                .iter()
                .any(|p| l.starts_with(p))
                || TOLERANCE_KEYS
                    .iter()
                    .any(|k| l.starts_with(&format!("# {k} =")));
            if uncomment {
                l[2..].to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("golden-dir = \"golden\"", "golden-dir = \"snapshots\"");
    std::fs::write(&manifest, edited + "\n").unwrap();
    let r = run_in(
        s.path(),
        &["snapshot", "--analyses", "expert-similarity"],
        &[],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let golden = std::fs::read_to_string(s.path().join("snapshots/demo.json")).unwrap();
    assert!(golden.contains("\"similarity\": 0.001"), "{golden}");
}

const TOLERANCE_KEYS: [&str; 7] = [
    "similarity",
    "routing-top1-agreement",
    "routing-topk-agreement",
    "router-jsd",
    "load-shift",
    "gate-r2",
    "norm-score-top1",
];

#[test]
fn junit_and_github_outputs() {
    let s = Scratch::new();
    s.snapshot(&fixture("mixtral"));
    let model = perturbed(|name, v| {
        if name == router(1) {
            for x in &mut v[2 * 32..3 * 32] {
                *x *= 4.0;
            }
        }
    });
    let r = s.cmd("check", model.path(), &["--format", "junit"], &[]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.starts_with("<?xml"), "{}", r.stdout);
    assert!(
        r.stdout.contains(
            "<testcase name=\"routing-top1-agreement layer 1\" classname=\"moe-inspect.fixture\">"
        ),
        "{}",
        r.stdout
    );
    assert!(r
        .stdout
        .contains("<failure message=\"routing-top1-agreement at layer 1"));
    assert!(r.stdout.contains(
        "<testcase name=\"expert-similarity.up layer 0\" classname=\"moe-inspect.fixture\"/>"
    ));

    let summary = s.path().join("summary.md");
    let r = s.cmd(
        "check",
        model.path(),
        &[],
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
        ],
    );
    assert_eq!(r.code, 1);
    // Annotations name the golden file, so GitHub shows them on it.
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("routing-top1-agreement layer 1::"))
        .unwrap_or_else(|| panic!("no annotation in {}", r.stdout));
    assert!(
        line.starts_with("::error file=")
            && line.contains(
                "fixture.json,title=moe-inspect drift%3A fixture routing-top1-agreement layer 1::"
            ),
        "{line}"
    );
    // The totals line across models, after the tables.
    assert!(
        r.stdout.contains("check: 1 model: 0 passed, 1 drifted"),
        "{}",
        r.stdout
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(md.contains("## moe-inspect check"), "{md}");
    assert!(md.contains("| routing-top1-agreement | 1 |"), "{md}");
}

#[test]
fn configuration_from_cargo_toml() {
    let s = Scratch::new();
    let ids = token_ids();
    let manifest = s.path().join("Cargo.toml");
    std::fs::create_dir_all(s.path().join("src")).unwrap();
    std::fs::write(s.path().join("src/lib.rs"), "").unwrap();
    std::fs::write(
        &manifest,
        format!(
            r#"[package]
name = "configured"
version = "0.1.0"
edition = "2021"

[package.metadata.moe-inspect]
golden-dir = "snapshots"
junit = "reports/junit.xml"
token-ids = "{ids}"
analyses = ["static", "chosen-experts"]

[[package.metadata.moe-inspect.models]]
name = "mix"
path = "{model}"

[package.metadata.moe-inspect.tolerance]
similarity = 0.002
"#,
            ids = ids.display(),
            model = fixture("mixtral").display()
        ),
    )
    .unwrap();
    let r = run_in(s.path(), &["snapshot"], &[], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(s.path().join("snapshots/mix.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["tolerances"]["similarity"], 0.002);
    assert_eq!(
        v["analyses"],
        serde_json::json!([
            "expert-similarity",
            "neuron-similarity",
            "gate-embedding",
            "chosen-experts"
        ])
    );
    assert!(v["layers"][0].get("norm_score").is_none());
    let junit = s.path().join("reports/junit.xml");
    std::fs::create_dir_all(junit.parent().unwrap()).unwrap();
    let r = run_in(s.path(), &["check"], &[], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("mix: ok"), "{}", r.stdout);
    // The configured `junit` path gets the JUnit report, as --junit would.
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.starts_with("<?xml") && xml.contains("classname=\"moe-inspect.mix\""),
        "{xml}"
    );
    // --manifest-path from elsewhere, and a flag overriding the configuration.
    let elsewhere = tempfile::tempdir().unwrap();
    let r = run_in(
        elsewhere.path(),
        &[
            "check",
            "--manifest-path",
            manifest.to_str().unwrap(),
            "--tolerance",
            "load-shift=0.125",
            "--format",
            "json",
        ],
        &[],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = v["models"][0]["rows"].as_array().unwrap();
    let load: Vec<_> = rows
        .iter()
        .filter(|r| r["metric"] == "load-shift")
        .collect();
    assert!(!load.is_empty(), "{}", r.stdout);
    assert!(load.iter().all(|r| r["tolerance"] == 0.125), "{}", r.stdout);
    // An agreement above 1 cannot be met: an invalid tolerance, not drift.
    let r = run_in(
        elsewhere.path(),
        &[
            "check",
            "--manifest-path",
            manifest.to_str().unwrap(),
            "--tolerance",
            "routing-top1-agreement=1.5",
        ],
        &[],
        None,
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("at most 1"), "{}", r.stderr);
    // Unknown --name.
    let r = run_in(s.path(), &["check", "--name", "nope"], &[], None);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no such model"), "{}", r.stderr);

    // A bad configuration names the key.
    let text = std::fs::read_to_string(&manifest).unwrap();
    for (bad, key) in [
        (
            text.replace("similarity = 0.002", "similarity = \"tight\""),
            "tolerance.similarity",
        ),
        (
            text.replace("similarity = 0.002", "similarty = 0.002"),
            "tolerance.similarty",
        ),
        (
            text.replace("golden-dir", "golden-directory"),
            "golden-directory",
        ),
        (text.replace("path = ", "paths = "), "paths"),
    ] {
        std::fs::write(&manifest, bad).unwrap();
        let r = run_in(s.path(), &["check"], &[], None);
        assert_eq!(r.code, 2, "{key}: {}", r.stderr);
        assert!(r.stderr.contains(key), "{key}: {}", r.stderr);
        assert!(r.stderr.contains("Cargo.toml"), "{key}: {}", r.stderr);
    }
}

#[test]
fn diff_of_two_checkpoints() {
    let s = Scratch::new();
    let ids = token_ids();
    let base = fixture("mixtral");
    let same = run_in(
        s.path(),
        &[
            "diff",
            "--baseline",
            base.to_str().unwrap(),
            "--candidate",
            base.to_str().unwrap(),
            "--token-ids",
            ids.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert_eq!(same.code, 0, "{}", same.stderr);
    assert!(same.stdout.contains("1.000000"), "{}", same.stdout);

    let quant = perturbed(|name, v| {
        if name == router(1) {
            for row in v.chunks_mut(32) {
                let scale = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0;
                for x in row {
                    *x = (*x / scale).round().clamp(-7.0, 7.0) * scale;
                }
            }
        }
        if name == expert(0, 4, "w1") {
            for x in v.iter_mut() {
                *x = -*x;
            }
        }
    });
    let r = run_in(
        s.path(),
        &[
            "diff",
            "--baseline",
            base.to_str().unwrap(),
            "--candidate",
            quant.path().to_str().unwrap(),
            "--token-ids",
            ids.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[],
        None,
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // Expert 4's gate matrix was negated: cosine -1 with the baseline's.
    let gate = &v["expert_cosine"][0]["gate"];
    assert!((gate[4].as_f64().unwrap() + 1.0).abs() < 1e-6, "{gate}");
    assert!((gate[3].as_f64().unwrap() - 1.0).abs() < 1e-6, "{gate}");
    let rows = v["comparison"]["rows"].as_array().unwrap();
    let jsd = rows
        .iter()
        .find(|r| r["metric"] == "router-jsd" && r["layer"] == 1)
        .unwrap();
    assert_eq!(jsd["detail"], "mean over tokens");
    assert!(jsd["now"].as_f64().unwrap() > 0.0);
    let notes = v["comparison"]["notices"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n["layer"] == 1 && n["message"].as_str().unwrap().contains("below 8 bits")),
        "{notes:?}"
    );
}

#[test]
fn golden_files_of_the_repository_are_current_and_small() {
    // The dogfooding goldens in `golden/` must parse, stay small, and match
    // what the code computes now: every configured model is recomputed and
    // compared (as `.ci/run` does), with CI set so nothing is written.
    let dir = repo_root().join("golden");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            moe_inspect::golden::Snapshot::parse(&path, &text).unwrap();
            assert!(
                text.len() < 200_000,
                "{}: {} bytes",
                path.display(),
                text.len()
            );
            names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert!(
        names.len() >= 9,
        "expected the demo and the fixture families, found {names:?}"
    );
    let r = run_in(
        &repo_root(),
        &["check", "--format", "json"],
        &[("CI", "true")],
        None,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["drift"], false);
    let mut checked: Vec<String> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let rows = m["rows"].as_array().unwrap();
            assert!(rows.len() >= 10, "{}: {} checks", m["name"], rows.len());
            assert!(rows.iter().all(|r| r["verdict"] == "ok"));
            m["name"].as_str().unwrap().to_string()
        })
        .collect();
    checked.sort();
    assert_eq!(
        checked, names,
        "every golden file is checked, and only those"
    );
}
