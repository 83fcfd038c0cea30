//! Typed errors of the library. Every variant names the file, tensor or key
//! that is at fault, so the CLI can print one clear line and pick an exit code.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or analysing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// `config.json` is absent from a model directory.
    #[error("{}: no config.json in this model directory", dir.display())]
    ConfigMissing {
        /// The model directory.
        dir: PathBuf,
    },

    /// `config.json` is not valid JSON or not an object.
    #[error("{}: malformed config.json: {reason}", path.display())]
    ConfigSyntax {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },

    /// A key of `config.json` is missing or has the wrong type/value.
    #[error("{}: config key `{key}`: {reason}", path.display())]
    ConfigKey {
        /// The file at fault.
        path: PathBuf,
        /// The config key.
        key: String,
        /// What is wrong, in words.
        reason: String,
    },

    /// The `model_type` (or architecture) is not one of the supported families.
    #[error("{}: unknown model family `{found}` (supported: {supported}); see `cargo moe-inspect models`", path.display())]
    UnknownFamily {
        /// The file at fault.
        path: PathBuf,
        /// The family named by the config.
        found: String,
        /// The supported families, comma-separated.
        supported: String,
    },

    /// The family has no native forward pass: a command that needs one was asked of it.
    #[error("{}: family `{family}` has static analyses only; use an engine trace for routing and activations (families with a native forward: {native})", path.display())]
    NoNativeForward {
        /// The config.json of the model.
        path: PathBuf,
        /// The family id.
        family: String,
        /// The families with a native forward, comma-separated.
        native: String,
    },

    /// No safetensors file (single or sharded index) in a model directory.
    #[error("{}: no model.safetensors or model.safetensors.index.json in this model directory", dir.display())]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },

    /// A safetensors file (or index) is structurally broken.
    #[error("{}: {reason}", path.display())]
    Safetensors {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },

    /// A shard is shorter than its header promises.
    #[error("{}: truncated safetensors file: tensor `{tensor}` needs bytes {start}..{end} of the data section, but the file holds only {available} data bytes", path.display())]
    Truncated {
        /// The file at fault.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Byte offset where the tensor's data starts.
        start: u64,
        /// Byte offset where the tensor's data ends.
        end: u64,
        /// Bytes actually in the file.
        available: u64,
    },

    /// A tensor the family adapter needs is not in the checkpoint.
    #[error("{}: tensor `{tensor}` is missing from the checkpoint", dir.display())]
    TensorMissing {
        /// The model directory.
        dir: PathBuf,
        /// The tensor's name.
        tensor: String,
    },

    /// A tensor has a shape that does not match the config.
    #[error("{}: tensor `{tensor}` has shape {found:?}, but config.json implies {expected:?}", path.display())]
    ShapeMismatch {
        /// The file at fault.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype the analyses cannot read.
    #[error("{}: tensor `{tensor}` has dtype {dtype}, which is not supported (supported: F32, F16, BF16, F8_E4M3)", path.display())]
    UnsupportedDtype {
        /// The file at fault.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The stored dtype.
        dtype: String,
    },

    /// A tensor holds NaN or infinite values.
    #[error("{}: tensor `{tensor}` contains NaN or infinite values", path.display())]
    NonFinite {
        /// The file at fault.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },

    /// The forward pass produced NaN or infinite values (finite but huge
    /// weights, a config value such as `rope_theta` ≤ 0, a NaN bias): the
    /// results would be meaningless, so nothing is reported or recorded.
    #[error("{}: layer {layer}: {what} contain NaN or infinite values (the forward pass diverged; check the weights and config values such as rope_theta, rms_norm_eps)", path.display())]
    Diverged {
        /// The file at fault.
        path: PathBuf,
        /// The decoder layer where it happened.
        layer: usize,
        /// The quantity that became non-finite.
        what: String,
    },

    /// Two models that must have the same geometry do not.
    #[error("{}: {reason}", path.display())]
    Incompatible {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },

    /// A tensor computation failed (shapes the config promised did not hold, a device error).
    #[error("while computing {what}: {reason}")]
    Compute {
        /// The computation that failed.
        what: String,
        /// What is wrong, in words.
        reason: String,
    },

    /// Prompts or token ids could not be read or tokenized.
    #[error("{}: {reason}", path.display())]
    Input {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },

    /// A benchmark baseline asked for by name is not saved.
    #[error(
        "{}: no such baseline `{name}` (saved in {}: {})",
        path.display(),
        dir.display(),
        if saved.is_empty() { "none".to_string() } else { saved.join(", ") }
    )]
    NoBaseline {
        /// The file the name resolved to.
        path: PathBuf,
        /// The name as given.
        name: String,
        /// Where baselines are kept.
        dir: PathBuf,
        /// The baselines saved there.
        saved: Vec<String>,
    },

    /// A command-line or configuration value is invalid.
    #[error("{0}")]
    Usage(String),

    /// A value given to the library (a golden name, a tolerance, a list of
    /// analyses) is not valid; the message says which and why. The caller
    /// adds where the value came from (a flag, a configuration key).
    #[error("{0}")]
    Invalid(String),

    /// A value the caller chose (a layer selection, a device, the prompts)
    /// is not valid. The library names the kind of value; a front end that
    /// knows where the value came from (a command-line flag) can say so
    /// instead (see [`ValueKind`]).
    #[error("{}", bad_value(*kind, value, reason))]
    BadValue {
        /// What kind of value.
        kind: ValueKind,
        /// The value as given (empty when the problem is its absence).
        value: String,
        /// What is wrong, in words.
        reason: String,
    },

    /// Two snapshots cannot be compared (other models, geometry or
    /// settings); [`Error::at`] names the file.
    #[error("{0}")]
    NotComparable(String),
}

