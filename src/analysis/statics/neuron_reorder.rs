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

use std::any::TypeId;
use std::borrow::Cow;
use std::time::{Duration, Instant};

use half::bf16;

use rayon::prelude::*;

use crate::analysis::assignment::{self, Cost};
use crate::analysis::linalg::{matmul, Op};
use crate::analysis::neurons;
use crate::analysis::results::{NeuronReorderLayer, PerMatrix, ReorderMatrices};
use crate::analysis::Progress;
use crate::error::{Error, Result};
use crate::forward::expert_gemm::{matmul_bf16_xwt, Compute};
use crate::forward::weights::advise_huge_pages;
use crate::memory::Recycler;
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
    /// Unit-norm neurons, row-major `[count, hidden]`; empty when the
    /// neurons are kept as [`Neurons::bf16`] instead.
    pub unit: Vec<T>,
    /// The neurons as stored, row-major `[count, hidden]`, when they are f32
    /// similarities ([`F64_MAX_NEURONS`] exceeded), every value is a bf16
    /// (a bf16 checkpoint) and the CPU has AVX-512 BF16: the cosines are
    /// then products of these values (exact) summed in f32 and divided by
    /// the norms, at twice the rate of an f32 product of unit rows.
    pub bf16: Option<Vec<bf16>>,
    /// Frobenius norm of the whole matrix.
    pub total_norm: f64,
}

/// Element type of the similarity computation.
pub trait Real: Cost + Default + 'static {
    /// The value one.
    const ONE: Self;
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Converts a vector of f32 (exact; no copy for f32).
    fn from_f32s(v: Vec<f32>) -> Vec<Self>;
    /// Hands a similarity matrix back for the next pair (f32 ones are kept
    /// until the layer is done; f64 ones are freed).
    fn recycle(v: Vec<Self>);
}

/// The f32 similarity matrices, kept from one pair to the next (822 MB at
/// Mixtral-8x7B size): see [`Recycler`].
static COSINES: Recycler<f32> = Recycler::new(64);

impl Real for f32 {
    const ONE: f32 = 1.0;
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn from_f32s(v: Vec<f32>) -> Vec<f32> {
        v
    }
    fn recycle(v: Vec<f32>) {
        COSINES.give(v);
    }
}

impl Real for f64 {
    const ONE: f64 = 1.0;
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn from_f32s(v: Vec<f32>) -> Vec<f64> {
        let out = v.iter().map(|&x| f64::from(x)).collect();
        COSINES.give(v);
        out
    }
    fn recycle(_: Vec<f64>) {}
}

impl<T: Real> Neurons<T> {
    /// Normalises each neuron (row of `[count, hidden]`).
    pub fn new(data: &[f32], count: usize, hidden: usize) -> Neurons<T> {
        let norms: Vec<f64> = data
            .chunks(hidden)
            .map(|row| row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
            .collect();
        let total_norm = norms.iter().map(|n| n * n).sum::<f64>().sqrt();
        let as_bf16 = TypeId::of::<T>() == TypeId::of::<f32>()
            && Compute::bf16_supported()
            && data.iter().all(|x| x.to_bits() & 0xffff == 0);
        let (unit, bf16) = if as_bf16 {
            let raw = data
                .iter()
                .map(|&x| bf16::from_bits((x.to_bits() >> 16) as u16));
            (Vec::new(), Some(raw.collect()))
        } else {
            let mut unit = Vec::with_capacity(count * hidden);
            for (row, &n) in data.chunks(hidden).zip(&norms) {
                unit.extend(row.iter().map(|&x| T::from_f64(x as f64 * inverse(n))));
            }
            (unit, None)
        };
        Neurons {
            count,
            hidden,
            norms,
            unit,
            bf16,
            total_norm,
        }
    }

    /// The `count × other.count` matrix of neuron-to-neuron cosines,
    /// row-major (a zero neuron has cosine 0 with every other).
    pub fn cosines(&self, other: &Neurons<T>) -> Vec<T> {
        assert_eq!(self.hidden, other.hidden, "neurons of different lengths");
        let (m, n, k) = (self.count, other.count, self.hidden);
        if let (Some(a), Some(b)) = (&self.bf16, &other.bf16) {
            let mut dots = COSINES.take(m * n);
            // Huge pages for the n×n matrix when it is new: its 4 KiB page
            // faults took 5 of the 25 s of the default analyze.
            advise_huge_pages(&mut dots);
            if matmul_bf16_xwt(a, m, k, b, n, &mut dots) {
                let inv_b: Vec<f64> = other.norms.iter().map(|&x| inverse(x)).collect();
                dots.par_chunks_mut(n.max(1))
                    .zip(&self.norms)
                    .for_each(|(row, &na)| {
                        let inv_a = inverse(na);
                        for (d, &ib) in row.iter_mut().zip(&inv_b) {
                            *d = (*d as f64 * inv_a * ib) as f32;
                        }
                    });
                return T::from_f32s(dots);
            }
        }
        matmul(
            &self.unit_rows(),
            Op::N,
            &other.unit_rows(),
            Op::T,
            m,
            k,
            n,
            T::ONE,
        )
    }

    /// The unit-norm neurons, made from [`Neurons::bf16`] when only those
    /// are kept (the other side of a pair is not bf16).
    pub fn unit_rows(&self) -> Cow<'_, [T]> {
        match &self.bf16 {
            Some(raw) if self.unit.is_empty() => Cow::Owned(
                raw.chunks(self.hidden.max(1))
                    .zip(&self.norms)
                    .flat_map(|(row, &n)| {
                        row.iter()
                            .map(move |x| T::from_f64(x.to_f64() * inverse(n)))
                    })
                    .collect(),
            ),
            _ => Cow::Borrowed(&self.unit),
        }
    }
}

