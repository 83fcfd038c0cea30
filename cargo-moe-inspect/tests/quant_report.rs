//! `diff --baseline BASE --candidate QUANT`: the quantisation report (issue
//! 14), end to end through the CLI on checkpoints this test writes from the
//! small fixtures: routers alone quantised (2 bits, round-to-nearest with a
//! per-row scale; every other byte identical), experts alone quantised,
//! experts relabelled, and an expert that no token reaches. The relative
//! weight errors are checked against an independent computation: the
//! safetensors files parsed here and the norms summed in plain f64. Every
//! JSON output is validated against `docs/schemas/diff.v1.schema.json`.

use moe_inspect_testkit as common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{copy_fixture, fixture, rewrite_safetensors};
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], cwd: &Path) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .env_remove("GITHUB_ACTIONS")
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("MOE_INSPECT_UPDATE")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// 8 prompts of 24 token ids (vocabulary 128), from a fixed LCG.
fn token_ids(dir: &Path) -> PathBuf {
    let mut state = 0x2545_f491u64;
    let mut text = String::new();
    for _ in 0..8 {
        let ids: Vec<String> = (0..24)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 33) % 128).to_string()
            })
            .collect();
        text.push_str(&ids.join(" "));
        text.push('\n');
    }
    let path = dir.join("ids.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn diff_json(base: &Path, cand: &Path, ids: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "diff",
        "--baseline",
        base.to_str().unwrap(),
        "--candidate",
        cand.to_str().unwrap(),
        "--token-ids",
        ids.to_str().unwrap(),
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let r = run(&args, ids.parent().unwrap());
    assert!(
        r.code == 0 || r.code == 1,
        "diff failed ({}): {}",
        r.code,
        r.stderr
    );
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("docs/schemas/diff.v1.schema.json"))
            .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "diff/v1 schema: {errors:?}");
    v["quantisation"].clone()
}

/// Round-to-nearest symmetric quantisation of each row to `bits` bits, one
/// scale per row (max |x| ↦ the largest level), stored back as f32.
fn rtn_rows(values: &mut [f32], cols: usize, bits: u32) {
    let qmax = ((1u32 << (bits - 1)) - 1) as f32;
    for row in values.chunks_mut(cols) {
        let amax = row.iter().fold(0f32, |a, &x| a.max(x.abs()));
        if amax == 0.0 {
            continue;
        }
        let scale = amax / qmax;
        for x in row.iter_mut() {
            *x = (*x / scale).round().clamp(-qmax, qmax) * scale;
        }
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn shards(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") && n.starts_with("model"))
        .collect();
    v.sort();
    v
}

/// A copy of `name` with every f32 tensor for which `edit` returns new values replaced.
fn edited(
    name: &str,
    mut edit: impl FnMut(&str, &[usize], &[f32]) -> Option<Vec<f32>>,
) -> tempfile::TempDir {
    let dir = copy_fixture(name);
    std::fs::remove_file(dir.path().join("forward_reference.safetensors")).ok();
    for shard in shards(dir.path()) {
        rewrite_safetensors(dir.path(), &shard, |spec, bytes| {
            assert_eq!(spec.dtype, "F32", "{}: the fixture is f32", spec.name);
            if let Some(v) = edit(&spec.name, &spec.shape, &f32s(bytes)) {
                assert_eq!(v.len() * 4, bytes.len());
                *bytes = to_bytes(&v);
            }
        });
    }
    dir
}

fn is_router(name: &str) -> bool {
    name.ends_with("mlp.gate.weight")
}

fn is_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// Every tensor of a checkpoint directory, parsed here from the safetensors
/// bytes (header length, JSON header, little-endian f32 data).
fn tensors(dir: &Path) -> BTreeMap<String, Vec<f64>> {
    let mut out = BTreeMap::new();
    for shard in shards(dir) {
        let bytes = std::fs::read(dir.join(&shard)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (name, t) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            assert_eq!(t["dtype"], "F32");
            let off = t["data_offsets"].as_array().unwrap();
            let (a, b) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            let data = &bytes[8 + n + a..8 + n + b];
            out.insert(
                name.clone(),
                f32s(data).into_iter().map(|x| x as f64).collect(),
            );
        }
    }
    out
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| (y - x) * (y - x)).sum();
    let n: f64 = a.iter().map(|x| x * x).sum();
    (d / n).sqrt()
}

fn num(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite(), "{what}: {x}");
    x
}

