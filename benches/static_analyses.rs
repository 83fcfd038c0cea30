//! Static-analysis benchmarks (issue: "all static analyses ... fast").
//!
//! The checkpoints are synthetic, written on first use into
//! `target/moe-inspect-bench/` (or `$MOE_INSPECT_BENCH_DIR`):
//! - one layer with Mixtral-8x7B geometry (8 experts, 4096 × 14336, bf16: 2.8 GB);
//! - a Mixtral-geometry-scaled model (4 layers, 8 experts, 1024 × 3584, bf16).
//!
//! `stream-bytes` is the reference: a plain parallel read/sum of the same
//! mmapped bytes. The similarity analyses are bound by reading the weights,
//! so their time is reported next to it.
//!
//! `neuron-reorder/n3584` times the two parts of one expert pair at n = 3584
//! (hidden 1024): the n×n cosine matrix product and the exact assignment. The
//! same matrix is written to `lsa-3584.f64` for `benches/lsa_scipy.py`.
//!
//! Run: `cargo bench --bench static_analyses` (filter with e.g. `-- reorder`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moe_inspect::analysis::linalg::{matmul, Op};
use moe_inspect::analysis::statics::neuron_reorder::Neurons;
use moe_inspect::analysis::{self, assignment, neurons, AnalysisKind, AnalyzeOptions};
use moe_inspect::bench::synthetic::Geometry;
use moe_inspect::bench::{cached_checkpoint, data_dir, static_bench};
use moe_inspect::model::{Matrix, Model};

fn similarity_opts() -> AnalyzeOptions<'static> {
    AnalyzeOptions {
        analyses: vec![
            AnalysisKind::ExpertSimilarity,
            AnalysisKind::NeuronSimilarity,
            AnalysisKind::GateEmbedding,
        ],
        layers: None,
        dense: None,
        dynamic: None,
    }
}

fn bench_model(c: &mut Criterion, name: &str, g: Geometry) {
    let dir = cached_checkpoint(name, &g).expect("write synthetic checkpoint");
    let model = Model::open(&dir).expect("open synthetic checkpoint");
    let bytes: usize = (0..g.layers)
        .map(|l| static_bench::layer_bytes(&model, l).unwrap())
        .sum();
    let mut group = c.benchmark_group(format!("cpu/static/{name}"));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("stream-bytes", |b| {
        b.iter(|| {
            let mut s = 0u64;
            for l in 0..g.layers {
                s = s.wrapping_add(static_bench::stream_layer(&model, l).unwrap());
            }
            black_box(s)
        })
    });
    let opts = similarity_opts();
    group.bench_function("expert+neuron+gate", |b| {
        b.iter(|| black_box(analysis::run(&model, &opts, &()).unwrap()))
    });
    group.finish();
}

fn static_similarity(c: &mut Criterion) {
    bench_model(c, "mixtral-scaled-4layers", Geometry::mixtral_scaled(4));
    bench_model(c, "mixtral-8x7b-layer", Geometry::mixtral_8x7b(1));
}

fn neuron_reorder(c: &mut Criterion) {
    let dir = cached_checkpoint("mixtral-scaled-4layers", &Geometry::mixtral_scaled(4))
        .expect("write synthetic checkpoint");
    let model = Model::open(&dir).unwrap();
    let view = model.moe_layer(0).unwrap();
    let load = |e: usize| {
        let (data, n, h) = neurons::load(&view.experts[e].up, neurons::axis(Matrix::Up)).unwrap();
        Neurons::<f64>::new(&data, n, h)
    };
    let (a, b) = (load(0), load(1));
    let n = a.count;
    let s = matmul(&a.unit, Op::N, &b.unit, Op::T, n, a.hidden, n, 1.0);
    let raw: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let _ = std::fs::write(data_dir().join(format!("lsa-{n}.f64")), raw);
    let mut group = c.benchmark_group(format!("cpu/neuron-reorder/n{n}"));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("matmul", |bch| {
        bch.iter(|| black_box(matmul(&a.unit, Op::N, &b.unit, Op::T, n, a.hidden, n, 1.0)))
    });
    group.bench_function("assignment", |bch| {
        bch.iter(|| black_box(assignment::maximize(&s, n).unwrap()))
    });
    group.finish();
    let p = assignment::maximize(&s, n).unwrap();
    let optimum: f64 = (0..n).map(|i| s[i * n + p[i]]).sum();
    eprintln!(
        "neuron-reorder n={n}: optimum {optimum:.9}, Kendall tau {:.6}",
        assignment::kendall_tau(&p)
    );
}

criterion_group!(benches, neuron_reorder, static_similarity);
criterion_main!(benches);
