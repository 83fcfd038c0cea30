//! Dynamic analyses (paper §4): all four come from one forward pass over the
//! prompts, through an observer. Each MoE layer's input is the real top-k
//! forward's hidden state, while every expert is also evaluated on it.

pub mod chosen_experts;
pub mod intermediate;
pub mod norm_score;
pub mod output_similarity;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::analysis::results::{
    ChosenExperts, Intermediate, NormScore, NormScoreLayer, OutputSimilarity,
};
use crate::error::Result;
use crate::forward::observer::{MoeObservation, Observer, Wants};
use crate::forward::weights::ce;
use crate::forward::Forward;
use crate::model::{DenseModel, ExpertView};

/// Which dynamic analyses to run, on which MoE layers.
#[derive(Debug, Clone)]
pub struct DynamicOptions {
    /// Run `output-similarity`.
    pub output_similarity: bool,
    /// Run `norm-score`.
    pub norm_score: bool,
    /// Run `intermediate`.
    pub intermediate: bool,
    /// Run `chosen-experts`.
    pub chosen_experts: bool,
    /// The MoE layers to analyse.
    pub layers: Vec<usize>,
    /// `intermediate`: threshold as a fraction of the layer's largest |a|.
    pub threshold_fraction: f64,
}

/// Per-token maps of the first prompt, for the Markdown figures (not in the JSON).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenMaps {
    /// Token ids of the first prompt.
    pub token_ids: Vec<u32>,
    /// Per layer: `[tokens][experts]` routing weight (0 when not selected).
    pub routing: BTreeMap<usize, Vec<Vec<f64>>>,
    /// Per layer: `[tokens][experts]` mean |act(gate·x)|.
    pub activation: BTreeMap<usize, Vec<Vec<f64>>>,
}

/// The dynamic sections of a report.
#[derive(Debug, Clone, Default)]
pub struct DynamicResults {
    /// `output-similarity`, if run.
    pub output_similarity: Option<OutputSimilarity>,
    /// `norm-score`, if run.
    pub norm_score: Option<NormScore>,
    /// `intermediate`, if run.
    pub intermediate: Option<Intermediate>,
    /// `chosen-experts`, if run.
    pub chosen_experts: Option<ChosenExperts>,
    /// Per-token maps for the report's figures.
    pub maps: TokenMaps,
}

struct LayerAcc {
    out_sim: Option<output_similarity::Accumulator>,
    norm: Option<norm_score::Accumulator>,
    inter: Option<intermediate::Accumulator>,
    chosen: Option<chosen_experts::Accumulator>,
}

struct Collector<'a> {
    opts: &'a DynamicOptions,
    progress: &'a dyn crate::analysis::Progress,
    layers: BTreeMap<usize, LayerAcc>,
    dense: Option<&'a DenseModel>,
    dense_cache: Option<(usize, [Tensor; 3])>,
    device: Device,
    shared: bool,
    tokens: usize,
    maps: TokenMaps,
    error: Option<crate::Error>,
}

fn tensors_of(view: &ExpertView<'_>, device: &Device) -> Result<[Tensor; 3]> {
    let t = |v: &crate::model::TensorView<'_>| {
        Tensor::from_vec(v.to_f32_vec(), v.shape.to_vec(), device).map_err(ce(v.name))
    };
    Ok([t(&view.gate)?, t(&view.up)?, t(&view.down)?])
}

