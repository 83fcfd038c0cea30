//! Configuration from Cargo.toml (SPEC §3), read with cargo_metadata:
//! `[package.metadata.moe-inspect]` of the package in the current directory
//! if it has one, else `[workspace.metadata.moe-inspect]`. Relative paths are
//! relative to the directory of the manifest that holds the table.
//!
//! ```toml
//! [workspace.metadata.moe-inspect]
//! golden-dir = "golden"                 # default: golden
//! prompts = "prompts.txt"               # or token-ids = "ids.txt"
//! analyses = ["static", "chosen-experts", "norm-score"]
//! [[workspace.metadata.moe-inspect.models]]
//! name = "mixtral-8x7b"
//! path = "/models/Mixtral-8x7B-v0.1"   # or demo = true
//! prompts = "prompts.txt"               # per-model prompts/token-ids/analyses/tolerance
//! [workspace.metadata.moe-inspect.tolerance]
//! similarity = 1e-3
//! routing-top1-agreement = 0.99
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::golden::{Selection, Tolerances};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Raw {
    golden_dir: Option<PathBuf>,
    junit: Option<PathBuf>,
    prompts: Option<PathBuf>,
    token_ids: Option<PathBuf>,
    analyses: Option<Vec<String>>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    tolerance: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawModel {
    name: String,
    path: Option<PathBuf>,
    #[serde(default)]
    demo: bool,
    prompts: Option<PathBuf>,
    token_ids: Option<PathBuf>,
    analyses: Option<Vec<String>>,
    #[serde(default)]
    tolerance: BTreeMap<String, f64>,
}

/// The commented configuration block `cargo moe-inspect init` appends to a
/// manifest: `[workspace.metadata.moe-inspect]` for a workspace root, else
/// `[package.metadata.moe-inspect]`. Every key is documented; all but the
/// table header are commented out, so the block is valid as written.
pub fn init_block(workspace: bool) -> String {
    let t = if workspace { "workspace" } else { "package" };
    let mut b = String::new();
    b.push_str("\n# cargo moe-inspect: golden snapshots of MoE models' expert behaviour.\n");
    b.push_str(
        "# `cargo moe-inspect snapshot` records them, `check` compares (exit 1 on drift).\n",
    );
    b.push_str(&format!("[{t}.metadata.moe-inspect]\n"));
    b.push_str("# golden-dir = \"golden\"             # where <name>.json snapshots live (default: golden)\n");
    b.push_str("# junit = \"target/moe-inspect.xml\"  # `check` also writes its JUnit report here (as --junit)\n");
    b.push_str(
        "# prompts = \"prompts.txt\"           # one prompt per line, or JSONL {\"text\": ...}\n",
    );
    b.push_str("# token-ids = \"token-ids.txt\"       # instead of prompts: one prompt per line, ids separated by spaces\n");
    b.push_str("# analyses = [\"static\", \"chosen-experts\", \"norm-score\"]  # what to record (default: all)\n");
    b.push_str("#\n");
    b.push_str(&format!(
        "# [[{t}.metadata.moe-inspect.models]]  # one block per model\n"
    ));
    b.push_str(
        "# name = \"mixtral-8x7b\"             # the golden file: golden/mixtral-8x7b.json\n",
    );
    b.push_str(
        "# path = \"/models/Mixtral-8x7B-v0.1\"  # the checkpoint directory (or demo = true)\n",
    );
    b.push_str("# prompts = \"prompts.txt\"           # per model: prompts, token-ids, analyses, tolerance\n");
    b.push_str("#\n");
    b.push_str(&format!("# [{t}.metadata.moe-inspect.tolerance]\n"));
    let default = Tolerances::default();
    for (key, doc) in Tolerances::KEYS {
        let value = default.get(key).unwrap_or_default();
        b.push_str(&format!("# {key} = {value}  # {doc}\n"));
    }
    b
}

/// A model named in the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model's name (its golden file stem).
    pub name: String,
    /// `None`: the embedded demo model.
    pub path: Option<PathBuf>,
    /// Prompt text file for this model.
    pub prompts: Option<PathBuf>,
    /// Token-id file for this model.
    pub token_ids: Option<PathBuf>,
    /// Analyses to record for this model.
    pub analyses: Option<Vec<String>>,
    /// Tolerance overrides (checked keys).
    pub tolerance: BTreeMap<String, f64>,
}

/// The `moe-inspect` table of a manifest, validated, with absolute paths.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    /// The manifest the table was read from (for messages).
    pub manifest: PathBuf,
    /// Directory of the golden files.
    pub golden_dir: Option<PathBuf>,
    /// Where `check` also writes its JUnit report (as `--junit FILE`).
    pub junit: Option<PathBuf>,
    /// Default prompt text file.
    pub prompts: Option<PathBuf>,
    /// Default token-id file.
    pub token_ids: Option<PathBuf>,
    /// Default analyses to record.
    pub analyses: Option<Vec<String>>,
    /// The models to check.
    pub models: Vec<ModelEntry>,
    /// Tolerance overrides for every model (checked keys).
    pub tolerance: BTreeMap<String, f64>,
}

