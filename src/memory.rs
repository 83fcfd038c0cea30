//! Up-front memory checks: a request whose working set cannot fit (a
//! 100k-token prompt with every expert evaluated, `bench --tokens 1000000000`)
//! gets one clear error stating the bytes it would need, instead of an
//! allocation failure (abort) in the middle of the run.

use crate::error::{Error, Result};

/// Environment variable capping the memory a run may plan to use
/// (`MOE_INSPECT_MAX_MEMORY=8G`; suffixes K, M, G, T are powers of 1024).
pub const MAX_MEMORY_VAR: &str = "MOE_INSPECT_MAX_MEMORY";

/// The `--max-memory` cap of this process, 0 when none (see [`set_max_memory`]).
static MAX_MEMORY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Caps the memory this process plans with (the CLI's `--max-memory`): it
/// takes precedence over [`MAX_MEMORY_VAR`]; `None` removes the cap.
pub fn set_max_memory(bytes: Option<u64>) {
    MAX_MEMORY.store(
        bytes.unwrap_or(0).max(u64::from(bytes.is_some())),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Bytes of memory available to this process now: `MemAvailable` of
/// `/proc/meminfo` on Linux, capped by the cgroup limit when one is set and
/// by `--max-memory` ([`set_max_memory`]) or else [`MAX_MEMORY_VAR`]; `None`
/// where none can be read (the check is then skipped, except for sizes no
/// allocation can have).
pub fn available() -> Option<u64> {
    let set = MAX_MEMORY.load(std::sync::atomic::Ordering::Relaxed);
    let cap = if set > 0 {
        Some(set)
    } else {
        std::env::var(MAX_MEMORY_VAR)
            .ok()
            .and_then(|v| parse_size(&v))
    };
    match (system_available(), cap) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// `123`, `64K`, `512M`, `8G`, `1T` (binary units; an optional trailing `B`
/// or `iB`); `None` when it is not a size.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last()? {
        'K' | 'k' => (&t[..t.len() - 1], 10),
        'M' | 'm' => (&t[..t.len() - 1], 20),
        'G' | 'g' => (&t[..t.len() - 1], 30),
        'T' | 't' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

fn system_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut bytes = kib.saturating_mul(1024);
    if let Some(limit) = cgroup_limit() {
        bytes = bytes.min(limit);
    }
    Some(bytes)
}

/// The cgroup v2 memory limit less the current usage, when one is set.
fn cgroup_limit() -> Option<u64> {
    let max: u64 = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let current: u64 = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current))
}

/// `a × b × …` of sizes, saturating at `u64::MAX` (a saturated product is
/// refused by [`ensure_fits`]).
pub fn product(factors: &[usize]) -> u64 {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f as u64))
        .unwrap_or(u64::MAX)
}

/// Human form of a byte count: `3.4 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Fails with a usage error (exit 2) when `what` would need more than the
/// memory available, stating both.
pub fn ensure_fits(what: &str, bytes: u64) -> Result<()> {
    ensure_fits_in(what, bytes, available())
}

fn ensure_fits_in(what: &str, bytes: u64, available: Option<u64>) -> Result<()> {
    let too_big = match available {
        Some(a) => bytes > a,
        None => bytes > isize::MAX as u64,
    };
    if too_big {
        let need = if bytes == u64::MAX {
            "more than 16 EiB".to_string()
        } else {
            format!("about {} ({bytes} bytes)", human(bytes))
        };
        return Err(Error::Usage(format!(
            "{what} would need {need} of memory, but {} available; use fewer or shorter prompts (or fewer tokens)",
            available.map_or("no allocation can be that large".to_string(), |a| format!(
                "only {} is",
                human(a)
            ))
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_does_not_fit_and_says_how_much() {
        let err = ensure_fits_in("a forward pass", 3 << 30, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3.0 GiB") && err.contains("only 1.0 GiB"),
            "{err}"
        );
        assert!(ensure_fits_in("x", 1 << 20, Some(1 << 30)).is_ok());
        let err = ensure_fits_in("x", product(&[1 << 40, 1 << 40]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 16 EiB"), "{err}");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("8GiB"), Some(8 << 30));
        assert_eq!(parse_size(" 2k "), Some(2048));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("99999999999T"), None);
        for bad in ["", "G", "x", "-1", "1.5G"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn products_saturate_instead_of_wrapping() {
        assert_eq!(product(&[3, 4]), 12);
        assert_eq!(product(&[usize::MAX, 2]), u64::MAX);
        assert_eq!(product(&[]), 1);
    }

    #[test]
    fn this_machine_reports_available_memory() {
        if cfg!(target_os = "linux") {
            let a = available().expect("MemAvailable on Linux");
            assert!(a > 0);
        }
    }
}
