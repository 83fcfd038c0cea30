//! The golden file's types (schema `moe-inspect/golden/v1`): the snapshot,
//! its identity, tolerances, per-layer records, and what a snapshot records.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::analysis::results::PerMatrix;
use crate::analysis::AnalysisKind;
use crate::error::{Error, Result};

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
    pub(crate) fn encode(ids: &[i16], shape: [usize; 3]) -> TopKIds {
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

    pub(crate) fn names(self) -> Vec<String> {
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

    pub(crate) fn any_static(self) -> bool {
        self.expert_similarity || self.neuron_similarity || self.gate_embedding
    }

    pub(crate) fn any_dynamic(self) -> bool {
        self.routing || self.norm_score
    }

    /// Whether a forward pass over prompts is needed.
    pub fn needs_prompts(self) -> bool {
        self.any_dynamic()
    }
}
