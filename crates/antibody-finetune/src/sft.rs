//! Supervised fine-tuning on `(ids, response mask)` examples: the loop behind breaking a
//! teacher, the refusal-SFT baseline and the evaluation's fine-tuning attacks.
//!
//! One seed fixes the order (a seeded permutation per pass over the data). Each optimizer step
//! takes `batch_size` examples in `optim.accumulation` micro-batches; every micro-batch's loss
//! is its summed response-token NLL divided by the whole step's response-token count, so the
//! accumulated gradient is the full batch's. A non-finite loss stops the run with an error
//! naming the step and the term.

use std::path::Path;
use std::time::Instant;

use antibody_base::Example;
use antibody_losses::{NextTokenTargets, token_logprobs};
use antibody_model::tiny::splitmix64;
use antibody_model::{Hooks, Llama, TokenBatch};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::FinetuneError;
use crate::optim::scaled;
use crate::optim::{Adamw, OptimConfig, apply_step};

/// Fine-tuning settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Optimizer and schedule.
    pub optim: OptimConfig,
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per optimizer step (split into `optim.accumulation` micro-batches).
    pub batch_size: usize,
    /// Seeds the order.
    pub seed: u64,
}

impl FinetuneConfig {
    /// Every setting checked, in one place whatever supplied it; the error's key is the
    /// setting's (`optim.lr`, `batch_size`), which a binary maps to its flag.
    pub fn check(&self) -> Result<(), FinetuneError> {
        self.optim
            .check()
            .map_err(|(key, reason)| FinetuneError::Setting {
                key: format!("optim.{key}"),
                reason,
            })?;
        for (key, v) in [("steps", self.steps), ("batch_size", self.batch_size)] {
            if v == 0 {
                return Err(FinetuneError::Setting {
                    key: key.into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        if self.optim.accumulation > self.batch_size {
            return Err(FinetuneError::Setting {
                key: "optim.accumulation".into(),
                reason: format!(
                    "{} micro-batches cannot split a batch of {}",
                    self.optim.accumulation, self.batch_size
                ),
            });
        }
        Ok(())
    }

    /// [`FinetuneConfig::check`] for settings that came from command-line flags: the error
    /// names the flag (`--lr`), the route that supplied the value.
    pub fn check_flags(&self) -> Result<(), String> {
        self.check().map_err(|e| match e {
            FinetuneError::Setting { key, reason } => {
                let flag = match key.as_str() {
                    "optim.lr" => "--lr",
                    "optim.max_grad_norm" => "--max-grad-norm",
                    "optim.accumulation" => "--accumulation",
                    "batch_size" => "--batch-size",
                    "steps" => "--steps",
                    other => other,
                };
                format!("`{flag}` (command line): {reason}")
            }
            other => other.to_string(),
        })
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// 0-based optimizer step.
    pub step: usize,
    /// Mean response-token NLL of the step's batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Response tokens in the batch.
    pub tokens: usize,
    /// Wall time of the step, seconds.
    pub seconds: f64,
}

/// The order of examples: seeded permutations of `0..n`, one per pass, concatenated.
pub fn order(n: usize, seed: u64, len: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(len);
    let mut pass = 0u64;
    while out.len() < len && n > 0 {
        let mut perm: Vec<usize> = (0..n).collect();
        let mut state = splitmix64(seed ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..n).rev() {
            state = splitmix64(state);
            let j = (state % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        out.extend(perm);
        pass += 1;
    }
    out.truncate(len);
    out
}

/// Where a run stands: what a checkpoint holds besides the weights and optimizer moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done (the data cursor: the order is a function of the seed).
    pub step: usize,
    /// The seed the order came from.
    pub seed: u64,
    /// Examples the order was drawn over.
    pub examples: usize,
}

/// A fine-tuning run that can stop after any step and continue from a checkpoint with the
/// same result, bit for bit, as an uninterrupted run.
pub struct SftRun<B: AutodiffBackend> {
    /// The model.
    pub model: Llama<B>,
    optim: Adamw<B>,
    /// Where the run stands.
    pub state: RunState,
}

impl<B: AutodiffBackend> SftRun<B> {
    /// A fresh run.
    pub fn new(model: Llama<B>, examples: usize, config: &FinetuneConfig) -> Self {
        Self {
            model,
            optim: config.optim.adamw().init::<B, Llama<B>>(),
            state: RunState {
                step: 0,
                seed: config.seed,
                examples,
            },
        }
    }

    /// Writes a checkpoint (see [`crate::checkpoint`]).
    pub fn save(&self, dir: &Path) -> Result<(), FinetuneError> {
        crate::checkpoint::save(dir, &self.model, &self.optim, &self.state)
    }

    /// Saves a checkpoint when the step count is a multiple of `every` or the run is done.
    pub fn save_if_due(
        &self,
        dir: &Path,
        every: usize,
        config: &FinetuneConfig,
    ) -> Result<(), FinetuneError> {
        if self.state.step.is_multiple_of(every.max(1)) || self.state.step == config.steps {
            self.save(dir)?;
        }
        Ok(())
    }

    /// Continues from a checkpoint written by [`SftRun::save`]; `template` supplies the
    /// architecture (its weights are replaced).
    pub fn resume(
        dir: &Path,
        template: Llama<B>,
        config: &FinetuneConfig,
    ) -> Result<Self, FinetuneError> {
        let (model, optim, state): (_, _, RunState) =
            crate::checkpoint::load(dir, template, &config.optim)?;
        if state.seed != config.seed {
            return Err(FinetuneError::Mismatch {
                dir: dir.to_path_buf(),
                reason: format!(
                    "state.json: seed {} differs from the configured {}",
                    state.seed, config.seed
                ),
            });
        }
        Ok(Self {
            model,
            optim,
            state,
        })
    }

    /// Runs optimizer steps until `config.steps` (or `stop_after` more steps, if given).
    pub fn run(
        &mut self,
        examples: &[Example],
        config: &FinetuneConfig,
        stop_after: Option<usize>,
        mut on_step: impl FnMut(&StepLog, &Self) -> Result<(), FinetuneError>,
    ) -> Result<(), FinetuneError> {
        if examples.is_empty() {
            return Err(FinetuneError::NoExamples);
        }
        config.check()?;
        if examples.len() != self.state.examples {
            return Err(FinetuneError::Setting {
                key: "examples".into(),
                reason: format!(
                    "the run was started on {} examples, not {}",
                    self.state.examples,
                    examples.len()
                ),
            });
        }
        let pad = self.model.config.pad_token_id;
        let order = order(
            examples.len(),
            config.seed,
            config.steps * config.batch_size,
        );
        let end = stop_after.map_or(config.steps, |n| (self.state.step + n).min(config.steps));
        while self.state.step < end {
            let step = self.state.step;
            let started = Instant::now();
            let (batch, count) = batch_at(examples, &order, step, config.batch_size, pad)?;
            let (grads, loss_sum) =
                batch_gradients(&self.model, |m| m.clone(), &batch, count, config, step)?;
            let lr = config.optim.lr_at(step, config.steps);
            let (model, grad_norm) = apply_step(
                self.model.clone(),
                &mut self.optim,
                grads,
                &config.optim,
                lr,
                step,
                config.optim.loss_scale_for(self.model.compute_dtype),
            )?;
            self.model = model;
            self.state.step += 1;
            let log = StepLog {
                step,
                loss: loss_sum,
                grad_norm,
                lr,
                tokens: count as usize,
                seconds: started.elapsed().as_secs_f64(),
            };
            on_step(&log, self)?;
        }
        Ok(())
    }
}

/// Step `step`'s examples (the seeded `order`'s next `batch_size`) and their response-token
/// count; a batch without response tokens is refused.
pub(crate) fn batch_at(
    examples: &[Example],
    order: &[usize],
    step: usize,
    batch_size: usize,
    pad: u32,
) -> Result<(Vec<Example>, f32), FinetuneError> {
    let chunk = &order[step * batch_size..(step + 1) * batch_size];
    let batch: Vec<Example> = chunk.iter().map(|&i| examples[i].clone()).collect();
    let count: f32 = NextTokenTargets::new(&batch, pad).mask.iter().sum();
    if count == 0.0 {
        return Err(FinetuneError::EmptyBatch { step });
    }
    Ok((batch, count))
}

/// The accumulated gradient of one optimizer step's batch for the parameters of `trainable`,
/// and the batch's mean response-token NLL: `forward` makes the model each micro-batch
/// runs through (the trainable model itself, or the base with adapters merged), every
/// micro-batch's summed NLL divided by the whole batch's `count`. A non-finite loss is
/// refused, naming `step`.
pub(crate) fn batch_gradients<B, M>(
    trainable: &M,
    forward: impl Fn(&M) -> Llama<B>,
    batch: &[Example],
    count: f32,
    config: &FinetuneConfig,
    step: usize,
) -> Result<(GradientsParams, f64), FinetuneError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let micro = batch.len().div_ceil(config.optim.accumulation);
    let mut acc = GradientsAccumulator::<M>::new();
    let mut loss_sum = 0.0f64;
    for part in batch.chunks(micro.max(1)) {
        let model = forward(trainable);
        let (device, pad) = (model.device(), model.config.pad_token_id);
        let t = NextTokenTargets::new(part, pad);
        let ids: Vec<Vec<u32>> = part.iter().map(|e| e.ids.clone()).collect();
        let (logits, _) = model.forward(&TokenBatch::right_padded(&ids, pad), &Hooks::none())?;
        let nll =
            token_logprobs(logits, t.targets_tensor(&device)).neg() * t.mask_tensor::<B>(&device);
        let loss = nll.sum() / count;
        let loss_scale = config.optim.loss_scale_for(model.compute_dtype);
        let value = loss
            .clone()
            .into_data()
            .to_vec::<f32>()
            .map_or(f32::NAN, |v| v[0]);
        if !value.is_finite() {
            return Err(FinetuneError::NonFinite {
                step,
                term: "sft".into(),
                value: f64::from(value),
            });
        }
        loss_sum += f64::from(value);
        acc.accumulate(
            trainable,
            GradientsParams::from_grads(scaled(loss, loss_scale).backward(), trainable),
        );
    }
    Ok((acc.grads(), loss_sum))
}

/// Fine-tunes `model` on `examples` in one go; `on_step` sees every step's log.
pub fn finetune<B: AutodiffBackend>(
    model: Llama<B>,
    examples: &[Example],
    config: &FinetuneConfig,
    mut on_step: impl FnMut(&StepLog),
) -> Result<Llama<B>, FinetuneError> {
    let mut run = SftRun::new(model, examples.len(), config);
    run.run(examples, config, None, |log, _| {
        on_step(log);
        Ok(())
    })?;
    Ok(run.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_seeded_and_covers_each_pass() {
        let a = order(5, 1, 12);
        assert_eq!(a, order(5, 1, 12));
        assert_ne!(a, order(5, 2, 12));
        let mut first: Vec<usize> = a[..5].to_vec();
        first.sort_unstable();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        assert_eq!(a.len(), 12);
    }
}
