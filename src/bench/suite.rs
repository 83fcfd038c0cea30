//! The benchmark registry and runner behind `cargo moe-inspect bench`.
//! Names start with the device: `cpu/routing/softmax-topk/e256-k8/n2048`,
//! `cpu/moe-layer/{topk,naive,all-experts}/olmoe-1b-7b/n256`,
//! `cuda/moe-layer/fused/...`, `cpu/forward/prefill/mixtral-scaled/n256`,
//! `cpu/forward/decode/mixtral-scaled`. Cases are filtered by name before
//! anything is set up, so a filter on one routing benchmark writes no model.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use crate::bench::harness::{measure, measure_interleaved, Budget, Measurement};
use crate::bench::moe_layer::{self, AllExpertOutputs, LayerGeometry};
use crate::bench::probe::{self, Peaks};
use crate::bench::routing::{self, Router, RoutingCase};
use crate::bench::schema::{BenchFile, BenchResult, Machine, SCHEMA};
use crate::bench::synthetic::{FullModel, Geometry};
use crate::bench::{cached_model, data_dir};
use crate::error::{Error, Result};
use crate::forward::weights::LayerWeights;
use crate::forward::{Compute, Forward, LogitRows};
use crate::model::Model;

/// What to benchmark, and how long.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Device to benchmark on.
    pub device: Device,
    /// Token counts (prefill lengths, routed tokens, layer inputs).
    pub tokens: Vec<usize>,
    /// Substrings; a benchmark runs if its name contains any (all when empty).
    pub filter: Vec<String>,
    /// A real checkpoint instead of the synthetic geometries.
    pub model: Option<PathBuf>,
    /// Add Mixtral-8x7B's full-size layer (4096 × 14336, 5.6 GB in f32).
    pub full_size: bool,
    /// On-disk dtype of the synthetic checkpoints: `F32`, `F16` or `BF16`.
    pub dtype: &'static str,
    /// Time budget per benchmark.
    pub budget: Budget,
    /// Run the peak probes (small ones with `quick_probes`).
    pub probes: bool,
    /// Shorter machine probes (for tests).
    pub quick_probes: bool,
    /// Arithmetic of the forward benchmarks' CPU products on bf16 weights.
    pub compute: Compute,
}

/// Progress of a suite run (the CLI draws a bar; the default draws nothing).
pub trait Progress {
    /// Called once with the number of benchmarks.
    fn start(&self, _total: usize) {}
    /// Called when benchmark `name` starts.
    fn begin(&self, _name: &str) {}
    /// Called when the current benchmark is done.
    fn done(&self) {}
    /// A set-up step worth telling about (writing a synthetic checkpoint).
    fn note(&self, _message: &str) {}
}

impl Progress for () {}

/// `cpu` or `cuda`: the first part of every benchmark name.
pub fn device_prefix(device: &Device) -> &'static str {
    if device.is_cpu() {
        "cpu"
    } else {
        "cuda"
    }
}

/// The Mixtral-geometry-scaled full model of the forward benchmarks (and of
/// `benches/forward.rs` and `benches/compare_torch.py`): 4 layers, 8 experts,
/// top-2, hidden 1024, expert width 3584, 16 heads (8 KV), vocab 32000.
pub fn scaled_mixtral() -> (Geometry, FullModel) {
    (
        Geometry::mixtral_scaled(4),
        FullModel {
            vocab: 32000,
            heads: 16,
            kv_heads: 8,
        },
    )
}

/// The directory of the scaled Mixtral model (written on first use).
pub fn scaled_mixtral_dir(dtype: &'static str) -> Result<PathBuf> {
    let (g, full) = scaled_mixtral();
    let name = if dtype == "BF16" {
        "mixtral-scaled-full".to_string()
    } else {
        format!("mixtral-scaled-full-{}", dtype.to_lowercase())
    };
    cached_model(&name, &Geometry { dtype, ..g }, Some(full))
}

