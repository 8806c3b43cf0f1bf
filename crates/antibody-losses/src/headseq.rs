//! Sequence log-probabilities `ŝ(y|x)` fused with the output projection over vocabulary
//! chunks: the log-softmax path of NPO, DPO and SFT without a `[b·t, vocab]` tensor.
//!
//! `ŝ_b = Σ_i mask_i (h_i · W[y_i] − lse_i)` needs the log-sum-exp per position (online,
//! chunk by chunk) and the target logit (a row gather of `W`). Its gradient for per-row
//! weights `u_b` is `dz_i = u_b · mask_i · (onehot(y_i) − p_i)`, so
//! `∂/∂h_i = u·m·(W[y_i] − Σ_c p_c W_c)` and `∂/∂W = Σ_i u·m·(onehot(y_i) − p_i)ᵀ h_i`, again
//! chunk by chunk. [`fused_sequence_loss`] evaluates any loss of the `ŝ` values on a small
//! separate graph to get `u = ∂L/∂ŝ`, then attaches the closed-form gradients to the student.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use crate::head::{attach, online_lse, scatter_rows, slices};
use crate::tokens::to_f32;

/// Fused `ŝ` on one backend (no autodiff involved).
pub struct HeadLogprobValues<B: Backend> {
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    mask: Tensor<B, 2>,
    rows: Option<Tensor<B, 1, Int>>,
    lse: Tensor<B, 2>,
    token_logprobs: Tensor<B, 2>,
    chunk: usize,
    shape: [usize; 2],
}

impl<B: Backend> HeadLogprobValues<B> {
    /// Log-sum-exp and target log-probabilities.
    ///
    /// `rows` (flat positions `row·t + i`, e.g. [`crate::NextTokenTargets::rows_tensor`])
    /// restricts the head's work to the positions that count: prompt and padding positions,
    /// whose `mask` is 0, then cost nothing. `None` reads every position. The values and
    /// gradients are the same either way as long as `rows` holds every position where
    /// `mask ≠ 0`.
    ///
    /// # Shapes
    /// `hidden` `[b, t, d]`, `head` `[v, d]`, `targets` `[b, t]`, `mask` `[b, t]`, `rows`
    /// `[n]`.
    pub fn new(
        hidden: Tensor<B, 3>,
        head: Tensor<B, 2>,
        targets: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
        rows: Option<Tensor<B, 1, Int>>,
        chunk: usize,
    ) -> Self {
        let [b, t, d] = hidden.dims();
        let n = b * t;
        let mut h = hidden.reshape([n, d]);
        let mut targets = targets.reshape([n]);
        let mut mask = mask.reshape([n, 1]);
        if let Some(r) = &rows {
            h = h.select(0, r.clone());
            targets = targets.select(0, r.clone());
            mask = mask.select(0, r.clone());
        }
        let chunk = chunk.max(1);
        let lse = online_lse(&h, &head, chunk);
        let target_logit = (h.clone() * head.clone().select(0, targets.clone())).sum_dim(1);
        Self {
            token_logprobs: target_logit - lse.clone(),
            h,
            w: head,
            targets,
            mask,
            rows,
            lse,
            chunk,
            shape: [b, t],
        }
    }

    /// `ŝ` per row `[b]`.
    pub fn values(&self) -> Tensor<B, 1> {
        let [b, t] = self.shape;
        let counted = scatter_rows(
            self.token_logprobs.clone() * self.mask.clone(),
            self.rows.as_ref(),
            b * t,
        );
        counted.reshape([b, t]).sum_dim(1).reshape([b])
    }

    /// Gradients of `Σ_b u_b ŝ_b` with respect to the hidden states `[b·t, d]` and the head
    /// `[v, d]`.
    pub fn gradients(&self, row_weights: Tensor<B, 1>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (grad_h, grad_w) = self.gradients_of(row_weights, true);
        let grad_w = grad_w.unwrap_or_else(|| Tensor::zeros(self.w.dims(), &self.w.device()));
        (grad_h, grad_w)
    }

