//! A method run directory that explains itself, and the loop that fills it:
//!
//! ```text
//! <run_dir>/config.toml        the resolved [train] section (defaults filled in), written first
//! <run_dir>/env.json           crate versions, git revision, device, dtype, backend, threads
//! <run_dir>/train.log          the tracing log (appended by every attempt)
//! <run_dir>/teachers.json      cached teacher sequence log-probabilities (keyed by identities)
//! <run_dir>/metrics.jsonl      one line per optimizer step, appended and synced
//! <run_dir>/metrics.parquet    the same rows, rewritten atomically at every checkpoint
//! <run_dir>/canaries/cycle-N.{json,parquet}   the per-cycle canary reports
//! <run_dir>/checkpoint/        the last complete checkpoint (weights, optimizer, state)
//! <run_dir>/student/           the hardened student as a Hugging Face directory (at the end)
//! ```
//!
//! Checkpoints are written every `checkpoint_every` optimizer steps and at every phase end.
//! `resume` continues from the last complete checkpoint; the metrics of steps after it are
//! dropped and recomputed, so a resumed run's files equal an uninterrupted run's.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use antibody_base::progress::Progress;
use antibody_canary::report;
use antibody_data::{SetKind, read_set};
use antibody_finetune::checkpoint;
use antibody_model::{Llama, ModelSpec, ModelSpecExt as _, Tokenizer, save_hf_dir};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::TrainError;
use crate::config::{ConfigError, Train};
use crate::data::{MethodData, TeacherCache};
use crate::method::{Method, MethodState, Outcome};
use crate::metrics::{StepMetrics, read_metrics, write_parquet};
use crate::plan::{Event, counts, plan, steps};

/// Everything that can stop a run before or during training.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Configuration names something invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A data set could not be read.
    #[error(transparent)]
    Data(#[from] antibody_data::DataError),
    /// A model could not be loaded.
    #[error(transparent)]
    Model(#[from] antibody_model::ModelError),
    /// Writing the run directory failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    antibody_base::atomic::write_bytes(path, bytes)
        .map_err(|e| io(path, antibody_base::atomic::describe(&e)))
}

/// The environment a run ran in.
#[derive(Debug, Clone, Serialize)]
pub struct EnvRecord {
    /// antibody's version (all workspace crates share it).
    pub antibody: String,
    /// burn's version (pinned).
    pub burn: String,
    /// `git rev-parse HEAD` of the working tree, with `-dirty` when it has changes.
    pub git_revision: String,
    /// `cpu`, `cuda:N`.
    pub device: String,
    /// Parameter dtype.
    pub dtype: String,
    /// The backend type.
    pub backend: String,
    /// Threads available.
    pub threads: usize,
    /// OS and architecture.
    pub os: String,
    /// The command line.
    pub command: Vec<String>,
    /// Unix time at start.
    pub started_unix: u64,
}

fn git_revision(dir: &Path) -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match run(&["rev-parse", "HEAD"]) {
        Some(rev) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{rev}-dirty") } else { rev }
        }
        None => "unknown (not a git checkout)".into(),
    }
}