fn count(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: not a count: {v}"))
}

/// (flips, router_flips, upstream_flips, router_share), checked for consistency.
fn attribution(v: &Value, what: &str) -> (u64, u64, u64, f64) {
    let a = &v["attribution"];
    let f = count(&a["flips"], what);
    let r = count(&a["router_flips"], what);
    let u = count(&a["upstream_flips"], what);
    let s = num(&a["router_share"], what);
    assert_eq!(f, r + u, "{what}: flips = router + upstream");
    let want = if f > 0 { r as f64 / f as f64 } else { 0.0 };
    assert!(
        (s - want).abs() < 1e-12,
        "{what}: router_share {s}, want {want}"
    );
    (f, r, u, s)
}

fn layers(q: &Value) -> &Vec<Value> {
    q["layers"].as_array().expect("quantisation.layers")
}

/// Checks every layer's relative errors against the independent
/// computation, candidate expert `perm(layer)[i]` against baseline expert `i`.
fn check_weight_errors(
    q: &Value,
    base: &Path,
    cand: &Path,
    moe_layers: &[usize],
    experts: usize,
    perm: impl Fn(usize) -> Vec<usize>,
) {
    let (ta, tb) = (tensors(base), tensors(cand));
    let ls = layers(q);
    assert_eq!(ls.len(), moe_layers.len(), "one entry per MoE layer");
    let mut compared = 0;
    for (l, &layer) in ls.iter().zip(moe_layers) {
        assert_eq!(count(&l["layer"], "layer") as usize, layer);
        let p = perm(layer);
        let router = format!("model.layers.{layer}.mlp.gate.weight");
        let (ra, rb) = (&ta[&router], &tb[&router]);
        let h = ra.len() / experts;
        let permuted: Vec<f64> = (0..experts)
            .flat_map(|i| rb[p[i] * h..(p[i] + 1) * h].to_vec())
            .collect();
        let want = rel(ra, &permuted);
        let got = num(&l["router_error"], "router_error");
        assert!(
            (got - want).abs() <= 1e-12 * want.max(1e-300),
            "layer {layer} router: {got} vs {want}"
        );
        let rows = l["router_row_error"].as_array().unwrap();
        assert_eq!(rows.len(), experts);
        for (i, r) in rows.iter().enumerate() {
            let want = rel(&ra[i * h..(i + 1) * h], &rb[p[i] * h..(p[i] + 1) * h]);
            let got = num(r, "router_row_error");
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1e-300),
                "layer {layer} router row {i}: {got} vs {want}"
            );
        }
        for m in ["gate", "up", "down"] {
            let v = l["weight_error"][m].as_array().unwrap();
            assert_eq!(v.len(), experts, "layer {layer} {m}: every expert");
            for (i, x) in v.iter().enumerate() {
                let name =
                    |j: usize| format!("model.layers.{layer}.mlp.experts.{j}.{m}_proj.weight");
                let want = rel(&ta[&name(i)], &tb[&name(p[i])]);
                let got = num(x, "weight_error");
                assert!(
                    (got - want).abs() <= 1e-12 * want.max(1e-300),
                    "layer {layer} expert {i} {m}: {got} vs {want}"
                );
                compared += 1;
            }
            let shared = format!("model.layers.{layer}.mlp.shared_experts.{m}_proj.weight");
            match ta.get(&shared) {
                Some(a) => {
                    let want = rel(a, &tb[&shared]);
                    let got = num(&l["shared_error"][m], "shared_error");
                    assert!(
                        (got - want).abs() <= 1e-12 * want.max(1e-300),
                        "layer {layer} shared {m}: {got} vs {want}"
                    );
                }
                None => assert!(l.get("shared_error").is_none(), "no shared expert"),
            }
        }
    }
    assert_eq!(compared, moe_layers.len() * experts * 3);
}