impl Settings {
    /// Applies the tolerance overrides of the configuration, then of `model`.
    pub fn tolerances(&self, base: Tolerances, model: Option<&ModelEntry>) -> Tolerances {
        let mut t = base;
        for (k, v) in self
            .tolerance
            .iter()
            .chain(model.into_iter().flat_map(|m| &m.tolerance))
        {
            // Keys and values were checked when the configuration was read.
            let _ = t.set(k, *v);
        }
        t
    }
}

/// Reads the configuration. Without `manifest_path`, the manifest of the
/// current directory is used, and having none is not an error (`Ok(None)`:
/// the defaults, golden files in `./golden`).
///
/// When `cargo` cannot be run (not on PATH, `CARGO` unset) and no
/// `--manifest-path` was given, the defaults apply too, unless a Cargo.toml
/// in the current directory or above has a `moe-inspect` table: ignoring that
/// configuration silently would check other models than configured, so that
/// is an error naming the manifest. An explicit `manifest_path` that cannot
/// be read is always an error.
pub fn load(manifest_path: Option<&Path>) -> Result<Option<Settings>> {
    match load_with_cargo(manifest_path) {
        Err(LoadError::CargoMissing(e)) => match manifest_path {
            Some(p) => Err(Error::Input {
                path: p.to_path_buf(),
                reason: format!("cannot run `cargo` to read this manifest: {e}"),
            }),
            None => match configured_manifest_above(Path::new(".")) {
                None => Ok(None),
                Some(manifest) => Err(Error::Input {
                    path: manifest,
                    reason: format!(
                        "this manifest has a `moe-inspect` table, but `cargo` cannot be run to read it ({e}); put cargo on PATH or set CARGO"
                    ),
                }),
            },
        },
        Err(LoadError::Other(e)) => Err(e),
        Ok(s) => Ok(s),
    }
}

enum LoadError {
    /// `cargo` could not be started.
    CargoMissing(std::io::Error),
    Other(Error),
}

/// The first Cargo.toml in `start` or above whose text names a `moe-inspect`
/// table (`[...metadata.moe-inspect]` or a `moe-inspect = ...` key).
fn configured_manifest_above(start: &Path) -> Option<PathBuf> {
    let start = start.canonicalize().ok()?;
    for dir in start.ancestors() {
        let manifest = dir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let names_table = text.lines().any(|l| {
            let l = l.trim();
            (l.starts_with('[') && l.contains("metadata") && l.contains("moe-inspect"))
                || l.starts_with("moe-inspect")
                || l.starts_with("\"moe-inspect\"")
        });
        if names_table {
            return Some(manifest);
        }
    }
    None
}

fn load_with_cargo(
    manifest_path: Option<&Path>,
) -> std::result::Result<Option<Settings>, LoadError> {
    let mut cmd = cargo_metadata::MetadataCommand::new();
    cmd.no_deps();
    if let Some(p) = manifest_path {
        if !p.is_file() {
            return Err(LoadError::Other(Error::bad_value(
                crate::error::ValueKind::Manifest,
                p.display().to_string(),
                "no such file",
            )));
        }
        cmd.manifest_path(p);
    }
    let meta = match cmd.exec() {
        Ok(m) => m,
        Err(cargo_metadata::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::CargoMissing(e));
        }
        Err(e) => {
            let text = e.to_string();
            if manifest_path.is_none() && text.contains("could not find `Cargo.toml`") {
                return Ok(None);
            }
            return Err(LoadError::Other(Error::Input {
                path: manifest_path
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("Cargo.toml")),
                reason: format!(
                    "cannot read the cargo metadata: {}",
                    text.lines().find(|l| !l.trim().is_empty()).unwrap_or("")
                ),
            }));
        }
    };
    let package = match manifest_path {
        Some(p) => {
            let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            meta.packages
                .iter()
                .find(|pk| pk.manifest_path.as_std_path() == p)
        }
        None => meta.root_package(),
    };
    if let Some(pk) = package {
        if let Some(v) = pk.metadata.get("moe-inspect") {
            let dir = pk
                .manifest_path
                .parent()
                .map(|d| d.as_std_path().to_path_buf())
                .unwrap_or_default();
            return parse(
                v,
                pk.manifest_path.as_std_path(),
                "package.metadata.moe-inspect",
                &dir,
            )
            .map(Some)
            .map_err(LoadError::Other);
        }
    }
    match meta.workspace_metadata.get("moe-inspect") {
        Some(v) => {
            let root = meta.workspace_root.as_std_path();
            parse(
                v,
                &root.join("Cargo.toml"),
                "workspace.metadata.moe-inspect",
                root,
            )
            .map(Some)
            .map_err(LoadError::Other)
        }
        None => Ok(None),
    }
}

