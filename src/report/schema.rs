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
