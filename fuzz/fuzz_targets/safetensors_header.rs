//! Bytes → the safetensors shard parser (header length, JSON header, data
//! offsets, shapes), then every tensor it accepted is read back: an accepted
//! header must describe bytes that are really there.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moe_inspect::model::Weights;

fuzz_target!(|data: &[u8]| {
    let Ok(w) = Weights::from_bytes(Path::new("fuzz"), data) else {
        return;
    };
    for name in w.names() {
        let (_, shape, bytes) = w.raw(name).expect("a listed tensor is readable");
        assert!(bytes.len() <= data.len());
        let _ = shape;
        if let Ok(t) = w.tensor(name) {
            if t.numel() <= 1 << 16 {
                let _ = t.to_f32_vec();
            }
        }
    }
});
