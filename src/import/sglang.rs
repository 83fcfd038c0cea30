//! SGLang expert distribution recorder dumps (`--expert-distribution-recorder-mode`,
//! `/dump_expert_distribution_record`): `torch.save` files.
//!
//! - `per_token`: one file per rank, `dict(records=[...],
//!   last_physical_to_logical_map=int64 [L, physical])`; each record holds
//!   `forward_pass_id`, `rank`, `input_ids`, `positions`, `extend_seq_lens`
//!   (None in decode passes), `forward_mode` and `topk_ids_of_layer`
//!   (int32 `[L, tokens, 8]`, physical ids, padded with -1; dense layers all
//!   -1). Physical ids are mapped to logical ones through the map, -1 padding
//!   is dropped, and the prompts are rebuilt from the extend segments: a
//!   segment whose first position is 0 starts a prompt, one at position p
//!   continues the prompt that has p tokens so far (chunked prefill). Decode
//!   tokens are left out with a note (they belong to no prompt the trace can
//!   name). Records repeated on several ranks (tensor parallelism: same pass,
//!   same tokens) are merged once; different tokens on different ranks (data
//!   parallel attention) are all kept.
//! - `per_pass`: records with `global_physical_count [L, physical]`;
//!   `stat`: rank 0 only, `logical_count [buffer, L, E]` (a circular buffer,
//!   unused rows zero). Both give counts only (`expert_counts`).
//! - Per-request output (`--enable-return-routed-experts`, request field
//!   `return_routed_experts`): `/generate` responses (`.json` / `.jsonl`)
//!   whose `meta_info.routed_experts` is base64 of a flat int32
//!   `[seqlen − 1, num_hidden_layers, top_k]` array (dense-layer rows 0) and
//!   `meta_info.prompt_tokens` the prompt length: the first `prompt_tokens`
//!   rows, MoE layers only, become one prompt. The response carries no
//!   prompt token ids, so the trace has none.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::pickle::{TorchFile, Value};
use super::{Imported, PerToken};
use crate::error::{Error, Result};
use crate::model::family::ModelInfo;
use crate::trace::{Routing, MAX_TRACE_TOKENS};

/// One prompt being rebuilt: its token ids and `[tokens, layers, k]` ids.
struct Prompt {
    ids: Vec<i64>,
    selected: Vec<u16>,
}

