//! antibody's stand-in for the crates.io `gemm` 0.19, wired in by the workspace's
//! `[patch.crates-io]`.
//!
//! burn-flex, the CPU backend, computes every matrix product (forward, backward, the
//! attention's batched products) with `gemm::gemm`. On the model's shapes that crate's f32
//! kernels reach about half of what a tuned BLAS reaches on the same cores (docs/PERFORMANCE.md),
//! and the method's steps are bound by those products. This crate keeps the real crate's API and
//! sends each f32 product whose operands a BLAS can address (one unit stride per matrix,
//! non-negative strides) to OpenBLAS's `cblas_sgemm`; everything else (f64, f16, complex,
//! broadcast or reversed layouts, or no OpenBLAS on the machine) goes to the kernels the real
//! crate uses, gemm-f32/f64/f16/c32/c64 0.19.
//!
//! OpenBLAS is opened at run time ([`blas_backend`]), so no build needs it and a machine without
//! it runs, slower. `ANTIBODY_BLAS=off` forces the built-in kernels (the benchmarks compare the
//! two in one invocation); `ANTIBODY_BLAS=<path>` names the library.
//!
//! The one crate of the workspace with `unsafe` code: the real crate's entry point is an
//! `unsafe fn` over raw pointers, and OpenBLAS is reached through C.

#![allow(unsafe_code)]

mod blas;

use core::any::TypeId;

pub use blas::{Blas, blas_backend, blas_products_on_this_thread};
pub use gemm_common::Parallelism;
pub use gemm_common::gemm::{
    DEFAULT_LHS_PACKING_THRESHOLD_MULTI_THREAD, DEFAULT_LHS_PACKING_THRESHOLD_SINGLE_THREAD,
    DEFAULT_RHS_PACKING_THRESHOLD, DEFAULT_THREADING_THRESHOLD,
    get_lhs_packing_threshold_multi_thread, get_lhs_packing_threshold_single_thread,
    get_rhs_packing_threshold, get_threading_threshold, set_lhs_packing_threshold_multi_thread,
    set_lhs_packing_threshold_single_thread, set_rhs_packing_threshold, set_threading_threshold,
};
pub use gemm_common::{DEFAULT_WASM_SIMD128, get_wasm_simd128, set_wasm_simd128};

/// Single-precision complex numbers, as in the real crate.
#[allow(non_camel_case_types)]
pub type c32 = num_complex::Complex32;
/// Double-precision complex numbers, as in the real crate.
#[allow(non_camel_case_types)]
pub type c64 = num_complex::Complex64;
/// Half precision, as in the real crate.
#[cfg(feature = "f16")]
#[allow(non_camel_case_types)]
pub type f16 = gemm_f16::f16;

/// `dst := alpha×dst + beta×lhs×rhs` (`alpha×dst` only when `read_dst`), the real crate's
/// contract: element `(i, j)` of an `m × n` matrix lies at `ptr + i·rs + j·cs`.
///
/// f32 products go to OpenBLAS when it is loaded and the layout allows; the rest, and f32
/// without OpenBLAS, to [`gemm_builtin`].
///
/// # Safety
/// The pointers must address `m × k`, `k × n` and `m × n` matrices with the given strides, and
/// `dst` must not overlap `lhs` or `rhs`.
///
/// # Panics
/// If `T` is not `f32`, `f64`, [`f16`], [`c32`] or [`c64`]; or if `ANTIBODY_BLAS` names a
/// library that cannot be opened.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const T,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const T,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: T,
    beta: T,
    conj_dst: bool,
    conj_lhs: bool,
    conj_rhs: bool,
    parallelism: Parallelism,
) {
    if TypeId::of::<T>() == TypeId::of::<f32>()
        && let Some(lib) = blas_backend()
    {
        // SAFETY: T is f32 (checked above), so these reads and casts are the identity.
        let (alpha, beta) = unsafe {
            (
                *(&alpha as *const T as *const f32),
                *(&beta as *const T as *const f32),
            )
        };
        let product = blas::Product {
            m,
            n,
            k,
            dst: blas::Matrix::new(dst as *mut f32, dst_rs, dst_cs),
            lhs: blas::Matrix::new(lhs as *mut f32, lhs_rs, lhs_cs),
            rhs: blas::Matrix::new(rhs as *mut f32, rhs_rs, rhs_cs),
            read_dst,
            alpha,
            beta,
        };
        // SAFETY: the caller's contract is this function's.
        if unsafe { lib.sgemm(&product, threads(parallelism)) } {
            return;
        }
    }
    // SAFETY: the caller's contract is this function's.
    unsafe {
        gemm_builtin(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            conj_dst,
            conj_lhs,
            conj_rhs,
            parallelism,
        )
    }
}

