//! MXFP4 (OCP microscaling FP4, as gpt-oss stores its experts): `X_blocks`
//! uint8 `[E, R, K/32, 16]` holds two FP4 e2m1 values per byte, the even
//! element in the low nibble; `X_scales` uint8 `[E, R, K/32]` holds one
//! e8m0 exponent per 32 values: `value = fp4 · 2^(scale − 127)`, computed in
//! f32 as transformers' `integrations.mxfp4` does (its lookup table, then
//! `ldexp`). Rows are the stored rows `R` (transformers transposes the
//! dequantised `[E, R, K]` to `[E, K, R]` for gpt-oss's `x @ W` layout).
//!
//! The gpt-oss family adapter registers one expert's slab with
//! [`register_experts`] under the names it looks up.

use std::collections::HashMap;

use super::{Spec, Virtual};
use crate::error::Result;
use crate::model::safetensors::{Dtype, Weights};

/// FP4 e2m1 values by nibble (transformers' `FP4_VALUES`).
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `2^(s − 127)` as f32 (`s = 0` is the subnormal 2^-127, `s = 255` overflows to infinity as in
/// transformers' f32 `ldexp`).
#[inline]
fn e8m0(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(1 << 22),
        255 => f32::INFINITY,
        s => f32::from_bits((s as u32) << 23),
    }
}

/// Decodes elements `start..start + out.len()` of a `[R, K]` slab: `blocks`
/// holds its `R·K/2` bytes, `scales` its `R·K/32` exponents.
pub(crate) fn read(blocks: &[u8], scales: &[u8], k: usize, start: usize, out: &mut [f32]) {
    for (o, idx) in out.iter_mut().zip(start..) {
        let (r, j) = (idx / k, idx % k);
        let b = blocks[r * (k / 2) + j / 2];
        let nib = if j % 2 == 0 { b & 0x0f } else { b >> 4 };
        *o = FP4_VALUES[nib as usize] * e8m0(scales[r * (k / 32) + j / 32]);
    }
}

/// Decodes elements `start..start + out.len()` of a compressed-tensors
/// NVFP4 `[R, K]` weight: `packed` holds its `R·K/2` bytes (low nibble
/// first), `scales` its `R·K/16` FP8 e4m3 scales; `value = fp4 · (s / global)`
/// in f32, as compressed-tensors' `dequantize` computes it with f32 scales.
pub(crate) fn read_nvfp4(
    packed: &[u8],
    scales: &[u8],
    global: f32,
    k: usize,
    start: usize,
    out: &mut [f32],
) {
    for (o, idx) in out.iter_mut().zip(start..) {
        let (r, j) = (idx / k, idx % k);
        let b = packed[r * (k / 2) + j / 2];
        let nib = if j % 2 == 0 { b & 0x0f } else { b >> 4 };
        let s = crate::model::safetensors::fp8_e4m3_to_f32(scales[r * (k / 16) + j / 16]);
        *o = FP4_VALUES[nib as usize] * (s / global);
    }
}

/// Registers expert `e`'s `[R, K]` slab of `X_blocks`/`X_scales` under
/// `name(e)`, for every expert, after checking both tensors' dtypes and shapes.
pub fn register_experts(
    weights: &mut Weights,
    blocks: &str,
    scales: &str,
    name: impl Fn(usize) -> String,
) -> Result<()> {
    let bpath = weights.file_of(blocks).to_path_buf();
    let (btag, bshape, _) = weights.raw(blocks)?;
    let (stag, sshape, _) = weights.raw(scales)?;
    let [e, r, g, 16] = *bshape else {
        return Err(super::bad(
            &bpath,
            blocks,
            format!("is {btag} {bshape:?}; MXFP4 blocks are U8 [E, R, K/32, 16]"),
        ));
    };
    if btag != "U8" {
        return Err(super::bad(
            &bpath,
            blocks,
            format!("is {btag}; MXFP4 blocks are U8"),
        ));
    }
    if stag != "U8" || sshape != [e, r, g] {
        return Err(super::bad(
            weights.file_of(scales),
            scales,
            format!("should be U8 [{e}, {r}, {g}] (one e8m0 exponent per 32 values of `{blocks}`), found {stag} {sshape:?}"),
        ));
    }
    let (per_b, per_s) = (r * g * 16, r * g);
    let mut out = HashMap::new();
    for x in 0..e {
        out.insert(
            name(x),
            Virtual {
                shape: vec![r, g * 32],
                dtype: Dtype::Quantized("mxfp4"),
                main: blocks.to_string(),
                parts: vec![blocks.to_string(), scales.to_string()],
                spec: Spec::Mxfp4 {
                    scales: scales.to_string(),
                    blocks_range: (x * per_b, (x + 1) * per_b),
                    scales_range: (x * per_s, (x + 1) * per_s),
                },
            },
        );
    }
    weights.add_virtuals(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Each expert's slab against transformers' `_convert_moe_packed_tensors`
    /// (fixtures/make_mxfp4_fixture.py), bit for bit, whole and in ranges.
    #[test]
    fn experts_match_transformers_mxfp4_dequantisation() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mxfp4/experts.safetensors");
        let mut w = Weights::open_file(&path).unwrap();
        for m in ["gate_up_proj", "down_proj"] {
            register_experts(
                &mut w,
                &format!("{m}_blocks"),
                &format!("{m}_scales"),
                |e| format!("{m}.{e}"),
            )
            .unwrap();
        }
        let mut compared = 0;
        for (m, rows, k) in [("gate_up_proj", 8, 64), ("down_proj", 64, 96)] {
            let want = w.tensor(&format!("{m}.dequantised")).unwrap().to_f32_vec();
            assert_eq!(want.len(), 3 * rows * k);
            for e in 0..3 {
                let t = w.tensor(&format!("{m}.{e}")).unwrap();
                assert_eq!(t.shape, [rows, k]);
                assert_eq!(t.dtype.name(), "mxfp4");
                let got = t.to_f32_vec();
                let exp = &want[e * rows * k..(e + 1) * rows * k];
                assert!(got.iter().all(|x| x.is_finite()));
                for (i, (g, x)) in got.iter().zip(exp).enumerate() {
                    assert_eq!(g.to_bits(), x.to_bits(), "{m} expert {e} [{i}]: {g} vs {x}");
                    compared += 1;
                }
                let mut part = vec![0f32; 45];
                t.read_f32(31, &mut part);
                assert_eq!(part, got[31..76]);
            }
        }
        assert_eq!(compared, 3 * (8 * 64 + 64 * 96));
    }

    #[test]
    fn mismatched_scales_are_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mxfp4/experts.safetensors");
        let mut w = Weights::open_file(&path).unwrap();
        let e = register_experts(&mut w, "gate_up_proj_blocks", "down_proj_scales", |e| {
            e.to_string()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("down_proj_scales") && e.contains("[3, 8, 2]"),
            "{e}"
        );
    }

    #[test]
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(128), 2.0);
        assert_eq!(e8m0(1), 2f32.powi(-126));
        assert_eq!(e8m0(0), 2f32.powi(-127));
        assert_eq!(e8m0(254), 2f32.powi(127));
    }
}
