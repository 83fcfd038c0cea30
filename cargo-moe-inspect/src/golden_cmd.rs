//! The golden-snapshot commands: `snapshot`, `check`, `review`, `accept`,
//! `reject` and `diff`. Which models, prompts, analyses, golden directory
//! and tolerances apply comes from the flags, then the Cargo.toml
//! configuration, then the defaults.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use moe_inspect::golden::compare::{self, Comparison};
use moe_inspect::golden::config::{self, ModelEntry, Settings};
use moe_inspect::golden::{self, diff, pending, BuildOptions, Selection, Snapshot, Tolerances};
use moe_inspect::model::Model;
use moe_inspect::report::drift;
use moe_inspect::{forward, input, Error, Result};

use crate::cli::{CheckArgs, CheckFormat, DiffArgs, GoldenDirArgs, PendingArgs, SnapshotArgs};
use crate::commands::progress_bar;

/// One model to snapshot or check.
struct Target {
    name: String,
    /// `None`: the embedded demo model.
    model: Option<PathBuf>,
    prompts: Option<PathBuf>,
    token_ids: Option<PathBuf>,
    analyses: Option<Vec<String>>,
    entry: Option<ModelEntry>,
}

fn settings(manifest: Option<&Path>) -> Result<Option<Settings>> {
    config::load(manifest)
}