#[derive(Debug, Clone)]
enum Source {
    /// The scaled Mixtral model (synthetic, weights resident).
    Scaled,
    /// A one-layer synthetic model of a real layer shape.
    Layer(LayerGeometry),
    /// A real checkpoint (weights streamed in the forward benchmarks).
    Real(PathBuf),
}

#[derive(Debug, Clone)]
enum Setup {
    Routing(RoutingCase),
    Layer { source: Source, all_experts: bool },
    Forward(Source),
}

/// One planned benchmark.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    variant: &'static str,
    tokens: usize,
}

fn label(source: &Source) -> String {
    match source {
        Source::Scaled => "mixtral-scaled".into(),
        Source::Layer(g) => g.label.into(),
        Source::Real(dir) => dir
            .canonicalize()
            .unwrap_or_else(|_| dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase().replace([' ', '/'], "-"))
            .unwrap_or_else(|| "model".into()),
    }
}

fn setups(opts: &SuiteOptions) -> Vec<Setup> {
    match &opts.model {
        Some(dir) => vec![
            Setup::Layer {
                source: Source::Real(dir.clone()),
                all_experts: true,
            },
            Setup::Forward(Source::Real(dir.clone())),
        ],
        None => {
            let mut v: Vec<Setup> = routing::default_cases()
                .into_iter()
                .map(Setup::Routing)
                .collect();
            v.push(Setup::Layer {
                source: Source::Scaled,
                all_experts: true,
            });
            for g in moe_layer::real_geometries(opts.full_size, opts.dtype) {
                v.push(Setup::Layer {
                    all_experts: g.all_experts,
                    source: Source::Layer(g),
                });
            }
            v.push(Setup::Forward(Source::Scaled));
            v
        }
    }
}

fn cases(setup: &Setup, opts: &SuiteOptions) -> Vec<Case> {
    let dev = device_prefix(&opts.device);
    let mut out = Vec::new();
    match setup {
        Setup::Routing(c) => {
            for &n in &opts.tokens {
                out.push(Case {
                    name: format!("{dev}/routing/{}/{}/n{n}", c.variant, c.label),
                    variant: c.variant,
                    tokens: n,
                });
            }
        }
        Setup::Layer {
            source,
            all_experts,
        } => {
            let l = label(source);
            let mut variants = vec!["topk", "naive"];
            if *all_experts {
                variants.push("all-experts");
            }
            if !opts.device.is_cpu() {
                variants.push("fused");
            }
            if matches!(source, Source::Real(_)) {
                // The routing of a real checkpoint: its router, its rule.
                variants.insert(0, "routing");
            }
            for &n in &opts.tokens {
                for v in &variants {
                    let name = if *v == "routing" {
                        format!("{dev}/routing/model/{l}/n{n}")
                    } else {
                        format!("{dev}/moe-layer/{v}/{l}/n{n}")
                    };
                    out.push(Case {
                        name,
                        variant: v,
                        tokens: n,
                    });
                }
            }
        }
        Setup::Forward(source) => {
            let l = label(source);
            for &n in &opts.tokens {
                out.push(Case {
                    name: format!("{dev}/forward/prefill/{l}/n{n}"),
                    variant: "prefill",
                    tokens: n,
                });
            }
            out.push(Case {
                name: format!("{dev}/forward/decode/{l}"),
                variant: "decode",
                tokens: 1,
            });
        }
    }
    out.retain(|c| opts.filter.is_empty() || opts.filter.iter().any(|f| c.name.contains(f)));
    out
}

/// The names of the benchmarks `opts` selects, in run order.
pub fn planned(opts: &SuiteOptions) -> Vec<String> {
    setups(opts)
        .iter()
        .flat_map(|s| cases(s, opts))
        .map(|c| c.name)
        .collect()
}

