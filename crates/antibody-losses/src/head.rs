//! KL terms fused with the output projection, computed over vocabulary chunks so that no
//! `[b·t, vocab]` tensor ever exists: memory scales with `b·t·chunk`, not `b·t·vocab`.
//!
//! Inputs are the final hidden states `[b, t, d]` and the head weights `[v, d]`
//! ([`antibody_model`]'s `Llama::head_weight`) of the teacher and the student; logits of a
//! vocabulary slice are `h · W[slice]ᵀ`. Three passes over the vocabulary:
//!
//! 1. online log-sum-exp of both distributions per position;
//! 2. the per-position KL values (forward or reverse);
//! 3. for given per-position weights `w` (the loss is `Σ w_i KL_i`), the gradients
//!    `∂/∂h = Σ_c dz_c · W_c` and `∂/∂W_c = dz_cᵀ · h` with `dz = w ⊙ (p_S − p_T)` (forward KL)
//!    or `w ⊙ p_S ⊙ (log p_S − log p_T − KL)` (reverse), attached to the student's hidden
//!    states and head weights through a surrogate `Σ h ⊙ ∂h + Σ W ⊙ ∂W` whose value is removed.
//!
//! Teachers get no gradient. The weights must be known before the gradient pass, which holds
//! for every KL term of the method: the alignment KL (`w = mask / count`) and the capped
//! immunization KL (`w = −mask / count` where `KL < cap`, 0 where the cap binds).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::kl::KlDirection;
use crate::tokens::to_f32;

/// The default vocabulary chunk of the fused form.
pub const DEFAULT_VOCAB_CHUNK: usize = 8192;

/// Teacher and student sides of a fused KL on one backend (no autodiff involved), with the
/// per-position values computed; [`HeadKl::gradients`] gives the closed-form gradients.
pub struct HeadKlValues<B: Backend> {
    teacher_h: Tensor<B, 2>,
    teacher_w: Tensor<B, 2>,
    student_h: Tensor<B, 2>,
    student_w: Tensor<B, 2>,
    lse_t: Tensor<B, 2>,
    lse_s: Tensor<B, 2>,
    kl: Tensor<B, 2>,
    direction: KlDirection,
    rows: Option<Tensor<B, 1, Int>>,
    chunk: usize,
    shape: [usize; 2],
}

/// `(start, len)` of each chunk of `0..v`.
pub(crate) fn slices(v: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..v).step_by(chunk).map(move |s| (s, chunk.min(v - s)))
}

/// Log-sum-exp of `h · Wᵀ` per row `[n, 1]`, over vocabulary chunks with an online maximum.
pub(crate) fn online_lse<B: Backend>(
    h: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    chunk: usize,
) -> Tensor<B, 2> {
    let n = h.dims()[0];
    let v = w.dims()[0];
    let device = h.device();
    let mut m = Tensor::<B, 2>::full([n, 1], f32::NEG_INFINITY, &device);
    let mut s = Tensor::<B, 2>::zeros([n, 1], &device);
    for (start, len) in slices(v, chunk) {
        let z = h
            .clone()
            .matmul(w.clone().narrow(0, start, len).transpose());
        let m_new = m.clone().max_pair(z.clone().max_dim(1));
        s = s * (m - m_new.clone()).exp() + (z - m_new.clone()).exp().sum_dim(1);
        m = m_new;
    }
    m + s.log()
}

