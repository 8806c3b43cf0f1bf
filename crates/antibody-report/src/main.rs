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
    /// The configuration file (its `[eval]` section).
    #[arg(long, default_value = "configs/default.toml")]
    config: PathBuf,
    /// Override an `[eval]` key: `--set eval.out_dir=...` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Where the results are and the report goes (default: `eval.out_dir`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    let cli = Cli::parse();
    let mut eval = Eval::load(&cli.config, &cli.overrides)?;
    if let Some(out) = cli.out {
        eval.out_dir = out;
    }
    let results = antibody_report::read_results(&eval)?;
    let path = antibody_report::write(
        &eval.out_dir,
        &cli.config,
        &results,
        eval.train_run.as_deref(),
    )?;
    tracing::info!("{}", antibody_report::verdict(&results));
    tracing::info!("report: {}", path.display());
    Ok(())
}
