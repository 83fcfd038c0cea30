//! Turns parsed arguments into library calls and output.

use std::cell::Cell;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions, Progress};
use moe_inspect::atomic_write;
use moe_inspect::layers::LayerSelection;
use moe_inspect::model::{DenseModel, Family, Model};
use moe_inspect::report::{self, table::Styling};
use moe_inspect::{forward, input};
use moe_inspect::{Error, Result};

use crate::cli::{
    AnalyzeArgs, CheckFormat, Cli, ColorChoice, Command, DiffFormat, ListFormat, ModelArgs,
    ModelsArgs, OutputFormat, TraceArgs,
};

/// How much goes to stderr besides errors: 0 `--quiet`, 1 default, 2 `--verbose`.
static VERBOSITY: AtomicU8 = AtomicU8::new(1);

/// `--quiet`: no progress bars, no notices.
pub fn quiet() -> bool {
    VERBOSITY.load(Ordering::Relaxed) == 0
}

/// `--verbose`: files read and written, phase timings.
pub fn verbose() -> bool {
    VERBOSITY.load(Ordering::Relaxed) >= 2
}

/// Runs `f` as phase `what`; with `--verbose`, prints how long it took.
pub fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    detail!("time: {what}: {:.3} s", t.elapsed().as_secs_f64());
    out
}

/// `--flag` is only read by the table format: refused with the others
/// instead of being silently ignored.
fn table_only(flag: &str, given: bool, table: bool, format: &str) -> Result<()> {
    if given && !table {
        return Err(Error::Usage(format!(
            "{flag} applies to the table only; --format {format} ignores it (drop {flag})"
        )));
    }
    Ok(())
}

fn check_format_name(f: CheckFormat) -> &'static str {
    match f {
        CheckFormat::Table => "table",
        CheckFormat::Json => "json",
        CheckFormat::Junit => "junit",
    }
}

