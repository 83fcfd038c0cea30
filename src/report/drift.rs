//! Output of `check`, `review` and `diff`: the drift table, JUnit XML, GitHub
//! Actions annotations and the Markdown step summary.

use tabled::builder::Builder;
use tabled::settings::Style;

use crate::golden::compare::{Comparison, DriftRow, Verdict};
use crate::golden::diff::ExpertCosines;
use crate::model::Matrix;
use crate::report::svg::esc as xml;
use crate::report::table::wrap_text;

/// A number for tables: 4 significant decimals, small values in exponent form.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if !v.is_finite() {
        format!("{v}")
    } else if v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

fn delta(v: f64) -> String {
    if v > 0.0 {
        format!("+{}", num(v))
    } else {
        num(v)
    }
}

fn paint(s: &str, code: &str, color: bool) -> String {
    if color {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// A metric name on two lines at its last `.` (`expert-similarity` /
/// `.up`), or after a `-` when it has no `.` (`routing-top1-` / `agreement`),
/// so that no line is longer than 17 characters where it can be helped.
fn split_metric(m: &str) -> String {
    const MAX: usize = 17;
    if m.len() <= MAX {
        return m.to_string();
    }
    let at = m.rfind('.').or_else(|| {
        m.get(..=MAX)
            .and_then(|head| head.rfind('-'))
            .map(|i| i + 1)
    });
    match at {
        Some(i) if i > 0 && i < m.len() => format!("{}\n{}", &m[..i], &m[i..]),
        _ => m.to_string(),
    }
}

/// The drift table of one comparison: rows beyond tolerance (all rows with
/// `all`), then notices, then a one-line verdict.
/// `columns` names the two sides (`golden`/`now`, `baseline`/`candidate`).
/// The table is wrapped to `width` display columns (`None`: no limit).
pub fn table(
    cmp: &Comparison,
    all: bool,
    color: bool,
    columns: [&str; 2],
    width: Option<usize>,
) -> String {
    let mut out = String::new();
    let shown: Vec<&DriftRow> = cmp
        .rows
        .iter()
        .filter(|r| all || r.verdict == Verdict::Drift)
        .collect();
    let drifted = cmp.drifted().count();
    if !shown.is_empty() {
        let build = |split_names: bool| {
            let mut b = Builder::default();
            b.push_record([
                "metric", "layer", columns[0], columns[1], "delta", "limit", "result",
            ]);
            for r in &shown {
                let verdict = match r.verdict {
                    Verdict::Ok => "ok".to_string(),
                    Verdict::Drift => "DRIFT".to_string(),
                };
                b.push_record([
                    if split_names {
                        split_metric(&r.metric)
                    } else {
                        r.metric.clone()
                    },
                    r.layer.to_string(),
                    num(r.golden),
                    num(r.now),
                    delta(r.delta),
                    r.tolerance_text(),
                    verdict,
                ]);
            }
            b.build()
        };
        // Too wide for the terminal: metric names break at their own
        // separators (`expert-similarity` / `.up`), not in mid-word.
        let natural = crate::report::table::fit(build(false), None);
        let too_wide = width.is_some_and(|w| natural.lines().any(|l| l.chars().count() > w));
        out.push_str(&if too_wide {
            crate::report::table::fit(build(true), width)
        } else {
            natural
        });
        out.push('\n');
        let explained = |r: &&&DriftRow| {
            !r.detail.is_empty() && r.verdict == Verdict::Drift && r.metric != "router-jsd"
        };
        for r in shown.iter().filter(explained) {
            out.push_str(&wrap_text(
                &format!("  {} (layer {}): {}", r.metric, r.layer, r.detail),
                width,
            ));
            out.push('\n');
        }
    }
    for n in &cmp.notices {
        let at = n.layer.map(|l| format!("layer {l}: ")).unwrap_or_default();
        let line = wrap_text(
            &format!("note: {at}{}", n.message),
            width.map(|w| w.max(20)),
        );
        out.push_str(&paint("note:", "1;33", color));
        out.push_str(&line["note:".len()..]);
        out.push('\n');
    }
    let summary = if drifted > 0 {
        paint(
            &format!(
                "{}: DRIFT in {drifted} of {} checks",
                cmp.name,
                cmp.rows.len()
            ),
            "1;31",
            color,
        )
    } else {
        paint(
            &format!(
                "{}: ok, {} checks within tolerance",
                cmp.name,
                cmp.rows.len()
            ),
            "1;32",
            color,
        )
    };
    out.push_str(&summary);
    out.push('\n');
    out
}

/// JUnit XML: one test suite per model, one test case per metric × layer.
pub fn junit(cmps: &[Comparison]) -> String {
    let total: usize = cmps.iter().map(|c| c.rows.len()).sum();
    let failures: usize = cmps.iter().map(|c| c.drifted().count()).sum();
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"moe-inspect check\" tests=\"{total}\" failures=\"{failures}\">\n"
    );
    for c in cmps {
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\">\n",
            xml(&c.name),
            c.rows.len(),
            c.drifted().count()
        ));
        for r in &c.rows {
            let name = format!("{} layer {}", r.metric, r.layer);
            let class = format!("moe-inspect.{}", c.name);
            match r.verdict {
                Verdict::Ok => out.push_str(&format!(
                    "    <testcase name=\"{}\" classname=\"{}\"/>\n",
                    xml(&name),
                    xml(&class)
                )),
                Verdict::Drift => out.push_str(&format!(
                    "    <testcase name=\"{}\" classname=\"{}\">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    xml(&name),
                    xml(&class),
                    xml(&message(r)),
                    xml(&r.detail)
                )),
            }
        }
        for n in &c.notices {
            let at = n.layer.map(|l| format!("layer {l}: ")).unwrap_or_default();
            out.push_str(&format!(
                "    <system-out>{}</system-out>\n",
                xml(&format!("{at}{}", n.message))
            ));
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

fn message(r: &DriftRow) -> String {
    format!(
        "{} at layer {}: golden {}, now {} (delta {}, tolerance {})",
        r.metric,
        r.layer,
        num(r.golden),
        num(r.now),
        delta(r.delta),
        r.tolerance_text()
    )
}

/// GitHub Actions workflow commands: one `::error` per drifted metric, one
/// `::notice` per notice.
/// Each comparison comes with its golden file, which the annotations name
/// (`file=golden/<name>.json`) so GitHub shows them on that file.
pub fn github_annotations(cmps: &[(&Comparison, Option<&std::path::Path>)]) -> String {
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A")
    };
    let mut out = String::new();
    for &(c, golden) in cmps {
        // Property values escape `,` and `:` too (GitHub's workflow commands).
        let file = golden
            .map(|p| {
                format!(
                    "file={},",
                    esc(&p.display().to_string())
                        .replace(',', "%2C")
                        .replace(':', "%3A")
                )
            })
            .unwrap_or_default();
        for r in c.drifted() {
            out.push_str(&format!(
                "::error {file}title={}::{}\n",
                esc(&format!(
                    "moe-inspect drift: {} {} layer {}",
                    c.name, r.metric, r.layer
                ))
                .replace(',', "%2C")
                .replace(':', "%3A"),
                esc(&message(r))
            ));
        }
        for n in &c.notices {
            let at = n.layer.map(|l| format!("layer {l}: ")).unwrap_or_default();
            out.push_str(&format!(
                "::notice {file}title={}::{}\n",
                esc(&format!("moe-inspect {}", c.name))
                    .replace(',', "%2C")
                    .replace(':', "%3A"),
                esc(&format!("{at}{}", n.message))
            ));
        }
    }
    out
}

/// The Markdown step summary.
pub fn markdown_summary(cmps: &[Comparison]) -> String {
    let mut out = String::from("## moe-inspect check\n\n");
    for c in cmps {
        let drifted: Vec<&DriftRow> = c.drifted().collect();
        if drifted.is_empty() {
            out.push_str(&format!(
                "- **{}**: ok, {} checks within tolerance\n",
                c.name,
                c.rows.len()
            ));
            continue;
        }
        out.push_str(&format!(
            "- **{}**: drift in {} of {} checks\n\n",
            c.name,
            drifted.len(),
            c.rows.len()
        ));
        out.push_str("| metric | layer | golden | now | delta | tolerance |\n|---|---:|---:|---:|---:|---|\n");
        for r in drifted {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.metric,
                r.layer,
                num(r.golden),
                num(r.now),
                delta(r.delta),
                r.tolerance_text()
            ));
        }
        out.push('\n');
    }
    out
}

