//! OpenBLAS, opened at run time: which library, which kernels, and `cblas_sgemm` on a
//! product's layout, split over threads by this crate rather than by OpenBLAS.

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

/// `cblas_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Where OpenBLAS is looked for when `ANTIBODY_BLAS` is unset: Debian's single-threaded build
/// first (this crate runs one call per thread itself), then whatever the loader finds.
const CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-serial/libopenblas.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
];

/// The loaded OpenBLAS.
pub struct Blas {
    sgemm: Sgemm,
    /// The file it was opened from.
    pub path: String,
    /// `openblas_get_config()`: version and build.
    pub config: String,
    /// `openblas_get_corename()`: the kernels it runs.
    pub core: String,
    _library: libloading::Library,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

thread_local! {
    static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many products this thread has sent to OpenBLAS (for tests that must know which route
/// ran).
pub fn blas_products_on_this_thread() -> u64 {
    CALLS.with(|c| c.get())
}

/// OpenBLAS if it is in use for f32 products, or `None` when they run on gemm's own kernels
/// (`ANTIBODY_BLAS=off`, or no library found; the latter is said once on stderr).
///
/// # Panics
/// When `ANTIBODY_BLAS` names a library that cannot be opened or lacks `cblas_sgemm`.
pub fn blas_backend() -> Option<&'static Blas> {
    BLAS.get_or_init(|| {
        let wanted = std::env::var("ANTIBODY_BLAS").unwrap_or_default();
        match wanted.as_str() {
            "off" | "builtin" | "0" => None,
            "" => {
                let found = CANDIDATES.iter().find_map(|p| Blas::open(p).ok());
                if found.is_none() {
                    eprintln!(
                        "antibody: OpenBLAS not found (tried {}); f32 matrix products run on \
                         gemm's built-in kernels, about half as fast on these shapes. Install it \
                         (Debian: apt-get install libopenblas0-serial) or set ANTIBODY_BLAS to its \
                         path; ANTIBODY_BLAS=off silences this.",
                        CANDIDATES.join(", ")
                    );
                }
                found
            }
            path => match Blas::open(path) {
                Ok(b) => Some(b),
                Err(e) => panic!("ANTIBODY_BLAS={path}: {e}"),
            },
        }
    })
    .as_ref()
}

/// Which kernels OpenBLAS should run, where its own detection would go wrong: 0.3.21 reads
/// some virtual machines' AVX-512 cores as "Prescott" (SSE3, ~15% of the speed). AVX-512 with
/// the BW/DQ/VL extensions is what its SkylakeX kernels need.
fn core_type() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Some("SkylakeX");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some("Haswell");
        }
    }
    None
}

impl Blas {
    fn open(path: &str) -> Result<Blas, String> {
        // OpenBLAS reads OPENBLAS_CORETYPE once, while it loads. A value the user set wins.
        if std::env::var_os("OPENBLAS_CORETYPE").is_none()
            && let Some(core) = core_type()
        {
            // SAFETY: set once, before the library that reads it is loaded; nothing else in
            // this process reads or writes OPENBLAS_CORETYPE.
            unsafe { std::env::set_var("OPENBLAS_CORETYPE", core) };
        }
        // SAFETY: loading OpenBLAS runs its initializers, which only read the environment and
        // the CPU's features.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        // SAFETY: the symbols have these C signatures in every OpenBLAS since 0.2.
        unsafe {
            let sgemm: Sgemm = *library
                .get::<Sgemm>(b"cblas_sgemm\0")
                .map_err(|e| format!("{path}: no cblas_sgemm: {e}"))?;
            let text = |name: &[u8]| -> String {
                library
                    .get::<unsafe extern "C" fn() -> *const c_char>(name)
                    .ok()
                    .map(|f| f())
                    .filter(|p| !p.is_null())
                    .map(|p| CStr::from_ptr(p).to_string_lossy().trim().to_owned())
                    .unwrap_or_default()
            };
            let config = text(b"openblas_get_config\0");
            let core = text(b"openblas_get_corename\0");
            // A threaded build would start its own threads inside each of ours.
            if let Ok(set) =
                library.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
            {
                set(1);
            }
            Ok(Blas {
                sgemm,
                path: path.to_owned(),
                config,
                core,
                _library: library,
            })
        }
    }

    /// Computes `product` with `cblas_sgemm`, split into `threads` parts run on rayon's pool.
    /// Returns false, having written nothing, when the layout is not one BLAS can address.
    ///
    /// # Safety
    /// The product's pointers and strides address valid, non-overlapping matrices.
    pub(crate) unsafe fn sgemm(&self, p: &Product, threads: usize) -> bool {
        let Some(plan) = Plan::new(p) else {
            return false;
        };
        if p.m == 0 || p.n == 0 {
            return true;
        }
        CALLS.with(|c| c.set(c.get() + 1));
        let parts = threads.max(1);
        // Split along the destination's longer side; each part is one cblas call.
        let along_rows = plan.m >= plan.n;
        let len = if along_rows { plan.m } else { plan.n };
        let parts = parts.min(len.div_ceil(64)).max(1);
        let chunk = len.div_ceil(parts);
        let run = |i: usize| {
            let start = i * chunk;
            let size = chunk.min(len - start);
            // SAFETY: the part addresses a sub-block of the matrices the caller vouched for;
            // parts write disjoint rows (or columns) of the destination.
            unsafe { plan.call(self.sgemm, along_rows, start, size) }
        };
        #[cfg(feature = "rayon")]
        if parts > 1 {
            use rayon::prelude::*;
            (0..parts).into_par_iter().for_each(run);
            return true;
        }
        (0..parts).for_each(run);
        true
    }
}

