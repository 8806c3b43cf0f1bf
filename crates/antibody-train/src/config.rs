//! The `[train]` section: the method's run, every setting in one serde struct with
//! `deny_unknown_fields`, its defaults written here, and checks that name the file and the
//! dotted key at fault before any work starts.

use std::path::{Path, PathBuf};

pub use antibody_base::ConfigError;
use antibody_base::{ModelSpec, load_section};
use antibody_lat::LatConfig;
use antibody_losses::{AdvConfig, AlignConfig};
use serde::{Deserialize, Serialize};

use antibody_finetune::OptimConfig;

/// How harmful and harmless phases are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `cycles` × (harmful phase → canaries → harmless phase): the method's default.
    Cyclic,
    /// All harmful steps, then canaries, then all harmless steps.
    Sequential,
    /// Harmful and harmless steps interleaved evenly at the ratio
    /// `harmful_steps : harmless_steps`, canaries refreshed every `mixed_refresh_every` steps.
    Mixed,
}

/// How the optimizer's state (AdamW's moments) crosses a phase boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerState {
    /// One AdamW for the whole run: a phase starts with the other phase's momentum.
    Shared,
    /// One AdamW per phase, each keeping its moments from one of its phases to the next.
    PerPhase,
    /// Fresh moments at the first step of every phase block.
    Reset,
}

/// The span the learning-rate schedule (warmup, then decay) runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScope {
    /// All optimizer steps of the run.
    Run,
    /// The steps of each cycle (mixed: each canary window), restarted every cycle.
    Cycle,
    /// The steps of each phase within a cycle, restarted at every phase block.
    Phase,
}

/// Which model's activations `A_target` is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryTarget {
    /// The just-hardened model (after the harmful phase): stabilization holds the new state.
    Post,
    /// The model before the harmful phase (or refresh window): stabilization pulls the
    /// canaries' harmless activations back to where they were.
    Pre,
}

/// How drifts are compared across sites before the quantile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftScale {
    /// `|A_post − A_pre|` as is.
    Absolute,
    /// Divided by the root mean square of the site's `A_pre`
    /// ([`antibody_canary::normalized_drift`]).
    Normalized,
}

/// Canary identification and stabilization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// Identify canaries and add `λ_stab·L_stab` (`align.lambda_stab`) in harmless steps.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Canaries are the neurons whose drift exceeds this quantile of all drifts.
    #[serde(default = "q")]
    pub q: f64,
    /// Harmful prompts (of `harmful_train`, a seeded sample) for `A_pre`/`A_post`.
    #[serde(default = "sample")]
    pub harmful_sample: usize,
    /// Harmless examples (of `harmless_train`) whose `x ++ y_c` give `A_target` (the token
    /// population `A_current` is averaged over in harmless steps).
    #[serde(default = "sample")]
    pub harmless_sample: usize,
    /// Prompts per forward while measuring.
    #[serde(default = "measure_batch")]
    pub batch_size: usize,
    /// Bins of the drift histogram in the per-cycle report.
    #[serde(default = "bins")]
    pub histogram_bins: usize,
    /// Which model `A_target` comes from.
    #[serde(default = "post")]
    pub target: CanaryTarget,
    /// How drifts are scaled before the quantile.
    #[serde(default = "absolute")]
    pub drift: DriftScale,
}

impl DriftScale {
    /// The drifts between `pre` and `post` on this scale.
    pub fn drift(
        self,
        pre: &antibody_canary::Activations,
        post: &antibody_canary::Activations,
    ) -> std::collections::BTreeMap<antibody_model::Site, Vec<f32>> {
        match self {
            Self::Absolute => antibody_canary::drift(pre, post),
            Self::Normalized => antibody_canary::normalized_drift(pre, post),
        }
    }
}

fn post() -> CanaryTarget {
    CanaryTarget::Post
}
fn absolute() -> DriftScale {
    DriftScale::Absolute
}

