//! `neuron-reorder` (paper §3.1, Table 2): for each expert pair and matrix,
//! the permutation of the second expert's neurons that maximises the summed
//! neuron-to-neuron cosine (an exact linear sum assignment on the n×n cosine
//! matrix, n = intermediate size), the cosine of the flattened matrices after
//! permuting, and Kendall's tau between that permutation and the identity.
//!
//! The n×n cosine matrix is one matrix product of the row-normalised neurons
//! (f64 up to n = 1024, f32 above: twice the speed and half the memory,
//! 822 MB at n = 14336, with cosines good to ~1e-7; the assignment is then
//! exact for that f32 matrix). The expert pairs of a matrix are aligned in
//! parallel, as many at a time as there are threads.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::analysis::assignment::{self, Cost};
use crate::analysis::linalg::{matmul, Op};
use crate::analysis::neurons;
use crate::analysis::results::{NeuronReorderLayer, PerMatrix, ReorderMatrices};
use crate::analysis::Progress;
use crate::error::{Error, Result};
use crate::model::{Matrix, MoeLayerView};

/// Above this many neurons the similarity matrix is computed and stored in f32.
pub const F64_MAX_NEURONS: usize = 1024;

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

/// Aligns every expert pair of each matrix in turn, pairs in parallel on all
/// cores, telling `progress` which pairs run and the time left.
struct Pairs<'p> {
    progress: &'p dyn Progress,
    layer: usize,
    done: usize,
    total: usize,
    started: Instant,
}

impl Pairs<'_> {
    fn matrices<T: Real>(&mut self, m: Matrix, experts: &[Neurons<T>]) -> Result<ReorderMatrices> {
        let e = experts.len();
        let mut similarity = vec![vec![0.0; e]; e];
        let mut kendall_tau = vec![vec![0.0; e]; e];
        let mut optimum = vec![vec![0.0; e]; e];
        for i in 0..e {
            similarity[i][i] = 1.0;
            kendall_tau[i][i] = 1.0;
            optimum[i][i] = experts[i].norms.iter().filter(|&&n| n > 0.0).count() as f64;
        }
        // The optimum, similarity and tau are the same for (i, j) and (j, i):
        // the reverse alignment is the inverse permutation.
        let pairs: Vec<(usize, usize)> = (0..e).flat_map(|i| (0..i).map(move |j| (i, j))).collect();
        // As many pairs at a time as there are threads (each holds an n×n matrix).
        let batch = rayon::current_num_threads().max(1);
        for chunk in pairs.chunks(batch) {
            let names: Vec<String> = chunk.iter().map(|(i, j)| format!("{i}–{j}")).collect();
            let eta = if self.done == 0 {
                String::new()
            } else {
                let per = self.started.elapsed().as_secs_f64() / self.done as f64;
                format!(", ~{:.0} s left", per * (self.total - self.done) as f64)
            };
            self.progress.detail(&format!(
                "neuron-reorder layer {} {} experts {} ({}/{} pairs{eta})",
                self.layer,
                m.name(),
                names.join(", "),
                self.done,
                self.total
            ));
            let results: Vec<Result<PairResult>> = chunk
                .par_iter()
                .map(|&(i, j)| align_pair(&experts[i], &experts[j]))
                .collect();
            assert_eq!(results.len(), chunk.len());
            for (&(i, j), r) in chunk.iter().zip(results) {
                let r = r?;
                similarity[i][j] = r.similarity;
                similarity[j][i] = r.similarity;
                kendall_tau[i][j] = r.kendall_tau;
                kendall_tau[j][i] = r.kendall_tau;
                optimum[i][j] = r.optimum;
                optimum[j][i] = r.optimum;
            }
            self.done += chunk.len();
        }
        Ok(ReorderMatrices {
            similarity,
            kendall_tau,
            optimum,
        })
    }

    fn for_matrix<T: Real>(
        &mut self,
        layer: &MoeLayerView<'_>,
        m: Matrix,
    ) -> Result<ReorderMatrices> {
        let mut experts = Vec::with_capacity(layer.experts.len());
        for x in &layer.experts {
            let (data, count, hidden) = neurons::load(&x.matrix(m), neurons::axis(m))?;
            experts.push(Neurons::<T>::new(&data, count, hidden));
        }
        self.matrices(m, &experts)
    }

    fn run(&mut self, layer: &MoeLayerView<'_>, m: Matrix, n: usize) -> Result<ReorderMatrices> {
        if n <= F64_MAX_NEURONS {
            self.for_matrix::<f64>(layer, m)
        } else {
            self.for_matrix::<f32>(layer, m)
        }
    }
}

