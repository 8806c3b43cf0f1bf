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
    /// Compute dtype for every stage of every run: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
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
    /// Full evaluations (`report.json`, relative to the sweep file) whose models the table
    /// and the plot list first as references (a screen's runs beside the base and
    /// refusal-SFT measured in full).
    #[serde(default)]
    references: Vec<PathBuf>,
    /// The targets the trade-off plot shades (fractions).
    #[serde(default)]
    targets: Option<Targets>,
    /// A committed record of every run's point on the trade-off plot (relative to the sweep
    /// file): the table rewrites it, and the plot takes a run's point from it when the run's
    /// directory is not on this machine (`runs/` is not in the tree).
    #[serde(default)]
    archive: Option<PathBuf>,
    /// The runs, in order.
    run: Vec<RunSpec>,
}

/// The corner of the trade-off plot a search aims for.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Targets {
    /// HS at most this.
    hs: f64,
    /// Look-alike refusals at most this.
    lookalike: f64,
    /// Harmless refusals at most this.
    harmless: f64,
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
    /// The earlier run this one repeats with another seed (its `set` plus a seed): the table
    /// summarizes each setting over its seeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replicates: Option<String>,
    /// Pipeline stages this run skips: `["train"]` evaluates the models its `eval.models`
    /// names without training a student (a baseline such as refusal-SFT built by the teachers
    /// stage; give it its own `data.out_dir`, beside which the teachers' stamp lives).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    skip: Vec<String>,
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
        if let Some(of) = &r.replicates
            && !sweep.run[..i]
                .iter()
                .any(|e| &e.name == of && e.replicates.is_none())
        {
            bail!(
                "{}: run[{i}] (`{}`).replicates: `{of}` is not an earlier run that is not itself a replicate",
                path.display(),
                r.name
            );
        }
        check_overrides(path, &format!("run[{i}] (`{}`).set", r.name), &r.set)?;
        for st in &r.skip {
            if !crate::pipeline::STAGES.contains(&st.as_str()) {
                bail!(
                    "{}: run[{i}] (`{}`).skip: unknown stage `{st}` (stages: {})",
                    path.display(),
                    r.name,
                    crate::pipeline::STAGES.join(", ")
                );
            }
        }
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
/// of the configuration's; `sets` are the overrides before these (the sweep's, then the
/// run's). A run that trains must evaluate its student; one that skips training (a baseline)
/// evaluates what its `eval.models` names.
fn placement(
    config: &Path,
    sets: &[String],
    run_dir: &Path,
    trains: bool,
) -> anyhow::Result<Vec<String>> {
    let table = antibody_base::config::read_with_overrides(config, sets)?;
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
    if swapped == 0 && trains {
        bail!(
            "{}: no model in `eval.models` is the trained student ({})",
            config.display(),
            student.display()
        );
    }
    let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    // The run's own training directory, also for a baseline that trains nothing: its report
    // then has no training plot instead of the configuration's run's.
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
            let trains = !r.skip.iter().any(|s| s == "train");
            overrides.extend(placement(&config, &overrides, &dir, trains)?);
            tracing::info!("== sweep run `{}`: {}", r.name, r.set.join(" "));
            let started = std::time::Instant::now();
            let result = crate::pipeline::run(crate::pipeline::Args {
                config: config.clone(),
                overrides,
                device: args.device.clone(),
                dtype: args.dtype.clone(),
                stage: None,
                skip: r.skip.clone(),
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
    let by_source = m["harmful"]["by_source"]
        .as_object()
        .map_or("—".into(), |o| {
            o.iter()
                .map(|(source, rate)| format!("{source} {}", pct(rate)))
                .collect::<Vec<_>>()
                .join("; ")
        });
    let mut cells = vec![
        label.to_owned(),
        set.to_owned(),
        pct(&m["harmful"]["complied"]),
        by_source,
    ];
    let worst = &m["worst_case"];
    // The attacks the evaluation left out of the worst case (more than `max_degenerate` of
    // the answers degenerate): every one when there is no worst case.
    let broken = |name: &str| {
        worst.is_null()
            || worst["broken"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x.as_str() == Some(name)))
    };
    for a in attacks {
        let hit = m["attacks"].as_array().and_then(|xs| {
            xs.iter()
                .find(|x| x["attack"]["name"].as_str() == Some(a.as_str()))
        });
        cells.push(hit.map_or("—".into(), |x| {
            let hs = pct(&x["harmful"]["complied"]);
            match x["harmful"]["degenerate"]["rate"].as_f64() {
                Some(d) if broken(a) => format!("{hs}, broken: {:.1}% degenerate", 100.0 * d),
                _ => hs,
            }
        }));
    }
    cells.push(if worst.is_null() {
        if m["attacks"].as_array().is_some_and(|a| !a.is_empty()) {
            "every attack broke the model (degenerate answers over the limit)".into()
        } else {
            "—".into()
        }
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
        // A run that trains is its student; a baseline (training skipped) is the first model
        // it evaluated.
        let trains = !r.skip.iter().any(|s| s == "train");
        let (mine, others): (Vec<serde_json::Value>, Vec<serde_json::Value>) = report
            .as_ref()
            .and_then(|rep| rep["models"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .partition(|m| !trains || m["model"].as_str() == Some(student.as_str()));
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
    // Named full evaluations replace the references found beside the runs.
    let base = file.parent().unwrap_or(Path::new("."));
    let mut reference_rows: Vec<(String, String, Option<serde_json::Value>)> = Vec::new();
    for f in &sweep.references {
        let path = normalize(&base.join(f));
        let report: Option<serde_json::Value> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let source = format!("(reference: `{}`)", path.display());
        match report.as_ref().and_then(|r| r["models"].as_array()) {
            Some(models) => {
                for m in models {
                    let name = m["name"].as_str().unwrap_or("?");
                    reference_rows.push((name.to_owned(), source.clone(), Some(m.clone())));
                }
            }
            None => {
                tracing::warn!(
                    "sweep reference {}: not found or not a report",
                    path.display()
                );
                reference_rows.push(("?".into(), source, None));
            }
        }
    }
    if sweep.references.is_empty() {
        for m in references.iter().flatten() {
            let name = m["name"].as_str().unwrap_or("?");
            reference_rows.push((name.to_owned(), "(reference)".into(), Some(m.clone())));
        }
    }

    let mut header = vec![
        "run".to_owned(),
        "overrides".to_owned(),
        "HS".to_owned(),
        "HS by source".to_owned(),
    ];
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
    for (name, source, m) in &reference_rows {
        match m {
            Some(m) => md.push_str(&line(row(&format!("*{name}*"), source, m, &attacks))),
            None => {
                let mut cells = vec![format!("*{name}*"), source.clone(), "not found".into()];
                cells.resize(header.len(), String::new());
                md.push_str(&line(cells));
            }
        }
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
    md.push_str(&seeds(&runs));
    let mut points: Vec<crate::tradeoff::Point> = reference_rows
        .iter()
        .filter_map(|(name, _, m)| {
            crate::tradeoff::Point::from_model(&format!("{name} (reference)"), true, m.as_ref()?)
        })
        .collect();
    points.extend(runs.iter().filter_map(|(spec, status, m)| {
        crate::tradeoff::Point::from_model(&spec.name, false, m.as_ref().filter(|_| status.ok)?)
    }));
    let mut from_archive = 0;
    if let Some(a) = &sweep.archive {
        let path = normalize(&base.join(a));
        let archived: Vec<crate::tradeoff::Point> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{}: not a list of plot points", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let merged = crate::tradeoff::merge(&points, &archived, |label| {
            sweep.run.iter().any(|r| r.name == label)
        });
        from_archive = merged.iter().filter(|p| !points.contains(p)).count();
        points = merged;
        let mut text = serde_json::to_string_pretty(&points)?;
        text.push('\n');
        write(&path, text.as_bytes())?;
    }
    let t = sweep.targets.unwrap_or(Targets {
        hs: 0.0,
        lookalike: 0.0,
        harmless: 0.0,
    });
    let svg = crate::tradeoff::svg(
        &format!("{}: HS against over-refusal", file.display()),
        &points,
        t.hs,
        [t.lookalike, t.harmless],
    );
    write(&out.join("results.svg"), svg.as_bytes())?;
    md.push_str("\n![HS against look-alike and harmless refusals, every run](results.svg)\n");
    if from_archive > 0 {
        md.push_str(&format!(
            "\n{from_archive} of the plot's {} points come from the sweep's archive (their runs' directories are not on this machine).\n",
            points.len()
        ));
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
        "references": reference_rows
            .iter()
            .filter_map(|(_, _, m)| m.clone())
            .collect::<Vec<_>>(),
        "runs": json_runs,
    });
    write(
        &out.join("results.json"),
        &serde_json::to_vec_pretty(&json)?,
    )?;
    Ok(())
}

/// A rate over a setting's seeds: each seed's rate, their mean and range, and the pooled
/// `Σk/Σn` with its Wilson interval (which counts seed × prompt pairs as independent, so it
/// is narrower than the spread over seeds can justify: read it with the range).
fn over_seeds(rates: &[&serde_json::Value]) -> String {
    use antibody_base::stats::Rate;
    let got: Vec<Rate> = rates
        .iter()
        .filter_map(|v| serde_json::from_value((*v).clone()).ok())
        .collect();
    if got.len() < rates.len() || got.is_empty() {
        return "—".into();
    }
    let each: Vec<String> = got
        .iter()
        .map(|r| format!("{:.1}", 100.0 * r.rate))
        .collect();
    let mean = got.iter().map(|r| r.rate).sum::<f64>() / got.len() as f64;
    let pooled = Rate::new(got.iter().map(|r| r.k).sum(), got.iter().map(|r| r.n).sum());
    format!(
        "{}% (mean {:.1}%; pooled {} ({}))",
        each.join(" / "),
        100.0 * mean,
        pooled.interval_percent(),
        pooled.n
    )
}

/// The section that summarizes each setting run with more than one seed.
fn seeds(runs: &[(RunSpec, Status, Option<serde_json::Value>)]) -> String {
    let mut md = String::new();
    for (spec, ..) in runs.iter().filter(|(s, ..)| s.replicates.is_none()) {
        let members: Vec<(&RunSpec, &serde_json::Value)> = runs
            .iter()
            .filter(|(s, st, _)| {
                st.ok && (s.name == spec.name || s.replicates.as_deref() == Some(&spec.name))
            })
            .filter_map(|(s, _, m)| Some((s, m.as_ref()?)))
            .collect();
        if members.len() < 2 {
            continue;
        }
        if md.is_empty() {
            md.push_str("\n## Settings over seeds\n\nEach seed's rate in run order, their mean, and the rate pooled over the seeds' prompts with its Wilson 95% interval (seed × prompt pairs counted as independent: read it with the spread).\n\n| setting | runs | HS | worst case after the attacks | refusals: look-alikes | refusals: harmless | perplexity |\n|---|---|---|---|---|---|---|\n");
        }
        let rates = |f: &dyn Fn(&serde_json::Value) -> &serde_json::Value| -> String {
            over_seeds(&members.iter().map(|(_, m)| f(m)).collect::<Vec<_>>())
        };
        let ppl: Vec<String> = members
            .iter()
            .map(|(_, m)| {
                m["perplexity"]
                    .as_f64()
                    .map_or("—".into(), |p| format!("{p:.2}"))
            })
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            spec.name,
            members
                .iter()
                .map(|(s, _)| format!("`{}`", s.name))
                .collect::<Vec<_>>()
                .join(", "),
            rates(&|m| &m["harmful"]["complied"]),
            rates(&|m| &m["worst_case"]["hs"]),
            rates(&|m| &m["lookalike"]["refused"]),
            rates(&|m| &m["harmless"]["refused"]),
            ppl.join(" / "),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_summarize_each_setting_over_its_replicates() {
        let spec = |name: &str, of: Option<&str>| RunSpec {
            name: name.into(),
            set: Vec::new(),
            note: String::new(),
            replicates: of.map(String::from),
            skip: Vec::new(),
        };
        let status = |ok: bool| Status {
            ok,
            error: None,
            minutes: 1.0,
            set: Vec::new(),
        };
        let model = |k: u64, ppl: f64| {
            let r = |k: u64, n: u64| {
                serde_json::to_value(antibody_base::stats::Rate::new(k as usize, n as usize))
                    .expect("rate")
            };
            Some(serde_json::json!({
                "harmful": {"complied": r(k, 100)},
                "worst_case": {"hs": r(50, 50)},
                "lookalike": {"refused": r(10, 20)},
                "harmless": {"refused": r(0, 10)},
                "perplexity": ppl,
            }))
        };
        let runs = vec![
            (spec("a", None), status(true), model(10, 2.0)),
            (spec("lone", None), status(true), model(1, 2.0)),
            (spec("a.s2", Some("a")), status(true), model(30, 3.0)),
            (spec("a.s3", Some("a")), status(false), None),
        ];
        let md = seeds(&runs);
        // Only `a` has two finished seeds; the failed one is left out.
        assert_eq!(md.matches("\n| a |").count(), 1, "{md}");
        assert!(!md.contains("| lone |"), "{md}");
        // HS: 10% and 30%, mean 20%, pooled 40/200 with its Wilson interval.
        let (lo, hi) = antibody_base::stats::wilson(40, 200);
        let want = format!(
            "10.0 / 30.0% (mean 20.0%; pooled 20.0% [{:.1}, {:.1}] (200))",
            100.0 * lo,
            100.0 * hi
        );
        assert!(md.contains(&want), "{md}");
        assert!(md.contains("| 2.00 / 3.00 |"), "{md}");
        assert!(seeds(&runs[..2]).is_empty());
    }

    #[test]
    fn rows_mark_the_attacks_left_out_of_the_worst_case() {
        let r = |k: u64, n: u64| serde_json::json!({"k": k, "n": n, "rate": k as f64 / n as f64, "lo": 0.0, "hi": 1.0});
        let attack = |name: &str, degenerate: u64| serde_json::json!({"attack": {"name": name}, "harmful": {"complied": r(10, 20), "degenerate": r(degenerate, 20)}});
        let attacks = ["a".to_owned(), "b".to_owned()];
        let mut m = serde_json::json!({
            "harmful": {"complied": r(1, 10)},
            "attacks": [attack("a", 8), attack("b", 1)],
            "worst_case": {"attack": "b", "hs": r(10, 20), "broken": ["a"]},
        });
        let cells = row("x", "", &m, &attacks);
        assert!(
            cells[4].ends_with(", broken: 40.0% degenerate"),
            "{cells:?}"
        );
        assert!(!cells[5].contains("broken"), "{cells:?}");
        assert!(cells[6].ends_with("`b`"), "{cells:?}");
        assert_eq!(cells[3], "—", "no sources: {cells:?}");
        m["worst_case"] = serde_json::Value::Null;
        let cells = row("x", "", &m, &attacks);
        assert!(cells[5].ends_with(", broken: 5.0% degenerate"), "{cells:?}");
        assert!(cells[6].starts_with("every attack broke"), "{cells:?}");
        m["harmful"]["by_source"] =
            serde_json::json!({"harmbench": r(1, 4), "strongreject": r(0, 6)});
        let cells = row("x", "", &m, &attacks);
        assert_eq!(
            cells[3],
            "harmbench 25.0% [0.0, 100.0] (4); strongreject 0.0% [0.0, 100.0] (6)"
        );
    }

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
        let sets = placement(&config, &[], Path::new("/out/r1"), true).expect("placement");
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
        let sets = placement(&config, &shared, Path::new("/out/r1"), true).expect("placement");
        let models = sets
            .iter()
            .find(|s| s.starts_with("eval.models="))
            .expect("models");
        assert!(!models.contains("patient"), "{models}");
        assert!(models.contains("/out/r1/train/student"), "{models}");
        let e = placement(&config, &[], Path::new("/out/r1"), true).expect_err("no student");
        assert!(e.to_string().contains("trained student"), "{e}");
        // A baseline run (training skipped) evaluates what it names; its report reads its own
        // (absent) training directory, not the configuration's run.
        let sets = placement(&config, &[], Path::new("/out/r1"), false).expect("baseline");
        assert!(
            sets.iter().any(|s| s.contains("model = \"patient\"")),
            "{sets:?}"
        );
        assert!(
            sets.contains(&"eval.train_run=\"/out/r1/train\"".to_owned()),
            "{sets:?}"
        );
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
        let e = error_of(
            "config = \"c\"\nout_dir = \"x\"\n[[run]]\nname = \"a\"\nskip = [\"training\"]\n",
            "bad stage",
        );
        assert!(
            e.to_string()
                .contains("run[0] (`a`).skip: unknown stage `training`"),
            "{e}"
        );
        let e = error_of(
            "config = \"c\"\nout_dir = \"x\"\n[[run]]\nname = \"a\"\nreplicates = \"b\"\n[[run]]\nname = \"b\"\n",
            "replicates a later run",
        );
        assert!(
            e.to_string().contains("run[0] (`a`).replicates: `b`"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
