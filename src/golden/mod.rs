//! Golden snapshots of a model's expert behaviour (SPEC §7), schema
//! `moe-inspect/golden/v1`, and the drift gate built on them:
//!
//! - [`build`] computes a [`Snapshot`]: the model's identity, per MoE layer the
//!   static matrices (expert, neuron and router-row similarity, gate-embedding
//!   r²), small per-expert fingerprints used to match experts across
//!   checkpoints, routing statistics over the prompts, norm-score counts, and
//!   the top-k expert ids of every token;
//! - [`compare`] compares two snapshots metric by metric under tolerances;
//! - [`config`] reads `[workspace.metadata.moe-inspect]` with cargo_metadata;
//! - [`diff()`](fn@diff) compares two live checkpoints (also expert-by-expert weights;
//!   module [`mod@diff`]);
//! - [`plan`], [`snapshot`] and [`check()`](fn@check) are the drift gate as a
//!   library: which models, which settings, what is written, as typed outcomes;
//! - [`pending`] handles `*.json.new` files (`review`, `accept`, `reject`).
//!
//! Files are written with [`Snapshot::to_json`]: stable key order, numbers
//! stored as f32 (shortest round-trip form), matrices one row per line, so
//! two runs on the same machine give byte-identical files.

mod check;
pub mod compare;
pub mod config;
pub mod diff;
pub mod pending;

pub use check::{
    check, dir_name, golden_dir, plan, plan_with_config, prompt_ids, snapshot, Action,
    CheckOutcome, ModelOutcome, Plan, ProgressFor, Recorded, Request, Target,
};
pub use diff::{diff, DiffOptions, DiffOutcome};

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::analysis::results::PerMatrix;
use crate::analysis::{neurons, statics, stream, AnalysisKind, Progress};
use crate::error::{Error, Result};
use crate::forward::observer::{MoeObservation, Observer, Wants};
use crate::forward::Forward;
use crate::model::{Matrix, Model};

/// Schema identifier of golden files.
pub const GOLDEN_SCHEMA: &str = "moe-inspect/golden/v1";

/// Dimension of the expert and router fingerprints (random ±1 projections).
pub const FINGERPRINT_DIM: usize = 32;

/// A golden snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Schema tag of the snapshot format.
    pub schema: String,
    /// The snapshot's name (its file stem).
    pub name: String,
    /// Which model it was recorded on.
    pub model: Identity,
    /// What was recorded: a subset of `expert-similarity`, `neuron-similarity`,
    /// `gate-embedding`, `chosen-experts`, `norm-score`.
    pub analyses: Vec<String>,
    /// The prompts the dynamic part was recorded on (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PromptsInfo>,
    /// Tolerances recorded with the snapshot.
    pub tolerances: Tolerances,
    /// One entry per MoE layer.
    pub layers: Vec<LayerSnapshot>,
    /// Top-k expert ids per token (int16 `[tokens, layers, k]`), when routing is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k_ids: Option<TopKIds>,
    /// Per MoE layer, per-token router distributions `[tokens × E]`; kept in
    /// memory for `diff` only, never written.
    #[serde(skip)]
    pub router_probs: BTreeMap<usize, Vec<f32>>,
}

/// What identifies the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Model family id.
    pub family: String,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Intermediate size of one routed expert.
    pub intermediate_size: usize,
    /// Storage dtype of the experts.
    pub dtype: String,
    /// SHA-256 (first 16 hex digits) of config.json with keys sorted.
    pub config_hash: String,
    /// SHA-256 (first 16 hex digits) of the tensor index: names, dtypes, shapes.
    pub tensor_index_hash: String,
}

/// The prompts a snapshot was recorded on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsInfo {
    /// Number of prompts.
    pub count: usize,
    /// Total tokens over all prompts.
    pub tokens: usize,
    /// SHA-256 (first 16 hex digits) of the token ids.
    pub hash: String,
}

