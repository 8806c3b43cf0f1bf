//! Model configuration: the internal [`LlamaConfig`], the serde mirror of a checkpoint's
//! `config.json` ([`HfLlamaConfig`]) and the conversion between them.
//!
//! The GGUF side (`llama.*` metadata keys) is converted in [`crate::gguf`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The architecture of a Llama-family decoder, as this crate uses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP hidden activation.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest sequence the checkpoint was trained for.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: u32,
    /// Padding token id (the EOS id when the checkpoint names none).
    pub pad_token_id: u32,
}

impl LlamaConfig {
    /// SmolLM2-135M(-Instruct): 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings.
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            bos_token_id: Some(1),
            eos_token_id: 2,
            pad_token_id: 2,
        }
    }

    /// The tiny random model of the real architecture used by every crate's tests:
    /// SmolLM2's vocabulary (so the real tokenizer fits), 4 layers, hidden 64, 4 heads / 2 KV
    /// heads. Its weights come from [`crate::tiny`]; `tests/reference/tiny.py` mirrors it.
    pub fn tiny_test() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            max_position_embeddings: 2048,
            bos_token_id: Some(1),
            eos_token_id: 2,
            pad_token_id: 2,
        }
    }

    /// Checks the internal consistency of the configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ModelError::Invalid(format!("invalid LlamaConfig: {what}")));
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        Ok(())
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let per_layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * per_layer + h + head
    }
}

/// `eos_token_id` in a `config.json` is an integer or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single id.
    One(u32),
    /// Several ids; the first is used.
    Many(Vec<u32>),
}

/// A serde mirror of a Hugging Face Llama `config.json`, with its own field names.
///
/// Unknown fields are tolerated (checkpoints carry many); fields that would change the
/// computation in ways this crate does not implement are rejected in [`Self::into_config`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfLlamaConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Must be `llama`.
    pub model_type: String,
    /// See [`LlamaConfig::vocab_size`].
    pub vocab_size: usize,
    /// See [`LlamaConfig::hidden_size`].
    pub hidden_size: usize,
    /// See [`LlamaConfig::intermediate_size`].
    pub intermediate_size: usize,
    /// See [`LlamaConfig::num_layers`].
    pub num_hidden_layers: usize,
    /// See [`LlamaConfig::num_heads`].
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Defaults to 10000.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Defaults to 1e-6 (transformers' default).
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Defaults to false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Defaults to 2048.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Must be `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Must be false.
    #[serde(default)]
    pub attention_bias: bool,
    /// Must be false.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Must be null (no RoPE scaling is implemented).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// EOS id(s).
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    /// PAD id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Storage dtype, informational.
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl HfLlamaConfig {
    /// Reads and parses a `config.json`; a wrongly typed field is reported with its key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_data() || key != "." {
                ModelError::BadKey {
                    path: path.to_path_buf(),
                    key,
                    expected: "a value of the field's type".into(),
                    found: inner.to_string(),
                }
            } else {
                ModelError::Json {
                    path: path.to_path_buf(),
                    source: inner,
                }
            }
        })
    }

    /// Converts into the internal configuration, rejecting what is not implemented.
    pub fn into_config(self, path: &Path) -> Result<LlamaConfig> {
        let bad = |key: &str, expected: &str, found: String| ModelError::BadKey {
            path: path.to_path_buf(),
            key: key.into(),
            expected: expected.into(),
            found,
        };
        if self.model_type != "llama" {
            return Err(bad(
                "model_type",
                "\"llama\"",
                format!("{:?}", self.model_type),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(bad(
                "hidden_act",
                "\"silu\"",
                format!("{:?}", self.hidden_act),
            ));
        }
        if self.attention_bias {
            return Err(bad("attention_bias", "false", "true".into()));
        }
        if self.mlp_bias {
            return Err(bad("mlp_bias", "false", "true".into()));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(bad("rope_scaling", "null", s.to_string()));
        }
        let num_heads = self.num_attention_heads;
        if num_heads == 0 || !self.hidden_size.is_multiple_of(num_heads) && self.head_dim.is_none()
        {
            return Err(bad(
                "num_attention_heads",
                "a positive divisor of hidden_size",
                num_heads.to_string(),
            ));
        }
        let eos = match self.eos_token_id {
            Some(OneOrMany::One(id)) => id,
            Some(OneOrMany::Many(ids)) => *ids
                .first()
                .ok_or_else(|| bad("eos_token_id", "a non-empty list", "[]".into()))?,
            None => return Err(bad("eos_token_id", "an integer", "nothing".into())),
        };
        let config = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(num_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / num_heads),
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: eos,
            pad_token_id: self.pad_token_id.unwrap_or(eos),
        };
        config.validate().map_err(|e| ModelError::BadKey {
            path: path.to_path_buf(),
            key: "num_key_value_heads".into(),
            expected: "a consistent head layout".into(),
            found: e.to_string(),
        })?;
        Ok(config)
    }

    /// The `config.json` that transformers reads for `config`.
    pub fn from_config(config: &LlamaConfig) -> Self {
        Self {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_hidden_layers: config.num_layers,
            num_attention_heads: config.num_heads,
            num_key_value_heads: Some(config.num_kv_heads),
            head_dim: Some(config.head_dim),
            rope_theta: config.rope_theta,
            rms_norm_eps: config.rms_norm_eps,
            tie_word_embeddings: config.tie_word_embeddings,
            max_position_embeddings: config.max_position_embeddings,
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            bos_token_id: config.bos_token_id,
            eos_token_id: Some(OneOrMany::One(config.eos_token_id)),
            pad_token_id: Some(config.pad_token_id),
            torch_dtype: Some("float32".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_parameter_count_matches_the_checkpoint() {
        assert_eq!(LlamaConfig::smollm2_135m().num_parameters(), 134_515_008);
    }

    #[test]
    fn hf_roundtrip_preserves_the_config() {
        let c = LlamaConfig::smollm2_135m();
        let hf = HfLlamaConfig::from_config(&c);
        let json = serde_json::to_string(&hf).expect("serialize");
        let back: HfLlamaConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(
            back.into_config(Path::new("config.json")).expect("convert"),
            c
        );
    }

    #[test]
    fn wrongly_typed_field_names_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        let mut v = serde_json::to_value(HfLlamaConfig::from_config(&LlamaConfig::tiny_test()))
            .expect("to value");
        v["hidden_size"] = serde_json::Value::String("wide".into());
        std::fs::write(&path, v.to_string()).expect("write");
        let err = HfLlamaConfig::from_file(&path)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("config.json"), "{err}");
        assert!(err.contains("hidden_size"), "{err}");
        assert!(err.contains("expected usize"), "{err}");
    }

    #[test]
    fn unimplemented_features_are_rejected_by_key() {
        let mut hf = HfLlamaConfig::from_config(&LlamaConfig::tiny_test());
        hf.rope_scaling = Some(serde_json::json!({"type": "linear", "factor": 2.0}));
        let err = hf
            .into_config(Path::new("c.json"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("rope_scaling"), "{err}");
    }
}
