//! `ŝ(y|x)` per sequence on any backend without an autodiff graph: the frozen teachers'
//! values the method caches, and every model's scores in evaluation.

use antibody_base::Example;
use antibody_losses::{HeadLogprobValues, NextTokenTargets};
use antibody_model::{Hooks, Llama, ModelError, TokenBatch};
use burn::tensor::backend::Backend;

/// `ŝ(y|x)` (the summed log-probability of each example's response tokens), `batch_size`
/// examples per forward, the output head applied over vocabulary slices of `chunk`.
pub fn sequence_logprobs<I: Backend>(
    model: &Llama<I>,
    seqs: &[Example],
    batch_size: usize,
    chunk: usize,
) -> Result<Vec<f32>, ModelError> {
    // In parts on the CPU (one per core, each part's products on one thread), each part in
    // batches of its share of `batch_size`, so as many rows are in flight as in one batch.
    antibody_model::shards::in_parts(seqs, MIN_PART_ROWS, |part, parts| {
        logprobs_in_batches(model, part, batch_size.max(1).div_ceil(parts), chunk)
    })
}

/// The fewest sequences a part of [`sequence_logprobs`] reads.
const MIN_PART_ROWS: usize = 8;

/// [`sequence_logprobs`] on the calling thread, `batch_size` sequences at a time.
fn logprobs_in_batches<I: Backend>(
    model: &Llama<I>,
    seqs: &[Example],
    batch_size: usize,
    chunk: usize,
) -> Result<Vec<f32>, ModelError> {
    let pad = model.config.pad_token_id;
    let device = model.device();
    let head = model.head_weight();
    let mut out = Vec::with_capacity(seqs.len());
    for part in seqs.chunks(batch_size.max(1)) {
        let t = NextTokenTargets::new(part, pad);
        let ids: Vec<Vec<u32>> = part.iter().map(|e| e.ids.clone()).collect();
        let hidden = model
            .forward_hidden(&TokenBatch::right_padded(&ids, pad), &Hooks::none())?
            .hidden;
        let v = HeadLogprobValues::new(
            hidden,
            head.clone(),
            t.targets_tensor(&device),
            t.mask_tensor(&device),
            t.rows_tensor(&device),
            chunk,
        )
        .values();
        out.extend(v.into_data().to_vec::<f32>().unwrap_or_default());
    }
    Ok(out)
}
