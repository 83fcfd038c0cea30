//! Inputs of the forward pass: prompts as text (one per line, or JSONL
//! `{"text": ...}`) tokenized with the checkpoint's `tokenizer.json`, or
//! token ids (one prompt per line, ids separated by whitespace).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Tokenized prompts, with their text when they came from text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    /// Token ids, one vector per prompt.
    pub ids: Vec<Vec<u32>>,
    /// The prompt texts, when the prompts came from text.
    pub texts: Option<Vec<String>>,
}

impl Prompts {
    /// Total number of tokens.
    pub fn tokens(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
}

fn input_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The longest excerpt of a bad input quoted in an error message.
const QUOTE_CHARS: usize = 40;

/// `s`, cut to [`QUOTE_CHARS`] characters (a garbage "word" may be megabytes long).
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The text of an input file: UTF-8, with a leading byte-order mark removed.
pub fn decode_text<'b>(path: &Path, bytes: &'b [u8]) -> Result<&'b str> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        input_error(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    Ok(strip_bom(text))
}

fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses prompt text: one prompt per non-empty line, or JSON Lines whose
/// objects carry a `"text"` string (a file is JSONL when its first non-empty
/// line starts with `{`). A leading UTF-8 byte-order mark is ignored.
pub fn parse_prompt_text(path: &Path, text: &str) -> Result<Vec<String>> {
    let lines: Vec<(usize, &str)> = strip_bom(text)
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let jsonl = lines
        .first()
        .is_some_and(|(_, l)| l.trim_start().starts_with('{'));
    let mut out = Vec::with_capacity(lines.len());
    for (n, line) in lines {
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| input_error(path, format!("line {}: not valid JSON: {e}", n + 1)))?;
            let t = v
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| input_error(path, format!("line {}: no \"text\" string", n + 1)))?;
            if t.trim().is_empty() {
                return Err(input_error(
                    path,
                    format!("line {}: \"text\" is empty", n + 1),
                ));
            }
            out.push(t.to_string());
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        return Err(input_error(path, "no prompts in the file"));
    }
    Ok(out)
}

/// Parses token ids: one prompt per non-empty line, ids (decimal digits,
/// below 2^32) separated by whitespace. A leading UTF-8 byte-order mark is ignored.
pub fn parse_token_ids(path: &Path, text: &str) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for (n, line) in strip_bom(text).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ids = line
            .split_whitespace()
            .map(|w| {
                // Digits only: `str::parse` would also take a sign (`+5`).
                let id = w
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| w.parse::<u32>().ok())
                    .flatten();
                id.ok_or_else(|| {
                    input_error(
                        path,
                        format!(
                            "line {}: `{}` is not a token id (a number from 0 to {})",
                            n + 1,
                            quote(w),
                            u32::MAX
                        ),
                    )
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        out.push(ids);
    }
    if out.is_empty() {
        return Err(input_error(path, "no prompts in the file"));
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_text(path, &bytes).map(str::to_string)
}

/// A tokenizer loaded from `tokenizer.json` bytes.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json` bytes; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| input_error(path, format!("not a usable tokenizer.json: {e}")))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Encodes texts with the tokenizer's special tokens (e.g. a leading `<s>`).
    pub fn encode(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                self.inner
                    .encode(t.as_str(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| input_error(&self.path, format!("cannot tokenize {t:?}: {e}")))
            })
            .collect()
    }

    /// The text of each token (for axis labels).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| {
                self.inner
                    .decode(&[i], false)
                    .unwrap_or_else(|_| format!("<{i}>"))
            })
            .collect()
    }
}

/// Where prompts come from.
#[derive(Debug, Clone, Default)]
pub struct PromptArgs<'a> {
    /// A prompt text file (one prompt per line).
    pub prompts: Option<&'a Path>,
    /// A token-id file.
    pub token_ids: Option<&'a Path>,
}

