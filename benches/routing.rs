//! Routing benchmarks (router matmul + softmax + top-k + renormalise, and
//! DeepSeek-V3's group-limited sigmoid routing) from the same definitions as
//! `cargo moe-inspect bench` (`moe_inspect::bench::routing`): E = 8, 64, 256
//! with k = 2, 6, 8, on 1, 256 and 2048 tokens. Timing waits for the device.
//!
//! Run: `cargo bench --bench routing`; on a GPU build
//! (`--features cuda`) with `MOE_INSPECT_BENCH_DEVICE=cuda`.

use std::hint::black_box;
use std::time::Duration;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use moe_inspect::bench::moe_layer::random_input;
use moe_inspect::bench::routing::{default_cases, Router};
use moe_inspect::bench::suite::device_prefix;

fn device() -> Device {
    let spec = std::env::var("MOE_INSPECT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    moe_inspect::forward::parse_device(&spec).expect("MOE_INSPECT_BENCH_DEVICE")
}

fn routing(c: &mut Criterion) {
    let dev = device();
    let prefix = device_prefix(&dev);
    for case in default_cases() {
        let router = Router::random(&case, &dev).expect("random router");
        let mut group =
            c.benchmark_group(format!("{prefix}/routing/{}/{}", case.variant, case.label));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for n in [1usize, 256, 2048] {
            let x = random_input(n, case.hidden, &dev).expect("input");
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(format!("n{n}"), |b| {
                b.iter(|| {
                    black_box(router.route(&x).expect("route"));
                    dev.synchronize().expect("sync");
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, routing);
criterion_main!(benches);
