//! Fault injection (issue 16): inputs that used to panic, exhaust memory or
//! pass as success. Every case must end with exit 2 and one clear `error:`
//! line (never a panic, never a partial output), with a peak RSS under
//! [`RSS_BOUND_MIB`] (measured per child with `wait4` on Linux).
//!
//! Bad config values and corrupt safetensors headers are in `bad_inputs.rs`;
//! writes (concurrent snapshots, full disks, closed pipes) in `writes.rs`.

use moe_inspect_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{copy_fixture, fixture, repo_root, rewrite_safetensors};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"));
    c.env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS");
    c
}

/// Every run of this file stays under this peak resident set.
const RSS_BOUND_MIB: u64 = 512;

fn run(args: &[&str]) -> (i32, String, String) {
    let mut cmd = bin();
    cmd.args(args);
    output_within_bound(cmd)
}

/// Runs `cmd` to completion and checks its peak RSS (Linux: `wait4`).
fn output_within_bound(cmd: Command) -> (i32, String, String) {
    #[cfg(target_os = "linux")]
    {
        let (code, rss, stdout, stderr) = run_measured(cmd);
        assert!(
            rss >> 20 < RSS_BOUND_MIB,
            "peak RSS {} MiB ≥ {RSS_BOUND_MIB} MiB\n{stderr}",
            rss >> 20
        );
        (code, stdout, stderr)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let mut cmd = cmd;
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Exit code, peak RSS (bytes), stdout and stderr of one child, from `wait4`
/// (its own peak, not the largest of all children this test binary ran).
#[cfg(target_os = "linux")]
#[allow(clippy::zombie_processes)] // reaped by wait4, which std cannot see
fn run_measured(mut cmd: Command) -> (i32, u64, String, String) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes while the child runs (it may write more than a pipe holds).
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value; wait4 writes only into the two out-params.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid);
    let stdout = String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned();
    let code = std::process::ExitStatus::from_raw(status)
        .code()
        .unwrap_or(-1);
    (code, usage.ru_maxrss as u64 * 1024, stdout, stderr)
}

/// Exit 2, nothing on stdout, one `error:` line holding every needle, no panic.
fn assert_error(args: &[&str], needles: &[&str]) -> String {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, 2, "args {args:?}\nstdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_ids(dir: &Path, ids: &[u32]) -> PathBuf {
    let path = dir.join("ids.txt");
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    std::fs::write(&path, line.join(" ") + "\n").unwrap();
    path
}

fn f32_bytes(v: f32, n: usize) -> Vec<u8> {
    std::iter::repeat_n(v.to_le_bytes(), n).flatten().collect()
}

// ---- the forward pass -------------------------------------------------------

/// config.json says vocab 128, but the embedding holds 64 rows: token 100
/// passes the vocabulary check and used to slice past the tensor (panic).
#[test]
fn token_ids_beyond_the_embedding_rows() {
    let dir = copy_fixture("mixtral");
    let mut shrunk = false;
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == "model.embed_tokens.weight" {
            assert_eq!(spec.shape, [128, 32]);
            spec.shape = vec![64, 32];
            bytes.truncate(64 * 32 * 4);
            shrunk = true;
        }
    });
    assert!(shrunk);
    let ids = write_ids(dir.path(), &[1, 2, 100, 3]);
    assert_error(
        &[
            "analyze",
            "--model",
            s(dir.path()),
            "--token-ids",
            s(&ids),
            "--analyses",
            "chosen-experts",
        ],
        &["token id 100", "model.embed_tokens.weight", "64 rows"],
    );
}

/// DeepSeek-V3's `e_score_correction_bias` with fewer entries than experts
/// used to index past its end in the router.
#[test]
fn correction_bias_shorter_than_the_expert_count() {
    let dir = copy_fixture("deepseek-v3");
    let mut edited = 0;
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name.ends_with("mlp.gate.e_score_correction_bias") {
            let n = spec.shape[0];
            spec.shape = vec![n - 1];
            bytes.truncate((n - 1) * 4);
            edited += 1;
        }
    });
    assert!(edited > 0);
    let tokens = repo_root().join("golden/fixture-token-ids.txt");
    assert_error(
        &[
            "analyze",
            "--model",
            s(dir.path()),
            "--token-ids",
            s(&tokens),
            "--analyses",
            "chosen-experts",
        ],
        &["e_score_correction_bias", "shape"],
    );
}

