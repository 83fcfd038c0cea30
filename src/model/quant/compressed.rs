//! compressed-tensors checkpoints (llm-compressor, vLLM): the
//! `quantization_config` of config.json (`config_groups`, `ignore`, `format`)
//! and the stored parts of each quantised module:
//!
//! - `float-quantized`: `weight` FP8 e4m3 and `weight_scale` (per tensor
//!   `[1]`, per channel `[N, 1]`, per group `[N, K/g]` or per block);
//!   value = `q · s`;
//! - `pack-quantized`: `weight_packed` int32 `[N, ceil(K·b/32)]` (value `i`
//!   of a row at bit `i·b`, stored plus `2^(b−1)`), `weight_shape`,
//!   `weight_scale`, and for asymmetric group/channel schemes
//!   `weight_zero_point` packed along dim 0; value = `(q − z) · s`;
//! - `naive-quantized` / `int-quantized`: `weight` int8 with `weight_scale`
//!   (and `weight_zero_point` int8, same shape as the scale);
//! - `nvfp4-pack-quantized`: `weight_packed` uint8 `[N, K/2]` (two FP4 e2m1
//!   values per byte, the even column in the low nibble), `weight_scale`
//!   FP8 e4m3 `[N, K/16]`, `weight_global_scale` f32 `[1]`;
//!   value = `fp4 · (s / global)`;
//! - `mxfp4-pack-quantized`: `weight_packed` as NVFP4, `weight_scale` uint8
//!   e8m0 exponents `[N, K/32]`; value = `fp4 · 2^(s − 127)`.
//!
//! Activation ordering (`actorder: "group"`, as GPTQ's `desc_act`) stores
//! `weight_g_idx` int32 `[K]`: column `k` takes the scale and zero point of
//! group `g_idx[k]` (vLLM's reading). `actorder: "weight"` only reorders the
//! calibration and stores nothing.
//!
//! Values are computed in f32: `(q − z)` is exact, then one rounding of the
//! product, as compressed-tensors' `dequantize` does with f32 scales.

use std::collections::HashMap;

use regex::Regex;
use serde_json::Value;

use super::{bad, float_dtype, GridSpec, Spec, Virtual};
use crate::error::{Error, Result};
use crate::model::config::Config;
use crate::model::safetensors::{Dtype, Weights};

/// One `config_groups` entry: which modules, and how their weights are quantised.
#[derive(Debug)]
struct Group {
    name: String,
    targets: Vec<Target>,
    format: Option<String>,
    num_bits: u32,
    float: bool,
    strategy: String,
    group_size: Option<usize>,
    block: Option<[usize; 2]>,
    symmetric: bool,
    /// `actorder: "group"` (or `true`, `"dynamic"`): `weight_g_idx` is stored.
    g_idx: bool,
}

/// A `targets`/`ignore` entry: a module name, `re:<regex>` (matched from the
/// start of the name, as Python's `re.match`), or the class `Linear`.
#[derive(Debug)]
enum Target {
    Name(String),
    Re(Regex),
    Linear,
}

impl Target {
    fn parse(config: &Config, key: &str, s: &str) -> Result<Target> {
        if let Some(re) = s.strip_prefix("re:") {
            let re = Regex::new(&format!("^(?:{re})")).map_err(|e| {
                Error::key(
                    config.path(),
                    key,
                    format!("`{s}` is not a valid regex: {e}"),
                )
            })?;
            Ok(Target::Re(re))
        } else if s == "Linear" {
            Ok(Target::Linear)
        } else {
            Ok(Target::Name(s.to_string()))
        }
    }

    /// Whether it names module `m` (every quantised module is a Linear).
    fn matches(&self, m: &str) -> bool {
        match self {
            Target::Name(n) => n == m,
            Target::Re(re) => re.is_match(m),
            Target::Linear => true,
        }
    }
}

const FORMATS: &str = "pack-quantized, float-quantized, naive-quantized, int-quantized, \
     nvfp4-pack-quantized, mxfp4-pack-quantized, dense, mixed-precision";

fn targets(config: &Config, key: &str, v: Option<&Value>) -> Result<Vec<Target>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| Error::key(config.path(), key, "must be a list of strings"))
                    .and_then(|s| Target::parse(config, key, s))
            })
            .collect(),
        Some(_) => Err(Error::key(config.path(), key, "must be a list of strings")),
    }
}

