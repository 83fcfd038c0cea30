//! Markdown report with SVG figures, written to an output directory.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::Matrix;
use crate::report::schema::Report;
use crate::report::svg::{heatmaps, Panel};
use crate::report::table::off_diagonal_stats;

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}

/// Writes `report.md` and one SVG per figure into `dir`; returns the report's path.
pub fn write(report: &Report, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let m = &report.model;
    let mut md = String::new();
    let _ = writeln!(md, "# MoE inspection report\n");
    let _ = writeln!(md, "| model | family | layers | MoE layers | experts | top-k | hidden | expert width | dtype |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        md,
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
    if let Some(sim) = &report.analyses.expert_similarity {
        let _ = writeln!(md, "## Expert similarity\n");
        let _ =
            writeln!(
            md,
            "Cosine similarity of the flattened expert matrices (Lo et al. 2024, §3.1, Fig. 1); \
             rows and columns are experts in checkpoint order{}.\n",
            if sim.layers.first().is_some_and(|l| l.labels.last().is_some_and(|x| x == "F")) {
                ", `F` is the dense reference model's FFN"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "| layer | matrix | mean off-diagonal | max off-diagonal (pair) |"
        );
        let _ = writeln!(md, "|---|---|---|---|");
        for l in &sim.layers {
            for mat in Matrix::ALL {
                if let Some((mean, _, max)) = off_diagonal_stats(l.get(mat)) {
                    let _ = writeln!(
                        md,
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
        md.push('\n');
        for l in &sim.layers {
            let lo = Matrix::ALL
                .iter()
                .flat_map(|&mat| l.get(mat).iter().flatten().copied())
                .fold(f64::INFINITY, f64::min)
                .min(0.0);
            let panels: Vec<Panel<'_>> = Matrix::ALL
                .iter()
                .map(|&mat| Panel {
                    title: mat.name(),
                    matrix: l.get(mat),
                })
                .collect();
            let name = format!("expert-similarity-layer{}.svg", l.layer);
            let svg = heatmaps(
                &format!("Expert similarity, layer {}", l.layer),
                &panels,
                &l.labels,
                lo,
                1.0,
            );
            write_file(&dir.join(&name), &svg)?;
            let _ = writeln!(md, "![expert similarity, layer {}]({name})\n", l.layer);
        }
    }
    let path = dir.join("report.md");
    write_file(&path, &md)?;
    Ok(path)
}
