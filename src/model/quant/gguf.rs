//! GGUF files (llama.cpp): the header is parsed by candle-core's
//! `quantized::gguf_file`, the tensors stay in the mmap, and each tensor
//! (each expert's slab of a stacked `blk.N.ffn_*_exps` tensor) is exposed
//! under the Hugging Face name the family adapter looks up, dequantised on
//! read by candle's block types (`GgmlDType::from_data(..).dequantize`).
//!
//! GGUF stores dimensions fastest-first (`ne`); candle reverses them, so
//! shapes here are row-major: `ffn_{gate,up}_exps` is `[E, I, H]`,
//! `ffn_down_exps` `[E, H, I]`, `ffn_gate_inp` the `[E, H]` router. The
//! config the families read is synthesised from the GGUF metadata
//! (`<arch>.block_count`, `embedding_length`, `expert_count`,
//! `expert_used_count`, `expert_feed_forward_length`, ...).
//!
//! Architectures: `qwen3moe`, `qwen2moe`, `olmoe` (all tensors mapped), and
//! `llama` with experts (Mixtral: `ffn_gate_exps` = w1, `ffn_up_exps` = w3;
//! its attention is not mapped, since llama.cpp's converter permutes the
//! rows of Q and K for its RoPE layout: the static analyses work, forward
//! passes stop at the missing attention tensor).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use serde_json::json;

use super::{Spec, Virtual};
use crate::error::{Error, Result};
use crate::model::config::{limits, Config};
use crate::model::family::Family;
use crate::model::safetensors::{Dtype, Weights};

