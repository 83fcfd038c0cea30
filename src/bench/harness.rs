//! The timing harness shared by `cargo moe-inspect bench`: a warm-up run,
//! then an adaptive number of samples within a time budget, each sample
//! timed after the device has finished (`Device::synchronize`), summarised
//! as the mean and a 95% Student-t confidence interval.

use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::{Error, Result};

/// How long and how often to sample one benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Measurement time aimed at (the warm-up is not counted).
    pub target: Duration,
    /// At least this many samples, however slow one iteration is.
    pub min_samples: usize,
    /// At most this many samples, however fast.
    pub max_samples: usize,
    /// Iterations are batched into samples of at least this duration (timer resolution, launch overhead).
    pub min_sample_time: Duration,
    /// Warm-up: calls before sampling until this much time has passed (at
    /// least one call; zero: exactly one).
    pub warm_up: Duration,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            target: Duration::from_millis(1500),
            min_samples: 5,
            max_samples: 30,
            min_sample_time: Duration::from_millis(5),
            warm_up: Duration::ZERO,
        }
    }
}

impl Budget {
    /// A budget for tests and smoke runs: a few fast samples.
    pub fn quick() -> Budget {
        Budget {
            target: Duration::from_millis(20),
            min_samples: 3,
            max_samples: 5,
            min_sample_time: Duration::from_micros(200),
            warm_up: Duration::ZERO,
        }
    }

    /// Exactly `n` samples (criterion's `--sample-size`), whatever the time.
    pub fn with_sample_size(self, n: usize) -> Budget {
        Budget {
            min_samples: n.max(1),
            max_samples: n.max(1),
            ..self
        }
    }
}

/// The warm-up: calls `f` (waiting for the device) until `budget.warm_up`
/// has passed, at least once; returns the time of one call, averaged over
/// the warm-up (at least 100 ns).
fn warm_up(
    device: &Device,
    budget: &Budget,
    f: &mut dyn FnMut() -> Result<()>,
    sync: &dyn Fn(&Device) -> Result<()>,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut calls = 0u32;
    loop {
        f()?;
        sync(device)?;
        calls += 1;
        if t0.elapsed() >= budget.warm_up || calls == u32::MAX {
            break;
        }
    }
    Ok((t0.elapsed() / calls).max(Duration::from_nanos(100)))
}

/// The samples of one benchmark: seconds per iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Seconds per iteration, one per sample.
    pub samples: Vec<f64>,
    /// Iterations averaged into each sample.
    pub iters_per_sample: usize,
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        d if d <= 30 => T[d - 1],
        d => 1.960 + 2.4 / d as f64,
    }
}

