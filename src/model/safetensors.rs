//! Zero-copy safetensors reading through mmap (or embedded bytes), with
//! validation that names the shard and tensor when something is wrong.
//!
//! Tensors are never loaded eagerly: a [`TensorView`] borrows its bytes from
//! the mapping, and analyses convert them to f32 in bounded chunks. After a
//! layer is done, [`Weights::release`] drops its pages from the page cache of
//! this process, so resident memory does not grow with the number of layers.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Element types the analyses can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// FP8 e4m3 (`float8_e4m3fn`), dequantised with its `weight_scale_inv`
    /// block scales when the checkpoint has them (DeepSeek-V3 releases),
    /// or with compressed-tensors `weight_scale`s.
    F8E4M3,
    /// A quantised encoding decoded by [`crate::model::quant`] (`int4`,
    /// `q4_k`, ...): the value names it in reports; elements have no fixed byte size.
    Quantized(&'static str),
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F8E4M3 | Dtype::Quantized(_) => 1,
        }
    }

    /// The short lower-case name used in reports (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            Dtype::F8E4M3 => "f8_e4m3",
            Dtype::Quantized(name) => name,
        }
    }

    fn parse(tag: &str) -> Option<Dtype> {
        match tag {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            "F8_E4M3" => Some(Dtype::F8E4M3),
            _ => None,
        }
    }
}

/// Byte size of a safetensors dtype tag, for header validation.
fn tag_size(tag: &str) -> Option<usize> {
    Some(match tag {
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" | "F8_E8M0" => 1,
        _ => return None,
    })
}

/// The bytes behind a shard: a read-only file mapping, bytes embedded in the
/// binary, or a copy held in memory.
enum Storage {
    Mmap(memmap2::Mmap),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Static(b) => b,
            Storage::Owned(b) => b,
        }
    }
}

#[derive(Debug, Clone)]
struct TensorEntry {
    tag: String,
    shape: Vec<usize>,
    /// Absolute byte range inside the file.
    start: usize,
    end: usize,
}

/// One safetensors file.
struct Shard {
    path: PathBuf,
    storage: Storage,
    tensors: HashMap<String, TensorEntry>,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a checkpoint modified while we read it
        // is outside what this tool can defend against (as for every mmap reader).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Shard::parse(path.to_path_buf(), Storage::Mmap(mmap))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Shard> {
        let bad = |reason: String| Error::Safetensors {
            path: path.clone(),
            reason,
        };
        let bytes = storage.bytes();
        if bytes.len() < 8 {
            return Err(bad(format!(
                "truncated safetensors file: {} bytes, too short for the 8-byte header length",
                bytes.len()
            )));
        }
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&bytes[..8]);
        let header_len = u64::from_le_bytes(len8);
        let available = (bytes.len() - 8) as u64;
        if header_len > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "corrupt safetensors file: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"
            )));
        }
        if header_len > available {
            return Err(bad(format!(
                "truncated or corrupt safetensors file: header claims {header_len} bytes, file has {available} after the length prefix"
            )));
        }
        // header_len <= available < bytes.len(), so this neither overflows nor passes the end.
        let header_end = 8 + header_len as usize;
        let header: Header = serde_json::from_slice(&bytes[8..header_end])
            .map_err(|e| bad(format!("safetensors header is not valid JSON: {e}")))?;
        let data_len = (bytes.len() - header_end) as u64;
        let mut tensors = HashMap::with_capacity(header.0.len());
        for (name, value) in header.0 {
            if name == "__metadata__" {
                continue;
            }
            let entry: RawEntry = serde_json::from_value(value)
                .map_err(|e| bad(format!("header entry of tensor `{name}` is malformed: {e}")))?;
            let [start, end] = entry.data_offsets;
            if start > end {
                return Err(bad(format!(
                    "tensor `{name}` has data offsets {start}..{end} (start after end)"
                )));
            }
            if end > data_len {
                return Err(Error::Truncated {
                    path: path.clone(),
                    tensor: name,
                    start,
                    end,
                    available: data_len,
                });
            }
            let numel = entry
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            if let Some(size) = tag_size(&entry.dtype) {
                let need = numel.and_then(|n| n.checked_mul(size as u64));
                if need != Some(end - start) {
                    let need = need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
                    return Err(bad(format!(
                        "tensor `{name}`: shape {:?} of {} needs {need} bytes but its data offsets span {}",
                        entry.shape,
                        entry.dtype,
                        end - start
                    )));
                }
            } else if numel.is_none_or(|n| n > (end - start).saturating_mul(8)) {
                // Other dtype tags (e.g. 4-bit ones) take at least one bit per element.
                return Err(bad(format!(
                    "tensor `{name}`: shape {:?} has more elements than its data offsets span bits ({} bytes)",
                    entry.shape,
                    end - start
                )));
            }
            // end <= data_len, so both fit in usize and in the file.
            tensors.insert(
                name,
                TensorEntry {
                    tag: entry.dtype,
                    shape: entry.shape,
                    start: header_end + start as usize,
                    end: header_end + end as usize,
                },
            );
        }
        check_disjoint(&path, &tensors)?;
        Ok(Shard {
            path,
            storage,
            tensors,
        })
    }
}

