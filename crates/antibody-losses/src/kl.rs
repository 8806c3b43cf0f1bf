//! KL divergences per response position over the whole vocabulary, and the method's KL terms.
//!
//! [`kl_per_position`] works on materialized logits: log-softmax of both distributions, then
//! the sum, differentiated by autodiff through every intermediate (several `[b, t, v]`
//! tensors). [`crate::head`] computes the same numbers fused with the output projection over
//! vocabulary chunks, never materializing `[b, t, v]`.
//!
//! # Shapes
//! `teacher`, `student` `[b, t, v]`; results `[b, t]`; `mask` `[b, t]`.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::tokens::{masked_mean, to_f32};

/// Which KL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlDirection {
    /// `KL(teacher ‖ student)` = `Σ p_T (log p_T − log p_S)`.
    Forward,
    /// `KL(student ‖ teacher)` = `Σ p_S (log p_S − log p_T)`.
    Reverse,
}

/// Per-position KL `[b, t]` (unchunked).
pub fn kl_per_position<B: Backend>(
    teacher: Tensor<B, 3>,
    student: Tensor<B, 3>,
    direction: KlDirection,
) -> Tensor<B, 2> {
    let [b, t, _] = student.dims();
    let lt = log_softmax(to_f32(teacher), 2);
    let ls = log_softmax(to_f32(student), 2);
    let kl = match direction {
        KlDirection::Forward => lt.clone().exp() * (lt - ls),
        KlDirection::Reverse => ls.clone().exp() * (ls - lt),
    };
    kl.sum_dim(2).reshape([b, t])
}

/// The KL term of a phase: mean over counted positions (a scalar `[1]`).
pub fn kl_loss<B: Backend>(per_position: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    masked_mean(per_position, mask)
}

/// The immunization term and how often its cap bound.
#[derive(Debug, Clone)]
pub struct Immunization<B: Backend> {
    /// `−mean_t min(KL_t, cap)` over counted positions (a scalar `[1]`).
    pub loss: Tensor<B, 1>,
    /// Share of counted positions where `KL_t > cap` (no gradient flows there).
    pub cap_rate: f64,
}

/// The default `kl_cap`, in nats: a student distribution this far from the harmful teacher's
/// at a position already puts little mass on its tokens (e^-10 ≈ 4.5e-5 of the probability
/// ratio on average), and the cap keeps the unbounded `−KL` from dominating the update.
pub const DEFAULT_KL_CAP: f64 = 10.0;

/// `L_KL_imm = −KL(π_H ‖ π_θ)` clamped at `cap` per position, averaged over counted positions.
pub fn immunization<B: Backend>(
    per_position: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cap: f64,
) -> Immunization<B> {
    let counted: Vec<f32> = crate::sync::read(mask.clone());
    let kl: Vec<f32> = crate::sync::read(per_position.clone().detach());
    let (mut bound, mut total) = (0usize, 0usize);
    for (k, m) in kl.iter().zip(&counted) {
        if *m > 0.0 {
            total += 1;
            if f64::from(*k) > cap {
                bound += 1;
            }
        }
    }
    let loss = masked_mean(per_position.clamp_max(cap), mask).neg();
    Immunization {
        loss,
        cap_rate: if total == 0 {
            0.0
        } else {
            bound as f64 / total as f64
        },
    }
}

/// A `[b, t]` tensor from host values (tests and callers that build masks by hand).
pub fn matrix<B: Backend>(values: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
