//! Pending snapshots (`<name>.json.new`), written by `check` when it finds
//! drift, and what `review`, `accept` and `reject` do with them (as
//! cargo-insta does with `.snap.new`).
//!
//! Golden and pending files are written only through
//! [`crate::atomic_write`], while holding the golden name's lock
//! ([`lock`], the file `.<name>.lock` in the golden directory): concurrent
//! writers of one name (`snapshot`, `check` writing `.new`, `accept`)
//! serialise, the second waiting for the first. Lock files and the hidden
//! `.*.tmp` files of killed writers are never listed as pending.

use std::path::{Path, PathBuf};

use crate::atomic_write::{self, FileLock};
use crate::error::{Error, Result};
use crate::golden::Snapshot;

/// A pending snapshot and the golden file it would replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The snapshot's name.
    pub name: String,
    /// Path of the golden file.
    pub golden: PathBuf,
    /// Path of the pending (`.new`) file.
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

/// Longest golden name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a golden name the way cargo checks a package `name`, restricted to
/// ASCII: non-empty, at most [`MAX_NAME_LEN`] characters, only letters,
/// digits, `-` and `_`. So a name is one plain file name in the golden
/// directory: never empty, hidden, a path (`a/b`, `/abs`, `..`) or a lock file.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::Invalid("a golden name must not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::Invalid(format!(
            "golden name `{name}` is longer than {MAX_NAME_LEN} characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(Error::Invalid(format!(
            "invalid character `{}` in golden name `{name}`: use ASCII letters, digits, `-` and `_` only",
            c.escape_default()
        )));
    }
    Ok(())
}

/// A valid golden name made from any text (a model directory's name): every
/// other character becomes `_`, and it is cut to [`MAX_NAME_LEN`].
pub fn sanitize_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    if s.is_empty() {
        s.push_str("model");
    }
    s
}

/// The lock file of golden `name` in `dir`.
pub fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.lock"))
}

/// Takes the lock of golden `name` in `dir` (creating the directory), waiting
/// while another process holds it.
pub fn lock(dir: &Path, name: &str) -> Result<FileLock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    FileLock::acquire(&lock_path(dir, name))
}

