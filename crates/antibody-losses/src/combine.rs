//! The method's combinations, with every term selectable by name in configuration:
//!
//! - `L_adv = (1 − γ)·L_forget + γ·L_kl + ρ·L_ref` (harmful phase; `forget` = `npo` by
//!   default, `kl` = the capped immunization KL by default),
//! - `L_align = (1 − α)·L_pref + α·L_kl` (harmless phase; `pref` = `dpo`, `kl` = forward),
//! - `L_total = L_align + λ_stab·L_stab`.
//!
//! A term whose weight is zero is not computed by callers that check [`AdvConfig::needs`] /
//! [`AlignConfig::needs`].

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::kl::{DEFAULT_KL_CAP, KlDirection};

/// The forgetting term of the harmful phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForgetLoss {
    /// NPO against a reference's `ŝ(y_h|x)`.
    Npo,
    /// Gradient ascent on `y_h`.
    GradientAscent,
    /// Entropy maximization on `y_h` positions (TAR).
    Entropy,
    /// No forgetting term.
    None,
}

/// Whose `ŝ(y_h|x)` NPO compares against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NpoReference {
    /// The harmful teacher (the method's form).
    HarmfulTeacher,
    /// The student's initial weights (the published NPO).
    Initial,
}

/// The KL term of the harmful phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvKl {
    /// `−min(KL(π_H ‖ π_θ), cap)` (the method's immunization KL).
    Immunization,
    /// `−min(KL(π_θ ‖ π_H), cap)` (the reverse variant).
    ImmunizationReverse,
}

/// The refusal term of the harmful phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalLoss {
    /// SFT cross-entropy on `y_ref`.
    Sft,
    /// DPO with `y_ref` preferred over `y_h`, against the benign teacher.
    Dpo,
}

/// The harmful phase's loss configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvConfig {
    /// The forgetting term.
    #[serde(default = "default_forget")]
    pub forget: ForgetLoss,
    /// NPO's β.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Scale NPO by `2/β` (the published form).
    #[serde(default)]
    pub npo_scaled: bool,
    /// NPO's reference.
    #[serde(default = "default_reference")]
    pub npo_reference: NpoReference,
    /// γ: the weight of the KL term against the forgetting term.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// The KL term.
    #[serde(default = "default_adv_kl")]
    pub kl: AdvKl,
    /// Per-position cap of the immunization KL, nats.
    #[serde(default = "default_cap")]
    pub kl_cap: f64,
    /// ρ: the weight of the refusal term (0 = off).
    #[serde(default)]
    pub rho: f64,
    /// The refusal term.
    #[serde(default = "default_refusal")]
    pub refusal: RefusalLoss,
    /// η: the weight of a retain term inside the harmful step, the forward KL to the benign
    /// teacher on the helpful answers `y_c` of a harmless batch (0 = off).
    #[serde(default)]
    pub retain: f64,
    /// κ: the weight of a contrast term inside the harmful step, on a harmless batch paired row
    /// by row with the step's harmful batch: the refusal the step teaches, said after the
    /// harmless prompt, is the answer to lower (0 = off). Its form is `contrast_loss`.
    #[serde(default)]
    pub contrast: f64,
    /// The contrast term's form.
    #[serde(default = "default_contrast_loss")]
    pub contrast_loss: ContrastLoss,
}

/// The form of the harmful step's contrast term (`AdvConfig::contrast`). Both use `[align]`'s
/// β; `x_h`, `x_l`: the paired harmful and harmless prompts, `y_ref` the harmful row's refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastLoss {
    /// DPO of `x_l ++ y_c` over `x_l ++ y_ref` against the benign teacher (with `[align]`'s
    /// length normalization): lowers the refusal after the harmless prompt below the benign
    /// teacher's, whatever it does after the harmful one.
    Dpo,
    /// `−log σ(β (ŝ(y_ref | x_h) − ŝ(y_ref | x_l)))`: only asks that the same refusal be
    /// likelier after the harmful prompt than after the harmless one; what the two share has
    /// no gradient, and the term saturates once they are apart.
    Rank,
}

/// The harmless phase's preference term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefLoss {
    /// DPO of `y_c` over `y_r` against the benign teacher.
    Dpo,
    /// SFT on `y_c`.
    Sft,
}

