//! Per-token quantities: log-probabilities of targets, sequence log-probabilities, SFT
//! cross-entropy, entropy, gradient ascent; and the host-side shift from sequences with a
//! response mask to next-token targets.
//!
//! # Shapes
//! `logits` `[b, t, v]` (position `i` predicts the token at `i + 1`), `targets` `[b, t]`
//! (int), `mask` `[b, t]` (1.0 on counted positions, 0.0 elsewhere: prompt, padding, and the
//! last position, which predicts nothing).

pub use antibody_base::Example;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};

/// Next-token targets of a right-padded batch, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct NextTokenTargets {
    /// Rows.
    pub batch: usize,
    /// Padded length.
    pub seq: usize,
    /// Input ids `[b·t]`, right-padded with `pad`.
    pub ids: Vec<u32>,
    /// Targets `[b·t]`: `ids[i + 1]` (the pad id where there is none).
    pub targets: Vec<i64>,
    /// Weights `[b·t]`: 1.0 where the token at `i + 1` is a response token.
    pub mask: Vec<f32>,
}

impl NextTokenTargets {
    /// Builds targets from examples (as `Record::sequence` returns them).
    pub fn new(sequences: &[Example], pad: u32) -> Self {
        let batch = sequences.len();
        let seq = sequences.iter().map(Example::len).max().unwrap_or(0);
        let mut ids = vec![pad; batch * seq];
        let mut targets = vec![i64::from(pad); batch * seq];
        let mut mask = vec![0.0; batch * seq];
        for (row, e) in sequences.iter().enumerate() {
            let m = &e.response_mask;
            for (i, &id) in e.ids.iter().enumerate() {
                ids[row * seq + i] = id;
                if i > 0 {
                    targets[row * seq + i - 1] = i64::from(id);
                    mask[row * seq + i - 1] = if m.get(i).copied().unwrap_or(false) {
                        1.0
                    } else {
                        0.0
                    };
                }
            }
        }
        Self {
            batch,
            seq,
            ids,
            targets,
            mask,
        }
    }

    /// The targets as a tensor `[b, t]`.
    pub fn targets_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(self.targets.clone(), [self.batch, self.seq]),
            device,
        )
    }

    /// The mask as a tensor `[b, t]`.
    pub fn mask_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(self.mask.clone(), [self.batch, self.seq]),
            device,
        )
    }

    /// The flat positions (`row·seq + i`) whose weight is not zero, for the fused head terms'
    /// `rows`: `None` when that is every position (nothing to skip) or none (nothing to read).
    pub fn rows_tensor<B: Backend>(&self, device: &B::Device) -> Option<Tensor<B, 1, Int>> {
        let rows = self.counted_rows()?;
        let n = rows.len();
        Some(Tensor::from_data(TensorData::new(rows, [n]), device))
    }

    /// The host side of [`Self::rows_tensor`].
    fn counted_rows(&self) -> Option<Vec<i64>> {
        let rows: Vec<i64> = (0..self.mask.len())
            .filter(|&i| self.mask[i] != 0.0)
            .map(|i| i as i64)
            .collect();
        (!rows.is_empty() && rows.len() < self.mask.len()).then_some(rows)
    }
}

/// `x` in f32 (a no-op when it already is): every loss computes its log-softmax, exponentials
/// and sums in f32 whatever the model's dtype.
pub fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

/// `log π(target_i | ·)` per position `[b, t]`, from a numerically stable log-softmax.
pub fn token_logprobs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let [b, t, _] = logits.dims();
    log_softmax(to_f32(logits), 2)
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t])
}

/// `ŝ(y|x) = Σ_t mask_t · log π(y_t | ·)` per row `[b]`.
pub fn sequence_logprob<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [b, _, _] = logits.dims();
    (token_logprobs(logits, targets) * mask)
        .sum_dim(1)
        .reshape([b])
}

/// Mean over counted positions of a per-position quantity `[b, t]`: `Σ x·mask / max(Σ mask, 1)`.
pub fn masked_mean<B: Backend>(values: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let count = mask.clone().sum().clamp_min(1.0);
    (values * mask).sum() / count
}

/// SFT cross-entropy: mean negative log-likelihood over counted tokens (a scalar `[1]`).
pub fn sft<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    masked_mean(token_logprobs(logits, targets).neg(), mask)
}

/// Gradient ascent on the targets: the negated SFT loss.
pub fn gradient_ascent<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    sft(logits, targets, mask).neg()
}

/// Entropy of the predicted distribution per position `[b, t]`, in nats.
pub fn entropy<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, t, _] = logits.dims();
    let logp = log_softmax(to_f32(logits), 2);
    (logp.clone().exp() * logp).sum_dim(2).neg().reshape([b, t])
}

/// TAR's tamper-resistance loss: the negated mean entropy over counted positions
/// (minimizing it maximizes the entropy).
pub fn entropy_loss<B: Backend>(logits: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    masked_mean(entropy(logits), mask).neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_shift_and_mask_response_positions() {
        let t = NextTokenTargets::new(
            &[
                (vec![10, 11, 12, 13], vec![false, false, true, true]).into(),
                (vec![20, 21], vec![false, true]).into(),
            ],
            0,
        );
        assert_eq!((t.batch, t.seq), (2, 4));
        assert_eq!(t.ids, vec![10, 11, 12, 13, 20, 21, 0, 0]);
        assert_eq!(t.targets, vec![11, 12, 13, 0, 21, 0, 0, 0]);
        assert_eq!(t.mask, vec![0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        // The fused head terms read the counted positions only.
        assert_eq!(t.counted_rows(), Some(vec![1, 2, 4]));
        let rows = t.rows_tensor::<burn::backend::Flex>(&Default::default());
        assert_eq!(rows.map(|r| r.dims()), Some([3]));
    }

    #[test]
    fn rows_are_none_when_nothing_or_everything_counts() {
        let none = NextTokenTargets::new(&[(vec![1, 2, 3], vec![false, false, false]).into()], 0);
        assert_eq!(none.counted_rows(), None);
        let mut all = NextTokenTargets::new(&[(vec![1, 2, 3], vec![false, true, true]).into()], 0);
        all.mask = vec![1.0; 3];
        assert_eq!(all.counted_rows(), None);
        assert!(
            all.rows_tensor::<burn::backend::Flex>(&Default::default())
                .is_none()
        );
    }
}
