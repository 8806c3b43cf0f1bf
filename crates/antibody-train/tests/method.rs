//! The method's run on the tiny model and the smoke data: a SIGKILLed `antibody-train run`
//! resumes to the uninterrupted run's weights bit for bit; one seed gives one run; gradient
//! accumulation gives the whole batch's step; bad configuration is refused before any work
//! with the file and key named.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use antibody_data::{Dataset, SetKind};
use antibody_model::device::{Cpu, CpuAutodiff};
use antibody_model::{LlamaConfig, ModelSpec, ModelSpecExt as _, save_hf_dir, tiny};
use antibody_testkit::{configs, kill_when, smoke_data, varying_step};
use antibody_train::config::Train;
use antibody_train::metrics::{StepMetrics, read_metrics};
use antibody_train::run::{Limits, RunError, run};

fn train_config(overrides: &[&str], run_dir: &Path) -> Train {
    let overrides: Vec<String> = overrides.iter().map(|s| (*s).to_owned()).collect();
    let mut t = Train::load(&configs().join("smoke.toml"), &overrides).expect("train config");
    t.run_dir = run_dir.to_path_buf();
    t
}

fn run_in_process(train: &Train, data: &Path) -> Result<(), RunError> {
    run::<CpuAutodiff>(
        train,
        data,
        &Default::default(),
        "cpu",
        false,
        Limits::default(),
    )
    .map(|_| ())
}

