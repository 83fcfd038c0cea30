//! Forward-pass benchmarks on a Mixtral-geometry-scaled synthetic model
//! (4 layers, 8 experts, top-2, hidden 1024, intermediate 3584, 16 heads,
//! vocab 32000, bf16 on disk, f32 compute), written on first use into
//! `target/moe-inspect-bench/` (or `$MOE_INSPECT_BENCH_DIR`):
//!
//! - `cpu/moe-layer/topk/256`: one MoE block, tokens grouped by expert;
//! - `cpu/moe-layer/all-experts/256`: the same with every expert evaluated
//!   on every token (what the dynamic analyses observe);
//! - `cpu/prefill/256/streamed`: the whole model, 256 tokens, final logits,
//!   each layer converted from the bf16 mmap during the run (the default);
//! - `cpu/prefill/256/resident`: the same with the f32 weights kept in memory
//!   (`Forward::keep_weights`), as PyTorch holds them.
//!
//! - `cpu/dynamic/256/all-four-analyses` vs `cpu/dynamic/256/all-experts-forward`:
//!   the dynamic analyses' cost over the forward pass they observe.
//!
//! `benches/compare_torch.py` times PyTorch/transformers on the same
//! checkpoint. Run: `cargo bench --bench forward`.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moe_inspect::analysis::dynamic::{self, DynamicOptions};
use moe_inspect::bench::cached_model;
use moe_inspect::bench::synthetic::{FullModel, Geometry};
use moe_inspect::forward::observer::{Observer, Wants};
use moe_inspect::forward::Forward;
use moe_inspect::model::Model;

const TOKENS: usize = 256;

struct AllExperts;

impl Observer for AllExperts {
    fn wants(&self) -> Wants {
        Wants {
            all_expert_outputs: true,
            activations: true,
            ..Wants::default()
        }
    }
}

fn forward(c: &mut Criterion) {
    let full = FullModel {
        vocab: 32000,
        heads: 16,
        kv_heads: 8,
    };
    let dir = cached_model(
        "mixtral-scaled-full",
        &Geometry::mixtral_scaled(4),
        Some(full),
    )
    .expect("write synthetic model");
    let model = Model::open(&dir).expect("open synthetic model");
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let lw = fwd.load_layer(0).unwrap();
    let x = Tensor::randn(0f32, 1.0, (TOKENS, 1024), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("cpu/moe-layer");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Elements(TOKENS as u64));
    group.bench_function(format!("topk/{TOKENS}"), |b| {
        b.iter(|| black_box(fwd.moe_block(0, &lw, &x, &mut ()).unwrap()))
    });
    group.bench_function(format!("all-experts/{TOKENS}"), |b| {
        b.iter(|| black_box(fwd.moe_block(0, &lw, &x, &mut AllExperts).unwrap()))
    });
    group.finish();
    drop(lw);
    let ids: Vec<u32> = (0..TOKENS as u32).map(|i| (i * 7919) % 32000).collect();
    let mut group = c.benchmark_group("cpu/prefill");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Elements(TOKENS as u64));
    // Streaming: every run converts each layer from the bf16 mmap (bounded memory).
    group.bench_function(format!("{TOKENS}/streamed"), |b| {
        b.iter(|| black_box(fwd.run(std::slice::from_ref(&ids), &mut (), true).unwrap()))
    });
    // Weights kept in f32 after the first run, as PyTorch holds them.
    let resident = Forward::new(&model, Device::Cpu).unwrap().keep_weights();
    resident
        .run(std::slice::from_ref(&ids), &mut (), false)
        .unwrap();
    group.bench_function(format!("{TOKENS}/resident"), |b| {
        b.iter(|| {
            black_box(
                resident
                    .run(std::slice::from_ref(&ids), &mut (), true)
                    .unwrap(),
            )
        })
    });
    group.finish();

    // The four dynamic analyses from one pass, next to the all-experts forward
    // pass they need (both with resident weights, no logits).
    let mut group = c.benchmark_group("cpu/dynamic");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Elements(TOKENS as u64));
    group.bench_function(format!("{TOKENS}/all-experts-forward"), |b| {
        b.iter(|| {
            black_box(
                resident
                    .run(std::slice::from_ref(&ids), &mut AllExperts, false)
                    .unwrap(),
            )
        })
    });
    let opts = DynamicOptions {
        output_similarity: true,
        norm_score: true,
        intermediate: true,
        chosen_experts: true,
        layers: model.info.moe_layers.clone(),
        threshold_fraction: 0.1,
    };
    group.bench_function(format!("{TOKENS}/all-four-analyses"), |b| {
        b.iter(|| {
            black_box(dynamic::run(&resident, std::slice::from_ref(&ids), &opts, None).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
