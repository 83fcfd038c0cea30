//! GLM-4.5 / GLM-4.6 (`glm4_moe`) and MiniMax-M2 (`minimax_m2`): what their
//! forward passes add to the shared code paths, partial rotary embeddings.
//! The rest is shared: grouped-query attention with q/k/v biases and per-head
//! q/k RMSNorm (GLM, as Qwen3-MoE) or one over the whole projection
//! (MiniMax-M2, as OLMoE), DeepSeek-V3's routing (sigmoid,
//! `e_score_correction_bias`, group-limited top-k, `norm_topk_prob`,
//! `routed_scaling_factor`; MiniMax-M2: one group, renormalised, unscaled),
//! the shared experts and the dense first layers (`first_k_dense_replace`).
//! References: transformers' `modeling_glm4_moe.py`, `modeling_minimax_m2.py`.

use candle_core::{Tensor, D};

use super::attention::rope_half;
use super::config::QkNorm;
use super::R;
use crate::error::{Error, Result};
use crate::model::Config;

/// `use_qk_norm`: an RMSNorm per head on q and k (before the rotary embedding).
pub(super) fn qk_norm(c: &Config) -> Result<QkNorm> {
    Ok(if c.bool_opt("use_qk_norm")?.unwrap_or(false) {
        QkNorm::PerHead
    } else {
        QkNorm::None
    })
}

/// The rotary dims of a head: `int(head_dim × partial_rotary_factor)`
/// (top level, or transformers 5's `rope_parameters`), or MiniMax-M2's
/// released `rotary_dim`; `None` for the whole head. The factor must lie in
/// `(0, 1]` and give an even, non-zero number of dims (rotary embeddings
/// rotate pairs).
pub(super) fn rotary_dim(c: &Config, head_dim: usize) -> Result<Option<usize>> {
    if c.get("partial_rotary_factor").is_none()
        && c.get("rope_parameters")
            .and_then(|p| p.get("partial_rotary_factor"))
            .is_none_or(|v| v.is_null())
    {
        if let Some(dim) = c.usize_opt("rotary_dim")? {
            if dim == 0 || dim > head_dim || !dim.is_multiple_of(2) {
                return Err(Error::key(
                    c.path(),
                    "rotary_dim",
                    format!("is {dim}, must be even and between 2 and head_dim ({head_dim})"),
                ));
            }
            return Ok((dim < head_dim).then_some(dim));
        }
    }
    let (key, factor) = if c.get("partial_rotary_factor").is_some() {
        ("partial_rotary_factor", c.get("partial_rotary_factor"))
    } else {
        (
            "rope_parameters.partial_rotary_factor",
            c.get("rope_parameters")
                .and_then(|p| p.get("partial_rotary_factor"))
                .filter(|v| !v.is_null()),
        )
    };
    let Some(v) = factor else {
        return Ok(None);
    };
    let f = v
        .as_f64()
        .ok_or_else(|| Error::key(c.path(), key, format!("is {v}, expected a number")))?;
    if !(f.is_finite() && f > 0.0 && f <= 1.0) {
        return Err(Error::key(
            c.path(),
            key,
            format!("is {f}, must be in (0, 1]"),
        ));
    }
    // Python's int(): truncation.
    let dim = (head_dim as f64 * f) as usize;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(Error::key(
            c.path(),
            key,
            format!(
                "is {f}: {dim} of the {head_dim} head dims would rotate, \
                 which must be even and not 0 (rotary embeddings rotate pairs)"
            ),
        ));
    }
    Ok((dim < head_dim).then_some(dim))
}

/// Half-split rotary embedding of the first `2 × cos.dim(-1)` dims of `x`
/// `[heads, tokens, d]`, the others passed through (transformers'
/// `apply_rotary_pos_emb` with a partial `rotary_dim`); the whole head when
/// the tables cover it.
pub(super) fn rope_leading(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rot = 2 * cos.dim(D::Minus1)?;
    if rot >= d {
        return rope_half(x, cos, sin);
    }
    let turned = rope_half(&x.narrow(D::Minus1, 0, rot)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[turned, x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(json: &str) -> Config {
        Config::parse(Path::new("m/config.json"), json.as_bytes()).unwrap()
    }

    #[test]
    fn rotary_dim_reads_both_spellings_and_rejects_odd_or_empty_rotations() {
        assert_eq!(rotary_dim(&config("{}"), 128).unwrap(), None);
        // GLM-4.5's released config: top level, 0.5 of 128.
        assert_eq!(
            rotary_dim(&config(r#"{"partial_rotary_factor": 0.5}"#), 128).unwrap(),
            Some(64)
        );
        // transformers 5.
        let t5 = r#"{"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}"#;
        assert_eq!(rotary_dim(&config(t5), 8).unwrap(), Some(4));
        assert_eq!(
            rotary_dim(&config(r#"{"partial_rotary_factor": 1.0}"#), 8).unwrap(),
            None
        );
        // MiniMax-M2's released config: rotary_dim 64 of head_dim 128.
        assert_eq!(
            rotary_dim(&config(r#"{"rotary_dim": 64}"#), 128).unwrap(),
            Some(64)
        );
        let e = rotary_dim(&config(r#"{"rotary_dim": 3}"#), 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rotary_dim`") && e.contains("is 3"), "{e}");
        for (f, needle) in [
            ("0.0", "(0, 1]"),
            ("1.5", "(0, 1]"),
            ("0.375", "3 of the 8"),
        ] {
            let e = rotary_dim(&config(&format!(r#"{{"partial_rotary_factor": {f}}}"#)), 8)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("m/config.json") && e.contains("partial_rotary_factor"),
                "{e}"
            );
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn rope_leading_turns_only_the_leading_dims() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::arange(0f32, 16.0, &dev)
            .unwrap()
            .reshape((1, 2, 8))
            .unwrap();
        let (cos, sin) = super::super::attention::rope_tables(2, 4, 10000.0, &dev).unwrap();
        let y = rope_leading(&x, &cos, &sin).unwrap();
        let full = rope_half(
            &x.narrow(2, 0, 4).unwrap().contiguous().unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        let y: Vec<Vec<f32>> = y.squeeze(0).unwrap().to_vec2().unwrap();
        let full: Vec<Vec<f32>> = full.squeeze(0).unwrap().to_vec2().unwrap();
        let x: Vec<Vec<f32>> = x.squeeze(0).unwrap().to_vec2().unwrap();
        for t in 0..2 {
            assert_eq!(y[t][..4], full[t][..]);
            assert_eq!(y[t][4..], x[t][4..], "the trailing dims pass through");
        }
        // Position 1 really turns.
        assert_ne!(y[1][..4], x[1][..4]);
    }
}