#[test]
fn quantised_routers_cause_the_flips() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_ids(tmp.path());
    let base = fixture("qwen3-moe");
    let cand = edited("qwen3-moe", |name, shape, v| {
        is_router(name).then(|| {
            let mut v = v.to_vec();
            rtn_rows(&mut v, shape[1], 2);
            v
        })
    });
    let q = diff_json(&base, cand.path(), &ids, &[]);
    let ls = layers(&q);
    assert_eq!(ls.len(), 2, "MoE layers 1 and 2");
    assert_eq!(count(&q["tokens"], "tokens"), 8 * 24);
    // The first MoE layer with flips: its input is the baseline's, so every flip is the router's.
    let first = ls
        .iter()
        .find(|l| attribution(l, "layer").0 > 0)
        .expect("2-bit routers flip some token");
    let (f, r, _, share) = attribution(first, "first layer with flips");
    assert_eq!(
        share, 1.0,
        "router_share of the first layer with flips ({r} of {f})"
    );
    let (flips, router, upstream, _) = attribution(&q, "total");
    assert!(flips > 0);
    assert!(
        router > upstream,
        "most flips are the router's: {router} router, {upstream} upstream"
    );
    for l in ls {
        assert!(num(&l["router_error"], "router_error") > 0.0);
        let routing = &l["routing"];
        for key in ["top1", "topk_overlap", "jsd"] {
            num(&routing[key], key);
        }
        assert!(num(&routing["top1"], "top1") < 1.0);
        assert!(num(&routing["jsd"], "jsd") > 0.0);
        for m in ["gate", "up", "down"] {
            for x in l["weight_error"][m].as_array().unwrap() {
                assert_eq!(num(x, m), 0.0, "experts are bit-identical");
            }
        }
    }
    check_weight_errors(&q, &base, cand.path(), &[1, 2], 8, |_| (0..8).collect());
    let errors: Vec<f64> = ls
        .iter()
        .map(|l| num(&l["router_error"], "router_error"))
        .collect();
    eprintln!(
        "routers at 2 bits: router errors {errors:?}; flips {flips}, router {router}, upstream {upstream}; first layer {f} flips, share {share}"
    );
}

#[test]
fn quantised_experts_flip_nothing_through_the_router() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_ids(tmp.path());
    let base = fixture("qwen3-moe");
    let cand = edited("qwen3-moe", |name, shape, v| {
        is_expert(name).then(|| {
            let mut v = v.to_vec();
            rtn_rows(&mut v, shape[1], 2);
            v
        })
    });
    let q = diff_json(&base, cand.path(), &ids, &[]);
    let ls = layers(&q);
    assert_eq!(ls.len(), 2);
    let (f1, _, _, share1) = attribution(&ls[0], "first MoE layer");
    assert_eq!(
        f1, 0,
        "the first MoE layer's input and router are unchanged"
    );
    assert_eq!(share1, 0.0);
    let (flips, router, upstream, share) = attribution(&q, "total");
    assert_eq!(router, 0, "bit-identical routers cause no flip");
    assert_eq!(share, 0.0);
    assert!(
        upstream > 0,
        "2-bit experts of layer 1 move layer 2's input enough to flip a token"
    );
    for l in ls {
        assert_eq!(num(&l["router_error"], "router_error"), 0.0);
        for m in ["gate", "up", "down"] {
            for x in l["weight_error"][m].as_array().unwrap() {
                assert!(num(x, m) > 0.0);
            }
        }
    }
    check_weight_errors(&q, &base, cand.path(), &[1, 2], 8, |_| (0..8).collect());
    eprintln!("experts at 2 bits: flips {flips}, upstream {upstream}");
}

