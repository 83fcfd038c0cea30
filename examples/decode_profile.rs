//! Where a decode step's time goes, on a checkpoint with resident weights
//! (timers only; for reading, not for assertions):
//! `cargo run --release --example decode_profile -- /tmp/scaled 200 [exact|bf16]`
//!
//! Prints the time of a whole step at a 16-token context and, separately,
//! of its parts: the matrix–vector products at each shape (with the GB/s
//! they reach), one MoE block on one token, the embedding row, the
//! thread pool's round trip.

use std::time::Instant;

use candle_core::{Device, Tensor};
use moe_inspect::forward::weights::{HostData, HostMatrix, MlpWeights};
use moe_inspect::forward::Forward;
use moe_inspect::model::Model;

/// Median seconds of `runs` calls of `f`.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: decode_profile MODEL_DIR [RUNS]");
        std::process::exit(2);
    };
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(100);
    let model = Model::open(std::path::Path::new(dir)).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let compute = match args.get(2).map(String::as_str) {
        None | Some("exact") => moe_inspect::forward::expert_gemm::Compute::Exact,
        Some("bf16") => moe_inspect::forward::expert_gemm::Compute::Bf16,
        Some(c) => {
            eprintln!("unknown compute mode {c:?} (exact or bf16)");
            std::process::exit(2);
        }
    };
    let fwd = Forward::new(&model, Device::Cpu)
        .unwrap()
        .keep_weights()
        .compute(compute);
    let vocab = fwd.cfg.vocab_size;
    let ids: Vec<u32> = (0..17u32).map(|i| (i * 7919) % vocab as u32).collect();
    let mut dec = fwd.decoder(17).unwrap();
    dec.prefill(&ids[..16], &mut ()).unwrap();
    let step = time(runs, || {
        dec.truncate(16);
        dec.step(ids[16], &mut ()).unwrap();
    });
    let in_pool = time(runs, || {
        rayon::scope(|_| {
            dec.truncate(16);
            dec.step(ids[16], &mut ()).unwrap();
        })
    });
    let nocache = time(runs.min(50), || {
        fwd.run(&[vec![ids[16]]], &mut (), true).unwrap();
    });
    println!("step at context 16: {:.3} ms", step * 1e3);
    println!(
        "step at context 16, called on a pool thread: {:.3} ms",
        in_pool * 1e3
    );
    println!("one-token forward, no cache: {:.3} ms", nocache * 1e3);

    let hidden = model.info.hidden_size;
    let x: Vec<f32> = (0..hidden.max(8192))
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let mut total = 0.0;
    let mut part = |name: &str, t: f64, bytes: f64, times: usize| {
        total += t * times as f64;
        println!(
            "{name:<40} {:8.3} ms × {times:2} = {:8.3} ms  {:6.1} GB/s",
            t * 1e3,
            t * 1e3 * times as f64,
            bytes / t / 1e9
        );
    };
    let layers = model.info.num_layers;
    let lw = fwd.load_layer(0).unwrap();
    let mv = |w: &Tensor| {
        let m = HostMatrix::of(w).expect("a host matrix");
        let (rows, cols) = (m.rows, m.cols);
        let mut y = vec![0f32; rows];
        let xs = &x[..cols];
        let bytes = (rows * cols * 2) as f64;
        let t = time(runs, || match m.data() {
            HostData::Bf16(d) => {
                moe_inspect::forward::expert_gemm::matmul_xwt(xs, 1, cols, d, rows, &mut y)
            }
            _ => panic!("bf16 expected"),
        });
        (t, bytes, rows, cols)
    };
    if let moe_inspect::forward::weights::AttnWeights::Standard { q, k, v, o, .. } = &lw.attn {
        for (n, w) in [("q", q), ("k", k), ("v", v), ("o", o)] {
            let (t, b, r, c) = mv(w);
            part(&format!("matvec {n} [{r}, {c}]"), t, b, layers);
        }
    }
    if let MlpWeights::Moe { experts, .. } = &lw.mlp {
        let (t, b, r, c) = mv(&experts[0].gate);
        part(&format!("matvec expert gate [{r}, {c}]"), t, b, 0);
        let (t, b, r, c) = mv(&experts[0].down);
        part(&format!("matvec expert down [{r}, {c}]"), t, b, 0);
        let xt = Tensor::from_slice(&x[..hidden], (1, hidden), &Device::Cpu).unwrap();
        let bytes = 2.0 * 3.0 * (hidden * model.info.expert_intermediate * 2) as f64;
        let t = time(runs, || {
            fwd.moe_block(model.info.moe_layers[0], &lw, &xt, &mut ())
                .unwrap();
        });
        part("moe block, one token (top-k experts)", t, bytes, layers);
    }
    let head =
        moe_inspect::forward::weights::HeadWeights::load(&model, &fwd.cfg, &Device::Cpu, true)
            .unwrap();
    let (t, b, r, c) = mv(&head.lm_head);
    part(&format!("matvec lm_head [{r}, {c}]"), t, b, 1);
    let t = time(runs, || {
        moe_inspect::forward::weights::embed(&model, &[ids[3]], &Device::Cpu).unwrap();
    });
    part("embedding row", t, 0.0, 1);
    let t = time(runs, || {
        rayon::join(|| (), || ());
    });
    part("rayon::join round trip", t, 0.0, 0);
    println!(
        "sum of the parts: {total:.3e} s; step − parts: {:.3} ms",
        (step - total) * 1e3
    );
}
