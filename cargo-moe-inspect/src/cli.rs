//! Raw command-line arguments (clap). Validation into library objects happens
//! in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Inspect Mixture-of-Experts checkpoints: the analyses of Lo et al. (2024),
/// drift checks against golden snapshots, and benchmarks.
#[derive(Debug, Parser)]
#[command(
    name = "cargo moe-inspect",
    bin_name = "cargo moe-inspect",
    version,
    about
)]
#[command(arg_required_else_help = true)]
pub struct Cli {
    /// When to colour output (honours NO_COLOR and CARGO_TERM_COLOR).
    #[arg(
        long,
        value_enum,
        global = true,
        env = "CARGO_TERM_COLOR",
        hide_env_values = true,
        default_value = "auto"
    )]
    pub color: ColorChoice,

    /// Print no progress bars or notices on stderr (errors still print).
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        display_order = 900
    )]
    pub quiet: bool,

    /// Print more detail on stderr: the files read and written, and the
    /// time each phase took.
    #[arg(short, long, global = true, display_order = 901)]
    pub verbose: bool,

    /// Memory this run may plan with (bytes, or 512M, 8G, ...; binary
    /// units): caps the available memory read from the system, and a run
    /// whose working set would not fit stops with an error. bench --model
    /// keeps the weights resident when they fit in 3/4 of it, else streams
    /// them layer by layer; the single forward pass of trace, check, diff
    /// and the dynamic analyses always streams them (each layer is read
    /// once). Overrides MOE_INSPECT_MAX_MEMORY.
    #[arg(
        long,
        global = true,
        value_name = "BYTES",
        value_parser = parse_max_memory,
        display_order = 902
    )]
    pub max_memory: Option<u64>,

    #[command(subcommand)]
    pub command: Command,
}

