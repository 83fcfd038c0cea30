//! Minimal SVG figures, drawn as the paper draws them: heatmaps of similarity
//! matrices with up/gate/down side by side and a shared colour bar.

use std::fmt::Write;

/// Viridis anchor colours (matplotlib's default map), interpolated linearly.
const VIRIDIS: [(f64, f64, f64); 6] = [
    (68.0, 1.0, 84.0),
    (65.0, 68.0, 135.0),
    (42.0, 120.0, 142.0),
    (34.0, 168.0, 132.0),
    (122.0, 209.0, 81.0),
    (253.0, 231.0, 37.0),
];

/// Colour for `t` in [0, 1] and whether text on it should be dark.
pub fn viridis(t: f64) -> (String, bool) {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let c = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    (
        format!("#{:02x}{:02x}{:02x}", c(a.0, b.0), c(a.1, b.1), c(a.2, b.2)),
        t > 0.6,
    )
}

/// Starts an SVG document of the given size on a white background.
pub(crate) fn open_svg(s: &mut String, width: f64, height: f64) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
}

/// Escapes text for XML (SVG text and attributes, JUnit reports).
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One heatmap panel: a title and a square matrix.
pub struct Panel<'a> {
    pub title: &'a str,
    pub matrix: &'a [Vec<f64>],
}

/// Draws panels side by side with one colour scale `[lo, hi]`, tick labels
/// `labels` on both axes, and cell values written in when the matrix is small.
pub fn heatmaps(title: &str, panels: &[Panel<'_>], labels: &[String], lo: f64, hi: f64) -> String {
    let n = labels.len().max(1);
    let cell = (420.0 / n as f64).clamp(6.0, 40.0);
    let side = cell * n as f64;
    let (margin_l, margin_t, gap) = (44.0, 56.0, 36.0);
    let bar_w = 16.0;
    let width = margin_l + panels.len() as f64 * (side + gap) + bar_w + 60.0;
    let height = margin_t + side + 40.0;
    let annotate = n <= 12;
    let tick_step = n.div_ceil(16);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut s = String::new();
    open_svg(&mut s, width, height);
    let _ = writeln!(
        s,
        r#"<text x="{margin_l}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for (p, panel) in panels.iter().enumerate() {
        let x0 = margin_l + p as f64 * (side + gap);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
            x0 + side / 2.0,
            margin_t - 18.0,
            esc(panel.title)
        );
        for (i, row) in panel.matrix.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let (fill, dark_text) = viridis((v - lo) / span);
                let (x, y) = (x0 + j as f64 * cell, margin_t + i as f64 * cell);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{cell:.1}" height="{cell:.1}" fill="{fill}"><title>{} × {}: {v:.4}</title></rect>"#,
                    esc(&labels[i.min(n - 1)]),
                    esc(&labels[j.min(n - 1)])
                );
                if annotate {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="{:.0}" text-anchor="middle" fill="{}">{:.2}</text>"#,
                        x + cell / 2.0,
                        y + cell / 2.0 + 3.5,
                        (cell / 3.4).min(11.0),
                        if dark_text { "black" } else { "white" },
                        v
                    );
                }
            }
        }
        for (k, label) in labels.iter().enumerate().step_by(tick_step) {
            let c = k as f64 * cell + cell / 2.0;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x0 + c,
                margin_t - 4.0,
                esc(label)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"#,
                x0 - 4.0,
                margin_t + c + 3.5,
                esc(label)
            );
        }
    }
    // Colour bar.
    let bx = margin_l + panels.len() as f64 * (side + gap);
    let steps = 32;
    for k in 0..steps {
        let t = 1.0 - k as f64 / steps as f64;
        let (fill, _) = viridis(t);
        let _ = writeln!(
            s,
            r#"<rect x="{bx:.1}" y="{:.1}" width="{bar_w}" height="{:.2}" fill="{fill}"/>"#,
            margin_t + k as f64 * side / steps as f64,
            side / steps as f64 + 0.5
        );
    }
    for (t, v) in [(0.0, hi), (0.5, (lo + hi) / 2.0), (1.0, lo)] {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10">{v:.2}</text>"#,
            bx + bar_w + 4.0,
            margin_t + t * side + 3.5
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A rectangular heatmap (`rows × cols`, e.g. tokens × experts) with its own
/// row and column labels; rows beyond 64 are not drawn (the title says so).
pub fn heatmap_rect(
    title: &str,
    matrix: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    lo: f64,
    hi: f64,
) -> String {
    let rows = matrix.len().min(64);
    let cols = col_labels.len().max(1);
    let cell_w = (480.0 / cols as f64).clamp(6.0, 36.0);
    let cell_h = 16.0;
    let (ml, mt) = (110.0, 50.0);
    let width = ml + cols as f64 * cell_w + 80.0;
    let height = mt + rows as f64 * cell_h + 20.0;
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut s = String::new();
    open_svg(&mut s, width, height);
    let more = if matrix.len() > rows {
        format!(" (first {rows} of {} rows)", matrix.len())
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}{}</text>"#,
        esc(title),
        esc(&more)
    );
    for (j, label) in col_labels.iter().enumerate().step_by(cols.div_ceil(32)) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            ml + (j as f64 + 0.5) * cell_w,
            mt - 6.0,
            esc(label)
        );
    }
    for (i, row) in matrix.iter().take(rows).enumerate() {
        let y = mt + i as f64 * cell_h;
        let label = row_labels.get(i).map(String::as_str).unwrap_or("");
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" xml:space="preserve">{}</text>"#,
            ml - 6.0,
            y + cell_h / 2.0 + 3.5,
            esc(&label.replace('\n', "⏎"))
        );
        for (j, &v) in row.iter().enumerate() {
            let (fill, _) = viridis((v - lo) / span);
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h}" fill="{fill}"><title>{} × {}: {v:.4}</title></rect>"#,
                ml + j as f64 * cell_w,
                esc(label),
                esc(col_labels.get(j).map(String::as_str).unwrap_or(""))
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// A bar chart of `values` with `labels` under the bars.
pub fn bars(title: &str, values: &[f64], labels: &[String], y_label: &str) -> String {
    let n = values.len().max(1);
    let bw = (480.0 / n as f64).clamp(4.0, 40.0);
    let (ml, mt, ph) = (60.0, 40.0, 220.0);
    let width = ml + n as f64 * bw + 30.0;
    let height = mt + ph + 50.0;
    let max = values
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut s = String::new();
    open_svg(&mut s, width, height);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for (i, &v) in values.iter().enumerate() {
        let h = v / max * ph;
        let x = ml + i as f64 * bw;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#1f77b4"><title>{}: {v}</title></rect>"##,
            x + 1.0,
            mt + ph - h,
            bw - 2.0,
            esc(labels.get(i).map(String::as_str).unwrap_or(""))
        );
        if n <= 32 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x + bw / 2.0,
                mt + ph + 14.0,
                esc(labels.get(i).map(String::as_str).unwrap_or(""))
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{max:.0}</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"#,
        ml - 4.0,
        mt + 4.0,
        14.0,
        mt + ph / 2.0,
        mt + ph / 2.0,
        esc(y_label)
    );
    s.push_str("</svg>\n");
    s
}

