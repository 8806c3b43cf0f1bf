//! Loading and saving weights: GGUF files, Hugging Face safetensors directories, and host
//! tensors in Hugging Face layout (what the GGUF reader and the tiny-model generator make).
//!
//! Every path goes through burn's store: host tensors become `TensorSnapshot`s applied with
//! the PyTorch adapter (which transposes `Linear` weights), safetensors files are read and
//! written by `SafetensorsStore`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use burn_store::{
    ApplyResult, BurnToPyTorchAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};

use crate::config::{HfLlamaConfig, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, HostTensor};
use crate::llama::Llama;
use crate::names::{GgufFix, checkpoint_tensors, unpermute_heads};
use crate::tokenizer::Tokenizer;

/// A model with the tokenizer (and chat template) that came with it.
pub struct Loaded<B: Backend> {
    /// The model.
    pub model: Llama<B>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
}

/// Loads a checkpoint: a `.gguf` file or a Hugging Face directory
/// (`config.json`, `model.safetensors`, `tokenizer.json`).
pub fn load<B: Backend>(path: &Path, device: &B::Device) -> Result<Loaded<B>> {
    if path.is_dir() {
        let model = load_hf_dir(path, device)?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        Ok(Loaded { model, tokenizer })
    } else {
        let mut gguf = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let model = load_gguf(&mut gguf, device)?;
        Ok(Loaded { model, tokenizer })
    }
}

/// Builds the model from a GGUF file, dequantizing every tensor to f32.
pub fn load_gguf<B: Backend>(gguf: &mut GgufFile, device: &B::Device) -> Result<Llama<B>> {
    let config = gguf.llama_config()?;
    let mut tensors = BTreeMap::new();
    for spec in checkpoint_tensors(&config) {
        let t = gguf.tensor(&spec.gguf)?;
        if t.shape != spec.shape {
            return Err(ModelError::TensorShape {
                path: gguf.path().to_path_buf(),
                tensor: spec.gguf,
                expected: spec.shape,
                found: t.shape,
            });
        }
        let data = match spec.fix {
            GgufFix::None => t.data,
            GgufFix::UnpermuteHeads(heads) => {
                unpermute_heads(&t.data, spec.shape[0], spec.shape[1], heads)
            }
        };
        tensors.insert(
            spec.hf,
            HostTensor {
                shape: spec.shape,
                data,
            },
        );
    }
    from_host_tensors(&config, tensors, gguf.path(), device)
}

/// Builds the model from host tensors keyed by Hugging Face name, in Hugging Face layout.
/// `origin` names where they came from in errors.
pub fn from_host_tensors<B: Backend>(
    config: &LlamaConfig,
    mut tensors: BTreeMap<String, HostTensor>,
    origin: &Path,
    device: &B::Device,
) -> Result<Llama<B>> {
    config.validate()?;
    let mut snapshots = Vec::new();
    for spec in checkpoint_tensors(config) {
        let t = tensors
            .remove(&spec.hf)
            .ok_or_else(|| ModelError::MissingTensor {
                path: origin.to_path_buf(),
                tensor: spec.hf.clone(),
            })?;
        if t.shape != spec.shape || t.data.len() != spec.shape.iter().product::<usize>() {
            return Err(ModelError::TensorShape {
                path: origin.to_path_buf(),
                tensor: spec.hf,
                expected: spec.shape,
                found: t.shape,
            });
        }
        let path: Vec<String> = spec.hf.split('.').map(str::to_owned).collect();
        snapshots.push(TensorSnapshot::from_data(
            TensorData::new(t.data, t.shape),
            path,
            Vec::new(),
            ParamId::new(),
        ));
    }
    let mut model = config.init::<B>(device);
    let result = model.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    check_applied(&result, origin)?;
    Ok(model)
}

fn check_applied(result: &ApplyResult, origin: &Path) -> Result<()> {
    if let Some(e) = result.errors.first() {
        return Err(ModelError::Store {
            path: origin.to_path_buf(),
            reason: e.to_string(),
        });
    }
    if let Some((name, _)) = result.missing.first() {
        return Err(ModelError::MissingTensor {
            path: origin.to_path_buf(),
            tensor: name.clone(),
        });
    }
    Ok(())
}

/// Casts half-precision tensors to f32 while loading (checkpoints are often stored in bf16).
#[derive(Clone)]
struct ToF32;

