//! Quantised checkpoints, decoded on read through the mmap, layer by layer.
//!
//! A quantised checkpoint stores a linear layer's weight as several tensors
//! (packed integers, scales, zero points, or GGUF blocks). [`attach`] reads
//! `quantization_config` from config.json and registers, for every quantised
//! module, a *virtual* tensor under the name the families look up
//! (`….weight`) with its logical shape `[out, in]`. [`Weights::tensor`]
//! turns a virtual tensor into a [`TensorView`] whose
//! decoder dequantises any element range on demand; nothing is
//! dequantised ahead of time.
//!
//! - [`compressed`]: compressed-tensors (llm-compressor / vLLM):
//!   `float-quantized` FP8, `pack-quantized` and `naive-quantized` integers
//!   (with act-order `weight_g_idx`), NVFP4 and MXFP4 packing;
//! - [`gguf`]: llama.cpp GGUF files, dequantised with candle's block types;
//! - [`gptq`]: GPTQ (incl. act-order `g_idx`, v1 zero offset) and AWQ int4;
//! - [`mxfp4`]: MXFP4 expert blocks (gpt-oss), registered by the family adapter.
//!
//! Every decoder is validated when the virtual tensor is registered (sizes,
//! dtypes and shapes of all its parts, with checked arithmetic), so decoding
//! itself cannot fail or index out of bounds.

pub mod compressed;
pub mod gguf;
pub mod gptq;
pub mod mxfp4;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::safetensors::{Dtype, Shape, TensorView, Weights};

/// A logical tensor assembled from the stored parts of a quantised module.
#[derive(Debug, Clone)]
pub(crate) struct Virtual {
    /// Logical row-major shape (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// What reports call its storage type.
    pub dtype: Dtype,
    /// The stored tensor whose bytes the view borrows (and whose file it names).
    pub main: String,
    /// Every stored tensor it reads (released with it).
    pub parts: Vec<String>,
    /// How to decode it.
    pub spec: Spec,
}

