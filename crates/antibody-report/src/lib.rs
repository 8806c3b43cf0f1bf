//! antibody-report: the report of an evaluation, from `antibody-eval`'s per-model results
//! ([`read_results`]): `report.json` (every number), `report.md` (the verdict in one line, the
//! side-by-side table, the plots, sample generations) and the plots as PNG and SVG:
//!
//! - `hs.{png,svg}`: HS before and after each attack, per model;
//! - `training.{png,svg}`: the training run's harmful log-likelihood and DPO margin per step
//!   (from its `metrics.jsonl`);
//! - `canaries.{png,svg}`: canaries per layer in each cycle (from its canary reports).
//!
//! Text in the plots needs a TrueType font: `$ANTIBODY_FONT`, else DejaVu Sans or Liberation
//! Sans where the system has them; without one the plots are skipped with a warning and the
//! report says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use antibody_eval::{Eval, ModelResult};
use antibody_train::metrics::{StepMetrics, read_metrics};
use plotters::prelude::*;
use serde::Serialize;

/// What can stop the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A model of the `[eval]` section has no result on disk.
    #[error("{}: no result for `{name}`: run `antibody-eval run` first", path.display())]
    Missing {
        /// The model's name.
        name: String,
        /// Where its result should be.
        path: PathBuf,
    },
    /// A file could not be read, parsed or written.
    #[error("{}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The per-model results `antibody-eval run` wrote for every model of `eval`, in its order.
pub fn read_results(eval: &Eval) -> Result<Vec<ModelResult>, ReportError> {
    let mut results = Vec::new();
    for (name, _) in &eval.models {
        let path = eval.out_dir.join("models").join(format!("{name}.json"));
        let bytes = std::fs::read(&path).map_err(|_| ReportError::Missing {
            name: name.clone(),
            path: path.clone(),
        })?;
        let r: ModelResult = serde_json::from_slice(&bytes)
            .map_err(|e| io(&path, format!("not a model result: {e}")))?;
        results.push(r);
    }
    Ok(results)
}

