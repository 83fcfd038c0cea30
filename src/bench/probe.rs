//! The machine's measured peaks, against which achieved GFLOP/s and GB/s are
//! reported: a large f32 matmul (compute) and a read stream over a buffer far
//! larger than the caches (memory bandwidth). Best of a few runs each.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::forward::weights::ce;

/// Probe results.
#[derive(Debug, Clone, Copy)]
pub struct Peaks {
    /// Measured f32 matmul throughput (GFLOP/s).
    pub gflops: f64,
    /// Measured memory-stream bandwidth (GB/s).
    pub gbs: f64,
    /// Matrix size of the matmul probe.
    pub matmul_n: usize,
    /// Buffer size of the stream probe, in bytes.
    pub stream_bytes: usize,
}

/// Probe sizes: `quick` for tests (small, fast, not a real peak). A GPU
/// gets a larger matmul (n = 8192), so that the launch is not what is timed.
pub fn run(device: &Device, quick: bool) -> Result<Peaks> {
    let (n, bytes, reps) = if quick {
        (256, 16 << 20, 2)
    } else if device.is_cpu() {
        (2048, 512 << 20, 6)
    } else {
        (8192, 2 << 30, 6)
    };
    Ok(Peaks {
        gflops: matmul_gflops(device, n, reps)?,
        gbs: stream_gbs(device, bytes, reps)?,
        matmul_n: n,
        stream_bytes: bytes,
    })
}

fn sync(device: &Device) -> Result<()> {
    device.synchronize().map_err(ce("device synchronisation"))
}

/// Best GFLOP/s of an `n × n × n` f32 matmul on `device`.
pub fn matmul_gflops(device: &Device, n: usize, reps: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device).map_err(ce("matmul probe"))?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device).map_err(ce("matmul probe"))?;
    let mut best = f64::INFINITY;
    for _ in 0..=reps {
        let t = Instant::now();
        let c = a.matmul(&b).map_err(ce("matmul probe"))?;
        sync(device)?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// Sum of f32 values with 8 independent accumulators (vectorises).
fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Best GB/s moving `bytes` bytes: on the CPU a parallel sum on all cores
/// (bytes read), on a GPU a device-to-device copy (bytes read + written).
pub fn stream_gbs(device: &Device, bytes: usize, reps: usize) -> Result<f64> {
    let n = bytes / 4;
    let mut best = f64::INFINITY;
    if device.is_cpu() {
        let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
        let mut check = 0f32;
        for _ in 0..=reps {
            let t = Instant::now();
            let s: f32 = buf.par_chunks(1 << 16).map(sum_f32).sum();
            best = best.min(t.elapsed().as_secs_f64());
            check += s;
        }
        if !check.is_finite() {
            return Err(Error::Compute {
                what: "memory probe".into(),
                reason: "non-finite sum".into(),
            });
        }
    } else {
        // A device copy: `bytes` read and `bytes` written (a full reduction in
        // candle runs far below the memory's rate and would understate it).
        let buf = Tensor::ones(n, DType::F32, device).map_err(ce("memory probe"))?;
        sync(device)?;
        for _ in 0..=reps {
            let t = Instant::now();
            let c = buf.copy().map_err(ce("memory probe"))?;
            sync(device)?;
            best = best.min(t.elapsed().as_secs_f64());
            drop(c);
        }
        return Ok((2 * n * 4) as f64 / best / 1e9);
    }
    Ok((n * 4) as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unrolled_sum_matches_a_plain_sum() {
        let xs: Vec<f32> = (0..1003).map(|i| (i % 5) as f32).collect();
        assert_eq!(super::sum_f32(&xs), xs.iter().sum::<f32>());
    }
}
