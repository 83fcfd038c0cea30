//! GPTQ and AWQ packed integer checkpoints (`quantization_config.quant_method`
//! `gptq` / `awq`). Both store the transposed weight `Wᵀ [K, N]` of a linear
//! layer `[N, K]` (N outputs, K inputs) as int32 words:
//!
//! - GPTQ (auto-gptq/optimum v1 format): `qweight [K·b/32, N]` packs `32/b`
//!   consecutive *inputs* per word (input `k` at bit `b·(k mod 32/b)`);
//!   `qzeros [G, N·b/32]` packs outputs the same way and stores
//!   `zero − 1` (`checkpoint_format: gptq`; `gptq_v2` stores the zero
//!   itself); `scales [G, N]`; `g_idx [K]` maps each input to its group,
//!   which with act-order (`desc_act`) is not `k / group_size`.
//! - AWQ (autoawq GEMM): `qweight [K, N/8]` packs 8 *outputs* per word in the
//!   order `[0, 2, 4, 6, 1, 3, 5, 7]`, so output `n` sits in nibble
//!   `[0, 4, 1, 5, 2, 6, 3, 7][n mod 8]`; `qzeros [G, N/8]` likewise, zero
//!   used as stored; `scales [G, N]`; group of input `k` is `k / group_size`.
//!
//! `W[n, k] = (q − z) · s`, computed in f32 (exact integer difference, one
//! rounding of the product).

use std::collections::HashMap;

use serde_json::Value;

use super::{bad, float_dtype, Spec, Virtual};
use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::safetensors::{Dtype, Weights};

/// Where AWQ puts output `n mod 8` within a word (nibble index).
pub(crate) const AWQ_NIBBLE: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// GPTQ: inputs packed along dim 0 of `qweight`.
    Gptq,
    /// AWQ: outputs packed along dim 1, interleaved.
    Awq,
}

fn int_key(config: &Config, q: &Value, key: &str) -> Result<Option<i64>> {
    match q.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            Error::key(
                config.path(),
                &format!("quantization_config.{key}"),
                "must be an integer",
            )
        }),
    }
}

/// The virtual `….weight` of every module holding a `qweight`.
pub(crate) fn plan(
    weights: &Weights,
    config: &Config,
    q: &Value,
    layout: Layout,
) -> Result<HashMap<String, Virtual>> {
    let path = config.path();
    let bits = int_key(config, q, "bits")?
        .or(int_key(config, q, "w_bit")?)
        .unwrap_or(4);
    let ok_bits: &[i64] = match layout {
        Layout::Gptq => &[2, 4, 8],
        Layout::Awq => &[4],
    };
    if !ok_bits.contains(&bits) {
        return Err(Error::key(
            path,
            "quantization_config.bits",
            format!("is {bits}; supported: {ok_bits:?}"),
        ));
    }
    let bits = bits as u32;
    let group = int_key(config, q, "group_size")?
        .or(int_key(config, q, "q_group_size")?)
        .unwrap_or(128);
    let zero_offset = match layout {
        Layout::Awq => {
            if let Some(v) = q.get("version").and_then(Value::as_str) {
                if !v.eq_ignore_ascii_case("gemm") {
                    return Err(Error::key(
                        path,
                        "quantization_config.version",
                        format!("is `{v}`; only the GEMM packing of AWQ is supported"),
                    ));
                }
            }
            0
        }
        Layout::Gptq => match q.get("checkpoint_format").and_then(Value::as_str) {
            None | Some("gptq") => 1,
            Some("gptq_v2") => 0,
            Some(other) => {
                return Err(Error::key(
                    path,
                    "quantization_config.checkpoint_format",
                    format!("is `{other}`; supported: gptq, gptq_v2"),
                ))
            }
        },
    };
    let mut out = HashMap::new();
    for name in weights.names() {
        let Some(module) = name.strip_suffix(".qweight") else {
            continue;
        };
        let v = module_virtual(weights, module, layout, bits, group, zero_offset)?;
        out.insert(format!("{module}.weight"), v);
    }
    Ok(out)
}

