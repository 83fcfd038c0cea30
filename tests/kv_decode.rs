//! Decoding with a key/value cache (`Forward::decoder`): the logits of
//! token `t` from the decode path (a prefill, then one token at a time on the
//! cached keys and values) equal those of a full forward pass over the same
//! `t + 1` tokens (the path `forward_reference.rs` checks against
//! transformers), within 1e-5, at every position; each step runs one token
//! through the layers.

use moe_inspect_testkit as common;

use candle_core::Device;
use common::fixture;
use moe_inspect::forward::observer::{MoeObservation, Observer};
use moe_inspect::forward::{to_host, Forward};
use moe_inspect::model::Model;

/// Max-abs tolerance: both paths compute in f32 from the same weights; only
/// the order of the sums differs.
const TOL: f32 = 1e-5;

/// Counts the MoE layers a step reports, and the tokens each saw.
#[derive(Default)]
struct Tokens(Vec<usize>);

impl Observer for Tokens {
    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        self.0.push(o.tokens);
    }
}

fn compare(got: &[f32], want: &[f32], what: &str) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: vocab");
    assert!(!got.is_empty(), "{what}: no logits");
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && w.is_finite(),
            "{what}: logit {i} {g} vs {w}"
        );
        worst = worst.max((g - w).abs());
    }
    assert!(worst <= TOL, "{what}: max |Δ| {worst:e} > {TOL:e}");
    got.len()
}

fn check(name: &str, resident: bool) {
    let model = Model::open(&fixture(name)).unwrap();
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    let fwd = if resident { fwd.keep_weights() } else { fwd };
    let vocab = fwd.cfg.vocab_size;
    let ids: Vec<u32> = (0..11).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
    // The last position's logits of a full forward over ids[..=t].
    let want: Vec<Vec<f32>> = (0..ids.len())
        .map(|t| {
            let out = fwd.run(&[ids[..=t].to_vec()], &mut (), true).unwrap();
            let rows = to_host(&out.logits[0]).unwrap();
            assert_eq!(rows.len(), t + 1);
            rows.into_iter().last().unwrap()
        })
        .collect();
    let moe_layers = model.info.moe_layers.len();
    assert!(moe_layers > 0, "{name}: no MoE layer");
    for split in [1, 4] {
        let what = |t: usize| format!("{name} (resident {resident}, prefill {split}) position {t}");
        let mut dec = fwd.decoder(ids.len()).unwrap();
        let pre = to_host(&dec.prefill(&ids[..split], &mut ()).unwrap()).unwrap();
        assert_eq!(pre.len(), split);
        let mut compared = 0;
        for (t, row) in pre.iter().enumerate() {
            compared += compare(row, &want[t], &what(t));
        }
        let mut first = Vec::new();
        for t in split..ids.len() {
            let mut seen = Tokens::default();
            let got = dec.step(ids[t], &mut seen).unwrap().to_vec();
            assert_eq!(
                seen.0,
                vec![1; moe_layers],
                "{}: one token per MoE layer",
                what(t)
            );
            compared += compare(&got, &want[t], &what(t));
            if t == split {
                first = got;
            }
        }
        assert_eq!(compared, ids.len() * vocab, "every position compared");
        assert_eq!(dec.len(), ids.len());
        let e = dec.step(ids[0], &mut ()).unwrap_err().to_string();
        assert!(e.contains("full"), "{e}");
        // Rewound, the same step gives the same logits (the cache is reused,
        // not grown).
        dec.truncate(split);
        assert_eq!(dec.step(ids[split], &mut ()).unwrap(), &first[..]);
        // On a thread of the pool (as `bench` steps), with the pool's other
        // threads kept spinning through the step: the same logits.
        dec.truncate(split);
        let in_pool = rayon::scope(|_| dec.step(ids[split], &mut ()).map(<[f32]>::to_vec));
        assert_eq!(in_pool.unwrap(), first);
    }
}

/// Mixtral (f32): streamed (hub layout) and resident (f32 matrices transposed).
#[test]
fn mixtral_decode_equals_the_full_forward() {
    check("mixtral", false);
    check("mixtral", true);
}

/// OLMoE (bf16 matrices read as stored, q/k norm over the whole projection).
#[test]
fn olmoe_bf16_decode_equals_the_full_forward() {
    check("olmoe", true);
    check("olmoe", false);
}

