//! `cargo moe-inspect`: a thin CLI over the `moe-inspect` library. Arguments
//! are parsed here (clap), turned into library options, and library errors are
//! mapped to exit codes: 0 success, 1 drift/regression, 2 usage or input error.

/// A notice on stderr (`wrote …`, `note: …`): silenced by `--quiet`.
/// Errors are not notices: they always print.
macro_rules! notice {
    ($($arg:tt)*) => {
        if !$crate::commands::quiet() {
            eprintln!($($arg)*);
        }
    };
}

/// Detail on stderr (files read and written, phase timings): `--verbose` only.
macro_rules! detail {
    ($($arg:tt)*) => {
        if $crate::commands::verbose() {
            eprintln!($($arg)*);
        }
    };
}

mod bench_cmd;
mod cli;
mod commands;
mod golden_cmd;
mod import_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    // `cargo moe-inspect ...` runs us as `cargo-moe-inspect moe-inspect ...`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "moe-inspect") {
        args.remove(1);
    }
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and --version go to stdout with exit 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// The Rust runtime ignores SIGPIPE, so a write to a closed pipe
/// (`cargo moe-inspect analyze --format json | head -1`) returns an error and
/// `print!` panics (exit 101). Like other command-line tools, we let SIGPIPE
/// end the process quietly instead.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any thread is started;
    // setting a signal's disposition to its default has no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The one line printed for an error. The library names the kind of a bad
/// value ("layer selection `x`"); here it is named by the flag that gave it.
fn render_error(e: &moe_inspect::Error) -> String {
    use moe_inspect::ValueKind;
    let moe_inspect::Error::BadValue {
        kind,
        value,
        reason,
    } = e
    else {
        return e.to_string();
    };
    let flag = match kind {
        ValueKind::Layers => "--layers",
        ValueKind::Device => "--device",
        ValueKind::Analyses => "--analyses",
        ValueKind::TokenCounts => "--tokens",
        ValueKind::BenchFilter => "--filter",
        ValueKind::Manifest => "--manifest-path",
        ValueKind::Prompts => {
            let at = if value.is_empty() {
                String::new()
            } else {
                format!("{value}: ")
            };
            return format!(
                "{at}{reason}: pass --prompts FILE (text or JSONL) or --token-ids FILE"
            );
        }
        ValueKind::TokenIds => return format!("{value}: {reason}: pass --token-ids FILE"),
        _ => return e.to_string(),
    };
    if value.is_empty() {
        format!("{flag}: {reason}")
    } else {
        format!("{flag} `{value}`: {reason}")
    }
}
