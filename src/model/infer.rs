//! Families the table does not know: the MoE structure inferred from tensor
//! names and shapes alone (SPEC §4, issue 13). A layer holds an MoE block when
//! it has `E` expert FFNs under `<block>.experts.{e}.<matrix>.weight` (or the
//! stacked `<block>.experts.gate_up_proj` / `down_proj`) beside an `[E, H]`
//! router in the same block.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::model::config::{limits, Config};
use crate::model::family::{
    self, Family, FamilySpec, Fused, FusedKind, LayerRule, Naming, PerExpert, Shared,
    LAYER_PREFIXES,
};
use crate::model::{ModelInfo, Weights};

/// What inference found: the geometry, the naming, and the notice to show.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// The geometry.
    pub info: ModelInfo,
    /// Where the tensors are.
    pub naming: Naming,
    /// What was inferred, in words (shown on stderr).
    pub notice: String,
}

/// One candidate block of one layer: `{prefix}{layer}.{block}.experts...`.
#[derive(Default)]
struct Block {
    experts: BTreeSet<usize>,
    mats: BTreeSet<String>,
    fused: bool,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Infers the MoE structure of a checkpoint whose family the table does not
/// know; the error (exit 2) says that nothing MoE-shaped was found.
pub fn infer(config: &Config, weights: &Weights) -> Result<Inferred> {
    let text = config.text_config();
    let c = text.as_ref().unwrap_or(config);
    let none = |why: &str| {
        let base = Family::unknown(config);
        Error::Input {
            path: config.path().to_path_buf(),
            reason: format!(
                "{}; and no MoE structure could be inferred from its tensors: {why}",
                base.to_string()
                    .split_once(": ")
                    .map_or(base.to_string(), |(_, r)| r.to_string())
            ),
        }
    };
    let hidden = c
        .usize_opt_in("hidden_size", 1, limits::WIDTH)?
        .or_else(|| {
            weights
                .shape("model.embed_tokens.weight")
                .ok()
                .and_then(|s| s.get(1).copied())
        })
        .ok_or_else(|| none("no hidden_size in config.json and no model.embed_tokens.weight"))?;
    // (prefix, block) -> layer -> what is there
    let mut blocks: BTreeMap<(&'static str, String), BTreeMap<usize, Block>> = BTreeMap::new();
    for name in weights.names() {
        let Some(prefix) = LAYER_PREFIXES.iter().find(|p| name.starts_with(**p)) else {
            continue;
        };
        let Some(layer) = family::layer_of(name) else {
            continue;
        };
        let rest = &name[prefix.len()..];
        let rest = rest.split_once('.').map_or("", |(_, r)| r);
        let Some((block, after)) = rest.split_once(".experts.") else {
            continue;
        };
        if block.contains("shared") {
            continue;
        }
        let entry = blocks
            .entry((prefix, block.to_string()))
            .or_default()
            .entry(layer)
            .or_default();
        if after == "gate_up_proj" {
            entry.fused = true;
        } else if let Some((e, m)) = after.split_once('.') {
            if let (Ok(e), Some(m)) = (e.parse::<usize>(), m.strip_suffix(".weight")) {
                if !m.contains('.') {
                    entry.experts.insert(e);
                    entry.mats.insert(m.to_string());
                }
            }
        }
    }
    let ((prefix, block), layers) = blocks
        .into_iter()
        .max_by_key(|(_, l)| l.len())
        .ok_or_else(|| none("no `<block>.experts.` tensors in any layer"))?;
    let layer_name = |l: usize, rest: &str| format!("{prefix}{l}.{block}.{rest}");
    let (&first, b) = layers.iter().next().expect("a block has a layer");
    // Per-expert matrices, or the stacked pair.
    let (num_experts, inter, per_expert, fused, how) = if b.fused {
        let gu = layer_name(first, "experts.gate_up_proj");
        let dn = layer_name(first, "experts.down_proj");
        let (gs, ds) = (weights.shape(&gu)?.to_vec(), weights.shape(&dn)?.to_vec());
        let (e, kind, i) = match (&gs[..], &ds[..]) {
            ([e, i2, h], [e2, h2, i]) if *h == hidden && *h2 == hidden && e == e2 && *i2 == 2 * i => {
                (*e, FusedKind::GateUpRows, *i)
            }
            ([e, h, i2], [e2, i, h2]) if *h == hidden && *h2 == hidden && e == e2 && *i2 == 2 * i => {
                (*e, FusedKind::ConcatColumns, *i)
            }
            _ => {
                return Err(none(&format!(
                    "`{gu}` {gs:?} and `{dn}` {ds:?} are not stacked [E, 2I, H] / [E, H, I] experts of hidden size {hidden}"
                )))
            }
        };
        let fused = Fused {
            router: "",
            gate_up: leak(format!("{block}.experts.gate_up_proj")),
            down: leak(format!("{block}.experts.down_proj")),
            kind,
        };
        let how = match kind {
            FusedKind::GateUpRows => "stacked experts `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I]",
            _ => "stacked experts `gate_up_proj` [E, H, 2I] (read as gate columns first, up after) and `down_proj` [E, I, H]",
        };
        (e, i, None, Some(fused), how.to_string())
    } else {
        let e = b.experts.len();
        if e < 2 || b.experts.iter().copied().ne(0..e) {
            return Err(none(&format!(
                "layer {first} `{block}.experts` holds experts {:?}, not 0..E",
                b.experts
            )));
        }
        let mats: Vec<&String> = b.mats.iter().collect();
        if mats.len() != 3 {
            return Err(none(&format!(
                "the experts of `{block}` have {} matrices ({mats:?}), not the 3 of a gated FFN",
                mats.len()
            )));
        }
        let shape = |m: &str| -> Result<Vec<usize>> {
            Ok(weights
                .shape(&layer_name(first, &format!("experts.0.{m}.weight")))?
                .to_vec())
        };
        let shapes: Vec<Vec<usize>> = mats.iter().map(|m| shape(m)).collect::<Result<_>>()?;
        let down = shapes
            .iter()
            .position(|s| s.len() == 2 && s[0] == hidden && s[1] != hidden);
        let Some(down) = down else {
            return Err(none(&format!(
                "no expert matrix of `{block}` is [H, I] with H = {hidden} (shapes {shapes:?})"
            )));
        };
        let i = shapes[down][1];
        let ins: Vec<usize> = (0..3).filter(|&k| k != down).collect();
        if ins.iter().any(|&k| shapes[k] != [i, hidden]) {
            return Err(none(&format!(
                "the expert matrices of `{block}` {mats:?} have shapes {shapes:?}, not [I, H], [I, H], [H, I]"
            )));
        }
        // Gate by name where the name says it; else the first in name order.
        let is_gate = |m: &str| m.contains("gate") || m == "w1";
        let (g, u) = if is_gate(mats[ins[1]]) && !is_gate(mats[ins[0]]) {
            (ins[1], ins[0])
        } else {
            (ins[0], ins[1])
        };
        let per = PerExpert {
            prefix: leak(format!("{block}.experts")),
            mats: [
                leak(mats[g].clone()),
                leak(mats[u].clone()),
                leak(mats[down].clone()),
            ],
        };
        let how = format!(
            "{e} expert FFNs `{block}.experts.{{e}}.{{{},{},{}}}.weight` (gate `{}`, up `{}`, down `{}`)",
            mats[0], mats[1], mats[2], mats[g], mats[u], mats[down]
        );
        (e, i, Some(per), None, how)
    };
    // The router: an [E, H] matrix in the block, outside the experts.
    let head = format!("{prefix}{first}.{block}.");
    let router_rel = weights
        .names()
        .into_iter()
        .filter(|n| n.starts_with(&head) && !n[head.len()..].starts_with("experts."))
        .filter(|n| n.ends_with(".weight"))
        .find(|n| weights.shape(n).is_ok_and(|s| s == [num_experts, hidden]))
        .map(|n| n[head.len()..].to_string())
        .ok_or_else(|| {
            none(&format!(
                "layer {first} has {num_experts} experts under `{block}` but no [{num_experts}, {hidden}] router beside them"
            ))
        })?;
    let router = leak(format!("{block}.{router_rel}"));
    // Shared expert(s): a gated FFN in the block whose name says "shared".
    let shared_prefix = weights
        .names()
        .into_iter()
        .filter(|n| {
            n.starts_with(&head) && n.contains("shared") && n.ends_with(".gate_proj.weight")
        })
        .map(|n| n[head.len()..n.len() - ".gate_proj.weight".len()].to_string())
        .next();
    let shared_width = match &shared_prefix {
        Some(p) => weights
            .shape(&format!("{head}{p}.gate_proj.weight"))?
            .first()
            .copied()
            .unwrap_or(0),
        None => 0,
    };
    let num_layers = c
        .usize_opt_in("num_hidden_layers", 1, limits::LAYERS)?
        .unwrap_or_else(|| layers.keys().max().map_or(0, |l| l + 1));
    let router_full = |l: usize| format!("{prefix}{l}.{router}");
    let moe_layers: Vec<usize> = (0..num_layers)
        .filter(|&l| weights.contains(&router_full(l)))
        .collect();
    let dense_layers: Vec<usize> = (0..num_layers)
        .filter(|l| !moe_layers.contains(l))
        .collect();
    let dense_intermediate = dense_layers.first().and_then(|&l| {
        weights
            .shape(&format!("{prefix}{l}.{block}.gate_proj.weight"))
            .ok()
            .and_then(|s| s.first().copied())
    });
    let (top_k, top_k_note) = match [
        "num_experts_per_tok",
        "moe_k",
        "moe_topk",
        "experts_per_token",
    ]
    .iter()
    .find(|k| c.get(k).is_some())
    {
        Some(k) => (
            c.usize_uniform(k)?,
            format!("top-k {} from `{k}`", c.usize_uniform(k)?),
        ),
        None => (
            1,
            "top-k unknown (no num_experts_per_tok): 1 assumed".to_string(),
        ),
    };
    if top_k == 0 || top_k > num_experts {
        return Err(Error::key(
            c.path(),
            "num_experts_per_tok",
            format!("is {top_k}, must be between 1 and the number of experts ({num_experts})"),
        ));
    }
    let id = match config.str("model_type")? {
        Some(mt) => leak(mt.to_string()),
        None => "inferred",
    };
    let spec = FamilySpec {
        id,
        name: "Inferred",
        model_types: &[],
        architectures: &[],
        examples: "",
        experts_keys: &[],
        top_k_keys: &[],
        width_keys: &[],
        dense_width_key: "intermediate_size",
        layers_key: "num_hidden_layers",
        hidden_key: "hidden_size",
        zero_experts_key: None,
        shared: if shared_width > 0 {
            Shared::One
        } else {
            Shared::None
        },
        layers: LayerRule::All,
        router,
        per_expert,
        fused: match fused {
            Some(f) => Box::leak(Box::new([Fused { router, ..f }])),
            None => &[],
        },
        shared_prefix: shared_prefix.map(|p| leak(format!("{block}.{p}"))),
        dense_prefix: leak(block.clone()),
        shared_gate: None,
        correction_bias: None,
        activation: family::Activation::Silu,
        router_rule: "unknown (inferred family)",
        groups: family::Groups::None,
        native_forward: false,
        dense_from: "layers without a router",
    };
    let family = Family::register(spec)?;
    let naming = Naming {
        family,
        prefix,
        fused: fused.map(|_| 0),
    };
    let notice = format!(
        "{}: model family `{id}` is not in the table (see `cargo moe-inspect models`); inferred from the tensors: \
         router `{router}` [{num_experts}, {hidden}] in MoE layers {}, {how}, expert width {inter}{}, {top_k_note}. \
         Static analyses only; the activation is assumed SiLU and the router rule unknown.",
        config.path().display(),
        crate::layers::format_list(&moe_layers),
        if shared_width > 0 {
            format!(", shared expert width {shared_width}")
        } else {
            String::new()
        }
    );
    Ok(Inferred {
        info: ModelInfo {
            family,
            num_layers,
            hidden_size: hidden,
            num_experts,
            top_k,
            expert_intermediate: inter,
            dense_intermediate,
            shared_intermediate: shared_width,
            moe_layers,
            dense_layers,
        },
        naming,
        notice,
    })
}