/// The largest header accepted (as the `safetensors` crate: 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Rejects tensors whose data ranges overlap (or coincide): each byte of the
/// data section belongs to at most one tensor. Empty tensors own no bytes.
fn check_disjoint(path: &Path, tensors: &HashMap<String, TensorEntry>) -> Result<()> {
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|(_, t)| t.end > t.start)
        .map(|(n, t)| (t.start, t.end, n.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((s0, e0, a), (s1, e1, b)) = (pair[0], pair[1]);
        if s1 < e0 {
            let what = if (s0, e0) == (s1, e1) {
                "the same data range"
            } else {
                "overlapping data ranges"
            };
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                reason: format!(
                    "tensors `{a}` (bytes {s0}..{e0}) and `{b}` (bytes {s1}..{e1}) have {what}; \
                     each tensor needs its own bytes"
                ),
            });
        }
    }
    Ok(())
}

/// A header's entries in file order, with duplicate names rejected (a JSON
/// object may repeat a key; a map would silently keep the last).
struct Header(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Header, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor `{k}` appears twice"
                        )));
                    }
                    out.push((k, v));
                }
                Ok(Header(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(serde::Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

/// Side of the square blocks that FP8 `weight_scale_inv` scales cover.
pub const FP8_BLOCK: usize = 128;

/// Decodes an FP8 e4m3fn byte (1 sign, 4 exponent bits with bias 7, 3
/// mantissa bits; no infinities; `S.1111.111` is NaN).
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Per-block f32 scales of an FP8 matrix (`[ceil(rows/128), ceil(cols/128)]`).
#[derive(Clone, Copy)]
pub(crate) struct BlockScale<'a> {
    bytes: &'a [u8],
    block_cols: usize,
}

/// The most dimensions a [`Shape`] holds (safetensors checkpoints of the
/// supported families use at most 3).
pub const MAX_DIMS: usize = 8;

/// A tensor shape held inline, so that a view of a part of a tensor (one
/// expert of a fused `[E, 2I, H]` tensor) carries its own shape. Reads as a
/// `&[usize]` through `Deref`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_DIMS],
    len: u8,
}

impl Shape {
    /// A shape of these dimensions; `None` beyond [`MAX_DIMS`].
    pub fn new(dims: &[usize]) -> Option<Shape> {
        if dims.len() > MAX_DIMS {
            return None;
        }
        let mut d = [0; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        Some(Shape {
            dims: d,
            len: dims.len() as u8,
        })
    }
}

impl std::ops::Deref for Shape {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.dims[..self.len as usize]
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq<[usize]> for Shape {
    fn eq(&self, other: &[usize]) -> bool {
        **self == *other
    }
}

impl<const N: usize> PartialEq<[usize; N]> for Shape {
    fn eq(&self, other: &[usize; N]) -> bool {
        **self == other[..]
    }
}

impl<const N: usize> PartialEq<&[usize; N]> for Shape {
    fn eq(&self, other: &&[usize; N]) -> bool {
        **self == other[..]
    }
}

/// How a view's bytes turn into values beyond their dtype: as stored, or
/// scaled per block (DeepSeek FP8). Quantised encodings add variants here;
/// [`TensorView::read_f32`] is the one place that decodes them.
#[derive(Clone, Copy)]
pub(crate) enum Codec<'a> {
    /// Each element is its dtype's value.
    Plain,
    /// FP8 with `weight_scale_inv` block scales.
    Fp8Block(BlockScale<'a>),
    /// A quantised encoding (packed integers, scaled FP8, GGUF blocks, ...).
    Quant(crate::model::quant::Decoder<'a>),
}

/// A borrowed tensor (or a contiguous part of one): dtype, shape and raw
/// little-endian bytes, decoded on read.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    /// Checkpoint name of the tensor (for error messages only; analyses never match on it).
    pub name: &'a str,
    /// The file that holds it.
    pub path: &'a Path,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Shape,
    bytes: &'a [u8],
    codec: Codec<'a>,
    /// For a strided 2-D view (one expert of an input-major fused tensor):
    /// element `(r, c)` is element `r * strides[0] + c * strides[1]` of `bytes`.
    strides: Option<[usize; 2]>,
}

impl std::fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Raw bytes of the tensor. For a strided view, the span from its first
    /// to its last element (which holds other elements too).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Whether the elements lie in row-major order, one after the other.
    pub fn is_contiguous(&self) -> bool {
        self.strides.is_none()
    }

    /// A strided 2-D `[rows, cols]` view of elements of this (contiguous)
    /// tensor: element `(r, c)` is element `first + r * row_stride + c *
    /// col_stride` of the tensor. This is how one expert is read out of an
    /// input-major fused tensor (gpt-oss's interleaved `[E, H, 2I]`, Llama 4's
    /// `[E, H, 2I]`) as `[I, H]`, without copying. Fails (naming the tensor)
    /// when an element lies outside the tensor or the encoding is block-scaled.
    pub fn strided(
        &self,
        first: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<TensorView<'a>> {
        let bad = |reason: String| Error::Safetensors {
            path: self.path.to_path_buf(),
            reason: format!("tensor `{}` {:?}: {reason}", self.name, self.shape),
        };
        if !matches!(self.codec, Codec::Plain) || self.strides.is_some() {
            return Err(bad(
                "a strided view needs a contiguous tensor stored as plain values".to_string(),
            ));
        }
        let shape = Shape::new(&[rows, cols]).expect("2 dimensions");
        if rows == 0 || cols == 0 {
            return Ok(TensorView {
                shape,
                bytes: &[],
                strides: None,
                ..*self
            });
        }
        let last = (rows - 1)
            .checked_mul(row_stride)
            .and_then(|a| Some((a, (cols - 1).checked_mul(col_stride)?)))
            .and_then(|(a, b)| a.checked_add(b)?.checked_add(first))
            .filter(|&last| last < self.numel())
            .ok_or_else(|| {
                bad(format!(
                    "a [{rows}, {cols}] view at element {first} with strides ({row_stride}, {col_stride}) lies outside the tensor"
                ))
            })?;
        let size = self.dtype.size();
        Ok(TensorView {
            shape,
            bytes: &self.bytes[first * size..(last + 1) * size],
            strides: Some([row_stride, col_stride]),
            ..*self
        })
    }

    /// Element `k` of `bytes` (plain codec) as f32.
    fn element(&self, k: usize) -> f32 {
        let b = &self.bytes;
        match self.dtype {
            Dtype::F32 => f32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]),
            Dtype::BF16 => {
                f32::from_bits((u16::from_le_bytes([b[2 * k], b[2 * k + 1]]) as u32) << 16)
            }
            Dtype::F16 => {
                half::f16::from_bits(u16::from_le_bytes([b[2 * k], b[2 * k + 1]])).to_f32()
            }
            Dtype::F8E4M3 => fp8_table()[b[k] as usize],
            // `strided` refuses quantised views, so this is never reached;
            // NaN would be caught by every finiteness check downstream.
            Dtype::Quantized(_) => f32::NAN,
        }
    }

    /// A contiguous part of this tensor: the `shape.iter().product()`
    /// elements from element `first` on (row-major), viewed with `shape`,
    /// without copying. This is how one expert is read out of a fused
    /// `[E, 2I, H]` tensor. Fails (naming the tensor) when the part does not
    /// lie inside the tensor, or when the encoding ties elements to their
    /// position in the whole tensor (block-scaled FP8).
    pub fn part(&self, first: usize, shape: &[usize]) -> Result<TensorView<'a>> {
        let bad = |reason: String| Error::Safetensors {
            path: self.path.to_path_buf(),
            reason: format!("tensor `{}` {:?}: {reason}", self.name, self.shape),
        };
        let shape_inline = Shape::new(shape)
            .ok_or_else(|| bad(format!("part shape {shape:?} has too many dimensions")))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("part shape {shape:?} overflows")))?;
        let end = first
            .checked_add(numel)
            .filter(|&end| end <= self.numel())
            .ok_or_else(|| {
                bad(format!(
                    "part of shape {shape:?} at element {first} lies outside the tensor"
                ))
            })?;
        if !matches!(self.codec, Codec::Plain) {
            return Err(bad(
                "a part of a block-scaled tensor cannot be read on its own".to_string(),
            ));
        }
        if self.strides.is_some() {
            return Err(bad("a part of a strided view is not supported".to_string()));
        }
        let size = self.dtype.size();
        Ok(TensorView {
            shape: shape_inline,
            bytes: &self.bytes[first * size..end * size],
            ..*self
        })
    }

    /// Slab `index` along the first axis (`[E, a, b]` → `[a, b]`), without copying.
    pub fn slab(&self, index: usize) -> Result<TensorView<'a>> {
        let inner: &[usize] = self.shape.get(1..).unwrap_or(&[]);
        let per: usize = inner.iter().product();
        let first = index.checked_mul(per).ok_or_else(|| Error::Safetensors {
            path: self.path.to_path_buf(),
            reason: format!("tensor `{}`: slab {index} overflows", self.name),
        })?;
        if self.shape.is_empty() || index >= self.shape[0] {
            return Err(Error::Safetensors {
                path: self.path.to_path_buf(),
                reason: format!(
                    "tensor `{}` {:?} has no slab {index} along its first axis",
                    self.name, self.shape
                ),
            });
        }
        self.part(first, inner)
    }

    /// A view decoded by a quantisation [`Codec::Quant`] decoder.
    pub(crate) fn decoded(
        name: &'a str,
        path: &'a Path,
        dtype: Dtype,
        shape: Shape,
        bytes: &'a [u8],
        decoder: crate::model::quant::Decoder<'a>,
    ) -> TensorView<'a> {
        TensorView {
            name,
            path,
            dtype,
            shape,
            bytes,
            codec: Codec::Quant(decoder),
            strides: None,
        }
    }

    /// Converts elements `start..start + out.len()` (row-major) to f32.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        if let Codec::Quant(d) = self.codec {
            // Quantised views are never strided (`strided` refuses them).
            let cols = self.shape.last().copied().unwrap_or(1);
            d.read(self.bytes, cols, start, out);
            return;
        }
        if let Some([rs, cs]) = self.strides {
            let cols = self.shape[1];
            for (k, o) in out.iter_mut().enumerate() {
                let idx = start + k;
                *o = self.element((idx / cols) * rs + (idx % cols) * cs);
            }
            return;
        }
        let size = self.dtype.size();
        let src = &self.bytes[start * size..(start + out.len()) * size];
        match self.dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::BF16 => {
                // The words in place when the bytes are 2-byte aligned.
                let words = bytemuck::try_cast_slice::<u8, u16>(src).ok();
                if let Some(words) = words.filter(|_| cfg!(target_endian = "little")) {
                    for (o, &b) in out.iter_mut().zip(words) {
                        *o = f32::from_bits((b as u32) << 16);
                    }
                } else {
                    for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                        *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                    }
                }
            }
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            // Quantised dtypes are only built with a `Codec::Quant` (handled above).
            Dtype::Quantized(_) => out.fill(f32::NAN),
            Dtype::F8E4M3 => {
                let table = fp8_table();
                match self.codec {
                    Codec::Plain | Codec::Quant(_) => {
                        for (o, &b) in out.iter_mut().zip(src) {
                            *o = table[b as usize];
                        }
                    }
                    Codec::Fp8Block(sc) => {
                        let cols = self.shape.last().copied().unwrap_or(1).max(1);
                        for (k, (o, &b)) in out.iter_mut().zip(src).enumerate() {
                            let idx = start + k;
                            let (r, c) = (idx / cols, idx % cols);
                            let at = ((r / FP8_BLOCK) * sc.block_cols + c / FP8_BLOCK) * 4;
                            let s = f32::from_le_bytes([
                                sc.bytes[at],
                                sc.bytes[at + 1],
                                sc.bytes[at + 2],
                                sc.bytes[at + 3],
                            ]);
                            *o = table[b as usize] * s;
                        }
                    }
                }
            }
        }
    }

    /// Elements `start..start + len` as bf16 bit patterns, without copying,
    /// when the tensor is bf16 and that part is 2-byte aligned in memory.
    pub fn bf16_words(&self, start: usize, len: usize) -> Option<&'a [u16]> {
        if self.dtype != Dtype::BF16 || cfg!(target_endian = "big") || self.strides.is_some() {
            return None;
        }
        let bytes = self.bytes.get(start * 2..(start + len) * 2)?;
        if bytes.is_empty() {
            // Trivially aligned (bytemuck would still check the pointer).
            return Some(&[]);
        }
        bytemuck::try_cast_slice(bytes).ok()
    }

    /// The whole tensor as f32, converted on all cores for large tensors.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        use rayon::prelude::*;
        const PAR_CHUNK: usize = 1 << 16;
        let mut out = vec![0f32; self.numel()];
        if out.len() <= PAR_CHUNK {
            self.read_f32(0, &mut out);
        } else {
            out.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(i, chunk)| self.read_f32(i * PAR_CHUNK, chunk));
        }
        out
    }

    /// Rows `ids` of a 2-D tensor (e.g. embeddings of token ids), as f32.
    pub fn gather_rows(&self, ids: &[u32]) -> Vec<f32> {
        let cols = self.shape.get(1).copied().unwrap_or(1);
        let mut out = vec![0f32; ids.len() * cols];
        for (row, &id) in out.chunks_mut(cols).zip(ids) {
            self.read_f32(id as usize * cols, row);
        }
        out
    }
}

