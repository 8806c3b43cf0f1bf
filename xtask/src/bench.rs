//! `cargo xtask bench <what>`: antibody and its peer (PyTorch/transformers) on the same
//! work, in one invocation, printed side by side as ratios. Benchmarks, never timed tests.
//!
//! - `method` (the default): the backend's f32 GEMM on the patient's shapes beside PyTorch's
//!   (GFLOP/s, share of the f32 limit), then the method's harmful and harmless steps beside
//!   `bench/method_peer.py` on synthetic full batches and on the default data build's real
//!   batches (tokens/s of real tokens, share of the limit, peak memory).
//! - `model`: forward tokens/s at batch 4 × 256 and generation tokens/s on 64 prompts × 64
//!   new tokens (stop tokens suppressed so every row does the same work), against
//!   `bench/model_peer.py`.
//! - `losses`: the alignment KL and NPO on `ŝ` at batch 8 × 256 × vocab 49152 from hidden
//!   states through the head, forward + backward, unchunked and vocabulary-chunked (fused
//!   with the head), time and peak memory, against `bench/losses_peer.py` (PyTorch eager).
//!   CPU only.
//!
//! The peer runs in the Python given by `--python`, `$ANTIBODY_PYTHON`, or a virtual
//! environment under the cache root made from `bench/requirements.txt` on first use.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::test::{cargo_command, target_dir};

/// What to benchmark.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// The method's two training steps (harmful: LAT + NPO + capped immunization KL;
    /// harmless: DPO + alignment KL + canary MSE), tokens/s and peak memory per phase.
    Method,
    /// The model: forward and generation throughput.
    Model,
    /// HS evaluation's work: greedy answers to 64 prompts × 64 new tokens (one batch, KV
    /// cache), wall time beside transformers' `generate` on the same prompts.
    Eval,
    /// The KL loss: chunked vs unchunked, time and peak memory.
    Losses,
}

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to benchmark.
    #[arg(value_enum, default_value = "method")]
    pub what: What,
    /// cpu, cuda or cuda:N (cuda builds with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed forward repeats (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Python interpreter for the peer.
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Measure antibody only.
    #[arg(long)]
    pub skip_peer: bool,
}

/// Runs `cargo xtask bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Method => method(&args),
        What::Model => model(&args).map(|_| ()),
        What::Eval => eval(&args),
        What::Losses => losses(&args),
    }
}

/// Builds `package` in release mode (with `features`, if any); returns the release dir.
fn build_release(package: &str, features: Option<&str>) -> anyhow::Result<PathBuf> {
    let (target, _) = target_dir();
    let mut build: Vec<String> = ["build", "--release", "-p", package]
        .into_iter()
        .map(String::from)
        .collect();
    if let Some(f) = features {
        build.extend(["--features".to_owned(), f.to_owned()]);
    }
    let status = cargo_command(&build, &target)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of {package} failed ({status})");
    }
    Ok(target.join("release"))
}

fn losses(args: &Args) -> anyhow::Result<()> {
    if args.device != "cpu" {
        bail!("bench losses runs on the CPU only");
    }
    let binary = build_release("antibody-losses", None)?.join("antibody-losses");
    let repeats = args.repeats.max(1).to_string();
    let python = if args.skip_peer {
        None
    } else {
        Some(python(args.python.as_deref())?)
    };
    for (term, title) in [
        ("kl", "alignment KL (forward, masked mean)"),
        ("logprob", "NPO on the sequence log-probability"),
    ] {
        let mut rows = Vec::new();
        for variant in ["unchunked", "chunked"] {
            eprintln!("==> antibody, {term}, {variant}");
            rows.push(run_json(
                Command::new(&binary).args([
                    "bench",
                    "--term",
                    term,
                    "--variant",
                    variant,
                    "--repeats",
                    &repeats,
                ]),
                "antibody-losses bench",
            )?);
        }
        if let Some(python) = &python {
            eprintln!("==> PyTorch peer, {term}");
            rows.push(run_json(
                Command::new(python).args([
                    "bench/losses_peer.py",
                    "--term",
                    term,
                    "--repeats",
                    &repeats,
                ]),
                "bench/losses_peer.py",
            )?);
        }
        print_losses_table(title, &rows);
    }
    println!(
        "time ratio = peer seconds / ours (> 1: faster than PyTorch); memory ratio = our peak above inputs / the peer's (< 1: less memory)"
    );
    Ok(())
}

