//! `cargo moe-inspect bench`: turns arguments into a benchmark suite run,
//! prints the table, writes the report and baselines, and compares with a
//! baseline (exit 1 on a regression).
//!
//! Files are written only when asked (`--out DIR`, `--save-baseline NAME`),
//! also on CI, and always atomically (`moe_inspect::atomic_write`).

use std::path::PathBuf;
use std::time::Duration;

use std::cell::Cell;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_inspect::bench::harness::Budget;
use moe_inspect::bench::suite::{self, SuiteOptions};
use moe_inspect::bench::{Outcome, Peer, Request};
use moe_inspect::report::bench as report;
use moe_inspect::{forward, Error, Result};

use crate::cli::{BenchArgs, BenchCompute, BenchDtype};

/// Progress on stderr: a bar on a terminal, nothing otherwise. Before the
/// number of benchmarks is known (the peak probes) it is a spinner with the
/// set-up step, never a "0/0" bar.
struct BenchBar {
    bar: Option<ProgressBar>,
    /// Where to draw, until the first frame.
    target: Cell<Option<ProgressDrawTarget>>,
}

impl BenchBar {
    fn new(target: Option<ProgressDrawTarget>) -> BenchBar {
        let bar = target.is_some().then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
                b.set_style(style);
            }
            b
        });
        BenchBar {
            bar,
            target: Cell::new(target),
        }
    }

    fn draw(&self, b: &ProgressBar) {
        if let Some(t) = self.target.take() {
            b.set_draw_target(t);
            b.enable_steady_tick(Duration::from_millis(200));
        }
    }
}

impl suite::Progress for BenchBar {
    fn start(&self, total: usize) {
        if let Some(b) = &self.bar {
            if let Ok(style) =
                ProgressStyle::with_template("{bar:30} {pos}/{len} benchmarks [{elapsed}] {msg}")
            {
                b.set_style(style);
            }
            b.set_length(total as u64);
            b.set_position(0);
            b.set_message("");
            self.draw(b);
        }
    }
    fn begin(&self, name: &str) {
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
        }
    }
    fn done(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
    fn note(&self, message: &str) {
        if let Some(b) = &self.bar {
            b.set_message(message.to_string());
            self.draw(b);
        }
    }
}

impl Drop for BenchBar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn bar(interactive: bool) -> BenchBar {
    BenchBar::new(interactive.then(ProgressDrawTarget::stderr))
}

fn parse_tokens(spec: &str) -> Result<Vec<usize>> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::Usage(format!(
                "--tokens `{spec}`: expected positive integers separated by commas, e.g. 1,16,256"
            ))),
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(Error::Usage("--tokens: no token count given".into()))
            } else {
                Ok(v)
            }
        })
}

fn check_baseline_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::Usage(format!(
            "--save-baseline `{name}`: use letters, digits, `-`, `_` and `.` only, not starting with `.`"
        )));
    }
    Ok(())
}

fn dtype(d: BenchDtype) -> &'static str {
    match d {
        BenchDtype::Bf16 => "BF16",
        BenchDtype::F16 => "F16",
        BenchDtype::F32 => "F32",
    }
}

