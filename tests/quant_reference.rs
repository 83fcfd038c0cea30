//! Quantised checkpoints (compressed-tensors FP8 and packed int4, GGUF)
//! against their own tooling: the dequantised weights equal what the
//! `compressed-tensors` package's `decompress` returns (bit for bit: both
//! compute `(q − z) · s` in f32 with f32 scales) and what gguf-py's
//! `dequantize` returns (bit for bit on these types), and the static
//! analyses match numpy on those dequantised weights
//! (fixtures/make_quant_fixtures.py, fixtures/make_gguf_fixtures.py).

use moe_inspect_testkit as common;

use common::{fixture, matrix, max_abs_diff, reference};
use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions};
use moe_inspect::model::{Matrix, Model, Weights};

/// Cosine similarities and Pearson r against the float64 reference.
const TOL: f64 = 1e-5;

/// The quantised fixtures and the expert dtype each must report.
/// qwen3-moe-fp4 mixes MXFP4 (experts' gate/up, attention), NVFP4 (down
/// projections) and act-order int4 (`weight_g_idx`, layer 0's dense MLP).
const QUANT_FIXTURES: [(&str, &str); 3] = [
    ("qwen3-moe-fp8", "f8_e4m3"),
    ("qwen3-moe-int4", "int4"),
    ("qwen3-moe-fp4", "mxfp4"),
];

#[test]
fn dequantised_weights_equal_the_formats_own_dequantisation() {
    for (name, dtype) in QUANT_FIXTURES {
        let model = Model::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.dtype().name(), dtype, "{name}");
        let want = Weights::open_file(&fixture(name).join("dequantised.safetensors")).unwrap();
        let names = want.names();
        let samples = if name == "qwen3-moe-fp4" { 7 } else { 5 };
        assert_eq!(names.len(), samples, "{name}: samples");
        for t in names {
            let w = want.tensor(t).unwrap().to_f32_vec();
            let view = model.weights().tensor(t).unwrap();
            assert_eq!(view.shape, want.tensor(t).unwrap().shape, "{name} {t}");
            let got = view.to_f32_vec();
            assert_eq!(got.len(), w.len(), "{name} {t}");
            assert!(got.iter().all(|x| x.is_finite()), "{name} {t}: non-finite");
            for (i, (g, e)) in got.iter().zip(&w).enumerate() {
                assert_eq!(g.to_bits(), e.to_bits(), "{name} {t}[{i}]: {g} vs {e}");
            }
            // Any element range decodes as the whole does.
            for (start, len) in [(0, 1), (7, 20), (w.len() - 5, 5), (33, w.len() - 40)] {
                let mut part = vec![0f32; len];
                view.read_f32(start, &mut part);
                assert_eq!(part, got[start..start + len], "{name} {t} {start}+{len}");
            }
        }
        // The router is in the ignore list (GGUF: stored F32) and stays f32.
        let l = model.info.moe_layers[0];
        assert_eq!(model.moe_layer(l).unwrap().router.dtype.name(), "f32");
    }
}

#[test]
fn static_analyses_of_quantised_checkpoints_match_numpy() {
    // mixtral-gguf: arch `llama` with experts (w1 = ffn_gate_exps, w3 = ffn_up_exps).
    let names = QUANT_FIXTURES
        .iter()
        .map(|(n, _)| *n)
        .chain(["mixtral-gguf", "families/gpt_oss_mxfp4"]);
    for name in names {
        let model = Model::open(&fixture(name)).unwrap();
        let r = reference(name);
        assert_eq!(model.dtype().name(), r["dtype"].as_str().unwrap(), "{name}");
        assert_eq!(
            model.info.family.id(),
            r["family"].as_str().unwrap(),
            "{name}"
        );
        let opts = AnalyzeOptions {
            analyses: vec![
                AnalysisKind::ExpertSimilarity,
                AnalysisKind::NeuronSimilarity,
                AnalysisKind::GateEmbedding,
            ],
            layers: None,
            dense: None,
            dynamic: None,
        };
        let a = analysis::run(&model, &opts, &()).unwrap().analyses;
        let sim = a.expert_similarity.unwrap();
        let neu = a.neuron_similarity.unwrap();
        let gate = a.gate_embedding.unwrap();
        let moe = model.info.moe_layers.len();
        assert_eq!(moe, 2, "{name}");
        assert_eq!((sim.layers.len(), neu.layers.len()), (moe, moe), "{name}");
        assert_eq!(gate.layers.len(), moe, "{name}");
        for (l, n) in sim.layers.iter().zip(&neu.layers) {
            let key = l.layer.to_string();
            for m in Matrix::ALL {
                let d = max_abs_diff(l.get(m), &matrix(&r["expert_similarity"][&key][m.name()]));
                assert!(
                    d <= TOL,
                    "{name} layer {key} {}: expert sim |diff| {d:e}",
                    m.name()
                );
                let d = max_abs_diff(n.get(m), &matrix(&r["neuron_similarity"][&key][m.name()]));
                assert!(
                    d <= TOL,
                    "{name} layer {key} {}: neuron sim |diff| {d:e}",
                    m.name()
                );
            }
        }
        for g in &gate.layers {
            let want = &r["gate_embedding"]["layers"][g.layer.to_string()];
            let d = max_abs_diff(&g.similarity, &matrix(&want["similarity"]));
            assert!(d <= TOL, "{name} layer {}: router sim {d:e}", g.layer);
            for m in Matrix::ALL {
                let got = g.r.get(m).expect("r is defined for 8 experts");
                let want = want["r"][m.name()].as_f64().unwrap();
                assert!(
                    got.is_finite() && (got - want).abs() <= TOL,
                    "{name} r {got} vs {want}"
                );
            }
        }
    }
}

