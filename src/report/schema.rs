//! The JSON report, schema `moe-inspect/report/v1` (SPEC §6): plain serde
//! structs, the contract with CI scripts and other tools.

use serde::{Deserialize, Serialize};

/// Schema identifier written into every report.
pub const REPORT_SCHEMA: &str = "moe-inspect/report/v1";

/// A whole analysis report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub model: ModelSummary,
    pub analyses: Analyses,
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