fn yes() -> bool {
    true
}
fn q() -> f64 {
    0.99
}
fn sample() -> usize {
    32
}
fn measure_batch() -> usize {
    8
}
fn bins() -> usize {
    20
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            q: q(),
            harmful_sample: sample(),
            harmless_sample: sample(),
            batch_size: measure_batch(),
            histogram_bins: bins(),
            target: post(),
            drift: absolute(),
        }
    }
}

/// The `[train]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The run directory (relative to the configuration file's directory).
    pub run_dir: PathBuf,
    /// The model to harden (`patient`, `tiny[:SEED]`, a checkpoint path).
    pub student: String,
    /// The harmful teacher π_H.
    pub harmful_teacher: String,
    /// The benign teacher π_B.
    pub benign_teacher: String,
    /// The schedule.
    #[serde(default = "cyclic")]
    pub schedule: ScheduleKind,
    /// Cycles (cyclic); sequential and mixed run `cycles ×` the per-phase steps in all.
    #[serde(default = "one")]
    pub cycles: usize,
    /// Optimizer steps per harmful phase.
    pub harmful_steps: usize,
    /// Optimizer steps per harmless phase.
    pub harmless_steps: usize,
    /// Mixed schedule: refresh the canaries every this many optimizer steps.
    #[serde(default = "refresh")]
    pub mixed_refresh_every: usize,
    /// Examples per optimizer step (split into `optim.accumulation` micro-batches).
    pub batch_size: usize,
    /// Drives the order of both datasets and the canary samples (LAT is deterministic).
    #[serde(default)]
    pub seed: u64,
    /// Vocabulary slice of the fused head losses (memory against speed).
    #[serde(default = "chunk")]
    pub vocab_chunk: usize,
    /// Checkpoint every this many optimizer steps (and at every phase end).
    #[serde(default = "every")]
    pub checkpoint_every: usize,
    /// Optimizer and learning-rate schedule (over the span `lr_scope` names).
    pub optim: OptimConfig,
    /// How AdamW's moments cross a phase boundary.
    #[serde(default = "shared")]
    pub optimizer_state: OptimizerState,
    /// The span the learning-rate schedule runs over.
    #[serde(default = "run_scope")]
    pub lr_scope: LrScope,
    /// The harmful phase's loss.
    #[serde(default)]
    pub adv: AdvConfig,
    /// The harmless phase's loss.
    #[serde(default)]
    pub align: AlignConfig,
    /// Latent adversarial training in the harmful phase.
    pub lat: LatConfig,
    /// Canaries.
    #[serde(default)]
    pub canary: CanaryConfig,
}

fn cyclic() -> ScheduleKind {
    ScheduleKind::Cyclic
}
fn shared() -> OptimizerState {
    OptimizerState::Shared
}
fn run_scope() -> LrScope {
    LrScope::Run
}
fn one() -> usize {
    1
}
fn refresh() -> usize {
    10
}
fn chunk() -> usize {
    8192
}
fn every() -> usize {
    10
}

impl TrainConfig {
    /// Optimizers a run keeps (and its checkpoints hold): two when each phase has its own.
    pub fn optimizers(&self) -> usize {
        if self.optimizer_state == OptimizerState::PerPhase {
            2
        } else {
            1
        }
    }
}

/// A loaded `[train]` section with its paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Train {
    /// The configuration file.
    pub file: PathBuf,
    /// The section (defaults filled in).
    pub config: TrainConfig,
    /// The run directory, resolved.
    pub run_dir: PathBuf,
    /// The student.
    pub student: ModelSpec,
    /// π_H.
    pub harmful_teacher: ModelSpec,
    /// π_B.
    pub benign_teacher: ModelSpec,
}

