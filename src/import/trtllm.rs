//! TensorRT-LLM expert statistics (`EXPERT_STATISTIC_ITER_RANGE`,
//! `EXPERT_STATISTIC_PATH`): `meta_info.json` (`num_experts`,
//! `num_experts_per_token`, written by rank 0) and one `rank{r}.safetensors`
//! per rank whose tensors `"{iter}_{layer}"` are int64 bincounts `[E]` of the
//! experts selected in that iteration and layer.
//!
//! Counts only: the trace gets `expert_counts [moe_layers, E]`, summed over
//! iterations and ranks, and no per-token records.

use std::path::PathBuf;

use super::Imported;
use crate::error::{Error, Result};
use crate::model::family::ModelInfo;
use crate::model::safetensors::Weights;
use crate::trace::Routing;

/// Reads TensorRT-LLM expert statistics (see the module documentation).
pub fn import(paths: &[PathBuf], info: &ModelInfo) -> Result<Imported> {
    let files = super::files(paths, |n| {
        n.starts_with("rank") && n.ends_with(".safetensors")
    })?;
    let (l, e) = (info.moe_layers.len(), info.num_experts);
    // meta_info.json sits beside the rank files.
    let meta_path = files[0].with_file_name("meta_info.json");
    let meta: serde_json::Value =
        serde_json::from_slice(&super::read_bounded(&meta_path, 1 << 20)?).map_err(|err| {
            Error::Input {
                path: meta_path.clone(),
                reason: format!("not JSON: {err}"),
            }
        })?;
    let bad_meta = |reason: String| Error::Input {
        path: meta_path.clone(),
        reason,
    };
    let get = |key: &str| meta.get(key).and_then(serde_json::Value::as_u64);
    let me = get("num_experts").ok_or_else(|| bad_meta("no integer `num_experts`".into()))?;
    if me != e as u64 {
        return Err(bad_meta(format!(
            "`num_experts` is {me}, the model has {e} experts"
        )));
    }
    if let Some(k) = get("num_experts_per_token") {
        if k != info.top_k as u64 {
            return Err(bad_meta(format!(
                "`num_experts_per_token` is {k}, the model's top-k is {}",
                info.top_k
            )));
        }
    }
    let mut counts = vec![0u64; l * e];
    let mut seen = vec![false; l];
    for path in &files {
        let bad = |reason: String| Error::Input {
            path: path.clone(),
            reason,
        };
        let w = Weights::open_file(path)?;
        for name in w.names() {
            let (iter, layer) = name
                .split_once('_')
                .and_then(|(i, l)| Some((i.parse::<u64>().ok()?, l.parse::<usize>().ok()?)))
                .ok_or_else(|| bad(format!("tensor `{name}` is not named `{{iter}}_{{layer}}`")))?;
            let li = info
                .moe_layers
                .iter()
                .position(|&x| x == layer)
                .ok_or_else(|| bad(format!("tensor `{name}`: layer {layer} is not an MoE layer of the model (MoE layers {:?})", info.moe_layers)))?;
            let (tag, shape, bytes) = w.raw(name)?;
            if tag != "I64" || shape != [e] {
                return Err(bad(format!(
                    "tensor `{name}` (iteration {iter}) is {tag} {shape:?}; expected I64 [{e}] (one count per expert)"
                )));
            }
            for (x, c) in counts[li * e..(li + 1) * e]
                .iter_mut()
                .zip(bytes.chunks_exact(8))
            {
                let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                let v = u64::try_from(v)
                    .map_err(|_| bad(format!("tensor `{name}` holds the count {v}")))?;
                *x = x
                    .checked_add(v)
                    .ok_or_else(|| bad("counts overflow".into()))?;
            }
            seen[li] = true;
        }
    }
    if let Some(li) = seen.iter().position(|s| !s) {
        return Err(Error::Input {
            path: files[0].clone(),
            reason: format!(
                "no statistics of MoE layer {} in any rank file",
                info.moe_layers[li]
            ),
        });
    }
    Ok(Imported {
        routing: Routing {
            source: "trtllm".into(),
            moe_layers: info.moe_layers.clone(),
            num_experts: e,
            top_k: info.top_k,
            expert_counts: Some(counts),
            ..Routing::default()
        },
        notes: vec![format!("counts only: {} rank files merged", files.len())],
    })
}
