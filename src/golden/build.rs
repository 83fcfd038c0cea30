//! Building a snapshot: one pass over the model's MoE layers for the static
//! part (similarities, gate-embedding r², fingerprints), one forward pass
//! over the prompts for routing and norm-score; or a routing-only snapshot
//! of a trace file.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::analysis::results::PerMatrix;
use crate::analysis::{neurons, statics, stream, Progress};
use crate::error::{Error, Result};
use crate::forward::observer::{MoeObservation, Observer, Wants};
use crate::forward::Forward;
use crate::golden::schema::{
    Fingerprint, Identity, LayerSnapshot, NormScoreStats, PromptsInfo, RoutingStats, Selection,
    Snapshot, Tolerances, TopKIds, FINGERPRINT_DIM, GOLDEN_SCHEMA,
};
use crate::model::{Matrix, Model};

/// How to build a snapshot.
pub struct BuildOptions<'a> {
    /// The snapshot's name.
    pub name: String,
    /// What to record.
    pub selection: Selection,
    /// Token ids of the prompts (needed for routing and norm-score).
    pub prompts: Option<&'a [Vec<u32>]>,
    /// Device of the forward pass.
    pub device: candle_core::Device,
    /// Tolerances stored in the snapshot.
    pub tolerances: Tolerances,
    /// Keep per-token router distributions in memory (for `diff`).
    pub keep_router_probs: bool,
}

fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON with object keys sorted at every level (independent of file order).
fn canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*k).clone()).to_string());
                out.push(':');
                canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The identity block of a model.
pub fn identity(model: &Model) -> Result<Identity> {
    let mut cfg = String::new();
    canonical(
        &serde_json::Value::Object(model.config.map().clone()),
        &mut cfg,
    );
    let mut index = String::new();
    for name in model.weights().names() {
        let (dtype, shape, _) = model.weights().raw(name)?;
        index.push_str(&format!("{name}\t{dtype}\t{shape:?}\n"));
    }
    let s = crate::analysis::model_summary(model);
    Ok(Identity {
        family: s.family,
        num_layers: s.num_layers,
        moe_layers: s.moe_layers,
        num_experts: s.num_experts,
        top_k: s.top_k,
        hidden_size: s.hidden_size,
        intermediate_size: s.intermediate_size,
        dtype: s.dtype,
        config_hash: short_hash(cfg.as_bytes()),
        tensor_index_hash: short_hash(index.as_bytes()),
    })
}

/// Hash of the prompts' token ids.
pub fn prompts_info(prompts: &[Vec<u32>]) -> PromptsInfo {
    let mut bytes = Vec::new();
    for p in prompts {
        bytes.extend((p.len() as u32).to_le_bytes());
        for t in p {
            bytes.extend(t.to_le_bytes());
        }
    }
    PromptsInfo {
        count: prompts.len(),
        tokens: prompts.iter().map(Vec::len).sum(),
        hash: short_hash(&bytes),
    }
}

/// Deterministic ±1 for (component, coordinate): a splitmix64 bit.
fn sign(component: usize, coord: usize) -> f64 {
    let mut z = (component as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(coord as u64)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z & 1 == 0 {
        1.0
    } else {
        -1.0
    }
}

/// A random ±1 projection of `v` to [`FINGERPRINT_DIM`] numbers, scaled to unit norm.
pub fn sketch(v: &[f64]) -> Vec<f32> {
    let raw: Vec<f64> = (0..FINGERPRINT_DIM)
        .map(|c| v.iter().enumerate().map(|(i, x)| sign(c, i) * x).sum())
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    raw.iter()
        .map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 })
        .collect()
}

fn to_f32(m: &[Vec<f64>]) -> Vec<Vec<f32>> {
    m.iter()
        .map(|r| r.iter().map(|&x| x as f32).collect())
        .collect()
}

/// The router's effective bits: its storage bits, unless every row holds at
/// most half as many distinct values as it has entries, in which case
/// `ceil(log2(distinct))` of the busiest row (a quantized router stored in a
/// wider dtype).
pub(super) fn effective_bits(rows: &[&[f32]], storage_bits: u32) -> u32 {
    let width = rows.first().map_or(0, |r| r.len());
    let distinct = rows
        .iter()
        .map(|r| {
            let mut v: Vec<u32> = r.iter().map(|x| x.to_bits()).collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        })
        .max()
        .unwrap_or(1)
        .max(1);
    if distinct * 2 > width {
        return storage_bits;
    }
    (usize::BITS - (distinct - 1).leading_zeros()).min(storage_bits)
}

/// Rounds fingerprint components to 4 decimals (they only need to tell experts apart).
fn round4(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| (x * 1e4).round() / 1e4).collect()
}

