//! Batched generation with a KV cache: left padding, greedy or sampled decoding
//! (temperature, top-p, seed), stopping at EOS / `<|im_end|>` or after `max_new_tokens`.

use burn::tensor::{Tensor, TensorData, backend::Backend};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::batch::TokenBatch;
use crate::error::{ModelError, Result};
use crate::llama::{KvCache, Llama};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sampling at `temperature` from the smallest set of tokens whose probability reaches
    /// `top_p`, with a seeded generator.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Nucleus mass in (0, 1].
        top_p: f32,
        /// Seed of the sampler.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// At most this many new tokens per sequence.
    pub max_new_tokens: usize,
    /// Stop tokens are suppressed until this many tokens are generated (benchmarks use it
    /// to make every sequence do the same work).
    #[serde(default)]
    pub min_new_tokens: usize,
    /// Decoding rule.
    pub sampling: Sampling,
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            min_new_tokens: 0,
            sampling: Sampling::Greedy,
        }
    }
}

/// The outcome for each prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New token ids, the stop token included when one ended the sequence.
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it (rather than the length limit).
    pub stopped: bool,
}

/// The fewest prompts a part of a sharded batch decodes ([`crate::shards`]): below it, a
/// part's products are too thin to keep a core busy, and one batch on every thread is faster.
pub const MIN_PART_PROMPTS: usize = 8;

/// Generates continuations of `prompts` (token ids, e.g. from
/// [`crate::Tokenizer::chat_ids`]) in one left-padded batch; greedy decoding in parts under
/// [`crate::shards`] (one per core on the CPU; the answers do not depend on the split), never
/// sampled decoding (one seeded stream serves the batch).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    stop_ids: &[u32],
    config: &GenerationConfig,
) -> Result<Vec<Generated>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::Invalid(format!("prompt {i} is empty")));
    }
    if let Sampling::Sample {
        temperature, top_p, ..
    } = config.sampling
        && (temperature <= 0.0 || !(top_p > 0.0 && top_p <= 1.0))
    {
        return Err(ModelError::Invalid(format!(
            "sampling needs temperature > 0 and top_p in (0, 1]; got {temperature} and {top_p}"
        )));
    }
    let c = &model.config;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + config.max_new_tokens > c.max_position_embeddings {
        return Err(ModelError::Invalid(format!(
            "a prompt of {longest} tokens and {} new tokens exceed the model's context length \
             of {} tokens",
            config.max_new_tokens, c.max_position_embeddings
        )));
    }
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&id) = p.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "prompt {i}: token id {id} is outside the vocabulary of {} tokens",
                c.vocab_size
            )));
        }
    }
    if config.sampling != Sampling::Greedy {
        return generate_batch(model, prompts, stop_ids, config);
    }
    crate::shards::in_parts(prompts, MIN_PART_PROMPTS, |part, _| {
        generate_batch(model, part, stop_ids, config)
    })
}

