//! Benchmark output: the terminal table, `report.md` with SVG figures
//! (throughput against tokens per benchmark, roofline position) and
//! `bench.json`; a peer's timings (PyTorch) side by side with the ratio.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use tabled::builder::Builder;

use super::svg::{esc, group_colour, open_svg};
use crate::atomic_write::write_atomic;
use crate::bench::schema::{BenchFile, BenchResult};
use crate::bench::verdict::Verdict;
use crate::error::{Error, Result};

/// `12.3 ms`, `45.6 µs`, `1.234 s`.
pub fn fmt_time(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.3} s", s)
    }
}

/// Time with its 95% interval: `12.30 ms ± 1.2%`.
pub fn fmt_time_ci(b: &BenchResult) -> String {
    let half = (b.ci_high_s - b.ci_low_s) / 2.0;
    format!("{} ± {:.1}%", fmt_time(b.mean_s), 100.0 * half / b.mean_s)
}

fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_share(s: Option<f64>) -> String {
    s.map(|s| format!("{:.0}%", 100.0 * s))
        .unwrap_or_else(|| "–".into())
}

fn fmt_verdict(v: &Verdict) -> String {
    match (v.change, v.change_low, v.change_high) {
        (Some(c), Some(lo), Some(hi)) => format!(
            "{} {:+.1}% [{:+.1}%, {:+.1}%]",
            v.status.as_str(),
            100.0 * c,
            100.0 * lo,
            100.0 * hi
        ),
        _ => v.status.as_str().into(),
    }
}

/// The peer's mean time for the same benchmark and the ratio peer / ours
/// (above 1: we are faster).
pub fn peer_ratio(ours: &BenchResult, peer: &BenchFile) -> Option<(f64, f64)> {
    peer.get(&ours.name)
        .filter(|p| p.mean_s > 0.0)
        .map(|p| (p.mean_s, p.mean_s / ours.mean_s))
}

fn verdict_of<'a>(file: &'a BenchFile, name: &str) -> Option<&'a Verdict> {
    file.baseline
        .as_ref()
        .and_then(|b| b.verdicts.iter().find(|v| v.name == name))
}

fn rows(file: &BenchFile, peer: Option<&BenchFile>) -> Vec<Vec<String>> {
    let mut header: Vec<String> = [
        "benchmark",
        "tokens/s",
        "time ± 95% CI",
        "GFLOP/s %pk",
        "GB/s %BW",
    ]
    .map(String::from)
    .to_vec();
    let base = file.baseline.as_ref();
    if let Some(b) = base {
        header.push(format!("vs {} ±{:.0}%", b.name, 100.0 * b.threshold));
    }
    if let Some(p) = peer {
        header.push(short_tool(&p.tool).to_string());
        header.push("ratio".into());
    }
    let mut out = vec![header];
    for b in &file.benchmarks {
        let mut r = vec![
            b.name.clone(),
            fmt_rate(b.tokens_per_s),
            fmt_time_ci(b),
            format!("{} {}", fmt_rate(b.gflops), fmt_share(b.flops_share)),
            format!("{} {}", fmt_rate(b.gbs), fmt_share(b.bw_share)),
        ];
        if base.is_some() {
            r.push(
                verdict_of(file, &b.name)
                    .map(fmt_verdict)
                    .unwrap_or_default(),
            );
        }
        if let Some(p) = peer {
            match peer_ratio(b, p) {
                Some((t, ratio)) => {
                    r.push(fmt_time(t));
                    r.push(format!("{ratio:.2}×"));
                }
                None => {
                    r.push("–".into());
                    r.push("–".into());
                }
            }
        }
        out.push(r);
    }
    out
}

fn short_tool(tool: &str) -> String {
    tool.split_whitespace().next().unwrap_or("peer").to_string()
}

