//! `antibody-finetune sft`: supervised fine-tuning of a model on one response of one built
//! set. Run directory: `args.json` (the resolved arguments, written first), `metrics.jsonl`
//! (one line per optimizer step), `checkpoint/` (the last complete checkpoint), `final/`
//! (weights when the run completes). `--resume` continues from the last checkpoint.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use antibody_data::{SetKind, read_set};
use antibody_finetune::{FinetuneConfig, OptimConfig, SftRun};
use antibody_model::{DTypeSpec, DeviceSpec, ModelSpec, ModelSpecExt as _, with_backend};
use anyhow::{Context as _, Result, bail};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(version, about = "Fine-tuning runs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Supervised fine-tuning on one response of a built set.
    Sft(SftArgs),
}

#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
struct SftArgs {
    /// A build directory of antibody-data.
    #[arg(long)]
    data: PathBuf,
    /// The set (e.g. harmful_train).
    #[arg(long)]
    set: String,
    /// The response to train on (e.g. y_h).
    #[arg(long)]
    response: String,
    /// The model (`patient`, `tiny[:SEED]`, a checkpoint path).
    #[arg(long)]
    model: String,
    /// Optimizer steps.
    #[arg(long)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    accumulation: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Global gradient-norm clip.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Seeds the order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// The run directory.
    #[arg(long)]
    run_dir: PathBuf,
    /// Continue from the run directory's last checkpoint.
    #[arg(long)]
    #[serde(skip)]
    resume: bool,
    /// Without `--resume`: replace a run directory that holds a run started with other
    /// arguments (refused otherwise).
    #[arg(long)]
    #[serde(skip)]
    force: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    #[serde(skip)]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    #[serde(skip)]
    dtype: DTypeSpec,
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    antibody_base::atomic::write_bytes(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Keeps the metrics lines of steps before `step` (a resumed run redoes the rest).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| (s as usize) < step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, &kept)
}

fn sft(args: SftArgs) -> Result<()> {
    let kind = SetKind::from_name(&args.set)
        .with_context(|| format!("--set: unknown set `{}`", args.set))?;
    if !kind.responses().contains(&args.response.as_str()) {
        bail!(
            "--response: `{}` is not a response of `{}` (it has {:?})",
            args.response,
            args.set,
            kind.responses()
        );
    }
    let data = read_set(&args.data, kind)?;
    let examples: Vec<_> = data
        .records
        .iter()
        .filter_map(|r| r.sequence(&args.response))
        .collect();
    let config = FinetuneConfig {
        optim: OptimConfig {
            warmup_steps: args.warmup,
            max_grad_norm: args.max_grad_norm,
            accumulation: args.accumulation,
            ..OptimConfig::new(args.lr)
        },
        steps: args.steps,
        batch_size: args.batch_size,
        seed: args.seed,
    };
    config.check_flags().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.run_dir)?;
    let _lock = antibody_base::DirLock::acquire(&args.run_dir, "antibody-finetune sft")?;
    let args_path = args.run_dir.join("args.json");
    let resolved = serde_json::to_string_pretty(&args)?;
    if !args.resume
        && !args.force
        && let Ok(before) = std::fs::read_to_string(&args_path)
        && before != resolved
    {
        bail!(
            "{}: holds a run started with other arguments ({}); continue it with --resume, \
             choose another --run-dir, or replace it with --force",
            args.run_dir.display(),
            args_path.display()
        );
    }
    let checkpoint = args.run_dir.join("checkpoint");
    let metrics_path = args.run_dir.join("metrics.jsonl");
    let spec: ModelSpec = args.model.parse()?;
    with_backend!(args.device, autodiff, |B, device| {
        args.dtype.use_for_process::<B>(&device)?;
        let template = spec.load::<B>(&device)?.model;
        let mut run = if args.resume && checkpoint.join("state.json").exists() {
            let run = SftRun::resume(&checkpoint, template, &config)?;
            truncate_metrics(&metrics_path, run.state.step)?;
            tracing::info!("resuming at step {} of {}", run.state.step, config.steps);
            run
        } else {
            write_atomic(&args_path, &resolved)?;
            write_atomic(&metrics_path, "")?;
            SftRun::new(template, examples.len(), &config)
        };
        let mut metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)?;
        run.run(&examples, &config, None, |log, run| {
            let line =
                serde_json::to_string(log).map_err(|e| antibody_finetune::FinetuneError::Io {
                    path: metrics_path.clone(),
                    source: std::io::Error::other(e),
                })?;
            writeln!(metrics, "{line}")
                .and_then(|()| metrics.sync_data())
                .map_err(|source| antibody_finetune::FinetuneError::Io {
                    path: metrics_path.clone(),
                    source,
                })?;
            tracing::info!(
                "step {} loss {:.4} grad norm {:.3} lr {:.2e} ({:.2} s)",
                log.step,
                log.loss,
                log.grad_norm,
                log.lr,
                log.seconds
            );
            run.save_if_due(&checkpoint, args.checkpoint_every, &config)
        })?;
        let final_dir = args.run_dir.join("final");
        std::fs::create_dir_all(&final_dir)?;
        run.model.clone().save_file(
            final_dir.join("model"),
            &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
        )?;
        Ok::<_, anyhow::Error>(())
    })
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    match Cli::parse().command {
        Command::Sft(args) => sft(args),
    }
}
