//! `bench.json`, schema `moe-inspect/bench/v1`: the results of one
//! `cargo moe-inspect bench` run, also the format of saved baselines and of
//! peer timings (`benches/compare_torch.py --out torch.json`).
//!
//! ```json
//! {
//!   "schema": "moe-inspect/bench/v1",
//!   "tool": "moe-inspect 0.1.0",            // or "torch 2.x / transformers 5.x"
//!   "created_unix": 1764340000,
//!   "device": "cpu",
//!   "machine": {"threads": 2, "arch": "x86_64", "os": "linux",
//!               "peak_gflops": 95.0, "peak_gbs": 11.0,   // measured by the probes
//!               "probe_matmul_n": 2048, "probe_stream_bytes": 268435456},
//!   "benchmarks": [{
//!     "name": "cpu/moe-layer/topk/olmoe-1b-7b/n256",
//!     "group": "moe-layer", "variant": "topk", "model": "olmoe-1b-7b", "tokens": 256,
//!     "samples_s": [0.41, 0.40], "iters_per_sample": 1,
//!     "mean_s": 0.405, "ci_low_s": 0.39, "ci_high_s": 0.42,
//!     "tokens_per_s": 632.1,
//!     "flops": 2.6e10, "bytes": 8.1e8,          // work per iteration (counted, not measured)
//!     "gflops": 64.2, "gbs": 2.0,               // flops / mean_s, bytes / mean_s
//!     "flops_share": 0.67, "bw_share": 0.18,    // of machine.peak_* (absent without probes)
//!     "rel_error": 3.1e-7                       // moe-layer: output vs the naive loop's (absent if unchecked)
//!   }],
//!   "baseline": {"name": "main", "threshold": 0.05, "verdicts": [{
//!     "name": "...", "status": "regressed|improved|unchanged|new",
//!     "baseline_mean_s": 0.3, "mean_s": 0.4, "change": 0.33, "change_low": 0.30, "change_high": 0.36}]}
//! }
//! ```
//!
//! Times are seconds per iteration (one call of the benchmarked operation on
//! `tokens` tokens). `change` is `mean_s / baseline_mean_s - 1`, with its 95%
//! bootstrap interval. Fields may be added within v1; none are removed or
//! change meaning.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The schema tag of `bench.json`.
pub const SCHEMA: &str = "moe-inspect/bench/v1";

/// One benchmark run (or baseline, or peer timings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchFile {
    /// Schema tag, [`SCHEMA`].
    pub schema: String,
    /// Tool name and version that wrote the file.
    pub tool: String,
    #[serde(default)]
    /// When the run started (seconds since the Unix epoch).
    pub created_unix: u64,
    /// The device benchmarked (`cpu`, `cuda:0`...).
    pub device: String,
    #[serde(default)]
    /// The machine and its measured peaks.
    pub machine: Machine,
    /// One result per benchmark.
    pub benchmarks: Vec<BenchResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The comparison with a baseline, when one was given.
    pub baseline: Option<BaselineComparison>,
}

/// The machine and its measured peaks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    #[serde(default)]
    /// Worker threads used.
    pub threads: usize,
    #[serde(default)]
    /// CPU architecture (`x86_64`, `aarch64`...).
    pub arch: String,
    #[serde(default)]
    /// Operating system.
    pub os: String,
    /// f32 matmul probe (GFLOP/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gflops: Option<f64>,
    /// Memory-stream probe (GB/s, 1e9 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gbs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Matrix size of the matmul probe.
    pub probe_matmul_n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Buffer size of the memory-stream probe, in bytes.
    pub probe_stream_bytes: Option<usize>,
}

/// One benchmark's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchResult {
    /// Full benchmark name (`group/variant`).
    pub name: String,
    /// Benchmark group (what is measured).
    pub group: String,
    /// Variant within the group (how it is computed).
    pub variant: String,
    /// Model label the benchmark ran on.
    pub model: String,
    /// Tokens processed per iteration.
    pub tokens: usize,
    /// Seconds per iteration, one value per sample.
    pub samples_s: Vec<f64>,
    #[serde(default = "one")]
    /// Iterations timed together in each sample.
    pub iters_per_sample: usize,
    /// Mean seconds per iteration.
    pub mean_s: f64,
    /// Lower bound of the 95% confidence interval of the mean, in seconds.
    pub ci_low_s: f64,
    /// Upper bound of the 95% confidence interval of the mean, in seconds.
    pub ci_high_s: f64,
    /// Throughput: tokens per second at the mean.
    pub tokens_per_s: f64,
    #[serde(default)]
    /// Floating-point operations per iteration.
    pub flops: f64,
    #[serde(default)]
    /// Bytes moved per iteration.
    pub bytes: f64,
    #[serde(default)]
    /// Achieved GFLOP/s.
    pub gflops: f64,
    #[serde(default)]
    /// Achieved GB/s.
    pub gbs: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Achieved share of the machine's peak GFLOP/s, when probed.
    pub flops_share: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Achieved share of the machine's peak GB/s, when probed.
    pub bw_share: Option<f64>,
    /// MoE-layer variants: `‖y − y_naive‖ / ‖y_naive‖` of this variant's
    /// output against the naive loop's on the same input, checked before timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_error: Option<f64>,
    /// Whole-model forward benchmarks: how the weights were held
    /// (`resident` or `streamed`, the forward pass's decision from the
    /// model's size and the available memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Whole-model forward benchmarks: the arithmetic of the CPU products
    /// on bf16 weights (`exact` or `bf16`, `bench --compute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<String>,
}

fn one() -> usize {
    1
}

/// The verdicts against a baseline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaselineComparison {
    /// The baseline's name (file or label).
    pub name: String,
    /// Relative slowdown that counts as a regression.
    pub threshold: f64,
    /// One verdict per benchmark present in both runs.
    pub verdicts: Vec<crate::bench::verdict::Verdict>,
}

impl BenchFile {
    /// Reads and validates a `bench.json`-shaped file (a result, baseline or peer).
    pub fn read(path: &std::path::Path) -> Result<BenchFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file: BenchFile = serde_json::from_str(&text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            reason: format!("not a {SCHEMA} file: {e}"),
        })?;
        if file.schema != SCHEMA {
            return Err(Error::Input {
                path: path.to_path_buf(),
                reason: format!("schema is `{}`, expected `{SCHEMA}`", file.schema),
            });
        }
        Ok(file)
    }

    /// Writes the file as pretty JSON, atomically ([`crate::atomic_write`]):
    /// a full disk or a killed run leaves the previous baseline intact.
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::atomic_write::write_atomic(path, (text + "\n").as_bytes())
    }

    /// The benchmark of that name.
    pub fn get(&self, name: &str) -> Option<&BenchResult> {
        self.benchmarks.iter().find(|b| b.name == name)
    }
}
