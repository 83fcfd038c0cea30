//! Runs a 256-token prefill repeatedly on the synthetic Mixtral-scaled model
//! with resident weights, for profiling (`perf record`):
//! `cargo run --release --example prefill_profile -- target/moe-inspect-bench/mixtral-scaled-full 5`

use candle_core::Device;
use moe_inspect::forward::Forward;
use moe_inspect::model::Model;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: prefill_profile MODEL_DIR [RUNS]");
        std::process::exit(2);
    };
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let model = Model::open(std::path::Path::new(dir)).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let fwd = Forward::new(&model, Device::Cpu).unwrap().keep_weights();
    let ids: Vec<u32> = (0..256u32).map(|i| (i * 7919) % 32000).collect();
    for _ in 0..runs {
        let t = std::time::Instant::now();
        // The last position's logits, as `bench` and llama-bench's prompt
        // processing compute them.
        fwd.run_logits(
            std::slice::from_ref(&ids),
            &mut (),
            moe_inspect::forward::LogitRows::Last,
        )
        .unwrap();
        eprintln!("prefill 256: {:?}", t.elapsed());
    }
}
