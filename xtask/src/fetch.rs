//! `cargo xtask fetch`: fetch and verify every pinned asset the project uses,
//! and print where each one is.

use std::path::PathBuf;

use antibody_fetch::Asset;
use anyhow::Context as _;

/// Arguments of `cargo xtask fetch` (none yet).
#[derive(Debug, Default, clap::Args)]
pub struct Args {}

/// Every pinned asset the project uses.
pub fn assets() -> Vec<Asset> {
    vec![
        antibody_fetch::patient(),
        // Harmful-prompt datasets are added here as they are pinned.
    ]
}

/// Fetches (or finds in the cache) and verifies every asset of [`assets`].
pub fn fetch_all() -> anyhow::Result<Vec<(Asset, PathBuf)>> {
    let cache = antibody_fetch::Cache::from_env();
    assets()
        .into_iter()
        .map(|asset| {
            let path = cache.fetch(&asset).with_context(|| {
                format!(
                    "fetching {} ({} {}) into {}",
                    asset.name,
                    asset.requirement(),
                    asset.path,
                    cache.root().display()
                )
            })?;
            Ok((asset, path))
        })
        .collect()
}

/// Prints one fetched asset.
pub fn print(asset: &Asset, path: &std::path::Path) {
    println!("{}", asset.name);
    println!("  path:    {}", path.display());
    println!("  sha256:  {}", asset.sha256);
    println!("  license: {}", asset.license);
}

/// Runs `cargo xtask fetch`.
pub fn run(Args {}: Args) -> anyhow::Result<()> {
    for (asset, path) in fetch_all()? {
        print(&asset, &path);
    }
    Ok(())
}