fn golden_dir(args: &GoldenDirArgs, s: Option<&Settings>) -> PathBuf {
    args.golden_dir
        .clone()
        .or_else(|| s.and_then(|s| s.golden_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("golden"))
}

/// The name of a model directory (its last path component).
fn dir_name(dir: &Path) -> String {
    let abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The golden name of a model directory: its name with every character a
/// golden name cannot hold (`.`, spaces, non-ASCII) replaced by `_`.
fn golden_name_of_dir(dir: &Path) -> String {
    pending::sanitize_name(&dir_name(dir))
}

/// Checks `--name` like a Cargo.toml package `name` (exit 2 otherwise).
fn check_name_flag(name: Option<&str>) -> Result<()> {
    match name {
        Some(n) => pending::check_name(n).map_err(|e| Error::Usage(format!("--name: {e}"))),
        None => Ok(()),
    }
}

fn targets(args: &SnapshotArgs, s: Option<&Settings>) -> Result<Vec<Target>> {
    check_name_flag(args.golden.name.as_deref())?;
    let flag_analyses = args.analyses.as_ref().map(|a| vec![a.clone()]);
    let global_prompts = || {
        (
            args.prompts.prompts.clone().or_else(|| {
                if args.prompts.token_ids.is_some() {
                    None
                } else {
                    s.and_then(|s| s.prompts.clone())
                }
            }),
            args.prompts.token_ids.clone().or_else(|| {
                if args.prompts.prompts.is_some() {
                    None
                } else {
                    s.and_then(|s| s.token_ids.clone())
                }
            }),
        )
    };
    let global_analyses = || {
        flag_analyses
            .clone()
            .or_else(|| s.and_then(|s| s.analyses.clone()))
    };
    if args.model.model.is_some() || args.model.demo {
        let (prompts, token_ids) = global_prompts();
        let name = args
            .golden
            .name
            .clone()
            .unwrap_or_else(|| match &args.model.model {
                Some(dir) => golden_name_of_dir(dir),
                None => "demo".into(),
            });
        return Ok(vec![Target {
            name,
            model: args.model.model.clone(),
            prompts,
            token_ids,
            analyses: global_analyses(),
            entry: None,
        }]);
    }
    let configured = s.map(|s| s.models.as_slice()).unwrap_or_default();
    if configured.is_empty() {
        let (prompts, token_ids) = global_prompts();
        return Ok(vec![Target {
            name: args.golden.name.clone().unwrap_or_else(|| "demo".into()),
            model: None,
            prompts,
            token_ids,
            analyses: global_analyses(),
            entry: None,
        }]);
    }
    let chosen: Vec<&ModelEntry> = match &args.golden.name {
        Some(n) => {
            let found: Vec<&ModelEntry> = configured.iter().filter(|m| &m.name == n).collect();
            if found.is_empty() {
                return Err(Error::Usage(format!(
                    "--name {n}: no such model in {} (configured: {})",
                    s.map(|s| s.manifest.display().to_string())
                        .unwrap_or_default(),
                    configured
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            found
        }
        None => configured.iter().collect(),
    };
    Ok(chosen
        .into_iter()
        .map(|m| {
            let flags_given = args.prompts.prompts.is_some() || args.prompts.token_ids.is_some();
            let (prompts, token_ids) =
                if flags_given || (m.prompts.is_none() && m.token_ids.is_none()) {
                    global_prompts()
                } else {
                    (m.prompts.clone(), m.token_ids.clone())
                };
            Target {
                name: m.name.clone(),
                model: m.path.clone(),
                prompts,
                token_ids,
                analyses: flag_analyses
                    .clone()
                    .or_else(|| m.analyses.clone())
                    .or_else(|| s.and_then(|s| s.analyses.clone())),
                entry: Some(m.clone()),
            }
        })
        .collect())
}

fn parse_tolerance_flags(base: Tolerances, flags: &[String]) -> Result<Tolerances> {
    let mut t = base;
    for f in flags {
        let (k, v) = f.split_once('=').ok_or_else(|| {
            Error::Usage(format!(
                "--tolerance {f}: expected KEY=VALUE, e.g. similarity=1e-4"
            ))
        })?;
        let v: f64 = v
            .trim()
            .parse()
            .map_err(|_| Error::Usage(format!("--tolerance {f}: `{v}` is not a number")))?;
        t.set(k.trim(), v)
            .map_err(|e| Error::Usage(format!("--tolerance: {e}")))?;
    }
    Ok(t)
}

fn tolerances(
    base: Tolerances,
    s: Option<&Settings>,
    t: Option<&ModelEntry>,
    flags: &[String],
) -> Result<Tolerances> {
    let base = match s {
        Some(s) => s.tolerances(base, t),
        None => base,
    };
    parse_tolerance_flags(base, flags)
}

fn selection(list: Option<&Vec<String>>) -> Result<Selection> {
    match list {
        Some(l) => Selection::parse(l).map_err(|e| Error::Usage(format!("--analyses: {e}"))),
        None => Ok(Selection::default()),
    }
}

fn open(t: &Target) -> Result<Model> {
    match &t.model {
        Some(dir) => crate::commands::open_dir(dir),
        None => Model::demo(),
    }
}

fn prompts_for(
    model: Option<&Path>,
    prompts: Option<&Path>,
    token_ids: Option<&Path>,
    sel: Selection,
) -> Result<Option<Vec<Vec<u32>>>> {
    if !sel.needs_prompts() {
        return Ok(None);
    }
    let p = input::resolve(model, &input::PromptArgs { prompts, token_ids })?;
    Ok(Some(p.ids))
}

/// Computes the snapshot of a target.
fn record(t: &Target, sel: Selection, tol: Tolerances, device: &str) -> Result<Snapshot> {
    let device = forward::parse_device(device)?;
    let model = open(t)?;
    let mut sel = sel;
    if t.analyses.is_none()
        && !model.info.family.native_forward()
        && (sel.routing || sel.norm_score)
    {
        // The default selection records routing too; a family without a
        // native forward records what it can. (Asked for explicitly, the
        // dynamic analyses fail with the "static analyses only" error.)
        eprintln!(
            "notice: {}: family `{}` has no native forward pass: recording the static analyses only",
            t.name,
            model.info.family.id()
        );
        sel.routing = false;
        sel.norm_score = false;
    }
    let prompts = prompts_for(
        t.model.as_deref(),
        t.prompts.as_deref(),
        t.token_ids.as_deref(),
        sel,
    )?;
    golden::build(
        &model,
        &BuildOptions {
            name: t.name.clone(),
            selection: sel,
            prompts: prompts.as_deref(),
            device,
            tolerances: tol,
            keep_router_probs: false,
        },
        &progress_bar(),
    )
}

pub fn snapshot(args: SnapshotArgs) -> Result<u8> {
    let s = settings(args.golden.manifest_path.as_deref())?;
    let dir = golden_dir(&args.golden, s.as_ref());
    let targets = targets(&args, s.as_ref())?;
    if pending::on_ci() {
        let names: Vec<String> = targets
            .iter()
            .map(|t| pending::golden_path(&dir, &t.name).display().to_string())
            .collect();
        return Err(Error::Usage(format!(
            "snapshot: golden files are never written on CI (CI is set), not even new ones ({}); record snapshots locally",
            names.join(", ")
        )));
    }
    for t in targets {
        let sel = selection(t.analyses.as_ref())?;
        let tol = tolerances(
            Tolerances::default(),
            s.as_ref(),
            t.entry.as_ref(),
            &args.tolerance,
        )?;
        let path = pending::golden_path(&dir, &t.name);
        let snap = record(&t, sel, tol, &args.model.device)?;
        snap.write(&path)?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "wrote {} ({}): {} MoE layers{}",
            path.display(),
            human_size(size),
            snap.layers.len(),
            snap.prompts
                .as_ref()
                .map(|p| format!(", {} prompts, {} tokens", p.count, p.tokens))
                .unwrap_or_default()
        );
    }
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
    let sargs = &args.snapshot;
    let s = settings(sargs.golden.manifest_path.as_deref())?;
    let dir = golden_dir(&sargs.golden, s.as_ref());
    let update = pending::UpdateMode::resolve(args.accept)?;
    let mut comparisons = Vec::new();
    for t in targets(sargs, s.as_ref())? {
        let path = pending::golden_path(&dir, &t.name);
        if update == pending::UpdateMode::Always && !path.exists() {
            // Accepting: a missing golden file is recorded, as `snapshot` would.
            let sel = selection(t.analyses.as_ref())?;
            let tol = tolerances(
                Tolerances::default(),
                s.as_ref(),
                t.entry.as_ref(),
                &sargs.tolerance,
            )?;
            let snap = record(&t, sel, tol, &sargs.model.device)?;
            snap.write(&path)?;
            eprintln!("{}: no golden file; recorded {}", t.name, path.display());
            continue;
        }
        let gold = Snapshot::read(&path)?;
        let sel = match &t.analyses {
            Some(list) => selection(Some(list))?,
            None => Selection::parse(&gold.analyses).map_err(|reason| Error::Input {
                path: path.clone(),
                reason: format!("corrupt golden snapshot: {reason}"),
            })?,
        };
        let tol = tolerances(
            gold.tolerances,
            s.as_ref(),
            t.entry.as_ref(),
            &sargs.tolerance,
        )?;
        let now = record(&t, sel, tol, &sargs.model.device)?;
        let cmp = compare::compare(&gold, &now, &tol).map_err(|reason| Error::Incompatible {
            path: path.clone(),
            reason,
        })?;
        if args.format == CheckFormat::Table {
            print!(
                "{}",
                drift::table(
                    &cmp,
                    args.all,
                    color,
                    ["golden", "now"],
                    crate::commands::terminal_width()
                )
            );
        }
        if cmp.drift() {
            match update {
                pending::UpdateMode::Always => {
                    now.write(&path)?;
                    eprintln!("{}: drift accepted; wrote {}", t.name, path.display());
                }
                pending::UpdateMode::New => {
                    let new = pending::pending_path(&dir, &t.name);
                    now.write(&new)?;
                    eprintln!(
                        "wrote {}: review it with `cargo moe-inspect review`",
                        new.display()
                    );
                }
                pending::UpdateMode::No if pending::on_ci() => {
                    eprintln!("{}: drift; on CI no pending snapshot is written", t.name)
                }
                pending::UpdateMode::No => eprintln!(
                    "{}: drift; no pending snapshot written ({}=no)",
                    t.name,
                    pending::UPDATE_VAR
                ),
            }
        } else if let Some(stale) = pending::remove_stale(&dir, &t.name)? {
            eprintln!(
                "removed {}: the check passes, so that pending snapshot is stale",
                stale.display()
            );
        }
        comparisons.push(cmp);
    }
    emit(&comparisons, args.format)?;
    if let Some(path) = &args.junit {
        moe_inspect::atomic_write::write_atomic(path, drift::junit(&comparisons).as_bytes())?;
    }
    let accepted = update == pending::UpdateMode::Always;
    Ok(if !accepted && comparisons.iter().any(Comparison::drift) {
        1
    } else {
        0
    })
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
fn emit(comparisons: &[Comparison], format: CheckFormat) -> Result<()> {
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
        let notes = drift::github_annotations(comparisons);
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
    let s = settings(args.manifest_path.as_deref())?;
    let dir = golden_dir(args, s.as_ref());
    let list = pending::list(&dir, args.name.as_deref())?;
    if list.is_empty() {
        eprintln!("no pending snapshots in {}", dir.display());
    }
    Ok((dir, list))
}

pub fn accept(args: PendingArgs) -> Result<u8> {
    let (_, list) = pending_list(&args.golden())?;
    for p in list {
        pending::accept(&p)?;
        eprintln!("accepted {} → {}", p.new.display(), p.golden.display());
    }
    Ok(0)
}

pub fn reject(args: PendingArgs) -> Result<u8> {
    let (_, list) = pending_list(&args.golden())?;
    for p in list {
        pending::reject(&p)?;
        eprintln!("rejected {}", p.new.display());
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
    let mut lines = stdin.lock().lines();
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
            let Some(Ok(answer)) = lines.next() else {
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

/// `1 accepted, 0 rejected, 2 skipped`, or `None` before any decision.
fn summary(accepted: usize, rejected: usize, skipped: usize) -> Option<String> {
    (accepted + rejected + skipped > 0)
        .then(|| format!("{accepted} accepted, {rejected} rejected, {skipped} skipped"))
}

pub fn diff(args: DiffArgs, color: bool) -> Result<u8> {
    let s = settings(args.manifest_path.as_deref())?;
    let sel = selection(args.analyses.as_ref().map(|a| vec![a.clone()]).as_ref())?;
    let tol = tolerances(Tolerances::default(), s.as_ref(), None, &args.tolerance)?;
    let device = forward::parse_device(&args.device)?;
    let a = crate::commands::open_dir(&args.baseline)?;
    let b = crate::commands::open_dir(&args.candidate)?;
    let prompts = prompts_for(
        Some(&args.baseline),
        args.prompts.prompts.as_deref(),
        args.prompts.token_ids.as_deref(),
        sel,
    )?;
    let build = |model: &Model, name: String| {
        golden::build(
            model,
            &BuildOptions {
                name,
                selection: sel,
                prompts: prompts.as_deref(),
                device: device.clone(),
                tolerances: tol,
                keep_router_probs: true,
            },
            &progress_bar(),
        )
    };
    let label = format!(
        "{} → {}",
        dir_name(&args.baseline),
        dir_name(&args.candidate)
    );
    let sa = build(&a, label)?;
    let sb = build(&b, dir_name(&args.candidate))?;
    let cmp = compare::compare(&sa, &sb, &tol).map_err(|reason| Error::Incompatible {
        path: args.candidate.clone(),
        reason,
    })?;
    let cos = diff::expert_cosines(&a, &b)?;
    match args.format {
        CheckFormat::Json => {
            let v = serde_json::json!({
                "schema": "moe-inspect/diff/v1",
                "baseline": args.baseline.display().to_string(),
                "candidate": args.candidate.display().to_string(),
                "drift": cmp.drift(),
                "comparison": cmp,
                "expert_cosine": cos,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        CheckFormat::Junit => print!("{}", drift::junit(std::slice::from_ref(&cmp))),
        CheckFormat::Table => {
            println!("expert weights, baseline vs candidate:");
            println!("{}", drift::expert_cosine_table(&cos));
            print!(
                "{}",
                drift::table(
                    &cmp,
                    args.all,
                    color,
                    ["baseline", "candidate"],
                    crate::commands::terminal_width()
                )
            );
        }
    }
    Ok(if cmp.drift() { 1 } else { 0 })
}
