//! The one writer of user files (SPEC §10 "Writes"): golden snapshots,
//! pending `.new` files, bench baselines and reports, Markdown/JSON reports
//! and traces all go through [`write_atomic`] / [`write_atomic_with`], as
//! cargo and `tempfile::NamedTempFile::persist` do:
//!
//! 1. a temp file `.<file>.<pid>.<random>.tmp` is created in the target's own
//!    directory with `O_CREAT | O_EXCL` ([`OpenOptions::create_new`]): it is
//!    unique per writer, and an existing file or symlink of that name (even a
//!    dangling one) makes the open fail instead of being followed;
//! 2. the data is written and `fsync`ed;
//! 3. the temp file is renamed over the target (atomic within a directory),
//!    and the directory is `fsync`ed (best effort);
//! 4. on any error the temp file is removed and the target is untouched;
//!    errors name the target.
//!
//! So a reader of the target sees either the old or the new complete file,
//! never a partial one; a full disk fails the write with the target intact.
//! A target that is a symlink is replaced by a regular file (the rename
//! replaces the link, never writes through it). A target that exists and is
//! neither a regular file nor a directory (`/dev/null`, `/dev/stdout`, a
//! pipe) cannot be replaced and holds no content to lose: it is written in
//! place, and a write error (`/dev/full`) is reported like any other.
//!
//! A process killed between steps 1 and 3 leaves its temp file behind: a
//! hidden file ending in `.tmp`, never taken for a golden or pending file.
//! Writers that hold the target's lock ([`FileLock`]) remove such leftovers
//! with [`remove_stale_temps`]: under the lock no live writer owns one.
//!
//! [`FileLock`] is an advisory lock (`flock`) on a lock file; the golden
//! commands hold one per golden name while they write or accept, so
//! concurrent writers of one name serialise (the second waits; the lock is
//! released when its holder exits, even on SIGKILL).

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest part of the target's file name used in a temp file name, so that
/// `.<name>.<pid>.<random>.tmp` stays within the usual 255-byte limit.
const MAX_STEM: usize = 160;

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Like [`write_atomic`], with the data produced by `fill` into a buffered
/// writer (for large files: a trace, a synthetic checkpoint).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let io = |e| Error::io(path, e);
    let Some(file_name) = path.file_name() else {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file path (it has no file name)",
            ),
        ));
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ))
        }
        Ok(m) if !m.is_file() => return write_in_place(path, fill),
        _ => {}
    }
    let dir = parent_dir(path);
    let (tmp, file) = create_temp(&dir, &file_name.to_string_lossy()).map_err(io)?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        fill(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        // Keep the mode of the file being replaced (best effort).
        if let Ok(m) = std::fs::metadata(path) {
            let _ = file.set_permissions(m.permissions());
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    sync_dir(&dir);
    Ok(())
}

/// Writes into an existing special file (device, pipe) that cannot be replaced.
fn write_in_place(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let io = |e| Error::io(path, e);
    let file = OpenOptions::new().write(true).open(path).map_err(io)?;
    let mut out = BufWriter::new(file);
    fill(&mut out).map_err(io)?;
    out.flush().map_err(io)
}

/// The directory a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The prefix of every temp file written for a target named `file_name`.
fn temp_prefix(file_name: &str) -> String {
    let mut stem = file_name;
    if stem.len() > MAX_STEM {
        let mut end = MAX_STEM;
        while !stem.is_char_boundary(end) {
            end -= 1;
        }
        stem = &stem[..end];
    }
    format!(".{stem}.")
}

/// A random 64-bit value (std's per-process random hash keys, the time and a counter).
fn random() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.write_u32(std::process::id());
    h.finish()
}