/// `1 / n`, 0 for a zero norm.
fn inverse(n: f64) -> f64 {
    if n > 0.0 {
        1.0 / n
    } else {
        0.0
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
    let s = a.cosines(b);
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
    T::recycle(s);
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
    let _release = ReleaseScratch;
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

/// Frees the buffers kept from pair to pair ([`COSINES`], the packed
/// copies of the bf16 product) when a layer is done or fails.
struct ReleaseScratch;

impl Drop for ReleaseScratch {
    fn drop(&mut self) {
        COSINES.clear();
        crate::forward::packed_bf16::release();
    }
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

    #[test]
    fn cosines_of_bf16_neurons_equal_the_f64_cosines() {
        // 37 neurons of 70 values (a lane tail), one of them zero; values
        // exactly bf16 (as read from a bf16 checkpoint), and the same
        // neurons nudged off bf16, which take the unit-row product.
        let (n, h) = (37, 70);
        let mut seed = 3u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            half::bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_f32()
        };
        let mut a: Vec<f32> = (0..n * h).map(|_| next()).collect();
        let b: Vec<f32> = (0..n * h).map(|_| next()).collect();
        a[5 * h..6 * h].fill(0.0);
        let cos64 = |x: &[f32], y: &[f32]| {
            let d: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
            let nx = x.iter().map(|&p| (p as f64).powi(2)).sum::<f64>().sqrt();
            let ny = y.iter().map(|&q| (q as f64).powi(2)).sum::<f64>().sqrt();
            if nx > 0.0 && ny > 0.0 {
                d / (nx * ny)
            } else {
                0.0
            }
        };
        let off: Vec<f32> = b.iter().map(|&v| v * (1.0 + 1e-6)).collect();
        let mut compared = 0;
        for (second, bf16_side) in [(&b, true), (&off, false)] {
            let (na, nb) = (
                Neurons::<f32>::new(&a, n, h),
                Neurons::<f32>::new(second, n, h),
            );
            assert_eq!(na.bf16.is_some(), Compute::bf16_supported());
            assert_eq!(nb.bf16.is_some(), bf16_side && Compute::bf16_supported());
            let s = na.cosines(&nb);
            assert_eq!(s.len(), n * n);
            for i in 0..n {
                for j in 0..n {
                    let want = cos64(&a[i * h..(i + 1) * h], &second[j * h..(j + 1) * h]);
                    let got = s[i * n + j] as f64;
                    assert!(
                        got.is_finite() && (got - want).abs() <= 1e-6,
                        "({i}, {j}): {got} vs {want}"
                    );
                    if i == 5 {
                        assert_eq!(got, 0.0, "a zero neuron");
                    }
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 2 * n * n);
    }

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
