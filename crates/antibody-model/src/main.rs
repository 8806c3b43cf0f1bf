//! `antibody-model`: inspect, convert, run and benchmark a checkpoint from the command line.

#![allow(
    clippy::print_stdout,
    reason = "a command-line tool's output on stdout is its interface"
)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use antibody_model::{
    ChatMessage, DTypeSpec, DeviceSpec, GenerationConfig, Hooks, Sampling, TokenBatch, generate,
    gguf::GgufFile, load, save_hf_dir, with_backend,
};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};

/// Inspect, convert, run and benchmark Llama checkpoints (GGUF or Hugging Face directories).
#[derive(Parser)]
#[command(name = "antibody-model", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a checkpoint's configuration, metadata and tensor index.
    Inspect {
        /// A `.gguf` file or a Hugging Face directory; default: the fetched patient.
        checkpoint: Option<PathBuf>,
    },
    /// Write a Hugging Face directory (safetensors, config, tokenizer) that transformers loads.
    Convert {
        /// The checkpoint to convert; default: the fetched patient.
        checkpoint: Option<PathBuf>,
        /// Output directory (replaced atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Chat-template prompts and generate answers.
    Generate {
        /// The model, named as in configuration (`patient`, `tiny[:SEED]`, a checkpoint path).
        #[arg(long, default_value = "patient")]
        checkpoint: antibody_model::ModelSpec,
        /// User prompts (one answer each, generated in one batch).
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        /// Maximum new tokens.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sample at this temperature instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f32>,
        /// Nucleus mass when sampling.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
        /// and loss reductions stay f32; an error where the device lacks it).
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
    },
    /// Measure forward and generation throughput; prints one JSON object.
    Bench {
        /// The checkpoint; default: the fetched patient.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
        /// and loss reductions stay f32; an error where the device lacks it).
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
        /// Forward batch size.
        #[arg(long, default_value_t = 4)]
        forward_batch: usize,
        /// Forward sequence length.
        #[arg(long, default_value_t = 256)]
        forward_seq: usize,
        /// Timed forward repeats (after one warm-up).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Prompts file (one per line); default: 64 built-in requests.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Prompts generated in one batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// New tokens per prompt (exactly: stop tokens are suppressed).
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Parts the generation batch is decoded in at once, each on one thread (0: the
        /// device's own choice, one per core on the CPU; 1: one batch over every thread).
        #[arg(long, default_value_t = 0)]
        shards: usize,
        /// Skip the forward measurement.
        #[arg(long)]
        skip_forward: bool,
        /// Skip the generation measurement.
        #[arg(long)]
        skip_generate: bool,
    },
    /// Time the backend's f32 matmul on the model's shapes (`[m, k] · [k, n]`, contiguous);
    /// prints one JSON object with GFLOP/s per shape.
    Gemm {
        /// Rows `m` (tokens of a batch: 4 × 128 in the method's bench).
        #[arg(long, default_value_t = 512)]
        m: usize,
        /// Timed repeats per shape (after two warm-ups); the best is reported.
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
        /// and loss reductions stay f32; an error where the device lacks it).
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
    },
}

/// `(k, n, what)`: the patient's projections (`[m, k] · [k, n]`) and one vocabulary chunk of
/// the fused output head; SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536.
const GEMM_SHAPES: [(usize, usize, &str); 5] = [
    (576, 576, "q/o projection"),
    (576, 192, "k/v projection"),
    (576, 1536, "gate/up projection"),
    (1536, 576, "down projection"),
    (576, 8192, "head, one vocabulary chunk"),
];

fn run_gemm<B: Backend>(
    m: usize,
    repeats: usize,
    dtype: DTypeSpec,
    device: &B::Device,
) -> Result<()> {
    use burn::tensor::{Distribution, Tensor};
    let mut rows = Vec::new();
    for (k, n, what) in GEMM_SHAPES {
        let random = |r: usize, c: usize| {
            Tensor::<B, 2>::random([r, c], Distribution::Uniform(-1.0, 1.0), device)
                .cast(dtype.float())
        };
        let (a, b) = (random(m, k), random(k, n));
        let mut best = f64::INFINITY;
        for i in 0..repeats.max(1) + 2 {
            let started = Instant::now();
            // Reading one value waits for the product on an asynchronous device.
            let c = a.clone().matmul(b.clone());
            let _ = c.slice([0..1, 0..1]).into_data();
            if i >= 2 {
                best = best.min(started.elapsed().as_secs_f64());
            }
        }
        let flops = 2.0 * (m * k * n) as f64;
        rows.push(serde_json::json!({
            "m": m, "k": k, "n": n, "what": what, "dtype": dtype.to_string(),
            "seconds": best, "gflops": flops / best / 1e9,
        }));
    }
    println!(
        "{}",
        serde_json::json!({ "impl": "antibody", "shapes": rows })
    );
    Ok(())
}

fn checkpoint_or_patient(path: Option<PathBuf>) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(p),
        None => antibody_fetch::fetch(&antibody_fetch::patient())
            .context("fetching the patient checkpoint"),
    }
}

