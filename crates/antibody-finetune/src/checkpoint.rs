//! Checkpoints of a training run: weights with their parameter ids (`model.mpk`), the
//! optimizer's moments (`optimizer.mpk`; a run with one optimizer per phase adds
//! `optimizer.1.mpk`) and the run's own state (`state.json`), staged in a
//! sibling directory and swapped in whole, so a directory that exists is complete.
//!
//! The records are encoded in memory (burn's named MessagePack, the bytes its file recorder
//! writes) and written by this module, so a failed write reports the file system's own error
//! (a full disk as such) rather than the encoder's.

use std::path::Path;

use antibody_base::atomic::{describe, write_new};
use antibody_model::Llama;
use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::optim::{Adamw, OptimConfig};
use crate::{CheckpointPart, FinetuneError};

fn recorder() -> NamedMpkBytesRecorder<FullPrecisionSettings> {
    NamedMpkBytesRecorder::new()
}

fn fail(dir: &Path, part: CheckpointPart, reason: String) -> FinetuneError {
    FinetuneError::Checkpoint {
        dir: dir.to_path_buf(),
        part,
        reason,
    }
}

fn io(dir: &Path, part: CheckpointPart) -> impl Fn(std::io::Error) -> FinetuneError + '_ {
    move |e| fail(dir, part, describe(&e))
}

fn other(
    dir: &Path,
    part: CheckpointPart,
) -> impl Fn(&dyn std::fmt::Display) -> FinetuneError + '_ {
    move |e| fail(dir, part, e.to_string())
}

/// Writes a checkpoint of `model`, `optim` and `state` to `dir` atomically.
pub fn save<B: AutodiffBackend, S: Serialize>(
    dir: &Path,
    model: &Llama<B>,
    optim: &Adamw<B>,
    state: &S,
) -> Result<(), FinetuneError> {
    save_all(dir, model, &[optim], state)
}

/// The file of the `i`-th optimizer: `optimizer.mpk`, then `optimizer.1.mpk`, ...
fn optimizer_file(i: usize) -> String {
    if i == 0 {
        "optimizer.mpk".into()
    } else {
        format!("optimizer.{i}.mpk")
    }
}

/// Writes a checkpoint of `model`, every optimizer of `optims` (a run whose phases keep their
/// own moments has one per phase) and `state` to `dir` atomically.
pub fn save_all<B: AutodiffBackend, S: Serialize>(
    dir: &Path,
    model: &Llama<B>,
    optims: &[&Adamw<B>],
    state: &S,
) -> Result<(), FinetuneError> {
    let staging =
        antibody_base::atomic::staging_dir(dir).map_err(io(dir, CheckpointPart::Staging))?;
    let weights = Recorder::<B>::record(&recorder(), model.clone().into_record(), ())
        .map_err(|e| other(dir, CheckpointPart::Weights)(&e))?;
    write_new(&staging.path().join("model.mpk"), &weights)
        .map_err(io(dir, CheckpointPart::Weights))?;
    for (i, optim) in optims.iter().enumerate() {
        let moments = Recorder::<B>::record(&recorder(), optim.to_record(), ())
            .map_err(|e| other(dir, CheckpointPart::Optimizer)(&e))?;
        write_new(&staging.path().join(optimizer_file(i)), &moments)
            .map_err(io(dir, CheckpointPart::Optimizer))?;
    }
    let state = serde_json::to_vec(state).map_err(|e| other(dir, CheckpointPart::State)(&e))?;
    write_new(&staging.path().join("state.json"), &state)
        .map_err(io(dir, CheckpointPart::State))?;
    antibody_base::atomic::replace_dir(staging, dir).map_err(io(dir, CheckpointPart::Swap))
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
    let (model, mut optims, state) = load_all(dir, template, optim, 1)?;
    let optim = optims
        .pop()
        .ok_or_else(|| fail(dir, CheckpointPart::Optimizer, "no optimizer state".into()))?;
    Ok((model, optim, state))
}

/// A checkpoint read back: the weights, the optimizers and the run's state.
pub type Loaded<B, S> = (Llama<B>, Vec<Adamw<B>>, S);

/// Reads a checkpoint written by [`save_all`] with `count` optimizers.
pub fn load_all<B: AutodiffBackend, S: DeserializeOwned>(
    dir: &Path,
    template: Llama<B>,
    optim: &OptimConfig,
    count: usize,
) -> Result<Loaded<B, S>, FinetuneError> {
    let device = template.device();
    let text = std::fs::read(dir.join("state.json")).map_err(io(dir, CheckpointPart::State))?;
    let state: S =
        serde_json::from_slice(&text).map_err(|e| other(dir, CheckpointPart::State)(&e))?;
    let weights = std::fs::read(dir.join("model.mpk")).map_err(io(dir, CheckpointPart::Weights))?;
    let record = Recorder::<B>::load(&recorder(), weights, &device)
        .map_err(|e| other(dir, CheckpointPart::Weights)(&e))?;
    let model = template.load_record(record);
    let mut optims = Vec::with_capacity(count);
    for i in 0..count {
        let file = optimizer_file(i);
        let moments = std::fs::read(dir.join(&file)).map_err(|e| {
            fail(
                dir,
                CheckpointPart::Optimizer,
                format!("{file}: {}", describe(&e)),
            )
        })?;
        let record = Recorder::<B>::load(&recorder(), moments, &device)
            .map_err(|e| other(dir, CheckpointPart::Optimizer)(&e))?;
        optims.push(optim.adamw().init::<B, Llama<B>>().load_record(record));
    }
    Ok((model, optims, state))
}
