//! Markdown report with SVG figures, written to an output directory: the
//! figures are drawn as the paper draws them (heatmaps with up/gate/down side
//! by side, the gate-vs-neuron similarity scatter with its regression line,
//! PCA scatters coloured by expert).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::analysis::linalg::strict_lower;
use crate::analysis::results::{
    ChosenExperts, Intermediate, LayerMatrices, MatrixSimilarity, NeuronReorder, NormScore,
    OutputSimilarity, Projection, Report,
};
use crate::atomic_write::write_atomic;
use crate::error::{Error, Result};
use crate::model::Matrix;
use crate::report::svg::{
    bars, heatmap_rect, heatmaps, regression_line, scatter, Axes, ColourScale, Panel, ScatterPanel,
    FIGURE_MARKER,
};
use crate::report::table::off_diagonal_stats;

/// Options of the Markdown report.
#[derive(Debug, Clone, Default)]
pub struct MarkdownOptions {
    /// One colour scale for every heatmap of an analysis (across layers),
    /// instead of one per figure.
    pub shared_scale: bool,
    /// The command line that produced the report, written at its top (the
    /// library does not read the process's arguments itself).
    pub command_line: String,
}

/// At most this many neuron points are drawn per PCA panel (evenly subsampled).
pub const MAX_SCATTER_POINTS: usize = 4000;

struct Writer<'a> {
    dir: &'a Path,
    md: String,
    /// File names of the figures written by this run.
    written: Vec<String>,
}

impl Writer<'_> {
    fn figure(&mut self, name: &str, alt: &str, svg: &str) -> Result<()> {
        let path = self.dir.join(name);
        write_atomic(&path, format!("{FIGURE_MARKER}\n{svg}").as_bytes())?;
        let _ = writeln!(self.md, "![{alt}]({name})\n");
        self.written.push(name.to_string());
        Ok(())
    }
}

/// Largest off-diagonal deviation from `mid` (finite values only).
fn max_dev(ms: &[&Vec<Vec<f64>>], mid: f64) -> f64 {
    ms.iter()
        .flat_map(|m| {
            m.iter().enumerate().flat_map(move |(i, row)| {
                row.iter()
                    .enumerate()
                    .filter(move |&(j, v)| j != i && v.is_finite())
                    .map(move |(_, v)| (v - mid).abs())
            })
        })
        .fold(0.0, f64::max)
}

/// A cosine scale centred on 0 for one figure's matrices `own`, or for all
/// of the analysis's matrices `all` with `--shared-scale`.
fn cosine_scale(
    own: &[&Vec<Vec<f64>>],
    all: &[&Vec<Vec<f64>>],
    opts: &MarkdownOptions,
) -> ColourScale {
    let dev = max_dev(if opts.shared_scale { all } else { own }, 0.0);
    ColourScale::centred(0.0, dev, 1.0)
}

const COSINE_SCALE_NOTE: &str = "Colours: blue (negative) – white (0) – red (positive), centred on 0 and as wide as the \
     largest off-diagonal |cosine| of the figure (rounded up, ±1 at most; one width for all layers with `--shared-scale`); \
     when narrower than ±1 the diagonal (always 1) is drawn grey.";

/// Today's date (UTC) as yyyy-mm-dd.
fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_date((secs / 86_400) as i64)
}