/// Computes a snapshot of `model`.
///
/// ```rust
/// use moe_inspect::forward::parse_device;
/// use moe_inspect::golden::{self, compare::compare, BuildOptions, Selection, Tolerances};
/// use moe_inspect::model::Model;
///
/// let model = Model::demo()?;
/// let opts = BuildOptions {
///     name: "demo".to_string(),
///     selection: Selection::parse(&["expert-similarity"]).unwrap(),
///     prompts: None,
///     device: parse_device("cpu")?,
///     tolerances: Tolerances::default(),
///     keep_router_probs: false,
/// };
/// let gold = golden::build(&model, &opts, &())?;
/// // A snapshot survives its JSON round trip, and the same model shows no drift.
/// let path = std::env::temp_dir().join(format!("moe-inspect-doc-{}.json", std::process::id()));
/// gold.write(&path)?;
/// let read = golden::Snapshot::read(&path)?;
/// std::fs::remove_file(&path).ok();
/// let now = golden::build(&model, &opts, &())?;
/// let cmp = compare(&read, &now, &Tolerances::default()).unwrap();
/// assert!(!cmp.drift());
/// # Ok::<(), moe_inspect::Error>(())
/// ```
pub fn build(model: &Model, opts: &BuildOptions<'_>, progress: &dyn Progress) -> Result<Snapshot> {
    let info = &model.info;
    let sel = opts.selection;
    let e = info.num_experts;
    let mut layers: Vec<LayerSnapshot> = info
        .moe_layers
        .iter()
        .map(|&layer| LayerSnapshot {
            layer,
            expert_similarity: None,
            neuron_similarity: None,
            gate_similarity: None,
            gate_r2: None,
            fingerprint: None,
            routing: None,
            norm_score: None,
        })
        .collect();
    let mut top_k_ids = None;
    let mut router_probs = BTreeMap::new();
    let prompts = match (sel.any_dynamic(), opts.prompts) {
        (true, Some(p)) => Some(p),
        (true, None) => {
            return Err(Error::bad_value(
                crate::error::ValueKind::Prompts,
                "",
                "routing and norm-score snapshots need prompts",
            ))
        }
        (false, _) => None,
    };
    let steps = if sel.any_static() { layers.len() } else { 0 }
        + if prompts.is_some() {
            info.num_layers
        } else {
            0
        };
    progress.start(steps);
    if sel.any_static() {
        let labels: Vec<String> = (0..e).map(|x| x.to_string()).collect();
        for slot in &mut layers {
            static_layer(model, slot, &labels, sel)?;
            progress.layer_done(slot.layer);
        }
    }
    if let Some(prompts) = prompts {
        let fwd =
            Forward::new(model, opts.device.clone())?.resident_if_fits(crate::forward::Passes::One);
        let mut rec = Recorder::new(
            info,
            prompts,
            sel.norm_score,
            opts.keep_router_probs,
            progress,
        );
        fwd.run(prompts, &mut rec, false)?;
        if let Some(err) = rec.error.take() {
            return Err(err);
        }
        // After the run: a failing run's error stays the only line. One
        // pass always streams its weights (the ordinary case: detail, -v;
        // `check` builds one snapshot per model).
        if let Some(r) = fwd.residency() {
            progress.detail(&r.to_string());
        }
        let tokens: usize = prompts.iter().map(Vec::len).sum();
        let k = info.top_k;
        let nl = info.moe_layers.len();
        let mut ids = vec![0i16; tokens * nl * k];
        for (li, slot) in layers.iter_mut().enumerate() {
            let acc = rec
                .layers
                .remove(&slot.layer)
                .ok_or_else(|| Error::Compute {
                    what: "golden snapshot".into(),
                    reason: format!("the forward pass did not report MoE layer {}", slot.layer),
                })?;
            for (t, chunk) in acc.selected.chunks(k).enumerate() {
                for (j, &x) in chunk.iter().enumerate() {
                    ids[(t * nl + li) * k + j] = x as i16;
                }
            }
            if sel.routing {
                let mut load = vec![0u64; e];
                for &x in &acc.selected {
                    load[x as usize] += 1;
                }
                slot.routing = Some(RoutingStats {
                    tokens,
                    load,
                    mean_probs: acc
                        .prob_sum
                        .iter()
                        .map(|s| (s / tokens.max(1) as f64) as f32)
                        .collect(),
                });
            }
            if let Some(n) = &acc.norm {
                slot.norm_score = Some(NormScoreStats {
                    counts: n.matrix(),
                    top1_match_rate: (n.matches as f64 / n.tokens.max(1) as f64) as f32,
                });
            }
            if opts.keep_router_probs {
                router_probs.insert(slot.layer, acc.probs);
            }
        }
        if sel.routing {
            top_k_ids = Some(TopKIds::encode(&ids, [tokens, nl, k]));
        }
    }
    progress.finish();
    Ok(Snapshot {
        schema: GOLDEN_SCHEMA.to_string(),
        name: opts.name.clone(),
        model: identity(model)?,
        analyses: sel.names(),
        prompts: prompts.map(prompts_info),
        tolerances: opts.tolerances,
        layers,
        top_k_ids,
        router_probs,
    })
}