/// The patient's architecture (SmolLM2-135M): what a forward costs.
const LAYERS: f64 = 30.0;
const HIDDEN: f64 = 576.0;
/// Weights every token multiplies through: the decoder layers' projections (106.2M) and the
/// tied output head (49152 × 576).
const MATMUL_PARAMS: f64 = 106_168_320.0 + 28_311_552.0;

/// FLOPs of one forward over a real sequence of `len` tokens: every weight once per token
/// (2 FLOPs a multiply-add) and the attention's two `L × L` products per layer.
fn forward_flops(len: f64) -> f64 {
    2.0 * MATMUL_PARAMS * len + 4.0 * len * len * HIDDEN * LAYERS
}

/// The least FLOPs a step of the method needs on `sequences` (a batches file's step), the
/// peer's algorithm without padding: harmful `x ++ y_h` 6 forwards' worth (LAT's forward and
/// its backward to `δ`, the perturbed forward and its backward at twice a forward, the
/// teacher's forward), a refusal 3 (forward + backward); harmless `x ++ y_c` 4 (forward +
/// backward, the teacher's forward for the KL), `x ++ y_r` 3.
fn step_flops(step: &serde_json::Value) -> f64 {
    step["sequences"].as_array().map_or(0.0, |seqs| {
        seqs.iter()
            .map(|e| {
                let len = e["ids"].as_array().map_or(0, Vec::len) as f64;
                let forwards = match e["role"].as_str() {
                    Some("harmful") => 6.0,
                    Some("chosen") => 4.0,
                    _ => 3.0,
                };
                forwards * forward_flops(len)
            })
            .sum()
    })
}

/// What one bench method row measures.
struct MethodRow {
    phase: &'static str,
    /// "4×128 synthetic" or "real data, batch 4".
    work: String,
    ours: serde_json::Value,
    peer: Option<serde_json::Value>,
    /// The least FLOPs per real token of the timed steps (see [`step_flops`]).
    flops_per_token: f64,
}

