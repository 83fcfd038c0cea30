//! The MoE block: routing, tokens grouped by expert, one matmul per active
//! expert over its token block, accumulation in place; and the router logits.

use candle_core::Tensor;

use super::expert_gemm::{self};
use super::matvec;
use super::observer::{MoeObservation, Observer, Wants};
use super::routing;
use super::weights::{self, ce, Ffn, HostData, HostFfn, MlpWeights};
use super::{Forward, R};
use crate::error::{Error, Result};

impl Forward<'_> {
    /// The MoE block: routing on the host, tokens grouped by expert (one
    /// matmul per active expert over its token block), accumulation in place.
    /// All experts are evaluated on every token only when the observer asks.
    pub(super) fn moe(
        &self,
        layer: usize,
        prompt: usize,
        x: &Tensor,
        mlp: &MlpWeights,
        wants: Wants,
        observer: &mut dyn Observer,
    ) -> Result<Tensor> {
        let MlpWeights::Moe {
            bias,
            experts,
            shared,
            shared_gate,
            ..
        } = mlp
        else {
            unreachable!("moe() is called for MoE layers only")
        };
        let what = format!("MoE layer {layer}");
        let e_count = experts.len();
        let k = self.model.info.top_k;
        let (t, hdim) = x.dims2().map_err(ce(&what))?;
        // On the CPU the experts run through the grouped kernels, straight
        // from the token rows and the weights in their hub layout (the
        // activations observer, which wants `act(gate·x)` alone, takes the
        // tensor path); the router too.
        let on_device = !x.device().is_cpu() || self.tensor_dispatch;
        let all = wants.all_expert_outputs || wants.activations;
        let x_host = host_copy(x, !on_device && !wants.activations, &what)?;
        let logits = self.logits_of(mlp, x, x_host.as_deref())?;
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(self.diverged(layer, "router logits"));
        }
        let mut scores = Vec::with_capacity(t * e_count);
        let mut selected = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e_count];
        // Every token's rule, tokens in parallel (the per-token sort is the
        // host's share of a layer: with 2048 tokens and 128 experts it costs
        // milliseconds on one core).
        let per_token: Vec<(Vec<f64>, routing::TokenRoute)> = {
            use rayon::prelude::*;
            logits
                .par_chunks(e_count.max(1))
                .with_min_len(32)
                .map(|row| {
                    let s = self.cfg.routing.scores(row);
                    let r = self.cfg.routing.route_scores(&s, k, bias.as_deref());
                    (s, r)
                })
                .collect()
        };
        for (tok, (token_scores, route)) in per_token.iter().enumerate() {
            scores.extend(token_scores.iter().map(|&s| s as f32));
            for (&e, &w) in route.experts.iter().zip(&route.weights) {
                selected.push(e as u32);
                weights.push(w);
                by_expert[e].push((tok as u32, w));
            }
        }
        let mut out = vec![0f32; t * hdim];
        let mut all_out: Vec<f32> = Vec::new();
        let mut all_act: Vec<f32> = Vec::new();
        let inter = self.model.info.expert_intermediate;
        let act = self.activation();
        // On a GPU the top-k dispatch stays on the device: one gather of the
        // routed tokens, grouped by expert, one matmul chain per active
        // expert on its slice, one weighted scatter-add into the output.
        let mut out_dev: Option<Tensor> = None;
        if on_device && !all {
            out_dev = Some(
                self.grouped_on_device(x, experts, &by_expert)
                    .map_err(ce(&what))?,
            );
        }
        // The routed experts through the host kernels: one token
        // (decoding) in two passes over the cores for all its experts,
        // many tokens in two passes for all the routed experts.
        let on_host = out_dev.is_none()
            && !all
            && x_host.as_deref().is_some_and(|xh| {
                experts_on_host(xh, hdim, experts, &by_expert, inter, act, &mut out)
            });
        if out_dev.is_none() && !on_host {
            for (e, f) in experts.iter().enumerate() {
                let host = x_host.as_deref().zip(f.host_hub()).filter(|(_, hf)| {
                    let i = hf.gate.rows;
                    (hf.gate.cols, hf.up.rows, hf.up.cols) == (hdim, i, hdim)
                        && (hf.down.rows, hf.down.cols) == (hdim, i)
                });
                if let Some((xh, hf)) = host {
                    let job = HostExpert {
                        x: xh,
                        t,
                        hdim,
                        inter: hf.gate.rows,
                        act,
                        all,
                        pairs: &by_expert[e],
                    };
                    let keep = wants.all_expert_outputs.then_some(&mut all_out);
                    let done = match (hf.gate.data(), hf.up.data(), hf.down.data()) {
                        (HostData::F32(g), HostData::F32(u), HostData::F32(d)) => {
                            job.run(g, u, d, &mut out, keep)
                        }
                        (HostData::Bf16(g), HostData::Bf16(u), HostData::Bf16(d)) => {
                            job.run(g, u, d, &mut out, keep)
                        }
                        (HostData::F16(g), HostData::F16(u), HostData::F16(d)) => {
                            job.run(g, u, d, &mut out, keep)
                        }
                        _ => false,
                    };
                    if done {
                        continue;
                    }
                }
                if all {
                    let (a, y) = self.ffn(f, x).map_err(ce(&what))?;
                    let y: Vec<f32> = y
                        .flatten_all()
                        .and_then(|y| y.to_vec1())
                        .map_err(ce(&what))?;
                    add_weighted_rows(&mut out, &y, hdim, &by_expert[e], true);
                    if wants.all_expert_outputs {
                        all_out.extend_from_slice(&y);
                    }
                    if wants.activations {
                        let a: Vec<f32> = a
                            .flatten_all()
                            .and_then(|a| a.to_vec1())
                            .map_err(ce(&what))?;
                        all_act.extend_from_slice(&a);
                    }
                } else if !by_expert[e].is_empty() {
                    let toks: Vec<u32> = by_expert[e].iter().map(|&(tok, _)| tok).collect();
                    let idx = Tensor::new(toks.as_slice(), x.device()).map_err(ce(&what))?;
                    let y: Vec<f32> = x
                        .index_select(&idx, 0)
                        .and_then(|xe| self.ffn(f, &xe))
                        .and_then(|(_, y)| y.flatten_all()?.to_vec1())
                        .map_err(ce(&what))?;
                    add_weighted_rows(&mut out, &y, hdim, &by_expert[e], false);
                }
            }
        }
        let mut shared_host: Option<Vec<f32>> = None;
        if let (Some(f), Some(routed)) = (shared, out_dev.as_ref()) {
            let (y, total) = (|| {
                let y = self.ffn(f, x)?.1;
                let gated = match shared_gate {
                    Some(g) => {
                        y.broadcast_mul(&candle_nn::ops::sigmoid(&self.lin(x, g, None)?)?)?
                    }
                    None => y.clone(),
                };
                Ok((y, (routed + gated)?))
            })()
            .map_err(ce(&what))?;
            if wants.shared_output {
                shared_host = Some(
                    y.flatten_all()
                        .and_then(|y| y.to_vec1())
                        .map_err(ce(&what))?,
                );
            }
            out_dev = Some(total);
        } else if let Some(f) = shared {
            let y = self.ffn(f, x).map_err(ce(&what))?.1;
            let y_host: Vec<f32> = y
                .flatten_all()
                .and_then(|y| y.to_vec1())
                .map_err(ce(&what))?;
            let gate: Option<Vec<f32>> = match shared_gate {
                Some(g) => Some(
                    candle_nn::ops::sigmoid(&self.lin(x, g, None).map_err(ce(&what))?)
                        .and_then(|s| s.flatten_all()?.to_vec1())
                        .map_err(ce(&what))?,
                ),
                None => None,
            };
            for tok in 0..t {
                let g = gate.as_ref().map_or(1.0, |g| g[tok]);
                for (o, v) in out[tok * hdim..(tok + 1) * hdim]
                    .iter_mut()
                    .zip(&y_host[tok * hdim..(tok + 1) * hdim])
                {
                    *o += g * v;
                }
            }
            if wants.shared_output {
                shared_host = Some(y_host);
            }
        }
        let input = host_copy(x, wants.input, &what)?;
        observer.moe_layer(&MoeObservation {
            layer,
            prompt,
            tokens: t,
            hidden: hdim,
            experts: e_count,
            top_k: k,
            input: input.as_deref(),
            router_logits: &logits,
            scores: &scores,
            selected: &selected,
            weights: &weights,
            expert_outputs: wants.all_expert_outputs.then_some(all_out.as_slice()),
            activations: wants.activations.then_some(all_act.as_slice()),
            intermediate: inter,
            shared_output: shared_host.as_deref(),
        });
        match out_dev {
            Some(y) => Ok(y),
            None => Tensor::from_vec(out, (t, hdim), x.device()).map_err(ce(&what)),
        }
    }

    /// The router logits `[tokens, experts]` of an MoE layer's input `x`, on
    /// the host: from the CPU kernel on the CPU for few tokens or experts
    /// ([`use_cpu_kernel`]), else from candle's matmul.
    pub fn router_logits(&self, mlp: &MlpWeights, x: &Tensor) -> Result<Vec<f32>> {
        let t = x.dim(0).map_err(ce("router input"))?;
        let wanted = x.device().is_cpu() && use_cpu_kernel(t, self.model.info.num_experts);
        let host = host_copy(x, wanted, "router input")?;
        self.logits_of(mlp, x, host.as_deref())
    }

    fn logits_of(&self, mlp: &MlpWeights, x: &Tensor, x_host: Option<&[f32]>) -> Result<Vec<f32>> {
        let MlpWeights::Moe {
            router,
            router_transposed,
            router_hub,
            ..
        } = mlp
        else {
            return Err(Error::Usage("not an MoE layer".into()));
        };
        let what = "router logits";
        let (t, h) = x.dims2().map_err(ce(what))?;
        // A few tokens (decode, small batches) or a few experts: the CPU
        // kernel on the hub layout; else a packed GEMM (candle's) wins.
        let hub = if *router_transposed {
            router_hub.as_ref()
        } else {
            Some(router)
        };
        let e = self.model.info.num_experts;
        if let (Some(xh), Some(hub)) = (x_host.filter(|_| use_cpu_kernel(t, e)), hub) {
            if let Some(r) = weights::HostMatrix::of(hub).filter(|r| r.cols == h) {
                let mut logits = vec![0f32; t * r.rows];
                match r.data() {
                    HostData::F32(d) => expert_gemm::matmul_xwt(xh, t, h, d, r.rows, &mut logits),
                    HostData::Bf16(d) => expert_gemm::matmul_xwt(xh, t, h, d, r.rows, &mut logits),
                    HostData::F16(d) => expert_gemm::matmul_xwt(xh, t, h, d, r.rows, &mut logits),
                }
                return Ok(logits);
            }
        }
        // A bf16/f16 router on the CPU is kept as stored, in the hub layout.
        let l = weights::linear_any(x, router, *router_transposed);
        l.and_then(|l| l.flatten_all()?.to_vec1()).map_err(ce(what))
    }

    /// The top-k dispatch on the device (see [`Forward::moe`]): the routed
    /// experts' weighted outputs, `[tokens, hidden]`.
    fn grouped_on_device(
        &self,
        x: &Tensor,
        experts: &[Ffn],
        by_expert: &[Vec<(u32, f32)>],
    ) -> R<Tensor> {
        let dev = x.device();
        let (mut toks, mut ws, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for (e, pairs) in by_expert.iter().enumerate() {
            if !pairs.is_empty() {
                spans.push((e, toks.len(), pairs.len()));
                toks.extend(pairs.iter().map(|&(t, _)| t));
                ws.extend(pairs.iter().map(|&(_, w)| w));
            }
        }
        if toks.is_empty() {
            return x.zeros_like();
        }
        let idx = Tensor::new(toks.as_slice(), dev)?;
        let xs = x.index_select(&idx, 0)?;
        let ys = spans
            .iter()
            .map(|&(e, at, n)| Ok(self.ffn(&experts[e], &xs.narrow(0, at, n)?)?.1))
            .collect::<R<Vec<_>>>()?;
        let n = toks.len();
        let y = Tensor::cat(&ys, 0)?.broadcast_mul(&Tensor::from_vec(ws, (n, 1), dev)?)?;
        // Every token has k rows in `y`: gather them back into token order,
        // `[tokens, k, hidden]`, and sum over k (fully parallel kernels; a
        // scatter-add into the output serialises over the rows it adds).
        let (t, h) = x.dims2()?;
        let k = self.model.info.top_k;
        let mut seen = vec![0usize; t];
        let mut back = vec![0u32; t * k];
        for (p, &tok) in toks.iter().enumerate() {
            let tok = tok as usize;
            if seen[tok] < k {
                back[tok * k + seen[tok]] = p as u32;
            }
            seen[tok] += 1;
        }
        if seen.iter().all(|&c| c == k) {
            y.index_select(&Tensor::new(back.as_slice(), dev)?, 0)?
                .reshape((t, k, h))?
                .sum(1)
        } else {
            x.zeros_like()?.index_add(&idx, &y, 0)
        }
    }
}

