//! `antibody-train`: training runs.
//!
//! - `run`: the method (cyclic, sequential or mixed schedule of LAT-perturbed harmful steps,
//!   canary identification and stabilized harmless steps) as the `[train]` section of a
//!   configuration file says; the run directory is described in
//!   [`antibody_train::run`]. `--resume` continues from its last checkpoint.
//! - `bench`: one of the method's steps timed on random weights of the patient's architecture
//!   (`cargo xtask bench method`).

use std::path::PathBuf;

use antibody_model::{DTypeSpec, DeviceSpec, with_backend};
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "antibody's training runs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The method, as the `[train]` section of a configuration file says.
    Run(RunArgs),
    /// Time the method's harmful or harmless step on random weights of the patient's
    /// architecture (used by `cargo xtask bench method`); prints one JSON line.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// `harmful` (LAT + NPO + capped immunization KL) or `harmless` (DPO + alignment KL +
    /// canary MSE).
    #[arg(long)]
    phase: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (a quarter prompt, the rest response).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// LAT layers.
    #[arg(long, value_delimiter = ',', default_value = "8,16,24")]
    lat_layers: Vec<usize>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
    /// Run this configuration file's `[train]` section (its losses, LAT, canaries, batch
    /// size and seed; one cycle of `--warmup + --steps` steps of the phase, random weights)
    /// on the examples of the data build `--data`, instead of the synthetic `--batch × --seq`
    /// batches and the built-in section.
    #[arg(long, requires = "data")]
    config: Option<PathBuf>,
    /// The data build whose `harmful_train` and `harmless_train` the steps read (with
    /// `--config`).
    #[arg(long, requires = "config")]
    data: Option<PathBuf>,
    /// Write the examples each step of the measured phase read (token ids and response
    /// masks, JSON) to this file, for the peer to run the same batches.
    #[arg(long)]
    batches_out: Option<PathBuf>,
}

