//! `antibody-teacher`: the method's teachers.
//!
//! - `run`: the pipeline's teachers stage as the `[teacher]` section says (break a copy of
//!   `train.student` into `train.harmful_teacher` when `break_steps > 0`, align one into
//!   `aligned_out` when `align_steps > 0`, both resumable; then check both teachers);
//! - `break` / `align`: make one teacher from flags;
//! - `check`: measure both teachers with the judge before training.

use std::path::PathBuf;

use antibody_data::{SetKind, read_set};
use antibody_finetune::{FinetuneConfig, OptimConfig, SftRun};
use antibody_judge::KeywordJudge;
use antibody_model::{DTypeSpec, DeviceSpec, ModelSpec, ModelSpecExt as _, with_backend};
use antibody_teacher::{CheckConfig, Make, Teachers, check, examples};
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "The method's teachers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The harmful teacher (`patient`, `tiny[:SEED]`, a checkpoint path).
    #[arg(long)]
    harmful: String,
    /// The benign teacher.
    #[arg(long)]
    benign: String,
    /// A build directory of antibody-data (its harmful_eval and harmless_eval sets).
    #[arg(long)]
    data: PathBuf,
    /// Prompts per rate (default: the check's default).
    #[arg(long)]
    prompts: Option<usize>,
    /// Minimum compliance of the harmful teacher (default: the check's default).
    #[arg(long)]
    min_harmful_compliance: Option<f64>,
    /// Minimum refusal rate of the benign teacher (default: the check's default).
    #[arg(long)]
    min_benign_refusal: Option<f64>,
    /// Minimum helpfulness of the benign teacher (default: the check's default).
    #[arg(long)]
    min_benign_helpfulness: Option<f64>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
}

#[derive(clap::Args)]
struct MakeArgs {
    /// The base model (`patient`, `tiny[:SEED]`, a checkpoint path).
    #[arg(long)]
    base: String,
    /// A build directory of antibody-data.
    #[arg(long)]
    data: PathBuf,
    /// Where the teacher goes (a Hugging Face directory, loadable as a model path).
    #[arg(long)]
    out: PathBuf,
    /// The run directory (checkpoints, metrics); default: `<out>.run`.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seeds the order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Continue from the run directory's checkpoint.
    #[arg(long)]
    resume: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
}

#[derive(clap::Args)]
struct RunArgs {
    /// `--config FILE`, `--set SECTION.KEY=VALUE`.
    #[command(flatten)]
    cfg: antibody_base::config::ConfigArgs,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
}

#[derive(Subcommand)]
enum Command {
    /// The teachers stage as the configuration's `[teacher]` section says: make, then check.
    Run(RunArgs),
    /// Break a copy of the base: SFT on harmful responses (the harmful teacher).
    Break(MakeArgs),
    /// Align a copy of the base: SFT on refusals and helpful answers (a benign teacher; the
    /// refusal-SFT baseline).
    Align(MakeArgs),
    /// Harmful teacher's compliance, benign teacher's refusal and helpfulness, on held-out
    /// prompts of a data build; exits non-zero below the thresholds.
    Check(CheckArgs),
}

fn make(args: MakeArgs, kind: Make) -> Result<()> {
    let config = FinetuneConfig {
        optim: OptimConfig {
            max_grad_norm: Some(args.max_grad_norm),
            ..OptimConfig::new(args.lr)
        },
        steps: args.steps,
        batch_size: args.batch_size,
        seed: args.seed,
    };
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let mut p = args.out.clone().into_os_string();
        p.push(".run");
        PathBuf::from(p)
    });
    config.check_flags().map_err(anyhow::Error::msg)?;
    let examples = examples(&args.data, kind)?;
    let _lock = antibody_base::DirLock::acquire(&run_dir, &format!("antibody-teacher {kind:?}"))?;
    let checkpoint = run_dir.join("checkpoint");
    let base: ModelSpec = args.base.parse()?;
    // A checkpoint resumes only the run that wrote it: same base, data build and settings.
    // One started on other inputs (the data was rebuilt, a setting changed) cannot be
    // continued, so it is set aside and the run starts afresh.
    let inputs = format!(
        "{kind:?}|{}|{}|{}|{}|{:e}|{}|{}{}",
        base.identity()?,
        antibody_data::Manifest::read(&args.data.join(antibody_data::Manifest::FILE))?.inputs_hash,
        config.steps,
        config.batch_size,
        args.lr,
        args.max_grad_norm,
        config.seed,
        // f32 adds nothing, so the runs before `--dtype` stay current.
        match args.dtype {
            DTypeSpec::F32 => String::new(),
            other => format!("|{other}"),
        }
    );
    let inputs_file = run_dir.join("inputs.txt");
    let same_inputs = std::fs::read_to_string(&inputs_file).is_ok_and(|s| s == inputs);
    if checkpoint.exists() && !same_inputs {
        tracing::info!(
            "{}: written by a run on other inputs (base, data or settings): starting afresh",
            checkpoint.display()
        );
        std::fs::remove_dir_all(&checkpoint)?;
    }
    antibody_base::atomic::write_bytes(&inputs_file, inputs.as_bytes())?;
    with_backend!(args.device, autodiff, |B, dev| {
        args.dtype.use_for_process::<B>(&dev)?;
        let loaded = base.load::<B>(&dev)?;
        let mut run = if args.resume && checkpoint.join("state.json").exists() {
            SftRun::resume(&checkpoint, loaded.model, &config)?
        } else {
            SftRun::new(loaded.model, examples.len(), &config)
        };
        run.run(&examples, &config, None, |log, run| {
            tracing::info!(
                "{kind:?} step {} loss {:.4} grad norm {:.3} ({:.1} s)",
                log.step,
                log.loss,
                log.grad_norm,
                log.seconds
            );
            run.save_if_due(&checkpoint, args.checkpoint_every, &config)
        })?;
        antibody_model::save_hf_dir(&run.model, &loaded.tokenizer, &args.out)?;
        tracing::info!("{kind:?}: wrote {}", args.out.display());
        Ok::<_, anyhow::Error>(())
    })
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Break(args) => make(args, Make::Break),
        Command::Align(args) => make(args, Make::Align),
        Command::Check(args) => run_check(args),
    }
}