/// The golden name of a golden or pending file path (`<dir>/<name>.json[.new]`).
pub fn name_of(path: &Path) -> Option<(PathBuf, String)> {
    let file = path.file_name()?.to_str()?;
    let name = file
        .strip_suffix(".json.new")
        .or_else(|| file.strip_suffix(".json"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((dir, name.to_string()))
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
            // Hidden files (lock files, temp files) are never pending.
            if name.starts_with('.') || check_name(name).is_err() {
                continue;
            }
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

/// Replaces the golden file with the pending one (after checking it parses),
/// under the name's lock: the checked bytes are written atomically over the
/// golden file, then the pending file is removed.
pub fn accept(p: &Pending) -> Result<()> {
    refuse_on_ci("accept")?;
    let dir = p.golden.parent().unwrap_or(Path::new("."));
    let _lock = lock(dir, &p.name)?;
    if let (Ok(new), Ok(gold)) = (std::fs::metadata(&p.new), std::fs::metadata(&p.golden)) {
        if let (Ok(new), Ok(gold)) = (new.modified(), gold.modified()) {
            if new < gold {
                return Err(Error::Usage(format!(
                    "{}: this pending snapshot is older than its golden file {} (the golden was recorded again after the check that wrote it); run `cargo moe-inspect check` again, or `reject` it",
                    p.new.display(),
                    p.golden.display()
                )));
            }
        }
    }
    let text = std::fs::read_to_string(&p.new).map_err(|e| Error::io(&p.new, e))?;
    Snapshot::parse(&p.new, &text)?;
    atomic_write::remove_stale_temps(&p.golden);
    atomic_write::write_atomic(&p.golden, text.as_bytes())?;
    std::fs::remove_file(&p.new).map_err(|e| Error::io(&p.new, e))
}

/// Environment variable choosing what `check` writes, as cargo-insta's
/// `INSTA_UPDATE`: `always`, `new` or `no`.
pub const UPDATE_VAR: &str = "MOE_INSPECT_UPDATE";

/// What `check` writes when it finds drift (or no golden file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    /// Replace the golden file (and record a missing one): `check --accept`
    /// or `MOE_INSPECT_UPDATE=always`.
    Always,
    /// Write `<name>.json.new` for review (the default off CI).
    New,
    /// Write nothing (the default on CI, or `MOE_INSPECT_UPDATE=no`).
    No,
}

impl UpdateMode {
    /// The mode of this run: `--accept` wins (the only way to write on CI);
    /// else [`UPDATE_VAR`]; else `new`, or `no` on CI. On CI the variable
    /// may only lower the mode (`no`), never make `check` write.
    pub fn resolve(accept_flag: bool) -> Result<UpdateMode> {
        if accept_flag {
            return Ok(UpdateMode::Always);
        }
        let from_env = match std::env::var(UPDATE_VAR) {
            Ok(v) => match v.trim() {
                "always" => Some(UpdateMode::Always),
                "new" | "auto" | "" => None,
                "no" => Some(UpdateMode::No),
                other => {
                    return Err(Error::Usage(format!(
                        "{UPDATE_VAR}={other}: expected always, new or no"
                    )))
                }
            },
            Err(_) => None,
        };
        Ok(match (on_ci(), from_env) {
            (true, _) => UpdateMode::No,
            (false, Some(m)) => m,
            (false, None) => UpdateMode::New,
        })
    }
}

/// After a check that passed: removes the name's pending file, which a
/// check that failed earlier may have left (as cargo-insta does), so a later
/// `accept` cannot make the broken model golden. Returns the removed path.
/// On CI nothing is touched.
pub fn remove_stale(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let new = pending_path(dir, name);
    if on_ci() || !new.exists() {
        return Ok(None);
    }
    let _lock = lock(dir, name)?;
    match std::fs::remove_file(&new) {
        Ok(()) => Ok(Some(new)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&new, e)),
    }
}

/// Deletes the pending file (under the name's lock).
pub fn reject(p: &Pending) -> Result<()> {
    refuse_on_ci("reject")?;
    let dir = p.new.parent().unwrap_or(Path::new("."));
    let _lock = lock(dir, &p.name)?;
    std::fs::remove_file(&p.new).map_err(|e| Error::io(&p.new, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_cargo_package_names() {
        for ok in ["demo", "mixtral-8x7b", "Qwen1_5", "8x7b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "../x", "/abs", "a/b", ".hidden", "a\\b", "..", "a.b", "a b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        assert_eq!(sanitize_name("Mixtral-8x7B-v0.1"), "Mixtral-8x7B-v0_1");
        assert_eq!(sanitize_name(".tmpAb"), "_tmpAb");
        assert_eq!(sanitize_name(""), "model");
        assert!(check_name(&sanitize_name(&"é/".repeat(200))).is_ok());
    }

    #[test]
    fn lock_and_temp_files_are_not_pending() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "a.json.new",
            ".a.lock",
            ".a.json.new.1.0123456789abcdef.tmp",
            ".b.json.new",
            "a.json",
        ] {
            std::fs::write(d.join(f), "").unwrap();
        }
        let _l = lock(d, "a").unwrap();
        let names: Vec<String> = list(d, None).unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn name_of_a_golden_or_pending_path() {
        assert_eq!(
            name_of(Path::new("g/x.json.new")),
            Some((PathBuf::from("g"), "x".to_string()))
        );
        assert_eq!(
            name_of(Path::new("x.json")),
            Some((PathBuf::from("."), "x".to_string()))
        );
        assert_eq!(name_of(Path::new("g/x.txt")), None);
    }
}
