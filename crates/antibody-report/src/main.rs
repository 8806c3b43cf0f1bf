//! `antibody-report`: renders `report.md`, `report.json` and the plots from the per-model
//! results `antibody-eval run` wrote under the `[eval]` section's `out_dir`.

use std::path::PathBuf;

use antibody_eval::Eval;
use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "antibody's report: verdict, table and plots of an evaluation"
)]
struct Cli {
    /// `--config FILE`, `--set SECTION.KEY=VALUE`.
    #[command(flatten)]
    cfg: antibody_base::config::ConfigArgs,
    /// Where the results are and the report goes (default: `eval.out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    let cli = Cli::parse();
    let mut eval = Eval::load(&cli.cfg.config, &cli.cfg.overrides)?;
    if let Some(out) = cli.out {
        eval.out_dir = out;
    }
    let results = antibody_report::read_results(&eval)?;
    let path = antibody_report::write(
        &eval.out_dir,
        &cli.cfg.config,
        &results,
        eval.train_run.as_deref(),
        &antibody_report::Options {
            samples: eval.config.samples,
            max_degenerate: eval.config.max_degenerate,
        },
    )?;
    tracing::info!("{}", antibody_report::verdict(&results));
    tracing::info!("report: {}", path.display());
    Ok(())
}
