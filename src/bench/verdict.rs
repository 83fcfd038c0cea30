//! Regression verdicts against a baseline, as criterion decides them: the
//! change in mean time is `now / baseline - 1`, with a 95% interval from a
//! bootstrap over both sample sets; a benchmark has regressed only when the
//! whole interval lies above `+threshold`, improved only when it lies below
//! `-threshold`; anything else is noise.

use serde::{Deserialize, Serialize};

use crate::bench::harness::mean;
use crate::bench::schema::BenchFile;
use crate::rng::Rng;

/// The default noise threshold (5%).
pub const DEFAULT_THRESHOLD: f64 = 0.05;

/// What happened to one benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Slower: the interval of the change lies wholly above the threshold.
    Regressed,
    /// Faster: the interval lies wholly below minus the threshold.
    Improved,
    /// Within the noise threshold (or the interval straddles it).
    Unchanged,
    /// Not in the baseline.
    New,
}

impl Status {
    /// The status as shown in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Regressed => "regressed",
            Status::Improved => "improved",
            Status::Unchanged => "unchanged",
            Status::New => "new",
        }
    }
}

/// The verdict on one benchmark.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    /// Benchmark name.
    pub name: String,
    /// Regressed, improved, unchanged or new.
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Baseline mean seconds per iteration, if the baseline has it.
    pub baseline_mean_s: Option<f64>,
    /// Mean seconds per iteration now.
    pub mean_s: f64,
    /// `mean_s / baseline_mean_s - 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Lower bound of the relative change (confidence interval).
    pub change_low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Upper bound of the relative change (confidence interval).
    pub change_high: Option<f64>,
}

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next() % n as u64) as usize
}

fn resampled_mean(xs: &[f64], rng: &mut Rng) -> f64 {
    (0..xs.len()).map(|_| xs[below(rng, xs.len())]).sum::<f64>() / xs.len() as f64
}

/// The relative change of the mean, `now / base - 1`, and its 95% bootstrap
/// interval (2000 resamples of both sets; a point interval when either set
/// has fewer than two samples).
pub fn change_interval(now: &[f64], base: &[f64]) -> (f64, f64, f64) {
    let point = mean(now) / mean(base) - 1.0;
    if now.len() < 2 || base.len() < 2 {
        return (point, point, point);
    }
    let mut rng = Rng(0x5eed);
    let mut ratios: Vec<f64> = (0..2000)
        .map(|_| resampled_mean(now, &mut rng) / resampled_mean(base, &mut rng) - 1.0)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    (point, at(0.025), at(0.975))
}

/// Classifies a change interval against the noise threshold.
pub fn classify(low: f64, high: f64, threshold: f64) -> Status {
    if low > threshold {
        Status::Regressed
    } else if high < -threshold {
        Status::Improved
    } else {
        Status::Unchanged
    }
}

/// The verdict on every benchmark of `now` against `baseline`.
pub fn compare(now: &BenchFile, baseline: &BenchFile, threshold: f64) -> Vec<Verdict> {
    now.benchmarks
        .iter()
        .map(|b| match baseline.get(&b.name) {
            None => Verdict {
                name: b.name.clone(),
                status: Status::New,
                baseline_mean_s: None,
                mean_s: b.mean_s,
                change: None,
                change_low: None,
                change_high: None,
            },
            Some(base) => {
                let (c, lo, hi) = if b.samples_s.is_empty() || base.samples_s.is_empty() {
                    let c = b.mean_s / base.mean_s - 1.0;
                    (c, c, c)
                } else {
                    change_interval(&b.samples_s, &base.samples_s)
                };
                Verdict {
                    name: b.name.clone(),
                    status: classify(lo, hi, threshold),
                    baseline_mean_s: Some(base.mean_s),
                    mean_s: b.mean_s,
                    change: Some(c),
                    change_low: Some(lo),
                    change_high: Some(hi),
                }
            }
        })
        .collect()
}

