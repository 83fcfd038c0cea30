//! One streaming pass over a matrix type of a layer (all experts' `up`, or all
//! `gate`, or all `down`): every byte is read once from the mmap, converted to
//! f32 in bounded chunks on all cores, and reduced with f64 accumulation into
//! what the static analyses need:
//!
//! - the Gram matrix of the flattened matrices (expert similarity);
//! - each expert's neuron sum (its mean neuron times the neuron count);
//! - the Gram matrix of the per-coordinate standardised experts (PCA).

use rayon::prelude::*;

use crate::analysis::bf16_kernels;
use crate::analysis::linalg::{gram_lower_add, sum, GRAM_ROW_PAD};
use crate::error::{Error, Result};
use crate::model::{Dtype, TensorView};

/// Elements converted per chunk and tensor (64 KiB of f32).
const CHUNK: usize = 1 << 14;
/// Rows of a matrix summed in f32 before the sums move to f64. The check
/// runs after each chunk, so an f32 sum takes fewer than `FLUSH_ROWS` plus
/// one chunk's rows of additions (a chunk holds 16384 / row-length rows: 4
/// at hidden 4096): ~1e-7 relative error on sums of bf16 values at real
/// widths, far below the analyses' tolerances.
const FLUSH_ROWS: usize = 64;

/// What one pass should compute (the Gram matrix always: it also catches NaN).
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// Accumulate the sum of neurons (neuron-similarity, gate-embedding).
    pub neuron_sum: bool,
    /// Accumulate the standardized Gram matrix (projection).
    pub standardized_gram: bool,
}

/// Results of a pass; fields not asked for are empty.
#[derive(Debug, Clone, Default)]
pub struct MatrixStats {
    /// `G[i][j] = <vec(M_i), vec(M_j)>`.
    pub gram: Vec<Vec<f64>>,
    /// Per matrix, the sum of its neurons (a hidden-size vector).
    pub neuron_sum: Vec<Vec<f64>>,
    /// Gram matrix of the experts after centring each coordinate across
    /// experts and dividing by its sample standard deviation (ddof = 1).
    pub standardized_gram: Vec<Vec<f64>>,
}

/// Where the neurons of a matrix are: rows (`gate`, `up` `[I, H]`) or
/// columns (`down` `[H, I]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeuronAxis {
    /// Neurons are rows of the stored matrix.
    Rows,
    /// Neurons are columns of the stored matrix.
    Columns,
}

struct Acc {
    gram: Vec<f64>,
    /// f32 neuron sums of the bf16 path, added to `sums` (f64) every
    /// [`FLUSH_ROWS`] rows and when the fold ends.
    sums32: Vec<f32>,
    /// Elements added to `sums32` since it was last flushed, per matrix.
    pending: usize,
    std_gram: Vec<f64>,
    sums: Vec<f64>,
    buf: Vec<f32>,
    z: Vec<f64>,
}

impl Acc {
    /// Moves the f32 neuron sums into the f64 ones.
    fn flush(&mut self) {
        if self.pending == 0 {
            return;
        }
        for (d, s) in self.sums.iter_mut().zip(&mut self.sums32) {
            *d += *s as f64;
            *s = 0.0;
        }
        self.pending = 0;
    }
}