/// All tensors of a checkpoint (one file, or an index and its shards).
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    location: HashMap<String, usize>,
    /// Logical tensors of quantised modules (`….weight`), assembled from
    /// their stored parts on read (see [`crate::model::quant`]).
    virtuals: HashMap<String, crate::model::quant::Virtual>,
}

impl Weights {
    /// Opens `model.safetensors` or `model.safetensors.index.json` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Weights> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            Weights::open_index(dir, &index_path)
        } else if single.exists() {
            let shard = Shard::open(&single)?;
            let location = shard.tensors.keys().map(|k| (k.clone(), 0)).collect();
            Ok(Weights {
                dir: dir.to_path_buf(),
                shards: vec![shard],
                location,
                virtuals: HashMap::new(),
            })
        } else {
            Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Weights> {
        let size = std::fs::metadata(index_path)
            .map_err(|e| Error::io(index_path, e))?
            .len();
        if size > MAX_HEADER_BYTES {
            return Err(Error::Safetensors {
                path: index_path.to_path_buf(),
                reason: format!(
                    "safetensors index of {size} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes"
                ),
            });
        }
        let text = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: RawIndex = serde_json::from_slice(&text).map_err(|e| Error::Safetensors {
            path: index_path.to_path_buf(),
            reason: format!("malformed safetensors index: {e}"),
        })?;
        let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
        for file in index.weight_map.values() {
            let next = shard_ids.len();
            shard_ids.entry(file.clone()).or_insert(next);
        }
        let mut ordered: Vec<(&String, &usize)> = shard_ids.iter().collect();
        ordered.sort_by_key(|(_, id)| **id);
        let mut shards = Vec::with_capacity(ordered.len());
        for (file, _) in ordered {
            if !is_plain_file_name(file) {
                return Err(Error::Safetensors {
                    path: index_path.to_path_buf(),
                    reason: format!(
                        "shard name `{file}` is not a file name inside the model directory"
                    ),
                });
            }
            shards.push(Shard::open(&dir.join(file))?);
        }
        let mut location = HashMap::with_capacity(index.weight_map.len());
        for (tensor, file) in &index.weight_map {
            let id = shard_ids[file];
            if !shards[id].tensors.contains_key(tensor) {
                return Err(Error::Safetensors {
                    path: index_path.to_path_buf(),
                    reason: format!("index places tensor `{tensor}` in `{file}`, but that shard does not contain it"),
                });
            }
            location.insert(tensor.clone(), id);
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            shards,
            location,
            virtuals: HashMap::new(),
        })
    }

    /// Opens one safetensors file (e.g. a trace or a reference file).
    pub fn open_file(path: &Path) -> Result<Weights> {
        let shard = Shard::open(path)?;
        let location = shard.tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Weights {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            shards: vec![shard],
            location,
            virtuals: HashMap::new(),
        })
    }

    /// A tensor of any dtype: its safetensors dtype tag (`I64`, `F32`...), shape and bytes.
    pub fn raw(&self, name: &str) -> Result<(&str, &[usize], &[u8])> {
        let (shard, entry) = self.entry(name)?;
        Ok((
            &entry.tag,
            &entry.shape,
            &shard.storage.bytes()[entry.start..entry.end],
        ))
    }

    /// Weights embedded in the binary (the demo model).
    pub fn from_static(label: &Path, bytes: &'static [u8]) -> Result<Weights> {
        let shard = Shard::parse(label.join("model.safetensors"), Storage::Static(bytes))?;
        let location = shard.tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Weights {
            dir: label.to_path_buf(),
            shards: vec![shard],
            location,
            virtuals: HashMap::new(),
        })
    }

    /// Weights parsed from a copy of `bytes` (tests and fuzzing); `label`
    /// names the checkpoint in errors, as for [`Weights::from_static`].
    pub fn from_bytes(label: &Path, bytes: &[u8]) -> Result<Weights> {
        let shard = Shard::parse(
            label.join("model.safetensors"),
            Storage::Owned(bytes.to_vec()),
        )?;
        let location = shard.tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Weights {
            dir: label.to_path_buf(),
            shards: vec![shard],
            location,
            virtuals: HashMap::new(),
        })
    }

    /// A file of another container format (GGUF) mapped in `mmap`, with its
    /// tensors given as (name, type tag, row-major shape, absolute byte
    /// range), each range already checked to lie inside the file.
    pub(crate) fn from_mapped(
        path: &Path,
        mmap: memmap2::Mmap,
        entries: Vec<(String, String, Vec<usize>, usize, usize)>,
    ) -> Result<Weights> {
        let tensors: HashMap<String, TensorEntry> = entries
            .into_iter()
            .map(|(name, tag, shape, start, end)| {
                (
                    name,
                    TensorEntry {
                        tag,
                        shape,
                        start,
                        end,
                    },
                )
            })
            .collect();
        check_disjoint(path, &tensors)?;
        let location = tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Weights {
            dir: path.to_path_buf(),
            shards: vec![Shard {
                path: path.to_path_buf(),
                storage: Storage::Mmap(mmap),
                tensors,
            }],
            location,
            virtuals: HashMap::new(),
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint has a tensor of this name (stored, or the
    /// logical weight of a quantised module).
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name) || self.virtuals.contains_key(name)
    }

    /// Registers the logical tensors of quantised modules.
    pub(crate) fn add_virtuals(&mut self, virtuals: HashMap<String, crate::model::quant::Virtual>) {
        self.virtuals.extend(virtuals);
    }

    /// The file that holds a stored tensor (the model directory if unknown).
    pub(crate) fn file_of(&self, name: &str) -> &Path {
        match self.location.get(name) {
            Some(&id) => &self.shards[id].path,
            None => &self.dir,
        }
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.location.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    fn entry(&self, name: &str) -> Result<(&Shard, &TensorEntry)> {
        let id = *self
            .location
            .get(name)
            .ok_or_else(|| Error::TensorMissing {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let shard = &self.shards[id];
        Ok((shard, &shard.tensors[name]))
    }

    /// Shape of a tensor, without touching its data.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        if let Some(v) = self.virtuals.get(name) {
            return Ok(&v.shape);
        }
        Ok(&self.entry(name)?.1.shape)
    }

    /// A readable view of a tensor; fails on dtypes the analyses cannot read.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        if let Some((key, v)) = self.virtuals.get_key_value(name) {
            return crate::model::quant::view(self, key, v);
        }
        let (shard, entry) = self.entry(name)?;
        let dtype = Dtype::parse(&entry.tag).ok_or_else(|| Error::UnsupportedDtype {
            path: shard.path.clone(),
            tensor: name.to_string(),
            dtype: entry.tag.clone(),
        })?;
        let (key, _) = shard
            .tensors
            .get_key_value(name)
            .expect("entry() found the name");
        let codec = match dtype {
            Dtype::F8E4M3 => self
                .block_scale(name, &entry.shape)?
                .map_or(Codec::Plain, Codec::Fp8Block),
            _ => Codec::Plain,
        };
        let shape = Shape::new(&entry.shape).ok_or_else(|| Error::Safetensors {
            path: shard.path.clone(),
            reason: format!(
                "tensor `{name}` has {} dimensions; at most {MAX_DIMS} are supported",
                entry.shape.len()
            ),
        })?;
        Ok(TensorView {
            name: key,
            path: &shard.path,
            dtype,
            shape,
            bytes: &shard.storage.bytes()[entry.start..entry.end],
            codec,
            strides: None,
        })
    }

    /// The `<name>_scale_inv` block scales of an FP8 matrix, checked against its shape.
    fn block_scale(&self, name: &str, shape: &[usize]) -> Result<Option<BlockScale<'_>>> {
        let scale_name = format!("{name}_scale_inv");
        if !self.contains(&scale_name) {
            return Ok(None);
        }
        let (shard, entry) = self.entry(&scale_name)?;
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            _ => (shape.iter().product(), 1),
        };
        let want = [rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)];
        if entry.tag != "F32" || entry.shape != want {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                reason: format!(
                    "`{scale_name}` should be F32 {want:?} (one scale per {FP8_BLOCK}×{FP8_BLOCK} block of {shape:?}), found {} {:?}",
                    entry.tag, entry.shape
                ),
            });
        }
        Ok(Some(BlockScale {
            bytes: &shard.storage.bytes()[entry.start..entry.end],
            block_cols: want[1],
        }))
    }

    /// Checks a tensor's shape against what the config implies.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        if let Some(v) = self.virtuals.get(name) {
            if v.shape != expected {
                return Err(Error::ShapeMismatch {
                    path: self.file_of(&v.main).to_path_buf(),
                    tensor: name.to_string(),
                    expected: expected.to_vec(),
                    found: v.shape.clone(),
                });
            }
            return Ok(());
        }
        let (shard, entry) = self.entry(name)?;
        if entry.shape != expected {
            return Err(Error::ShapeMismatch {
                path: shard.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(())
    }

    /// Drops the pages of these tensors (and of FP8 scales) from this process's resident set
    /// (they are re-read from disk if touched again). No-op for embedded bytes.
    pub fn release<'n>(&self, names: impl IntoIterator<Item = &'n str>) {
        // A quantised module's logical tensor stands for its stored parts.
        let stored = names
            .into_iter()
            .flat_map(|name| match self.virtuals.get(name) {
                Some(v) => v.parts.iter().map(String::as_str).collect::<Vec<_>>(),
                None => vec![name],
            });
        for name in stored {
            let Ok((shard, entry)) = self.entry(name) else {
                continue;
            };
            if let Storage::Mmap(m) = &shard.storage {
                let page = page_size();
                // Only whole pages inside the tensor, so neighbours stay mapped.
                let start = entry.start.div_ceil(page) * page;
                let end = entry.end / page * page;
                if end > start {
                    // SAFETY: the mapping is a read-only, file-backed, shared mapping;
                    // MADV_DONTNEED only drops cached pages, which the kernel
                    // re-reads from the file on the next access. No references into
                    // this range outlive the layer whose analysis just finished.
                    let _ = unsafe {
                        m.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            start,
                            end - start,
                        )
                    };
                }
            }
        }
    }
}

