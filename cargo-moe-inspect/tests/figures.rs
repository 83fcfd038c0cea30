//! The figures of the Markdown report, rendered from the demo model and
//! checked as a reader would: well-formed SVG, axis labels and a colour bar on
//! every heatmap, cosine colour scales centred on 0, real ticks on scatter
//! plots, visible blanks in token labels, a report header naming version,
//! command and date, and stale figures of a previous run removed (user files kept).

use std::path::Path;
use std::process::Command;

fn analyze(out: &Path, extra: &[&str]) {
    let mut args = vec![
        "analyze",
        "--format",
        "markdown",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(&args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Checks that `s` is well-formed XML as far as SVG figures need: comments,
/// balanced and properly nested tags, quoted attributes, known entities, one root.
fn check_well_formed(name: &str, s: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = s;
    while let Some(lt) = rest.find('<') {
        check_text(name, &rest[..lt]);
        rest = &rest[lt..];
        if let Some(body) = rest.strip_prefix("<!--") {
            let end = body
                .find("-->")
                .unwrap_or_else(|| panic!("{name}: unclosed comment"));
            rest = &body[end + 3..];
            continue;
        }
        // Find the tag's end outside quoted attribute values.
        let mut quote: Option<char> = None;
        let mut end = None;
        for (i, c) in rest.char_indices().skip(1) {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), '<') => panic!("{name}: '<' in an attribute value"),
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '<') => panic!("{name}: '<' inside a tag"),
                (None, '>') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.unwrap_or_else(|| panic!("{name}: unterminated tag"));
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(close) = tag.strip_prefix('/') {
            let open = stack
                .pop()
                .unwrap_or_else(|| panic!("{name}: </{close}> without an open tag"));
            assert_eq!(open, close.trim(), "{name}: mismatched closing tag");
            continue;
        }
        let tag_name: String = tag
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '/')
            .collect();
        assert!(
            !tag_name.is_empty()
                && tag_name
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, ':' | '-' | '_')),
            "{name}: bad tag <{tag}>"
        );
        check_text(name, tag);
        if stack.is_empty() {
            roots += 1;
            assert_eq!(tag_name, "svg", "{name}: root element");
        }
        if !tag.ends_with('/') {
            stack.push(tag_name);
        }
    }
    check_text(name, rest);
    assert!(stack.is_empty(), "{name}: unclosed {stack:?}");
    assert_eq!(roots, 1, "{name}: one root element");
}

/// Text and attribute values: every '&' starts a known entity.
fn check_text(name: &str, t: &str) {
    for (i, _) in t.match_indices('&') {
        let e = &t[i..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#"]
                .iter()
                .any(|x| e.starts_with(x)),
            "{name}: bare '&' in {t:?}"
        );
    }
    if !t.trim().is_empty() && !t.contains('=') {
        assert!(!t.contains('>'), "{name}: bare '>' in text {t:?}");
    }
}

/// The value of attribute `attr` in the first tag of `s` (from its start).
fn attr<'a>(tag: &'a str, attr: &str) -> Option<&'a str> {
    let key = format!(" {attr}=\"");
    let i = tag.find(&key)? + key.len();
    Some(&tag[i..i + tag[i..].find('"')?])
}

/// Opening tags with class `class` (the whole tag text, up to '>').
fn tags_with_class<'a>(s: &'a str, class: &str) -> Vec<&'a str> {
    s.split('<')
        .map(|t| &t[..t.find('>').unwrap_or(t.len())])
        .filter(|t| attr(t, "class").is_some_and(|c| c.split_whitespace().next() == Some(class)))
        .collect()
}

/// Texts of the `<text>` elements with exactly class `class`.
fn texts(s: &str, class: &str) -> Vec<String> {
    let key = format!("<text class=\"{class}\"");
    s.match_indices(&key)
        .map(|(i, _)| {
            let t = &s[i..];
            let a = t.find('>').unwrap() + 1;
            t[a..a + t[a..].find('<').unwrap()].to_string()
        })
        .collect()
}

fn rgb(fill: &str) -> (i32, i32, i32) {
    let h = |k: usize| i32::from_str_radix(&fill[k..k + 2], 16).unwrap();
    (h(1), h(3), h(5))
}

