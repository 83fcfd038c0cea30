//! `--layers` selections: `0,5,31`, `0..8` (end exclusive), `0..=7`, or a mix.

use crate::error::{Error, Result, ValueKind};

/// A parsed layer selection: half-open ranges of checkpoint layer indices,
/// kept as ranges (never expanded) until they are resolved against a model,
/// so `0..100000000000` costs nothing and is refused with a clear message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSelection(Vec<std::ops::Range<usize>>);

impl LayerSelection {
    /// Parses a selection such as `0,5,31`, `0..8` or `2..=4,10`.
    pub fn parse(spec: &str) -> Result<LayerSelection> {
        let bad = |part: &str, why: &str| {
            Error::bad_value(
                ValueKind::Layers,
                spec,
                format!("`{part}` {why} (expected e.g. `0,5,31` or `0..8`)"),
            )
        };
        let num = |s: &str, part: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(part, "is not a layer number"))
        };
        let past = |n: usize, part: &str| {
            n.checked_add(1)
                .ok_or_else(|| bad(part, "is beyond any model's layers"))
        };
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad(part, "is empty"));
            }
            if let Some((a, b)) = part.split_once("..") {
                let start = num(a, part)?;
                let end = match b.strip_prefix('=') {
                    Some(b) => past(num(b, part)?, part)?,
                    None => num(b, part)?,
                };
                if end <= start {
                    return Err(bad(part, "is an empty range"));
                }
                out.push(start..end);
            } else {
                let l = num(part, part)?;
                out.push(l..past(l, part)?);
            }
        }
        Ok(LayerSelection(out))
    }

    fn contains(&self, layer: usize) -> bool {
        self.0.iter().any(|r| r.contains(&layer))
    }

    /// Keeps the selected MoE layers; errors on an index past the model's last
    /// layer, or on a selection that names no MoE layer at all. Dense layers in
    /// the selection are returned separately so the caller can say they were skipped.
    pub fn resolve(
        &self,
        num_layers: usize,
        moe_layers: &[usize],
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        if let Some(bad) = self.0.iter().map(|r| r.end - 1).find(|&l| l >= num_layers) {
            return Err(Error::bad_value(
                ValueKind::Layers,
                "",
                format!(
                    "layer {bad} does not exist (the model has {num_layers} layers, 0..{num_layers})"
                ),
            ));
        }
        // Every range now lies within the model: walking the model's layers is bounded.
        let (moe, dense): (Vec<usize>, Vec<usize>) = (0..num_layers)
            .filter(|&l| self.contains(l))
            .partition(|l| moe_layers.contains(l));
        if moe.is_empty() {
            return Err(Error::bad_value(
                ValueKind::Layers,
                "",
                format!(
                    "selects no MoE layer (MoE layers: {})",
                    format_list(moe_layers)
                ),
            ));
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

    fn selected(spec: &str, num_layers: usize) -> Vec<usize> {
        let all: Vec<usize> = (0..num_layers).collect();
        LayerSelection::parse(spec)
            .unwrap()
            .resolve(num_layers, &all)
            .unwrap()
            .0
    }

    #[test]
    fn parses_lists_ranges_and_mixes() {
        assert_eq!(selected("0,5,31", 32), [0, 5, 31]);
        assert_eq!(selected("0..3", 32), [0, 1, 2]);
        assert_eq!(selected("2..=4, 1,3", 32), [1, 2, 3, 4]);
    }

    /// Ranges are resolved against the model, never expanded first.
    #[test]
    fn huge_ranges_are_refused_without_expanding() {
        for spec in [
            "0..100000000000",
            "0..=18446744073709551614",
            "5,0..99999999999999",
        ] {
            let err = LayerSelection::parse(spec)
                .unwrap()
                .resolve(4, &[0, 1, 2, 3])
                .unwrap_err()
                .to_string();
            assert!(err.contains("does not exist"), "{spec}: {err}");
        }
        let err = LayerSelection::parse("0..=18446744073709551615")
            .unwrap_err()
            .to_string();
        assert!(err.contains("beyond"), "{err}");
    }

    #[test]
    fn rejects_garbage_and_empty_ranges() {
        for bad in ["", "a", "3..1", "1,,2", "-1", "0..x"] {
            let err = LayerSelection::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("layer selection"), "{bad}: {err}");
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