fn parse_max_memory(text: &str) -> Result<u64, String> {
    match moe_inspect::memory::parse_size(text) {
        Some(0) | None => Err(format!(
            "`{text}` is not a memory size (expected bytes or e.g. 512M, 8G)"
        )),
        Some(b) => Ok(b),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run analyses on a model: print tables, or write a JSON/Markdown report.
    Analyze(AnalyzeArgs),
    /// List the supported model families and what each supports.
    Models(ModelsArgs),
    /// Write the golden snapshot of a model's expert behaviour.
    Snapshot(SnapshotArgs),
    /// Recompute and compare with the golden snapshot; exit 1 on drift.
    Check(CheckArgs),
    /// List the pending snapshots (`*.json.new`) that `check` wrote.
    Pending(PendingArgs),
    /// Show each pending snapshot (`*.json.new`) and accept or reject it.
    Review(PendingArgs),
    /// Accept pending snapshots: they replace the golden files.
    Accept(PendingArgs),
    /// Reject pending snapshots: delete them.
    Reject(PendingArgs),
    /// Compare two checkpoints of the same family and shape.
    Diff(DiffArgs),
    /// Dump router logits and top-k routing per token to a safetensors file.
    Trace(TraceArgs),
    /// Convert an engine's routing record (vLLM, SGLang, Megatron-LM, TensorRT-LLM) into a trace file.
    Import(ImportArgs),
    /// Benchmark routing, one MoE layer and the full forward pass; report; compare with a baseline.
    Bench(BenchArgs),
    /// Print a shell completion script (e.g. `cargo moe-inspect completions bash > ~/.local/share/bash-completion/completions/cargo-moe-inspect`).
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. `cargo moe-inspect man > cargo-moe-inspect.1`.
    Man,
    /// Append a commented `[workspace.metadata.moe-inspect]` (or package) block to Cargo.toml.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The Cargo.toml to add the block to (default: the one in the current directory).
    #[arg(long, value_name = "PATH", default_value = "Cargo.toml")]
    pub manifest_path: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Where golden snapshots live and which configuration applies.
#[derive(Debug, Args)]
pub struct GoldenDirArgs {
    /// Directory of golden snapshots (default: `golden-dir` from the
    /// configuration, else `golden`).
    #[arg(long, value_name = "DIR")]
    pub golden_dir: Option<PathBuf>,

    /// Snapshot name: the file is `<golden-dir>/<name>.json` (default: the
    /// model directory's name, `demo` for the demo model, or every model of
    /// the configuration).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Cargo.toml whose `[package.metadata.moe-inspect]` or
    /// `[workspace.metadata.moe-inspect]` configures models, prompts,
    /// analyses, golden directory and tolerances (default: the current package).
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompts: PromptArgs,

    #[command(flatten)]
    pub golden: GoldenDirArgs,

    /// Analyses: `static`, `dynamic`, `all` or names (expert-similarity,
    /// neuron-similarity, gate-embedding, chosen-experts, norm-score).
    /// snapshot records them (default `all`); check compares them (default:
    /// what the golden file recorded).
    #[arg(long, value_name = "LIST")]
    pub analyses: Option<String>,

    /// Override a tolerance, e.g. `similarity=1e-4` (repeatable; keys:
    /// similarity, routing-top1-agreement, routing-topk-agreement, router-jsd,
    /// load-shift, gate-r2, norm-score-top1).
    #[arg(long, value_name = "KEY=VALUE")]
    pub tolerance: Vec<String>,

    /// Record / compare the routing (chosen-experts) of a trace file (`trace`
    /// or `import` output) instead of running the model; needs --model DIR,
    /// of which only config.json is read.
    #[arg(long, value_name = "FILE", requires = "model", conflicts_with_all = ["prompts", "token_ids"])]
    pub trace: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    Table,
    Json,
    Junit,
}

/// Output format of `diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    Table,
    Json,
    Junit,
    Markdown,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub snapshot: SnapshotArgs,

    /// Output format of the drift report (GitHub annotations and the step
    /// summary are added under GitHub Actions whatever the format).
    #[arg(long, value_enum, default_value = "table")]
    pub format: CheckFormat,

    /// Show every check in the table, not only those beyond tolerance
    /// (table only; json and junit always hold every check).
    #[arg(long)]
    pub all: bool,

    /// Accept what this run computes: drifted golden files are replaced and
    /// missing ones recorded, exit 0 (also on CI, where nothing is written
    /// otherwise). Without it, `MOE_INSPECT_UPDATE=always|new|no` decides
    /// (default `new`: a pending `<name>.json.new`; `no` on CI).
    #[arg(long)]
    pub accept: bool,

    /// Also write the JUnit XML report to FILE (whatever --format is).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PendingArgs {
    /// Directory of golden snapshots (default: `golden-dir` from the
    /// configuration, else `golden`).
    #[arg(long, value_name = "DIR")]
    pub golden_dir: Option<PathBuf>,

    /// Only the pending snapshot of this name (`<golden-dir>/<name>.json.new`);
    /// default: every pending snapshot in the golden directory.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Cargo.toml whose `[package.metadata.moe-inspect]` or
    /// `[workspace.metadata.moe-inspect]` names the golden directory
    /// (default: the current package).
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
}

impl PendingArgs {
    /// The same settings as the golden-directory arguments of `check`.
    pub fn golden(&self) -> GoldenDirArgs {
        GoldenDirArgs {
            golden_dir: self.golden_dir.clone(),
            name: self.name.clone(),
            manifest_path: self.manifest_path.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The reference checkpoint (e.g. the base or bf16 model).
    #[arg(long, value_name = "DIR", required_unless_present = "trace")]
    pub baseline: Option<PathBuf>,

    /// The checkpoint compared with it (fine-tune, quantized, converted).
    #[arg(long, value_name = "DIR", required_unless_present = "trace")]
    pub candidate: Option<PathBuf>,

    /// Compare two routing traces instead (`--trace BASE --trace CANDIDATE`:
    /// the `trace` format, or engine records converted by `import`), with
    /// `--model DIR` for the traced model's config.json; no weights are read.
    #[arg(
        long,
        value_name = "FILE",
        num_args = 1,
        conflicts_with_all = ["baseline", "candidate"],
        requires = "model"
    )]
    pub trace: Vec<PathBuf>,

    /// With `--trace`: the model directory whose config.json describes the traces.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    #[command(flatten)]
    pub prompts: PromptArgs,

    /// What to compare (as for `snapshot`; default: all).
    #[arg(long, value_name = "LIST")]
    pub analyses: Option<String>,

    /// Override a tolerance, e.g. `routing-top1-agreement=0.9` (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub tolerance: Vec<String>,

    /// Cargo.toml with the tolerances to use (default: the current package).
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,

    /// Device for the forward passes.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Output format: table, json (schema `moe-inspect/diff/v1`), junit
    /// (one test case per metric) or markdown (`report.md` with SVG figures
    /// in `--out DIR`, default `moe-inspect-diff`).
    #[arg(long, value_enum, default_value = "table")]
    pub format: DiffFormat,

    /// With `--format markdown`: the directory of `report.md` and its figures.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Calibration coverage: flag experts that received fewer than N tokens
    /// on the prompts in either model (default 1: experts that received none).
    #[arg(long, value_name = "N", default_value_t = moe_inspect::golden::quant_report::DEFAULT_COVERAGE_THRESHOLD)]
    pub coverage_threshold: u64,

    /// Show every metric in the table, not only those beyond tolerance
    /// (table only; json and junit always hold every metric).
    #[arg(long)]
    pub all: bool,
}

/// Where prompts come from (the demo model has a built-in set).
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// Prompts: text, one per line, or JSON Lines with a "text" field
    /// (tokenized with the model's tokenizer.json).
    #[arg(long, value_name = "FILE", conflicts_with = "token_ids")]
    pub prompts: Option<PathBuf>,

    /// Token ids: one prompt per line, ids separated by whitespace.
    #[arg(long, value_name = "FILE")]
    pub token_ids: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub prompts: PromptArgs,

    /// Output safetensors file.
    #[arg(short, long, value_name = "FILE", required_unless_present = "out")]
    pub output: Option<PathBuf>,

    /// Renamed to `--output FILE` (`--out` names a directory elsewhere).
    #[arg(long, value_name = "FILE", hide = true)]
    pub out: Option<PathBuf>,

    /// Also store the final logits `[tokens, vocab]`.
    #[arg(long)]
    pub logits: bool,
}