    /// [`Self::gradients`], the head's only when `head` is set (none is a third fewer head
    /// matmuls: the LAT attack differentiates with respect to its perturbations only).
    pub fn gradients_of(
        &self,
        row_weights: Tensor<B, 1>,
        head: bool,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
        let [b, t] = self.shape;
        let n = b * t;
        let v = self.w.dims()[0];
        let mut c = row_weights.reshape([b, 1]).expand([b, t]).reshape([n, 1]);
        if let Some(r) = &self.rows {
            c = c.select(0, r.clone());
        }
        let c = c * self.mask.clone();
        // The onehot part: c_i · W[y_i] for h, c_i · h_i added into row y_i for W.
        let mut grad_h = self.w.clone().select(0, self.targets.clone()) * c.clone();
        let mut grad_w_parts = Vec::new();
        for (start, len) in slices(v, self.chunk) {
            let wc = self.w.clone().narrow(0, start, len);
            let p = (self.h.clone().matmul(wc.clone().transpose()) - self.lse.clone()).exp();
            let cp = p * c.clone();
            grad_h = grad_h - cp.clone().matmul(wc);
            if head {
                grad_w_parts.push(cp.transpose().matmul(self.h.clone()).neg());
            }
        }
        let grad_w = head.then(|| {
            Tensor::cat(grad_w_parts, 0).select_assign(
                0,
                self.targets.clone(),
                self.h.clone() * c,
                IndexingUpdateOp::Add,
            )
        });
        (scatter_rows(grad_h, self.rows.as_ref(), n), grad_w)
    }
}

/// Fused `ŝ` whose hidden states and head are tracked by autodiff.
pub struct HeadLogprob<B: AutodiffBackend> {
    inner: HeadLogprobValues<B::InnerBackend>,
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    head_grad: bool,
}

impl<B: AutodiffBackend> HeadLogprob<B> {
    /// See [`HeadLogprobValues::new`]; the chunked work runs on the inner backend.
    pub fn new(
        hidden: Tensor<B, 3>,
        head: Tensor<B, 2>,
        targets: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
        rows: Option<Tensor<B, 1, Int>>,
        chunk: usize,
    ) -> Self {
        let [b, t, d] = hidden.dims();
        let inner = HeadLogprobValues::new(
            to_f32(hidden.clone().inner()),
            to_f32(head.clone().inner()),
            targets.inner(),
            to_f32(mask.inner()),
            rows.map(Tensor::inner),
            chunk,
        );
        Self {
            inner,
            h: hidden.reshape([b * t, d]),
            w: head,
            head_grad: true,
        }
    }

    /// `ŝ` per row `[b]`, without gradient.
    pub fn values(&self) -> Tensor<B, 1> {
        Tensor::from_inner(self.inner.values())
    }

    /// A zero-valued scalar whose gradient is `Σ_b u_b ∂ŝ_b` (into hidden states and head).
    pub fn attach(&self, row_weights: Tensor<B, 1>) -> Tensor<B, 1> {
        let (gh, gw) = self.inner.gradients_of(row_weights.inner(), self.head_grad);
        attach(&self.h, &self.w, gh, gw)
    }

    /// No gradient into the head: its weights are not what is being differentiated (the LAT
    /// attack wants `∂/∂δ` only), and skipping them saves a third of the head's matmuls.
    pub fn without_head_gradient(mut self) -> Self {
        self.head_grad = false;
        self
    }
}

/// `loss(ŝ₁, ŝ₂, …)` for fused sequence log-probabilities, differentiable into every
/// student side: the loss runs on leaves holding the `ŝ` values (a small graph of its own),
/// its gradients `∂L/∂ŝ_k` weight each side's closed-form gradient.
pub fn fused_sequence_loss<B: AutodiffBackend>(
    sides: &[&HeadLogprob<B>],
    loss: impl FnOnce(&[Tensor<B, 1>]) -> Tensor<B, 1>,
) -> Tensor<B, 1> {
    let leaves: Vec<Tensor<B, 1>> = sides.iter().map(|s| s.values().require_grad()).collect();
    let value = loss(&leaves);
    let grads = value.backward();
    let mut total = value.detach();
    for (side, leaf) in sides.iter().zip(&leaves) {
        let [b] = leaf.dims();
        let u = leaf
            .grad(&grads)
            .map(Tensor::<B, 1>::from_inner)
            .unwrap_or_else(|| Tensor::zeros([b], &leaf.device()));
        total = total + side.attach(u);
    }
    total
}
