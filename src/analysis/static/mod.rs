//! Static analyses: weights only (paper §3).

pub mod expert_similarity;

pub use expert_similarity::expert_similarity;