/// The method's steps on the patient's architecture (random weights), both sides on the
/// same batches:
/// - synthetic: batch 4 × seq 128 on the CPU, 8 and 32 × 256 on CUDA (every row full, a
///   quarter prompt), the built-in `[train]` section (no refusal term);
/// - real: `configs/default.toml`'s `[train]` section (refusal term, LAT at 7/15/22, its
///   batch size and seed) on the default data build's examples, the batches its first steps
///   draw; the peer pads each batch to its longest row, tokens/s counts real tokens.
///
/// One process per implementation, phase and row.
fn method(args: &Args) -> anyhow::Result<()> {
    let cuda = args.device.starts_with("cuda");
    let binary = build_release("antibody-train", cuda.then_some("antibody-train/cuda"))?
        .join("antibody-train");
    let python = if args.skip_peer {
        None
    } else {
        Some(python(args.python.as_deref())?)
    };
    let data = default_data()?;
    // The limit every row is stated against: the fastest f32 GEMM either side reaches on the
    // model's shapes (CPU only).
    let limit = if cuda {
        None
    } else {
        Some(gemm(python.as_deref())?)
    };
    let shapes: &[(usize, usize)] = if cuda {
        &[(8, 256), (32, 256)]
    } else {
        &[(4, 128)]
    };
    let steps = args.repeats.max(1).to_string();
    let scratch = tempfile_dir()?;
    let mut rows = Vec::new();
    let works: Vec<Option<(usize, usize)>> = shapes
        .iter()
        .map(|&s| Some(s))
        .chain(std::iter::once(None))
        .collect();
    for work in works {
        for phase in ["harmful", "harmless"] {
            let batches = scratch.join(format!("{phase}-{}.json", rows.len()));
            let batches_s = batches.display().to_string();
            let mut ours_args: Vec<String> = vec![
                "bench".into(),
                "--phase".into(),
                phase.into(),
                "--steps".into(),
                steps.clone(),
                "--device".into(),
                args.device.clone(),
                "--batches-out".into(),
                batches_s.clone(),
            ];
            let mut peer_args: Vec<String> = vec![
                "bench/method_peer.py".into(),
                "--phase".into(),
                phase.into(),
                "--batches".into(),
                batches_s.clone(),
                "--device".into(),
                args.device.clone(),
            ];
            let label = match work {
                Some((b, t)) => {
                    ours_args.extend([
                        "--batch".into(),
                        b.to_string(),
                        "--seq".into(),
                        t.to_string(),
                    ]);
                    peer_args.extend([
                        "--batch".into(),
                        b.to_string(),
                        "--seq".into(),
                        t.to_string(),
                    ]);
                    format!("{b}×{t} synthetic")
                }
                None => {
                    ours_args.extend([
                        "--config".into(),
                        "configs/default.toml".into(),
                        "--data".into(),
                        data.display().to_string(),
                        "--lat-layers".into(),
                        "7,15,22".into(),
                    ]);
                    peer_args.extend([
                        "--lat-layers".into(),
                        "7,15,22".into(),
                        "--rho".into(),
                        "2".into(),
                    ]);
                    "default data".to_owned()
                }
            };
            eprintln!("==> antibody, {phase}, {label}, {}", args.device);
            let ours = run_json(
                Command::new(&binary).args(&ours_args),
                "antibody-train bench",
            )?;
            let peer = match &python {
                Some(py) => {
                    eprintln!("==> PyTorch peer, {phase}, {label}");
                    Some(run_json(
                        Command::new(py).args(&peer_args),
                        "bench/method_peer.py",
                    )?)
                }
                None => None,
            };
            let doc: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&batches).with_context(|| format!("reading {batches_s}"))?,
            )
            .with_context(|| format!("parsing {batches_s}"))?;
            let warmup = doc["warmup"].as_u64().unwrap_or(1) as usize;
            let timed: Vec<&serde_json::Value> = doc["steps"]
                .as_array()
                .map(|v| v.iter().skip(warmup).collect())
                .unwrap_or_default();
            let flops: f64 = timed.iter().map(|s| step_flops(s)).sum();
            let real = ours["real_tokens"].as_f64().unwrap_or(0.0);
            rows.push(MethodRow {
                phase,
                work: label,
                ours,
                peer,
                flops_per_token: if real > 0.0 { flops / real } else { 0.0 },
            });
        }
    }
    print_method_table(args, &rows, limit);
    Ok(())
}