/// Days since 1970-01-01 to yyyy-mm-dd (proleptic Gregorian; Howard Hinnant's algorithm).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Removes the figures of a previous run in `dir` that this run did not
/// rewrite: only `*.svg` files that start with [`FIGURE_MARKER`], so files of
/// the user are never touched.
fn remove_stale_figures(dir: &Path, written: &[String]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".svg") || written.contains(&name) || !path.is_file() {
            continue;
        }
        let mut head = [0u8; FIGURE_MARKER.len()];
        let owned = std::fs::File::open(&path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok()
            && head == FIGURE_MARKER.as_bytes();
        if owned {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Writes `report.md` and one SVG per figure into `dir`, each atomically
/// ([`crate::atomic_write`]); returns the report's path.
///
/// The report starts with the tool's version, `opts.command_line` and the
/// date; figures of a previous run in `dir` that this run does not rewrite
/// are removed afterwards (only files the tool marked as its own).
pub fn write(report: &Report, dir: &Path, opts: &MarkdownOptions) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut w = Writer {
        dir,
        md: String::new(),
        written: Vec::new(),
    };
    header(&mut w, report, opts);
    let m = &report.model;
    let a = &report.analyses;
    if let Some(sim) = &a.expert_similarity {
        similarity_section(
            &mut w,
            sim,
            opts,
            "expert-similarity",
            "Expert similarity",
            "Cosine similarity of the flattened expert matrices (Lo et al. 2024, §3.1, Fig. 1)",
        )?;
    }
    if let Some(sim) = &a.neuron_similarity {
        similarity_section(
            &mut w,
            sim,
            opts,
            "neuron-similarity",
            "Neuron similarity",
            "Cosine similarity of each expert's mean neuron (rows of up/gate, columns of down; §3.1)",
        )?;
    }
    if let Some(g) = &a.gate_embedding {
        gate_section(&mut w, g, a.neuron_similarity.as_ref(), &m.path, opts)?;
    }
    if let Some(r) = &a.neuron_reorder {
        reorder_section(&mut w, r, m.num_experts, opts)?;
    }
    if let Some(p) = &a.projection {
        projection_section(&mut w, p, m.num_experts)?;
    }
    dynamic_sections(&mut w, report, opts)?;
    let path = dir.join("report.md");
    write_atomic(&path, w.md.as_bytes())?;
    remove_stale_figures(dir, &w.written)?;
    Ok(path)
}

/// The sections of the dynamic analyses, in report order.
fn dynamic_sections(w: &mut Writer<'_>, report: &Report, opts: &MarkdownOptions) -> Result<()> {
    let a = &report.analyses;
    let labels = MapLabels::of(report);
    if let Some(o) = &a.output_similarity {
        output_similarity_section(w, o, opts)?;
    }
    if let Some(n) = &a.norm_score {
        norm_score_section(w, n)?;
    }
    if let Some(it) = &a.intermediate {
        intermediate_section(w, it, report, &labels)?;
    }
    if let Some(c) = &a.chosen_experts {
        chosen_experts_section(w, c, report, &labels)?;
    }
    Ok(())
}

/// Title, generator line, command line and the model table.
fn header(w: &mut Writer<'_>, report: &Report, opts: &MarkdownOptions) {
    let m = &report.model;
    let _ = writeln!(w.md, "# MoE inspection report\n");
    let _ = writeln!(
        w.md,
        "Generated by moe-inspect {} on {} (UTC).\n",
        env!("CARGO_PKG_VERSION"),
        utc_date()
    );
    if !opts.command_line.is_empty() {
        let cmd = opts.command_line.replace('`', "'");
        let _ = writeln!(w.md, "Command: `` {cmd} ``\n");
    }
    let _ = writeln!(
        w.md,
        "| model | family | layers | MoE layers | experts | top-k | hidden | expert width | dtype |"
    );
    let _ = writeln!(w.md, "|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        w.md,
        "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        m.path,
        m.family,
        m.num_layers,
        crate::layers::format_list(&m.moe_layers),
        m.num_experts,
        m.top_k,
        m.hidden_size,
        m.intermediate_size,
        m.dtype
    );
}

/// Neuron reorder: the table of mean similarity and Kendall τ, one heatmap per layer.
fn reorder_section(
    w: &mut Writer<'_>,
    r: &NeuronReorder,
    num_experts: usize,
    opts: &MarkdownOptions,
) -> Result<()> {
    let _ = writeln!(w.md, "## Neuron reorder\n");
    let _ = writeln!(
        w.md,
        "Each pair's neurons aligned by an exact linear sum assignment on the neuron cosine matrix (§3.1, Table 2): \
         similarity of the flattened matrices after reordering, and Kendall's τ of the permutation (1 = no reordering needed).\n"
    );
    let _ = writeln!(
        w.md,
        "| layer | matrix | mean similarity after reorder | mean Kendall τ |"
    );
    let _ = writeln!(w.md, "|---|---|---|---|");
    for l in &r.layers {
        for mat in Matrix::ALL {
            let x = l.matrices.get(mat);
            let mean = |m: &Vec<Vec<f64>>| off_diagonal_stats(m).map_or(f64::NAN, |s| s.0);
            let _ = writeln!(
                w.md,
                "| {} | {} | {:.3} | {:.3} |",
                l.layer,
                mat.name(),
                mean(&x.similarity),
                mean(&x.kendall_tau)
            );
        }
    }
    let _ = writeln!(w.md, "\n{COSINE_SCALE_NOTE}\n");
    let labels: Vec<String> = (0..num_experts).map(|e| e.to_string()).collect();
    let all: Vec<&Vec<Vec<f64>>> = r
        .layers
        .iter()
        .flat_map(|l| Matrix::ALL.map(|mat| &l.matrices.get(mat).similarity))
        .collect();
    for l in &r.layers {
        let panels: Vec<Panel<'_>> = Matrix::ALL
            .iter()
            .map(|&mat| Panel {
                title: mat.name(),
                matrix: &l.matrices.get(mat).similarity,
            })
            .collect();
        let own = Matrix::ALL.map(|mat| &l.matrices.get(mat).similarity);
        let svg = heatmaps(
            &format!("Similarity after neuron reorder, layer {}", l.layer),
            &panels,
            &labels,
            cosine_scale(&own, &all, opts),
            Axes {
                x: "expert",
                y: "expert",
                value: "cosine after reorder",
            },
        );
        w.figure(
            &format!("neuron-reorder-layer{}.svg", l.layer),
            &format!("neuron reorder, layer {}", l.layer),
            &svg,
        )?;
    }
    Ok(())
}

/// Projection: the explained-variance table, PCA scatters of experts and neurons per layer.
fn projection_section(w: &mut Writer<'_>, p: &Projection, num_experts: usize) -> Result<()> {
    let _ = writeln!(w.md, "## Projection\n");
    let _ = writeln!(
        w.md,
        "PCA of the experts (flattened, standardised per coordinate) and of all experts' neurons (§3.2, Fig. 3).\n"
    );
    let _ = writeln!(w.md, "| layer | matrix | experts PC1 | experts PC2 | neurons PC1 | neurons PC2 | neuron method |");
    let _ = writeln!(w.md, "|---|---|---|---|---|---|---|");
    for l in &p.layers {
        for mat in Matrix::ALL {
            let x = l.matrices.get(mat);
            let _ = writeln!(
                w.md,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
                l.layer,
                mat.name(),
                x.explained_variance[0],
                x.explained_variance[1],
                x.neurons.explained_variance[0],
                x.neurons.explained_variance[1],
                x.neurons.method
            );
        }
    }
    w.md.push('\n');
    let legend: Vec<String> = (0..num_experts).map(|e| format!("expert {e}")).collect();
    for l in &p.layers {
        let experts: Vec<Vec<(f64, f64, usize)>> = Matrix::ALL
            .iter()
            .map(|&mat| {
                l.matrices
                    .get(mat)
                    .points
                    .iter()
                    .enumerate()
                    .map(|(e, q)| (q[0], q[1], e))
                    .collect()
            })
            .collect();
        let neurons: Vec<Vec<(f64, f64, usize)>> = Matrix::ALL
            .iter()
            .map(|&mat| {
                let pts = &l.matrices.get(mat).neurons.points;
                let per_expert = (pts.len() / num_experts.max(1)).max(1);
                let step = pts.len().div_ceil(MAX_SCATTER_POINTS).max(1);
                pts.iter()
                    .enumerate()
                    .step_by(step)
                    .map(|(i, q)| (q[0], q[1], i / per_expert))
                    .collect()
            })
            .collect();
        for (kind, pts) in [("experts", &experts), ("neurons", &neurons)] {
            let panels: Vec<ScatterPanel<'_>> = Matrix::ALL
                .iter()
                .zip(pts.iter())
                .map(|(&mat, p)| ScatterPanel {
                    title: mat.name(),
                    points: p,
                    line: None,
                })
                .collect();
            let svg = scatter(
                &format!("PCA of {kind}, layer {}", l.layer),
                &panels,
                &legend,
                "PC1",
                "PC2",
            );
            w.figure(
                &format!("projection-{kind}-layer{}.svg", l.layer),
                &format!("PCA of {kind}, layer {}", l.layer),
                &svg,
            )?;
        }
    }
    Ok(())
}

/// Axis labels of the per-token maps: tokens (their text, else their ids) and experts.
struct MapLabels {
    tokens: Vec<String>,
    experts: Vec<String>,
}

impl MapLabels {
    fn of(report: &Report) -> MapLabels {
        let tokens = if report.token_labels.is_empty() {
            report
                .maps
                .token_ids
                .iter()
                .map(|t| t.to_string())
                .collect()
        } else {
            report.token_labels.clone()
        };
        MapLabels {
            tokens,
            experts: (0..report.model.num_experts)
                .map(|e| e.to_string())
                .collect(),
        }
    }
}

/// Expert output similarity: the table and one heatmap per layer.
fn output_similarity_section(
    w: &mut Writer<'_>,
    o: &OutputSimilarity,
    opts: &MarkdownOptions,
) -> Result<()> {
    let _ = writeln!(w.md, "## Expert output similarity\n");
    let _ = writeln!(
        w.md,
        "Mean angular similarity `1 - acos(cos)/π` of all experts' outputs on each layer's real input, over {} tokens \
         (§4.1, Fig. 5){}.\n",
        o.tokens,
        if o.layers.first().is_some_and(|l| l.labels.iter().any(|x| x == "SE")) {
            "; `SE` is the shared expert"
        } else {
            ""
        }
    );
    let _ = writeln!(
        w.md,
        "| layer | mean off-diagonal | most similar pair |\n|---|---|---|"
    );
    for l in &o.layers {
        if let Some((mean, _, max)) = off_diagonal_stats(&l.mean_angular) {
            let _ = writeln!(
                w.md,
                "| {} | {mean:.3} | {:.3} ({}, {}) |",
                l.layer, max.0, l.labels[max.2], l.labels[max.1]
            );
        }
    }
    let _ = writeln!(
        w.md,
        "\nColours: blue–white–red centred on 0.5 (orthogonal outputs), as wide as the largest off-diagonal \
         deviation (rounded up; the diagonal is grey when it falls outside).\n"
    );
    let all: Vec<&Vec<Vec<f64>>> = o.layers.iter().map(|l| &l.mean_angular).collect();
    for l in &o.layers {
        let own = [&l.mean_angular];
        let dev = max_dev(if opts.shared_scale { &all } else { &own }, 0.5);
        let svg = heatmaps(
            &format!("Expert output similarity, layer {}", l.layer),
            &[Panel {
                title: "mean angular similarity",
                matrix: &l.mean_angular,
            }],
            &l.labels,
            ColourScale::centred(0.5, dev, 0.5),
            Axes {
                x: "expert",
                y: "expert",
                value: "angular similarity",
            },
        );
        w.figure(
            &format!("output-similarity-layer{}.svg", l.layer),
            &format!("output similarity, layer {}", l.layer),
            &svg,
        )?;
    }
    Ok(())
}

/// Output norm vs gate score: the summary, the per-layer table, the rank histogram.
fn norm_score_section(w: &mut Writer<'_>, n: &NormScore) -> Result<()> {
    let _ = writeln!(w.md, "## Output norm vs gate score\n");
    let _ = writeln!(
        w.md,
        "For {:.1}% of tokens the expert with the highest gate score also has the largest output norm \
         (chance {:.1}%; the paper reports about 69% for Mixtral, §4.2, Fig. 6); mean Spearman correlation \
         between scores and norms {:.3}.\n",
        100.0 * n.top1_match_rate,
        100.0 * n.chance,
        n.spearman_mean
    );
    let _ = writeln!(w.md, "| layer | top-1 match rate |\n|---|---|");
    for l in &n.layers {
        let _ = writeln!(w.md, "| {} | {:.3} |", l.layer, l.top1_match_rate);
    }
    w.md.push('\n');
    if let Some(top) = n.total.first() {
        let values: Vec<f64> = top.iter().map(|&c| c as f64).collect();
        let labels: Vec<String> = (1..=values.len()).map(|r| r.to_string()).collect();
        let svg = bars(
            "Norm rank of the highest-score expert (all layers)",
            &values,
            &labels,
            "tokens",
        );
        w.figure(
            "norm-score-ranks.svg",
            "norm rank of the top-scored expert",
            &svg,
        )?;
    }
    Ok(())
}

/// Intermediate activations: the per-expert table and one activation map per layer.
fn intermediate_section(
    w: &mut Writer<'_>,
    it: &Intermediate,
    report: &Report,
    labels: &MapLabels,
) -> Result<()> {
    let (token_labels, expert_labels) = (&labels.tokens, &labels.experts);
    let _ = writeln!(w.md, "## Intermediate activations\n");
    let _ = writeln!(
        w.md,
        "`act(gate·x)` per expert (§4.3, Fig. 7): mean |a| and the share of entries above {} × the layer's max |a|.\n",
        it.threshold_fraction
    );
    let _ = writeln!(
        w.md,
        "| layer | expert | mean \\|a\\| | share above | top neurons |\n|---|---|---|---|---|"
    );
    for l in &it.layers {
        for (x, e) in l.experts.iter().enumerate() {
            let _ = writeln!(
                w.md,
                "| {} | {x} | {:.4} | {:.4} | {:?} |",
                l.layer, e.mean_abs, e.share_above, e.top_neurons
            );
        }
    }
    w.md.push('\n');
    for (layer, map) in &report.maps.activation {
        let hi = map.iter().flatten().copied().fold(0.0, f64::max);
        let svg = heatmap_rect(
            &format!("Mean |act(gate·x)| per token and expert, layer {layer} (first prompt)"),
            map,
            token_labels,
            expert_labels,
            ColourScale::Sequential { lo: 0.0, hi },
            Axes {
                x: "expert",
                y: "token",
                value: "mean |act(gate·x)|",
            },
        );
        w.figure(
            &format!("intermediate-layer{layer}.svg"),
            &format!("activation map, layer {layer}"),
            &svg,
        )?;
    }
    Ok(())
}

/// Chosen experts: the balance table and summary, one routing map per layer.
fn chosen_experts_section(
    w: &mut Writer<'_>,
    c: &ChosenExperts,
    report: &Report,
    labels: &MapLabels,
) -> Result<()> {
    let (token_labels, expert_labels) = (&labels.tokens, &labels.experts);
    let _ = writeln!(w.md, "## Chosen experts\n");
    let _ = writeln!(
        w.md,
        "Routing over {} tokens (§4.4, Fig. 8): expert load, balancedness (mean/max load), coefficient of variation, \
         share of experts never chosen, and exp(H)/E of the load distribution.\n",
        c.tokens
    );
    let _ = writeln!(
        w.md,
        "| layer | balancedness | cv | dead share | exp(H)/E |\n|---|---|---|---|---|"
    );
    for l in &c.layers {
        let _ = writeln!(
            w.md,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            l.layer, l.balancedness, l.cv, l.dead_share, l.entropy_ratio
        );
    }
    let q = &c.summary;
    let _ = writeln!(
        w.md,
        "\nAcross layers (min / p50 / p90 / max): balancedness {:.3} / {:.3} / {:.3} / {:.3}; exp(H)/E {:.3} / {:.3} / {:.3} / {:.3}.\n",
        q.balancedness.min, q.balancedness.p50, q.balancedness.p90, q.balancedness.max,
        q.entropy_ratio.min, q.entropy_ratio.p50, q.entropy_ratio.p90, q.entropy_ratio.max
    );
    for (layer, map) in &report.maps.routing {
        let svg = heatmap_rect(
            &format!("Routing weights per token, layer {layer} (first prompt)"),
            map,
            token_labels,
            expert_labels,
            ColourScale::Sequential {
                lo: 0.0,
                hi: map.iter().flatten().copied().fold(0.0, f64::max),
            },
            Axes {
                x: "expert",
                y: "token",
                value: "routing weight",
            },
        );
        w.figure(
            &format!("chosen-experts-layer{layer}.svg"),
            &format!("chosen experts, layer {layer}"),
            &svg,
        )?;
    }
    Ok(())
}

fn similarity_section(
    w: &mut Writer<'_>,
    sim: &MatrixSimilarity,
    opts: &MarkdownOptions,
    slug: &str,
    title: &str,
    what: &str,
) -> Result<()> {
    let _ = writeln!(w.md, "## {title}\n");
    let has_f = sim
        .layers
        .first()
        .is_some_and(|l| l.labels.last().is_some_and(|x| x == "F"));
    let _ = writeln!(
        w.md,
        "{what}; rows and columns are experts in checkpoint order{}.\n",
        if has_f {
            ", `F` is the dense reference model's FFN"
        } else {
            ""
        }
    );
    let _ = writeln!(
        w.md,
        "| layer | matrix | mean off-diagonal | max off-diagonal (pair) |"
    );
    let _ = writeln!(w.md, "|---|---|---|---|");
    for l in &sim.layers {
        for mat in Matrix::ALL {
            if let Some((mean, _, max)) = off_diagonal_stats(l.get(mat)) {
                let _ = writeln!(
                    w.md,
                    "| {} | {} | {mean:.3} | {:.3} ({}, {}) |",
                    l.layer,
                    mat.name(),
                    max.0,
                    l.labels[max.2],
                    l.labels[max.1]
                );
            }
        }
    }
    let _ = writeln!(w.md, "\n{COSINE_SCALE_NOTE}\n");
    let all: Vec<&Vec<Vec<f64>>> = sim
        .layers
        .iter()
        .flat_map(|l| Matrix::ALL.map(|mat| l.get(mat)))
        .collect();
    for l in &sim.layers {
        let scale = cosine_scale(&Matrix::ALL.map(|mat| l.get(mat)), &all, opts);
        let panels: Vec<Panel<'_>> = Matrix::ALL
            .iter()
            .map(|&mat| Panel {
                title: mat.name(),
                matrix: l.get(mat),
            })
            .collect();
        let svg = heatmaps(
            &format!("{title}, layer {}", l.layer),
            &panels,
            &l.labels,
            scale,
            Axes {
                x: "expert",
                y: "expert",
                value: "cosine similarity",
            },
        );
        w.figure(
            &format!("{slug}-layer{}.svg", l.layer),
            &format!("{title}, layer {}", l.layer),
            &svg,
        )?;
    }
    Ok(())
}

fn gate_section(
    w: &mut Writer<'_>,
    g: &crate::analysis::results::GateEmbedding,
    neuron: Option<&MatrixSimilarity>,
    model: &str,
    opts: &MarkdownOptions,
) -> Result<()> {
    let f = |x: &Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    let _ = writeln!(w.md, "## Gate embedding\n");
    let _ = writeln!(
        w.md,
        "Cosine similarity of the router rows, and r² of its linear fit to each matrix's neuron similarity, \
         averaged over MoE layers (§3.3, Table 3; the paper reports Mixtral 0.06/0.33/0.07, DeepSeek 0.00/0.40/0.00, Grok 0.04/0.15/0.04).\n"
    );
    let _ = writeln!(w.md, "| model | up | gate | down |\n|---|---|---|---|");
    let _ = writeln!(
        w.md,
        "| `{model}` | {} | {} | {} |\n",
        f(&g.r2_avg.up),
        f(&g.r2_avg.gate),
        f(&g.r2_avg.down)
    );
    let _ = writeln!(
        w.md,
        "| layer | r up | r gate | r down | r² up | r² gate | r² down |"
    );
    let _ = writeln!(w.md, "|---|---|---|---|---|---|---|");
    for l in &g.layers {
        let _ = writeln!(
            w.md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            l.layer,
            f(&l.r.up),
            f(&l.r.gate),
            f(&l.r.down),
            f(&l.r2.up),
            f(&l.r2.gate),
            f(&l.r2.down)
        );
    }
    let _ = writeln!(w.md, "\n{COSINE_SCALE_NOTE}\n");
    let all: Vec<&Vec<Vec<f64>>> = g.layers.iter().map(|l| &l.similarity).collect();
    for l in &g.layers {
        let e = l.similarity.len();
        let labels: Vec<String> = (0..e).map(|i| i.to_string()).collect();
        let scale = cosine_scale(&[&l.similarity], &all, opts);
        let svg = heatmaps(
            &format!("Router (gate embedding) similarity, layer {}", l.layer),
            &[Panel {
                title: "router rows",
                matrix: &l.similarity,
            }],
            &labels,
            scale,
            Axes {
                x: "expert",
                y: "expert",
                value: "cosine similarity",
            },
        );
        w.figure(
            &format!("gate-embedding-layer{}.svg", l.layer),
            &format!("gate embedding similarity, layer {}", l.layer),
            &svg,
        )?;
        // Scatter: gate similarity (x) vs neuron similarity (y), per matrix.
        let Some(ns) = neuron.and_then(|n| n.layers.iter().find(|x| x.layer == l.layer)) else {
            continue;
        };
        let gx = strict_lower(&l.similarity);
        let pts: Vec<Vec<(f64, f64, usize)>> = Matrix::ALL
            .iter()
            .map(|&mat| {
                let only = experts_only(ns, mat, e);
                gx.iter()
                    .zip(strict_lower(&only))
                    .map(|(&x, y)| (x, y, 0))
                    .collect()
            })
            .collect();
        let titles: Vec<String> = Matrix::ALL
            .iter()
            .map(|&mat| format!("{} (r² = {})", mat.name(), f(l.r2.get(mat))))
            .collect();
        let panels: Vec<ScatterPanel<'_>> = pts
            .iter()
            .zip(&titles)
            .map(|(p, t)| ScatterPanel {
                title: t,
                points: p,
                line: regression_line(p),
            })
            .collect();
        let svg = scatter(
            &format!("Gate vs neuron similarity, layer {}", l.layer),
            &panels,
            &[],
            "gate embedding similarity",
            "neuron similarity",
        );
        w.figure(
            &format!("gate-vs-neuron-layer{}.svg", l.layer),
            &format!("gate vs neuron similarity, layer {}", l.layer),
            &svg,
        )?;
    }
    Ok(())
}

fn experts_only(l: &LayerMatrices, m: Matrix, e: usize) -> Vec<Vec<f64>> {
    l.get(m)[..e].iter().map(|r| r[..e].to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::civil_date;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(20_789), "2026-12-02");
    }
}
