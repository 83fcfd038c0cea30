//! The forward pass against fixtures/<name>/forward_reference.safetensors,
//! computed by fixtures/make_forward_refs.py with HF transformers (Mixtral,
//! Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3) and with the separate PyTorch reference
//! fixtures/torch_reference.py (DeepSeekMoE, Grok-1). See fixtures/FORWARD.md.

use moe_inspect_testkit as common;

use candle_core::Device;
use common::fixture;
use moe_inspect::forward::observer::{MoeObservation, Observer, Wants};
use moe_inspect::forward::{to_host, Compute, Forward, LogitRows};
use moe_inspect::model::{Model, Weights};

/// Tolerance (max-abs) 1e-5 for every fixture: the references are computed
/// in f32 by transformers (or `fixtures/torch_reference.py`), for the bf16
/// OLMoE fixture from its weights upcast exactly to f32 — as this forward
/// computes (fixtures/FORWARD.md). Real mistakes such as a wrong rope layout
/// move the logits by 4e-4..7e-4 on these fixtures.
fn tolerance(_model: &Model) -> f32 {
    1e-5
}

struct Reference(Weights);

impl Reference {
    fn open(name: &str) -> Reference {
        Reference::open_file(name, "forward_reference.safetensors")
    }
    fn open_file(name: &str, file: &str) -> Reference {
        Reference(Weights::open_file(&fixture(name).join(file)).unwrap())
    }
    /// The token ids of `prompt0`, `prompt1`, ... (at least one).
    fn prompts(&self) -> Vec<Vec<u32>> {
        let mut prompts = Vec::new();
        while self.has(&format!("prompt{}.token_ids", prompts.len())) {
            let ids = self.i64(&format!("prompt{}.token_ids", prompts.len()));
            prompts.push(ids.iter().map(|&i| i as u32).collect::<Vec<u32>>());
        }
        assert!(!prompts.is_empty(), "no prompts in the reference");
        prompts
    }
    fn has(&self, name: &str) -> bool {
        self.0.contains(name)
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

#[derive(Default)]
struct Recorder {
    /// (prompt, layer) → observation copies.
    seen: Vec<(usize, usize, Recorded)>,
}

struct Recorded {
    input: Vec<f32>,
    router_logits: Vec<f32>,
    selected: Vec<u32>,
    weights: Vec<f32>,
    expert_outputs: Vec<f32>,
    activations: Vec<f32>,
    shared: Option<Vec<f32>>,
}

impl Observer for Recorder {
    fn wants(&self) -> Wants {
        Wants {
            all_expert_outputs: true,
            activations: true,
            shared_output: true,
            input: true,
        }
    }
    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        self.seen.push((
            o.prompt,
            o.layer,
            Recorded {
                input: o.input.unwrap().to_vec(),
                router_logits: o.router_logits.to_vec(),
                selected: o.selected.to_vec(),
                weights: o.weights.to_vec(),
                expert_outputs: o.expert_outputs.unwrap().to_vec(),
                activations: o.activations.unwrap().to_vec(),
                shared: o.shared_output.map(<[f32]>::to_vec),
            },
        ));
    }
}

/// Largest difference; NaN/inf on either side and length mismatches panic.
fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    common::max_abs_diff_flat("forward output", a, b) as f32
}

/// `[layers, T, rest...]` → the slice of one layer.
fn layer_slice(data: &[f32], shape: &[usize], li: usize) -> Vec<f32> {
    let per: usize = shape[1..].iter().product();
    data[li * per..(li + 1) * per].to_vec()
}

/// `[T, E, X]` → `[E, T, X]` (the observer's expert-major layout).
fn expert_major(data: &[f32], t: usize, e: usize, x: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for tok in 0..t {
        for ex in 0..e {
            let src = &data[(tok * e + ex) * x..(tok * e + ex + 1) * x];
            out[(ex * t + tok) * x..(ex * t + tok + 1) * x].copy_from_slice(src);
        }
    }
    out
}