/// The terminal table, wrapped to `width` display columns (`None`: no
/// limit), then the machine line (%peak, %BW: share of the measured peak
/// FLOP/s and bandwidth).
pub fn table(file: &BenchFile, peer: Option<&BenchFile>, width: Option<usize>) -> String {
    let mut b = Builder::default();
    let mut name_rows = Vec::new();
    for (i, mut r) in rows(file, peer).into_iter().enumerate() {
        // Narrow: the name on a row of its own, spanning the table (names
        // stay whole, searchable), the numbers below it.
        if i > 0 && width.is_some() {
            let n = r.len();
            name_rows.push((b.count_records(), n));
            b.push_record(
                std::iter::once(std::mem::take(&mut r[0]))
                    .chain(std::iter::repeat_n(String::new(), n - 1)),
            );
        }
        b.push_record(r);
    }
    let mut t = b.build();
    for (row, n) in name_rows {
        t.modify((row, 0), tabled::settings::Span::column(n as isize));
    }
    let mut out = super::table::fit(t, width);
    out.push('\n');
    out.push_str(&super::table::wrap_text(&machine_line(file), width));
    out.push('\n');
    out
}

fn machine_line(file: &BenchFile) -> String {
    let m = &file.machine;
    let mut s = format!(
        "{} · {} threads · {}/{}",
        file.device, m.threads, m.os, m.arch
    );
    if let (Some(f), Some(g)) = (m.peak_gflops, m.peak_gbs) {
        let _ = write!(
            s,
            " · measured peak {f:.1} GFLOP/s (f32 matmul n={}), {g:.1} GB/s ({} {} MiB)",
            m.probe_matmul_n.unwrap_or(0),
            if file.device == "cpu" {
                "stream over"
            } else {
                "device copy of"
            },
            m.probe_stream_bytes.unwrap_or(0) >> 20
        );
    }
    s
}

/// One line on the output checks of the MoE-layer benchmarks: the largest
/// relative error against the naive loop per variant (`None` when nothing was checked).
pub fn checks_line(file: &BenchFile) -> Option<String> {
    let mut worst: Vec<(&str, f64)> = Vec::new();
    for b in &file.benchmarks {
        let Some(e) = b.rel_error else { continue };
        match worst.iter_mut().find(|(v, _)| *v == b.variant) {
            Some(w) => w.1 = w.1.max(e),
            None => worst.push((&b.variant, e)),
        }
    }
    worst.retain(|(v, _)| *v != "naive");
    if worst.is_empty() {
        return None;
    }
    let parts: Vec<String> = worst.iter().map(|(v, e)| format!("{v} {e:.1e}")).collect();
    Some(format!(
        "outputs checked against the naive loop before timing, largest relative error ‖y − y_naive‖/‖y_naive‖: {}",
        parts.join(", ")
    ))
}

/// One line on how the whole-model forward benchmarks held the weights
/// (`resident` or `streamed`, see `Forward::resident_if_fits`); `None`
/// when no forward benchmark recorded it.
pub fn weights_line(file: &BenchFile) -> Option<String> {
    let mut held: Vec<&str> = Vec::new();
    for b in &file.benchmarks {
        if let Some(w) = b.weights.as_deref() {
            if !held.contains(&w) {
                held.push(w);
            }
        }
    }
    if held.is_empty() {
        return None;
    }
    Some(format!("forward weights {}", held.join(" and ")))
}

