//! One benchmark run as `cargo moe-inspect bench` does it, decided here and
//! returned as a typed [`Outcome`]: which baselines are read, loaded and
//! saved, whether a peer is read or run, the verdicts against a baseline and
//! which benchmarks regressed. The front end only renders the outcome
//! (tables, report files, notices, the exit code).

use std::path::{Path, PathBuf};

use crate::bench::schema::{BaselineComparison, BenchFile};
use crate::bench::suite::{self, Progress, SuiteOptions};
use crate::bench::verdict;
use crate::error::{Error, Result};

/// Peer timings shown beside this run's.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A `bench.json`-shaped file (e.g. from `benches/compare_torch.py --out FILE`).
    File(PathBuf),
    /// Run the built-in `compare_torch.py` now with this Python interpreter,
    /// writing its results to `dir/torch.json`. When Python or PyTorch is
    /// missing, or the script fails, the comparison is skipped with a note.
    Torch {
        /// The Python interpreter (`python3`, or a venv's).
        python: String,
        /// Where the script writes `torch.json` (created if need be).
        dir: PathBuf,
        /// Measurement time per benchmark, in seconds.
        time: f64,
    },
    /// Run llama.cpp's `llama-bench` on a GGUF of the same weights, with the
    /// same thread count and token counts ([`crate::bench::llama_cpp`]).
    /// When it fails, the comparison is skipped with a note.
    LlamaCpp {
        /// The `llama-bench` executable.
        binary: PathBuf,
        /// The GGUF file.
        gguf: PathBuf,
    },
}

/// What a benchmark run should do.
#[derive(Debug, Clone)]
pub struct Request {
    /// The benchmarks to run and their time budget.
    pub suite: SuiteOptions,
    /// Where baselines named without a path live.
    pub baseline_dir: PathBuf,
    /// Compare with this baseline (a name in `baseline_dir`, or a `bench.json` path).
    pub compare: Option<String>,
    /// Measure nothing: take this saved baseline as the run's results.
    pub load: Option<String>,
    /// Save the results under this baseline name.
    pub save: Option<String>,
    /// Peer timings to show beside the results.
    pub peer: Option<Peer>,
    /// Noise threshold (a fraction: 0.05 is 5%): a regression needs the
    /// whole 95% interval of the change above it.
    pub threshold: f64,
}

/// A baseline named by the caller and the file it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBaseline {
    /// The name as given.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
}

/// What a benchmark run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The results, with the verdicts against the compared baseline (if any).
    pub results: BenchFile,
    /// Peer timings, when a peer was read or run.
    pub peer: Option<BenchFile>,
    /// The file the peer timings were read from.
    pub peer_file: Option<PathBuf>,
    /// Things worth telling the reader of the report (a skipped peer).
    pub notes: Vec<String>,
    /// Benchmarks whose interval is wider than the threshold.
    pub noisy: Vec<verdict::Noise>,
    /// Names of the benchmarks that regressed beyond the threshold.
    pub regressed: Vec<String>,
    /// The baseline compared with.
    pub compared_with: Option<NamedBaseline>,
    /// The baseline loaded as this run's results (nothing measured).
    pub loaded_from: Option<NamedBaseline>,
    /// The baseline the results were saved as.
    pub saved_as: Option<NamedBaseline>,
}

impl Outcome {
    /// No benchmark regressed.
    pub fn passed(&self) -> bool {
        self.regressed.is_empty()
    }
}

/// A baseline NAME in `dir`, or a path when NAME looks like one.
pub fn baseline_path(name: &str, dir: &Path) -> PathBuf {
    if name.ends_with(".json") || name.contains('/') || name.contains('\\') {
        PathBuf::from(name)
    } else {
        dir.join(format!("{name}.json"))
    }
}

/// The baselines saved in `dir`, sorted (none when it cannot be read).
pub fn saved_baselines(dir: &Path) -> Vec<String> {
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
    saved
}

/// Reads a saved baseline; a missing one is an [`Error::NoBaseline`] that
/// names the saved ones.
pub fn read_baseline(name: &str, dir: &Path) -> Result<(BenchFile, NamedBaseline)> {
    let path = baseline_path(name, dir);
    if !path.exists() {
        return Err(Error::NoBaseline {
            path,
            name: name.to_string(),
            dir: dir.to_path_buf(),
            saved: saved_baselines(dir),
        });
    }
    let file = BenchFile::read(&path)?;
    Ok((
        file,
        NamedBaseline {
            name: name.to_string(),
            path,
        },
    ))
}

