//! Naming a model in configuration: `patient`, `tiny[:SEED]`, or a path.
//!
//! - `patient`: the pinned SmolLM2-135M-Instruct GGUF, fetched and verified on first use
//!   ([`antibody_fetch::patient`]).
//! - `tiny` / `tiny:SEED`: the deterministic tiny random model ([`crate::tiny`],
//!   [`LlamaConfig::tiny_test`]) with the patient's tokenizer, for tests and smoke runs.
//! - anything else: a `.gguf` file or a Hugging Face directory ([`crate::checkpoint::load`]).
//!
//! [`ModelSpec::identity`] names the weights by content, so caches keyed by it are never
//! stale: a checkpoint's SHA-256, or the tiny model's seed and configuration.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::backend::Backend;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Loaded, load};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// A model named in configuration or on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The pinned patient checkpoint, fetched into the cache.
    Patient,
    /// The tiny random model with this seed.
    Tiny {
        /// Seed of the weight generator.
        seed: u64,
    },
    /// A `.gguf` file or a Hugging Face directory.
    Path(PathBuf),
}

impl FromStr for ModelSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "" => Err(ModelError::Invalid(
                "empty model name: expected `patient`, `tiny[:SEED]` or a path".into(),
            )),
            "patient" => Ok(Self::Patient),
            "tiny" => Ok(Self::Tiny { seed: 0 }),
            _ => match s.strip_prefix("tiny:") {
                Some(seed) => seed.parse().map(|seed| Self::Tiny { seed }).map_err(|_| {
                    ModelError::Invalid(format!(
                        "bad model `{s}`: the seed after `tiny:` must be an integer"
                    ))
                }),
                None => Ok(Self::Path(PathBuf::from(s))),
            },
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Patient => write!(f, "patient"),
            Self::Tiny { seed } => write!(f, "tiny:{seed}"),
            Self::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ModelSpec {
    /// The same spec with a relative path resolved against `base`.
    pub fn resolved_against(self, base: &Path) -> Self {
        match self {
            Self::Path(p) if p.is_relative() => Self::Path(base.join(p)),
            other => other,
        }
    }

    /// Loads the model and its tokenizer onto `device`.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Loaded<B>> {
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

    /// A content-derived name of the weights: equal identities mean equal models.
    pub fn identity(&self) -> Result<String> {
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
    fn parses_names() {
        assert_eq!(
            "patient".parse::<ModelSpec>().ok(),
            Some(ModelSpec::Patient)
        );
        assert_eq!(
            "tiny".parse::<ModelSpec>().ok(),
            Some(ModelSpec::Tiny { seed: 0 })
        );
        assert_eq!(
            "tiny:7".parse::<ModelSpec>().ok(),
            Some(ModelSpec::Tiny { seed: 7 })
        );
        assert!("tiny:x".parse::<ModelSpec>().is_err());
        assert_eq!(
            "runs/x/model".parse::<ModelSpec>().ok(),
            Some(ModelSpec::Path("runs/x/model".into()))
        );
        let resolved = ModelSpec::Path("m.gguf".into()).resolved_against(Path::new("/cfg"));
        assert_eq!(resolved, ModelSpec::Path("/cfg/m.gguf".into()));
    }

    #[test]
    fn tiny_identity_is_stable_and_seeded() {
        let a = ModelSpec::Tiny { seed: 1 }.identity().ok();
        assert_eq!(a, ModelSpec::Tiny { seed: 1 }.identity().ok());
        assert_ne!(a, ModelSpec::Tiny { seed: 2 }.identity().ok());
    }
}
