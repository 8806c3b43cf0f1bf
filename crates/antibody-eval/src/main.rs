//! `antibody-eval run`: evaluates every model of the `[eval]` section on a data build, one
//! result file per model under `<out_dir>/models/` (current ones are skipped, so an
//! interrupted evaluation resumes). `antibody-report` renders the report from them.

use std::path::PathBuf;

use antibody_eval::{Eval, evaluate};
use antibody_model::{DeviceSpec, with_backend};
use anyhow::Result;
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
    /// `--config FILE`, `--set SECTION.KEY=VALUE`.
    #[command(flatten)]
    cfg: antibody_base::config::ConfigArgs,
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
    /// Evaluate every model (per-model results under `<out_dir>/models/`).
    Run(Args),
}

fn load(args: &Args) -> Result<Eval> {
    let mut eval = Eval::load(&args.cfg.config, &args.cfg.overrides)?;
    if let Some(out) = &args.out {
        eval.out_dir.clone_from(out);
    }
    Ok(eval)
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    match Cli::parse().command {
        Command::Run(args) => {
            let eval = load(&args)?;
            let data = match &args.data {
                Some(d) => d.clone(),
                None => antibody_data::Config::load(&args.cfg.config, &[])?.out_dir,
            };
            let results = with_backend!(args.device, autodiff, |B, device| {
                Ok::<_, anyhow::Error>(evaluate::<B>(&eval, &data, &device)?)
            })?;
            for r in &results {
                tracing::info!("{}: HS {:.3} (n={})", r.name, r.hs.rate, r.hs.n);
            }
            tracing::info!(
                "results in {}; `antibody-report` renders the report",
                eval.out_dir.join("models").display()
            );
            Ok(())
        }
    }
}