/// One matrix's storage as the real crate's API gives it.
pub(crate) struct Matrix {
    ptr: usize,
    rs: isize,
    cs: isize,
}

impl Matrix {
    pub(crate) fn new(ptr: *mut f32, rs: isize, cs: isize) -> Matrix {
        Matrix {
            ptr: ptr as usize,
            rs,
            cs,
        }
    }
}

/// `dst := alpha×dst + beta×lhs×rhs` (`alpha×dst` only when `read_dst`).
pub(crate) struct Product {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) dst: Matrix,
    pub(crate) lhs: Matrix,
    pub(crate) rhs: Matrix,
    pub(crate) read_dst: bool,
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
}

/// An operand as BLAS addresses it: transposed or not, and its leading dimension.
#[derive(Clone, Copy)]
struct Operand {
    ptr: usize,
    trans: bool,
    ld: usize,
}

/// How an `rows × cols` matrix with strides `(rs, cs)` is read by a row-major BLAS: as is
/// (unit column stride), transposed (unit row stride), or not at all (broadcast, reversed or
/// doubly strided storage).
fn operand(ptr: usize, rows: usize, cols: usize, rs: isize, cs: isize) -> Option<Operand> {
    let (rs, cs) = (usize::try_from(rs).ok()?, usize::try_from(cs).ok()?);
    if cs == 1 || cols == 1 {
        let ld = if rows == 1 { cols.max(1) } else { rs };
        if ld >= cols.max(1) {
            return Some(Operand {
                ptr,
                trans: false,
                ld,
            });
        }
    }
    if rs == 1 || rows == 1 {
        let ld = if cols == 1 { rows.max(1) } else { cs };
        if ld >= rows.max(1) {
            return Some(Operand {
                ptr,
                trans: true,
                ld,
            });
        }
    }
    None
}

/// A product brought to a row-major destination, ready for `cblas_sgemm`.
struct Plan {
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: Operand,
    alpha: f32,
    beta: f32,
}

impl Plan {
    fn new(p: &Product) -> Option<Plan> {
        let fits = |x: usize| c_int::try_from(x).is_ok();
        if !(fits(p.m) && fits(p.n) && fits(p.k)) || p.k == 0 {
            // k = 0 scales or clears the destination; gemm's kernels do that.
            return None;
        }
        let (mut m, mut n) = (p.m, p.n);
        let (mut lhs, mut rhs) = (&p.lhs, &p.rhs);
        let (mut lhs_rs, mut lhs_cs, mut rhs_rs, mut rhs_cs) = (lhs.rs, lhs.cs, rhs.rs, rhs.cs);
        let mut c = operand(p.dst.ptr, m, n, p.dst.rs, p.dst.cs)?;
        if c.trans {
            // A column-major destination: Cᵀ = Bᵀ·Aᵀ, with Cᵀ row-major.
            (m, n) = (n, m);
            (lhs, rhs) = (rhs, lhs);
            (lhs_rs, lhs_cs, rhs_rs, rhs_cs) = (rhs_cs, rhs_rs, lhs_cs, lhs_rs);
            c.trans = false;
        }
        let a = operand(lhs.ptr, m, p.k, lhs_rs, lhs_cs)?;
        let b = operand(rhs.ptr, p.k, n, rhs_rs, rhs_cs)?;
        if ![a.ld, b.ld, c.ld].into_iter().all(fits) {
            return None;
        }
        Some(Plan {
            m,
            n,
            k: p.k,
            a,
            b,
            c,
            // BLAS's C := alpha·A·B + beta·C is this crate's beta and alpha; beta 0 never reads
            // C, as `read_dst = false` promises.
            alpha: p.beta,
            beta: if p.read_dst { p.alpha } else { 0.0 },
        })
    }

    /// One `cblas_sgemm` over rows `start..start+size` of C (or its columns).
    ///
    /// # Safety
    /// The plan's pointers address valid matrices; the part lies inside them.
    unsafe fn call(&self, sgemm: Sgemm, along_rows: bool, start: usize, size: usize) {
        let f = std::mem::size_of::<f32>();
        let (m, n, mut a, mut b, mut c) = if along_rows {
            (size, self.n, self.a, self.b, self.c)
        } else {
            (self.m, size, self.a, self.b, self.c)
        };
        if along_rows {
            // Row r of A: r·ld as stored, r as its transpose; row r of C: r·ld.
            a.ptr += start * if a.trans { 1 } else { a.ld } * f;
            c.ptr += start * c.ld * f;
        } else {
            // Column j of B: j as stored, j·ld as its transpose; column j of C: j.
            b.ptr += start * if b.trans { b.ld } else { 1 } * f;
            c.ptr += start * f;
        }
        let t = |o: Operand| if o.trans { TRANS } else { NO_TRANS };
        // Sizes and leading dimensions were checked to fit a C int in `Plan::new`.
        let i = |x: usize| x as c_int;
        // SAFETY: as the function's contract.
        unsafe {
            sgemm(
                ROW_MAJOR,
                t(a),
                t(b),
                i(m),
                i(n),
                i(self.k),
                self.alpha,
                a.ptr as *const f32,
                i(a.ld),
                b.ptr as *const f32,
                i(b.ld),
                self.beta,
                c.ptr as *mut f32,
                i(c.ld),
            )
        }
    }
}