/// Drift tolerances; every one can be overridden in configuration
/// (`[…metadata.moe-inspect.tolerance]`) or with `--tolerance KEY=VALUE`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Tolerances {
    /// Max-abs change of any entry of a similarity matrix (cosine).
    pub similarity: f64,
    /// Minimum share of tokens whose top-1 expert is unchanged.
    pub routing_top1_agreement: f64,
    /// Minimum mean overlap |S ∩ S'| / k of the top-k expert sets.
    pub routing_topk_agreement: f64,
    /// Maximum Jensen–Shannon divergence (nats) of router distributions.
    pub router_jsd: f64,
    /// Maximum total-variation distance between the expert load distributions.
    pub load_shift: f64,
    /// Max-abs change of a gate-embedding r².
    pub gate_r2: f64,
    /// Max-abs change of a layer's norm-score `top1_match_rate`.
    pub norm_score_top1: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            similarity: 1e-3,
            routing_top1_agreement: 0.99,
            routing_topk_agreement: 0.95,
            router_jsd: 5e-3,
            load_shift: 0.05,
            gate_r2: 0.01,
            norm_score_top1: 0.05,
        }
    }
}

impl Tolerances {
    /// Keys as written in configuration, with their documentation.
    pub const KEYS: [(&'static str, &'static str); 7] = [
        ("similarity", "max-abs change of a similarity matrix entry"),
        (
            "routing-top1-agreement",
            "minimum share of unchanged top-1 experts",
        ),
        ("routing-topk-agreement", "minimum mean top-k set overlap"),
        (
            "router-jsd",
            "maximum Jensen-Shannon divergence of router distributions (nats)",
        ),
        (
            "load-shift",
            "maximum total-variation distance of expert loads",
        ),
        ("gate-r2", "max-abs change of a gate-embedding r²"),
        (
            "norm-score-top1",
            "max-abs change of norm-score top1_match_rate",
        ),
    ];

    /// Checks every tolerance: finite, ≥ 0, and agreements at most 1.
    pub fn validate(&self) -> Result<()> {
        let all = [
            ("similarity", self.similarity),
            ("routing-top1-agreement", self.routing_top1_agreement),
            ("routing-topk-agreement", self.routing_topk_agreement),
            ("router-jsd", self.router_jsd),
            ("load-shift", self.load_shift),
            ("gate-r2", self.gate_r2),
            ("norm-score-top1", self.norm_score_top1),
        ];
        for (key, value) in all {
            Self::check(key, value)?;
        }
        Ok(())
    }

    fn check(key: &str, value: f64) -> Result<()> {
        if !value.is_finite() || value < 0.0 {
            return Err(Error::Invalid(format!(
                "tolerance `{key}` must be a finite number ≥ 0, got {value}"
            )));
        }
        if key.ends_with("-agreement") && value > 1.0 {
            return Err(Error::Invalid(format!(
                "tolerance `{key}` is a minimum share of tokens, at most 1, got {value}"
            )));
        }
        Ok(())
    }

    /// One tolerance by its configuration key.
    pub fn get(&self, key: &str) -> Option<f64> {
        Some(match key {
            "similarity" => self.similarity,
            "routing-top1-agreement" => self.routing_top1_agreement,
            "routing-topk-agreement" => self.routing_topk_agreement,
            "router-jsd" => self.router_jsd,
            "load-shift" => self.load_shift,
            "gate-r2" => self.gate_r2,
            "norm-score-top1" => self.norm_score_top1,
            _ => return None,
        })
    }

    /// Sets one tolerance by its configuration key.
    pub fn set(&mut self, key: &str, value: f64) -> Result<()> {
        Self::check(key, value)?;
        let slot = match key {
            "similarity" => &mut self.similarity,
            "routing-top1-agreement" => &mut self.routing_top1_agreement,
            "routing-topk-agreement" => &mut self.routing_topk_agreement,
            "router-jsd" => &mut self.router_jsd,
            "load-shift" => &mut self.load_shift,
            "gate-r2" => &mut self.gate_r2,
            "norm-score-top1" => &mut self.norm_score_top1,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown tolerance `{key}` (known: {})",
                    Self::KEYS.map(|k| k.0).join(", ")
                )))
            }
        };
        *slot = value;
        Ok(())
    }
}

