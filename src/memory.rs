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

/// What this process's memory cgroups leave it: for each cgroup from the
/// process's own up to the root (cgroup v2 `memory.max`; v1
/// `memory.limit_in_bytes`), its limit less its usage not counting the
/// inactive file cache (reclaimable), the smallest over the path; `None`
/// when no limit is set or none can be read. A container sees its own
/// limit, and so does a process started in a smaller cgroup by systemd or
/// a CI runner.
fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_dirs(&own)
        .iter()
        .filter_map(|(dir, v2)| {
            let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
            let (max, usage, stat) = if *v2 {
                (
                    read("memory.max")?,
                    read("memory.current")?,
                    read("memory.stat"),
                )
            } else {
                (
                    read("memory.limit_in_bytes")?,
                    read("memory.usage_in_bytes")?,
                    read("memory.stat"),
                )
            };
            headroom(&max, &usage, stat.as_deref(), *v2)
        })
        .min()
}

/// The memory cgroup directories of this process, innermost first, from
/// `/proc/self/cgroup` (`0::/path` for v2, `N:…memory…:/path` for v1).
fn cgroup_dirs(proc_self_cgroup: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, v2) = if controllers.is_empty() {
            ("/sys/fs/cgroup", true)
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", false)
        } else {
            continue;
        };
        let mut p = path.trim_end_matches('/').to_string();
        loop {
            out.push((format!("{root}{p}"), v2));
            match p.rfind('/') {
                Some(i) => p.truncate(i),
                None => break,
            }
            if p.is_empty() {
                out.push((root.to_string(), v2));
                break;
            }
        }
    }
    out
}

/// A cgroup's limit less its usage net of inactive file pages; `None` when
/// unlimited (`max`, or v1's page-rounded `i64::MAX`) or unreadable.
fn headroom(max: &str, usage: &str, stat: Option<&str>, v2: bool) -> Option<u64> {
    let limit: u64 = max.trim().parse().ok()?;
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = usage.trim().parse().ok()?;
    let key = if v2 {
        "inactive_file "
    } else {
        "total_inactive_file "
    };
    let cache: u64 = stat
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key)))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(cache)))
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

/// Large scratch buffers kept for the next use instead of being returned
/// to the system: a buffer of hundreds of MB (the n × n similarities of a
/// neuron-reorder pair at Mixtral-8x7B size, 822 MB) is mapped afresh by
/// every allocation, and the kernel zeroes each of its pages on the first
/// write; on the 2-core machine of docs/performance.md that zeroing was 14%
/// of a Mixtral-size neuron-reorder. Keeps at most `limit` buffers (further
/// ones are freed); [`Recycler::clear`] frees them all.
pub(crate) struct Recycler<T> {
    kept: std::sync::Mutex<Vec<Vec<T>>>,
    limit: usize,
}

impl<T: Copy + Default> Recycler<T> {
    /// An empty recycler that keeps up to `limit` buffers.
    pub(crate) const fn new(limit: usize) -> Recycler<T> {
        Recycler {
            kept: std::sync::Mutex::new(Vec::new()),
            limit,
        }
    }

    /// `len` zeros (`T::default()`), in a kept buffer when one is large
    /// enough (the smallest such), else newly allocated.
    pub(crate) fn take(&self, len: usize) -> Vec<T> {
        let found = {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let best = (0..kept.len())
                .filter(|&i| kept[i].capacity() >= len)
                .min_by_key(|&i| kept[i].capacity());
            best.map(|i| kept.swap_remove(i))
        };
        match found {
            Some(mut v) => {
                v.clear();
                v.resize(len, T::default());
                v
            }
            None => vec![T::default(); len],
        }
    }

    /// Keeps `v` for a later [`Recycler::take`] (frees it when `limit` are
    /// kept already).
    pub(crate) fn give(&self, v: Vec<T>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < self.limit && v.capacity() > 0 {
            kept.push(v);
        }
    }

    /// Frees every kept buffer.
    pub(crate) fn clear(&self) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// How many buffers are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_walk_up_to_the_root_for_v1_and_v2() {
        let v1 = "9:name=systemd:/\n4:memory:/ci/job7\n3:cpuset:/\n";
        assert_eq!(
            cgroup_dirs(v1),
            [
                ("/sys/fs/cgroup/memory/ci/job7".to_string(), false),
                ("/sys/fs/cgroup/memory/ci".to_string(), false),
                ("/sys/fs/cgroup/memory".to_string(), false),
            ]
        );
        assert_eq!(
            cgroup_dirs("0::/user.slice/run.scope\n"),
            [
                ("/sys/fs/cgroup/user.slice/run.scope".to_string(), true),
                ("/sys/fs/cgroup/user.slice".to_string(), true),
                ("/sys/fs/cgroup".to_string(), true),
            ]
        );
        assert_eq!(
            cgroup_dirs("0::/\n"),
            [("/sys/fs/cgroup".to_string(), true)]
        );
    }

    #[test]
    fn headroom_is_the_limit_less_usage_net_of_inactive_file_pages() {
        let gib = 1u64 << 30;
        let stat = "cache 100\ntotal_inactive_file 1073741824\n";
        assert_eq!(
            headroom(
                &(2 * gib).to_string(),
                &(gib + gib / 2).to_string(),
                Some(stat),
                false
            ),
            Some(gib + gib / 2)
        );
        assert_eq!(headroom("max", "5", None, true), None);
        assert_eq!(headroom("9223372036854771712", "5", None, false), None);
        assert_eq!(headroom("100", "150", None, true), Some(0));
        assert_eq!(headroom("100", "x", None, true), None);
    }

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

    /// A taken buffer is all zeros whether it is new or kept (a kept one
    /// is reused, not reallocated); at most `limit` are kept; `clear`
    /// frees them.
    #[test]
    fn recycled_buffers_come_back_zeroed_and_are_bounded() {
        let r: Recycler<f32> = Recycler::new(2);
        let mut a = r.take(1000);
        assert_eq!(a.len(), 1000);
        assert!(a.iter().all(|&v| v == 0.0));
        a.fill(f32::NAN);
        let ptr = a.as_ptr();
        r.give(a);
        let b = r.take(600);
        assert_eq!(b.as_ptr(), ptr, "the kept buffer was not reused");
        assert_eq!(b.len(), 600);
        assert!(
            b.iter().all(|&v| v == 0.0),
            "a reused buffer kept old values"
        );
        let c = r.take(5000);
        assert!(c.len() == 5000 && c.iter().all(|&v| v == 0.0));
        r.give(b);
        r.give(c);
        r.give(vec![1.0; 10]);
        assert_eq!(r.kept(), 2);
        r.clear();
        assert_eq!(r.kept(), 0);
    }
}
