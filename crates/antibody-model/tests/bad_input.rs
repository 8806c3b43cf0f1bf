//! GGUF and safetensors loading on made-up files: every supported storage type loads, and
//! every kind of bad input is an error that names the file, the tensor or key, and what was
//! expected against what was found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use antibody_model::checkpoint::{load_gguf, load_hf_dir};
use antibody_model::device::Cpu;
use antibody_model::gguf::GgufFile;
use antibody_model::names::{GgufFix, checkpoint_tensors, permute_heads};
use antibody_model::{Hooks, LlamaConfig, ModelError, TokenBatch, tiny};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

struct GgufSpec {
    dtype: GgmlDType,
    /// Tensors to leave out.
    drop: Vec<&'static str>,
    /// Tensors whose shape is replaced.
    reshape: BTreeMap<&'static str, Vec<usize>>,
    /// Tensors stored with another type.
    retype: BTreeMap<&'static str, GgmlDType>,
    /// Metadata replaced.
    meta: Vec<(&'static str, Value)>,
}

impl Default for GgufSpec {
    fn default() -> Self {
        Self {
            dtype: GgmlDType::F32,
            drop: vec![],
            reshape: BTreeMap::new(),
            retype: BTreeMap::new(),
            meta: vec![],
        }
    }
}

/// Writes the tiny random model as a GGUF file, altered as `spec` says.
fn write_tiny_gguf(path: &Path, spec: &GgufSpec) {
    let c = LlamaConfig::tiny_test();
    let tensors = tiny::random_tensors(&c, 0);
    let mut meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(c.num_layers as u32)),
        ("llama.embedding_length", Value::U32(c.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Value::U32(c.intermediate_size as u32),
        ),
        ("llama.attention.head_count", Value::U32(c.num_heads as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(c.num_kv_heads as u32),
        ),
        ("llama.rope.freq_base", Value::F32(c.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps as f32),
        ),
        (
            "llama.context_length",
            Value::U32(c.max_position_embeddings as u32),
        ),
        ("llama.vocab_size", Value::U32(c.vocab_size as u32)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.padding_token_id", Value::U32(2)),
    ];
    for (k, v) in &spec.meta {
        meta.retain(|(key, _)| key != k);
        meta.push((k, v.clone()));
    }
    let mut q = Vec::new();
    for s in checkpoint_tensors(&c) {
        if spec.drop.contains(&s.gguf.as_str()) {
            continue;
        }
        let t = &tensors[&s.hf];
        let data = match s.fix {
            GgufFix::None => t.data.clone(),
            GgufFix::UnpermuteHeads(h) => permute_heads(&t.data, s.shape[0], s.shape[1], h),
        };
        let shape = spec
            .reshape
            .get(s.gguf.as_str())
            .cloned()
            .unwrap_or(s.shape.clone());
        let n: usize = shape.iter().product();
        let data: Vec<f32> = data.into_iter().cycle().take(n).collect();
        let tensor =
            candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu).expect("tensor");
        let dtype = spec.retype.get(s.gguf.as_str()).copied().unwrap_or(
            // norms stay f32, as llama.cpp stores them
            if s.shape.len() == 1 {
                GgmlDType::F32
            } else {
                spec.dtype
            },
        );
        q.push((
            s.gguf.clone(),
            QTensor::quantize(&tensor, dtype).expect("quantize"),
        ));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).expect("create");
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).expect("write gguf");
}

fn tiny_logits(model: &antibody_model::Llama<Cpu>) -> Vec<f32> {
    let batch = TokenBatch::right_padded(&[vec![1, 504, 3458, 28, 12345, 9]], 2);
    let (logits, _) = model.forward(&batch, &Hooks::none()).expect("forward");
    logits.into_data().iter::<f32>().collect()
}