/// gpt-oss with MXFP4 experts packed as the official checkpoints
/// (`gate_up_proj_blocks` [E, 2I, H/32, 16], rows alternating gate and up,
/// `down_proj_blocks` [E, H, I/32, 16], e8m0 `_scales`): the stacked tensors
/// equal, bit for bit, what transformers' GptOssExperts holds after its own
/// MXFP4 dequantisation (`[E, H, 2I]`, `[E, I, H]`), and each expert's
/// gate / up / down views are its even / odd columns and its transpose
/// (fixtures/make_gpt_oss_forward_ref.py).
#[test]
fn gpt_oss_mxfp4_experts_are_transformers_dequantisation() {
    let name = "families/gpt_oss_mxfp4";
    let model = Model::open(&fixture(name)).unwrap();
    assert_eq!(model.dtype().name(), "mxfp4");
    assert_eq!(model.info.family.id(), "gpt_oss");
    let want = Weights::open_file(&fixture(name).join("mxfp4_reference.safetensors")).unwrap();
    let (n, h, i) = (
        model.info.num_experts,
        model.info.hidden_size,
        model.info.expert_intermediate,
    );
    let bits = |what: &str, got: &[f32], exp: &[f32]| {
        assert_eq!(got.len(), exp.len(), "{what}");
        for (k, (g, e)) in got.iter().zip(exp).enumerate() {
            assert!(g.is_finite(), "{what}[{k}]");
            assert_eq!(g.to_bits(), e.to_bits(), "{what}[{k}]: {g} vs {e}");
        }
        got.len()
    };
    let mut compared = 0;
    for &layer in &model.info.moe_layers {
        let p = format!("model.layers.{layer}.mlp.experts.");
        let gu_name = format!("{p}gate_up_proj");
        let dn_name = format!("{p}down_proj");
        let gu = want.tensor(&gu_name).unwrap();
        let dn = want.tensor(&dn_name).unwrap();
        assert_eq!(
            (&gu.shape[..], &dn.shape[..]),
            (&[n, h, 2 * i][..], &[n, i, h][..])
        );
        let (gu, dn) = (gu.to_f32_vec(), dn.to_f32_vec());
        for (t, exp) in [(&gu_name, &gu), (&dn_name, &dn)] {
            let view = model.weights().tensor(t).unwrap();
            assert_eq!(view.dtype.name(), "mxfp4");
            compared += bits(t, &view.to_f32_vec(), exp);
            let mut part = vec![0f32; 77];
            view.read_f32(130, &mut part);
            assert_eq!(part, exp[130..207], "{t}: a range");
        }
        for e in 0..n {
            let v = model.expert(layer, e).unwrap();
            assert_eq!(
                (&v.gate.shape[..], &v.down.shape[..]),
                (&[i, h][..], &[h, i][..])
            );
            let col = |r: usize, c: usize, off: usize| gu[(e * h + c) * 2 * i + 2 * r + off];
            let gate: Vec<f32> = (0..i * h).map(|k| col(k / h, k % h, 0)).collect();
            let up: Vec<f32> = (0..i * h).map(|k| col(k / h, k % h, 1)).collect();
            let down: Vec<f32> = (0..h * i)
                .map(|k| dn[(e * i + k % i) * h + k / i])
                .collect();
            let what = format!("layer {layer} expert {e}");
            compared += bits(&format!("{what} gate"), &v.gate.to_f32_vec(), &gate);
            compared += bits(&format!("{what} up"), &v.up.to_f32_vec(), &up);
            compared += bits(&format!("{what} down"), &v.down.to_f32_vec(), &down);
        }
    }
    let layers = model.info.moe_layers.len();
    assert_eq!(layers, 2);
    assert_eq!(compared, layers * 2 * (3 * n * i * h));
}

