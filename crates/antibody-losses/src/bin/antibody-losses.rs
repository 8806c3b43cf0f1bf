//! `antibody-losses bench --variant chunked|unchunked [--term kl|logprob --batch B --seq T
//! --vocab V --hidden D --repeats N --chunk C]`: time and peak memory, on the CPU, of the
//! alignment KL (`kl`: forward direction, masked mean over positions) or of NPO on `ŝ`
//! (`logprob`), from final hidden states through the output projection, forward and backward
//! to the student's hidden states and head.
//! `unchunked` materializes both `[b, t, v]` logits and lets autodiff differentiate the
//! log-softmax chain; `chunked` is the fused head form ([`antibody_losses::head`]).
//! Prints one JSON line; run once per variant, in its own process, so the peak is its own.

use std::time::Instant;

use antibody_losses::head::{DEFAULT_VOCAB_CHUNK, HeadKl, head_kl_loss};
use antibody_losses::kl::{KlDirection, kl_per_position};
use antibody_losses::{HeadLogprob, fused_sequence_loss, masked_mean, npo, sequence_logprob};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Int, Tensor, TensorData};

type B = Autodiff<Flex>;

/// `VmHWM` (peak resident set) of this process, in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets `VmHWM` to the current resident set (Linux ≥ 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs an integer")),
    }
}

#[allow(clippy::print_stdout)]
fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("bench") {
        return Err("usage: antibody-losses bench --variant chunked|unchunked [--batch 8 --seq 256 --vocab 49152 --repeats 2 --chunk 4096]".into());
    }
    let variant = args
        .iter()
        .position(|a| a == "--variant")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "unchunked".into());
    let chunk = match variant.as_str() {
        "chunked" => Some(arg(&args, "--chunk", DEFAULT_VOCAB_CHUNK)?),
        "unchunked" => None,
        other => return Err(format!("unknown variant `{other}`: chunked or unchunked")),
    };
    let (b, t, v) = (
        arg(&args, "--batch", 8)?,
        arg(&args, "--seq", 256)?,
        arg(&args, "--vocab", 49152)?,
    );
    let d = arg(&args, "--hidden", 576)?;
    let term = args
        .iter()
        .position(|a| a == "--term")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "kl".into());
    if term != "kl" && term != "logprob" {
        return Err(format!("unknown term `{term}`: kl or logprob"));
    }
    let repeats = arg(&args, "--repeats", 2)?.max(1);
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let teacher_h = Tensor::<B, 3>::random([b, t, d], normal, &device);
    let teacher_w = Tensor::<B, 2>::random([v, d], Distribution::Normal(0.0, 0.1), &device);
    let student_h_data = Tensor::<B, 3>::random([b, t, d], normal, &device);
    let student_w_data = Tensor::<B, 2>::random([v, d], Distribution::Normal(0.0, 0.1), &device);
    let mask = Tensor::<B, 2>::ones([b, t], &device);
    let targets = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            (0..b * t)
                .map(|i| ((i * 7919) % v) as i64)
                .collect::<Vec<_>>(),
            [b, t],
        ),
        &device,
    );
    let inputs_rss = peak_rss().unwrap_or(0);
    let reset = reset_peak();
    let mut times = Vec::new();
    let mut value = 0.0f32;
    for _ in 0..repeats {
        let sh = student_h_data.clone().detach().require_grad();
        let sw = student_w_data.clone().detach().require_grad();
        let started = Instant::now();
        let reference = Tensor::<B, 1>::zeros([b], &device);
        let loss = match (term.as_str(), chunk) {
            ("logprob", Some(c)) => {
                let side = HeadLogprob::new(
                    sh.clone(),
                    sw.clone(),
                    targets.clone(),
                    mask.clone(),
                    None,
                    c,
                );
                fused_sequence_loss(&[&side], |s| {
                    npo(s[0].clone(), reference.clone(), 0.1, false)
                })
            }
            ("logprob", None) => {
                let logits = sh
                    .clone()
                    .reshape([b * t, d])
                    .matmul(sw.clone().transpose())
                    .reshape([b, t, v]);
                npo(
                    sequence_logprob(logits, targets.clone(), mask.clone()),
                    reference.clone(),
                    0.1,
                    false,
                )
            }
            (_, Some(c)) => {
                let kl = HeadKl::new(
                    teacher_h.clone(),
                    teacher_w.clone(),
                    sh.clone(),
                    sw.clone(),
                    KlDirection::Forward,
                    None,
                    c,
                );
                head_kl_loss(&kl, mask.clone())
            }
            (_, None) => {
                let logits = |h: Tensor<B, 3>, w: Tensor<B, 2>| {
                    h.reshape([b * t, d])
                        .matmul(w.transpose())
                        .reshape([b, t, v])
                };
                let teacher = logits(teacher_h.clone(), teacher_w.clone()).detach();
                let per = kl_per_position(
                    teacher,
                    logits(sh.clone(), sw.clone()),
                    KlDirection::Forward,
                );
                masked_mean(per, mask.clone())
            }
        };
        value = loss
            .clone()
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?[0];
        let grads = loss.backward();
        for g in [
            sh.grad(&grads).ok_or("no gradient")?.sum(),
            sw.grad(&grads).ok_or("no gradient")?.sum(),
        ] {
            let _sum: Vec<f32> = g.into_data().to_vec().map_err(|e| format!("{e:?}"))?;
        }
        times.push(started.elapsed().as_secs_f64());
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let tokens = (b * t) as f64;
    println!(
        "{}",
        serde_json::json!({
            "variant": variant,
            "term": term,
            "chunk": chunk,
            "shape": [b, t, v],
            "hidden": d,
            "seconds": best,
            "times": times,
            "tokens_per_s": tokens / best,
            "peak_rss_bytes": peak_rss(),
            "rss_before_bytes": inputs_rss,
            "peak_reset": reset,
            "value": value,
        })
    );
    Ok(())
}
