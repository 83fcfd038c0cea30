//! Static analyses: weights only (paper §3).

pub mod expert_similarity;
pub mod gate_embedding;
pub mod neuron_reorder;
pub mod neuron_similarity;
pub mod projection;
