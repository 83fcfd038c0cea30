//! The Llama 4 forward pass (src/forward/llama4.rs) against
//! fixtures/families/{llama4,llama4_multimodal}/forward_reference.safetensors,
//! computed by fixtures/make_llama4_forward_ref.py with transformers'
//! Llama4ForCausalLM (f32, eager attention; for the multimodal release its
//! `language_model`). The fixtures (make_family_fixtures.py, LLAMA4_FORWARD)
//! set attention chunks of 8 over prompts of up to 64 tokens, a no-rope layer
//! with temperature tuning that bites (floor_scale 4) and sharp attention,
//! llama3 rope scaling, dense layers between the MoE layers, and routers with
//! a clear top-1 (smallest gap kept vs best dropped logit: 3.8e-3).

use moe_inspect_testkit as common;

use candle_core::Device;
use common::fixture;
use moe_inspect::forward::{to_host, Forward};
use moe_inspect::model::{Model, Weights};

/// Max-abs tolerance: the reference is transformers in f32, as this forward
/// computes (the same 1e-5 as tests/forward_reference.rs).
const TOL: f32 = 1e-5;

struct Reference(Weights);

impl Reference {
    fn open(name: &str) -> Reference {
        Reference(Weights::open_file(&fixture(name).join("forward_reference.safetensors")).unwrap())
    }
    fn prompts(&self) -> Vec<Vec<u32>> {
        let mut prompts = Vec::new();
        while self
            .0
            .contains(&format!("prompt{}.token_ids", prompts.len()))
        {
            let ids = self.i64(&format!("prompt{}.token_ids", prompts.len()));
            prompts.push(ids.iter().map(|&i| i as u32).collect::<Vec<u32>>());
        }
        assert!(!prompts.is_empty(), "no prompts in the reference");
        prompts
    }
    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.0.tensor(name).unwrap();
        (t.shape.to_vec(), t.to_f32_vec())
    }
    fn i64(&self, name: &str) -> Vec<i64> {
        let (tag, _, bytes) = self.0.raw(name).unwrap();
        assert_eq!(tag, "I64");
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// Largest difference; NaN/inf on either side and length mismatches panic.
fn max_abs(what: &str, a: &[f32], b: &[f32]) -> f32 {
    common::max_abs_diff_flat(what, a, b) as f32
}

/// `[layers, rest...]` → the slice of one layer.
fn layer_slice(data: &[f32], shape: &[usize], li: usize) -> Vec<f32> {
    let per: usize = shape[1..].iter().product();
    assert_eq!(data.len(), per * shape[0]);
    data[li * per..(li + 1) * per].to_vec()
}

/// `[T, E, X]` → `[E, T, X]` (the observer's expert-major layout).
fn expert_major(data: &[f32], t: usize, e: usize, x: usize) -> Vec<f32> {
    assert_eq!(data.len(), t * e * x);
    let mut out = vec![0f32; data.len()];
    for tok in 0..t {
        for ex in 0..e {
            let src = &data[(tok * e + ex) * x..(tok * e + ex + 1) * x];
            out[(ex * t + tok) * x..(ex * t + tok + 1) * x].copy_from_slice(src);
        }
    }
    out
}

/// Every observed quantity of every prompt and MoE layer against the
/// reference; returns the largest differences (logits, router logits,
/// weights, layer inputs, expert outputs, activations, shared output).
fn check(name: &str) -> [f32; 7] {
    let model = Model::open(&fixture(name)).unwrap();
    assert_eq!(model.info.family.id(), "llama4");
    let r = Reference::open(name);
    let moe_layers: Vec<usize> = r.i64("moe_layers").iter().map(|&l| l as usize).collect();
    assert_eq!(moe_layers, model.info.moe_layers, "{name}");
    assert!(
        moe_layers.len() < model.info.num_layers,
        "{name}: dense layers too"
    );
    let prompts = r.prompts();
    assert!(
        prompts.iter().any(|p| p.len() >= 64),
        "{name}: a long prompt"
    );
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let l4 = fwd.cfg.llama4.as_ref().expect("the Llama 4 forward");
    assert!(l4.rope.contains(&false), "{name}: a no-rope layer");
    assert!(
        l4.chunk.iter().flatten().all(|&c| c < 64) && l4.chunk.iter().any(Option::is_some),
        "{name}: chunks shorter than the long prompt"
    );
    let mut rec = common::forward::Recorder::default();
    let out = fwd.run(&prompts, &mut rec, true).unwrap();
    assert_eq!(out.logits.len(), prompts.len(), "{name}: logits per prompt");
    assert_eq!(
        rec.seen.len(),
        prompts.len() * moe_layers.len(),
        "{name}: one observation per prompt and MoE layer"
    );
    let (e, h, i, k) = (
        model.info.num_experts,
        model.info.hidden_size,
        model.info.expert_intermediate,
        model.info.top_k,
    );
    let mut worst = [0f32; 7];
    let mut compared = 0usize;
    for (p, ids) in prompts.iter().enumerate() {
        let t = ids.len();
        let what = format!("{name} prompt {p}");
        let (shape, want) = r.f32(&format!("prompt{p}.logits"));
        assert_eq!(shape, [t, fwd.cfg.vocab_size]);
        let got: Vec<f32> = to_host(&out.logits[p]).unwrap().concat();
        let d = max_abs(&what, &got, &want);
        assert!(d <= TOL, "{what}: logits differ by {d:e}");
        worst[0] = worst[0].max(d);
        let (rl_shape, rl) = r.f32(&format!("prompt{p}.router_logits"));
        let sel = r.i64(&format!("prompt{p}.selected_experts"));
        assert_eq!(sel.len(), moe_layers.len() * t * k);
        let (rw_shape, rw) = r.f32(&format!("prompt{p}.routing_weights"));
        let (in_shape, inputs) = r.f32(&format!("prompt{p}.moe_input"));
        let (eo_shape, eo) = r.f32(&format!("prompt{p}.expert_outputs"));
        let (ea_shape, ea) = r.f32(&format!("prompt{p}.expert_act"));
        let (sh_shape, sh) = r.f32(&format!("prompt{p}.shared_output"));
        for (li, &layer) in moe_layers.iter().enumerate() {
            let what = format!("{name} prompt {p} layer {layer}");
            let got = rec.get(p, layer, &what);
            let want_sel: Vec<u32> = sel[li * t * k..(li + 1) * t * k]
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(got.selected, want_sel, "{what}: selected experts");
            let checks: [(&str, &[f32], Vec<f32>); 6] = [
                (
                    "router logits",
                    &got.router_logits,
                    layer_slice(&rl, &rl_shape, li),
                ),
                (
                    "routing weights",
                    &got.weights,
                    layer_slice(&rw, &rw_shape, li),
                ),
                (
                    "layer input",
                    &got.input,
                    layer_slice(&inputs, &in_shape, li),
                ),
                (
                    "expert outputs",
                    &got.expert_outputs,
                    expert_major(&layer_slice(&eo, &eo_shape, li), t, e, h),
                ),
                (
                    "activations",
                    &got.activations,
                    expert_major(&layer_slice(&ea, &ea_shape, li), t, e, i),
                ),
                (
                    "shared expert output",
                    got.shared.as_deref().expect("Llama 4 has a shared expert"),
                    layer_slice(&sh, &sh_shape, li),
                ),
            ];
            for (slot, (quantity, g, w)) in checks.iter().enumerate() {
                let d = max_abs(&format!("{what}: {quantity}"), g, w);
                assert!(d <= TOL, "{what}: {quantity} differ by {d:e}");
                worst[slot + 1] = worst[slot + 1].max(d);
                compared += 1;
            }
            // The weights are the sigmoid of the kept logits, and the scores
            // the sigmoid of every logit.
            assert_eq!(got.scores.len(), t * e);
            for (j, (&s, &l)) in got.scores.iter().zip(&got.router_logits).enumerate() {
                let want = 1.0 / (1.0 + (-l).exp());
                assert!((s - want).abs() <= 1e-6, "{what}: score {j}");
            }
        }
    }
    assert_eq!(compared, 6 * prompts.len() * moe_layers.len());
    eprintln!(
        "{name}: max |diff| logits {:e}, router logits {:e}, weights {:e}, layer inputs {:e}, \
         expert outputs {:e}, activations {:e}, shared output {:e}",
        worst[0], worst[1], worst[2], worst[3], worst[4], worst[5], worst[6]
    );
    worst
}

/// Llama4ForCausalLM (`llama4_text`): 4 layers (dense, MoE, dense, MoE), layer
/// 3 a no-rope layer with full attention and temperature tuning, layers 0-2
/// chunked (8) with rope and q/k L2 norm.
#[test]
fn llama4_text_matches_transformers() {
    check("families/llama4");
}

/// The multimodal release (`llama4`, `text_config`, `language_model.model.layers.`,
/// `language_model.lm_head`): a dense chunked rope layer, then a no-rope MoE layer.
#[test]
fn llama4_multimodal_matches_transformers() {
    check("families/llama4_multimodal");
}

/// Keeping the weights resident gives the streamed run's logits.
#[test]
fn llama4_resident_weights_give_the_same_logits() {
    let model = Model::open(&fixture("families/llama4")).unwrap();
    let prompts = Reference::open("families/llama4").prompts();
    let a = Forward::new(&model, Device::Cpu)
        .unwrap()
        .run(&prompts, &mut (), true)
        .unwrap();
    let fwd = Forward::new(&model, Device::Cpu).unwrap().keep_weights();
    for _ in 0..2 {
        let b = fwd.run(&prompts, &mut (), true).unwrap();
        for (x, y) in a.logits.iter().zip(&b.logits) {
            let (x, y) = (to_host(x).unwrap().concat(), to_host(y).unwrap().concat());
            let d = max_abs("resident", &x, &y);
            assert!(d <= TOL, "resident run differs by {d:e}");
        }
    }
}

/// Each Llama 4 rule moves the fixture's logits well beyond the tolerance:
/// the forward pass run on a copy whose config drops or changes one rule
/// differs from the reference by more than 10 × [`TOL`]. So a forward pass
/// that got the rule wrong in the same way fails `llama4_text_matches_transformers`.
#[test]
fn each_llama4_rule_moves_the_logits() {
    use serde_json::{json, Map, Value};
    let name = "families/llama4";
    let r = Reference::open(name);
    let prompts = r.prompts();
    type Edit = fn(&mut Map<String, Value>);
    let cases: [(&str, Edit); 7] = [
        ("attention chunk 7", |c| {
            c["attention_chunk_size"] = json!(7);
        }),
        ("attention chunk 9", |c| {
            c["attention_chunk_size"] = json!(9);
        }),
        ("no chunked attention", |c| {
            c["layer_types"] = json!([
                "full_attention",
                "full_attention",
                "full_attention",
                "full_attention"
            ]);
        }),
        ("no temperature tuning", |c| {
            c["attn_temperature_tuning"] = json!(false);
        }),
        ("rope on every layer", |c| {
            c["no_rope_layers"] = json!([1, 1, 1, 1]);
        }),
        ("no q/k L2 norm", |c| {
            c["use_qk_norm"] = json!(false);
        }),
        ("default rope (no llama3 scaling)", |c| {
            c["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        }),
    ];
    for (what, edit) in cases {
        let dir = common::copy_fixture(name);
        common::edit_config(dir.path(), edit);
        let model = Model::open(dir.path()).unwrap();
        let fwd = Forward::new(&model, Device::Cpu).unwrap();
        let out = fwd.run(&prompts, &mut (), true).unwrap();
        let mut d = 0f32;
        for (p, l) in out.logits.iter().enumerate() {
            let (_, want) = r.f32(&format!("prompt{p}.logits"));
            d = d.max(max_abs(what, &to_host(l).unwrap().concat(), &want));
        }
        eprintln!("{what}: logits move by {d:e}");
        assert!(d > 10.0 * TOL, "{what}: logits move by only {d:e}");
    }
}
