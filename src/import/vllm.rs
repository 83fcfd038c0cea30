//! vLLM, served with `--enable-return-routed-experts`: each response carries
//! `prompt_routed_experts` (`[prompt tokens, MoE layers, top_k]` logical ids,
//! as nested lists, or as a base64 `.npy` in newer versions) and, when asked
//! for, `prompt_token_ids`; `choices[i].routed_experts` holds the generated
//! part (without the last generated token, which is never fed back).
//!
//! Input: one response (`.json`), a JSON array of responses, or a JSONL file
//! of responses. Without `prompt_routed_experts`, a `choices[0].routed_experts`
//! covering the whole sequence (prompt + generated − 1 rows) is split at
//! `len(prompt_token_ids)`. Each response becomes one prompt of the trace. Only the
//! prompt part is imported, so the trace compares with this tool's own
//! `trace` of the same prompts; the generated rows are counted in a note.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::Value;

use super::{Imported, PerToken};
use crate::error::{Error, Result};
use crate::model::family::ModelInfo;

/// Largest response file read (bytes).
const MAX_FILE: u64 = 1 << 32;

/// Reads vLLM responses (see the module documentation).
pub fn import(paths: &[PathBuf], info: &ModelInfo) -> Result<Imported> {
    let files = super::files(paths, |n| n.ends_with(".json") || n.ends_with(".jsonl"))?;
    let mut out = PerToken::new();
    let mut generated = 0usize;
    for path in &files {
        let bytes = super::read_bounded(path, MAX_FILE)?;
        for (label, response) in responses(path, &bytes)? {
            generated += one(path, &label, &response, info, &mut out)?;
        }
    }
    let mut notes = Vec::new();
    if generated > 0 {
        notes.push(format!(
            "{generated} generated tokens' routing (choices[].routed_experts) left out: only prompt tokens are imported"
        ));
    }
    Ok(Imported {
        routing: out.finish("vllm", info),
        notes,
    })
}

/// The responses of a file, each with a label for errors.
fn responses(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Value)>> {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return Ok(match v {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("response {i}"), r))
                .collect(),
            v => vec![("the response".to_string(), v)],
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Error::Input {
        path: path.to_path_buf(),
        reason: "neither JSON nor UTF-8 JSONL".into(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            reason: format!("line {}: not a JSON response: {e}", i + 1),
        })?;
        out.push((format!("line {}", i + 1), v));
    }
    Ok(out)
}