/// Finite but huge weights overflow in the forward pass: the run stops with
/// exit 2 naming the layer, and `snapshot` records nothing.
#[test]
fn overflow_during_the_forward_pass_is_an_error_not_a_null() {
    let dir = copy_fixture("mixtral");
    let mut edited = false;
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == "model.layers.0.self_attn.o_proj.weight" {
            *bytes = f32_bytes(3e38, bytes.len() / 4);
            edited = true;
        }
    });
    assert!(edited);
    let tokens = repo_root().join("golden/fixture-token-ids.txt");
    assert_error(
        &[
            "analyze",
            "--model",
            s(dir.path()),
            "--token-ids",
            s(&tokens),
            "--analyses",
            "dynamic",
            "--format",
            "json",
        ],
        &["layer 0", "NaN or infinite", "diverged"],
    );
    let golden = tempfile::tempdir().unwrap();
    assert_error(
        &[
            "snapshot",
            "--model",
            s(dir.path()),
            "--token-ids",
            s(&tokens),
            "--golden-dir",
            s(golden.path()),
            "--name",
            "overflow",
        ],
        &["layer 0", "NaN or infinite"],
    );
    let left: Vec<_> = std::fs::read_dir(golden.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".json"))
        .collect();
    assert!(left.is_empty(), "a golden was written: {left:?}");
}

/// A NaN in a bias that only the forward pass reads (Qwen2-MoE's q bias).
#[test]
fn nan_bias_is_an_error() {
    let dir = copy_fixture("qwen2-moe");
    let mut edited = false;
    rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if spec.name == "model.layers.1.self_attn.q_proj.bias" {
            assert_eq!(spec.dtype, "F32", "the fixture is f32");
            bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            edited = true;
        }
    });
    assert!(edited);
    let tokens = repo_root().join("golden/fixture-token-ids.txt");
    assert_error(
        &[
            "analyze",
            "--model",
            s(dir.path()),
            "--token-ids",
            s(&tokens),
            "--analyses",
            "chosen-experts",
        ],
        &["NaN or infinite"],
    );
}

/// An 8192-token prompt on the 2-layer, 32-wide fixture used to peak at
/// 3.4 GB (all heads' T×T scores at once, plus a T×T mask); attention now
/// runs in query blocks over the keys each block can see.
#[cfg(target_os = "linux")]
#[test]
fn long_prompt_memory_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..8192u32).map(|i| (i * 37 + 11) % 128).collect();
    let ids = write_ids(tmp.path(), &ids);
    let mut cmd = bin();
    cmd.args(["analyze", "--model"])
        .arg(fixture("mixtral"))
        .args(["--token-ids", s(&ids), "--analyses", "chosen-experts"])
        .args(["--format", "json"]);
    let (code, rss, _, stderr) = run_measured(cmd);
    assert_eq!(code, 0, "{stderr}");
    let mb = rss >> 20;
    eprintln!("8192 tokens on fixtures/mixtral: peak RSS {mb} MiB (bound 400 MiB)");
    assert!(mb < 400, "peak RSS {mb} MiB");
}

// ---- golden files edited by hand -------------------------------------------

