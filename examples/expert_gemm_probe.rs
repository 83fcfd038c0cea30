//! Times `expert_gemm::matmul_xwt` against candle's matmul for one expert's
//! product at a few token counts, on one hot weight `[N, K]` (default 1024 ×
//! 2048): `K=1024 N=3584 cargo run --release --example expert_gemm_probe`.
//! (Measured on the 2-core AVX-512 machine: ~188 GFLOP/s from 32 tokens on,
//! against candle's 165-200 on its `[in, out]` copy. It was ~135 at every K
//! until the 4 × 4 tile's accumulators were named one by one: held in an
//! array, one of them lived on the stack.)
use std::time::Instant;

use candle_core::{Device, Tensor};
use moe_inspect::forward::expert_gemm::matmul_xwt;

fn best(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let k: usize = std::env::var("K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let wtt = wt.t().unwrap().contiguous().unwrap();
    for m in [1usize, 4, 16, 32, 64, 128, 256] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let mut y = vec![0f32; m * n];
        let reps = 20;
        let ours = best(|| matmul_xwt(&x, m, k, &w, n, &mut y), reps);
        let hub = best(|| drop(xt.matmul(&wt.t().unwrap()).unwrap()), reps);
        let tr = best(|| drop(xt.matmul(&wtt).unwrap()), reps);
        let fl = 2.0 * (m * n * k) as f64;
        println!(
            "m={m:4}  ours {:8.3} ms {:6.1} GF/s | candle x·Wᵀ(view) {:8.3} ms {:6.1} | candle x·Wt {:8.3} ms {:6.1}",
            ours * 1e3, fl / ours / 1e9, hub * 1e3, fl / hub / 1e9, tr * 1e3, fl / tr / 1e9
        );
    }
}