/// [`generate`] in one left-padded batch on the calling thread's rayon pool (`prompts` is
/// not empty and checked by `generate`).
fn generate_batch<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    stop_ids: &[u32],
    config: &GenerationConfig,
) -> Result<Vec<Generated>> {
    let c = &model.config;
    let device = model.device();
    let batch = TokenBatch::left_padded(prompts, c.pad_token_id);
    let b = batch.batch;
    let mut cache = KvCache::new(c, b, batch.seq + config.max_new_tokens, &device);
    let mut hidden = model.forward_cached(&batch.ids, &batch.mask, batch.seq, &mut cache)?;
    let mut out: Vec<Generated> = (0..b)
        .map(|_| Generated {
            tokens: Vec::new(),
            stopped: false,
        })
        .collect();
    let suppress_stops = (config.min_new_tokens > 0).then(|| {
        let mut v = vec![0f32; c.vocab_size];
        for &s in stop_ids {
            if let Some(x) = v.get_mut(s as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        Tensor::<B, 2>::from_data(TensorData::new(v, [1, c.vocab_size]), &device)
    });
    let mut rng = match config.sampling {
        Sampling::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed)),
        Sampling::Greedy => None,
    };
    // `active[i]` is the prompt whose sequence is row i of the cache: finished sequences
    // leave the batch (see `compaction_due`), so later steps only compute the running ones.
    let mut active: Vec<usize> = (0..b).collect();
    for step in 0..config.max_new_tokens {
        let rows = active.len();
        let mut logits = model
            .logits(hidden.unsqueeze_dim(1))
            .reshape([rows, c.vocab_size]);
        if step < config.min_new_tokens
            && let Some(mask) = &suppress_stops
        {
            logits = logits + mask.clone();
        }
        let next: Vec<u32> = match (&config.sampling, rng.as_mut()) {
            (
                Sampling::Sample {
                    temperature, top_p, ..
                },
                Some(rng),
            ) => {
                let host: Vec<f32> = logits.into_data().iter::<f32>().collect();
                host.chunks(c.vocab_size)
                    .map(|row| sample_row(row, *temperature, *top_p, rng))
                    .collect()
            }
            _ => logits
                .argmax(1)
                .into_data()
                .iter::<i64>()
                .map(|i| i as u32)
                .collect(),
        };
        for (&prompt, &tok) in active.iter().zip(&next) {
            let g = &mut out[prompt];
            if !g.stopped {
                g.tokens.push(tok);
                g.stopped = stop_ids.contains(&tok);
            }
        }
        let running: Vec<usize> = (0..rows).filter(|&r| !out[active[r]].stopped).collect();
        if running.is_empty() || step + 1 == config.max_new_tokens {
            break;
        }
        let next = if compaction_due(running.len(), rows) {
            cache.retain(&running);
            active = running.iter().map(|&r| active[r]).collect();
            running.iter().map(|&r| next[r]).collect()
        } else {
            next
        };
        hidden = model.forward_cached(&next, &vec![true; next.len()], 1, &mut cache)?;
    }
    Ok(out)
}

/// The batch size that splits `n` prompts into the fewest batches of at most `max`, as
/// evenly as possible: 200 prompts at most 64 at a time are 4 batches of 50, not 64, 64, 64
/// and 8 (a small last batch runs at a small batch's lower throughput).
pub fn balanced_batch_size(n: usize, max: usize) -> usize {
    let max = max.max(1);
    if n == 0 {
        return max;
    }
    n.div_ceil(n.div_ceil(max))
}

/// Whether to drop finished sequences from a batch of `rows` of which `running` still
/// decode. Dropping copies the whole cache once, so it waits until a quarter of the batch has
/// finished (decoding a row costs about as much as its share of that copy over a few steps).
fn compaction_due(running: usize, rows: usize) -> bool {
    running * 4 <= rows * 3
}

/// Draws one token from a row of logits with temperature and nucleus (top-p) filtering.
fn sample_row(row: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / total;
        n += 1;
        if kept >= top_p {
            break;
        }
    }
    let mass: f32 = probs[..n].iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * mass;
    for p in &probs[..n] {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    probs[n - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_batches_are_as_few_and_as_even_as_possible() {
        assert_eq!(balanced_batch_size(200, 64), 50);
        assert_eq!(balanced_batch_size(64, 64), 64);
        assert_eq!(balanced_batch_size(65, 64), 33);
        assert_eq!(balanced_batch_size(10, 64), 10);
        assert_eq!(balanced_batch_size(0, 64), 64);
        assert_eq!(balanced_batch_size(5, 0), 1);
    }

    #[test]
    fn nucleus_sampling_keeps_only_the_top_mass() {
        let mut rng = StdRng::seed_from_u64(7);
        // token 2 holds ~97% of the mass: with top_p 0.9 it is the only candidate
        let row = [0.0, 0.0, 5.0, -1.0];
        for _ in 0..100 {
            assert_eq!(sample_row(&row, 1.0, 0.9, &mut rng), 2);
        }
        // with top_p 1 and a high temperature, other tokens appear
        let seen: std::collections::BTreeSet<u32> = (0..400)
            .map(|_| sample_row(&row, 5.0, 1.0, &mut rng))
            .collect();
        assert!(seen.len() > 1);
    }
}