fn parse_groups(config: &Config, q: &Value) -> Result<Vec<Group>> {
    let path = config.path();
    let top_format = q.get("format").and_then(Value::as_str).map(str::to_string);
    let Some(groups) = q.get("config_groups").and_then(Value::as_object) else {
        return Err(Error::key(
            path,
            "quantization_config.config_groups",
            "missing, or not an object",
        ));
    };
    let mut out = Vec::new();
    for (name, g) in groups {
        let key = |k: &str| format!("quantization_config.config_groups.{name}.{k}");
        let Some(w) = g.get("weights").filter(|w| !w.is_null()) else {
            continue; // activation-only groups leave the weights as they are
        };
        let num_bits = w
            .get("num_bits")
            .and_then(Value::as_u64)
            .filter(|b| (1..=8).contains(b))
            .ok_or_else(|| Error::key(path, &key("weights.num_bits"), "must be 1 to 8"))?
            as u32;
        let kind = w.get("type").and_then(Value::as_str).unwrap_or("int");
        let float = match kind {
            "int" => false,
            "float" => true,
            other => {
                return Err(Error::key(
                    path,
                    &key("weights.type"),
                    format!("is `{other}`, expected `int` or `float`"),
                ))
            }
        };
        let strategy = w
            .get("strategy")
            .and_then(Value::as_str)
            .unwrap_or("tensor")
            .to_string();
        let group_size = w
            .get("group_size")
            .and_then(Value::as_u64)
            .map(|g| g as usize);
        let block = match w.get("block_structure") {
            Some(Value::Array(b)) if b.len() == 2 => {
                let d = |i: usize| b[i].as_u64().filter(|&x| x > 0).map(|x| x as usize);
                match (d(0), d(1)) {
                    (Some(r), Some(c)) => Some([r, c]),
                    _ => {
                        return Err(Error::key(
                            path,
                            &key("weights.block_structure"),
                            "must be two positive integers",
                        ))
                    }
                }
            }
            _ => None,
        };
        let g_idx = match w.get("actorder") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(Value::String(a)) if a == "group" || a == "dynamic" => true,
            Some(Value::String(a)) if a == "weight" || a == "static" => false,
            Some(other) => {
                return Err(Error::key(
                    path,
                    &key("weights.actorder"),
                    format!("is {other}; expected `group`, `weight` or null"),
                ))
            }
        };
        out.push(Group {
            name: name.clone(),
            targets: targets(config, &key("targets"), g.get("targets"))?,
            format: g
                .get("format")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| top_format.clone()),
            num_bits,
            float,
            strategy,
            group_size,
            block,
            symmetric: w.get("symmetric").and_then(Value::as_bool).unwrap_or(true),
            g_idx,
        });
    }
    for g in &out {
        let f = g.format.as_deref().unwrap_or("dense");
        if !matches!(
            f,
            "pack-quantized"
                | "float-quantized"
                | "naive-quantized"
                | "int-quantized"
                | "nvfp4-pack-quantized"
                | "mxfp4-pack-quantized"
                | "dense"
                | "mixed-precision"
        ) {
            return Err(Error::key(
                path,
                "quantization_config.format",
                format!(
                    "is `{f}` (config group `{}`), which this tool cannot decode (supported: {FORMATS})",
                    g.name
                ),
            ));
        }
    }
    Ok(out)
}

/// The virtual `….weight` tensors of every quantised module of a
/// compressed-tensors checkpoint.
pub(crate) fn plan(
    weights: &Weights,
    config: &Config,
    q: &Value,
) -> Result<HashMap<String, Virtual>> {
    let groups = parse_groups(config, q)?;
    let ignore = targets(config, "quantization_config.ignore", q.get("ignore"))?;
    let mut out = HashMap::new();
    for name in weights.names() {
        // Candidate modules: a packed weight, or an FP8/int8 weight (with or without scale).
        let (module, packed) = if let Some(m) = name.strip_suffix(".weight_packed") {
            (m, true)
        } else if let Some(m) = name.strip_suffix(".weight") {
            let tag = weights.raw(name)?.0;
            if !matches!(tag, "F8_E4M3" | "I8") {
                continue;
            }
            (m, false)
        } else {
            continue;
        };
        let path = weights.file_of(name).to_path_buf();
        if ignore
            .iter()
            .any(|t| !matches!(t, Target::Linear) && t.matches(module))
        {
            // An ignored module is stored unquantised: a packed or scaled
            // one would otherwise be read without its scales.
            if packed || weights.contains(&format!("{module}.weight_scale")) {
                return Err(bad(
                    &path,
                    name,
                    "is quantised (packed, or with a weight_scale), but quantization_config.ignore lists its module",
                ));
            }
            continue;
        }
        let group = groups
            .iter()
            .find(|g| g.targets.iter().any(|t| t.matches(module)))
            .ok_or_else(|| {
                bad(
                    &path,
                    name,
                    format!("is quantised, but no quantization_config.config_groups entry targets module `{module}`"),
                )
            })?;
        let logical = format!("{module}.weight");
        let v = if packed && weights.raw(name)?.0 == "U8" {
            fp4_virtual(weights, &path, module, group)?
        } else if packed {
            packed_virtual(weights, &path, module, group)?
        } else {
            scaled_virtual(weights, &path, module, group)?
        };
        out.insert(logical, v);
    }
    Ok(out)
}