/// Runs one pass over `vs` (matrices of identical shape `[R, C]`).
pub fn stream(vs: &[TensorView<'_>], axis: NeuronAxis, needs: Needs) -> Result<MatrixStats> {
    let Some(pass) = Pass::new(vs, axis, needs)? else {
        return Ok(MatrixStats::default());
    };
    let zeros = if pass.direct {
        vec![0u16; CHUNK]
    } else {
        Vec::new()
    };
    let acc = (0..pass.n.div_ceil(CHUNK))
        .into_par_iter()
        .fold(
            || pass.new_acc(),
            |mut acc, c| {
                let start = c * CHUNK;
                let len = CHUNK.min(pass.n - start);
                if !(pass.direct && pass.fold_bf16(&mut acc, start, len, &zeros)) {
                    pass.fold_f32(&mut acc, start, len);
                }
                acc
            },
        )
        .map(|mut acc| {
            acc.flush();
            acc
        })
        .reduce(
            || pass.new_acc(),
            |mut a, b| {
                add(&mut a.gram, &b.gram);
                add(&mut a.std_gram, &b.std_gram);
                add(&mut a.sums, &b.sums);
                a
            },
        );
    pass.finish(acc)
}

/// The layout of one pass: the matrices, where their neurons are, what to
/// accumulate, and whether the bf16 kernels read the mmapped words directly.
struct Pass<'v, 'a> {
    vs: &'v [TensorView<'a>],
    axis: NeuronAxis,
    needs: Needs,
    /// Number of matrices.
    e: usize,
    /// Elements per matrix.
    n: usize,
    /// Columns of the stored matrix.
    cols: usize,
    /// Length of a neuron.
    hidden: usize,
    /// bf16 on a CPU with AVX-512 BF16: straight from the mmapped words.
    direct: bool,
}