/// The GGUF file to open for `--model path`: the file itself when it ends in
/// `.gguf`, or the one `.gguf` file of a folder without config.json. `None`
/// for a Hugging Face model directory.
pub fn find(path: &Path) -> Result<Option<PathBuf>> {
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    if path.is_file() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(Error::Usage(format!(
            "{} holds {n} .gguf files ({}); pass one of them to --model",
            path.display(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The lower-case name of a GGML type (`q4_k`, `bf16`), as reports show it.
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// The dtype a view of GGML type `t` reports: the float types as
/// themselves (their bytes are plain little-endian values, so the bf16 fast
/// path reads them in place), block types as `Quantized("q4_k")`.
fn dtype_of(t: GgmlDType) -> Dtype {
    match t {
        GgmlDType::F32 => Dtype::F32,
        GgmlDType::F16 => Dtype::F16,
        GgmlDType::BF16 => Dtype::BF16,
        other => Dtype::Quantized(type_name(other)),
    }
}

/// ggml's names of its type ids (ggml.h), for errors about types candle lacks.
fn ggml_id_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The type ids candle-core dequantises.
fn candle_reads(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("GGUF file: {reason}"),
    }
}

/// Opens a GGUF file: its synthesised config and its weights, with every
/// tensor the families need registered under its Hugging Face name.
pub fn open(path: &Path) -> Result<(Config, Weights)> {
    let (mmap, content, entries, types) = load(path)?;
    let meta = Meta {
        path,
        map: &content.metadata,
    };
    let arch = meta.str("general.architecture")?;
    let shapes: HashMap<&str, &[usize]> = entries
        .iter()
        .map(|(n, _, d, _, _)| (n.as_str(), d.as_slice()))
        .collect();
    let config = synthesise(path, &meta, &arch, &shapes)?;
    let config = Config::parse(
        path,
        serde_json::to_vec(&config)
            .map_err(|e| corrupt(path, e))?
            .as_slice(),
    )?;
    let family = Family::detect(&config)?;
    let virtuals = map_names(path, &arch, family, &entries, &types)?;
    let mut weights = Weights::from_mapped(path, mmap, entries)?;
    weights.add_virtuals(virtuals);
    Ok((config, weights))
}

/// A tensor of a GGUF file: name, type tag, row-major shape, absolute byte range.
type Entry = (String, String, Vec<usize>, usize, usize);

/// Maps a GGUF file and checks every tensor's byte range against it.
#[allow(clippy::type_complexity)]
fn load(
    path: &Path,
) -> Result<(
    memmap2::Mmap,
    Content,
    Vec<Entry>,
    HashMap<String, GgmlDType>,
)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping; a file modified while we read it is outside
    // what this tool can defend against (as for the safetensors mmap).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let content = match Content::read(&mut std::io::Cursor::new(&mmap[..])) {
        Ok(c) => c,
        Err(e) => {
            // candle names neither the tensor nor the type it cannot read.
            if let Some((tensor, id)) = scan_unreadable_type(&mmap) {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{tensor}` has type {} (ggml type {id}), which candle cannot dequantise \
                         (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q8_K)",
                        ggml_id_name(id)
                    ),
                ));
            }
            return Err(corrupt(
                path,
                format!("unreadable or truncated header: {e}"),
            ));
        }
    };
    let file_len = mmap.len();
    let mut entries = Vec::with_capacity(content.tensor_infos.len());
    let mut types = HashMap::new();
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims().to_vec();
        let t = info.ggml_dtype;
        let (bs, ts) = (t.block_size(), t.type_size());
        let numel = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let last = dims.last().copied().unwrap_or(1);
        let bytes = numel
            .filter(|n| n % bs == 0 && last % bs == 0)
            .and_then(|n| (n / bs).checked_mul(ts));
        let Some(bytes) = bytes else {
            return Err(corrupt(
                path,
                format!(
                    "tensor `{name}` {dims:?} of {}: its rows are not whole blocks of {bs} (or its size overflows)",
                    type_name(t)
                ),
            ));
        };
        let start = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok());
        let end = start.and_then(|s| s.checked_add(bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len => {
                entries.push((name.clone(), type_name(t).to_uppercase(), dims, s, e));
                types.insert(name.clone(), t);
            }
            _ => {
                return Err(corrupt(
                    path,
                    format!(
                        "truncated: tensor `{name}` needs {bytes} bytes at offset {} + {}, but the file has {file_len} bytes",
                        content.tensor_data_offset, info.offset
                    ),
                ))
            }
        }
    }
    Ok((mmap, content, entries, types))
}

/// GGUF metadata access naming the file and key.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn str(&self, key: &str) -> Result<String> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Error::key(self.path, key, "is not a string")),
            None => Err(Error::key(self.path, key, "missing from the GGUF metadata")),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            // Per-layer arrays (e.g. head counts of some releases): all equal, or refused.
            Value::Array(items) => {
                let vals: Vec<u64> = items
                    .iter()
                    .filter_map(|x| x.to_u32().ok().map(u64::from))
                    .collect();
                match vals.first() {
                    Some(&f) if vals.len() == items.len() && vals.iter().all(|&x| x == f) => {
                        Some(f)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| Error::key(self.path, key, "is not a non-negative integer"))
    }

    fn float(&self, key: &str) -> Option<f64> {
        match self.map.get(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        }
    }
}

/// A config.json equivalent of the GGUF metadata, in the spelling the
/// families read.
fn synthesise(
    path: &Path,
    meta: &Meta<'_>,
    arch: &str,
    shapes: &HashMap<&str, &[usize]>,
) -> Result<serde_json::Value> {
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<u64> {
        meta.uint(&key(k))?
            .ok_or_else(|| Error::key(path, &key(k), "missing from the GGUF metadata"))
    };
    let model_type = match arch {
        "qwen3moe" => "qwen3_moe",
        "qwen2moe" => "qwen2_moe",
        "olmoe" => "olmoe",
        "llama" | "mixtral" => "mixtral",
        other => {
            return Err(Error::key(
                path,
                "general.architecture",
                format!(
                    "is `{other}`, which this tool cannot map onto a family (supported GGUF architectures: qwen3moe, qwen2moe, olmoe, llama with experts)"
                ),
            ))
        }
    };
    let layers = need("block_count")?;
    let experts = need("expert_count")?;
    if experts == 0 {
        return Err(Error::key(
            path,
            &key("expert_count"),
            "is 0: not an MoE model",
        ));
    }
    // Widths: the expert width from expert_feed_forward_length, else (llama,
    // olmoe) feed_forward_length; checked against the stacked tensors below.
    let ff = meta.uint(&key("feed_forward_length"))?;
    let expert_ff = meta.uint(&key("expert_feed_forward_length"))?;
    let hidden = need("embedding_length")?;
    let mut c = serde_json::Map::new();
    c.insert("model_type".into(), model_type.into());
    c.insert("num_hidden_layers".into(), layers.into());
    c.insert("hidden_size".into(), hidden.into());
    c.insert(
        "num_experts_per_tok".into(),
        need("expert_used_count")?.into(),
    );
    let heads = need("attention.head_count")?;
    c.insert("num_attention_heads".into(), heads.into());
    c.insert(
        "num_key_value_heads".into(),
        meta.uint(&key("attention.head_count_kv"))?
            .unwrap_or(heads)
            .into(),
    );
    if let Some(d) = meta.uint(&key("attention.key_length"))? {
        c.insert("head_dim".into(), d.into());
    }
    if let Some(eps) = meta.float(&key("attention.layer_norm_rms_epsilon")) {
        c.insert("rms_norm_eps".into(), eps.into());
    }
    c.insert(
        "rope_theta".into(),
        meta.float(&key("rope.freq_base")).unwrap_or(10000.0).into(),
    );
    if let Some(vocab) = shapes.get("token_embd.weight").and_then(|s| s.first()) {
        c.insert("vocab_size".into(), (*vocab).into());
    }
    c.insert(
        "tie_word_embeddings".into(),
        (!shapes.contains_key("output.weight")).into(),
    );
    let moe_layer = |l: u64| shapes.contains_key(format!("blk.{l}.ffn_gate_inp.weight").as_str());
    let width = |k: &str, v: Option<u64>| -> Result<u64> {
        v.filter(|&w| w >= 1 && w as usize <= limits::WIDTH)
            .ok_or_else(|| Error::key(path, &key(k), "missing, 0, or beyond the width limit"))
    };
    match model_type {
        "qwen3_moe" | "qwen2_moe" => {
            c.insert("num_experts".into(), experts.into());
            c.insert(
                "moe_intermediate_size".into(),
                width("expert_feed_forward_length", expert_ff)?.into(),
            );
            if let Some(ff) = ff {
                c.insert("intermediate_size".into(), ff.into());
            }
            let dense: Vec<u64> = (0..layers.min(limits::LAYERS as u64))
                .filter(|&l| !moe_layer(l))
                .collect();
            c.insert("mlp_only_layers".into(), json!(dense));
            c.insert("decoder_sparse_step".into(), 1.into());
            // llama.cpp renormalises the top-k weights for qwen3moe, not qwen2moe.
            c.insert("norm_topk_prob".into(), (model_type == "qwen3_moe").into());
            if model_type == "qwen2_moe" {
                let shared = meta
                    .uint(&key("expert_shared_feed_forward_length"))?
                    .unwrap_or(0);
                c.insert("shared_expert_intermediate_size".into(), shared.into());
            }
        }
        "olmoe" => {
            c.insert("num_experts".into(), experts.into());
            c.insert(
                "intermediate_size".into(),
                width("expert_feed_forward_length", expert_ff.or(ff))?.into(),
            );
            c.insert("norm_topk_prob".into(), false.into());
        }
        _ => {
            c.insert("num_local_experts".into(), experts.into());
            c.insert(
                "intermediate_size".into(),
                width("feed_forward_length", expert_ff.or(ff))?.into(),
            );
        }
    }
    Ok(serde_json::Value::Object(c))
}

/// Registers the Hugging Face names of the family on the GGUF tensors.
fn map_names(
    path: &Path,
    arch: &str,
    family: Family,
    entries: &[Entry],
    types: &HashMap<String, GgmlDType>,
) -> Result<HashMap<String, Virtual>> {
    let mut out = HashMap::new();
    let whole = |name: &str, shape: Vec<usize>| -> Virtual {
        let t = types[name];
        Virtual {
            shape,
            dtype: dtype_of(t),
            main: name.to_string(),
            parts: vec![name.to_string()],
            spec: Spec::Gguf { ty: t, range: None },
        }
    };
    let by_name: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.0.as_str(), e)).collect();
    let map_attention = arch != "llama" && arch != "mixtral";
    for (name, (_, _, dims, start, end)) in &by_name {
        let top = match *name {
            "token_embd.weight" => Some("model.embed_tokens.weight".to_string()),
            "output_norm.weight" => Some("model.norm.weight".to_string()),
            "output.weight" => Some("lm_head.weight".to_string()),
            _ => None,
        };
        if let Some(hf) = top {
            out.insert(hf, whole(name, dims.clone()));
            continue;
        }
        let Some(rest) = name.strip_prefix("blk.") else {
            continue;
        };
        let Some((layer, what)) = rest.split_once('.') else {
            continue;
        };
        let Ok(layer) = layer.parse::<usize>() else {
            continue;
        };
        let p = format!("model.layers.{layer}");
        let simple = |hf: &str| Some(format!("{p}.{hf}"));
        let [dg, du, dd] = family.dense_names(layer);
        let hf = match what {
            "attn_norm.weight" => simple("input_layernorm.weight"),
            "ffn_norm.weight" => simple("post_attention_layernorm.weight"),
            "attn_q.weight" if map_attention => simple("self_attn.q_proj.weight"),
            "attn_k.weight" if map_attention => simple("self_attn.k_proj.weight"),
            "attn_v.weight" if map_attention => simple("self_attn.v_proj.weight"),
            "attn_output.weight" if map_attention => simple("self_attn.o_proj.weight"),
            "attn_q.bias" if map_attention => simple("self_attn.q_proj.bias"),
            "attn_k.bias" if map_attention => simple("self_attn.k_proj.bias"),
            "attn_v.bias" if map_attention => simple("self_attn.v_proj.bias"),
            "attn_q_norm.weight" => simple("self_attn.q_norm.weight"),
            "attn_k_norm.weight" => simple("self_attn.k_norm.weight"),
            "ffn_gate_inp.weight" => Some(family.router_name(layer)),
            "ffn_gate.weight" => Some(dg),
            "ffn_up.weight" => Some(du),
            "ffn_down.weight" => Some(dd),
            _ => None,
        };
        if let Some(hf) = hf {
            out.insert(hf, whole(name, dims.clone()));
            continue;
        }
        if what == "ffn_gate_inp_shexp.weight" {
            // A [H] vector in GGUF, the [1, H] shared-expert gate in transformers.
            let mut shape = vec![1];
            shape.extend(dims.iter().copied());
            out.insert(
                format!("{p}.mlp.shared_expert_gate.weight"),
                whole(name, shape),
            );
            continue;
        }
        let shexp = match what {
            "ffn_gate_shexp.weight" => Some(0),
            "ffn_up_shexp.weight" => Some(1),
            "ffn_down_shexp.weight" => Some(2),
            _ => None,
        };
        if let Some(i) = shexp {
            if let Some(names) = family.shared_names(layer) {
                out.insert(names[i].clone(), whole(name, dims.clone()));
            }
            continue;
        }
        let stacked = match what {
            "ffn_gate_exps.weight" => Some(0),
            "ffn_up_exps.weight" => Some(1),
            "ffn_down_exps.weight" => Some(2),
            _ => None,
        };
        let Some(m) = stacked else {
            continue;
        };
        let [experts, rows, cols] = dims.as_slice() else {
            return Err(corrupt(
                path,
                format!("tensor `{name}` has shape {dims:?}; stacked experts are [E, rows, cols]"),
            ));
        };
        // Each expert's slab is whole rows of whole blocks: a contiguous byte range.
        let per = (end - start) / experts.max(&1);
        for e in 0..*experts {
            let t = types[*name];
            out.insert(
                family.expert_names(layer, e)[m].clone(),
                Virtual {
                    shape: vec![*rows, *cols],
                    dtype: dtype_of(t),
                    main: name.to_string(),
                    parts: vec![name.to_string()],
                    spec: Spec::Gguf {
                        ty: t,
                        range: Some((e * per, (e + 1) * per)),
                    },
                },
            );
        }
    }
    Ok(out)
}

/// Dequantises elements `start..start + out.len()` of GGUF data `bytes`
/// (whole blocks of type `ty` from element 0) with candle's block types.
pub(crate) fn read(ty: GgmlDType, bytes: &[u8], start: usize, out: &mut [f32]) {
    if out.is_empty() {
        return;
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let (b0, b1) = (start / bs, (start + out.len()).div_ceil(bs));
    let raw = &bytes[b0 * ts..b1 * ts];
    // candle's block slices need their alignment (at most 8): copy when the
    // mmap offset does not give it.
    let mut scratch: Vec<u64> = Vec::new();
    let data: &[u8] = if (raw.as_ptr() as usize).is_multiple_of(8) {
        raw
    } else {
        scratch.resize(raw.len().div_ceil(8), 0);
        let s: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch);
        s[..raw.len()].copy_from_slice(raw);
        &s[..raw.len()]
    };
    let blocks = ty.from_data(Cow::Borrowed(data));
    match blocks.dequantize((b1 - b0) * bs) {
        Ok(candle_core::CpuStorage::F32(v)) => {
            let off = start - b0 * bs;
            out.copy_from_slice(&v[off..off + out.len()]);
        }
        // Sizes were validated when the file was opened; candle dequantises
        // every type it parses to f32. Should that ever change, the values
        // are NaN, which the analyses reject as non-finite.
        _ => out.fill(f32::NAN),
    }
}

/// A bounded reader over the GGUF header bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: u64) -> Option<&[u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&[u8]> {
        let n = self.u64()?;
        self.take(n)
    }
    /// Skips a metadata value of type `t` (arrays of arrays nest at most 4 deep).
    fn skip_value(&mut self, t: u32, depth: u32) -> Option<()> {
        let fixed = match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                self.string()?;
                return Some(());
            }
            9 if depth < 4 => {
                let et = self.u32()?;
                let n = self.u64()?;
                if matches!(et, 8 | 9) {
                    for _ in 0..n {
                        self.skip_value(et, depth + 1)?;
                    }
                } else {
                    let size = match et {
                        0 | 1 | 7 => 1,
                        2 | 3 => 2,
                        4..=6 => 4,
                        10..=12 => 8,
                        _ => return None,
                    };
                    self.take(n.checked_mul(size)?)?;
                }
                return Some(());
            }
            _ => return None,
        };
        self.take(fixed).map(|_| ())
    }
}

/// The first tensor of a GGUF (v2/v3) header whose type candle cannot read,
/// found by walking the header with bounds checks (candle's own error names
/// neither).
fn scan_unreadable_type(bytes: &[u8]) -> Option<(String, u32)> {
    let mut c = Cursor { bytes, at: 0 };
    if c.take(4)? != b"GGUF" || !matches!(c.u32()?, 2 | 3) {
        return None;
    }
    let tensors = c.u64()?;
    let kvs = c.u64()?;
    for _ in 0..kvs {
        c.string()?;
        let t = c.u32()?;
        c.skip_value(t, 0)?;
    }
    for _ in 0..tensors {
        let name = String::from_utf8_lossy(c.string()?).into_owned();
        let dims = c.u32()?;
        if dims > 8 {
            return None;
        }
        c.take(8 * dims as u64)?;
        let t = c.u32()?;
        c.u64()?;
        if !candle_reads(t) {
            return Some((name, t));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Weights as W;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(rel)
    }

    /// Every block type candle reads, against gguf-py's dequantisation
    /// (fixtures/make_gguf_fixtures.py): whole tensors, each expert slab,
    /// and ranges that start and end inside blocks.
    #[test]
    fn every_block_type_matches_gguf_py() {
        let (mmap, _, entries, types) = load(&fixture("gguf-blocks/blocks.gguf")).unwrap();
        let want = W::open_file(&fixture("gguf-blocks/blocks_reference.safetensors")).unwrap();
        assert_eq!(entries.len(), 13);
        assert_eq!(want.names().len(), entries.len());
        for (name, _, dims, start, end) in &entries {
            assert_eq!(dims, &[2, 3, 256], "{name}");
            let ty = types[name];
            let expect = want.tensor(name).unwrap().to_f32_vec();
            assert_eq!(expect.len(), 1536);
            let bytes = &mmap[*start..*end];
            let mut got = vec![0f32; 1536];
            read(ty, bytes, 0, &mut got);
            let scale = expect.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0 && scale.is_finite(), "{name}");
            for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
                assert!(
                    g.is_finite() && (g - e).abs() <= 1e-6 * scale,
                    "{name}[{i}]: candle {g}, gguf-py {e}"
                );
            }
            // Slab 1 on its own bytes, and ranges cutting blocks.
            let per = bytes.len() / 2;
            let mut slab = vec![0f32; 768];
            read(ty, &bytes[per..], 0, &mut slab);
            assert_eq!(slab, got[768..], "{name} slab 1");
            for (s, n) in [(5, 3), (250, 20), (1000, 536), (1535, 1)] {
                let mut part = vec![0f32; n];
                read(ty, bytes, s, &mut part);
                assert_eq!(part, got[s..s + n], "{name} {s}+{n}");
            }
        }
    }

    #[test]
    fn a_type_candle_cannot_read_is_named_with_its_tensor() {
        let path = fixture("gguf-blocks/iq2_xxs.gguf");
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("iq2_xxs.gguf")
                && e.contains("`blk.1.ffn_gate_exps.weight`")
                && e.contains("IQ2_XXS"),
            "{e}"
        );
    }

    #[test]
    fn truncated_files_are_refused_naming_the_tensor() {
        let bytes = std::fs::read(fixture("gguf-blocks/blocks.gguf")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Cut inside the data: the last tensor no longer fits.
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let e = load(&cut).unwrap_err().to_string();
        assert!(
            e.contains("cut.gguf") && e.contains("truncated") && e.contains("tensor `"),
            "{e}"
        );
        // Cut inside the header.
        let head = dir.path().join("head.gguf");
        std::fs::write(&head, &bytes[..200]).unwrap();
        let e = load(&head).unwrap_err().to_string();
        assert!(e.contains("head.gguf") && e.contains("header"), "{e}");
        // Not a GGUF at all.
        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"not a gguf file").unwrap();
        assert!(load(&junk).unwrap_err().to_string().contains("junk.gguf"));
    }
}
