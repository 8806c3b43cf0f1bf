//! `cargo xtask bench <what>`: antibody and its peer (PyTorch/transformers) on the same
//! work, in one invocation, printed side by side as ratios. Benchmarks, never timed tests.
//!
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

/// The method's steps on the patient's architecture (random weights), batch 4 × seq 128 on
/// the CPU; batch 8 and 32 × seq 256 on CUDA. One process per implementation and phase.
fn method(args: &Args) -> anyhow::Result<()> {
    let cuda = args.device.starts_with("cuda");
    let binary = build_release("antibody-train", cuda.then_some("antibody-train/cuda"))?
        .join("antibody-train");
    let python = if args.skip_peer {
        None
    } else {
        Some(python(args.python.as_deref())?)
    };
    let shapes: &[(usize, usize)] = if cuda {
        &[(8, 256), (32, 256)]
    } else {
        &[(4, 128)]
    };
    let steps = args.repeats.max(1).to_string();
    let mut rows = Vec::new();
    for &(b, t) in shapes {
        for phase in ["harmful", "harmless"] {
            let (bs, ts) = (b.to_string(), t.to_string());
            eprintln!("==> antibody, {phase}, {b} × {t}, {}", args.device);
            let ours = run_json(
                Command::new(&binary).args([
                    "bench",
                    "--phase",
                    phase,
                    "--batch",
                    &bs,
                    "--seq",
                    &ts,
                    "--steps",
                    &steps,
                    "--device",
                    &args.device,
                ]),
                "antibody-train bench",
            )?;
            let peer = match &python {
                Some(py) => {
                    eprintln!("==> PyTorch peer, {phase}, {b} × {t}");
                    Some(run_json(
                        Command::new(py).args([
                            "bench/method_peer.py",
                            "--phase",
                            phase,
                            "--batch",
                            &bs,
                            "--seq",
                            &ts,
                            "--steps",
                            &steps,
                            "--device",
                            &args.device,
                        ]),
                        "bench/method_peer.py",
                    )?)
                }
                None => None,
            };
            rows.push((phase, b, t, ours, peer));
        }
    }
    let num = |r: &serde_json::Value, k: &str| r.get(k).and_then(serde_json::Value::as_f64);
    let gib = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.2}", x / (1u64 << 30) as f64));
    println!(
        "\nbench method — the method's steps on SmolLM2-135M's architecture, fp32, {} (LAT at layers 8/16/24)",
        args.device
    );
    println!(
        "{:<9} {:>9} {:>12} {:>12} {:>11} {:>11} {:>11} {:>12}",
        "phase", "shape", "ours tok/s", "peer tok/s", "speed ×", "ours GiB", "peer GiB", "memory ×"
    );
    for (phase, b, t, ours, peer) in &rows {
        let (pt, pm) = (
            peer.as_ref().and_then(|p| num(p, "tokens_per_s")),
            peer.as_ref().and_then(|p| num(p, "peak_bytes")),
        );
        let ot = num(ours, "tokens_per_s");
        let om = num(ours, "peak_bytes");
        println!(
            "{:<9} {:>9} {:>12} {:>12} {:>11} {:>11} {:>11} {:>12}",
            phase,
            format!("{b}×{t}"),
            ot.map_or("-".into(), |x| format!("{x:.0}")),
            pt.map_or("-".into(), |x| format!("{x:.0}")),
            ot.zip(pt)
                .map_or("-".into(), |(a, b)| format!("{:.2}×", a / b)),
            gib(om),
            gib(pm),
            om.zip(pm)
                .map_or("-".into(), |(a, b)| format!("{:.2}×", a / b)),
        );
    }
    println!(
        "speed × = our tokens/s / the peer's (goal ≥ 2); memory × = our peak / the peer's (goal ≤ 0.5); peaks are the process's VmHWM on the CPU (model weights included), max allocated on CUDA"
    );
    Ok(())
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
        "wall time: antibody {} s, transformers {} s, speed ratio {} (goal ≥ 3×)",
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