impl Collector<'_> {
    /// The dense reference FFN's output `[tokens, hidden]` on the layer input.
    fn dense_output(
        &mut self,
        layer: usize,
        input: &[f32],
        tokens: usize,
        hidden: usize,
    ) -> Result<Vec<f32>> {
        let dense = self.dense.expect("called with a dense reference");
        if self.dense_cache.as_ref().map(|c| c.0) != Some(layer) {
            let view = dense.ffn(layer)?;
            self.dense_cache = Some((layer, tensors_of(&view, &self.device)?));
        }
        let (_, [g, u, d]) = self.dense_cache.as_ref().expect("filled above");
        let x = Tensor::from_slice(input, (tokens, hidden), &self.device)
            .map_err(ce("dense reference FFN"))?;
        (|| {
            let a = x.matmul(&g.t()?)?.silu()?;
            let h = (a * x.matmul(&u.t()?)?)?;
            h.matmul(&d.t()?)?.flatten_all()?.to_vec1::<f32>()
        })()
        .map_err(ce("dense reference FFN"))
    }

    fn observe(&mut self, o: &MoeObservation<'_>) -> Result<()> {
        if !self.layers.contains_key(&o.layer) {
            return Ok(());
        }
        let (t, h, e, k) = (o.tokens, o.hidden, o.experts, o.top_k);
        let dense_out = match (self.dense, o.input, self.opts.output_similarity) {
            (Some(_), Some(input), true) => Some(self.dense_output(o.layer, input, t, h)?),
            _ => None,
        };
        let first_layer = *self.layers.keys().next().unwrap_or(&0);
        if o.layer == first_layer {
            self.tokens += t;
        }
        if o.prompt == 0 && self.maps.token_ids.is_empty() {
            self.maps.token_ids = vec![0; t];
        }
        let acc = self.layers.get_mut(&o.layer).expect("checked above");
        for tok in 0..t {
            let expert_row = |x: usize| -> &[f32] {
                let out = o.expert_outputs.unwrap_or(&[]);
                &out[(x * t + tok) * h..(x * t + tok + 1) * h]
            };
            if let Some(a) = &mut acc.out_sim {
                let mut rows: Vec<&[f32]> = (0..e).map(expert_row).collect();
                if let Some(s) = o.shared_output {
                    rows.push(&s[tok * h..(tok + 1) * h]);
                }
                if let Some(d) = &dense_out {
                    rows.push(&d[tok * h..(tok + 1) * h]);
                }
                a.add(&rows);
            }
            if let Some(a) = &mut acc.norm {
                let scores: Vec<f64> = o.scores[tok * e..(tok + 1) * e]
                    .iter()
                    .map(|&s| s as f64)
                    .collect();
                let norms: Vec<f64> = (0..e)
                    .map(|x| {
                        expert_row(x)
                            .iter()
                            .map(|&v| v as f64 * v as f64)
                            .sum::<f64>()
                            .sqrt()
                    })
                    .collect();
                a.add(&scores, &norms);
            }
            if let Some(a) = &mut acc.chosen {
                a.add(&o.selected[tok * k..(tok + 1) * k]);
            }
        }
        if let (Some(a), Some(acts)) = (&mut acc.inter, o.activations) {
            a.add(acts, t);
        }
        if o.prompt == 0 {
            let mut routing = vec![vec![0.0; e]; t];
            for (tok, row) in routing.iter_mut().enumerate() {
                for j in 0..k {
                    row[o.selected[tok * k + j] as usize] = o.weights[tok * k + j] as f64;
                }
            }
            self.maps.routing.insert(o.layer, routing);
            if let Some(acts) = o.activations {
                let n = o.intermediate;
                let map = (0..t)
                    .map(|tok| {
                        (0..e)
                            .map(|x| {
                                let row = &acts[(x * t + tok) * n..(x * t + tok + 1) * n];
                                row.iter().map(|v| v.abs() as f64).sum::<f64>() / n.max(1) as f64
                            })
                            .collect()
                    })
                    .collect();
                self.maps.activation.insert(o.layer, map);
            }
        }
        Ok(())
    }
}

impl Observer for Collector<'_> {
    fn wants(&self) -> Wants {
        let o = self.opts;
        Wants {
            all_expert_outputs: o.output_similarity || o.norm_score,
            activations: o.intermediate,
            shared_output: o.output_similarity && self.shared,
            input: o.output_similarity && self.dense.is_some(),
        }
    }

    fn layer_done(&mut self, layer: usize) {
        self.progress.layer_done(layer);
    }

    fn moe_layer(&mut self, o: &MoeObservation<'_>) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.observe(o) {
            self.error = Some(e);
        }
    }
}

/// Runs the forward pass once over `prompts` and computes the selected dynamic analyses.
pub fn run(
    fwd: &Forward<'_>,
    prompts: &[Vec<u32>],
    opts: &DynamicOptions,
    dense: Option<&DenseModel>,
) -> Result<DynamicResults> {
    run_with_progress(fwd, prompts, opts, dense, &())
}

