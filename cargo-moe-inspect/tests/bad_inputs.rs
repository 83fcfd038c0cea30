//! Fault injection on the inputs (issue 16): corrupted safetensors headers
//! and index files, config.json values that are zero, huge, negative or
//! inconsistent, prompt and token-id files with a byte-order mark or garbage.
//! Each gets exit 2 with one `error:` line naming the file and the key or
//! tensor, nothing on stdout and no panic; the legitimate variants (a shard
//! name containing `..`, JSONL with a BOM) are accepted. No run's peak
//! resident memory exceeds [`PEAK_RSS_BOUND_MB`].

use moe_inspect_testkit as common;

use std::path::Path;
use std::process::Command;

use common::{copy_fixture, edit_config, repo_root};
use serde_json::{json, Map, Value};

/// Peak resident memory that any run of the binary may reach: the fixtures
/// are tiny, so a value anywhere near it means something was sized from a
/// corrupt number.
const PEAK_RSS_BOUND_MB: i64 = 512;

/// The largest peak RSS (MB) of the child processes this test binary has waited for.
fn children_peak_rss_mb() -> i64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0);
    usage.ru_maxrss / 1024 // kilobytes on Linux
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let peak = children_peak_rss_mb();
    assert!(
        peak < PEAK_RSS_BOUND_MB,
        "{args:?}: a run peaked at {peak} MB resident (bound {PEAK_RSS_BOUND_MB} MB)"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit 2, nothing on stdout, one `error:` line containing every needle, no panic.
fn assert_error(args: &[&str], needles: &[&str]) {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, 2, "{args:?}\nstderr: {stderr}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
}

fn token_ids() -> String {
    repo_root()
        .join("golden/fixture-token-ids.txt")
        .display()
        .to_string()
}

/// The static analyses on `dir`.
fn assert_static_error(dir: &Path, needles: &[&str]) {
    assert_error(&["analyze", "--model", dir.to_str().unwrap()], needles);
}

/// A forward pass on `dir` (the routing analysis over the fixture token ids).
fn assert_forward_error(dir: &Path, needles: &[&str]) {
    let ids = token_ids();
    assert_error(
        &[
            "analyze",
            "--model",
            dir.to_str().unwrap(),
            "--analyses",
            "chosen-experts",
            "--token-ids",
            &ids,
        ],
        needles,
    );
}

/// A copy of `fixture` with one config key set; the error names config.json,
/// the key and `needles`.
fn config_case(fixture: &str, key: &str, value: Value, forward: bool, needles: &[&str]) {
    let dir = copy_fixture(fixture);
    let v = value.clone();
    edit_config(dir.path(), |c| {
        c.insert(key.to_string(), v);
    });
    let key_quoted = format!("`{key}`");
    let mut all = vec!["config.json", key_quoted.as_str()];
    all.extend_from_slice(needles);
    if forward {
        assert_forward_error(dir.path(), &all);
    } else {
        assert_static_error(dir.path(), &all);
    }
}

// ---- safetensors -------------------------------------------------------

/// Splits a safetensors file into its JSON header and data section.
fn split(bytes: &[u8]) -> (Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

fn join(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(data);
    out
}

/// Edits the header of `dir/model.safetensors` (data bytes unchanged).
fn edit_header(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = dir.join("model.safetensors");
    let (mut header, data) = split(&std::fs::read(&path).unwrap());
    edit(&mut header);
    std::fs::write(&path, join(&header, &data)).unwrap();
}

const W1_0: &str = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
const W1_1: &str = "model.layers.0.block_sparse_moe.experts.1.w1.weight";

#[test]
fn two_tensors_on_the_same_bytes_are_rejected() {
    let dir = copy_fixture("mixtral");
    edit_header(dir.path(), |h| {
        let range = h[W1_0]["data_offsets"].clone();
        h.get_mut(W1_1).unwrap()["data_offsets"] = range;
    });
    assert_static_error(
        dir.path(),
        &["model.safetensors", W1_0, W1_1, "same data range"],
    );
}

#[test]
fn overlapping_data_ranges_are_rejected() {
    let dir = copy_fixture("mixtral");
    edit_header(dir.path(), |h| {
        let [s, e] = [0, 1].map(|i| h[W1_0]["data_offsets"][i].as_u64().unwrap());
        h.get_mut(W1_1).unwrap()["data_offsets"] = json!([s + 4, e + 4]);
    });
    assert_static_error(dir.path(), &["model.safetensors", W1_1, "overlapping"]);
}

#[test]
fn shape_products_that_wrap_are_rejected() {
    let dir = copy_fixture("mixtral");
    edit_header(dir.path(), |h| {
        // 2^32 · 2^32 · 4 bytes wraps u64 to 0; offsets of an empty tensor.
        let t = h.get_mut(W1_0).unwrap();
        t["shape"] = json!([4294967296u64, 4294967296u64]);
        t["data_offsets"] = json!([0, 0]);
    });
    assert_static_error(dir.path(), &["model.safetensors", W1_0, "more than 2^64"]);
}

#[test]
fn absurd_header_lengths_are_rejected() {
    let dir = copy_fixture("mixtral");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_static_error(dir.path(), &["model.safetensors", "exceeds the limit"]);
}

/// Moves `model.safetensors` to `shard` (a file name, when it is one) and
/// writes an index that names it `shard`.
fn sharded(shard: &str) -> tempfile::TempDir {
    let dir = copy_fixture("mixtral");
    let single = dir.path().join("model.safetensors");
    let (header, _) = split(&std::fs::read(&single).unwrap());
    if !shard.contains(['/', '\\']) && shard != ".." {
        std::fs::rename(&single, dir.path().join(shard)).unwrap();
    }
    let map: Map<String, Value> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .map(|k| (k.clone(), Value::from(shard)))
        .collect();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn a_shard_name_containing_two_dots_is_accepted() {
    let dir = sharded("model..00001-of-00001.safetensors");
    let (code, stdout, stderr) = run(&[
        "analyze",
        "--model",
        dir.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("expert-similarity"), "{stdout}");
}

#[test]
fn shard_names_that_leave_the_model_directory_are_rejected() {
    for name in [
        "../model.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
        "..\\model.safetensors",
        "..",
    ] {
        let dir = sharded(name);
        assert_static_error(
            dir.path(),
            &[
                "model.safetensors.index.json",
                &format!("`{name}`"),
                "not a file name",
            ],
        );
    }
}

// ---- config.json -------------------------------------------------------

#[test]
fn attention_head_counts_are_validated() {
    config_case("mixtral", "num_attention_heads", json!(0), true, &["is 0"]);
    config_case("mixtral", "num_key_value_heads", json!(0), true, &["is 0"]);
    config_case(
        "mixtral",
        "num_key_value_heads",
        json!(3),
        true,
        &["is 3", "divide"],
    );
    config_case(
        "deepseek-v3",
        "num_attention_heads",
        json!(0),
        true,
        &["is 0"],
    );
}

#[test]
fn head_dimensions_are_validated() {
    config_case(
        "qwen3-moe",
        "head_dim",
        json!(1u64 << 40),
        true,
        &["is 1099511627776"],
    );
    config_case("qwen3-moe", "head_dim", json!(0), true, &["is 0"]);
    config_case("deepseek-v3", "qk_rope_head_dim", json!(0), true, &["is 0"]);
    config_case(
        "deepseek-v3",
        "qk_rope_head_dim",
        json!(3),
        true,
        &["is 3", "even"],
    );
    config_case(
        "deepseek-v3",
        "qk_rope_head_dim",
        json!(1u64 << 40),
        true,
        &["is 1099511627776"],
    );
}

#[test]
fn numbers_of_the_forward_pass_are_validated() {
    config_case(
        "mixtral",
        "rope_theta",
        json!(0.0),
        true,
        &["is 0", "positive"],
    );
    config_case(
        "mixtral",
        "rope_theta",
        json!(-10000.0),
        true,
        &["is -10000", "positive"],
    );
    config_case(
        "olmoe",
        "rms_norm_eps",
        json!(-1e-5),
        true,
        &["is -0.00001"],
    );
    config_case(
        "deepseek-v3",
        "routed_scaling_factor",
        json!(-2.5),
        true,
        &["is -2.5"],
    );
}

#[test]
fn huge_sizes_are_refused_before_anything_is_sized_from_them() {
    config_case(
        "mixtral",
        "num_hidden_layers",
        json!(10_000_000_000u64),
        false,
        &["is 10000000000"],
    );
    config_case(
        "mixtral",
        "hidden_size",
        json!(1u64 << 40),
        false,
        &["is 1099511627776"],
    );
    config_case(
        "deepseek-v3",
        "n_shared_experts",
        json!(1u64 << 60),
        false,
        &["is 1152921504606846976"],
    );
    config_case(
        "mixtral",
        "num_hidden_layers",
        json!(10),
        false,
        &["is 10", "2 layers"],
    );
}

#[test]
fn deepseek_group_routing_is_validated() {
    config_case("deepseek-v3", "topk_group", json!(0), false, &["is 0"]);
    config_case(
        "deepseek-v3",
        "topk_group",
        json!(5),
        false,
        &["is 5", "n_group (4)"],
    );
    config_case(
        "deepseek-v3",
        "n_group",
        json!(3),
        false,
        &["is 3", "divide"],
    );
    config_case(
        "deepseek-v3",
        "num_experts_per_tok",
        json!(9),
        false,
        &["is 9"],
    );
    config_case(
        "deepseek-v3",
        "num_experts_per_tok",
        json!(0),
        false,
        &["is 0"],
    );
    // Two of 8 groups of one expert hold fewer than the 4 experts per token.
    let dir = copy_fixture("deepseek-v3");
    edit_config(dir.path(), |c| {
        c.insert("n_group".into(), json!(8));
        c.insert("topk_group".into(), json!(2));
        c.insert("num_experts_per_tok".into(), json!(4));
    });
    assert_static_error(
        dir.path(),
        &["config.json", "`topk_group`", "num_experts_per_tok (4)"],
    );
}

#[test]
fn a_layout_without_moe_layers_is_an_error() {
    config_case(
        "deepseek-v3",
        "first_k_dense_replace",
        json!(3),
        false,
        &["no MoE layer"],
    );
    config_case(
        "qwen3-moe",
        "mlp_only_layers",
        json!([0, 1, 2]),
        false,
        &["no MoE layer"],
    );
    config_case(
        "mixtral",
        "num_hidden_layers",
        json!(0),
        false,
        &["no MoE layer"],
    );
}

// ---- prompts and token ids --------------------------------------------

#[test]
fn jsonl_prompts_with_a_byte_order_mark_are_read_as_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("p.jsonl");
    let text = tmp.path().join("p.txt");
    std::fs::write(
        &jsonl,
        "\u{feff}{\"text\": \"hello world\"}\n{\"text\": \"the cat\"}\n",
    )
    .unwrap();
    std::fs::write(&text, "hello world\nthe cat\n").unwrap();
    let model = repo_root().join("fixtures/mixtral");
    let report = |prompts: &Path| {
        let (code, stdout, stderr) = run(&[
            "analyze",
            "--model",
            model.to_str().unwrap(),
            "--analyses",
            "chosen-experts",
            "--prompts",
            prompts.to_str().unwrap(),
            "--format",
            "json",
        ]);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    // Read as plain text, the JSON syntax would be tokenized and routed too.
    assert_eq!(report(&jsonl), report(&text));
}

#[test]
fn garbage_token_id_files_are_input_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo_root().join("fixtures/mixtral");
    for (name, bytes, needle) in [
        ("neg.txt", b"1 2 -3\n".to_vec(), "`-3`"),
        ("big.txt", b"99999999999\n".to_vec(), "`99999999999`"),
        ("bin.txt", b"1 2\n\xff\xfe\x00".to_vec(), "not UTF-8"),
        ("empty.txt", b"\xef\xbb\xbf\n \n".to_vec(), "no prompts"),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        assert_error(
            &[
                "analyze",
                "--model",
                model.to_str().unwrap(),
                "--analyses",
                "chosen-experts",
                "--token-ids",
                path.to_str().unwrap(),
            ],
            &[name, needle],
        );
    }
}
