//! `antibody-canary diff`: the canary neurons between two checkpoints on a prompt sample.

use std::path::{Path, PathBuf};

use antibody_canary::{drift, mean_activations, monitored_sites, report, select};
use antibody_model::{
    ChatMessage, DTypeSpec, DeviceSpec, ModelSpec, ModelSpecExt as _, TokenBatch, with_backend,
};
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Canary neurons: what moved between two checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the neurons whose mean activation drifted most between two checkpoints.
    Diff {
        /// The checkpoint before (`patient`, `tiny[:SEED]`, a .gguf or a Hugging Face dir).
        #[arg(long)]
        before: String,
        /// The checkpoint after.
        #[arg(long)]
        after: String,
        /// Prompts: a text file (one per line), a JSONL file (field `prompt`), or a set built
        /// by antibody-data (`.parquet`).
        #[arg(long)]
        prompts: PathBuf,
        /// Drift quantile above which a neuron is a canary.
        #[arg(long, default_value_t = 0.99)]
        q: f64,
        /// Use at most this many prompts (0 = all).
        #[arg(long, default_value_t = 64)]
        max_prompts: usize,
        /// Prompts per forward.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Also write `canaries.json` and `canaries.parquet` here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Compute dtype: f32, f16 or bf16 (mixed precision: the weights, optimizer state
        /// and loss reductions stay f32; an error where the device lacks it).
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
    },
}

/// Reads prompts from a text, JSONL or Parquet file; errors name the file and line.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let prompts = match ext {
        "parquet" => {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let kind = antibody_data::SetKind::from_name(stem).with_context(|| {
                format!("{}: a .parquet prompt file must be a set built by antibody-data (harmful_eval.parquet, ...)", path.display())
            })?;
            antibody_data::Dataset::read_parquet(kind, path)?
                .records
                .into_iter()
                .map(|r| r.prompt)
                .collect()
        }
        _ => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                if ext == "jsonl" {
                    let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
                        format!("{}: line {}: not valid JSON", path.display(), i + 1)
                    })?;
                    let p = v.get("prompt").and_then(|p| p.as_str()).with_context(|| {
                        format!(
                            "{}: line {}: field `prompt`: missing or not a string",
                            path.display(),
                            i + 1
                        )
                    })?;
                    out.push(p.to_owned());
                } else {
                    out.push(line.to_owned());
                }
            }
            out
        }
    };
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

#[allow(clippy::print_stdout)]
fn main() -> Result<()> {
    antibody_base::logging::init();
    let Command::Diff {
        before,
        after,
        prompts,
        q,
        max_prompts,
        batch_size,
        out,
        device,
        dtype,
    } = Cli::parse().command;
    if !(0.0..=1.0).contains(&q) {
        bail!("--q must be in [0, 1], got {q}");
    }
    let mut texts = read_prompts(&prompts)?;
    if max_prompts > 0 {
        texts.truncate(max_prompts);
    }
    let before: ModelSpec = before.parse()?;
    let after: ModelSpec = after.parse()?;
    let (pre, post) = with_backend!(device, |B, dev| {
        dtype.use_for_process::<B>(&dev)?;
        let run = |spec: &ModelSpec| -> Result<antibody_canary::Activations> {
            let loaded = spec
                .load::<B>(&dev)
                .with_context(|| format!("loading {spec}"))?;
            let ids = texts
                .iter()
                .map(|p| {
                    loaded
                        .tokenizer
                        .chat_ids(&[ChatMessage::user(p.as_str())], true)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let batches: Vec<TokenBatch> = ids
                .chunks(batch_size.max(1))
                .map(|c| TokenBatch::left_padded(c, loaded.model.config.pad_token_id))
                .collect();
            let sites = monitored_sites(loaded.model.config.num_layers);
            Ok(mean_activations(&loaded.model, &batches, &sites)?)
        };
        Ok::<_, anyhow::Error>((run(&before)?, run(&after)?))
    })?;
    let d = drift(&pre, &post);
    if d.is_empty() {
        bail!("the two checkpoints share no monitored site (different architectures?)");
    }
    let set = select(&d, q);
    let summary = report::summarize(None, &pre, &post, &d, &set, 20);
    println!(
        "{} canaries of {} neurons (q = {q}, drift > {:.4}) over {} prompts",
        summary.count,
        summary.monitored,
        summary.threshold,
        texts.len()
    );
    println!("by layer: {:?}", summary.by_layer);
    println!("by kind:  {:?}", summary.by_kind);
    let mut top: Vec<(String, usize, f32)> = set
        .neurons
        .iter()
        .flat_map(|(s, idx)| idx.iter().map(|&i| (s.to_string(), i, d[s][i])))
        .collect();
    top.sort_by(|a, b| b.2.total_cmp(&a.2));
    for (site, i, x) in top.iter().take(20) {
        println!("  {site:<8} neuron {i:>5}  drift {x:.4}");
    }
    if let Some(dir) = out {
        let frame = report::table(&pre, &post, &d, &set)?;
        let (json, parquet) = report::write(&dir, "canaries", &summary, frame)?;
        println!("wrote {} and {}", json.display(), parquet.display());
    }
    Ok(())
}
