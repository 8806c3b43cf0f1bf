//! Reads from the device to the host, counted.
//!
//! On a GPU every read of a tensor's values waits for the device to finish the work queued
//! before it, so the training and generation loops read as little as they can: every such
//! read in the method's path goes through [`read`], which counts it for the calling thread,
//! and tests bound the count per optimizer step ([`reads`] before and after). The count is
//! per thread, so tests running side by side do not see each other's reads.

use std::cell::Cell;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// The values of `t` on the host, as `f32` (one counted device read).
pub fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    READS.with(|r| r.set(r.get() + 1));
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

/// The first value of `t` (one counted device read); `NaN` when it has none.
pub fn read_scalar<B: Backend, const D: usize>(t: Tensor<B, D>) -> f32 {
    read(t).first().copied().unwrap_or(f32::NAN)
}

/// Device reads made through [`read`] by this thread so far.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}
