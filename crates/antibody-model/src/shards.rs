//! Inference in parts on the CPU: a batch of independent rows split into contiguous parts,
//! each computed on its own thread inside a one-thread rayon pool, so each part's matrix
//! products run on one core. On burn-flex this is faster than one batch whose every product
//! is split over the cores (docs/PERFORMANCE.md: two single-thread halves reach 1.5-1.7x
//! one two-thread whole). A process-wide setting, like the compute dtype:
//! [`crate::with_backend!`] sets [`cpu_shards`] when it picks the CPU; elsewhere it stays 1.
//! A thread can hold its own ([`with_shards`]): a part's thread never splits again, and tests
//! that compare splits do not change each other's.
//!
//! Training steps are not split: two parts of a step's batch on two threads, each through its
//! own copy of the parameters' autodiff leaves, measured no faster than one batch
//! (docs/PERFORMANCE.md, 2026-12-01).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{ModelError, Result};

/// The process's inference shards ([`set_inference_shards`]); 1 = one batch.
static SHARDS: AtomicUsize = AtomicUsize::new(1);

/// Makes [`in_parts`] split later work into up to `shards` parts (1 = never).
pub fn set_inference_shards(shards: usize) {
    SHARDS.store(shards.max(1), Ordering::Relaxed);
}

thread_local! {
    /// This thread's own setting ([`with_shards`]; a part's thread never splits again).
    static OVERRIDE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The inference shards on this thread: its own setting ([`with_shards`], or 1 on a part's
/// thread), else the process's.
pub fn inference_shards() -> usize {
    OVERRIDE
        .with(Cell::get)
        .unwrap_or_else(|| SHARDS.load(Ordering::Relaxed))
}

/// `f` with this thread's inference shards set to `shards` (other threads keep theirs): tests
/// that compare splits run beside each other without changing each other's.
pub fn with_shards<R>(shards: usize, f: impl FnOnce() -> R) -> R {
    let before = OVERRIDE.with(|o| o.replace(Some(shards.max(1))));
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// The shards the CPU backend computes with: `ANTIBODY_CPU_SHARDS` when set (1 turns the
/// parts off: the A side of a benchmark), else one per thread of rayon's pool (every core,
/// or `RAYON_NUM_THREADS`).
pub fn cpu_shards() -> Result<usize> {
    shards_from(std::env::var("ANTIBODY_CPU_SHARDS").ok())
}

fn shards_from(var: Option<String>) -> Result<usize> {
    match var {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ModelError::Invalid(format!(
                "ANTIBODY_CPU_SHARDS={v:?}: expected a whole number of parts, at least 1"
            ))),
        },
        None => Ok(rayon::current_num_threads()),
    }
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
                    // A part's thread never splits again.
                    pool.install(|| with_shards(1, || f(part, parts)))
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

    #[test]
    fn a_thread_setting_holds_on_its_thread_only_and_is_restored() {
        let process = inference_shards();
        let seen = with_shards(3, || {
            let inner = with_shards(1, inference_shards);
            let other = std::thread::spawn(inference_shards).join().expect("thread");
            (inference_shards(), inner, other)
        });
        assert_eq!(seen, (3, 1, process));
        assert_eq!(inference_shards(), process);
        // A part's thread never splits again.
        let parts = with_shards(2, || {
            in_parts(&[0u8; 4], 1, |part, parts| {
                Ok(vec![(inference_shards(), parts); part.len()])
            })
        })
        .expect("parts");
        assert_eq!(parts, vec![(1, 2); 4]);
    }

    #[test]
    fn the_shards_variable_is_checked() {
        assert_eq!(shards_from(Some("3".into())).expect("3"), 3);
        assert_eq!(shards_from(Some(" 1 ".into())).expect("1"), 1);
        assert_eq!(
            shards_from(None).expect("default"),
            rayon::current_num_threads()
        );
        for bad in ["0", "two", "-1", ""] {
            let e = shards_from(Some(bad.into())).expect_err(bad).to_string();
            assert!(e.contains("ANTIBODY_CPU_SHARDS"), "{e}");
        }
    }
}
