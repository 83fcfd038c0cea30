//! Megatron-LM, run with `--moe-routing-trace-path DIR`: one
//! `router_trace_rank{r}.jsonl` per rank, one line per (step, block, layer)
//! with `top_indices` (`[num_tokens, topk]`; ascending ids in training,
//! decreasing score in inference) and, with
//! `--moe-routing-trace-capture-logits`, `logit_offset` / `logit_bytes` /
//! `logit_shape` into `logits_rank{r}.bin` (bf16 `[num_tokens, E]`).
//!
//! Megatron records no token ids, so the trace has none. Each (rank, step)
//! becomes one "prompt" of the trace (the tokens that step routed, in its
//! order); `layer` is the decoder layer index of the module name. MTP records
//! (`block` = `mtp`) are left out with a note. Router logits are imported
//! when every record has them.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Imported, PerToken};
use crate::error::{Error, Result};
use crate::model::family::ModelInfo;
use crate::trace::MAX_TRACE_TOKENS;

/// Largest JSONL file read (bytes).
const MAX_FILE: u64 = 1 << 32;

/// One layer's record of one step.
struct Record {
    line: usize,
    tokens: usize,
    ids: Vec<i64>,
    logits: Option<(u64, usize)>,
}

/// Reads Megatron-LM routing traces (see the module documentation).
pub fn import(paths: &[PathBuf], info: &ModelInfo) -> Result<Imported> {
    let files = super::files(paths, |n| {
        n.starts_with("router_trace_rank") && n.ends_with(".jsonl")
    })?;
    let (l, k, e) = (info.moe_layers.len(), info.top_k, info.num_experts);
    let mut out = PerToken::new();
    out.has_ids = false;
    let mut logits: Vec<f32> = Vec::new();
    let mut all_logits = true;
    let mut mtp = 0usize;
    for path in &files {
        let bad = |line: usize, reason: String| Error::Input {
            path: path.to_path_buf(),
            reason: format!("line {line}: {reason}"),
        };
        let text =
            String::from_utf8(super::read_bounded(path, MAX_FILE)?).map_err(|_| Error::Input {
                path: path.clone(),
                reason: "not UTF-8 JSONL".into(),
            })?;
        // (rank, step) → layer → record
        let mut steps: BTreeMap<(i64, i64), BTreeMap<usize, Record>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).map_err(|err| bad(n, format!("not JSON: {err}")))?;
            let int = |key: &str| -> Result<i64> {
                v.get(key)
                    .and_then(Value::as_i64)
                    .ok_or_else(|| bad(n, format!("no integer `{key}`")))
            };
            if v.get("block")
                .and_then(Value::as_str)
                .is_some_and(|b| b != "decoder")
            {
                mtp += 1;
                continue;
            }
            let layer =
                usize::try_from(int("layer")?).map_err(|_| bad(n, "negative `layer`".into()))?;
            if !info.moe_layers.contains(&layer) {
                return Err(bad(
                    n,
                    format!(
                        "layer {layer} is not an MoE layer of the model (MoE layers {:?})",
                        info.moe_layers
                    ),
                ));
            }
            let tokens = usize::try_from(int("num_tokens")?)
                .ok()
                .filter(|&t| t <= MAX_TRACE_TOKENS)
                .ok_or_else(|| bad(n, "`num_tokens` is out of range".into()))?;
            let topk = int("topk")?;
            if topk != k as i64 {
                return Err(bad(
                    n,
                    format!(
                        "layer {layer} selects {topk} experts per token, the model's top-k is {k}"
                    ),
                ));
            }
            let rows = v
                .get("top_indices")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(n, "no `top_indices` list".into()))?;
            if rows.len() != tokens {
                return Err(bad(
                    n,
                    format!(
                        "`top_indices` has {} rows, `num_tokens` is {tokens}",
                        rows.len()
                    ),
                ));
            }
            let mut ids = Vec::with_capacity(tokens * k);
            for row in rows {
                let row = row
                    .as_array()
                    .filter(|r| r.len() == k)
                    .ok_or_else(|| bad(n, format!("a `top_indices` row is not {k} ids")))?;
                for x in row {
                    ids.push(
                        x.as_i64()
                            .ok_or_else(|| bad(n, "an expert id is not an integer".into()))?,
                    );
                }
            }
            let logits = match (
                v.get("logit_offset").and_then(Value::as_u64),
                v.get("logit_bytes").and_then(Value::as_u64),
            ) {
                (Some(off), Some(bytes)) => {
                    if Some(bytes) != (tokens as u64).checked_mul(e as u64 * 2) {
                        return Err(bad(n, format!("`logit_bytes` {bytes} is not {tokens} tokens × {e} experts × 2 (bf16)")));
                    }
                    Some((off, tokens * e))
                }
                _ => None,
            };
            let key = (int("rank")?, int("step")?);
            let step = steps.entry(key).or_default();
            if step
                .insert(
                    layer,
                    Record {
                        line: n,
                        tokens,
                        ids,
                        logits,
                    },
                )
                .is_some()
            {
                return Err(bad(
                    n,
                    format!(
                        "rank {}, step {}: layer {layer} appears twice",
                        key.0, key.1
                    ),
                ));
            }
        }
        let mut sidecar: Option<(PathBuf, std::fs::File)> = None;
        for ((rank, step), layers) in steps {
            if layers.len() != l {
                let missing: Vec<usize> = info
                    .moe_layers
                    .iter()
                    .copied()
                    .filter(|x| !layers.contains_key(x))
                    .collect();
                let first = layers.values().next().map_or(0, |r| r.line);
                return Err(bad(
                    first,
                    format!("rank {rank}, step {step}: no record of MoE layers {missing:?}"),
                ));
            }
            let tokens = layers.values().next().map_or(0, |r| r.tokens);
            if let Some(r) = layers.values().find(|r| r.tokens != tokens) {
                return Err(bad(
                    r.line,
                    format!(
                        "rank {rank}, step {step}: {} tokens in one layer, {tokens} in another",
                        r.tokens
                    ),
                ));
            }
            let recs: Vec<&Record> = layers.values().collect();
            for t in 0..tokens {
                for (li, r) in recs.iter().enumerate() {
                    for &x in &r.ids[t * k..(t + 1) * k] {
                        let what =
                            || format!("line {}, token {t}, layer {}", r.line, info.moe_layers[li]);
                        out.selected.push(PerToken::check_id(x, e, what, path)?);
                    }
                }
            }
            out.prompt_lengths.push(tokens);
            if !all_logits || recs.iter().any(|r| r.logits.is_none()) {
                all_logits = false;
                continue;
            }
            if sidecar.is_none() {
                let p = path.with_file_name(format!("logits_rank{rank}.bin"));
                let f = std::fs::File::open(&p).map_err(|err| Error::io(&p, err))?;
                sidecar = Some((p, f));
            }
            let (sp, f) = sidecar.as_mut().expect("opened above");
            let side_len = f
                .metadata()
                .map_err(|err| Error::io(sp.clone(), err))?
                .len();
            let mut per_layer = Vec::with_capacity(l);
            for r in &recs {
                let (off, n) = r.logits.expect("checked above");
                if off
                    .checked_add(n as u64 * 2)
                    .is_none_or(|end| end > side_len)
                {
                    return Err(Error::Input {
                        path: sp.clone(),
                        reason: format!(
                            "line {}: logits at bytes {off}..+{} lie past the end of the file ({side_len} bytes)",
                            r.line,
                            n * 2
                        ),
                    });
                }
                let mut b = vec![0u8; n * 2];
                f.seek(SeekFrom::Start(off))
                    .and_then(|_| f.read_exact(&mut b))
                    .map_err(|err| Error::Input {
                        path: sp.clone(),
                        reason: format!("logits at byte {off} for line {}: {err}", r.line),
                    })?;
                per_layer.push(bf16s(&b));
            }
            for t in 0..tokens {
                for row in &per_layer {
                    logits.extend_from_slice(&row[t * e..(t + 1) * e]);
                }
            }
        }
        check_logits_finite(path, &logits)?;
    }
    let mut notes = Vec::new();
    if mtp > 0 {
        notes.push(format!("{mtp} MTP-block records left out"));
    }
    let mut routing = out.finish("megatron", info);
    if all_logits && !logits.is_empty() {
        routing.router_logits = Some(logits);
    }
    Ok(Imported { routing, notes })
}

fn bf16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
        .collect()
}

fn check_logits_finite(path: &Path, logits: &[f32]) -> Result<()> {
    if logits.iter().any(|x| !x.is_finite()) {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "the logits sidecar holds NaN or infinite values".into(),
        });
    }
    Ok(())
}