/// The Markdown report; `figures` are SVG file names next to it.
pub fn markdown(
    file: &BenchFile,
    peer: Option<&BenchFile>,
    notes: &[String],
    figures: &[String],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(s, "{} — {}\n", file.tool, machine_line(file));
    let _ = writeln!(
        s,
        "Times are per call on the stated number of tokens: mean with its 95% \
         t-interval. GFLOP/s and GB/s are the counted work per call over the mean \
         time; % peak is their share of the probes' measured peaks (a bandwidth \
         share above 100% means the bytes came from cache: the probe streams from memory).\n"
    );
    for n in notes {
        let _ = writeln!(s, "> note: {n}\n");
    }
    let rows = rows(file, peer);
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(j, c)| {
                if i > 0 && j == 0 {
                    format!("`{c}`")
                } else {
                    c.replace('|', "\\|")
                }
            })
            .collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
        if i == 0 {
            let _ = writeln!(
                s,
                "|{}",
                r.iter()
                    .enumerate()
                    .map(|(j, _)| if j == 0 { "---|" } else { "---:|" })
                    .collect::<String>()
            );
        }
    }
    if let Some(c) = checks_line(file) {
        let _ = writeln!(s, "\nMoE layers: {c}.");
    }
    if let Some(w) = weights_line(file) {
        let _ = writeln!(s, "\nWhole model: {w}.");
    }
    if let Some(b) = &file.baseline {
        let n = |st: &str| {
            b.verdicts
                .iter()
                .filter(|v| v.status.as_str() == st)
                .count()
        };
        let _ = writeln!(
            s,
            "\nAgainst baseline `{}` (noise threshold {:.0}%): {} regressed, {} improved, {} unchanged, {} new. \
             A benchmark regressed only when the whole 95% interval of its change lies above the threshold.",
            b.name,
            100.0 * b.threshold,
            n("regressed"),
            n("improved"),
            n("unchanged"),
            n("new")
        );
    }
    if let Some(p) = peer {
        let _ = writeln!(
            s,
            "\nPeer: {} on the same machine and checkpoints; ratio = peer time / our time \
             (above 1: moe-inspect is faster).",
            p.tool
        );
    }
    if !figures.is_empty() {
        let _ = writeln!(s, "\n## Figures\n");
        for f in figures {
            let _ = writeln!(s, "![{f}]({f})\n");
        }
    }
    s
}

/// Writes `bench.json`, `report.md` and the SVG figures into `dir`, each
/// atomically ([`crate::atomic_write`]).
pub fn write(
    dir: &Path,
    file: &BenchFile,
    peer: Option<&BenchFile>,
    notes: &[String],
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    file.write(&dir.join("bench.json"))?;
    let mut figures = Vec::new();
    let mut groups: Vec<&str> = Vec::new();
    for b in &file.benchmarks {
        if !groups.contains(&b.group.as_str()) {
            groups.push(&b.group);
        }
    }
    for g in groups {
        let rs: Vec<&BenchResult> = file.benchmarks.iter().filter(|b| b.group == g).collect();
        let name = format!("throughput-{g}.svg");
        let path = dir.join(&name);
        write_atomic(&path, throughput_svg(g, &rs).as_bytes())?;
        figures.push(name);
    }
    if let Some(svg) = roofline_svg(file) {
        let path = dir.join("roofline.svg");
        write_atomic(&path, svg.as_bytes())?;
        figures.push("roofline.svg".into());
    }
    let path = dir.join("report.md");
    write_atomic(&path, markdown(file, peer, notes, &figures).as_bytes())?;
    Ok(path)
}

/// A benchmark's name without its `/nN` token count.
pub fn stem(name: &str) -> &str {
    match name.rsplit_once('/') {
        Some((head, last))
            if last.starts_with('n') && last.len() > 1 && last[1..].parse::<u64>().is_ok() =>
        {
            head
        }
        _ => name,
    }
}

/// A log-log frame: maps data to pixels, draws axes with power-of-ten ticks.
struct LogFrame {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    lx: (f64, f64),
    ly: (f64, f64),
}