/// One MoE layer of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSnapshot {
    /// The checkpoint's layer index.
    pub layer: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// E×E expert similarity per matrix, if recorded.
    pub expert_similarity: Option<PerMatrix<Vec<Vec<f32>>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// E×E neuron similarity per matrix, if recorded.
    pub neuron_similarity: Option<PerMatrix<Vec<Vec<f32>>>>,
    /// Cosine similarity of the router rows (gate-embedding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_similarity: Option<Vec<Vec<f32>>>,
    /// gate-embedding r² per matrix (`null` where undefined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_r2: Option<PerMatrix<Option<f32>>>,
    /// Fingerprints for matching experts across checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// Routing statistics over the prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingStats>,
    /// norm-score counts (`counts[score_rank][norm_rank]`) and top-1 match rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_score: Option<NormScoreStats>,
}

/// Per expert, a random ±1 projection (dimension [`FINGERPRINT_DIM`]) of its
/// mean neuron for each matrix, and of its router row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// Sketches of each expert's up/gate/down matrices, one per expert.
    pub experts: PerMatrix<Vec<Vec<f32>>>,
    /// Sketch of each router row.
    pub router: Vec<Vec<f32>>,
    /// Effective bits of the router: its storage bits, or fewer when its rows
    /// hold few distinct values (`ceil(log2(distinct))`); below 8 means a
    /// quantized router.
    pub router_bits: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// Routing statistics of one MoE layer over the prompts.
pub struct RoutingStats {
    /// Tokens routed.
    pub tokens: usize,
    /// Selections per expert.
    pub load: Vec<u64>,
    /// Mean router distribution over tokens (scores normalised to sum 1);
    /// empty when recorded from a trace without router logits.
    pub mean_probs: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// `norm-score` statistics of one MoE layer.
pub struct NormScoreStats {
    /// `counts[score_rank][norm_rank]`.
    pub counts: Vec<Vec<u64>>,
    /// Share of tokens whose highest-score expert has the highest output norm.
    pub top1_match_rate: f32,
}

/// Top-k ids, int16 little-endian, base64 (standard alphabet, padded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopKIds {
    /// `[tokens, layers, k]`; layers are the snapshot's MoE layers in order.
    pub shape: [usize; 3],
    /// Element type, `int16`.
    pub dtype: String,
    /// The ids, base64-encoded.
    pub data: String,
}

impl TopKIds {
    fn encode(ids: &[i16], shape: [usize; 3]) -> TopKIds {
        let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        TopKIds {
            shape,
            dtype: "i16".into(),
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    /// The ids, checked against the shape.
    pub fn decode(&self) -> Result<Vec<i16>> {
        self.decode_str().map_err(Error::Invalid)
    }

    pub(crate) fn decode_str(&self) -> std::result::Result<Vec<i16>, String> {
        if self.dtype != "i16" {
            return Err(format!(
                "top_k_ids.dtype is `{}`, expected `i16`",
                self.dtype
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| format!("top_k_ids.data is not valid base64: {e}"))?;
        let n = self
            .shape
            .iter()
            .try_fold(2usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("top_k_ids.shape {:?} is too large", self.shape))?;
        if bytes.len() != n {
            return Err(format!(
                "top_k_ids.data holds {} bytes, but shape {:?} needs {}",
                bytes.len(),
                self.shape,
                n
            ));
        }
        Ok(bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect())
    }
}

/// What a snapshot records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// Record `expert-similarity`.
    pub expert_similarity: bool,
    /// Record `neuron-similarity`.
    pub neuron_similarity: bool,
    /// Record `gate-embedding`.
    pub gate_embedding: bool,
    /// Record routing (`chosen-experts`).
    pub routing: bool,
    /// Record `norm-score`.
    pub norm_score: bool,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            expert_similarity: true,
            neuron_similarity: true,
            gate_embedding: true,
            routing: true,
            norm_score: true,
        }
    }
}

impl Selection {
    /// Names a snapshot can record (in the order of the flags).
    pub const NAMES: [&'static str; 5] = [
        AnalysisKind::ExpertSimilarity.name(),
        AnalysisKind::NeuronSimilarity.name(),
        AnalysisKind::GateEmbedding.name(),
        AnalysisKind::ChosenExperts.name(),
        AnalysisKind::NormScore.name(),
    ];