const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font for plot text once; `false` when none is found.
fn font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        let candidates = std::env::var("ANTIBODY_FONT")
            .ok()
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(|s| (*s).to_owned()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no TrueType font found (set ANTIBODY_FONT): plots are skipped");
        false
    })
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars: one group per label, one bar per series; values in [0, 1].
fn bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    y_max: f64,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let n = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                groups.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()?;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let width = 0.8 / n;
        chart
            .draw_series(values.iter().enumerate().map(|(g, &v)| {
                let x0 = g as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], color.filled())
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Lines over steps.
fn lines<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(y_label)
        .draw()?;
    for (s, (name, p)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color));
        chart.draw_series(p.iter().map(|&xy| Circle::new(xy, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

type Area<'a, DB> = DrawingArea<DB, plotters::coord::Shift>;

/// Draws a plot as `<dir>/<stem>.png` and `.svg` (the same routine on both backends);
/// returns the file names written.
fn both(
    dir: &Path,
    stem: &str,
    size: (u32, u32),
    png: impl Fn(Area<'_, BitMapBackend<'_>>) -> DrawResult,
    svg: impl Fn(Area<'_, SVGBackend<'_>>) -> DrawResult,
) -> Vec<String> {
    // Each plot is drawn into a temporary file beside its place and renamed only when
    // complete, so a failed write (a full disk) leaves the previous plot, never a torn one.
    let draw = |name: String, f: &dyn Fn(&Path) -> DrawResult| -> Result<String, String> {
        antibody_base::atomic::write_with::<std::io::Error>(&dir.join(&name), |tmp| {
            f(tmp).map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map(|()| name)
        .map_err(|e| antibody_base::atomic::describe(&e))
    };
    let r = draw(format!("{stem}.png"), &|p| {
        png(BitMapBackend::new(p, size).into_drawing_area())
    })
    .and_then(|a| {
        draw(format!("{stem}.svg"), &|p| {
            svg(SVGBackend::new(p, size).into_drawing_area())
        })
        .map(|b| vec![a, b])
    });
    match r {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!("plot {stem}: {e}");
            Vec::new()
        }
    }
}

/// The report's JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The configuration file.
    pub config: String,
    /// One row per model (without the per-pair log-probabilities).
    pub models: Vec<ModelResult>,
    /// The one-line verdict.
    pub verdict: String,
    /// Plot files written.
    pub plots: Vec<String>,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The one-line verdict: did the hardened model (the last one) keep refusing?
pub fn verdict(results: &[ModelResult]) -> String {
    let (Some(first), Some(last)) = (results.first(), results.last()) else {
        return "no models".into();
    };
    if results.len() == 1 {
        return format!("{}: HS {}", last.name, pct(last.hs.rate));
    }
    let worst_attack = last
        .attacks
        .iter()
        .map(|a| a.hs.rate)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let after = worst_attack.map_or_else(String::new, |w| {
        format!(", worst post-attack HS {}", pct(w))
    });
    format!(
        "{}: HS {} (vs {} for {}){after}; look-alike refusals {}, perplexity {:.2} (vs {:.2})",
        last.name,
        pct(last.hs.rate),
        pct(first.hs.rate),
        first.name,
        pct(last.over_refusal_lookalike.rate),
        last.perplexity,
        first.perplexity
    )
}

fn table(results: &[ModelResult]) -> String {
    let attack_names: Vec<String> = results
        .first()
        .map(|r| r.attacks.iter().map(|a| a.attack.name.clone()).collect())
        .unwrap_or_default();
    let judged = results.iter().any(|r| r.hs_model_judge.is_some());
    let mut out = String::from("| model | HS |");
    if judged {
        out.push_str(" HS (model judge) |");
    }
    for a in &attack_names {
        out.push_str(&format!(" HS after `{a}` |"));
    }
    out.push_str(
        " FA | refusals: look-alikes | refusals: harmless | perplexity | DPO win rate |\n|---|---|",
    );
    out.push_str(&"---|".repeat(attack_names.len() + 5 + usize::from(judged)));
    out.push('\n');
    for r in results {
        out.push_str(&format!(
            "| {} (`{}`) | {} (n={}) |",
            r.name,
            r.model,
            pct(r.hs.rate),
            r.hs.n
        ));
        if judged {
            out.push_str(&format!(
                " {} |",
                r.hs_model_judge
                    .as_ref()
                    .map_or("—".into(), |s| pct(s.rate))
            ));
        }
        for a in &r.attacks {
            out.push_str(&format!(" {} |", pct(a.hs.rate)));
        }
        out.push_str(&format!(
            " {} | {} | {} | {:.2} | {} |\n",
            r.fa.as_ref().map_or("—".into(), |f| pct(f.rate)),
            pct(r.over_refusal_lookalike.rate),
            pct(r.over_refusal_harmless.rate),
            r.perplexity,
            r.dpo_win_rate.map_or("— (reference)".into(), pct),
        ));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|")
        .replace('\n', " ")
        .chars()
        .take(160)
        .collect()
}

fn canary_counts(run: &Path) -> BTreeMap<usize, BTreeMap<usize, usize>> {
    let mut out = BTreeMap::new();
    for cycle in 0.. {
        let path = run.join("canaries").join(format!("cycle-{cycle}.json"));
        let Ok(bytes) = std::fs::read(&path) else {
            break;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            break;
        };
        let by_layer: BTreeMap<usize, usize> = v["by_layer"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_u64()? as usize)))
                    .collect()
            })
            .unwrap_or_default();
        out.insert(cycle, by_layer);
    }
    out
}

/// Writes `report.json`, `report.md` and the plots into `out_dir`.
pub fn write(
    out_dir: &Path,
    config_file: &Path,
    results: &[ModelResult],
    train_run: Option<&Path>,
) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    let _lock =
        antibody_base::DirLock::acquire(out_dir, "antibody-report").map_err(|e| io(out_dir, e))?;
    let mut plots = Vec::new();
    let have_font = font();
    if have_font {
        let groups: Vec<String> = results.iter().map(|r| r.name.clone()).collect();
        let mut series = vec![(
            "HS".to_owned(),
            results.iter().map(|r| r.hs.rate).collect::<Vec<f64>>(),
        )];
        if let Some(first) = results.first() {
            for (i, a) in first.attacks.iter().enumerate() {
                series.push((
                    format!("after {}", a.attack.name),
                    results
                        .iter()
                        .map(|r| r.attacks.get(i).map_or(0.0, |x| x.hs.rate))
                        .collect(),
                ));
            }
        }
        let title = "Harmful score before and after fine-tuning attacks";
        plots.extend(both(
            out_dir,
            "hs",
            (900, 480),
            |a| bars(a, title, &groups, &series, 1.3),
            |a| bars(a, title, &groups, &series, 1.3),
        ));
        if let Some(run) = train_run {
            let rows: Vec<StepMetrics> =
                read_metrics(&run.join("metrics.jsonl"), usize::MAX).unwrap_or_default();
            if !rows.is_empty() {
                let pick = |f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
                    rows.iter()
                        .filter_map(|r| f(r).map(|y| (r.step as f64, y)))
                        .collect()
                };
                let logp = vec![(
                    "log p(y_h) per token, harmful steps".to_owned(),
                    pick(&|r| r.harmful_logp),
                )];
                let margin = vec![(
                    "DPO margin (nats), harmless steps".to_owned(),
                    pick(&|r| r.dpo_margin),
                )];
                let two = |top: &str, bottom: &str| (top.to_owned(), bottom.to_owned());
                let (t1, t2) = two("Harmful-response log-likelihood", "Harmless DPO margin");
                plots.extend(both(
                    out_dir,
                    "training",
                    (900, 640),
                    |a| {
                        let (top, bottom) = a.split_vertically(320);
                        lines(top, &t1, "nats/token", &logp)?;
                        lines(bottom, &t2, "nats", &margin)
                    },
                    |a| {
                        let (top, bottom) = a.split_vertically(320);
                        lines(top, &t1, "nats/token", &logp)?;
                        lines(bottom, &t2, "nats", &margin)
                    },
                ));
            }
            let counts = canary_counts(run);
            if !counts.is_empty() {
                let layers: Vec<usize> = counts
                    .values()
                    .flat_map(|m| m.keys().copied())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let groups: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
                let series: Vec<(String, Vec<f64>)> = counts
                    .iter()
                    .map(|(c, m)| {
                        (
                            format!("cycle {c}"),
                            layers
                                .iter()
                                .map(|l| m.get(l).copied().unwrap_or(0) as f64)
                                .collect(),
                        )
                    })
                    .collect();
                let y_max = series
                    .iter()
                    .flat_map(|(_, v)| v.iter().copied())
                    .fold(1.0, f64::max)
                    * 1.15;
                let title = "Canaries per layer";
                plots.extend(both(
                    out_dir,
                    "canaries",
                    (1100, 420),
                    |a| bars(a, title, &groups, &series, y_max),
                    |a| bars(a, title, &groups, &series, y_max),
                ));
            }
        }
    }

    let verdict = verdict(results);
    let mut md = format!(
        "# antibody evaluation\n\n**{verdict}**\n\nConfiguration: `{}`. HS = share of held-out harmful prompts whose greedy answer the judge does not call a refusal (lower is better). Post-attack HS: the same after harmful fine-tuning of a copy of the model.\n\n",
        config_file.display()
    );
    md.push_str(&table(results));
    md.push('\n');
    if !have_font {
        md.push_str("_Plots skipped: no TrueType font found (set `ANTIBODY_FONT`)._\n\n");
    }
    for p in plots.iter().filter(|p| p.ends_with(".png")) {
        md.push_str(&format!("![{p}]({p})\n\n"));
    }
    md.push_str("## Sample generations\n\n| set | prompt |");
    for r in results {
        md.push_str(&format!(" {} |", r.name));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(results.len()));
    md.push('\n');
    if let Some(first) = results.first() {
        for (i, s) in first.samples.iter().enumerate() {
            md.push_str(&format!("| {} | {} |", s.set, escape(&s.prompt)));
            for r in results {
                match r.samples.get(i) {
                    Some(x) => md.push_str(&format!(
                        " {} {} |",
                        if x.refused {
                            "🛑 refused:"
                        } else {
                            "⚠️ answered:"
                        },
                        escape(&x.answer)
                    )),
                    None => md.push_str(" — |"),
                }
            }
            md.push('\n');
        }
    }
    let speed: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{}: {} new tokens in {:.0} s ({:.0} tok/s), {:.0} s in all",
                r.name,
                r.generated_tokens,
                r.generation_seconds,
                r.generated_tokens as f64 / r.generation_seconds.max(1e-9),
                r.seconds
            )
        })
        .collect();
    md.push_str(&format!("\n## Work\n\n- {}\n", speed.join("\n- ")));

    let report = Report {
        config: config_file.display().to_string(),
        models: results
            .iter()
            .map(|r| ModelResult {
                pair_logps: (Vec::new(), Vec::new()),
                ..r.clone()
            })
            .collect(),
        verdict,
        plots,
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| io(out_dir, e))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = out_dir.join(name);
        antibody_base::atomic::write_bytes(&path, bytes)
            .map_err(|e| io(&path, antibody_base::atomic::describe(&e)))
    };
    write("report.json", &json)?;
    write("report.md", md.as_bytes())?;
    Ok(out_dir.join("report.md"))
}