/// The kinds of caller-chosen values an [`Error::BadValue`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValueKind {
    /// A layer selection (`0,5,31`, `0..8`).
    Layers,
    /// A compute device (`cpu`, `cuda:N`).
    Device,
    /// A list of analyses.
    Analyses,
    /// The prompts of a forward pass (none given).
    Prompts,
    /// Prompts as token ids (needed when a model has no tokenizer).
    TokenIds,
    /// Prompt lengths of a benchmark.
    TokenCounts,
    /// A benchmark name filter.
    BenchFilter,
    /// The Cargo.toml to read the configuration from.
    Manifest,
}

impl ValueKind {
    /// How the library names the value in messages.
    pub fn describe(self) -> &'static str {
        match self {
            ValueKind::Layers => "layer selection",
            ValueKind::Device => "device",
            ValueKind::Analyses => "analyses",
            ValueKind::Prompts => "prompts",
            ValueKind::TokenIds => "token ids",
            ValueKind::TokenCounts => "token counts",
            ValueKind::BenchFilter => "benchmark filter",
            ValueKind::Manifest => "manifest",
        }
    }
}

fn bad_value(kind: ValueKind, value: &str, reason: &str) -> String {
    if value.is_empty() {
        format!("{}: {reason}", kind.describe())
    } else {
        format!("{} `{value}`: {reason}", kind.describe())
    }
}

impl Error {
    /// An [`Error::BadValue`].
    pub fn bad_value(kind: ValueKind, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadValue {
            kind,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The process exit code for this error (SPEC §3): 2 for usage, configuration
    /// and input errors. (Drift and regressions, exit 1, are results, not errors.)
    pub fn exit_code(&self) -> i32 {
        2
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Names the file a [`Error::NotComparable`] is about (as
    /// [`Error::Incompatible`]); other errors are returned unchanged.
    pub fn at(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::NotComparable(reason) => Error::Incompatible {
                path: path.into(),
                reason,
            },
            e => e,
        }
    }

    pub(crate) fn key(path: impl Into<PathBuf>, key: &str, reason: impl Into<String>) -> Self {
        Error::ConfigKey {
            path: path.into(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}
