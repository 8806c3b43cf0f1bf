//! Naming a model in configuration: `patient`, `tiny[:SEED]`, or a path. Loading the named
//! model is `antibody-model`'s (`ModelSpec::load` there); this is the name alone, so that
//! `xtask` and every configuration reader resolve it the same way without burn.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

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

/// A model name that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelSpecError(pub String);

impl FromStr for ModelSpec {
    type Err = ModelSpecError;
    fn from_str(s: &str) -> Result<Self, ModelSpecError> {
        match s {
            "" => Err(ModelSpecError(
                "empty model name: expected `patient`, `tiny[:SEED]` or a path".into(),
            )),
            "patient" => Ok(Self::Patient),
            "tiny" => Ok(Self::Tiny { seed: 0 }),
            _ => match s.strip_prefix("tiny:") {
                Some(seed) => seed.parse().map(|seed| Self::Tiny { seed }).map_err(|_| {
                    ModelSpecError(format!(
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

    /// The path of a checkpoint spec.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Path(p) => Some(p),
            _ => None,
        }
    }
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
        assert!("".parse::<ModelSpec>().is_err());
        assert_eq!(
            "runs/x/model".parse::<ModelSpec>().ok(),
            Some(ModelSpec::Path("runs/x/model".into()))
        );
        let resolved = ModelSpec::Path("m.gguf".into()).resolved_against(Path::new("/cfg"));
        assert_eq!(resolved, ModelSpec::Path("/cfg/m.gguf".into()));
        assert_eq!(
            ModelSpec::Tiny { seed: 3 }
                .resolved_against(Path::new("/c"))
                .to_string(),
            "tiny:3"
        );
    }
}
