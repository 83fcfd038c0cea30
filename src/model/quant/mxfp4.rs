//! MXFP4 (OCP microscaling FP4, as gpt-oss stores its experts): `X_blocks`
//! uint8 `[E, R, K/32, 16]` holds two FP4 e2m1 values per byte, the even
//! element in the low nibble; `X_scales` uint8 `[E, R, K/32]` holds one
//! e8m0 exponent per 32 values: `value = fp4 · 2^(scale − 127)`, computed in
//! f32 as transformers' `integrations.mxfp4` does (its lookup table, then
//! `ldexp`). transformers transposes the dequantised `[E, R, K]` to the
//! `[E, K, R]` its gpt-oss module multiplies with (`x @ W`).
//!
//! [`register_family`] (called by [`crate::model::Model`] for a config with
//! `quant_method: mxfp4`) registers, for each fused expert tensor `X` of the
//! family table stored as `X_blocks`/`X_scales`, the logical `X` (`[E, K, R]`,
//! as transformers' module holds it) and each expert's matrices in the hub
//! layout `[out, in]` ([`expert_names`]): gpt-oss's `gate_up` rows alternate
//! gate and up, so expert `e`'s gate is its even stored rows, up the odd ones.

use std::collections::HashMap;

use super::{Spec, Virtual};
use crate::error::{Error, Result};
use crate::model::family::{ExpertSource, FusedKind, Naming};
use crate::model::safetensors::{Dtype, Weights};
use crate::model::ModelInfo;

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

/// Where a virtual tensor's elements lie in its stored rows of `k` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Stored values per row (`K`).
    pub k: usize,
    /// Stored row of logical row 0.
    pub first_row: usize,
    /// Stored rows from one logical row to the next.
    pub row_step: usize,
    /// `Some(R)`: the logical tensor is the transpose `[E, K, R]` of stored
    /// `[E, R, K]` slabs of `R` rows (`first_row`/`row_step` then unused).
    pub transposed: Option<usize>,
}