/// An error naming `name` when the checkpoint lacks it.
fn require(weights: &Weights, name: &str) -> Result<()> {
    if weights.contains(name) {
        Ok(())
    } else {
        Err(Error::TensorMissing {
            dir: weights.dir().to_path_buf(),
            tensor: name.to_string(),
        })
    }
}

/// The values of an I64 or I32 tensor (`weight_shape`), as u64; `None` for other dtypes.
fn int_values(tag: &str, bytes: &[u8]) -> Option<Vec<u64>> {
    match tag {
        "I64" => Some(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        "I32" => Some(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as u64)
                .collect(),
        ),
        _ => None,
    }
}

fn shape2(path: &std::path::Path, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [r, c] => Ok((*r, *c)),
        other => Err(bad(
            path,
            name,
            format!("has shape {other:?}; expected a matrix"),
        )),
    }
}

/// The scale grid of a `[rows, cols]` weight under `group`'s strategy, checked
/// against the stored `weight_scale`. Also returns the number of scale columns.
fn scale_grid(
    weights: &Weights,
    module: &str,
    group: &Group,
    rows: usize,
    cols: usize,
) -> Result<(GridSpec, usize)> {
    let name = format!("{module}.weight_scale");
    require(weights, &name)?;
    let path = weights.file_of(&name).to_path_buf();
    let (tag, shape, _) = weights.raw(&name)?;
    let dtype = float_dtype(&path, &name, tag)?;
    let numel: usize = shape.iter().product();
    let (rb, cb, want): (usize, usize, Vec<usize>) = match group.strategy.as_str() {
        "tensor" => (rows.max(1), cols.max(1), vec![1]),
        "channel" => (1, cols.max(1), vec![rows, 1]),
        "group" | "tensor_group" => {
            let g = group
                .group_size
                .filter(|&g| g > 0)
                .ok_or_else(|| bad(&path, &name, format!("config group `{}` has strategy `group` without a positive group_size", group.name)))?;
            (1, g, vec![rows, cols.div_ceil(g)])
        }
        "block" => {
            let [br, bc] = group.block.ok_or_else(|| {
                bad(&path, &name, format!("config group `{}` has strategy `block` without block_structure", group.name))
            })?;
            (br, bc, vec![rows.div_ceil(br), cols.div_ceil(bc)])
        }
        other => {
            return Err(bad(
                &path,
                &name,
                format!(
                    "config group `{}` has weight strategy `{other}`, which this tool cannot decode (supported: tensor, channel, group, block)",
                    group.name
                ),
            ))
        }
    };
    let ok = if want == [1] {
        numel == 1
    } else {
        shape == want.as_slice()
    };
    if !ok {
        return Err(bad(
            &path,
            &name,
            format!(
                "has shape {shape:?}; strategy `{}` of a [{rows}, {cols}] weight needs {want:?}",
                group.strategy
            ),
        ));
    }
    let grid_cols = if want == [1] { 1 } else { want[1] };
    Ok((
        GridSpec {
            name,
            dtype,
            row_block: rb,
            col_block: cb,
            row_stride: if want == [1] { 0 } else { grid_cols },
            col_stride: if want == [1] { 0 } else { 1 },
        },
        grid_cols,
    ))
}

fn scaled_virtual(
    weights: &Weights,
    path: &std::path::Path,
    module: &str,
    group: &Group,
) -> Result<Virtual> {
    let name = format!("{module}.weight");
    let (tag, shape, _) = weights.raw(&name)?;
    let int8 = tag == "I8";
    if int8 == group.float || group.num_bits != 8 {
        return Err(bad(
            path,
            &name,
            format!(
                "is {tag}, but config group `{}` quantises weights to {}{} bits",
                group.name,
                if group.float { "float " } else { "int " },
                group.num_bits
            ),
        ));
    }
    let (rows, cols) = shape2(path, &name, shape)?;
    let (scale, _) = scale_grid(weights, module, group, rows, cols)?;
    if int8 && !group.symmetric {
        return Err(bad(
            path,
            &name,
            "asymmetric int8 (`weight_zero_point`) is not supported for naive-quantized weights",
        ));
    }
    let parts = vec![name.clone(), scale.name.clone()];
    Ok(Virtual {
        shape: vec![rows, cols],
        dtype: if int8 {
            Dtype::Quantized("int8")
        } else {
            Dtype::F8E4M3
        },
        main: name,
        parts,
        spec: Spec::Scaled { int8, scale },
    })
}

