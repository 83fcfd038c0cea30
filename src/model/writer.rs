//! Writing safetensors files, tensor by tensor: used for synthetic checkpoints
//! (benchmarks, memory measurements) and for tests that build broken inputs.
//! The data of each tensor is produced on demand, so a multi-GB file is
//! written with bounded memory.

use std::io::Write;
use std::path::Path;

use crate::error::Result;

/// Name, dtype tag (`F32`, `BF16`, ...) and shape of a tensor to write.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Safetensors dtype name (`F32`, `BF16`...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A tensor header entry.
    pub fn new(name: impl Into<String>, dtype: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: dtype.to_string(),
            shape: shape.to_vec(),
        }
    }

    fn elem_size(&self) -> usize {
        match self.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        }
    }

    /// Size of the tensor's data in bytes.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.elem_size()
    }
}

/// Writes a safetensors file, atomically ([`crate::atomic_write`]: a temp
/// file in the target's folder, renamed over it once complete). `fill(i, out)`
/// must write exactly `specs[i].nbytes()` bytes of little-endian data for
/// tensor `i`.
pub fn write_streaming(
    path: &Path,
    specs: &[TensorSpec],
    mut fill: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.nbytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    crate::atomic_write::write_atomic_with(path, |out| {
        out.write_all(&(text.len() as u64).to_le_bytes())?;
        out.write_all(&text)?;
        for i in 0..specs.len() {
            fill(i, out)?;
        }
        Ok(())
    })
}

/// Writes a safetensors file from tensors held in memory.
pub fn write(path: &Path, tensors: &[(TensorSpec, Vec<u8>)]) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    write_streaming(path, &specs, |i, out| out.write_all(&tensors[i].1))
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
