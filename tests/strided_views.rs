//! Strided views of a fused tensor (gpt-oss's interleaved and Llama 4's
//! concatenated `[E, H, 2I]` experts): each expert's `[I, H]` gate/up and
//! `[H, I]` down read in place, element by element, with bounds checked.

use moe_inspect::model::writer::{f32_bytes, write, TensorSpec};
use moe_inspect::model::Weights;

/// `[E, H, 2I]` with value `100e + 10h + c` at (e, h, c).
fn fused(e: usize, h: usize, c: usize) -> Vec<f32> {
    (0..e)
        .flat_map(|e| (0..h).flat_map(move |h| (0..c).map(move |c| (100 * e + 10 * h + c) as f32)))
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

#[test]
fn interleaved_and_concatenated_experts_read_in_place() {
    let (e, h, i) = (2usize, 3usize, 2usize);
    let vals = fused(e, h, 2 * i);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    write(
        &path,
        &[
            (
                TensorSpec::new("gu", "F32", &[e, h, 2 * i]),
                f32_bytes(&vals),
            ),
            (
                TensorSpec::new("gu16", "BF16", &[e, h, 2 * i]),
                bf16_bytes(&vals),
            ),
        ],
    )
    .unwrap();
    let w = Weights::open_file(&path).unwrap();
    for name in ["gu", "gu16"] {
        let t = w.tensor(name).unwrap();
        for ex in 0..e {
            let first = ex * h * 2 * i;
            // gpt-oss: gate = [..., ::2], up = [..., 1::2], as [I, H].
            let gate = t.strided(first, i, h, 2, 2 * i).unwrap();
            let up = t.strided(first + 1, i, h, 2, 2 * i).unwrap();
            // Llama 4: gate = [..., :I], up = [..., I:], as [I, H].
            let gate_c = t.strided(first, i, h, 1, 2 * i).unwrap();
            let up_c = t.strided(first + i, i, h, 1, 2 * i).unwrap();
            let at = |hh: usize, c: usize| (100 * ex + 10 * hh + c) as f32;
            let want = |f: &dyn Fn(usize) -> usize| -> Vec<f32> {
                (0..i)
                    .flat_map(|r| (0..h).map(move |hh| (r, hh)))
                    .map(|(r, hh)| at(hh, f(r)))
                    .collect()
            };
            assert_eq!(gate.shape, [i, h]);
            assert_eq!(gate.to_f32_vec(), want(&|r| 2 * r), "{name} gate");
            assert_eq!(up.to_f32_vec(), want(&|r| 2 * r + 1), "{name} up");
            assert_eq!(gate_c.to_f32_vec(), want(&|r| r), "{name} gate (concat)");
            assert_eq!(up_c.to_f32_vec(), want(&|r| i + r), "{name} up (concat)");
            // A chunk from the middle agrees with the whole read.
            let mut part = vec![0f32; 3];
            up.read_f32(2, &mut part);
            assert_eq!(part, up.to_f32_vec()[2..5]);
            // Not contiguous: no bf16 words, no parts of it.
            assert!(!up.is_contiguous());
            assert!(up.bf16_words(0, 2).is_none());
            assert!(up.part(0, &[1]).is_err());
        }
        // Bounds: the last element of expert E lies outside; huge strides do not wrap.
        for err in [
            t.strided(e * h * 2 * i, i, h, 2, 2 * i).unwrap_err(),
            t.strided(0, i, h, usize::MAX, 2).unwrap_err(),
            t.strided(usize::MAX, 2, 2, 1, 1).unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains("t.safetensors"), "{msg}");
        }
    }
}