/// Which model to open.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// HF model directory (config.json + model.safetensors, or a sharded index).
    #[arg(long, value_name = "DIR", conflicts_with = "demo")]
    pub model: Option<PathBuf>,

    /// Use the embedded demo model (the default when no --model is given).
    #[arg(long)]
    pub demo: bool,

    /// Device for computations: cpu, or cuda / cuda:N in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Markdown,
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Analyses to run: `static`, `dynamic`, `all`, or names separated by
    /// commas (static: expert-similarity, neuron-similarity, neuron-reorder,
    /// gate-embedding, projection; dynamic, from one forward pass over the
    /// prompts: output-similarity, norm-score, intermediate, chosen-experts).
    /// neuron-reorder runs on --layers, by default on the middle MoE layer.
    #[arg(long, default_value = "static")]
    pub analyses: String,

    /// Layers to analyse, e.g. `0,5,31` or `0..8` (default: every MoE layer).
    #[arg(long, value_name = "SPEC")]
    pub layers: Option<String>,

    #[command(flatten)]
    pub prompts: PromptArgs,

    /// intermediate: count activations above this fraction of the layer's largest |a|.
    #[arg(long, default_value_t = 0.1, value_name = "FRACTION", value_parser = fraction)]
    pub threshold: f64,

    /// A dense model of the same shape (e.g. Mistral-7B for Mixtral): its FFN
    /// is added to the similarity matrices as row/column `F`.
    #[arg(long, value_name = "DIR")]
    pub dense_reference: Option<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,

    /// Markdown: one colour scale for all heatmaps of an analysis (across
    /// layers); refused with the other formats.
    #[arg(long)]
    pub shared_scale: bool,

    /// Table: print every expert × expert similarity matrix in full. By
    /// default, beyond 12 experts, 4 layers or the terminal width
    /// (`COLUMNS`), each layer is summarised: mean off-diagonal similarity
    /// and the 3 most and least similar expert pairs. Refused with the other
    /// formats (they always hold the full matrices).
    #[arg(long)]
    pub full: bool,

    /// Directory for report files: report.json (json) or report.md and SVG
    /// figures (markdown, default `moe-inspect-report/`). The table format
    /// writes no files and refuses it.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Run the routing analyses (chosen-experts) on a trace file (`trace` or
    /// `import` output) instead of running the model; --model, when given,
    /// only supplies config.json and is checked against the trace.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompts", "token_ids", "dense_reference"])]
    pub trace: Option<PathBuf>,
}

/// `import`: an engine's routing record → a trace file.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The engine that wrote the record.
    #[arg(long = "from", value_enum, value_name = "ENGINE")]
    pub from: EngineChoice,

    /// The record: files, or a folder with one run's per-rank files.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,

    /// The served model's folder (only config.json is read): layers, experts
    /// and top-k are checked against it.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,

    /// Output trace file (safetensors).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// The engines `import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// vLLM `--enable-return-routed-experts` responses (JSON / JSONL).
    Vllm,
    /// SGLang expert distribution recorder dumps (`.pt`).
    Sglang,
    /// Megatron-LM `--moe-routing-trace-path` JSONL (+ logits sidecar).
    Megatron,
    /// TensorRT-LLM expert statistics (`meta_info.json` + `rank*.safetensors`): counts only.
    Trtllm,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ListFormat,
}

