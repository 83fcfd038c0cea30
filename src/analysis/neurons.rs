//! Materialising an expert matrix's neurons as an `[I, hidden]` f32 matrix
//! (rows of `gate`/`up`; columns of `down`, transposed), for the analyses that
//! need every neuron (neuron-reorder, neuron PCA).

use crate::analysis::stream::NeuronAxis;
use crate::error::{Error, Result};
use crate::model::{Matrix, TensorView};

/// Where the neurons of `m` are stored.
pub fn axis(m: Matrix) -> NeuronAxis {
    match m {
        Matrix::Up | Matrix::Gate => NeuronAxis::Rows,
        Matrix::Down => NeuronAxis::Columns,
    }
}

/// The neurons of one matrix, row-major `[neurons, hidden]`.
pub fn load(v: &TensorView<'_>, axis: NeuronAxis) -> Result<(Vec<f32>, usize, usize)> {
    let (rows, cols) = match v.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(Error::Incompatible {
                path: v.path.to_path_buf(),
                reason: format!("tensor `{}` is not a matrix: shape {:?}", v.name, v.shape),
            })
        }
    };
    let mut data = vec![0f32; rows * cols];
    v.read_f32(0, &mut data);
    if data.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            path: v.path.to_path_buf(),
            tensor: v.name.to_string(),
        });
    }
    Ok(match axis {
        NeuronAxis::Rows => (data, rows, cols),
        NeuronAxis::Columns => {
            let mut t = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = data[r * cols + c];
                }
            }
            (t, cols, rows)
        }
    })
}
