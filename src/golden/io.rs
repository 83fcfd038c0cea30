//! Golden files on disk: stable JSON (f32 numbers in shortest form,
//! matrices one row per line), parsing with validation, atomic writes.

use std::path::Path;

use crate::error::{Error, Result};
use crate::golden::pending;
use crate::golden::schema::{Selection, Snapshot, FINGERPRINT_DIM, GOLDEN_SCHEMA};
use crate::model::Matrix;

impl Snapshot {
    /// The file contents: stable key order, matrices one row per line.
    pub fn to_json(&self) -> String {
        // Serialised first (f32 in shortest form), then laid out; re-parsing
        // keeps each number's digits.
        let compact = serde_json::to_string(self).unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(&compact).unwrap_or(serde_json::Value::Null);
        let mut out = String::new();
        write_value(&value, 0, &mut out);
        out.push('\n');
        out
    }

    /// Parses a golden file; every problem names the file.
    pub fn parse(path: &Path, text: &str) -> Result<Snapshot> {
        let bad = |reason: String| Error::Input {
            path: path.to_path_buf(),
            reason: format!("corrupt golden snapshot: {reason}"),
        };
        let de = &mut serde_json::Deserializer::from_str(text);
        let snap: Snapshot = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            if at == "." {
                bad(e.inner().to_string())
            } else {
                bad(format!("at `{at}`: {}", e.inner()))
            }
        })?;
        if snap.schema != GOLDEN_SCHEMA {
            return Err(bad(format!(
                "schema is `{}`, expected `{GOLDEN_SCHEMA}`",
                snap.schema
            )));
        }
        snap.validate().map_err(bad)?;
        Ok(snap)
    }

    /// Reads and parses a golden file.
    pub fn read(path: &Path) -> Result<Snapshot> {
        let text =
            match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Input {
                    path: path.to_path_buf(),
                    reason:
                        "golden snapshot not found: record one with `cargo moe-inspect snapshot`"
                            .into(),
                }),
                Err(e) => return Err(Error::io(path, e)),
            };
        Snapshot::parse(path, &text)
    }

    /// Writes the file through [`crate::atomic_write`] (unique temp file,
    /// fsync, rename), so a failed or killed run never leaves a partial golden
    /// file. For `<dir>/<name>.json` and `<name>.json.new` it holds the name's
    /// lock ([`pending::lock`]) meanwhile, so concurrent writers serialise, and
    /// removes temp files that killed writers left behind.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let text = self.to_json();
        let _lock = match pending::name_of(path) {
            Some((dir, name)) => {
                let lock = pending::lock(&dir, &name)?;
                crate::atomic_write::remove_stale_temps(path);
                Some(lock)
            }
            None => None,
        };
        crate::atomic_write::write_atomic(path, text.as_bytes())
    }

    /// Checks the file against its own model block: what it says it
    /// recorded is there in every layer, shapes match, every number is finite
    /// and in its range (cosines in [-1, 1], shares in [0, 1]), tolerances are
    /// valid. A file that fails is corrupt (or hand-edited), never trusted.
    fn validate(&self) -> std::result::Result<(), String> {
        let e = self.model.num_experts;
        // Cosines computed in f32 may exceed 1 by rounding, never by more.
        const COS_SLACK: f32 = 1e-3;
        let square = |m: &[Vec<f32>], what: &str, layer: usize| {
            if m.len() != e || m.iter().any(|r| r.len() != e) {
                Err(format!("layer {layer}: {what} is not {e}×{e}"))
            } else if m.iter().flatten().any(|x| !x.is_finite()) {
                Err(format!("layer {layer}: {what} holds a non-finite number"))
            } else if let Some(x) = m.iter().flatten().find(|x| x.abs() > 1.0 + COS_SLACK) {
                Err(format!(
                    "layer {layer}: {what} holds {x}, not a cosine similarity (outside [-1, 1])"
                ))
            } else {
                Ok(())
            }
        };
        let share = |x: f32, what: &str, layer: usize| {
            if x.is_finite() && (0.0..=1.0 + COS_SLACK).contains(&x) {
                Ok(())
            } else {
                Err(format!("layer {layer}: {what} is {x}, outside [0, 1]"))
            }
        };
        if self.analyses.is_empty() {
            return Err("`analyses` is empty: the snapshot records nothing to check".into());
        }
        let sel = Selection::parse(&self.analyses).map_err(|e| format!("`analyses`: {e}"))?;
        self.tolerances.validate().map_err(|e| e.to_string())?;
        if e == 0 || self.model.top_k == 0 || self.model.top_k > e {
            return Err(format!(
                "model: {e} experts with top_k {} is not an MoE model",
                self.model.top_k
            ));
        }
        if self.layers.is_empty() {
            return Err("no MoE layer recorded".into());
        }
        let layer_ids: Vec<usize> = self.layers.iter().map(|l| l.layer).collect();
        if layer_ids != self.model.moe_layers {
            return Err(format!(
                "layers {layer_ids:?} do not match model.moe_layers {:?}",
                self.model.moe_layers
            ));
        }
        for l in &self.layers {
            let recorded = [
                (
                    sel.expert_similarity,
                    l.expert_similarity.is_some(),
                    "expert-similarity",
                ),
                (
                    sel.neuron_similarity,
                    l.neuron_similarity.is_some(),
                    "neuron-similarity",
                ),
                (
                    sel.gate_embedding,
                    l.gate_similarity.is_some() && l.gate_r2.is_some(),
                    "gate-embedding",
                ),
                (sel.routing, l.routing.is_some(), "chosen-experts"),
                (sel.norm_score, l.norm_score.is_some(), "norm-score"),
            ];
            for (wanted, present, name) in recorded {
                if wanted != present {
                    return Err(format!(
                        "layer {}: `analyses` {} {name}, but the layer {} it",
                        l.layer,
                        if wanted { "lists" } else { "does not list" },
                        if present { "holds" } else { "lacks" },
                    ));
                }
            }
            if let Some(r2) = &l.gate_r2 {
                for m in Matrix::ALL {
                    if let Some(x) = r2.get(m) {
                        share(*x, &format!("gate_r2.{}", m.name()), l.layer)?;
                    }
                }
            }
            if let Some(r) = &l.routing {
                for &p in &r.mean_probs {
                    share(p, "routing.mean_probs", l.layer)?;
                }
                let selections = r.load.iter().try_fold(0u64, |a, &x| a.checked_add(x));
                let expected = (r.tokens as u64).checked_mul(self.model.top_k as u64);
                if selections.is_none() || selections != expected {
                    return Err(format!(
                        "layer {}: routing.load sums to {}, but {} tokens × top-{} selections were made",
                        l.layer,
                        selections.map_or("more than 2^64".into(), |x| x.to_string()),
                        r.tokens,
                        self.model.top_k
                    ));
                }
            }
            if let Some(n) = &l.norm_score {
                share(n.top1_match_rate, "norm_score.top1_match_rate", l.layer)?;
            }
            if let Some(f) = &l.fingerprint {
                let finite = |m: &[Vec<f32>]| m.iter().flatten().all(|x| x.is_finite());
                if !(finite(&f.router) && Matrix::ALL.iter().all(|&m| finite(f.experts.get(m)))) {
                    return Err(format!(
                        "layer {}: fingerprint holds a non-finite number",
                        l.layer
                    ));
                }
            }
            for (name, pm) in [
                ("expert_similarity", &l.expert_similarity),
                ("neuron_similarity", &l.neuron_similarity),
            ] {
                if let Some(pm) = pm {
                    for m in Matrix::ALL {
                        square(pm.get(m), &format!("{name}.{}", m.name()), l.layer)?;
                    }
                }
            }
            if let Some(g) = &l.gate_similarity {
                square(g, "gate_similarity", l.layer)?;
            }
            if let Some(r) = &l.routing {
                // An empty mean_probs: a trace without router logits (`from_trace`).
                if r.load.len() != e || (r.mean_probs.len() != e && !r.mean_probs.is_empty()) {
                    return Err(format!(
                        "layer {}: routing has the wrong expert count",
                        l.layer
                    ));
                }
            }
            if let Some(n) = &l.norm_score {
                if n.counts.len() != e || n.counts.iter().any(|r| r.len() != e) {
                    return Err(format!(
                        "layer {}: norm_score.counts is not {e}×{e}",
                        l.layer
                    ));
                }
            }
            if let Some(f) = &l.fingerprint {
                let ok =
                    |m: &[Vec<f32>]| m.len() == e && m.iter().all(|r| r.len() == FINGERPRINT_DIM);
                if !(ok(&f.router) && Matrix::ALL.iter().all(|&m| ok(f.experts.get(m)))) {
                    return Err(format!(
                        "layer {}: fingerprint has the wrong shape",
                        l.layer
                    ));
                }
            }
        }
        if let Some(ids) = &self.top_k_ids {
            let [tokens, nl, k] = ids.shape;
            if nl != self.layers.len() || k != self.model.top_k {
                return Err(format!(
                    "top_k_ids.shape {:?} does not match {} MoE layers and top_k {}",
                    ids.shape,
                    self.layers.len(),
                    self.model.top_k
                ));
            }
            if self.prompts.as_ref().map(|p| p.tokens) != Some(tokens) {
                return Err("top_k_ids holds a different token count than `prompts`".into());
            }
            if let Some(l) = self
                .layers
                .iter()
                .find(|l| l.routing.as_ref().is_some_and(|r| r.tokens != tokens))
            {
                return Err(format!(
                    "layer {}: routing.tokens differs from the {tokens} tokens of top_k_ids",
                    l.layer
                ));
            }
            let v = ids.decode_str()?;
            if let Some(bad) = v.iter().find(|&&x| x < 0 || x as usize >= e) {
                return Err(format!("top_k_ids holds expert id {bad}, outside 0..{e}"));
            }
        }
        Ok(())
    }
}

/// Pretty JSON where arrays of numbers (and arrays of such arrays' rows) stay
/// on one line: matrices read one row per line.
pub(super) fn write_value(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = |n: usize| "  ".repeat(n);
    match v {
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push_str("{\n");
            for (i, (k, x)) in map.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_value(x, indent + 1, out);
                if i + 1 < map.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        Value::Array(items) if items.iter().all(|x| !x.is_object() && !x.is_array()) => {
            out.push_str(&v.to_string());
        }
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, x) in items.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                write_value(x, indent + 1, out);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