/// A benchmark too noisy for the threshold: its 95% interval (of the change
/// against the baseline, or without one of the mean time relative to the
/// mean) is wider than the noise threshold, so it cannot resolve a change
/// of the threshold's size.
#[derive(Debug, Clone, PartialEq)]
pub struct Noise {
    /// Benchmark name.
    pub name: String,
    /// Lower bound of the interval, relative (`-0.03` is −3%).
    pub low: f64,
    /// Upper bound of the interval, relative.
    pub high: f64,
    /// Whether the interval is of the change against a baseline (else of
    /// the mean time around the mean).
    pub of_change: bool,
}

/// The benchmarks of `now` whose 95% interval is wider than `threshold`:
/// with `verdicts`, the interval of each change; without, each benchmark's
/// interval of the mean time, relative to the mean.
pub fn noisy(now: &BenchFile, verdicts: Option<&[Verdict]>, threshold: f64) -> Vec<Noise> {
    match verdicts {
        Some(vs) => vs
            .iter()
            .filter_map(|v| {
                let (lo, hi) = (v.change_low?, v.change_high?);
                (hi - lo > threshold).then(|| Noise {
                    name: v.name.clone(),
                    low: lo,
                    high: hi,
                    of_change: true,
                })
            })
            .collect(),
        None => now
            .benchmarks
            .iter()
            .filter(|b| b.mean_s > 0.0)
            .filter_map(|b| {
                let (lo, hi) = (b.ci_low_s / b.mean_s - 1.0, b.ci_high_s / b.mean_s - 1.0);
                (hi - lo > threshold).then(|| Noise {
                    name: b.name.clone(),
                    low: lo,
                    high: hi,
                    of_change: false,
                })
            })
            .collect(),
    }
}

