//! antibody-losses: the method's losses as pure functions of tensors and masks (no I/O).
//!
//! - [`tokens`]: next-token targets from `(ids, response mask)`, per-token log-probabilities,
//!   `ŝ(y|x)` ([`sequence_logprob`]), SFT, gradient ascent, entropy (TAR).
//! - [`pref`]: NPO (optional `2/β` scale, any reference) and DPO, through a stable log-sigmoid.
//! - [`kl`]: forward and reverse KL per response position over the vocabulary from logits,
//!   and the capped immunization KL with its cap rate.
//! - [`head`]: the same KL terms fused with the output projection and computed over
//!   vocabulary chunks (closed-form gradients into the student's hidden states and head), so
//!   memory never holds `[b, t, vocab]`; [`headseq`]: `ŝ(y|x)` the same way, with
//!   [`fused_sequence_loss`] running NPO/DPO/SFT-style losses on it.
//! - [`combine`]: `L_adv`, `L_align`, `L_total` with every term selectable by name.
//!
//! Everything is computed in the logits' float type, f32 for every model antibody loads.
//! `tests/reference/losses.py` (PyTorch) writes the values and gradients the tests compare
//! against.

pub mod combine;
pub mod head;
pub mod headseq;
pub mod kl;
pub mod pref;
pub mod sync;
pub mod tokens;

pub use combine::{AdvConfig, AlignConfig};
pub use head::{HeadKl, HeadKlValues, head_immunization, head_kl_loss};
pub use headseq::{HeadLogprob, HeadLogprobValues, fused_sequence_loss};
pub use kl::{Immunization, KlDirection, immunization, kl_loss, kl_per_position};
pub use pref::{dpo, dpo_win_rate, npo};
pub use tokens::{
    Example, NextTokenTargets, entropy, entropy_loss, gradient_ascent, masked_mean,
    sequence_logprob, sft, token_logprobs,
};
