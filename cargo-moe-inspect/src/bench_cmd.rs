//! `cargo moe-inspect bench`: turns arguments into a benchmark suite run,
//! prints the table, writes the report and baselines, and compares with a
//! baseline (exit 1 on a regression).
//!
//! Files are written only when asked (`--out DIR`, `--save-baseline NAME`),
//! also on CI, and always atomically (`moe_inspect::atomic_write`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::cell::Cell;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_inspect::bench::harness::Budget;
use moe_inspect::bench::schema::{BaselineComparison, BenchFile};
use moe_inspect::bench::suite::{self, SuiteOptions};
use moe_inspect::bench::verdict;
use moe_inspect::report::bench as report;
use moe_inspect::{forward, Error, Result};

use crate::cli::{BenchArgs, BenchDtype};

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

/// A baseline NAME in `dir`, or a path when NAME looks like one.
fn baseline_path(name: &str, dir: &Path) -> PathBuf {
    if name.ends_with(".json") || name.contains('/') || name.contains('\\') {
        PathBuf::from(name)
    } else {
        dir.join(format!("{name}.json"))
    }
}

/// Reads a saved baseline; a missing one is named with the saved ones.
fn read_baseline(name: &str, dir: &Path) -> Result<BenchFile> {
    let path = baseline_path(name, dir);
    if !path.exists() {
        let mut saved: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_suffix(".json")
                            .filter(|s| !s.starts_with('.'))
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        saved.sort();
        return Err(Error::Input {
            path,
            reason: format!(
                "no such baseline `{name}` (saved in {}: {}); save one with `--save-baseline {name}`",
                dir.display(),
                if saved.is_empty() {
                    "none".to_string()
                } else {
                    saved.join(", ")
                }
            ),
        });
    }
    BenchFile::read(&path)
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

/// The built-in `compare_torch.py`, written to a file of its own for one run
/// (removed when dropped).
struct TorchScript(PathBuf);

impl TorchScript {
    fn write() -> std::result::Result<TorchScript, String> {
        let path = std::env::temp_dir().join(format!(
            "moe-inspect-compare_torch-{}.py",
            std::process::id()
        ));
        moe_inspect::atomic_write::write_atomic(
            &path,
            moe_inspect::bench::COMPARE_TORCH_PY.as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        detail!("wrote: {} (the built-in compare_torch.py)", path.display());
        Ok(TorchScript(path))
    }
}

impl Drop for TorchScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `compare_torch.py` on the same checkpoint and token counts; `Err` is a note.
fn run_torch(
    args: &BenchArgs,
    tokens: &[usize],
    device: &str,
    out: &Path,
) -> std::result::Result<BenchFile, String> {
    let python = std::env::var("MOE_INSPECT_PYTHON").unwrap_or_else(|_| "python3".into());
    // Check for Python and PyTorch before writing any checkpoint for them.
    let probe = std::process::Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    if !probe.status.success() {
        return Err(format!(
            "{python} cannot import torch and transformers (pip install torch transformers)"
        ));
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => suite::scaled_mixtral_dir(dtype(args.dtype)).map_err(|e| e.to_string())?,
    };
    let toks: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let script = TorchScript::write()?;
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script.0)
        .arg(&model)
        .arg("--out")
        .arg(out)
        .arg("--tokens")
        .arg(toks.join(","))
        .arg("--device")
        .arg(device)
        .arg("--time")
        .arg(args.time.to_string());
    if let Some(f) = &args.filter {
        cmd.arg("--filter").arg(f);
    }
    if args.model.is_some() {
        cmd.arg("--label").arg(
            model
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_lowercase()))
                .unwrap_or_else(|| "model".into()),
        );
    }
    let output = cmd
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let last = err.lines().last().unwrap_or("").trim().to_string();
        return Err(format!("{python} compare_torch.py failed: {last}"));
    }
    BenchFile::read(out).map_err(|e| e.to_string())
}

fn dtype(d: BenchDtype) -> &'static str {
    match d {
        BenchDtype::Bf16 => "BF16",
        BenchDtype::F16 => "F16",
        BenchDtype::F32 => "F32",
    }
}

