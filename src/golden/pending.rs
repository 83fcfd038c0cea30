//! Pending snapshots (`<name>.json.new`), written by `check` when it finds
//! drift, and what `review`, `accept` and `reject` do with them (as
//! cargo-insta does with `.snap.new`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::golden::Snapshot;

/// A pending snapshot and the golden file it would replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub name: String,
    pub golden: PathBuf,
    pub new: PathBuf,
}

/// The golden file of `name` in `dir`.
pub fn golden_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Its pending file.
pub fn pending_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json.new"))
}

/// Whether this run is on CI (as cargo-insta decides: `CI` set, and not
/// `false`/`0`), where golden files are never written.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Pending snapshots in `dir`, sorted by name; `only` keeps one name.
pub fn list(dir: &Path, only: Option<&str>) -> Result<Vec<Pending>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Input {
                path: dir.to_path_buf(),
                reason: "golden directory not found".into(),
            })
        }
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".json.new") {
            if only.is_none_or(|o| o == name) {
                out.push(Pending {
                    name: name.to_string(),
                    golden: golden_path(dir, name),
                    new: entry.path(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn refuse_on_ci(what: &str) -> Result<()> {
    if on_ci() {
        return Err(Error::Usage(format!(
            "{what}: golden files are never written on CI (CI is set); accept pending snapshots locally"
        )));
    }
    Ok(())
}

/// Replaces the golden file with the pending one (after checking it parses).
pub fn accept(p: &Pending) -> Result<()> {
    refuse_on_ci("accept")?;
    Snapshot::read(&p.new)?;
    std::fs::rename(&p.new, &p.golden).map_err(|e| Error::io(&p.golden, e))
}

/// Deletes the pending file.
pub fn reject(p: &Pending) -> Result<()> {
    refuse_on_ci("reject")?;
    std::fs::remove_file(&p.new).map_err(|e| Error::io(&p.new, e))
}
