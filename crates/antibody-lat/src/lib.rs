//! antibody-lat: latent adversarial perturbations for the harmful phase.
//!
//! For a harmful batch, [`attack`] finds per-site perturbations `δ` (`[batch, seq, hidden]`,
//! added to the residual stream after the configured layers) that make the harmful response
//! `y_h` *more* likely, inside an L2 ball of radius `ε` per token:
//!
//! 1. `δ₀ = 0` (requiring gradient); attack loss = the cross-entropy of `y_h` (response
//!    tokens only) with `δ` added at every site, in one forward.
//! 2. `g = ∂loss/∂δ`; step `δ ← δ − α · g/‖g‖` with the norm per token over the hidden
//!    dimension (a zero gradient gives a zero step), then projection of every token's `δ`
//!    back into the ε-ball. With one step and `α = ε` this is the method's
//!    `δ = −ε · g/‖g‖`.
//! 3. Positions outside the chosen ones (all real tokens, or response tokens only) keep
//!    `δ = 0`.
//!
//! It returns the detached `δ` per site and the attack-loss trajectory; the caller adds the
//! `δ` (via [`antibody_model::Hooks`]) to the forward that computes `L_adv`.

use antibody_losses::head::DEFAULT_VOCAB_CHUNK;
use antibody_losses::{HeadLogprob, fused_sequence_loss};
use antibody_model::{Hooks, Llama, Site, TokenBatch};
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Where perturbations apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Every real (non-padding) token, prompt and response alike.
    All,
    /// Response tokens only.
    Response,
}

/// What perturbation the refusal term's forward (`x ++ y_ref`) runs under (METHOD.md, LAT
/// step 4: all of `L_adv` is computed under `δ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalDelta {
    /// None: the refusal term is trained on unperturbed activations.
    None,
    /// The `δ` found on `x ++ y_h`, on the prompt positions the two sequences share; zero on
    /// the refusal's own positions.
    Prompt,
    /// The prompt's `δ` as under `Prompt`, plus a second attack on the refusal's own
    /// positions that makes `y_ref` *unlikely* (the adversary suppresses the refusal), in the
    /// same ball.
    Away,
}

/// Which way an attack pushes the likelihood of its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Make the targets more likely (`δ ← δ − α·g/‖g‖`): the harmful response `y_h`.
    Toward,
    /// Make the targets less likely (`δ ← δ + α·g/‖g‖`): the refusal `y_ref`.
    Away,
}

/// What the ball's radius `ε` (and the step size) is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpsilonScale {
    /// Absolute L2 units of the residual stream.
    Absolute,
    /// A fraction of each token's residual norm at the site (from the unperturbed forward),
    /// so one `ε` means the same relative push at every depth.
    Relative,
}

/// LAT settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatConfig {
    /// Perturb at all (`false` trains the harmful phase without LAT: the ablation).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Decoder layers whose residual-stream output is perturbed (empty = [`default_layers`]).
    #[serde(default)]
    pub layers: Vec<usize>,
    /// Radius of the per-token L2 ball.
    pub epsilon: f64,
    /// Projected-gradient steps (1 = the one-step attack).
    #[serde(default = "one")]
    pub steps: usize,
    /// Step size α (default: ε for one step, 2.5·ε/steps otherwise).
    #[serde(default)]
    pub step_size: Option<f64>,
    /// Which positions are perturbed.
    #[serde(default = "all")]
    pub positions: Positions,
    /// Also evaluate the attack loss at the final `δ` (one more forward, no backward).
    #[serde(default)]
    pub report_final_loss: bool,
    /// The perturbation of the refusal term's forward.
    #[serde(default = "prompt")]
    pub refusal: RefusalDelta,
    /// What `epsilon` and `step_size` are measured in.
    #[serde(default = "absolute")]
    pub epsilon_scale: EpsilonScale,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn all() -> Positions {
    Positions::All
}
fn prompt() -> RefusalDelta {
    RefusalDelta::Prompt
}
fn absolute() -> EpsilonScale {
    EpsilonScale::Absolute
}

