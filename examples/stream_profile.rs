//! Profiles the streaming pass of the similarity analyses on one layer with
//! Mixtral-8x7B geometry: the time of the pass per matrix type, next to a
//! plain read of the same bytes.
//!
//! Run: `cargo run --release --example stream_profile`
use std::time::Instant;

use moe_inspect::analysis::{neurons, stream};
use moe_inspect::bench::synthetic::Geometry;
use moe_inspect::bench::{cached_checkpoint, static_bench};
use moe_inspect::model::{Matrix, Model};

fn main() {
    let dir = cached_checkpoint("mixtral-8x7b-layer", &Geometry::mixtral_8x7b(1)).unwrap();
    let model = Model::open(&dir).unwrap();
    for round in 0..3 {
        let t = Instant::now();
        static_bench::stream_layer(&model, 0).unwrap();
        let read = t.elapsed().as_secs_f64();
        let view = model.moe_layer(0).unwrap();
        let mut times = Vec::new();
        for m in Matrix::ALL {
            let views: Vec<_> = view.experts.iter().map(|x| x.matrix(m)).collect();
            for needs in [
                stream::Needs {
                    neuron_sum: false,
                    standardized_gram: false,
                },
                stream::Needs {
                    neuron_sum: true,
                    standardized_gram: false,
                },
            ] {
                let t = Instant::now();
                std::hint::black_box(stream::stream(&views, neurons::axis(m), needs).unwrap());
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let t = Instant::now();
        {
            use rayon::prelude::*;
            for m in Matrix::ALL {
                let views: Vec<_> = view.experts.iter().map(|x| x.matrix(m)).collect();
                let n = views[0].numel();
                let total: f64 = (0..n.div_ceil(1 << 14))
                    .into_par_iter()
                    .map_init(
                        || vec![0f32; 1 << 14],
                        |buf, c| {
                            let start = c << 14;
                            let len = (1usize << 14).min(n - start);
                            let mut s = 0f32;
                            for v in &views {
                                v.read_f32(start, &mut buf[..len]);
                                s += buf[0];
                            }
                            s as f64
                        },
                    )
                    .sum();
                std::hint::black_box(total);
            }
        }
        let convert = t.elapsed().as_secs_f64();
        println!("convert-only all three: {convert:.3}s");
        drop(view);
        model.release_layer(0);
        let opts = moe_inspect::analysis::AnalyzeOptions {
            analyses: vec![
                moe_inspect::analysis::AnalysisKind::ExpertSimilarity,
                moe_inspect::analysis::AnalysisKind::NeuronSimilarity,
                moe_inspect::analysis::AnalysisKind::GateEmbedding,
            ],
            layers: None,
            dense: None,
            dynamic: None,
        };
        let t = Instant::now();
        static_bench::stream_layer(&model, 0).unwrap();
        let read2 = t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(moe_inspect::analysis::run(&model, &opts, &()).unwrap());
        let full = t.elapsed().as_secs_f64();
        println!(
            "round {round}: read {read2:.3}s, expert+neuron+gate {full:.3}s ({:.2}x)",
            full / read2
        );
        println!("round {round}: read {read:.3}s; gram-only/gram+sums per matrix: {times:.3?}");
    }
}