/// One routed expert on the host through the grouped kernels: its tokens
/// (`pairs`: token, routing weight) or, with `all`, every token of `x`.
struct HostExpert<'a> {
    x: &'a [f32],
    t: usize,
    hdim: usize,
    inter: usize,
    act: expert_gemm::Activation,
    all: bool,
    pairs: &'a [(u32, f32)],
}

impl HostExpert<'_> {
    /// Adds the expert's weighted output into `out` (and, with `keep`, every
    /// token's unweighted output to it) from weights in their stored dtype;
    /// `false` (nothing done) when the shapes do not match.
    fn run<W: expert_gemm::WeightElem>(
        &self,
        gate: &[W],
        up: &[W],
        down: &[W],
        out: &mut [f32],
        keep: Option<&mut Vec<f32>>,
    ) -> bool {
        let (t, hdim, i) = (self.t, self.hdim, self.inter);
        if gate.len() != i * hdim || up.len() != i * hdim || down.len() != hdim * i {
            return false;
        }
        let gu = expert_gemm::GateUp {
            gate,
            up,
            inter: i,
            act: self.act,
        };
        if self.all {
            let rows: Vec<u32> = (0..t as u32).collect();
            let mut h = vec![0f32; t * i];
            expert_gemm::gate_up(self.x, hdim, &rows, gu, &mut h);
            let mut y = vec![0f32; t * hdim];
            expert_gemm::matmul_xwt(&h, t, i, down, hdim, &mut y);
            add_weighted_rows(out, &y, hdim, self.pairs, true);
            if let Some(keep) = keep {
                keep.extend_from_slice(&y);
            }
        } else if !self.pairs.is_empty() {
            let rows: Vec<u32> = self.pairs.iter().map(|&(tok, _)| tok).collect();
            let scale: Vec<f32> = self.pairs.iter().map(|&(_, w)| w).collect();
            let mut h = vec![0f32; rows.len() * i];
            expert_gemm::gate_up(self.x, hdim, &rows, gu, &mut h);
            expert_gemm::down_scatter_add(&h, i, down, hdim, &rows, &scale, out);
        }
        true
    }
}

