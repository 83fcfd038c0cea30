//! Turns parsed arguments into library calls and output.

use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions, Progress};
use moe_inspect::layers::LayerSelection;
use moe_inspect::model::{DenseModel, Family, Model};
use moe_inspect::report::{self, table::Styling};
use moe_inspect::{forward, input};
use moe_inspect::{Error, Result};

use crate::cli::{
    AnalyzeArgs, Cli, ColorChoice, Command, ModelArgs, ModelsArgs, OutputFormat, TraceArgs,
};

/// Runs a command; the returned code is the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let style = Styling {
        color: use_color(cli.color),
    };
    match cli.command {
        Command::Analyze(args) => analyze(args, style),
        Command::Models(args) => models(args),
        Command::Trace(args) => trace(args),
        Command::Snapshot(args) => crate::golden_cmd::snapshot(args),
        Command::Check(args) => crate::golden_cmd::check(args, style.color),
        Command::Review(args) => crate::golden_cmd::review(args, style.color),
        Command::Accept(args) => crate::golden_cmd::accept(args),
        Command::Reject(args) => crate::golden_cmd::reject(args),
        Command::Diff(args) => crate::golden_cmd::diff(args, style.color),
        Command::Bench(args) => crate::bench_cmd::bench(args, interactive()),
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

/// Whether to draw progress bars: only on a terminal, never on CI.
fn interactive() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

fn open_model(args: &ModelArgs) -> Result<Model> {
    forward::parse_device(&args.device)?;
    match &args.model {
        Some(dir) => Model::open(dir),
        None => Model::demo(),
    }
}

fn trace(args: TraceArgs) -> Result<u8> {
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
        OutputFormat::Table => print!("{}", report::table::render(&report, style)),
        OutputFormat::Json => {
            let json = report::to_json(&report);
            if let Some(dir) = &args.out {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                let path = dir.join("report.json");
                std::fs::write(&path, &json).map_err(|e| io(&path, e))?;
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
            };
            let path = report::markdown::write(&report, &dir, md)?;
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
    let rows: Vec<_> = Family::ALL.iter().map(|f| f.describe()).collect();
    match args.format {
        OutputFormat::Json => println!("{}", report::to_json_value(&rows)),
        _ => print!("{}", report::table::families(&rows)),
    }
    Ok(0)
}