/// Resolves the prompts of a run: `--token-ids`, or `--prompts` with the
/// model's tokenizer, or (demo model only) the built-in prompt set.
pub fn resolve(model_dir: Option<&Path>, args: &PromptArgs<'_>) -> Result<Prompts> {
    if let Some(p) = args.token_ids {
        return Ok(Prompts {
            ids: parse_token_ids(p, &read(p)?)?,
            texts: None,
        });
    }
    let texts = match (args.prompts, model_dir) {
        (Some(p), _) => parse_prompt_text(p, &read(p)?)?,
        #[cfg(feature = "demo")]
        (None, None) => parse_prompt_text(Path::new("<demo>/prompts.txt"), crate::demo::PROMPTS)?,
        #[cfg(not(feature = "demo"))]
        (None, None) => return Err(crate::model::no_demo()),
        (None, Some(dir)) => {
            return Err(Error::bad_value(
                crate::error::ValueKind::Prompts,
                dir.display().to_string(),
                "no prompts given for this model",
            ))
        }
    };
    let tok = tokenizer(model_dir)?;
    Ok(Prompts {
        ids: tok.encode(&texts)?,
        texts: Some(texts),
    })
}

/// The tokenizer of a model directory (or of the demo model).
pub fn tokenizer(model_dir: Option<&Path>) -> Result<Tokenizer> {
    match model_dir {
        #[cfg(feature = "demo")]
        None => Tokenizer::from_bytes(Path::new("<demo>/tokenizer.json"), crate::demo::TOKENIZER),
        #[cfg(not(feature = "demo"))]
        None => Err(crate::model::no_demo()),
        Some(dir) => {
            let path = dir.join("tokenizer.json");
            if !path.exists() {
                return Err(Error::bad_value(
                    crate::error::ValueKind::TokenIds,
                    path.display().to_string(),
                    "the model has no tokenizer.json, so prompts must be given as token ids",
                ));
            }
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            Tokenizer::from_bytes(&path, &bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_and_jsonl() {
        let p = Path::new("p.txt");
        assert_eq!(
            parse_prompt_text(p, "a b\n\n c\n").unwrap(),
            vec!["a b", " c"]
        );
        assert_eq!(
            parse_prompt_text(p, "{\"text\": \"x\"}\n{\"text\": \"y z\", \"id\": 3}\n").unwrap(),
            vec!["x", "y z"]
        );
        let e = parse_prompt_text(p, "{\"text\": 1}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.txt") && e.contains("line 1"), "{e}");
        assert!(parse_prompt_text(p, "\n\n").is_err());
    }

    #[test]
    fn token_id_lines() {
        let p = Path::new("ids.txt");
        assert_eq!(
            parse_token_ids(p, "1 2 3\n\n4\t5\n").unwrap(),
            vec![vec![1, 2, 3], vec![4, 5]]
        );
        let e = parse_token_ids(p, "1 x\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("`x`"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        let p = Path::new("p.jsonl");
        let bom = "\u{feff}";
        assert_eq!(
            parse_prompt_text(
                p,
                &format!("{bom}{{\"text\": \"x\"}}\n{{\"text\": \"y\"}}\n")
            )
            .unwrap(),
            vec!["x", "y"]
        );
        assert_eq!(
            parse_prompt_text(p, &format!("{bom}plain\n")).unwrap(),
            vec!["plain"]
        );
        assert_eq!(
            parse_token_ids(p, &format!("{bom}1 2\n3\n")).unwrap(),
            vec![vec![1, 2], vec![3]]
        );
        let bytes = format!("{bom}7 8\n").into_bytes();
        assert_eq!(decode_text(p, &bytes).unwrap(), "7 8\n");
    }

    #[test]
    fn garbage_is_rejected_with_a_short_message() {
        let p = Path::new("ids.txt");
        for bad in ["-1", "+5", "4294967296", "1e3", "0x10", "１"] {
            let e = parse_token_ids(p, &format!("1 {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("ids.txt") && e.contains("line 1"), "{bad}: {e}");
        }
        assert_eq!(
            parse_token_ids(p, "4294967295\n").unwrap(),
            vec![vec![u32::MAX]]
        );
        let long = "x".repeat(1 << 20);
        let e = parse_token_ids(p, &long).unwrap_err().to_string();
        assert!(e.len() < 200, "{}", e.len());
        let e = decode_text(p, b"1 2\n\xff\xfe").unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 4"), "{e}");
        let e = parse_prompt_text(p, "{\"text\": \"  \"}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn demo_prompts_tokenize_with_a_leading_bos() {
        let p = resolve(None, &PromptArgs::default()).unwrap();
        assert!(p.ids.len() >= 16);
        assert!(p.ids.iter().all(|ids| ids.len() > 1 && ids[0] == 1));
    }
}
