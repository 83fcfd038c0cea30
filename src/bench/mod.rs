//! Benchmark support shared by `benches/` and the CLI: synthetic checkpoints
//! with the geometry of real models, written without downloads.

pub mod synthetic;