/// Builds a result row from a measurement and the work per iteration.
#[allow(clippy::too_many_arguments)]
pub fn result(
    name: &str,
    group: &str,
    variant: &str,
    model: &str,
    tokens: usize,
    m: &Measurement,
    flops: f64,
    bytes: f64,
    peaks: Option<&Peaks>,
) -> BenchResult {
    let mean = m.mean();
    let (lo, hi) = m.ci95();
    let gflops = flops / mean / 1e9;
    let gbs = bytes / mean / 1e9;
    BenchResult {
        name: name.into(),
        group: group.into(),
        variant: variant.into(),
        model: model.into(),
        tokens,
        samples_s: m.samples.clone(),
        iters_per_sample: m.iters_per_sample,
        mean_s: mean,
        ci_low_s: lo,
        ci_high_s: hi,
        tokens_per_s: tokens as f64 / mean,
        flops,
        bytes,
        gflops,
        gbs,
        flops_share: peaks.map(|p| gflops / p.gflops),
        bw_share: peaks.map(|p| gbs / p.gbs),
        rel_error: None,
        weights: None,
        compute: None,
    }
}

/// Tokens in the key/value cache when the decode benchmark decodes one
/// more: llama-bench's decode test (`-n 16`) generates its tokens at
/// positions 0–15.
pub const DECODE_CONTEXT: usize = super::llama_cpp::DECODE_TOKENS;

/// Token ids of a synthetic prompt of `n` tokens.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919) % vocab.max(1)) as u32).collect()
}

/// FLOPs and bytes of a forward pass over `tokens` tokens, from the
/// checkpoint's parameter counts: every non-expert matrix (attention, dense
/// MLPs, shared experts; not the embedding rows, which are gathered) once
/// per token, the output head once (the last position's logits,
/// [`LogitRows::Last`]), `k` routed experts per token and MoE layer,
/// attention scores `4·T²·hidden` per layer; bytes: those weights as the
/// forward pass reads them plus the expected distinct experts
/// `E·(1-(1-k/E)^T)` per MoE layer. With `half_as_stored` (the CPU forward
/// pass) bf16/f16 matrices count 2 bytes per weight, as they are read as
/// stored; everything else counts the 4 bytes of f32.
pub fn forward_work(model: &Model, tokens: usize, half_as_stored: bool) -> (f64, f64) {
    let w = model.weights();
    let info = &model.info;
    // Parameters, and bytes as read.
    let (mut dense, mut expert, mut head) = (0f64, 0f64, 0f64);
    let (mut dense_b, mut expert_b) = (0f64, 0f64);
    let has_head = w.contains("lm_head.weight");
    for name in w.names() {
        let Ok(t) = w.tensor(name) else { continue };
        let n = t.shape.iter().product::<usize>() as f64;
        let half = matches!(t.dtype.name(), "bf16" | "f16") && t.shape.len() == 2;
        let b = n * if half && half_as_stored { 2.0 } else { 4.0 };
        if name.contains(".experts.") {
            expert += n;
            expert_b += b;
        } else if name == "lm_head.weight" || (name == "model.embed_tokens.weight" && !has_head) {
            // The head runs on the last position only (`LogitRows::Last`).
            head += n;
            dense_b += b;
        } else if name != "model.embed_tokens.weight" || !has_head {
            dense += n;
            dense_b += b;
        }
    }
    let moe_layers = info.moe_layers.len().max(1) as f64;
    let e = info.num_experts.max(1) as f64;
    let k = info.top_k as f64;
    let per_expert = expert / (moe_layers * e);
    let t = tokens as f64;
    let active = e * (1.0 - (1.0 - (k / e).min(1.0)).powf(t));
    let flops = 2.0 * t * dense
        + 2.0 * head
        + 2.0 * t * k * moe_layers * per_expert
        + 4.0 * t * t * info.hidden_size as f64 * info.num_layers as f64;
    let bytes = dense_b + active * expert_b / e;
    (flops, bytes)
}