/// What runs on the chosen experts' host matrices once their common dtype
/// is known ([`with_host_experts`]).
trait OnHostExperts {
    /// Runs on `(gate, up, down)` of each chosen expert, in order; `false`
    /// when nothing was done.
    fn run<W: expert_gemm::WeightElem>(self, mats: &[[&[W]; 3]]) -> bool;
}

/// Runs `f` on the `chosen` experts' matrices when every one is a host
/// matrix in the hub layout, all of one dtype (the stored bf16/f16, or
/// f32), gate and up `[inter, hdim]`, down `[hdim, inter]`; `false`
/// (nothing done) otherwise, `true` when none is chosen.
fn with_host_experts(
    experts: &[Ffn],
    chosen: &[usize],
    inter: usize,
    hdim: usize,
    f: impl OnHostExperts,
) -> bool {
    let Some(hosts) = chosen
        .iter()
        .map(|&e| experts[e].host_hub())
        .collect::<Option<Vec<HostFfn>>>()
    else {
        return false;
    };
    let shaped = |hf: &HostFfn| {
        (hf.gate.rows, hf.gate.cols, hf.up.rows, hf.up.cols) == (inter, hdim, inter, hdim)
            && (hf.down.rows, hf.down.cols) == (hdim, inter)
    };
    if !hosts.iter().all(shaped) {
        return false;
    }
    fn all<'a, W>(
        hosts: &'a [HostFfn],
        pick: impl Fn(HostData<'a>) -> Option<&'a [W]>,
    ) -> Option<Vec<[&'a [W]; 3]>> {
        hosts
            .iter()
            .map(|hf| {
                Some([
                    pick(hf.gate.data())?,
                    pick(hf.up.data())?,
                    pick(hf.down.data())?,
                ])
            })
            .collect()
    }
    let Some(first) = hosts.first() else {
        return true;
    };
    match first.gate.data() {
        HostData::F32(_) => all(&hosts, |d| match d {
            HostData::F32(v) => Some(v),
            _ => None,
        })
        .is_some_and(|m| f.run(&m)),
        HostData::Bf16(_) => all(&hosts, |d| match d {
            HostData::Bf16(v) => Some(v),
            _ => None,
        })
        .is_some_and(|m| f.run(&m)),
        HostData::F16(_) => all(&hosts, |d| match d {
            HostData::F16(v) => Some(v),
            _ => None,
        })
        .is_some_and(|m| f.run(&m)),
    }
}

