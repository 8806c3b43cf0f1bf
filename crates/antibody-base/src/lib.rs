//! antibody-base: what every stage and `xtask` share, with no burn inside.
//!
//! - [`atomic`]: all-or-nothing writes of files and directories;
//! - [`progress`]: the one-line progress of long loops;
//! - [`lock`]: one writer per output directory ([`DirLock`]);
//! - [`logging`]: the tracing set-up every binary uses;
//! - [`cache_root`]: where fetched assets, build outputs and shared results are cached;
//! - [`config`]: reading one section of a configuration file, with `--set KEY=VALUE`
//!   overrides, into a typed struct; [`ConfigError`] names the file (or the override) and the
//!   dotted key;
//! - [`ModelSpec`]: how configuration names a model (`patient`, `tiny[:SEED]`, a path);
//! - [`Example`]: a token sequence with its response mask, the unit every loss and loop reads.

pub mod atomic;
pub mod config;
mod example;
pub mod hash;
pub mod lock;
pub mod logging;
mod model_spec;
pub mod progress;
pub mod stats;

pub use config::{ConfigError, load_section};
pub use example::Example;
pub use lock::DirLock;
pub use model_spec::{ModelSpec, ModelSpecError};

use std::path::PathBuf;

/// The cache root: `$ANTIBODY_CACHE` if set, else `$XDG_CACHE_HOME/antibody`,
/// else `$HOME/.cache/antibody` (else `antibody-cache` in the temp dir).
pub fn cache_root() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(root) = var("ANTIBODY_CACHE") {
        return PathBuf::from(root);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").map(PathBuf::from)
        && xdg.is_absolute()
    {
        return xdg.join("antibody");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("antibody"),
        None => std::env::temp_dir().join("antibody-cache"),
    }
}
