//! Losing nothing: an `antibody-finetune sft` child process killed with SIGKILL at a varying
//! step, then resumed with `--resume`, ends with weights bit-identical to an uninterrupted
//! run's (tiny model, CPU backend; on a GPU backend, whose autotuned kernels are chosen per
//! process, identical to rounding).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use antibody_model::device::Cpu;
use antibody_model::{Llama, LlamaConfig, tiny};
use antibody_testkit::{kill_when, smoke_data, varying_step};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};

const STEPS: usize = 12;

/// `antibody-finetune sft` of the tiny model on the smoke data's `(x, y_h)`.
fn sft_command(data: &Path, run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_antibody-finetune"));
    c.args(["sft", "--set", "harmful_train", "--response", "y_h"])
        .args([
            "--model",
            "tiny:0",
            "--device",
            antibody_testkit::TEST_DEVICE,
        ])
        .arg("--data")
        .arg(data)
        .arg("--run-dir")
        .arg(run_dir)
        .env("RUST_LOG", "warn");
    c
}

fn train(data: &Path, run_dir: &Path, resume: bool) -> Command {
    let mut c = sft_command(data, run_dir);
    c.args([
        "--steps",
        &STEPS.to_string(),
        "--batch-size",
        "4",
        "--accumulation",
        "2",
    ])
    .args([
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--max-grad-norm",
        "1.0",
        "--seed",
        "3",
    ])
    .args(["--checkpoint-every", "1"]);
    if resume {
        c.arg("--resume");
    }
    c
}

fn steps_logged(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn weights(run_dir: &Path) -> Vec<u32> {
    let template = tiny::random_model::<Cpu>(&LlamaConfig::tiny_test(), 42, &Default::default())
        .expect("model");
    let model: Llama<Cpu> = template
        .load_file(
            run_dir.join("final").join("model"),
            &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            &Default::default(),
        )
        .expect("final weights");
    let mut bits = Vec::new();
    let mut tensors = vec![model.head_weight()];
    for layer in &model.model.layers {
        tensors.push(layer.mlp.down_proj.weight.val());
        tensors.push(layer.self_attn.q_proj.weight.val());
    }
    for t in tensors {
        bits.extend(
            t.into_data()
                .to_vec::<f32>()
                .expect("f32")
                .iter()
                .map(|x| x.to_bits()),
        );
    }
    bits
}

#[test]
fn sigkill_then_resume_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());

    let straight = dir.path().join("straight");
    let status = train(&data, &straight, false).status().expect("spawn");
    assert!(status.success(), "uninterrupted run failed");
    assert_eq!(steps_logged(&straight), STEPS);

    // Kill after a step that varies from run to run (2..=6).
    let killed = dir.path().join("killed");
    let at_kill = kill_when(
        train(&data, &killed, false),
        varying_step(2, 5),
        Duration::from_secs(120),
        || steps_logged(&killed),
    );
    assert!(
        !killed.join("final").exists(),
        "the child finished before the kill"
    );
    assert!(at_kill < STEPS, "killed after {at_kill} of {STEPS} steps");

    let status = train(&data, &killed, true).status().expect("spawn");
    assert!(status.success(), "resumed run failed");
    assert_eq!(steps_logged(&killed), STEPS, "metrics after resume");
    let (a, b) = (weights(&straight), weights(&killed));
    if antibody_testkit::TEST_DEVICE == "cpu" {
        assert_eq!(a, b, "killed at step {at_kill} and resumed: weights differ");
    } else {
        // A GPU backend picks its kernels by timing them (CubeCL's autotune, per process and
        // per cache) and some candidates sum with atomics, so two processes agree to rounding,
        // not bit for bit (lavapipe: 1e-7 after 12 steps); what is lost or repeated by a
        // kill would move the weights by about the learning rate (3e-3) per step.
        let to_f32 = |v: &[u32]| v.iter().map(|&x| f32::from_bits(x)).collect::<Vec<_>>();
        let diff = antibody_testkit::max_abs_diff(&to_f32(&a), &to_f32(&b));
        assert!(
            diff <= 1e-5,
            "killed at step {at_kill} and resumed: weights differ by {diff}"
        );
    }
}

/// `antibody-finetune sft` on the smoke data with `args` (steps, lr, ...).
fn sft(data: &Path, run_dir: &Path, args: &[&str]) -> (bool, String) {
    let out = sft_command(data, run_dir)
        .args(args)
        .output()
        .expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flags_are_checked_in_one_place_and_a_run_is_not_replaced_silently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let run_dir = dir.path().join("run");
    for (bad, flag) in [
        (["--steps=2", "--lr=-1"], "--lr"),
        (["--steps=2", "--lr=nan"], "--lr"),
        (["--steps=2", "--batch-size=0"], "--batch-size"),
        (["--steps=0", "--lr=1e-3"], "--steps"),
    ] {
        let (ok, err) = sft(&data, &run_dir, &bad);
        assert!(!ok, "{bad:?} accepted");
        assert!(
            err.contains(&format!("`{flag}` (command line)")),
            "{bad:?}: {err}"
        );
    }
    let (ok, err) = sft(&data, &run_dir, &["--steps", "2"]);
    assert!(ok, "{err}");
    // The same directory with other arguments and without --resume: refused.
    let (ok, err) = sft(&data, &run_dir, &["--steps", "3"]);
    assert!(
        !ok && err.contains("other arguments") && err.contains("--force"),
        "{err}"
    );
    let (ok, err) = sft(&data, &run_dir, &["--steps", "3", "--force"]);
    assert!(ok, "{err}");
}
