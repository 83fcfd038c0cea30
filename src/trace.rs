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