/// Whether any verdict is a regression (the process then exits 1).
pub fn any_regressed(verdicts: &[Verdict]) -> bool {
    verdicts.iter().any(|v| v.status == Status::Regressed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::schema::{BenchResult, Machine, SCHEMA};

    fn result(name: &str, samples: &[f64]) -> BenchResult {
        BenchResult {
            name: name.into(),
            group: "routing".into(),
            variant: "softmax-topk".into(),
            model: "e8-k2".into(),
            tokens: 16,
            samples_s: samples.to_vec(),
            iters_per_sample: 1,
            mean_s: mean(samples),
            ci_low_s: 0.0,
            ci_high_s: 0.0,
            tokens_per_s: 16.0 / mean(samples),
            flops: 0.0,
            bytes: 0.0,
            gflops: 0.0,
            gbs: 0.0,
            flops_share: None,
            bw_share: None,
            rel_error: None,
            weights: None,
            compute: None,
        }
    }

    fn file(benches: Vec<BenchResult>) -> BenchFile {
        BenchFile {
            schema: SCHEMA.into(),
            tool: "test".into(),
            created_unix: 0,
            device: "cpu".into(),
            machine: Machine::default(),
            benchmarks: benches,
            baseline: None,
        }
    }

    /// Samples around `centre` with a fixed ±`spread` relative jitter pattern.
    fn jittered(centre: f64, spread: f64) -> Vec<f64> {
        [0.0, 0.6, -0.8, 0.3, -0.4, 1.0, -1.0, 0.1, -0.2, 0.7]
            .iter()
            .map(|j| centre * (1.0 + spread * j))
            .collect()
    }

    #[test]
    fn a_clear_slowdown_is_a_regression() {
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.01))]);
        let now = file(vec![result("cpu/a", &jittered(1.3, 0.01))]);
        let v = compare(&now, &base, DEFAULT_THRESHOLD);
        assert_eq!(v[0].status, Status::Regressed);
        let (c, lo, hi) = (
            v[0].change.unwrap(),
            v[0].change_low.unwrap(),
            v[0].change_high.unwrap(),
        );
        assert!((c - 0.3).abs() < 1e-9, "{c}");
        assert!(lo > 0.05 && lo <= c && c <= hi);
        assert!(any_regressed(&v));
    }

    #[test]
    fn noise_within_the_threshold_is_not_flagged() {
        // +3% mean shift with ±3% jitter: unchanged, in either direction.
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.03))]);
        let slower = file(vec![result("cpu/a", &jittered(1.03, 0.03))]);
        let faster = file(vec![result("cpu/a", &jittered(0.97, 0.03))]);
        for now in [&slower, &faster] {
            let v = compare(now, &base, DEFAULT_THRESHOLD);
            assert_eq!(v[0].status, Status::Unchanged, "{v:?}");
            assert!(!any_regressed(&v));
        }
    }

    #[test]
    fn a_large_but_noisy_change_is_not_flagged() {
        // +8% on average, but samples scattered by ±40%: the interval reaches below +5%.
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.4))]);
        let now = file(vec![result("cpu/a", &jittered(1.08, 0.4))]);
        let v = compare(&now, &base, DEFAULT_THRESHOLD);
        assert_eq!(v[0].status, Status::Unchanged, "{v:?}");
        assert!(v[0].change_low.unwrap() < 0.05);
    }

    #[test]
    fn an_interval_wider_than_the_threshold_is_noise() {
        // ±40% scatter: the change's interval spans far more than 5%.
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.4))]);
        let now = file(vec![
            result("cpu/a", &jittered(1.08, 0.4)),
            result("cpu/b", &jittered(1.0, 0.4)),
        ]);
        let v = compare(&now, &base, DEFAULT_THRESHOLD);
        let n = noisy(&now, Some(&v), DEFAULT_THRESHOLD);
        assert_eq!(n.len(), 1, "cpu/b is new: no change interval");
        assert_eq!(n[0].name, "cpu/a");
        assert!(n[0].of_change && n[0].high - n[0].low > DEFAULT_THRESHOLD);
        assert!(n[0].low.is_finite() && n[0].high.is_finite());
        // A wider threshold accepts the same interval.
        assert!(noisy(&now, Some(&v), n[0].high - n[0].low + 1e-9).is_empty());
        // ±0.5% scatter: well within 5%, no warning.
        let tight_base = file(vec![result("cpu/a", &jittered(1.0, 0.005))]);
        let tight = file(vec![result("cpu/a", &jittered(1.2, 0.005))]);
        let v = compare(&tight, &tight_base, DEFAULT_THRESHOLD);
        assert!(noisy(&tight, Some(&v), DEFAULT_THRESHOLD).is_empty());
    }

    #[test]
    fn without_a_baseline_the_mean_interval_is_judged() {
        let mut wide = result("cpu/a", &jittered(1.0, 0.4));
        wide.mean_s = 1.0;
        wide.ci_low_s = 0.9;
        wide.ci_high_s = 1.1;
        let mut narrow = result("cpu/b", &jittered(1.0, 0.01));
        narrow.mean_s = 1.0;
        narrow.ci_low_s = 0.99;
        narrow.ci_high_s = 1.01;
        let n = noisy(&file(vec![wide, narrow]), None, DEFAULT_THRESHOLD);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].name, "cpu/a");
        assert!(!n[0].of_change);
        assert!((n[0].low + 0.1).abs() < 1e-12 && (n[0].high - 0.1).abs() < 1e-12);
    }

    #[test]
    fn a_clear_speedup_is_an_improvement() {
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.01))]);
        let now = file(vec![result("cpu/a", &jittered(0.5, 0.01))]);
        assert_eq!(
            compare(&now, &base, DEFAULT_THRESHOLD)[0].status,
            Status::Improved
        );
    }

    #[test]
    fn a_benchmark_missing_from_the_baseline_is_new() {
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.01))]);
        let now = file(vec![
            result("cpu/a", &jittered(1.0, 0.01)),
            result("cpu/b", &jittered(9.0, 0.01)),
        ]);
        let v = compare(&now, &base, DEFAULT_THRESHOLD);
        assert_eq!(v[1].status, Status::New);
        assert_eq!(v[1].change, None);
        assert!(!any_regressed(&v));
    }

    #[test]
    fn the_threshold_is_respected() {
        let base = file(vec![result("cpu/a", &jittered(1.0, 0.005))]);
        let now = file(vec![result("cpu/a", &jittered(1.10, 0.005))]);
        assert_eq!(compare(&now, &base, 0.05)[0].status, Status::Regressed);
        assert_eq!(compare(&now, &base, 0.20)[0].status, Status::Unchanged);
    }
}
