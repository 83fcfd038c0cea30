//! Writes a synthetic Mixtral-layout checkpoint (MoE layers only, or with
//! `VOCAB HEADS KV_HEADS` a whole model: embeddings, attention, norms and
//! head, which the forward pass runs), e.g. to measure memory on a deep model:
//!
//! ```sh
//! cargo run --release --example synthetic_checkpoint -- /tmp/synth 32 8 1024 3584 BF16
//! /usr/bin/time -v cargo-moe-inspect analyze --model /tmp/synth
//! cargo run --release --example synthetic_checkpoint -- /tmp/deep 32 8 1024 3584 BF16 32000 16 8
//! /usr/bin/time -v cargo-moe-inspect trace --model /tmp/deep --prompt "..." -o /tmp/t.safetensors
//! ```

use moe_inspect::bench::synthetic::{write_model, FullModel, Geometry};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 6 && args.len() != 9 {
        eprintln!(
            "usage: synthetic_checkpoint DIR LAYERS EXPERTS HIDDEN INTERMEDIATE F32|F16|BF16 [VOCAB HEADS KV_HEADS]"
        );
        std::process::exit(2);
    }
    let num = |i: usize| -> usize {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("error: `{}` is not a number", args[i]);
            std::process::exit(2)
        })
    };
    let dtype: &'static str = match args[5].as_str() {
        "F32" => "F32",
        "F16" => "F16",
        "BF16" => "BF16",
        other => {
            eprintln!("error: dtype `{other}`: expected F32, F16 or BF16");
            std::process::exit(2)
        }
    };
    let g = Geometry {
        layers: num(1),
        experts: num(2),
        top_k: 2,
        hidden: num(3),
        intermediate: num(4),
        dtype,
    };
    let full = (args.len() == 9).then(|| FullModel {
        vocab: num(6),
        heads: num(7),
        kv_heads: num(8),
    });
    if let Err(e) = write_model(std::path::Path::new(&args[0]), &g, full, 7) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    eprintln!(
        "wrote {} layers × {} MB",
        g.layers,
        g.layer_bytes() / (1 << 20)
    );
}
