//! Bytes → the input-file decoder (UTF-8, byte-order mark), the token-id
//! reader and the prompt-text (plain or JSONL) reader.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moe_inspect::input::{decode_text, parse_prompt_text, parse_token_ids};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = decode_text(Path::new("ids.txt"), data) else {
        return;
    };
    if let Ok(ids) = parse_token_ids(Path::new("ids.txt"), text) {
        assert!(!ids.is_empty() && ids.iter().all(|p| !p.is_empty()));
    }
    if let Ok(prompts) = parse_prompt_text(Path::new("prompts.txt"), text) {
        assert!(!prompts.is_empty() && prompts.iter().all(|p| !p.trim().is_empty()));
    }
});
