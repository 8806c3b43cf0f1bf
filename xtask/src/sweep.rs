//! `cargo xtask sweep`: the pipeline once per setting of a search, and one results table.
//!
//! A sweep file names runs, each a list of `--set` overrides of one base configuration:
//!
//! ```toml
//! config = "../default.toml"      # the base configuration (relative to the sweep file)
//! out_dir = "../../runs/sweep"     # where the runs go (relative to the sweep file)
//! set = ["eval.harmful_prompts=96"]  # overrides every run shares (before its own)
//! [[run]]
//! name = "lr1e-4"
//! set = ["train.optim.lr=1e-4"]
//! note = "why this run"
//! ```
//!
//! Each run is `cargo xtask pipeline --config BASE --set ...` with its training run in
//! `<out_dir>/<name>/train` and its evaluation in `<out_dir>/<name>/eval`; the evaluated model
//! that is the configuration's trained student becomes this run's student. Data and teachers
//! are shared (their stamps live beside the data), the teachers' log-probabilities and the
//! evaluations of unchanged models are reused from the cache, so a run costs its training
//! and the evaluation of its student. A run that fails is recorded with its error and the
//! sweep goes on (and exits with an error naming the failed runs at the end). After every run `<out_dir>/results.{md,json}` is rewritten (atomically)
//! from the runs' `report.json`: every run, failures included, beside the reference models.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Arguments of `cargo xtask sweep`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The sweep file.
    #[arg(long, default_value = "configs/sweeps/cpu.toml")]
    sweep: PathBuf,
    /// The base configuration every run overrides (default: the sweep file's `config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run only these runs (by name; repeatable). The table still lists every finished run.
    #[arg(long)]
    only: Vec<String>,
    /// Device for every stage: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Rewrite the results table from the finished runs; run nothing.
    #[arg(long)]
    table_only: bool,
}

/// A sweep file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    /// The base configuration (relative to the sweep file).
    config: PathBuf,
    /// Where the runs go (relative to the sweep file).
    out_dir: PathBuf,
    /// `section.key=value` overrides every run shares, applied before the run's own (a
    /// search's evaluation settings, its reference models).
    #[serde(default)]
    set: Vec<String>,
    /// The runs, in order.
    run: Vec<RunSpec>,
}

/// One run of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSpec {
    /// Its name (a directory name).
    name: String,
    /// `section.key=value` overrides of the base configuration.
    #[serde(default)]
    set: Vec<String>,
    /// What the run tests.
    #[serde(default)]
    note: String,
}

/// How a run ended, as recorded in `<out_dir>/<name>/status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Status {
    ok: bool,
    error: Option<String>,
    minutes: f64,
    set: Vec<String>,
}

fn load_sweep(path: &Path) -> anyhow::Result<SweepFile> {
    let table = antibody_base::config::read_table(path)?;
    let sweep: SweepFile = antibody_base::config::deserialize(path, "", toml::Value::Table(table))?;
    let mut seen = std::collections::BTreeSet::new();
    for (i, r) in sweep.run.iter().enumerate() {
        let ok = !r.name.is_empty()
            && r.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            bail!(
                "{}: run[{i}].name `{}`: use letters, digits, `-`, `_` and `.`",
                path.display(),
                r.name
            );
        }
        if !seen.insert(r.name.clone()) {
            bail!("{}: run[{i}].name `{}`: used twice", path.display(), r.name);
        }
        check_overrides(path, &format!("run[{i}] (`{}`).set", r.name), &r.set)?;
    }
    check_overrides(path, "set", &sweep.set)?;
    Ok(sweep)
}

/// Every override is `SECTION.KEY=VALUE` of a section a sweep may turn.
fn check_overrides(path: &Path, key: &str, sets: &[String]) -> anyhow::Result<()> {
    for s in sets {
        let ok = crate::pipeline::OVERRIDABLE
            .iter()
            .any(|p| s.starts_with(p))
            && s.contains('=');
        if !ok {
            bail!(
                "{}: {key}: `{s}`: expected SECTION.KEY=VALUE with SECTION one of data, teacher, train, eval",
                path.display(),
            );
        }
    }
    Ok(())
}

