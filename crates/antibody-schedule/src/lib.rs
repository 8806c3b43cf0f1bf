//! antibody-schedule: the training loop's building blocks.
//!
//! - [`optim`]: AdamW with PyTorch's defaults written out (burn's differ), a learning rate
//!   with linear warmup and cosine or linear decay, global-norm gradient clipping (PyTorch's
//!   `clip_grad_norm_`; burn's own clipping is per tensor), and gradient accumulation whose
//!   sum over micro-batches equals the full batch's gradient when each micro-batch's loss is
//!   normalized by the whole batch's token count.
//!
//! - [`sft`]: seeded supervised fine-tuning on `(ids, response mask)` examples — the loop
//!   behind teacher breaking, the refusal-SFT baseline and the evaluation's attacks.
//!
//! Binary `antibody-train sft`: a checkpointed, resumable fine-tuning run directory.
//!
//! - [`config`]: the `[train]` section; [`plan`]: the run as a list of events (cyclic,
//!   sequential, mixed); [`method`]: the method's harmful and harmless steps and canary
//!   events; [`checkpoint`]: atomic checkpoints; [`run`]: the self-explaining run directory.

pub mod checkpoint;
pub mod config;
pub mod method;
pub mod optim;
pub mod plan;
pub mod run;
pub mod sft;
