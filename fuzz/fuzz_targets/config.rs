//! Bytes → everything `Model::open` and the forward pass do with config.json
//! short of opening weights: `Config::parse`, family detection, the family
//! adapter's `ModelInfo`, the forward-pass settings, and the dense-reference
//! view.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moe_inspect::forward::config::ForwardConfig;
use moe_inspect::model::{Config, DenseInfo, ModelInfo};

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse(Path::new("config.json"), data) else {
        return;
    };
    let _ = DenseInfo::from_config(&config);
    let Ok(info) = ModelInfo::from_config(&config) else {
        return;
    };
    assert!(!info.moe_layers.is_empty());
    assert!(info.top_k >= 1 && info.top_k <= info.num_experts);
    let _ = ForwardConfig::from_config(&config, &info);
});