fn check_family(name: &str) {
    let model = Model::open(&fixture(name)).unwrap();
    let tol = tolerance(&model);
    let r = Reference::open(name);
    let moe_layers: Vec<usize> = r.i64("moe_layers").iter().map(|&l| l as usize).collect();
    assert_eq!(moe_layers, model.info.moe_layers, "{name}");
    let prompts = r.prompts();
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let mut rec = Recorder::default();
    let out = fwd.run(&prompts, &mut rec, true).unwrap();
    let (e, h, i) = (
        model.info.num_experts,
        model.info.hidden_size,
        model.info.expert_intermediate,
    );
    // Largest difference per quantity (printed with --nocapture).
    let mut worst = [0f32; 6];
    for (p, ids) in prompts.iter().enumerate() {
        let t = ids.len();
        let (_, want_logits) = r.f32(&format!("prompt{p}.logits"));
        let got: Vec<f32> = to_host(&out.logits[p]).unwrap().concat();
        let d = max_abs(&got, &want_logits);
        assert!(d <= tol, "{name} prompt {p}: logits differ by {d:e}");
        worst[0] = worst[0].max(d);
        let (rl_shape, rl) = r.f32(&format!("prompt{p}.router_logits"));
        let sel = r.i64(&format!("prompt{p}.selected_experts"));
        let (rw_shape, rw) = r.f32(&format!("prompt{p}.routing_weights"));
        let (in_shape, inputs) = r.f32(&format!("prompt{p}.moe_input"));
        let (eo_shape, eo) = r.f32(&format!("prompt{p}.expert_outputs"));
        let (ea_shape, ea) = r.f32(&format!("prompt{p}.expert_act"));
        let shared_key = format!("prompt{p}.shared_output");
        for (li, &layer) in moe_layers.iter().enumerate() {
            let what = format!("{name} prompt {p} layer {layer}");
            let got = &rec
                .seen
                .iter()
                .find(|(pp, ll, _)| *pp == p && *ll == layer)
                .unwrap_or_else(|| panic!("{what}: not observed"))
                .2;
            let k = model.info.top_k;
            let want_sel: Vec<u32> = sel[li * t * k..(li + 1) * t * k]
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(got.selected, want_sel, "{what}: selected experts");
            let d = max_abs(&got.router_logits, &layer_slice(&rl, &rl_shape, li));
            assert!(d <= tol, "{what}: router logits differ by {d:e}");
            worst[1] = worst[1].max(d);
            let d = max_abs(&got.weights, &layer_slice(&rw, &rw_shape, li));
            assert!(d <= tol, "{what}: routing weights differ by {d:e}");
            worst[2] = worst[2].max(d);
            let d = max_abs(&got.input, &layer_slice(&inputs, &in_shape, li));
            assert!(d <= tol, "{what}: layer input differs by {d:e}");
            worst[3] = worst[3].max(d);
            let want = expert_major(&layer_slice(&eo, &eo_shape, li), t, e, h);
            let d = max_abs(&got.expert_outputs, &want);
            assert!(d <= tol, "{what}: all-expert outputs differ by {d:e}");
            worst[4] = worst[4].max(d);
            let want = expert_major(&layer_slice(&ea, &ea_shape, li), t, e, i);
            let d = max_abs(&got.activations, &want);
            assert!(d <= tol, "{what}: activations differ by {d:e}");
            worst[5] = worst[5].max(d);
            if r.has(&shared_key) {
                let (s_shape, s) = r.f32(&shared_key);
                let d = max_abs(got.shared.as_ref().unwrap(), &layer_slice(&s, &s_shape, li));
                assert!(d <= tol, "{what}: shared expert output differs by {d:e}");
            } else {
                assert!(got.shared.is_none(), "{what}: no shared expert expected");
            }
        }
    }
    eprintln!(
        "{name}: max |diff| logits {:e}, router logits {:e}, weights {:e}, layer inputs {:e}, expert outputs {:e}, activations {:e}",
        worst[0], worst[1], worst[2], worst[3], worst[4], worst[5]
    );
}