fn svgs(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "svg"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Structure every figure must have; returns how many heatmaps and scatters were seen.
fn check_figure(name: &str, svg: &str) -> (usize, usize) {
    check_well_formed(name, svg);
    assert!(
        svg.starts_with("<!-- moe-inspect figure -->"),
        "{name}: marker"
    );
    let width: f64 = attr(&svg[svg.find("<svg").unwrap()..], "width")
        .unwrap()
        .parse()
        .unwrap();
    // Titles fit: each title line at ~0.62 em per character is within the figure.
    let title = &svg[svg.find("<text class=\"title\"").unwrap()..];
    let title = &title[..title.find("</text>").unwrap()];
    let font: f64 = attr(title, "font-size").unwrap().parse().unwrap();
    for line in title.split("<tspan").skip(1) {
        let text = &line[line.find('>').unwrap() + 1..line.find("</tspan>").unwrap()];
        assert!(
            text.chars().count() as f64 * font * 0.62 <= width,
            "{name}: title line {text:?} wider than {width}"
        );
    }
    let mut seen = (0, 0);
    if svg.contains("class=\"cell") {
        seen.0 = 1;
        assert!(
            !texts(svg, "axis-label x").is_empty() && !texts(svg, "axis-label y").is_empty(),
            "{name}: axis labels"
        );
        assert_eq!(
            tags_with_class(svg, "colorbar").len(),
            1,
            "{name}: one colour bar"
        );
        let ticks = texts(svg, "colorbar-tick");
        assert!(ticks.len() >= 3, "{name}: colour bar ticks {ticks:?}");
        for t in &ticks {
            let v: f64 = t.parse().unwrap_or_else(|_| panic!("{name}: tick {t:?}"));
            assert!(t.len() <= 7 && v.is_finite(), "{name}: readable tick {t:?}");
        }
        assert_eq!(texts(svg, "colorbar-label").len(), 1, "{name}");
    }
    if svg.contains("<circle") && !svg.contains("class=\"cell") {
        seen.1 = 1;
        for axis in ["x", "y"] {
            let ticks = texts(svg, &format!("tick {axis}"));
            assert!(ticks.len() >= 2 * 3, "{name}: {axis} ticks {ticks:?}");
            for t in ticks {
                t.parse::<f64>()
                    .unwrap_or_else(|_| panic!("{name}: {axis} tick {t:?} not a number"));
            }
            assert!(!texts(svg, &format!("axis-label {axis}")).is_empty());
        }
    }
    seen
}

/// Cosine heatmaps: a diverging scale centred on 0.
fn check_cosine_scale(name: &str, svg: &str) {
    let bar = tags_with_class(svg, "colorbar")[0];
    let neutral = attr(bar, "data-neutral").unwrap();
    assert_eq!(neutral, "#f7f7f7", "{name}: neutral colour");
    let ticks = texts(svg, "colorbar-tick");
    assert_eq!(ticks.len(), 5, "{name}: {ticks:?}");
    assert_eq!(ticks[2], "0", "{name}: middle tick is 0: {ticks:?}");
    assert_eq!(
        ticks[0],
        ticks[4].trim_start_matches('-'),
        "{name}: symmetric"
    );
    let half: f64 = ticks[0].parse().unwrap();
    assert!(half > 0.0 && half <= 1.0, "{name}");
    let zero = tags_with_class(svg, "colorbar-step")
        .into_iter()
        .find(|t| attr(t, "data-value") == Some("0"))
        .unwrap_or_else(|| panic!("{name}: no colour-bar step at 0"));
    assert_eq!(attr(zero, "fill"), Some(neutral), "{name}: 0 is neutral");
    // Cells: positive red-ish, negative blue-ish, near 0 near white.
    let mut coloured = 0;
    for part in svg.split("<rect class=\"cell").skip(1) {
        if part.starts_with(" masked") {
            continue;
        }
        let fill = attr(part, "fill").unwrap();
        let t = &part[part.find("<title>").unwrap()..];
        let v: f64 = t[t.rfind(": ").unwrap() + 2..t.find("</title>").unwrap()]
            .parse()
            .unwrap();
        let (r, g, b) = rgb(fill);
        if v > 0.1 * half {
            assert!(r > b, "{name}: {v} drawn {fill}");
        } else if v < -0.1 * half {
            assert!(b > r, "{name}: {v} drawn {fill}");
        } else {
            assert!(r.min(g).min(b) > 200, "{name}: {v} drawn {fill}");
        }
        coloured += 1;
    }
    assert!(coloured > 0, "{name}: no cells");
    // Off-diagonal cells of the demo differ: more than 3 distinct colours.
    let mut fills: Vec<&str> = svg
        .split("<rect class=\"cell\"")
        .skip(1)
        .map(|p| attr(p, "fill").unwrap())
        .collect();
    fills.sort_unstable();
    fills.dedup();
    assert!(fills.len() > 3, "{name}: off-diagonal cells look alike");
}

#[test]
fn demo_report_figures_read_well_and_stale_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    analyze(out, &[]);

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let mut lines = md.lines().filter(|l| !l.trim().is_empty());
    assert_eq!(lines.next(), Some("# MoE inspection report"));
    let generated = lines.next().unwrap();
    let prefix = format!("Generated by moe-inspect {} on ", env!("CARGO_PKG_VERSION"));
    let date = generated
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix(" (UTC)."))
        .unwrap_or_else(|| panic!("{generated:?}"));
    let b = date.as_bytes();
    assert!(
        b.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && date.replace('-', "").chars().all(|c| c.is_ascii_digit())
            && date >= "2024-01-01",
        "{date}"
    );
    let command = lines.next().unwrap();
    assert!(
        command.starts_with("Command: `` ")
            && command.contains("analyze --format markdown --out")
            && command.contains(out.to_str().unwrap()),
        "{command}"
    );

    let figures = svgs(out);
    assert!(figures.len() >= 20, "{}", figures.len());
    let (mut heatmaps, mut scatters, mut cosines) = (0, 0, 0);
    for (name, svg) in &figures {
        let (h, s) = check_figure(name, svg);
        heatmaps += h;
        scatters += s;
        if [
            "expert-similarity",
            "neuron-similarity",
            "gate-embedding",
            "neuron-reorder",
        ]
        .iter()
        .any(|p| name.starts_with(p))
        {
            check_cosine_scale(name, svg);
            cosines += 1;
        }
    }
    // Heatmaps with a cosine scale: expert-, neuron- and gate-similarity of
    // the 4 layers, and neuron-reorder of the middle MoE layer (its default).
    assert!(
        heatmaps >= 13 && scatters >= 12 && cosines >= 13,
        "{heatmaps} heatmaps, {scatters} scatters, {cosines} cosine scales"
    );
    assert!(md.contains("centred on 0"), "the scale is stated");

    // A second run (dynamic analyses) into the same folder: the static
    // figures of the first run go, a user's files stay.
    std::fs::write(
        out.join("notes.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>\n",
    )
    .unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    analyze(out, &["--analyses", "dynamic"]);
    assert!(
        !out.join("expert-similarity-layer3.svg").exists(),
        "stale figure kept"
    );
    assert!(
        !out.join("gate-vs-neuron-layer0.svg").exists(),
        "stale figure kept"
    );
    assert!(out.join("notes.svg").exists() && out.join("notes.txt").exists());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for (name, svg) in svgs(out) {
        if name == "notes.svg" {
            continue;
        }
        assert!(
            md.contains(&format!("]({name})")),
            "{name} not in the report"
        );
        check_figure(&name, &svg);
        if name.starts_with("chosen-experts") || name.starts_with("intermediate") {
            assert_eq!(texts(&svg, "axis-label y"), ["token"], "{name}");
            let labels = texts(&svg, "tick");
            assert!(
                labels.iter().all(|l| !l.contains(' ') && !l.contains('\n')),
                "{name}: blank in {labels:?}"
            );
            assert!(
                labels.iter().any(|l| l.contains('␠')),
                "{name}: the demo prompt's spaces are shown: {labels:?}"
            );
        }
        if name.starts_with("output-similarity") {
            let ticks = texts(&svg, "colorbar-tick");
            assert_eq!(ticks[2], "0.5", "{name}: angular scale centred on 0.5");
        }
    }
    for n in 0..4 {
        assert!(out.join(format!("chosen-experts-layer{n}.svg")).exists());
        assert!(out.join(format!("intermediate-layer{n}.svg")).exists());
    }
}
