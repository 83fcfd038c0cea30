//! The library's top-level modules form one graph without cycles, layered
//! model → forward → analysis → golden → report (issue 17): a module imports
//! only layers below it, and nothing in the library imports `report` (only
//! the CLI does). The edges are read from the sources: every `crate::<top>`
//! path (including `use crate::{a, b::c}` groups and `super::` paths that
//! reach the crate root) outside comments, strings and character literals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The layers, lowest first: each may import only those before it.
const LAYERS: [&str; 5] = ["model", "forward", "analysis", "golden", "report"];

/// Utilities used across layers: allowed wherever they are used, as long as
/// the whole graph stays acyclic.
const UTILITIES: [&str; 11] = [
    "atomic_write",
    "bench",
    "demo",
    "error",
    "import",
    "input",
    "layers",
    "memory",
    "rng",
    "test_support",
    "trace",
];

/// Where an edge was seen first: `file:line`.
type Edges = BTreeMap<(String, String), String>;

#[test]
fn top_level_modules_have_no_cycles_and_follow_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = top_level_modules(&src);
    for m in &modules {
        assert!(
            LAYERS.contains(&m.as_str()) || UTILITIES.contains(&m.as_str()),
            "new top-level module `{m}`: add it to LAYERS or UTILITIES in tests/module_graph.rs"
        );
    }
    for layer in LAYERS {
        assert!(
            modules.contains(layer),
            "layer `{layer}` not found under src/"
        );
    }
    let edges = edges(&src, &modules);
    assert!(
        edges.keys().any(|(a, b)| a == "analysis" && b == "model"),
        "the edge reader found no analysis → model edge: it is broken"
    );

    if let Some(cycle) = find_cycle(&modules, &edges) {
        let mut msg = String::from("module cycle:\n");
        for pair in cycle.windows(2) {
            let at = &edges[&(pair[0].clone(), pair[1].clone())];
            let _ = writeln!(msg, "  {} → {}  (e.g. {at})", pair[0], pair[1]);
        }
        panic!("{msg}");
    }

    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut wrong = String::new();
    for ((from, to), at) in &edges {
        let upward = matches!((rank(from), rank(to)), (Some(a), Some(b)) if b > a);
        if upward || (to == "report" && from != "report") {
            let _ = writeln!(wrong, "  {from} → {to}  ({at})");
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering {} (and only the CLI imports report):\n{wrong}",
        LAYERS.join(" → ")
    );
}

#[test]
fn the_edge_reader_skips_comments_and_strings_and_reads_groups() {
    let modules: BTreeSet<String> = ["model", "forward", "report", "error", "golden"]
        .map(String::from)
        .into();
    let text = r##"
// use crate::report::x;
/* use crate::report::y; /* nested */ crate::report */
/// [`crate::report`]
let s = "crate::report"; let r = r#"crate::report"#; let c = '"'; let l: &'static str = "";
use crate::{error::Result, model::{Model, Matrix}};
fn f<'a>(x: &'a crate::forward::Forward) {}
use super::golden::Thing;
"##;
    let mut found = BTreeSet::new();
    for (name, _) in references(text, 1, &modules) {
        found.insert(name);
    }
    let expected: BTreeSet<String> = ["error", "model", "forward", "golden"]
        .map(String::from)
        .into();
    assert_eq!(found, expected);
}