fn module_virtual(
    weights: &Weights,
    module: &str,
    layout: Layout,
    bits: u32,
    group: i64,
    zero_offset: i32,
) -> Result<Virtual> {
    let per = (32 / bits) as usize;
    let qname = format!("{module}.qweight");
    let path = weights.file_of(&qname).to_path_buf();
    let (tag, qshape, _) = weights.raw(&qname)?;
    let [a, b] = qshape else {
        return Err(bad(
            &path,
            &qname,
            format!("has shape {qshape:?}; expected a matrix"),
        ));
    };
    if tag != "I32" {
        return Err(bad(
            &path,
            &qname,
            format!("is {tag}; packed weights are I32"),
        ));
    }
    let (k, n) = match layout {
        Layout::Gptq => (a.checked_mul(per), Some(*b)),
        Layout::Awq => (Some(*a), b.checked_mul(per)),
    };
    let (Some(k), Some(n)) = (k, n) else {
        return Err(bad(&path, &qname, "size overflows"));
    };
    if k == 0 || n == 0 || n % per != 0 {
        return Err(bad(
            &path,
            &qname,
            format!("holds a [{n}, {k}] weight; outputs must be a positive multiple of {per}"),
        ));
    }
    let gsize = if group <= 0 { k } else { group as usize };
    let groups = k.div_ceil(gsize);
    // g_idx (GPTQ): one group per input, each < the number of scale rows.
    let gname = format!("{module}.g_idx");
    let g_idx = if layout == Layout::Gptq && weights.contains(&gname) {
        let (gtag, gshape, gbytes) = weights.raw(&gname)?;
        if gtag != "I32" || gshape != [k] {
            return Err(bad(
                weights.file_of(&gname),
                &gname,
                format!("should be I32 [{k}], found {gtag} {gshape:?}"),
            ));
        }
        Some((gname, gbytes))
    } else {
        None
    };
    let sname = format!("{module}.scales");
    let (stag, sshape, _) = weights.raw(&sname)?;
    let sdtype = float_dtype(weights.file_of(&sname), &sname, stag)?;
    let scale_rows = match (&g_idx, sshape) {
        (Some(_), [g, m]) if *m == n && *g >= 1 => *g,
        (None, [g, m]) if *m == n && *g == groups => *g,
        _ => {
            return Err(bad(
                weights.file_of(&sname),
                &sname,
                format!("has shape {sshape:?}; a [{n}, {k}] weight in groups of {gsize} needs [{groups}, {n}]"),
            ))
        }
    };
    if let Some((g, gbytes)) = &g_idx {
        if let Some((i, v)) = gbytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .enumerate()
            .find(|(_, v)| *v < 0 || *v as usize >= scale_rows)
        {
            return Err(bad(
                weights.file_of(g),
                g,
                format!("entry {i} is {v}, not a group of `{sname}` (0..{scale_rows})"),
            ));
        }
    }
    let zname = format!("{module}.qzeros");
    let (ztag, zshape, _) = weights.raw(&zname)?;
    if ztag != "I32" || zshape != [scale_rows, n / per] {
        return Err(bad(
            weights.file_of(&zname),
            &zname,
            format!(
                "should be I32 [{scale_rows}, {}], found {ztag} {zshape:?}",
                n / per
            ),
        ));
    }
    let mut parts = vec![qname.clone(), sname.clone(), zname.clone()];
    let g_idx = g_idx.map(|(g, _)| {
        parts.push(g.clone());
        g
    });
    Ok(Virtual {
        shape: vec![n, k],
        dtype: Dtype::Quantized(match (layout, bits) {
            (Layout::Awq, _) => "awq_int4",
            (_, 2) => "gptq_int2",
            (_, 8) => "gptq_int8",
            _ => "gptq_int4",
        }),
        main: qname,
        parts,
        spec: Spec::Transposed {
            layout,
            bits,
            group_size: gsize,
            zero_offset,
            scales: (sname, sdtype),
            qzeros: zname,
            g_idx,
        },
    })
}

/// Decodes elements of a GPTQ/AWQ weight; see the module docs.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn read(
    layout: Layout,
    bits: u32,
    group_size: usize,
    zero_offset: i32,
    qweight: &[u8],
    scales: (&[u8], Dtype),
    qzeros: &[u8],
    g_idx: Option<&[u8]>,
    k: usize,
    start: usize,
    out: &mut [f32],
) {
    let per = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let word = |bytes: &[u8], i: usize| {
        u32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    // Outputs (rows of the logical weight) = words per qweight row · per (AWQ) or its width (GPTQ).
    let rows = match layout {
        Layout::Gptq => qweight.len() / 4 / (k / per),
        Layout::Awq => qweight.len() / 4 / k * per,
    };
    for (o, idx) in out.iter_mut().zip(start..) {
        let (r, c) = (idx / k, idx % k);
        let (q, zshift) = match layout {
            Layout::Gptq => {
                let w = word(qweight, (c / per) * rows + r);
                (
                    (w >> (bits as usize * (c % per))) & mask,
                    bits as usize * (r % per),
                )
            }
            Layout::Awq => {
                let w = word(qweight, c * (rows / per) + r / per);
                let shift = (bits * AWQ_NIBBLE[r % per]) as usize;
                ((w >> shift) & mask, shift)
            }
        };
        let g = match g_idx {
            Some(gi) => word(gi, c) as usize,
            None => c / group_size,
        };
        let z = ((word(qzeros, g * (rows / per) + r / per) >> zshift) & mask) as i32 + zero_offset;
        let s = super::scalar(scales.0, scales.1, g * rows + r);
        *o = (q as i32 - z) as f32 * s;
    }
}
