//! LoRA: fine-tuning through low-rank updates of chosen projections, the base weights frozen
//! (Hu et al., 2021; the parameter-efficient attack of TamperBench's protocol).
//!
//! Each targeted projection `W` (burn's layout, `[in, out]`, `y = x·W`) gets `A: [in, r]` and
//! `B: [r, out]` and runs as `W + (α/r)·A·B`. `A` starts uniform in `±1/√in` (PEFT's
//! `kaiming_uniform(a=√5)`), `B` at zero, so the adapted model starts as the base. No dropout:
//! the run is a function of its seed.
//!
//! The adapters are merged into a copy of the base for every forward pass — the same
//! function as PEFT's separate low-rank branch, `x·W + (α/r)·(x·A)·B`, and the gradient
//! reaches `A` and `B` through the merge. The merge costs `2·r·in·out` FLOP per projection,
//! under 1% of a step's forward and backward at the attack's batch; what the run returns is
//! the merged model (PEFT's `merge_and_unload`).

use std::time::Instant;

use antibody_base::Example;
use antibody_base::hash::splitmix64;
use antibody_model::Llama;
use antibody_model::llama::DecoderLayer;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::FinetuneError;
use crate::optim::apply_step;
use crate::sft::{FinetuneConfig, StepLog, batch_at, batch_gradients, order};

/// A projection of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl Projection {
    /// Every projection of a layer, attention then MLP.
    pub const ALL: [Self; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// This projection of `layer`.
    pub fn of<B: Backend>(self, layer: &DecoderLayer<B>) -> &Linear<B> {
        match self {
            Self::QProj => &layer.self_attn.q_proj,
            Self::KProj => &layer.self_attn.k_proj,
            Self::VProj => &layer.self_attn.v_proj,
            Self::OProj => &layer.self_attn.o_proj,
            Self::GateProj => &layer.mlp.gate_proj,
            Self::UpProj => &layer.mlp.up_proj,
            Self::DownProj => &layer.mlp.down_proj,
        }
    }

    fn of_mut<B: Backend>(self, layer: &mut DecoderLayer<B>) -> &mut Linear<B> {
        match self {
            Self::QProj => &mut layer.self_attn.q_proj,
            Self::KProj => &mut layer.self_attn.k_proj,
            Self::VProj => &mut layer.self_attn.v_proj,
            Self::OProj => &mut layer.self_attn.o_proj,
            Self::GateProj => &mut layer.mlp.gate_proj,
            Self::UpProj => &mut layer.mlp.up_proj,
            Self::DownProj => &mut layer.mlp.down_proj,
        }
    }
}

fn all_projections() -> Vec<Projection> {
    Projection::ALL.to_vec()
}

/// The adapter's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of every update.
    pub rank: usize,
    /// `α`: the update is scaled by `α/r`.
    pub alpha: f64,
    /// The projections adapted in every layer (default: all seven).
    #[serde(default = "all_projections")]
    pub targets: Vec<Projection>,
}

impl LoraConfig {
    /// Every setting checked; the error's key is the setting's (`lora.rank`).
    pub fn check(&self) -> Result<(), FinetuneError> {
        let bad = |key: &str, reason: String| FinetuneError::Setting {
            key: format!("lora.{key}"),
            reason,
        };
        if self.rank == 0 {
            return Err(bad("rank", "must be at least 1".into()));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(bad(
                "alpha",
                format!("must be positive and finite, got {}", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(bad("targets", "name at least one projection".into()));
        }
        Ok(())
    }

    /// `α/r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One projection's update `A·B`.
#[derive(Module, Debug)]
pub struct Adapter<B: Backend> {
    /// `[in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]`.
    pub b: Param<Tensor<B, 2>>,
}

/// The adapters of every layer: the trainable module of a LoRA run.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Layer-major, in the order of `targets` within a layer.
    pub adapters: Vec<Adapter<B>>,
    /// The projections adapted in every layer.
    #[module(skip)]
    pub targets: Vec<Projection>,
    /// `α/r`.
    #[module(skip)]
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// Fresh adapters for `model`: `A` seeded uniform in `±1/√in`, `B` zero.
    pub fn new(model: &Llama<B>, config: &LoraConfig, seed: u64) -> Self {
        let device = model.device();
        let r = config.rank;
        let mut state = splitmix64(seed ^ 0x4C6F_5241);
        let mut adapters = Vec::new();
        for layer in &model.model.layers {
            for &t in &config.targets {
                let [d_in, d_out] = t.of(layer).weight.dims();
                let bound = 1.0 / (d_in as f64).sqrt();
                let a: Vec<f32> = (0..d_in * r)
                    .map(|_| {
                        state = splitmix64(state);
                        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                        ((2.0 * u - 1.0) * bound) as f32
                    })
                    .collect();
                adapters.push(Adapter {
                    a: Param::from_tensor(Tensor::from_data(
                        TensorData::new(a, [d_in, r]),
                        &device,
                    )),
                    b: Param::from_tensor(Tensor::zeros([r, d_out], &device)),
                });
            }
        }
        Self {
            adapters,
            targets: config.targets.clone(),
            scale: config.scale(),
        }
    }

    /// `base` with every adapter merged: `W ← W + (α/r)·A·B` on the targeted projections,
    /// every other weight shared with `base`. On an autodiff backend the merged weights stay
    /// in the graph, so a loss of the merged model differentiates into `A` and `B`.
    pub fn merge(&self, base: &Llama<B>) -> Llama<B> {
        let mut merged = base.clone();
        let mut adapters = self.adapters.iter();
        for layer in &mut merged.model.layers {
            for &t in &self.targets {
                let Some(ad) = adapters.next() else {
                    return merged;
                };
                let linear = t.of_mut(layer);
                let delta = ad.a.val().matmul(ad.b.val()) * self.scale;
                linear.weight = Param::initialized(linear.weight.id, linear.weight.val() + delta);
            }
        }
        merged
    }
}

/// Fine-tunes `model` through LoRA adapters on `examples` (the SFT objective and order of
/// [`crate::finetune`], the base frozen); returns the base with the trained adapters merged.
pub fn lora_finetune<B: AutodiffBackend>(
    model: Llama<B>,
    examples: &[Example],
    config: &FinetuneConfig,
    lora: &LoraConfig,
    mut on_step: impl FnMut(&StepLog),
) -> Result<Llama<B>, FinetuneError> {
    if examples.is_empty() {
        return Err(FinetuneError::NoExamples);
    }
    config.check()?;
    lora.check()?;
    let base = model.no_grad();
    let pad = base.config.pad_token_id;
    let mut adapters = Lora::new(&base, lora, config.seed);
    let mut optim = config.optim.adamw().init::<B, Lora<B>>();
    let order = order(
        examples.len(),
        config.seed,
        config.steps * config.batch_size,
    );
    for step in 0..config.steps {
        let started = Instant::now();
        let (batch, count) = batch_at(examples, &order, step, config.batch_size, pad)?;
        let (grads, loss) =
            batch_gradients(&adapters, |l| l.merge(&base), &batch, count, config, step)?;
        let lr = config.optim.lr_at(step, config.steps);
        let loss_scale = config.optim.loss_scale_for(base.compute_dtype);
        let (next, grad_norm) = apply_step(
            adapters,
            &mut optim,
            grads,
            &config.optim,
            lr,
            step,
            loss_scale,
        )?;
        adapters = next;
        on_step(&StepLog {
            step,
            loss,
            grad_norm,
            lr,
            tokens: count as usize,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(adapters.merge(&base))
}
