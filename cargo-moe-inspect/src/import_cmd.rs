//! `import` (an engine's routing record → a trace file) and `analyze --trace`
//! (the routing analyses on a trace, without running the model).

use std::path::{Path, PathBuf};

use moe_inspect::analysis::dynamic::chosen_experts;
use moe_inspect::analysis::results::{Analyses, ModelSummary, Report, REPORT_SCHEMA};
use moe_inspect::analysis::AnalysisKind;
use moe_inspect::import::{self, Engine};
use moe_inspect::layers::LayerSelection;
use moe_inspect::model::config::Config;
use moe_inspect::model::family::ModelInfo;
use moe_inspect::report::table::Styling;
use moe_inspect::{atomic_write, trace, Error, Result};

use crate::cli::{AnalyzeArgs, EngineChoice, ImportArgs};

fn engine(e: EngineChoice) -> Engine {
    match e {
        EngineChoice::Vllm => Engine::Vllm,
        EngineChoice::Sglang => Engine::Sglang,
        EngineChoice::Megatron => Engine::Megatron,
        EngineChoice::Trtllm => Engine::Trtllm,
    }
}

/// The model's geometry from its config.json alone (no weights are opened).
fn model_info(dir: &Path) -> Result<(Config, ModelInfo)> {
    let config = Config::read_dir(dir)?;
    let info = ModelInfo::from_config(&config)?;
    Ok((config, info))
}

/// `import --from ENGINE PATH... --model DIR --out FILE`.
pub fn import(args: ImportArgs) -> Result<u8> {
    let mut inputs: Vec<PathBuf> = args.paths.clone();
    for p in &args.paths {
        if let Ok(dir) = std::fs::read_dir(p) {
            inputs.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    inputs.push(args.model.join("config.json"));
    atomic_write::refuse_overwriting_input("--output", &args.output, &inputs)?;
    let (_, info) = model_info(&args.model)?;
    let imported = import::import(engine(args.from), &args.paths, &info)?;
    trace::write(&imported.routing, &args.output)?;
    for note in &imported.notes {
        notice!("note: {note}");
    }
    let r = &imported.routing;
    let mut fields = Vec::new();
    for (present, name) in [
        (r.selected.is_some(), "selected_experts"),
        (r.token_ids.is_some(), "token_ids"),
        (r.routing_weights.is_some(), "routing_weights"),
        (r.router_logits.is_some(), "router_logits"),
        (r.expert_counts.is_some(), "expert_counts"),
    ] {
        if present {
            fields.push(name);
        }
    }
    if r.selected.is_some() {
        notice!(
            "wrote {}: {} prompts, {} tokens, {} MoE layers ({})",
            args.output.display(),
            r.prompt_lengths.len(),
            r.tokens(),
            r.moe_layers.len(),
            fields.join(", ")
        );
    } else {
        notice!(
            "wrote {}: counts only, {} MoE layers ({})",
            args.output.display(),
            r.moe_layers.len(),
            fields.join(", ")
        );
    }
    Ok(0)
}

/// `analyze --trace FILE`: chosen-experts from the trace's routing.
pub fn analyze_trace(args: AnalyzeArgs, style: Styling) -> Result<u8> {
    let path = args.trace.clone().expect("called with --trace");
    // The default selection (`static`) means "what a trace supports".
    if args.analyses != "static" {
        let kinds = AnalysisKind::parse_selection(&args.analyses)?;
        if let Some(k) = kinds.iter().find(|k| **k != AnalysisKind::ChosenExperts) {
            return Err(Error::Usage(format!(
                "--trace: `{}` needs the model's weights or forward pass; a trace supports only chosen-experts",
                k.name()
            )));
        }
    }
    let model = args
        .model
        .model
        .as_deref()
        .map(|dir| model_info(dir).map(|(c, i)| (dir.to_path_buf(), c, i)))
        .transpose()?;
    let routing = trace::read(&path, model.as_ref().map(|m| m.2.num_experts))?;
    if let Some((_, _, info)) = &model {
        import::check_model(&routing, info, &path)?;
    }
    let num_layers = model
        .as_ref()
        .map_or(routing.moe_layers.iter().max().map_or(0, |m| m + 1), |m| {
            m.2.num_layers
        });
    let layers = match args.layers.as_deref() {
        None => None,
        Some(spec) => {
            let (sel, skipped) =
                LayerSelection::parse(spec)?.resolve(num_layers, &routing.moe_layers)?;
            if !skipped.is_empty() {
                notice!(
                    "note: skipping dense (non-MoE) layers {}",
                    moe_inspect::layers::format_list(&skipped)
                );
            }
            Some(sel)
        }
    };
    if routing.selected.is_none() {
        notice!(
            "note: {} is counts only ({}): load statistics without co-activation",
            path.display(),
            routing.source
        );
    }
    let chosen = chosen_experts::from_routing(&routing, layers.as_deref());
    let summary = match &model {
        Some((dir, config, info)) => ModelSummary {
            family: info.family.id().to_string(),
            path: dir.display().to_string(),
            num_layers: info.num_layers,
            moe_layers: info.moe_layers.clone(),
            num_experts: info.num_experts,
            top_k: info.top_k,
            hidden_size: info.hidden_size,
            intermediate_size: info.expert_intermediate,
            dtype: config.declared_dtype().to_string(),
        },
        None => ModelSummary {
            family: "unknown".into(),
            path: path.display().to_string(),
            num_layers,
            moe_layers: routing.moe_layers.clone(),
            num_experts: routing.num_experts,
            top_k: routing.top_k,
            hidden_size: 0,
            intermediate_size: 0,
            dtype: "unknown".into(),
        },
    };
    let report = Report {
        schema: REPORT_SCHEMA.to_string(),
        model: summary,
        analyses: Analyses {
            chosen_experts: Some(chosen),
            ..Analyses::default()
        },
        maps: Default::default(),
        token_labels: Vec::new(),
    };
    if let Some(dir) = &args.out {
        crate::commands::refuse_report_over_inputs(dir, std::slice::from_ref(&path))?;
    }
    crate::commands::emit_report(&report, &args, style)
}
