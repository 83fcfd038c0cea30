//! The native forward pass against a fixture's forward reference (the
//! `forward_reference.safetensors` layout of fixtures/FORWARD.md: per prompt
//! the token ids, final logits and, per MoE layer, router logits, selected
//! experts, routing weights, the MoE input, every expert's output and
//! activation, the shared expert's output), with every expected item compared.

use std::path::Path;

use moe_inspect::forward::observer::{MoeObservation, Observer, Wants};
use moe_inspect::forward::{parse_device, to_host, Forward};
use moe_inspect::model::{Model, Weights};

/// A forward reference file.
pub struct Reference(Weights);

impl Reference {
    /// `file` of fixture `name`.
    pub fn open(name: &str, file: &str) -> Reference {
        Reference(Weights::open_file(&crate::fixture(name).join(file)).unwrap())
    }

    /// The token ids of `prompt0`, `prompt1`, ... (at least one).
    pub fn prompts(&self) -> Vec<Vec<u32>> {
        let mut prompts = Vec::new();
        while self.has(&format!("prompt{}.token_ids", prompts.len())) {
            let ids = self.i64(&format!("prompt{}.token_ids", prompts.len()));
            prompts.push(ids.iter().map(|&i| i as u32).collect::<Vec<u32>>());
        }
        assert!(!prompts.is_empty(), "no prompts in the reference");
        prompts
    }

    /// Whether the reference holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Shape and values of an f32 tensor.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.0.tensor(name).unwrap();
        (t.shape.to_vec(), t.to_f32_vec())
    }

    /// The values of an I64 tensor.
    pub fn i64(&self, name: &str) -> Vec<i64> {
        let (tag, _, bytes) = self.0.raw(name).unwrap();
        assert_eq!(tag, "I64");
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// Copies of every observation of a run (all quantities wanted).
#[derive(Default)]
pub struct Recorder {
    /// (prompt, layer, what was observed).
    pub seen: Vec<(usize, usize, Recorded)>,
}

/// One MoE layer's observation of one prompt.
pub struct Recorded {
    /// Layer input `[T, H]`.
    pub input: Vec<f32>,
    /// Router logits `[T, E]`.
    pub router_logits: Vec<f32>,
    /// The routing rule's scores `[T, E]`.
    pub scores: Vec<f32>,
    /// Selected experts `[T, k]`.
    pub selected: Vec<u32>,
    /// Routing weights `[T, k]`.
    pub weights: Vec<f32>,
    /// Every expert's output `[E, T, H]`.
    pub expert_outputs: Vec<f32>,
    /// Every expert's activation `[E, T, I]`.
    pub activations: Vec<f32>,
    /// The shared expert's output `[T, H]`, if any.
    pub shared: Option<Vec<f32>>,
}

impl Recorder {
    /// The observation of `layer` for prompt `prompt`; panics naming `what`
    /// when there is none.
    pub fn get(&self, prompt: usize, layer: usize, what: &str) -> &Recorded {
        self.seen
            .iter()
            .find(|(p, l, _)| (*p, *l) == (prompt, layer))
            .map(|(_, _, r)| r)
            .unwrap_or_else(|| panic!("{what}: not observed"))
    }
}

impl Observer for Recorder {
    fn wants(&self) -> Wants {
        Wants {
            all_expert_outputs: true,
            activations: true,
            shared_output: true,
            input: true,
        }
    }
    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        self.seen.push((
            o.prompt,
            o.layer,
            Recorded {
                input: o.input.unwrap().to_vec(),
                router_logits: o.router_logits.to_vec(),
                scores: o.scores.to_vec(),
                selected: o.selected.to_vec(),
                weights: o.weights.to_vec(),
                expert_outputs: o.expert_outputs.unwrap().to_vec(),
                activations: o.activations.unwrap().to_vec(),
                shared: o.shared_output.map(<[f32]>::to_vec),
            },
        ));
    }
}

/// The largest difference per quantity over every prompt and MoE layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct MaxErrors {
    /// Final logits.
    pub logits: f32,
    /// Router logits.
    pub router_logits: f32,
    /// Routing weights.
    pub weights: f32,
    /// MoE layer inputs.
    pub inputs: f32,
    /// Every expert's output.
    pub expert_outputs: f32,
    /// Every expert's activation.
    pub activations: f32,
    /// The shared expert's output.
    pub shared: f32,
}

fn max_abs(what: &str, a: &[f32], b: &[f32]) -> f32 {
    crate::max_abs_diff_flat(what, a, b) as f32
}

/// `[layers, T, rest...]` → the slice of one layer.
fn layer_slice(data: &[f32], shape: &[usize], li: usize) -> Vec<f32> {
    let per: usize = shape[1..].iter().product();
    assert_eq!(data.len(), per * shape[0], "reference shape {shape:?}");
    data[li * per..(li + 1) * per].to_vec()
}

