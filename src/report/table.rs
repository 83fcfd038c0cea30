//! Terminal tables (tabled).

use tabled::builder::Builder;
use tabled::settings::peaker::Priority;
use tabled::settings::{Style, Width};
use tabled::Table;

use crate::analysis::results::{LayerMatrices, Report};
use crate::model::Matrix;

/// With at most this many layers, every matrix is printed in full; beyond
/// that a one-line-per-layer summary keeps the output readable.
pub const FULL_TABLE_LAYERS: usize = 4;

/// With more experts than this, similarity matrices are summarised unless
/// `--full` is given (an E×E matrix of 13+ experts does not read at a glance).
pub const FULL_MATRIX_EXPERTS: usize = 12;

/// A table in the rounded style, wrapped to `width` display columns (the
/// widest columns shrink first; `None`: as wide as the content).
pub fn fit(mut table: Table, width: Option<usize>) -> String {
    table.with(Style::rounded());
    if let Some(w) = width {
        table.with(Width::wrap(w).priority(Priority::max(true)));
    }
    table.to_string()
}

/// Word-wraps `text` to `width` columns (counted in chars); words longer
/// than the width are split.
pub fn wrap_text(text: &str, width: Option<usize>) -> String {
    let Some(w) = width.filter(|&w| w > 0) else {
        return text.to_string();
    };
    let mut lines: Vec<String> = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        let mut len = 0usize;
        for word in para.split(' ') {
            let mut word: Vec<char> = word.chars().collect();
            let sep = usize::from(len > 0);
            if len + sep + word.len() > w && len > 0 {
                lines.push(std::mem::take(&mut line));
                len = 0;
            }
            while word.len() > w {
                let rest = word.split_off(w);
                lines.push(word.into_iter().collect());
                word = rest;
            }
            if len > 0 {
                line.push(' ');
                len += 1;
            }
            len += word.len();
            line.extend(word);
        }
        lines.push(line);
    }
    lines.join("\n")
}

/// Display width (chars) of the widest line of `s`.
pub fn text_width(s: &str) -> usize {
    s.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

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

/// The `n` most and `n` least similar pairs of the strict lower triangle,
/// as `(value, row, column)`, most similar first / least similar first.
pub fn extreme_pairs(m: &[Vec<f64>], n: usize) -> (Vec<Cell>, Vec<Cell>) {
    let mut cells: Vec<Cell> = m
        .iter()
        .enumerate()
        .flat_map(|(i, row)| row.iter().take(i).enumerate().map(move |(j, &v)| (v, i, j)))
        .filter(|c| !c.0.is_nan())
        .collect();
    cells.sort_by(|a, b| b.0.total_cmp(&a.0));
    let most = cells.iter().take(n).copied().collect();
    let least = cells.iter().rev().take(n).copied().collect();
    (most, least)
}

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

fn summary_table(layers: &[LayerMatrices], width: Option<usize>) -> String {
    let mut b = Builder::default();
    b.push_record(["layer", "matrix", "mean", "most similar", "least similar"]);
    let pair =
        |l: &LayerMatrices, c: &Cell| format!("{:.3} ({},{})", c.0, l.labels[c.2], l.labels[c.1]);
    for l in layers {
        for m in Matrix::ALL {
            let x = l.get(m);
            if let Some((mean, _, _)) = off_diagonal_stats(x) {
                let (most, least) = extreme_pairs(x, 3);
                let list = |v: &[Cell]| v.iter().map(|c| pair(l, c)).collect::<Vec<_>>().join("\n");
                b.push_record([
                    l.layer.to_string(),
                    m.name().to_string(),
                    format!("{mean:.3}"),
                    list(&most),
                    list(&least),
                ]);
            }
        }
    }
    fit(b.build(), width)
}

/// Whether the E×E matrices of `layers` are printed in full: with `--full`,
/// or with at most [`FULL_TABLE_LAYERS`] layers of at most
/// [`FULL_MATRIX_EXPERTS`] experts whose matrix fits the width.
fn show_matrices(layers: &[LayerMatrices], style: Styling) -> bool {
    if style.full {
        return true;
    }
    layers.len() <= FULL_TABLE_LAYERS
        && layers.iter().all(|l| {
            l.labels.iter().filter(|x| x.as_str() != "F").count() <= FULL_MATRIX_EXPERTS
                && style.width.is_none_or(|w| {
                    Matrix::ALL.iter().all(|&m| {
                        l.get(m).is_empty() || text_width(&matrix_table(&l.labels, l.get(m))) <= w
                    })
                })
        })
}

/// Styling of the terminal output: colour, width, and whether similarity
/// matrices are printed in full whatever their size (`analyze --full`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Styling {
    /// Colour the output (ANSI escapes).
    pub color: bool,
    /// Display columns to fit; `None`: no limit.
    pub width: Option<usize>,
    /// Print every E×E similarity matrix, never a summary.
    pub full: bool,
}