fn machine(peaks: Option<&Peaks>) -> Machine {
    Machine {
        threads: candle_core::utils::get_num_threads(),
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        peak_gflops: peaks.map(|p| p.gflops),
        peak_gbs: peaks.map(|p| p.gbs),
        probe_matmul_n: peaks.map(|p| p.matmul_n),
        probe_stream_bytes: peaks.map(|p| p.stream_bytes),
    }
}

/// Runs the selected benchmarks (peak probes first) and returns the results.
pub fn run(opts: &SuiteOptions, progress: &dyn Progress) -> Result<BenchFile> {
    if opts.tokens.is_empty() || opts.tokens.contains(&0) {
        return Err(Error::bad_value(
            crate::error::ValueKind::TokenCounts,
            "",
            "expected positive token counts, e.g. 1,16,256",
        ));
    }
    let plan: Vec<(Setup, Vec<Case>)> = setups(opts)
        .into_iter()
        .map(|s| {
            let c = cases(&s, opts);
            (s, c)
        })
        .filter(|(_, c)| !c.is_empty())
        .collect();
    if plan.is_empty() {
        return Err(Error::bad_value(
            crate::error::ValueKind::BenchFilter,
            opts.filter.join(","),
            format!(
                "no benchmark matches (names look like {}/routing/softmax-topk/e8-k2/n16)",
                device_prefix(&opts.device)
            ),
        ));
    }
    for (setup, cases) in &plan {
        if let Some(case) = cases.iter().max_by_key(|c| c.tokens) {
            let per_token = bytes_per_token(setup)?;
            crate::memory::ensure_fits(
                &format!("benchmark {} ({} tokens)", case.name, case.tokens),
                per_token.saturating_mul(case.tokens as u64),
            )?;
        }
    }
    let total: usize = plan.iter().map(|(_, c)| c.len()).sum();
    let peaks = if opts.probes {
        progress.note("measuring peak GFLOP/s (matmul) and GB/s (memory stream)");
        Some(probe::run(&opts.device, opts.quick_probes)?)
    } else {
        None
    };
    progress.start(total);
    let mut results = Vec::new();
    for (setup, cases) in &plan {
        match setup {
            Setup::Routing(c) => {
                run_routing(opts, c, cases, peaks.as_ref(), progress, &mut results)?
            }
            Setup::Layer { source, .. } => {
                run_layer(opts, source, cases, peaks.as_ref(), progress, &mut results)?
            }
            Setup::Forward(source) => {
                run_forward(opts, source, cases, peaks.as_ref(), progress, &mut results)?
            }
        }
    }
    Ok(BenchFile {
        schema: SCHEMA.into(),
        tool: format!("moe-inspect {}", env!("CARGO_PKG_VERSION")),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        device: device_prefix(&opts.device).into(),
        machine: machine(peaks.as_ref()),
        benchmarks: results,
        baseline: None,
    })
}

/// Working memory per token of a benchmark (an estimate from above: its
/// input, router scores, every expert's activations and outputs), checked
/// before anything is measured or written. Forward passes check their own
/// in [`Forward::run`].
fn bytes_per_token(setup: &Setup) -> Result<u64> {
    use crate::memory::product;
    let layer = |hidden: usize, experts: usize, inter: usize| {
        product(&[4, experts, inter.saturating_mul(3).saturating_add(hidden)])
            .saturating_add(product(&[4, 8, hidden]))
    };
    Ok(match setup {
        Setup::Routing(c) => product(&[4, c.hidden.saturating_add(c.experts.saturating_mul(3))]),
        Setup::Layer { source, .. } | Setup::Forward(source) => match source {
            Source::Scaled => {
                let g = scaled_mixtral().0;
                layer(g.hidden, g.experts, g.intermediate)
            }
            Source::Layer(g) => layer(
                g.geometry.hidden,
                g.geometry.experts,
                g.geometry.intermediate,
            ),
            Source::Real(dir) => {
                let info =
                    crate::model::ModelInfo::from_config(&crate::model::Config::read_dir(dir)?)?;
                layer(info.hidden_size, info.num_experts, info.expert_intermediate)
            }
        },
    })
}

