//! `trace`: the safetensors dump of routing per token, checked against the
//! HF transformers reference of the Mixtral fixture, and its input errors.

use moe_inspect_testkit as common;

use std::process::Command;

use common::{copy_fixture, fixture};
use moe_inspect::model::Weights;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-moe-inspect"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn i64s(w: &Weights, name: &str) -> (Vec<usize>, Vec<i64>) {
    let (tag, shape, bytes) = w.raw(name).unwrap();
    assert_eq!(tag, "I64", "{name}");
    (
        shape.to_vec(),
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    )
}

#[test]
fn trace_matches_the_transformers_reference() {
    let reference =
        Weights::open_file(&fixture("mixtral").join("forward_reference.safetensors")).unwrap();
    let mut prompts = Vec::new();
    while reference.contains(&format!("prompt{}.token_ids", prompts.len())) {
        prompts.push(i64s(&reference, &format!("prompt{}.token_ids", prompts.len())).1);
    }
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.txt");
    let text: Vec<String> = prompts
        .iter()
        .map(|p| {
            p.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(&ids, text.join("\n")).unwrap();
    let out = dir.path().join("trace.safetensors");
    let (code, stderr) = run(&[
        "trace",
        "--model",
        fixture("mixtral").to_str().unwrap(),
        "--token-ids",
        ids.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--logits",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let t = Weights::open_file(&out).unwrap();
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(i64s(&t, "token_ids").1, prompts.concat());
    assert_eq!(
        i64s(&t, "prompt_lengths").1,
        prompts.iter().map(|p| p.len() as i64).collect::<Vec<_>>()
    );
    assert_eq!(i64s(&t, "moe_layers").1, vec![0, 1]);
    let (tag, shape, sel) = t.raw("selected_experts").unwrap();
    assert_eq!((tag, shape), ("I16", &[tokens, 2, 2][..]));
    let sel: Vec<i16> = sel
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    let router = t.tensor("router_logits").unwrap();
    assert_eq!(router.shape, &[tokens, 2, 8]);
    let router = router.to_f32_vec();
    let logits = t.tensor("logits").unwrap();
    assert_eq!(logits.shape, &[tokens, 128]);
    let logits = logits.to_f32_vec();
    // Reference layout: [moe_layers, T, k] per prompt; trace: [tokens, moe_layers, k].
    let mut offset = 0;
    for (p, ids) in prompts.iter().enumerate() {
        let want_sel = i64s(&reference, &format!("prompt{p}.selected_experts")).1;
        let want_router = reference
            .tensor(&format!("prompt{p}.router_logits"))
            .unwrap()
            .to_f32_vec();
        let want_logits = reference
            .tensor(&format!("prompt{p}.logits"))
            .unwrap()
            .to_f32_vec();
        let t_len = ids.len();
        for tok in 0..t_len {
            for li in 0..2 {
                for k in 0..2 {
                    assert_eq!(
                        sel[((offset + tok) * 2 + li) * 2 + k] as i64,
                        want_sel[(li * t_len + tok) * 2 + k]
                    );
                }
                for e in 0..8 {
                    let got = router[((offset + tok) * 2 + li) * 8 + e];
                    let want = want_router[(li * t_len + tok) * 8 + e];
                    assert!((got - want).abs() < 1e-5);
                }
            }
            for v in 0..128 {
                let got = logits[(offset + tok) * 128 + v];
                assert!((got - want_logits[tok * 128 + v]).abs() < 1e-5);
            }
        }
        offset += t_len;
    }
}

#[test]
fn trace_of_the_demo_model_with_its_built_in_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.safetensors");
    let (code, stderr) = run(&["trace", "--output", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let t = Weights::open_file(&out).unwrap();
    assert!(!t.contains("logits"));
    let (_, lengths) = i64s(&t, "prompt_lengths");
    assert!(lengths.len() >= 16);
    let w = t.tensor("routing_weights").unwrap().to_f32_vec();
    // Mixtral renormalises over the top-2: each token's weights sum to 1, largest first.
    for pair in w.chunks(2) {
        assert!((pair[0] + pair[1] - 1.0).abs() < 1e-5 && pair[0] >= pair[1]);
    }
}

#[test]
fn prompt_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.safetensors");
    let out = out.to_str().unwrap();
    // A model directory without prompts.
    let (code, stderr) = run(&[
        "trace",
        "--model",
        fixture("qwen3-moe").to_str().unwrap(),
        "--output",
        out,
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--prompts FILE") && stderr.contains("--token-ids FILE"),
        "{stderr}"
    );
    // Text prompts but no tokenizer.json.
    let model = copy_fixture("qwen3-moe");
    std::fs::remove_file(model.path().join("tokenizer.json")).unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "hello world\n").unwrap();
    let (code, stderr) = run(&[
        "trace",
        "--model",
        model.path().to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        out,
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("tokenizer.json") && stderr.contains("--token-ids"),
        "{stderr}"
    );
    // Token ids outside the vocabulary, and a malformed ids file.
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "1 2 999\n").unwrap();
    let (code, stderr) = run(&[
        "trace",
        "--model",
        model.path().to_str().unwrap(),
        "--token-ids",
        ids.to_str().unwrap(),
        "--output",
        out,
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("token id 999") && stderr.contains("vocab_size 128"),
        "{stderr}"
    );
    std::fs::write(&ids, "1 two\n").unwrap();
    let (code, stderr) = run(&[
        "trace",
        "--token-ids",
        ids.to_str().unwrap(),
        "--output",
        out,
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("ids.txt") && stderr.contains("`two`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}