/// `[T, E, X]` → `[E, T, X]` (the observer's expert-major layout).
fn expert_major(data: &[f32], t: usize, e: usize, x: usize) -> Vec<f32> {
    assert_eq!(data.len(), t * e * x);
    let mut out = vec![0f32; data.len()];
    for tok in 0..t {
        for ex in 0..e {
            let src = &data[(tok * e + ex) * x..(tok * e + ex + 1) * x];
            out[(ex * t + tok) * x..(ex * t + tok + 1) * x].copy_from_slice(src);
        }
    }
    out
}

/// Runs the model in `dir` on the CPU over the reference's prompts and
/// compares everything the reference holds within `tol` (max-abs): the
/// selected experts exactly; NaN or infinities on either side, a length
/// mismatch, a missing observation or a missing shared output panic.
pub fn check_forward(dir: &Path, r: &Reference, tol: f32) -> MaxErrors {
    let name = dir.display();
    let model = Model::open(dir).unwrap();
    let moe_layers: Vec<usize> = r.i64("moe_layers").iter().map(|&l| l as usize).collect();
    assert_eq!(moe_layers, model.info.moe_layers, "{name}");
    assert!(!moe_layers.is_empty(), "{name}: no MoE layer to compare");
    let prompts = r.prompts();
    let fwd = Forward::new(&model, parse_device("cpu").unwrap()).unwrap();
    let mut rec = Recorder::default();
    let out = fwd.run(&prompts, &mut rec, true).unwrap();
    assert_eq!(out.logits.len(), prompts.len(), "{name}: logits per prompt");
    assert_eq!(
        rec.seen.len(),
        prompts.len() * moe_layers.len(),
        "{name}: one observation per prompt and MoE layer"
    );
    let (e, h, i, k) = (
        model.info.num_experts,
        model.info.hidden_size,
        model.info.expert_intermediate,
        model.info.top_k,
    );
    let mut m = MaxErrors::default();
    let check = |what: &str, worst: &mut f32, got: &[f32], want: &[f32]| {
        let d = max_abs(what, got, want);
        assert!(d <= tol, "{what} differ by {d:e}");
        *worst = worst.max(d);
    };
    for (p, ids) in prompts.iter().enumerate() {
        let t = ids.len();
        let (shape, want) = r.f32(&format!("prompt{p}.logits"));
        assert_eq!(shape[0], t, "{name} prompt {p}: positions");
        let got: Vec<f32> = to_host(&out.logits[p]).unwrap().concat();
        check(
            &format!("{name} prompt {p}: logits"),
            &mut m.logits,
            &got,
            &want,
        );
        let (rl_shape, rl) = r.f32(&format!("prompt{p}.router_logits"));
        let sel = r.i64(&format!("prompt{p}.selected_experts"));
        assert_eq!(
            sel.len(),
            moe_layers.len() * t * k,
            "{name}: selected experts"
        );
        let (rw_shape, rw) = r.f32(&format!("prompt{p}.routing_weights"));
        let (in_shape, inputs) = r.f32(&format!("prompt{p}.moe_input"));
        let (eo_shape, eo) = r.f32(&format!("prompt{p}.expert_outputs"));
        let (ea_shape, ea) = r.f32(&format!("prompt{p}.expert_act"));
        let shared = r
            .has(&format!("prompt{p}.shared_output"))
            .then(|| r.f32(&format!("prompt{p}.shared_output")));
        for shape in [&rl_shape, &rw_shape, &in_shape, &eo_shape, &ea_shape] {
            assert_eq!(shape[..2], [moe_layers.len(), t], "{name}: reference shape");
        }
        for (li, &layer) in moe_layers.iter().enumerate() {
            let what = format!("{name} prompt {p} layer {layer}");
            let got = &rec
                .seen
                .iter()
                .find(|(pp, ll, _)| *pp == p && *ll == layer)
                .unwrap_or_else(|| panic!("{what}: not observed"))
                .2;
            let want_sel: Vec<u32> = sel[li * t * k..(li + 1) * t * k]
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(got.selected, want_sel, "{what}: selected experts");
            check(
                &format!("{what}: router logits"),
                &mut m.router_logits,
                &got.router_logits,
                &layer_slice(&rl, &rl_shape, li),
            );
            check(
                &format!("{what}: routing weights"),
                &mut m.weights,
                &got.weights,
                &layer_slice(&rw, &rw_shape, li),
            );
            check(
                &format!("{what}: layer input"),
                &mut m.inputs,
                &got.input,
                &layer_slice(&inputs, &in_shape, li),
            );
            check(
                &format!("{what}: all-expert outputs"),
                &mut m.expert_outputs,
                &got.expert_outputs,
                &expert_major(&layer_slice(&eo, &eo_shape, li), t, e, h),
            );
            check(
                &format!("{what}: activations"),
                &mut m.activations,
                &got.activations,
                &expert_major(&layer_slice(&ea, &ea_shape, li), t, e, i),
            );
            match (&shared, &got.shared) {
                (Some((s_shape, s)), Some(g)) => check(
                    &format!("{what}: shared expert output"),
                    &mut m.shared,
                    g,
                    &layer_slice(s, s_shape, li),
                ),
                (None, None) => {}
                (want, _) => panic!(
                    "{what}: shared expert output expected: {}, observed: {}",
                    want.is_some(),
                    got.shared.is_some()
                ),
            }
        }
    }
    m
}
