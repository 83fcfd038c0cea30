//! What the analyses produce, which is also the JSON report, schema
//! `moe-inspect/report/v1` (SPEC §6): plain serde structs, the contract with
//! CI scripts and other tools. [`crate::report`] renders them.

use serde::{Deserialize, Serialize};

/// Schema identifier written into every report.
pub const REPORT_SCHEMA: &str = "moe-inspect/report/v1";

/// A whole analysis report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Schema identifier, `moe-inspect/report/v1`.
    pub schema: String,
    /// The model the report describes.
    pub model: ModelSummary,
    /// The results, one optional section per analysis.
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
    /// Model family id (e.g. `mixtral`).
    pub family: String,
    /// Model directory, or `<demo>` for the embedded demo model.
    pub path: String,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Indices of the MoE layers.
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Hidden size of the model.
    pub hidden_size: usize,
    /// Intermediate size of one routed expert.
    pub intermediate_size: usize,
    /// Weight dtype of the checkpoint (e.g. `bf16`).
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
    /// `expert-similarity`, if run.
    pub expert_similarity: Option<MatrixSimilarity>,
    #[serde(
        rename = "neuron-similarity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `neuron-similarity`, if run.
    pub neuron_similarity: Option<MatrixSimilarity>,
    #[serde(
        rename = "neuron-reorder",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `neuron-reorder`, if run.
    pub neuron_reorder: Option<NeuronReorder>,
    #[serde(
        rename = "gate-embedding",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `gate-embedding`, if run.
    pub gate_embedding: Option<GateEmbedding>,
    #[serde(
        rename = "projection",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `projection`, if run.
    pub projection: Option<Projection>,
    #[serde(
        rename = "output-similarity",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `output-similarity`, if run.
    pub output_similarity: Option<OutputSimilarity>,
    #[serde(
        rename = "norm-score",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `norm-score`, if run.
    pub norm_score: Option<NormScore>,
    #[serde(
        rename = "intermediate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `intermediate`, if run.
    pub intermediate: Option<Intermediate>,
    #[serde(
        rename = "chosen-experts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// `chosen-experts`, if run.
    pub chosen_experts: Option<ChosenExperts>,
}

/// `output-similarity`: mean angular similarity of all experts' outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSimilarity {
    /// One entry per analysed MoE layer.
    pub layers: Vec<OutputSimilarityLayer>,
    /// Tokens averaged over.
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// `output-similarity` of one MoE layer.
pub struct OutputSimilarityLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// Experts in checkpoint order, then `SE` (shared expert) and `F` (dense reference) if present.
    pub labels: Vec<String>,
    /// Mean over tokens of `1 - acos(cos)/π`.
    pub mean_angular: Vec<Vec<f64>>,
}

/// `norm-score`: do experts with larger outputs get larger gate scores?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormScore {
    /// One entry per analysed MoE layer.
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
/// `norm-score` of one MoE layer.
pub struct NormScoreLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// `counts[score_rank][norm_rank]`.
    pub counts: Vec<Vec<u64>>,
    /// This layer's share of tokens whose highest-score expert has the highest output norm.
    pub top1_match_rate: f64,
}

/// `intermediate`: the experts' intermediate activations `act(gate·x)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intermediate {
    /// The threshold as a fraction of each layer's largest |a|.
    pub threshold_fraction: f64,
    /// One entry per analysed MoE layer.
    pub layers: Vec<IntermediateLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// `intermediate` of one MoE layer.
pub struct IntermediateLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// The absolute threshold: `threshold_fraction` × the layer's largest |a|.
    pub threshold: f64,
    /// One entry per routed expert, in checkpoint order.
    pub experts: Vec<IntermediateExpert>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// One expert's intermediate-activation statistics.
pub struct IntermediateExpert {
    /// Mean |a| over tokens and neurons.
    pub mean_abs: f64,
    /// Share of (token, neuron) entries with |a| above the layer's threshold.
    pub share_above: f64,
    /// Neuron indices with the largest mean |a|, decreasing.
    pub top_neurons: Vec<usize>,
}

/// `chosen-experts`: routing statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChosenExperts {
    /// One entry per analysed MoE layer.
    pub layers: Vec<ChosenExpertsLayer>,
    /// Tokens routed (all prompts together).
    pub tokens: usize,
    /// min / p50 / p90 / max over layers of each per-layer statistic.
    pub summary: ChosenSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// `chosen-experts` of one MoE layer.
