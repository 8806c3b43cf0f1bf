//! [`FinetuneError`]: what stops a fine-tuning loop, with the step, term, file or setting.

use std::path::PathBuf;

use antibody_model::ModelError;

/// The part of a checkpoint an I/O error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointPart {
    /// The staging directory beside the checkpoint.
    Staging,
    /// `model.mpk`.
    Weights,
    /// `optimizer.mpk`.
    Optimizer,
    /// `state.json`.
    State,
    /// The swap of the staged checkpoint into place.
    Swap,
}

impl std::fmt::Display for CheckpointPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Staging => "staging directory",
            Self::Weights => "weights (model.mpk)",
            Self::Optimizer => "optimizer moments (optimizer.mpk)",
            Self::State => "state.json",
            Self::Swap => "moving the checkpoint into place",
        })
    }
}

/// What can stop a fine-tuning loop.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// There is nothing to train on.
    #[error("no training examples")]
    NoExamples,
    /// A setting that cannot work (`key` names it).
    #[error("`{key}`: {reason}")]
    Setting {
        /// The setting (`batch_size`, `optim.accumulation`).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A step's batch has no response token to learn from.
    #[error("step {step}: the batch has no response tokens")]
    EmptyBatch {
        /// The optimizer step.
        step: usize,
    },
    /// A loss term became NaN or infinite.
    #[error("step {step}: loss term `{term}` is not finite ({value})")]
    NonFinite {
        /// The optimizer step.
        step: usize,
        /// The loss term.
        term: String,
        /// Its value.
        value: f64,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Writing or reading a checkpoint failed.
    #[error("checkpoint {}: {part}: {reason}", dir.display())]
    Checkpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Which part.
        part: CheckpointPart,
        /// What the file system, recorder or parser reported.
        reason: String,
    },
    /// A checkpoint written by another run (seed, data) than the one resuming it.
    #[error("checkpoint {}: {reason}", dir.display())]
    Mismatch {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Writing a run's log or metrics failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
