//! Benchmark support shared by `benches/` and the CLI: synthetic checkpoints
//! with the geometry of real models, written without downloads, and the
//! reference measurements benchmarks are compared with; the benchmark
//! definitions of `cargo moe-inspect bench` (routing, one MoE layer, full
//! forward), their timing harness, peak probes, verdicts against a baseline
//! and the results (`bench.json`, schema `moe-inspect/bench/v1`), which
//! [`crate::report::bench`] renders.

pub mod harness;
pub mod llama_cpp;
pub mod moe_layer;
pub mod outcome;
pub mod probe;
pub mod routing;
pub mod schema;
pub mod static_bench;
pub mod suite;
pub mod synthetic;
pub mod verdict;

use std::path::PathBuf;

pub use outcome::{run, Outcome, Peer, Request};

/// `benches/compare_torch.py`, the PyTorch peer of the benchmarks, built
/// into the library so that an installed binary can run it (`bench --peer
/// torch`) without its source tree.
pub const COMPARE_TORCH_PY: &str = include_str!("../../benches/compare_torch.py");

/// Where `bench` keeps saved baselines by default: `baselines/` in [`data_dir`].
pub fn baselines_dir() -> PathBuf {
    data_dir().join("baselines")
}

/// A directory for generated benchmark checkpoints and baselines (kept
/// between runs), decided once per process: `$MOE_INSPECT_BENCH_DIR`; else
/// `moe-inspect-bench/` in the target directory of the cargo workspace of
/// the current directory (cargo_metadata); else the user's cache directory
/// (`$XDG_CACHE_HOME/moe-inspect/bench` or `~/.cache/moe-inspect/bench`);
/// else the system temp directory. Never a path fixed at compile time (an
/// installed binary's source tree is in the cargo registry).
pub fn data_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("MOE_INSPECT_BENCH_DIR") {
            return PathBuf::from(dir);
        }
        if let Ok(meta) = cargo_metadata::MetadataCommand::new().no_deps().exec() {
            return meta
                .target_directory
                .into_std_path_buf()
                .join("moe-inspect-bench");
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        match cache {
            Some(c) => c.join("moe-inspect").join("bench"),
            None => std::env::temp_dir().join("moe-inspect-bench"),
        }
    })
    .clone()
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
