//! GGUF v3 reading: metadata, the tensor index and dequantization to f32.
//!
//! Parsing and dequantization use candle-core's maintained `gguf_file` reader; this module
//! adds what a user needs on top: errors that name the file and tensor, the check that a
//! tensor's type is one we support, and the conversion of `llama.*` metadata into
//! [`LlamaConfig`].

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// An open GGUF file: its header (metadata and tensor index) and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

/// A dequantized tensor in host memory, row-major, in the file's own layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

const SUPPORTED: [GgmlDType; 6] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
];

impl GgufFile {
    /// Opens and parses the header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::GgufFormat {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // The header lists every tensor's place: a file cut short ends before one of them.
        let len = reader
            .get_ref()
            .metadata()
            .map_err(|e| ModelError::io(path, e))?
            .len();
        let last = content
            .tensor_infos
            .iter()
            .map(|(name, i)| {
                let dt = i.ggml_dtype;
                let bytes = i.shape.elem_count() / dt.block_size() * dt.type_size();
                (content.tensor_data_offset + i.offset + bytes as u64, name)
            })
            .max();
        if let Some((end, name)) = last
            && end > len
        {
            return Err(ModelError::GgufFormat {
                path: path.to_path_buf(),
                reason: format!(
                    "truncated: tensor `{name}` ends at byte {end}, the file has {len} bytes"
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// All metadata keys, sorted.
    pub fn metadata_keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.content.metadata.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// Tensor names with shapes (row-major, outermost first) and storage types, sorted.
    pub fn tensor_index(&self) -> Vec<(String, Vec<usize>, String)> {
        let mut v: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| {
                (
                    n.clone(),
                    i.shape.dims().to_vec(),
                    format!("{:?}", i.ggml_dtype),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Whether the file holds tensor `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads and dequantizes tensor `name` to f32.
    pub fn tensor(&mut self, name: &str) -> Result<HostTensor> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    tensor: name.into(),
                })?;
        if !SUPPORTED.contains(&info.ggml_dtype) {
            return Err(ModelError::UnsupportedQuantization {
                path: self.path.clone(),
                tensor: name.into(),
                found: format!("{:?}", info.ggml_dtype),
            });
        }
        let err = |reason: String| ModelError::TensorData {
            path: self.path.clone(),
            tensor: name.into(),
            reason,
        };
        let q = info
            .read(
                &mut self.reader,
                self.content.tensor_data_offset,
                &candle_core::Device::Cpu,
            )
            .map_err(|e| err(e.to_string()))?;
        let t = q
            .dequantize(&candle_core::Device::Cpu)
            .map_err(|e| err(e.to_string()))?;
        let shape = t.dims().to_vec();
        let data = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| err(e.to_string()))?;
        Ok(HostTensor { shape, data })
    }

    fn bad_key(&self, key: &str, expected: &str, found: &Value) -> ModelError {
        ModelError::BadKey {
            path: self.path.clone(),
            key: key.into(),
            expected: expected.into(),
            found: format!("{:?}", found),
        }
    }

    /// Metadata `key` as an unsigned integer.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(|n| n as usize)
            .ok_or_else(|| self.bad_key(key, "a non-negative integer", v))
    }

    /// Metadata `key` as a float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        match v {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            _ => Err(self.bad_key(key, "a float", v)),
        }
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        match v {
            Value::String(s) => Ok(s),
            _ => Err(self.bad_key(key, "a string", v)),
        }
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let Value::Array(items) = v else {
            return Err(self.bad_key(key, "an array of strings", v));
        };
        items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad_key(key, "an array of strings", other)),
            })
            .collect()
    }

    /// Metadata `key` as an array of integers.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        let Value::Array(items) = v else {
            return Err(self.bad_key(key, "an array of integers", v));
        };
        items
            .iter()
            .map(|i| match i {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                other => Err(self.bad_key(key, "an array of integers", other)),
            })
            .collect()
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.metadata(key).ok_or_else(|| ModelError::MissingKey {
            path: self.path.clone(),
            key: key.into(),
        })
    }

    /// The model configuration from `general.architecture` and the `llama.*` keys.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(self.bad_key(
                "general.architecture",
                "\"llama\"",
                &Value::String(arch.into()),
            ));
        }
        let k = |s: &str| format!("llama.{s}");
        let hidden = self.get_usize(&k("embedding_length"))?;
        let heads = self.get_usize(&k("attention.head_count"))?;
        let kv_heads = match self.metadata(&k("attention.head_count_kv")) {
            Some(_) => self.get_usize(&k("attention.head_count_kv"))?,
            None => heads,
        };
        let vocab_size = match self.metadata(&k("vocab_size")) {
            Some(_) => self.get_usize(&k("vocab_size"))?,
            None => self.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = match self.metadata(&k("attention.key_length")) {
            Some(_) => self.get_usize(&k("attention.key_length"))?,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let opt = |key: &str| -> Result<Option<u32>> {
            match self.metadata(key) {
                Some(_) => Ok(Some(self.get_usize(key)? as u32)),
                None => Ok(None),
            }
        };
        let eos = opt("tokenizer.ggml.eos_token_id")?.unwrap_or(2);
        let config = LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.get_usize(&k("feed_forward_length"))?,
            num_layers: self.get_usize(&k("block_count"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rope_theta: match self.metadata(&k("rope.freq_base")) {
                Some(_) => self.get_f64(&k("rope.freq_base"))?,
                None => 10_000.0,
            },
            rms_norm_eps: self.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            max_position_embeddings: self.get_usize(&k("context_length"))?,
            bos_token_id: opt("tokenizer.ggml.bos_token_id")?,
            eos_token_id: eos,
            pad_token_id: opt("tokenizer.ggml.padding_token_id")?.unwrap_or(eos),
        };
        config.validate().map_err(|e| ModelError::BadKey {
            path: self.path.clone(),
            key: k("attention.head_count_kv"),
            expected: "a consistent head layout".into(),
            found: e.to_string(),
        })?;
        Ok(config)
    }
}
