//! Loading a model named in configuration ([`ModelSpec`], from `antibody-base`: `patient`,
//! `tiny[:SEED]`, or a path) through [`ModelSpecExt`].
//!
//! - `patient`: the pinned SmolLM2-135M-Instruct GGUF, fetched and verified on first use
//!   ([`antibody_fetch::patient`]).
//! - `tiny` / `tiny:SEED`: the deterministic tiny random model ([`crate::tiny`],
//!   [`LlamaConfig::tiny_test`]) with the patient's tokenizer, for tests and smoke runs.
//! - anything else: a `.gguf` file or a Hugging Face directory ([`crate::checkpoint::load`]).
//!
//! [`ModelSpec::identity`] names the weights by content, so caches keyed by it are never
//! stale: a checkpoint's SHA-256, or the tiny model's seed and configuration.

use std::path::PathBuf;

pub use antibody_base::ModelSpec;
use burn::tensor::backend::Backend;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Loaded, load};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// What `antibody-model` adds to a [`ModelSpec`]: loading it and naming its weights.
pub trait ModelSpecExt {
    /// Loads the model and its tokenizer onto `device`.
    fn load<B: Backend>(&self, device: &B::Device) -> Result<Loaded<B>>;
    /// A content-derived name of the weights: equal identities mean equal models.
    fn identity(&self) -> Result<String>;
}

impl ModelSpecExt for ModelSpec {
    fn load<B: Backend>(&self, device: &B::Device) -> Result<Loaded<B>> {
        match self {
            Self::Patient => load(&antibody_fetch::fetch(&antibody_fetch::patient())?, device),
            Self::Tiny { seed } => {
                let model = crate::tiny::random_model(&LlamaConfig::tiny_test(), *seed, device)?;
                Ok(Loaded {
                    model,
                    tokenizer: patient_tokenizer()?,
                })
            }
            Self::Path(p) => {
                if !p.exists() {
                    return Err(ModelError::Invalid(format!(
                        "{}: no such checkpoint (expected a .gguf file or a Hugging Face directory)",
                        p.display()
                    )));
                }
                load(p, device)
            }
        }
    }

    fn identity(&self) -> Result<String> {
        match self {
            Self::Patient => Ok(format!("sha256:{}", antibody_fetch::patient().sha256)),
            Self::Tiny { seed } => {
                let config = serde_json::to_string(&crate::config::HfLlamaConfig::from_config(
                    &LlamaConfig::tiny_test(),
                ))
                .map_err(|e| ModelError::Invalid(e.to_string()))?;
                let digest = Sha256::digest(config.as_bytes());
                Ok(format!("tiny:{seed}:{}", hex(&digest)))
            }
            Self::Path(p) => {
                let files: Vec<PathBuf> = if p.is_dir() {
                    ["model.safetensors", "config.json", "tokenizer.json"]
                        .iter()
                        .map(|f| p.join(f))
                        .collect()
                } else {
                    vec![p.clone()]
                };
                let mut hasher = Sha256::new();
                for f in files {
                    let digest = antibody_fetch::sha256_file(&f)?;
                    hasher.update(digest.as_bytes());
                }
                Ok(format!("sha256:{}", hex(&hasher.finalize())))
            }
        }
    }
}

/// The patient's tokenizer, read from the fetched GGUF's metadata (no weights are loaded).
pub fn patient_tokenizer() -> Result<Tokenizer> {
    let path = antibody_fetch::fetch(&antibody_fetch::patient())?;
    Tokenizer::from_gguf(&GgufFile::open(&path)?)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_identity_is_stable_and_seeded() {
        let a = ModelSpec::Tiny { seed: 1 }.identity().ok();
        assert_eq!(a, ModelSpec::Tiny { seed: 1 }.identity().ok());
        assert_ne!(a, ModelSpec::Tiny { seed: 2 }.identity().ok());
    }
}
