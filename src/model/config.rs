//! `config.json` access that tolerates the spellings of different releases and
//! transformers versions, and names the key when a value is missing or wrong.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Upper bounds on sizes read from config.json. Released checkpoints stay far
/// below them (at most ~128 layers, hidden 16k, intermediate 53k, 256 experts,
/// 128 heads of dimension 256, vocabularies of 256k); a config beyond them is
/// corrupt, and is stopped before anything is sized from it.
pub mod limits {
    /// `num_hidden_layers`.
    pub const LAYERS: usize = 1 << 12;
    /// `hidden_size`, intermediate sizes, LoRA ranks, and heads × head dimension.
    pub const WIDTH: usize = 1 << 20;
    /// Routed (and shared) experts.
    pub const EXPERTS: usize = 1 << 16;
    /// Attention heads.
    pub const HEADS: usize = 1 << 12;
    /// One head's dimension (`head_dim`, `qk_rope_head_dim`, ...).
    pub const HEAD_DIM: usize = 1 << 12;
    /// `vocab_size`.
    pub const VOCAB: usize = 1 << 24;
}

/// A parsed `config.json` with the path it came from.
#[derive(Debug, Clone)]
pub struct Config {
    path: PathBuf,
    map: Map<String, Value>,
}

impl Config {
    /// Reads `dir/config.json`.
    pub fn read_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(Error::ConfigMissing {
                dir: dir.to_path_buf(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Config::parse(&path, &bytes)
    }

    /// Parses config bytes; `path` is used in error messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Config> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::ConfigSyntax {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        match value {
            Value::Object(map) => Ok(Config {
                path: path.to_path_buf(),
                map,
            }),
            other => Err(Error::ConfigSyntax {
                path: path.to_path_buf(),
                reason: format!("expected a JSON object, found {}", kind(&other)),
            }),
        }
    }

