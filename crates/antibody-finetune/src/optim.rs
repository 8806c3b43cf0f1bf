//! Optimizer settings, learning-rate schedule, global-norm clipping and accumulation.

use antibody_model::Llama;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::FinetuneError;

/// The optimizer of every loop: AdamW over the Llama model.
pub type Adamw<B> = OptimizerAdaptor<AdamW, Llama<B>, B>;

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Constant after warmup.
    Constant,
    /// Linear to `min_lr_ratio · lr` at the last step.
    Linear,
    /// Half-cosine to `min_lr_ratio · lr` at the last step.
    Cosine,
}

/// Optimizer settings (AdamW), with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps from 0 to `lr`.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decay after warmup.
    #[serde(default = "cosine")]
    pub decay: Decay,
    /// Final learning rate as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (PyTorch's AdamW default 0.01; burn's is 1e-4).
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// Adam's β₁, β₂.
    #[serde(default = "betas")]
    pub betas: [f64; 2],
    /// Adam's ε (PyTorch's default 1e-8; burn's is 1e-5).
    #[serde(default = "eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this (none when absent).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub accumulation: usize,
    /// Static loss scale for a model computing in f16: the loss is multiplied by it before
    /// the backward pass and the gradients divided by it before clipping, so that small
    /// gradients of the half-precision branches do not flush to zero. Absent: 1024 for f16,
    /// 1 otherwise ([`OptimConfig::loss_scale_for`]). A step whose scaled gradients overflow
    /// is refused with an error that says to lower it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

fn cosine() -> Decay {
    Decay::Cosine
}
fn weight_decay() -> f64 {
    0.01
}
fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn eps() -> f64 {
    1e-8
}
fn one() -> usize {
    1
}

impl OptimConfig {
    /// The one check of every optimizer setting, whatever supplied it (a configuration file,
    /// `--set`, a flag): the key at fault (relative: `lr`, `betas`) and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = |key: &'static str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err((key, format!("must be positive and finite, got {v}")))
            }
        };
        positive("lr", self.lr)?;
        positive("eps", self.eps)?;
        if let Some(max) = self.max_grad_norm {
            positive("max_grad_norm", max)?;
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err((
                "weight_decay",
                format!("must be finite and >= 0, got {}", self.weight_decay),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err((
                "min_lr_ratio",
                format!("must be in [0, 1], got {}", self.min_lr_ratio),
            ));
        }
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return Err(("betas", format!("must be in [0, 1), got {:?}", self.betas)));
        }
        if self.accumulation == 0 {
            return Err(("accumulation", "must be at least 1".into()));
        }
        Ok(())
    }

    /// A config with PyTorch's AdamW defaults at learning rate `lr`.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            warmup_steps: 0,
            decay: Decay::Constant,
            min_lr_ratio: 0.0,
            weight_decay: weight_decay(),
            betas: betas(),
            eps: eps(),
            max_grad_norm: None,
            accumulation: 1,
            loss_scale: None,
        }
    }

    /// The loss scale for a model computing in `dtype`: `loss_scale` when set, else 1024
    /// for f16 (whose smallest normal is 6·10⁻⁵) and 1 for f32 and bf16 (f32's exponent
    /// range).
    pub fn loss_scale_for(&self, dtype: burn::tensor::FloatDType) -> f64 {
        self.loss_scale
            .unwrap_or(if dtype == burn::tensor::FloatDType::F16 {
                1024.0
            } else {
                1.0
            })
    }

    /// burn's AdamW with these settings (clipping is done globally by [`clip_global_norm`]).
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.betas[0] as f32)
            .with_beta_2(self.betas[1] as f32)
            .with_epsilon(self.eps as f32)
            .with_weight_decay(self.weight_decay as f32)
    }

    /// The learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let done =
            (step.saturating_sub(self.warmup_steps)) as f64 / span.saturating_sub(1).max(1) as f64;
        let done = done.clamp(0.0, 1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => floor + (self.lr - floor) * (1.0 - done),
            Decay::Cosine => {
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
            }
        }
    }
}

/// Every gradient's squared sum, kept on the device (read once, summed, by [`global_norm`]).
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sums.push(g.square().sum());
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register::<B::InnerBackend, D>(param.id, g * self.factor);
        }
    }
}

