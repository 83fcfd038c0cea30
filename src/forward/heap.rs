//! Freed forward buffers kept in the process's heap.
//!
//! A forward pass allocates the same buffers layer after layer and pass
//! after pass: attention scores (`heads × rows × keys` f32, 4 MiB for 256
//! tokens and 16 heads), expert activations, residual sums. glibc's malloc
//! hands each one above its (adaptive) mmap threshold to a fresh `mmap`
//! and returns it with `munmap`, and trims the top of the heap back to the
//! system once more than its trim threshold is free there, so the next
//! layer pays a page fault and the kernel zeroing a page for every 4 KiB
//! again. Measured on the scaled Mixtral checkpoint (256-token prefill, 2
//! threads): 23 000 page faults and ~12% of the CPU time in the kernel per
//! pass, and 10% less wall time once freed buffers stay in the heap.

/// The largest allocation served from the heap rather than its own `mmap`
/// (glibc's upper bound for this setting): every per-layer buffer of a
/// forward pass is below it, weights loaded whole are above it.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of the heap kept for reuse instead of being
/// returned to the system.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Keeps freed buffers below [`MMAP_THRESHOLD`] in the heap (up to
/// [`TRIM_THRESHOLD`] free at its top) for the next layer and pass to
/// reuse, where the allocator is glibc's (`mallopt`); nothing elsewhere.
/// Process-wide: [`super::Forward::new`] calls it, so a process that runs
/// forward passes keeps its buffers, and one that only runs the static
/// analyses (one pass over each layer's weights, no activations) keeps
/// glibc's defaults, under which its peak memory is checked
/// (`cargo-moe-inspect/tests/memory.rs`). Memory still does not grow with
/// depth: every layer reuses the same buffers.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes two allocator parameters (both
            // values fit a c_int); it takes the allocator's own locks.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
            }
        });
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn faults() -> i64 {
        // SAFETY: rusage is plain integers and timevals; all-zero is valid.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is a valid rusage to fill.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
        u.ru_minflt
    }

    /// Buffers of a layer's sizes, freed and allocated again, come back
    /// without page faults: from the heap, not fresh pages from the system.
    #[test]
    fn freed_buffers_are_reused_without_page_faults() {
        keep_freed_buffers();
        // Each size once, to grow the heap (faults allowed).
        let sizes = [4 << 20, 9 << 20, 1 << 20, 30 << 20, 300 << 10];
        let touch = |n: usize| {
            let mut v = vec![0u8; n];
            for p in (0..n).step_by(4096) {
                v[p] = 1;
            }
            std::hint::black_box(&v);
        };
        let mut pages = 0;
        for &n in &sizes {
            touch(n);
            pages += n / 4096;
        }
        let before = faults();
        for _ in 0..3 {
            for &n in &sizes {
                touch(n);
            }
        }
        let after = faults();
        // Without the setting the 30 MiB buffer alone faults 7680 pages a
        // time (its own mmap); a few faults from other allocations are fine.
        assert!(
            after - before < (pages / 20) as i64,
            "{} faults for 3 × {pages} pages",
            after - before
        );
    }
}
