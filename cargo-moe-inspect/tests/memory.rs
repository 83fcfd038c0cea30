//! Peak memory of a whole-model static run stays near one layer, whatever the
//! number of layers: tensors are read through mmap and each finished layer's
//! pages are dropped before the next layer is read.

#![cfg(target_os = "linux")]

use std::process::Command;

use moe_inspect::bench::synthetic::{write_checkpoint, Geometry};

/// Peak resident set (bytes) of the largest child process waited for so far.
fn children_max_rss() -> u64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0);
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn peak_rss_stays_near_one_layer_on_a_deep_model() {
    let g = Geometry {
        layers: 24,
        experts: 8,
        top_k: 2,
        hidden: 256,
        intermediate: 1024,
        dtype: "BF16",
    };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &g, 1).unwrap();
    let total = (g.layers * g.layer_bytes()) as u64;
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(["analyze", "--format", "json", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["analyses"]["expert-similarity"]["layers"]
            .as_array()
            .unwrap()
            .len(),
        g.layers
    );
    let peak = children_max_rss();
    eprintln!(
        "checkpoint {} MB ({} layers × {} MB); peak RSS of analyze {} MB",
        total >> 20,
        g.layers,
        g.layer_bytes() >> 20,
        peak >> 20
    );
    // The binary itself (with the embedded demo model) plus a few layers'
    // worth of pages in flight; reading every layer would need ≥ `total`.
    let bound = 40 * (1 << 20) + 3 * g.layer_bytes() as u64;
    assert!(
        peak < bound,
        "peak RSS {} MB exceeds {} MB (checkpoint is {} MB)",
        peak >> 20,
        bound >> 20,
        total >> 20
    );
}