/// Reads SGLang recorder dumps (see the module documentation).
pub fn import(paths: &[PathBuf], info: &ModelInfo) -> Result<Imported> {
    let files = super::files(paths, |n| {
        n.ends_with(".pt") || n.ends_with(".json") || n.ends_with(".jsonl")
    })?;
    let is_json = |p: &PathBuf| p.extension().is_some_and(|x| x == "json" || x == "jsonl");
    if files.iter().all(is_json) {
        return per_request(&files, info);
    }
    if let Some(j) = files.iter().find(|p| is_json(p)) {
        return Err(Error::Input {
            path: j.clone(),
            reason: "per-request JSON mixed with recorder dumps (.pt): import them separately"
                .into(),
        });
    }
    let (l, e) = (info.moe_layers.len(), info.num_experts);
    let mut prompts: Vec<Prompt> = Vec::new();
    let mut counts: Option<Vec<u64>> = None;
    let mut per_token_files = 0usize;
    let mut decode_tokens = 0usize;
    let mut duplicates = 0usize;
    let mut seen: HashSet<(i64, Vec<i64>, Vec<i64>)> = HashSet::new();
    // (forward_pass_id, file index, record index) → processed in pass order.
    let mut passes: Vec<(i64, usize, usize)> = Vec::new();
    let mut opened: Vec<(TorchFile, Option<Vec<i64>>, usize)> = Vec::new();
    for (fi, path) in files.iter().enumerate() {
        let bad = |reason: String| Error::Input {
            path: path.clone(),
            reason,
        };
        let mut f = TorchFile::open(path)?;
        let root = f.root.clone();
        if let Some(Value::Tensor(t)) = root.get("logical_count") {
            // stat mode
            if t.shape.len() != 3 || t.shape[1] != info.num_layers || t.shape[2] != e {
                return Err(bad(format!(
                    "`logical_count` has shape {:?}; the model needs [buffer, {} layers, {e} experts]",
                    t.shape, info.num_layers
                )));
            }
            let v = f.ints(&t)?;
            let c = counts.get_or_insert_with(|| vec![0; l * e]);
            let per = info.num_layers * e;
            for row in v.chunks_exact(per) {
                for (li, &layer) in info.moe_layers.iter().enumerate() {
                    for x in 0..e {
                        add(&mut c[li * e + x], row[layer * e + x], path)?;
                    }
                }
            }
            continue;
        }
        let records = root
            .get("records")
            .and_then(|r| r.items())
            .ok_or_else(|| bad("neither `records` (per_token / per_pass) nor `logical_count` (stat): not a recorder dump".into()))?;
        let map = match root.get("last_physical_to_logical_map") {
            Some(Value::Tensor(t)) => {
                if t.shape.len() != 2 || t.shape[0] != info.num_layers || t.shape[1] == 0 {
                    return Err(bad(format!(
                        "`last_physical_to_logical_map` has shape {:?}; the model has {} layers",
                        t.shape, info.num_layers
                    )));
                }
                let phys = t.shape[1];
                let m = f.ints(&t)?;
                if let Some(&x) = m.iter().find(|&&x| x < 0 || x >= e as i64) {
                    return Err(bad(format!(
                        "`last_physical_to_logical_map` maps to expert {x}, out of range (the model has {e} experts)"
                    )));
                }
                Some((m, phys))
            }
            _ => None,
        };
        let (map, phys) = match map {
            Some((m, p)) => (Some(m), p),
            None => (None, 0),
        };
        for (ri, rec) in records.iter().enumerate() {
            if let Some(Value::Tensor(_)) = rec.get("topk_ids_of_layer") {
                let fp = rec
                    .get("forward_pass_id")
                    .and_then(|v| v.int())
                    .unwrap_or(0);
                passes.push((fp, fi, ri));
            } else if let Some(Value::Tensor(t)) = rec.get("global_physical_count") {
                let map = map
                    .as_ref()
                    .ok_or_else(|| bad("no `last_physical_to_logical_map`".into()))?;
                if t.shape != [info.num_layers, phys] {
                    return Err(bad(format!(
                        "record {ri}: `global_physical_count` has shape {:?}, expected [{}, {phys}]",
                        t.shape, info.num_layers
                    )));
                }
                let v = f.ints(&t.clone())?;
                let c = counts.get_or_insert_with(|| vec![0; l * e]);
                for (li, &layer) in info.moe_layers.iter().enumerate() {
                    for p in 0..phys {
                        let logical = map[layer * phys + p] as usize;
                        add(&mut c[li * e + logical], v[layer * phys + p], path)?;
                    }
                }
            } else {
                return Err(bad(format!(
                    "record {ri} holds neither `topk_ids_of_layer` nor `global_physical_count`"
                )));
            }
        }
        let has_token_records = passes.iter().any(|p| p.1 == fi);
        if has_token_records {
            per_token_files += 1;
        }
        opened.push((f, map, phys));
    }
    if per_token_files > 0 && counts.is_some() {
        return Err(Error::Input {
            path: files[0].clone(),
            reason: "the files mix per_token records with counts-only (per_pass / stat) dumps: import them separately".into(),
        });
    }
    if let Some(c) = counts {
        return Ok(Imported {
            routing: Routing {
                source: "sglang".into(),
                moe_layers: info.moe_layers.clone(),
                num_experts: e,
                top_k: info.top_k,
                expert_counts: Some(c),
                ..Routing::default()
            },
            notes: vec![format!(
                "counts only (per_pass / stat): {} files merged",
                files.len()
            )],
        });
    }
    passes.sort();
    for (_, fi, ri) in passes {
        let path = &files[fi];
        let (f, map, phys) = &mut opened[fi];
        let map = map.as_ref().ok_or_else(|| Error::Input {
            path: path.clone(),
            reason: "no `last_physical_to_logical_map`: physical ids cannot be mapped".into(),
        })?;
        let rec = f
            .root
            .get("records")
            .and_then(|r| r.items())
            .expect("read above")[ri]
            .clone();
        let (d, dup) = record(path, ri, f, &rec, map, *phys, info, &mut prompts, &mut seen)?;
        decode_tokens += d;
        duplicates += usize::from(dup);
    }
    let mut notes = Vec::new();
    if decode_tokens > 0 {
        notes.push(format!(
            "{decode_tokens} decode tokens left out: only prompt (extend) tokens are imported"
        ));
    }
    if duplicates > 0 {
        notes.push(format!(
            "{duplicates} records repeated on several ranks merged once"
        ));
    }
    let mut out = PerToken::new();
    for p in prompts {
        out.prompt_lengths.push(p.ids.len());
        out.token_ids.extend(p.ids);
        out.selected.extend(p.selected);
    }
    if out.prompt_lengths.is_empty() {
        return Err(Error::Input {
            path: files[0].clone(),
            reason: "the dump holds no prompt (extend) tokens".into(),
        });
    }
    Ok(Imported {
        routing: out.finish("sglang", info),
        notes,
    })
}

