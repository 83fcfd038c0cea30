//! `trace`: router logits and top-k routing per token, dumped to safetensors
//! for other tools. Prompts are concatenated along the token axis.
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `router_logits` | F32 | `[tokens, moe_layers, E]` |
//! | `selected_experts` | I16 | `[tokens, moe_layers, k]` (by decreasing weight) |
//! | `routing_weights` | F32 | `[tokens, moe_layers, k]` |
//! | `token_ids` | I64 | `[tokens]` |
//! | `prompt_lengths` | I64 | `[prompts]` |
//! | `moe_layers` | I64 | `[moe_layers]` |
//! | `logits` (with `--logits`) | F32 | `[tokens, vocab]` |

use std::io::Write;
use std::path::Path;

use crate::error::Result;
use crate::forward::observer::{MoeObservation, Observer};
use crate::forward::{to_host, Forward};
use crate::input::Prompts;
use crate::model::writer::{write_streaming, TensorSpec};

/// One prompt's routing in one MoE layer: (router logits, selected, weights).
type LayerRouting = (Vec<f32>, Vec<u32>, Vec<f32>);

/// Collects routing per (prompt, MoE layer).
struct Collect {
    moe_layers: Vec<usize>,
    /// [prompt][layer index]
    data: Vec<Vec<Option<LayerRouting>>>,
}

impl Observer for Collect {
    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        if let Some(li) = self.moe_layers.iter().position(|&l| l == o.layer) {
            self.data[o.prompt][li] = Some((
                o.router_logits.to_vec(),
                o.selected.to_vec(),
                o.weights.to_vec(),
            ));
        }
    }
}

/// What a trace holds, for the CLI's summary line.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSummary {
    /// Prompts traced.
    pub prompts: usize,
    /// Tokens over all prompts.
    pub tokens: usize,
    /// MoE layers traced.
    pub moe_layers: usize,
    /// Bytes of tensor data written (headers excluded).
    pub bytes: usize,
}

/// Runs the forward pass over `prompts` and writes the trace to `out`.
///
/// ```rust
/// use moe_inspect::forward::{parse_device, Forward};
/// use moe_inspect::input::Prompts;
/// use moe_inspect::model::Model;
///
/// let model = Model::demo()?;
/// let fwd = Forward::new(&model, parse_device("cpu")?)?;
/// let prompts = Prompts { ids: vec![vec![1, 2, 3], vec![7, 8]], texts: None };
/// let out = std::env::temp_dir().join(format!("moe-inspect-doc-{}.safetensors", std::process::id()));
/// let summary = moe_inspect::trace::trace(&fwd, &model.info.moe_layers, &prompts, false, &out)?;
/// assert_eq!(summary.tokens, 5);
/// assert!(std::fs::metadata(&out).unwrap().len() >= summary.bytes as u64);
/// std::fs::remove_file(&out).ok();
/// # Ok::<(), moe_inspect::Error>(())
/// ```
pub fn trace(
    fwd: &Forward<'_>,
    moe_layers: &[usize],
    prompts: &Prompts,
    logits: bool,
    out: &Path,
) -> Result<TraceSummary> {
    let mut collect = Collect {
        moe_layers: moe_layers.to_vec(),
        data: vec![vec![None; moe_layers.len()]; prompts.ids.len()],
    };
    let result = fwd.run(&prompts.ids, &mut collect, logits)?;
    let tokens = prompts.tokens();
    let l = moe_layers.len();
    // Per-token widths, from the first prompt's first layer.
    let first = collect
        .data
        .first()
        .and_then(|p| p.first())
        .and_then(Option::as_ref);
    let t0 = prompts.ids.first().map_or(1, Vec::len).max(1);
    let experts = first.map_or(0, |x| x.0.len() / t0);
    let top_k = first.map_or(0, |x| x.1.len() / t0);
    let mut router = Vec::with_capacity(tokens * l * experts);
    let mut selected: Vec<u8> = Vec::with_capacity(tokens * l * top_k * 2);
    let mut weights = Vec::with_capacity(tokens * l * top_k);
    for (p, ids) in prompts.ids.iter().enumerate() {
        for t in 0..ids.len() {
            for li in 0..l {
                let (lg, sel, w) = collect.data[p][li]
                    .as_ref()
                    .expect("the forward pass observes every MoE layer of every prompt");
                router.extend_from_slice(&lg[t * experts..(t + 1) * experts]);
                for &s in &sel[t * top_k..(t + 1) * top_k] {
                    selected.extend_from_slice(&(s as i16).to_le_bytes());
                }
                weights.extend_from_slice(&w[t * top_k..(t + 1) * top_k]);
            }
        }
    }
    let i64s =
        |v: &mut dyn Iterator<Item = i64>| -> Vec<u8> { v.flat_map(|x| x.to_le_bytes()).collect() };
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = vec![
        (
            TensorSpec::new("router_logits", "F32", &[tokens, l, experts]),
            f32s(&router),
        ),
        (
            TensorSpec::new("selected_experts", "I16", &[tokens, l, top_k]),
            selected,
        ),
        (
            TensorSpec::new("routing_weights", "F32", &[tokens, l, top_k]),
            f32s(&weights),
        ),
        (
            TensorSpec::new("token_ids", "I64", &[tokens]),
            i64s(&mut prompts.ids.iter().flatten().map(|&i| i as i64)),
        ),
        (
            TensorSpec::new("prompt_lengths", "I64", &[prompts.ids.len()]),
            i64s(&mut prompts.ids.iter().map(|p| p.len() as i64)),
        ),
        (
            TensorSpec::new("moe_layers", "I64", &[l]),
            i64s(&mut moe_layers.iter().map(|&x| x as i64)),
        ),
    ];
    if logits {
        let mut all = Vec::new();
        let mut vocab = 0;
        for t in &result.logits {
            for row in to_host(t)? {
                vocab = row.len();
                all.extend(row);
            }
        }
        tensors.push((
            TensorSpec::new("logits", "F32", &[tokens, vocab]),
            f32s(&all),
        ));
    }
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    write_streaming(out, &specs, |i, w: &mut dyn Write| {
        w.write_all(&tensors[i].1)
    })?;
    Ok(TraceSummary {
        prompts: prompts.ids.len(),
        tokens,
        moe_layers: l,
        bytes: tensors.iter().map(|(_, b)| b.len()).sum(),
    })
}