/// A table of per-tile values (scales or float zero points): the value of
/// element `(r, c)` is entry `(r / row_block) * row_stride + (c / col_block) * col_stride`.
#[derive(Debug, Clone)]
pub(crate) struct GridSpec {
    pub name: String,
    pub dtype: Dtype,
    pub row_block: usize,
    pub col_block: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// The recipe of a virtual tensor, with its parts named.
#[derive(Debug, Clone)]
pub(crate) enum Spec {
    /// One byte per element (FP8 e4m3 or int8), times the scale of its tile.
    Scaled {
        /// Whether the bytes are int8 (else FP8 e4m3).
        int8: bool,
        scale: GridSpec,
    },
    /// compressed-tensors `pack-quantized`: `bits`-bit values packed densely
    /// into the int32 words of each row, offset by `2^(bits-1)`.
    Packed {
        bits: u32,
        words_per_row: usize,
        scale: GridSpec,
        /// Zero points packed along dim 0: `[ceil(rows·bits/32), groups]`.
        zero: Option<(String, usize)>,
        /// Activation order: int32 `[cols]`, the scale group of each column.
        g_idx: Option<String>,
    },
    /// compressed-tensors NVFP4: FP4 nibbles `[R, K/2]`, FP8 e4m3 scales
    /// `[R, K/16]` and one global scale: `fp4 · (s / global)`.
    Nvfp4 {
        scales: String,
        global: (String, Dtype),
    },
    /// GPTQ / AWQ: the transposed weight packed in int32 words.
    Transposed {
        layout: gptq::Layout,
        bits: u32,
        group_size: usize,
        zero_offset: i32,
        scales: (String, Dtype),
        qzeros: String,
        g_idx: Option<String>,
    },
    /// MXFP4: the main tensor's `blocks_range` bytes and the `scales`
    /// tensor's `scales_range` bytes (one expert's slab, or all of them),
    /// whose logical elements lie in the stored rows as `layout` says.
    Mxfp4 {
        scales: String,
        blocks_range: (usize, usize),
        scales_range: (usize, usize),
        layout: mxfp4::Layout,
    },
    /// GGUF blocks of one type, from byte `range.0` to `range.1` of the main
    /// tensor (one expert's slab of a stacked tensor), or all of it.
    Gguf {
        ty: candle_core::quantized::GgmlDType,
        range: Option<(usize, usize)>,
    },
}

/// A decoder borrowing the bytes of a virtual tensor's parts.
#[derive(Clone, Copy)]
pub(crate) enum Decoder<'a> {
    /// See [`Spec::Scaled`].
    Scaled { int8: bool, scale: Grid<'a> },
    /// See [`Spec::Packed`].
    Packed {
        bits: u32,
        words_per_row: usize,
        scale: Grid<'a>,
        zero: Option<(&'a [u8], usize)>,
        g_idx: Option<&'a [u8]>,
    },
    /// See [`Spec::Nvfp4`]: the scales and the global scale.
    Nvfp4 { scales: &'a [u8], global: f32 },
    /// See [`Spec::Gguf`].
    Gguf(candle_core::quantized::GgmlDType),
    /// See [`Spec::Mxfp4`] (the scales of the slab, and where elements lie).
    Mxfp4(&'a [u8], mxfp4::Layout),
    /// See [`Spec::Transposed`].
    Transposed {
        layout: gptq::Layout,
        bits: u32,
        group_size: usize,
        zero_offset: i32,
        scales: (&'a [u8], Dtype),
        qzeros: &'a [u8],
        g_idx: Option<&'a [u8]>,
    },
}

/// A validated [`GridSpec`] with its bytes.
#[derive(Clone, Copy)]
pub(crate) struct Grid<'a> {
    bytes: &'a [u8],
    dtype: Dtype,
    row_block: usize,
    col_block: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Grid<'_> {
    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.at_group(r, c / self.col_block)
    }

    /// The value of row `r` in column group `g`.
    #[inline]
    fn at_group(&self, r: usize, g: usize) -> f32 {
        let i = (r / self.row_block) * self.row_stride + g * self.col_stride;
        scalar(self.bytes, self.dtype, i)
    }
}

/// Element `i` of a float tensor's bytes.
#[inline]
pub(crate) fn scalar(bytes: &[u8], dtype: Dtype, i: usize) -> f32 {
    match dtype {
        Dtype::F32 => {
            let b = &bytes[i * 4..i * 4 + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        Dtype::F16 => {
            half::f16::from_bits(u16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]])).to_f32()
        }
        Dtype::BF16 => {
            f32::from_bits((u16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]]) as u32) << 16)
        }
        Dtype::F8E4M3 => crate::model::safetensors::fp8_e4m3_to_f32(bytes[i]),
        // Grids are only ever built over float dtypes (checked in `grid`).
        Dtype::Quantized(_) => f32::NAN,
    }
}

/// `bits` bits at bit offset `bit` of a little-endian int32 word stream.
#[inline]
fn bits_at(words: &[u8], bit: usize, bits: u32) -> u32 {
    let byte = bit / 8;
    let mut acc = 0u64;
    for (k, b) in words[byte..].iter().take(5).enumerate() {
        acc |= (*b as u64) << (8 * k);
    }
    ((acc >> (bit % 8)) & ((1u64 << bits) - 1)) as u32
}