impl Styling {
    /// A title line, word-wrapped to the width, then coloured.
    fn title(&self, s: &str) -> String {
        let s = wrap_text(s, self.width);
        if self.color {
            format!("\x1b[1;36m{s}\x1b[0m")
        } else {
            s
        }
    }

    /// A table fitted to the width.
    fn fit(&self, table: Table) -> String {
        fit(table, self.width)
    }
}

fn similarity_tables(
    out: &mut String,
    name: &str,
    what: &str,
    layers: &[LayerMatrices],
    style: Styling,
) {
    out.push('\n');
    if show_matrices(layers, style) {
        for l in layers {
            for mat in Matrix::ALL {
                out.push_str(&style.title(&format!(
                    "{name} · layer {} · {} ({what})",
                    l.layer,
                    mat.name()
                )));
                out.push('\n');
                out.push_str(&matrix_table(&l.labels, l.get(mat)));
                out.push_str("\n\n");
            }
        }
    } else {
        let experts = layers.iter().map(|l| l.labels.len()).max().unwrap_or(0);
        out.push_str(&style.title(&format!(
            "{name} · {} layer{} (summary of the {experts}×{experts} matrices, {what}: mean off-diagonal, 3 most and least similar pairs; --full prints them)",
            layers.len(),
            if layers.len() == 1 { "" } else { "s" }
        )));
        out.push('\n');
        out.push_str(&summary_table(layers, style.width));
        out.push('\n');
    }
}

fn opt(x: &Option<f64>) -> String {
    x.map_or("n/a".to_string(), |v| format!("{v:.3}"))
}