/// Routing held in a trace file, read back without running a model: the
/// `trace` command's output, or an engine's record converted by
/// [`crate::import`]. Fields a source lacks are `None`, never filled in.
///
/// Imported files carry `__metadata__` (`format = moe-inspect-trace`,
/// `source`, `num_experts`, `top_k`) and, for counts-only sources, an
/// `expert_counts` I64 `[moe_layers, E]` tensor instead of per-token records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Routing {
    /// The engine or tool that recorded it (`moe-inspect`, `vllm`, `sglang`...).
    pub source: String,
    /// The checkpoint's MoE layer indices, one per routing column.
    pub moe_layers: Vec<usize>,
    /// Routed experts per layer (0 when the file does not say).
    pub num_experts: usize,
    /// Experts selected per token (0 when the file does not say).
    pub top_k: usize,
    /// Tokens of each prompt (per-token sources; empty for counts-only ones).
    pub prompt_lengths: Vec<usize>,
    /// `[tokens, moe_layers, top_k]` logical expert ids.
    pub selected: Option<Vec<u16>>,
    /// `[tokens]` token ids, when the source recorded them.
    pub token_ids: Option<Vec<i64>>,
    /// `[tokens, moe_layers, top_k]` routing weights, when recorded.
    pub routing_weights: Option<Vec<f32>>,
    /// `[tokens, moe_layers, E]` router logits, when recorded.
    pub router_logits: Option<Vec<f32>>,
    /// `[moe_layers, E]` selections per expert, for counts-only sources.
    pub expert_counts: Option<Vec<u64>>,
}

/// The most tokens a trace may hold (selections are checked against it too).
pub const MAX_TRACE_TOKENS: usize = 1 << 28;

impl Routing {
    /// Tokens with per-token records.
    pub fn tokens(&self) -> usize {
        self.prompt_lengths.iter().sum()
    }