/// Every weight of the student's Hugging Face directory, as bits.
fn student_bytes(run_dir: &Path) -> Vec<u32> {
    let bytes = std::fs::read(run_dir.join("student/model.safetensors")).expect("weights");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names = tensors.names();
    names.sort();
    names
        .into_iter()
        .flat_map(|n| {
            let t = tensors.tensor(n).expect("tensor");
            t.data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn student_values(run_dir: &Path) -> Vec<f32> {
    let m = ModelSpec::Path(run_dir.join("student"))
        .load::<Cpu>(&Default::default())
        .expect("student loads as a model path")
        .model;
    let mut out: Vec<f32> = m.head_weight().into_data().to_vec().expect("f32");
    for layer in &m.model.layers {
        out.extend(
            layer
                .mlp
                .down_proj
                .weight
                .val()
                .into_data()
                .to_vec::<f32>()
                .expect("f32"),
        );
    }
    out
}

/// Metrics without the wall-clock fields.
fn losses(run_dir: &Path) -> Vec<StepMetrics> {
    read_metrics(&run_dir.join("metrics.jsonl"), usize::MAX)
        .expect("metrics")
        .into_iter()
        .map(|m| StepMetrics {
            seconds: 0.0,
            tokens_per_s: 0.0,
            ..m
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    antibody_fetch::sha256_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn steps_logged(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn child(data: &Path, run_dir: &Path, resume: bool) -> Command {
    child_with(data, run_dir, resume, &[])
}

fn child_with(data: &Path, run_dir: &Path, resume: bool, sets: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_antibody-train"));
    c.arg("run");
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.arg("--config")
        .arg(configs().join("smoke.toml"))
        .arg("--data")
        .arg(data)
        .arg("--run-dir")
        .arg(run_dir)
        .env("RUST_LOG", "warn");
    if resume {
        c.arg("--resume");
    }
    c
}

#[test]
fn sigkill_mid_run_then_resume_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    // Kill after a step that varies from run to run (1..=6): in either phase, before or
    // after a canary selection.
    let (straight, killed, at_kill) =
        run_kill_resume(dir.path(), &data, &[], varying_step(1, 6), |_| {});
    let total = steps_logged(&straight);
    assert_eq!(total, 8, "2 cycles x (2 harmful + 2 harmless)");
    assert_same_run(&straight, &killed, at_kill);
    for f in ["canaries/cycle-0.json", "canaries/cycle-1.json"] {
        assert_eq!(
            std::fs::read(straight.join(f)).expect("report"),
            std::fs::read(killed.join(f)).expect("report"),
            "{f}"
        );
    }
}

/// With one AdamW per phase the checkpoint holds both: killed after cycle 0's harmless phase
/// (4 steps), the resumed run's cycle-1 harmless steps continue that phase's moments.
#[test]
fn per_phase_optimizers_survive_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let sets = ["train.optimizer_state=\"per_phase\""];
    let (straight, killed, at_kill) = run_kill_resume(dir.path(), &data, &sets, 4, |killed| {
        assert!(
            killed.join("checkpoint/optimizer.1.mpk").is_file(),
            "the harmless phase's moments are in the checkpoint"
        );
    });
    assert_same_run(&straight, &killed, at_kill);
}

/// The killed-and-resumed run logged the same losses and wrote the same student as the
/// uninterrupted one.
fn assert_same_run(straight: &Path, killed: &Path, at_kill: usize) {
    assert_eq!(
        losses(straight),
        losses(killed),
        "killed after step {at_kill}: the metrics differ"
    );
    assert!(
        student_bytes(straight) == student_bytes(killed),
        "killed after step {at_kill} and resumed: weights differ"
    );
}

/// An uninterrupted run and one SIGKILLed after `at` logged steps, then resumed (`check`
/// looks at the killed run's directory before the resume); returns both directories and the
/// steps logged at the kill.
fn run_kill_resume(
    dir: &Path,
    data: &Path,
    sets: &[&str],
    at: usize,
    check: impl Fn(&Path),
) -> (PathBuf, PathBuf, usize) {
    let straight = dir.join("straight");
    assert!(
        child_with(data, &straight, false, sets)
            .status()
            .expect("spawn")
            .success()
    );
    let killed = dir.join("killed");
    let at_kill = kill_when(
        child_with(data, &killed, false, sets),
        at,
        Duration::from_secs(180),
        || steps_logged(&killed),
    );
    assert!(!killed.join("student").exists(), "finished before the kill");
    check(&killed);
    assert!(
        child_with(data, &killed, true, sets)
            .status()
            .expect("spawn")
            .success()
    );
    (straight, killed, at_kill)
}

#[test]
fn one_seed_gives_one_run_and_the_run_moves_the_way_the_method_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let c = dir.path().join("c");
    // Batches of the whole (12-example) sets, so successive steps see the same examples.
    let quick = [
        "cycles=1",
        "harmful_steps=3",
        "harmless_steps=3",
        "batch_size=12",
    ];
    run_in_process(&train_config(&quick, &a), &data).expect("run a");
    run_in_process(&train_config(&quick, &b), &data).expect("run b");
    let mut other = quick.to_vec();
    other.push("seed=12");
    run_in_process(&train_config(&other, &c), &data).expect("run c");
    assert_eq!(losses(&a), losses(&b));
    assert!(
        student_bytes(&a) == student_bytes(&b),
        "same seed, other weights"
    );
    // The same bytes, too: artefacts name models by their files' digests.
    for f in [
        "student/model.safetensors",
        "student/config.json",
        "student/tokenizer.json",
        "student/tokenizer_config.json",
        "teachers.json",
        "canaries/cycle-0.json",
        "canaries/cycle-0.parquet",
        "config.toml",
    ] {
        assert_eq!(
            sha256(&a.join(f)),
            sha256(&b.join(f)),
            "{f} differs between two identical runs"
        );
    }
    assert_ne!(losses(&a), losses(&c), "another seed, same run");

    // Every term the configuration asks for is recorded, and the canaries were in force.
    let rows = losses(&a);
    let (h, l): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.phase == "harmful");
    assert_eq!((h.len(), l.len()), (3, 3));
    for r in &h {
        assert!(
            r.forget.is_some() && r.kl_imm.is_some() && r.refusal.is_some(),
            "{r:?}"
        );
        assert!(
            r.lat_loss_start.is_some() && r.harmful_logp.is_some(),
            "{r:?}"
        );
        assert!(
            r.kl_imm.is_some_and(|k| k <= 0.0),
            "immunization KL is −min(KL, cap)"
        );
    }
    for r in &l {
        assert!(
            r.pref.is_some() && r.kl_align.is_some() && r.stab.is_some(),
            "{r:?}"
        );
        assert!(r.canaries > 0, "{r:?}");
    }
    // NPO pushes the harmful response down; DPO pushes the margin up.
    assert!(
        h[2].harmful_logp < h[0].harmful_logp,
        "log p(y_h): {:?}",
        h.iter().map(|r| r.harmful_logp).collect::<Vec<_>>()
    );
    assert!(
        l[2].dpo_margin > l[0].dpo_margin,
        "DPO margin: {:?}",
        l.iter().map(|r| r.dpo_margin).collect::<Vec<_>>()
    );
    // The metrics table has one row per step.
    let parquet = std::fs::metadata(a.join("metrics.parquet")).expect("metrics.parquet");
    assert!(parquet.len() > 0);
}

#[test]
fn accumulation_gives_the_whole_batch_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    // Canaries off: the MSE of a batch mean is not a sum over micro-batches.
    let base = [
        "cycles=1",
        "harmful_steps=2",
        "harmless_steps=2",
        "canary.enabled=false",
        "optim.max_grad_norm=100.0",
    ];
    let whole = dir.path().join("whole");
    let split = dir.path().join("split");
    let mut one = base.to_vec();
    one.push("optim.accumulation=1");
    let mut four = base.to_vec();
    four.push("optim.accumulation=4");
    run_in_process(&train_config(&one, &whole), &data).expect("whole batch");
    run_in_process(&train_config(&four, &split), &data).expect("accumulated");
    for (x, y) in losses(&whole).iter().zip(losses(&split)) {
        assert!(
            (x.loss - y.loss).abs() < 1e-4,
            "step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert!(
            (x.grad_norm - y.grad_norm).abs() < 1e-4 * x.grad_norm.max(1.0),
            "step {}: grad norm {} vs {}",
            x.step,
            x.grad_norm,
            y.grad_norm
        );
    }
    let (a, b) = (student_values(&whole), student_values(&split));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "weights differ by up to {worst}");
}

fn refused(overrides: &[&str], data: &Path, run_dir: &Path) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| (*s).to_owned()).collect();
    match Train::load(&configs().join("smoke.toml"), &overrides) {
        Err(e) => e.to_string(),
        Ok(mut t) => {
            t.run_dir = run_dir.to_path_buf();
            match run_in_process(&t, data) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("{overrides:?} was accepted"),
            }
        }
    }
}