/// Runs `bench`; returns the exit code (1 when a benchmark regressed).
pub fn bench(args: BenchArgs, interactive: bool) -> Result<u8> {
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
    let baseline_dir = args
        .baseline_dir
        .clone()
        .unwrap_or_else(moe_inspect::bench::baselines_dir);
    // Read the baseline and peer file first: a typo should not cost a whole run.
    let baseline = args
        .compare_baseline
        .as_deref()
        .map(|name| {
            let f = read_baseline(name, &baseline_dir)?;
            notice!(
                "comparing with baseline `{name}` ({})",
                baseline_path(name, &baseline_dir).display()
            );
            Ok::<_, Error>((name, f))
        })
        .transpose()?;
    let mut notes = Vec::new();
    let peer_file = match args.peer.as_deref() {
        None | Some("torch") => None,
        Some(path) => Some(BenchFile::read(Path::new(path))?),
    };
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
    let opts = SuiteOptions {
        device,
        tokens: tokens.clone(),
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
    };
    if args.list {
        for name in suite::planned(&opts) {
            println!("{name}");
        }
        return Ok(0);
    }
    let mut file = match &args.load_baseline {
        Some(name) => {
            let mut f = read_baseline(name, &baseline_dir)?;
            notice!(
                "loaded baseline `{name}` ({}) as this run",
                baseline_path(name, &baseline_dir).display()
            );
            f.baseline = None;
            f
        }
        None => {
            let progress = bar(interactive);
            crate::commands::timed("benchmarks", || suite::run(&opts, &progress))?
        }
    };
    let peer = match (args.peer.as_deref(), peer_file) {
        (Some("torch"), _) => {
            let dir = args
                .out
                .clone()
                .unwrap_or_else(moe_inspect::bench::data_dir);
            std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
                path: dir.clone(),
                source: e,
            })?;
            if interactive {
                eprintln!("running compare_torch.py (PyTorch on the same checkpoint)...");
            }
            let run = crate::commands::timed("PyTorch peer", || {
                run_torch(&args, &tokens, &file.device, &dir.join("torch.json"))
            });
            match run {
                Ok(f) => {
                    detail!("read: {}", dir.join("torch.json").display());
                    Some(f)
                }
                Err(why) => {
                    let note = format!("skipped the PyTorch comparison: {why}");
                    notice!("note: {note}");
                    notes.push(note);
                    None
                }
            }
        }
        (_, f) => f,
    };
    let mut regressed = Vec::new();
    let threshold = args.threshold / 100.0;
    let mut noise = verdict::noisy(&file, None, threshold);
    if let Some((name, base)) = &baseline {
        let verdicts = verdict::compare(&file, base, threshold);
        noise = verdict::noisy(&file, Some(&verdicts), threshold);
        regressed = verdicts
            .iter()
            .filter(|v| v.status == verdict::Status::Regressed)
            .map(|v| v.name.clone())
            .collect();
        file.baseline = Some(BaselineComparison {
            name: name.to_string(),
            threshold,
            verdicts,
        });
    }
    let width = crate::commands::terminal_width();
    print!("{}", report::table(&file, peer.as_ref(), width));
    if let Some(c) = report::checks_line(&file) {
        let line = format!("moe-layer {c}");
        println!("{}", moe_inspect::report::table::wrap_text(&line, width));
    }
    if let Some(w) = report::weights_line(&file) {
        println!("{w}");
    }
    // `--quick` (tests, smoke runs) takes a handful of tiny samples: noise
    // is expected there and not worth a warning.
    for n in noise.iter().filter(|_| !args.quick) {
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
        let path = report::write(dir, &file, peer.as_ref(), &notes)?;
        notice!("wrote {} (with bench.json and SVG figures)", path.display());
    }
    if let Some(name) = &args.save_baseline {
        let path = baseline_path(name, &baseline_dir);
        let mut saved = file.clone();
        saved.baseline = None;
        saved.write(&path)?;
        notice!("saved baseline `{name}` to {}", path.display());
    }
    let data = moe_inspect::bench::data_dir();
    if args.load_baseline.is_none() && args.model.is_none() && data.is_dir() {
        notice!(
            "benchmark data: {} (synthetic checkpoints and baselines; MOE_INSPECT_BENCH_DIR moves it)",
            data.display()
        );
    }
    if !regressed.is_empty() {
        eprintln!(
            "error: {} benchmark(s) regressed beyond {}%: {}",
            regressed.len(),
            args.threshold,
            regressed.join(", ")
        );
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(baseline_path("main", dir), Path::new("b/main.json"));
        assert_eq!(baseline_path("x/y.json", dir), Path::new("x/y.json"));
        assert!(check_baseline_name("main-2").is_ok());
        assert!(check_baseline_name("../x").is_err());
    }
}
