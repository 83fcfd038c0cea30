//! One MoE layer, from the same definitions as `cargo moe-inspect bench`
//! (`moe_inspect::bench::moe_layer`): the forward pass's sparse top-k
//! dispatch (tokens grouped by expert), its all-experts mode, and the naive
//! per-expert `index_select`/`index_add` loop as the reference point; on a
//! GPU build also candle's fused MoE GEMM. On layer 0 of the scaled Mixtral
//! model (8 experts, top-2, 1024 × 3584; written into
//! `target/moe-inspect-bench/` on first use), and with
//! `MOE_INSPECT_BENCH_REAL=1` on one-layer models of OLMoE-1B-7B,
//! Qwen3-30B-A3B and DeepSeekMoE-16B's layer shapes. Timing waits for the device.
//!
//! Run: `cargo bench --bench moe_layer` (`MOE_INSPECT_BENCH_DEVICE=cuda` on a GPU build).

use std::hint::black_box;
use std::time::Duration;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moe_inspect::bench::cached_model;
use moe_inspect::bench::moe_layer::{self, random_input, AllExpertOutputs};
use moe_inspect::bench::suite::{device_prefix, scaled_mixtral_dir};
use moe_inspect::forward::Forward;
use moe_inspect::model::Model;

fn device() -> Device {
    let spec = std::env::var("MOE_INSPECT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    moe_inspect::forward::parse_device(&spec).expect("MOE_INSPECT_BENCH_DEVICE")
}

fn layer(c: &mut Criterion, dev: &Device, label: &str, model: &Model) {
    let prefix = device_prefix(dev);
    let fwd = Forward::new(model, dev.clone())
        .expect("forward")
        .keep_weights();
    let lw = fwd.load_layer(0).expect("layer 0");
    let naive_experts = moe_layer::NaiveExperts::new(&lw).expect("naive experts");
    #[cfg(feature = "cuda")]
    let fused = (!dev.is_cpu()).then(|| moe_layer::FusedExperts::new(&lw).expect("fused"));
    let mut group = c.benchmark_group(format!("{prefix}/moe-layer"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for n in [1usize, 256] {
        let x = random_input(n, model.info.hidden_size, dev).expect("input");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("topk/{label}/n{n}"), |b| {
            b.iter(|| {
                black_box(fwd.moe_block(0, &lw, &x, &mut ()).expect("topk"));
                dev.synchronize().expect("sync");
            })
        });
        group.bench_function(format!("naive/{label}/n{n}"), |b| {
            b.iter(|| {
                black_box(moe_layer::naive(&fwd, &lw, &naive_experts, &x).expect("naive"));
                dev.synchronize().expect("sync");
            })
        });
        group.bench_function(format!("all-experts/{label}/n{n}"), |b| {
            b.iter(|| {
                black_box(
                    fwd.moe_block(0, &lw, &x, &mut AllExpertOutputs)
                        .expect("all experts"),
                );
                dev.synchronize().expect("sync");
            })
        });
        #[cfg(feature = "cuda")]
        {
            if let Some(f) = &fused {
                group.bench_function(format!("fused/{label}/n{n}"), |b| {
                    b.iter(|| {
                        black_box(f.forward(&fwd, &lw, &x).expect("fused"));
                        dev.synchronize().expect("sync");
                    })
                });
            }
        }
    }
    group.finish();
}

fn moe_layers(c: &mut Criterion) {
    let dev = device();
    let dir = scaled_mixtral_dir("BF16").expect("write the scaled Mixtral model");
    let model = Model::open(&dir).expect("open");
    layer(c, &dev, "mixtral-scaled", &model);
    if std::env::var_os("MOE_INSPECT_BENCH_REAL").is_some() {
        for g in moe_layer::real_geometries(false, "BF16") {
            let dir = cached_model(
                &format!("layer-{}-bf16", g.label),
                &g.geometry,
                Some(g.full),
            )
            .expect("write the synthetic layer");
            let model = Model::open(&dir).expect("open");
            layer(c, &dev, g.label, &model);
        }
    }
}

criterion_group!(benches, moe_layers);
criterion_main!(benches);