/// Experts 2 and 6 of layer 2 swap places (weights and router rows), and the
/// experts are quantised to 4 bits: the errors are those of the matched pairs.
#[test]
fn relabelled_experts_are_matched_before_they_are_compared() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_ids(tmp.path());
    let base = fixture("qwen3-moe");
    let swap = |e: usize| match e {
        2 => 6,
        6 => 2,
        e => e,
    };
    let orig = tensors(&base);
    let cand = edited("qwen3-moe", |name, shape, v| {
        if name == "model.layers.2.mlp.gate.weight" {
            let h = shape[1];
            return Some(
                (0..shape[0])
                    .flat_map(|i| v[swap(i) * h..(swap(i) + 1) * h].to_vec())
                    .collect(),
            );
        }
        if !is_expert(name) {
            return None;
        }
        let mut src = name.to_string();
        if let Some(rest) = name.strip_prefix("model.layers.2.mlp.experts.") {
            let (e, tail) = rest.split_once('.').unwrap();
            src = format!(
                "model.layers.2.mlp.experts.{}.{tail}",
                swap(e.parse().unwrap())
            );
        }
        let mut w: Vec<f32> = orig[&src].iter().map(|&x| x as f32).collect();
        rtn_rows(&mut w, shape[1], 4);
        Some(w)
    });
    let q = diff_json(&base, cand.path(), &ids, &[]);
    let ls = layers(&q);
    assert!(ls[0].get("matching").is_none(), "layer 1 is not relabelled");
    let m: Vec<u64> = ls[1]["matching"]
        .as_array()
        .expect("layer 2 is relabelled")
        .iter()
        .map(|x| count(x, "matching"))
        .collect();
    assert_eq!(m, vec![0, 1, 6, 3, 4, 5, 2, 7]);
    assert_eq!(num(&ls[1]["router_error"], "router_error"), 0.0);
    let (_, router, _, _) = attribution(&q, "total");
    assert_eq!(router, 0, "the relabelled router picks the same experts");
    check_weight_errors(&q, &base, cand.path(), &[1, 2], 8, |layer| {
        (0..8)
            .map(|i| if layer == 2 { swap(i) } else { i })
            .collect()
    });
    for x in ls[1]["weight_error"]["gate"].as_array().unwrap() {
        assert!(num(x, "gate") < 0.2, "4-bit error of a matched pair: {x}");
    }
}