    /// The flag that records `kind`; `None` for analyses snapshots do not record.
    fn flag(&mut self, kind: AnalysisKind) -> Option<&mut bool> {
        match kind {
            AnalysisKind::ExpertSimilarity => Some(&mut self.expert_similarity),
            AnalysisKind::NeuronSimilarity => Some(&mut self.neuron_similarity),
            AnalysisKind::GateEmbedding => Some(&mut self.gate_embedding),
            AnalysisKind::ChosenExperts => Some(&mut self.routing),
            AnalysisKind::NormScore => Some(&mut self.norm_score),
            AnalysisKind::NeuronReorder
            | AnalysisKind::Projection
            | AnalysisKind::OutputSimilarity
            | AnalysisKind::Intermediate => None,
        }
    }

    /// Parses names, `static`, `dynamic` or `all` with the analyses' own
    /// parser (the groups keep only what a snapshot records); `routing` is
    /// the snapshot's name for `chosen-experts`.
    pub fn parse<S: AsRef<str>>(parts: &[S]) -> Result<Selection> {
        let mut s = Selection {
            expert_similarity: false,
            neuron_similarity: false,
            gate_embedding: false,
            routing: false,
            norm_score: false,
        };
        for part in parts.iter().flat_map(|p| p.as_ref().split(',')) {
            let part = part.trim();
            if let Some(group) = AnalysisKind::group(part) {
                for kind in group {
                    if let Some(flag) = s.flag(kind) {
                        *flag = true;
                    }
                }
                continue;
            }
            let kind = match part {
                "routing" => Some(AnalysisKind::ChosenExperts),
                name => AnalysisKind::from_name(name),
            };
            match kind.and_then(|k| s.flag(k)) {
                Some(flag) => *flag = true,
                None => {
                    return Err(Error::Invalid(format!(
                        "`{part}` is not recorded in golden snapshots (they record: static, dynamic, all, {})",
                        Self::NAMES.join(", ")
                    )))
                }
            }
        }
        Ok(s)
    }

    fn names(self) -> Vec<String> {
        let flags = [
            self.expert_similarity,
            self.neuron_similarity,
            self.gate_embedding,
            self.routing,
            self.norm_score,
        ];
        Self::NAMES
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    fn any_static(self) -> bool {
        self.expert_similarity || self.neuron_similarity || self.gate_embedding
    }

    fn any_dynamic(self) -> bool {
        self.routing || self.norm_score
    }

    /// Whether a forward pass over prompts is needed.
    pub fn needs_prompts(self) -> bool {
        self.any_dynamic()
    }
}

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
fn effective_bits(rows: &[&[f32]], storage_bits: u32) -> u32 {
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
        let fwd = Forward::new(model, opts.device.clone())?;
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

impl Snapshot {
    /// The file contents: stable key order, matrices one row per line.
    pub fn to_json(&self) -> String {
        // Serialised first (f32 in shortest form), then laid out; re-parsing
        // keeps each number's digits.
        let compact = serde_json::to_string(self).unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(&compact).unwrap_or(serde_json::Value::Null);
        let mut out = String::new();
        write_value(&value, 0, &mut out);
        out.push('\n');
        out
    }

    /// Parses a golden file; every problem names the file.
    pub fn parse(path: &Path, text: &str) -> Result<Snapshot> {
        let bad = |reason: String| Error::Input {
            path: path.to_path_buf(),
            reason: format!("corrupt golden snapshot: {reason}"),
        };
        let de = &mut serde_json::Deserializer::from_str(text);
        let snap: Snapshot = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            if at == "." {
                bad(e.inner().to_string())
            } else {
                bad(format!("at `{at}`: {}", e.inner()))
            }
        })?;
        if snap.schema != GOLDEN_SCHEMA {
            return Err(bad(format!(
                "schema is `{}`, expected `{GOLDEN_SCHEMA}`",
                snap.schema
            )));
        }
        snap.validate().map_err(bad)?;
        Ok(snap)
    }

