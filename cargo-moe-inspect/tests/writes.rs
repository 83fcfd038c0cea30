//! Writes that cannot half-happen (SPEC §10 "Writes", issue 16): concurrent
//! and killed snapshots of one name, symlinked temp paths, full disks, outputs
//! that would overwrite inputs, bad golden names, CI, no `cargo` on PATH and a
//! closed stdout. Each case exits 0 or 2 with one clear line, never panics,
//! and never leaves a partial or foreign file behind.

use moe_inspect_testkit as common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{copy_fixture, fixture};
use moe_inspect::golden::Snapshot;

struct Out {
    code: Option<i32>,
    stderr: String,
}

/// The binary, run in `cwd`, with CI, GitHub and colour variables cleared.
fn command(cwd: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"));
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("RUST_BACKTRACE")
        .env_remove("MOE_INSPECT_UPDATE");
    cmd
}

fn output(mut cmd: Command) -> Out {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let o = Out {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    o
}

fn run(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = command(cwd, args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output(cmd)
}

/// Exit 2 with one `error:` line containing every needle.
fn assert_error(o: &Out, needles: &[&str]) {
    assert_eq!(o.code, Some(2), "stderr: {}", o.stderr);
    assert_eq!(
        o.stderr.lines().count(),
        1,
        "one line expected: {}",
        o.stderr
    );
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "`{n}` not in: {}", o.stderr);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Arguments of a fast `snapshot` (static expert similarity only) of `model`
/// (`None`: the demo) under `name` into `golden/`.
fn snapshot_args<'a>(model: Option<&'a Path>, name: &'a str) -> Vec<&'a str> {
    let mut args = vec!["snapshot"];
    match model {
        Some(m) => args.extend(["--model", s(m)]),
        None => args.push("--demo"),
    }
    args.extend([
        "--analyses",
        "expert-similarity",
        "--golden-dir",
        "golden",
        "--name",
        name,
    ]);
    args
}

/// The bytes `snapshot` writes for `model` under `name` (in a scratch dir).
fn golden_bytes(model: Option<&Path>, name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dir.path(), &snapshot_args(model, name), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    std::fs::read(dir.path().join("golden").join(format!("{name}.json"))).unwrap()
}

/// Names of the files in `dir` ending in `.tmp`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// The writer's pid in a temp file name `.<file>.<pid>.<random>.tmp`.
fn temp_pid(name: &str, target: &str) -> Option<u32> {
    name.strip_prefix(&format!(".{target}."))?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A small xorshift generator; the seed is printed so a failure can be replayed
/// (`MOE_INSPECT_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("MOE_INSPECT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("seed: MOE_INSPECT_TEST_SEED={seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// 50 rounds: the golden holds an old snapshot; three `snapshot` processes of
/// the same name (two different new contents) start at once and one of them
/// is SIGKILLed after a random delay. Meanwhile a reader keeps reading the
/// golden. Every read and the final file are one of the complete contents
/// (never empty, never partial); after the round the golden is one of the new
/// contents (the survivors succeeded: writers of one name serialise on the
/// name's lock, they do not fail). Temp files left behind belong only to the
/// killed process and are removed by the next writer of that name; they are
/// never listed as pending.
#[test]
fn concurrent_and_killed_snapshots_leave_a_complete_golden() {
    let mixtral = fixture("mixtral");
    let qwen = fixture("qwen2-moe");
    let olmoe = fixture("olmoe");
    let old = golden_bytes(Some(&olmoe), "x");
    let new_a = golden_bytes(None, "x");
    let new_b = golden_bytes(Some(&mixtral), "x");
    let news = [&new_a, &new_b];
    assert!(old != new_a && old != new_b && new_a != new_b);

    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path();
    let golden_dir = cwd.join("golden");
    let golden = golden_dir.join("x.json");
    std::fs::create_dir_all(&golden_dir).unwrap();

    // How long one run takes, to spread kill times over a whole run.
    let t = Instant::now();
    let o = run(cwd, &snapshot_args(Some(&qwen), "y"), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let run_us = (t.elapsed().as_micros() as u64).clamp(2_000, 500_000);

    let mut rng = Rng::new();
    let started = Instant::now();
    let mut killed_mid_run = 0;
    for round in 0..50 {
        std::fs::write(&golden, &old).unwrap();
        let writers: Vec<Option<&Path>> = vec![None, Some(&mixtral), None];
        let mut children: Vec<_> = writers
            .iter()
            .map(|m| {
                let mut cmd = command(cwd, &snapshot_args(*m, "x"));
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                cmd.spawn().unwrap()
            })
            .collect();
        let victim = rng.below(children.len() as u64) as usize;
        let victim_pid = children[victim].id();
        let delay = Duration::from_micros(rng.below(run_us * 3 / 2));
        let stop = AtomicBool::new(false);
        let reads = AtomicUsize::new(0);
        let statuses = std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let bytes = std::fs::read(&golden)
                        .unwrap_or_else(|e| panic!("round {round}: golden unreadable: {e}"));
                    assert!(
                        bytes == old || news.contains(&&bytes),
                        "round {round}: a reader saw a partial golden of {} bytes",
                        bytes.len()
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
            std::thread::sleep(delay);
            if children[victim].try_wait().unwrap().is_none() {
                killed_mid_run += 1;
            }
            let _ = children[victim].kill();
            let statuses: Vec<_> = children
                .into_iter()
                .map(|c| c.wait_with_output().unwrap())
                .collect();
            stop.store(true, Ordering::Relaxed);
            statuses
        });
        for (i, st) in statuses.iter().enumerate() {
            let err = String::from_utf8_lossy(&st.stderr);
            assert!(!err.contains("panicked"), "{err}");
            if i != victim {
                assert_eq!(st.status.code(), Some(0), "round {round}: {err}");
            }
        }
        let bytes = std::fs::read(&golden).unwrap();
        assert!(
            news.contains(&&bytes),
            "round {round}: the golden is not one of the new complete files ({} bytes)",
            bytes.len()
        );
        Snapshot::read(&golden).unwrap();
        for t in temp_files(&golden_dir) {
            assert_eq!(
                temp_pid(&t, "x.json"),
                Some(victim_pid),
                "round {round}: temp file {t} not of the killed process"
            );
        }
        assert!(!golden_dir.join("x.json.tmp").exists());
        assert!(reads.load(Ordering::Relaxed) > 0);
    }
    eprintln!(
        "50 rounds in {:.1?} (one run ≈ {run_us} µs; {killed_mid_run} kills before the victim exited)",
        started.elapsed()
    );
    // A leftover temp file is never taken for a pending snapshot, and the
    // next writer of the name removes it.
    let stale = golden_dir.join(".x.json.4194999.0123456789abcdef.tmp");
    std::fs::write(&stale, b"{").unwrap();
    let o = run(cwd, &["accept", "--golden-dir", "golden"], &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("no pending snapshots"), "{}", o.stderr);
    let o = run(cwd, &snapshot_args(None, "x"), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(temp_files(&golden_dir), Vec::<String>::new());
    assert!(
        std::fs::read(&golden).unwrap() == new_a,
        "the golden is not the expected file"
    );
}

/// Symlinks at the old predictable temp path (`x.json.tmp`), at hidden temp
/// names and at the golden itself are never written through; a symlinked
/// lock file is refused (exit 2) and its target neither created nor changed.
#[cfg(unix)]
#[test]
fn symlinked_paths_are_not_followed() {
    use std::os::unix::fs::symlink;
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path();
    let golden_dir = cwd.join("golden");
    std::fs::create_dir_all(&golden_dir).unwrap();
    let victim = cwd.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    for link in ["x.json.tmp", ".x.json.tmp", "x.json.new", "x.json.new.tmp"] {
        symlink(&victim, golden_dir.join(link)).unwrap();
    }
    let o = run(cwd, &snapshot_args(None, "x"), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the symlink's target was written"
    );
    Snapshot::read(&golden_dir.join("x.json")).unwrap();

    // The golden itself a symlink: replaced by the new file, target intact.
    symlink(&victim, golden_dir.join("y.json")).unwrap();
    let o = run(cwd, &snapshot_args(None, "y"), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the symlink's target was written"
    );
    assert!(!std::fs::symlink_metadata(golden_dir.join("y.json"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A symlinked lock file (to a file, or dangling): refused.
    symlink(&victim, golden_dir.join(".z.lock")).unwrap();
    let o = run(cwd, &snapshot_args(None, "z"), &[]);
    assert_error(&o, &[".z.lock", "symlink"]);
    assert!(
        std::fs::read(&victim).unwrap() == b"precious",
        "the symlink's target was written"
    );
    let absent = cwd.join("absent.txt");
    symlink(&absent, golden_dir.join(".w.lock")).unwrap();
    let o = run(cwd, &snapshot_args(None, "w"), &[]);
    assert_error(&o, &[".w.lock", "symlink"]);
    assert!(!absent.exists());
    assert!(!golden_dir.join("z.json").exists() && !golden_dir.join("w.json").exists());
}

/// Runs `cmd` with the size of any file it writes limited to `bytes`
/// (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it fail as on a full disk.
#[cfg(unix)]
fn with_file_size_limit(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A full device: `trace --output /dev/full` is one clear exit-2 error. A golden
/// or bench baseline whose write fails half-way (file size limit; a small
/// tmpfs when the test may mount one) keeps its old complete content and
/// leaves no temp file.
#[cfg(unix)]
#[test]
fn a_full_disk_is_an_error_and_leaves_the_old_file() {
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path();

    if Path::new("/dev/full").exists() {
        let o = run(cwd, &["trace", "--demo", "--output", "/dev/full"], &[]);
        assert_error(&o, &["/dev/full"]);
    } else {
        eprintln!("no /dev/full on this system: that part is skipped");
    }

    // Golden: the old file stays.
    let olmoe = fixture("olmoe");
    let o = run(cwd, &snapshot_args(Some(&olmoe), "x"), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let golden_dir = cwd.join("golden");
    let golden = golden_dir.join("x.json");
    let old = std::fs::read(&golden).unwrap();
    let mut cmd = command(cwd, &snapshot_args(None, "x"));
    with_file_size_limit(&mut cmd, 4096);
    let o = output(cmd);
    assert_error(&o, &["x.json"]);
    assert!(std::fs::read(&golden).unwrap() == old, "the golden changed");
    assert_eq!(temp_files(&golden_dir), Vec::<String>::new());

    // Bench baseline: the old file stays.
    let bench = |extra: Option<u64>| {
        let mut cmd = command(
            cwd,
            &[
                "bench",
                "--quick",
                "--filter",
                "routing/softmax-topk/e8-k2/",
                "--tokens",
                "4",
                "--save-baseline",
                "b",
                "--baseline-dir",
                "baselines",
            ],
        );
        cmd.env("MOE_INSPECT_BENCH_DIR", cwd.join("bench-cache"));
        if let Some(limit) = extra {
            with_file_size_limit(&mut cmd, limit);
        }
        output(cmd)
    };
    let o = bench(None);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let baseline = cwd.join("baselines/b.json");
    let old = std::fs::read(&baseline).unwrap();
    assert!(old.len() > 512);
    let o = bench(Some(256));
    assert_error(&o, &["b.json"]);
    assert!(
        std::fs::read(&baseline).unwrap() == old,
        "the baseline changed"
    );
    assert_eq!(temp_files(&cwd.join("baselines")), Vec::<String>::new());

    // A real full file system, when this test may mount a small tmpfs.
    let mnt = cwd.join("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = unsafe { libc::geteuid() } == 0
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", s(&mnt)])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
    if !mounted {
        eprintln!("notice: cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): the full-tmpfs case is skipped");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let gdir = mnt.join("golden");
    let args = |model: Option<&Path>| {
        let mut a: Vec<String> = snapshot_args(model, "x")
            .into_iter()
            .map(String::from)
            .collect();
        let at = a.iter().position(|x| x == "golden").unwrap();
        a[at] = s(&gdir).to_string();
        a
    };
    let a = args(Some(&olmoe));
    let o = run(cwd, &a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let old = std::fs::read(gdir.join("x.json")).unwrap();
    // Fill the file system, leaving less room than the demo's golden needs.
    let fill = vec![0u8; 4096];
    let mut f = std::fs::File::create(mnt.join("filler")).unwrap();
    while std::io::Write::write_all(&mut f, &fill).is_ok() {}
    drop(f);
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("filler"))
        .and_then(|f| f.set_len(f.metadata()?.len().saturating_sub(8192)));
    let a = args(None);
    let o = run(cwd, &a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_error(&o, &["x.json"]);
    assert!(
        std::fs::read(gdir.join("x.json")).unwrap() == old,
        "the golden changed"
    );
    assert_eq!(temp_files(&gdir), Vec::<String>::new());
}

/// `trace --output` onto a file of the checkpoint being read (by any spelling or
/// hard link), or onto the token-ids file, and report directories whose files
/// would replace an input: exit 2 naming both, the input unchanged.
#[test]
fn outputs_that_would_overwrite_an_input_are_refused() {
    let model = copy_fixture("mixtral");
    let m = model.path();
    let weights = m.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path();
    let ids = cwd.join("ids.txt");
    std::fs::write(&ids, "1 2 3\n").unwrap();
    let link = cwd.join("hardlink.safetensors");
    std::fs::hard_link(&weights, &link).unwrap();
    let spelled = m.join(".").join("model.safetensors");
    for out in [&weights, &spelled, &link, &m.join("config.json"), &ids] {
        let o = run(
            cwd,
            &[
                "trace",
                "--model",
                s(m),
                "--token-ids",
                s(&ids),
                "--output",
                s(out),
            ],
            &[],
        );
        assert_error(&o, &["--output", s(out), "refusing to overwrite an input"]);
    }
    assert!(
        std::fs::read(&weights).unwrap() == before,
        "the checkpoint changed"
    );
    assert_eq!(std::fs::read_to_string(&ids).unwrap(), "1 2 3\n");
    // Writing a new file beside the checkpoint is fine.
    let trace = m.join("trace.safetensors");
    let o = run(
        cwd,
        &[
            "trace",
            "--model",
            s(m),
            "--token-ids",
            s(&ids),
            "--output",
            s(&trace),
        ],
        &[],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(trace.is_file());

    // analyze: report.json / report.md / a figure over the prompts file.
    let out = cwd.join("report");
    std::fs::create_dir_all(&out).unwrap();
    for (format, file) in [
        ("json", "report.json"),
        ("markdown", "report.md"),
        ("markdown", "expert-similarity-layer0.svg"),
    ] {
        let ids = out.join(file);
        std::fs::write(&ids, "1 2 3\n").unwrap();
        let o = run(
            cwd,
            &[
                "analyze",
                "--model",
                s(m),
                "--analyses",
                "all",
                "--token-ids",
                s(&ids),
                "--format",
                format,
                "--out",
                s(&out),
            ],
            &[],
        );
        assert_error(&o, &["--out", "refusing", file]);
        assert_eq!(std::fs::read_to_string(&ids).unwrap(), "1 2 3\n");
        std::fs::remove_file(&ids).unwrap();
    }
}

/// `--name` is checked like a Cargo.toml package name; nothing is written
/// for a bad one. Names from a directory are made valid.
#[test]
fn bad_golden_names_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();
    for name in [
        "../x", "/abs", "", "a/b", ".hidden", "a\\b", "..", "a.b", "x y",
    ] {
        let o = run(&cwd, &snapshot_args(None, name), &[]);
        assert_error(&o, &["--name", "golden name"]);
        for cmd in ["accept", "reject"] {
            let o = run(&cwd, &[cmd, "--golden-dir", "golden", "--name", name], &[]);
            assert_error(&o, &["--name"]);
        }
    }
    assert!(!cwd.join("golden").exists());
    assert!(!scratch.path().join("x.json").exists());
    assert!(!Path::new("/abs.json").exists());

    // A directory name with dots becomes a valid golden name.
    let dir = scratch.path().join("Mixtral-8x7B-v0.1");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("mixtral").join(f), dir.join(f)).unwrap();
    }
    let o = run(
        &cwd,
        &[
            "snapshot",
            "--model",
            s(&dir),
            "--analyses",
            "expert-similarity",
        ],
        &[],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(cwd.join("golden/Mixtral-8x7B-v0_1.json").is_file());

    // A configured model name is checked too.
    let proj = scratch.path().join("proj");
    std::fs::create_dir_all(proj.join("src")).unwrap();
    std::fs::write(proj.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        proj.join("Cargo.toml"),
        "[package]\nname = \"p\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [[package.metadata.moe-inspect.models]]\nname = \"../escape\"\ndemo = true\n",
    )
    .unwrap();
    let o = run(&proj, &["snapshot", "--analyses", "expert-similarity"], &[]);
    assert_error(&o, &["models[0].name", "../escape"]);
    assert!(!proj.join("golden").exists() && !scratch.path().join("escape.json").exists());
}

/// With `CI` set, `snapshot` writes nothing, not even a new golden.
#[test]
fn snapshot_on_ci_writes_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path();
    for ci in ["true", "1"] {
        let o = run(cwd, &snapshot_args(None, "fresh"), &[("CI", ci)]);
        assert_error(&o, &["CI", "fresh.json"]);
        assert!(!cwd.join("golden").exists());
    }
    // CI=false is not CI.
    let o = run(cwd, &snapshot_args(None, "fresh"), &[("CI", "false")]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(cwd.join("golden/fresh.json").is_file());
}

/// Without `cargo` on PATH (and `CARGO` unset) the golden commands use the
/// defaults when no manifest configures them; a manifest with a
/// `moe-inspect` table, or an explicit `--manifest-path`, is an error then.
#[test]
fn golden_commands_work_without_cargo_on_path() {
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().join("work");
    let empty_bin = scratch.path().join("bin");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(&empty_bin).unwrap();
    let no_cargo = |args: &[&str]| {
        let mut cmd = command(&cwd, args);
        cmd.env("PATH", &empty_bin).env_remove("CARGO");
        output(cmd)
    };
    let o = no_cargo(&["snapshot", "--demo", "--analyses", "expert-similarity"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(cwd.join("golden/demo.json").is_file());
    let o = no_cargo(&["check", "--demo"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let o = no_cargo(&["accept"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);

    std::fs::write(
        cwd.join("Cargo.toml"),
        "[workspace]\n[workspace.metadata.moe-inspect]\ngolden-dir = \"g\"\n",
    )
    .unwrap();
    let o = no_cargo(&["check", "--demo"]);
    assert_error(&o, &["Cargo.toml", "cargo"]);
    let o = no_cargo(&["check", "--demo", "--manifest-path", "Cargo.toml"]);
    assert_error(&o, &["Cargo.toml", "cargo"]);
}

/// `analyze --format json | head -1`: the reader closes the pipe after one
/// line (the output is megabytes, far more than a pipe holds); the process
/// ends quietly, not with a panic (exit 101).
#[test]
fn a_closed_stdout_ends_the_process_quietly() {
    let scratch = tempfile::tempdir().unwrap();
    let mut cmd = command(scratch.path(), &["analyze", "--format", "json"]);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "{");
    // The reader is dropped: the pipe is closed.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{:?}: {stderr}",
            out.status
        );
    }
}