impl<'v, 'a> Pass<'v, 'a> {
    /// `None` for no matrices; an error when their shapes differ.
    fn new(vs: &'v [TensorView<'a>], axis: NeuronAxis, needs: Needs) -> Result<Option<Self>> {
        let Some(first) = vs.first() else {
            return Ok(None);
        };
        if let Some(v) = vs.iter().find(|v| v.shape != first.shape) {
            return Err(Error::Incompatible {
                path: v.path.to_path_buf(),
                reason: format!(
                    "tensor `{}` has shape {:?}, expected {:?} like `{}`",
                    v.name, v.shape, first.shape, first.name
                ),
            });
        }
        let cols = *first.shape.last().unwrap_or(&1);
        Ok(Some(Pass {
            vs,
            axis,
            needs,
            e: vs.len(),
            n: first.numel(),
            cols,
            hidden: match axis {
                NeuronAxis::Rows => cols,
                NeuronAxis::Columns => first.shape.first().copied().unwrap_or(1),
            },
            direct: !needs.standardized_gram
                && vs.iter().all(|v| v.dtype == Dtype::BF16)
                && bf16_kernels::available(),
        }))
    }

    fn new_acc(&self) -> Acc {
        let (e, hidden, needs) = (self.e, self.hidden, self.needs);
        Acc {
            gram: vec![0.0; e * e],
            std_gram: if needs.standardized_gram {
                vec![0.0; e * e]
            } else {
                Vec::new()
            },
            sums: if needs.neuron_sum {
                vec![0.0; e * hidden]
            } else {
                Vec::new()
            },
            sums32: if self.direct && needs.neuron_sum && self.axis == NeuronAxis::Rows {
                vec![0.0; e * hidden]
            } else {
                Vec::new()
            },
            pending: 0,
            // The f32 chunk buffer, padded with zero rows for the tiled Gram
            // kernel, allocated on the first chunk that needs it: the bf16
            // kernels read the mmapped words and need none (512 KiB at E = 8,
            // zeroed for every rayon fold, a page fault per 4 KiB, when each
            // fold allocated it).
            buf: Vec::new(),
            z: if needs.standardized_gram {
                vec![0.0; e]
            } else {
                Vec::new()
            },
        }
    }

    /// One chunk through the AVX-512 BF16 kernels, from the mmapped words;
    /// `false` when the words are not directly readable (the f32 path then
    /// takes the chunk).
    fn fold_bf16(&self, acc: &mut Acc, start: usize, len: usize, zeros: &[u16]) -> bool {
        let words: Option<Vec<&[u16]>> =
            self.vs.iter().map(|v| v.bf16_words(start, len)).collect();
        let Some(words) = words else {
            return false;
        };
        if !bf16_kernels::gram_lower_add(&words, zeros, len, &mut acc.gram) {
            return false;
        }
        if self.needs.neuron_sum {
            for (k, w) in words.iter().enumerate() {
                self.bf16_neuron_sums(acc, k, w, start, len);
            }
            if self.axis == NeuronAxis::Rows {
                acc.pending += len;
                if acc.pending >= FLUSH_ROWS * self.cols {
                    acc.flush();
                }
            }
        }
        true
    }

    /// Neuron sums of matrix `k`'s chunk `w` (bf16 words).
    fn bf16_neuron_sums(&self, acc: &mut Acc, k: usize, w: &[u16], start: usize, len: usize) {
        let (hidden, cols) = (self.hidden, self.cols);
        match self.axis {
            // Summed in f32 (`sums32`), moved to f64 by `Acc::flush`.
            NeuronAxis::Rows => {
                let s32 = &mut acc.sums32[k * hidden..(k + 1) * hidden];
                // Whole rows are added four at a time.
                let mut whole: [&[u16]; 4] = [&[]; 4];
                let mut held = 0;
                for_segments(start, len, cols, |_, col, range| {
                    if col == 0 && range.len() == cols {
                        whole[held] = &w[range];
                        held += 1;
                        if held == whole.len() {
                            bf16_kernels::add_rows_to_f32(s32, &whole);
                            held = 0;
                        }
                    } else {
                        bf16_kernels::add_to_f32(&mut s32[col..col + range.len()], &w[range]);
                    }
                });
                if held > 0 {
                    bf16_kernels::add_rows_to_f32(s32, &whole[..held]);
                }
            }
            NeuronAxis::Columns => {
                let sums = &mut acc.sums[k * hidden..(k + 1) * hidden];
                for_segments(start, len, cols, |row, _, range| {
                    sums[row] += bf16_kernels::sum(&w[range]).unwrap_or(0.0);
                });
            }
        }
    }

    /// One chunk converted to f32: Gram matrix, neuron sums, standardized Gram.
    fn fold_f32(&self, acc: &mut Acc, start: usize, len: usize) {
        let e = self.e;
        if acc.buf.is_empty() {
            acc.buf = vec![0.0; e.next_multiple_of(GRAM_ROW_PAD) * CHUNK];
        }
        for (k, v) in self.vs.iter().enumerate() {
            v.read_f32(start, &mut acc.buf[k * CHUNK..k * CHUNK + len]);
        }
        let buf = &acc.buf;
        gram_lower_add(buf, CHUNK, len, e, &mut acc.gram);
        if self.needs.neuron_sum {
            for k in 0..e {
                let a = &buf[k * CHUNK..k * CHUNK + len];
                let sums = &mut acc.sums[k * self.hidden..(k + 1) * self.hidden];
                accumulate_neurons(a, start, self.cols, self.axis, sums);
            }
        }
        if self.needs.standardized_gram && e > 1 {
            standardized_gram_add(buf, len, e, &mut acc.z, &mut acc.std_gram);
        }
    }

    /// Rejects NaN/inf (a non-finite Gram diagonal) and fills the symmetric matrices.
    fn finish(&self, acc: Acc) -> Result<MatrixStats> {
        let e = self.e;
        for (i, v) in self.vs.iter().enumerate() {
            if !acc.gram[i * e + i].is_finite() {
                return Err(Error::NonFinite {
                    path: v.path.to_path_buf(),
                    tensor: v.name.to_string(),
                });
            }
        }
        Ok(MatrixStats {
            gram: symmetric(&acc.gram, e),
            neuron_sum: if self.needs.neuron_sum {
                acc.sums.chunks(self.hidden).map(<[f64]>::to_vec).collect()
            } else {
                Vec::new()
            },
            standardized_gram: if self.needs.standardized_gram {
                symmetric(&acc.std_gram, e)
            } else {
                Vec::new()
            },
        })
    }
}

/// Coordinates per block of [`standardized_gram_add`] (its scratch, `e`
/// blocks of f64, stays in the L1/L2 caches).
const STD_BLOCK: usize = 512;

