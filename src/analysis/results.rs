//! What the analyses produce, which is also the JSON report, schema
//! `moe-inspect/report/v1` (SPEC §6): plain serde structs, the contract with
//! CI scripts and other tools. [`crate::report`] renders them.

use serde::{Deserialize, Serialize};

/// Schema identifier written into every report.
pub const REPORT_SCHEMA: &str = "moe-inspect/report/v1";

/// A whole analysis report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub model: ModelSummary,
    pub analyses: Analyses,
    /// Per-token maps of the first prompt for the Markdown figures (not in the JSON).
    #[serde(skip)]
    pub maps: crate::analysis::dynamic::TokenMaps,
    /// Decoded tokens of `maps.token_ids` (axis labels), when a tokenizer is known.
    #[serde(skip)]
    pub token_labels: Vec<String>,
}

/// What was analysed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub family: String,
    pub path: String,
    pub num_layers: usize,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub dtype: String,
}

/// Results by analysis name; absent analyses are omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Analyses {
    #[serde(
        rename = "expert-similarity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub expert_similarity: Option<MatrixSimilarity>,
    #[serde(
        rename = "neuron-similarity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub neuron_similarity: Option<MatrixSimilarity>,
    #[serde(
        rename = "neuron-reorder",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub neuron_reorder: Option<NeuronReorder>,
    #[serde(
        rename = "gate-embedding",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub gate_embedding: Option<GateEmbedding>,
    #[serde(
        rename = "projection",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub projection: Option<Projection>,
    #[serde(
        rename = "output-similarity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub output_similarity: Option<OutputSimilarity>,
    #[serde(
        rename = "norm-score",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub norm_score: Option<NormScore>,
    #[serde(
        rename = "intermediate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub intermediate: Option<Intermediate>,
    #[serde(
        rename = "chosen-experts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub chosen_experts: Option<ChosenExperts>,
}

/// `output-similarity`: mean angular similarity of all experts' outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSimilarity {
    pub layers: Vec<OutputSimilarityLayer>,
    /// Tokens averaged over.
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSimilarityLayer {
    pub layer: usize,
    /// Experts in checkpoint order, then `SE` (shared expert) and `F` (dense reference) if present.
    pub labels: Vec<String>,
    /// Mean over tokens of `1 - acos(cos)/π`.
    pub mean_angular: Vec<Vec<f64>>,
}

/// `norm-score`: do experts with larger outputs get larger gate scores?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormScore {
    pub layers: Vec<NormScoreLayer>,
    /// `counts` summed over layers.
    pub total: Vec<Vec<u64>>,
    /// Share of (token, layer) pairs whose highest-score expert has the highest output norm.
    pub top1_match_rate: f64,
    /// Mean Spearman correlation between gate scores and output norms.
    pub spearman_mean: f64,
    /// Chance level of `top1_match_rate` (1/E).
    pub chance: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormScoreLayer {
    pub layer: usize,
    /// `counts[score_rank][norm_rank]`.
    pub counts: Vec<Vec<u64>>,
    pub top1_match_rate: f64,
}

