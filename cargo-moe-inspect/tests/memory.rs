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

fn analyze(dir: &std::path::Path, analyses: &str, layers: usize) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args([
            "analyze",
            "--format",
            "json",
            "--analyses",
            analyses,
            "--model",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = analyses.split(',').next().unwrap();
    let first = if first == "static" {
        "expert-similarity"
    } else {
        first
    };
    assert_eq!(
        report["analyses"][first]["layers"]
            .as_array()
            .unwrap()
            .len(),
        layers
    );
}

#[test]
fn peak_rss_stays_near_one_layer_on_a_deep_model() {
    let g = Geometry {
        layers: 24,
        experts: 8,
        top_k: 2,
        hidden: 256,
        intermediate: 512,
        dtype: "BF16",
    };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &g, 1).unwrap();
    let total = (g.layers * g.layer_bytes()) as u64;
    let mb = |b: u64| b >> 20;

    // The streaming analyses: nothing but a few layers' pages in flight.
    analyze(
        dir.path(),
        "expert-similarity,neuron-similarity,gate-embedding",
        g.layers,
    );
    let streaming = children_max_rss();
    // The binary itself (with the embedded demo model) plus a few layers' worth
    // of pages; reading every layer without releasing would need ≥ `total`.
    let bound = 40 * (1 << 20) + 3 * g.layer_bytes() as u64;
    eprintln!(
        "checkpoint {} MB ({} layers × {} MB); peak RSS of the streaming analyses {} MB (bound {} MB)",
        mb(total),
        g.layers,
        mb(g.layer_bytes() as u64),
        mb(streaming),
        mb(bound)
    );
    assert!(
        streaming < bound,
        "peak RSS {} MB exceeds {} MB",
        mb(streaming),
        mb(bound)
    );

    // All static analyses: neuron-reorder and neuron PCA also hold one matrix
    // type of one layer in f32 (and the PCA its f64 copy), still independent
    // of the number of layers. Children's peak is a running maximum, so this
    // run is measured second. neuron-reorder aligns one expert pair per
    // thread, each with its n×n similarity matrix (f64 at this n) and the
    // matrix product's working memory: allow two such matrices per thread.
    analyze(dir.path(), "static", g.layers);
    let full = children_max_rss();
    let matrix_f32 = (g.experts * g.hidden * g.intermediate * 4) as u64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let per_pair = (g.intermediate * g.intermediate * 8) as u64;
    // (48 MiB of fixed overhead here, not 40: rayon's threads and the
    // allocator's per-thread arenas vary by a few MB from run to run.)
    let bound =
        48 * (1 << 20) + 3 * g.layer_bytes() as u64 + 6 * matrix_f32 + 2 * threads * per_pair;
    eprintln!(
        "peak RSS of all static analyses {} MB (bound {} MB)",
        mb(full),
        mb(bound)
    );
    assert!(
        full < bound,
        "peak RSS {} MB exceeds {} MB",
        mb(full),
        mb(bound)
    );
}