/// Adds the chunk's coordinates, centred across the `e` experts and divided
/// by their sample standard deviation, to the lower triangle of `std_gram`
/// (`z` is scratch, resized to `e` × [`STD_BLOCK`]). Blocks of coordinates
/// at a time: each expert's standardized block, then one dot product per
/// pair of experts over the block, eight lanes wide.
fn standardized_gram_add(buf: &[f32], len: usize, e: usize, z: &mut Vec<f64>, std_gram: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked).
        unsafe { standardized_gram_add_avx512(buf, len, e, z, std_gram) };
        return;
    }
    standardized_gram_add_portable(buf, len, e, z, std_gram);
}

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn standardized_gram_add_avx512(
    buf: &[f32],
    len: usize,
    e: usize,
    z: &mut Vec<f64>,
    std_gram: &mut [f64],
) {
    standardized_gram_add_portable(buf, len, e, z, std_gram);
}

#[inline(always)]
fn standardized_gram_add_portable(
    buf: &[f32],
    len: usize,
    e: usize,
    z: &mut Vec<f64>,
    std_gram: &mut [f64],
) {
    const L: usize = 8;
    z.resize(e * STD_BLOCK, 0.0);
    let mut inv = [0f64; STD_BLOCK];
    let mut t0 = 0;
    while t0 < len {
        let b = STD_BLOCK.min(len - t0);
        let (mean, inv) = (&mut [0f64; STD_BLOCK][..b], &mut inv[..b]);
        for k in 0..e {
            let x = &buf[k * CHUNK + t0..k * CHUNK + t0 + b];
            mean.iter_mut().zip(x).for_each(|(m, &x)| *m += x as f64);
        }
        mean.iter_mut().for_each(|m| *m /= e as f64);
        inv.fill(0.0);
        for k in 0..e {
            let x = &buf[k * CHUNK + t0..k * CHUNK + t0 + b];
            let zk = &mut z[k * STD_BLOCK..k * STD_BLOCK + b];
            for ((z, &x), (&m, ss)) in zk.iter_mut().zip(x).zip(mean.iter().zip(inv.iter_mut())) {
                let d = x as f64 - m;
                *z = d;
                *ss += d * d;
            }
        }
        // A constant coordinate (std 0) contributes nothing: its z is 0.
        for v in inv.iter_mut() {
            let std = (*v / (e - 1) as f64).sqrt();
            *v = if std == 0.0 { 0.0 } else { 1.0 / std };
        }
        for k in 0..e {
            let zk = &mut z[k * STD_BLOCK..k * STD_BLOCK + b];
            zk.iter_mut().zip(inv.iter()).for_each(|(z, &i)| *z *= i);
        }
        for i in 0..e {
            let zi = &z[i * STD_BLOCK..i * STD_BLOCK + b];
            for j in 0..=i {
                let zj = &z[j * STD_BLOCK..j * STD_BLOCK + b];
                let mut lanes = [0f64; L];
                let (ci, cj) = (zi.chunks_exact(L), zj.chunks_exact(L));
                let tail: f64 = ci.remainder().iter().zip(cj.remainder()).map(|(a, b)| a * b).sum();
                for (a, c) in ci.zip(cj) {
                    for l in 0..L {
                        lanes[l] += a[l] * c[l];
                    }
                }
                std_gram[i * e + j] += lanes.iter().sum::<f64>() + tail;
            }
        }
        t0 += b;
    }
}

/// Splits the elements `start..start + len` of a row-major `[R, cols]`
/// matrix at row boundaries: `f(row, first column, range within the chunk)`.
fn for_segments(
    start: usize,
    len: usize,
    cols: usize,
    mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
) {
    let mut done = 0;
    while done < len {
        let pos = start + done;
        let (row, col) = (pos / cols, pos % cols);
        let take = (cols - col).min(len - done);
        f(row, col, done..done + take);
        done += take;
    }
}

/// Adds the elements `start..start + a.len()` of a row-major `[R, cols]`
/// matrix to the per-neuron-coordinate sums.
fn accumulate_neurons(a: &[f32], start: usize, cols: usize, axis: NeuronAxis, sums: &mut [f64]) {
    for_segments(start, a.len(), cols, |row, col, range| {
        let seg = &a[range];
        match axis {
            // Neurons are rows: sum rows, coordinate = column.
            NeuronAxis::Rows => {
                for (s, &x) in sums[col..col + seg.len()].iter_mut().zip(seg) {
                    *s += x as f64;
                }
            }
            // Neurons are columns: sum each row's entries, coordinate = row.
            NeuronAxis::Columns => sums[row] += sum(seg),
        }
    });
}

