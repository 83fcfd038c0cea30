//! Minimal SVG figures, drawn as the paper draws them: heatmaps of similarity
//! matrices with up/gate/down side by side and a shared colour bar.
//!
//! The Markdown report starts every figure file with [`FIGURE_MARKER`] (so a
//! later run may remove the figures it owns and nothing else); every heatmap has axis labels
//! (`class="axis-label"`) and a colour bar (`class="colorbar"`) with its range.

use std::fmt::Write;

/// First line of every figure this tool writes: the Markdown report removes
/// only `*.svg` files that start with it when it reuses a directory.
pub const FIGURE_MARKER: &str = "<!-- moe-inspect figure -->";

/// Viridis anchor colours (matplotlib's default map), interpolated linearly.
const VIRIDIS: [(f64, f64, f64); 6] = [
    (68.0, 1.0, 84.0),
    (65.0, 68.0, 135.0),
    (42.0, 120.0, 142.0),
    (34.0, 168.0, 132.0),
    (122.0, 209.0, 81.0),
    (253.0, 231.0, 37.0),
];

/// Blue–white–red anchors (ColorBrewer RdBu, reversed): negative is blue,
/// the middle anchor is the neutral colour [`NEUTRAL`].
const RDBU: [(f64, f64, f64); 5] = [
    (33.0, 102.0, 172.0),
    (146.0, 197.0, 222.0),
    (247.0, 247.0, 247.0),
    (244.0, 165.0, 130.0),
    (178.0, 24.0, 43.0),
];

/// The colour of the centre of a diverging scale (a cosine of 0).
pub const NEUTRAL: &str = "#f7f7f7";

/// Fill of diagonal cells left out of an off-diagonal colour scale.
const MASKED: &str = "#8c8c8c";

fn interpolate(anchors: &[(f64, f64, f64)], t: f64) -> String {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (anchors.len() - 1) as f64;
    let i = (x.floor() as usize).min(anchors.len() - 2);
    let f = x - i as f64;
    let (a, b) = (anchors[i], anchors[i + 1]);
    let c = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

/// Colour for `t` in [0, 1] and whether text on it should be dark.
pub fn viridis(t: f64) -> (String, bool) {
    (interpolate(&VIRIDIS, t), t.is_finite() && t > 0.6)
}

/// How values map to colours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColourScale {
    /// Viridis from `lo` to `hi`.
    Sequential {
        /// Value drawn at the low end of the scale.
        lo: f64,
        /// Value drawn at the high end of the scale.
        hi: f64,
    },
    /// Blue–white–red over `[mid - half, mid + half]`, white at `mid`; with
    /// `mask_diagonal` the diagonal is drawn grey (it lies outside the scale).
    Diverging {
        /// The value drawn white (0 for cosines).
        mid: f64,
        /// Half the width of the scale: `mid ± half` are the extreme colours.
        half: f64,
        /// Draw the diagonal grey instead of coloured.
        mask_diagonal: bool,
    },
}

impl ColourScale {
    /// Cosines on their whole range [-1, 1], centred on 0.
    pub const COSINE: Self = ColourScale::Diverging {
        mid: 0.0,
        half: 1.0,
        mask_diagonal: false,
    };

    /// A diverging scale centred on `mid`, symmetric, just wide enough for
    /// the largest off-diagonal deviation `dev` (rounded up to 1, 2, 2.5 or
    /// 5 × 10^k, at most `max_half`); the diagonal is masked when it is left out.
    pub fn centred(mid: f64, dev: f64, max_half: f64) -> Self {
        let half = nice_ceil(dev).min(max_half);
        ColourScale::Diverging {
            mid,
            half,
            mask_diagonal: half < max_half,
        }
    }

    /// The scale's range.
    pub fn range(&self) -> (f64, f64) {
        match *self {
            ColourScale::Sequential { lo, hi } => (lo, hi),
            ColourScale::Diverging { mid, half, .. } => (mid - half, mid + half),
        }
    }

    /// Colour of `v` and whether text on it should be dark.
    pub fn colour(&self, v: f64) -> (String, bool) {
        let (lo, hi) = self.range();
        let t = (v - lo) / if hi > lo { hi - lo } else { 1.0 };
        match self {
            ColourScale::Sequential { .. } => viridis(t),
            ColourScale::Diverging { .. } => (
                interpolate(&RDBU, t),
                !t.is_finite() || (0.2..=0.8).contains(&t),
            ),
        }
    }

