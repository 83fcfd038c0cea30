//! `moe-inspect`: the analyses of Lo et al., *A Closer Look into
//! Mixture-of-Experts in Large Language Models* (2024), on real MoE
//! checkpoints, as a library. The `cargo-moe-inspect` binary is a thin CLI
//! over it.
//!
//! - [`model`]: config.json, family adapters, safetensors through mmap;
//! - [`forward`]: the forward pass, with an observer for the analyses;
//! - [`analysis`]: the analyses, one file each, and their results
//!   ([`analysis::results`]: the JSON report, schema `moe-inspect/report/v1`);
//! - [`golden`]: golden snapshots, drift metrics, configuration from Cargo.toml;
//! - [`report`]: formatting only: tables, JSON, Markdown + SVG, drift tables
//!   and benchmark reports.
//!
//! Each of these imports only those listed before it (`tests/module_graph.rs`
//! checks it); [`bench`](mod@bench) and the small utility modules sit beside them,
//! among them [`trace`] (routing dumps, and reading them back) and
//! [`import`](mod@import) (vLLM, SGLang, Megatron-LM and TensorRT-LLM routing
//! records converted into traces; it uses only `model`, `trace` and `error`).

// Every unsafe operation sits in its own `unsafe` block with a `// SAFETY:`
// line, also inside `unsafe fn`s (clippy enforces the comment).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

/// Declares a module that is public with the `internals` feature (this
/// crate's benchmarks, examples, tests and fuzz targets) and crate-private
/// otherwise: numeric kernels and test writers are not part of the API.
macro_rules! internal_mod {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        #[cfg(feature = "internals")]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) mod $name;
    };
}

pub mod analysis;
pub mod atomic_write;
pub mod bench;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod forward;
pub mod golden;
pub mod import;
pub mod input;
pub mod layers;
pub mod memory;
pub mod model;
pub mod report;
mod rng;
pub mod trace;

#[cfg(test)]
mod test_support;

pub use error::{Error, Result, ValueKind};