impl ModuleAdapter for ToF32 {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        if matches!(snapshot.dtype, DType::F32) {
            return snapshot.clone();
        }
        let data_fn = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data_fn()?.convert_dtype(DType::F32))),
            DType::F32,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Checks a safetensors file's tensor names and shapes against the configuration, so that
/// a missing or misshaped tensor is reported by its checkpoint name in Hugging Face layout.
fn check_safetensors(path: &Path, config: &LlamaConfig) -> Result<()> {
    let infos = safetensors_shapes(path)?;
    for spec in checkpoint_tensors(config) {
        let info = infos
            .get(&spec.hf)
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                tensor: spec.hf.clone(),
            })?;
        if *info != spec.shape {
            return Err(ModelError::TensorShape {
                path: path.to_path_buf(),
                tensor: spec.hf,
                expected: spec.shape,
                found: info.clone(),
            });
        }
    }
    Ok(())
}

/// Tensor shapes from a safetensors file's JSON header, read without touching the data.
fn safetensors_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    use std::io::Read as _;
    let bad = |reason: String| ModelError::Store {
        path: path.to_path_buf(),
        reason: format!("not a safetensors file: {reason}"),
    };
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("header length: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > file_len.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(format!(
            "header of {len} bytes in a {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("header: {e}")))?;
    #[derive(serde::Deserialize)]
    struct Info {
        shape: Vec<usize>,
    }
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    entries.remove("__metadata__");
    entries
        .into_iter()
        .map(|(name, v)| {
            let info: Info = serde_json::from_value(v).map_err(|e| bad(format!("{name}: {e}")))?;
            Ok((name, info.shape))
        })
        .collect()
}

/// Loads the model from a Hugging Face directory (`config.json` + `model.safetensors`).
pub fn load_hf_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<Llama<B>> {
    let config_path = dir.join("config.json");
    let config = HfLlamaConfig::from_file(&config_path)?.into_config(&config_path)?;
    let weights = dir.join("model.safetensors");
    check_safetensors(&weights, &config)?;
    let mut model = config.init::<B>(device);
    let mut store = SafetensorsStore::from_file(&weights)
        .with_from_adapter(ToF32.chain(PyTorchToBurnAdapter))
        .allow_partial(true);
    let result = model.load_from(&mut store).map_err(|e| ModelError::Store {
        path: weights.clone(),
        reason: e.to_string(),
    })?;
    check_applied(&result, &weights)?;
    Ok(model)
}

/// Writes a Hugging Face directory that transformers loads: `config.json`,
/// `model.safetensors` (f32, `[out, in]` projections), `tokenizer.json`,
/// `tokenizer_config.json` (with the chat template) and `generation_config.json`.
///
/// Files are written to a temporary directory beside `dir` and renamed into place, so a
/// failed save never leaves a half-written checkpoint under `dir`.
pub fn save_hf_dir<B: Backend>(model: &Llama<B>, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let tmp = antibody_base::atomic::staging_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let p = tmp.path().join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Json {
            path: p.clone(),
            source: e,
        })?;
        antibody_base::atomic::write_new(&p, text.as_bytes()).map_err(|e| ModelError::io(&p, e))
    };
    let hf = HfLlamaConfig::from_config(&model.config);
    write_json(
        "config.json",
        &serde_json::to_value(&hf).map_err(|e| ModelError::Json {
            path: PathBuf::from("config.json"),
            source: e,
        })?,
    )?;
    write_json(
        "generation_config.json",
        &serde_json::json!({
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": model.config.eos_token_id,
            "pad_token_id": model.config.pad_token_id,
        }),
    )?;
    write_json("tokenizer_config.json", &tokenizer.hf_tokenizer_config())?;
    tokenizer.save_json(&tmp.path().join("tokenizer.json"))?;
    let weights = tmp.path().join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&weights)
        .with_to_adapter(BurnToPyTorchAdapter)
        // One metadata key: burn-store keeps metadata in a HashMap, whose order (and so the
        // file's bytes, which name the model in cache keys) would vary from run to run.
        .clear_metadata()
        .metadata("format", "pt");
    model.save_into(&mut store).map_err(|e| ModelError::Store {
        path: weights.clone(),
        reason: e.to_string(),
    })?;
    antibody_base::atomic::replace_dir(tmp, dir).map_err(|e| ModelError::io(dir, e))
}