    /// Reads and parses a golden file.
    pub fn read(path: &Path) -> Result<Snapshot> {
        let text =
            match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Input {
                    path: path.to_path_buf(),
                    reason:
                        "golden snapshot not found: record one with `cargo moe-inspect snapshot`"
                            .into(),
                }),
                Err(e) => return Err(Error::io(path, e)),
            };
        Snapshot::parse(path, &text)
    }

    /// Writes the file through [`crate::atomic_write`] (unique temp file,
    /// fsync, rename), so a failed or killed run never leaves a partial golden
    /// file. For `<dir>/<name>.json` and `<name>.json.new` it holds the name's
    /// lock ([`pending::lock`]) meanwhile, so concurrent writers serialise, and
    /// removes temp files that killed writers left behind.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let text = self.to_json();
        let _lock = match pending::name_of(path) {
            Some((dir, name)) => {
                let lock = pending::lock(&dir, &name)?;
                crate::atomic_write::remove_stale_temps(path);
                Some(lock)
            }
            None => None,
        };
        crate::atomic_write::write_atomic(path, text.as_bytes())
    }

    /// Checks the file against its own model block: what it says it
    /// recorded is there in every layer, shapes match, every number is finite
    /// and in its range (cosines in [-1, 1], shares in [0, 1]), tolerances are
    /// valid. A file that fails is corrupt (or hand-edited), never trusted.
    fn validate(&self) -> std::result::Result<(), String> {
        let e = self.model.num_experts;
        // Cosines computed in f32 may exceed 1 by rounding, never by more.
        const COS_SLACK: f32 = 1e-3;
        let square = |m: &[Vec<f32>], what: &str, layer: usize| {
            if m.len() != e || m.iter().any(|r| r.len() != e) {
                Err(format!("layer {layer}: {what} is not {e}×{e}"))
            } else if m.iter().flatten().any(|x| !x.is_finite()) {
                Err(format!("layer {layer}: {what} holds a non-finite number"))
            } else if let Some(x) = m.iter().flatten().find(|x| x.abs() > 1.0 + COS_SLACK) {
                Err(format!(
                    "layer {layer}: {what} holds {x}, not a cosine similarity (outside [-1, 1])"
                ))
            } else {
                Ok(())
            }
        };
        let share = |x: f32, what: &str, layer: usize| {
            if x.is_finite() && (0.0..=1.0 + COS_SLACK).contains(&x) {
                Ok(())
            } else {
                Err(format!("layer {layer}: {what} is {x}, outside [0, 1]"))
            }
        };
        if self.analyses.is_empty() {
            return Err("`analyses` is empty: the snapshot records nothing to check".into());
        }
        let sel = Selection::parse(&self.analyses).map_err(|e| format!("`analyses`: {e}"))?;
        self.tolerances.validate().map_err(|e| e.to_string())?;
        if e == 0 || self.model.top_k == 0 || self.model.top_k > e {
            return Err(format!(
                "model: {e} experts with top_k {} is not an MoE model",
                self.model.top_k
            ));
        }
        if self.layers.is_empty() {
            return Err("no MoE layer recorded".into());
        }
        let layer_ids: Vec<usize> = self.layers.iter().map(|l| l.layer).collect();
        if layer_ids != self.model.moe_layers {
            return Err(format!(
                "layers {layer_ids:?} do not match model.moe_layers {:?}",
                self.model.moe_layers
            ));
        }
        for l in &self.layers {
            let recorded = [
                (
                    sel.expert_similarity,
                    l.expert_similarity.is_some(),
                    "expert-similarity",
                ),
                (
                    sel.neuron_similarity,
                    l.neuron_similarity.is_some(),
                    "neuron-similarity",
                ),
                (
                    sel.gate_embedding,
                    l.gate_similarity.is_some() && l.gate_r2.is_some(),
                    "gate-embedding",
                ),
                (sel.routing, l.routing.is_some(), "chosen-experts"),
                (sel.norm_score, l.norm_score.is_some(), "norm-score"),
            ];
            for (wanted, present, name) in recorded {
                if wanted != present {
                    return Err(format!(
                        "layer {}: `analyses` {} {name}, but the layer {} it",
                        l.layer,
                        if wanted { "lists" } else { "does not list" },
                        if present { "holds" } else { "lacks" },
                    ));
                }
            }
            if let Some(r2) = &l.gate_r2 {
                for m in Matrix::ALL {
                    if let Some(x) = r2.get(m) {
                        share(*x, &format!("gate_r2.{}", m.name()), l.layer)?;
                    }
                }
            }
            if let Some(r) = &l.routing {
                for &p in &r.mean_probs {
                    share(p, "routing.mean_probs", l.layer)?;
                }
                let selections = r.load.iter().try_fold(0u64, |a, &x| a.checked_add(x));
                let expected = (r.tokens as u64).checked_mul(self.model.top_k as u64);
                if selections.is_none() || selections != expected {
                    return Err(format!(
                        "layer {}: routing.load sums to {}, but {} tokens × top-{} selections were made",
                        l.layer,
                        selections.map_or("more than 2^64".into(), |x| x.to_string()),
                        r.tokens,
                        self.model.top_k
                    ));
                }
            }
            if let Some(n) = &l.norm_score {
                share(n.top1_match_rate, "norm_score.top1_match_rate", l.layer)?;
            }
            if let Some(f) = &l.fingerprint {
                let finite = |m: &[Vec<f32>]| m.iter().flatten().all(|x| x.is_finite());
                if !(finite(&f.router) && Matrix::ALL.iter().all(|&m| finite(f.experts.get(m)))) {
                    return Err(format!(
                        "layer {}: fingerprint holds a non-finite number",
                        l.layer
                    ));
                }
            }
            for (name, pm) in [
                ("expert_similarity", &l.expert_similarity),
                ("neuron_similarity", &l.neuron_similarity),
            ] {
                if let Some(pm) = pm {
                    for m in Matrix::ALL {
                        square(pm.get(m), &format!("{name}.{}", m.name()), l.layer)?;
                    }
                }
            }
            if let Some(g) = &l.gate_similarity {
                square(g, "gate_similarity", l.layer)?;
            }
            if let Some(r) = &l.routing {
                // An empty mean_probs: a trace without router logits (`from_trace`).
                if r.load.len() != e || (r.mean_probs.len() != e && !r.mean_probs.is_empty()) {
                    return Err(format!(
                        "layer {}: routing has the wrong expert count",
                        l.layer
                    ));
                }
            }
            if let Some(n) = &l.norm_score {
                if n.counts.len() != e || n.counts.iter().any(|r| r.len() != e) {
                    return Err(format!(
                        "layer {}: norm_score.counts is not {e}×{e}",
                        l.layer
                    ));
                }
            }
            if let Some(f) = &l.fingerprint {
                let ok =
                    |m: &[Vec<f32>]| m.len() == e && m.iter().all(|r| r.len() == FINGERPRINT_DIM);
                if !(ok(&f.router) && Matrix::ALL.iter().all(|&m| ok(f.experts.get(m)))) {
                    return Err(format!(
                        "layer {}: fingerprint has the wrong shape",
                        l.layer
                    ));
                }
            }
        }
        if let Some(ids) = &self.top_k_ids {
            let [tokens, nl, k] = ids.shape;
            if nl != self.layers.len() || k != self.model.top_k {
                return Err(format!(
                    "top_k_ids.shape {:?} does not match {} MoE layers and top_k {}",
                    ids.shape,
                    self.layers.len(),
                    self.model.top_k
                ));
            }
            if self.prompts.as_ref().map(|p| p.tokens) != Some(tokens) {
                return Err("top_k_ids holds a different token count than `prompts`".into());
            }
            if let Some(l) = self
                .layers
                .iter()
                .find(|l| l.routing.as_ref().is_some_and(|r| r.tokens != tokens))
            {
                return Err(format!(
                    "layer {}: routing.tokens differs from the {tokens} tokens of top_k_ids",
                    l.layer
                ));
            }
            let v = ids.decode_str()?;
            if let Some(bad) = v.iter().find(|&&x| x < 0 || x as usize >= e) {
                return Err(format!("top_k_ids holds expert id {bad}, outside 0..{e}"));
            }
        }
        Ok(())
    }
}

