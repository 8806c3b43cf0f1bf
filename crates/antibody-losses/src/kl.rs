//! KL divergences per response position over the whole vocabulary, and the method's KL terms.
//!
//! Two forms compute the same numbers:
//! - [`kl_per_position`]: log-softmax of both distributions, then the sum; autodiff
//!   differentiates through every intermediate, so it holds several `[b, t, v]` tensors.
//! - [`kl_per_position_chunked`]: log-sum-exp and the KL sum computed over vocabulary chunks
//!   (intermediates `[b, t, chunk]`), and the gradient with respect to the **student** logits
//!   supplied in closed form (`p_S − p_T` for the forward KL; `p_S ⊙ (log p_S − log p_T − KL)`
//!   for the reverse), so the graph holds one `[b, t, v]` tensor (the gradient) instead of the
//!   whole chain. The teacher receives no gradient in this form: teachers are frozen.
//!
//! # Shapes
//! `teacher`, `student` `[b, t, v]`; results `[b, t]`; `mask` `[b, t]`.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::tokens::masked_mean;

/// Which KL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlDirection {
    /// `KL(teacher ‖ student)` = `Σ p_T (log p_T − log p_S)`.
    Forward,
    /// `KL(student ‖ teacher)` = `Σ p_S (log p_S − log p_T)`.
    Reverse,
}

/// The default vocabulary chunk of the chunked form.
pub const DEFAULT_CHUNK: usize = 4096;

/// Per-position KL `[b, t]` (unchunked).
pub fn kl_per_position<B: Backend>(
    teacher: Tensor<B, 3>,
    student: Tensor<B, 3>,
    direction: KlDirection,
) -> Tensor<B, 2> {
    let [b, t, _] = student.dims();
    let lt = log_softmax(teacher, 2);
    let ls = log_softmax(student, 2);
    let kl = match direction {
        KlDirection::Forward => lt.clone().exp() * (lt - ls),
        KlDirection::Reverse => ls.clone().exp() * (ls - lt),
    };
    kl.sum_dim(2).reshape([b, t])
}

/// Log-sum-exp over the last dimension `[b, t, 1]`, computed chunk by chunk (online max).
fn logsumexp_chunked<B: Backend>(x: &Tensor<B, 3>, chunk: usize) -> Tensor<B, 3> {
    let [b, t, v] = x.dims();
    let device = x.device();
    let mut m = Tensor::<B, 3>::full([b, t, 1], f32::NEG_INFINITY, &device);
    let mut s = Tensor::<B, 3>::zeros([b, t, 1], &device);
    let mut start = 0;
    while start < v {
        let len = chunk.min(v - start);
        let c = x.clone().narrow(2, start, len);
        let mc = c.clone().max_dim(2);
        let m_new = m.clone().max_pair(mc);
        s = s * (m - m_new.clone()).exp() + (c - m_new.clone()).exp().sum_dim(2);
        m = m_new;
        start += len;
    }
    m + s.log()
}

/// Per-position KL `[b, t]`, vocabulary-chunked, with the student's gradient in closed form.
pub fn kl_per_position_chunked<B: Backend>(
    teacher: Tensor<B, 3>,
    student: Tensor<B, 3>,
    direction: KlDirection,
    chunk: usize,
) -> Tensor<B, 2> {
    let chunk = chunk.max(1);
    let [b, t, v] = student.dims();
    let tea = teacher.detach();
    let stu = student.clone().detach();
    let lse_t = logsumexp_chunked(&tea, chunk);
    let lse_s = logsumexp_chunked(&stu, chunk);
    let slices = |start: usize, len: usize| {
        let lt = tea.clone().narrow(2, start, len) - lse_t.clone();
        let ls = stu.clone().narrow(2, start, len) - lse_s.clone();
        (lt, ls)
    };
    // The value, chunk by chunk.
    let mut kl = Tensor::<B, 3>::zeros([b, t, 1], &student.device());
    let mut start = 0;
    while start < v {
        let len = chunk.min(v - start);
        let (lt, ls) = slices(start, len);
        let part = match direction {
            KlDirection::Forward => lt.clone().exp() * (lt - ls),
            KlDirection::Reverse => ls.clone().exp() * (ls - lt),
        };
        kl = kl + part.sum_dim(2);
        start += len;
    }
    // ∂KL/∂student, chunk by chunk, joined once.
    let mut grads = Vec::new();
    let mut start = 0;
    while start < v {
        let len = chunk.min(v - start);
        let (lt, ls) = slices(start, len);
        let ps = ls.clone().exp();
        grads.push(match direction {
            KlDirection::Forward => ps - lt.exp(),
            KlDirection::Reverse => ps * (ls - lt - kl.clone()),
        });
        start += len;
    }
    let grad = Tensor::cat(grads, 2);
    // value = kl; gradient w.r.t. student = grad.
    let surrogate = (student * grad).sum_dim(2);
    (kl + surrogate.clone() - surrogate.detach()).reshape([b, t])
}

/// Per-position KL in either form: chunked when `chunk` is `Some`.
pub fn kl_positions<B: Backend>(
    teacher: Tensor<B, 3>,
    student: Tensor<B, 3>,
    direction: KlDirection,
    chunk: Option<usize>,
) -> Tensor<B, 2> {
    match chunk {
        Some(c) => kl_per_position_chunked(teacher, student, direction, c),
        None => kl_per_position(teacher, student, direction),
    }
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
    let counted: Vec<f32> = mask.clone().into_data().to_vec().unwrap_or_default();
    let kl: Vec<f32> = per_position
        .clone()
        .detach()
        .into_data()
        .to_vec()
        .unwrap_or_default();
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
