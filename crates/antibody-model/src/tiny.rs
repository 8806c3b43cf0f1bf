//! The tiny random model's weights: a counter-based generator that
//! `tests/reference/tiny.py` reimplements bit for bit, so the model needs no weight file.
//!
//! For tensor `name` (its Hugging Face name) and flat index `i`:
//! `base = fnv1a64(name) ^ seed`, `z = splitmix64(base + i)`, `u = (z >> 40) / 2²⁴`,
//! `s = 2u − 1`; projections and the embedding get `s / sqrt(shape[1])`, norms `1 + 0.1·s`
//! (computed in f64, stored as f32).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;

use crate::checkpoint::from_host_tensors;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::gguf::HostTensor;
use crate::llama::Llama;
use crate::names::checkpoint_tensors;

pub use antibody_base::hash::{fnv1a64, splitmix64};

/// The values of one tensor.
pub fn tensor_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let base = fnv1a64(name.as_bytes()) ^ seed;
    let n: usize = shape.iter().product();
    let scale = if shape.len() == 2 {
        1.0 / (shape[1] as f64).sqrt()
    } else {
        0.0
    };
    (0..n)
        .map(|i| {
            let z = splitmix64(base.wrapping_add(i as u64));
            let s = 2.0 * ((z >> 40) as f64 / (1u64 << 24) as f64) - 1.0;
            if shape.len() == 2 {
                (s * scale) as f32
            } else {
                (1.0 + 0.1 * s) as f32
            }
        })
        .collect()
}

/// All tensors of a random model of `config`, keyed by Hugging Face name.
pub fn random_tensors(config: &LlamaConfig, seed: u64) -> BTreeMap<String, HostTensor> {
    checkpoint_tensors(config)
        .into_iter()
        .map(|s| {
            let data = tensor_values(&s.hf, &s.shape, seed);
            (
                s.hf,
                HostTensor {
                    shape: s.shape,
                    data,
                },
            )
        })
        .collect()
}

/// A model of `config` with generated weights.
pub fn random_model<B: Backend>(
    config: &LlamaConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Llama<B>> {
    from_host_tensors(
        config,
        random_tensors(config, seed),
        Path::new("<tiny generator>"),
        device,
    )
}
