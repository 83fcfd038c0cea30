//! Output, formatting only: terminal tables, the JSON report, Markdown with
//! SVG figures, drift tables, the quantisation report and benchmark reports. It renders the results of
//! [`crate::analysis`], [`crate::golden`] and [`crate::bench`]; nothing in the
//! library below it imports it.

pub mod bench;
pub mod drift;
pub mod markdown;
pub mod quant;
pub mod svg;
pub mod table;

use crate::analysis::results::Report;

/// Output format of `analyze`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Terminal tables.
    Table,
    /// The JSON report (schema `moe-inspect/report/v1`).
    Json,
    /// `report.md` with SVG figures.
    Markdown,
}

/// The JSON report, pretty-printed.
pub fn to_json(report: &Report) -> String {
    // Serialising plain structs of finite numbers cannot fail.
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Any serialisable value as pretty JSON (e.g. the `models` listing).
pub fn to_json_value<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