/// The harmless phase's loss configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    /// The preference term.
    #[serde(default = "default_pref")]
    pub pref: PrefLoss,
    /// DPO's β.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// α: the weight of the alignment KL against the preference term.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// The alignment KL's direction (forward = `KL(π_B ‖ π_θ)`).
    #[serde(default = "default_align_kl")]
    pub kl: KlDirection,
    /// λ_stab: the weight of canary stabilization.
    #[serde(default = "default_lambda")]
    pub lambda_stab: f64,
    /// DPO on per-token log-probabilities (`ŝ/|y|`, student and reference alike), so a long
    /// helpful answer and a short refusal weigh by their mean rather than their sum.
    #[serde(default)]
    pub length_normalized: bool,
}

fn default_forget() -> ForgetLoss {
    ForgetLoss::Npo
}
fn default_beta() -> f64 {
    0.1
}
fn default_reference() -> NpoReference {
    NpoReference::HarmfulTeacher
}
fn default_gamma() -> f64 {
    0.5
}
fn default_adv_kl() -> AdvKl {
    AdvKl::Immunization
}
fn default_cap() -> f64 {
    DEFAULT_KL_CAP
}
fn default_refusal() -> RefusalLoss {
    RefusalLoss::Sft
}
fn default_contrast_loss() -> ContrastLoss {
    ContrastLoss::Dpo
}
fn default_pref() -> PrefLoss {
    PrefLoss::Dpo
}
fn default_alpha() -> f64 {
    0.5
}
fn default_align_kl() -> KlDirection {
    KlDirection::Forward
}
fn default_lambda() -> f64 {
    1.0
}

impl Default for AdvConfig {
    fn default() -> Self {
        Self {
            forget: default_forget(),
            beta: default_beta(),
            npo_scaled: false,
            npo_reference: default_reference(),
            gamma: default_gamma(),
            kl: default_adv_kl(),
            kl_cap: default_cap(),
            rho: 0.0,
            refusal: default_refusal(),
            retain: 0.0,
            contrast: 0.0,
            contrast_loss: default_contrast_loss(),
        }
    }
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            pref: default_pref(),
            beta: default_beta(),
            alpha: default_alpha(),
            kl: default_align_kl(),
            lambda_stab: default_lambda(),
            length_normalized: false,
        }
    }
}

/// Which terms a combination needs (so callers skip the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// The first (forgetting / preference) term.
    pub first: bool,
    /// The KL term.
    pub kl: bool,
    /// The third (refusal / stabilization) term.
    pub third: bool,
}

impl AdvConfig {
    /// The terms with non-zero weight.
    pub fn needs(&self) -> Needs {
        Needs {
            first: self.gamma < 1.0 && self.forget != ForgetLoss::None,
            kl: self.gamma > 0.0,
            third: self.rho > 0.0,
        }
    }

    /// Whether the harmful step also reads a harmless batch (the retain or contrast term).
    pub fn reads_harmless(&self) -> bool {
        self.retain > 0.0 || self.contrast > 0.0
    }

    /// The contrast term's form when it is on.
    pub fn contrast(&self) -> Option<ContrastLoss> {
        (self.contrast > 0.0).then_some(self.contrast_loss)
    }

    /// `L_adv = (1 − γ)·forget + γ·kl + ρ·refusal`; absent terms count as zero.
    pub fn combine<B: Backend>(
        &self,
        forget: Option<Tensor<B, 1>>,
        kl: Option<Tensor<B, 1>>,
        refusal: Option<Tensor<B, 1>>,
    ) -> Option<Tensor<B, 1>> {
        weighted([
            (forget, 1.0 - self.gamma),
            (kl, self.gamma),
            (refusal, self.rho),
        ])
    }
}

impl AlignConfig {
    /// The terms with non-zero weight.
    pub fn needs(&self) -> Needs {
        Needs {
            first: self.alpha < 1.0,
            kl: self.alpha > 0.0,
            third: self.lambda_stab > 0.0,
        }
    }

    /// `L_total = (1 − α)·pref + α·kl + λ_stab·stab`; absent terms count as zero.
    pub fn combine<B: Backend>(
        &self,
        pref: Option<Tensor<B, 1>>,
        kl: Option<Tensor<B, 1>>,
        stab: Option<Tensor<B, 1>>,
    ) -> Option<Tensor<B, 1>> {
        weighted([
            (pref, 1.0 - self.alpha),
            (kl, self.alpha),
            (stab, self.lambda_stab),
        ])
    }
}

fn weighted<B: Backend, const N: usize>(
    terms: [(Option<Tensor<B, 1>>, f64); N],
) -> Option<Tensor<B, 1>> {
    terms
        .into_iter()
        .filter_map(|(t, w)| t.filter(|_| w != 0.0).map(|t| t * w))
        .reduce(|a, b| a + b)
}