/// Largest response file read (bytes).
const MAX_RESPONSES: u64 = 1 << 32;

/// Per-request `meta_info.routed_experts` (see the module documentation).
fn per_request(files: &[PathBuf], info: &ModelInfo) -> Result<Imported> {
    use base64::Engine as _;
    let (nl, k, e) = (info.num_layers, info.top_k, info.num_experts);
    let mut out = PerToken::new();
    out.has_ids = false;
    let mut generated = 0usize;
    for path in files {
        let bytes = super::read_bounded(path, MAX_RESPONSES)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| Error::Input {
            path: path.clone(),
            reason: "not UTF-8 JSON".into(),
        })?;
        let responses: Vec<(String, serde_json::Value)> = match serde_json::from_str(text) {
            Ok(serde_json::Value::Array(a)) => a
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("response {i}"), v))
                .collect(),
            Ok(v) => vec![("the response".into(), v)],
            Err(_) => text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .map(|v| (format!("line {}", i + 1), v))
                        .map_err(|err| Error::Input {
                            path: path.clone(),
                            reason: format!("line {}: not JSON: {err}", i + 1),
                        })
                })
                .collect::<Result<_>>()?,
        };
        for (label, r) in responses {
            let bad = |reason: String| Error::Input {
                path: path.clone(),
                reason: format!("{label}: {reason}"),
            };
            let meta = r
                .get("meta_info")
                .ok_or_else(|| bad("no `meta_info`".into()))?;
            let b64 = meta
                .get("routed_experts")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| {
                    bad("no `meta_info.routed_experts` (request with return_routed_experts)".into())
                })?;
            let prompt = meta
                .get("prompt_tokens")
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| usize::try_from(p).ok())
                .filter(|&p| p <= MAX_TRACE_TOKENS)
                .ok_or_else(|| bad("no `meta_info.prompt_tokens` count".into()))?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|err| bad(format!("`routed_experts` is not base64: {err}")))?;
            let row = nl * k * 4;
            if raw.len() % row != 0 {
                return Err(bad(format!(
                    "`routed_experts` holds {} bytes, not a multiple of {nl} layers × top-{k} × 4 (int32)",
                    raw.len()
                )));
            }
            let rows = raw.len() / row;
            // seqlen − 1 rows: the last generated token is never fed back.
            let completion = meta
                .get("completion_tokens")
                .and_then(serde_json::Value::as_u64)
                .and_then(|c| usize::try_from(c).ok());
            if let Some(want) = completion.and_then(|c| (prompt + c).checked_sub(1)) {
                if rows != want {
                    return Err(bad(format!(
                        "`routed_experts` holds {} bytes: {rows} rows of {nl} layers × top-{k} (int32), but the response has {prompt} prompt + {} completion tokens, so {want} rows; recorded with another layer count or top-k?",
                        raw.len(),
                        completion.unwrap_or(0)
                    )));
                }
            }
            if rows < prompt {
                return Err(bad(format!(
                    "`routed_experts` has {rows} token rows, fewer than the {prompt} prompt tokens"
                )));
            }
            generated += rows - prompt;
            for t in 0..prompt {
                for &layer in &info.moe_layers {
                    for j in 0..k {
                        let at = ((t * nl + layer) * k + j) * 4;
                        let x = i32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
                        let what = || format!("{label}, token {t}, layer {layer}");
                        out.selected
                            .push(PerToken::check_id(i64::from(x), e, what, path)?);
                    }
                }
            }
            out.prompt_lengths.push(prompt);
        }
    }
    let mut notes = Vec::new();
    if generated > 0 {
        notes.push(format!(
            "{generated} generated tokens' routing left out: only prompt tokens are imported"
        ));
    }
    Ok(Imported {
        routing: out.finish("sglang", info),
        notes,
    })
}

