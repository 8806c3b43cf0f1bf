//! The model crate's error type: every variant names the file, tensor or key at fault.

use std::path::PathBuf;

/// Everything that can go wrong while reading, building or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An I/O failure on a named file.
    #[error("{}: {}", path.display(), antibody_base::atomic::describe(source))]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF container itself could not be parsed (bad magic, truncated header, ...).
    #[error("{path}: not a readable GGUF file: {reason}")]
    GgufFormat {
        /// The GGUF file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },
    /// A tensor uses a storage type this crate does not dequantize.
    #[error(
        "{path}: tensor `{tensor}` has unsupported type {found}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"
    )]
    UnsupportedQuantization {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// The type found.
        found: String,
    },
    /// A required tensor is absent from the checkpoint.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The missing tensor's name (as the checkpoint names it).
        tensor: String,
    },
    /// A tensor's shape differs from what the configuration implies.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor's data could not be read or decoded.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    TensorData {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What went wrong.
        reason: String,
    },
    /// A configuration or metadata key is missing.
    #[error("{path}: missing key `{key}`")]
    MissingKey {
        /// The file that should hold the key.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A configuration or metadata key holds a value of the wrong type or range.
    #[error("{path}: key `{key}`: expected {expected}, found {found}")]
    BadKey {
        /// The file holding the key.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A JSON configuration file failed to parse.
    #[error("{path}: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's error (it carries line and column).
        #[source]
        source: serde_json::Error,
    },
    /// Tokenizer construction, loading or encoding failed.
    #[error("tokenizer ({origin}): {reason}")]
    Tokenizer {
        /// Where the tokenizer came from (a file path or "GGUF metadata").
        origin: String,
        /// What went wrong.
        reason: String,
    },
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Reading or writing safetensors through burn's store failed.
    #[error("{path}: {reason}")]
    Store {
        /// The safetensors file.
        path: PathBuf,
        /// What burn-store reported.
        reason: String,
    },
    /// A request the model cannot serve (bad site, wrong perturbation shape, ...).
    #[error("{0}")]
    Invalid(String),
    /// Fetching a pinned checkpoint failed.
    #[error(transparent)]
    Fetch(#[from] antibody_fetch::FetchError),
    /// A model name that does not parse.
    #[error(transparent)]
    Spec(#[from] antibody_base::ModelSpecError),
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
