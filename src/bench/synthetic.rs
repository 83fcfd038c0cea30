//! Synthetic Mixtral-layout checkpoints of any geometry, written tensor by
//! tensor with deterministic pseudo-random weights (bounded memory whatever
//! the size), for benchmarks and memory measurements.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::writer::{write_streaming, TensorSpec};
use crate::rng::Rng;

/// Shape of a synthetic MoE checkpoint (Mixtral layout, MoE FFNs only: no
/// attention or embeddings, which the static analyses do not read).
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Decoder layers.
    pub layers: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Intermediate size of one expert.
    pub intermediate: usize,
    /// `F32`, `F16` or `BF16`.
    pub dtype: &'static str,
}

/// Vocabulary and attention of a full synthetic model (for forward passes).
#[derive(Debug, Clone, Copy)]
pub struct FullModel {
    /// Vocabulary size.
    pub vocab: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
}

impl Geometry {
    /// Mixtral-8x7B's MoE layer shape with `layers` layers, bf16.
    pub fn mixtral_8x7b(layers: usize) -> Geometry {
        Geometry {
            layers,
            experts: 8,
            top_k: 2,
            hidden: 4096,
            intermediate: 14336,
            dtype: "BF16",
        }
    }

    /// Mixtral geometry scaled down by 4 (hidden 1024, intermediate 3584).
    pub fn mixtral_scaled(layers: usize) -> Geometry {
        Geometry {
            hidden: 1024,
            intermediate: 3584,
            ..Geometry::mixtral_8x7b(layers)
        }
    }

    /// Bytes of one layer's router and experts.
    pub fn layer_bytes(&self) -> usize {
        let size = if self.dtype == "F32" { 4 } else { 2 };
        (self.experts * self.hidden + 3 * self.experts * self.hidden * self.intermediate) * size
    }
}

fn encode(dtype: &str, v: f32, out: &mut Vec<u8>) {
    match dtype {
        "F32" => out.extend_from_slice(&v.to_le_bytes()),
        "F16" => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        _ => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
    }
}

/// Writes `config.json` and `model.safetensors` for `g` into `dir`.
pub fn write_checkpoint(dir: &Path, g: &Geometry, seed: u64) -> Result<()> {
    write_model(dir, g, None, seed)
}

/// Like [`write_checkpoint`], plus embeddings, attention, norms and the
/// output head when `full` is given, so the forward pass can run on it.
pub fn write_model(dir: &Path, g: &Geometry, full: Option<FullModel>, seed: u64) -> Result<()> {
    if !matches!(g.dtype, "F32" | "F16" | "BF16") {
        return Err(Error::Usage(format!(
            "synthetic checkpoint dtype must be F32, F16 or BF16, not {}",
            g.dtype
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_hidden_layers": g.layers,
        "hidden_size": g.hidden,
        "intermediate_size": g.intermediate,
        "num_local_experts": g.experts,
        "num_experts_per_tok": g.top_k,
        "num_attention_heads": full.map_or(8, |f| f.heads),
        "num_key_value_heads": full.map_or(8, |f| f.kv_heads),
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "vocab_size": full.map_or(32000, |f| f.vocab),
        "tie_word_embeddings": false,
        "torch_dtype": match g.dtype { "F32" => "float32", "F16" => "float16", _ => "bfloat16" },
    });
    let cpath = dir.join("config.json");
    crate::atomic_write::write_atomic(
        &cpath,
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut specs = Vec::new();
    // Norm weights are written as ones (recognised by name below).
    let mut ones = std::collections::HashSet::new();
    if let Some(f) = full {
        specs.push(TensorSpec::new(
            "model.embed_tokens.weight",
            g.dtype,
            &[f.vocab, g.hidden],
        ));
        specs.push(TensorSpec::new(
            "lm_head.weight",
            g.dtype,
            &[f.vocab, g.hidden],
        ));
        specs.push(TensorSpec::new("model.norm.weight", g.dtype, &[g.hidden]));
        ones.insert("model.norm.weight".to_string());
        let hd = g.hidden / f.heads;
        for l in 0..g.layers {
            let a = format!("model.layers.{l}.self_attn");
            specs.push(TensorSpec::new(
                format!("{a}.q_proj.weight"),
                g.dtype,
                &[f.heads * hd, g.hidden],
            ));
            specs.push(TensorSpec::new(
                format!("{a}.k_proj.weight"),
                g.dtype,
                &[f.kv_heads * hd, g.hidden],
            ));
            specs.push(TensorSpec::new(
                format!("{a}.v_proj.weight"),
                g.dtype,
                &[f.kv_heads * hd, g.hidden],
            ));
            specs.push(TensorSpec::new(
                format!("{a}.o_proj.weight"),
                g.dtype,
                &[g.hidden, f.heads * hd],
            ));
            for n in ["input_layernorm", "post_attention_layernorm"] {
                let name = format!("model.layers.{l}.{n}.weight");
                ones.insert(name.clone());
                specs.push(TensorSpec::new(name, g.dtype, &[g.hidden]));
            }
        }
    }
    for l in 0..g.layers {
        let p = format!("model.layers.{l}.block_sparse_moe");
        specs.push(TensorSpec::new(
            format!("{p}.gate.weight"),
            g.dtype,
            &[g.experts, g.hidden],
        ));
        for e in 0..g.experts {
            for (w, shape) in [
                ("w1", [g.intermediate, g.hidden]),
                ("w3", [g.intermediate, g.hidden]),
                ("w2", [g.hidden, g.intermediate]),
            ] {
                specs.push(TensorSpec::new(
                    format!("{p}.experts.{e}.{w}.weight"),
                    g.dtype,
                    &shape,
                ));
            }
        }
    }
    let scale = 1.0 / (g.hidden as f32).sqrt();
    let mut buf = Vec::with_capacity(1 << 20);
    write_streaming(&dir.join("model.safetensors"), &specs, |i, out| {
        let mut rng = Rng(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let n: usize = specs[i].shape.iter().product();
        let is_one = ones.contains(&specs[i].name);
        let mut left = n;
        while left > 0 {
            let take = left.min(1 << 18);
            buf.clear();
            for _ in 0..take {
                let v = if is_one { 1.0 } else { rng.uniform(scale) };
                encode(g.dtype, v, &mut buf);
            }
            out.write_all(&buf)?;
            left -= take;
        }
        Ok(())
    })
}
