//! The per-cycle canary report: a JSON summary (counts by layer and site, a drift
//! histogram) and a Parquet table with one row per monitored neuron
//! (`site, kind, layer, neuron, pre, post, drift, canary`). Both files are written to a
//! temporary name and renamed into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use antibody_model::{Site, SiteKind};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Activations, CanarySet};

/// A drift histogram with equal-width bins on `[0, max]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Bin edges, `bins + 1` values.
    pub edges: Vec<f64>,
    /// Neurons per bin.
    pub counts: Vec<usize>,
}

/// The JSON summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryReport {
    /// Training cycle, when the report belongs to one.
    pub cycle: Option<usize>,
    /// The quantile.
    pub q: f64,
    /// The drift threshold.
    pub threshold: f64,
    /// Canaries.
    pub count: usize,
    /// Neurons monitored.
    pub monitored: usize,
    /// Tokens the means were taken over (before, after).
    pub tokens: [usize; 2],
    /// Canaries per layer.
    pub by_layer: BTreeMap<usize, usize>,
    /// Canaries per site (`attn.L`, `mlp.L`).
    pub by_site: BTreeMap<String, usize>,
    /// Canaries per site kind (`attn`, `mlp`).
    pub by_kind: BTreeMap<String, usize>,
    /// Drift histogram over all monitored neurons.
    pub histogram: Histogram,
}

fn kind_name(k: SiteKind) -> &'static str {
    match k {
        SiteKind::Residual => "resid",
        SiteKind::AttnOut => "attn",
        SiteKind::MlpHidden => "mlp",
    }
}

/// Builds the summary.
pub fn summarize(
    cycle: Option<usize>,
    pre: &Activations,
    post: &Activations,
    drift: &BTreeMap<Site, Vec<f32>>,
    set: &CanarySet,
    bins: usize,
) -> CanaryReport {
    let all: Vec<f64> = drift.values().flatten().map(|&x| f64::from(x)).collect();
    let max = all.iter().copied().fold(0.0, f64::max);
    let bins = bins.max(1);
    let width = if max > 0.0 { max / bins as f64 } else { 1.0 };
    let mut counts = vec![0usize; bins];
    for x in &all {
        let i = ((x / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let mut by_kind = BTreeMap::new();
    for (s, n) in &set.neurons {
        *by_kind.entry(kind_name(s.kind).to_owned()).or_default() += n.len();
    }
    CanaryReport {
        cycle,
        q: set.q,
        threshold: set.threshold,
        count: set.count(),
        monitored: all.len(),
        tokens: [pre.tokens, post.tokens],
        by_layer: set.by_layer(),
        by_site: set
            .neurons
            .iter()
            .filter(|(_, n)| !n.is_empty())
            .map(|(s, n)| (s.to_string(), n.len()))
            .collect(),
        by_kind,
        histogram: Histogram {
            edges: (0..=bins).map(|i| i as f64 * width).collect(),
            counts,
        },
    }
}

/// The Parquet table: one row per monitored neuron.
pub fn table(
    pre: &Activations,
    post: &Activations,
    drift: &BTreeMap<Site, Vec<f32>>,
    set: &CanarySet,
) -> PolarsResult<DataFrame> {
    let (mut site, mut kind, mut layer, mut neuron) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut a, mut b, mut d, mut canary) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, drifts) in drift {
        let chosen = set.neurons.get(s);
        for (i, &x) in drifts.iter().enumerate() {
            site.push(s.to_string());
            kind.push(kind_name(s.kind));
            layer.push(s.layer as u32);
            neuron.push(i as u32);
            a.push(
                pre.means
                    .get(s)
                    .and_then(|m| m.get(i).copied())
                    .unwrap_or(f32::NAN),
            );
            b.push(
                post.means
                    .get(s)
                    .and_then(|m| m.get(i).copied())
                    .unwrap_or(f32::NAN),
            );
            d.push(x);
            canary.push(chosen.is_some_and(|c| c.binary_search(&i).is_ok()));
        }
    }
    let n = site.len();
    DataFrame::new(
        n,
        vec![
            Column::new("site".into(), site),
            Column::new("kind".into(), kind),
            Column::new("layer".into(), layer),
            Column::new("neuron".into(), neuron),
            Column::new("pre".into(), a),
            Column::new("post".into(), b),
            Column::new("drift".into(), d),
            Column::new("canary".into(), canary),
        ],
    )
}

fn persist(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<File>) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    antibody_base::atomic::write_with::<anyhow::Error>(&path, |tmp| {
        let mut w = BufWriter::new(File::create(tmp)?);
        write(&mut w)?;
        std::io::Write::flush(&mut w)?;
        Ok(())
    })?;
    Ok(path)
}

/// Writes `<stem>.json` and `<stem>.parquet` into `dir`; returns both paths.
pub fn write(
    dir: &Path,
    stem: &str,
    report: &CanaryReport,
    mut frame: DataFrame,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let json = persist(dir, &format!("{stem}.json"), |w| {
        serde_json::to_writer_pretty(&mut *w, report)?;
        Ok(())
    })?;
    let parquet = persist(dir, &format!("{stem}.parquet"), |w| {
        ParquetWriter::new(w).finish(&mut frame)?;
        Ok(())
    })?;
    Ok((json, parquet))
}