impl Decoder<'_> {
    /// Decodes elements `start..start + out.len()` of a row-major tensor with
    /// `cols` columns whose main bytes are `bytes`.
    pub(crate) fn read(&self, bytes: &[u8], cols: usize, start: usize, out: &mut [f32]) {
        let cols = cols.max(1);
        match *self {
            Decoder::Gguf(ty) => gguf::read(ty, bytes, start, out),
            Decoder::Mxfp4(scales, layout) => mxfp4::read(bytes, scales, &layout, start, out),
            Decoder::Nvfp4 { scales, global } => {
                mxfp4::read_nvfp4(bytes, scales, global, cols, start, out)
            }
            Decoder::Transposed {
                layout,
                bits,
                group_size,
                zero_offset,
                scales,
                qzeros,
                g_idx,
            } => gptq::read(
                layout,
                bits,
                group_size,
                zero_offset,
                bytes,
                scales,
                qzeros,
                g_idx,
                cols,
                start,
                out,
            ),
            Decoder::Scaled { int8, scale } => {
                for (k, o) in out.iter_mut().enumerate() {
                    let idx = start + k;
                    let (r, c) = (idx / cols, idx % cols);
                    let b = bytes[idx];
                    let q = if int8 {
                        b as i8 as f32
                    } else {
                        crate::model::safetensors::fp8_e4m3_to_f32(b)
                    };
                    *o = q * scale.at(r, c);
                }
            }
            Decoder::Packed {
                bits,
                words_per_row,
                scale,
                zero,
                g_idx,
            } => {
                let offset = 1i32 << (bits - 1);
                let row_bytes = words_per_row * 4;
                for (k, o) in out.iter_mut().enumerate() {
                    let idx = start + k;
                    let (r, c) = (idx / cols, idx % cols);
                    let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                    let q = bits_at(row, c * bits as usize, bits) as i32 - offset;
                    // The scale group of column `c` (validated < groups at registration).
                    let group = match g_idx {
                        Some(gi) => i32::from_le_bytes([
                            gi[c * 4],
                            gi[c * 4 + 1],
                            gi[c * 4 + 2],
                            gi[c * 4 + 3],
                        ]) as usize,
                        None => c / scale.col_block,
                    };
                    let z = match zero {
                        None => 0,
                        Some((zb, groups)) => {
                            // Packed along dim 0: row `r` of column `g` is bit r·bits of
                            // the column's word stream [w0·groups + g, w1·groups + g, ...].
                            let g = group * scale.col_stride;
                            let bit = r * bits as usize;
                            let w = bit / 32;
                            let word = |w: usize| -> u64 {
                                let at = (w * groups + g) * 4;
                                zb.get(at..at + 4).map_or(0, |b| {
                                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
                                })
                            };
                            let pair = word(w) | (word(w + 1) << 32);
                            ((pair >> (bit % 32)) & ((1u64 << bits) - 1)) as i32 - offset
                        }
                    };
                    *o = (q - z) as f32 * scale.at_group(r, group);
                }
            }
        }
    }
}

/// Resolves a virtual tensor's parts into a decoder and its main bytes.
pub(crate) fn decoder<'a>(w: &'a Weights, v: &'a Virtual) -> Result<(Decoder<'a>, &'a [u8])> {
    let bytes = |name: &str| -> Result<&'a [u8]> { Ok(w.raw(name)?.2) };
    let grid = |g: &GridSpec| -> Result<Grid<'a>> {
        Ok(Grid {
            bytes: bytes(&g.name)?,
            dtype: g.dtype,
            row_block: g.row_block,
            col_block: g.col_block,
            row_stride: g.row_stride,
            col_stride: g.col_stride,
        })
    };
    let mut main = bytes(&v.main)?;
    let d = match &v.spec {
        Spec::Gguf { ty, range } => {
            if let Some((a, b)) = *range {
                main = main.get(a..b).ok_or_else(|| {
                    bad(
                        w.file_of(&v.main),
                        &v.main,
                        format!("has no bytes {a}..{b}"),
                    )
                })?;
            }
            Decoder::Gguf(*ty)
        }
        Spec::Mxfp4 {
            scales,
            blocks_range: (a, b),
            scales_range: (c, d),
            layout,
        } => {
            let slab = |bytes: &'a [u8], name: &str, x: usize, y: usize| {
                bytes
                    .get(x..y)
                    .ok_or_else(|| bad(w.file_of(name), name, format!("has no bytes {x}..{y}")))
            };
            main = slab(main, &v.main, *a, *b)?;
            Decoder::Mxfp4(slab(bytes(scales)?, scales, *c, *d)?, *layout)
        }
        Spec::Transposed {
            layout,
            bits,
            group_size,
            zero_offset,
            scales,
            qzeros,
            g_idx,
        } => Decoder::Transposed {
            layout: *layout,
            bits: *bits,
            group_size: *group_size,
            zero_offset: *zero_offset,
            scales: (bytes(&scales.0)?, scales.1),
            qzeros: bytes(qzeros)?,
            g_idx: g_idx.as_deref().map(bytes).transpose()?,
        },
        Spec::Scaled { int8, scale } => Decoder::Scaled {
            int8: *int8,
            scale: grid(scale)?,
        },
        Spec::Packed {
            bits,
            words_per_row,
            scale,
            zero,
            g_idx,
        } => Decoder::Packed {
            bits: *bits,
            words_per_row: *words_per_row,
            scale: grid(scale)?,
            zero: match zero {
                Some((name, groups)) => Some((bytes(name)?, *groups)),
                None => None,
            },
            g_idx: g_idx.as_deref().map(bytes).transpose()?,
        },
        Spec::Nvfp4 {
            scales,
            global: (global, dtype),
        } => Decoder::Nvfp4 {
            scales: bytes(scales)?,
            global: scalar(bytes(global)?, *dtype, 0),
        },
    };
    Ok((d, main))
}

