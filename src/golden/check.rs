//! The drift gate as a library: which models a run covers, which settings
//! win, and what `snapshot` and `check` decide and write, returned as typed
//! outcomes. The CLI only parses arguments, calls [`plan`], [`snapshot`] or
//! [`check`], and renders the outcomes (tables, JSON, JUnit, exit codes),
//! the way cargo-nextest splits its runner from its reporter.
//!
//! Precedence, for every setting: the request (command-line flags), then the
//! model's entry in the Cargo.toml configuration, then the configuration's
//! defaults, then the built-in defaults.

use std::path::{Path, PathBuf};

use crate::analysis::Progress;
use crate::error::{Error, Result};
use crate::golden::compare::{self, Comparison};
use crate::golden::config::{self, ModelEntry, Settings};
use crate::golden::pending::{self, UpdateMode};
use crate::golden::{build, BuildOptions, Selection, Snapshot, Tolerances};
use crate::model::Model;

/// What a user asked for; `None` (or empty) where they did not say.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The Cargo.toml to read the configuration from (default: the current
    /// directory's, if any).
    pub manifest_path: Option<PathBuf>,
    /// Where golden files live (default: the configuration's, else `golden`).
    pub golden_dir: Option<PathBuf>,
    /// One model by name: the configured model of that name, or the golden
    /// name of the model given by [`Request::model`].
    pub name: Option<String>,
    /// A model directory (instead of the configured models).
    pub model: Option<PathBuf>,
    /// The embedded demo model (instead of the configured models).
    pub demo: bool,
    /// A prompt text file.
    pub prompts: Option<PathBuf>,
    /// A token-id file.
    pub token_ids: Option<PathBuf>,
    /// Analyses to record (comma-separated names or groups).
    pub analyses: Option<String>,
    /// Tolerance overrides `(key, value)`, applied last.
    pub tolerances: Vec<(String, f64)>,
    /// Device of the forward pass (`cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// A routing trace (the `trace` format, or an engine's record converted
    /// by `import`) to record routing from instead of running the model;
    /// the model directory's config.json describes the traced model.
    pub trace: Option<PathBuf>,
}

/// Makes the progress reporter of one model: given the model and the number
/// of decoder layers its forward pass runs through (0 when none).
pub type ProgressFor<'a> = &'a dyn Fn(&Target, usize) -> Box<dyn Progress>;

/// One model a run covers, with its settings resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Its golden name (the golden file's stem).
    pub name: String,
    /// The model directory; `None` for the embedded demo model.
    pub model: Option<PathBuf>,
    /// The prompt text file that applies.
    pub prompts: Option<PathBuf>,
    /// The token-id file that applies.
    pub token_ids: Option<PathBuf>,
    /// The analyses that apply (`None`: the default for a new snapshot, the
    /// golden file's own list for a check).
    pub analyses: Option<Vec<String>>,
    /// Its entry in the configuration, if it came from one.
    pub entry: Option<ModelEntry>,
}

/// The models of a run and the settings that apply to them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The configuration read from Cargo.toml, if any.
    pub settings: Option<Settings>,
    /// The directory of the golden files.
    pub golden_dir: PathBuf,
    /// The models, in configuration order.
    pub targets: Vec<Target>,
    /// Tolerance overrides of the request.
    pub tolerance_overrides: Vec<(String, f64)>,
    /// Device of the forward pass.
    pub device: String,
    /// Routing trace to record from instead of a forward pass.
    pub trace: Option<PathBuf>,
}