pub struct ChosenExpertsLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// Tokens routed to each expert (top-k selections counted once each).
    pub load: Vec<u64>,
    /// Mean load / max load (1 = perfectly balanced).
    pub balancedness: f64,
    /// Coefficient of variation of the load (std / mean).
    pub cv: f64,
    /// Share of experts that received no token.
    pub dead_share: f64,
    /// exp(entropy of the load distribution) / E (1 = uniform).
    pub entropy_ratio: f64,
    /// `coactivation[i][j]`: tokens that selected both expert i and expert j.
    pub coactivation: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// Quantiles over layers of each per-layer routing statistic.
pub struct ChosenSummary {
    /// Of [`ChosenExpertsLayer::balancedness`].
    pub balancedness: Quantiles,
    /// Of [`ChosenExpertsLayer::cv`].
    pub cv: Quantiles,
    /// Of [`ChosenExpertsLayer::dead_share`].
    pub dead_share: Quantiles,
    /// Of [`ChosenExpertsLayer::entropy_ratio`].
    pub entropy_ratio: Quantiles,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
/// min / median / 90th percentile / max of a statistic over layers.
pub struct Quantiles {
    /// Smallest value.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest value.
    pub max: f64,
}

/// A value per expert matrix (`up`, `gate`, `down`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerMatrix<T> {
    /// The value for the up projection.
    pub up: T,
    /// The value for the gate projection.
    pub gate: T,
    /// The value for the down projection.
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
    /// One entry per analysed MoE layer.
    pub layers: Vec<NeuronReorderLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// `neuron-reorder` of one MoE layer.
pub struct NeuronReorderLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    #[serde(flatten)]
    /// The E×E results per expert matrix.
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
    /// One entry per analysed MoE layer.
    pub layers: Vec<GateEmbeddingLayer>,
    /// Mean r² over the analysed MoE layers (the paper's Table 3).
    pub r2_avg: PerMatrix<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// `gate-embedding` of one MoE layer.
pub struct GateEmbeddingLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// E×E cosine similarity of the router rows.
    pub similarity: Vec<Vec<f64>>,
    /// Pearson r with each matrix's neuron similarity (`null` if undefined, e.g. E < 3).
    pub r: PerMatrix<Option<f64>>,
    /// r² with each matrix's neuron similarity (`null` if undefined).
    pub r2: PerMatrix<Option<f64>>,
}

/// `projection`: 2-D PCA of experts and of all experts' neurons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// One entry per analysed MoE layer.
    pub layers: Vec<ProjectionLayer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// `projection` of one MoE layer.
pub struct ProjectionLayer {
    /// The checkpoint's layer index.
    pub layer: usize,
    #[serde(flatten)]
    /// The projections per expert matrix.
    pub matrices: PerMatrix<ProjectionMatrix>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// The 2-D PCA of one expert matrix: experts as points, and all neurons as points.
pub struct ProjectionMatrix {
    /// Explained-variance ratios of the two components (experts PCA).
    pub explained_variance: Vec<f64>,
    /// One 2-D point per expert.
    pub points: Vec<[f64; 2]>,
    /// PCA of all experts' neurons (each a hidden-size vector).
    pub neurons: PcaResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// A 2-D PCA of a set of vectors.
pub struct PcaResult {
    /// Explained-variance ratios of the two components.
    pub explained_variance: Vec<f64>,
    /// One 2-D point per neuron, expert by expert (expert `k` owns rows `k·I..(k+1)·I`).
    pub points: Vec<[f64; 2]>,
    /// How the components were computed: `gram`, `covariance` or `randomized`.
    pub method: String,
}

/// Per-layer E×E (or (E+1)×(E+1) with `F`) similarity matrices for up, gate, down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixSimilarity {
    /// One entry per analysed MoE layer.
    pub layers: Vec<LayerMatrices>,
}

/// One layer's matrices; rows/columns follow `labels` (experts in checkpoint order, then `F`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMatrices {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// Row/column labels: expert indices, then `F` for the dense reference.
    pub labels: Vec<String>,
    /// Similarity of the up projections.
    pub up: Vec<Vec<f64>>,
    /// Similarity of the gate projections.
    pub gate: Vec<Vec<f64>>,
    /// Similarity of the down projections.
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