fn run_routing(
    opts: &SuiteOptions,
    c: &RoutingCase,
    cases: &[Case],
    peaks: Option<&Peaks>,
    progress: &dyn Progress,
    out: &mut Vec<BenchResult>,
) -> Result<()> {
    let router = Router::random(c, &opts.device)?;
    for case in cases {
        progress.begin(&case.name);
        let x = moe_layer::random_input(case.tokens, c.hidden, &opts.device)?;
        let m = measure(&opts.device, &opts.budget, || router.route(&x).map(drop))?;
        out.push(result(
            &case.name,
            "routing",
            case.variant,
            &c.label,
            case.tokens,
            &m,
            router.flops(case.tokens),
            router.bytes(case.tokens),
            peaks,
        ));
        progress.done();
    }
    Ok(())
}

fn open_source(opts: &SuiteOptions, source: &Source, progress: &dyn Progress) -> Result<Model> {
    let dir = match source {
        Source::Scaled => {
            progress
                .note("preparing the scaled Mixtral model (written once into the bench data dir)");
            scaled_mixtral_dir(opts.dtype)?
        }
        Source::Layer(g) => {
            progress.note(&format!(
                "preparing the {} layer (written once into {})",
                g.label,
                data_dir().display()
            ));
            let name = format!("layer-{}-{}", g.label, opts.dtype.to_lowercase());
            cached_model(&name, &g.geometry, Some(g.full))?
        }
        Source::Real(dir) => dir.clone(),
    };
    Model::open(&dir)
}

fn run_layer(
    opts: &SuiteOptions,
    source: &Source,
    cases: &[Case],
    peaks: Option<&Peaks>,
    progress: &dyn Progress,
    out: &mut Vec<BenchResult>,
) -> Result<()> {
    let model = open_source(opts, source, progress)?;
    let l = label(source);
    let layer = *model
        .info
        .moe_layers
        .first()
        .ok_or_else(|| Error::Usage(format!("{}: the model has no MoE layer", l)))?;
    let fwd = Forward::new(&model, opts.device.clone())?.keep_weights();
    if fwd.cfg.llama4.is_some() {
        // The naive loop weighs expert outputs; Llama 4 weighs expert inputs.
        return Err(Error::Usage(format!(
            "{l}: the MoE-layer benchmarks weigh the experts' outputs, Llama 4's router scales their inputs; benchmark its whole forward pass (the `forward` cases)"
        )));
    }
    if fwd.cfg.gpt_oss.is_some() {
        // The layer variants are checked against a plain SwiGLU loop.
        return Err(Error::Usage(format!(
            "{l}: the MoE-layer benchmarks cover SwiGLU experts, not gpt-oss's biased, clamped ones; benchmark its whole forward pass (the `forward` cases)"
        )));
    }
    let lw: LayerWeights = fwd.load_layer(layer)?;
    let naive_experts = if cases.iter().any(|c| c.variant == "naive") {
        Some(moe_layer::NaiveExperts::new(&lw)?)
    } else {
        None
    };
    #[cfg(feature = "cuda")]
    let fused = if cases.iter().any(|c| c.variant == "fused") {
        Some(moe_layer::FusedExperts::new(&lw)?)
    } else {
        None
    };
    let under_test = LayerUnderTest {
        fwd: &fwd,
        lw: &lw,
        layer,
        naive: naive_experts.as_ref(),
        #[cfg(feature = "cuda")]
        fused: fused.as_ref(),
    };
    // The variants at one token count are measured interleaved (fair ratios).
    let mut token_counts: Vec<usize> = cases.iter().map(|c| c.tokens).collect();
    token_counts.dedup();
    for n in token_counts {
        let here: Vec<&Case> = cases.iter().filter(|c| c.tokens == n).collect();
        let x = moe_layer::random_input(n, model.info.hidden_size, &opts.device)?;
        let checked = under_test.check_against_naive(&here, &x)?;
        let (ms, work) = under_test.measure(opts, &model, &here, n, &x, progress)?;
        for ((case, m), w) in here.iter().zip(&ms).zip(&work) {
            let group = if case.variant == "routing" {
                "routing"
            } else {
                "moe-layer"
            };
            let rel_error = checked
                .iter()
                .find(|(v, _)| *v == case.variant)
                .map(|&(_, e)| e);
            out.push(BenchResult {
                rel_error,
                ..result(
                    &case.name,
                    group,
                    case.variant,
                    &l,
                    n,
                    m,
                    w.flops,
                    w.bytes,
                    peaks,
                )
            });
            progress.done();
        }
    }
    drop(lw);
    model.release_layer(layer);
    Ok(())
}

