//! Turns parsed arguments into library calls and output.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions, Progress};
use moe_inspect::atomic_write;
use moe_inspect::layers::LayerSelection;
use moe_inspect::model::{DenseModel, Family, Model};
use moe_inspect::report::{self, table::Styling};
use moe_inspect::{forward, input};
use moe_inspect::{Error, Result};

use crate::cli::{
    AnalyzeArgs, Cli, ColorChoice, Command, ListFormat, ModelArgs, ModelsArgs, OutputFormat,
    TraceArgs,
};

/// Runs a command; the returned code is the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let style = Styling {
        color: use_color(cli.color),
        width: terminal_width(),
        full: false,
    };
    match cli.command {
        Command::Analyze(args) => analyze(args, style),
        Command::Models(args) => models(args),
        Command::Trace(args) => trace(args),
        Command::Snapshot(args) => crate::golden_cmd::snapshot(args),
        Command::Check(args) => crate::golden_cmd::check(args, style.color),
        Command::Pending(args) => crate::golden_cmd::pending(args),
        Command::Review(args) => crate::golden_cmd::review(args, style.color),
        Command::Accept(args) => crate::golden_cmd::accept(args),
        Command::Reject(args) => crate::golden_cmd::reject(args),
        Command::Diff(args) => crate::golden_cmd::diff(args, style.color),
        Command::Bench(args) => crate::bench_cmd::bench(args, interactive()),
        Command::Completions(args) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(
                args.shell,
                &mut cmd,
                "cargo-moe-inspect",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Init(args) => init(&args.manifest_path),
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command().name("cargo-moe-inspect");
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| Error::io("<stdout>", e))?;
            use std::io::Write;
            std::io::stdout()
                .write_all(&out)
                .map_err(|e| Error::io("<stdout>", e))?;
            Ok(0)
        }
    }
}

fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stdout().is_terminal()
        }
    }
}

/// Display columns to fit tables into: `COLUMNS` when set and numeric
/// (`COLUMNS=0`: no limit), else the terminal's width when stdout is one,
/// else 80.
pub fn terminal_width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return (n > 0).then_some(n);
    }
    if std::io::stdout().is_terminal() {
        // SAFETY: TIOCGWINSZ fills a winsize struct we own; fd 1 is open.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
        if rc == 0 && ws.ws_col > 0 {
            return Some(usize::from(ws.ws_col));
        }
    }
    Some(80)
}

/// Whether to draw progress bars: only on a terminal, never on CI.
fn interactive() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

fn open_model(args: &ModelArgs) -> Result<Model> {
    forward::parse_device(&args.device)?;
    match &args.model {
        Some(dir) => open_dir(dir),
        None => Model::demo(),
    }
}

/// Opens a model directory; what was inferred about a family the table does
/// not know goes to stderr.
pub(crate) fn open_dir(dir: &Path) -> Result<Model> {
    let model = Model::open(dir)?;
    if let Some(notice) = model.notice() {
        eprintln!("notice: {notice}");
    }
    Ok(model)
}

/// The files a run reads: the checkpoint's config.json, tokenizer.json and
/// weights (one file, or the index and every shard it names; a `.gguf` file
/// itself), and the prompts or token-ids file. Outputs must not be any of them.
fn input_files(model: Option<&Path>, prompts: &crate::cli::PromptArgs) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = prompts
        .prompts
        .iter()
        .chain(&prompts.token_ids)
        .cloned()
        .collect();
    if let Some(m) = model {
        files.extend(checkpoint_files(m));
    }
    files
}

