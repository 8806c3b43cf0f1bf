//! antibody-train: the method — Dual Distillation with Latent Adversarial Training and
//! Canary Stabilization — as one resumable run.
//!
//! - [`config`]: the `[train]` section (typed, defaults in one place, checks naming the key);
//! - [`plan`]: the run as a list of events (cyclic, sequential, mixed);
//! - [`data`]: the method's examples and the teachers' cached sequence log-probabilities;
//! - [`method`]: [`Method`], which executes the plan's events; [`step`]: the harmful and
//!   harmless optimizer steps over one skeleton;
//! - [`metrics`]: the per-step record (`metrics.jsonl`, `metrics.parquet`);
//! - [`run`]: the self-explaining run directory and the loop that fills it.
//!
//! The generic parts (AdamW, schedules, clipping, checkpoints, the SFT loop) are
//! `antibody-finetune`'s. Binary `antibody-train run|bench`.

pub mod config;
pub mod data;
mod error;
pub mod method;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod step;

pub use error::TrainError;
pub use method::Method;
