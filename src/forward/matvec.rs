//! The single-token matrix–vector product of decoding (`y = W·x`, `W` in
//! the hub layout `[out, in]`, read as stored: f32, bf16 or f16).

use super::expert_gemm::{self, WeightElem};

/// `y = W·x`: `w` is `[n, x.len()]` row-major, `y` is `[n]`.
pub fn matvec<W: WeightElem>(x: &[f32], w: &[W], n: usize, y: &mut [f32]) {
    expert_gemm::matmul_xwt(x, 1, x.len(), w, n, y);
}