    /// Per-layer selection counts, `[moe_layers][E]`: from the per-token
    /// records, or the counts of a counts-only source.
    pub fn load(&self) -> Vec<Vec<u64>> {
        let (l, e, k) = (self.moe_layers.len(), self.num_experts, self.top_k);
        if let Some(c) = &self.expert_counts {
            return c.chunks(e.max(1)).map(<[u64]>::to_vec).collect();
        }
        let mut load = vec![vec![0u64; e]; l];
        if let Some(sel) = &self.selected {
            for (i, &x) in sel.iter().enumerate() {
                load[(i / k) % l][usize::from(x)] += 1;
            }
        }
        load
    }

    /// Checks that the sizes agree with each other and every id is below
    /// `num_experts`; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| crate::Error::Input {
            path: path.to_path_buf(),
            reason,
        };
        let (l, e, k) = (self.moe_layers.len(), self.num_experts, self.top_k);
        if l == 0 {
            return Err(bad("the trace names no MoE layer".into()));
        }
        if e == 0 || e > crate::model::config::limits::EXPERTS {
            return Err(bad(format!("expert count {e} is out of range")));
        }
        let t = self.tokens();
        if t > MAX_TRACE_TOKENS {
            return Err(bad(format!(
                "{t} tokens exceed the limit of {MAX_TRACE_TOKENS}"
            )));
        }
        let per_token = |name: &str, len: usize, width: usize| -> Result<()> {
            let want = t.checked_mul(l).and_then(|x| x.checked_mul(width));
            if want != Some(len) {
                return Err(bad(format!(
                    "`{name}` holds {len} values, but {t} tokens × {l} layers × {width} need {}",
                    want.map_or("more than 2^64".into(), |w| w.to_string())
                )));
            }
            Ok(())
        };
        if let Some(sel) = &self.selected {
            if k == 0 || k > e {
                return Err(bad(format!("top-k {k} is out of range for {e} experts")));
            }
            per_token("selected_experts", sel.len(), k)?;
            if let Some((i, &x)) = sel.iter().enumerate().find(|(_, &x)| usize::from(x) >= e) {
                let tok = i / (l * k);
                return Err(bad(format!(
                    "token {tok}, MoE layer {}: expert id {x} is out of range (the model has {e} experts)",
                    self.moe_layers[(i / k) % l]
                )));
            }
        }
        if let Some(w) = &self.routing_weights {
            per_token("routing_weights", w.len(), k)?;
        }
        if let Some(g) = &self.router_logits {
            per_token("router_logits", g.len(), e)?;
            if g.iter().any(|x| !x.is_finite()) {
                return Err(bad("`router_logits` holds NaN or infinite values".into()));
            }
        }
        if let Some(ids) = &self.token_ids {
            if ids.len() != t {
                return Err(bad(format!(
                    "`token_ids` holds {} ids for {t} tokens",
                    ids.len()
                )));
            }
        }
        if let Some(c) = &self.expert_counts {
            if c.len() != l * e {
                return Err(bad(format!(
                    "`expert_counts` holds {} values, but {l} layers × {e} experts need {}",
                    c.len(),
                    l * e
                )));
            }
        } else if self.selected.is_none() {
            return Err(bad(
                "the trace holds neither `selected_experts` nor `expert_counts`".into(),
            ));
        }
        Ok(())
    }
}