/// Pretty JSON where arrays of numbers (and arrays of such arrays' rows) stay
/// on one line: matrices read one row per line.
fn write_value(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = |n: usize| "  ".repeat(n);
    match v {
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push_str("{\n");
            for (i, (k, x)) in map.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_value(x, indent + 1, out);
                if i + 1 < map.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        Value::Array(items) if items.iter().all(|x| !x.is_object() && !x.is_array()) => {
            out.push_str(&v.to_string());
        }
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, x) in items.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                write_value(x, indent + 1, out);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A routing-only snapshot of a trace file (`snapshot --trace`, `check
/// --trace`): `chosen-experts` with the per-layer load and, from per-token
/// traces, the top-k ids (so `check` computes top-k agreement). The identity
/// comes from the model's config.json alone (no weights: the tensor index
/// hash is `trace`). The mean router distribution is the softmax of the
/// trace's router logits when it has them, else empty: `router-jsd` then
/// compares the load distributions (see [`compare::compare`]).
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
        dtype: config
            .get("torch_dtype")
            .or_else(|| config.get("dtype"))
            .and_then(|v| v.as_str())
            .unwrap_or("unknown")
            .to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_ids_round_trip_and_reject_bad_data() {
        let ids: Vec<i16> = vec![0, 7, 3, 255, 1, 2];
        let t = TopKIds::encode(&ids, [3, 1, 2]);
        assert_eq!(t.decode().unwrap(), ids);
        let mut short = t.clone();
        short.shape = [4, 1, 2];
        assert!(short.decode().unwrap_err().to_string().contains("needs 16"));
        let mut bad = t;
        bad.data.push('!');
        assert!(bad.decode().unwrap_err().to_string().contains("base64"));
    }

    #[test]
    fn effective_bits_sees_quantized_rows_only() {
        let wide: Vec<f32> = (0..64).map(|i| i as f32 * 0.37).collect();
        assert_eq!(effective_bits(&[&wide], 16), 16);
        let q4: Vec<f32> = (0..64).map(|i| ((i % 15) as f32 - 7.0) * 0.1).collect();
        let q3: Vec<f32> = (0..64).map(|i| (i % 8) as f32).collect();
        assert_eq!(effective_bits(&[&q4, &q3], 16), 4);
        let q8: Vec<f32> = (0..1024).map(|i| (i % 256) as f32).collect();
        assert_eq!(effective_bits(&[&q8], 32), 8);
    }

    #[test]
    fn sketch_preserves_identity_and_scale_invariance() {
        let v: Vec<f64> = (0..100).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
        let w: Vec<f64> = v.iter().map(|x| 3.0 * x).collect();
        assert_eq!(sketch(&v), sketch(&w));
        let n: f32 = sketch(&v).iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-5);
        let other: Vec<f64> = (0..100).map(|i| ((i * 53) % 7) as f64 - 3.0).collect();
        assert_ne!(sketch(&v), sketch(&other));
    }

    #[test]
    fn selection_parses_groups_and_rejects_unrecorded_analyses() {
        let s = Selection::parse(&["static", "norm-score"]).unwrap();
        assert!(s.expert_similarity && s.gate_embedding && s.norm_score && !s.routing);
        assert_eq!(Selection::parse(&["all"]).unwrap(), Selection::default());
        assert!(Selection::parse(&["projection"])
            .unwrap_err()
            .to_string()
            .contains("projection"));
    }

    #[test]
    fn layout_keeps_matrix_rows_on_one_line() {
        let v = serde_json::json!({"a": [[1.0, 2.5], [3.0, 4.0]], "b": {"c": [1, 2]}});
        let mut out = String::new();
        write_value(&v, 0, &mut out);
        assert_eq!(
            out,
            "{\n  \"a\": [\n    [1.0,2.5],\n    [3.0,4.0]\n  ],\n  \"b\": {\n    \"c\": [1,2]\n  }\n}"
        );
    }
}
