//! `antibody-eval run`: evaluates every model of the `[eval]` section on a data build and
//! writes the report (resuming from per-model results); `antibody-eval report` re-renders the
//! report from the results on disk.

use std::path::PathBuf;

use antibody_eval::{Eval, ModelResult, evaluate, report};
use antibody_model::{DeviceSpec, with_backend};
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "antibody's evaluation: HS before and after attacks, FA, over-refusal, capability"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Args {
    /// The configuration file (its `[eval]` and `[data]` sections).
    #[arg(long, default_value = "configs/default.toml")]
    config: PathBuf,
    /// Override an `[eval]` key: `--set max_new_tokens=32` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The data build (default: the configuration's `[data] out_dir`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where results and the report go (default: `eval.out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate every model and write the report.
    Run(Args),
    /// Render the report from the per-model results already on disk.
    Report(Args),
}

fn load(args: &Args) -> Result<Eval> {
    let mut eval = Eval::load(&args.config, &args.overrides)?;
    if let Some(out) = &args.out {
        eval.out_dir.clone_from(out);
    }
    Ok(eval)
}

fn main() -> Result<()> {
    antibody_fetch::init_logging();
    match Cli::parse().command {
        Command::Run(args) => {
            let eval = load(&args)?;
            let data = match &args.data {
                Some(d) => d.clone(),
                None => antibody_data::Config::load(&args.config)?.out_dir,
            };
            let results = with_backend!(args.device, autodiff, |B, device| {
                Ok::<_, anyhow::Error>(evaluate::<B>(&eval, &data, &device)?)
            })?;
            let path = report::write(
                &eval.out_dir,
                &args.config,
                &results,
                eval.train_run.as_deref(),
            )?;
            tracing::info!("{}", report::verdict(&results));
            tracing::info!("report: {}", path.display());
            Ok(())
        }
        Command::Report(args) => {
            let eval = load(&args)?;
            let mut results = Vec::new();
            for (name, _) in &eval.models {
                let path = eval.out_dir.join("models").join(format!("{name}.json"));
                let bytes = std::fs::read(&path).with_context(|| {
                    format!(
                        "{}: no result for `{name}`: run `antibody-eval run` first",
                        path.display()
                    )
                })?;
                let r: ModelResult = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: not a model result", path.display()))?;
                results.push(r);
            }
            let path = report::write(
                &eval.out_dir,
                &args.config,
                &results,
                eval.train_run.as_deref(),
            )?;
            tracing::info!("report: {}", path.display());
            Ok(())
        }
    }
}