fn load_err(path: &Path) -> ModelError {
    let mut gguf = match GgufFile::open(path) {
        Ok(g) => g,
        Err(e) => return e,
    };
    match load_gguf::<Cpu>(&mut gguf, &Default::default()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn generation_checks_the_context_length_and_the_vocabulary() {
    let device = Default::default();
    let model = tiny::random_model::<Cpu>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let too_long = antibody_model::GenerationConfig::greedy(model.config.max_position_embeddings);
    let msg = antibody_model::generate(&model, &[vec![1, 2, 3]], &[], &too_long)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("context length"), "{msg}");
    let outside = model.config.vocab_size as u32;
    let msg = antibody_model::generate(
        &model,
        &[vec![1, outside]],
        &[],
        &antibody_model::GenerationConfig::greedy(2),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(msg.contains("outside the vocabulary"), "{msg}");
}

#[test]
fn the_generate_command_takes_a_model_named_as_in_configuration() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_antibody-model"))
        .args([
            "generate",
            "--checkpoint",
            "tiny:0",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tmp(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    (dir, path)
}

#[test]
fn f32_gguf_loads_losslessly() {
    let device = Default::default();
    let reference = tiny_logits(
        &tiny::random_model::<Cpu>(&LlamaConfig::tiny_test(), 0, &device).expect("model"),
    );
    let (_d, path) = tmp("tiny.gguf");
    write_tiny_gguf(&path, &GgufSpec::default());
    let mut gguf = GgufFile::open(&path).expect("open");
    let mut expected = LlamaConfig::tiny_test();
    expected.rms_norm_eps = 1e-5f32 as f64; // GGUF stores it as f32, and transformers reads that
    assert_eq!(gguf.llama_config().expect("config"), expected);
    let logits = tiny_logits(&load_gguf::<Cpu>(&mut gguf, &device).expect("load"));
    let diff = reference
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "f32 GGUF changed logits by {diff}");
}

/// Each block of 32 values dequantizes within the rounding error its format allows.
/// (End to end, Q4_1 and Q8_0 are also checked against gguf-py through transformers in
/// `smollm2_reference.rs`.)
#[test]
fn quantized_types_dequantize_within_their_block_error() {
    let name = "blk.0.ffn_gate.weight";
    let original =
        &tiny::random_tensors(&LlamaConfig::tiny_test(), 0)["model.layers.0.mlp.gate_proj.weight"];
    let device = Default::default();
    for dtype in [
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let (_d, path) = tmp("q.gguf");
        write_tiny_gguf(
            &path,
            &GgufSpec {
                dtype,
                ..Default::default()
            },
        );
        let mut gguf = GgufFile::open(&path).expect("open");
        let t = gguf.tensor(name).expect("tensor");
        assert_eq!(t.shape, original.shape);
        for (block, (ours, orig)) in t.data.chunks(32).zip(original.data.chunks(32)).enumerate() {
            let amax = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
            let (lo, hi) = orig
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            let half_f16 = amax * 1e-3; // scales and minima are stored as f16
            for (a, b) in ours.iter().zip(orig) {
                let bound = match dtype {
                    GgmlDType::F16 => b.abs() * 2f32.powi(-11) + 1e-7,
                    GgmlDType::BF16 => b.abs() * 2f32.powi(-8) + 1e-7,
                    GgmlDType::Q8_0 => amax / 127.0 * 0.51 + half_f16,
                    GgmlDType::Q4_1 => (hi - lo) / 15.0 * 0.51 + half_f16,
                    _ => amax / 8.0 * 1.01 + half_f16, // Q4_0: one step, clipping at +7
                };
                assert!(
                    (a - b).abs() <= bound,
                    "{dtype:?} block {block}: {a} vs {b} (bound {bound})"
                );
            }
        }
        let model = load_gguf::<Cpu>(&mut gguf, &device).expect("the model loads");
        assert!(
            tiny_logits(&model).iter().all(|x| x.is_finite()),
            "{dtype:?}"
        );
    }
}

#[test]
fn truncated_file_names_the_file_and_the_tensor() {
    let (_d, path) = tmp("truncated.gguf");
    write_tiny_gguf(&path, &GgufSpec::default());
    let len = std::fs::metadata(&path).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(len - 1000).expect("truncate");
    let msg = load_err(&path).to_string();
    assert!(msg.contains("truncated.gguf"), "{msg}");
    assert!(
        msg.contains("tensor `") && msg.contains("truncated"),
        "{msg}"
    );
    // Opening it (what `antibody-model inspect` does) already says so.
    let msg = GgufFile::open(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("truncated: tensor `"), "{msg}");
    // a file cut inside the header
    f.set_len(200).expect("truncate");
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("truncated.gguf") && msg.contains("not a readable GGUF"),
        "{msg}"
    );
}

#[test]
fn garbage_is_not_a_gguf() {
    let (_d, path) = tmp("garbage.gguf");
    std::fs::write(&path, b"this is not a model at all, just text").expect("write");
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("garbage.gguf") && msg.contains("not a readable GGUF"),
        "{msg}"
    );
}

#[test]
fn unsupported_quantization_names_the_tensor_and_type() {
    let (_d, path) = tmp("q5.gguf");
    let spec = GgufSpec {
        retype: [("blk.2.ffn_up.weight", GgmlDType::Q5_0)].into(),
        ..Default::default()
    };
    write_tiny_gguf(&path, &spec);
    let err = load_err(&path);
    assert!(
        matches!(err, ModelError::UnsupportedQuantization { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("q5.gguf") && msg.contains("blk.2.ffn_up.weight") && msg.contains("Q5_0"),
        "{msg}"
    );
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let (_d, path) = tmp("missing.gguf");
    write_tiny_gguf(
        &path,
        &GgufSpec {
            drop: vec!["blk.1.attn_v.weight"],
            ..Default::default()
        },
    );
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("missing.gguf") && msg.contains("missing tensor `blk.1.attn_v.weight`"),
        "{msg}"
    );

    let (_d, path) = tmp("misshaped.gguf");
    let spec = GgufSpec {
        reshape: [("blk.3.ffn_down.weight", vec![64, 96])].into(),
        ..Default::default()
    };
    write_tiny_gguf(&path, &spec);
    let msg = load_err(&path).to_string();
    assert!(msg.contains("blk.3.ffn_down.weight"), "{msg}");
    assert!(
        msg.contains("[64, 96]") && msg.contains("expected [64, 128]"),
        "{msg}"
    );
}

#[test]
fn wrongly_typed_metadata_names_the_key() {
    let (_d, path) = tmp("meta.gguf");
    let spec = GgufSpec {
        meta: vec![("llama.block_count", Value::String("four".into()))],
        ..Default::default()
    };
    write_tiny_gguf(&path, &spec);
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("meta.gguf") && msg.contains("llama.block_count"),
        "{msg}"
    );
    assert!(
        msg.contains("expected a non-negative integer") && msg.contains("four"),
        "{msg}"
    );

    let (_d, path) = tmp("nometa.gguf");
    // a key of the wrong kind altogether
    let spec = GgufSpec {
        meta: vec![("llama.feed_forward_length", Value::Bool(true))],
        ..Default::default()
    };
    write_tiny_gguf(&path, &spec);
    let msg = load_err(&path).to_string();
    assert!(msg.contains("llama.feed_forward_length"), "{msg}");
}

/// Rewrites `model.safetensors` in `dir` with `edit` applied to its tensors.
fn edit_safetensors(dir: &Path, edit: impl Fn(&mut BTreeMap<String, (Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).expect("write");
}

#[test]
fn safetensors_directory_errors_name_the_tensor() {
    let device = Default::default();
    let model = tiny::random_model::<Cpu>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny-hf");
    // a tokenizer is needed to save; the tiny model shares SmolLM2's
    let gguf_path = antibody_fetch::fetch(&antibody_fetch::patient()).expect("patient");
    let tokenizer =
        antibody_model::Tokenizer::from_gguf(&GgufFile::open(&gguf_path).expect("open"))
            .expect("tok");
    antibody_model::save_hf_dir(&model, &tokenizer, &out).expect("save");
    let again = load_hf_dir::<Cpu>(&out, &device).expect("reload");
    assert_eq!(tiny_logits(&again), tiny_logits(&model));

    edit_safetensors(&out, |t| {
        t.remove("model.layers.2.mlp.gate_proj.weight");
    });
    let msg = load_hf_dir::<Cpu>(&out, &device)
        .expect_err("missing")
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.layers.2.mlp.gate_proj.weight"),
        "{msg}"
    );

    antibody_model::save_hf_dir(&model, &tokenizer, &out).expect("save");
    edit_safetensors(&out, |t| {
        let entry = t
            .get_mut("model.layers.0.self_attn.k_proj.weight")
            .expect("k_proj");
        entry.0 = vec![16, 64];
        entry.1.truncate(16 * 64 * 4);
    });
    let msg = load_hf_dir::<Cpu>(&out, &device)
        .expect_err("misshaped")
        .to_string();
    assert!(
        msg.contains("k_proj") && msg.contains("[16, 64]") && msg.contains("expected [32, 64]"),
        "{msg}"
    );

    antibody_model::save_hf_dir(&model, &tokenizer, &out).expect("save");
    let cfg = out.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("\"num_hidden_layers\": 4", "\"num_hidden_layers\": \"4\"");
    std::fs::write(&cfg, text).expect("write");
    let msg = load_hf_dir::<Cpu>(&out, &device)
        .expect_err("bad config")
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("num_hidden_layers"),
        "{msg}"
    );
}
