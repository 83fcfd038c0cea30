//! Peak memory of the forward pass against the prompt length, on the scaled
//! Mixtral model of the benchmarks (4 layers, 8 experts, hidden 1024, 16
//! heads; written once into the bench data directory):
//!
//! `cargo run --release --example long_prompt_memory -- [512,2048,8192]`
//!
//! Each length runs in a child process (this example re-executed with
//! `--child N`), so each peak resident set (`ru_maxrss` from `wait4`) is that
//! run's alone. Printed as a Markdown table with the growth per token between
//! consecutive lengths: linear growth means a constant per-token cost, while
//! attention scores of all heads at once would grow with the square.

use std::process::Command;

use candle_core::Device;
use moe_inspect::bench::suite::scaled_mixtral_dir;
use moe_inspect::forward::Forward;
use moe_inspect::model::Model;

fn child(tokens: usize) {
    let dir = scaled_mixtral_dir("BF16").unwrap_or_else(|e| fail(&e.to_string()));
    let model = Model::open(&dir).unwrap_or_else(|e| fail(&e.to_string()));
    let fwd = Forward::new(&model, Device::Cpu).unwrap_or_else(|e| fail(&e.to_string()));
    let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7919) % 32000).collect();
    let t = std::time::Instant::now();
    fwd.run(std::slice::from_ref(&ids), &mut (), false)
        .unwrap_or_else(|e| fail(&e.to_string()));
    eprintln!(
        "{tokens} tokens: forward {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

#[cfg(target_os = "linux")]
fn peak_rss(tokens: usize) -> u64 {
    let exe = std::env::current_exe().unwrap_or_else(|e| fail(&e.to_string()));
    #[allow(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which also reads its peak RSS"
    )]
    let child = Command::new(exe)
        .args(["--child", &tokens.to_string()])
        .spawn()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let mut status = 0;
    // SAFETY: rusage is plain integers, for which all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes only into the two out-params, both live locals.
    let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    if rc < 0 || status != 0 {
        fail(&format!(
            "the {tokens}-token child failed (status {status})"
        ));
    }
    usage.ru_maxrss as u64 * 1024
}

#[cfg(not(target_os = "linux"))]
fn peak_rss(_tokens: usize) -> u64 {
    fail("peak RSS is read with wait4 on Linux only")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let n = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(512);
        child(n);
        return;
    }
    let lengths: Vec<usize> = args
        .first()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![512, 2048, 8192]);
    // Write the model first, so no child pays for it.
    scaled_mixtral_dir("BF16").unwrap_or_else(|e| fail(&e.to_string()));
    println!("| tokens | peak RSS (MiB) | growth per token since the previous row (KiB) |");
    println!("|---:|---:|---:|");
    let mut prev: Option<(usize, u64)> = None;
    for &n in &lengths {
        let rss = peak_rss(n);
        let growth = prev
            .filter(|(t, _)| n > *t)
            .map(|(t, r)| format!("{:.1}", (rss as f64 - r as f64) / (n - t) as f64 / 1024.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {n} | {:.0} | {growth} |",
            rss as f64 / (1u64 << 20) as f64
        );
        prev = Some((n, rss));
    }
}
