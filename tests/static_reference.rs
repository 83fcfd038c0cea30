//! Static analyses on every fixture family against the numpy references that
//! fixtures/make_fixtures.py computed in float64 from the same files.

mod common;

use common::{fixture, matrix, max_abs_diff, reference, MOE_FIXTURES};
use moe_inspect::analysis::{self, AnalysisKind, AnalyzeOptions};
use moe_inspect::model::{DenseModel, Matrix, Model};

/// Cosine similarities must match the float64 reference to this (absolute).
const TOL: f64 = 1e-5;

#[test]
fn every_family_reports_the_geometry_the_fixture_script_built() {
    for name in MOE_FIXTURES {
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
    for name in MOE_FIXTURES {
        let model = Model::open(&fixture(name)).unwrap();
        let opts = AnalyzeOptions {
            analyses: vec![AnalysisKind::ExpertSimilarity],
            layers: None,
            dense: None,
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