/// Runs a command; the returned code is the process exit code.
pub fn run(cli: Cli) -> Result<u8> {
    moe_inspect::memory::set_max_memory(cli.max_memory);
    VERBOSITY.store(
        if cli.quiet {
            0
        } else if cli.verbose {
            2
        } else {
            1
        },
        Ordering::Relaxed,
    );
    let style = Styling {
        color: use_color(cli.color),
        width: terminal_width(),
        full: false,
    };
    let started = Instant::now();
    let code = match cli.command {
        Command::Analyze(args) => analyze(args, style),
        Command::Models(args) => models(args),
        Command::Trace(args) => trace(args),
        Command::Import(args) => crate::import_cmd::import(args),
        Command::Snapshot(args) => crate::golden_cmd::snapshot(args),
        Command::Check(args) => {
            table_only(
                "--all",
                args.all,
                args.format == CheckFormat::Table,
                check_format_name(args.format),
            )?;
            crate::golden_cmd::check(args, style.color)
        }
        Command::Pending(args) => crate::golden_cmd::pending(args),
        Command::Review(args) => crate::golden_cmd::review(args, style.color),
        Command::Accept(args) => crate::golden_cmd::accept(args),
        Command::Reject(args) => crate::golden_cmd::reject(args),
        Command::Diff(args) => {
            table_only(
                "--all",
                args.all,
                args.format == DiffFormat::Table,
                match args.format {
                    DiffFormat::Table => "table",
                    DiffFormat::Json => "json",
                    DiffFormat::Junit => "junit",
                    DiffFormat::Markdown => "markdown",
                },
            )?;
            crate::golden_cmd::diff(args, style.color)
        }
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
    };
    detail!("time: total: {:.3} s", started.elapsed().as_secs_f64());
    code
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

/// Whether to draw progress bars: only on a terminal, never on CI or with
/// `--quiet`.
fn interactive() -> bool {
    !quiet() && std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

fn open_model(args: &ModelArgs) -> Result<Model> {
    forward::parse_device(&args.device)?;
    timed("open model", || match &args.model {
        Some(dir) => {
            for f in checkpoint_files(dir).iter().filter(|f| f.is_file()) {
                detail!("read: {}", f.display());
            }
            open_dir(dir)
        }
        None => {
            detail!("read: the embedded demo model");
            Model::demo()
        }
    })
}

/// With `--verbose`, names the prompt file a run reads.
fn detail_prompts(p: &crate::cli::PromptArgs) {
    for f in p.prompts.iter().chain(&p.token_ids) {
        detail!("read: {}", f.display());
    }
}

/// Opens a model directory; what was inferred about a family the table does
/// not know goes to stderr.
pub(crate) fn open_dir(dir: &Path) -> Result<Model> {
    let model = Model::open(dir)?;
    if let Some(notice) = model.notice() {
        notice!("notice: {notice}");
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
pub(crate) fn refuse_report_over_inputs(dir: &Path, inputs: &[PathBuf]) -> Result<()> {
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
    if let Some(old) = &args.out {
        return Err(Error::Usage(format!(
            "trace --out was renamed: use `--output {}` (`--out` names a directory in analyze and bench)",
            old.display()
        )));
    }
    let output = args
        .output
        .clone()
        .ok_or_else(|| Error::Usage("trace: --output FILE is required".into()))?;
    atomic_write::refuse_overwriting_input(
        "--output",
        &output,
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
    detail_prompts(&args.prompts);
    let fwd = forward::Forward::new(&model, device)?.resident_if_fits(forward::Passes::One);
    let summary = timed("forward pass and trace", || {
        moe_inspect::trace::trace(&fwd, &model.info.moe_layers, &prompts, args.logits, &output)
    })?;
    // After the run: a failing run's error stays the only line.
    if let Some(r) = fwd.residency() {
        notice!("{r}");
    }
    notice!(
        "wrote {}: {} prompts, {} tokens, {} MoE layers",
        output.display(),
        summary.prompts,
        summary.tokens,
        summary.moe_layers
    );
    Ok(0)
}

/// Progress over layers on stderr. The bar stays hidden until `start` gives
/// its length (no "0/0" first frame), is named after the model, and counts
/// each phase of a golden run on its own: first the static analyses over
/// the MoE layers, then the forward pass over all layers of the model.
pub(crate) struct Bar {
    bar: Option<ProgressBar>,
    /// Shown before the bar: the model's name, or empty.
    label: String,
    /// Layers of one forward pass (golden runs with prompts), else 0.
    forward_layers: usize,
    /// Where the bar draws once started.
    target: Cell<Option<ProgressDrawTarget>>,
    /// The phases of this run (name, layers) and the current one.
    phases: Cell<Option<Vec<(&'static str, usize)>>>,
    phase: Cell<usize>,
    /// Layers done in the current phase, and when it began.
    done: Cell<usize>,
    since: Cell<Option<Instant>>,
}

impl Bar {
    fn new(label: &str, forward_layers: usize, target: Option<ProgressDrawTarget>) -> Bar {
        let bar = target.is_some().then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix}{bar:30} {pos}/{len} layers {msg} [{elapsed}]",
            ) {
                b.set_style(style);
            }
            b
        });
        Bar {
            bar,
            label: label.to_string(),
            forward_layers,
            target: Cell::new(target),
            phases: Cell::new(None),
            phase: Cell::new(0),
            done: Cell::new(0),
            since: Cell::new(None),
        }
    }

    /// Shows phase `i` on the bar, from 0.
    fn show(&self, b: &ProgressBar, (name, len): (&'static str, usize)) {
        let prefix = match (self.label.is_empty(), name.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("{name} "),
            (false, true) => format!("{} ", self.label),
            (false, false) => format!("{}: {name} ", self.label),
        };
        b.set_prefix(prefix);
        b.set_message("");
        b.set_length(len as u64);
        b.set_position(0);
    }

    /// With `--verbose`, the time of the phase that just ended (golden runs).
    fn time_phase(&self, name: &str) {
        if let Some(t) = self.since.take() {
            if !self.label.is_empty() {
                let name = if name.is_empty() { "layers" } else { name };
                detail!(
                    "time: {}: {name}: {:.3} s",
                    self.label,
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
}

impl Progress for Bar {
    fn notice(&self, text: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| notice!("notice: {text}")),
            None => notice!("notice: {text}"),
        }
    }
    fn start(&self, total: usize) {
        let f = self.forward_layers;
        // A golden run counts static layers, then forward layers, in one total.
        let phases: Vec<(&'static str, usize)> = if f == 0 {
            vec![("", total)]
        } else if total == f {
            vec![("forward pass", f)]
        } else if total > f {
            vec![("static analyses", total - f), ("forward pass", f)]
        } else {
            vec![("", total)]
        };
        self.phase.set(0);
        self.done.set(0);
        self.since.set(Some(Instant::now()));
        if let Some(b) = &self.bar {
            b.reset();
            self.show(b, phases[0]);
            if let Some(t) = self.target.take() {
                b.set_draw_target(t);
            }
        }
        self.phases.set(Some(phases));
    }
    fn layer_done(&self, layer: usize) {
        let phases = self.phases.take().unwrap_or_default();
        let i = self.phase.get();
        if let Some(&(name, len)) = phases.get(i) {
            if self.done.get() >= len && i + 1 < phases.len() {
                self.time_phase(name);
                self.phase.set(i + 1);
                self.done.set(0);
                self.since.set(Some(Instant::now()));
                if let Some(b) = &self.bar {
                    self.show(b, phases[i + 1]);
                }
            }
        }
        self.phases.set(Some(phases));
        self.done.set(self.done.get() + 1);
        if let Some(b) = &self.bar {
            b.set_message(format!("layer {layer}"));
            b.inc(1);
        }
    }
    fn detail(&self, text: &str) {
        if let Some(b) = &self.bar {
            b.set_message(text.to_string());
        }
    }
    fn finish(&self) {
        let phases = self.phases.take().unwrap_or_default();
        if let Some(&(name, _)) = phases.get(self.phase.get()) {
            self.time_phase(name);
        }
        self.phases.set(Some(phases));
        if let Some(b) = &self.bar {
            b.set_position(b.length().unwrap_or(0));
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A progress bar over layers (nothing unless stderr is a terminal).
pub(crate) fn progress_bar() -> Bar {
    golden_progress("", 0)
}

/// The progress bar of a golden snapshot of model `name`: its phases are
/// named and each counts this model's own layers (`forward_layers`: the
/// model's layer count when the snapshot runs the forward pass, else 0).
pub(crate) fn golden_progress(name: &str, forward_layers: usize) -> Bar {
    Bar::new(
        name,
        forward_layers,
        interactive().then(ProgressDrawTarget::stderr),
    )
}

/// Refuses the `analyze` flags its format would ignore.
fn check_analyze_flags(args: &AnalyzeArgs) -> Result<()> {
    let format = match args.format {
        OutputFormat::Table => "table",
        OutputFormat::Json => "json",
        OutputFormat::Markdown => "markdown",
    };
    if args.format == OutputFormat::Table {
        if let Some(dir) = &args.out {
            return Err(Error::Usage(format!(
                "--out {}: the table format writes no files; use --format json or --format markdown to write a report there",
                dir.display()
            )));
        }
    }
    if args.shared_scale && args.format != OutputFormat::Markdown {
        return Err(Error::Usage(format!(
            "--shared-scale applies to the markdown figures only; --format {format} ignores it (drop it, or use --format markdown)"
        )));
    }
    table_only(
        "--full",
        args.full,
        args.format == OutputFormat::Table,
        format,
    )
}

fn analyze(args: AnalyzeArgs, style: Styling) -> Result<u8> {
    check_analyze_flags(&args)?;
    if args.trace.is_some() {
        return crate::import_cmd::analyze_trace(args, style);
    }
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
            notice!(
                "note: skipping dense (non-MoE) layers {}",
                moe_inspect::layers::format_list(&skipped)
            );
        }
    }
    let needs_forward = analyses.iter().any(|a| !a.is_static());
    if needs_forward {
        detail_prompts(&args.prompts);
    }
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
        let f = forward::Forward::new(&model, forward::parse_device(&args.model.device)?)?
            .resident_if_fits(forward::Passes::One);
        Some(f)
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
    let mut report = timed("analyses", || analysis::run(&model, &opts, &progress_bar()))?;
    // After the run: a failing run's error stays the only line.
    if let Some(r) = fwd.as_ref().and_then(|f| f.residency()) {
        notice!("{r}");
    }
    if let Some(p) = &prompts {
        if let Ok(tok) = input::tokenizer(args.model.model.as_deref()) {
            report.maps.token_ids = p.ids.first().cloned().unwrap_or_default();
            report.token_labels = tok.token_strings(&report.maps.token_ids);
        }
    }
    emit_report(&report, &args, style)
}

/// Prints an analysis report in the format asked for, or writes it to
/// `--out` (json: also `report.json`; markdown: `report.md` and figures).
pub(crate) fn emit_report(
    report: &moe_inspect::analysis::results::Report,
    args: &AnalyzeArgs,
    style: Styling,
) -> Result<u8> {
    match args.format {
        OutputFormat::Table => print!(
            "{}",
            report::table::render(
                report,
                Styling {
                    full: args.full,
                    ..style
                }
            )
        ),
        OutputFormat::Json => {
            let json = report::to_json(report);
            if let Some(dir) = &args.out {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                let path = dir.join("report.json");
                atomic_write::write_atomic(&path, json.as_bytes())?;
                notice!("wrote {}", path.display());
            }
            println!("{json}");
        }
        OutputFormat::Markdown => {
            let dir = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("moe-inspect-report"));
            let md = report::markdown::MarkdownOptions {
                shared_scale: args.shared_scale,
                command_line: std::env::args().collect::<Vec<_>>().join(" "),
            };
            let path = timed("report and figures", || {
                report::markdown::write(report, &dir, &md)
            })?;
            notice!("wrote {} (with SVG figures)", path.display());
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
    notice!(
        "added [{}.metadata.moe-inspect] to {}: uncomment what you need, then `cargo moe-inspect snapshot`",
        if workspace { "workspace" } else { "package" },
        manifest.display()
    );
    Ok(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal that records what is drawn on it.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Screen(Arc<Mutex<Vec<String>>>);

    impl Screen {
        /// The frames drawn so far.
        pub(crate) fn frames(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.trim().is_empty() {
                self.0.lock().unwrap().push(s.to_string());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn bar_on(screen: &Screen, name: &str, forward_layers: usize) -> Bar {
        Bar::new(
            name,
            forward_layers,
            Some(ProgressDrawTarget::term_like_with_hz(
                Box::new(screen.clone()),
                200,
            )),
        )
    }

    #[test]
    fn nothing_is_drawn_before_the_length_is_known() {
        let screen = Screen::default();
        let bar = bar_on(&screen, "", 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(screen.0.lock().unwrap().is_empty(), "{:?}", screen.0);
        bar.start(3);
        bar.layer_done(0);
        let b = bar.bar.as_ref().unwrap();
        assert_eq!((b.position(), b.length()), (1, Some(3)));
        // Within a layer, the analysis says what it is doing.
        bar.detail("neuron-reorder layer 1 up experts 1–0 (0/84 pairs)");
        assert_eq!(
            b.message(),
            "neuron-reorder layer 1 up experts 1–0 (0/84 pairs)"
        );
        let frames = screen.0.lock().unwrap().clone();
        assert!(!frames.is_empty());
        assert!(frames.iter().all(|f| !f.contains("0/0")), "{frames:?}");
        assert!(frames[0].contains("/3 layers"), "{frames:?}");
    }

    #[test]
    fn a_golden_run_names_the_model_and_counts_each_phase_on_its_own() {
        // A 4-layer model with 4 MoE layers: 4 static steps, then 4 forward.
        let screen = Screen::default();
        let bar = bar_on(&screen, "mixtral", 4);
        bar.start(8);
        let b = bar.bar.as_ref().unwrap();
        assert_eq!(b.length(), Some(4));
        assert_eq!(b.prefix(), "mixtral: static analyses ");
        for layer in 0..4 {
            bar.layer_done(layer);
        }
        assert_eq!((b.position(), b.length()), (4, Some(4)));
        bar.layer_done(0);
        assert_eq!(b.prefix(), "mixtral: forward pass ");
        assert_eq!((b.position(), b.length()), (1, Some(4)));
        for layer in 1..4 {
            bar.layer_done(layer);
        }
        assert_eq!((b.position(), b.length()), (4, Some(4)));
        let frames = screen.0.lock().unwrap().clone();
        assert!(frames.iter().all(|f| !f.contains("/8")), "{frames:?}");
        assert!(
            frames[0].starts_with("mixtral: static analyses"),
            "{frames:?}"
        );

        // Forward only (routing snapshots): one phase, the model's layers.
        let bar = bar_on(&Screen::default(), "demo", 6);
        bar.start(6);
        let b = bar.bar.as_ref().unwrap();
        assert_eq!(
            (b.prefix().as_str(), b.length()),
            ("demo: forward pass ", Some(6))
        );
        // Static only: no forward layers, the model's name alone.
        let bar = bar_on(&Screen::default(), "demo", 0);
        bar.start(5);
        let b = bar.bar.as_ref().unwrap();
        assert_eq!((b.prefix().as_str(), b.length()), ("demo ", Some(5)));
    }

    #[test]
    fn quiet_draws_no_bar() {
        VERBOSITY.store(0, Ordering::Relaxed);
        assert!(!interactive());
        assert!(progress_bar().bar.is_none());
        VERBOSITY.store(1, Ordering::Relaxed);
    }
}
