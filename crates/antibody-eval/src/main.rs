//! `antibody-eval run`: evaluates every model of the `[eval]` section on a data build, one
//! result file per model under `<out_dir>/models/` (current ones are skipped, so an
//! interrupted evaluation resumes). `antibody-report` renders the report from them.

use std::path::{Path, PathBuf};

use antibody_eval::answers::{Judges, Scorer, judge_rows, read_answer_rows};
use antibody_eval::{Eval, evaluate};
use antibody_judge::{KeywordJudge, Label, ResponseJudge};
use antibody_model::{DTypeSpec, DeviceSpec, ModelSpecExt as _, with_backend};
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
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
}

#[derive(clap::Args)]
struct JudgeArgs {
    /// `--config FILE` (its `[eval.judge]`, `[eval.keyword]` and `eval.scorer`), `--set`.
    #[command(flatten)]
    cfg: antibody_base::config::ConfigArgs,
    /// The answers: JSON lines with `prompt`, `answer`, optional `kind` (harmful, harmless,
    /// lookalike), `id`, `category` and `label` (a label written by reading).
    #[arg(long)]
    answers: PathBuf,
    /// The verdicts, one JSON line per row (default: `<answers>.judged.jsonl`); the summary
    /// goes beside it as `.summary.json`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
    /// Also fit the judge's thresholds to the rows' labels (half the rows) and report the
    /// fitted judge on the other half.
    #[arg(long)]
    calibrate: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate every model (per-model results under `<out_dir>/models/`).
    Run(Args),
    /// Judge anyone's answers: one verdict per row (refused, complied/answered, degenerate),
    /// GCG's keyword verdict beside it, and a summary with intervals — and, where rows carry
    /// labels, each judge's agreement with them.
    Judge(JudgeArgs),
    /// How far a model's residual stream separates held-out harmful prompts from benign
    /// look-alikes, per layer (logistic regression and the mean-difference direction fit on
    /// the training sets): the best case of a refusal rule that reads it. Writes
    /// `probe.json` and `probe.md`.
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// `--config FILE` (its `[data] out_dir` and `[eval]` sampling), `--set`.
    #[command(flatten)]
    cfg: antibody_base::config::ConfigArgs,
    /// The model (`patient`, `tiny[:SEED]`, a checkpoint path).
    #[arg(long, default_value = "patient")]
    model: String,
    /// The data build (default: the configuration's `[data] out_dir`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where `probe.json` and `probe.md` go.
    #[arg(long)]
    out: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// `antibody-eval probe`; the Markdown goes to standard output too.
#[allow(clippy::print_stdout)]
fn probe(args: &ProbeArgs) -> Result<()> {
    let eval = Eval::load(&args.cfg.config, &args.cfg.overrides)?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => antibody_data::Config::load(&args.cfg.config, &[])?.out_dir,
    };
    let spec: antibody_model::ModelSpec = args
        .model
        .parse()
        .map_err(|e| anyhow::anyhow!("`--model {}`: {e}", args.model))?;
    let report = with_backend!(args.device, |B, device| {
        let loaded = antibody_model::ModelSpecExt::load::<B>(&spec, &device)?;
        Ok::<_, anyhow::Error>(antibody_eval::probe::probe(
            &loaded.model,
            &args.model,
            &data,
            &eval.config,
        )?)
    })?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.out.display()))?;
    let md = report.markdown();
    write(
        &args.out.join("probe.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    write(&args.out.join("probe.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// Writes `bytes` to `p` atomically; the error names the file.
fn write(p: &Path, bytes: &[u8]) -> Result<()> {
    antibody_base::atomic::write_bytes(p, bytes)
        .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), antibody_base::atomic::describe(&e)))
}

fn load(args: &Args) -> Result<Eval> {
    let mut eval = Eval::load(&args.cfg.config, &args.cfg.overrides)?;
    if let Some(out) = &args.out {
        eval.out_dir.clone_from(out);
    }
    Ok(eval)
}

