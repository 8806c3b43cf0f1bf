//! Inference in parts on the CPU: a batch of independent rows split into contiguous parts,
//! each computed on its own thread inside a one-thread rayon pool, so each part's matrix
//! products run on one core. On burn-flex this is faster than one batch whose every product
//! is split over the cores (docs/PERFORMANCE.md: two single-thread halves reach 1.5-1.7x
//! one two-thread whole). A process-wide setting, like the compute dtype:
//! [`crate::with_backend!`] sets [`cpu_shards`] when it picks the CPU; elsewhere it stays 1.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{ModelError, Result};

/// The process's inference shards ([`set_inference_shards`]); 1 = one batch.
static SHARDS: AtomicUsize = AtomicUsize::new(1);

/// Makes [`in_parts`] split later work into up to `shards` parts (1 = never).
pub fn set_inference_shards(shards: usize) {
    SHARDS.store(shards.max(1), Ordering::Relaxed);
}

/// The process's inference shards.
pub fn inference_shards() -> usize {
    SHARDS.load(Ordering::Relaxed)
}

/// The shards the CPU backend computes with: one per thread of rayon's pool (every core, or
/// `RAYON_NUM_THREADS`).
pub fn cpu_shards() -> usize {
    rayon::current_num_threads()
}

/// How many parts `items` rows are split into under `shards`, each of at least `min_part`.
pub fn part_count(items: usize, shards: usize, min_part: usize) -> usize {
    shards.min(items / min_part.max(1)).max(1)
}

/// `f` over `items` in up to [`inference_shards`] contiguous parts of at least `min_part`
/// rows, computed at once on scoped threads with one-thread rayon pools, the results
/// concatenated in order; `f(items, 1)` on the calling thread when there is one part. `f`
/// is given a part and the number of parts, and must return one result per row of the part.
pub fn in_parts<T, R, F>(items: &[T], min_part: usize, f: F) -> Result<Vec<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&[T], usize) -> Result<Vec<R>> + Sync,
{
    let parts = part_count(items.len(), inference_shards(), min_part);
    if parts == 1 {
        return f(items, 1);
    }
    let size = items.len().div_ceil(parts);
    let f = &f;
    let outs: Vec<Result<Vec<R>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(size)
            .map(|part| {
                scope.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .map_err(|e| ModelError::Invalid(format!("an inference thread: {e}")))?;
                    pool.install(|| f(part, parts))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for part in outs {
        out.extend(part?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_hold_at_least_the_minimum() {
        assert_eq!(part_count(64, 2, 8), 2);
        assert_eq!(part_count(15, 2, 8), 1);
        assert_eq!(part_count(16, 2, 8), 2);
        assert_eq!(part_count(100, 16, 8), 12);
        assert_eq!(part_count(5, 1, 8), 1);
        assert_eq!(part_count(0, 4, 0), 1);
    }
}