impl Train {
    /// Reads the `[train]` section of `file`, with `overrides` (`key=value`, TOML values,
    /// keys relative to `[train]` or starting with `train.`) applied first.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let config = load_section(file, "train", overrides)?;
        Self::from_config(file, config)
            .map_err(|e| antibody_base::config::attribute(e, "train", overrides))
    }

    /// Checks a section that came from `file`.
    pub fn from_config(file: &Path, config: TrainConfig) -> Result<Self, ConfigError> {
        let bad =
            |key: &str, reason: String| ConfigError::new(file, format!("train.{key}"), reason);
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let model = |key: &str, s: &str| -> Result<ModelSpec, ConfigError> {
            s.parse::<ModelSpec>()
                .map(|m| m.resolved_against(&dir))
                .map_err(|e| bad(key, e.to_string()))
        };
        let student = model("student", &config.student)?;
        let harmful_teacher = model("harmful_teacher", &config.harmful_teacher)?;
        let benign_teacher = model("benign_teacher", &config.benign_teacher)?;
        for (key, v) in [
            ("cycles", config.cycles),
            ("batch_size", config.batch_size),
            ("vocab_chunk", config.vocab_chunk),
            ("checkpoint_every", config.checkpoint_every),
            ("mixed_refresh_every", config.mixed_refresh_every),
            ("lat.steps", config.lat.steps),
            ("canary.batch_size", config.canary.batch_size),
            ("canary.harmful_sample", config.canary.harmful_sample),
            ("canary.harmless_sample", config.canary.harmless_sample),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if config.harmful_steps + config.harmless_steps == 0 {
            return Err(bad(
                "harmful_steps",
                "harmful_steps and harmless_steps are both 0: nothing to train".into(),
            ));
        }
        if config.optim.accumulation > config.batch_size {
            return Err(bad(
                "optim.accumulation",
                format!(
                    "{} micro-batches cannot split a batch of {}",
                    config.optim.accumulation, config.batch_size
                ),
            ));
        }
        let unit = |key: &str, v: f64| -> Result<(), ConfigError> {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(bad(key, format!("must be in [0, 1], got {v}")))
            }
        };
        unit("canary.q", config.canary.q)?;
        unit("adv.gamma", config.adv.gamma)?;
        unit("align.alpha", config.align.alpha)?;
        let positive = |key: &str, v: f64| -> Result<(), ConfigError> {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(bad(key, format!("must be positive, got {v}")))
            }
        };
        config
            .optim
            .check()
            .map_err(|(key, reason)| bad(&format!("optim.{key}"), reason))?;
        positive("adv.beta", config.adv.beta)?;
        positive("align.beta", config.align.beta)?;
        positive("adv.kl_cap", config.adv.kl_cap)?;
        if !(config.lat.epsilon >= 0.0 && config.lat.epsilon.is_finite()) {
            return Err(bad(
                "lat.epsilon",
                format!("must be finite and >= 0, got {}", config.lat.epsilon),
            ));
        }
        // Every term weight, named by its own key.
        for (key, w) in [
            ("adv.rho", config.adv.rho),
            ("adv.retain", config.adv.retain),
            ("adv.contrast", config.adv.contrast),
            ("align.lambda_stab", config.align.lambda_stab),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(bad(
                    key,
                    format!("weights must be finite and >= 0, got {w}"),
                ));
            }
        }
        let run_dir = dir.join(&config.run_dir);
        Ok(Self {
            file: file.to_path_buf(),
            config,
            run_dir,
            student,
            harmful_teacher,
            benign_teacher,
        })
    }

    /// An error about `key` (relative to `[train]`) of this file.
    pub fn error(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, format!("train.{key}"), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A negative or non-finite term weight is refused, naming its own key and value.
    #[test]
    fn each_term_weight_is_checked_under_its_own_key() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml");
        assert!(Train::load(&file, &[]).is_ok(), "the default config loads");
        for key in ["adv.rho", "adv.retain", "adv.contrast", "align.lambda_stab"] {
            for value in ["-1.0", "nan"] {
                let err = Train::load(&file, &[format!("{key}={value}")])
                    .err()
                    .unwrap_or_else(|| panic!("{key}={value} was accepted"))
                    .to_string();
                assert!(
                    err.contains(&format!("train.{key}")),
                    "{key}={value}: {err}"
                );
                assert!(err.contains("finite and >= 0"), "{key}={value}: {err}");
            }
        }
    }
}
