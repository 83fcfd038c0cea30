//! Golden snapshots of a model's expert behaviour (SPEC §7), schema
//! `moe-inspect/golden/v1`, and the drift gate built on them:
//!
//! - [`build`] computes a [`Snapshot`]: the model's identity, per MoE layer the
//!   static matrices (expert, neuron and router-row similarity, gate-embedding
//!   r²), small per-expert fingerprints used to match experts across
//!   checkpoints, routing statistics over the prompts, norm-score counts, and
//!   the top-k expert ids of every token;
//! - [`compare`] compares two snapshots metric by metric under tolerances;
//! - [`config`] reads `[workspace.metadata.moe-inspect]` with cargo_metadata;
//! - [`diff()`](fn@diff) compares two live checkpoints (also expert-by-expert weights;
//!   module [`mod@diff`]);
//! - [`plan`], [`snapshot`] and [`check()`](fn@check) are the drift gate as a
//!   library: which models, which settings, what is written, as typed outcomes;
//! - [`quant_report`] is `diff`'s quantisation report: weight errors,
//!   routing agreement, attribution of flips, calibration coverage;
//! - [`pending`] handles `*.json.new` files (`review`, `accept`, `reject`).
//!
//! Files are written with [`Snapshot::to_json`]: stable key order, numbers
//! stored as f32 (shortest round-trip form), matrices one row per line, so
//! two runs on the same machine give byte-identical files.

mod build;
mod check;
pub mod compare;
pub mod config;
pub mod diff;
mod io;
pub mod pending;
pub mod quant_report;
mod schema;

pub use build::*;
pub use check::{
    check, dir_name, golden_dir, plan, plan_with_config, prompt_ids, snapshot, Action,
    CheckOutcome, ModelOutcome, Plan, ProgressFor, Recorded, Request, Target,
};
pub use diff::{diff, diff_traces, DiffOptions, DiffOutcome};
pub use schema::*;

#[cfg(test)]
mod tests {
    use super::build::effective_bits;
    use super::io::write_value;
    use super::*;

    #[test]
    fn top_k_ids_round_trip_and_reject_bad_data() {
        let ids: Vec<i16> = vec![0, 7, 3, 255, 1, 2];
        let t = TopKIds::encode(&ids, [3, 1, 2]);
        assert_eq!(t.decode().unwrap(), ids);
        let mut short = t.clone();
        short.shape = [4, 1, 2];
        assert!(short.decode().unwrap_err().to_string().contains("needs 16"));
        let mut bad = t;
        bad.data.push('!');
        assert!(bad.decode().unwrap_err().to_string().contains("base64"));
    }

    #[test]
    fn effective_bits_sees_quantized_rows_only() {
        let wide: Vec<f32> = (0..64).map(|i| i as f32 * 0.37).collect();
        assert_eq!(effective_bits(&[&wide], 16), 16);
        let q4: Vec<f32> = (0..64).map(|i| ((i % 15) as f32 - 7.0) * 0.1).collect();
        let q3: Vec<f32> = (0..64).map(|i| (i % 8) as f32).collect();
        assert_eq!(effective_bits(&[&q4, &q3], 16), 4);
        let q8: Vec<f32> = (0..1024).map(|i| (i % 256) as f32).collect();
        assert_eq!(effective_bits(&[&q8], 32), 8);
    }

    #[test]
    fn sketch_preserves_identity_and_scale_invariance() {
        let v: Vec<f64> = (0..100).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
        let w: Vec<f64> = v.iter().map(|x| 3.0 * x).collect();
        assert_eq!(sketch(&v), sketch(&w));
        let n: f32 = sketch(&v).iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-5);
        let other: Vec<f64> = (0..100).map(|i| ((i * 53) % 7) as f64 - 3.0).collect();
        assert_ne!(sketch(&v), sketch(&other));
    }

    #[test]
    fn selection_parses_groups_and_rejects_unrecorded_analyses() {
        let s = Selection::parse(&["static", "norm-score"]).unwrap();
        assert!(s.expert_similarity && s.gate_embedding && s.norm_score && !s.routing);
        assert_eq!(Selection::parse(&["all"]).unwrap(), Selection::default());
        assert!(Selection::parse(&["projection"])
            .unwrap_err()
            .to_string()
            .contains("projection"));
    }

    #[test]
    fn layout_keeps_matrix_rows_on_one_line() {
        let v = serde_json::json!({"a": [[1.0, 2.5], [3.0, 4.0]], "b": {"c": [1, 2]}});
        let mut out = String::new();
        write_value(&v, 0, &mut out);
        assert_eq!(
            out,
            "{\n  \"a\": [\n    [1.0,2.5],\n    [3.0,4.0]\n  ],\n  \"b\": {\n    \"c\": [1,2]\n  }\n}"
        );
    }
}