/// The backend's f32 matmul on the patient's shapes (`antibody-model gemm`) beside
/// PyTorch's (`bench/gemm_peer.py`), in GFLOP/s and as a share of the fastest of them all:
/// what bounds every step of the method on the CPU. Returns that fastest rate, the
/// attainable f32 limit the method's rows are stated against (a measured lower bound of the
/// machine's peak; on the development machine's 2 Xeon cores with two AVX-512 FMA units
/// each at 2.6 GHz the peak is 2 × 64 × 2.6 = 333 GFLOP/s).
fn gemm(python: Option<&Path>) -> anyhow::Result<f64> {
    let binary = build_release("antibody-model", None)?.join("antibody-model");
    eprintln!("==> antibody, GEMM");
    let ours = run_json(Command::new(&binary).arg("gemm"), "antibody-model gemm")?;
    let peer = match python {
        Some(py) => {
            eprintln!("==> PyTorch peer, GEMM");
            Some(run_json(
                Command::new(py).arg("bench/gemm_peer.py"),
                "bench/gemm_peer.py",
            )?)
        }
        None => None,
    };
    let rates = |r: Option<&serde_json::Value>| -> Vec<f64> {
        r.and_then(|r| r["shapes"].as_array())
            .map(|v| v.iter().filter_map(|x| x["gflops"].as_f64()).collect())
            .unwrap_or_default()
    };
    let limit = rates(Some(&ours))
        .into_iter()
        .chain(rates(peer.as_ref()))
        .fold(0.0f64, f64::max);
    println!(
        "\nbench gemm — f32 [m, k] · [k, n], m = 512 (4 × 128 tokens), best of 10, CPU; limit = the fastest rate measured here, {limit:.0} GFLOP/s"
    );
    println!(
        "{:<28} {:>12} {:>11} {:>11} {:>8} {:>10} {:>10}",
        "shape", "k × n", "ours GF/s", "peer GF/s", "speed ×", "ours limit", "peer limit"
    );
    let shapes = ours["shapes"].as_array().cloned().unwrap_or_default();
    for (i, r) in shapes.iter().enumerate() {
        let o = r["gflops"].as_f64();
        let p = peer
            .as_ref()
            .and_then(|p| p["shapes"].get(i))
            .and_then(|x| x["gflops"].as_f64());
        let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.0}%", 100.0 * x / limit));
        println!(
            "{:<28} {:>12} {:>11} {:>11} {:>8} {:>10} {:>10}",
            r["what"].as_str().unwrap_or("?"),
            format!("{} × {}", r["k"], r["n"]),
            o.map_or("-".into(), |x| format!("{x:.1}")),
            p.map_or("-".into(), |x| format!("{x:.1}")),
            o.zip(p)
                .map_or("-".into(), |(a, b)| format!("{:.2}×", a / b)),
            pct(o),
            pct(p),
        );
    }
    anyhow::ensure!(limit > 0.0, "the GEMM bench measured no rate");
    Ok(limit)
}

fn print_method_table(args: &Args, rows: &[MethodRow], limit_gflops: Option<f64>) {
    let num = |r: &serde_json::Value, k: &str| r.get(k).and_then(serde_json::Value::as_f64);
    let gib = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.2}", x / (1u64 << 30) as f64));
    println!(
        "\nbench method — the method's steps on SmolLM2-135M's architecture, fp32, {}",
        args.device
    );
    println!(
        "{:<9} {:<17} {:>10} {:>10} {:>8} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "phase",
        "batches",
        "ours tok/s",
        "peer tok/s",
        "speed ×",
        "ours limit",
        "peer limit",
        "ours GiB",
        "peer GiB",
        "memory ×"
    );
    for r in rows {
        let (pt, pm) = (
            r.peer.as_ref().and_then(|p| num(p, "tokens_per_s")),
            r.peer.as_ref().and_then(|p| num(p, "peak_bytes")),
        );
        let ot = num(&r.ours, "tokens_per_s");
        let om = num(&r.ours, "peak_bytes");
        // The share of the f32 limit: the least FLOPs of the work done per second, over
        // the fastest GEMM rate measured (CPU only).
        let limit = |tps: Option<f64>| match (tps, limit_gflops) {
            (Some(x), Some(l)) if r.flops_per_token > 0.0 => {
                format!("{:.0}%", 100.0 * x * r.flops_per_token / (l * 1e9))
            }
            _ => "-".into(),
        };
        println!(
            "{:<9} {:<17} {:>10} {:>10} {:>8} {:>10} {:>10} {:>9} {:>9} {:>9}",
            r.phase,
            r.work,
            ot.map_or("-".into(), |x| format!("{x:.1}")),
            pt.map_or("-".into(), |x| format!("{x:.1}")),
            ot.zip(pt)
                .map_or("-".into(), |(a, b)| format!("{:.2}×", a / b)),
            limit(ot),
            limit(pt),
            gib(om),
            gib(pm),
            om.zip(pm)
                .map_or("-".into(), |(a, b)| format!("{:.2}×", a / b)),
        );
    }
    if let Some(l) = limit_gflops {
        let example = rows.first().map_or(0.0, |r| r.flops_per_token);
        println!(
            "limit = the least FLOPs of the step's work (6 forwards' worth per harmful token, 3 per refusal token, 3.5 per harmless token; {:.2} GFLOP per token on the first row) per second, over the fastest GEMM rate measured above ({l:.0} GFLOP/s): {:.0} tokens/s on the first row's work",
            example / 1e9,
            if example > 0.0 {
                l * 1e9 / example
            } else {
                0.0
            }
        );
    }
    println!(
        "speed × = our tokens/s / the peer's (goal ≥ 1.5); memory × = our peak / the peer's (goal ≤ 1); tokens = real (non-padding) tokens of every sequence a step trains on; peaks are the process's VmHWM on the CPU (model weights included), max allocated on CUDA"
    );
}