/// The routed experts of the tokens `x` (`[tokens, hdim]`) added into
/// `out`, from weights in their stored dtype: one token through
/// [`matvec::experts_one_token`] (expert order, the order the per-expert
/// path adds them), more through [`expert_gemm::routed_experts`] (the
/// per-expert loop's results, bit for bit); `false` (nothing done) when a
/// chosen expert is not a host matrix of the common dtype and shape.
fn experts_on_host(
    x: &[f32],
    hdim: usize,
    experts: &[Ffn],
    by_expert: &[Vec<(u32, f32)>],
    inter: usize,
    act: expert_gemm::Activation,
    out: &mut [f32],
) -> bool {
    struct Job<'a> {
        x: &'a [f32],
        hdim: usize,
        rows: Vec<Vec<u32>>,
        scales: Vec<Vec<f32>>,
        inter: usize,
        act: expert_gemm::Activation,
        out: &'a mut [f32],
    }
    impl OnHostExperts for Job<'_> {
        fn run<W: expert_gemm::WeightElem>(self, mats: &[[&[W]; 3]]) -> bool {
            if self.x.len() == self.hdim {
                let list: Vec<matvec::TokenExpert<W>> = mats
                    .iter()
                    .zip(&self.scales)
                    .map(|(&[gate, up, down], s)| matvec::TokenExpert {
                        gate,
                        up,
                        down,
                        weight: s[0],
                    })
                    .collect();
                matvec::experts_one_token(self.x, &list, self.inter, self.act, self.out);
            } else {
                let list: Vec<expert_gemm::Routed<W>> = mats
                    .iter()
                    .zip(self.rows.iter().zip(&self.scales))
                    .map(|(&[gate, up, down], (rows, scale))| expert_gemm::Routed {
                        gate_up: expert_gemm::GateUp {
                            gate,
                            up,
                            inter: self.inter,
                            act: self.act,
                        },
                        down,
                        rows,
                        scale,
                    })
                    .collect();
                expert_gemm::routed_experts(self.x, self.hdim, self.hdim, &list, self.out);
            }
            true
        }
    }
    if hdim == 0 || x.len() != out.len() || !x.len().is_multiple_of(hdim) {
        return false;
    }
    let chosen: Vec<usize> = (0..by_expert.len())
        .filter(|&e| !by_expert[e].is_empty())
        .collect();
    let job = Job {
        x,
        hdim,
        rows: chosen
            .iter()
            .map(|&e| by_expert[e].iter().map(|&(t, _)| t).collect())
            .collect(),
        scales: chosen
            .iter()
            .map(|&e| by_expert[e].iter().map(|&(_, w)| w).collect())
            .collect(),
        inter,
        act,
        out,
    };
    with_host_experts(experts, &chosen, inter, hdim, job)
}