/// `VmHWM` (peak resident set) of this process, in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench(args: BenchArgs) -> Result<()> {
    use antibody_train::data::TeacherCache;
    use antibody_train::method::{Method, Outcome};
    let harmful = match args.phase.as_str() {
        "harmful" => true,
        "harmless" => false,
        other => bail!("--phase: `{other}` is not harmful or harmless"),
    };
    let (b, t) = (args.batch, args.seq);
    let (data, config) = match (&args.config, &args.data) {
        (Some(file), Some(dir)) => real_bench(file, dir, &args, harmful)?,
        _ => (bench_data(b, t), bench_config(&args, harmful)?),
    };
    let bs = config.batch_size;
    let with_refusal = config.adv.rho > 0.0;
    let phase_steps = if harmful {
        config.harmful_steps
    } else {
        config.harmless_steps
    };
    let arch = antibody_model::LlamaConfig::smollm2_135m();
    let name = args.device.to_string();
    with_backend!(args.device, autodiff, |B, device| {
        type I = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        args.dtype.use_for_process::<B>(&device)?;
        let student = antibody_model::tiny::random_model::<B>(&arch, 1, &device)?;
        let harmful_teacher = antibody_model::tiny::random_model::<I>(&arch, 2, &device)?;
        let benign_teacher = antibody_model::tiny::random_model::<I>(&arch, 1, &device)?;
        let cache = TeacherCache::compute(
            String::new(),
            &harmful_teacher,
            &benign_teacher,
            &benign_teacher,
            &data,
            &config,
        )?;
        let mut method = Method::new(
            student,
            Vec::new(),
            None,
            harmful_teacher,
            benign_teacher,
            cache,
            data,
            config,
        )?;
        let phase = if harmful { "harmful" } else { "harmless" };
        // What each step of the measured phase reads, and its real (non-padding) tokens: the
        // sequences of every forward that backpropagates (a harmful step's `x ++ y_h` and
        // `x ++ y_ref`, a harmless step's `x ++ y_c` and `x ++ y_r`).
        let (batches, real_tokens): (Vec<serde_json::Value>, Vec<usize>) = (0..phase_steps)
            .map(|k| {
                step_batch(
                    method.data(),
                    method.batch_rows(harmful, k),
                    harmful,
                    with_refusal,
                )
            })
            .unzip();
        if let Some(path) = &args.batches_out {
            let doc =
                serde_json::json!({ "phase": phase, "warmup": args.warmup, "steps": batches });
            std::fs::write(path, serde_json::to_vec(&doc)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let (mut seconds, mut timed, mut seen) = (0.0, 0usize, 0usize);
        let (mut step_seconds, mut tokens) = (Vec::new(), 0usize);
        let mut reset = false;
        loop {
            // Peak memory from the first step of the measured phase on.
            if !reset && method.next_event().is_some_and(|e| e.phase() == phase) {
                reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
            }
            let Some((event, outcome)) = method.advance()? else {
                break;
            };
            if let Outcome::Step(m) = outcome
                && event.phase() == phase
            {
                seen += 1;
                if seen > args.warmup {
                    seconds += m.seconds;
                    step_seconds.push(m.seconds);
                    tokens += real_tokens.get(seen - 1).copied().unwrap_or(0);
                    timed += 1;
                }
            }
        }
        let line = serde_json::json!({
            "impl": "antibody",
            "phase": phase,
            "device": name,
            "dtype": args.dtype.to_string(),
            "batch": bs,
            "seq": if args.config.is_some() { serde_json::Value::Null } else { t.into() },
            "steps": timed,
            "seconds_per_step": seconds / timed.max(1) as f64,
            "step_seconds": step_seconds,
            "real_tokens": tokens,
            "tokens_per_s": tokens as f64 / seconds.max(1e-9),
            "peak_bytes": peak_rss(),
            "peak_reset": reset,
        });
        #[allow(clippy::print_stdout)]
        {
            println!("{line}");
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// One step's examples as JSON: `sequences` (every sequence a forward reads, `ids` and
/// `response_mask`) grouped by `role` (`harmful`, and `refusal` when the refusal term is on;
/// or `chosen`/`rejected`); and their real tokens.
fn step_batch(
    data: &antibody_train::data::MethodData,
    rows: &[usize],
    harmful: bool,
    with_refusal: bool,
) -> (serde_json::Value, usize) {
    let mut picked: Vec<(&str, &antibody_base::Example)> = Vec::new();
    for &r in rows {
        if harmful {
            let h = &data.harmful[r];
            picked.push(("harmful", &h.harmful));
            if let Some(y_ref) = h.refusal.as_ref().filter(|_| with_refusal) {
                picked.push(("refusal", y_ref));
            }
        } else {
            let h = &data.harmless[r];
            picked.push(("chosen", &h.chosen));
            picked.push(("rejected", &h.rejected));
        }
    }
    let tokens = picked.iter().map(|(_, e)| e.ids.len()).sum();
    let sequences: Vec<serde_json::Value> = picked
        .iter()
        .map(|(role, e)| {
            serde_json::json!({ "role": role, "ids": e.ids, "response_mask": e.response_mask })
        })
        .collect();
    (
        serde_json::json!({ "rows": rows, "sequences": sequences }),
        tokens,
    )
}

/// The data build's method examples and the configuration's `[train]` section made into one
/// phase's benchmark: one cycle, `--warmup + --steps` steps of the measured phase (one
/// harmful step before a harmless phase, as the synthetic bench runs), random weights.
fn real_bench(
    file: &std::path::Path,
    dir: &std::path::Path,
    args: &BenchArgs,
    harmful: bool,
) -> Result<(
    antibody_train::data::MethodData,
    antibody_train::config::TrainConfig,
)> {
    use antibody_data::{SetKind, read_set};
    let mut config = antibody_train::config::Train::load(file, &[])?.config;
    let steps = args.warmup + args.steps;
    config.cycles = 1;
    config.harmful_steps = if harmful { steps } else { 1 };
    config.harmless_steps = if harmful { 0 } else { steps };
    config.lat.layers = args.lat_layers.clone();
    let harmful_set = read_set(dir, SetKind::HarmfulTrain)?;
    let harmless_set = read_set(dir, SetKind::HarmlessTrain)?;
    let data =
        antibody_train::data::MethodData::from_records(&harmful_set.records, &harmless_set.records);
    Ok((data, config))
}

/// `b` random harmful and harmless examples of `t` tokens (a quarter prompt).
fn bench_data(b: usize, t: usize) -> antibody_train::data::MethodData {
    use antibody_base::Example;
    use antibody_train::data::{HarmfulExample, HarmlessExample, MethodData};
    let prompt = (t / 4).max(1);
    let seq = |row: usize, salt: u64| -> Example {
        let ids = (0..t)
            .map(|i| {
                let z = antibody_model::tiny::splitmix64(salt ^ ((row * t + i) as u64));
                if i == 0 { 1 } else { 3 + (z % 49_000) as u32 }
            })
            .collect();
        Example {
            ids,
            response_mask: (0..t).map(|i| i >= prompt).collect(),
        }
    };
    MethodData {
        harmful: (0..b)
            .map(|r| HarmfulExample {
                harmful: seq(r, 11),
                refusal: None,
                prompt: seq(r, 11).ids[..prompt].to_vec(),
            })
            .collect(),
        harmless: (0..b)
            .map(|r| HarmlessExample {
                chosen: seq(r, 12),
                rejected: seq(r, 13),
                prompt: seq(r, 12).ids[..prompt].to_vec(),
            })
            .collect(),
    }
}

/// The benchmark's `[train]` section: one phase's steps, LAT at `--lat-layers`.
fn bench_config(args: &BenchArgs, harmful: bool) -> Result<antibody_train::config::TrainConfig> {
    let b = args.batch;
    let steps = args.warmup + args.steps;
    let layers: Vec<String> = args.lat_layers.iter().map(ToString::to_string).collect();
    Ok(toml::from_str(&format!(
        r#"
        run_dir = "unused"
        student = "random"
        harmful_teacher = "random"
        benign_teacher = "random"
        cycles = 1
        harmful_steps = {hs}
        harmless_steps = {ls}
        batch_size = {b}
        [optim]
        lr = 1e-5
        max_grad_norm = 1.0
        [adv]
        forget = "npo"
        gamma = 0.5
        kl_cap = 10.0
        [align]
        pref = "dpo"
        alpha = 0.5
        lambda_stab = 1.0
        [lat]
        layers = [{layers}]
        epsilon = 1.0
        steps = 1
        [canary]
        enabled = {canary}
        q = 0.99
        harmful_sample = {b}
        harmless_sample = {b}
        batch_size = {b}
        "#,
        hs = if harmful { steps } else { 1 },
        ls = if harmful { 0 } else { steps },
        layers = layers.join(", "),
        canary = !harmful,
    ))?)
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// `--config FILE`, `--set SECTION.KEY=VALUE`.
    #[command(flatten)]
    cfg: antibody_base::config::ConfigArgs,
    /// The data build (default: the configuration's `[data] out_dir`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The run directory (default: the configuration's `train.run_dir`).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from the run directory's last checkpoint.
    #[arg(long)]
    resume: bool,
    /// With `--resume`: a run started under another configuration starts afresh instead of
    /// being refused.
    #[arg(long)]
    restart_if_changed: bool,
    /// Without `--resume`: replace a run directory that holds a run started with another
    /// configuration (refused otherwise).
    #[arg(long)]
    force: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
    /// and loss reductions stay f32; an error where the device lacks it).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
}

fn run(args: RunArgs) -> Result<()> {
    let mut train = antibody_train::config::Train::load(&args.cfg.config, &args.cfg.overrides)?;
    if let Some(dir) = &args.run_dir {
        train.run_dir.clone_from(dir);
    }
    antibody_base::logging::init_to(&train.run_dir.join("train.log"))
        .with_context(|| format!("{}: train.log", train.run_dir.display()))?;
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None => antibody_data::Config::load(&args.cfg.config, &[])?.out_dir,
    };
    let name = args.device.to_string();
    with_backend!(args.device, autodiff, |B, device| {
        args.dtype.use_for_process::<B>(&device)?;
        antibody_train::run::run::<B>(
            &train,
            &data_dir,
            &device,
            &name,
            args.resume,
            antibody_train::run::Limits {
                restart_if_changed: args.restart_if_changed,
                force: args.force,
                ..Default::default()
            },
        )?;
        Ok::<_, anyhow::Error>(())
    })
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Bench(args) => {
            antibody_base::logging::init();
            bench(args)
        }
    }
}