/// Writes `routing` as a trace file (atomically); the counterpart of [`read`].
pub fn write(routing: &Routing, out: &Path) -> Result<()> {
    routing.validate(out)?;
    let (t, l, e, k) = (
        routing.tokens(),
        routing.moe_layers.len(),
        routing.num_experts,
        routing.top_k,
    );
    let i64s =
        |v: &mut dyn Iterator<Item = i64>| -> Vec<u8> { v.flat_map(i64::to_le_bytes).collect() };
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    if let Some(g) = &routing.router_logits {
        tensors.push((TensorSpec::new("router_logits", "F32", &[t, l, e]), f32s(g)));
    }
    if let Some(sel) = &routing.selected {
        let bytes = sel.iter().flat_map(|&x| (x as i16).to_le_bytes()).collect();
        tensors.push((
            TensorSpec::new("selected_experts", "I16", &[t, l, k]),
            bytes,
        ));
    }
    if let Some(w) = &routing.routing_weights {
        tensors.push((
            TensorSpec::new("routing_weights", "F32", &[t, l, k]),
            f32s(w),
        ));
    }
    if let Some(ids) = &routing.token_ids {
        tensors.push((
            TensorSpec::new("token_ids", "I64", &[t]),
            i64s(&mut ids.iter().copied()),
        ));
    }
    if routing.selected.is_some() {
        tensors.push((
            TensorSpec::new("prompt_lengths", "I64", &[routing.prompt_lengths.len()]),
            i64s(&mut routing.prompt_lengths.iter().map(|&x| x as i64)),
        ));
    }
    tensors.push((
        TensorSpec::new("moe_layers", "I64", &[l]),
        i64s(&mut routing.moe_layers.iter().map(|&x| x as i64)),
    ));
    if let Some(c) = &routing.expert_counts {
        tensors.push((
            TensorSpec::new("expert_counts", "I64", &[l, e]),
            i64s(&mut c.iter().map(|&x| x.min(i64::MAX as u64) as i64)),
        ));
    }
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({
            "format": "moe-inspect-trace",
            "source": routing.source,
            "num_experts": e.to_string(),
            "top_k": k.to_string(),
        }),
    );
    let mut offset = 0usize;
    for (s, bytes) in &tensors {
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    crate::atomic_write::write_atomic_with(out, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        for (_, bytes) in &tensors {
            w.write_all(bytes)?;
        }
        Ok(())
    })
}

/// The `__metadata__` of a safetensors file (empty when it has none).
fn metadata(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|e| crate::Error::io(path, e))?;
    let len = u64::from_le_bytes(len8);
    if len > crate::model::safetensors::MAX_HEADER_BYTES {
        return Err(crate::Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "not a trace file: its safetensors header length {len} is out of range"
            ),
        });
    }
    let mut text = vec![0u8; len as usize];
    f.read_exact(&mut text)
        .map_err(|e| crate::Error::io(path, e))?;
    let header: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| crate::Error::Input {
            path: path.to_path_buf(),
            reason: format!("safetensors header is not valid JSON: {e}"),
        })?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object().cloned())
        .unwrap_or_default())
}

/// Reads a trace file: the `trace` command's output or an imported one.
/// `num_experts` (from the model's config) is used when the file does not
/// say; every size and id is checked ([`Routing::validate`]).
pub fn read(path: &Path, num_experts: Option<usize>) -> Result<Routing> {
    let bad = |reason: String| crate::Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    let meta = metadata(path)?;
    let w = crate::model::safetensors::Weights::open_file(path)?;
    let tensor = |name: &str, dtype: &str, rank: usize| -> Result<Option<(Vec<usize>, &[u8])>> {
        if !w.contains(name) {
            return Ok(None);
        }
        let (tag, shape, bytes) = w.raw(name)?;
        if tag != dtype || shape.len() != rank {
            return Err(bad(format!(
                "tensor `{name}` is {tag} {shape:?}; a trace stores it as {dtype} of rank {rank}"
            )));
        }
        Ok(Some((shape.to_vec(), bytes)))
    };
    let i64s = |b: &[u8]| -> Vec<i64> {
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let nonneg = |name: &str, v: Vec<i64>| -> Result<Vec<usize>> {
        v.into_iter()
            .map(|x| {
                usize::try_from(x)
                    .ok()
                    .filter(|&x| x <= MAX_TRACE_TOKENS)
                    .ok_or_else(|| bad(format!("`{name}` holds {x}, out of range")))
            })
            .collect()
    };
    let (_, layers) = tensor("moe_layers", "I64", 1)?
        .ok_or_else(|| bad("no `moe_layers` tensor: not a trace file".into()))?;
    let moe_layers = nonneg("moe_layers", i64s(layers))?;
    let meta_usize = |key: &str| -> Result<Option<usize>> {
        match meta.get(key).and_then(|v| v.as_str()) {
            None => Ok(None),
            Some(s) => s
                .parse::<usize>()
                .map(Some)
                .map_err(|_| bad(format!("metadata `{key}` = {s:?} is not a count"))),
        }
    };
    let mut r = Routing {
        source: meta
            .get("source")
            .and_then(|v| v.as_str())
            .unwrap_or("moe-inspect")
            .to_string(),
        moe_layers,
        ..Routing::default()
    };
    let file_e = meta_usize("num_experts")?;
    let mut e = file_e;
    if let Some((shape, b)) = tensor("router_logits", "F32", 3)? {
        e = e.or(Some(shape[2]));
        r.router_logits = Some(f32s(b));
    }
    if let Some((shape, b)) = tensor("selected_experts", "I16", 3)? {
        r.top_k = shape[2];
        let mut sel = Vec::with_capacity(b.len() / 2);
        for c in b.chunks_exact(2) {
            let x = i16::from_le_bytes([c[0], c[1]]);
            sel.push(u16::try_from(x).map_err(|_| bad(format!("`selected_experts` holds {x}")))?);
        }
        r.selected = Some(sel);
        let (_, pl) = tensor("prompt_lengths", "I64", 1)?
            .ok_or_else(|| bad("`selected_experts` without `prompt_lengths`".into()))?;
        r.prompt_lengths = nonneg("prompt_lengths", i64s(pl))?;
    }
    if let Some(k) = meta_usize("top_k")? {
        if r.selected.is_none() {
            r.top_k = k;
        }
    }
    if let Some((_, b)) = tensor("routing_weights", "F32", 3)? {
        r.routing_weights = Some(f32s(b));
    }
    if let Some((_, b)) = tensor("token_ids", "I64", 1)? {
        r.token_ids = Some(i64s(b));
    }
    if let Some((shape, b)) = tensor("expert_counts", "I64", 2)? {
        e = e.or(Some(shape[1]));
        r.expert_counts = Some(
            i64s(b)
                .into_iter()
                .map(|x| u64::try_from(x).map_err(|_| bad(format!("`expert_counts` holds {x}"))))
                .collect::<Result<_>>()?,
        );
    }
    r.num_experts = match (e, num_experts) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(format!(
                "the trace has {a} experts per layer, the model {b}"
            )))
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => {
            return Err(bad(
                "the trace does not say how many experts a layer has: pass --model".into(),
            ))
        }
    };
    r.validate(path)?;
    Ok(r)
}