/// Adds one response's prompt; returns its generated rows.
fn one(path: &Path, label: &str, r: &Value, info: &ModelInfo, out: &mut PerToken) -> Result<usize> {
    let bad = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason: format!("{label}: {reason}"),
    };
    let choices = r.get("choices").and_then(Value::as_array);
    let field = |name: &str| -> Option<&Value> {
        r.get(name)
            .filter(|v| !v.is_null())
            .or_else(|| choices?.first()?.get(name).filter(|v| !v.is_null()))
    };
    let prompt_ids: Option<Vec<i64>> = field("prompt_token_ids")
        .map(|p| {
            p.as_array()
                .and_then(|a| a.iter().map(Value::as_i64).collect())
                .ok_or_else(|| bad("`prompt_token_ids` is not a list of integers".into()))
        })
        .transpose()?;
    let generated: usize;
    let (shape, ids) = match field("prompt_routed_experts") {
        Some(routes) => {
            generated = choices.map_or(0, |cs| {
                cs.iter()
                    .filter_map(|c| c.get("routed_experts").filter(|v| !v.is_null()))
                    .filter_map(|v| routes_array(v).ok())
                    .map(|(s, _)| s[0])
                    .sum()
            });
            routes_array(routes).map_err(&bad)?
        }
        None => {
            // Whole-sequence form: choices[0].routed_experts covers the prompt
            // and the generated tokens but the last (P + N − 1 rows).
            let c = choices.and_then(|cs| cs.first());
            let routes = c
                .and_then(|c| c.get("routed_experts"))
                .filter(|v| !v.is_null())
                .ok_or_else(|| {
                    bad(
                        "no `prompt_routed_experts` (serve with --enable-return-routed-experts)"
                            .into(),
                    )
                })?;
            let p = prompt_ids.as_ref().map(Vec::len).ok_or_else(|| {
                bad("`choices[0].routed_experts` without `prompt_routed_experts` needs `prompt_token_ids` to find the prompt rows".into())
            })?;
            let n = c
                .and_then(|c| c.get("token_ids"))
                .and_then(Value::as_array)
                .map(Vec::len)
                .ok_or_else(|| bad("`choices[0].routed_experts` without `prompt_routed_experts` needs `choices[0].token_ids`".into()))?;
            let (shape, ids) = routes_array(routes).map_err(&bad)?;
            if p == 0 || shape[0] + 1 != p + n {
                return Err(bad(format!(
                    "`choices[0].routed_experts` has {} rows; {p} prompt + {n} generated tokens need {} (the last generated token has none)",
                    shape[0],
                    (p + n).saturating_sub(1)
                )));
            }
            generated = shape[0] - p;
            let mut ids = ids;
            ids.truncate(p * shape[1] * shape[2]);
            ([p, shape[1], shape[2]], ids)
        }
    };
    let (l, k) = (info.moe_layers.len(), info.top_k);
    if shape[1] != l {
        return Err(bad(format!(
            "routing covers {} MoE layers, the model has {l}",
            shape[1]
        )));
    }
    if shape[2] != k {
        return Err(bad(format!(
            "routing selects {} experts per token, the model's top-k is {k}",
            shape[2]
        )));
    }
    let t = shape[0];
    if let Some(p) = prompt_ids {
        if p.len() != t {
            return Err(bad(format!(
                "{} prompt token ids but {t} rows of routing",
                p.len()
            )));
        }
        out.token_ids.extend(p);
    } else {
        out.has_ids = false;
    }
    for (i, &x) in ids.iter().enumerate() {
        let what = || {
            format!(
                "{label}, token {}, MoE layer {}",
                i / (l * k),
                info.moe_layers[(i / k) % l]
            )
        };
        out.selected
            .push(PerToken::check_id(x, info.num_experts, what, path)?);
    }
    out.prompt_lengths.push(t);
    Ok(generated)
}

/// `[T, L, k]` ids from nested lists or a base64 `.npy`.
fn routes_array(v: &Value) -> std::result::Result<([usize; 3], Vec<i64>), String> {
    match v {
        Value::String(s) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| format!("routed experts are not base64: {e}"))?;
            npy(&bytes)
        }
        Value::Array(rows) => {
            let mut shape = [rows.len(), 0, 0];
            let mut ids = Vec::new();
            for (t, row) in rows.iter().enumerate() {
                let layers = row
                    .as_array()
                    .ok_or("routed experts are not [tokens][layers][k] lists")?;
                if t == 0 {
                    shape[1] = layers.len();
                } else if layers.len() != shape[1] {
                    return Err(format!(
                        "token {t} has {} layers, token 0 {}",
                        layers.len(),
                        shape[1]
                    ));
                }
                for layer in layers {
                    let sel = layer
                        .as_array()
                        .ok_or("routed experts are not [tokens][layers][k] lists")?;
                    if shape[2] == 0 {
                        shape[2] = sel.len();
                    } else if sel.len() != shape[2] {
                        return Err(format!(
                            "token {t} selects {} experts in a layer, others {}",
                            sel.len(),
                            shape[2]
                        ));
                    }
                    for x in sel {
                        ids.push(x.as_i64().ok_or("an expert id is not an integer")?);
                    }
                }
            }
            Ok((shape, ids))
        }
        _ => Err("routed experts are neither lists nor a base64 .npy".into()),
    }
}