fn checkpoint_files(model: &Path) -> Vec<PathBuf> {
    if !model.is_dir() {
        return vec![model.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    .iter()
    .map(|f| model.join(f))
    .collect();
    let index = model.join("model.safetensors.index.json");
    if let Some(map) = std::fs::read(&index)
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("weight_map").and_then(|m| m.as_object().cloned()))
    {
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        files.extend(
            shards
                .into_iter()
                .filter(|s| Path::new(s).components().count() == 1)
                .map(|s| model.join(s)),
        );
    }
    files
}

/// Refuses a report directory whose `report.json`, `report.md` or figures
/// would replace one of `inputs`.
fn refuse_report_over_inputs(dir: &Path, inputs: &[PathBuf]) -> Result<()> {
    for name in ["report.json", "report.md"] {
        atomic_write::refuse_overwriting_input("--out", &dir.join(name), inputs)?;
    }
    let Ok(dir_c) = dir.canonicalize() else {
        return Ok(());
    };
    for input in inputs {
        let is_figure = input
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".svg"));
        let in_dir = input
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .and_then(|p| p.canonicalize().ok())
            .is_some_and(|p| p == dir_c);
        if is_figure && in_dir {
            return Err(Error::Usage(format!(
                "--out {}: refusing to write report figures over an input of this run ({})",
                dir.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

fn trace(args: TraceArgs) -> Result<u8> {
    atomic_write::refuse_overwriting_input(
        "--out",
        &args.out,
        &input_files(args.model.model.as_deref(), &args.prompts),
    )?;
    let device = forward::parse_device(&args.model.device)?;
    let model = open_model(&args.model)?;
    let prompts = input::resolve(
        args.model.model.as_deref(),
        &input::PromptArgs {
            prompts: args.prompts.prompts.as_deref(),
            token_ids: args.prompts.token_ids.as_deref(),
        },
    )?;
    let fwd = forward::Forward::new(&model, device)?;
    let summary = moe_inspect::trace::trace(
        &fwd,
        &model.info.moe_layers,
        &prompts,
        args.logits,
        &args.out,
    )?;
    eprintln!(
        "wrote {}: {} prompts, {} tokens, {} MoE layers",
        args.out.display(),
        summary.prompts,
        summary.tokens,
        summary.moe_layers
    );
    Ok(0)
}

pub(crate) struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn start(&self, total: usize) {
        if let Some(b) = &self.0 {
            b.reset();
            b.set_length(total as u64);
        }
    }
    fn layer_done(&self, layer: usize) {
        if let Some(b) = &self.0 {
            b.set_message(format!("layer {layer}"));
            b.inc(1);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.set_position(b.length().unwrap_or(0));
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

pub(crate) fn progress_bar() -> Bar {
    if !interactive() {
        return Bar(None);
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} layers {msg} [{elapsed}]")
    {
        bar.set_style(style);
    }
    Bar(Some(bar))
}

fn analyze(args: AnalyzeArgs, style: Styling) -> Result<u8> {
    let analyses = AnalysisKind::parse_selection(&args.analyses)?;
    let writes_to = match args.format {
        OutputFormat::Table => None,
        OutputFormat::Json => args.out.clone(),
        OutputFormat::Markdown => Some(
            args.out
                .clone()
                .unwrap_or_else(|| PathBuf::from("moe-inspect-report")),
        ),
    };
    if let Some(dir) = &writes_to {
        let mut inputs = input_files(args.model.model.as_deref(), &args.prompts);
        if let Some(d) = &args.dense_reference {
            inputs.extend(checkpoint_files(d));
        }
        refuse_report_over_inputs(dir, &inputs)?;
    }
    let layers = args
        .layers
        .as_deref()
        .map(LayerSelection::parse)
        .transpose()?;
    let model = open_model(&args.model)?;
    let dense = args
        .dense_reference
        .as_deref()
        .map(DenseModel::open)
        .transpose()?;
    if let Some(sel) = &layers {
        let (_, skipped) = analysis::selected_layers(&model, Some(sel))?;
        if !skipped.is_empty() {
            eprintln!(
                "note: skipping dense (non-MoE) layers {}",
                moe_inspect::layers::format_list(&skipped)
            );
        }
    }
    let needs_forward = analyses.iter().any(|a| !a.is_static());
    let prompts = if needs_forward {
        Some(input::resolve(
            args.model.model.as_deref(),
            &input::PromptArgs {
                prompts: args.prompts.prompts.as_deref(),
                token_ids: args.prompts.token_ids.as_deref(),
            },
        )?)
    } else {
        None
    };
    let fwd = if needs_forward {
        Some(forward::Forward::new(
            &model,
            forward::parse_device(&args.model.device)?,
        )?)
    } else {
        None
    };
    let opts = AnalyzeOptions {
        analyses,
        layers,
        dense: dense.as_ref(),
        dynamic: match (&fwd, &prompts) {
            (Some(f), Some(p)) => Some(analysis::DynamicInput {
                forward: f,
                prompts: &p.ids,
                threshold_fraction: args.threshold,
            }),
            _ => None,
        },
    };
    let mut report = analysis::run(&model, &opts, &progress_bar())?;
    if let Some(p) = &prompts {
        if let Ok(tok) = input::tokenizer(args.model.model.as_deref()) {
            report.maps.token_ids = p.ids.first().cloned().unwrap_or_default();
            report.token_labels = tok.token_strings(&report.maps.token_ids);
        }
    }
    match args.format {
        OutputFormat::Table => print!(
            "{}",
            report::table::render(
                &report,
                Styling {
                    full: args.full,
                    ..style
                }
            )
        ),
        OutputFormat::Json => {
            let json = report::to_json(&report);
            if let Some(dir) = &args.out {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                let path = dir.join("report.json");
                atomic_write::write_atomic(&path, json.as_bytes())?;
                eprintln!("wrote {}", path.display());
            }
            println!("{json}");
        }
        OutputFormat::Markdown => {
            let dir = args
                .out
                .unwrap_or_else(|| PathBuf::from("moe-inspect-report"));
            let md = report::markdown::MarkdownOptions {
                shared_scale: args.shared_scale,
                command_line: std::env::args().collect::<Vec<_>>().join(" "),
            };
            let path = report::markdown::write(&report, &dir, &md)?;
            eprintln!("wrote {} (with SVG figures)", path.display());
        }
    }
    Ok(0)
}

fn io(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn models(args: ModelsArgs) -> Result<u8> {
    let rows: Vec<_> = Family::all().map(|f| f.describe()).collect();
    match args.format {
        ListFormat::Json => println!("{}", report::to_json_value(&rows)),
        ListFormat::Table => print!("{}", report::table::families(&rows, terminal_width())),
    }
    Ok(0)
}

/// `init`: appends the commented configuration block to a manifest
/// (atomically; refused when the manifest already has one).
fn init(manifest: &Path) -> Result<u8> {
    let text = std::fs::read_to_string(manifest).map_err(|e| Error::io(manifest, e))?;
    if text.contains("metadata.moe-inspect") {
        return Err(Error::Input {
            path: manifest.to_path_buf(),
            reason: "already has a `metadata.moe-inspect` table; edit it there".into(),
        });
    }
    let workspace = text.lines().any(|l| l.trim() == "[workspace]");
    if !workspace && !text.lines().any(|l| l.trim() == "[package]") {
        return Err(Error::Input {
            path: manifest.to_path_buf(),
            reason: "neither a [package] nor a [workspace] table: not a Cargo manifest".into(),
        });
    }
    let mut out = text;
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&moe_inspect::golden::config::init_block(workspace));
    atomic_write::write_atomic(manifest, out.as_bytes())?;
    eprintln!(
        "added [{}.metadata.moe-inspect] to {}: uncomment what you need, then `cargo moe-inspect snapshot`",
        if workspace { "workspace" } else { "package" },
        manifest.display()
    );
    Ok(0)
}