/// MXFP4 blocks that disagree with config.json are named, not misread.
#[test]
fn gpt_oss_mxfp4_blocks_are_checked_against_the_config() {
    let dir = common::copy_fixture("families/gpt_oss_mxfp4");
    common::edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), 64.into());
    });
    let e = match Model::open(dir.path()) {
        Ok(_) => panic!("a config wider than the blocks was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("model.safetensors")
            && e.contains("gate_up_proj_blocks")
            && e.contains("[6, 64, 32]")
            && e.contains("[6, 128, 32]"),
        "{e}"
    );
}

/// Rewrites `dir/model.safetensors` through `edit(name, tag, shape, bytes)`;
/// a tensor for which it returns `None` is dropped.
fn rewrite(
    dir: &std::path::Path,
    mut edit: impl FnMut(&str, &str, &[usize], &[u8]) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    use moe_inspect::model::writer::{write, TensorSpec};
    let path = dir.join("model.safetensors");
    let w = Weights::open_file(&path).unwrap();
    let mut out = Vec::new();
    for name in w.names() {
        let (tag, shape, bytes) = w.raw(name).unwrap();
        if let Some((tag, shape, bytes)) = edit(name, tag, shape, bytes) {
            out.push((TensorSpec::new(name, &tag, &shape), bytes));
        }
    }
    drop(w);
    write(&path, &out).unwrap();
}

fn open_err(dir: &std::path::Path) -> String {
    match Model::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
    }
}

#[test]
fn unknown_quantisation_methods_and_formats_are_named() {
    let dir = common::copy_fixture("qwen3-moe-int4");
    common::edit_config(dir.path(), |c| {
        c["quantization_config"]["quant_method"] = "bitsandbytes".into();
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("quant_method") && e.contains("`bitsandbytes`"),
        "{e}"
    );
    common::edit_config(dir.path(), |c| {
        c["quantization_config"]["quant_method"] = "compressed-tensors".into();
        c["quantization_config"]["format"] = "sparse-24-bitmask".into();
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("`sparse-24-bitmask`"),
        "{e}"
    );
}

#[test]
fn an_fp8_weight_without_its_scale_is_an_error_not_raw_fp8() {
    // Before compressed-tensors support, such a checkpoint loaded and its
    // per-channel scales were silently ignored.
    let gone = "model.layers.1.mlp.experts.2.up_proj.weight_scale";
    let dir = common::copy_fixture("qwen3-moe-fp8");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        (name != gone).then(|| (tag.to_string(), shape.to_vec(), bytes.to_vec()))
    });
    let e = open_err(dir.path());
    assert!(e.contains(gone), "{e}");

    // A per-channel scale of the wrong length.
    let dir = common::copy_fixture("qwen3-moe-fp8");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        Some(if name == gone {
            (tag.to_string(), vec![shape[0] - 1, 1], bytes[4..].to_vec())
        } else {
            (tag.to_string(), shape.to_vec(), bytes.to_vec())
        })
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(gone) && e.contains("[47, 1]") && e.contains("[48, 1]"),
        "{e}"
    );

    // A packed module named in the ignore list.
    let dir = common::copy_fixture("qwen3-moe-int4");
    common::edit_config(dir.path(), |c| {
        c["quantization_config"]["ignore"]
            .as_array_mut()
            .unwrap()
            .push("model.layers.2.mlp.experts.5.down_proj".into());
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("model.layers.2.mlp.experts.5.down_proj.weight_packed") && e.contains("ignore"),
        "{e}"
    );

    // A scaled FP8 module named in the ignore list (a regex this time).
    let dir = common::copy_fixture("qwen3-moe-fp8");
    common::edit_config(dir.path(), |c| {
        c["quantization_config"]["ignore"]
            .as_array_mut()
            .unwrap()
            .push("re:.*experts\\.3\\.up_proj$".into());
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("model.layers.1.mlp.experts.3.up_proj.weight") && e.contains("ignore"),
        "{e}"
    );
}

#[test]
fn packed_shapes_are_checked_against_weight_shape() {
    let bad = "model.layers.1.mlp.experts.0.gate_proj.weight_shape";
    let dir = common::copy_fixture("qwen3-moe-int4");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        let mut b = bytes.to_vec();
        if name == bad {
            b[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        }
        Some((tag.to_string(), shape.to_vec(), b))
    });
    let e = open_err(dir.path());
    assert!(e.contains(bad) && e.contains("weight_packed"), "{e}");
}