/// Mean of a sample set (0 when empty).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Sample standard deviation (0 with fewer than two values).
pub fn std_dev(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

impl Measurement {
    /// Mean seconds per iteration.
    pub fn mean(&self) -> f64 {
        mean(&self.samples)
    }

    /// 95% confidence interval of the mean time (t-interval; the mean itself
    /// with fewer than two samples).
    pub fn ci95(&self) -> (f64, f64) {
        let m = self.mean();
        let n = self.samples.len();
        if n < 2 {
            return (m, m);
        }
        let half = t975(n - 1) * std_dev(&self.samples) / (n as f64).sqrt();
        ((m - half).max(0.0), m + half)
    }
}

/// Times `f` on `device`: the warm-up (one call by default), then samples until `budget` is
/// spent. Each sample runs `f` a fixed number of times and waits for the
/// device before the clock stops.
pub fn measure(
    device: &Device,
    budget: &Budget,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Measurement> {
    let sync = |d: &Device| {
        d.synchronize().map_err(|e| Error::Compute {
            what: "device synchronisation".into(),
            reason: e.to_string(),
        })
    };
    let first = warm_up(device, budget, &mut f, &sync)?;
    let iters = if first < budget.min_sample_time {
        (budget.min_sample_time.as_secs_f64() / first.as_secs_f64()).ceil() as usize
    } else {
        1
    }
    .clamp(1, 1_000_000);
    let per_sample = first.as_secs_f64() * iters as f64;
    let wanted = (budget.target.as_secs_f64() / per_sample).floor() as usize;
    let n = wanted.clamp(budget.min_samples.max(1), budget.max_samples.max(1));
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        sync(device)?;
        samples.push(t.elapsed().as_secs_f64() / iters as f64);
        // The warm-up can underestimate; keep the total bounded.
        if samples.len() >= budget.min_samples && start.elapsed() > budget.target * 2 {
            break;
        }
    }
    Ok(Measurement {
        samples,
        iters_per_sample: iters,
    })
}

/// Times several alternatives of the same work interleaved: one sample of
/// each in turn, round after round, so that a change of machine load during
/// the run (another process, frequency scaling) affects all of them alike and
/// their ratios stay fair. `budget.target` is per alternative.
pub fn measure_interleaved(
    device: &Device,
    budget: &Budget,
    fs: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<Measurement>> {
    let sync = |d: &Device| {
        d.synchronize().map_err(|e| Error::Compute {
            what: "device synchronisation".into(),
            reason: e.to_string(),
        })
    };
    let mut iters = Vec::with_capacity(fs.len());
    let mut rounds = budget.max_samples.max(1);
    for f in fs.iter_mut() {
        let first = warm_up(device, budget, &mut **f, &sync)?;
        let n = if first < budget.min_sample_time {
            (budget.min_sample_time.as_secs_f64() / first.as_secs_f64()).ceil() as usize
        } else {
            1
        }
        .clamp(1, 1_000_000);
        let wanted = (budget.target.as_secs_f64() / (first.as_secs_f64() * n as f64)) as usize;
        rounds = rounds.min(wanted.clamp(budget.min_samples.max(1), budget.max_samples.max(1)));
        iters.push(n);
    }
    let mut out: Vec<Measurement> = iters
        .iter()
        .map(|&n| Measurement {
            samples: Vec::with_capacity(rounds),
            iters_per_sample: n,
        })
        .collect();
    let start = Instant::now();
    for round in 0..rounds {
        for (f, m) in fs.iter_mut().zip(out.iter_mut()) {
            let t = Instant::now();
            for _ in 0..m.iters_per_sample {
                f()?;
            }
            sync(device)?;
            m.samples
                .push(t.elapsed().as_secs_f64() / m.iters_per_sample as f64);
        }
        if round + 1 >= budget.min_samples
            && start.elapsed() > budget.target * (2 * fs.len() as u32)
        {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_of_known_samples() {
        let m = Measurement {
            samples: vec![1.0, 2.0, 3.0, 4.0, 5.0],
            iters_per_sample: 1,
        };
        let (lo, hi) = m.ci95();
        // mean 3, sd sqrt(2.5), t(4) = 2.776: half-width 1.963
        assert!((m.mean() - 3.0).abs() < 1e-12);
        assert!((hi - lo - 2.0 * 2.776 * 2.5f64.sqrt() / 5f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn measure_counts_every_call_and_batches_fast_ones() {
        let mut calls = 0usize;
        let m = measure(&Device::Cpu, &Budget::quick(), || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert!(m.samples.len() >= 3 && m.samples.len() <= 5);
        assert!(m.iters_per_sample > 1, "a no-op is batched");
        assert_eq!(calls, 1 + m.samples.len() * m.iters_per_sample);
    }

    #[test]
    fn a_sample_size_is_exact_and_the_warm_up_runs_its_time() {
        // Exactly 7 samples, both for slow calls (more than the quick
        // budget's target) and fast ones (more than its 5-sample maximum).
        let warm = Duration::from_millis(15);
        for sleep_us in [0u64, 5_000] {
            let budget = Budget {
                warm_up: warm,
                ..Budget::quick().with_sample_size(7)
            };
            let mut calls: Vec<Instant> = Vec::new();
            let m = measure(&Device::Cpu, &budget, || {
                calls.push(Instant::now());
                std::thread::sleep(Duration::from_micros(sleep_us));
                Ok(())
            })
            .unwrap();
            assert_eq!(m.samples.len(), 7, "sleep {sleep_us} µs");
            assert!(m.samples.iter().all(|s| s.is_finite() && *s > 0.0));
            let sampled = m.samples.len() * m.iters_per_sample;
            assert!(calls.len() > sampled, "at least one warm-up call");
            let warm_calls = calls.len() - sampled;
            // Sampling starts only once the warm-up time has passed (less
            // the instant between the warm-up's clock start and first call).
            assert!(
                calls[warm_calls] - calls[0] >= warm - Duration::from_millis(1),
                "sampling began {:?} after the first call",
                calls[warm_calls] - calls[0]
            );
        }
        let ms = measure_interleaved(
            &Device::Cpu,
            &Budget::quick().with_sample_size(9),
            &mut [&mut || Ok(()), &mut || Ok(())],
        )
        .unwrap();
        assert!(ms.iter().all(|m| m.samples.len() == 9));
    }

    #[test]
    fn interleaved_alternatives_get_the_same_number_of_samples() {
        let (mut a, mut b) = (0usize, 0usize);
        let ms = measure_interleaved(
            &Device::Cpu,
            &Budget::quick(),
            &mut [
                &mut || {
                    a += 1;
                    Ok(())
                },
                &mut || {
                    b += 1;
                    std::thread::sleep(Duration::from_micros(300));
                    Ok(())
                },
            ],
        )
        .unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].samples.len(), ms[1].samples.len());
        assert!(ms[0].samples.len() >= 3);
        assert_eq!(a, 1 + ms[0].samples.len() * ms[0].iters_per_sample);
        assert_eq!(b, 1 + ms[1].samples.len() * ms[1].iters_per_sample);
    }
}
