//! The per-step record of a run: [`StepMetrics`] (every loss term, LAT losses, grad norm,
//! learning rate, throughput), appended to `metrics.jsonl` as the run goes and rewritten as
//! `metrics.parquet` at every checkpoint; [`read_metrics`] is what the report reads.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

/// Every number one optimizer step reports (`None`: the term was not computed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 0-based optimizer step.
    pub step: usize,
    /// `harmful` or `harmless`.
    pub phase: String,
    /// Cycle (mixed: canary window).
    pub cycle: usize,
    /// The step's total loss.
    pub loss: f64,
    /// NPO (or the configured forgetting term).
    pub forget: Option<f64>,
    /// The capped immunization KL term (`−mean min(KL, cap)`).
    pub kl_imm: Option<f64>,
    /// Share of counted positions where the cap binds.
    pub kl_cap_rate: Option<f64>,
    /// The refusal term.
    pub refusal: Option<f64>,
    /// The retain term of a harmful step (`adv.retain > 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<f64>,
    /// The contrast term of a harmful step (`adv.contrast > 0`): DPO of `y_c` over `y_r` on
    /// its harmless batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contrast: Option<f64>,
    /// The preference term (DPO, or SFT on `y_c`).
    pub pref: Option<f64>,
    /// The alignment KL.
    pub kl_align: Option<f64>,
    /// Canary stabilization MSE (before `λ_stab`).
    pub stab: Option<f64>,
    /// Mean per-token log-likelihood of `y_h` under the student (perturbed).
    pub harmful_logp: Option<f64>,
    /// Mean per-token log-likelihood of `y_c`.
    pub chosen_logp: Option<f64>,
    /// Mean DPO margin `(ŝ_θ(y_c) − ŝ_B(y_c)) − (ŝ_θ(y_r) − ŝ_B(y_r))`, nats.
    pub dpo_margin: Option<f64>,
    /// LAT attack loss (CE of `y_h`) at `δ = 0`.
    pub lat_loss_start: Option<f64>,
    /// LAT attack loss at the last evaluated `δ`.
    pub lat_loss_end: Option<f64>,
    /// Mean L2 norm of the unperturbed residual stream at the LAT sites (what a relative
    /// `ε` is a fraction of).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat_residual_norm: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate.
    pub lr: f64,
    /// Real tokens processed (all forwards of the step's sequences, prompt included).
    pub tokens: usize,
    /// `tokens` per second of the step's wall time.
    pub tokens_per_s: f64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Canaries in force.
    pub canaries: usize,
}

/// The metrics as a table, one row per optimizer step (nullable columns for terms a step
/// did not compute).
pub fn metrics_frame(rows: &[StepMetrics]) -> PolarsResult<DataFrame> {
    let f = |name: &str, get: &dyn Fn(&StepMetrics) -> Option<f64>| {
        Column::new(
            name.into(),
            rows.iter().map(get).collect::<Vec<Option<f64>>>(),
        )
    };
    let u = |name: &str, get: &dyn Fn(&StepMetrics) -> usize| {
        Column::new(
            name.into(),
            rows.iter().map(|r| get(r) as u64).collect::<Vec<u64>>(),
        )
    };
    let cols = vec![
        u("step", &|r| r.step),
        Column::new(
            "phase".into(),
            rows.iter()
                .map(|r| r.phase.clone())
                .collect::<Vec<String>>(),
        ),
        u("cycle", &|r| r.cycle),
        f("loss", &|r| Some(r.loss)),
        f("forget", &|r| r.forget),
        f("kl_imm", &|r| r.kl_imm),
        f("kl_cap_rate", &|r| r.kl_cap_rate),
        f("refusal", &|r| r.refusal),
        f("retain", &|r| r.retain),
        f("contrast", &|r| r.contrast),
        f("pref", &|r| r.pref),
        f("kl_align", &|r| r.kl_align),
        f("stab", &|r| r.stab),
        f("harmful_logp", &|r| r.harmful_logp),
        f("chosen_logp", &|r| r.chosen_logp),
        f("dpo_margin", &|r| r.dpo_margin),
        f("lat_loss_start", &|r| r.lat_loss_start),
        f("lat_loss_end", &|r| r.lat_loss_end),
        f("lat_residual_norm", &|r| r.lat_residual_norm),
        f("grad_norm", &|r| Some(r.grad_norm)),
        f("lr", &|r| Some(r.lr)),
        u("tokens", &|r| r.tokens),
        f("tokens_per_s", &|r| Some(r.tokens_per_s)),
        f("seconds", &|r| Some(r.seconds)),
        u("canaries", &|r| r.canaries),
    ];
    DataFrame::new(rows.len(), cols)
}

/// Reads `metrics.jsonl`, keeping the steps before `step`.
pub fn read_metrics(path: &Path, before: usize) -> std::io::Result<Vec<StepMetrics>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: StepMetrics = serde_json::from_str(line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {}: {e}", i + 1),
            )
        })?;
        if row.step < before {
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Writes `rows` as `metrics.parquet`, atomically.
pub fn write_parquet(path: &Path, rows: &[StepMetrics]) -> std::io::Result<()> {
    let mut df = metrics_frame(rows).map_err(std::io::Error::other)?;
    antibody_base::atomic::write_with::<std::io::Error>(path, |tmp| {
        let file = File::create(tmp)?;
        ParquetWriter::new(BufWriter::new(file))
            .finish(&mut df)
            .map_err(std::io::Error::other)?;
        Ok(())
    })
}