fn golden_json(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(repo_root().join("golden").join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs `check` of the mixtral fixture against an edited golden file.
fn check_edited(
    edit: impl FnOnce(&mut serde_json::Value),
    extra: &[&str],
) -> (i32, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = golden_json("mixtral");
    edit(&mut g);
    std::fs::write(
        tmp.path().join("mixtral.json"),
        serde_json::to_string_pretty(&g).unwrap(),
    )
    .unwrap();
    let tokens = repo_root().join("golden/fixture-token-ids.txt");
    let model = fixture("mixtral");
    let mut args = vec![
        "check",
        "--model",
        s(&model),
        "--token-ids",
        s(&tokens),
        "--golden-dir",
        s(tmp.path()),
        "--name",
        "mixtral",
    ];
    args.extend_from_slice(extra);
    let mut cmd = bin();
    cmd.args(&args).env("CI", "true");
    output_within_bound(cmd)
}

fn assert_check_error(code: i32, stdout: &str, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
}

/// The unedited golden passes: the edits below are what fails.
#[test]
fn unedited_golden_passes() {
    let (code, stdout, stderr) = check_edited(|_| {}, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}

/// One more token, added consistently (ids, prompt count, per-layer routing
/// counts and loads): used to index past the live run's ids (panic).
#[test]
fn golden_with_one_more_token() {
    let (code, stdout, stderr) = check_edited(
        |g| {
            let shape = g["top_k_ids"]["shape"].as_array().unwrap().clone();
            let (t, l, k) = (
                shape[0].as_u64().unwrap(),
                shape[1].as_u64().unwrap(),
                shape[2].as_u64().unwrap(),
            );
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut data = b64
                .decode(g["top_k_ids"]["data"].as_str().unwrap())
                .unwrap();
            for _ in 0..l {
                for e in 0..k {
                    data.extend_from_slice(&(e as i16).to_le_bytes());
                }
            }
            g["top_k_ids"]["data"] = b64.encode(&data).into();
            g["top_k_ids"]["shape"] = serde_json::json!([t + 1, l, k]);
            g["prompts"]["tokens"] = (t + 1).into();
            for layer in g["layers"].as_array_mut().unwrap() {
                let r = &mut layer["routing"];
                r["tokens"] = (t + 1).into();
                for e in 0..k as usize {
                    r["load"][e] = (r["load"][e].as_u64().unwrap() + 1).into();
                }
            }
        },
        &[],
    );
    assert_check_error(
        code,
        &stdout,
        &stderr,
        &["mixtral.json", "top-k ids of shape"],
    );
}

/// `"analyses": []` used to make `check` pass on any model ("0 checks").
#[test]
fn golden_recording_nothing_is_refused() {
    let (code, stdout, stderr) = check_edited(
        |g| {
            g["analyses"] = serde_json::json!([]);
            for layer in g["layers"].as_array_mut().unwrap() {
                let keep = layer["layer"].clone();
                *layer = serde_json::json!({ "layer": keep });
            }
            g.as_object_mut().unwrap().remove("top_k_ids");
        },
        &[],
    );
    assert_check_error(
        code,
        &stdout,
        &stderr,
        &["mixtral.json", "`analyses` is empty"],
    );
}

/// Comparing a golden that records only routing with a run that computes
/// only static analyses compares nothing: an error, not a pass.
#[test]
fn nothing_compared_is_an_error() {
    let (code, stdout, stderr) = check_edited(
        |g| {
            g["analyses"] = serde_json::json!(["chosen-experts"]);
            for layer in g["layers"].as_array_mut().unwrap() {
                let o = layer.as_object_mut().unwrap();
                for key in [
                    "expert_similarity",
                    "neuron_similarity",
                    "gate_similarity",
                    "gate_r2",
                    "norm_score",
                ] {
                    o.remove(key);
                }
            }
        },
        &["--analyses", "expert-similarity"],
    );
    assert_check_error(code, &stdout, &stderr, &["nothing to compare"]);
}

#[test]
fn golden_values_out_of_range_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 6] = [
        (
            // Beyond f32: "number out of range" from serde_json, or a
            // non-finite value caught by the validation (depending on
            // serde_json's float features); either names the entry.
            |g| g["layers"][0]["expert_similarity"]["up"][0][1] = serde_json::json!(1e39),
            "expert_similarity.up",
        ),
        (
            |g| g["layers"][0]["gate_similarity"][1][0] = serde_json::json!(7.5),
            "outside [-1, 1]",
        ),
        (
            |g| g["tolerances"]["similarity"] = serde_json::json!(-0.5),
            "tolerance `similarity`",
        ),
        (
            |g| g["tolerances"]["routing-top1-agreement"] = serde_json::json!(2.0),
            "at most 1",
        ),
        (
            |g| g["layers"][1]["norm_score"]["top1_match_rate"] = serde_json::json!(-3.0),
            "outside [0, 1]",
        ),
        (
            |g| g["layers"][0]["routing"]["load"][0] = serde_json::json!(1_000_000),
            "routing.load sums to",
        ),
    ];
    for (edit, needle) in cases {
        let (code, stdout, stderr) = check_edited(edit, &[]);
        assert_check_error(code, &stdout, &stderr, &["mixtral.json", needle]);
    }
}

// ---- arguments --------------------------------------------------------------

#[test]
fn threshold_must_be_a_fraction() {
    for bad in ["NaN", "inf", "-0.5", "1.5", "x"] {
        let (code, _, stderr) = run(&["analyze", "--layers", "0", &format!("--threshold={bad}")]);
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--threshold"), "{stderr}");
    }
    let (code, _, stderr) = run(&["analyze", "--layers", "0", "--threshold", "0.25"]);
    assert_eq!(code, 0, "{stderr}");
}

/// `--layers 0..1e11` used to be expanded into a 800 GB list before the check.
#[test]
fn huge_layer_ranges_are_resolved_not_expanded() {
    assert_error(
        &["analyze", "--layers", "0..100000000000"],
        &["layer 99999999999 does not exist", "4 layers"],
    );
}

/// `bench --tokens 1000000000` states what it would need instead of aborting.
#[test]
fn bench_requests_that_cannot_fit_are_refused_up_front() {
    assert_error(
        &[
            "bench",
            "--filter",
            "routing",
            "--tokens",
            "1000000000",
            "--quick",
        ],
        &["1000000000 tokens", "would need", "bytes", "of memory"],
    );
}

/// A prompt whose working set cannot fit is refused with the bytes it needs
/// (the limit is forced low with `MOE_INSPECT_MAX_MEMORY`).
#[test]
fn forward_requests_that_cannot_fit_are_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..8192u32).map(|i| i % 128).collect();
    let ids = write_ids(tmp.path(), &ids);
    let model = fixture("mixtral");
    let args = [
        "analyze",
        "--model",
        s(&model),
        "--token-ids",
        s(&ids),
        "--analyses",
        "dynamic",
    ];
    let mut cmd = bin();
    cmd.args(args).env("MOE_INSPECT_MAX_MEMORY", "64M");
    let (code, stdout, stderr) = output_within_bound(cmd);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty());
    for needle in ["8192 tokens", "would need about", "only 64.0 MiB"] {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