/// How many threads a product may use.
fn threads(parallelism: Parallelism) -> usize {
    #[cfg(feature = "rayon")]
    if let Parallelism::Rayon(n) = parallelism {
        return if n == 0 {
            rayon::current_num_threads()
        } else {
            n
        };
    }
    let _ = parallelism;
    1
}

/// [`gemm`] through gemm 0.19's own kernels only, never OpenBLAS: what the real crate computes.
///
/// The layout is first brought to the form those kernels prefer (the destination's smaller
/// stride along its columns, no negative strides), by the identities `C = A·B ⇔ Cᵀ = Bᵀ·Aᵀ`
/// and reading a reversed axis forwards.
///
/// # Safety
/// As [`gemm`].
///
/// # Panics
/// If `T` is not `f32`, `f64`, [`f16`], [`c32`] or [`c64`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_builtin<T: 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const T,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const T,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: T,
    beta: T,
    conj_dst: bool,
    conj_lhs: bool,
    conj_rhs: bool,
    parallelism: Parallelism,
) {
    // A column-major destination: compute its transpose, row-major, from the swapped operands.
    let (m, n, mut dst_cs, mut dst_rs) = (m, n, dst_cs, dst_rs);
    let (mut lhs, mut lhs_cs, mut lhs_rs, mut rhs, mut rhs_cs, mut rhs_rs) =
        (lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs);
    let (mut m, mut n, mut conj_lhs, mut conj_rhs) = (m, n, conj_lhs, conj_rhs);
    if dst_cs.abs() < dst_rs.abs() {
        (m, n) = (n, m);
        (dst_cs, dst_rs) = (dst_rs, dst_cs);
        (lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = (rhs, rhs_rs, rhs_cs, lhs, lhs_rs, lhs_cs);
        (conj_lhs, conj_rhs) = (conj_rhs, conj_lhs);
    }
    let mut dst = dst;
    // Reversed axes: start at the other end and step forwards; the operand that shares the
    // axis moves with it.
    if dst_rs < 0 && m > 0 {
        let last = (m - 1) as isize;
        dst = dst.wrapping_offset(last * dst_rs);
        lhs = lhs.wrapping_offset(last * lhs_rs);
        (dst_rs, lhs_rs) = (-dst_rs, -lhs_rs);
    }
    if dst_cs < 0 && n > 0 {
        let last = (n - 1) as isize;
        dst = dst.wrapping_offset(last * dst_cs);
        rhs = rhs.wrapping_offset(last * rhs_cs);
        (dst_cs, rhs_cs) = (-dst_cs, -rhs_cs);
    }
    if lhs_cs < 0 && k > 0 {
        let last = (k - 1) as isize;
        lhs = lhs.wrapping_offset(last * lhs_cs);
        rhs = rhs.wrapping_offset(last * rhs_rs);
        (lhs_cs, rhs_rs) = (-lhs_cs, -rhs_rs);
    }

    macro_rules! kernel {
        ($ty:ty, $get:path) => {
            if TypeId::of::<T>() == TypeId::of::<$ty>() {
                // SAFETY: T is $ty (checked above); the caller's contract covers the pointers.
                unsafe {
                    $get()(
                        m,
                        n,
                        k,
                        dst as *mut $ty,
                        dst_cs,
                        dst_rs,
                        read_dst,
                        lhs as *const $ty,
                        lhs_cs,
                        lhs_rs,
                        rhs as *const $ty,
                        rhs_cs,
                        rhs_rs,
                        *(&alpha as *const T as *const $ty),
                        *(&beta as *const T as *const $ty),
                        conj_dst,
                        conj_lhs,
                        conj_rhs,
                        parallelism,
                    );
                }
                return;
            }
        };
    }
    kernel!(f32, gemm_f32::gemm::f32::get_gemm_fn);
    kernel!(f64, gemm_f64::gemm::f64::get_gemm_fn);
    kernel!(c32, gemm_c32::gemm::f32::get_gemm_fn);
    kernel!(c64, gemm_c64::gemm::f64::get_gemm_fn);
    #[cfg(feature = "f16")]
    kernel!(f16, gemm_f16::gemm::f16::get_gemm_fn);
    panic!(
        "gemm: unsupported element type {}",
        core::any::type_name::<T>()
    );
}
