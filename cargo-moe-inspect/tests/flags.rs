//! Flags that mean one thing (issue 18): `-q/--quiet` and `-v/--verbose`;
//! renamed flags answer their old spelling with a hint; flags a format would
//! ignore are refused; `bench --sample-size/--warm-up` and the noise
//! warning; the benchmark data directory and the built-in PyTorch script,
//! from a working directory outside any cargo workspace.

use moe_inspect_testkit as common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fixture, repo_root};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_in(cwd: &Path, args: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"));
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("CARGO_TERM_COLOR")
        .env_remove("MOE_INSPECT_BENCH_DIR")
        .env_remove("MOE_INSPECT_PYTHON")
        .env_remove("MOE_INSPECT_UPDATE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(args: &[&str]) -> Run {
    run_in(&repo_root(), args, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit 2 with one error line holding every needle.
fn assert_usage(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 2, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "{n:?} not in {}", r.stderr);
    }
}

#[test]
fn quiet_prints_no_notices_but_errors_and_results() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    let args = ["analyze", "--format", "markdown", "--out", s(&out)];
    let loud = run(&args);
    assert_eq!(loud.code, 0, "{}", loud.stderr);
    assert!(loud.stderr.contains("wrote"), "{}", loud.stderr);

    for q in ["-q", "--quiet"] {
        let quiet = run(&[&[q][..], &args[..]].concat());
        assert_eq!(quiet.code, 0, "{}", quiet.stderr);
        assert_eq!(quiet.stderr, "", "{q}");
        assert!(out.join("report.md").is_file());
    }
    // Global: after the subcommand too; results on stdout are kept.
    let table = run(&["analyze", "--layers", "0", "--quiet"]);
    assert_eq!(table.code, 0);
    assert_eq!(table.stderr, "");
    assert!(
        table.stdout.contains("expert-similarity"),
        "{}",
        table.stdout
    );
    // A trace's "wrote" notice is gone too.
    let trace = tmp.path().join("t.safetensors");
    let r = run(&["-q", "trace", "--output", s(&trace)]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert!(trace.is_file());

    // Errors still print.
    let r = run(&["-q", "analyze", "--model", s(&tmp.path().join("missing"))]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    assert!(r.stderr.contains("missing"), "{}", r.stderr);
}

#[test]
fn verbose_names_the_files_read_and_times_each_phase() {
    let model = fixture("mixtral");
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3 4\n5 6 7\n").unwrap();
    let r = run(&[
        "analyze",
        "-v",
        "--model",
        s(&model),
        "--analyses",
        "all",
        "--token-ids",
        s(&ids),
        "--layers",
        "0",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for needle in [
        format!("read: {}", model.join("config.json").display()),
        format!("read: {}", model.join("model.safetensors").display()),
        format!("read: {}", ids.display()),
        "time: open model: ".into(),
        "time: analyses: ".into(),
        "time: total: ".into(),
    ] {
        assert!(r.stderr.contains(&needle), "{needle:?} not in {}", r.stderr);
    }
    // Each timing is a number of seconds.
    for line in r.stderr.lines().filter(|l| l.starts_with("time: ")) {
        let secs = line.rsplit(": ").next().unwrap().trim_end_matches(" s");
        let v: f64 = secs.parse().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v >= 0.0, "{line}");
    }
    // Without -v, none of it.
    let plain = run(&["analyze", "--model", s(&model), "--layers", "0"]);
    assert_eq!(plain.code, 0);
    assert!(!plain.stderr.contains("read: ") && !plain.stderr.contains("time: "));

    let out = tmp.path().join("t.safetensors");
    let r = run(&[
        "--verbose",
        "trace",
        "--model",
        s(&model),
        "--token-ids",
        s(&ids),
        "--output",
        s(&out),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("time: forward pass and trace: "),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(&format!("wrote {}", out.display())));

    // A golden check times each phase of each model.
    let r = run(&["-v", "check", "--name", "demo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for phase in [
        "time: demo: static analyses: ",
        "time: demo: forward pass: ",
    ] {
        assert!(r.stderr.contains(phase), "{phase:?} not in {}", r.stderr);
    }

    // Quiet and verbose at once: a usage error.
    assert_usage(&run(&["-q", "-v", "models"]), &["--quiet", "--verbose"]);
}

#[test]
fn old_spellings_get_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.safetensors");
    let r = run(&["trace", "--out", s(&out)]);
    assert_usage(&r, &["trace --out was renamed", "--output"]);
    assert!(!out.exists());
    let r = run(&["bench", "--baseline", "main", "--list"]);
    assert_usage(
        &r,
        &["bench --baseline was renamed", "--compare-baseline main"],
    );
    assert_eq!(r.stdout, "", "nothing listed");
    // The help shows only the new names.
    let help = run(&["bench", "--help"]).stdout;
    assert!(help.contains("--compare-baseline <NAME>"), "{help}");
    assert!(!help.contains("--baseline <NAME>"), "{help}");
    let help = run(&["trace", "--help"]).stdout;
    assert!(help.contains("--output <FILE>") && !help.contains("--out <FILE>"));
}

#[test]
fn flags_a_format_ignores_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("report");
    let r = run(&["analyze", "--out", s(&dir)]);
    assert_usage(
        &r,
        &["--out", "the table format writes no files", "--format json"],
    );
    assert!(!dir.exists());
    assert_usage(
        &run(&["analyze", "--format", "json", "--full"]),
        &["--full", "--format json ignores it"],
    );
    assert_usage(
        &run(&[
            "analyze",
            "--format",
            "markdown",
            "--out",
            s(&dir),
            "--full",
        ]),
        &["--full", "--format markdown"],
    );
    assert_usage(
        &run(&["analyze", "--shared-scale"]),
        &["--shared-scale", "--format table ignores it"],
    );
    assert!(!dir.exists());
    for format in ["json", "junit"] {
        assert_usage(
            &run(&["check", "--name", "demo", "--format", format, "--all"]),
            &["--all", &format!("--format {format} ignores it")],
        );
        let m = fixture("mixtral");
        assert_usage(
            &run(&[
                "diff",
                "--baseline",
                s(&m),
                "--candidate",
                s(&m),
                "--format",
                format,
                "--all",
            ]),
            &["--all", &format!("--format {format} ignores it")],
        );
    }
    // With the format that reads them, the same flags work.
    let r = run(&["analyze", "--format", "json", "--out", s(&dir)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(dir.join("report.json").is_file());
}

const BENCH: &str = "routing/softmax-topk/e8-k2/";

#[test]
fn sample_size_and_warm_up() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    let r = run_in(
        tmp.path(),
        &[
            "bench",
            "--quick",
            "--filter",
            BENCH,
            "--tokens",
            "4,8",
            "--sample-size",
            "7",
            "--warm-up",
            "0.01",
            "--out",
            s(&out),
        ],
        &[("MOE_INSPECT_BENCH_DIR", &tmp.path().join("data"))],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let benches = json["benchmarks"].as_array().unwrap();
    assert_eq!(benches.len(), 2);
    for b in benches {
        assert_eq!(b["samples_s"].as_array().unwrap().len(), 7, "{b}");
    }
    for (flag, value, why) in [
        ("--sample-size", "0", "expected 2 to 100000"),
        ("--sample-size", "1", "expected 2 to 100000"),
        ("--sample-size", "x", "not a whole number"),
        ("--warm-up", "0", "0 < SECS"),
        ("--warm-up", "-1", "-1 is not a duration"),
        ("--warm-up", "nan", "not a finite number"),
    ] {
        let r = run(&["bench", "--list", &format!("{flag}={value}")]);
        assert_usage(&r, &[flag, why]);
    }
}

/// Injected timings (never this machine's): the fixture's benchmarks with
/// samples around `centre` ms scattered by ±`spread`.
fn timings(centre: f64, spread: f64) -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join("cargo-moe-inspect/tests/data/bench.json"))
        .unwrap();
    let mut file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pattern = [0.0, 0.6, -0.8, 0.3, -0.4, 1.0, -1.0, 0.1, -0.2, 0.7];
    for b in file["benchmarks"].as_array_mut().unwrap() {
        let samples: Vec<f64> = pattern
            .iter()
            .map(|j| centre * 1e-3 * (1.0 + spread * j))
            .collect();
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 9.0;
        let half = 2.262 * var.sqrt() / 10f64.sqrt();
        b["samples_s"] = serde_json::json!(samples);
        b["iters_per_sample"] = 1.into();
        b["mean_s"] = mean.into();
        b["ci_low_s"] = (mean - half).into();
        b["ci_high_s"] = (mean + half).into();
    }
    file
}

#[test]
fn a_noisy_benchmark_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, v: serde_json::Value| {
        let p = tmp.path().join(name);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
        p
    };
    let tight = write("tight.json", timings(1.0, 0.005));
    let tight2 = write("tight2.json", timings(1.01, 0.005));
    let noisy = write("noisy.json", timings(1.0, 0.4));
    let names = timings(1.0, 0.0)["benchmarks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(names.len(), 3);

    let bench = |now: &Path, base: Option<&Path>, extra: &[&str]| {
        let mut args = vec!["bench", "--load-baseline", s(now)];
        if let Some(b) = base {
            args.extend(["--compare-baseline", s(b)]);
        }
        args.extend_from_slice(extra);
        run_in(tmp.path(), &args, &[])
    };
    // ±40% scatter against a steady baseline: every change interval is far
    // wider than 5%; each benchmark gets one warning, the verdict stays.
    let r = bench(&noisy, Some(&tight), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), names.len(), "{}", r.stderr);
    for (w, name) in warnings.iter().zip(&names) {
        assert!(w.contains(&format!("{name} is noisy")), "{w}");
        assert!(w.contains("interval of its change"), "{w}");
        assert!(w.contains("wider than the 5% threshold"), "{w}");
    }
    // Without a baseline, the interval of each mean is judged.
    let r = bench(&noisy, None, &[]);
    assert_eq!(r.code, 0);
    assert!(
        r.stderr.contains("interval of its mean time"),
        "{}",
        r.stderr
    );
    // A wider threshold, or steady timings: no warning.
    let r = bench(&noisy, Some(&tight), &["--threshold", "200"]);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let r = bench(&tight2, Some(&tight), &[]);
    assert_eq!(r.code, 0);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    // -q silences it.
    let r = bench(&noisy, Some(&tight), &["-q"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
}

/// From a directory outside any cargo workspace the benchmark data lives in
/// the user cache directory (printed), baselines included, and `--peer
/// torch` runs the script built into the binary (a stand-in "python" here
/// copies what it was given).
#[test]
fn bench_works_from_another_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("elsewhere");
    let cache = tmp.path().join("cache");
    let temp = tmp.path().join("tmp");
    for d in [&cwd, &cache, &temp] {
        std::fs::create_dir_all(d).unwrap();
    }
    let env = [
        ("XDG_CACHE_HOME", cache.as_path()),
        ("TMPDIR", temp.as_path()),
    ];
    let data = cache.join("moe-inspect").join("bench");
    let r = run_in(
        &cwd,
        &[
            "bench",
            "--quick",
            "--filter",
            BENCH,
            "--tokens",
            "4",
            "--save-baseline",
            "here",
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let saved = data.join("baselines").join("here.json");
    assert!(saved.is_file(), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("saved baseline `here` to {}", saved.display())),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("benchmark data: {}", data.display())),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0, "cwd untouched");

    // The saved baseline is found by name, and its path printed.
    let r = run_in(
        &cwd,
        &[
            "bench",
            "--load-baseline",
            "here",
            "--compare-baseline",
            "here",
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&saved.display().to_string()),
        "{}",
        r.stderr
    );
    // A missing one names the directory searched and what is saved there.
    let r = run_in(&cwd, &["bench", "--compare-baseline", "nope"], &env);
    assert_usage(&r, &["no such baseline `nope`", "here"]);

    // --peer torch: the built-in script, written to a temporary file.
    let capture = tmp.path().join("captured.py");
    let python = tmp.path().join("python");
    // The stand-in's timings: the saved run, twice as slow, as "torch".
    let mut peer_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    peer_json["tool"] = "torch 2.0 / transformers 5.0".into();
    for b in peer_json["benchmarks"].as_array_mut().unwrap() {
        for key in ["mean_s", "ci_low_s", "ci_high_s"] {
            b[key] = (b[key].as_f64().unwrap() * 2.0).into();
        }
    }
    let peer = tmp.path().join("peer.json");
    std::fs::write(&peer, peer_json.to_string()).unwrap();
    std::fs::write(
        &python,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = -c ] && exit 0\n\
             cp \"$1\" '{}'\n\
             while [ $# -gt 0 ]; do [ \"$1\" = --out ] && cp '{}' \"$2\"; shift; done\n\
             exit 0\n",
            capture.display(),
            peer.display()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let model = fixture("mixtral");
    let r = run_in(
        &cwd,
        &[
            "bench",
            "--load-baseline",
            "here",
            "--model",
            s(&model),
            "--peer",
            "torch",
        ],
        &[
            ("XDG_CACHE_HOME", cache.as_path()),
            ("TMPDIR", temp.as_path()),
            ("MOE_INSPECT_PYTHON", python.as_path()),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("skipped"), "{}", r.stderr);
    let script = std::fs::read_to_string(repo_root().join("benches/compare_torch.py")).unwrap();
    assert_eq!(std::fs::read_to_string(&capture).unwrap(), script);
    assert!(data.join("torch.json").is_file());
    assert_eq!(
        std::fs::read_dir(&temp).unwrap().count(),
        0,
        "the temporary script is removed"
    );
    // The peer's column is in the table, with its ratio (peer time / ours).
    assert!(r.stdout.contains("torch"), "{}", r.stdout);
    assert!(r.stdout.contains("2.00"), "{}", r.stdout);
}

/// `--max-memory` (global): `bench --model`'s decision between resident
/// and streamed weights follows it (stated under its table), the single
/// pass of `trace` streams whatever the memory (a notice after the run); a cap below the run's
/// working set is an error; a value that is not a size is a usage error.
#[test]
fn max_memory_decides_resident_or_streamed_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("t.safetensors");
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "1 2 3 4 5 6 7 8\n").unwrap();
    let model = fixture("mixtral");
    let base = [
        "--model",
        s(&model),
        "--token-ids",
        s(&ids),
        "--output",
        s(&trace),
    ];
    let r = run(&[&["trace", "--max-memory", "8G"][..], &base[..]].concat());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("weights streamed layer by layer: one pass reads each layer once"),
        "{}",
        r.stderr
    );
    let bench = |cap: &str| {
        let out = tmp.path().join(format!("bench-{cap}"));
        run(&[
            "bench",
            "--quick",
            "--model",
            s(&model),
            "--tokens",
            "3",
            "--filter",
            "forward/decode",
            "--max-memory",
            cap,
            "--out",
            s(&out),
        ])
    };
    let r = bench("8G");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("forward weights resident"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("streamed"), "{}", r.stdout);
    // A cap below the run's working set refuses the run before it starts:
    // one error line, no residency notice before it.
    let r = run(&[&["--max-memory", "1K", "trace"][..], &base[..]].concat());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    for bad in ["lots", "0", "5X"] {
        let r = run(&["trace", "--max-memory", bad]);
        assert_usage(&r, &["--max-memory"]);
    }
}