/// The global L2 norm of all parameter gradients of `model` in `grads`: one device read,
/// whatever the number of parameters (the per-parameter squared sums are summed in f64 on
/// the host, as before).
pub fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut v = SquaredNorm::<B> {
        grads,
        sums: Vec::new(),
    };
    model.visit(&mut v);
    if v.sums.is_empty() {
        return 0.0;
    }
    antibody_losses::sync::read(Tensor::cat(v.sums, 0))
        .iter()
        .map(|&s| f64::from(s))
        .sum::<f64>()
        .sqrt()
}

/// `loss · loss_scale`, the loss whose backward pass [`apply_step`] unscales (`loss` itself
/// at scale 1, adding no node to the graph).
pub fn scaled<B: burn::tensor::backend::Backend>(
    loss: Tensor<B, 1>,
    loss_scale: f64,
) -> Tensor<B, 1> {
    if loss_scale == 1.0 {
        loss
    } else {
        loss * loss_scale
    }
}

/// Multiplies every gradient by `factor` (e.g. `1/accumulation`).
pub fn scale<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    let mut v = Scale { grads, factor };
    model.visit(&mut v);
}

/// Scales all gradients so that their global norm is at most `max` (as PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max: f64,
) -> f64 {
    let norm = global_norm(model, grads);
    if norm.is_finite() && norm > max {
        scale(model, grads, max / (norm + 1e-6));
    }
    norm
}

/// One optimizer step at learning rate `lr` from the accumulated `grads` of a loss that was
/// multiplied by `loss_scale` ([`OptimConfig::loss_scale_for`]; 1 leaves the gradients as
/// they are): the gradients divided by it, clipping as `config.max_grad_norm` says, a
/// non-finite norm refused (naming `step`), then the update. Returns the updated model and
/// the (unscaled) norm before clipping. Every loop's step ends here.
pub fn apply_step<B, M, O>(
    model: M,
    optim: &mut O,
    mut grads: GradientsParams,
    config: &OptimConfig,
    lr: f64,
    step: usize,
    loss_scale: f64,
) -> Result<(M, f64), FinetuneError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let grad_norm = if loss_scale == 1.0 {
        match config.max_grad_norm {
            Some(max) => clip_global_norm(&model, &mut grads, max),
            None => global_norm(&model, &grads),
        }
    } else {
        // One pass: unscale and clip together.
        let norm = global_norm(&model, &grads) / loss_scale;
        let clip = match config.max_grad_norm {
            Some(max) if norm.is_finite() && norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        if norm.is_finite() {
            scale(&model, &mut grads, clip / loss_scale);
        }
        norm
    };
    if !grad_norm.is_finite() {
        return Err(FinetuneError::NonFinite {
            step,
            term: if loss_scale == 1.0 {
                "grad_norm".into()
            } else {
                format!("grad_norm (under loss scale {loss_scale}: lower optim.loss_scale)")
            },
            value: grad_norm,
        });
    }
    Ok((optim.step(lr, model, grads), grad_norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let c = OptimConfig {
            warmup_steps: 4,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
            ..OptimConfig::new(1.0)
        };
        assert!((c.lr_at(0, 14) - 0.25).abs() < 1e-12);
        assert!((c.lr_at(3, 14) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(4, 14) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(13, 14) - 0.1).abs() < 1e-12);
        let mid = c.lr_at(8, 14);
        assert!(mid < 1.0 && mid > 0.1);
        let lin = OptimConfig {
            decay: Decay::Linear,
            ..OptimConfig::new(2.0)
        };
        assert!((lin.lr_at(0, 3) - 2.0).abs() < 1e-12);
        assert!((lin.lr_at(1, 3) - 1.0).abs() < 1e-12);
        assert!((lin.lr_at(2, 3) - 0.0).abs() < 1e-12);
    }

    #[test]
    fn pytorch_defaults_are_written_out() {
        let c = OptimConfig::new(1e-5);
        assert_eq!((c.weight_decay, c.eps, c.betas), (0.01, 1e-8, [0.9, 0.999]));
    }
}
