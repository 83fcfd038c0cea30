//! Benchmark support shared by `benches/` and the CLI: synthetic checkpoints
//! with the geometry of real models, written without downloads, and the
//! reference measurements benchmarks are compared with; the benchmark
//! definitions of `cargo moe-inspect bench` (routing, one MoE layer, full
//! forward), their timing harness, peak probes, verdicts against a baseline
//! and the results (`bench.json`, schema `moe-inspect/bench/v1`), which
//! [`crate::report::bench`] renders.

pub mod harness;
pub mod moe_layer;
pub mod probe;
pub mod routing;
pub mod schema;
pub mod static_bench;
pub mod suite;
pub mod synthetic;
pub mod verdict;

use std::path::PathBuf;

/// A directory for generated benchmark checkpoints (kept between runs):
/// `$MOE_INSPECT_BENCH_DIR`, or `target/moe-inspect-bench`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("MOE_INSPECT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moe-inspect-bench")
        })
}

/// Writes a synthetic checkpoint into `data_dir()/name` unless one with the
/// same geometry is already there; returns its directory.
pub fn cached_checkpoint(name: &str, g: &synthetic::Geometry) -> crate::Result<PathBuf> {
    cached_model(name, g, None)
}

/// Like [`cached_checkpoint`], for a full model the forward pass can run.
pub fn cached_model(
    name: &str,
    g: &synthetic::Geometry,
    full: Option<synthetic::FullModel>,
) -> crate::Result<PathBuf> {
    let dir = data_dir().join(name);
    let stamp = dir.join("geometry.txt");
    let want = format!("{g:?} {full:?}");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        synthetic::write_model(&dir, g, full, 7)?;
        crate::atomic_write::write_atomic(&stamp, want.as_bytes())?;
    }
    Ok(dir)
}