    /// Values written on the colour bar, top (high) to bottom; a diverging
    /// scale has 5 (its centre in the middle), a sequential one 3.
    pub fn ticks(&self) -> Vec<f64> {
        match *self {
            ColourScale::Sequential { lo, hi } => {
                // Three significant digits, kept inside the range.
                let round = |v: f64, toward_lo: bool| {
                    if v == 0.0 || !v.is_finite() {
                        return v;
                    }
                    let p = 10f64.powf(v.abs().log10().floor() - 2.0);
                    let r = if toward_lo {
                        (v / p).ceil()
                    } else {
                        (v / p).floor()
                    };
                    r * p
                };
                vec![
                    round(hi, false),
                    round((lo + hi) / 2.0, false),
                    round(lo, true),
                ]
            }
            ColourScale::Diverging { mid, half, .. } => vec![
                mid + half,
                mid + half / 2.0,
                mid,
                mid - half / 2.0,
                mid - half,
            ],
        }
    }

    fn masks_diagonal(&self) -> bool {
        matches!(
            self,
            ColourScale::Diverging {
                mask_diagonal: true,
                ..
            }
        )
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k that is ≥ `x` (1 for x ≤ 0 or NaN).
pub fn nice_ceil(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= x * (1.0 - 1e-9) {
            return m * p;
        }
    }
    10.0 * p
}

/// Round tick positions (steps of 1, 2 or 5 × 10^k) inside `[lo, hi]`, about `target` of them.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A tick value written briefly: at most 4 decimals, no trailing zeros, no "-0".
pub fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" || s.is_empty() {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// A token as a label: blanks made visible (`␠`, `⏎`, `⇥`, `␍`), at most `max` characters.
pub fn visible_token(t: &str, max: usize) -> String {
    let v: String = t
        .chars()
        .map(|c| match c {
            ' ' => '␠',
            '\n' => '⏎',
            '\t' => '⇥',
            '\r' => '␍',
            c if c.is_control() => '�',
            c => c,
        })
        .collect();
    truncate(&v, max)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Splits `title` into lines of at most `width` pixels at `font` size (at
/// most 3 lines; the last is cut with "…").
fn wrap_title(title: &str, font: f64, width: f64) -> Vec<String> {
    let per_line = ((width / (font * 0.62)).floor() as usize).max(8);
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in title.split_whitespace() {
        let n = cur.chars().count();
        if n > 0 && n + 1 + word.chars().count() > per_line {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    lines.push(cur);
    if lines.len() > 3 {
        let rest = lines[2..].join(" ");
        lines.truncate(2);
        lines.push(rest);
    }
    lines.into_iter().map(|l| truncate(&l, per_line)).collect()
}

/// Writes a (wrapped) bold title at `(x, y)`; returns the extra height used
/// beyond one line.
fn title(s: &mut String, text: &str, x: f64, y: f64, font: f64, width: f64) -> f64 {
    let lines = wrap_title(text, font, width);
    let _ = write!(
        s,
        r#"<text class="title" x="{x}" y="{y}" font-size="{font}" font-weight="bold">"#
    );
    let lh = font * 1.25;
    for (i, l) in lines.iter().enumerate() {
        let _ = write!(
            s,
            r#"<tspan x="{x}" dy="{}">{}</tspan>"#,
            if i == 0 { 0.0 } else { lh },
            esc(l)
        );
    }
    s.push_str("</text>\n");
    (lines.len() - 1) as f64 * lh
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

/// Width a colour bar takes, its label included.
const COLORBAR_W: f64 = 96.0;

/// A vertical colour bar at `(x, y)` of height `h`: 41 steps (the middle one
/// at the scale's centre), tick values and a rotated `label`.
fn colour_bar(s: &mut String, x: f64, y: f64, h: f64, scale: &ColourScale, label: &str) {
    let (lo, hi) = scale.range();
    let neutral = match scale {
        ColourScale::Diverging { .. } => NEUTRAL.to_string(),
        ColourScale::Sequential { .. } => scale.colour((lo + hi) / 2.0).0,
    };
    let _ = writeln!(
        s,
        r#"<g class="colorbar" data-min="{}" data-max="{}" data-neutral="{neutral}">"#,
        fmt_tick(lo),
        fmt_tick(hi)
    );
    let (bw, steps) = (14.0, 41);
    let sh = h / steps as f64;
    for k in 0..steps {
        // Step k's centre value, from hi (top) to lo (bottom).
        let v = hi - (k as f64 + 0.5) / steps as f64 * (hi - lo);
        let (fill, _) = scale.colour(v);
        let _ = writeln!(
            s,
            r#"<rect class="colorbar-step" data-value="{}" x="{x:.1}" y="{:.2}" width="{bw}" height="{:.2}" fill="{fill}"/>"#,
            fmt_tick(v),
            y + k as f64 * sh,
            sh + 0.3
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{x:.1}" y="{y:.1}" width="{bw}" height="{h:.1}" fill="none" stroke="#555" stroke-width="0.6"/>"##
    );
    let span = if hi > lo { hi - lo } else { 1.0 };
    for v in scale.ticks() {
        let ty = y + (hi - v) / span * h;
        let _ = writeln!(
            s,
            r##"<path d="M{:.1} {ty:.1}h4" stroke="#333"/><text class="colorbar-tick" x="{:.1}" y="{:.1}" font-size="10">{}</text>"##,
            x + bw,
            x + bw + 6.0,
            ty + 3.5,
            fmt_tick(v)
        );
    }
    let lx = x + bw + 52.0;
    let ly = y + h / 2.0;
    let _ = writeln!(
        s,
        r#"<text class="colorbar-label" x="{lx:.1}" y="{ly:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
        esc(&truncate(label, (h / 6.0) as usize))
    );
    s.push_str("</g>\n");
}

/// An axis label: horizontal centred at `(x, y)`, or rotated for the y axis.
fn axis_label(s: &mut String, axis: char, x: f64, y: f64, text: &str) {
    let rot = if axis == 'y' {
        format!(r#" transform="rotate(-90 {x:.1} {y:.1})""#)
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        r#"<text class="axis-label {axis}" x="{x:.1}" y="{y:.1}" font-size="11" text-anchor="middle"{rot}>{}</text>"#,
        esc(text)
    );
}

/// One heatmap panel: a title and a square matrix.
pub struct Panel<'a> {
    /// Title above the panel.
    pub title: &'a str,
    /// The square matrix drawn, row by row.
    pub matrix: &'a [Vec<f64>],
}

/// What a heatmap's axes and colour bar show.
#[derive(Debug, Clone, Copy)]
pub struct Axes<'a> {
    /// Label of the horizontal axis.
    pub x: &'a str,
    /// Label of the vertical axis.
    pub y: &'a str,
    /// The colour bar's label (what the colours measure).
    pub value: &'a str,
}

/// Draws panels side by side with one colour `scale`, tick labels `labels`
/// on both axes, axis labels, a colour bar, and cell values written in when
/// the matrix is small.
pub fn heatmaps(
    title_text: &str,
    panels: &[Panel<'_>],
    labels: &[String],
    scale: ColourScale,
    axes: Axes<'_>,
) -> String {
    let n = labels.len().max(1);
    let cell = (420.0 / n as f64).clamp(6.0, 40.0);
    let side = cell * n as f64;
    let (margin_l, gap) = (64.0, 40.0);
    let width = margin_l + panels.len() as f64 * (side + gap) + COLORBAR_W;
    let mut body = String::new();
    let extra = title(&mut body, title_text, 12.0, 22.0, 15.0, width - 24.0);
    let margin_t = 60.0 + extra;
    let height = margin_t + side + 34.0;
    let annotate = n <= 12;
    let tick_step = n.div_ceil(16);
    let mut s = String::new();
    open_svg(&mut s, width, height);
    s.push_str(&body);
    for (p, panel) in panels.iter().enumerate() {
        let x0 = margin_l + p as f64 * (side + gap);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
            x0 + side / 2.0,
            margin_t - 18.0,
            esc(&truncate(panel.title, ((side + gap) / 7.5) as usize))
        );
        for (i, row) in panel.matrix.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let masked = i == j && scale.masks_diagonal();
                let (fill, dark_text) = if masked {
                    (MASKED.to_string(), false)
                } else {
                    scale.colour(v)
                };
                let (x, y) = (x0 + j as f64 * cell, margin_t + i as f64 * cell);
                let _ = writeln!(
                    s,
                    r#"<rect class="cell{}" x="{x:.1}" y="{y:.1}" width="{cell:.1}" height="{cell:.1}" fill="{fill}"><title>{} × {}: {v:.4}</title></rect>"#,
                    if masked { " masked" } else { "" },
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
                r#"<text class="tick" x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x0 + c,
                margin_t - 4.0,
                esc(label)
            );
            let _ = writeln!(
                s,
                r#"<text class="tick" x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"#,
                x0 - 4.0,
                margin_t + c + 3.5,
                esc(label)
            );
        }
        axis_label(&mut s, 'x', x0 + side / 2.0, margin_t + side + 16.0, axes.x);
        axis_label(&mut s, 'y', x0 - 26.0, margin_t + side / 2.0, axes.y);
    }
    let bx = margin_l + panels.len() as f64 * (side + gap) - gap / 2.0;
    let mut value = axes.value.to_string();
    if scale.masks_diagonal() {
        value.push_str(" (diagonal grey)");
    }
    colour_bar(&mut s, bx, margin_t, side.max(120.0), &scale, &value);
    s.push_str("</svg>\n");
    s
}

/// A rectangular heatmap (`rows × cols`, e.g. tokens × experts) with its own
/// row and column labels (blanks in row labels made visible), axis labels and
/// a colour bar; rows beyond 64 are not drawn (the title says so).
pub fn heatmap_rect(
    title_text: &str,
    matrix: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    scale: ColourScale,
    axes: Axes<'_>,
) -> String {
    let rows = matrix.len().min(64);
    let cols = col_labels.len().max(1);
    let cell_w = (480.0 / cols as f64).clamp(6.0, 36.0);
    let cell_h = 16.0;
    let ml = 124.0;
    let width = ml + cols as f64 * cell_w + 24.0 + COLORBAR_W;
    let more = if matrix.len() > rows {
        format!(" (first {rows} of {} rows)", matrix.len())
    } else {
        String::new()
    };
    let mut body = String::new();
    let extra = title(
        &mut body,
        &format!("{title_text}{more}"),
        10.0,
        20.0,
        14.0,
        width - 20.0,
    );
    let mt = 62.0 + extra;
    let grid_h = rows as f64 * cell_h;
    let bar_h = grid_h.max(120.0);
    let height = mt + bar_h + 20.0;
    let mut s = String::new();
    open_svg(&mut s, width, height);
    s.push_str(&body);
    axis_label(
        &mut s,
        'x',
        ml + cols as f64 * cell_w / 2.0,
        mt - 22.0,
        axes.x,
    );
    axis_label(&mut s, 'y', 14.0, mt + grid_h / 2.0, axes.y);
    for (j, label) in col_labels.iter().enumerate().step_by(cols.div_ceil(32)) {
        let _ = writeln!(
            s,
            r#"<text class="tick" x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
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
            r#"<text class="tick" x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"#,
            ml - 6.0,
            y + cell_h / 2.0 + 3.5,
            esc(&visible_token(label, 16))
        );
        for (j, &v) in row.iter().enumerate() {
            let (fill, _) = scale.colour(v);
            let _ = writeln!(
                s,
                r#"<rect class="cell" x="{:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h}" fill="{fill}"><title>{} × {}: {v:.4}</title></rect>"#,
                ml + j as f64 * cell_w,
                esc(&visible_token(label, 40)),
                esc(col_labels.get(j).map(String::as_str).unwrap_or(""))
            );
        }
    }
    colour_bar(
        &mut s,
        ml + cols as f64 * cell_w + 20.0,
        mt,
        bar_h,
        &scale,
        axes.value,
    );
    s.push_str("</svg>\n");
    s
}

/// A bar chart of `values` with `labels` under the bars.
pub fn bars(title_text: &str, values: &[f64], labels: &[String], y_label: &str) -> String {
    let n = values.len().max(1);
    let bw = (480.0 / n as f64).clamp(4.0, 40.0);
    let (ml, ph) = (60.0, 220.0);
    let width = (ml + n as f64 * bw + 30.0).max(360.0);
    let mut body = String::new();
    let mt = 40.0 + title(&mut body, title_text, 10.0, 20.0, 14.0, width - 20.0);
    let height = mt + ph + 50.0;
    let max = values
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut s = String::new();
    open_svg(&mut s, width, height);
    s.push_str(&body);
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
    /// Title above the panel.
    pub title: &'a str,
    /// Points `(x, y, group)`; the group picks the colour.
    pub points: &'a [(f64, f64, usize)],
    /// A fitted line `y = a·x + b`, drawn over the points.
    pub line: Option<(f64, f64)>,
}

/// Scatter plots side by side, coloured by group, with a legend.
pub fn scatter(
    title_text: &str,
    panels: &[ScatterPanel<'_>],
    legend: &[String],
    x_label: &str,
    y_label: &str,
) -> String {
    let (pw, ph) = (300.0, 260.0);
    let (ml, gap) = (64.0, 64.0);
    let legend_w = if !legend.is_empty() && legend.len() <= 16 {
        90.0
    } else {
        0.0
    };
    let width = ml + panels.len() as f64 * (pw + gap) + legend_w;
    let mut body = String::new();
    let mt = 48.0 + title(&mut body, title_text, 12.0, 20.0, 15.0, width - 24.0);
    let height = mt + ph + 48.0;
    let mut s = String::new();
    open_svg(&mut s, width, height);
    s.push_str(&body);
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
            esc(&truncate(panel.title, (pw / 7.0) as usize))
        );
        for v in nice_ticks(xmin, xmax, 6) {
            let x = sx(v);
            let _ = writeln!(
                s,
                r##"<path d="M{x:.1} {:.1}v4" stroke="#333"/><text class="tick x" x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"##,
                mt + ph,
                mt + ph + 14.0,
                fmt_tick(v)
            );
        }
        for v in nice_ticks(ymin, ymax, 6) {
            let y = sy(v);
            let _ = writeln!(
                s,
                r##"<path d="M{x0:.1} {y:.1}h-4" stroke="#333"/><text class="tick y" x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                x0 - 6.0,
                y + 3.5,
                fmt_tick(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text class="axis-label x" x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            x0 + pw / 2.0,
            mt + ph + 32.0,
            esc(x_label)
        );
        let _ = writeln!(
            s,
            r#"<text class="axis-label y" x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
            x0 - 44.0,
            mt + ph / 2.0,
            x0 - 44.0,
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
            ColourScale::COSINE,
            Axes {
                x: "expert",
                y: "expert",
                value: "cosine",
            },
        );
        assert_eq!(svg.matches("<title>").count(), 8);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches(r#"class="axis-label"#).count(), 4);
        assert_eq!(svg.matches(r#"class="colorbar""#).count(), 1);
    }

    #[test]
    fn cosine_scale_is_white_at_zero_and_centred() {
        let c = ColourScale::COSINE;
        assert_eq!(c.colour(0.0).0, NEUTRAL);
        assert_eq!(c.ticks()[2], 0.0);
        assert_eq!(c.colour(-1.0).0, "#2166ac");
        assert_eq!(c.colour(1.0).0, "#b2182b");
        let s = ColourScale::centred(0.0, 0.0296, 1.0);
        assert_eq!(s.range(), (-0.05, 0.05));
        assert!(s.masks_diagonal());
        assert_eq!(s.colour(0.0).0, NEUTRAL);
        assert!(!ColourScale::centred(0.0, 0.7, 1.0).masks_diagonal());
    }

    #[test]
    fn ticks_and_labels_read_well() {
        let ticks: Vec<String> = nice_ticks(-0.13, 0.42, 10)
            .into_iter()
            .map(fmt_tick)
            .collect();
        assert_eq!(ticks, ["-0.1", "0", "0.1", "0.2", "0.3", "0.4"]);
        assert_eq!(fmt_tick(-0.0), "0");
        let seq = ColourScale::Sequential {
            lo: 0.0,
            hi: 0.65234,
        };
        let t: Vec<String> = seq.ticks().into_iter().map(fmt_tick).collect();
        assert_eq!(t, ["0.652", "0.326", "0"]);
        assert_eq!(fmt_tick(0.025), "0.025");
        assert_eq!(fmt_tick(2.0), "2");
        assert_eq!(visible_token(" a\n\t", 10), "␠a⏎⇥");
        assert_eq!(visible_token("abcdefghij", 5), "abcd…");
        let lines = wrap_title(
            "a long title that does not fit in a narrow figure",
            14.0,
            120.0,
        );
        assert!(lines.len() > 1 && lines.iter().all(|l| l.chars().count() <= 13));
    }
}