/// The default configuration's data build (`[data] out_dir`), built first when it is
/// missing or stale (`cargo xtask pipeline --stage fetch`, then `--stage data`: a no-op when
/// current).
fn default_data() -> anyhow::Result<PathBuf> {
    let config = Path::new("configs/default.toml");
    let text = std::fs::read_to_string(config).context("reading configs/default.toml")?;
    let doc: toml::Table = toml::from_str(&text).context("parsing configs/default.toml")?;
    let out = doc
        .get("data")
        .and_then(|d| d.get("out_dir"))
        .and_then(toml::Value::as_str)
        .context("configs/default.toml: [data] out_dir is missing")?;
    for stage in ["fetch", "data"] {
        crate::pipeline::run(crate::pipeline::Args {
            config: config.to_path_buf(),
            overrides: Vec::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            stage: Some(stage.into()),
            skip: Vec::new(),
            resume: None,
        })
        .with_context(|| format!("the default pipeline's {stage} stage, for the bench's data"))?;
    }
    Ok(Path::new("configs").join(out))
}

/// A fresh scratch directory for the batches files (under the target dir, kept for a look).
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let (target, _) = target_dir();
    let dir = target.join("bench-method");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn print_losses_table(title: &str, rows: &[serde_json::Value]) {
    let peer = rows.iter().find(|r| r["variant"] == "pytorch");
    let num = |r: &serde_json::Value, k: &str| r.get(k).and_then(serde_json::Value::as_f64);
    let gib = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.2}", x / (1u64 << 30) as f64));
    let above = |r: &serde_json::Value| {
        num(r, "peak_rss_bytes")
            .zip(num(r, "rss_before_bytes"))
            .map(|(p, b)| p - b)
    };
    println!(
        "\nbench losses — {title} from hidden states through the head (8 × 256 × 49152, d 576), forward + backward, CPU fp32"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>11} {:>13} {:>12} {:>12}",
        "variant", "seconds", "tok/s", "peak GiB", "above inputs", "time ratio", "memory ratio"
    );
    for r in rows {
        let secs = num(r, "seconds");
        let (tr, mr) = match peer {
            Some(p) => (
                secs.zip(num(p, "seconds"))
                    .map_or("-".into(), |(a, b)| format!("{:.2}×", b / a)),
                above(r)
                    .zip(above(p))
                    .map_or("-".into(), |(a, b)| format!("{:.2}×", a / b)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<12} {:>9} {:>9} {:>11} {:>13} {:>12} {:>12}",
            r["variant"].as_str().unwrap_or("?"),
            secs.map_or("-".into(), |s| format!("{s:.2}")),
            num(r, "tokens_per_s").map_or("-".into(), |s| format!("{s:.0}")),
            gib(num(r, "peak_rss_bytes")),
            gib(above(r)),
            tr,
            mr
        );
    }
}

/// HS-evaluation wall time: the generation part of `bench model` (64 prompts × 64 new
/// tokens; judging them takes microseconds), as seconds.
fn eval(args: &Args) -> anyhow::Result<()> {
    let (ours, peer) = model(args)?;
    let secs = |r: &serde_json::Value| {
        r.get("generate_tok_s")
            .and_then(serde_json::Value::as_f64)
            .filter(|&t| t > 0.0)
            .map(|t| 64.0 * 64.0 / t)
    };
    let (a, p) = (secs(&ours), peer.as_ref().and_then(secs));
    println!(
        "\nbench eval — HS evaluation of 64 prompts × 64 new tokens (greedy, one batch), device {}",
        args.device
    );
    println!(
        "wall time: antibody {} s, transformers {} s, speed ratio {} (goal ≥ 2×)",
        a.map_or("-".into(), |x| format!("{x:.1}")),
        p.map_or("-".into(), |x| format!("{x:.1}")),
        a.zip(p)
            .map_or("-".into(), |(a, p)| format!("{:.2}×", p / a))
    );
    Ok(())
}