/// `nvfp4-pack-quantized` / `mxfp4-pack-quantized`: FP4 e2m1 nibbles with
/// FP8 scales of 16 columns and a global scale, or e8m0 scales of 32 columns.
fn fp4_virtual(
    weights: &Weights,
    path: &std::path::Path,
    module: &str,
    group: &Group,
) -> Result<Virtual> {
    let name = format!("{module}.weight_packed");
    let (_, pshape, _) = weights.raw(&name)?;
    let fmt = group.format.as_deref().unwrap_or("dense");
    let nv = match fmt {
        "nvfp4-pack-quantized" => true,
        "mxfp4-pack-quantized" => false,
        other => {
            return Err(bad(
                path,
                &name,
                format!(
                    "is U8 (packed FP4), but config group `{}` has format `{other}` \
                     (FP4 needs nvfp4-pack-quantized or mxfp4-pack-quantized)",
                    group.name
                ),
            ))
        }
    };
    if !group.float || group.num_bits != 4 || !group.symmetric {
        return Err(bad(
            path,
            &name,
            format!(
                "is packed FP4, but config group `{}` quantises weights to {}{} bits{}",
                group.name,
                if group.float { "float " } else { "int " },
                group.num_bits,
                if group.symmetric { "" } else { ", asymmetric" }
            ),
        ));
    }
    let (rows, half) = shape2(path, &name, pshape)?;
    let cols = half
        .checked_mul(2)
        .ok_or_else(|| bad(path, &name, "is too large"))?;
    let g = if nv { 16 } else { 32 };
    if group.group_size != Some(g) || cols % g != 0 {
        return Err(bad(
            path,
            &name,
            format!(
                "holds [{rows}, {cols}] FP4 values; {fmt} needs group_size {g} (config group `{}` has {:?}) dividing the columns",
                group.name, group.group_size
            ),
        ));
    }
    let mut parts = vec![name.clone()];
    let sname = format!("{module}.weight_shape");
    if weights.contains(&sname) {
        let (stag, sshape, sbytes) = weights.raw(&sname)?;
        let dims = int_values(stag, sbytes).unwrap_or_default();
        if sshape != [2] || dims != [rows as u64, cols as u64] {
            return Err(bad(
                weights.file_of(&sname),
                &sname,
                format!(
                    "is {stag} {sshape:?} {dims:?}, but `{name}` holds [{rows}, {cols}] FP4 values"
                ),
            ));
        }
        parts.push(sname);
    }
    let scale = format!("{module}.weight_scale");
    require(weights, &scale)?;
    let (stag, sshape, _) = weights.raw(&scale)?;
    let want_tag = if nv { "F8_E4M3" } else { "U8" };
    if stag != want_tag || sshape != [rows, cols / g] {
        return Err(bad(
            weights.file_of(&scale),
            &scale,
            format!(
                "should be {want_tag} [{rows}, {}] (one scale per {g} values of `{name}`), found {stag} {sshape:?}",
                cols / g
            ),
        ));
    }
    parts.push(scale.clone());
    let spec = if nv {
        let global = format!("{module}.weight_global_scale");
        require(weights, &global)?;
        let gpath = weights.file_of(&global).to_path_buf();
        let (gtag, gshape, gbytes) = weights.raw(&global)?;
        let gdtype = float_dtype(&gpath, &global, gtag)?;
        if gshape.iter().product::<usize>() != 1 {
            return Err(bad(
                &gpath,
                &global,
                format!("has shape {gshape:?}; a global scale holds one value"),
            ));
        }
        // Every value is divided by it: zero, a negative or a non-finite
        // global scale would decode to infinities or NaN.
        let g = super::scalar(gbytes, gdtype, 0);
        if !(g.is_finite() && g > 0.0) {
            return Err(bad(
                &gpath,
                &global,
                format!("is {g}; a global scale must be a positive finite number"),
            ));
        }
        parts.push(global.clone());
        Spec::Nvfp4 {
            scales: scale,
            global: (global, gdtype),
        }
    } else {
        Spec::Mxfp4 {
            scales: scale,
            blocks_range: (0, rows * half),
            scales_range: (0, rows * (cols / g)),
            layout: super::mxfp4::Layout {
                k: cols,
                first_row: 0,
                row_step: 1,
                transposed: None,
            },
        }
    };
    Ok(Virtual {
        shape: vec![rows, cols],
        dtype: Dtype::Quantized(if nv { "nvfp4" } else { "mxfp4" }),
        main: name,
        parts,
        spec,
    })
}