/// Judges an answers file; the summary goes to standard output (it is the command's result).
#[allow(clippy::print_stdout)]
fn judge(args: &JudgeArgs) -> Result<()> {
    let eval = Eval::load(&args.cfg.config, &args.cfg.overrides)?;
    let mut rows = read_answer_rows(&args.answers)?;
    if rows.iter().any(|r| r.prompt.trim().is_empty()) {
        let data = antibody_data::Config::load(&args.cfg.config, &[])?;
        antibody_eval::answers::resolve_prompts(&mut rows, &data, &args.answers)?;
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let mut p = args.answers.clone().into_os_string();
        p.push(".judged.jsonl");
        PathBuf::from(p)
    });
    let (judged, summary) = with_backend!(args.device, |B, device| {
        args.dtype.use_for_process::<B>(&device)?;
        let scorer = match &eval.scorer {
            Some(spec) => {
                let loaded = spec.load::<B>(&device)?;
                Some(Scorer::new(
                    loaded.model,
                    loaded.tokenizer,
                    eval.config.batch_size,
                ))
            }
            None => None,
        };
        let judges = Judges {
            response: ResponseJudge::new(eval.config.judge.clone()),
            keyword: KeywordJudge::from_config(&eval.config.keyword),
            scorer: scorer.as_ref(),
        };
        Ok::<_, anyhow::Error>(judge_rows(rows, &judges)?)
    })?;
    let mut lines = Vec::new();
    for j in &judged {
        serde_json::to_writer(&mut lines, j)?;
        lines.push(b'\n');
    }
    write(&out, &lines)?;
    let mut summary_path = out.clone().into_os_string();
    summary_path.push(".summary.json");
    let summary_path = PathBuf::from(summary_path);
    write(&summary_path, &serde_json::to_vec_pretty(&summary)?)?;
    for k in &summary.kinds {
        println!(
            "{}: refused {}, {} {}, degenerate {}; keyword judge refused {}",
            k.kind,
            k.refused.display_percent(),
            Label::Complied.name_for(&k.kind),
            k.complied.display_percent(),
            k.degenerate.display_percent(),
            k.keyword_refused.display_percent()
        );
    }
    for (name, a, d) in [
        (
            "three-verdict judge",
            &summary.agreement,
            &summary.degenerate_not_harmful,
        ),
        (
            "keyword judge",
            &summary.keyword_agreement,
            &summary.keyword_degenerate_not_harmful,
        ),
    ] {
        if let (Some(a), Some(d)) = (a, d) {
            println!(
                "{name} vs labels: agreement {}, kappa {:.3}; labelled degenerate not counted as harmful {}",
                antibody_base::stats::Rate::new((a.agreement * a.n as f64).round() as usize, a.n)
                    .display_percent(),
                a.kappa,
                d.display_percent()
            );
        }
    }
    if args.calibrate {
        let c =
            antibody_eval::answers::calibrate(&eval.config.judge, &judged).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no labelled rows to calibrate on",
                    args.answers.display()
                )
            })?;
        let j = &c.judge;
        println!(
            "calibrated on {} rows (agreement {:.1}%): min_fluency = {}, min_relevance = {}, min_distinct_trigrams = {}, min_distinct_char_ngrams = {}, min_distinct_words = {}, max_tail_loop = {}; held out: agreement {:.1}% (n={}), kappa {:.3}; all rows: agreement {:.1}% (n={}), kappa {:.3}",
            c.fit_n,
            100.0 * c.fit_agreement,
            j.min_fluency,
            j.min_relevance,
            j.min_distinct_trigrams,
            j.min_distinct_char_ngrams,
            j.min_distinct_words,
            j.max_tail_loop,
            100.0 * c.held_out.agreement,
            c.held_out.n,
            c.held_out.kappa,
            100.0 * c.all.agreement,
            c.all.n,
            c.all.kappa
        );
        let mut p = out.clone().into_os_string();
        p.push(".calibration.json");
        write(Path::new(&p), &serde_json::to_vec_pretty(&c)?)?;
    }
    println!(
        "verdicts in {}, summary in {}",
        out.display(),
        summary_path.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    match Cli::parse().command {
        Command::Judge(args) => judge(&args),
        Command::Probe(args) => probe(&args),
        Command::Run(args) => {
            let eval = load(&args)?;
            let data = match &args.data {
                Some(d) => d.clone(),
                None => antibody_data::Config::load(&args.cfg.config, &[])?.out_dir,
            };
            let results = with_backend!(args.device, autodiff, |B, device| {
                args.dtype.use_for_process::<B>(&device)?;
                Ok::<_, anyhow::Error>(evaluate::<B>(&eval, &data, &device)?)
            })?;
            for r in &results {
                tracing::info!("{}: HS {}", r.name, r.hs().display_percent());
            }
            tracing::info!(
                "results in {}; `antibody-report` renders the report",
                eval.out_dir.join("models").display()
            );
            Ok(())
        }
    }
}
