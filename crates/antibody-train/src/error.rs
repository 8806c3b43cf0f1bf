//! [`TrainError`]: what stops the method's loop, typed.

use antibody_finetune::FinetuneError;
use antibody_lat::LatError;
use antibody_model::ModelError;

/// What can stop the method's loop once it runs.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The generic part of a step failed (non-finite term, empty batch, checkpoint).
    #[error(transparent)]
    Finetune(#[from] FinetuneError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The latent attack failed.
    #[error(transparent)]
    Lat(#[from] LatError),
    /// A phase has steps but no data.
    #[error("no {phase} training examples")]
    NoExamples {
        /// `harmful` or `harmless`.
        phase: &'static str,
    },
    /// A setting the data cannot serve (`key` names it).
    #[error("`train.{key}`: {reason}")]
    Setting {
        /// The key under `[train]`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Every term of a phase's loss has weight 0.
    #[error("`train.{section}`: every term of the loss has weight 0")]
    NoTerms {
        /// `adv` or `align`.
        section: &'static str,
    },
    /// A checkpoint of another run (seed or data) than the one resuming it.
    #[error("the checkpoint was written {written}, not {configured}")]
    Resume {
        /// What the checkpoint says.
        written: String,
        /// What the configuration and data say.
        configured: String,
    },
    /// Canaries were asked for before their baseline was measured (a plan without a
    /// baseline event: a bug).
    #[error("canaries without a baseline")]
    NoBaseline,
}

/// A non-finite term stops the run, naming the step and the term.
pub(crate) fn check(step: usize, term: &str, value: f64) -> Result<(), TrainError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(FinetuneError::NonFinite {
            step,
            term: term.into(),
            value,
        }
        .into())
    }
}
