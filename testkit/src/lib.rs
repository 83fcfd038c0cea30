//! Helpers shared by the integration tests of `moe-inspect` and
//! `cargo-moe-inspect`: fixture paths, reference values, and copies of
//! fixtures that tests may break. A crate of its own (not published), so
//! both crates' tests use it without `#[path]` module tricks.

use std::path::{Path, PathBuf};

use moe_inspect::model::writer::{self, TensorSpec};
use moe_inspect::model::Weights;

pub mod forward;

/// The MoE fixture directories (all families), relative to the repository root.
pub const MOE_FIXTURES: [&str; 8] = [
    "mixtral",
    "qwen2-moe",
    "qwen3-moe",
    "olmoe",
    "deepseek-v2",
    "deepseek-v3",
    "deepseek-moe",
    "grok-1",
];

/// The fixtures of the families added by the family table (issue 13), made
/// by fixtures/make_family_fixtures.py with transformers 5: static analyses only.
pub const FAMILY_FIXTURES: [&str; 15] = [
    "families/deepseek_v32",
    "families/gpt_oss",
    "families/glm4_moe",
    "families/qwen3_next",
    "families/qwen3_5_moe",
    "families/minimax_m2",
    "families/llama4",
    "families/llama4_multimodal",
    "families/ernie4_5_moe",
    "families/hunyuan_v1_moe",
    "families/phimoe",
    "families/granitemoe",
    "families/flex_olmo",
    "families/dbrx",
    "families/longcat_flash",
];

/// Every fixture with static reference values: the original families and the table's new ones.
pub fn static_fixtures() -> impl Iterator<Item = &'static str> {
    MOE_FIXTURES.into_iter().chain(FAMILY_FIXTURES)
}

/// The repository root (this module is shared by the library's and the CLI's tests).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("fixtures").is_dir() {
        here.to_path_buf()
    } else {
        here.parent().unwrap().to_path_buf()
    }
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures").join(name)
}

/// `fixtures/<name>/reference.json`, computed by fixtures/make_fixtures.py with numpy/scipy.
pub fn reference(name: &str) -> serde_json::Value {
    let path = fixture(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Any JSON file of a fixture (e.g. `dynamic_reference.json`).
pub fn reference_file(name: &str, file: &str) -> serde_json::Value {
    let path = fixture(name).join(file);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A matrix from reference JSON.
pub fn matrix(v: &serde_json::Value) -> Vec<Vec<f64>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Largest absolute difference between two matrices of the same shape.
/// Panics on a shape mismatch or a non-finite value on either side, so a NaN
/// never passes as "within tolerance" (`f64::max` would skip it).
pub fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "column count");
            max_abs_diff_flat("matrix row", x, y)
        })
        .fold(0.0, f64::max)
}

/// Largest `|a[i] - b[i]|` of two equally long slices; panics (naming
/// `what`) on a length mismatch or any NaN/infinity in either.
pub fn max_abs_diff_flat<T: Copy + Into<f64>>(what: &str, a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let mut max = 0.0f64;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (x, y): (f64, f64) = (x.into(), y.into());
        assert!(
            x.is_finite() && y.is_finite(),
            "{what}: non-finite value at {i}: got {x}, want {y}"
        );
        max = max.max((x - y).abs());
    }
    max
}

/// A writable copy of a fixture in a temporary directory.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// Rewrites `file` (a safetensors file in `dir`) tensor by tensor; `edit`
/// may change each tensor's spec and bytes.
pub fn rewrite_safetensors(
    dir: &Path,
    file: &str,
    mut edit: impl FnMut(&mut TensorSpec, &mut Vec<u8>),
) {
    // Read through a scratch directory holding only this file.
    let scratch = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join(file), scratch.path().join("model.safetensors")).unwrap();
    let weights = Weights::open_dir(scratch.path()).unwrap();
    let mut tensors = Vec::new();
    for name in weights.names() {
        let t = weights.tensor(name).unwrap();
        let tag = match t.dtype.name() {
            "f32" => "F32",
            "f16" => "F16",
            _ => "BF16",
        };
        let mut spec = TensorSpec::new(name, tag, &t.shape);
        let mut bytes = t.bytes().to_vec();
        edit(&mut spec, &mut bytes);
        tensors.push((spec, bytes));
    }
    drop(weights);
    writer::write(&dir.join(file), &tensors).unwrap();
}

/// Edits `config.json` in `dir` as JSON.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}