/// The view of a virtual tensor (`key` is its name, owned by `w`).
pub(crate) fn view<'a>(w: &'a Weights, key: &'a str, v: &'a Virtual) -> Result<TensorView<'a>> {
    let (d, bytes) = decoder(w, v)?;
    let path = w.file_of(&v.main);
    let shape = Shape::new(&v.shape).ok_or_else(|| {
        bad(
            path,
            key,
            format!("shape {:?} has too many dimensions", v.shape),
        )
    })?;
    Ok(TensorView::decoded(key, path, v.dtype, shape, bytes, d))
}

/// Reads `quantization_config` from config.json and registers the virtual
/// tensors of the quantised modules on `weights`. A config without
/// `quantization_config` changes nothing; DeepSeek's `fp8` block format is
/// read by the safetensors layer itself. Any other method or format is an
/// error naming config.json and the value.
pub fn attach(weights: &mut Weights, config: &Config) -> Result<()> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(());
    };
    let key = "quantization_config.quant_method";
    let method = q
        .get("quant_method")
        .and_then(|m| m.as_str())
        .ok_or_else(|| Error::key(config.path(), key, "missing, or not a string"))?;
    let virtuals = match method {
        // DeepSeek-V3 releases: `weight_scale_inv` blocks, decoded by Weights::tensor.
        "fp8" => return Ok(()),
        // gpt-oss: `Model` registers the fused expert blocks under the family
        // table's names (`mxfp4::register_family`); everything else is stored plain.
        "mxfp4" => return Ok(()),
        "compressed-tensors" => compressed::plan(weights, config, q)?,
        "gptq" => gptq::plan(weights, config, q, gptq::Layout::Gptq)?,
        "awq" => gptq::plan(weights, config, q, gptq::Layout::Awq)?,
        other => {
            return Err(Error::key(
                config.path(),
                key,
                format!(
                    "is `{other}`, which this tool cannot decode (supported: {})",
                    SUPPORTED_METHODS
                ),
            ))
        }
    };
    weights.add_virtuals(virtuals);
    Ok(())
}

/// The `quant_method`s [`attach`] understands.
pub const SUPPORTED_METHODS: &str = "compressed-tensors, gptq, awq, fp8, mxfp4";

/// A safetensors error naming `path` (the file of `tensor`).
pub(crate) fn bad(path: &Path, tensor: &str, reason: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        reason: format!("tensor `{tensor}`: {reason}"),
    }
}

/// The float dtype of a scale tensor, or an error naming it.
pub(crate) fn float_dtype(path: &Path, name: &str, tag: &str) -> Result<Dtype> {
    match tag {
        "F32" => Ok(Dtype::F32),
        "F16" => Ok(Dtype::F16),
        "BF16" => Ok(Dtype::BF16),
        other => Err(bad(
            path,
            name,
            format!("is {other}; a scale must be F32, F16 or BF16"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_straddle_words() {
        // 3-bit values 0..=7 repeated, packed densely little-endian.
        let vals: Vec<u32> = (0..40).map(|i| i % 8).collect();
        let mut words = vec![0u32; (40 * 3usize).div_ceil(32)];
        for (i, &v) in vals.iter().enumerate() {
            let bit = i * 3;
            words[bit / 32] |= v << (bit % 32);
            if bit % 32 + 3 > 32 {
                words[bit / 32 + 1] |= v >> (32 - bit % 32);
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for (i, &v) in vals.iter().enumerate() {
            assert_eq!(bits_at(&bytes, i * 3, 3), v, "{i}");
        }
    }
}