/// Validates a `moe-inspect` table; errors name the key.
pub fn parse(
    value: &serde_json::Value,
    manifest: &Path,
    table: &str,
    base: &Path,
) -> Result<Settings> {
    let key_error = |key: String, reason: String| Error::ConfigKey {
        path: manifest.to_path_buf(),
        key: format!("{table}.{key}"),
        reason,
    };
    let raw: Raw = serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { at };
        key_error(at, e.inner().to_string())
    })?;
    let abs = |p: Option<PathBuf>| p.map(|p| if p.is_absolute() { p } else { base.join(p) });
    let check_tol = |map: &BTreeMap<String, f64>, prefix: &str| -> Result<()> {
        let mut t = Tolerances::default();
        for (k, v) in map {
            t.set(k, *v)
                .map_err(|e| key_error(format!("{prefix}tolerance.{k}"), e.to_string()))?;
        }
        Ok(())
    };
    let check_analyses = |a: &Option<Vec<String>>, key: String| -> Result<()> {
        if let Some(a) = a {
            Selection::parse(a).map_err(|e| key_error(key, e.to_string()))?;
        }
        Ok(())
    };
    check_tol(&raw.tolerance, "")?;
    check_analyses(&raw.analyses, "analyses".into())?;
    let mut models = Vec::new();
    for (i, m) in raw.models.into_iter().enumerate() {
        let at = format!("models[{i}].");
        // The name is the golden file's name: checked like a Cargo.toml `name`.
        if let Err(e) = crate::golden::pending::check_name(&m.name) {
            return Err(key_error(format!("{at}name"), e.to_string()));
        }
        if models.iter().any(|x: &ModelEntry| x.name == m.name) {
            return Err(key_error(
                format!("{at}name"),
                format!("`{}` is listed twice", m.name),
            ));
        }
        match (&m.path, m.demo) {
            (Some(_), true) => {
                return Err(key_error(
                    format!("{at}path"),
                    "give `path` or `demo = true`, not both".into(),
                ))
            }
            (None, false) => {
                return Err(key_error(
                    format!("{at}path"),
                    "missing: give the model directory, or `demo = true`".into(),
                ))
            }
            _ => {}
        }
        if m.prompts.is_some() && m.token_ids.is_some() {
            return Err(key_error(
                format!("{at}token-ids"),
                "give `prompts` or `token-ids`, not both".into(),
            ));
        }
        check_tol(&m.tolerance, &at)?;
        check_analyses(&m.analyses, format!("{at}analyses"))?;
        models.push(ModelEntry {
            name: m.name,
            path: abs(m.path),
            prompts: abs(m.prompts),
            token_ids: abs(m.token_ids),
            analyses: m.analyses,
            tolerance: m.tolerance,
        });
    }
    if raw.prompts.is_some() && raw.token_ids.is_some() {
        return Err(key_error(
            "token-ids".into(),
            "give `prompts` or `token-ids`, not both".into(),
        ));
    }
    Ok(Settings {
        manifest: manifest.to_path_buf(),
        golden_dir: abs(raw.golden_dir),
        junit: abs(raw.junit),
        prompts: abs(raw.prompts),
        token_ids: abs(raw.token_ids),
        analyses: raw.analyses,
        models,
        tolerance: raw.tolerance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_toml_like(v: serde_json::Value) -> Result<Settings> {
        parse(
            &v,
            Path::new("/p/Cargo.toml"),
            "workspace.metadata.moe-inspect",
            Path::new("/p"),
        )
    }

    #[test]
    fn reads_models_and_resolves_paths() {
        let s = parse_toml_like(serde_json::json!({
            "golden-dir": "golden",
            "junit": "target/junit.xml",
            "models": [{"name": "m", "path": "fixtures/m", "token-ids": "ids.txt"}, {"name": "d", "demo": true}],
            "tolerance": {"similarity": 0.01}
        }))
        .unwrap();
        assert_eq!(s.golden_dir, Some(PathBuf::from("/p/golden")));
        assert_eq!(s.junit, Some(PathBuf::from("/p/target/junit.xml")));
        assert_eq!(s.models[0].path, Some(PathBuf::from("/p/fixtures/m")));
        assert_eq!(s.models[0].token_ids, Some(PathBuf::from("/p/ids.txt")));
        assert_eq!(s.models[1].path, None);
        assert_eq!(s.tolerances(Tolerances::default(), None).similarity, 0.01);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                serde_json::json!({"golden-dri": "g"}),
                "workspace.metadata.moe-inspect",
            ),
            (
                serde_json::json!({"tolerance": {"similarity": "x"}}),
                "tolerance.similarity",
            ),
            (
                serde_json::json!({"tolerance": {"simil": 1.0}}),
                "tolerance.simil",
            ),
            (
                serde_json::json!({"models": [{"name": "a"}]}),
                "models[0].path",
            ),
            (
                serde_json::json!({"models": [{"name": "a", "demo": true, "analyses": ["projection"]}]}),
                "models[0].analyses",
            ),
        ];
        for (v, key) in cases {
            let err = parse_toml_like(v).unwrap_err().to_string();
            assert!(err.contains(key), "`{key}` not in: {err}");
            assert!(err.contains("/p/Cargo.toml"), "{err}");
        }
    }
}