/// One MoE layer, loaded, with the variants prepared that the cases need.
struct LayerUnderTest<'a, 'm> {
    fwd: &'a Forward<'m>,
    lw: &'a LayerWeights,
    layer: usize,
    naive: Option<&'a moe_layer::NaiveExperts>,
    #[cfg(feature = "cuda")]
    fused: Option<&'a moe_layer::FusedExperts>,
}

impl LayerUnderTest<'_, '_> {
    /// Every variant computes the same layer: checked against the naive loop
    /// on this input before anything is timed. Returns each checked variant's
    /// relative error (none without the naive variant).
    fn check_against_naive(&self, here: &[&Case], x: &Tensor) -> Result<Vec<(&'static str, f64)>> {
        let (fwd, lw, layer) = (self.fwd, self.lw, self.layer);
        let mut checked: Vec<(&str, f64)> = Vec::new();
        let Some(ne) = self.naive else {
            return Ok(checked);
        };
        let reference = moe_layer::naive(fwd, lw, ne, x)?;
        checked.push(("naive", 0.0));
        for case in here {
            let (y, tol) = match case.variant {
                "topk" => (fwd.moe_block(layer, lw, x, &mut ())?, 1e-4),
                "all-experts" => (fwd.moe_block(layer, lw, x, &mut AllExpertOutputs)?, 1e-4),
                #[cfg(feature = "cuda")]
                "fused" if !moe_layer::has_shared_experts(lw) => match self.fused {
                    // bf16 weights and activations.
                    Some(f) => (f.forward(fwd, lw, x)?, 3e-2),
                    None => continue,
                },
                _ => continue,
            };
            let err = moe_layer::relative_error(&y, &reference)?;
            if err.is_nan() || err > tol {
                return Err(Error::Compute {
                    what: case.name.clone(),
                    reason: format!(
                        "output differs from the naive loop's: relative error {err:.2e} > {tol:.0e}"
                    ),
                });
            }
            checked.push((case.variant, err));
        }
        Ok(checked)
    }