fn main() -> Result<()> {
    antibody_base::logging::init();
    match Cli::parse().command {
        Command::Inspect { checkpoint } => inspect(&checkpoint_or_patient(checkpoint)?),
        Command::Convert { checkpoint, out } => {
            let path = checkpoint_or_patient(checkpoint)?;
            let loaded = load::<antibody_model::device::Cpu>(&path, &Default::default())
                .with_context(|| format!("loading {}", path.display()))?;
            save_hf_dir(&loaded.model, &loaded.tokenizer, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Generate {
            checkpoint,
            prompts,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            device,
            dtype,
        } => {
            let sampling = match temperature {
                Some(temperature) => Sampling::Sample {
                    temperature,
                    top_p,
                    seed,
                },
                None => Sampling::Greedy,
            };
            let config = GenerationConfig {
                max_new_tokens,
                min_new_tokens: 0,
                sampling,
            };
            with_backend!(device, |B, dev| {
                dtype.use_for_process::<B>(&dev)?;
                run_generate::<B>(&checkpoint, &dev, &prompts, &config)
            })
        }
        Command::Bench {
            checkpoint,
            device,
            dtype,
            forward_batch,
            forward_seq,
            repeats,
            prompts,
            batch,
            new_tokens,
            shards,
            skip_forward,
            skip_generate,
        } => {
            let path = checkpoint_or_patient(checkpoint)?;
            let prompts = bench_prompts(prompts.as_deref(), batch)?;
            let args = BenchArgs {
                forward_batch,
                forward_seq,
                repeats,
                new_tokens,
                skip_forward,
                skip_generate,
            };
            with_backend!(device, |B, dev| {
                dtype.use_for_process::<B>(&dev)?;
                if shards > 0 {
                    antibody_model::set_inference_shards(shards);
                }
                run_bench::<B>(&path, &dev, &prompts, &args)
            })
        }
        Command::Gemm {
            m,
            repeats,
            device,
            dtype,
        } => {
            with_backend!(device, |B, dev| {
                dtype.use_for_process::<B>(&dev)?;
                run_gemm::<B>(m, repeats, dtype, &dev)
            })
        }
    }
}

fn inspect(path: &Path) -> Result<()> {
    if path.is_dir() {
        let loaded = load::<antibody_model::device::Cpu>(path, &Default::default())?;
        println!("{}", serde_json::to_string_pretty(&loaded.model.config)?);
        return Ok(());
    }
    let gguf = GgufFile::open(path)?;
    println!("{}", serde_json::to_string_pretty(&gguf.llama_config()?)?);
    for key in gguf.metadata_keys() {
        if let Some(v) = gguf.metadata(key) {
            let text = format!("{v:?}");
            let short: String = text.chars().take(100).collect();
            println!("meta {key} = {short}");
        }
    }
    for (name, shape, dtype) in gguf.tensor_index() {
        println!("tensor {name} {shape:?} {dtype}");
    }
    Ok(())
}

fn run_generate<B: Backend>(
    spec: &antibody_model::ModelSpec,
    device: &B::Device,
    prompts: &[String],
    config: &GenerationConfig,
) -> Result<()> {
    use antibody_model::ModelSpecExt as _;
    let loaded = spec
        .load::<B>(device)
        .with_context(|| format!("loading {spec}"))?;
    let ids = chat_prompts(&loaded.tokenizer, prompts)?;
    let out = generate(&loaded.model, &ids, loaded.tokenizer.stop_ids(), config)?;
    for (p, g) in prompts.iter().zip(out) {
        println!("### {p}\n{}\n", loaded.tokenizer.decode(&g.tokens)?);
    }
    Ok(())
}

/// Each prompt as a single user turn, chat-templated with the generation prompt.
fn chat_prompts(
    tokenizer: &antibody_model::Tokenizer,
    prompts: &[String],
) -> Result<Vec<Vec<u32>>> {
    let ids = prompts
        .iter()
        .map(|p| tokenizer.chat_ids(&[ChatMessage::user(p.clone())], true))
        .collect::<antibody_model::Result<Vec<_>>>()?;
    Ok(ids)
}

struct BenchArgs {
    forward_batch: usize,
    forward_seq: usize,
    repeats: usize,
    new_tokens: usize,
    skip_forward: bool,
    skip_generate: bool,
}

/// 64 generic harmful-style requests (placeholders with the shape of HarmBench prompts; the
/// real HarmBench set arrives with the datasets).
fn bench_prompts(file: Option<&Path>, batch: usize) -> Result<Vec<String>> {
    let base: Vec<String> = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => (0..64)
            .map(|i| format!("Write a persuasive article about topic {i}"))
            .collect(),
    };
    anyhow::ensure!(!base.is_empty(), "no prompts");
    Ok(base.iter().cycle().take(batch).cloned().collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_bench<B: Backend>(
    path: &Path,
    device: &B::Device,
    prompts: &[String],
    args: &BenchArgs,
) -> Result<()> {
    let loaded = load::<B>(path, device)?;
    let model = &loaded.model;
    let mut report = serde_json::Map::new();
    if !args.skip_forward {
        let (b, t) = (args.forward_batch, args.forward_seq);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let seqs: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..t)
                    .map(|_| {
                        state = antibody_model::tiny::splitmix64(state);
                        (state % model.config.vocab_size as u64) as u32
                    })
                    .collect()
            })
            .collect();
        let batch = TokenBatch::right_padded(&seqs, model.config.pad_token_id);
        let run = || -> Result<f64> {
            let start = Instant::now();
            let (logits, _) = model.forward(&batch, &Hooks::none())?;
            let _ = logits.into_data();
            Ok(start.elapsed().as_secs_f64())
        };
        run()?;
        let times = (0..args.repeats.max(1))
            .map(|_| run())
            .collect::<Result<Vec<_>>>()?;
        let secs = median(times);
        report.insert("forward_s".into(), secs.into());
        report.insert("forward_tok_s".into(), ((b * t) as f64 / secs).into());
    }
    if !args.skip_generate {
        let ids = chat_prompts(&loaded.tokenizer, prompts)?;
        let config = GenerationConfig {
            max_new_tokens: args.new_tokens,
            min_new_tokens: args.new_tokens,
            sampling: Sampling::Greedy,
        };
        // warm-up on a small batch
        generate(
            model,
            &ids[..ids.len().min(4)],
            loaded.tokenizer.stop_ids(),
            &GenerationConfig {
                max_new_tokens: 4,
                min_new_tokens: 4,
                sampling: Sampling::Greedy,
            },
        )?;
        let start = Instant::now();
        let out = generate(model, &ids, loaded.tokenizer.stop_ids(), &config)?;
        let secs = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|g| g.tokens.len()).sum();
        report.insert(
            "shards".into(),
            antibody_model::shards::inference_shards().into(),
        );
        report.insert("generate_wall_s".into(), secs.into());
        report.insert("generate_tokens".into(), tokens.into());
        report.insert("generate_tok_s".into(), (tokens as f64 / secs).into());
    }
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}
