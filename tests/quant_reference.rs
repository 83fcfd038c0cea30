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
const QUANT_FIXTURES: [(&str, &str); 2] =
    [("qwen3-moe-fp8", "f8_e4m3"), ("qwen3-moe-int4", "int4")];

#[test]
fn dequantised_weights_equal_the_formats_own_dequantisation() {
    for (name, dtype) in QUANT_FIXTURES {
        let model = Model::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.dtype().name(), dtype, "{name}");
        let want = Weights::open_file(&fixture(name).join("dequantised.safetensors")).unwrap();
        let names = want.names();
        assert_eq!(names.len(), 5, "{name}: samples");
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
        .chain(["mixtral-gguf"]);
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