#[cfg(test)]
mod routing_tests {
    use super::*;

    fn routing() -> Routing {
        Routing {
            source: "test".into(),
            moe_layers: vec![1, 3],
            num_experts: 4,
            top_k: 2,
            prompt_lengths: vec![2, 1],
            selected: Some(vec![0, 1, 2, 3, 1, 0, 3, 2, 0, 3, 1, 2]),
            token_ids: Some(vec![5, 6, 7]),
            ..Routing::default()
        }
    }

    #[test]
    fn write_then_read_round_trips_and_counts_load() {
        let dir = std::env::temp_dir().join(format!("moe-inspect-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let r = routing();
        write(&r, &path).unwrap();
        let back = read(&path, None).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.load(), vec![vec![3, 2, 0, 1], vec![0, 1, 3, 2]]);
        // The model's expert count must agree with the file's.
        let err = read(&path, Some(6)).unwrap_err().to_string();
        assert!(
            err.contains("the trace has 4 experts per layer, the model 6"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn validation_names_the_bad_id_and_the_size_mismatch() {
        let p = Path::new("x.safetensors");
        let mut r = routing();
        r.selected.as_mut().unwrap()[5] = 4;
        let err = r.validate(p).unwrap_err().to_string();
        assert!(
            err.contains("x.safetensors")
                && err.contains("token 1, MoE layer 1: expert id 4 is out of range"),
            "{err}"
        );
        let mut r = routing();
        r.prompt_lengths = vec![2, 2];
        assert!(r
            .validate(p)
            .unwrap_err()
            .to_string()
            .contains("4 tokens × 2 layers × 2 need 16"));
        let mut r = routing();
        r.token_ids = Some(vec![1]);
        assert!(r
            .validate(p)
            .unwrap_err()
            .to_string()
            .contains("`token_ids` holds 1 ids for 3 tokens"));
        let mut r = routing();
        r.selected = None;
        assert!(r.validate(p).unwrap_err().to_string().contains("neither"));
        r.expert_counts = Some(vec![1; 7]);
        assert!(r
            .validate(p)
            .unwrap_err()
            .to_string()
            .contains("`expert_counts` holds 7 values"));
    }
}