    /// Measures the cases (interleaved) on input `x` of `n` tokens; returns each case's
    /// measurement and its work (flops, bytes), in case order.
    fn measure(
        &self,
        opts: &SuiteOptions,
        model: &Model,
        here: &[&Case],
        n: usize,
        x: &Tensor,
        progress: &dyn Progress,
    ) -> Result<(Vec<Measurement>, Vec<moe_layer::LayerWork>)> {
        let (fwd, lw, layer) = (self.fwd, self.lw, self.layer);
        let info = &model.info;
        let routed = moe_layer::route(fwd, lw, x)?;
        let mut work = Vec::new();
        let mut fs: Vec<Box<dyn FnMut() -> Result<()> + '_>> = Vec::new();
        for case in here {
            progress.begin(&case.name);
            let (t, h, e) = (n as f64, info.hidden_size as f64, info.num_experts as f64);
            match case.variant {
                "routing" => {
                    work.push(moe_layer::LayerWork {
                        flops: 2.0 * t * h * e + 8.0 * t * e,
                        bytes: 4.0 * (t * h + h * e + t * e),
                    });
                    fs.push(Box::new(move || moe_layer::route(fwd, lw, x).map(drop)));
                }
                "topk" => {
                    work.push(moe_layer::layer_work(fwd, n, &routed, false, 4.0));
                    fs.push(Box::new(move || {
                        fwd.moe_block(layer, lw, x, &mut ()).map(drop)
                    }));
                }
                "naive" => {
                    work.push(moe_layer::layer_work(fwd, n, &routed, false, 4.0));
                    let ne = self
                        .naive
                        .ok_or_else(|| Error::Usage("naive experts were not prepared".into()))?;
                    fs.push(Box::new(move || moe_layer::naive(fwd, lw, ne, x).map(drop)));
                }
                "all-experts" => {
                    work.push(moe_layer::layer_work(fwd, n, &routed, true, 4.0));
                    fs.push(Box::new(move || {
                        fwd.moe_block(layer, lw, x, &mut AllExpertOutputs).map(drop)
                    }));
                }
                #[cfg(feature = "cuda")]
                "fused" => {
                    let f = self
                        .fused
                        .ok_or_else(|| Error::Usage("fused experts were not prepared".into()))?;
                    work.push(moe_layer::layer_work(fwd, n, &routed, false, 2.0));
                    fs.push(Box::new(move || f.forward(fwd, lw, x).map(drop)));
                }
                other => {
                    return Err(Error::Usage(format!(
                        "benchmark variant `{other}` is not available in this build"
                    )))
                }
            }
        }
        let mut refs: Vec<&mut dyn FnMut() -> Result<()>> = fs
            .iter_mut()
            .map(|f| &mut **f as &mut dyn FnMut() -> Result<()>)
            .collect();
        let ms = measure_interleaved(&opts.device, &opts.budget, &mut refs)?;
        Ok((ms, work))
    }
}

