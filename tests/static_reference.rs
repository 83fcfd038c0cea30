//! Static analyses on every fixture family against the numpy references that
//! fixtures/make_fixtures.py computed in float64 from the same files.

use moe_inspect_testkit as common;

use common::{fixture, matrix, max_abs_diff, reference, static_fixtures, FAMILY_FIXTURES};
use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions};
use moe_inspect::model::{DenseModel, Matrix, Model};

/// Cosine similarities must match the float64 reference to this (absolute).
const TOL: f64 = 1e-5;

#[test]
fn every_family_reports_the_geometry_the_fixture_script_built() {
    for name in static_fixtures() {
        let model = Model::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = reference(name);
        let info = &model.info;
        assert_eq!(info.family.id(), r["family"].as_str().unwrap(), "{name}");
        assert_eq!(
            info.num_layers as u64,
            r["num_layers"].as_u64().unwrap(),
            "{name}"
        );
        let moe: Vec<usize> = serde_json::from_value(r["moe_layers"].clone()).unwrap();
        let dense: Vec<usize> = serde_json::from_value(r["dense_layers"].clone()).unwrap();
        assert_eq!(info.moe_layers, moe, "{name}: MoE layers");
        assert_eq!(info.dense_layers, dense, "{name}: dense layers");
        assert_eq!(
            info.num_experts as u64,
            r["num_experts"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(info.top_k as u64, r["top_k"].as_u64().unwrap(), "{name}");
        assert_eq!(
            info.hidden_size as u64,
            r["hidden_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            info.expert_intermediate as u64,
            r["moe_intermediate_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            info.shared_intermediate as u64,
            r["shared_intermediate_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(model.dtype().name(), r["dtype"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn expert_similarity_matches_numpy_for_every_family() {
    for name in static_fixtures() {
        let model = Model::open(&fixture(name)).unwrap();
        let opts = AnalyzeOptions {
            analyses: vec![AnalysisKind::ExpertSimilarity],
            layers: None,
            dense: None,
            dynamic: None,
        };
        let report = analysis::run(&model, &opts, &()).unwrap();
        let sim = report.analyses.expert_similarity.unwrap();
        let r = reference(name);
        assert_eq!(sim.layers.len(), model.info.moe_layers.len(), "{name}");
        for l in &sim.layers {
            let want = &r["expert_similarity"][l.layer.to_string()];
            assert_eq!(l.labels.len(), model.info.num_experts, "{name}");
            for m in Matrix::ALL {
                let d = max_abs_diff(l.get(m), &matrix(&want[m.name()]));
                assert!(
                    d <= TOL,
                    "{name} layer {} {}: max |diff| {d:e}",
                    l.layer,
                    m.name()
                );
            }
        }
    }
}

#[test]
fn dense_reference_adds_an_f_row_matching_numpy() {
    let model = Model::open(&fixture("mixtral")).unwrap();
    let dense = DenseModel::open(&fixture("mistral-dense")).unwrap();
    let opts = AnalyzeOptions {
        analyses: vec![AnalysisKind::ExpertSimilarity],
        layers: None,
        dense: Some(&dense),
        dynamic: None,
    };
    let report = analysis::run(&model, &opts, &()).unwrap();
    let r = reference("mixtral");
    for l in &report.analyses.expert_similarity.unwrap().layers {
        assert_eq!(l.labels.last().map(String::as_str), Some("F"));
        assert_eq!(l.labels.len(), model.info.num_experts + 1);
        let want = &r["expert_similarity_dense"][l.layer.to_string()];
        for m in Matrix::ALL {
            let d = max_abs_diff(l.get(m), &matrix(&want[m.name()]));
            assert!(d <= TOL, "layer {} {}: max |diff| {d:e}", l.layer, m.name());
        }
    }
}

#[test]
fn layer_selection_keeps_only_the_chosen_moe_layers() {
    let model = Model::open(&fixture("deepseek-v3")).unwrap();
    let opts = AnalyzeOptions {
        analyses: vec![AnalysisKind::ExpertSimilarity],
        layers: Some(moe_inspect::layers::LayerSelection::parse("0,2").unwrap()),
        dense: None,
        dynamic: None,
    };
    let report = analysis::run(&model, &opts, &()).unwrap();
    let layers: Vec<usize> = report
        .analyses
        .expert_similarity
        .unwrap()
        .layers
        .iter()
        .map(|l| l.layer)
        .collect();
    // Layer 0 is dense (first_k_dense_replace = 1): skipped.
    assert_eq!(layers, vec![2]);
}

fn run_all(name: &str, dense: Option<&DenseModel>) -> moe_inspect::analysis::results::Analyses {
    let model = Model::open(&fixture(name)).unwrap();
    // Every layer selected, so neuron-reorder also covers every MoE layer
    // (by default it runs on the middle one only).
    let all = format!("0..{}", model.info.num_layers);
    let opts = AnalyzeOptions {
        analyses: AnalysisKind::parse_selection("static").unwrap(),
        layers: Some(moe_inspect::layers::LayerSelection::parse(&all).unwrap()),
        dense,
        dynamic: None,
    };
    analysis::run(&model, &opts, &()).unwrap().analyses
}

#[test]
fn neuron_similarity_matches_numpy_for_every_family() {
    for name in static_fixtures() {
        let a = run_all(name, None);
        let r = reference(name);
        for l in &a.neuron_similarity.unwrap().layers {
            let want = &r["neuron_similarity"][l.layer.to_string()];
            for m in Matrix::ALL {
                let d = max_abs_diff(l.get(m), &matrix(&want[m.name()]));
                assert!(d <= TOL, "{name} layer {} {}: {d:e}", l.layer, m.name());
            }
        }
    }
    let dense = DenseModel::open(&fixture("mistral-dense")).unwrap();
    let a = run_all("mixtral", Some(&dense));
    let r = reference("mixtral");
    for l in &a.neuron_similarity.unwrap().layers {
        let want = &r["neuron_similarity_dense"][l.layer.to_string()];
        for m in Matrix::ALL {
            assert!(max_abs_diff(l.get(m), &matrix(&want[m.name()])) <= TOL);
        }
    }
}

#[test]
fn gate_embedding_matches_scipy_pearson_for_every_family() {
    for name in static_fixtures() {
        let g = run_all(name, None).gate_embedding.unwrap();
        let r = &reference(name)["gate_embedding"];
        for l in &g.layers {
            let want = &r["layers"][l.layer.to_string()];
            assert!(
                max_abs_diff(&l.similarity, &matrix(&want["similarity"])) <= TOL,
                "{name}"
            );
            for m in Matrix::ALL {
                let got_r = l.r.get(m).unwrap();
                let got_r2 = l.r2.get(m).unwrap();
                assert!(
                    (got_r - want["r"][m.name()].as_f64().unwrap()).abs() <= TOL,
                    "{name} {}",
                    m.name()
                );
                assert!(
                    (got_r2 - want["r2"][m.name()].as_f64().unwrap()).abs() <= TOL,
                    "{name}"
                );
            }
        }
        for m in Matrix::ALL {
            let got = g.r2_avg.get(m).unwrap();
            assert!(
                (got - r["r2_avg"][m.name()].as_f64().unwrap()).abs() <= TOL,
                "{name}"
            );
        }
    }
}

#[test]
fn neuron_reorder_matches_scipy_assignment_and_kendall_tau() {
    for name in static_fixtures() {
        let a = run_all(name, None).neuron_reorder.unwrap();
        let r = reference(name);
        assert_eq!(
            a.layers.len(),
            r["moe_layers"].as_array().unwrap().len(),
            "{name}"
        );
        for l in &a.layers {
            let want = &r["neuron_reorder"][l.layer.to_string()];
            for m in Matrix::ALL {
                let got = l.matrices.get(m);
                let w = &want[m.name()];
                let d = max_abs_diff(&got.similarity, &matrix(&w["similarity"]));
                assert!(
                    d <= TOL,
                    "{name} layer {} {} similarity: {d:e}",
                    l.layer,
                    m.name()
                );
                // The same optimal permutation: tau is a ratio of integer counts.
                let d = max_abs_diff(&got.kendall_tau, &matrix(&w["kendall_tau"]));
                assert!(
                    d <= 1e-12,
                    "{name} layer {} {} tau: {d:e}",
                    l.layer,
                    m.name()
                );
                let d = max_abs_diff(&got.optimum, &matrix(&w["optimum"]));
                assert!(
                    d <= 1e-9,
                    "{name} layer {} {} optimum: {d:e}",
                    l.layer,
                    m.name()
                );
            }
        }
    }
}

/// Columns of 2-D points equal up to sign, within `tol` of the column's scale.
fn assert_points_match(got: &[[f64; 2]], want: &serde_json::Value, tol: f64, what: &str) {
    let want: Vec<[f64; 2]> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    for c in 0..2 {
        let scale = want
            .iter()
            .map(|p| p[c].abs())
            .fold(0.0, f64::max)
            .max(1e-12);
        let dot: f64 = got.iter().zip(&want).map(|(g, w)| g[c] * w[c]).sum();
        let sign = if dot < 0.0 { -1.0 } else { 1.0 };
        let g: Vec<f64> = got.iter().map(|g| sign * g[c]).collect();
        let w: Vec<f64> = want.iter().map(|w| w[c]).collect();
        let d = common::max_abs_diff_flat(what, &g, &w);
        assert!(
            d <= tol * scale,
            "{what} component {c}: {d:e} (scale {scale:e})"
        );
    }
}

#[test]
fn projection_matches_sklearn_pca_up_to_sign() {
    for name in static_fixtures() {
        let p = run_all(name, None).projection.unwrap();
        let r = reference(name);
        for l in &p.layers {
            let want = &r["projection"][l.layer.to_string()];
            for m in Matrix::ALL {
                let got = l.matrices.get(m);
                let w = &want[m.name()];
                let what = format!("{name} layer {} {}", l.layer, m.name());
                let ev: Vec<f64> =
                    serde_json::from_value(w["experts"]["explained_variance"].clone()).unwrap();
                for (g, e) in got.explained_variance.iter().zip(&ev) {
                    assert!((g - e).abs() <= 1e-4, "{what} experts EV {g} vs {e}");
                }
                assert_points_match(
                    &got.points,
                    &w["experts"]["points"],
                    1e-4,
                    &format!("{what} experts"),
                );
                let ev: Vec<f64> =
                    serde_json::from_value(w["neurons"]["explained_variance"].clone()).unwrap();
                for (g, e) in got.neurons.explained_variance.iter().zip(&ev) {
                    assert!((g - e).abs() <= 1e-4, "{what} neurons EV {g} vs {e}");
                }
                assert_points_match(
                    &got.neurons.points,
                    &w["neurons"]["points"],
                    1e-4,
                    &format!("{what} neurons"),
                );
            }
        }
    }
}

/// Relative tolerance of the randomised neuron PCA against sklearn: f32
/// products over 128 coordinates (≈1e-6 relative) — the subspace iteration
/// itself has converged far below that on this spectrum ((λ17/λ2)^8 ≈ 1e-32,
/// printed by fixtures/make_pca_fixture.py).
const RANDOMIZED_PCA_TOL: f64 = 1e-5;

/// `pca-wide` (hidden 128, fixtures/make_pca_fixture.py): the neuron PCA takes
/// the randomised route (hidden > 64), compared with sklearn's exact
/// `PCA(svd_solver="full")` in float64 — explained-variance ratios and every
/// neuron's coordinates, each component up to sign (sklearn's `svd_flip`
/// makes each component's largest loading positive; the Rust code fixes no sign).
#[test]
fn randomized_neuron_pca_matches_sklearn_on_a_wide_fixture() {
    let name = "pca-wide";
    let model = Model::open(&fixture(name)).unwrap();
    assert_eq!(model.info.hidden_size, 128, "{name}: hidden size");
    let neurons = model.info.num_experts * model.info.expert_intermediate;
    let p = run_all(name, None).projection.unwrap();
    let r = reference(name);
    let want_layers = r["projection"].as_object().unwrap();
    assert!(!p.layers.is_empty(), "{name}: no projection layers");
    assert_eq!(p.layers.len(), want_layers.len(), "{name}: layers");
    for l in &p.layers {
        let want = &want_layers[&l.layer.to_string()];
        for m in Matrix::ALL {
            let got = l.matrices.get(m);
            let w = &want[m.name()];
            let what = format!("{name} layer {} {}", l.layer, m.name());
            assert_eq!(got.neurons.method, "randomized", "{what}");
            assert_eq!(got.neurons.points.len(), neurons, "{what}: neuron points");
            for (part, got_ev, got_points) in [
                (
                    "neurons",
                    &got.neurons.explained_variance,
                    &got.neurons.points,
                ),
                ("experts", &got.explained_variance, &got.points),
            ] {
                let ev: Vec<f64> =
                    serde_json::from_value(w[part]["explained_variance"].clone()).unwrap();
                assert_eq!(got_ev.len(), 2, "{what} {part}: ratios");
                let d = common::max_abs_diff_flat(&what, got_ev, &ev);
                assert!(d <= RANDOMIZED_PCA_TOL, "{what} {part} EV: {d:e}");
                assert_points_match(
                    got_points,
                    &w[part]["points"],
                    RANDOMIZED_PCA_TOL,
                    &format!("{what} {part}"),
                );
            }
        }
    }
}

#[test]
fn fp8_block_scaled_weights_are_dequantised_for_the_static_analyses() {
    let model = Model::open(&fixture("deepseek-v3-fp8")).unwrap();
    assert_eq!(model.dtype().name(), "f8_e4m3");
    let r = reference("deepseek-v3-fp8");
    // Direct check of the decoding: weight × the scale of its block.
    for (name, values) in r["dequantised_samples"].as_object().unwrap() {
        let got = model.weights().tensor(name).unwrap().to_f32_vec();
        for (i, want) in values.as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            assert!(
                (got[i] as f64 - want).abs() <= 1e-7 * want.abs().max(1e-3),
                "{name}[{i}]"
            );
        }
    }
    let opts = AnalyzeOptions {
        analyses: vec![
            AnalysisKind::ExpertSimilarity,
            AnalysisKind::NeuronSimilarity,
        ],
        layers: None,
        dense: None,
        dynamic: None,
    };
    let a = analysis::run(&model, &opts, &()).unwrap().analyses;
    for (key, sim) in [
        ("expert_similarity", a.expert_similarity.unwrap()),
        ("neuron_similarity", a.neuron_similarity.unwrap()),
    ] {
        for l in &sim.layers {
            let want = &r[key][l.layer.to_string()];
            for m in Matrix::ALL {
                let d = max_abs_diff(l.get(m), &matrix(&want[m.name()]));
                assert!(d <= TOL, "{key} layer {} {}: {d:e}", l.layer, m.name());
            }
        }
    }
}

#[test]
fn the_new_families_are_read_as_their_own_family_and_layout() {
    // Families whose hub layout stacks the experts.
    let fused = ["gpt_oss", "llama4", "granitemoe", "dbrx"];
    for name in FAMILY_FIXTURES {
        let model = Model::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let id = reference(name)["family"].as_str().unwrap().to_string();
        assert_eq!(model.info.family.id(), id, "{name}");
        assert_eq!(
            model.naming().fused.is_some(),
            fused.contains(&id.as_str()),
            "{name}"
        );
        assert_eq!(
            model.info.family.native_forward(),
            [
                "granitemoe",
                "glm4_moe",
                "minimax_m2",
                "gpt_oss",
                "deepseek_v32",
                "llama4",
                "qwen3_next",
                "qwen3_5_moe"
            ]
            .contains(&id.as_str()),
            "{name}: native forward"
        );
    }
    // The multimodal release: text_config, `language_model.model.layers.`.
    let mm = Model::open(&fixture("families/llama4_multimodal")).unwrap();
    assert_eq!(mm.naming().prefix, "language_model.model.layers.");
    assert!(mm.config.get("text_config").is_some() && mm.config.get("num_hidden_layers").is_none());
    // DBRX: `transformer.blocks.`, d_model / n_layers / ffn_config.*, the
    // three [E·I, H] stacks viewed per expert (down transposed, strided).
    let dbrx = Model::open(&fixture("families/dbrx")).unwrap();
    assert_eq!(dbrx.naming().prefix, "transformer.blocks.");
    let l = dbrx.moe_layer(0).unwrap();
    assert_eq!(l.experts.len(), 8);
    assert_eq!(l.experts[3].gate.shape.to_vec(), vec![16, 32]);
    assert_eq!(l.experts[3].down.shape.to_vec(), vec![32, 16]);
    assert!(!l.experts[3].down.is_contiguous());
    // LongCat-Flash: a router of 8 + 3 rows (3 zero experts), viewed as the
    // 8 routed experts' rows; E = n_routed_experts, the unused gate/up slots
    // of experts 8..10 in the file are not experts.
    let lc = Model::open(&fixture("families/longcat_flash")).unwrap();
    assert_eq!(
        lc.weights()
            .shape("model.layers.0.mlp.router.classifier.weight")
            .unwrap(),
        &[11, 32]
    );
    assert!(lc
        .weights()
        .contains("model.layers.0.mlp.experts.10.gate_proj.weight"));
    let l = lc.moe_layer(1).unwrap();
    assert_eq!(l.router.shape.to_vec(), vec![8, 32]);
    assert_eq!(l.experts.len(), 8);
}