/// The query/key projections are multiplied by this in the rope references
/// (fixtures/make_rope_refs.py); a power of two, so the scaled weights are
/// exact in f32 and bf16 and both sides run bit-identical weights.
const QK_FACTOR: f32 = 16.0;

/// The tensors scaled by [`QK_FACTOR`] (every layer), as in make_rope_refs.py.
const QK_SCALED: [&str; 4] = [
    "self_attn.q_proj.weight",
    "self_attn.q_b_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight",
];

/// Multiplies every element of an F32 or BF16 tensor by a power of two (exact).
fn scale_exact(dtype: &str, bytes: &mut [u8], factor: f32) {
    match dtype {
        "F32" => {
            for c in bytes.chunks_exact_mut(4) {
                let v = f32::from_le_bytes(c.try_into().unwrap()) * factor;
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        "BF16" => {
            for c in bytes.chunks_exact_mut(2) {
                let v = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16) * factor;
                assert_eq!(v.to_bits() & 0xffff, 0, "bf16 scaling is exact");
                c.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        other => panic!("unexpected dtype {other}"),
    }
}

/// The fixture with sharp attention (query/key projections × [`QK_FACTOR`])
/// against `rope_reference.safetensors`, transformers' logits of the same
/// edited model. The shipped fixtures' attention is nearly uniform, so the
/// rotary embedding hardly moves their logits (a 1% change of the rope base:
/// 6e-7 for DeepSeek-V2/V3, below any honest f32 tolerance); here it moves
/// them by 1e-4 to 3e-3 (fixtures/FORWARD.md), at the same 1e-5.
fn check_rope(name: &str) {
    check_sharp(name, "rope_reference.safetensors", |_| {});
}

/// The rope parameters `fixtures/make_yarn_refs.py` gives the MLA fixtures
/// (`ROPE` there): YaRN past an original context of 16 positions, with
/// mscale ≠ mscale_all_dim so that the frequencies, the cos/sin factor and the
/// softmax-scale factor all differ from the default rope's.
fn yarn_rope() -> serde_json::Value {
    serde_json::json!({
        "rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.707, "mscale_all_dim": 1.0,
    })
}

/// The sharpened fixture with YaRN rope parameters against
/// `yarn_reference.safetensors` (transformers' logits of the same config):
/// the released DeepSeek-V2/V3/V3.2 and Kimi-K2 configs all ask for YaRN.
fn check_yarn(name: &str) {
    check_sharp(name, "yarn_reference.safetensors", |c| {
        c["rope_parameters"] = yarn_rope();
    });
}

/// [`check_rope`] and [`check_yarn`]: `file`'s logits against the forward
/// pass of the fixture with sharp attention and `edit` applied to its config.
fn check_sharp(name: &str, file: &str, edit: impl Fn(&mut serde_json::Value)) {
    let r = Reference::open_file(name, file);
    assert_eq!(r.f32("qk_factor").1, [QK_FACTOR], "{name}: qk_factor");
    let dir = common::copy_fixture(name);
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut scaled = 0;
    common::rewrite_safetensors(dir.path(), "model.safetensors", |spec, bytes| {
        if QK_SCALED.iter().any(|s| spec.name.ends_with(s)) {
            scale_exact(&spec.dtype, bytes, QK_FACTOR);
            scaled += 1;
        }
    });
    let model = Model::open(dir.path()).unwrap();
    // Two attention projections per layer (query, key), every layer.
    assert_eq!(scaled, 2 * model.info.num_layers, "{name}: scaled tensors");
    let prompts = r.prompts();
    assert!(
        prompts.iter().any(|p| p.len() >= 64),
        "{name}: a long prompt"
    );
    let tol = tolerance(&model);
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let out = fwd.run(&prompts, &mut (), true).unwrap();
    assert_eq!(out.logits.len(), prompts.len(), "{name}: logits per prompt");
    for (p, ids) in prompts.iter().enumerate() {
        let (shape, want) = r.f32(&format!("prompt{p}.logits"));
        assert_eq!(shape[0], ids.len(), "{name} prompt {p}: positions");
        let got: Vec<f32> = to_host(&out.logits[p]).unwrap().concat();
        let d = max_abs(&got, &want);
        assert!(
            d <= tol,
            "{name} prompt {p} (sharp attention): logits differ by {d:e}"
        );
    }
}

/// Granite MoE (bf16, fused `input_linear`/`output_linear` hub layout, embedding /
/// attention / residual multipliers and logits scaling set away from 1):
/// reference from transformers' GraniteMoeForCausalLM (fixtures/make_granite_forward_ref.py).
#[test]
fn granitemoe_bf16() {
    check_family("families/granitemoe");
    check_rope("families/granitemoe");
}

/// GLM-4.5 (`glm4_moe`, sharded: q/k/v biases, per-head q/k norms, partial
/// rotary 0.5, a dense first layer, one shared expert, group-limited sigmoid
/// routing with a random correction bias, routed_scaling_factor 2.5):
/// reference from transformers' Glm4MoeForCausalLM
/// (fixtures/make_native_forward_refs.py).
#[test]
fn glm4_moe() {
    check_family("families/glm4_moe");
}

/// MiniMax-M2 (`minimax_m2`: q/k RMSNorm over the whole projection, partial
/// rotary 4 of 8 dims, sigmoid routing with a random correction bias,
/// renormalised; `block_sparse_moe.experts.N.w1/w3/w2` on disk): reference
/// from transformers' MiniMaxM2ForCausalLM (fixtures/make_native_forward_refs.py).
#[test]
fn minimax_m2() {
    check_family("families/minimax_m2");
}

/// gpt-oss (bf16, `[E, H, 2I]` interleaved experts with biases, attention sinks,
/// sliding window 4 on layer 0 and full attention on layer 1 over prompts of up
/// to 64 tokens, YaRN rope, biased router, clamped SwiGLU with `swiglu_limit`
/// 0.2 so the clamp bites): reference from transformers' GptOssForCausalLM
/// (fixtures/make_gpt_oss_forward_ref.py).
#[test]
fn gpt_oss_bf16() {
    check_family("families/gpt_oss");
}

/// gpt-oss with MXFP4 experts (`_blocks`/`_scales`, as released): the forward
/// pass on the experts as this tool dequantises them, against transformers'
/// GptOssForCausalLM on its own dequantisation of the same blocks.
#[test]
fn gpt_oss_mxfp4() {
    check_family("families/gpt_oss_mxfp4");
}

#[test]
fn mixtral() {
    check_family("mixtral");
    check_rope("mixtral");
}
#[test]
fn qwen2_moe() {
    check_family("qwen2-moe");
    check_rope("qwen2-moe");
}
#[test]
fn qwen3_moe() {
    check_family("qwen3-moe");
}
#[test]
fn olmoe_bf16() {
    check_family("olmoe");
}
#[test]
fn deepseek_v2() {
    check_family("deepseek-v2");
    check_rope("deepseek-v2");
    check_yarn("deepseek-v2");
}
#[test]
fn deepseek_v3() {
    check_family("deepseek-v3");
    check_rope("deepseek-v3");
    check_yarn("deepseek-v3");
}
#[test]
fn deepseek_moe() {
    check_family("deepseek-moe");
}
#[test]
fn grok_1() {
    check_family("grok-1");
}

/// Quantised checkpoints, dequantised on read, against transformers running
/// the weights their own tooling dequantises to (fixtures/quant_forward.py).
#[test]
fn qwen3_moe_quantised_formats() {
    for name in [
        "qwen3-moe-fp8",
        "qwen3-moe-int4",
        "qwen3-moe-gptq",
        "qwen3-moe-awq",
        "qwen3-moe-gguf",
        "qwen3-moe-fp4",
    ] {
        check_family(name);
    }
}

/// The FP8 checkpoint (e4m3 weights with 128×128 block scales) against
/// transformers running its dequantised weights in f32
/// (`make_forward_refs.py`): the same 1e-5 as the other fixtures, so a
/// wrong block scale or FP8 decoding fails. And the quantisation is real:
/// its logits differ from the full-precision model's.
#[test]
fn deepseek_v3_fp8() {
    check_family("deepseek-v3-fp8");
    let fp8 = Reference::open("deepseek-v3-fp8");
    let full = Reference::open("deepseek-v3");
    let (_, a) = fp8.f32("prompt2.logits");
    let (_, b) = full.f32("prompt2.logits");
    assert_eq!(a.len(), b.len());
    let d = max_abs(&a, &b);
    assert!(d > 1e-4 && d.is_finite(), "fp8 vs full precision: {d:e}");
}

#[test]
fn resident_weights_give_the_same_results_as_streaming() {
    // olmoe is bf16: its matrices stay bf16 in both modes.
    for name in ["mixtral", "deepseek-v2", "grok-1", "olmoe"] {
        let model = Model::open(&fixture(name)).unwrap();
        let r = Reference::open(name);
        let ids: Vec<u32> = r
            .i64("prompt1.token_ids")
            .iter()
            .map(|&i| i as u32)
            .collect();
        let streamed = Forward::new(&model, Device::Cpu).unwrap();
        let resident = Forward::new(&model, Device::Cpu).unwrap().keep_weights();
        let a = to_host(
            &streamed
                .run(std::slice::from_ref(&ids), &mut (), true)
                .unwrap()
                .logits[0],
        )
        .unwrap()
        .concat();
        for _ in 0..2 {
            let b = to_host(
                &resident
                    .run(std::slice::from_ref(&ids), &mut (), true)
                    .unwrap()
                    .logits[0],
            )
            .unwrap()
            .concat();
            let d = max_abs(&a, &b);
            assert!(d <= 1e-5, "{name}: resident run differs by {d:e}");
        }
    }
}

/// On the CPU a bf16 checkpoint's matrices are kept as stored (attention
/// projections, router, experts, lm_head), not converted to f32; norms are
/// f32. (`olmoe_bf16` and `granitemoe_bf16` check the numbers against the
/// f32 references of the same weights at 1e-5.)
#[test]
fn bf16_matrices_are_used_as_stored_on_the_cpu() {
    use candle_core::DType;
    use moe_inspect::forward::weights::{AttnWeights, HeadWeights, MlpWeights};
    let model = Model::open(&fixture("olmoe")).unwrap();
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let layer = model.info.moe_layers[0];
    for fwd in [
        fwd,
        Forward::new(&model, Device::Cpu).unwrap().keep_weights(),
    ] {
        let lw = fwd.load_layer(layer).unwrap();
        let AttnWeights::Standard { q, k, v, o, .. } = &lw.attn else {
            panic!("olmoe has standard attention")
        };
        for w in [q, k, v, o] {
            assert_eq!(w.dtype(), DType::BF16);
        }
        assert_eq!(lw.attn_norm.dtype(), DType::F32);
        let MlpWeights::Moe {
            router, experts, ..
        } = &lw.mlp
        else {
            panic!("layer {layer} is an MoE layer")
        };
        assert_eq!(router.dtype(), DType::BF16);
        assert_eq!(experts.len(), model.info.num_experts);
        for f in experts {
            for w in [&f.gate, &f.up, &f.down] {
                assert_eq!(w.dtype(), DType::BF16);
            }
            assert!(
                f.host_hub().is_some(),
                "the grouped kernels read the experts"
            );
        }
        let head =
            HeadWeights::load(&model, &fwd.cfg, &Device::Cpu, fwd.weights_resident()).unwrap();
        assert_eq!(head.lm_head.dtype(), DType::BF16);
    }
}

/// `LogitRows::Last` (what `bench` prefill computes, as llama-bench does)
/// gives one `[1, vocab]` row per prompt: the last row of the full logits.
#[test]
fn last_position_logits_are_the_last_row_of_every_position_logits() {
    for name in ["mixtral", "olmoe"] {
        let model = Model::open(&fixture(name)).unwrap();
        let r = Reference::open(name);
        let prompts = r.prompts();
        let fwd = Forward::new(&model, Device::Cpu).unwrap();
        let all = fwd.run(&prompts, &mut (), true).unwrap().logits;
        let last = fwd
            .run_logits(&prompts, &mut (), LogitRows::Last)
            .unwrap()
            .logits;
        assert_eq!(all.len(), prompts.len(), "{name}");
        assert_eq!(last.len(), prompts.len(), "{name}");
        for (p, ids) in prompts.iter().enumerate() {
            let a = to_host(&all[p]).unwrap();
            let l = to_host(&last[p]).unwrap();
            assert_eq!(a.len(), ids.len(), "{name} prompt {p}");
            assert_eq!(l.len(), 1, "{name} prompt {p}: one row");
            let d = max_abs(&l[0], &a[ids.len() - 1]);
            assert!(d <= 1e-6, "{name} prompt {p}: last row differs by {d:e}");
        }
        let none = fwd
            .run_logits(&prompts, &mut (), LogitRows::None)
            .unwrap()
            .logits;
        assert!(none.is_empty());
    }
}

/// `Compute::Bf16` (`bench --compute bf16`: activations rounded to bf16,
/// `vdpbf16ps`) on the bf16 OLMoE and Granite fixtures, against their f32
/// transformers references. Tolerance: each activation entering a product
/// is rounded to 8 significant bits (relative error ≤ 2⁻⁹ ≈ 0.2%); through
/// the layers' projections, attention and experts such errors add up to
/// 0.17–0.28% of the largest reference logit on these fixtures (measured:
/// see the message), so the bound is 1% of it — and the mode must really
/// round: it differs from the exact path by more than the exact path's
/// 1e-5. Where the CPU lacks AVX-512 BF16 the mode falls back to exact and
/// must then match the reference at 1e-5.
#[test]
fn bf16_compute_is_within_bf16_rounding_of_the_f32_reference() {
    for name in ["olmoe", "families/granitemoe"] {
        let model = Model::open(&fixture(name)).unwrap();
        let r = Reference::open(name);
        let prompts = r.prompts();
        let fwd = Forward::new(&model, Device::Cpu)
            .unwrap()
            .compute(Compute::Bf16);
        let out = fwd.run(&prompts, &mut (), true).unwrap().logits;
        assert_eq!(out.len(), prompts.len(), "{name}");
        for (p, _) in prompts.iter().enumerate() {
            let (_, want) = r.f32(&format!("prompt{p}.logits"));
            let got: Vec<f32> = to_host(&out[p]).unwrap().concat();
            let d = max_abs(&got, &want);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0 && scale.is_finite(), "{name}: reference scale");
            eprintln!(
                "{name} prompt {p}: bf16 compute differs by {d:e} ({:.3}% of {scale:e})",
                100.0 * d / scale
            );
            if Compute::bf16_supported() {
                assert!(
                    d <= 0.01 * scale,
                    "{name} prompt {p}: {d:e} vs scale {scale:e}"
                );
                assert!(
                    d > 1e-5,
                    "{name} prompt {p}: bf16 compute did not round ({d:e})"
                );
            } else {
                assert!(
                    d <= 1e-5,
                    "{name} prompt {p}: exact fallback differs by {d:e}"
                );
            }
        }
    }
}