impl LogFrame {
    fn new(x0: f64, y0: f64, w: f64, h: f64, xs: (f64, f64), ys: (f64, f64)) -> LogFrame {
        let span = |(lo, hi): (f64, f64)| {
            let (a, b) = (lo.max(1e-12).log10(), hi.max(1e-12).log10());
            if b - a < 1e-9 {
                (a - 0.5, b + 0.5)
            } else {
                (a - 0.05 * (b - a), b + 0.05 * (b - a))
            }
        };
        LogFrame {
            x0,
            y0,
            w,
            h,
            lx: span(xs),
            ly: span(ys),
        }
    }
    fn px(&self, x: f64) -> f64 {
        self.x0 + (x.max(1e-12).log10() - self.lx.0) / (self.lx.1 - self.lx.0) * self.w
    }
    fn py(&self, y: f64) -> f64 {
        self.y0 + self.h - (y.max(1e-12).log10() - self.ly.0) / (self.ly.1 - self.ly.0) * self.h
    }
    fn axes(&self, s: &mut String, x_label: &str, y_label: &str, x_ticks: &[f64]) {
        let (x0, y0, w, h) = (self.x0, self.y0, self.w, self.h);
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#333"/>"##
        );
        let fmt = |v: f64| {
            if !(1e-2..1e6).contains(&v) {
                format!("{v:.0e}")
            } else {
                format!("{}", (v * 100.0).round() / 100.0)
            }
        };
        let decades = |(a, b): (f64, f64)| -> Vec<f64> {
            (a.ceil() as i32..=b.floor() as i32)
                .map(|e| 10f64.powi(e))
                .collect()
        };
        let xt: Vec<f64> = if x_ticks.is_empty() {
            decades(self.lx)
        } else {
            x_ticks.to_vec()
        };
        for v in xt {
            let x = self.px(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"##,
                y0 + h,
                y0 + h + 14.0,
                fmt(v)
            );
        }
        for v in decades(self.ly) {
            let y = self.py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                x0 + w,
                x0 - 4.0,
                y + 3.0,
                fmt(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            x0 + w / 2.0,
            y0 + h + 32.0,
            esc(x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="14" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"#,
            y0 + h / 2.0,
            y0 + h / 2.0,
            esc(y_label)
        );
    }
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    vals.filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        })
}

/// Throughput (tokens/s) against tokens, one line per benchmark stem, log-log.
pub fn throughput_svg(group: &str, results: &[&BenchResult]) -> String {
    let mut stems: Vec<&str> = Vec::new();
    for b in results {
        let s = stem(&b.name);
        if !stems.contains(&s) {
            stems.push(s);
        }
    }
    let (pw, ph, ml, mt): (f64, f64, f64, f64) = (460.0, 300.0, 64.0, 40.0);
    let legend_w = 300.0;
    let height = (mt + ph + 50.0).max(mt + 16.0 * stems.len() as f64 + 20.0);
    let mut s = String::new();
    open_svg(&mut s, ml + pw + legend_w, height);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">{}: throughput against tokens</text>"#,
        esc(group)
    );
    let xr = range(results.iter().map(|b| b.tokens as f64));
    let yr = range(results.iter().map(|b| b.tokens_per_s));
    if !xr.0.is_finite() {
        s.push_str("</svg>\n");
        return s;
    }
    let f = LogFrame::new(ml, mt, pw, ph, xr, yr);
    let mut ticks: Vec<f64> = results.iter().map(|b| b.tokens as f64).collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    f.axes(&mut s, "tokens", "tokens/s", &ticks);
    for (i, st) in stems.iter().enumerate() {
        let colour = group_colour(i, stems.len());
        let mut pts: Vec<&&BenchResult> = results.iter().filter(|b| stem(&b.name) == *st).collect();
        pts.sort_by_key(|b| b.tokens);
        let path: Vec<String> = pts
            .iter()
            .map(|b| format!("{:.1},{:.1}", f.px(b.tokens as f64), f.py(b.tokens_per_s)))
            .collect();
        if path.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
        }
        for b in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{} {:.1} tokens/s</title></circle>"#,
                f.px(b.tokens as f64),
                f.py(b.tokens_per_s),
                esc(&b.name),
                b.tokens_per_s
            );
        }
        let ly = mt + 10.0 + 16.0 * i as f64;
        let lx = ml + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{ly:.1}" font-size="11">{}</text>"#,
            ly - 9.0,
            lx + 14.0,
            esc(st)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Roofline: achieved GFLOP/s against arithmetic intensity (FLOP/byte), under