impl EnvRecord {
    /// The record for a run on `device` with backend `B`.
    pub fn new<B: AutodiffBackend>(device: &str, config_dir: &Path) -> Self {
        Self {
            antibody: env!("CARGO_PKG_VERSION").into(),
            burn: "0.21.0".into(),
            git_revision: git_revision(config_dir),
            device: device.into(),
            dtype: antibody_model::DTypeSpec::process().to_string(),
            backend: std::any::type_name::<B>().into(),
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            command: std::env::args().collect(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

fn data_digest(data: &MethodData) -> String {
    let mut h = Sha256::new();
    let mut seq = |s: &antibody_base::Example| {
        for id in &s.ids {
            h.update(id.to_le_bytes());
        }
        h.update(
            s.response_mask
                .iter()
                .map(|&b| u8::from(b))
                .collect::<Vec<u8>>(),
        );
        h.update([0xFF]);
    };
    for e in &data.harmful {
        seq(&e.harmful);
        if let Some(r) = &e.refusal {
            seq(r);
        }
    }
    for e in &data.harmless {
        seq(&e.chosen);
        seq(&e.rejected);
    }
    format!("{:x}", h.finalize())
}

/// What a finished run left.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// The hardened student (a Hugging Face directory).
    pub student: PathBuf,
}

/// How far to go (tests stop early to simulate interruptions), and what to do with a run
/// directory started under another configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Stop (without finishing) after this many events of this attempt.
    pub stop_after_events: Option<usize>,
    /// When resuming finds a run started with another configuration, start afresh (the
    /// pipeline's choice) instead of refusing.
    pub restart_if_changed: bool,
    /// Without resuming: replace a run directory that holds a run started with another
    /// configuration (refused otherwise).
    pub force: bool,
}

/// The frozen and trained models of a run, checked against each other.
struct Models<B: AutodiffBackend> {
    student: Llama<B>,
    tokenizer: Tokenizer,
    harmful_teacher: Llama<B::InnerBackend>,
    benign_teacher: Llama<B::InnerBackend>,
}

fn load_inner<B: AutodiffBackend>(
    spec: &ModelSpec,
    device: &B::Device,
) -> Result<Llama<B::InnerBackend>, RunError> {
    Ok(spec.load::<B::InnerBackend>(device)?.model)
}

/// Runs (or resumes) the method as `train` configures it on the data build in `data_dir`.
pub fn run<B: AutodiffBackend>(
    train: &Train,
    data_dir: &Path,
    device: &B::Device,
    device_name: &str,
    resume: bool,
    limits: Limits,
) -> Result<Option<RunSummary>, RunError> {
    let dir = &train.run_dir;
    let _lock =
        antibody_base::DirLock::acquire(dir, "antibody-train run").map_err(|e| io(dir, e))?;
    let resuming = open_run_dir::<B>(train, resume, limits, device_name)?;
    // Everything is checked before any training work.
    let data = read_data(train, data_dir)?;
    let models = load_models::<B>(train, device)?;
    let cache = teacher_cache(train, &data, &models)?;
    let ckpt = dir.join("checkpoint");
    let (model, optim, state) = if resuming {
        let (m, o, s): (_, _, MethodState) = checkpoint::load_all(
            &ckpt,
            models.student,
            &train.config.optim,
            train.config.optimizers(),
        )
        .map_err(TrainError::from)?;
        tracing::info!("resuming at event {} (optimizer step {})", s.cursor, s.step);
        (m, o, Some(s))
    } else {
        (models.student, Vec::new(), None)
    };
    let mut method = Method::new(
        model,
        optim,
        state,
        models.harmful_teacher,
        models.benign_teacher,
        cache,
        data,
        train.config.clone(),
    )?;
    if !drive(train, &mut method, limits)? {
        return Ok(None);
    }
    let student_dir = dir.join("student");
    save_hf_dir(&method.model.valid(), &models.tokenizer, &student_dir)?;
    tracing::info!(
        "done: {} optimizer steps; student in {}",
        method.state.step,
        student_dir.display()
    );
    Ok(Some(RunSummary {
        run_dir: dir.clone(),
        steps: method.state.step,
        student: student_dir,
    }))
}

/// Creates or reopens the run directory; returns whether the run resumes from a checkpoint.
/// A fresh run writes `config.toml` (the resolved section) and `env.json` first; a resumed one
/// must have been started with the same resolved section.
fn open_run_dir<B: AutodiffBackend>(
    train: &Train,
    resume: bool,
    limits: Limits,
    device_name: &str,
) -> Result<bool, RunError> {
    let dir = &train.run_dir;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let resolved = toml::to_string(&toml::Table::from_iter([(
        "train".to_owned(),
        toml::Value::try_from(&train.config).map_err(|e| io(dir, e))?,
    )]))
    .map_err(|e| io(dir, e))?;
    let config_path = dir.join("config.toml");
    let mut resuming = resume && checkpoint::exists(&dir.join("checkpoint"));
    let before = std::fs::read_to_string(&config_path).unwrap_or_default();
    if resuming && limits.restart_if_changed && before != resolved {
        tracing::info!(
            "{}: the configuration changed since this run started: starting afresh",
            dir.display()
        );
        for sub in ["checkpoint", "student", "canaries", "teachers.json"] {
            let p = dir.join(sub);
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
        resuming = false;
    }
    if resuming {
        if before != resolved {
            return Err(train
                .error(
                    "(section)",
                    format!(
                        "differs from the configuration {} was started with; resume with the \
                         same configuration or start a new run directory",
                        config_path.display()
                    ),
                )
                .into());
        }
        return Ok(true);
    }
    // A directory that holds training (a checkpoint or a student) started under another
    // configuration is not replaced unless asked; one whose run stopped before any step is.
    let trained = checkpoint::exists(&dir.join("checkpoint")) || dir.join("student").exists();
    if trained && before != resolved && !limits.force {
        return Err(train
            .error(
                "(section)",
                format!(
                    "{} holds a run started with another configuration ({}); continue it with \
                     --resume, choose another run directory, or replace it with --force",
                    dir.display(),
                    differences(&before, &resolved)
                ),
            )
            .into());
    }
    write_atomic(&config_path, resolved.as_bytes())?;
    let config_dir = train.file.parent().unwrap_or(Path::new("."));
    let env = EnvRecord::new::<B>(device_name, config_dir);
    write_atomic(
        &dir.join("env.json"),
        &serde_json::to_vec_pretty(&env).map_err(|e| io(dir, e))?,
    )?;
    write_atomic(&dir.join("metrics.jsonl"), b"")?;
    let _ = std::fs::remove_file(dir.join("metrics.parquet"));
    let _ = std::fs::remove_dir_all(dir.join("canaries"));
    Ok(false)
}

/// The method's examples of the data build; a phase with steps and no examples is refused,
/// naming the set file.
fn read_data(train: &Train, data_dir: &Path) -> Result<MethodData, RunError> {
    let cfg = &train.config;
    let harmful = read_set(data_dir, SetKind::HarmfulTrain)?;
    let harmless = read_set(data_dir, SetKind::HarmlessTrain)?;
    let data = MethodData::from_records(&harmful.records, &harmless.records);
    let set_file = |k: SetKind| data_dir.join(k.file_name()).display().to_string();
    if data.harmful.is_empty() && cfg.harmful_steps > 0 {
        let file = set_file(SetKind::HarmfulTrain);
        return Err(train
            .error(
                "harmful_steps",
                format!("{file} has no example with a harmful response y_h"),
            )
            .into());
    }
    if data.harmless.is_empty() && cfg.harmless_steps > 0 {
        let file = set_file(SetKind::HarmlessTrain);
        return Err(train
            .error(
                "harmless_steps",
                format!("{file} has no example with both y_c and y_r"),
            )
            .into());
    }
    Ok(data)
}

/// The student (trainable) and both teachers (inner backend), which must share the
/// student's vocabulary and hidden size; the LAT layers must exist.
fn load_models<B: AutodiffBackend>(
    train: &Train,
    device: &B::Device,
) -> Result<Models<B>, RunError> {
    let loaded = train.student.load::<B>(device)?;
    let student = loaded.model;
    train
        .config
        .lat
        .sites(student.config.num_layers)
        .map_err(|e| train.error("lat.layers", e.to_string()))?;
    let harmful_teacher = load_inner::<B>(&train.harmful_teacher, device)?;
    let benign_teacher = load_inner::<B>(&train.benign_teacher, device)?;
    for (key, t) in [
        ("harmful_teacher", &harmful_teacher),
        ("benign_teacher", &benign_teacher),
    ] {
        let (s, t) = (&student.config, &t.config);
        if t.vocab_size != s.vocab_size || t.hidden_size != s.hidden_size {
            return Err(train
                .error(
                    key,
                    format!(
                        "vocabulary {} / hidden size {} differ from the student's {} / {}: \
                         teachers and student must share one tokenizer and vocabulary",
                        t.vocab_size, t.hidden_size, s.vocab_size, s.hidden_size
                    ),
                )
                .into());
        }
    }
    Ok(Models {
        student,
        tokenizer: loaded.tokenizer,
        harmful_teacher,
        benign_teacher,
    })
}

/// The teachers' sequence log-probabilities: kept beside the run (`teachers.json`) and
/// content-addressed in `<cache>/teachers/`, so that the runs of a sweep over the method's
/// settings (same teachers, student and data) compute them once. The cache holds the
/// examples the plan reads, so the plan's draw is part of the key.
fn teacher_cache<B: AutodiffBackend>(
    train: &Train,
    data: &MethodData,
    models: &Models<B>,
) -> Result<TeacherCache, RunError> {
    let cfg = &train.config;
    let key = format!(
        "{}|{}|{}|{}|{:?}|{}|{:?}",
        train.harmful_teacher.identity()?,
        train.benign_teacher.identity()?,
        train.student.identity()?,
        data_digest(data),
        (
            cfg.adv.npo_reference,
            cfg.adv.rho > 0.0,
            cfg.adv.refusal,
            cfg.align.pref
        ),
        cfg.vocab_chunk,
        (cfg.seed, cfg.batch_size, counts(&plan(cfg))),
    );
    let cache_path = train.run_dir.join("teachers.json");
    let shared_path = antibody_base::cache_root()
        .join("teachers")
        .join(format!("{:x}.json", Sha256::digest(key.as_bytes())));
    let read = |p: &Path| -> Option<TeacherCache> {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|c: &TeacherCache| c.key == key)
    };
    if let Some(c) = read(&cache_path) {
        return Ok(c);
    }
    let c = match read(&shared_path) {
        Some(c) => {
            tracing::info!("teachers: reused {}", shared_path.display());
            c
        }
        None => {
            tracing::info!(
                "teachers: sequence log-probabilities of the training examples the plan reads"
            );
            let c = TeacherCache::compute(
                key.clone(),
                &models.harmful_teacher,
                &models.benign_teacher,
                &models.student.valid(),
                data,
                cfg,
            )?;
            write_json(&shared_path, &c)?;
            c
        }
    };
    write_json(&cache_path, &c)?;
    Ok(c)
}

/// Runs the plan's events from where `method` stands, appending each step's metrics and
/// writing the canary reports; checkpoints every `checkpoint_every` steps and at every phase
/// end. Returns whether the plan is done (`false`: stopped early by `limits`).
fn drive<B: AutodiffBackend>(
    train: &Train,
    method: &mut Method<B>,
    limits: Limits,
) -> Result<bool, RunError> {
    let dir = &train.run_dir;
    let ckpt = dir.join("checkpoint");
    let metrics_path = dir.join("metrics.jsonl");
    let mut rows =
        read_metrics(&metrics_path, method.state.step).map_err(|e| io(&metrics_path, e))?;
    let kept: Vec<u8> = rows
        .iter()
        .filter_map(|r| serde_json::to_string(r).ok())
        .flat_map(|l| (l + "\n").into_bytes())
        .collect();
    write_atomic(&metrics_path, &kept)?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| io(&metrics_path, e))?;
    let mut progress = Progress::new("train", method.state.step, steps(method.plan()));
    let save = |method: &Method<B>, rows: &[StepMetrics]| -> Result<(), RunError> {
        checkpoint::save_all(&ckpt, &method.model, &method.optimizers(), &method.state)
            .map_err(TrainError::from)?;
        let parquet = dir.join("metrics.parquet");
        write_parquet(&parquet, rows).map_err(|e| io(&parquet, e))
    };
    let mut events = 0usize;
    while let Some((event, outcome)) = method.advance()? {
        events += 1;
        match outcome {
            Outcome::Step(m) => {
                let line = serde_json::to_string(&*m).map_err(|e| io(&metrics_path, e))?;
                writeln!(metrics, "{line}")
                    .and_then(|()| metrics.sync_data())
                    .map_err(|e| io(&metrics_path, e))?;
                progress.inc(1, &step_note(&m));
                rows.push(*m);
            }
            Outcome::Canaries {
                cycle,
                pre,
                post,
                set,
            } => write_canaries(train, cycle, &pre, &post, &set)?,
            Outcome::Baseline => {}
        }
        let phase_end = match (event, method.next_event()) {
            (_, None) => true,
            (Event::Harmful { .. }, Some(next)) => !matches!(next, Event::Harmful { .. }),
            (Event::Harmless { .. }, Some(next)) => !matches!(next, Event::Harmless { .. }),
            (Event::Canaries { .. }, _) => true,
            _ => false,
        };
        let due = event.is_step()
            && method
                .state
                .step
                .is_multiple_of(train.config.checkpoint_every);
        if phase_end || due {
            save(method, &rows)?;
        }
        if limits.stop_after_events.is_some_and(|n| events >= n) && !method.done() {
            return Ok(false);
        }
    }
    save(method, &rows)?;
    Ok(true)
}

/// The progress line's note of a step.
fn step_note(m: &StepMetrics) -> String {
    let note = match (m.harmful_logp, m.dpo_margin) {
        (Some(lp), _) => format!(
            "{} loss {:.4} log p(y_h) {lp:.3} cap {:.2}",
            m.phase,
            m.loss,
            m.kl_cap_rate.unwrap_or(0.0)
        ),
        (_, Some(margin)) => format!("{} loss {:.4} DPO margin {margin:.3}", m.phase, m.loss),
        _ => format!("{} loss {:.4}", m.phase, m.loss),
    };
    format!("{note} ({:.0} tok/s)", m.tokens_per_s)
}

/// The per-cycle canary report (`canaries/cycle-N.{json,parquet}`).
fn write_canaries(
    train: &Train,
    cycle: usize,
    pre: &antibody_canary::Activations,
    post: &antibody_canary::Activations,
    set: &antibody_canary::CanarySet,
) -> Result<(), RunError> {
    let dir = train.run_dir.join("canaries");
    let drift = train.config.canary.drift.drift(pre, post);
    let bins = train.config.canary.histogram_bins;
    let summary = report::summarize(Some(cycle), pre, post, &drift, set, bins);
    let table = report::table(pre, post, &drift, set).map_err(|e| io(&dir, e))?;
    report::write(&dir, &format!("cycle-{cycle}"), &summary, table).map_err(|e| io(&dir, e))?;
    tracing::info!(
        "cycle {cycle}: {} canaries (drift > {:.4}), by layer {:?}",
        set.count(),
        set.threshold,
        set.by_layer()
    );
    Ok(())
}

/// The keys whose values differ between two resolved sections (at most five named).
fn differences(before: &str, now: &str) -> String {
    fn flat(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flat(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let parse = |s: &str| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(t) = toml::from_str::<toml::Table>(s) {
            flat("", &toml::Value::Table(t), &mut out);
        }
        out
    };
    let (a, b) = (parse(before), parse(now));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let none = "(unset)".to_owned();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} -> {}",
                a.get(k).unwrap_or(&none),
                b.get(k).unwrap_or(&none)
            )
        })
        .collect();
    let shown = diffs.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    match diffs.len() {
        0 => "unreadable config.toml".into(),
        n if n > 5 => format!("{shown}, and {} more", n - 5),
        _ => shown,
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), RunError> {
    write_atomic(path, &serde_json::to_vec(value).map_err(|e| io(path, e))?)
}