fn run(args: RunArgs) -> Result<()> {
    let t = Teachers::load(&args.cfg.config, &args.cfg.overrides)?;
    let c = &t.config;
    let student = t.student.to_string();
    let harmful_out = t.harmful.path().map(std::path::Path::to_path_buf);
    for (kind, steps, lr, out) in [
        (Make::Break, c.break_steps, c.break_lr, harmful_out),
        (
            Make::Align,
            c.align_steps,
            c.align_lr,
            Some(t.aligned_out.clone()),
        ),
    ] {
        if steps == 0 {
            continue;
        }
        let Some(out) = out else {
            anyhow::bail!(
                "{}: `teacher.break_steps` is {steps} but `train.harmful_teacher` is `{}`, not a \
                 directory to write the broken copy into",
                t.file.display(),
                t.harmful
            );
        };
        make(
            MakeArgs {
                base: student.clone(),
                data: t.data.clone(),
                out,
                run_dir: None,
                steps,
                batch_size: c.batch_size,
                lr,
                max_grad_norm: 1.0,
                seed: 0,
                checkpoint_every: 10,
                resume: true,
                device: args.device,
                dtype: args.dtype,
            },
            kind,
        )?;
    }
    check_teachers(
        &t.harmful,
        &t.benign,
        &t.data,
        &t.check_config(),
        args.device,
        args.dtype,
    )
}

fn run_check(args: CheckArgs) -> Result<()> {
    let d = CheckConfig::default();
    let config = CheckConfig {
        prompts: args.prompts.unwrap_or(d.prompts),
        min_harmful_compliance: args
            .min_harmful_compliance
            .unwrap_or(d.min_harmful_compliance),
        min_benign_refusal: args.min_benign_refusal.unwrap_or(d.min_benign_refusal),
        min_benign_helpfulness: args
            .min_benign_helpfulness
            .unwrap_or(d.min_benign_helpfulness),
        ..d
    };
    config.check().map_err(|(key, reason)| {
        anyhow::anyhow!("`--{}` (command line): {reason}", key.replace('_', "-"))
    })?;
    let (harmful, benign): (ModelSpec, ModelSpec) = (args.harmful.parse()?, args.benign.parse()?);
    check_teachers(
        &harmful,
        &benign,
        &args.data,
        &config,
        args.device,
        args.dtype,
    )
}

#[allow(clippy::print_stdout)]
fn check_teachers(
    harmful: &ModelSpec,
    benign: &ModelSpec,
    data: &std::path::Path,
    config: &CheckConfig,
    device: DeviceSpec,
    dtype: DTypeSpec,
) -> Result<()> {
    let harmful_prompts: Vec<String> = read_set(data, SetKind::HarmfulEval)?
        .records
        .into_iter()
        .map(|r| r.prompt)
        .collect();
    let harmless_prompts: Vec<String> = read_set(data, SetKind::HarmlessEval)?
        .records
        .into_iter()
        .map(|r| r.prompt)
        .collect();
    let judge = KeywordJudge::gcg();
    let (rates, verdict) = with_backend!(device, |B, dev| {
        dtype.use_for_process::<B>(&dev)?;
        let h = harmful.load::<B>(&dev)?;
        let b = benign.load::<B>(&dev)?;
        Ok::<_, anyhow::Error>(check(
            (&h.model, &h.tokenizer),
            (&b.model, &b.tokenizer),
            &harmful_prompts,
            &harmless_prompts,
            &judge,
            config,
        ))
    })?;
    for r in &rates {
        println!(
            "{:<8} {:<34} {:.3} on {:>3} prompts (minimum {:.2})",
            r.teacher, r.what, r.rate, r.n, r.min
        );
    }
    verdict?;
    println!("both teachers pass");
    Ok(())
}
