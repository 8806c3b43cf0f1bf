//! antibody-losses: the method's losses as pure functions of tensors and masks (no I/O).
//!
//! - [`tokens`]: next-token targets from `(ids, response mask)`, per-token log-probabilities,
//!   `ŝ(y|x)` ([`sequence_logprob`]), SFT, gradient ascent, entropy (TAR).
//! - [`pref`]: NPO (optional `2/β` scale, any reference) and DPO, through a stable log-sigmoid.
//! - [`kl`]: forward and reverse KL per response position over the vocabulary, in an
//!   unchunked and a vocabulary-chunked form (closed-form student gradient, so memory does
//!   not hold the whole log-softmax chain), and the capped immunization KL with its cap rate.
//! - [`combine`]: `L_adv`, `L_align`, `L_total` with every term selectable by name.
//!
//! Everything is computed in the logits' float type, f32 for every model antibody loads.
//! `tests/reference/losses.py` (PyTorch) writes the values and gradients the tests compare
//! against.

pub mod combine;
pub mod kl;
pub mod pref;
pub mod tokens;

pub use combine::{AdvConfig, AlignConfig};
pub use kl::{
    Immunization, KlDirection, immunization, kl_loss, kl_per_position, kl_per_position_chunked,
    kl_positions,
};
pub use pref::{dpo, dpo_win_rate, npo};
pub use tokens::{
    NextTokenTargets, entropy, entropy_loss, gradient_ascent, masked_mean, sequence_logprob, sft,
    token_logprobs,
};
