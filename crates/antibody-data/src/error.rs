//! The data crate's error type: every variant names the file and, where there is one, the
//! row, field, column or configuration key at fault.

use std::path::PathBuf;

/// Everything that can go wrong while reading configuration or sources, building, or
/// reading and writing the built sets.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A configuration file is unreadable, or a key in it (`data.sources[2].format`) is
    /// missing, unknown or invalid.
    #[error(transparent)]
    Config(#[from] antibody_base::ConfigError),
    /// A row of a source or JSONL file is malformed, or lacks a field, or has the wrong type.
    #[error("{file}: line {line}: {}{reason}", field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
    Row {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The field at fault, if the row parsed as an object.
        field: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// A Parquet file does not have the documented schema, or a value in it is invalid.
    #[error("{file}: {}{reason}", match (column, row) {
        (Some(c), Some(r)) => format!("row {r}: column `{c}`: "),
        (Some(c), None) => format!("column `{c}`: "),
        _ => String::new(),
    })]
    Parquet {
        /// The file.
        file: PathBuf,
        /// The column at fault.
        column: Option<String>,
        /// 0-based row index.
        row: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A local source file's SHA-256 is not the one pinned in configuration.
    #[error("{file}: sha256 mismatch for source `{source_name}`: pinned {expected}, found {found}")]
    Checksum {
        /// The file.
        file: PathBuf,
        /// The source's name.
        source_name: String,
        /// The pinned digest.
        expected: String,
        /// The file's digest.
        found: String,
    },
    /// A set is empty after filtering: building it would produce nothing to train or evaluate on.
    #[error("set `{set}` is empty after filtering: {why}")]
    EmptySet {
        /// The set.
        set: String,
        /// The counts that emptied it.
        why: String,
    },
    /// An evaluation prompt appears in a training set (a bug in the split; never expected).
    #[error("leak: {prompt:?} is in both `{eval_set}` and `{train_set}`")]
    Leak {
        /// The normalized prompt.
        prompt: String,
        /// The evaluation set.
        eval_set: String,
        /// The training set.
        train_set: String,
    },
    /// The output directory holds a build from other inputs, and replacing it was not asked.
    #[error(
        "{} holds a build from other inputs (changed: {what}); rebuild it with --force, or build \
         into another --out",
        dir.display()
    )]
    Replace {
        /// The output directory.
        dir: PathBuf,
        /// What differs.
        what: String,
    },
    /// A built set that does not match its build's manifest (digest, rows), or a directory
    /// that is not a complete build.
    #[error("{}: {reason}", file.display())]
    Unverified {
        /// The set's file.
        file: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// Another process is writing the output directory.
    #[error(transparent)]
    Lock(#[from] antibody_base::lock::LockError),
    /// A file-system operation failed.
    #[error("cannot {action} {}: {}", path.display(), antibody_base::atomic::describe(source))]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Fetching a pinned source failed.
    #[error(transparent)]
    Fetch(#[from] antibody_fetch::FetchError),
    /// Loading a model, tokenizing or generating failed.
    #[error(transparent)]
    Model(#[from] antibody_model::ModelError),
}

impl DataError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Config(antibody_base::ConfigError::new(file, key, reason))
    }

    pub(crate) fn row(
        file: impl Into<PathBuf>,
        line: usize,
        field: Option<&str>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Row {
            file: file.into(),
            line,
            field: field.map(str::to_owned),
            reason: reason.into(),
        }
    }

    pub(crate) fn parquet(
        file: impl Into<PathBuf>,
        column: Option<&str>,
        row: Option<usize>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Parquet {
            file: file.into(),
            column: column.map(str::to_owned),
            row,
            reason: reason.into(),
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