/// `intermediate`: the experts' intermediate activations `act(gate·x)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intermediate {
    /// The threshold as a fraction of each layer's largest |a|.
    pub threshold_fraction: f64,
    pub layers: Vec<IntermediateLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntermediateLayer {
    pub layer: usize,
    pub threshold: f64,
    pub experts: Vec<IntermediateExpert>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntermediateExpert {
    pub mean_abs: f64,
    pub share_above: f64,
    /// Neuron indices with the largest mean |a|, decreasing.
    pub top_neurons: Vec<usize>,
}

/// `chosen-experts`: routing statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChosenExperts {
    pub layers: Vec<ChosenExpertsLayer>,
    pub tokens: usize,
    /// min / p50 / p90 / max over layers of each per-layer statistic.
    pub summary: ChosenSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChosenExpertsLayer {
    pub layer: usize,
    pub load: Vec<u64>,
    pub balancedness: f64,
    pub cv: f64,
    pub dead_share: f64,
    pub entropy_ratio: f64,
    pub coactivation: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChosenSummary {
    pub balancedness: Quantiles,
    pub cv: Quantiles,
    pub dead_share: Quantiles,
    pub entropy_ratio: Quantiles,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

/// A value per expert matrix (`up`, `gate`, `down`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerMatrix<T> {
    pub up: T,
    pub gate: T,
    pub down: T,
}

impl<T> PerMatrix<T> {
    /// Builds one value per matrix, in the order up, gate, down.
    pub fn from_fn(mut f: impl FnMut(crate::model::Matrix) -> T) -> PerMatrix<T> {
        use crate::model::Matrix;
        let up = f(Matrix::Up);
        let gate = f(Matrix::Gate);
        let down = f(Matrix::Down);
        PerMatrix { up, gate, down }
    }

    /// The value for `m`.
    pub fn get(&self, m: crate::model::Matrix) -> &T {
        match m {
            crate::model::Matrix::Up => &self.up,
            crate::model::Matrix::Gate => &self.gate,
            crate::model::Matrix::Down => &self.down,
        }
    }
}

/// `neuron-reorder`: per selected layer and matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronReorder {
    pub layers: Vec<NeuronReorderLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronReorderLayer {
    pub layer: usize,
    #[serde(flatten)]
    pub matrices: PerMatrix<ReorderMatrices>,
}

/// E×E results of aligning expert j's neurons to expert i's (row i, column j).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReorderMatrices {
    /// Cosine of the flattened matrices after the optimal neuron permutation.
    pub similarity: Vec<Vec<f64>>,
    /// Kendall's tau between the optimal permutation and the identity.
    pub kendall_tau: Vec<Vec<f64>>,
    /// The assignment optimum: the summed neuron-to-neuron cosine.
    pub optimum: Vec<Vec<f64>>,
}

/// `gate-embedding`: router-row similarity and its correlation with neuron similarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateEmbedding {
    pub layers: Vec<GateEmbeddingLayer>,
    /// Mean r² over the analysed MoE layers (the paper's Table 3).
    pub r2_avg: PerMatrix<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateEmbeddingLayer {
    pub layer: usize,
    /// E×E cosine similarity of the router rows.
    pub similarity: Vec<Vec<f64>>,
    /// Pearson r with each matrix's neuron similarity (`null` if undefined, e.g. E < 3).
    pub r: PerMatrix<Option<f64>>,
    pub r2: PerMatrix<Option<f64>>,
}

/// `projection`: 2-D PCA of experts and of all experts' neurons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub layers: Vec<ProjectionLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionLayer {
    pub layer: usize,
    #[serde(flatten)]
    pub matrices: PerMatrix<ProjectionMatrix>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionMatrix {
    /// Explained-variance ratios of the two components (experts PCA).
    pub explained_variance: Vec<f64>,
    /// One 2-D point per expert.
    pub points: Vec<[f64; 2]>,
    /// PCA of all experts' neurons (each a hidden-size vector).
    pub neurons: PcaResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PcaResult {
    pub explained_variance: Vec<f64>,
    /// One 2-D point per neuron, expert by expert (expert `k` owns rows `k·I..(k+1)·I`).
    pub points: Vec<[f64; 2]>,
    /// How the components were computed: `gram`, `covariance` or `randomized`.
    pub method: String,
}

/// Per-layer E×E (or (E+1)×(E+1) with `F`) similarity matrices for up, gate, down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixSimilarity {
    pub layers: Vec<LayerMatrices>,
}

/// One layer's matrices; rows/columns follow `labels` (experts in checkpoint order, then `F`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMatrices {
    pub layer: usize,
    pub labels: Vec<String>,
    pub up: Vec<Vec<f64>>,
    pub gate: Vec<Vec<f64>>,
    pub down: Vec<Vec<f64>>,
}

impl LayerMatrices {
    /// The matrix for `m`.
    pub fn get(&self, m: crate::model::Matrix) -> &Vec<Vec<f64>> {
        match m {
            crate::model::Matrix::Up => &self.up,
            crate::model::Matrix::Gate => &self.gate,
            crate::model::Matrix::Down => &self.down,
        }
    }
}