/// the measured compute peak and memory-bandwidth slope. `None` without probes.
pub fn roofline_svg(file: &BenchFile) -> Option<String> {
    let (pf, pb) = (file.machine.peak_gflops?, file.machine.peak_gbs?);
    let pts: Vec<&BenchResult> = file
        .benchmarks
        .iter()
        .filter(|b| b.flops > 0.0 && b.bytes > 0.0 && b.gflops > 0.0)
        .collect();
    if pts.is_empty() {
        return None;
    }
    let groups: Vec<&str> = {
        let mut g: Vec<&str> = Vec::new();
        for b in &pts {
            if !g.contains(&b.group.as_str()) {
                g.push(&b.group);
            }
        }
        g
    };
    let ai = |b: &BenchResult| b.flops / b.bytes;
    let (mut xr, mut yr) = (
        range(pts.iter().map(|b| ai(b))),
        range(pts.iter().map(|b| b.gflops)),
    );
    let ridge = pf / pb;
    xr = (xr.0.min(ridge / 4.0), xr.1.max(ridge * 4.0));
    yr = (yr.0.min(pf / 100.0), yr.1.max(pf * 1.3));
    let (pw, ph, ml, mt) = (520.0, 340.0, 64.0, 40.0);
    let mut s = String::new();
    open_svg(&mut s, ml + pw + 160.0, mt + ph + 50.0);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">Roofline: {pf:.1} GFLOP/s peak, {pb:.1} GB/s</text>"#
    );
    let f = LogFrame::new(ml, mt, pw, ph, xr, yr);
    f.axes(&mut s, "arithmetic intensity (FLOP/byte)", "GFLOP/s", &[]);
    let (xa, xb) = (10f64.powf(f.lx.0), 10f64.powf(f.lx.1));
    let roof = |x: f64| (x * pb).min(pf);
    let mut line = Vec::new();
    for x in [xa, ridge.clamp(xa, xb), xb] {
        line.push(format!("{:.1},{:.1}", f.px(x), f.py(roof(x))));
    }
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#444" stroke-width="2" stroke-dasharray="6 3"/>"##,
        line.join(" ")
    );
    for b in &pts {
        let g = groups.iter().position(|g| *g == b.group).unwrap_or(0);
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}" fill-opacity="0.8"><title>{}: {:.1} GFLOP/s, {:.1} FLOP/byte</title></circle>"#,
            f.px(ai(b)),
            f.py(b.gflops),
            group_colour(g, groups.len()),
            esc(&b.name),
            b.gflops,
            ai(b)
        );
    }
    for (i, g) in groups.iter().enumerate() {
        let ly = mt + 10.0 + 16.0 * i as f64;
        let lx = ml + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{ly:.1}" font-size="11">{}</text>"#,
            ly - 9.0,
            group_colour(i, groups.len()),
            lx + 14.0,
            esc(g)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_drop_the_token_count_only() {
        assert_eq!(
            stem("cpu/moe-layer/topk/olmoe-1b-7b/n256"),
            "cpu/moe-layer/topk/olmoe-1b-7b"
        );
        assert_eq!(
            stem("cpu/forward/decode/mixtral-scaled"),
            "cpu/forward/decode/mixtral-scaled"
        );
        assert_eq!(stem("cpu/x/nope"), "cpu/x/nope");
    }

    #[test]
    fn times_are_readable() {
        assert_eq!(fmt_time(0.000_012_3), "12.3 µs");
        assert_eq!(fmt_time(0.0123), "12.30 ms");
        assert_eq!(fmt_time(1.5), "1.500 s");
    }
}