/// `x`'s values on the host, flattened, when `wanted`.
fn host_copy(x: &Tensor, wanted: bool, what: &str) -> Result<Option<Vec<f32>>> {
    if !wanted {
        return Ok(None);
    }
    x.flatten_all()
        .and_then(|x| x.to_vec1())
        .map(Some)
        .map_err(ce(what))
}

/// Whether the CPU computes router logits for `tokens` tokens and `experts`
/// experts with its own kernel (`expert_gemm`) rather than candle's GEMM,
/// whose packing pays off only for many rows and columns (crossover measured
/// on a 2-core AVX-512 machine: between 16 and 64 tokens at 64–256 experts;
/// never, up to 256 tokens, at 8 experts).
pub fn use_cpu_kernel(tokens: usize, experts: usize) -> bool {
    tokens <= 32 || experts < 32
}

/// `out[tok] += w · y[row]` for each `(tok, w)` of an expert's tokens, where
/// `row` is the token itself (`y` holds every token) or its place in the list.
fn add_weighted_rows(out: &mut [f32], y: &[f32], hdim: usize, pairs: &[(u32, f32)], all: bool) {
    for (row, &(tok, w)) in pairs.iter().enumerate() {
        let tok = tok as usize;
        let row = if all { tok } else { row };
        let src = &y[row * hdim..(row + 1) * hdim];
        for (o, v) in out[tok * hdim..(tok + 1) * hdim].iter_mut().zip(src) {
            *o += w * v;
        }
    }
}