impl<B: Backend> HeadKlValues<B> {
    /// Passes 1 and 2: log-sum-exp of both sides and the per-position KL.
    ///
    /// `rows` (flat positions `row·t + i`) restricts the work to the positions the loss
    /// weights; the KL is 0 elsewhere (see [`crate::HeadLogprobValues::new`]). `None` reads
    /// every position.
    ///
    /// # Shapes
    /// `teacher_hidden`, `student_hidden` `[b, t, d]`; `teacher_head`, `student_head` `[v, d]`;
    /// `rows` `[n]`.
    pub fn new(
        teacher_hidden: Tensor<B, 3>,
        teacher_head: Tensor<B, 2>,
        student_hidden: Tensor<B, 3>,
        student_head: Tensor<B, 2>,
        direction: KlDirection,
        rows: Option<Tensor<B, 1, Int>>,
        chunk: usize,
    ) -> Self {
        let [b, t, d] = student_hidden.dims();
        let chunk = chunk.max(1);
        let mut student_h = student_hidden.reshape([b * t, d]);
        let student_w = student_head;
        let mut teacher_h = teacher_hidden.reshape([b * t, d]);
        if let Some(r) = &rows {
            student_h = student_h.select(0, r.clone());
            teacher_h = teacher_h.select(0, r.clone());
        }
        let n = student_h.dims()[0];
        let teacher_w = teacher_head;
        let v = student_w.dims()[0];
        let device = student_h.device();
        let lse_t = online_lse(&teacher_h, &teacher_w, chunk);
        let lse_s = online_lse(&student_h, &student_w, chunk);
        let mut kl = Tensor::<B, 2>::zeros([n, 1], &device);
        for (start, len) in slices(v, chunk) {
            let lt = teacher_h
                .clone()
                .matmul(teacher_w.clone().narrow(0, start, len).transpose())
                - lse_t.clone();
            let ls = student_h
                .clone()
                .matmul(student_w.clone().narrow(0, start, len).transpose())
                - lse_s.clone();
            let part = match direction {
                KlDirection::Forward => lt.clone().exp() * (lt - ls),
                KlDirection::Reverse => ls.clone().exp() * (ls - lt),
            };
            kl = kl + part.sum_dim(1);
        }
        Self {
            teacher_h,
            teacher_w,
            student_h,
            student_w,
            lse_t,
            lse_s,
            kl,
            direction,
            rows,
            chunk,
            shape: [b, t],
        }
    }

    /// The per-position KL values `[b, t]` (no gradient; 0 outside `rows`).
    pub fn values(&self) -> Tensor<B, 2> {
        let [b, t] = self.shape;
        scatter_rows(self.kl.clone(), self.rows.as_ref(), b * t).reshape(self.shape)
    }

    /// Pass 3: for the loss `Σ_i weights_i · KL_i`, its value and its gradients with respect
    /// to the student's hidden states `[b·t, d]` and head weights `[v, d]`.
    pub fn gradients(&self, weights: Tensor<B, 2>) -> (Tensor<B, 1>, Tensor<B, 2>, Tensor<B, 2>) {
        let [b, t] = self.shape;
        let v = self.student_w.dims()[0];
        let mut w = weights.reshape([b * t, 1]);
        if let Some(r) = &self.rows {
            w = w.select(0, r.clone());
        }
        let value = (self.kl.clone() * w.clone()).sum();
        let mut grad_h = Tensor::<B, 2>::zeros(self.student_h.dims(), &self.student_h.device());
        let mut grad_w = Vec::new();
        for (start, len) in slices(v, self.chunk) {
            let wt = self.teacher_w.clone().narrow(0, start, len);
            let ws = self.student_w.clone().narrow(0, start, len);
            let lt = self.teacher_h.clone().matmul(wt.transpose()) - self.lse_t.clone();
            let ls = self.student_h.clone().matmul(ws.clone().transpose()) - self.lse_s.clone();
            let ps = ls.clone().exp();
            let dz = match self.direction {
                KlDirection::Forward => (ps - lt.exp()) * w.clone(),
                KlDirection::Reverse => ps * (ls - lt - self.kl.clone()) * w.clone(),
            };
            grad_h = grad_h + dz.clone().matmul(ws);
            grad_w.push(dz.transpose().matmul(self.student_h.clone()));
        }
        let grad_h = scatter_rows(grad_h, self.rows.as_ref(), b * t);
        (value, grad_h, Tensor::cat(grad_w, 0))
    }
}

/// A fused KL whose student side is tracked by autodiff: the chunked passes run on the inner
/// backend (so the graph records nothing of them), and the closed-form gradients are attached
/// to the student's hidden states and head weights through a surrogate
/// `Σ h ⊙ ∂h + Σ W ⊙ ∂W` whose value is removed.
pub struct HeadKl<B: AutodiffBackend> {
    inner: HeadKlValues<B::InnerBackend>,
    student_h: Tensor<B, 2>,
    student_w: Tensor<B, 2>,
}

impl<B: AutodiffBackend> HeadKl<B> {
    /// Passes 1 and 2 (see [`HeadKlValues::new`]); the teacher side receives no gradient.
    pub fn new(
        teacher_hidden: Tensor<B, 3>,
        teacher_head: Tensor<B, 2>,
        student_hidden: Tensor<B, 3>,
        student_head: Tensor<B, 2>,
        direction: KlDirection,
        rows: Option<Tensor<B, 1, Int>>,
        chunk: usize,
    ) -> Self {
        let [b, t, d] = student_hidden.dims();
        let inner = HeadKlValues::new(
            to_f32(teacher_hidden.inner()),
            to_f32(teacher_head.inner()),
            to_f32(student_hidden.clone().inner()),
            to_f32(student_head.clone().inner()),
            direction,
            rows.map(Tensor::inner),
            chunk,
        );
        Self {
            inner,
            student_h: student_hidden.reshape([b * t, d]),
            student_w: student_head,
        }
    }

