//! antibody-finetune: fine-tuning the Llama model, whatever the objective.
//!
//! - [`optim`]: AdamW with PyTorch's defaults written out (burn's differ), a learning rate
//!   with linear warmup and constant, linear or cosine decay, global-norm gradient clipping
//!   (PyTorch's `clip_grad_norm_`; burn's own clipping is per tensor), and gradient
//!   accumulation whose sum over micro-batches equals the full batch's gradient when each
//!   micro-batch's loss is normalized by the whole batch's token count;
//! - [`sft`]: seeded supervised fine-tuning on [`Example`]s — the loop behind teacher
//!   breaking, the refusal-SFT baseline and the evaluation's attacks; [`order`], the seeded
//!   example order every loop draws from;
//! - [`lora`]: LoRA adapters on chosen projections, the base frozen, merged into the model
//!   the run returns — the evaluation's parameter-efficient attack;
//! - [`checkpoint`]: weights, optimizer moments and a loop's own state, swapped in whole;
//! - [`logprob`]: `ŝ(y|x)` per sequence without an autodiff graph (teachers, evaluation);
//! - [`FinetuneError`]: what stops a loop, typed.
//!
//! Binary `antibody-finetune sft`: a checkpointed, resumable fine-tuning run directory.

pub mod checkpoint;
mod error;
pub mod logprob;
pub mod lora;
pub mod optim;
pub mod sft;

pub use antibody_base::Example;
pub use error::{CheckpointPart, FinetuneError};
pub use logprob::sequence_logprobs;
pub use lora::{LoraConfig, Projection, lora_finetune};
pub use optim::{Adamw, OptimConfig};
pub use sft::{FinetuneConfig, SftRun, StepLog, finetune, order};
