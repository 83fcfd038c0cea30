//! The JSON outputs follow the JSON Schemas committed in `docs/schemas/`
//! (draft 2020-12, checked with the `jsonschema` crate): `analyze --format
//! json` (report/v1), `check --format json` (check/v1), `diff --format json`
//! (diff/v1), `bench.json` (bench/v1) and every golden file in `golden/`
//! (golden/v1). Each schema also rejects a broken document, so a schema that
//! accepts anything fails here.

use moe_inspect_testkit as common;

use std::path::Path;
use std::process::Command;

use common::{fixture, repo_root};

fn schema(name: &str) -> jsonschema::Validator {
    let path = repo_root()
        .join("docs/schemas")
        .join(format!("{name}.v1.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::draft202012::new(&value)
        .unwrap_or_else(|e| panic!("{}: not a valid JSON Schema: {e}", path.display()))
}

fn stdout_of(args: &[&str], cwd: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .output()
        .unwrap();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON: {e}"))
}

/// Validates `doc`, then checks that dropping its `schema` key (required in
/// every schema) or putting a string where a number belongs is rejected.
fn assert_valid(name: &str, doc: &serde_json::Value, what: &str) {
    let v = schema(name);
    let errors: Vec<String> = v.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what} against {name}: {errors:#?}");
    let mut broken = doc.clone();
    broken.as_object_mut().unwrap().remove("schema");
    assert!(
        !v.is_valid(&broken),
        "{name} accepts a document without `schema`"
    );
}

#[test]
fn analyze_json_follows_the_report_schema() {
    let root = repo_root();
    let doc = stdout_of(&["analyze", "--format", "json", "--analyses", "all"], &root);
    assert_valid("report", &doc, "analyze --analyses all (demo)");
    let mut broken = doc.clone();
    broken["analyses"]["expert-similarity"]["layers"][0]["up"][0][0] = "high".into();
    assert!(!schema("report").is_valid(&broken));
}

#[test]
fn check_and_diff_json_follow_their_schemas() {
    let root = repo_root();
    let ids = root.join("golden/fixture-token-ids.txt");
    let model = fixture("mixtral");
    let check = stdout_of(&["check", "--name", "mixtral", "--format", "json"], &root);
    assert_valid("check", &check, "check --name mixtral");
    let mut broken = check.clone();
    broken["models"][0]["rows"][0]["verdict"] = "maybe".into();
    assert!(!schema("check").is_valid(&broken));
    let diff = stdout_of(
        &[
            "diff",
            "--baseline",
            model.to_str().unwrap(),
            "--candidate",
            model.to_str().unwrap(),
            "--token-ids",
            ids.to_str().unwrap(),
            "--format",
            "json",
        ],
        &root,
    );
    assert_valid("diff", &diff, "diff mixtral mixtral");
    assert!(diff["quantisation"]["attribution"].is_object());
    let mut broken = diff.clone();
    broken["quantisation"]["attribution"]["router_share"] = "all".into();
    assert!(!schema("diff").is_valid(&broken));
    let mut broken = diff;
    broken["quantisation"]["layers"][0]["coverage"]
        .as_object_mut()
        .unwrap()
        .remove("flagged");
    assert!(!schema("diff").is_valid(&broken));
}

#[test]
fn bench_json_follows_the_bench_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    let status = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args([
            "bench",
            "--quick",
            "--filter",
            "routing/softmax-topk/e8-k2/",
        ])
        .args(["--tokens", "4", "--out"])
        .arg(&out)
        .env_remove("CI")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    assert_valid("bench", &doc, "bench.json");
}

#[test]
fn every_golden_file_follows_the_golden_schema() {
    let dir = repo_root().join("golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_valid("golden", &doc, &path.display().to_string());
            checked += 1;
        }
    }
    assert_eq!(checked, 18, "golden files checked");
}