/// Formats of `models`: a table on the terminal or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmark this HF checkpoint instead of the synthetic geometries
    /// (routing and MoE layer on its first MoE layer; forward resident when it fits,
    /// else streamed: see --max-memory).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Device: cpu, or cuda / cuda:N in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Token counts, separated by commas (prefill lengths, routed tokens).
    #[arg(long, default_value = "1,16,256", value_name = "LIST")]
    pub tokens: String,

    /// Run only benchmarks whose name contains one of these substrings
    /// (separated by commas), e.g. `routing`, `moe-layer/topk`, `n256`.
    #[arg(long, value_name = "LIST")]
    pub filter: Option<String>,

    /// On-disk dtype of the synthetic checkpoints (compute is f32).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: BenchDtype,

    /// Arithmetic of the forward's CPU products on bf16 weights: exact (f32
    /// activations) or bf16 (activations rounded to bf16, vdpbf16ps, as llama.cpp)
    #[arg(long, value_enum, default_value = "exact")]
    pub compute: BenchCompute,

    /// Add Mixtral-8x7B's full-size layer (4096 × 14336, 8 experts: 5.6 GB in f32).
    #[arg(long)]
    pub full_size: bool,

    /// Measurement time per benchmark, in seconds (at least 5 samples are taken).
    #[arg(long, default_value_t = 1.5, value_name = "SECS", value_parser = seconds)]
    pub time: f64,

    /// Samples per benchmark (as criterion's --sample-size): exactly N,
    /// however long they take; default: as many as --time allows, 5 to 30.
    #[arg(long, value_name = "N", value_parser = sample_size)]
    pub sample_size: Option<usize>,

    /// Warm-up time per benchmark before sampling, in seconds (as
    /// criterion's --warm-up-time); default: one call.
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub warm_up: Option<f64>,

    /// Directory for report.md, bench.json and the SVG figures.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Save the results as baseline NAME (in --baseline-dir).
    #[arg(long, value_name = "NAME")]
    pub save_baseline: Option<String>,

    /// Measure nothing: take the results saved as baseline NAME (or a
    /// bench.json path) as this run's, e.g. to compare two saved runs with
    /// --compare-baseline (as criterion's --load-baseline).
    #[arg(long, value_name = "NAME", conflicts_with = "save_baseline")]
    pub load_baseline: Option<String>,

    /// Compare with baseline NAME (or a bench.json path); exit 1 on a
    /// regression (criterion's --baseline; in this tool `--baseline` is
    /// `diff`'s reference checkpoint).
    #[arg(long, value_name = "NAME")]
    pub compare_baseline: Option<String>,

    /// Renamed to `--compare-baseline NAME`.
    #[arg(long, value_name = "NAME", hide = true)]
    pub baseline: Option<String>,

    /// Where baselines are kept (default: `baselines/` in the benchmark data
    /// directory: `$MOE_INSPECT_BENCH_DIR`, else `moe-inspect-bench/` in the
    /// workspace's target directory, else the user cache directory).
    #[arg(long, value_name = "DIR")]
    pub baseline_dir: Option<PathBuf>,

    /// Noise threshold in percent: a regression needs the whole 95% interval
    /// of the change above it.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT", value_parser = percent)]
    pub threshold: f64,

    /// Peer timings shown side by side: a bench.json-shaped FILE (from
    /// `benches/compare_torch.py --out FILE`), `torch` to run that script
    /// (built into this binary) now with `$MOE_INSPECT_PYTHON` or `python3`
    /// (skipped with a note when Python or PyTorch is missing), or
    /// `llama.cpp` to run llama.cpp's `llama-bench` on `--gguf` (the same
    /// weights as GGUF) with the same threads and token counts.
    #[arg(long, value_name = "FILE|torch|llama.cpp")]
    pub peer: Option<String>,

    /// `--peer llama.cpp`: the GGUF file of the benchmarked weights (e.g.
    /// from llama.cpp's `convert_hf_to_gguf.py --outtype bf16`; see
    /// `benches/make_gguf.py`).
    #[arg(long, value_name = "FILE")]
    pub gguf: Option<PathBuf>,

    /// `--peer llama.cpp`: the `llama-bench` executable (default: found on PATH).
    #[arg(long, value_name = "PATH")]
    pub llama_bench: Option<PathBuf>,

    /// List the benchmarks these options select, and run nothing.
    #[arg(long)]
    pub list: bool,

    /// Tiny probes and few samples (for tests).
    #[arg(long, hide = true)]
    pub quick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchCompute {
    Exact,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    Bf16,
    F16,
    F32,
}

fn finite(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("`{v}` is not a finite number")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// A share in [0, 1] (`--threshold` of `analyze`).
fn fraction(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a fraction between 0 and 1"))
    }
}

/// A noise threshold in percent: finite, ≥ 0, below 1000.
fn percent(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if (0.0..1000.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a percentage between 0 and 1000"))
    }
}

/// A sample count: an integer from 2 (an interval needs two) to 100000.
fn sample_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (2..=100_000).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} samples: expected 2 to 100000")),
        Err(_) => Err(format!("`{s}` is not a whole number of samples")),
    }
}

/// A measurement time: finite, > 0, at most a day.
fn seconds(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v > 0.0 && v <= 86_400.0 {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not a duration in seconds (0 < SECS ≤ 86400)"
        ))
    }
}