/// Renders a report for the terminal.
pub fn render(report: &Report, style: Styling) -> String {
    let m = &report.model;
    let mut out = format!(
        "{}\n",
        style.title(&format!(
            "{} — {} · {} layers ({} MoE) · {} experts, top-{} · hidden {} · expert width {} · {}",
            m.path,
            m.family,
            m.num_layers,
            m.moe_layers.len(),
            m.num_experts,
            m.top_k,
            m.hidden_size,
            m.intermediate_size,
            m.dtype
        ))
    );
    let a = &report.analyses;
    if let Some(sim) = &a.expert_similarity {
        similarity_tables(
            &mut out,
            "expert-similarity",
            "cosine of flattened weights",
            &sim.layers,
            style,
        );
    }
    if let Some(sim) = &a.neuron_similarity {
        similarity_tables(
            &mut out,
            "neuron-similarity",
            "cosine of mean neurons",
            &sim.layers,
            style,
        );
    }
    if let Some(g) = &a.gate_embedding {
        out.push('\n');
        out.push_str(&style.title("gate-embedding · r² of gate similarity vs neuron similarity, mean over MoE layers (paper Table 3)"));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record(["model", "up", "gate", "down"]);
        b.push_record([
            m.path.clone(),
            opt(&g.r2_avg.up),
            opt(&g.r2_avg.gate),
            opt(&g.r2_avg.down),
        ]);
        out.push_str(&style.fit(b.build()));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record([
            "layer", "r up", "r gate", "r down", "r² up", "r² gate", "r² down",
        ]);
        for l in &g.layers {
            b.push_record([
                l.layer.to_string(),
                opt(&l.r.up),
                opt(&l.r.gate),
                opt(&l.r.down),
                opt(&l.r2.up),
                opt(&l.r2.gate),
                opt(&l.r2.down),
            ]);
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
    }
    if let Some(r) = &a.neuron_reorder {
        out.push('\n');
        out.push_str(
            &style.title("neuron-reorder · expert pairs after optimal neuron permutation (τ: Kendall rank correlation)"),
        );
        out.push('\n');
        let mut b = Builder::default();
        b.push_record([
            "layer",
            "matrix",
            "mean sim",
            "max sim (pair)",
            "mean τ",
            "min τ",
        ]);
        for l in &r.layers {
            for mat in Matrix::ALL {
                let x = l.matrices.get(mat);
                if let (Some((ms, _, mx)), Some((mt, mn, _))) = (
                    off_diagonal_stats(&x.similarity),
                    off_diagonal_stats(&x.kendall_tau),
                ) {
                    b.push_record([
                        l.layer.to_string(),
                        mat.name().to_string(),
                        format!("{ms:.3}"),
                        format!("{:.3} ({}, {})", mx.0, mx.2, mx.1),
                        format!("{mt:.3}"),
                        format!("{:.3}", mn.0),
                    ]);
                }
            }
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
    }
    if let Some(p) = &a.projection {
        out.push('\n');
        out.push_str(
            &style.title("projection · explained variance of the first two principal components"),
        );
        out.push('\n');
        let mut b = Builder::default();
        b.push_record([
            "layer",
            "matrix",
            "exp. PC1",
            "exp. PC2",
            "neur. PC1",
            "neur. PC2",
            "neuron PCA",
        ]);
        for l in &p.layers {
            for mat in Matrix::ALL {
                let x = l.matrices.get(mat);
                b.push_record([
                    l.layer.to_string(),
                    mat.name().to_string(),
                    format!("{:.3}", x.explained_variance[0]),
                    format!("{:.3}", x.explained_variance[1]),
                    format!("{:.3}", x.neurons.explained_variance[0]),
                    format!("{:.3}", x.neurons.explained_variance[1]),
                    x.neurons.method.clone(),
                ]);
            }
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
    }
    dynamic_tables(&mut out, report, style);
    out
}

fn matrix_table_u64(labels: &[String], m: &[Vec<u64>], width: Option<usize>) -> String {
    let mut b = Builder::default();
    let mut header = vec!["score \\ norm".to_string()];
    header.extend(labels.iter().cloned());
    b.push_record(header);
    for (label, row) in labels.iter().zip(m) {
        let mut rec = vec![label.clone()];
        rec.extend(row.iter().map(|v| v.to_string()));
        b.push_record(rec);
    }
    fit(b.build(), width)
}

fn dynamic_tables(out: &mut String, report: &Report, style: Styling) {
    let a = &report.analyses;
    if let Some(o) = &a.output_similarity {
        let layers: Vec<LayerMatrices> = o
            .layers
            .iter()
            .map(|l| LayerMatrices {
                layer: l.layer,
                labels: l.labels.clone(),
                up: l.mean_angular.clone(),
                gate: Vec::new(),
                down: Vec::new(),
            })
            .collect();
        out.push('\n');
        out.push_str(&style.title(&format!(
            "output-similarity · mean angular similarity 1 - acos(cos)/π of the experts' outputs over {} tokens",
            o.tokens
        )));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record([
            "layer",
            "mean off-diagonal",
            "most similar pair",
            "least similar pair",
        ]);
        for l in &layers {
            if let Some((mean, min, max)) = off_diagonal_stats(&l.up) {
                b.push_record([
                    l.layer.to_string(),
                    format!("{mean:.3}"),
                    format!("{:.3} ({}, {})", max.0, l.labels[max.2], l.labels[max.1]),
                    format!("{:.3} ({}, {})", min.0, l.labels[min.2], l.labels[min.1]),
                ]);
            }
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
        if show_matrices(&layers, style) {
            for l in &layers {
                out.push_str(&format!("layer {}\n", l.layer));
                out.push_str(&matrix_table(&l.labels, &l.up));
                out.push('\n');
            }
        }
    }
    if let Some(n) = &a.norm_score {
        out.push('\n');
        out.push_str(&style.title(&format!(
            "norm-score · highest gate score is also the largest output: {:.3} of tokens (chance {:.3}; paper, Mixtral: ~0.69) · mean Spearman {:.3}",
            n.top1_match_rate, n.chance, n.spearman_mean
        )));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record(["layer", "top-1 match rate"]);
        for l in &n.layers {
            b.push_record([l.layer.to_string(), format!("{:.3}", l.top1_match_rate)]);
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
        let labels: Vec<String> = (0..n.total.len()).map(|r| format!("#{}", r + 1)).collect();
        out.push_str("tokens by (score rank, norm rank), all layers:\n");
        out.push_str(&matrix_table_u64(&labels, &n.total, style.width));
        out.push('\n');
    }
    if let Some(it) = &a.intermediate {
        out.push('\n');
        out.push_str(&style.title(&format!(
            "intermediate · act(gate·x): mean |a| and share above {} × the layer's max |a|",
            it.threshold_fraction
        )));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record(["layer", "expert", "mean |a|", "share above", "top neurons"]);
        for l in &it.layers {
            for (x, e) in l.experts.iter().enumerate() {
                b.push_record([
                    l.layer.to_string(),
                    x.to_string(),
                    format!("{:.4}", e.mean_abs),
                    format!("{:.4}", e.share_above),
                    format!("{:?}", e.top_neurons),
                ]);
            }
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
    }
    if let Some(c) = &a.chosen_experts {
        out.push('\n');
        out.push_str(&style.title(&format!("chosen-experts · routing of {} tokens", c.tokens)));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record([
            "layer",
            "load per expert",
            "balancedness",
            "cv",
            "dead share",
            "exp(H)/E",
        ]);
        for l in &c.layers {
            b.push_record([
                l.layer.to_string(),
                if l.load.len() <= 16 {
                    format!("{:?}", l.load)
                } else {
                    let (mn, mx) = (l.load.iter().min(), l.load.iter().max());
                    format!("min {} / max {}", mn.unwrap_or(&0), mx.unwrap_or(&0))
                },
                format!("{:.3}", l.balancedness),
                format!("{:.3}", l.cv),
                format!("{:.3}", l.dead_share),
                format!("{:.3}", l.entropy_ratio),
            ]);
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
        let mut b = Builder::default();
        b.push_record(["over layers", "min", "p50", "p90", "max"]);
        for (name, q) in [
            ("balancedness", c.summary.balancedness),
            ("cv", c.summary.cv),
            ("dead share", c.summary.dead_share),
            ("exp(H)/E", c.summary.entropy_ratio),
        ] {
            b.push_record([
                name.to_string(),
                format!("{:.3}", q.min),
                format!("{:.3}", q.p50),
                format!("{:.3}", q.p90),
                format!("{:.3}", q.max),
            ]);
        }
        out.push_str(&style.fit(b.build()));
        out.push('\n');
    }
}

/// The `models` listing: one row per family, then each family's tensor
/// names per MoE layer as a list below the table, all fitted to `width`.
pub fn families(rows: &[crate::model::family::FamilyDescription], width: Option<usize>) -> String {
    let mut b = Builder::default();
    b.push_record(["model_type", "examples", "shared", "forward"]);
    for r in rows {
        b.push_record([
            r.model_type.to_string(),
            r.examples.replace(", ", "\n"),
            (if r.shared_experts { "yes" } else { "no" }).to_string(),
            r.forward.to_string(),
        ]);
    }
    let mut out = format!("{}\n", fit(b.build(), width));
    let intro = "Static analyses run on every family; forward `native`: observer, trace and \
                 dynamic analyses run here, `trace`: they need an engine trace. Per family: \
                 router rule; expert activation; tensors per MoE layer; dense layers from:";
    out.push_str(&wrap_text(intro, width.map(|w| w.max(20))));
    out.push('\n');
    for r in rows {
        let line = format!(
            "{}: {}; {}; {}; dense layers from {}",
            r.model_type, r.router_rule, r.activation, r.layout, r.dense_layers
        );
        // Continuation lines indented under the text.
        let text = wrap_text(&line, width.map(|w| w.saturating_sub(2).max(20)));
        for (i, l) in text.lines().enumerate() {
            out.push_str(if i == 0 { "- " } else { "  " });
            out.push_str(l);
            out.push('\n');
        }
    }
    out
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
        let (most, least) = extreme_pairs(&m, 2);
        assert_eq!(most, vec![(0.6, 2, 1), (0.2, 1, 0)]);
        assert_eq!(least, vec![(-0.4, 2, 0), (0.2, 1, 0)]);
    }

    #[test]
    fn wrap_text_fits_and_splits_long_words() {
        let w = wrap_text("aaa bbb cccccccccc d", Some(5));
        assert_eq!(w, "aaa\nbbb\nccccc\nccccc\nd");
        assert_eq!(wrap_text("x y", None), "x y");
    }
}
