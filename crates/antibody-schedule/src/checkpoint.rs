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

use crate::optim::OptimConfig;
use crate::sft::{Adamw, TrainError};

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn io(dir: &Path, what: &str, e: &dyn std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(format!("{}: {what}: {e}", dir.display()))
}

/// Writes a checkpoint of `model`, `optim` and `state` to `dir` atomically.
pub fn save<B: AutodiffBackend, S: Serialize>(
    dir: &Path,
    model: &Llama<B>,
    optim: &Adamw<B>,
    state: &S,
) -> Result<(), TrainError> {
    let staging =
        antibody_fetch::atomic::staging_dir(dir).map_err(|e| io(dir, "staging directory", &e))?;
    model
        .clone()
        .save_file(staging.path().join("model"), &recorder())
        .map_err(|e| io(dir, "weights", &e))?;
    Recorder::<B>::record(
        &recorder(),
        optim.to_record(),
        staging.path().join("optimizer"),
    )
    .map_err(|e| io(dir, "optimizer", &e))?;
    let state = serde_json::to_vec(state).map_err(|e| io(dir, "state", &e))?;
    std::fs::write(staging.path().join("state.json"), state).map_err(|e| io(dir, "state", &e))?;
    antibody_fetch::atomic::replace_dir(staging, dir).map_err(|e| io(dir, "move into place", &e))
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
) -> Result<(Llama<B>, Adamw<B>, S), TrainError> {
    let device = template.device();
    let text = std::fs::read(dir.join("state.json")).map_err(|e| io(dir, "state.json", &e))?;
    let state: S = serde_json::from_slice(&text).map_err(|e| io(dir, "state.json", &e))?;
    let model = template
        .load_file(dir.join("model"), &recorder(), &device)
        .map_err(|e| io(dir, "weights", &e))?;
    let record = Recorder::<B>::load(&recorder(), dir.join("optimizer"), &device)
        .map_err(|e| io(dir, "optimizer", &e))?;
    let optim = optim.adamw().init::<B, Llama<B>>().load_record(record);
    Ok((model, optim, state))
}
