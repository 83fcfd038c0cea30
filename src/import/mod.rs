//! `import`: converts an engine's routing record into this project's trace
//! format ([`crate::trace::Routing`], written by [`crate::trace::write`]), so
//! the routing analyses run on models served elsewhere.
//!
//! | engine | reads | per-token ids | token ids | weights | logits | counts only |
//! |---|---|---|---|---|---|---|
//! | [`vllm`] | response JSON / JSONL (`prompt_routed_experts`) | yes | `prompt_token_ids` | – | – | – |
//! | [`sglang`] | recorder dumps (`.pt`), per-request JSON | `per_token`, per-request | `input_ids` (dumps) | – | – | `per_pass`, `stat` |
//! | [`megatron`] | `router_trace_rank*.jsonl` | yes | – | – | bf16 sidecar | – |
//! | [`trtllm`] | `meta_info.json` + `rank*.safetensors` | – | – | – | – | yes |
//!
//! Every record is checked against the model's config (MoE layers, expert
//! count, top-k, ids in range): a mismatch is an [`Error::Input`] naming the
//! file. Ranks of one run are merged.

pub mod megatron;
mod pickle;
pub mod sglang;
pub mod trtllm;
pub mod vllm;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::family::ModelInfo;
use crate::trace::Routing;

/// The engines `import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// vLLM `--enable-return-routed-experts` responses.
    Vllm,
    /// SGLang expert distribution recorder dumps.
    Sglang,
    /// Megatron-LM `--moe-routing-trace-path` JSONL.
    Megatron,
    /// TensorRT-LLM expert statistics.
    Trtllm,
}

impl Engine {
    /// Every engine, in CLI order.
    pub const ALL: [Engine; 4] = [
        Engine::Vllm,
        Engine::Sglang,
        Engine::Megatron,
        Engine::Trtllm,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Megatron => "megatron",
            Engine::Trtllm => "trtllm",
        }
    }
}

/// An imported record and what was left out of it, in words.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The routing, checked against the model.
    pub routing: Routing,
    /// What the import skipped (decode passes, generated tokens...).
    pub notes: Vec<String>,
}

/// Reads `paths` (files, or folders holding one run's per-rank files) as
/// `engine` records of the model described by `info`.
pub fn import(engine: Engine, paths: &[PathBuf], info: &ModelInfo) -> Result<Imported> {
    if paths.is_empty() {
        return Err(Error::Usage("import: no input path given".into()));
    }
    let imported = match engine {
        Engine::Vllm => vllm::import(paths, info)?,
        Engine::Sglang => sglang::import(paths, info)?,
        Engine::Megatron => megatron::import(paths, info)?,
        Engine::Trtllm => trtllm::import(paths, info)?,
    };
    check_model(&imported.routing, info, &paths[0])?;
    Ok(imported)
}

/// Checks a routing against the model's geometry (and its own sizes).
pub fn check_model(r: &Routing, info: &ModelInfo, path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    if r.moe_layers != info.moe_layers {
        return Err(bad(format!(
            "the record covers layers {:?}, but the model's MoE layers are {:?}",
            r.moe_layers, info.moe_layers
        )));
    }
    if r.num_experts != info.num_experts {
        return Err(bad(format!(
            "the record has {} experts per layer, the model {}",
            r.num_experts, info.num_experts
        )));
    }
    if r.selected.is_some() && r.top_k != info.top_k {
        return Err(bad(format!(
            "the record selects {} experts per token, the model's top-k is {}",
            r.top_k, info.top_k
        )));
    }
    r.validate(path)
}

/// The files of `paths`: each file itself, each folder's entries whose name
/// `keep` accepts (sorted, so ranks come in order).
pub(crate) fn files(paths: &[PathBuf], keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file() && f.file_name().and_then(|n| n.to_str()).is_some_and(&keep)
                })
                .collect();
            if found.is_empty() {
                return Err(Error::Input {
                    path: p.clone(),
                    reason: "no record file of this engine in the folder".into(),
                });
            }
            found.sort();
            out.extend(found);
        } else {
            // Opening it reports a missing file with its path.
            std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads a whole (small) file, refusing more than `limit` bytes.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > limit {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!("{size} bytes exceed the limit of {limit} bytes for this record"),
        });
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Per-token records being assembled: prompts of `[tokens, layers, k]` ids.
#[derive(Debug, Default)]
pub(crate) struct PerToken {
    pub prompt_lengths: Vec<usize>,
    pub selected: Vec<u16>,
    pub token_ids: Vec<i64>,
    /// Whether every prompt came with token ids.
    pub has_ids: bool,
}

impl PerToken {
    pub fn new() -> PerToken {
        PerToken {
            has_ids: true,
            ..PerToken::default()
        }
    }

    /// Adds one token's row of ids after checking each is below `e`.
    pub fn check_id(x: i64, e: usize, what: impl Fn() -> String, path: &Path) -> Result<u16> {
        usize::try_from(x)
            .ok()
            .filter(|&v| v < e)
            .map(|v| v as u16)
            .ok_or_else(|| Error::Input {
                path: path.to_path_buf(),
                reason: format!(
                    "{}: expert id {x} is out of range (the model has {e} experts)",
                    what()
                ),
            })
    }

    /// The finished routing.
    pub fn finish(self, source: &str, info: &ModelInfo) -> Routing {
        let tokens: usize = self.prompt_lengths.iter().sum();
        Routing {
            source: source.to_string(),
            moe_layers: info.moe_layers.clone(),
            num_experts: info.num_experts,
            top_k: info.top_k,
            token_ids: (self.has_ids && self.token_ids.len() == tokens).then_some(self.token_ids),
            prompt_lengths: self.prompt_lengths,
            selected: Some(self.selected),
            ..Routing::default()
        }
    }
}