fn add(x: &mut u64, v: i64, path: &Path) -> Result<()> {
    let v = u64::try_from(v).map_err(|_| Error::Input {
        path: path.to_path_buf(),
        reason: format!("negative count {v}"),
    })?;
    *x = x.checked_add(v).ok_or_else(|| Error::Input {
        path: path.to_path_buf(),
        reason: "counts overflow".into(),
    })?;
    Ok(())
}

/// Adds one per-token record; returns (decode tokens left out, whether it
/// repeated a record already seen).
#[allow(clippy::too_many_arguments)]
fn record(
    path: &Path,
    ri: usize,
    f: &mut TorchFile,
    rec: &Value,
    map: &[i64],
    phys: usize,
    info: &ModelInfo,
    prompts: &mut Vec<Prompt>,
    seen: &mut HashSet<(i64, Vec<i64>, Vec<i64>)>,
) -> Result<(usize, bool)> {
    let bad = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason: format!("record {ri}: {reason}"),
    };
    let (l, k, e) = (info.moe_layers.len(), info.top_k, info.num_experts);
    let ids = rec
        .get("input_ids")
        .and_then(|v| v.ints())
        .ok_or_else(|| bad("no `input_ids` list".into()))?;
    let positions = rec
        .get("positions")
        .and_then(|v| v.ints())
        .ok_or_else(|| bad("no `positions` list".into()))?;
    let tokens = ids.len();
    if tokens > MAX_TRACE_TOKENS || positions.len() != tokens {
        return Err(bad(format!(
            "{} positions for {tokens} input ids",
            positions.len()
        )));
    }
    let fp = rec
        .get("forward_pass_id")
        .and_then(|v| v.int())
        .unwrap_or(0);
    let key = (fp, ids.clone(), positions.clone());
    if seen.contains(&key) {
        return Ok((0, true));
    }
    let Some(Value::Tensor(t)) = rec.get("topk_ids_of_layer") else {
        return Err(bad("no `topk_ids_of_layer` tensor".into()));
    };
    if t.shape.len() != 3 || t.shape[0] != info.num_layers || t.shape[1] != tokens || t.shape[2] < k
    {
        return Err(bad(format!(
            "`topk_ids_of_layer` has shape {:?}; the model needs [{} layers, {tokens} tokens, ≥ {k}]",
            t.shape, info.num_layers
        )));
    }
    let width = t.shape[2];
    let topk = f.ints(&t.clone())?;
    let segments: Vec<usize> = match rec.get("extend_seq_lens") {
        None | Some(Value::None) => Vec::new(),
        Some(v) => v
            .ints()
            .ok_or_else(|| bad("`extend_seq_lens` is not a list of ints".into()))?
            .into_iter()
            .map(|x| usize::try_from(x).map_err(|_| bad(format!("negative extend length {x}"))))
            .collect::<Result<_>>()?,
    };
    let extend: usize = segments.iter().sum();
    if extend > tokens {
        return Err(bad(format!(
            "extend lengths sum to {extend}, the pass has {tokens} tokens"
        )));
    }
    let mut start = 0usize;
    for len in segments {
        let first = positions.get(start).copied().unwrap_or(0);
        let pi = if first == 0 {
            prompts.push(Prompt {
                ids: Vec::new(),
                selected: Vec::new(),
            });
            prompts.len() - 1
        } else {
            prompts
                .iter()
                .rposition(|p| p.ids.len() as i64 == first)
                .ok_or_else(|| bad(format!("an extend segment starts at position {first}, but no prompt has {first} tokens so far")))?
        };
        for tok in start..start + len {
            prompts[pi].ids.push(ids[tok]);
            for (li, &layer) in info.moe_layers.iter().enumerate() {
                let row = &topk[(layer * tokens + tok) * width..(layer * tokens + tok + 1) * width];
                let mut n = 0usize;
                for &x in row.iter().filter(|&&x| x != -1) {
                    let p = usize::try_from(x)
                        .ok()
                        .filter(|&p| p < phys)
                        .ok_or_else(|| bad(format!("token {tok}, layer {layer}: physical expert id {x} is out of range ({phys} physical experts)")))?;
                    let logical = map[layer * phys + p];
                    let what = || format!("record {ri}, token {tok}, layer {layer}");
                    prompts[pi]
                        .selected
                        .push(PerToken::check_id(logical, e, what, path)?);
                    n += 1;
                }
                if n != k {
                    return Err(bad(format!(
                        "token {tok}, layer {layer}: {n} experts selected (after dropping -1 padding), the model's top-k is {k}"
                    )));
                }
                let _ = li;
            }
        }
        start += len;
    }
    let _ = l;
    seen.insert(key);
    Ok((tokens - extend, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Config;

    fn fixture(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    fn qwen3() -> ModelInfo {
        ModelInfo::from_config(&Config::read_dir(&fixture("fixtures/qwen3-moe")).unwrap()).unwrap()
    }

    /// The dump holds physical ids padded with -1 (dense layer 0 all -1); the
    /// import maps them to the logical ids transformers chose.
    #[test]
    fn physical_ids_are_mapped_and_padding_dropped() {
        let dir = fixture("fixtures/engine-traces/sglang/per_token");
        let path = dir.join("expert_distribution_recorder_1780000000.0_0.pt");
        let mut f = TorchFile::open(&path).unwrap();
        let records = f.root.get("records").unwrap().items().unwrap();
        assert_eq!(records.len(), 3);
        let Some(Value::Tensor(t)) = records[0].get("topk_ids_of_layer") else {
            panic!("no topk_ids_of_layer")
        };
        assert_eq!(t.shape, vec![3, 25, 8]);
        let raw = f.ints(&t).unwrap();
        let Some(Value::Tensor(m)) = f.root.get("last_physical_to_logical_map") else {
            panic!("no map")
        };
        assert_eq!(m.shape, vec![3, 12]);
        let map = f.ints(&m).unwrap();
        // Dense layer 0: all padding; MoE layers: 2 ids then 6 × -1.
        assert!(raw[..25 * 8].iter().all(|&x| x == -1));
        for row in raw[25 * 8..].chunks_exact(8) {
            assert!(row[..2].iter().all(|&x| (0..12).contains(&x)));
            assert!(row[2..].iter().all(|&x| x == -1));
        }
        // The raw ids are physical: read as logical they would be wrong.
        let expected: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture("fixtures/engine-traces/expected.json")).unwrap(),
        )
        .unwrap();
        let want = |p: usize, t: usize, li: usize| -> Vec<i64> {
            let mut v: Vec<i64> = expected["selected"][p][t][li]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            v.sort_unstable();
            v
        };
        let (mut differ, mut compared) = (0, 0);
        for tok in 0..20 {
            for (li, layer) in [1usize, 2].into_iter().enumerate() {
                let row = &raw[(layer * 25 + tok) * 8..(layer * 25 + tok) * 8 + 2];
                let mut physical = row.to_vec();
                physical.sort_unstable();
                let mut logical: Vec<i64> =
                    row.iter().map(|&p| map[layer * 12 + p as usize]).collect();
                logical.sort_unstable();
                assert_eq!(logical, want(0, tok, li));
                differ += usize::from(physical != logical);
                compared += 1;
            }
        }
        assert_eq!(compared, 40);
        assert!(
            differ > 20,
            "the fixture's physical ids must differ from the logical ones"
        );
        // And the import does the mapping.
        let r = import(&[dir], &qwen3()).unwrap().routing;
        let sel = r.selected.unwrap();
        for tok in 0..20 {
            for li in 0..2 {
                let mut got: Vec<i64> = sel[(tok * 2 + li) * 2..(tok * 2 + li) * 2 + 2]
                    .iter()
                    .map(|&x| i64::from(x))
                    .collect();
                got.sort_unstable();
                assert_eq!(got, want(0, tok, li));
            }
        }
    }

    /// Counts-only dumps (per_pass physical counts, stat logical counts) give
    /// the same per-layer load; per_token and counts-only files do not mix.
    #[test]
    fn counts_only_modes_agree_and_do_not_mix() {
        let info = qwen3();
        let a = import(&[fixture("fixtures/engine-traces/sglang/per_pass")], &info).unwrap();
        let b = import(&[fixture("fixtures/engine-traces/sglang/stat")], &info).unwrap();
        let c = import(&[fixture("fixtures/engine-traces/sglang/per_token")], &info).unwrap();
        assert!(a.routing.selected.is_none() && a.routing.expert_counts.is_some());
        assert_eq!(a.routing.load(), b.routing.load());
        assert_eq!(a.routing.load(), c.routing.load());
        assert_eq!(a.routing.load()[0].iter().sum::<u64>(), 84);
        let err = import(
            &[
                fixture("fixtures/engine-traces/sglang/per_pass"),
                fixture("fixtures/engine-traces/sglang/per_token"),
            ],
            &info,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("mix per_token records with counts-only"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod corruption {
    use super::*;
    use crate::model::config::Config;

    /// Truncated or byte-flipped dumps give an error or a checked import,
    /// never a panic or an unbounded allocation.
    #[test]
    fn damaged_dumps_are_errors_not_panics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let info =
            ModelInfo::from_config(&Config::read_dir(&root.join("fixtures/qwen3-moe")).unwrap())
                .unwrap();
        let src = root.join("fixtures/engine-traces/sglang/per_token/expert_distribution_recorder_1780000000.0_1.pt");
        let good = std::fs::read(&src).unwrap();
        let dir = std::env::temp_dir().join(format!("moe-inspect-pt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.pt");
        let (mut errors, mut total) = (0, 0);
        let mut variants: Vec<Vec<u8>> = (0..good.len())
            .step_by(61)
            .map(|n| good[..n].to_vec())
            .collect();
        for at in (0..good.len()).step_by(23) {
            let mut b = good.clone();
            b[at] ^= 0xff;
            variants.push(b);
        }
        for bytes in variants {
            std::fs::write(&path, &bytes).unwrap();
            total += 1;
            match import(std::slice::from_ref(&path), &info) {
                Err(e) => {
                    errors += 1;
                    assert!(e.to_string().contains("d.pt"), "{e}");
                }
                Ok(r) => r.routing.validate(&path).unwrap(),
            }
        }
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            total > 100 && errors > total / 2,
            "{errors} errors of {total}"
        );
    }
}
