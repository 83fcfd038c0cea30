//! Output: terminal tables, the JSON report, Markdown with SVG figures.

pub mod drift;
pub mod markdown;
pub mod schema;
pub mod svg;
pub mod table;

use schema::Report;

/// Output format of `analyze`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
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
