//! Bytes → the golden-file parser (`Snapshot::parse`) and the top-k id
//! decoder of an accepted snapshot.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moe_inspect::golden::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(snap) = Snapshot::parse(Path::new("golden/fuzz.json"), text) else {
        return;
    };
    if let Some(ids) = &snap.top_k_ids {
        let _ = ids.decode();
    }
});
