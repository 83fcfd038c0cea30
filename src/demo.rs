//! The trained demo model, embedded in the binary (see `demo/TRAINING.md`):
//! a 4-layer, 8-expert, top-2 Mixtral-layout MoE trained on a generated corpus
//! of distinct text domains, so its experts have something to specialise on.

/// How reports name the demo model.
pub const LABEL: &str = "<demo>";
/// `config.json` of the demo model.
pub const CONFIG: &[u8] = include_bytes!("../demo/config.json");
/// `model.safetensors` of the demo model (bf16).
pub static WEIGHTS: &[u8] = include_bytes!("../demo/model.safetensors");
/// `tokenizer.json` of the demo model.
pub const TOKENIZER: &[u8] = include_bytes!("../demo/tokenizer.json");
/// The built-in prompt set for the demo model, one prompt per line.
pub const PROMPTS: &str = include_str!("../demo/prompts.txt");