fn add(a: &mut [f64], b: &[f64]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// Fills a full symmetric matrix from its lower triangle.
fn symmetric(lower: &[f64], e: usize) -> Vec<Vec<f64>> {
    let mut out = vec![vec![0.0; e]; e];
    for i in 0..e {
        for j in 0..=i {
            out[i][j] = lower[i * e + j];
            out[j][i] = lower[i * e + j];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::safetensors::Weights;
    use crate::model::writer::{write, TensorSpec};

    /// Three bf16 matrices of 300 × 200 (rows cross the 16 Ki-element chunk
    /// boundaries; more rows than one f32 flush holds), streamed along both
    /// neuron axes, against f64 loops over the same bf16 values; the f32
    /// copies of the same values go through the converting path.
    #[test]
    fn a_pass_matches_f64_loops_on_bf16_and_f32() {
        if !bf16_kernels::available() {
            // The converting path is still tested; the bf16 kernel path is not.
            crate::test_support::skip(
                "stream::a_pass_matches_f64_loops_on_bf16_and_f32 (bf16 kernel path)",
                "avx512bf16",
                "no AVX-512 BF16 on this CPU: the bf16 matrices take the converting path",
            );
        }
        // Rows crossing chunk edges with a flush per chunk; f32 sums held over
        // several chunks (1000-wide rows); rows longer than a chunk.
        for (rows, cols) in [(300usize, 200usize), (70, 1000), (3, 20_000)] {
            check_pass(rows, cols);
        }
    }

    fn check_pass(rows: usize, cols: usize) {
        let e = 3usize;
        let values: Vec<Vec<f32>> = (0..e)
            .map(|k| {
                (0..rows * cols)
                    .map(|i| {
                        let v = ((i * 7919 + k * 104_729) % 2003) as f32 / 1001.0 - 1.0;
                        f32::from_bits(v.to_bits() & 0xffff_0000) // exact in bf16
                    })
                    .collect()
            })
            .collect();
        let bf16_bytes = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                .collect()
        };
        let mut tensors = Vec::new();
        for (k, v) in values.iter().enumerate() {
            tensors.push((
                TensorSpec::new(format!("b{k}"), "BF16", &[rows, cols]),
                bf16_bytes(v),
            ));
            tensors.push((
                TensorSpec::new(format!("f{k}"), "F32", &[rows, cols]),
                crate::model::writer::f32_bytes(v),
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write(&path, &tensors).unwrap();
        let w = Weights::open_file(&path).unwrap();
        let needs = Needs {
            neuron_sum: true,
            standardized_gram: false,
        };
        for prefix in ["b", "f"] {
            let views: Vec<_> = (0..e)
                .map(|k| w.tensor(&format!("{prefix}{k}")).unwrap())
                .collect();
            for axis in [NeuronAxis::Rows, NeuronAxis::Columns] {
                let got = stream(&views, axis, needs).unwrap();
                for i in 0..e {
                    for j in 0..e {
                        let want: f64 = values[i]
                            .iter()
                            .zip(&values[j])
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        let g = got.gram[i][j];
                        assert!(
                            (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                            "{prefix} gram"
                        );
                    }
                    let hidden = if axis == NeuronAxis::Rows { cols } else { rows };
                    for h in 0..hidden {
                        let want: f64 = match axis {
                            NeuronAxis::Rows => {
                                (0..rows).map(|r| values[i][r * cols + h] as f64).sum()
                            }
                            NeuronAxis::Columns => {
                                (0..cols).map(|c| values[i][h * cols + c] as f64).sum()
                            }
                        };
                        let g = got.neuron_sum[i][h];
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{prefix} {axis:?} sum {i} {h}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