/// Returns our JSON line and the peer's.
fn model(args: &Args) -> anyhow::Result<(serde_json::Value, Option<serde_json::Value>)> {
    let cuda = args.device.starts_with("cuda");
    let release = build_release("antibody-model", cuda.then_some("cuda"))?;
    let gguf = antibody_fetch::fetch(&antibody_fetch::patient())?;
    let prompts = Path::new("bench/prompts.txt");
    let repeats = args.repeats.to_string();
    let gguf_s = gguf.display().to_string();
    let binary = release.join("antibody-model");
    eprintln!("==> antibody ({})", args.device);
    let ours = run_json(
        Command::new(&binary).args([
            "bench",
            "--checkpoint",
            &gguf_s,
            "--prompts",
            "bench/prompts.txt",
            "--device",
            &args.device,
            "--repeats",
            &repeats,
        ]),
        "antibody-model bench",
    )?;
    let peer = if args.skip_peer {
        None
    } else {
        eprintln!("==> transformers peer (cpu)");
        let python = python(args.python.as_deref())?;
        Some(run_json(
            Command::new(python)
                .arg("bench/model_peer.py")
                .args(["--gguf", &gguf_s, "--repeats", &repeats])
                .arg("--prompts")
                .arg(prompts)
                .env("HF_HUB_OFFLINE", "1"),
            "bench/model_peer.py",
        )?)
    };
    println!(
        "\nbench model — SmolLM2-135M-Instruct (Q4_1 dequantized to f32), device {}",
        args.device
    );
    println!(
        "{:<42} {:>12} {:>12} {:>8}",
        "metric", "antibody", "transformers", "ratio"
    );
    for (key, label) in [
        ("forward_tok_s", "forward tokens/s (batch 4 × 256)"),
        (
            "generate_tok_s",
            "generation tokens/s (64 prompts × 64 new)",
        ),
    ] {
        let a = ours.get(key).and_then(serde_json::Value::as_f64);
        let p = peer
            .as_ref()
            .and_then(|p| p.get(key))
            .and_then(serde_json::Value::as_f64);
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let ratio = match (a, p) {
            (Some(a), Some(p)) if p > 0.0 => format!("{:.2}×", a / p),
            _ => "-".into(),
        };
        println!("{label:<42} {:>12} {:>12} {ratio:>8}", fmt(a), fmt(p));
    }
    Ok((ours, peer))
}

/// Runs `command` and parses the last line of its stdout as a JSON object.
fn run_json(command: &mut Command, what: &str) -> anyhow::Result<serde_json::Value> {
    let out = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    let last = last.with_context(|| format!("{what} printed no JSON object: {stdout}"))?;
    serde_json::from_str(last).with_context(|| format!("{what} printed bad JSON: {last}"))
}

/// The Python for the peers: `--python`, `$ANTIBODY_PYTHON`, or a virtual environment
/// under the cache root built from `bench/requirements.txt` (pinned) on first use.
fn python(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ANTIBODY_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let venv = antibody_base::cache_root().join("bench-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string("tests/reference/requirements.txt")
        .context("reading tests/reference/requirements.txt")?;
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    eprintln!(
        "==> creating the peer's Python environment in {}",
        venv.display()
    );
    let status = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .context("python3 -m venv")?;
    if !status.success() {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "-r",
            "bench/requirements.txt",
        ])
        .status()
        .context("pip install -r bench/requirements.txt")?;
    if !status.success() {
        bail!("pip install -r bench/requirements.txt failed");
    }
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(python)
}