/// matplotlib's `tab10` colours; beyond 10 groups, hues around the circle.
pub fn group_colour(g: usize, groups: usize) -> String {
    const TAB10: [&str; 10] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    if groups <= TAB10.len() {
        TAB10[g % TAB10.len()].to_string()
    } else {
        format!("hsl({:.0},65%,45%)", 360.0 * g as f64 / groups as f64)
    }
}

/// One scatter panel: points `(x, y, group)` and an optional line `y = a·x + b`.
pub struct ScatterPanel<'a> {
    pub title: &'a str,
    pub points: &'a [(f64, f64, usize)],
    pub line: Option<(f64, f64)>,
}

/// Scatter plots side by side, coloured by group, with a legend.
pub fn scatter(
    title: &str,
    panels: &[ScatterPanel<'_>],
    legend: &[String],
    x_label: &str,
    y_label: &str,
) -> String {
    let (pw, ph) = (300.0, 260.0);
    let (ml, mt, gap) = (56.0, 48.0, 56.0);
    let legend_w = if legend.len() <= 16 { 90.0 } else { 0.0 };
    let width = ml + panels.len() as f64 * (pw + gap) + legend_w;
    let height = mt + ph + 48.0;
    let mut s = String::new();
    open_svg(&mut s, width, height);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let radius = |n: usize| {
        if n > 2000 {
            1.2
        } else if n > 200 {
            2.0
        } else {
            4.0
        }
    };
    for (p, panel) in panels.iter().enumerate() {
        let x0 = ml + p as f64 * (pw + gap);
        let finite = panel
            .points
            .iter()
            .filter(|q| q.0.is_finite() && q.1.is_finite());
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for q in finite {
            xmin = xmin.min(q.0);
            xmax = xmax.max(q.0);
            ymin = ymin.min(q.1);
            ymax = ymax.max(q.1);
        }
        if !xmin.is_finite() {
            (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = |lo: f64, hi: f64| {
            let d = if hi > lo { (hi - lo) * 0.06 } else { 0.5 };
            (lo - d, hi + d)
        };
        let (xmin, xmax) = pad(xmin, xmax);
        let (ymin, ymax) = pad(ymin, ymax);
        let sx = |x: f64| x0 + (x - xmin) / (xmax - xmin) * pw;
        let sy = |y: f64| mt + ph - (y - ymin) / (ymax - ymin) * ph;
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{mt:.1}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
            x0 + pw / 2.0,
            mt - 8.0,
            esc(panel.title)
        );
        for (v, anchor_x) in [(xmin, x0), (xmax, x0 + pw)] {
            let _ = writeln!(
                s,
                r#"<text x="{anchor_x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{v:.2}</text>"#,
                mt + ph + 14.0
            );
        }
        for (v, y) in [(ymin, mt + ph), (ymax, mt)] {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{v:.2}</text>"#,
                x0 - 4.0,
                y + 3.5
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            x0 + pw / 2.0,
            mt + ph + 32.0,
            esc(x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
            x0 - 30.0,
            mt + ph / 2.0,
            x0 - 30.0,
            mt + ph / 2.0,
            esc(y_label)
        );
        let r = radius(panel.points.len());
        for &(x, y, g) in panel.points {
            if x.is_finite() && y.is_finite() {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{}" fill-opacity="0.75"/>"#,
                    sx(x),
                    sy(y),
                    group_colour(g, legend.len().max(1))
                );
            }
        }
        if let Some((a, b)) = panel.line {
            if a.is_finite() && b.is_finite() {
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#d62728" stroke-width="1.5"/>"##,
                    sx(xmin),
                    sy(a * xmin + b).clamp(mt, mt + ph),
                    sx(xmax),
                    sy(a * xmax + b).clamp(mt, mt + ph)
                );
            }
        }
    }
    if legend_w > 0.0 {
        let lx = ml + panels.len() as f64 * (pw + gap) - gap / 2.0;
        for (g, label) in legend.iter().enumerate() {
            let y = mt + 8.0 + g as f64 * 15.0;
            let _ = writeln!(
                s,
                r#"<circle cx="{lx:.1}" cy="{y:.1}" r="4" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                group_colour(g, legend.len()),
                lx + 8.0,
                y + 4.0,
                esc(label)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Least-squares line `y = a·x + b` through points (None if x is constant).
pub fn regression_line(points: &[(f64, f64, usize)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| (sxy / sxx, my - sxy / sxx * mx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_line_recovers_an_exact_line() {
        let pts: Vec<(f64, f64, usize)> = (0..5)
            .map(|i| (i as f64, 2.0 * i as f64 + 1.0, 0))
            .collect();
        let (a, b) = regression_line(&pts).unwrap();
        assert!((a - 2.0).abs() < 1e-12 && (b - 1.0).abs() < 1e-12);
        assert_eq!(regression_line(&[(1.0, 2.0, 0), (1.0, 3.0, 0)]), None);
    }

    #[test]
    fn scatter_draws_every_finite_point() {
        let pts = vec![(0.0, 1.0, 0), (1.0, 0.0, 1), (f64::NAN, 0.0, 1)];
        let svg = scatter(
            "t",
            &[ScatterPanel {
                title: "up",
                points: &pts,
                line: Some((1.0, 0.0)),
            }],
            &["0".to_string(), "1".to_string()],
            "x",
            "y",
        );
        assert_eq!(svg.matches("<circle").count(), 2 + 2); // points + legend
        assert_eq!(svg.matches("<line").count(), 1);
    }

    #[test]
    fn viridis_ends_are_matplotlib_colours() {
        assert_eq!(viridis(0.0).0, "#440154");
        assert_eq!(viridis(1.0).0, "#fde725");
        assert_eq!(viridis(f64::NAN).0, "#440154");
    }

    #[test]
    fn heatmap_has_one_rect_per_cell_per_panel() {
        let m = vec![vec![1.0, 0.5], vec![0.5, 1.0]];
        let labels = vec!["0".to_string(), "1".to_string()];
        let svg = heatmaps(
            "t",
            &[
                Panel {
                    title: "up",
                    matrix: &m,
                },
                Panel {
                    title: "gate",
                    matrix: &m,
                },
            ],
            &labels,
            0.0,
            1.0,
        );
        assert_eq!(svg.matches("<title>").count(), 8);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }
}