/// Decodes logical elements `start..start + out.len()`: `blocks` holds the
/// stored rows' `K/2` bytes each, `scales` their `K/32` exponents each.
pub(crate) fn read(blocks: &[u8], scales: &[u8], lay: &Layout, start: usize, out: &mut [f32]) {
    let k = lay.k;
    for (o, idx) in out.iter_mut().zip(start..) {
        let (row, j) = match lay.transposed {
            Some(r) => {
                let (slab, m) = (idx / (k * r), idx % (k * r));
                (slab * r + m % r, m / r)
            }
            None => (lay.first_row + (idx / k) * lay.row_step, idx % k),
        };
        let b = blocks[row * (k / 2) + j / 2];
        let nib = if j % 2 == 0 { b & 0x0f } else { b >> 4 };
        *o = FP4_VALUES[nib as usize] * e8m0(scales[row * (k / 32) + j / 32]);
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

/// Checks `blocks`/`scales` (dtypes, shapes): `[E, R, K/32]` of the blocks.
fn geometry(weights: &Weights, blocks: &str, scales: &str) -> Result<[usize; 3]> {
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
    Ok([e, r, g])
}

fn virtual_of(
    blocks: &str,
    scales: &str,
    shape: Vec<usize>,
    b: usize,
    s: usize,
    layout: Layout,
) -> Virtual {
    Virtual {
        shape,
        dtype: Dtype::Quantized("mxfp4"),
        main: blocks.to_string(),
        parts: vec![blocks.to_string(), scales.to_string()],
        spec: Spec::Mxfp4 {
            scales: scales.to_string(),
            blocks_range: (0, b),
            scales_range: (0, s),
            layout,
        },
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
    let [e, r, g] = geometry(weights, blocks, scales)?;
    let (per_b, per_s) = (r * g * 16, r * g);
    let mut out = HashMap::new();
    for x in 0..e {
        let mut v = virtual_of(
            blocks,
            scales,
            vec![r, g * 32],
            0,
            0,
            Layout {
                k: g * 32,
                first_row: 0,
                row_step: 1,
                transposed: None,
            },
        );
        if let Spec::Mxfp4 {
            blocks_range,
            scales_range,
            ..
        } = &mut v.spec
        {
            *blocks_range = (x * per_b, (x + 1) * per_b);
            *scales_range = (x * per_s, (x + 1) * per_s);
        }
        out.insert(name(x), v);
    }
    weights.add_virtuals(out);
    Ok(())
}

/// Names of expert `e`'s MXFP4 matrices `[gate, up, down]` (hub layout
/// `[out, in]`) registered by [`register_family`] for the fused tensors
/// `gate_up` and `down`.
pub fn expert_names(gate_up: &str, down: &str, e: usize) -> [String; 3] {
    [
        format!("{gate_up}.{e}.gate"),
        format!("{gate_up}.{e}.up"),
        format!("{down}.{e}"),
    ]
}

/// For every MoE layer whose fused expert tensors are stored as MXFP4
/// `_blocks`/`_scales`: the logical stacked tensors and every expert's
/// matrices (see the module doc). A layer whose tensors are stored plain is
/// left alone; a block shape that does not match the config is an error
/// naming the tensor.
pub fn register_family(weights: &mut Weights, info: &ModelInfo, naming: &Naming) -> Result<()> {
    let (h, i) = (info.hidden_size, info.expert_intermediate);
    let n = info.num_experts;
    let mut out = HashMap::new();
    for &layer in &info.moe_layers {
        let ExpertSource::Fused {
            gate_up,
            down,
            kind,
            ..
        } = naming.expert_source(layer, 0)
        else {
            continue;
        };
        let (gb, gs) = (format!("{gate_up}_blocks"), format!("{gate_up}_scales"));
        let (db, ds) = (format!("{down}_blocks"), format!("{down}_scales"));
        if !weights.contains(&gb) {
            continue;
        }
        if kind != FusedKind::InterleavedColumns {
            return Err(super::bad(
                weights.file_of(&gb),
                &gb,
                "MXFP4 experts are read in gpt-oss's interleaved layout only",
            ));
        }
        let two_i = i
            .checked_mul(2)
            .ok_or_else(|| Error::Usage("intermediate_size overflows".into()))?;
        for (blocks, scales, rows, k) in [(&gb, &gs, two_i, h), (&db, &ds, h, i)] {
            let [e, r, g] = geometry(weights, blocks, scales)?;
            if [e, r, g * 32] != [n, rows, k] || k % 32 != 0 {
                return Err(super::bad(
                    weights.file_of(blocks),
                    blocks,
                    format!(
                        "holds [{e}, {r}, {}] values; the config asks for [{n}, {rows}, {k}] (experts, rows, a multiple of 32 per row)",
                        g * 32
                    ),
                ));
            }
        }
        // Stored sizes, checked above to be the config's (so the products fit).
        let (gu_b, gu_s) = (n * two_i * h / 2, n * two_i * h / 32);
        let (d_b, d_s) = (n * h * i / 2, n * h * i / 32);
        let lay = |k: usize, first_row: usize, row_step: usize, transposed: Option<usize>| Layout {
            k,
            first_row,
            row_step,
            transposed,
        };
        out.insert(
            gate_up.clone(),
            virtual_of(
                &gb,
                &gs,
                vec![n, h, two_i],
                gu_b,
                gu_s,
                lay(h, 0, 1, Some(two_i)),
            ),
        );
        out.insert(
            down.clone(),
            virtual_of(&db, &ds, vec![n, i, h], d_b, d_s, lay(i, 0, 1, Some(h))),
        );
        for e in 0..n {
            let [gate, up, dn] = expert_names(&gate_up, &down, e);
            let at = e * two_i;
            out.insert(
                gate,
                virtual_of(&gb, &gs, vec![i, h], gu_b, gu_s, lay(h, at, 2, None)),
            );
            out.insert(
                up,
                virtual_of(&gb, &gs, vec![i, h], gu_b, gu_s, lay(h, at + 1, 2, None)),
            );
            out.insert(
                dn,
                virtual_of(&db, &ds, vec![h, i], d_b, d_s, lay(i, e * h, 1, None)),
            );
        }
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
