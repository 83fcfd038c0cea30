//! Output of `diff`'s quantisation report ([`crate::golden::quant_report`]):
//! terminal tables, and a Markdown report with SVG figures (per MoE layer a
//! heatmap of the relative weight errors, experts × matrices, and a bar
//! chart of the tokens each expert received).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::atomic_write::write_atomic;
use crate::error::{Error, Result};
use crate::golden::quant_report::{Attribution, QuantLayer, QuantReport};
use crate::golden::DiffOutcome;
use crate::model::Matrix;
use crate::report::drift::{markdown_summary, num};
use crate::report::svg::{bars, heatmap_rect, nice_ceil, Axes, ColourScale, FIGURE_MARKER};

/// Largest value and its expert (non-finite values count as largest).
fn max_of(v: &[f64]) -> (f64, usize) {
    v.iter().copied().enumerate().fold((0.0, 0), |a, (i, x)| {
        if x > a.0 || (!x.is_finite() && a.0.is_finite()) {
            (x, i)
        } else {
            a
        }
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn share(a: &Attribution) -> String {
    format!("{:.3}", a.router_share)
}

fn flagged_text(l: &QuantLayer) -> String {
    match &l.coverage {
        Some(c) if c.flagged.is_empty() => "-".into(),
        Some(c) => c
            .flagged
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        None => "-".into(),
    }
}

const WEIGHT_HEADER: [&str; 8] = [
    "layer",
    "router",
    "gate max (expert)",
    "gate mean",
    "up max (expert)",
    "up mean",
    "down max (expert)",
    "down mean",
];

/// Whether any layer has a shared expert (its errors get a column).
fn has_shared(q: &QuantReport) -> bool {
    q.layers.iter().any(|l| l.shared_error.is_some())
}

/// The cells of one weight-error row (see [`WEIGHT_HEADER`], then the
/// shared expert's gate/up/down errors when `shared`).
fn weight_cells(l: &QuantLayer, shared: bool) -> Vec<String> {
    let mut row = vec![l.layer.to_string(), num(l.router_error)];
    for m in [Matrix::Gate, Matrix::Up, Matrix::Down] {
        let v = l.weight_error.get(m);
        let (max, at) = max_of(v);
        row.push(format!("{} ({at})", num(max)));
        row.push(num(mean(v)));
    }
    if shared {
        row.push(match &l.shared_error {
            Some(s) => format!("{} / {} / {}", num(s.gate), num(s.up), num(s.down)),
            None => "-".into(),
        });
    }
    row
}

fn weight_header(shared: bool) -> Vec<String> {
    let mut h: Vec<String> = WEIGHT_HEADER.iter().map(|s| s.to_string()).collect();
    if shared {
        h.push("shared gate / up / down".into());
    }
    h
}

/// The weight-error table: per MoE layer the router's relative error and,
/// per matrix, the largest (with its expert) and mean relative error; the
/// shared expert's errors when the family has one.
pub fn weight_table(q: &QuantReport) -> String {
    let shared = has_shared(q);
    let mut b = Builder::default();
    b.push_record(weight_header(shared));
    for l in &q.layers {
        b.push_record(weight_cells(l, shared));
    }
    b.build().with(Style::rounded()).to_string()
}

/// The routing table: agreement, attribution of flips and the experts
/// flagged by calibration coverage, per MoE layer and in total.
pub fn routing_table(q: &QuantReport) -> String {
    let mut b = Builder::default();
    b.push_record([
        "layer",
        "top-1",
        "top-k",
        "JSD",
        "flips",
        "router",
        "upstream",
        "router share",
        &format!("experts < {} tokens", q.coverage_threshold),
    ]);
    for l in &q.layers {
        let (Some(r), Some(a)) = (&l.routing, &l.attribution) else {
            continue;
        };
        b.push_record([
            l.layer.to_string(),
            format!("{:.4}", r.top1),
            format!("{:.4}", r.topk_overlap),
            num(r.jsd),
            a.flips.to_string(),
            a.router_flips.to_string(),
            a.upstream_flips.to_string(),
            share(a),
            flagged_text(l),
        ]);
    }
    if let Some(a) = &q.attribution {
        b.push_record([
            "total".to_string(),
            String::new(),
            String::new(),
            String::new(),
            a.flips.to_string(),
            a.router_flips.to_string(),
            a.upstream_flips.to_string(),
            share(a),
            q.flagged().len().to_string(),
        ]);
    }
    b.build().with(Style::rounded()).to_string()
}

/// The terminal rendering of the quantisation report.
pub fn table(q: &QuantReport) -> String {
    let mut out = String::from("quantisation report: relative weight error ‖W′−W‖/‖W‖\n");
    out.push_str(&weight_table(q));
    out.push('\n');
    if q.attribution.is_some() {
        let _ = writeln!(
            out,
            "routing on {} tokens; a flip is a token whose top-k set changed, a router flip one the baseline router on the candidate's input would not have made:",
            q.tokens
        );
        out.push_str(&routing_table(q));
        out.push('\n');
    }
    out
}

fn md_attribution(a: &Attribution) -> String {
    format!(
        "{} | {} | {} | {:.3}",
        a.flips, a.router_flips, a.upstream_flips, a.router_share
    )
}

/// Writes `report.md` (the quantisation report, the drift summary) and its
/// SVG figures into `dir`; returns the path of `report.md`. `command_line`
/// is written at its top when not empty.
pub fn write_markdown(out: &DiffOutcome, dir: &Path, command_line: &str) -> Result<PathBuf> {
    let Some(q) = &out.quant else {
        return Err(Error::Usage(
            "the Markdown report needs two checkpoints (--baseline, --candidate)".into(),
        ));
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Quantisation report\n");
    let _ = writeln!(
        md,
        "Baseline `{}`, candidate `{}`; generated by moe-inspect {}.\n",
        out.baseline.display(),
        out.candidate.display(),
        env!("CARGO_PKG_VERSION")
    );
    if !command_line.is_empty() {
        let _ = writeln!(md, "Command: `` {} ``\n", command_line.replace('`', "'"));
    }
    let _ = writeln!(md, "## Relative weight error\n");
    let _ = writeln!(
        md,
        "`‖W′−W‖/‖W‖` of each expert matrix and of the router, experts matched as `check` matches them.\n"
    );
    let shared = has_shared(q);
    let header = weight_header(shared);
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---:|".repeat(header.len()));
    for l in &q.layers {
        let _ = writeln!(md, "| {} |", weight_cells(l, shared).join(" | "));
    }
    md.push('\n');
    if let Some(total) = &q.attribution {
        let _ = writeln!(md, "## Routing agreement and attribution\n");
        let _ = writeln!(
            md,
            "On {} tokens. A flip is a token whose candidate top-k set differs from the baseline's; a router flip when the baseline router on the candidate's own layer input picks a different set than the candidate's router, else an upstream flip.\n",
            q.tokens
        );
        let _ = writeln!(
            md,
            "| layer | top-1 | top-k | JSD | flips | router flips | upstream flips | router share |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &q.layers {
            if let (Some(r), Some(a)) = (&l.routing, &l.attribution) {
                let _ = writeln!(
                    md,
                    "| {} | {:.4} | {:.4} | {} | {} |",
                    l.layer,
                    r.top1,
                    r.topk_overlap,
                    num(r.jsd),
                    md_attribution(a)
                );
            }
        }
        let _ = writeln!(md, "| **total** | | | | {} |\n", md_attribution(total));
        let _ = writeln!(md, "## Calibration coverage\n");
        let flagged = q.flagged();
        if flagged.is_empty() {
            let _ = writeln!(
                md,
                "Every expert received at least {} token(s) in both models.\n",
                q.coverage_threshold
            );
        } else {
            let _ = writeln!(
                md,
                "Experts that received fewer than {} token(s) in either model (often left unquantised or badly calibrated by GPTQ-style tools):\n",
                q.coverage_threshold
            );
            let _ = writeln!(
                md,
                "| layer | expert | baseline tokens | candidate tokens |"
            );
            let _ = writeln!(md, "|---:|---:|---:|---:|");
            for l in &q.layers {
                if let Some(c) = &l.coverage {
                    for &e in &c.flagged {
                        let _ = writeln!(
                            md,
                            "| {} | {e} | {} | {} |",
                            l.layer, c.baseline[e], c.candidate[e]
                        );
                    }
                }
            }
            md.push('\n');
        }
    }
    let _ = writeln!(md, "## Figures\n");
    for l in &q.layers {
        figures(&mut md, dir, l)?;
    }
    md.push_str(
        &markdown_summary(std::slice::from_ref(&out.comparison)).replacen(
            "## moe-inspect check",
            "## Drift (as `check`)",
            1,
        ),
    );
    let path = dir.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

fn figure(md: &mut String, dir: &Path, name: &str, alt: &str, svg: &str) -> Result<()> {
    write_atomic(
        &dir.join(name),
        format!("{FIGURE_MARKER}\n{svg}").as_bytes(),
    )?;
    let _ = writeln!(md, "![{alt}]({name})\n");
    Ok(())
}

fn figures(md: &mut String, dir: &Path, l: &QuantLayer) -> Result<()> {
    let e = l.router_row_error.len();
    let labels: Vec<String> = (0..e).map(|i| i.to_string()).collect();
    let rows = vec![
        l.weight_error.gate.clone(),
        l.weight_error.up.clone(),
        l.weight_error.down.clone(),
        l.router_row_error.clone(),
    ];
    let hi = rows
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let svg = heatmap_rect(
        &format!("Layer {}: relative weight error per expert", l.layer),
        &rows,
        &[
            "gate".into(),
            "up".into(),
            "down".into(),
            "router row".into(),
        ],
        &labels,
        ColourScale::Sequential {
            lo: 0.0,
            hi: if hi > 0.0 { nice_ceil(hi) } else { 1.0 },
        },
        Axes {
            x: "expert",
            y: "matrix",
            value: "‖W′−W‖/‖W‖",
        },
    );
    figure(
        md,
        dir,
        &format!("quant-error-layer{}.svg", l.layer),
        &format!("relative weight error, layer {}", l.layer),
        &svg,
    )?;
    if let Some(c) = &l.coverage {
        let values: Vec<f64> = c.baseline.iter().map(|&x| x as f64).collect();
        let svg = bars(
            &format!(
                "Layer {}: tokens per expert (baseline; flagged: {})",
                l.layer,
                flagged_text(l)
            ),
            &values,
            &labels,
            "tokens",
        );
        figure(
            md,
            dir,
            &format!("quant-coverage-layer{}.svg", l.layer),
            &format!("calibration coverage, layer {}", l.layer),
            &svg,
        )?;
    }
    Ok(())
}