#[test]
fn gptq_group_indices_and_awq_versions_are_checked() {
    let bad = "model.layers.1.mlp.experts.4.up_proj.g_idx";
    let dir = common::copy_fixture("qwen3-moe-gptq");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        let mut b = bytes.to_vec();
        if name == bad {
            b[12..16].copy_from_slice(&99i32.to_le_bytes());
        }
        Some((tag.to_string(), shape.to_vec(), b))
    });
    let e = open_err(dir.path());
    assert!(e.contains(bad) && e.contains("entry 3 is 99"), "{e}");

    let dir = common::copy_fixture("qwen3-moe-awq");
    common::edit_config(dir.path(), |c| {
        c["quantization_config"]["version"] = "gemv".into();
    });
    let e = open_err(dir.path());
    assert!(e.contains("config.json") && e.contains("`gemv`"), "{e}");
}

/// FP4 and act-order parts are validated when the checkpoint opens: a
/// g_idx naming a group that does not exist, a missing g_idx, an NVFP4
/// scale of the wrong shape, a missing global scale, and FP4 bytes under a
/// group whose format is not an FP4 packing.
#[test]
fn fp4_scales_and_act_order_indices_are_checked() {
    let g_idx = "model.layers.0.mlp.up_proj.weight_g_idx";
    let dir = common::copy_fixture("qwen3-moe-fp4");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        let mut b = bytes.to_vec();
        if name == g_idx {
            b[20..24].copy_from_slice(&7i32.to_le_bytes());
        }
        Some((tag.to_string(), shape.to_vec(), b))
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(g_idx) && e.contains("column 5 names group 7"),
        "{e}"
    );

    let dir = common::copy_fixture("qwen3-moe-fp4");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        (name != g_idx).then(|| (tag.to_string(), shape.to_vec(), bytes.to_vec()))
    });
    assert!(open_err(dir.path()).contains(g_idx));

    let scale = "model.layers.2.mlp.experts.6.down_proj.weight_scale";
    let dir = common::copy_fixture("qwen3-moe-fp4");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        Some(if name == scale {
            (
                tag.to_string(),
                vec![shape[0] - 1, shape[1]],
                bytes[shape[1]..].to_vec(),
            )
        } else {
            (tag.to_string(), shape.to_vec(), bytes.to_vec())
        })
    });
    let e = open_err(dir.path());
    assert!(e.contains(scale) && e.contains("F8_E4M3 [32, 3]"), "{e}");

    let global = "model.layers.1.mlp.experts.0.down_proj.weight_global_scale";
    let dir = common::copy_fixture("qwen3-moe-fp4");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        (name != global).then(|| (tag.to_string(), shape.to_vec(), bytes.to_vec()))
    });
    assert!(open_err(dir.path()).contains(global));

    // A zero global scale (every value would decode to infinity or NaN).
    let dir = common::copy_fixture("qwen3-moe-fp4");
    rewrite(dir.path(), |name, tag, shape, bytes| {
        let b = if name == global {
            vec![0u8; bytes.len()]
        } else {
            bytes.to_vec()
        };
        Some((tag.to_string(), shape.to_vec(), b))
    });
    let e = open_err(dir.path());
    assert!(e.contains(global) && e.contains("positive finite"), "{e}");

    let dir = common::copy_fixture("qwen3-moe-fp4");
    common::edit_config(dir.path(), |c| {
        c["quantization_config"]["config_groups"]["group_1"]["format"] = "pack-quantized".into();
    });
    let e = open_err(dir.path());
    assert!(e.contains("weight_packed") && e.contains("group_1"), "{e}");
}

/// The formats of qwen3-moe-fp4 each reach the modules they target: an
/// MXFP4 expert, an NVFP4 down projection and the act-order dense MLP all
/// decode to the package's values (checked bit for bit above), and report
/// their own storage type.
#[test]
fn mixed_precision_groups_give_each_module_its_format() {
    let model = Model::open(&fixture("qwen3-moe-fp4")).unwrap();
    let w = model.weights();
    for (t, dtype) in [
        ("model.layers.1.mlp.experts.0.gate_proj.weight", "mxfp4"),
        ("model.layers.2.self_attn.q_proj.weight", "mxfp4"),
        ("model.layers.1.mlp.experts.2.down_proj.weight", "nvfp4"),
        ("model.layers.0.mlp.up_proj.weight", "int4"),
        ("model.layers.1.mlp.gate.weight", "f32"),
    ] {
        assert_eq!(w.tensor(t).unwrap().dtype.name(), dtype, "{t}");
    }
}
