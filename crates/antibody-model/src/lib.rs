//! antibody-model: a Llama in burn built for training and analysis.
//!
//! - [`LlamaConfig`] → [`LlamaConfig::init`] → [`Llama`] → [`Llama::forward`]: full-sequence
//!   logits with padding-aware attention; named activation [`Site`]s that can be read and
//!   perturbed in the same pass (gradients flow into perturbations, as LAT needs).
//! - [`checkpoint`]: GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1, dequantized to f32) and Hugging Face
//!   safetensors directories in, Hugging Face directories out, all through burn's store.
//! - [`Tokenizer`]: from `tokenizer.json` or GGUF metadata, with the model's chat template.
//! - [`generate()`]: batched KV-cached generation, greedy or sampled.
//! - [`tiny`]: the deterministic tiny random model every crate's tests use.
//! - [`ModelSpec`] (a model named in configuration: `patient`, `tiny[:SEED]`, a path; from
//!   `antibody-base`) and [`ModelSpecExt`]: loading it and naming its weights by content.
//!
//! Only this crate knows checkpoint tensor names ([`names`]).

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod names;
pub mod shards;
pub mod site;
pub mod spec;
pub mod tiny;
pub mod tokenizer;

pub use batch::TokenBatch;
pub use checkpoint::{Loaded, load, save_hf_dir};
pub use config::{HfLlamaConfig, LlamaConfig};
pub use device::{DTypeSpec, DeviceSpec};
pub use error::{ModelError, Result};
pub use generate::{Generated, GenerationConfig, Sampling, balanced_batch_size, generate};
pub use llama::{KvCache, Llama};
pub use shards::set_inference_shards;
pub use site::{ForwardOutput, Hooks, Site, SiteKind};
pub use spec::{ModelSpec, ModelSpecExt};
pub use tokenizer::{ChatMessage, Tokenizer};