/// The name of a model directory (its last path component).
pub fn dir_name(dir: &Path) -> String {
    let abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Resolves which models a request covers and which settings apply.
///
/// ```rust
/// use moe_inspect::golden::{self, Request};
///
/// // The demo model, with the built-in defaults (no Cargo.toml configuration).
/// let req = Request { demo: true, ..Request::default() };
/// let plan = golden::plan(&req, None)?;
/// assert_eq!(plan.targets.len(), 1);
/// assert_eq!(plan.targets[0].name, "demo");
/// assert_eq!(plan.golden_path(&plan.targets[0]), std::path::Path::new("golden/demo.json"));
/// # Ok::<(), moe_inspect::Error>(())
/// ```
pub fn plan(req: &Request, settings: Option<Settings>) -> Result<Plan> {
    if let Some(n) = &req.name {
        pending::check_name(n)?;
    }
    let s = settings.as_ref();
    let golden_dir = golden_dir(req.golden_dir.as_deref(), s);
    let targets = targets(req, s)?;
    Ok(Plan {
        settings,
        golden_dir,
        targets,
        tolerance_overrides: req.tolerances.clone(),
        device: req.device.clone(),
        trace: req.trace.clone(),
    })
}

/// The golden directory: the one asked for, else the configuration's, else `golden`.
pub fn golden_dir(asked: Option<&Path>, settings: Option<&Settings>) -> PathBuf {
    asked
        .map(Path::to_path_buf)
        .or_else(|| settings.and_then(|s| s.golden_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("golden"))
}

/// [`plan`] with the configuration read from the request's manifest (or the
/// current directory's).
pub fn plan_with_config(req: &Request) -> Result<Plan> {
    plan(req, config::load(req.manifest_path.as_deref())?)
}

fn targets(req: &Request, s: Option<&Settings>) -> Result<Vec<Target>> {
    let flag_analyses = req.analyses.as_ref().map(|a| vec![a.clone()]);
    // A prompt flag replaces both configured prompt sources.
    let flag_prompts = req.prompts.is_some() || req.token_ids.is_some();
    let global_prompts = || {
        if flag_prompts {
            (req.prompts.clone(), req.token_ids.clone())
        } else {
            (
                s.and_then(|s| s.prompts.clone()),
                s.and_then(|s| s.token_ids.clone()),
            )
        }
    };
    let global_analyses = || {
        flag_analyses
            .clone()
            .or_else(|| s.and_then(|s| s.analyses.clone()))
    };
    let single = |name: String, model: Option<PathBuf>| {
        let (prompts, token_ids) = global_prompts();
        Target {
            name,
            model,
            prompts,
            token_ids,
            analyses: global_analyses(),
            entry: None,
        }
    };
    if req.model.is_some() || req.demo {
        let name = req.name.clone().unwrap_or_else(|| match &req.model {
            Some(dir) => pending::sanitize_name(&dir_name(dir)),
            None => "demo".into(),
        });
        return Ok(vec![single(name, req.model.clone())]);
    }
    let configured = s.map(|s| s.models.as_slice()).unwrap_or_default();
    if configured.is_empty() {
        let name = req.name.clone().unwrap_or_else(|| "demo".into());
        return Ok(vec![single(name, None)]);
    }
    let chosen: Vec<&ModelEntry> = match &req.name {
        Some(n) => {
            let found: Vec<&ModelEntry> = configured.iter().filter(|m| &m.name == n).collect();
            if found.is_empty() {
                return Err(Error::Invalid(format!(
                    "{n}: no such model in {} (configured: {})",
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
            let (prompts, token_ids) =
                if flag_prompts || (m.prompts.is_none() && m.token_ids.is_none()) {
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

impl Plan {
    /// The golden file of a target.
    pub fn golden_path(&self, t: &Target) -> PathBuf {
        pending::golden_path(&self.golden_dir, &t.name)
    }

    /// The tolerances of a target: `base` (the defaults, or the golden
    /// file's), then the configuration's, then the model entry's, then the
    /// request's overrides.
    pub fn tolerances(&self, base: Tolerances, t: &Target) -> Result<Tolerances> {
        let mut tol = match &self.settings {
            Some(s) => s.tolerances(base, t.entry.as_ref()),
            None => base,
        };
        for (k, v) in &self.tolerance_overrides {
            tol.set(k, *v)?;
        }
        Ok(tol)
    }

    /// The analyses to record for a target: its own list, else `fallback`
    /// (a golden file's list), else everything a snapshot records.
    fn selection(&self, t: &Target, fallback: Option<(&Path, &[String])>) -> Result<Selection> {
        match (&t.analyses, fallback) {
            (Some(list), _) => Selection::parse(list),
            (None, Some((path, list))) => Selection::parse(list).map_err(|e| Error::Input {
                path: path.to_path_buf(),
                reason: format!("corrupt golden snapshot: {e}"),
            }),
            (None, None) => Ok(Selection::default()),
        }
    }

    /// Records a target's snapshot now. `progress` makes its progress
    /// reporter, given the number of decoder layers the forward pass runs
    /// through (0 when the selection needs none): the static layers come
    /// first, then the forward layers, in one count.
    pub fn record(
        &self,
        t: &Target,
        selection: Selection,
        tolerances: Tolerances,
        progress: ProgressFor<'_>,
    ) -> Result<Snapshot> {
        if let Some(file) = &self.trace {
            return self.record_trace(file, t, tolerances);
        }
        let device = crate::forward::parse_device(&self.device)?;
        let model = Model::open_or_demo(t.model.as_deref())?;
        let mut selection = selection;
        let mut notices: Vec<String> = model.notice().map(str::to_string).into_iter().collect();
        let family = model.info.family;
        if t.analyses.is_none() && !family.native_forward() && selection.needs_prompts() {
            // The default selection records routing too; a family without a
            // native forward records what it can. (Asked for explicitly, the
            // dynamic analyses fail with the "static analyses only" error.)
            notices.push(format!(
                "{}: family `{}` has no native forward pass: recording the static analyses only",
                t.name,
                family.id()
            ));
            selection.routing = false;
            selection.norm_score = false;
        }
        let prompts = prompt_ids(
            t.model.as_deref(),
            t.prompts.as_deref(),
            t.token_ids.as_deref(),
            selection,
        )?;
        let forward_layers = prompts.as_ref().map_or(0, |_| model.info.num_layers);
        let progress = progress(t, forward_layers);
        for n in &notices {
            progress.notice(n);
        }
        build(
            &model,
            &BuildOptions {
                name: t.name.clone(),
                selection,
                prompts: prompts.as_deref(),
                device,
                tolerances,
                keep_router_probs: false,
            },
            progress.as_ref(),
        )
    }

    /// The routing snapshot of a trace file, checked against the target
    /// model's config.json (no weights are read).
    fn record_trace(&self, file: &Path, t: &Target, tolerances: Tolerances) -> Result<Snapshot> {
        let dir = t.model.as_deref().ok_or_else(|| {
            Error::Invalid(
                "a routing trace needs the model directory it was recorded on (its config.json describes the traced model)".into(),
            )
        })?;
        let config = crate::model::Config::read_dir(dir)?;
        let info = crate::model::ModelInfo::from_config(&config)?;
        let routing = crate::trace::read(file, Some(info.num_experts))?;
        crate::import::check_model(&routing, &info, file)?;
        crate::golden::from_trace(&routing, &config, &t.name, tolerances)
    }

    /// Records a target with the settings a new snapshot gets.
    fn record_new(&self, t: &Target, progress: ProgressFor<'_>) -> Result<Snapshot> {
        let sel = self.selection(t, None)?;
        let tol = self.tolerances(Tolerances::default(), t)?;
        self.record(t, sel, tol, progress)
    }
}

/// The token ids of the prompts that apply, when the selection needs a forward pass.
pub fn prompt_ids(
    model: Option<&Path>,
    prompts: Option<&Path>,
    token_ids: Option<&Path>,
    sel: Selection,
) -> Result<Option<Vec<Vec<u32>>>> {
    if !sel.needs_prompts() {
        return Ok(None);
    }
    let p = crate::input::resolve(model, &crate::input::PromptArgs { prompts, token_ids })?;
    Ok(Some(p.ids))
}

/// A golden file `snapshot` wrote.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The model's golden name.
    pub name: String,
    /// The file written.
    pub path: PathBuf,
    /// The snapshot.
    pub snapshot: Snapshot,
}

/// Records and writes the golden file of every target of the plan. Golden
/// files are never written on CI (`CI` set): that is an error naming them.
/// `progress` makes a progress reporter for each target; `done` is called
/// after each file is written.
pub fn snapshot(
    plan: &Plan,
    progress: ProgressFor<'_>,
    done: &mut dyn FnMut(&Recorded),
) -> Result<Vec<Recorded>> {
    if pending::on_ci() {
        let names: Vec<String> = plan
            .targets
            .iter()
            .map(|t| plan.golden_path(t).display().to_string())
            .collect();
        return Err(Error::Invalid(format!(
            "snapshot: golden files are never written on CI (CI is set), not even new ones ({}); record snapshots locally",
            names.join(", ")
        )));
    }
    let mut out = Vec::with_capacity(plan.targets.len());
    for t in &plan.targets {
        let path = plan.golden_path(t);
        let snap = plan.record_new(t, progress)?;
        snap.write(&path)?;
        let r = Recorded {
            name: t.name.clone(),
            path,
            snapshot: snap,
        };
        done(&r);
        out.push(r);
    }
    Ok(out)
}

/// What `check` did about one model.
#[derive(Debug, Clone)]
pub enum ModelOutcome {
    /// No golden file existed and the update mode is `always`: it was recorded.
    Recorded {
        /// The model's golden name.
        name: String,
        /// The golden file written.
        path: PathBuf,
    },
    /// The model was compared with its golden file.
    Compared {
        /// The comparison, metric by metric.
        comparison: Comparison,
        /// The golden file.
        golden: PathBuf,
        /// What was written or removed as a consequence.
        action: Action,
    },
}

/// What `check` wrote (or removed) after a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The check passed; nothing to do.
    None,
    /// The check passed and a stale pending file (from an earlier failing
    /// check) was removed, so a later `accept` cannot make it golden.
    RemovedStale(PathBuf),
    /// Drift, accepted: the golden file was replaced.
    Accepted(PathBuf),
    /// Drift: a pending snapshot was written for review.
    Pending(PathBuf),
    /// Drift: nothing written because this is CI.
    NotWrittenOnCi,
    /// Drift: nothing written because `MOE_INSPECT_UPDATE=no`.
    NotWrittenByRequest,
}

impl ModelOutcome {
    /// The model's golden name.
    pub fn name(&self) -> &str {
        match self {
            ModelOutcome::Recorded { name, .. } => name,
            ModelOutcome::Compared { comparison, .. } => &comparison.name,
        }
    }

    /// The comparison, if the model was compared.
    pub fn comparison(&self) -> Option<&Comparison> {
        match self {
            ModelOutcome::Compared { comparison, .. } => Some(comparison),
            ModelOutcome::Recorded { .. } => None,
        }
    }

    /// Whether this model fails the gate: drift that was not accepted.
    pub fn failed(&self) -> bool {
        match self {
            ModelOutcome::Compared {
                comparison, action, ..
            } => comparison.drift() && !matches!(action, Action::Accepted(_)),
            ModelOutcome::Recorded { .. } => false,
        }
    }
}

/// The outcome of a `check` run.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    /// The update mode the run used.
    pub update: UpdateMode,
    /// One outcome per model, in plan order.
    pub models: Vec<ModelOutcome>,
}

impl CheckOutcome {
    /// Whether the gate fails (some model drifted and was not accepted).
    pub fn failed(&self) -> bool {
        self.models.iter().any(ModelOutcome::failed)
    }

    /// The comparisons made, in plan order.
    pub fn comparisons(&self) -> Vec<&Comparison> {
        self.models
            .iter()
            .filter_map(ModelOutcome::comparison)
            .collect()
    }
}

/// Checks every target of the plan against its golden file: records each
/// model now (with the golden file's analyses and tolerances unless the
/// plan overrides them), compares, and applies the update policy:
/// `always` replaces drifted golden files and records missing ones; `new`
/// writes `<name>.json.new` for review; `no` (the default on CI) writes
/// nothing. A pending file left by an earlier failing check is removed when
/// the check passes. `done` is called after each model (for streaming output).
pub fn check(
    plan: &Plan,
    update: UpdateMode,
    progress: ProgressFor<'_>,
    done: &mut dyn FnMut(&ModelOutcome),
) -> Result<CheckOutcome> {
    let mut models = Vec::with_capacity(plan.targets.len());
    for t in &plan.targets {
        let outcome = check_one(plan, t, update, progress)?;
        done(&outcome);
        models.push(outcome);
    }
    Ok(CheckOutcome { update, models })
}

fn check_one(
    plan: &Plan,
    t: &Target,
    update: UpdateMode,
    progress: ProgressFor<'_>,
) -> Result<ModelOutcome> {
    let path = plan.golden_path(t);
    if update == UpdateMode::Always && !path.exists() {
        let snap = plan.record_new(t, progress)?;
        snap.write(&path)?;
        return Ok(ModelOutcome::Recorded {
            name: t.name.clone(),
            path,
        });
    }
    let gold = Snapshot::read(&path)?;
    let sel = plan.selection(t, Some((&path, &gold.analyses)))?;
    let tol = plan.tolerances(gold.tolerances, t)?;
    let now = plan.record(t, sel, tol, progress)?;
    let comparison = compare::compare(&gold, &now, &tol).map_err(|e| e.at(&path))?;
    let action = if comparison.drift() {
        match update {
            UpdateMode::Always => {
                now.write(&path)?;
                Action::Accepted(path.clone())
            }
            UpdateMode::New => {
                let new = pending::pending_path(&plan.golden_dir, &t.name);
                now.write(&new)?;
                Action::Pending(new)
            }
            UpdateMode::No if pending::on_ci() => Action::NotWrittenOnCi,
            UpdateMode::No => Action::NotWrittenByRequest,
        }
    } else {
        match pending::remove_stale(&plan.golden_dir, &t.name)? {
            Some(stale) => Action::RemovedStale(stale),
            None => Action::None,
        }
    };
    Ok(ModelOutcome::Compared {
        comparison,
        golden: path,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(name: &str, prompts: Option<&str>, analyses: Option<&str>) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            path: Some(PathBuf::from(format!("/m/{name}"))),
            prompts: prompts.map(PathBuf::from),
            token_ids: None,
            analyses: analyses.map(|a| vec![a.to_string()]),
            tolerance: BTreeMap::from([("similarity".to_string(), 0.5)]),
        }
    }

    fn settings() -> Settings {
        Settings {
            manifest: PathBuf::from("/w/Cargo.toml"),
            golden_dir: Some(PathBuf::from("/w/golden")),
            junit: None,
            prompts: Some(PathBuf::from("/w/all.txt")),
            token_ids: None,
            analyses: Some(vec!["static".into()]),
            models: vec![
                entry("a", Some("/w/a.txt"), None),
                entry("b", None, Some("dynamic")),
            ],
            tolerance: BTreeMap::from([("gate-r2".to_string(), 0.25)]),
        }
    }

    #[test]
    fn flags_beat_the_model_entry_which_beats_the_defaults() {
        let p = plan(&Request::default(), Some(settings())).unwrap();
        assert_eq!(p.golden_dir, PathBuf::from("/w/golden"));
        let names: Vec<&str> = p.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // Model a: its own prompts, the default analyses.
        assert_eq!(p.targets[0].prompts, Some(PathBuf::from("/w/a.txt")));
        assert_eq!(p.targets[0].analyses, Some(vec!["static".to_string()]));
        // Model b: the default prompts, its own analyses.
        assert_eq!(p.targets[1].prompts, Some(PathBuf::from("/w/all.txt")));
        assert_eq!(p.targets[1].analyses, Some(vec!["dynamic".to_string()]));

        let req = Request {
            name: Some("b".into()),
            token_ids: Some(PathBuf::from("/flag/ids.txt")),
            analyses: Some("expert-similarity".into()),
            golden_dir: Some(PathBuf::from("/flag/golden")),
            tolerances: vec![("similarity".into(), 0.125)],
            ..Request::default()
        };
        let p = plan(&req, Some(settings())).unwrap();
        assert_eq!(p.golden_dir, PathBuf::from("/flag/golden"));
        assert_eq!(p.targets.len(), 1);
        let t = &p.targets[0];
        // A prompt flag replaces both configured prompt sources.
        assert_eq!(
            (t.prompts.clone(), t.token_ids.clone()),
            (None, Some(PathBuf::from("/flag/ids.txt")))
        );
        assert_eq!(t.analyses, Some(vec!["expert-similarity".to_string()]));
        // Tolerances: base, then configuration, then model entry, then flags.
        let tol = p.tolerances(Tolerances::default(), t).unwrap();
        assert_eq!(tol.similarity, 0.125);
        assert_eq!(tol.gate_r2, 0.25);
        assert_eq!(tol.router_jsd, Tolerances::default().router_jsd);
    }

    #[test]
    fn a_model_flag_or_no_configuration_gives_one_target() {
        let req = Request {
            model: Some(PathBuf::from("/x/My.Model v2")),
            ..Request::default()
        };
        let p = plan(&req, Some(settings())).unwrap();
        assert_eq!(p.targets.len(), 1);
        assert_eq!(p.targets[0].name, "My_Model_v2");
        assert_eq!(p.targets[0].prompts, Some(PathBuf::from("/w/all.txt")));
        let p = plan(&Request::default(), None).unwrap();
        assert_eq!(p.golden_dir, PathBuf::from("golden"));
        assert_eq!(p.targets[0].name, "demo");
        assert_eq!(p.targets[0].model, None);
    }

    #[test]
    fn bad_names_and_tolerances_are_errors() {
        let e = plan(
            &Request {
                name: Some("zzz".into()),
                ..Request::default()
            },
            Some(settings()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("zzz") && e.contains("configured: a, b"), "{e}");
        let e = plan(
            &Request {
                name: Some("../x".into()),
                ..Request::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid character"), "{e}");
        let req = Request {
            tolerances: vec![("nope".into(), 1.0)],
            ..Request::default()
        };
        let p = plan(&req, None).unwrap();
        let e = p
            .tolerances(Tolerances::default(), &p.targets[0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown tolerance `nope`"), "{e}");
    }
}