/// Creates a new, unique temp file in `dir` with `O_EXCL`.
fn create_temp(dir: &Path, file_name: &str) -> std::io::Result<(PathBuf, File)> {
    let prefix = temp_prefix(file_name);
    let pid = std::process::id();
    let mut last = None;
    for _ in 0..16 {
        let tmp = dir.join(format!("{prefix}{pid}.{:016x}.tmp", random()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("could not create a unique temp file")))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether `file` (a name in a directory) is a temp file of this module for
/// the target named `target` (e.g. one left behind by a killed process).
pub fn is_temp_of(file: &str, target: &str) -> bool {
    file.strip_prefix(&temp_prefix(target))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(pid, rand)| {
            !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && rand.len() == 16
                && rand.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// Removes the temp files of `target` left behind by killed writers. Call it
/// only while holding the lock that every writer of `target` takes: then no
/// live writer owns one. Best effort; returns how many were removed.
pub fn remove_stale_temps(target: &Path) -> usize {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(parent_dir(target)) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        if is_temp_of(&e.file_name().to_string_lossy(), &name)
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// An advisory lock on a lock file, released when dropped (or when the
/// process exits, however it exits). The lock file itself is kept: deleting
/// it would let two writers lock two different files of the same name.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the exclusive lock on `path`, creating the file if needed; waits
    /// while another process holds it. A symlink at `path` is refused (and
    /// never followed to create or modify its target).
    pub fn acquire(path: &Path) -> Result<FileLock> {
        let io = |e| Error::io(path, e);
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::io(
                path,
                std::io::Error::other("lock file is a symlink; remove it"),
            ));
        }
        let file = match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(f) => f,
            // It exists: open it read-only (flock works on any descriptor),
            // which cannot create or change anything even if it was swapped.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                File::open(path).map_err(io)?
            }
            Err(e) => return Err(io(e)),
        };
        file.lock().map_err(io)?;
        Ok(FileLock { _file: file })
    }
}

/// Refuses to write `output` when it is the same file as one of `inputs`
/// (same device and inode, or the same path once canonicalised): exit 2,
/// naming both. `what` names the option (`--out`). Inputs that do not exist
/// are skipped.
pub fn refuse_overwriting_input(what: &str, output: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Some(out_id) = identity(output) else {
        return Ok(());
    };
    for input in inputs {
        if identity(input).is_some_and(|id| id == out_id) {
            return Err(Error::Usage(format!(
                "{what} {}: refusing to overwrite an input of this run ({})",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// What identifies a file: (device, inode) on Unix, the canonical path elsewhere.
#[derive(PartialEq, Eq)]
enum FileId {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg_attr(unix, allow(dead_code))]
    Path(PathBuf),
}

fn identity(path: &Path) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .ok()
            .map(|m| FileId::Inode(m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        path.canonicalize().ok().map(FileId::Path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_failing_fill_leaves_the_target_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.json"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn dev_full_is_an_error_naming_it() {
        use std::os::unix::fs::FileTypeExt;
        let err = write_atomic(Path::new("/dev/full"), &[0u8; 1 << 16]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/dev/full"), "{text}");
        // Written in place: the device is still there.
        assert!(Path::new("/dev/full")
            .metadata()
            .unwrap()
            .file_type()
            .is_char_device());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_replaced_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("a.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let lock = dir.path().join(".a.lock");
        std::os::unix::fs::symlink(&victim, &lock).unwrap();
        assert!(FileLock::acquire(&lock).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn temp_names_are_recognised() {
        assert!(is_temp_of(".a.json.123.0123456789abcdef.tmp", "a.json"));
        assert!(!is_temp_of(
            ".a.json.123.0123456789abcdef.tmp",
            "a.json.new"
        ));
        assert!(!is_temp_of("a.json.tmp", "a.json"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let (tmp, _) = create_temp(dir.path(), "a.json").unwrap();
        assert!(is_temp_of(
            &tmp.file_name().unwrap().to_string_lossy(),
            "a.json"
        ));
        assert_eq!(remove_stale_temps(&path), 1);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn refuses_an_output_that_is_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, b"x").unwrap();
        let other = dir.path().join("out");
        assert!(refuse_overwriting_input("--out", &other, std::slice::from_ref(&input)).is_ok());
        let same = dir.path().join(".").join("in");
        let err = refuse_overwriting_input("--out", &same, &[input]).unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
    }
}
