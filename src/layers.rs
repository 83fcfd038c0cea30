//! `--layers` selections: `0,5,31`, `0..8` (end exclusive), `0..=7`, or a mix.

use crate::error::{Error, Result};

/// A parsed layer selection (checkpoint layer indices, ascending, unique).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSelection(Vec<usize>);

impl LayerSelection {
    /// Parses a selection such as `0,5,31`, `0..8` or `2..=4,10`.
    pub fn parse(spec: &str) -> Result<LayerSelection> {
        let bad = |part: &str, why: &str| {
            Error::Usage(format!(
                "--layers `{spec}`: `{part}` {why} (expected e.g. `0,5,31` or `0..8`)"
            ))
        };
        let num = |s: &str, part: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(part, "is not a layer number"))
        };
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad(part, "is empty"));
            }
            if let Some((a, b)) = part.split_once("..") {
                let start = num(a, part)?;
                let end = match b.strip_prefix('=') {
                    Some(b) => num(b, part)? + 1,
                    None => num(b, part)?,
                };
                if end <= start {
                    return Err(bad(part, "is an empty range"));
                }
                out.extend(start..end);
            } else {
                out.push(num(part, part)?);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(LayerSelection(out))
    }

    /// The selected indices.
    pub fn layers(&self) -> &[usize] {
        &self.0
    }

    /// Keeps the selected MoE layers; errors on an index past the model's last
    /// layer, or on a selection that names no MoE layer at all. Dense layers in
    /// the selection are returned separately so the caller can say they were skipped.
    pub fn resolve(
        &self,
        num_layers: usize,
        moe_layers: &[usize],
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        if let Some(&bad) = self.0.iter().find(|&&l| l >= num_layers) {
            return Err(Error::Usage(format!(
                "--layers: layer {bad} does not exist (the model has {num_layers} layers, 0..{num_layers})"
            )));
        }
        let (moe, dense): (Vec<usize>, Vec<usize>) =
            self.0.iter().partition(|l| moe_layers.contains(l));
        if moe.is_empty() {
            return Err(Error::Usage(format!(
                "--layers selects no MoE layer (MoE layers: {})",
                format_list(moe_layers)
            )));
        }
        Ok((moe, dense))
    }
}

/// Formats indices compactly: `[0, 1, 2, 5]` → `0..=2, 5`.
pub fn format_list(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(match j - i {
            0 => layers[i].to_string(),
            1 => format!("{}, {}", layers[i], layers[j]),
            _ => format!("{}..={}", layers[i], layers[j]),
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_ranges_and_mixes() {
        assert_eq!(
            LayerSelection::parse("0,5,31").unwrap().layers(),
            &[0, 5, 31]
        );
        assert_eq!(LayerSelection::parse("0..3").unwrap().layers(), &[0, 1, 2]);
        assert_eq!(
            LayerSelection::parse("2..=4, 1,3").unwrap().layers(),
            &[1, 2, 3, 4]
        );
    }

    #[test]
    fn rejects_garbage_and_empty_ranges() {
        for bad in ["", "a", "3..1", "1,,2", "-1", "0..x"] {
            let err = LayerSelection::parse(bad).unwrap_err().to_string();
            assert!(err.contains("--layers"), "{bad}: {err}");
        }
    }

    #[test]
    fn resolve_splits_moe_and_dense_and_checks_bounds() {
        let sel = LayerSelection::parse("0..3").unwrap();
        assert_eq!(sel.resolve(3, &[1, 2]).unwrap(), (vec![1, 2], vec![0]));
        assert!(sel
            .resolve(2, &[1])
            .unwrap_err()
            .to_string()
            .contains("layer 2 does not exist"));
        assert!(LayerSelection::parse("0")
            .unwrap()
            .resolve(3, &[1, 2])
            .unwrap_err()
            .to_string()
            .contains("no MoE layer"));
    }

    #[test]
    fn formats_runs_compactly() {
        assert_eq!(format_list(&[0, 1, 2, 5, 7, 8]), "0..=2, 5, 7, 8");
        assert_eq!(format_list(&[]), "none");
    }
}
