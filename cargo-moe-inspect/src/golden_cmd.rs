//! The golden-snapshot commands: `snapshot`, `check`, `review`, `accept`,
//! `reject` and `diff`. Which models, prompts, analyses, golden directory
//! and tolerances apply comes from the flags, then the Cargo.toml
//! configuration, then the defaults.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use moe_inspect::analysis::Progress;
use moe_inspect::golden::compare::{self, Comparison};
use moe_inspect::golden::{
    self, pending, Action, CheckOutcome, DiffOptions, ModelOutcome, Request, Selection, Snapshot,
    Target, Tolerances,
};
use moe_inspect::report::drift;
use moe_inspect::{Error, Result};

use crate::cli::{
    CheckArgs, CheckFormat, DiffArgs, DiffFormat, GoldenDirArgs, PendingArgs, SnapshotArgs,
};
use crate::commands::progress_bar;

/// Checks `--name` like a Cargo.toml package `name` (exit 2 otherwise).
fn check_name_flag(name: Option<&str>) -> Result<()> {
    match name {
        Some(n) => pending::check_name(n).map_err(|e| Error::Usage(format!("--name: {e}"))),
        None => Ok(()),
    }
}

/// `--tolerance KEY=VALUE` flags, each checked (key known, value valid).
fn tolerance_flags(flags: &[String]) -> Result<Vec<(String, f64)>> {
    let mut probe = Tolerances::default();
    flags
        .iter()
        .map(|f| {
            let (k, v) = f.split_once('=').ok_or_else(|| {
                Error::Usage(format!(
                    "--tolerance {f}: expected KEY=VALUE, e.g. similarity=1e-4"
                ))
            })?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| Error::Usage(format!("--tolerance {f}: `{v}` is not a number")))?;
            probe
                .set(k.trim(), v)
                .map_err(|e| Error::Usage(format!("--tolerance: {e}")))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

/// `--analyses LIST`, checked.
fn analyses_flag(list: Option<&String>) -> Result<Option<Selection>> {
    list.map(|l| {
        Selection::parse(std::slice::from_ref(l))
            .map_err(|e| Error::Usage(format!("--analyses: {e}")))
    })
    .transpose()
}

/// The library request of `snapshot` / `check`: the flags, checked.
fn request(args: &SnapshotArgs) -> Result<Request> {
    check_name_flag(args.golden.name.as_deref())?;
    analyses_flag(args.analyses.as_ref())?;
    Ok(Request {
        manifest_path: args.golden.manifest_path.clone(),
        golden_dir: args.golden.golden_dir.clone(),
        name: args.golden.name.clone(),
        model: args.model.model.clone(),
        demo: args.model.demo,
        prompts: args.prompts.prompts.clone(),
        token_ids: args.prompts.token_ids.clone(),
        analyses: args.analyses.clone(),
        tolerances: tolerance_flags(&args.tolerance)?,
        device: args.model.device.clone(),
        trace: args.trace.clone(),
    })
}

/// A `--name` that matches no configured model names the flag.
fn plan(req: &Request) -> Result<golden::Plan> {
    golden::plan_with_config(req).map_err(|e| match e {
        Error::Invalid(m) if req.name.is_some() => Error::Usage(format!("--name {m}")),
        e => e,
    })
}

fn bar_for(t: &Target, forward_layers: usize) -> Box<dyn Progress> {
    Box::new(crate::commands::golden_progress(&t.name, forward_layers))
}

pub fn snapshot(args: SnapshotArgs) -> Result<u8> {
    let plan = plan(&request(&args)?)?;
    golden::snapshot(&plan, &bar_for, &mut |r| {
        let size = std::fs::metadata(&r.path).map(|m| m.len()).unwrap_or(0);
        notice!(
            "wrote {} ({}): {} MoE layers{}",
            r.path.display(),
            human_size(size),
            r.snapshot.layers.len(),
            r.snapshot
                .prompts
                .as_ref()
                .map(|p| format!(", {} prompts, {} tokens", p.count, p.tokens))
                .unwrap_or_default()
        );
    })?;
    Ok(0)
}

fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

pub fn check(args: CheckArgs, color: bool) -> Result<u8> {
    let plan = plan(&request(&args.snapshot)?)?;
    let update = pending::UpdateMode::resolve(args.accept)?;
    let outcome = golden::check(&plan, update, &bar_for, &mut |o| {
        render_model(o, &args, color)
    })?;
    let comparisons: Vec<Comparison> = outcome.comparisons().into_iter().cloned().collect();
    if args.format == CheckFormat::Table {
        println!("{}", totals(&outcome));
    }
    emit(&outcome, &comparisons, args.format)?;
    // --junit FILE, else the configuration's `junit`.
    let junit = args
        .junit
        .clone()
        .or_else(|| plan.settings.as_ref().and_then(|s| s.junit.clone()));
    if let Some(path) = &junit {
        moe_inspect::atomic_write::write_atomic(path, drift::junit(&comparisons).as_bytes())?;
    }
    Ok(u8::from(outcome.failed()))
}

/// The totals line across models, as cargo-nextest's summary:
/// `check: 10 models: 9 passed, 1 drifted (1 pending review)`.
fn totals(outcome: &CheckOutcome) -> String {
    let n = outcome.models.len();
    let (mut passed, mut drifted, mut recorded) = (0, 0, 0);
    let (mut accepted, mut pending_review, mut unwritten) = (0, 0, 0);
    for m in &outcome.models {
        match m {
            ModelOutcome::Recorded { .. } => recorded += 1,
            ModelOutcome::Compared {
                comparison, action, ..
            } => {
                if !comparison.drift() {
                    passed += 1;
                    continue;
                }
                drifted += 1;
                match action {
                    Action::Accepted(_) => accepted += 1,
                    Action::Pending(_) => pending_review += 1,
                    _ => unwritten += 1,
                }
            }
        }
    }
    let mut parts = vec![format!("{passed} passed"), format!("{drifted} drifted")];
    if recorded > 0 {
        parts.push(format!("{recorded} recorded"));
    }
    let mut what = Vec::new();
    for (k, label) in [
        (accepted, "accepted"),
        (pending_review, "pending review"),
        (unwritten, "not written"),
    ] {
        if k > 0 {
            what.push(format!("{k} {label}"));
        }
    }
    let detail = if what.is_empty() {
        String::new()
    } else {
        format!(" ({})", what.join(", "))
    };
    format!(
        "check: {n} model{}: {}{detail}",
        if n == 1 { "" } else { "s" },
        parts.join(", ")
    )
}

/// Prints one model's outcome as soon as it is known: its drift table (table
/// format) and what was written or removed (stderr).
fn render_model(o: &ModelOutcome, args: &CheckArgs, color: bool) {
    let (cmp, action) = match o {
        ModelOutcome::Recorded { name, path } => {
            notice!("{name}: no golden file; recorded {}", path.display());
            return;
        }
        ModelOutcome::Compared {
            comparison, action, ..
        } => (comparison, action),
    };
    if args.format == CheckFormat::Table {
        print!(
            "{}",
            drift::table(
                cmp,
                args.all,
                color,
                ["golden", "now"],
                crate::commands::terminal_width()
            )
        );
    }
    let name = &cmp.name;
    match action {
        Action::None => {}
        Action::RemovedStale(p) => notice!(
            "removed {}: the check passes, so that pending snapshot is stale",
            p.display()
        ),
        Action::Accepted(p) => notice!("{name}: drift accepted; wrote {}", p.display()),
        Action::Pending(p) => notice!(
            "wrote {}: review it with `cargo moe-inspect review`",
            p.display()
        ),
        Action::NotWrittenOnCi => {
            notice!("{name}: drift; on CI no pending snapshot is written")
        }
        Action::NotWrittenByRequest => notice!(
            "{name}: drift; no pending snapshot written ({}=no)",
            pending::UPDATE_VAR
        ),
    }
}

/// Lists the pending snapshots: name, the file, and whether a golden file exists.
pub fn pending(args: PendingArgs) -> Result<u8> {
    let (_, list) = pending_list(&args.golden())?;
    for p in &list {
        println!(
            "{}\t{}\t{}",
            p.name,
            p.new.display(),
            if p.golden.exists() {
                "replaces the golden file"
            } else {
                "new (no golden file yet)"
            }
        );
    }
    Ok(0)
}

/// Machine-readable output, GitHub annotations and the step summary.
fn emit(outcome: &CheckOutcome, comparisons: &[Comparison], format: CheckFormat) -> Result<()> {
    match format {
        CheckFormat::Table => {}
        CheckFormat::Json => {
            let v = serde_json::json!({
                "schema": "moe-inspect/check/v1",
                "drift": comparisons.iter().any(Comparison::drift),
                "models": comparisons,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        CheckFormat::Junit => print!("{}", drift::junit(comparisons)),
    }
    if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
        let with_files: Vec<(&Comparison, Option<&std::path::Path>)> = outcome
            .models
            .iter()
            .filter_map(|m| match m {
                ModelOutcome::Compared {
                    comparison, golden, ..
                } => Some((comparison, Some(golden.as_path()))),
                ModelOutcome::Recorded { .. } => None,
            })
            .collect();
        let notes = drift::github_annotations(&with_files);
        if format == CheckFormat::Table {
            print!("{notes}");
        } else {
            eprint!("{notes}");
        }
        if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") {
            // The one write that is not atomic (crate::atomic_write): the step
            // summary is a file the CI runner creates and other steps append
            // to; replacing it would drop their sections, and a half-written
            // append harms no golden file.
            let path = PathBuf::from(path);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            f.write_all(drift::markdown_summary(comparisons).as_bytes())
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

fn pending_list(args: &GoldenDirArgs) -> Result<(PathBuf, Vec<pending::Pending>)> {
    check_name_flag(args.name.as_deref())?;
    let s = golden::config::load(args.manifest_path.as_deref())?;
    let dir = golden::golden_dir(args.golden_dir.as_deref(), s.as_ref());
    let list = pending::list(&dir, args.name.as_deref())?;
    if list.is_empty() {
        notice!("no pending snapshots in {}", dir.display());
    }
    Ok((dir, list))
}

pub fn accept(args: PendingArgs) -> Result<u8> {
    let (_, list) = pending_list(&args.golden())?;
    for p in list {
        pending::accept(&p)?;
        notice!("accepted {} → {}", p.new.display(), p.golden.display());
    }
    Ok(0)
}

pub fn reject(args: PendingArgs) -> Result<u8> {
    let (_, list) = pending_list(&args.golden())?;
    for p in list {
        pending::reject(&p)?;
        notice!("rejected {}", p.new.display());
    }
    Ok(0)
}

/// Shows each pending change and asks (on stdin) whether to accept it.
pub fn review(args: PendingArgs, color: bool) -> Result<u8> {
    if pending::on_ci() {
        return Err(Error::Usage(
            "review: golden files are never written on CI (CI is set)".into(),
        ));
    }
    let (_, list) = pending_list(&args.golden())?;
    let stdin = std::io::stdin();
    let terminal = std::io::IsTerminal::is_terminal(&stdin);
    // On a terminal one key answers (as cargo-insta's review); otherwise
    // answers are read a line at a time.
    let mut lines = (!terminal).then(|| stdin.lock().lines());
    let mut answer = || -> Option<String> {
        match &mut lines {
            Some(lines) => lines.next().and_then(|l| l.ok()),
            None => read_key().map(|c| {
                eprintln!("{c}");
                c.to_string()
            }),
        }
    };
    let (mut accepted, mut rejected, mut skipped) = (0usize, 0usize, 0usize);
    for p in &list {
        let new = Snapshot::read(&p.new)?;
        println!("── {} ({})", p.name, p.new.display());
        if p.golden.exists() {
            let gold = Snapshot::read(&p.golden)?;
            match compare::compare(&gold, &new, &new.tolerances) {
                Ok(cmp) => print!(
                    "{}",
                    drift::table(
                        &cmp,
                        false,
                        color,
                        ["golden", "new"],
                        crate::commands::terminal_width()
                    )
                ),
                Err(reason) => println!("not comparable with the golden file: {reason}"),
            }
        } else {
            println!("new snapshot: no golden file yet");
        }
        loop {
            eprint!("accept (a), reject (r) or skip (s)? ");
            let _ = std::io::stderr().flush();
            let Some(answer) = answer() else {
                // No answer can come (stdin closed, or not a terminal and
                // exhausted): nothing was decided for this snapshot.
                eprintln!();
                return Err(Error::Usage(format!(
                    "review: no answer for {} ({}); review needs answers on a terminal — use `cargo moe-inspect accept` or `reject` instead{}",
                    p.name,
                    if terminal { "input closed" } else { "stdin is not a terminal" },
                    summary(accepted, rejected, skipped)
                        .map(|s| format!(" ({s} so far)"))
                        .unwrap_or_default()
                )));
            };
            match answer.trim() {
                "a" | "accept" => {
                    pending::accept(p)?;
                    accepted += 1;
                    eprintln!("accepted {}", p.golden.display());
                }
                "r" | "reject" => {
                    pending::reject(p)?;
                    rejected += 1;
                    eprintln!("rejected {}", p.new.display());
                }
                "s" | "skip" | "" => {
                    skipped += 1;
                    eprintln!("skipped {}", p.name);
                }
                _ => continue,
            }
            break;
        }
    }
    if let Some(s) = summary(accepted, rejected, skipped) {
        eprintln!("reviewed {}: {s}", list.len());
    }
    Ok(0)
}

/// One key from the terminal on stdin, without waiting for Enter: the
/// terminal is put in non-canonical mode without echo for that one read and
/// restored afterwards. Ctrl-C and Ctrl-D (read as keys, not signals, so the
/// terminal is always restored) end the review: `None`.
#[cfg(unix)]
fn read_key() -> Option<char> {
    use std::io::Read;
    let fd = libc::STDIN_FILENO;
    // SAFETY: a zeroed termios is a valid value to be overwritten by tcgetattr.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is stdin, `old` is a valid termios to write into.
    if unsafe { libc::tcgetattr(fd, &mut old) } != 0 {
        return None;
    }
    let mut raw = old;
    raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    struct Restore(libc::termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the settings read above on the same fd.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
            }
        }
    }
    // SAFETY: fd is stdin, `raw` is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        return None;
    }
    let _restore = Restore(old);
    let mut b = [0u8; 1];
    match std::io::stdin().lock().read(&mut b) {
        Ok(1) if b[0] != 3 && b[0] != 4 => Some(if b[0] == b'\n' || b[0] == b'\r' {
            ' '
        } else {
            b[0] as char
        }),
        _ => None,
    }
}

#[cfg(not(unix))]
fn read_key() -> Option<char> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok()?;
    line.trim().chars().next().or(Some(' '))
}

/// `1 accepted, 0 rejected, 2 skipped`, or `None` before any decision.
fn summary(accepted: usize, rejected: usize, skipped: usize) -> Option<String> {
    (accepted + rejected + skipped > 0)
        .then(|| format!("{accepted} accepted, {rejected} rejected, {skipped} skipped"))
}

pub fn diff(args: DiffArgs, color: bool) -> Result<u8> {
    let settings = golden::config::load(args.manifest_path.as_deref())?;
    let selection = analyses_flag(args.analyses.as_ref())?.unwrap_or_default();
    let mut tolerances = match &settings {
        Some(s) => s.tolerances(Tolerances::default(), None),
        None => Tolerances::default(),
    };
    for (k, v) in tolerance_flags(&args.tolerance)? {
        tolerances.set(&k, v)?;
    }
    let out = match (&args.trace[..], &args.baseline, &args.candidate) {
        ([a, b], _, _) => {
            // clap: --trace requires --model.
            let model = args.model.as_deref().unwrap_or(std::path::Path::new("."));
            golden::diff_traces(model, a, b, tolerances)?
        }
        ([], Some(baseline), Some(candidate)) => {
            let opts = DiffOptions {
                selection,
                tolerances,
                prompts: args.prompts.prompts.clone(),
                token_ids: args.prompts.token_ids.clone(),
                device: args.device.clone(),
                coverage_threshold: args.coverage_threshold,
            };
            golden::diff(baseline, candidate, &opts, &|_| Box::new(progress_bar()))?
        }
        (traces, _, _) if !traces.is_empty() => {
            return Err(Error::Usage(format!(
                "--trace: give exactly two traces (--trace BASE --trace CANDIDATE), got {}",
                traces.len()
            )))
        }
        _ => {
            return Err(Error::Usage(
                "diff needs --baseline DIR --candidate DIR, or --trace A --trace B --model DIR"
                    .into(),
            ))
        }
    };
    let cmp = &out.comparison;
    if args.out.is_some() && args.format != DiffFormat::Markdown {
        return Err(Error::Usage(
            "--out names the directory of the Markdown report: use it with --format markdown"
                .into(),
        ));
    }
    match args.format {
        DiffFormat::Json => {
            let v = serde_json::json!({
                "schema": "moe-inspect/diff/v1",
                "baseline": out.baseline.display().to_string(),
                "candidate": out.candidate.display().to_string(),
                "drift": out.drift(),
                "comparison": cmp,
                "expert_cosine": out.expert_cosine,
                "quantisation": out.quant,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        DiffFormat::Junit => print!("{}", drift::junit(std::slice::from_ref(cmp))),
        DiffFormat::Markdown => {
            let dir = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("moe-inspect-diff"));
            let mut inputs = vec![out.baseline.clone(), out.candidate.clone()];
            inputs.extend(args.prompts.prompts.clone());
            inputs.extend(args.prompts.token_ids.clone());
            crate::commands::refuse_report_over_inputs(&dir, &inputs)?;
            let path = moe_inspect::report::quant::write_markdown(
                &out,
                &dir,
                &std::env::args().collect::<Vec<_>>().join(" "),
            )?;
            notice!("wrote {} (with SVG figures)", path.display());
        }
        DiffFormat::Table => {
            if !out.expert_cosine.is_empty() {
                println!("expert weights, baseline vs candidate:");
                println!("{}", drift::expert_cosine_table(&out.expert_cosine));
            }
            if let Some(q) = &out.quant {
                print!("{}", moe_inspect::report::quant::table(q));
            }
            print!(
                "{}",
                drift::table(
                    cmp,
                    args.all,
                    color,
                    ["base", "cand"],
                    crate::commands::terminal_width()
                )
            );
        }
    }
    Ok(u8::from(out.drift()))
}