/// Reads one MoE layer once and fills its static part.
fn static_layer(
    model: &Model,
    slot: &mut LayerSnapshot,
    labels: &[String],
    sel: Selection,
) -> Result<()> {
    let e = labels.len();
    let view = model.moe_layer(slot.layer)?;
    let mut stats: [stream::MatrixStats; 3] = Default::default();
    let needs = stream::Needs {
        neuron_sum: true,
        standardized_gram: false,
    };
    for (s, m) in stats.iter_mut().zip(Matrix::ALL) {
        let views: Vec<_> = view.experts.iter().map(|x| x.matrix(m)).collect();
        *s = stream::stream(&views, neurons::axis(m), needs)?;
    }
    let es = statics::expert_similarity::from_stats(slot.layer, labels, &stats);
    let ns = statics::neuron_similarity::from_stats(slot.layer, labels, &stats);
    let ge = statics::gate_embedding::layer(&view.router, &ns, e)?;
    if sel.expert_similarity {
        slot.expert_similarity = Some(PerMatrix::from_fn(|m| to_f32(es.get(m))));
    }
    if sel.neuron_similarity {
        slot.neuron_similarity = Some(PerMatrix::from_fn(|m| to_f32(ns.get(m))));
    }
    if sel.gate_embedding {
        slot.gate_similarity = Some(to_f32(&ge.similarity));
        slot.gate_r2 = Some(PerMatrix::from_fn(|m| ge.r2.get(m).map(|x| x as f32)));
    }
    let router = view.router.to_f32_vec();
    let hidden = model.info.hidden_size.max(1);
    let rows: Vec<&[f32]> = router.chunks(hidden).collect();
    let router_fp = rows
        .iter()
        .map(|r| round4(sketch(&r.iter().map(|&x| x as f64).collect::<Vec<_>>())))
        .collect();
    let idx = |m: Matrix| Matrix::ALL.iter().position(|&x| x == m).unwrap_or(0);
    slot.fingerprint = Some(Fingerprint {
        experts: PerMatrix::from_fn(|m| {
            stats[idx(m)]
                .neuron_sum
                .iter()
                .map(|v| round4(sketch(v)))
                .collect()
        }),
        router: router_fp,
        router_bits: effective_bits(&rows, 8 * view.router.dtype.size() as u32),
    });
    drop(view);
    model.release_layer(slot.layer);
    Ok(())
}

struct LayerRecord {
    /// `[tokens, k]` over all prompts, in prompt order.
    selected: Vec<u32>,
    prob_sum: Vec<f64>,
    probs: Vec<f32>,
    norm: Option<crate::analysis::dynamic::norm_score::Accumulator>,
}

/// The observer that records routing (and norm-score) per MoE layer.
struct Recorder<'a> {
    layers: BTreeMap<usize, LayerRecord>,
    norm: bool,
    keep_probs: bool,
    progress: &'a dyn Progress,
    error: Option<Error>,
}

impl<'a> Recorder<'a> {
    fn new(
        info: &crate::model::ModelInfo,
        prompts: &[Vec<u32>],
        norm: bool,
        keep_probs: bool,
        progress: &'a dyn Progress,
    ) -> Recorder<'a> {
        let tokens: usize = prompts.iter().map(Vec::len).sum();
        let e = info.num_experts;
        let layers = info
            .moe_layers
            .iter()
            .map(|&l| {
                (
                    l,
                    LayerRecord {
                        selected: Vec::with_capacity(tokens * info.top_k),
                        prob_sum: vec![0.0; e],
                        probs: Vec::new(),
                        norm: norm
                            .then(|| crate::analysis::dynamic::norm_score::Accumulator::new(e)),
                    },
                )
            })
            .collect();
        Recorder {
            layers,
            norm,
            keep_probs,
            progress,
            error: None,
        }
    }
}

