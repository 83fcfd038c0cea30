//! The forward pass's choice between resident and streamed weights
//! (`Forward::resident_if_fits`, by the number of passes and the memory), driven by `memory::set_max_memory` (the
//! CLI's `--max-memory`): one test in its own process, since the cap is
//! process-wide.

use moe_inspect_testkit as common;

use candle_core::Device;
use common::fixture;
use moe_inspect::forward::{to_host, Forward, Passes};
use moe_inspect::memory;
use moe_inspect::model::Model;

#[test]
fn weights_are_resident_when_they_fit_and_streamed_otherwise_with_the_same_logits() {
    // olmoe: bf16 (matrices kept as stored); mixtral: f32.
    for name in ["olmoe", "mixtral"] {
        let model = Model::open(&fixture(name)).unwrap();
        let bytes = Forward::new(&model, Device::Cpu)
            .unwrap()
            .resident_weight_bytes();
        assert!(bytes > 0);
        let ids: Vec<u32> = (1..9).collect();
        let mut logits = Vec::new();
        // Repeated passes: below the weights' size, at it (more than 3/4 of
        // the cap), and twice it; one pass streams whatever the memory (each
        // layer is read once either way).
        for (cap, passes, resident) in [
            (bytes / 2, Passes::Repeated, false),
            (bytes, Passes::Repeated, false),
            (bytes * 2, Passes::Repeated, true),
            (bytes * 2, Passes::One, false),
        ] {
            memory::set_max_memory(Some(cap));
            let fwd = Forward::new(&model, Device::Cpu)
                .unwrap()
                .resident_if_fits(passes);
            let r = fwd.residency().expect("decided").clone();
            assert_eq!(
                r.resident, resident,
                "{name}: cap {cap}, weights {bytes}, {passes:?}: {r}"
            );
            assert_eq!(r.passes, passes);
            assert_eq!(fwd.weights_resident(), resident);
            assert_eq!(r.weight_bytes, bytes);
            assert_eq!(r.available.map(|a| a <= cap), Some(true));
            let text = r.to_string();
            assert!(
                text.starts_with(if resident {
                    "weights resident"
                } else {
                    "weights streamed"
                }),
                "{text}"
            );
            assert_eq!(
                text.contains("one pass reads each layer once"),
                passes == Passes::One,
                "{text}"
            );
            // The run's own memory check (its working set, tens of MiB)
            // is not under test here: lift the cap once decided.
            memory::set_max_memory(None);
            for _ in 0..2 {
                let out = fwd.run(std::slice::from_ref(&ids), &mut (), true).unwrap();
                let l = to_host(&out.logits[0]).unwrap().concat();
                assert!(l.iter().all(|v| v.is_finite()));
                logits.push(l);
            }
        }
        memory::set_max_memory(None);
        assert_eq!(logits.len(), 8);
        for l in &logits[1..] {
            assert_eq!(l.len(), logits[0].len());
            let d = l
                .iter()
                .zip(&logits[0])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d <= 1e-5,
                "{name}: streamed and resident logits differ by {d:e}"
            );
        }
    }
}