/// Names of the modules directly under `src/` (files and directories).
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() || (path.extension().is_some_and(|e| e == "rs") && name != "lib") {
            out.insert(name);
        }
    }
    out
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Edges between distinct top-level modules, with where each was first seen.
fn edges(src: &Path, modules: &BTreeSet<String>) -> Edges {
    let mut out = Edges::new();
    for module in modules {
        let mut files = Vec::new();
        let file = src.join(format!("{module}.rs"));
        if file.is_file() {
            files.push(file);
        }
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        files.sort();
        for file in files {
            let rel = file.strip_prefix(src).unwrap();
            // Module depth of the file: `x.rs` and `x/mod.rs` are 1, `x/y.rs` is 2.
            let mut depth = rel.components().count();
            if rel.file_name().is_some_and(|n| n == "mod.rs") {
                depth -= 1;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for (target, line) in references(&text, depth, modules) {
                if &target != module {
                    out.entry((module.clone(), target))
                        .or_insert_with(|| format!("src/{}:{line}", rel.display()));
                }
            }
        }
    }
    out
}

/// `text` with comments, string and character literals blanked out
/// (newlines kept, so line numbers stay right).
fn code_only(text: &str) -> Vec<char> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::with_capacity(c.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let at = |pos: usize| c.get(pos).copied();
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && at(i + 1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    out.extend([' ', ' ']);
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    out.extend([' ', ' ']);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (at(i + 1) == Some('"') || at(i + 1) == Some('#'))
            && !(i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // Raw string r"…", r#"…"#: ends at a quote followed by as many #.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() {
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend(c[i..j.min(c.len())].iter().map(|&ch| blank(ch)));
            i = j;
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                let step = if c[i] == '\\' { 2 } else { 1 };
                for _ in 0..step {
                    if i < c.len() {
                        out.push(blank(c[i]));
                        i += 1;
                    }
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && (at(i + 1) == Some('\\') || at(i + 2) == Some('\'')) {
            // A character literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            let mut j = i + 1;
            if c[j] == '\\' {
                j += 2;
            } else {
                j += 1;
            }
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            out.extend(c[i..(j + 1).min(c.len())].iter().map(|&ch| blank(ch)));
            i = j + 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The top-level modules a file of module depth `depth` refers to, with lines.
fn references(text: &str, depth: usize, modules: &BTreeSet<String>) -> Vec<(String, usize)> {
    let code = code_only(text);
    let line_of = |pos: usize| 1 + code[..pos].iter().filter(|&&ch| ch == '\n').count();
    let ident_at = |mut pos: usize| {
        let mut s = String::new();
        while pos < code.len() && (code[pos].is_alphanumeric() || code[pos] == '_') {
            s.push(code[pos]);
            pos += 1;
        }
        (s, pos)
    };
    let skip_ws = |mut pos: usize| {
        while pos < code.len() && code[pos].is_whitespace() {
            pos += 1;
        }
        pos
    };
    let mut out = Vec::new();
    let mut push = |name: String, pos: usize| {
        if modules.contains(&name) {
            out.push((name, line_of(pos)));
        }
    };
    let mut i = 0;
    while i < code.len() {
        let starts_word = i == 0 || !(code[i - 1].is_alphanumeric() || code[i - 1] == '_');
        if !starts_word || !(code[i].is_alphabetic()) {
            i += 1;
            continue;
        }
        let (word, end) = ident_at(i);
        // Where the path's first segment after the crate root starts.
        let mut root = None;
        if word == "crate" && code[end..].starts_with(&[':', ':']) {
            root = Some(end + 2);
        } else if word == "super" {
            let (mut pos, mut supers) = (end, 1);
            while code[pos..].starts_with(&[':', ':']) {
                let (next, after) = ident_at(pos + 2);
                if next == "super" {
                    supers += 1;
                    pos = after;
                } else {
                    break;
                }
            }
            if supers >= depth && code[pos..].starts_with(&[':', ':']) {
                root = Some(pos + 2);
            }
            i = pos;
        }
        if let Some(start) = root {
            let start = skip_ws(start);
            if code.get(start) == Some(&'{') {
                // A group: the first segment of each item at depth 1.
                let mut depth_b = 0;
                let mut item_start = true;
                let mut pos = start;
                while pos < code.len() {
                    match code[pos] {
                        '{' => {
                            depth_b += 1;
                            item_start = depth_b == 1;
                            pos += 1;
                        }
                        '}' => {
                            depth_b -= 1;
                            pos += 1;
                            if depth_b == 0 {
                                break;
                            }
                        }
                        ',' => {
                            item_start = depth_b == 1;
                            pos += 1;
                        }
                        ch if ch.is_alphabetic() && item_start => {
                            let (name, after) = ident_at(pos);
                            push(name, pos);
                            item_start = false;
                            pos = after;
                        }
                        _ => pos += 1,
                    }
                }
                i = pos;
            } else {
                let (name, after) = ident_at(start);
                push(name, start);
                i = after;
            }
        } else if i < end {
            i = end;
        }
    }
    out
}

/// A cycle `a → b → … → a` (first node repeated at the end), if any.
fn find_cycle(modules: &BTreeSet<String>, edges: &Edges) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &Edges,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for (_, to) in edges.keys().filter(|(from, _)| from == m) {
            match state.get(to.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == to).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(to.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(to, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in modules {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}