impl Observer for Recorder<'_> {
    fn wants(&self) -> Wants {
        Wants {
            all_expert_outputs: self.norm,
            ..Wants::default()
        }
    }

    fn layer_done(&mut self, layer: usize) {
        self.progress.layer_done(layer);
    }

    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        let Some(rec) = self.layers.get_mut(&o.layer) else {
            self.error = Some(Error::Compute {
                what: "golden snapshot".into(),
                reason: format!("unexpected MoE layer {}", o.layer),
            });
            return;
        };
        let (e, h) = (o.experts, o.hidden);
        rec.selected.extend_from_slice(o.selected);
        for t in 0..o.tokens {
            let s = &o.scores[t * e..(t + 1) * e];
            let total: f64 = s.iter().map(|&x| x as f64).sum();
            for (acc, &x) in rec.prob_sum.iter_mut().zip(s) {
                let p = if total > 0.0 { x as f64 / total } else { 0.0 };
                *acc += p;
                if self.keep_probs {
                    rec.probs.push(p as f32);
                }
            }
            if let (Some(n), Some(out)) = (&mut rec.norm, o.expert_outputs) {
                let scores: Vec<f64> = s.iter().map(|&x| x as f64).collect();
                let norms: Vec<f64> = (0..e)
                    .map(|x| {
                        let row = &out[(x * o.tokens + t) * h..(x * o.tokens + t + 1) * h];
                        row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
                    })
                    .collect();
                n.add(&scores, &norms);
            }
        }
    }
}

/// A routing-only snapshot of a trace file (`snapshot --trace`, `check
/// --trace`): `chosen-experts` with the per-layer load and, from per-token
/// traces, the top-k ids (so `check` computes top-k agreement). The identity
/// comes from the model's config.json alone (no weights: the tensor index
/// hash is `trace`). The mean router distribution is the softmax of the
/// trace's router logits when it has them, else empty: `router-jsd` then
/// compares the load distributions (see [`crate::golden::compare::compare`]).
/// The prompts are identified by the hash of the token ids (as for a model
/// snapshot), or of the prompt lengths when the engine records no ids.
pub fn from_trace(
    routing: &crate::trace::Routing,
    config: &crate::model::config::Config,
    name: &str,
    tolerances: Tolerances,
) -> Result<Snapshot> {
    let info = crate::model::family::ModelInfo::from_config(config)?;
    let mut cfg = String::new();
    canonical(&serde_json::Value::Object(config.map().clone()), &mut cfg);
    let identity = Identity {
        family: info.family.id().to_string(),
        num_layers: info.num_layers,
        moe_layers: info.moe_layers.clone(),
        num_experts: info.num_experts,
        top_k: info.top_k,
        hidden_size: info.hidden_size,
        intermediate_size: info.expert_intermediate,
        dtype: config.declared_dtype().to_string(),
        config_hash: short_hash(cfg.as_bytes()),
        tensor_index_hash: "trace".into(),
    };
    let (l, e, k) = (routing.moe_layers.len(), routing.num_experts, routing.top_k);
    let load = routing.load();
    let tokens = match &routing.selected {
        Some(_) => routing.tokens(),
        None => load.first().map_or(0, |x| x.iter().sum::<u64>() as usize) / k.max(1),
    };
    let mut layers = Vec::with_capacity(l);
    for (li, &layer) in routing.moe_layers.iter().enumerate() {
        let mean_probs: Vec<f32> = match &routing.router_logits {
            Some(g) => {
                let mut sum = vec![0f64; e];
                for row in g.chunks_exact(e).skip(li).step_by(l) {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                    for (s, &x) in sum.iter_mut().zip(row) {
                        *s += (x as f64 - m).exp() / z;
                    }
                }
                sum.iter()
                    .map(|s| (s / tokens.max(1) as f64) as f32)
                    .collect()
            }
            None => Vec::new(),
        };
        layers.push(LayerSnapshot {
            layer,
            expert_similarity: None,
            neuron_similarity: None,
            gate_similarity: None,
            gate_r2: None,
            fingerprint: None,
            routing: Some(RoutingStats {
                tokens,
                load: load[li].clone(),
                mean_probs,
            }),
            norm_score: None,
        });
    }
    let prompts = routing.selected.as_ref().map(|_| match &routing.token_ids {
        Some(ids) => {
            let mut at = 0;
            let prompts: Vec<Vec<u32>> = routing
                .prompt_lengths
                .iter()
                .map(|&n| {
                    let p = ids[at..at + n].iter().map(|&x| x as u32).collect();
                    at += n;
                    p
                })
                .collect();
            prompts_info(&prompts)
        }
        None => {
            let text: Vec<String> = routing
                .prompt_lengths
                .iter()
                .map(|n| n.to_string())
                .collect();
            PromptsInfo {
                count: routing.prompt_lengths.len(),
                tokens,
                hash: short_hash(format!("lengths:{}", text.join(",")).as_bytes()),
            }
        }
    });
    let top_k_ids = routing.selected.as_ref().map(|sel| {
        let ids: Vec<i16> = sel.iter().map(|&x| x as i16).collect();
        TopKIds::encode(&ids, [tokens, l, k])
    });
    Ok(Snapshot {
        schema: GOLDEN_SCHEMA.to_string(),
        name: name.to_string(),
        model: identity,
        analyses: vec!["chosen-experts".into()],
        prompts,
        tolerances,
        layers,
        top_k_ids,
        router_probs: BTreeMap::new(),
    })
}
