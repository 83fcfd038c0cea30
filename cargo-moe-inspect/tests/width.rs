//! Output that fits a terminal: `analyze`, `models`, `bench` and the drift
//! table rendered with COLUMNS=80, every line at most 80 display columns
//! (chars; the box-drawing chars are one column each); a 64-expert model is
//! summarised by default and printed in full with `--full`.

use moe_inspect_testkit as common;

use std::path::Path;
use std::process::Command;

use common::repo_root;
use moe_inspect::bench::synthetic::{write_checkpoint, Geometry};

/// Runs the binary in `dir` with COLUMNS=`columns`; returns stdout.
fn run_in(dir: &Path, columns: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env("COLUMNS", columns)
        .env_remove("CARGO_TERM_COLOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn at_80(args: &[&str]) -> String {
    run_in(&repo_root(), "80", args)
}

/// The widest line, in chars.
fn widest(s: &str) -> usize {
    s.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

fn assert_fits(what: &str, s: &str, width: usize) {
    for l in s.lines() {
        assert!(
            l.chars().count() <= width,
            "{what}: line wider than {width}: {l:?}"
        );
    }
}

#[test]
fn analyze_demo_fits_80_columns() {
    let out = at_80(&["analyze", "--layers", "0"]);
    assert_fits("analyze", &out, 80);
    // 8 experts fit: the matrices are printed in full.
    assert!(out.contains("expert-similarity · layer 0 · up"), "{out}");
    insta::assert_snapshot!("analyze_demo_layer0_80", out);
}

#[test]
fn models_fits_80_columns() {
    let out = at_80(&["models"]);
    assert_fits("models", &out, 80);
    for needle in [
        "first_k_dense_replace",
        "mlp.shared_expert",
        "gpt_oss",
        "Qwen3-235B-A22B",
    ] {
        assert!(out.contains(needle), "{needle} lost: {out}");
    }
    insta::assert_snapshot!("models_80", out);
}

#[test]
fn bench_table_fits_80_columns() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = repo_root().join("cargo-moe-inspect/tests/data/bench.json");
    let fixture = fixture.to_str().unwrap();
    let out = run_in(dir.path(), "80", &["bench", "--load-baseline", fixture]);
    assert_fits("bench", &out, 80);
    let with_baseline = run_in(
        dir.path(),
        "80",
        &[
            "bench",
            "--load-baseline",
            fixture,
            "--compare-baseline",
            fixture,
        ],
    );
    assert_fits("bench --compare-baseline", &with_baseline, 80);
    insta::assert_snapshot!("bench_80", out);
}

/// `check --all` at 80 columns: the drift table of every check of the demo
/// model against a snapshot recorded by this run (so every delta is exactly
/// 0 and the snapshot does not depend on the machine's float rounding).
#[test]
fn check_table_fits_80_columns() {
    let golden = tempfile::tempdir().unwrap();
    let g = golden.path().to_str().unwrap();
    let root = repo_root();
    let snap = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(["snapshot", "--name", "demo", "--golden-dir", g])
        .current_dir(&root)
        .env_remove("CI")
        .output()
        .unwrap();
    assert!(snap.status.success(), "{snap:?}");
    let out = run_in(
        &root,
        "80",
        &["check", "--name", "demo", "--golden-dir", g, "--all"],
    );
    assert_fits("check --all", &out, 80);
    let rows = out.lines().filter(|l| l.contains("│ ok ")).count();
    assert!(rows >= 40, "every check is a row: {out}");
    assert!(!out.lines().any(|l| l.contains("│ drift")), "{out}");
    assert!(
        out.ends_with("check: 1 model: 1 passed, 0 drifted\n"),
        "{out}"
    );
    insta::assert_snapshot!("check_demo_all_80", out);
}

#[test]
fn narrower_and_unlimited_widths() {
    let out = run_in(&repo_root(), "60", &["models"]);
    assert_fits("models at 60", &out, 60);
    // COLUMNS=0: no limit, one table row per family.
    let wide = run_in(&repo_root(), "0", &["models"]);
    assert!(widest(&wide) > 60, "{wide}");
}

fn synthetic_64(dir: &Path) {
    let g = Geometry {
        layers: 1,
        experts: 64,
        top_k: 2,
        hidden: 16,
        intermediate: 32,
        dtype: "F32",
    };
    write_checkpoint(dir, &g, 1).unwrap();
}

#[test]
fn sixty_four_experts_are_summarised_unless_full() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_64(dir.path());
    let model = dir.path().to_str().unwrap();
    let args = ["analyze", "--model", model, "--layers", "0"];
    let out = at_80(&args);
    assert_fits("analyze 64 experts", &out, 80);
    assert!(out.contains("most similar"), "{out}");
    assert!(out.contains("least similar"), "{out}");
    assert!(out.contains("--full"), "{out}");
    assert!(!out.contains("· layer 0 · up"), "{out}");

    let mut full_args = args.to_vec();
    full_args.push("--full");
    let full = at_80(&full_args);
    assert!(full.contains("expert-similarity · layer 0 · up"), "{full}");
    // 64 columns of 3-decimal cells: far wider than the terminal, by request.
    assert!(widest(&full) > 500, "{}", widest(&full));

    // Beyond 12 experts the summary is used even without a width limit.
    let unlimited = run_in(&repo_root(), "0", &args);
    assert!(unlimited.contains("most similar"), "{unlimited}");
}

/// The committed table snapshots (rendered at the default width, 80 when
/// piped without COLUMNS) fit 80 columns: the `check` drift table among them.
#[test]
fn table_snapshots_fit_80_columns() {
    let dir = repo_root().join("cargo-moe-inspect/tests/snapshots");
    for name in [
        "golden__drift_table_router_row_scaled.snap",
        "cli__models.snap",
        "cli__analyze_mixtral_layer1_with_dense.snap",
        "width__analyze_demo_layer0_80.snap",
        "width__models_80.snap",
        "width__bench_80.snap",
        "width__check_demo_all_80.snap",
    ] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        // Skip the insta header (`---` ... `---`).
        let body = text.splitn(3, "---\n").nth(2).unwrap_or(&text);
        assert_fits(name, body, 80);
    }
}