/// The benchmark run `args` ask for (argument checks are usage errors).
fn request(args: &BenchArgs) -> Result<Request> {
    if let Some(name) = &args.baseline {
        return Err(Error::Usage(format!(
            "bench --baseline was renamed: use `--compare-baseline {name}` (`--baseline` is diff's reference checkpoint)"
        )));
    }
    let device = forward::parse_device(&args.device)?;
    let tokens = parse_tokens(&args.tokens)?;
    if let Some(name) = &args.save_baseline {
        check_baseline_name(name)?;
    }
    if !(args.threshold.is_finite() && args.threshold >= 0.0) {
        return Err(Error::Usage(format!(
            "--threshold {}: expected a non-negative percentage",
            args.threshold
        )));
    }
    if !(args.time.is_finite() && args.time > 0.0) {
        return Err(Error::Usage(format!(
            "--time {}: expected a positive number of seconds",
            args.time
        )));
    }
    let mut budget = if args.quick {
        Budget::quick()
    } else {
        Budget {
            target: Duration::from_secs_f64(args.time),
            ..Budget::default()
        }
    };
    if let Some(n) = args.sample_size {
        budget = budget.with_sample_size(n);
    }
    if let Some(w) = args.warm_up {
        budget.warm_up = Duration::from_secs_f64(w);
    }
    let suite = SuiteOptions {
        device,
        tokens,
        filter: args
            .filter
            .as_deref()
            .map(|f| {
                f.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        model: args.model.clone(),
        full_size: args.full_size,
        dtype: dtype(args.dtype),
        budget,
        probes: true,
        quick_probes: args.quick,
        compute: match args.compute {
            BenchCompute::Exact => forward::Compute::Exact,
            BenchCompute::Bf16 => forward::Compute::Bf16,
        },
    };
    let peer = match args.peer.as_deref() {
        None => None,
        Some("torch") => Some(Peer::Torch {
            python: std::env::var("MOE_INSPECT_PYTHON").unwrap_or_else(|_| "python3".into()),
            dir: args
                .out
                .clone()
                .unwrap_or_else(moe_inspect::bench::data_dir),
            time: args.time,
        }),
        Some("llama.cpp") => {
            let gguf = args.gguf.clone().ok_or_else(|| {
                Error::Usage(
                    "--peer llama.cpp needs --gguf FILE: the GGUF of the same weights (benches/make_gguf.py makes one with llama.cpp's converter)".into(),
                )
            })?;
            Some(Peer::LlamaCpp {
                binary: moe_inspect::bench::llama_cpp::find_binary(args.llama_bench.as_deref())
                    .map_err(|e| {
                        Error::Usage(format!(
                            "--peer llama.cpp: {e}; give it with --llama-bench PATH"
                        ))
                    })?,
                gguf,
            })
        }
        Some(path) => Some(Peer::File(PathBuf::from(path))),
    };
    if !matches!(peer, Some(Peer::LlamaCpp { .. }))
        && (args.gguf.is_some() || args.llama_bench.is_some())
    {
        return Err(Error::Usage(
            "--gguf and --llama-bench are options of --peer llama.cpp".into(),
        ));
    }
    Ok(Request {
        suite,
        baseline_dir: args
            .baseline_dir
            .clone()
            .unwrap_or_else(moe_inspect::bench::baselines_dir),
        compare: args.compare_baseline.clone(),
        load: args.load_baseline.clone(),
        save: args.save_baseline.clone(),
        peer,
        threshold: args.threshold / 100.0,
    })
}

/// A missing baseline, with how to save one.
fn hint(e: Error) -> Error {
    match e {
        Error::NoBaseline { ref name, .. } => {
            Error::Usage(format!("{e}; save one with `--save-baseline {name}`"))
        }
        e => e,
    }
}

/// Runs `bench`; returns the exit code (1 when a benchmark regressed).
pub fn bench(args: BenchArgs, interactive: bool) -> Result<u8> {
    let req = request(&args)?;
    if args.list {
        for name in suite::planned(&req.suite) {
            println!("{name}");
        }
        return Ok(0);
    }
    let outcome = {
        let progress = bar(interactive);
        crate::commands::timed("benchmarks", || moe_inspect::bench::run(&req, &progress))
            .map_err(hint)?
    };
    render(&args, &outcome)
}

/// Prints the outcome: notices, the table, noise warnings; writes the report.
fn render(args: &BenchArgs, outcome: &Outcome) -> Result<u8> {
    if let Some(b) = &outcome.compared_with {
        notice!(
            "comparing with baseline `{}` ({})",
            b.name,
            b.path.display()
        );
    }
    if let Some(b) = &outcome.loaded_from {
        notice!(
            "loaded baseline `{}` ({}) as this run",
            b.name,
            b.path.display()
        );
    }
    if let (Some("torch"), Some(path)) = (args.peer.as_deref(), &outcome.peer_file) {
        detail!("read: {}", path.display());
    }
    for note in &outcome.notes {
        notice!("note: {note}");
    }
    let file = &outcome.results;
    let width = crate::commands::terminal_width();
    print!("{}", report::table(file, outcome.peer.as_ref(), width));
    if let Some(c) = report::checks_line(file) {
        let line = format!("moe-layer {c}");
        println!("{}", moe_inspect::report::table::wrap_text(&line, width));
    }
    if let Some(w) = report::weights_line(file) {
        println!("{w}");
    }
    // `--quick` (tests, smoke runs) takes a handful of tiny samples: noise
    // is expected there and not worth a warning.
    for n in outcome.noisy.iter().filter(|_| !args.quick) {
        notice!(
            "warning: {} is noisy: the 95% interval of its {} ({:+.1}% to {:+.1}%) is wider than the {}% threshold, so a change of that size cannot be told from noise; measure longer (--time, --sample-size) or on a quieter machine",
            n.name,
            if n.of_change { "change" } else { "mean time" },
            n.low * 100.0,
            n.high * 100.0,
            args.threshold
        );
    }
    if let Some(dir) = &args.out {
        let path = report::write(dir, file, outcome.peer.as_ref(), &outcome.notes)?;
        notice!("wrote {} (with bench.json and SVG figures)", path.display());
    }
    if let Some(b) = &outcome.saved_as {
        notice!("saved baseline `{}` to {}", b.name, b.path.display());
    }
    let data = moe_inspect::bench::data_dir();
    if args.load_baseline.is_none() && args.model.is_none() && data.is_dir() {
        notice!(
            "benchmark data: {} (synthetic checkpoints and baselines; MOE_INSPECT_BENCH_DIR moves it)",
            data.display()
        );
    }
    if !outcome.passed() {
        eprintln!(
            "error: {} benchmark(s) regressed beyond {}%: {}",
            outcome.regressed.len(),
            args.threshold,
            outcome.regressed.join(", ")
        );
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_bar_is_a_spinner_until_the_count_is_known() {
        use suite::Progress;
        let screen = crate::commands::tests::Screen::default();
        let bar = BenchBar::new(Some(ProgressDrawTarget::term_like_with_hz(
            Box::new(screen.clone()),
            200,
        )));
        std::thread::sleep(Duration::from_millis(20));
        assert!(screen.frames().is_empty());
        bar.note("measuring peaks");
        // The spinner's ticker draws it (on a loaded machine, give it time).
        for _ in 0..400 {
            if !screen.frames().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bar.start(3);
        bar.begin("cpu/routing/x");
        bar.done();
        let b = bar.bar.as_ref().unwrap();
        assert_eq!((b.position(), b.length()), (1, Some(3)));
        let frames = screen.frames();
        assert!(frames[0].contains("measuring peaks"), "{frames:?}");
        assert!(frames.iter().all(|f| !f.contains("0/0")), "{frames:?}");
        assert!(
            frames.iter().any(|f| f.contains("/3 benchmarks")),
            "{frames:?}"
        );
        // Off a terminal: nothing at all.
        assert!(bar_off().bar.is_none());
    }

    fn bar_off() -> BenchBar {
        bar(false)
    }

    #[test]
    fn token_lists() {
        assert_eq!(parse_tokens("1,16, 256").unwrap(), vec![1, 16, 256]);
        assert!(parse_tokens("1,x").is_err());
        assert!(parse_tokens("0").is_err());
        assert!(parse_tokens("").is_err());
    }

    #[test]
    fn baseline_names_and_paths() {
        let dir = Path::new("b");
        use moe_inspect::bench::outcome::baseline_path;
        assert_eq!(baseline_path("main", dir), Path::new("b/main.json"));
        assert_eq!(baseline_path("x/y.json", dir), Path::new("x/y.json"));
        assert!(check_baseline_name("main-2").is_ok());
        assert!(check_baseline_name("../x").is_err());
    }
}