/// DeepSeek-V3 geometry: expert 5's correction bias of −1000 keeps its
/// group (experts 4 and 5) out of every token's selection in layer 2.
#[test]
fn an_expert_without_tokens_is_flagged_by_calibration_coverage() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_ids(tmp.path());
    let base = edited("deepseek-v3", |name, _, v| {
        (name == "model.layers.2.mlp.gate.e_score_correction_bias").then(|| {
            let mut v = v.to_vec();
            v[5] = -1000.0;
            v
        })
    });
    let cand = edited("deepseek-v3", |name, shape, v| {
        if name == "model.layers.2.mlp.gate.e_score_correction_bias" {
            let mut v = v.to_vec();
            v[5] = -1000.0;
            return Some(v);
        }
        (is_expert(name) || name.contains(".mlp.shared_experts.")).then(|| {
            let mut v = v.to_vec();
            rtn_rows(&mut v, shape[1], 4);
            v
        })
    });
    let q = diff_json(base.path(), cand.path(), &ids, &[]);
    assert_eq!(count(&q["coverage_threshold"], "threshold"), 1);
    check_weight_errors(&q, base.path(), cand.path(), &[1, 2], 8, |_| {
        (0..8).collect()
    });
    for l in layers(&q) {
        assert!(num(&l["shared_error"]["down"], "shared") > 0.0);
    }
    let ls = layers(&q);
    assert_eq!(ls.len(), 2, "MoE layers 1 and 2");
    let flagged = |l: &Value| -> Vec<u64> {
        l["coverage"]["flagged"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| count(x, "flagged"))
            .collect()
    };
    let cov = &ls[1]["coverage"];
    let tokens = |who: &str| -> Vec<u64> {
        cov[who]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| count(x, who))
            .collect()
    };
    let (ba, ca) = (tokens("baseline"), tokens("candidate"));
    assert_eq!(ba.len(), 8);
    assert_eq!(ca.len(), 8);
    assert_eq!(ba.iter().sum::<u64>(), 8 * 24 * 2, "k = 2 per token");
    assert_eq!(ca.iter().sum::<u64>(), 8 * 24 * 2);
    assert_eq!((ba[5], ca[5]), (0, 0));
    let f = flagged(&ls[1]);
    assert!(f.contains(&5), "expert 5 flagged: {f:?}");
    for e in 0..8u64 {
        let under = ba[e as usize] < 1 || ca[e as usize] < 1;
        assert_eq!(f.contains(&e), under, "expert {e}: {ba:?} {ca:?}");
    }
    // A higher threshold flags more experts.
    let q2 = diff_json(
        base.path(),
        cand.path(),
        &ids,
        &["--coverage-threshold", "1000"],
    );
    assert_eq!(flagged(&layers(&q2)[1]).len(), 8);
    // The table and the Markdown report show it.
    let args = |fmt: &'static str| {
        vec![
            "diff".to_string(),
            "--baseline".into(),
            base.path().to_str().unwrap().into(),
            "--candidate".into(),
            cand.path().to_str().unwrap().into(),
            "--token-ids".into(),
            ids.to_str().unwrap().into(),
            "--format".into(),
            fmt.into(),
        ]
    };
    let table = run(
        &args("table").iter().map(String::as_str).collect::<Vec<_>>(),
        tmp.path(),
    );
    assert!(table.code == 0 || table.code == 1, "{}", table.stderr);
    assert!(
        table.stdout.contains("experts < 1 tokens"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("router share"), "{}", table.stdout);
    let out = tmp.path().join("md");
    let mut a = args("markdown");
    a.extend(["--out".into(), out.to_str().unwrap().into()]);
    let md = run(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        tmp.path(),
    );
    assert!(md.code == 0 || md.code == 1, "{}", md.stderr);
    let text = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(text.contains("## Calibration coverage"), "{text}");
    assert!(text.contains("| 2 | 5 | 0 | 0 |"), "{text}");
    for layer in [1, 2] {
        for fig in ["quant-error", "quant-coverage"] {
            let name = format!("{fig}-layer{layer}.svg");
            assert!(text.contains(&name), "{name} linked");
            let svg = std::fs::read_to_string(out.join(&name)).unwrap();
            assert!(svg.contains("<svg"), "{name}");
        }
    }
    // --out is for the Markdown report only.
    let mut bad = args("json");
    bad.extend(["--out".into(), out.to_str().unwrap().into()]);
    let r = run(
        &bad.iter().map(String::as_str).collect::<Vec<_>>(),
        tmp.path(),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--out"), "{}", r.stderr);
}

/// DeepSeek-V3: the candidate's correction bias of layer 1 (the first MoE
/// layer) lifts expert 3. The baseline's rule is applied with the
/// baseline's bias, so every flip of layer 1 is the router's.
#[test]
fn a_changed_correction_bias_is_attributed_to_the_router() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = token_ids(tmp.path());
    let base = fixture("deepseek-v3");
    let cand = edited("deepseek-v3", |name, _, v| {
        (name == "model.layers.1.mlp.gate.e_score_correction_bias").then(|| {
            let mut v = v.to_vec();
            v[3] += 0.5;
            v
        })
    });
    let q = diff_json(&base, cand.path(), &ids, &[]);
    let ls = layers(&q);
    assert_eq!(count(&ls[0]["layer"], "layer"), 1);
    let (f, r, _, share) = attribution(&ls[0], "layer 1");
    assert!(f > 0, "a bias of +0.5 moves some token to expert 3");
    assert_eq!((r, share), (f, 1.0));
    assert_eq!(
        num(&ls[0]["router_error"], "router_error"),
        0.0,
        "the router matrix is unchanged"
    );
    eprintln!(
        "correction bias +0.5: layer 1 flips {f}, total {:?}",
        attribution(&q, "total")
    );
}