fn packed_virtual(
    weights: &Weights,
    path: &std::path::Path,
    module: &str,
    group: &Group,
) -> Result<Virtual> {
    let name = format!("{module}.weight_packed");
    let (tag, pshape, _) = weights.raw(&name)?;
    if group.float {
        return Err(bad(
            path,
            &name,
            format!(
                "is packed, but config group `{}` quantises weights to floats",
                group.name
            ),
        ));
    }
    if tag != "I32" {
        return Err(bad(
            path,
            &name,
            format!("is {tag}; packed weights are I32"),
        ));
    }
    let (prows, pcols) = shape2(path, &name, pshape)?;
    // weight_shape: the logical [rows, cols], stored as an integer vector.
    let sname = format!("{module}.weight_shape");
    let (stag, sshape, sbytes) = weights.raw(&sname)?;
    let dims: Vec<u64> = match int_values(stag, sbytes).filter(|_| sshape == [2]) {
        Some(d) => d,
        None => {
            return Err(bad(
                weights.file_of(&sname),
                &sname,
                format!("should be I64 or I32 [2], found {stag} {sshape:?}"),
            ))
        }
    };
    let bits = group.num_bits;
    let cols = usize::try_from(dims[1]).unwrap_or(usize::MAX);
    let need = cols.checked_mul(bits as usize).map(|b| b.div_ceil(32));
    if dims[0] != prows as u64 || need != Some(pcols) {
        return Err(bad(
            weights.file_of(&sname),
            &sname,
            format!(
                "is {dims:?}, but `{name}` {pshape:?} holds [{prows}, {}] {bits}-bit values",
                pcols * 32 / bits as usize
            ),
        ));
    }
    let rows = prows;
    let (scale, groups) = scale_grid(weights, module, group, rows, cols)?;
    let mut parts = vec![name.clone(), sname, scale.name.clone()];
    let g_idx = if group.g_idx {
        let gname = format!("{module}.weight_g_idx");
        if group.strategy != "group" {
            return Err(bad(
                path,
                &name,
                format!(
                    "config group `{}` orders activations (actorder) with strategy `{}`; only `group` has a g_idx",
                    group.name, group.strategy
                ),
            ));
        }
        require(weights, &gname)?;
        let (gtag, gshape, gbytes) = weights.raw(&gname)?;
        let gpath = weights.file_of(&gname);
        if gtag != "I32" || gshape != [cols] {
            return Err(bad(
                gpath,
                &gname,
                format!("should be I32 [{cols}] (the group of each input column), found {gtag} {gshape:?}"),
            ));
        }
        if let Some((k, v)) = gbytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .enumerate()
            .find(|(_, v)| usize::try_from(*v).map_or(true, |v| v >= groups))
        {
            return Err(bad(
                gpath,
                &gname,
                format!(
                    "column {k} names group {v}; `{}` has {groups} groups",
                    scale.name
                ),
            ));
        }
        parts.push(gname.clone());
        Some(gname)
    } else {
        None
    };
    let zero = if group.symmetric {
        None
    } else {
        if !matches!(group.strategy.as_str(), "group" | "channel") {
            return Err(bad(
                path,
                &name,
                format!(
                    "asymmetric `{}` packing is not supported (only group and channel)",
                    group.strategy
                ),
            ));
        }
        let zname = format!("{module}.weight_zero_point");
        let (ztag, zshape, _) = weights.raw(&zname)?;
        let want = [(rows * bits as usize).div_ceil(32), groups];
        if ztag != "I32" || zshape != want {
            return Err(bad(
                weights.file_of(&zname),
                &zname,
                format!("should be I32 {want:?} (zero points packed along dim 0), found {ztag} {zshape:?}"),
            ));
        }
        parts.push(zname.clone());
        Some((zname, groups))
    };
    let label = match bits {
        4 => "int4",
        8 => "int8",
        2 => "int2",
        3 => "int3",
        _ => "intN",
    };
    Ok(Virtual {
        shape: vec![rows, cols],
        dtype: Dtype::Quantized(label),
        main: name,
        parts,
        spec: Spec::Packed {
            bits,
            words_per_row: pcols,
            scale,
            zero,
            g_idx,
        },
    })
}