    /// The per-position KL values `[b, t]` (no gradient).
    pub fn values(&self) -> Tensor<B, 2> {
        Tensor::from_inner(self.inner.values())
    }

    /// The loss `Σ_i weights_i · KL_i + offset` (a scalar `[1]`) with gradients into the
    /// student's hidden states and head weights. `weights` `[b, t]` carry no gradient.
    pub fn loss(&self, weights: Tensor<B, 2>, offset: f32) -> Tensor<B, 1> {
        let (value, grad_h, grad_w) = self.inner.gradients(weights.inner());
        let surrogate = attach(&self.student_h, &self.student_w, grad_h, Some(grad_w));
        Tensor::<B, 1>::from_inner(value) + offset + surrogate
    }
}

/// The mean forward/reverse KL over counted positions, fused with the head.
pub fn head_kl_loss<B: AutodiffBackend>(kl: &HeadKl<B>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    // The count stays on the device: no read.
    let count = mask.clone().sum().clamp_min(1.0).reshape([1, 1]);
    kl.loss(mask / count, 0.0)
}

/// The capped immunization term fused with the head: `−mean min(KL, cap)` over counted
/// positions, and the share of counted positions where the cap binds.
pub fn head_immunization<B: AutodiffBackend>(
    kl: &HeadKl<B>,
    mask: Tensor<B, 2>,
    cap: f64,
) -> (Tensor<B, 1>, f64) {
    let values = host(kl.values());
    let m = host(mask.clone());
    let count = m.iter().sum::<f32>().max(1.0);
    let (mut bound, mut total, mut offset) = (0usize, 0usize, 0.0f32);
    let weights: Vec<f32> = values
        .iter()
        .zip(&m)
        .map(|(k, &mi)| {
            if mi > 0.0 {
                total += 1;
                if f64::from(*k) > cap {
                    bound += 1;
                    offset -= cap as f32 * mi / count;
                    return 0.0;
                }
            }
            -mi / count
        })
        .collect();
    let [b, t] = mask.dims();
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [b, t]), &mask.device());
    let rate = if total == 0 {
        0.0
    } else {
        bound as f64 / total as f64
    };
    (kl.loss(weights, offset), rate)
}

/// A zero-valued f32 scalar whose gradient with respect to `h` and `w` is `grad_h` and
/// `grad_w` (computed on the inner backend, cast back to the student's dtypes): the surrogate
/// `Σ h ⊙ ∂h + Σ W ⊙ ∂W` with its value removed (no `W` term when `grad_w` is `None`).
pub(crate) fn attach<B: AutodiffBackend>(
    h: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    grad_h: Tensor<B::InnerBackend, 2>,
    grad_w: Option<Tensor<B::InnerBackend, 2>>,
) -> Tensor<B, 1> {
    // `Σ x ⊙ g` in f32, `g` cast back to `x`'s dtype.
    let term = |x: &Tensor<B, 2>, g: Tensor<B::InnerBackend, 2>| {
        let g = Tensor::<B, 2>::from_inner(g);
        let g = if g.dtype() == x.dtype() {
            g
        } else {
            g.cast(float_dtype(x.dtype()))
        };
        to_f32((x.clone() * g).sum())
    };
    let mut s = term(h, grad_h);
    if let Some(gw) = grad_w {
        s = s + term(w, gw);
    }
    s.clone() - s.detach()
}

/// `x` `[n', c]` at the flat positions `rows` of an `[n, c]` tensor that is 0 elsewhere; `x`
/// itself when `rows` is `None` (then `n' = n`).
pub(crate) fn scatter_rows<B: Backend>(
    x: Tensor<B, 2>,
    rows: Option<&Tensor<B, 1, Int>>,
    n: usize,
) -> Tensor<B, 2> {
    match rows {
        None => x,
        Some(r) => {
            let c = x.dims()[1];
            Tensor::<B, 2>::zeros([n, c], &x.device()).select_assign(
                0,
                r.clone(),
                x,
                IndexingUpdateOp::Add,
            )
        }
    }
}

fn float_dtype(d: DType) -> FloatDType {
    match d {
        DType::F64 => FloatDType::F64,
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    }
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    crate::sync::read(t.detach())
}
