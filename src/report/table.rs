//! Terminal tables (tabled).

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::model::Matrix;
use crate::report::schema::{LayerMatrices, Report};

/// With at most this many layers, every matrix is printed in full; beyond
/// that a one-line-per-layer summary keeps the output readable.
pub const FULL_TABLE_LAYERS: usize = 4;

/// A square matrix with row/column labels, values to 3 decimals.
pub fn matrix_table(labels: &[String], m: &[Vec<f64>]) -> String {
    let mut b = Builder::default();
    let mut header = vec![String::new()];
    header.extend(labels.iter().cloned());
    b.push_record(header);
    for (label, row) in labels.iter().zip(m) {
        let mut rec = vec![label.clone()];
        rec.extend(row.iter().map(|v| format!("{v:.3}")));
        b.push_record(rec);
    }
    b.build().with(Style::rounded()).to_string()
}

/// A value of a matrix with its position `(value, row, column)`.
pub type Cell = (f64, usize, usize);

/// Off-diagonal statistics of a similarity matrix: mean, min cell, max cell
/// (over the strict lower triangle).
pub fn off_diagonal_stats(m: &[Vec<f64>]) -> Option<(f64, Cell, Cell)> {
    let mut sum = 0.0;
    let mut count = 0usize;
    let mut min = (f64::INFINITY, 0, 0);
    let mut max = (f64::NEG_INFINITY, 0, 0);
    for (i, row) in m.iter().enumerate() {
        for (j, &v) in row.iter().enumerate().take(i) {
            sum += v;
            count += 1;
            if v < min.0 {
                min = (v, i, j);
            }
            if v > max.0 {
                max = (v, i, j);
            }
        }
    }
    (count > 0).then(|| (sum / count as f64, min, max))
}

fn summary_table(layers: &[LayerMatrices]) -> String {
    let mut b = Builder::default();
    b.push_record([
        "layer",
        "matrix",
        "mean off-diag",
        "min (pair)",
        "max (pair)",
    ]);
    for l in layers {
        for m in Matrix::ALL {
            if let Some((mean, min, max)) = off_diagonal_stats(l.get(m)) {
                b.push_record([
                    l.layer.to_string(),
                    m.name().to_string(),
                    format!("{mean:.3}"),
                    format!("{:.3} ({}, {})", min.0, l.labels[min.2], l.labels[min.1]),
                    format!("{:.3} ({}, {})", max.0, l.labels[max.2], l.labels[max.1]),
                ]);
            }
        }
    }
    b.build().with(Style::rounded()).to_string()
}

/// Styling of titles on a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Styling {
    pub color: bool,
}

impl Styling {
    fn title(&self, s: &str) -> String {
        if self.color {
            format!("\x1b[1;36m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

/// Renders a report for the terminal.
pub fn render(report: &Report, style: Styling) -> String {
    let m = &report.model;
    let mut out = format!(
        "{} — {} · {} layers ({} MoE) · {} experts, top-{} · hidden {} · expert width {} · {}\n",
        style.title(&m.path),
        m.family,
        m.num_layers,
        m.moe_layers.len(),
        m.num_experts,
        m.top_k,
        m.hidden_size,
        m.intermediate_size,
        m.dtype
    );
    if let Some(sim) = &report.analyses.expert_similarity {
        out.push('\n');
        if sim.layers.len() <= FULL_TABLE_LAYERS {
            for l in &sim.layers {
                for mat in Matrix::ALL {
                    out.push_str(&style.title(&format!(
                        "expert-similarity · layer {} · {} (cosine of flattened weights)",
                        l.layer,
                        mat.name()
                    )));
                    out.push('\n');
                    out.push_str(&matrix_table(&l.labels, l.get(mat)));
                    out.push_str("\n\n");
                }
            }
        } else {
            out.push_str(&style.title(&format!(
                "expert-similarity · {} layers (summary; select layers with --layers for full matrices)",
                sim.layers.len()
            )));
            out.push('\n');
            out.push_str(&summary_table(&sim.layers));
            out.push('\n');
        }
    }
    out
}

/// The `models` listing.
pub fn families(rows: &[crate::model::family::FamilyDescription]) -> String {
    let mut b = Builder::default();
    b.push_record([
        "model_type",
        "examples",
        "tensors per MoE layer",
        "shared experts",
        "dense layers from",
        "static analyses",
    ]);
    for r in rows {
        b.push_record([
            r.model_type,
            r.examples,
            r.layout,
            if r.shared_experts { "yes" } else { "no" },
            r.dense_layers,
            "yes",
        ]);
    }
    format!("{}\n", b.build().with(Style::rounded()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_diagonal_stats_ignore_the_diagonal() {
        let m = vec![
            vec![1.0, 0.2, -0.4],
            vec![0.2, 1.0, 0.6],
            vec![-0.4, 0.6, 1.0],
        ];
        let (mean, min, max) = off_diagonal_stats(&m).unwrap();
        assert!((mean - 0.4 / 3.0).abs() < 1e-12);
        assert_eq!(min, (-0.4, 2, 0));
        assert_eq!(max, (0.6, 2, 1));
    }
}