/// A 3-d integer `.npy` (versions 1–3, little-endian or byte-sized, C order).
pub(crate) fn npy(b: &[u8]) -> std::result::Result<([usize; 3], Vec<i64>), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (hlen, start): (usize, usize) = match b[6] {
        1 => (usize::from(u16::from_le_bytes([b[8], b[9]])), 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!(".npy version {v} is not supported")),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= b.len())
        .ok_or(".npy header is truncated")?;
    let header = std::str::from_utf8(&b[start..end]).map_err(|_| ".npy header is not text")?;
    let after = |key: &str| -> Option<&str> {
        let i = header.find(key)?;
        Some(header[i + key.len()..].trim_start_matches([' ', ':', '\'', '"']))
    };
    let descr: String = after("descr")
        .ok_or(".npy header has no descr")?
        .chars()
        .take_while(|c| *c != '\'' && *c != '"')
        .collect();
    if after("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(".npy in Fortran order is not supported".into());
    }
    let shape_text = after("shape").ok_or(".npy header has no shape")?;
    let inner: String = shape_text
        .trim_start_matches('(')
        .chars()
        .take_while(|c| *c != ')')
        .collect();
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!(".npy shape `{inner}` is not integers"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let [t, l, k] = dims[..] else {
        return Err(format!(
            ".npy array has shape ({inner}), expected [tokens, layers, k]"
        ));
    };
    let size = match descr.as_str() {
        "<i8" | "<u8" => 8,
        "<i4" | "<u4" => 4,
        "<i2" | "<u2" => 2,
        "|i1" | "|u1" => 1,
        d => return Err(format!(".npy dtype {d} is not a little-endian integer")),
    };
    let n = t
        .checked_mul(l)
        .and_then(|x| x.checked_mul(k))
        .ok_or(".npy shape overflows")?;
    let data = &b[end..];
    if Some(data.len()) != n.checked_mul(size) {
        return Err(format!(
            ".npy holds {} data bytes, its shape needs {n}×{size}",
            data.len()
        ));
    }
    let signed = descr.as_bytes()[1] == b'i';
    let ids = data
        .chunks_exact(size)
        .map(|c| {
            let mut v: i64 = 0;
            for (i, &x) in c.iter().enumerate() {
                v |= i64::from(x) << (8 * i);
            }
            if signed && size < 8 && c[size - 1] & 0x80 != 0 {
                v -= 1i64 << (8 * size);
            }
            v
        })
        .collect();
    Ok(([t, l, k], ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn npy_of_each_integer_width() {
        let i32s: Vec<u8> = [3i32, -1, 7, 0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            npy(&npy_bytes("<i4", "(2, 1, 2)", &i32s)).unwrap(),
            ([2, 1, 2], vec![3, -1, 7, 0])
        );
        let i16s: Vec<u8> = [5i16, 6].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            npy(&npy_bytes("<i2", "(1, 1, 2)", &i16s)).unwrap(),
            ([1, 1, 2], vec![5, 6])
        );
        assert_eq!(
            npy(&npy_bytes("|u1", "(1, 2, 1)", &[250, 1])).unwrap(),
            ([1, 2, 1], vec![250, 1])
        );
        assert!(npy(&npy_bytes("<f4", "(1, 1, 1)", &[0; 4]))
            .unwrap_err()
            .contains("dtype <f4"));
        assert!(npy(&npy_bytes("<i4", "(2, 2)", &[0; 16]))
            .unwrap_err()
            .contains("expected [tokens, layers, k]"));
        assert!(npy(&npy_bytes("<i4", "(2, 1, 2)", &[0; 12]))
            .unwrap_err()
            .contains("holds 12 data bytes"));
        assert!(npy(&npy_bytes(
            "<i4",
            "(4294967296, 4294967296, 4294967296)",
            &[]
        ))
        .is_err());
        assert!(npy(b"\x93NUMPY\x01\x00\xff\xff{")
            .unwrap_err()
            .contains("truncated"));
    }
}