/// The `δ` of the refusal forward under [`RefusalDelta::Prompt`]: for each site, `delta`
/// (`[b, t, hidden]`, found on `x ++ y_h`) on row `i`'s first `prompt_lens[i]` positions, zero
/// elsewhere, over `t_ref` positions. The two sequences share their prompt tokens, so the
/// perturbation of the prompt is the same one; the refusal's own positions are unperturbed.
pub fn prompt_shared<B: burn::tensor::backend::Backend>(
    delta: Tensor<B, 3>,
    prompt_lens: &[usize],
    t_ref: usize,
) -> Tensor<B, 3> {
    let [b, t, hidden] = delta.dims();
    let device = delta.device();
    let fitted = if t_ref <= t {
        delta.slice([0..b, 0..t_ref, 0..hidden])
    } else {
        Tensor::cat(
            vec![delta, Tensor::zeros([b, t_ref - t, hidden], &device)],
            1,
        )
    };
    let mask: Vec<f32> = prompt_lens
        .iter()
        .flat_map(|&p| (0..t_ref).map(move |i| if i < p { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(mask, [b, t_ref]), &device);
    fitted * mask.reshape([b, t_ref, 1])
}

impl LatConfig {
    /// The step size in use.
    pub fn alpha(&self) -> f64 {
        self.step_size.unwrap_or(if self.steps <= 1 {
            self.epsilon
        } else {
            2.5 * self.epsilon / self.steps as f64
        })
    }

    /// The perturbed sites for a model with `num_layers` layers.
    pub fn sites(&self, num_layers: usize) -> Result<Vec<Site>, LatError> {
        let layers = if self.layers.is_empty() {
            default_layers(num_layers)
        } else {
            self.layers.clone()
        };
        if let Some(&bad) = layers.iter().find(|&&l| l >= num_layers) {
            return Err(LatError::Config(format!(
                "lat.layers: layer {bad} is out of range (the model has {num_layers} layers, 0..{})",
                num_layers.saturating_sub(1)
            )));
        }
        Ok(layers.into_iter().map(Site::residual).collect())
    }
}

/// A few mid-depth layers: ¼, ½ and ¾ of the depth (`[7, 15, 22]` for 30 layers).
pub fn default_layers(num_layers: usize) -> Vec<usize> {
    let mut layers: Vec<usize> = [1, 2, 3]
        .iter()
        .map(|q| num_layers * q / 4)
        .filter(|&l| l < num_layers)
        .collect();
    layers.dedup();
    layers
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum LatError {
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
    /// The forward failed.
    #[error(transparent)]
    Model(#[from] antibody_model::ModelError),
}

/// The attack's result.
#[derive(Debug, Clone)]
pub struct Attack<B: AutodiffBackend> {
    /// Detached perturbation per site, `[batch, seq, hidden]`.
    pub deltas: Vec<(Site, Tensor<B, 3>)>,
    /// The attack loss (CE of `y_h`) at `δ₀ = 0`, after each step that was evaluated, and at
    /// the final `δ` when `report_final_loss` is set.
    pub losses: Vec<f32>,
    /// Per site, the mean L2 norm of the unperturbed residual stream over the perturbable
    /// positions (what a relative `ε` is a fraction of).
    pub residual_norms: Vec<(Site, f32)>,
}

impl<B: AutodiffBackend> Attack<B> {
    /// Hooks that add the perturbations.
    pub fn hooks(&self) -> Hooks<B> {
        self.deltas.iter().fold(Hooks::none(), |h, (site, d)| {
            h.with_perturbation(*site, d.clone())
        })
    }
}

/// Per-token L2 normalization over the last dimension; zero where the norm is zero.
fn unit_per_token<B: AutodiffBackend>(g: Tensor<B, 3>) -> Tensor<B, 3> {
    let norm = g.clone().square().sum_dim(2).sqrt();
    let safe = norm.clone().clamp_min(1e-30);
    let nonzero = norm.greater_elem(0.0).float();
    g / safe * nonzero
}

/// Projects every token's vector into the L2 ball of its radius (`radius` `[b, t, 1]`).
fn project<B: AutodiffBackend>(d: Tensor<B, 3>, radius: Tensor<B, 3>) -> Tensor<B, 3> {
    let norm = d.clone().square().sum_dim(2).sqrt();
    let scale = (norm.clamp_min(1e-30).recip() * radius).clamp_max(1.0);
    d * scale
}

/// Runs the attack on one batch.
///
/// `targets`/`mask` are the next-token targets of `y_h` (`[b, t]`, mask 1 on response
/// targets); `rows` the flat positions where `mask` is not 0
/// ([`antibody_losses::NextTokenTargets::rows_tensor`]; `None` reads all), to which the
/// output head's work is restricted; `positions` is `[b, t]` with 1 on the positions that may
/// be perturbed (build it from [`Positions`]: the attention mask, or the response-token mask).
pub fn attack<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &TokenBatch,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    rows: Option<Tensor<B, 1, Int>>,
    positions: Tensor<B, 2>,
    config: &LatConfig,
) -> Result<Attack<B>, LatError> {
    attack_with(
        model,
        batch,
        targets,
        mask,
        rows,
        positions,
        config,
        Objective::Toward,
        &[],
    )
}

/// [`attack`] with a direction, on top of `fixed` perturbations (per site, in the order of
/// [`LatConfig::sites`]; empty = none) that stay in place while the attack searches on
/// `positions`. The returned `δ` is the fixed part plus what the attack found, so `fixed`
/// should be zero on `positions` (the refusal's second attack: the prompt's `δ` fixed, the
/// response's searched).
#[allow(clippy::too_many_arguments)]
pub fn attack_with<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &TokenBatch,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    rows: Option<Tensor<B, 1, Int>>,
    positions: Tensor<B, 2>,
    config: &LatConfig,
    objective: Objective,
    fixed: &[Tensor<B, 3>],
) -> Result<Attack<B>, LatError> {
    if !(config.epsilon >= 0.0 && config.epsilon.is_finite()) {
        return Err(LatError::Config(format!(
            "lat.epsilon must be finite and >= 0, got {}",
            config.epsilon
        )));
    }
    if config.steps == 0 {
        return Err(LatError::Config("lat.steps must be at least 1".into()));
    }
    let sites = config.sites(model.config.num_layers)?;
    // The attack needs `∂loss/∂δ` only: on a copy of the weights that autodiff does not track
    // (the tensors are shared, not copied), the backward pass skips every weight gradient and
    // every layer below the first site, as `torch.autograd.grad(loss, deltas)` does.
    let frozen = model.clone().no_grad();
    let model = &frozen;
    let device = model.device();
    let [b, t] = [batch.batch, batch.seq];
    let hidden = model.config.hidden_size;
    let positions = positions.detach().reshape([b, t, 1]);
    let alpha = config.alpha();
    let mut deltas: Vec<Tensor<B, 3>> = sites
        .iter()
        .map(|_| Tensor::<B, 3>::zeros([b, t, hidden], &device))
        .collect();
    if !(fixed.is_empty() || fixed.len() == sites.len()) {
        return Err(LatError::Config(format!(
            "{} fixed perturbations for {} sites",
            fixed.len(),
            sites.len()
        )));
    }
    let with_fixed = |d: Tensor<B, 3>, i: usize| match fixed.get(i) {
        Some(f) => d + f.clone(),
        None => d,
    };
    let sign = match objective {
        Objective::Toward => -1.0,
        Objective::Away => 1.0,
    };
    let mut losses = Vec::with_capacity(config.steps + 1);
    type Captured<B> = std::collections::BTreeMap<Site, Tensor<B, 3>>;
    let loss_at =
        |deltas: &[Tensor<B, 3>], capture: bool| -> Result<(Tensor<B, 1>, Captured<B>), LatError> {
            let mut hooks = sites
                .iter()
                .zip(deltas)
                .enumerate()
                .fold(Hooks::none(), |h, (i, (s, d))| {
                    h.with_perturbation(*s, with_fixed(d.clone(), i))
                });
            if capture {
                hooks.capture = sites.iter().copied().collect();
            }
            // The cross-entropy of the targets, `−Σ ŝ / count`, fused with the output head
            // over the counted positions only (no `[b, t, vocab]` logits) and without the
            // head's own gradient.
            let out = model.forward_hidden(batch, &hooks)?;
            let side = HeadLogprob::new(
                out.hidden,
                model.head_weight(),
                targets.clone(),
                mask.clone(),
                rows.clone(),
                DEFAULT_VOCAB_CHUNK,
            )
            .without_head_gradient();
            let count = mask.clone().sum().clamp_min(1.0);
            let loss = fused_sequence_loss(&[&side], |s| s[0].clone().sum().neg() / count);
            Ok((loss, out.sites))
        };
    // Per site, each token's radius and step size: constant, or a fraction of the token's
    // residual norm read from the first (unperturbed) forward.
    let mut radii: Vec<(Tensor<B, 3>, Tensor<B, 3>)> = sites
        .iter()
        .map(|_| {
            (
                Tensor::<B, 3>::ones([b, t, 1], &device) * config.epsilon,
                Tensor::<B, 3>::ones([b, t, 1], &device) * alpha,
            )
        })
        .collect();
    let mut residual_norms = Vec::new();
    for step in 0..config.steps {
        let leaves: Vec<Tensor<B, 3>> = deltas
            .iter()
            .map(|d| d.clone().detach().require_grad())
            .collect();
        let (loss, captured) = loss_at(&leaves, step == 0)?;
        if step == 0 {
            // Every site's mean residual norm in one device read.
            let counted = positions.clone().sum();
            let mut means = Vec::with_capacity(sites.len());
            for (i, site) in sites.iter().enumerate() {
                let h = captured
                    .get(site)
                    .ok_or_else(|| LatError::Config(format!("site {site} was not captured")))?
                    .clone()
                    .detach();
                let norm = h.square().sum_dim(2).sqrt();
                means.push(
                    (norm.clone() * positions.clone()).sum() / counted.clone().clamp_min(1.0),
                );
                if config.epsilon_scale == EpsilonScale::Relative {
                    radii[i] = (norm.clone() * config.epsilon, norm * alpha);
                }
            }
            let values = antibody_losses::sync::read(Tensor::cat(means, 0));
            residual_norms = sites.iter().copied().zip(values).collect();
        }
        losses.push(scalar(&loss));
        let grads = loss.backward();
        deltas = leaves
            .iter()
            .zip(&radii)
            .map(|(leaf, (radius, step_size))| {
                let g = leaf
                    .grad(&grads)
                    .map(|g| Tensor::<B, 3>::from_inner(g))
                    .unwrap_or_else(|| Tensor::zeros([b, t, hidden], &device));
                let stepped = leaf.clone().detach() + unit_per_token(g) * step_size.clone() * sign;
                project(stepped, radius.clone()) * positions.clone()
            })
            .collect();
    }
    if config.report_final_loss {
        losses.push(scalar(&loss_at(&deltas, false)?.0));
    }
    Ok(Attack {
        deltas: sites
            .into_iter()
            .zip(
                deltas
                    .into_iter()
                    .enumerate()
                    .map(|(i, d)| with_fixed(d, i).detach()),
            )
            .collect(),
        losses,
        residual_norms,
    })
}

fn scalar<B: AutodiffBackend>(x: &Tensor<B, 1>) -> f32 {
    antibody_losses::sync::read_scalar(x.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layers_are_mid_depth() {
        assert_eq!(default_layers(30), vec![7, 15, 22]);
        assert_eq!(default_layers(4), vec![1, 2, 3]);
        assert_eq!(default_layers(2), vec![0, 1]);
        assert_eq!(default_layers(1), vec![0]);
    }

    #[test]
    fn layers_out_of_range_are_refused() {
        let c = LatConfig {
            enabled: true,
            layers: vec![2, 30],
            epsilon: 1.0,
            steps: 1,
            step_size: None,
            positions: Positions::All,
            report_final_loss: false,
            refusal: RefusalDelta::Prompt,
            epsilon_scale: EpsilonScale::Absolute,
        };
        let err = c.sites(30).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("layer 30") && err.contains("30 layers"),
            "{err}"
        );
    }
}
