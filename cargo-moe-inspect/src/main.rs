//! `cargo moe-inspect`: a thin CLI over the `moe-inspect` library. Arguments
//! are parsed here (clap), turned into library options, and library errors are
//! mapped to exit codes: 0 success, 1 drift/regression, 2 usage or input error.

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
            eprintln!("error: {e}");
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
