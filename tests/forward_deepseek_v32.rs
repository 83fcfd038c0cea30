//! The native forward pass of DeepSeek-V3.2 (`deepseek_v32`: DeepSeek-V3's
//! MLA and routing plus the DSA lightning indexer) against
//! fixtures/families/deepseek_v32/forward_reference.safetensors, computed by
//! transformers 5.24's DeepseekV32ForCausalLM in f32
//! (fixtures/make_native_forward_refs.py, fixtures/FORWARD.md); and Kimi-K2
//! (`kimi_k2` with `DeepseekV3ForCausalLM`) run as DeepSeek-V3.

use moe_inspect_testkit as common;

use candle_core::Device;
use common::fixture;
use moe_inspect::forward::{to_host, Forward};
use moe_inspect::model::{Family, Model, Weights};

/// The reference is transformers in f32 on the f32 fixture, as this forward
/// computes; the indexer's choices have a margin of 7.4e-5 between the
/// k-th and (k+1)-th index score (fixtures/FORWARD.md), far above f32 noise.
const TOL: f32 = 1e-5;

struct Reference(Weights);

impl Reference {
    fn open(name: &str) -> Reference {
        Reference(Weights::open_file(&fixture(name).join("forward_reference.safetensors")).unwrap())
    }
    /// `prompt0`, `prompt1`, ... (at least one).
    fn prompts(&self) -> Vec<Vec<u32>> {
        let mut prompts = Vec::new();
        while self
            .0
            .contains(&format!("prompt{}.token_ids", prompts.len()))
        {
            let ids = self.i64(&format!("prompt{}.token_ids", prompts.len()));
            prompts.push(ids.iter().map(|&i| u32::try_from(i).unwrap()).collect());
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
        assert_eq!(tag, "I64", "{name}");
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

/// `[layers, rest...]` → layer `li`'s part (the shape must hold `layers` of them).
fn layer_slice(data: &[f32], shape: &[usize], layers: usize, li: usize) -> Vec<f32> {
    assert_eq!(shape[0], layers, "layers in the reference");
    let per: usize = shape[1..].iter().product();
    assert_eq!(data.len(), per * layers);
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

/// Runs `model` on the reference's prompts and compares everything the
/// reference holds; returns the largest difference per quantity (logits,
/// router logits, routing weights, layer inputs, expert outputs,
/// activations, shared output) and the number of compared MoE observations.
fn compare(model: &Model, r: &Reference) -> ([f32; 7], usize) {
    let moe_layers: Vec<usize> = r.i64("moe_layers").iter().map(|&l| l as usize).collect();
    assert_eq!(moe_layers, model.info.moe_layers);
    let nl = moe_layers.len();
    let prompts = r.prompts();
    let fwd = Forward::new(model, Device::Cpu).unwrap();
    let mut rec = common::forward::Recorder::default();
    let out = fwd.run(&prompts, &mut rec, true).unwrap();
    assert_eq!(out.logits.len(), prompts.len());
    assert_eq!(
        rec.seen.len(),
        prompts.len() * nl,
        "one observation per prompt and MoE layer"
    );
    let (e, h, i, k) = (
        model.info.num_experts,
        model.info.hidden_size,
        model.info.expert_intermediate,
        model.info.top_k,
    );
    let mut worst = [0f32; 7];
    let mut compared = 0;
    for (p, ids) in prompts.iter().enumerate() {
        let t = ids.len();
        let (_, want) = r.f32(&format!("prompt{p}.logits"));
        let got: Vec<f32> = to_host(&out.logits[p]).unwrap().concat();
        worst[0] = worst[0].max(max_abs(&format!("prompt {p} logits"), &got, &want));
        let (rl_s, rl) = r.f32(&format!("prompt{p}.router_logits"));
        let sel = r.i64(&format!("prompt{p}.selected_experts"));
        assert_eq!(sel.len(), nl * t * k);
        let (rw_s, rw) = r.f32(&format!("prompt{p}.routing_weights"));
        let (in_s, inputs) = r.f32(&format!("prompt{p}.moe_input"));
        let (eo_s, eo) = r.f32(&format!("prompt{p}.expert_outputs"));
        let (ea_s, ea) = r.f32(&format!("prompt{p}.expert_act"));
        let (sh_s, sh) = r.f32(&format!("prompt{p}.shared_output"));
        for (li, &layer) in moe_layers.iter().enumerate() {
            let what = format!("prompt {p} layer {layer}");
            let got = rec.get(p, layer, &what);
            let want_sel: Vec<u32> = sel[li * t * k..(li + 1) * t * k]
                .iter()
                .map(|&x| x as u32)
                .collect();
            let pairs: [(&[f32], Vec<f32>, &str); 6] = [
                (
                    &got.router_logits,
                    layer_slice(&rl, &rl_s, nl, li),
                    "router logits",
                ),
                (&got.weights, layer_slice(&rw, &rw_s, nl, li), "weights"),
                (&got.input, layer_slice(&inputs, &in_s, nl, li), "input"),
                (
                    &got.expert_outputs,
                    expert_major(&layer_slice(&eo, &eo_s, nl, li), t, e, h),
                    "expert outputs",
                ),
                (
                    &got.activations,
                    expert_major(&layer_slice(&ea, &ea_s, nl, li), t, e, i),
                    "activations",
                ),
                (
                    got.shared.as_deref().expect("shared experts observed"),
                    layer_slice(&sh, &sh_s, nl, li),
                    "shared output",
                ),
            ];
            for (n, (g, w, name)) in pairs.iter().enumerate() {
                let d = max_abs(&format!("{what} {name}"), g, w);
                worst[n + 1] = worst[n + 1].max(d);
            }
            assert_eq!(got.selected, want_sel, "{what}: selected experts");
            compared += 1;
        }
    }
    (worst, compared)
}

/// Every quantity within [`TOL`] of transformers, the same experts chosen:
/// prompts of 5, 9, 16 and 64 tokens with `index_topk` 8, so on the last
/// three the indexer drops keys (195 queries over the 3 layers).
#[test]
fn deepseek_v32_matches_transformers_with_the_indexer() {
    let name = "families/deepseek_v32";
    let model = Model::open(&fixture(name)).unwrap();
    assert_eq!(model.info.family, Family::DeepSeekV32);
    assert!(model.info.family.native_forward());
    let r = Reference::open(name);
    let (worst, compared) = compare(&model, &r);
    assert_eq!(compared, 4 * 2, "4 prompts × 2 MoE layers");
    eprintln!(
        "deepseek_v32: max |diff| logits {:e}, router logits {:e}, weights {:e}, layer inputs {:e}, \
         expert outputs {:e}, activations {:e}, shared output {:e}",
        worst[0], worst[1], worst[2], worst[3], worst[4], worst[5], worst[6]
    );
    for (w, what) in worst.iter().zip([
        "logits",
        "router logits",
        "routing weights",
        "layer inputs",
        "expert outputs",
        "activations",
        "shared output",
    ]) {
        assert!(*w <= TOL, "{what} differ by {w:e}");
    }
}

/// The indexer is what the reference tests: with `index_topk` at least the
/// longest prompt (every query keeps every causal key, plain MLA attention),
/// the logits move far beyond the tolerance from transformers' sparse ones.
#[test]
fn without_the_indexer_s_choice_the_logits_differ() {
    let dir = common::copy_fixture("families/deepseek_v32");
    common::edit_config(dir.path(), |c| {
        c.insert("index_topk".into(), 64.into());
    });
    let model = Model::open(dir.path()).unwrap();
    let r = Reference::open("families/deepseek_v32");
    let prompts = r.prompts();
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let out = fwd.run(&prompts, &mut (), true).unwrap();
    let mut worst = 0f32;
    for (p, l) in out.logits.iter().enumerate() {
        let got: Vec<f32> = to_host(l).unwrap().concat();
        let d = max_abs("logits", &got, &r.f32(&format!("prompt{p}.logits")).1);
        // The 5-token prompt never reaches 8 keys: unchanged.
        if prompts[p].len() <= 8 {
            assert!(d <= TOL, "prompt {p}: {d:e}");
        }
        worst = worst.max(d);
    }
    assert!(
        worst > 1e-2,
        "full attention moved the logits by only {worst:e}"
    );
}

/// Kimi-K2 (`model_type: kimi_k2`, `architectures: [DeepseekV3ForCausalLM]`)
/// is DeepSeek-V3: the DeepSeek-V3 fixture with that config runs the native
/// forward to transformers' DeepSeek-V3 reference.
#[test]
fn kimi_k2_runs_the_deepseek_v3_forward() {
    let dir = common::copy_fixture("deepseek-v3");
    common::edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "kimi_k2".into());
        c.insert(
            "architectures".into(),
            serde_json::json!(["DeepseekV3ForCausalLM"]),
        );
    });
    let model = Model::open(dir.path()).unwrap();
    assert_eq!(model.info.family, Family::DeepSeekV3);
    let r =
        Reference(Weights::open_file(&dir.path().join("forward_reference.safetensors")).unwrap());
    let prompts = r.prompts();
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let mut rec = common::forward::Recorder::default();
    let out = fwd.run(&prompts, &mut rec, true).unwrap();
    assert_eq!(out.logits.len(), prompts.len());
    assert_eq!(rec.seen.len(), prompts.len() * model.info.moe_layers.len());
    for (p, l) in out.logits.iter().enumerate() {
        let got: Vec<f32> = to_host(l).unwrap().concat();
        let d = max_abs("logits", &got, &r.f32(&format!("prompt{p}.logits")).1);
        assert!(d <= TOL, "kimi_k2 prompt {p}: logits differ by {d:e}");
    }
    // An unknown model_type naming the class also works (the architectures fallback).
    common::edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "kimi_k3".into());
    });
    assert_eq!(
        Model::open(dir.path()).unwrap().info.family,
        Family::DeepSeekV3
    );
}
