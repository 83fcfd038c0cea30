//! `neuron-reorder` (paper §3.1, Table 2): for each expert pair and matrix,
//! the permutation of the second expert's neurons that maximises the summed
//! neuron-to-neuron cosine (an exact linear sum assignment on the n×n cosine
//! matrix, n = intermediate size), the cosine of the flattened matrices after
//! permuting, and Kendall's tau between that permutation and the identity.
//!
//! The n×n cosine matrix is one matrix product of the row-normalised neurons
//! (f64 up to n = 4096, f32 above to halve memory: 822 MB at n = 14336).

use std::time::{Duration, Instant};

use crate::analysis::assignment::{self, Cost};
use crate::analysis::linalg::{matmul, Op};
use crate::analysis::neurons;
use crate::analysis::results::{NeuronReorderLayer, PerMatrix, ReorderMatrices};
use crate::error::{Error, Result};
use crate::model::{Matrix, MoeLayerView};

/// Above this many neurons the similarity matrix is computed and stored in f32.
pub const F64_MAX_NEURONS: usize = 4096;

/// One expert's neurons, with their norms and a unit-norm copy.
pub struct Neurons<T> {
    /// Number of neurons.
    pub count: usize,
    /// Length of one neuron (the hidden size).
    pub hidden: usize,
    /// Norm of each neuron.
    pub norms: Vec<f64>,
    /// Unit-norm neurons, row-major `[count, hidden]`.
    pub unit: Vec<T>,
    /// Frobenius norm of the whole matrix.
    pub total_norm: f64,
}

/// Element type of the similarity computation.
pub trait Real: Cost + Default + 'static {
    /// The value one.
    const ONE: Self;
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    const ONE: f32 = 1.0;
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
}

impl Real for f64 {
    const ONE: f64 = 1.0;
    fn from_f64(x: f64) -> f64 {
        x
    }
}

impl<T: Real> Neurons<T> {
    /// Normalises each neuron (row of `[count, hidden]`).
    pub fn new(data: &[f32], count: usize, hidden: usize) -> Neurons<T> {
        let mut norms = Vec::with_capacity(count);
        let mut unit = Vec::with_capacity(count * hidden);
        for row in data.chunks(hidden) {
            let n = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            norms.push(n);
            let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
            unit.extend(row.iter().map(|&x| T::from_f64(x as f64 * inv)));
        }
        let total_norm = norms.iter().map(|n| n * n).sum::<f64>().sqrt();
        Neurons {
            count,
            hidden,
            norms,
            unit,
            total_norm,
        }
    }
}

/// Result for one pair, with timings for the benchmark.
#[derive(Debug, Clone)]
pub struct PairResult {
    /// Optimal permutation: neuron `permutation[i]` of the second expert matches neuron `i` of the first.
    pub permutation: Vec<usize>,
    /// The assignment optimum: summed neuron-to-neuron cosine.
    pub optimum: f64,
    /// Cosine of the flattened matrices after the permutation.
    pub similarity: f64,
    /// Kendall's tau between the permutation and the identity.
    pub kendall_tau: f64,
    /// Time spent in the similarity matmul.
    pub matmul_time: Duration,
    /// Time spent in the assignment solver.
    pub assignment_time: Duration,
}

/// Aligns `b`'s neurons to `a`'s.
pub fn align_pair<T: Real>(a: &Neurons<T>, b: &Neurons<T>) -> Result<PairResult> {
    let n = a.count;
    let t0 = Instant::now();
    let s = matmul(&a.unit, Op::N, &b.unit, Op::T, n, a.hidden, n, T::ONE);
    let matmul_time = t0.elapsed();
    let t1 = Instant::now();
    let p = assignment::maximize(&s, n).ok_or_else(|| {
        Error::Usage("neuron-reorder: the similarity matrix has no finite assignment".into())
    })?;
    let assignment_time = t1.elapsed();
    let optimum: f64 = (0..n).map(|i| s[i * n + p[i]].to_f64()).sum();
    let dots: f64 = (0..n)
        .map(|i| s[i * n + p[i]].to_f64() * a.norms[i] * b.norms[p[i]])
        .sum();
    let denom = a.total_norm * b.total_norm;
    Ok(PairResult {
        kendall_tau: assignment::kendall_tau(&p),
        permutation: p,
        optimum,
        similarity: if denom > 0.0 {
            (dots / denom).clamp(-1.0, 1.0)
        } else {
            0.0
        },
        matmul_time,
        assignment_time,
    })
}

fn matrices<T: Real>(experts: &[Neurons<T>]) -> Result<ReorderMatrices> {
    let e = experts.len();
    let mut similarity = vec![vec![0.0; e]; e];
    let mut kendall_tau = vec![vec![0.0; e]; e];
    let mut optimum = vec![vec![0.0; e]; e];
    for i in 0..e {
        similarity[i][i] = 1.0;
        kendall_tau[i][i] = 1.0;
        optimum[i][i] = experts[i].norms.iter().filter(|&&n| n > 0.0).count() as f64;
        for j in 0..i {
            // The optimum, similarity and tau are the same for (i, j) and (j, i):
            // the reverse alignment is the inverse permutation.
            let r = align_pair(&experts[i], &experts[j])?;
            similarity[i][j] = r.similarity;
            similarity[j][i] = r.similarity;
            kendall_tau[i][j] = r.kendall_tau;
            kendall_tau[j][i] = r.kendall_tau;
            optimum[i][j] = r.optimum;
            optimum[j][i] = r.optimum;
        }
    }
    Ok(ReorderMatrices {
        similarity,
        kendall_tau,
        optimum,
    })
}

fn for_matrix<T: Real>(layer: &MoeLayerView<'_>, m: Matrix) -> Result<ReorderMatrices> {
    let mut experts = Vec::with_capacity(layer.experts.len());
    for x in &layer.experts {
        let (data, count, hidden) = neurons::load(&x.matrix(m), neurons::axis(m))?;
        experts.push(Neurons::<T>::new(&data, count, hidden));
    }
    matrices(&experts)
}

/// Runs the analysis on one layer.
pub fn layer(layer: &MoeLayerView<'_>) -> Result<NeuronReorderLayer> {
    let n = layer.experts.first().map_or(0, |x| x.gate.shape[0]);
    let run = |m| {
        if n <= F64_MAX_NEURONS {
            for_matrix::<f64>(layer, m)
        } else {
            for_matrix::<f32>(layer, m)
        }
    };
    Ok(NeuronReorderLayer {
        layer: layer.layer,
        matrices: PerMatrix {
            up: run(Matrix::Up)?,
            gate: run(Matrix::Gate)?,
            down: run(Matrix::Down)?,
        },
    })
}

/// The default layers: first, middle and last MoE layer.
pub fn default_layers(moe_layers: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = match moe_layers {
        [] => Vec::new(),
        l => vec![l[0], l[l.len() / 2], l[l.len() - 1]],
    };
    v.dedup();
    v
}
