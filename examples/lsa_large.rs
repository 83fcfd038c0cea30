//! neuron-reorder at Mixtral-8x7B size: aligns expert 1's `up` neurons to
//! expert 0's on the synthetic one-layer checkpoint that
//! `cargo bench --bench static_analyses` writes (n = 14336, hidden 4096),
//! timing the n×n cosine matrix product and the exact assignment, and writes
//! the matrix (f64) for `benches/lsa_scipy.py`:
//!
//! ```sh
//! cargo run --release --example lsa_large -- target/moe-inspect-bench/mixtral-8x7b-layer
//! python benches/lsa_scipy.py target/moe-inspect-bench/lsa-14336.f64
//! ```

use std::time::Instant;

use moe_inspect::analysis::neurons;
use moe_inspect::analysis::statics::neuron_reorder::{align_pair, Neurons};
use moe_inspect::model::{Matrix, Model};

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: lsa_large MODEL_DIR");
        std::process::exit(2);
    };
    let model = Model::open(std::path::Path::new(&dir)).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let view = model.moe_layer(model.info.moe_layers[0]).unwrap();
    let load = |e: usize| {
        let (data, n, h) = neurons::load(&view.experts[e].up, neurons::axis(Matrix::Up)).unwrap();
        Neurons::<f32>::new(&data, n, h)
    };
    let (a, b) = (load(0), load(1));
    let t = Instant::now();
    let r = align_pair(&a, &b).unwrap();
    eprintln!(
        "n={}: matmul {:.2?}, assignment {:.2?} (total {:.2?}); optimum {:.9}, similarity {:.6}, Kendall tau {:.6}",
        a.count,
        r.matmul_time,
        r.assignment_time,
        t.elapsed(),
        r.optimum,
        r.similarity,
        r.kendall_tau
    );
    // The same matrix in f64 for scipy (computed again; the pair result drops it).
    let s = a.cosines(&b);
    let path = moe_inspect::bench::data_dir().join(format!("lsa-{}.f64", a.count));
    let raw: Vec<u8> = s.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
    std::fs::write(&path, raw).unwrap();
    eprintln!("wrote {}", path.display());
}
