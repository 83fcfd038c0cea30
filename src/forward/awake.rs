//! The pool kept awake through a burst of small parallel products.
//!
//! A decode step hands about twenty products of a few hundred microseconds
//! each to the thread pool. Between two of them the pool's idle threads go
//! to sleep, and every hand-off then pays a futex wake (and the thread's
//! return from the scheduler) before the work is shared: measured, the
//! sleep and wake calls took 3–6% of a step. llama.cpp's threads spin
//! through a whole graph for the same reason.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` on the calling thread while the pool's other threads spin,
/// taking any job the pool has (`rayon::yield_now`) until `f` returns,
/// instead of sleeping between `f`'s parallel products.
///
/// Only on a thread of the pool: called from outside, every parallel
/// product of `f` is handed to the pool whole and the caller waits on it,
/// which spinning threads would not change; `f` then runs as is.
pub(crate) fn with_awake_pool<T>(f: impl FnOnce() -> T) -> T {
    let Some(me) = rayon::current_thread_index() else {
        return f();
    };
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 {
        return f();
    }
    let done = AtomicBool::new(false);
    /// Ends the helpers' spinning when `f` returns or unwinds (the scope
    /// waits for them).
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| {
                // The calling thread may pick a helper up itself while it
                // waits inside `f` for a stolen job: spinning there would
                // never return to `f`.
                if rayon::current_thread_index() == Some(me) {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        for _ in 0..32 {
                            std::hint::spin_loop();
                        }
                    }
                }
            });
        }
        let _done = Done(&done);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn the_result_is_the_same_and_the_helpers_stop() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let xs: Vec<u64> = (0..100_000).collect();
        let want: u64 = xs.iter().map(|x| x * x).sum();
        // On a pool thread (the helpers run) and from outside (they do not):
        // the parallel sums inside are the plain ones, and the call returns.
        let inside = pool.install(|| {
            with_awake_pool(|| {
                (0..20)
                    .map(|_| xs.par_iter().map(|x| x * x).sum::<u64>())
                    .collect::<Vec<_>>()
            })
        });
        assert_eq!(inside, vec![want; 20]);
        let outside = with_awake_pool(|| xs.par_iter().map(|x| x * x).sum::<u64>());
        assert_eq!(outside, want);
        // A panic inside ends the helpers too (the scope would wait forever).
        let r = pool.install(|| std::panic::catch_unwind(|| with_awake_pool(|| panic!("inside"))));
        assert!(r.is_err());
    }
}