/// The overrides that move a run into its own directories and evaluate its student in place
/// of the configuration's.
fn placement(config: &Path, shared: &[String], run_dir: &Path) -> anyhow::Result<Vec<String>> {
    let table = antibody_base::config::read_with_overrides(config, shared)?;
    let base = config.parent().unwrap_or(Path::new("."));
    let train_dir = table
        .get("train")
        .and_then(|t| t.get("run_dir"))
        .and_then(toml::Value::as_str)
        .with_context(|| format!("{}: `train.run_dir`: missing", config.display()))?;
    let student = normalize(&base.join(train_dir).join("student"));
    let models = table
        .get("eval")
        .and_then(|t| t.get("models"))
        .and_then(toml::Value::as_array)
        .with_context(|| format!("{}: `eval.models`: missing", config.display()))?;
    let train = run_dir.join("train");
    let mut swapped = 0;
    let mut list = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let (Some(name), Some(model)) = (
            m.get("name").and_then(toml::Value::as_str),
            m.get("model").and_then(toml::Value::as_str),
        ) else {
            bail!(
                "{}: `eval.models[{i}]`: expected {{ name = ..., model = ... }}",
                config.display()
            );
        };
        let model = if normalize(&base.join(model)) == student {
            swapped += 1;
            train.join("student").display().to_string()
        } else {
            model.to_owned()
        };
        list.push(format!(
            "{{ name = {}, model = {} }}",
            toml::Value::String(name.into()),
            toml::Value::String(model)
        ));
    }
    if swapped == 0 {
        bail!(
            "{}: no model in `eval.models` is the trained student ({})",
            config.display(),
            student.display()
        );
    }
    let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    Ok(vec![
        format!("train.run_dir={}", q(&train)),
        format!("eval.out_dir={}", q(&run_dir.join("eval"))),
        format!("eval.train_run={}", q(&train)),
        format!("eval.models=[{}]", list.join(", ")),
    ])
}