fn run_forward(
    opts: &SuiteOptions,
    source: &Source,
    cases: &[Case],
    peaks: Option<&Peaks>,
    progress: &dyn Progress,
    out: &mut Vec<BenchResult>,
) -> Result<()> {
    let model = open_source(opts, source, progress)?;
    let l = label(source);
    let compute = if opts.compute == Compute::Bf16 && !Compute::bf16_supported() {
        progress
            .note("--compute bf16: this CPU has no AVX-512 BF16; the products stay exact (f32)");
        Compute::Exact
    } else {
        opts.compute
    };
    let fwd = Forward::new(&model, opts.device.clone())?.compute(compute);
    // Synthetic models keep their weights resident (as PyTorch holds
    // them); a real checkpoint is resident when it fits in the available
    // memory (`--max-memory`), else streamed layer by layer.
    let fwd = if matches!(source, Source::Real(_)) {
        let f = fwd.resident_if_fits(crate::forward::Passes::Repeated);
        if let Some(r) = f.residency() {
            progress.note(&r.to_string());
        }
        f
    } else {
        fwd.keep_weights()
    };
    let held = if fwd.weights_resident() {
        "resident"
    } else {
        "streamed"
    };
    let vocab = fwd.cfg.vocab_size;
    for case in cases {
        progress.begin(&case.name);
        let ids = vec![prompt(case.tokens, vocab)];
        // Prefill computes the next-token logits of the last position only,
        // as llama-bench's prompt processing does (every layer still runs on
        // every position); decode is one token through every layer and the
        // head, at position DECODE_CONTEXT of a key/value cache filled by a
        // prefill (rewound before each iteration, so every iteration decodes
        // at the same context), where the model has one
        // ([`Forward::decoder`]); else the token alone, without a cache.
        let cached = case.variant == "decode" && fwd.kv_cache_unsupported().is_none();
        if case.variant == "decode" {
            if let Some(why) = fwd.kv_cache_unsupported() {
                progress.note(&format!(
                    "{why}: decode measured as a one-token forward pass"
                ));
            }
        }
        let m = if cached {
            let context = prompt(DECODE_CONTEXT + 1, vocab);
            let mut dec = fwd.decoder(DECODE_CONTEXT + 1)?;
            dec.prefill(&context[..DECODE_CONTEXT], &mut ())?;
            // Each step runs on a thread of the pool, which then takes part
            // in the step's parallel products (llama-bench's main thread
            // computes too): called from outside, every product of the
            // step would hand its work over and wait to be woken.
            measure(&opts.device, &opts.budget, || {
                rayon::scope(|_| {
                    dec.truncate(DECODE_CONTEXT);
                    dec.step(context[DECODE_CONTEXT], &mut ()).map(drop)
                })
            })?
        } else {
            measure(&opts.device, &opts.budget, || {
                fwd.run_logits(&ids, &mut (), LogitRows::Last).map(drop)
            })?
        };
        let (flops, bytes) = forward_work(&model, case.tokens, opts.device.is_cpu());
        out.push(result(
            &case.name,
            "forward",
            case.variant,
            &l,
            case.tokens,
            &m,
            flops,
            bytes,
            peaks,
        ));
        if let Some(r) = out.last_mut() {
            r.weights = Some(held.to_string());
            r.compute = Some(
                match compute {
                    Compute::Exact => "exact",
                    Compute::Bf16 => "bf16",
                }
                .to_string(),
            );
        }
        progress.done();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(filter: &[&str], tokens: &[usize]) -> SuiteOptions {
        SuiteOptions {
            device: Device::Cpu,
            tokens: tokens.to_vec(),
            filter: filter.iter().map(|s| s.to_string()).collect(),
            model: None,
            full_size: false,
            dtype: "BF16",
            budget: Budget::quick(),
            probes: false,
            quick_probes: true,
            compute: Compute::Exact,
        }
    }

    #[test]
    fn names_start_with_the_device_and_cover_every_group() {
        let names = planned(&opts(&[], &[1, 256]));
        assert!(names.iter().all(|n| n.starts_with("cpu/")));
        for want in [
            "cpu/routing/softmax-topk/e8-k2/n1",
            "cpu/routing/softmax-topk/e64-k6/n256",
            "cpu/routing/softmax-topk/e256-k8/n256",
            "cpu/routing/sigmoid-group/e256-k8/n256",
            "cpu/moe-layer/topk/mixtral-scaled/n256",
            "cpu/moe-layer/naive/mixtral-scaled/n256",
            "cpu/moe-layer/all-experts/mixtral-scaled/n256",
            "cpu/moe-layer/topk/qwen3-30b-a3b/n1",
            "cpu/moe-layer/topk/olmoe-1b-7b/n256",
            "cpu/moe-layer/naive/deepseek-moe-16b/n256",
            "cpu/forward/prefill/mixtral-scaled/n256",
            "cpu/forward/decode/mixtral-scaled",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("mixtral-8x7b")));
        let mut o = opts(&["mixtral-8x7b"], &[16]);
        o.full_size = true;
        assert_eq!(planned(&o).len(), 2, "topk and naive at full size");
    }

    #[test]
    fn routing_runs_and_reports_work() {
        let file = run(&opts(&["routing/softmax-topk/e8-k2/"], &[4]), &()).unwrap();
        assert_eq!(file.schema, SCHEMA);
        assert_eq!(file.benchmarks.len(), 1);
        let b = &file.benchmarks[0];
        assert_eq!(b.name, "cpu/routing/softmax-topk/e8-k2/n4");
        assert_eq!(b.flops, 2.0 * 4.0 * 4096.0 * 8.0 + 8.0 * 4.0 * 8.0);
        assert!(b.mean_s > 0.0 && b.ci_low_s <= b.mean_s && b.mean_s <= b.ci_high_s);
        assert!((b.tokens_per_s - 4.0 / b.mean_s).abs() < 1e-6 * b.tokens_per_s);
    }

    #[test]
    fn an_unmatched_filter_is_a_usage_error() {
        let e = run(&opts(&["no-such-bench"], &[4]), &()).unwrap_err();
        assert!(e.to_string().contains("no benchmark matches"), "{e}");
    }
}
