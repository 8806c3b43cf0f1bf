//! Preference losses over sequence log-probabilities (`[b]` each): NPO and DPO, through
//! `log σ` (burn's stable log-sigmoid), averaged over the batch.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::Backend;

/// NPO: `−log σ(β · (ŝ_ref − ŝ_θ))`, averaged over the batch; times `2/β` when `scaled`
/// (the published form). `reference` is the harmful teacher's `ŝ_H(y_h|x)` in the method,
/// or the initial model's in the published NPO.
pub fn npo<B: Backend>(
    policy: Tensor<B, 1>,
    reference: Tensor<B, 1>,
    beta: f64,
    scaled: bool,
) -> Tensor<B, 1> {
    let loss = log_sigmoid((reference - policy) * beta).neg().mean();
    if scaled { loss * (2.0 / beta) } else { loss }
}

/// DPO: `−log σ(β · [(ŝ_θ(y_c) − ŝ_ref(y_c)) − (ŝ_θ(y_r) − ŝ_ref(y_r))])`, averaged.
pub fn dpo<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    reference_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
    reference_rejected: Tensor<B, 1>,
    beta: f64,
) -> Tensor<B, 1> {
    let margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected);
    log_sigmoid(margin * beta).neg().mean()
}

/// The share of rows where the policy prefers the chosen response more than the reference
/// does (the DPO win rate used for capability retention). Host values.
pub fn dpo_win_rate(
    policy_chosen: &[f32],
    reference_chosen: &[f32],
    policy_rejected: &[f32],
    reference_rejected: &[f32],
) -> f64 {
    let n = policy_chosen.len();
    if n == 0 {
        return 0.0;
    }
    let wins = (0..n)
        .filter(|&i| {
            (policy_chosen[i] - reference_chosen[i]) - (policy_rejected[i] - reference_rejected[i])
                > 0.0
        })
        .count();
    wins as f64 / n as f64
}