/// Runs (or loads) the benchmarks, reads or runs the peer, compares with the
/// baseline and saves the results as asked. Baselines and a peer file are
/// read before anything is measured: a typo should not cost a whole run.
pub fn run(req: &Request, progress: &dyn Progress) -> Result<Outcome> {
    let baseline = req
        .compare
        .as_deref()
        .map(|name| read_baseline(name, &req.baseline_dir))
        .transpose()?;
    let peer_file = match &req.peer {
        Some(Peer::File(path)) => Some((BenchFile::read(path)?, path.clone())),
        Some(Peer::LlamaCpp { gguf, .. }) if !gguf.is_file() => {
            return Err(Error::Invalid(format!(
                "{}: no such file (the GGUF of the benchmarked weights)",
                gguf.display()
            )))
        }
        _ => None,
    };
    let (mut results, loaded_from) = match &req.load {
        Some(name) => {
            let (mut f, named) = read_baseline(name, &req.baseline_dir)?;
            f.baseline = None;
            (f, Some(named))
        }
        None => (suite::run(&req.suite, progress)?, None),
    };
    let mut notes = Vec::new();
    let (peer, peer_file) = match (&req.peer, peer_file) {
        (Some(Peer::Torch { python, dir, time }), _) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            progress.note("running compare_torch.py (PyTorch on the same checkpoint)...");
            let out = dir.join("torch.json");
            match torch::run(&req.suite, python, *time, &results.device, &out) {
                Ok(f) => (Some(f), Some(out)),
                Err(why) => {
                    notes.push(format!("skipped the PyTorch comparison: {why}"));
                    (None, None)
                }
            }
        }
        (Some(Peer::LlamaCpp { binary, gguf }), _) => {
            progress.note("running llama-bench (llama.cpp on the GGUF of the same weights)...");
            let lb = crate::bench::llama_cpp::LlamaBench {
                binary: binary.clone(),
                gguf: gguf.clone(),
                threads: results.machine.threads.max(1),
                repetitions: 5,
            };
            match crate::bench::llama_cpp::run(&lb, &results) {
                Ok(f) => (Some(f), Some(gguf.clone())),
                Err(why) => {
                    notes.push(format!("skipped the llama.cpp comparison: {why}"));
                    (None, None)
                }
            }
        }
        (_, Some((f, path))) => (Some(f), Some(path)),
        (_, None) => (None, None),
    };
    let (noisy, regressed, compared_with) = compare(&mut results, baseline, req.threshold);
    let saved_as = match &req.save {
        Some(name) => {
            let path = baseline_path(name, &req.baseline_dir);
            let mut saved = results.clone();
            saved.baseline = None;
            saved.write(&path)?;
            Some(NamedBaseline {
                name: name.clone(),
                path,
            })
        }
        None => None,
    };
    Ok(Outcome {
        results,
        peer,
        peer_file,
        notes,
        noisy,
        regressed,
        compared_with,
        loaded_from,
        saved_as,
    })
}

/// Verdicts against the baseline (stored in `results.baseline`), the noisy
/// benchmarks and the regressed ones.
fn compare(
    results: &mut BenchFile,
    baseline: Option<(BenchFile, NamedBaseline)>,
    threshold: f64,
) -> (Vec<verdict::Noise>, Vec<String>, Option<NamedBaseline>) {
    let Some((base, named)) = baseline else {
        return (verdict::noisy(results, None, threshold), Vec::new(), None);
    };
    let verdicts = verdict::compare(results, &base, threshold);
    let noisy = verdict::noisy(results, Some(&verdicts), threshold);
    let regressed = verdicts
        .iter()
        .filter(|v| v.status == verdict::Status::Regressed)
        .map(|v| v.name.clone())
        .collect();
    results.baseline = Some(BaselineComparison {
        name: named.name.clone(),
        threshold,
        verdicts,
    });
    (noisy, regressed, Some(named))
}

/// The built-in `compare_torch.py`, run on the same checkpoint and token counts.
mod torch {
    use std::path::{Path, PathBuf};

    use crate::bench::schema::BenchFile;
    use crate::bench::suite::{self, SuiteOptions};

    /// The script written to a file of its own for one run (removed when dropped).
    struct Script(PathBuf);

    impl Script {
        fn write() -> Result<Script, String> {
            let path = std::env::temp_dir().join(format!(
                "moe-inspect-compare_torch-{}.py",
                std::process::id()
            ));
            crate::atomic_write::write_atomic(&path, crate::bench::COMPARE_TORCH_PY.as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(Script(path))
        }
    }

    impl Drop for Script {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Runs the script with `python`; `Err` is why the comparison is skipped.
    pub(super) fn run(
        opts: &SuiteOptions,
        python: &str,
        time: f64,
        device: &str,
        out: &Path,
    ) -> Result<BenchFile, String> {
        // Check for Python and PyTorch before writing any checkpoint for them.
        let probe = std::process::Command::new(python)
            .args(["-c", "import torch, transformers"])
            .output()
            .map_err(|e| format!("could not run {python}: {e}"))?;
        if !probe.status.success() {
            return Err(format!(
                "{python} cannot import torch and transformers (pip install torch transformers)"
            ));
        }
        let model = match &opts.model {
            Some(m) => m.clone(),
            None => suite::scaled_mixtral_dir(opts.dtype).map_err(|e| e.to_string())?,
        };
        let toks: Vec<String> = opts.tokens.iter().map(|t| t.to_string()).collect();
        let script = Script::write()?;
        let mut cmd = std::process::Command::new(python);
        cmd.arg(&script.0)
            .arg(&model)
            .arg("--out")
            .arg(out)
            .arg("--tokens")
            .arg(toks.join(","))
            .arg("--device")
            .arg(device)
            .arg("--time")
            .arg(time.to_string());
        if !opts.filter.is_empty() {
            cmd.arg("--filter").arg(opts.filter.join(","));
        }
        if opts.model.is_some() {
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
}