/// `a/b/../c` → `a/c` (lexically; the paths may not exist yet).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sweep = load_sweep(&args.sweep)?;
    let base = args.sweep.parent().unwrap_or(Path::new("."));
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| normalize(&base.join(&sweep.config)));
    for o in &args.only {
        if !sweep.run.iter().any(|r| &r.name == o) {
            bail!(
                "--only {o}: no run of that name in {}",
                args.sweep.display()
            );
        }
    }
    let out = crate::project_root().join(normalize(&base.join(&sweep.out_dir)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut failed = Vec::new();
    if !args.table_only {
        for r in &sweep.run {
            if !args.only.is_empty() && !args.only.contains(&r.name) {
                continue;
            }
            let dir = out.join(&r.name);
            let mut overrides = sweep.set.clone();
            overrides.extend(r.set.iter().cloned());
            overrides.extend(placement(&config, &sweep.set, &dir)?);
            tracing::info!("== sweep run `{}`: {}", r.name, r.set.join(" "));
            let started = std::time::Instant::now();
            let result = crate::pipeline::run(crate::pipeline::Args {
                config: config.clone(),
                overrides,
                device: args.device.clone(),
                stage: None,
                resume: None,
            });
            let status = Status {
                ok: result.is_ok(),
                error: result.as_ref().err().map(|e| format!("{e:#}")),
                minutes: started.elapsed().as_secs_f64() / 60.0,
                set: r.set.clone(),
            };
            if let Some(e) = &status.error {
                tracing::error!("sweep run `{}` failed: {e}", r.name);
                failed.push(r.name.clone());
            }
            std::fs::create_dir_all(&dir)?;
            write(
                &dir.join("status.json"),
                &serde_json::to_vec_pretty(&status)?,
            )?;
            table(&args.sweep, &config, &sweep, &out)?;
        }
    }
    table(&args.sweep, &config, &sweep, &out)?;
    println!("results: {}", out.join("results.md").display());
    if !failed.is_empty() {
        bail!(
            "{} run(s) failed: {} (recorded in {})",
            failed.len(),
            failed.join(", "),
            out.join("results.md").display()
        );
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    antibody_base::atomic::write_bytes(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// A rate of `report.json` as `rate [lo, hi] (n)`: every rate with its 95% interval and n.
fn pct(v: &serde_json::Value) -> String {
    let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    match (f("rate"), f("lo"), f("hi"), f("n")) {
        (Some(r), Some(lo), Some(hi), Some(n)) => format!(
            "{:.1}% [{:.1}, {:.1}] ({n})",
            100.0 * r,
            100.0 * lo,
            100.0 * hi
        ),
        (Some(r), ..) => format!("{:.1}%", 100.0 * r),
        _ => "—".into(),
    }
}

/// One row of the table from a model's entry in `report.json`.
fn row(label: &str, set: &str, m: &serde_json::Value, attacks: &[String]) -> Vec<String> {
    let mut cells = vec![
        label.to_owned(),
        set.to_owned(),
        pct(&m["harmful"]["complied"]),
    ];
    for a in attacks {
        let hit = m["attacks"].as_array().and_then(|xs| {
            xs.iter()
                .find(|x| x["attack"]["name"].as_str() == Some(a.as_str()))
        });
        cells.push(hit.map_or("—".into(), |x| pct(&x["harmful"]["complied"])));
    }
    let worst = &m["worst_case"];
    cells.push(if worst.is_null() {
        "—".into()
    } else {
        format!(
            "{} `{}`",
            pct(&worst["hs"]),
            worst["attack"].as_str().unwrap_or("?")
        )
    });
    cells.push(pct(&m["fa"]));
    cells.push(pct(&m["lookalike"]["refused"]));
    cells.push(pct(&m["harmless"]["refused"]));
    cells.push(
        m["perplexity"]
            .as_f64()
            .map_or("—".into(), |p| format!("{p:.2}")),
    );
    cells.push(pct(&m["dpo_win_rate"]));
    cells
}

/// Rewrites `results.md` and `results.json` from every run directory that has a status.
fn table(file: &Path, config: &Path, sweep: &SweepFile, out: &Path) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    let mut attacks: Vec<String> = Vec::new();
    let mut references: Option<Vec<serde_json::Value>> = None;
    for r in &sweep.run {
        let dir = out.join(&r.name);
        let Ok(status) = std::fs::read(dir.join("status.json")) else {
            continue;
        };
        let status: Status = serde_json::from_slice(&status)
            .with_context(|| format!("{}", dir.join("status.json").display()))?;
        let report: Option<serde_json::Value> = std::fs::read(dir.join("eval/report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let student = dir.join("train/student").display().to_string();
        let (mine, others): (Vec<serde_json::Value>, Vec<serde_json::Value>) = report
            .as_ref()
            .and_then(|rep| rep["models"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .partition(|m| m["model"].as_str() == Some(student.as_str()));
        for m in mine.iter().chain(&others) {
            for a in m["attacks"].as_array().into_iter().flatten() {
                if let Some(n) = a["attack"]["name"].as_str()
                    && !attacks.iter().any(|x| x == n)
                {
                    attacks.push(n.to_owned());
                }
            }
        }
        if references.is_none() && status.ok && !others.is_empty() {
            references = Some(others);
        }
        runs.push((r.clone(), status, mine.into_iter().next()));
    }

    let mut header = vec!["run".to_owned(), "overrides".to_owned(), "HS".to_owned()];
    header.extend(attacks.iter().map(|a| format!("HS after `{a}`")));
    header.extend(
        [
            "worst case after the attacks",
            "FA",
            "refusals: look-alikes",
            "refusals: harmless",
            "perplexity",
            "DPO win rate",
        ]
        .map(String::from),
    );
    let mut md = format!(
        "# Sweep `{}` over `{}`\n\nEvery run of the sweep, failures included, rewritten after each run by `cargo xtask sweep --sweep {}` (one run: `--only NAME`). HS: share of held-out harmful prompts answered (lower is better); the worst case is over the attacks that leave the model fluent; every rate with its Wilson 95% interval and n; the reference models come first. Shared overrides: {}.\n\n",
        file.display(),
        config.display(),
        file.display(),
        if sweep.set.is_empty() {
            "none".to_owned()
        } else {
            sweep
                .set
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" ")
        },
    );
    md.push_str(&format!("| {} |\n", header.join(" | ")));
    md.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    for m in references.iter().flatten() {
        let name = m["name"].as_str().unwrap_or("?");
        md.push_str(&line(row(&format!("*{name}*"), "(reference)", m, &attacks)));
    }
    let mut json_runs = Vec::new();
    for (spec, status, m) in &runs {
        let set = if spec.set.is_empty() {
            "(none)".to_owned()
        } else {
            spec.set
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match m {
            Some(m) if status.ok => md.push_str(&line(row(&spec.name, &set, m, &attacks))),
            _ => {
                let mut cells = vec![spec.name.clone(), set];
                let why = status
                    .error
                    .clone()
                    .unwrap_or_else(|| "no report".into())
                    .replace('|', "\\|")
                    .replace('\n', " ");
                cells.push(format!("failed: {why}"));
                cells.resize(header.len(), String::new());
                md.push_str(&line(cells));
            }
        }
        json_runs.push(serde_json::json!({
            "name": spec.name,
            "set": spec.set,
            "note": spec.note,
            "status": status,
            "result": m,
        }));
    }
    md.push_str("\n## Runs\n\n");
    for (spec, status, _) in &runs {
        md.push_str(&format!(
            "- `{}` ({:.1} min{}): {}\n",
            spec.name,
            status.minutes,
            if status.ok { "" } else { ", failed" },
            if spec.note.is_empty() {
                "—"
            } else {
                &spec.note
            }
        ));
    }
    write(&out.join("results.md"), md.as_bytes())?;
    let json = serde_json::json!({
        "config": config,
        "sweep": file,
        "set": sweep.set,
        "references": references,
        "runs": json_runs,
    });
    write(
        &out.join("results.json"),
        &serde_json::to_vec_pretty(&json)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_folds_parent_components() {
        assert_eq!(
            normalize(Path::new("configs/../runs/default/train/student")),
            PathBuf::from("runs/default/train/student")
        );
        assert_eq!(normalize(Path::new("../a/./b")), PathBuf::from("../a/b"));
    }

    #[test]
    fn placement_swaps_the_trained_student() {
        let dir = std::env::temp_dir().join(format!("antibody-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("c.toml");
        std::fs::write(
            &config,
            "[train]\nrun_dir = \"../runs/x/train\"\n[eval]\nmodels = [{ name = \"base\", model = \"patient\" }, { name = \"hardened\", model = \"../runs/x/train/student\" }]\n",
        )
        .expect("write");
        let sets = placement(&config, &[], Path::new("/out/r1")).expect("placement");
        assert!(sets.contains(&"train.run_dir=\"/out/r1/train\"".to_owned()));
        let models = sets
            .iter()
            .find(|s| s.starts_with("eval.models="))
            .expect("models");
        assert!(models.contains("model = \"patient\""), "{models}");
        assert!(
            models.contains("model = \"/out/r1/train/student\""),
            "{models}"
        );
        std::fs::write(
            &config,
            "[train]\nrun_dir = \"t\"\n[eval]\nmodels = [{ name = \"base\", model = \"patient\" }]\n",
        )
        .expect("write");
        // The sweep's shared overrides come first: a list of models set there is the one
        // whose student is swapped.
        let shared = [
            "train.run_dir=\"../runs/x/train\"".to_owned(),
            "eval.models=[{ name = \"hardened\", model = \"../runs/x/train/student\" }]".to_owned(),
        ];
        let sets = placement(&config, &shared, Path::new("/out/r1")).expect("placement");
        let models = sets
            .iter()
            .find(|s| s.starts_with("eval.models="))
            .expect("models");
        assert!(!models.contains("patient"), "{models}");
        assert!(models.contains("/out/r1/train/student"), "{models}");
        let e = placement(&config, &[], Path::new("/out/r1")).expect_err("no student");
        assert!(e.to_string().contains("trained student"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_sweep_files_name_the_run_and_key() {
        let dir = std::env::temp_dir().join(format!("antibody-sweep-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("s.toml");
        let error_of = |text: &str, why: &str| {
            std::fs::write(&f, text).expect("write");
            load_sweep(&f).expect_err(why)
        };
        let e = error_of(
            "config = \"c\"\nout_dir = \"x\"\n[[run]]\nname = \"a\"\nset = [\"lr=1\"]\n",
            "bad set",
        );
        assert!(e.to_string().contains("run[0] (`a`).set"), "{e}");
        let e = error_of(
            "config = \"c\"\nout_dir = \"x\"\n[[run]]\nname = \"a\"\n[[run]]\nname = \"a\"\n",
            "twice",
        );
        assert!(e.to_string().contains("used twice"), "{e}");
        // Shared overrides are checked too; `[data]` may be overridden, other sections not.
        let e = error_of(
            "config = \"c\"\nout_dir = \"x\"\nset = [\"data.seed=2\", \"model.x=1\"]\n[[run]]\nname = \"a\"\nset = [\"data.lookalike_responses=true\"]\n",
            "bad shared set",
        );
        assert!(e.to_string().contains("set: `model.x=1`"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