/// Qwen3-MoE (per-head q/k norms), Qwen2-MoE (q/k/v biases, gated shared
/// expert), Grok-1 (soft-capped attention logits, extra norms, multipliers),
/// GLM-4.5 (partial rotary, a dense first layer), Granite (bf16, multipliers).
#[test]
fn family_variants_decode_equal_the_full_forward() {
    for name in [
        "qwen3-moe",
        "qwen2-moe",
        "grok-1",
        "families/glm4_moe",
        "families/granitemoe",
    ] {
        check(name, true);
    }
}

#[test]
fn unsupported_attention_and_bad_use_are_refused() {
    for (name, needle) in [
        ("deepseek-v3", "multi-head latent attention"),
        ("families/gpt_oss", "gpt-oss"),
        ("families/llama4", "Llama 4"),
        ("families/qwen3_next", "Gated DeltaNet"),
        ("families/qwen3_5_moe", "Gated DeltaNet"),
    ] {
        let model = Model::open(&fixture(name)).unwrap();
        let fwd = Forward::new(&model, Device::Cpu).unwrap();
        assert!(fwd.kv_cache_unsupported().is_some());
        let e = fwd.decoder(4).err().expect("refused").to_string();
        assert!(e.contains(needle), "{name}: {e}");
    }
    let model = Model::open(&fixture("mixtral")).unwrap();
    let fwd = Forward::new(&model, Device::Cpu).unwrap();
    assert!(fwd.kv_cache_unsupported().is_none());
    assert!(fwd.decoder(0).is_err());
    let mut dec = fwd.decoder(3).unwrap();
    let e = dec.prefill(&[1, 2, 3, 4], &mut ()).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
    let vocab = fwd.cfg.vocab_size as u32;
    let e = dec.step(vocab, &mut ()).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    dec.prefill(&[1, 2], &mut ()).unwrap();
    let e = dec.prefill(&[1], &mut ()).unwrap_err().to_string();
    assert!(e.contains("truncate(0)"), "{e}");
}

/// `Compute::Bf16` (opt-in, as llama.cpp computes on bf16 weights) reaches
/// the decode step too: on OLMoE and Granite (bf16 weights) every step's
/// logits stay within 1% of the largest exact logit of a full exact forward,
/// and move away from it by more than 1e-5 where the CPU has AVX-512 BF16
/// (the mode is taken); without it the mode is the exact kernels and the
/// step must equal the full forward at 1e-5.
#[test]
fn bf16_compute_decode_stays_within_bf16_rounding() {
    use moe_inspect::forward::expert_gemm::Compute;
    for name in ["olmoe", "families/granitemoe"] {
        let model = Model::open(&fixture(name)).unwrap();
        let exact = Forward::new(&model, Device::Cpu).unwrap().keep_weights();
        let fwd = Forward::new(&model, Device::Cpu)
            .unwrap()
            .keep_weights()
            .compute(Compute::Bf16);
        let vocab = fwd.cfg.vocab_size;
        let ids: Vec<u32> = (0..8).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
        let mut dec = fwd.decoder(ids.len()).unwrap();
        dec.prefill(&ids[..2], &mut ()).unwrap();
        let mut compared = 0;
        for t in 2..ids.len() {
            let got = dec.step(ids[t], &mut ()).unwrap().to_vec();
            let out = exact.run(&[ids[..=t].to_vec()], &mut (), true).unwrap();
            let want = to_host(&out.logits[0]).unwrap().pop().unwrap();
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0 && scale.is_finite(), "{name}: scale");
            let mut worst = 0f32;
            for (&g, &w) in got.iter().zip(&want) {
                assert!(g.is_finite(), "{name} position {t}: {g}");
                worst = worst.max((g - w).abs());
                compared += 1;
            }
            if Compute::bf16_supported() {
                assert!(
                    worst <= 0.01 * scale,
                    "{name} position {t}: {worst:e} vs {scale:e}"
                );
                assert!(
                    worst > 1e-5,
                    "{name} position {t}: the step stayed exact ({worst:e})"
                );
            } else {
                assert!(worst <= TOL, "{name} position {t}: {worst:e}");
            }
        }
        assert_eq!(
            compared,
            (ids.len() - 2) * vocab,
            "{name}: every logit compared"
        );
    }
}