    /// All keys and values as read.
    pub fn map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw value of a key, treating JSON `null` as absent. A dotted key
    /// that is not itself a key (`ffn_config.moe_num_experts`, DBRX) names a
    /// key of a nested object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self.map.get(key) {
            Some(v) => Some(v).filter(|v| !v.is_null()),
            None if key.contains('.') => {
                let mut parts = key.split('.');
                let mut v = self.map.get(parts.next()?)?;
                for p in parts {
                    v = v.as_object()?.get(p)?;
                }
                Some(v).filter(|v| !v.is_null())
            }
            None => None,
        }
    }

    /// A string value, if present.
    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    /// An optional non-negative integer.
    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| Error::key(&self.path, key, "missing (required for this model family)"))
    }

    /// The first present key among `keys` (e.g. `num_local_experts` / `num_experts`).
    pub fn usize_any(&self, keys: &[&str]) -> Result<Option<usize>> {
        for key in keys {
            if let Some(v) = self.usize_opt(key)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Like [`Config::usize_any`] but required; the error lists all accepted spellings.
    pub fn usize_any_req(&self, keys: &[&str]) -> Result<usize> {
        self.usize_any(keys)?.ok_or_else(|| {
            Error::key(
                &self.path,
                keys[0],
                format!("missing (also looked for {})", keys[1..].join(", ")),
            )
        })
    }

    /// A required integer in `min..=max`; the error names the key, the value and the range.
    pub fn usize_in(&self, key: &str, min: usize, max: usize) -> Result<usize> {
        let v = self.usize(key)?;
        self.check_range(key, v, min, max)
    }

    /// An optional integer in `min..=max` when present.
    pub fn usize_opt_in(&self, key: &str, min: usize, max: usize) -> Result<Option<usize>> {
        self.usize_opt(key)?
            .map(|v| self.check_range(key, v, min, max))
            .transpose()
    }

    /// `layer_types` as one flag per layer: `true` for `yes`, `false` for
    /// `no` (e.g. `"linear_attention"` / `"full_attention"`); `None` when the
    /// key is absent. Any other entry, or a list that is not `layers` long,
    /// is an error naming the key.
    pub fn layer_flags(&self, layers: usize, yes: &str, no: &str) -> Result<Option<Vec<bool>>> {
        let key = "layer_types";
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) if a.len() == layers => a
                .iter()
                .map(|v| match v.as_str() {
                    Some(s) if s == yes => Ok(true),
                    Some(s) if s == no => Ok(false),
                    _ => Err(Error::key(
                        &self.path,
                        key,
                        format!("has {v}; expected \"{yes}\" or \"{no}\""),
                    )),
                })
                .collect::<Result<_>>()
                .map(Some),
            Some(v) => Err(Error::key(
                &self.path,
                key,
                format!(
                    "is not a list of {layers} layer types (num_hidden_layers), found {}",
                    match v {
                        Value::Array(a) => format!("{} entries", a.len()),
                        other => other.to_string(),
                    }
                ),
            )),
        }
    }

    /// `v` (the value of `key`) if it lies in `min..=max`.
    pub fn check_range(&self, key: &str, v: usize, min: usize, max: usize) -> Result<usize> {
        if v < min || v > max {
            return Err(Error::key(
                &self.path,
                key,
                format!("is {v}, must be between {min} and {max}"),
            ));
        }
        Ok(v)
    }

    /// An optional boolean.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(key, "a boolean", other)),
        }
    }

    /// An optional number (integers accepted).
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// An optional finite number satisfying `ok` (described by `what`, e.g.
    /// "a positive number"); the error names the key and the value.
    pub fn f64_opt_where(
        &self,
        key: &str,
        what: &str,
        ok: impl Fn(f64) -> bool,
    ) -> Result<Option<f64>> {
        match self.f64_opt(key)? {
            Some(v) if !v.is_finite() || !ok(v) => Err(Error::key(
                &self.path,
                key,
                format!("is {v}, must be {what}"),
            )),
            v => Ok(v),
        }
    }

    /// An optional list of non-negative integers (e.g. `mlp_only_layers`).
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.wrong(key, "a list of non-negative integers", v))
                })
                .collect(),
            Some(other) => Err(self.wrong(key, "a list of integers", other)),
        }
    }

    /// A required integer, or a per-layer list of one same integer (Hunyuan's `moe_topk`).
    pub fn usize_uniform(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            Some(Value::Array(_)) => {
                let list = self.usize_list(key)?;
                match list.split_first() {
                    Some((&first, rest)) if rest.iter().all(|&v| v == first) => Ok(first),
                    Some(_) => Err(Error::key(
                        &self.path,
                        key,
                        "differs between layers; one value for every MoE layer is supported",
                    )),
                    None => Err(Error::key(&self.path, key, "is an empty list")),
                }
            }
            _ => self.usize(key),
        }
    }

    /// The nested `text_config` of a multimodal release (Llama 4, Qwen3.5),
    /// when the text model's keys are there rather than at the top level.
    pub fn text_config(&self) -> Option<Config> {
        if self.get("num_hidden_layers").is_some() {
            return None;
        }
        match self.get("text_config")? {
            Value::Object(map) => Some(Config {
                path: self.path.clone(),
                map: map.clone(),
            }),
            _ => None,
        }
    }

    /// The weights' dtype as the config declares it (`torch_dtype`, or
    /// transformers 5's `dtype`), `unknown` when it says nothing: for reports
    /// made without reading the weights (traces).
    pub fn declared_dtype(&self) -> &str {
        self.get("torch_dtype")
            .or_else(|| self.get("dtype"))
            .and_then(|v| v.as_str())
            .unwrap_or("unknown")
    }

    /// The first entry of `architectures`, if any.
    pub fn architecture(&self) -> Option<&str> {
        self.get("architectures")?.as_array()?.first()?.as_str()
    }

    fn wrong(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::key(
            &self.path,
            key,
            format!("expected {expected}, found {}", short(found)),
        )
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}
