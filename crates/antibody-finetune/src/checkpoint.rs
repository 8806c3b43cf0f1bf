//! Checkpoints of a training run: weights with their parameter ids (`model.mpk`), the
//! optimizer's moments (`optimizer.mpk`) and the run's own state (`state.json`), staged in a
//! sibling directory and swapped in whole, so a directory that exists is complete.

use std::path::Path;

use antibody_model::Llama;
use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::optim::{Adamw, OptimConfig};
use crate::{CheckpointPart, FinetuneError};

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn io(dir: &Path, part: CheckpointPart, e: &dyn std::fmt::Display) -> FinetuneError {
    FinetuneError::Checkpoint {
        dir: dir.to_path_buf(),
        part,
        reason: e.to_string(),
    }
}

/// Writes a checkpoint of `model`, `optim` and `state` to `dir` atomically.
pub fn save<B: AutodiffBackend, S: Serialize>(
    dir: &Path,
    model: &Llama<B>,
    optim: &Adamw<B>,
    state: &S,
) -> Result<(), FinetuneError> {
    let staging = antibody_base::atomic::staging_dir(dir)
        .map_err(|e| io(dir, CheckpointPart::Staging, &e))?;
    model
        .clone()
        .save_file(staging.path().join("model"), &recorder())
        .map_err(|e| io(dir, CheckpointPart::Weights, &e))?;
    Recorder::<B>::record(
        &recorder(),
        optim.to_record(),
        staging.path().join("optimizer"),
    )
    .map_err(|e| io(dir, CheckpointPart::Optimizer, &e))?;
    let state = serde_json::to_vec(state).map_err(|e| io(dir, CheckpointPart::State, &e))?;
    std::fs::write(staging.path().join("state.json"), state)
        .map_err(|e| io(dir, CheckpointPart::State, &e))?;
    antibody_base::atomic::replace_dir(staging, dir).map_err(|e| io(dir, CheckpointPart::Swap, &e))
}

/// Whether `dir` holds a complete checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join("state.json").is_file()
}

/// Reads a checkpoint written by [`save`]; `template` supplies the architecture.
pub fn load<B: AutodiffBackend, S: DeserializeOwned>(
    dir: &Path,
    template: Llama<B>,
    optim: &OptimConfig,
) -> Result<(Llama<B>, Adamw<B>, S), FinetuneError> {
    let device = template.device();
    let text =
        std::fs::read(dir.join("state.json")).map_err(|e| io(dir, CheckpointPart::State, &e))?;
    let state: S = serde_json::from_slice(&text).map_err(|e| io(dir, CheckpointPart::State, &e))?;
    let model = template
        .load_file(dir.join("model"), &recorder(), &device)
        .map_err(|e| io(dir, CheckpointPart::Weights, &e))?;
    let record = Recorder::<B>::load(&recorder(), dir.join("optimizer"), &device)
        .map_err(|e| io(dir, CheckpointPart::Optimizer, &e))?;
    let optim = optim.adamw().init::<B, Llama<B>>().load_record(record);
    Ok((model, optim, state))
}