/// `diff`: per layer and matrix, the lowest and mean cosine between
/// corresponding experts' weights.
pub fn expert_cosine_table(layers: &[ExpertCosines]) -> String {
    let mut b = Builder::default();
    b.push_record(["layer", "matrix", "min cosine (expert)", "mean cosine"]);
    for l in layers {
        for m in Matrix::ALL {
            let v = l.matrices.get(m);
            let (imin, min) =
                v.iter()
                    .copied()
                    .enumerate()
                    .fold(
                        (0, f64::INFINITY),
                        |a, (i, x)| if x < a.1 { (i, x) } else { a },
                    );
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            b.push_record([
                l.layer.to_string(),
                m.name().to_string(),
                format!("{min:.6} ({imin})"),
                format!("{mean:.6}"),
            ]);
        }
    }
    b.build().with(Style::rounded()).to_string()
}

#[cfg(test)]
mod split_tests {
    use super::split_metric;

    #[test]
    fn metric_names_split_at_their_separators() {
        assert_eq!(
            split_metric("expert-similarity.up"),
            "expert-similarity\n.up"
        );
        assert_eq!(
            split_metric("routing-top1-agreement"),
            "routing-top1-\nagreement"
        );
        assert_eq!(split_metric("router-jsd"), "router-jsd");
        assert_eq!(split_metric("norm-score-top1"), "norm-score-top1");
        assert_eq!(split_metric("x".repeat(30).as_str()), "x".repeat(30));
    }
}