/// Whether an index's shard name is one plain file name in the model
/// directory: not empty, `.` or `..`, no separator (`/` or `\\`), not absolute.
/// Names that merely contain `..` (`model..00001-of-00002.safetensors`) are fine.
fn is_plain_file_name(name: &str) -> bool {
    use std::path::Component;
    let mut parts = Path::new(name).components();
    !name.contains(['/', '\\', '\0'])
        && matches!(parts.next(), Some(Component::Normal(_)))
        && parts.next().is_none()
}

fn fp8_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| fp8_e4m3_to_f32(b as u8)))
}

/// The OS page size (4096 if it cannot be read).
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a system constant; it has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::writer::{write, TensorSpec};

    /// A safetensors file of `header` (JSON) followed by `data` zero bytes.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data, 0);
        b
    }

    fn parse_err(bytes: &[u8]) -> String {
        match Weights::from_bytes(Path::new("m"), bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn overlapping_and_duplicate_ranges_are_rejected() {
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},
                    "e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},
                    "__metadata__":{"format":"pt"}}"#;
        assert!(Weights::from_bytes(Path::new("m"), &file(ok, 16)).is_ok());
        let same = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                      "b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = parse_err(&file(same, 8));
        assert!(
            e.contains("m/model.safetensors") && e.contains("`a`") && e.contains("`b`"),
            "{e}"
        );
        assert!(e.contains("same data range"), "{e}");
        let overlap = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},
                         "b":{"dtype":"F16","shape":[4],"data_offsets":[4,12]}}"#;
        let e = parse_err(&file(overlap, 12));
        assert!(
            e.contains("overlapping") && e.contains("`a`") && e.contains("`b`"),
            "{e}"
        );
        let twice = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                       "a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let e = parse_err(&file(twice, 8));
        assert!(e.contains("`a` appears twice"), "{e}");
    }

    #[test]
    fn sizes_are_checked_without_overflow() {
        // 2^32 · 2^32 elements wraps u64 to 0, which would match an empty range.
        let wrap = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        let e = parse_err(&file(wrap, 0));
        assert!(e.contains("`a`") && e.contains("more than 2^64"), "{e}");
        let wrap_unknown =
            r#"{"a":{"dtype":"F4","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}}"#;
        assert!(parse_err(&file(wrap_unknown, 0)).contains("`a`"));
        let big_offsets = format!(
            r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[{},{}]}}}}"#,
            u64::MAX - 1,
            u64::MAX
        );
        assert!(parse_err(&file(&big_offsets, 4)).contains("truncated"));
        let mismatch = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(parse_err(&file(mismatch, 8)).contains("needs 12 bytes"));
        // A header length beyond the limit, in a file that is (nearly) empty.
        let mut huge = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(parse_err(&huge).contains("exceeds the limit"));
        let mut max = u64::MAX.to_le_bytes().to_vec();
        max.extend_from_slice(b"{}");
        assert!(parse_err(&max).contains("exceeds the limit"));
        assert!(parse_err(&[1, 2, 3]).contains("too short"));
        assert!(parse_err(&file("[1]", 0)).contains("not valid JSON"));
    }

    #[test]
    fn shard_names_are_checked_by_component() {
        for ok in [
            "model..00001-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "..model",
            "a..b",
        ] {
            assert!(is_plain_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "../../etc/passwd",
            "/abs.safetensors",
            "a/b",
            "a\\b",
            "..\\x",
            "./x",
            "x/",
            "x\0y",
        ] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn fp8_e4m3fn_decoding() {
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(fp8_e4m3_to_f32(0x3c), 1.5);
        assert!(fp8_e4m3_to_f32(0x7f).is_nan() && fp8_e4m3_to_f32(0xff).is_nan());
        assert_eq!(fp8_e4m3_to_f32(0x78), 256.0); // exponent 15 is finite in e4m3fn
    }

    #[test]
    fn parts_and_slabs_view_a_fused_tensor_in_place() {
        // [E=3, 2I=4, H=2]: expert e's rows r hold 100e + 10r + c.
        let vals: Vec<f32> = (0..3)
            .flat_map(|e| {
                (0..4).flat_map(move |r| (0..2).map(move |c| (100 * e + 10 * r + c) as f32))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write(
            &path,
            &[(
                TensorSpec::new("experts.gate_up_proj", "F32", &[3, 4, 2]),
                crate::model::writer::f32_bytes(&vals),
            )],
        )
        .unwrap();
        let w = Weights::open_file(&path).unwrap();
        let t = w.tensor("experts.gate_up_proj").unwrap();
        let slab = t.slab(2).unwrap();
        assert_eq!(slab.shape, [4, 2]);
        assert_eq!(slab.to_f32_vec(), vals[16..24].to_vec());
        // The "up" half of expert 1: rows 2..4.
        let up = t.part(8 + 4, &[2, 2]).unwrap();
        assert_eq!(up.to_f32_vec(), vec![120.0, 121.0, 130.0, 131.0]);
        for e in [
            t.slab(3).unwrap_err(),
            t.part(21, &[2, 2]).unwrap_err(),
            t.part(usize::MAX, &[2]).unwrap_err(),
            t.part(0, &[usize::MAX, 2]).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains("experts.gate_up_proj") && e.contains("t.safetensors"),
                "{e}"
            );
        }
    }

    #[test]
    fn fp8_blocks_are_scaled_by_their_own_scale() {
        // 200 × 300: 2 × 3 blocks of 128 (edge blocks partial), each with its own scale.
        let (rows, cols) = (200usize, 300usize);
        let q: Vec<u8> = (0..rows * cols)
            .map(|i| [0x38u8, 0x3c, 0xb8][i % 3])
            .collect();
        let scales: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write(
            &path,
            &[
                (
                    TensorSpec::new("w.weight", "F8_E4M3", &[rows, cols]),
                    q.clone(),
                ),
                (
                    TensorSpec::new("w.weight_scale_inv", "F32", &[2, 3]),
                    crate::model::writer::f32_bytes(&scales),
                ),
                (
                    TensorSpec::new("bad.weight", "F8_E4M3", &[rows, cols]),
                    q.clone(),
                ),
                (
                    TensorSpec::new("bad.weight_scale_inv", "F32", &[1, 3]),
                    crate::model::writer::f32_bytes(&scales[..3]),
                ),
            ],
        )
        .unwrap();
        let w = Weights::open_file(&path).unwrap();
        let t = w.tensor("w.weight").unwrap();
        assert_eq!(t.dtype, Dtype::F8E4M3);
        let e = t.part(0, &[1, cols]).unwrap_err().to_string();
        assert!(e.contains("block-scaled") && e.contains("w.weight"), "{e}");
        let got = t.to_f32_vec();
        for r in [0, 127, 128, 199] {
            for c in [0, 127, 128, 255, 256, 299] {
                let i = r * cols + c;
                let want = fp8_e4m3_to_f32(q[i]) * scales[(r / 128) * 3 + c / 128];
                assert_eq!(got[i], want, "({r}, {c})");
            }
        }
        // A chunked read from the middle agrees with the whole read.
        let mut part = vec![0f32; 1000];
        t.read_f32(40_000, &mut part);
        assert_eq!(part, got[40_000..41_000]);
        let e = w.tensor("bad.weight").unwrap_err().to_string();
        assert!(
            e.contains("bad.weight_scale_inv") && e.contains("[2, 3]"),
            "{e}"
        );
    }
}