/// Runs the analysis on one layer.
pub fn layer(layer: &MoeLayerView<'_>) -> Result<NeuronReorderLayer> {
    layer_with_progress(layer, &())
}

/// Runs the analysis on one layer, naming the pairs being aligned and the
/// time left through [`Progress::detail`].
pub fn layer_with_progress(
    layer: &MoeLayerView<'_>,
    progress: &dyn Progress,
) -> Result<NeuronReorderLayer> {
    let n = layer.experts.first().map_or(0, |x| x.gate.shape[0]);
    let e = layer.experts.len();
    let mut pairs = Pairs {
        progress,
        layer: layer.layer,
        done: 0,
        total: 3 * e * e.saturating_sub(1) / 2,
        started: Instant::now(),
    };
    Ok(NeuronReorderLayer {
        layer: layer.layer,
        matrices: PerMatrix {
            up: pairs.run(layer, Matrix::Up, n)?,
            gate: pairs.run(layer, Matrix::Gate, n)?,
            down: pairs.run(layer, Matrix::Down, n)?,
        },
    })
}

/// The default layer: the middle MoE layer (all expert pairs of its three
/// matrices). `--layers` selects others (`--layers 0..N` every layer of an
/// N-layer model).
pub fn default_layers(moe_layers: &[usize]) -> Vec<usize> {
    match moe_layers {
        [] => Vec::new(),
        l => vec![l[l.len() / 2]],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use std::cell::RefCell;

    struct Record(RefCell<Vec<String>>);

    impl Progress for Record {
        fn detail(&self, text: &str) {
            self.0.borrow_mut().push(text.to_string());
        }
    }

    #[test]
    fn progress_names_every_pair_once_with_the_time_left() {
        let model = Model::demo().unwrap();
        let l = model.info.moe_layers[0];
        let view = model.moe_layer(l).unwrap();
        let rec = Record(RefCell::new(Vec::new()));
        let with = layer_with_progress(&view, &rec).unwrap();
        let without = layer(&view).unwrap();
        for m in Matrix::ALL {
            assert_eq!(
                with.matrices.get(m).optimum,
                without.matrices.get(m).optimum
            );
        }
        let lines = rec.0.into_inner();
        let e = view.experts.len();
        assert!(e >= 2);
        let total = 3 * e * (e - 1) / 2;
        let mut named = 0;
        for m in Matrix::ALL {
            for i in 0..e {
                for j in 0..i {
                    let pair = format!("{i}–{j}");
                    let count = lines
                        .iter()
                        .filter(|t| {
                            t.starts_with(&format!("neuron-reorder layer {l} {} ", m.name()))
                        })
                        .filter(|t| {
                            let names = t.split(" experts ").nth(1).unwrap();
                            let names = names.split(" (").next().unwrap();
                            names.split(", ").any(|p| p == pair)
                        })
                        .count();
                    assert_eq!(count, 1, "{} {pair}: {lines:?}", m.name());
                    named += 1;
                }
            }
        }
        assert_eq!(named, total);
        assert!(
            lines[0].ends_with(&format!("(0/{total} pairs)")),
            "{lines:?}"
        );
        assert!(
            lines[1..].iter().all(|t| t.ends_with(" s left)")),
            "{lines:?}"
        );
    }
}