/// [`run`], reporting each finished decoder layer to `progress`.
pub fn run_with_progress(
    fwd: &Forward<'_>,
    prompts: &[Vec<u32>],
    opts: &DynamicOptions,
    dense: Option<&DenseModel>,
    progress: &dyn crate::analysis::Progress,
) -> Result<DynamicResults> {
    let info = fwd.model_info();
    let e = info.num_experts;
    let shared = info.shared_intermediate > 0;
    let mut labels: Vec<String> = (0..e).map(|x| x.to_string()).collect();
    if shared {
        labels.push("SE".into());
    }
    if dense.is_some() {
        labels.push("F".into());
    }
    let layers = opts
        .layers
        .iter()
        .map(|&l| {
            (
                l,
                LayerAcc {
                    out_sim: opts
                        .output_similarity
                        .then(|| output_similarity::Accumulator::new(labels.len())),
                    norm: opts.norm_score.then(|| norm_score::Accumulator::new(e)),
                    inter: opts.intermediate.then(|| {
                        intermediate::Accumulator::new(
                            e,
                            info.expert_intermediate,
                            opts.threshold_fraction,
                        )
                    }),
                    chosen: opts
                        .chosen_experts
                        .then(|| chosen_experts::Accumulator::new(e)),
                },
            )
        })
        .collect();
    let mut c = Collector {
        opts,
        progress,
        layers,
        dense,
        dense_cache: None,
        device: fwd.device().clone(),
        shared,
        tokens: 0,
        maps: TokenMaps::default(),
        error: None,
    };
    progress.start(info.num_layers);
    fwd.run(prompts, &mut c, false)?;
    progress.finish();
    if let Some(err) = c.error {
        return Err(err);
    }
    let mut maps = std::mem::take(&mut c.maps);
    maps.token_ids = prompts.first().cloned().unwrap_or_default();
    let tokens = c.tokens;
    let mut out = DynamicResults {
        maps,
        ..DynamicResults::default()
    };
    if opts.output_similarity {
        out.output_similarity = Some(OutputSimilarity {
            layers: c
                .layers
                .iter()
                .filter_map(|(&l, a)| a.out_sim.as_ref().map(|s| s.finish(l, labels.clone())))
                .collect(),
            tokens,
        });
    }
    if opts.norm_score {
        let mut total = vec![vec![0u64; e]; e];
        let (mut matches, mut pairs, mut rho, mut rho_n) = (0u64, 0u64, 0.0, 0u64);
        let mut layers = Vec::new();
        for (&l, a) in &c.layers {
            let Some(n) = &a.norm else { continue };
            let m = n.matrix();
            for (row, mrow) in total.iter_mut().zip(&m) {
                for (x, y) in row.iter_mut().zip(mrow) {
                    *x += y;
                }
            }
            matches += n.matches;
            pairs += n.tokens;
            rho += n.spearman_sum;
            rho_n += n.spearman_n;
            layers.push(NormScoreLayer {
                layer: l,
                counts: m,
                top1_match_rate: n.matches as f64 / n.tokens.max(1) as f64,
            });
        }
        out.norm_score = Some(NormScore {
            layers,
            total,
            top1_match_rate: matches as f64 / pairs.max(1) as f64,
            spearman_mean: if rho_n > 0 {
                rho / rho_n as f64
            } else {
                f64::NAN
            },
            chance: 1.0 / e as f64,
        });
    }
    if opts.intermediate {
        out.intermediate = Some(Intermediate {
            threshold_fraction: opts.threshold_fraction,
            layers: c
                .layers
                .iter()
                .filter_map(|(&l, a)| a.inter.as_ref().map(|x| x.finish(l)))
                .collect(),
        });
    }
    if opts.chosen_experts {
        let layers: Vec<_> = c
            .layers
            .iter()
            .filter_map(|(&l, a)| a.chosen.as_ref().map(|x| x.finish(l)))
            .collect();
        out.chosen_experts = Some(ChosenExperts {
            summary: chosen_experts::summary(&layers),
            layers,
            tokens,
        });
    }
    Ok(out)
}