#[test]
fn bad_configuration_is_refused_before_any_work_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let run_dir = dir.path().join("run");
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["lat.epsilonn=1.0"],
            &["smoke.toml", "train.lat", "epsilonn"],
        ),
        (
            &["batch_size=\"four\""],
            &["smoke.toml", "train.batch_size"],
        ),
        (
            &["lat.layers=[1, 9]"],
            &["smoke.toml", "train.lat.layers", "layer 9"],
        ),
        (&["canary.q=1.5"], &["smoke.toml", "train.canary.q"]),
        (&["optim.accumulation=8"], &["train.optim.accumulation"]),
        (&["student=tiny:x"], &["train.student", "tiny:"]),
    ];
    for (overrides, needles) in cases {
        let err = refused(overrides, &data, &run_dir);
        for n in needles {
            assert!(err.contains(n), "{overrides:?}: `{n}` not in: {err}");
        }
        assert!(
            !run_dir.join("checkpoint").exists(),
            "{overrides:?}: work started"
        );
    }

    // A teacher with another vocabulary.
    let mut small = LlamaConfig::tiny_test();
    small.vocab_size = 4096;
    let other = dir.path().join("other-vocab");
    let model = tiny::random_model::<Cpu>(&small, 3, &Default::default()).expect("model");
    let tokenizer = antibody_model::spec::patient_tokenizer().expect("tokenizer");
    save_hf_dir(&model, &tokenizer, &other).expect("save");
    let teacher = format!("harmful_teacher=\"{}\"", other.display());
    let err = refused(&[&teacher], &data, &run_dir);
    assert!(
        err.contains("train.harmful_teacher") && err.contains("4096") && err.contains("vocabulary"),
        "{err}"
    );

    // An empty training set.
    let empty = dir.path().join("empty-data");
    std::fs::create_dir_all(&empty).expect("dir");
    for kind in [SetKind::HarmfulTrain, SetKind::HarmlessTrain] {
        std::fs::copy(data.join(kind.file_name()), empty.join(kind.file_name())).expect("copy");
    }
    Dataset {
        kind: SetKind::HarmfulTrain,
        records: Vec::new(),
    }
    .write_parquet(&empty.join(SetKind::HarmfulTrain.file_name()))
    .expect("write empty set");
    let err = refused(&[], &empty, &run_dir);
    assert!(err.contains("harmful_train"), "{err}");
    assert!(
        !run_dir.join("checkpoint").exists(),
        "work started on an empty set"
    );
}

#[test]
fn a_finished_run_is_not_replaced_silently_and_a_full_disk_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let run_dir = dir.path().join("run");
    let quick = ["cycles=1", "harmful_steps=1", "harmless_steps=1"];
    run_in_process(&train_config(&quick, &run_dir), &data).expect("first run");
    let student = sha256(&run_dir.join("student/model.safetensors"));

    // Another learning rate into the same directory, without --resume: refused, naming
    // the key that differs; the finished run is untouched.
    let mut other = quick.to_vec();
    other.push("optim.lr=2e-3");
    let err = run_in_process(&train_config(&other, &run_dir), &data)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("another configuration")
            && err.contains("optim.lr")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(sha256(&run_dir.join("student/model.safetensors")), student);

    // A value set by --set that fails a check is attributed to the --set.
    let err = Train::load(&configs().join("smoke.toml"), &["optim.lr=-1".into()])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("--set optim.lr=-1") && err.contains("train.optim.lr"),
        "{err}"
    );

    // A full disk while checkpointing: the error says so and names the checkpoint; the
    // finished run's checkpoint and student stay as they were.
    let checkpoint = std::fs::read(run_dir.join("checkpoint/model.mpk")).expect("checkpoint");
    let out = child(&data, &run_dir, true)
        .args(quick.iter().flat_map(|o| ["--set", o]))
        .env("ANTIBODY_FAULT_DISK_FULL", "checkpoint")
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a full disk went unnoticed");
    assert!(
        stderr.contains("the disk is full") && stderr.contains("checkpoint"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(run_dir.join("checkpoint/model.mpk")).expect("checkpoint"),
        checkpoint
    );
    assert_eq!(sha256(&run_dir.join("student/model.safetensors")), student);

    // With --force the directory is replaced.
    run::<CpuAutodiff>(
        &train_config(&other, &run_dir),
        &data,
        &Default::default(),
        "cpu",
        false,
        Limits {
            force: true,
            ..Limits::default()
        },
    )
    .expect("forced");
    assert_ne!(sha256(&run_dir.join("student/model.safetensors")), student);
}
