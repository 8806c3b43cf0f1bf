//! The OpenBLAS route against gemm's own kernels and a plain triple loop, on every layout the
//! real crate's API allows: row- and column-major operands and destinations, padded leading
//! dimensions, single rows and columns, broadcast and reversed strides (which must fall back),
//! accumulation into the destination, and split over threads.
//!
//! `cargo xtask test` installs OpenBLAS, so the route under test is the one the model runs;
//! elsewhere `ANTIBODY_BLAS=off` tests the fallback alone and says so.

#![allow(unsafe_code)]

use gemm::{Parallelism, blas_backend, blas_products_on_this_thread, gemm, gemm_builtin};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// A matrix stored in a buffer of its own, with arbitrary strides.
struct Stored {
    buf: Vec<f32>,
    /// Offset of element (0, 0) in `buf`.
    origin: usize,
    rs: isize,
    cs: isize,
}

/// Storage orders a test matrix can take.
#[derive(Clone, Copy, Debug)]
enum Order {
    Row,
    Col,
    /// Row-major with 7 elements of padding after each row.
    RowPadded,
    /// Column-major with 5 elements of padding after each column.
    ColPadded,
    /// Rows read from last to first.
    RowReversed,
    /// Every row the same (row stride 0); only for operands.
    Broadcast,
}

fn store(rows: usize, cols: usize, order: Order, rng: &mut StdRng) -> Stored {
    let (r, c) = (rows as isize, cols as isize);
    let (len, origin, rs, cs) = match order {
        Order::Row => (rows * cols, 0, c, 1),
        Order::Col => (rows * cols, 0, 1, r),
        Order::RowPadded => (rows * (cols + 7), 0, c + 7, 1),
        Order::ColPadded => ((rows + 5) * cols, 0, 1, r + 5),
        Order::RowReversed => (rows * cols, (rows.max(1) - 1) * cols, -c, 1),
        Order::Broadcast => (cols, 0, 0, 1),
    };
    let buf = (0..len.max(1))
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Stored {
        buf,
        origin,
        rs,
        cs,
    }
}

impl Stored {
    fn at(&self, i: usize, j: usize) -> f32 {
        let off = self.origin as isize + i as isize * self.rs + j as isize * self.cs;
        self.buf[off as usize]
    }
    fn ptr(&mut self) -> *mut f32 {
        self.buf.as_mut_ptr().wrapping_add(self.origin)
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    lhs: Order,
    rhs: Order,
    dst: Order,
    read_dst: bool,
    threads: usize,
}

/// Runs one case through `f`, returns the destination's elements (row-major) and the bound
/// on the rounding error of each: 1e-5 × Σ|a·b| + |alpha·dst|.
fn run(case: &Case, seed: u64, f: Route) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut a = store(case.m, case.k, case.lhs, &mut rng);
    let mut b = store(case.k, case.n, case.rhs, &mut rng);
    let mut c = store(case.m, case.n, case.dst, &mut rng);
    let (alpha, beta) = (0.75f32, 1.25f32);
    let before: Vec<f32> = (0..case.m)
        .flat_map(|i| (0..case.n).map(move |j| (i, j)))
        .map(|(i, j)| c.at(i, j))
        .collect();
    let par = if case.threads > 1 {
        Parallelism::Rayon(case.threads)
    } else {
        Parallelism::None
    };
    let (ap, bp, cp) = (a.ptr(), b.ptr(), c.ptr());
    let args = (a.rs, a.cs, b.rs, b.cs, c.rs, c.cs);
    // SAFETY: each pointer addresses its matrix with the strides passed beside it.
    unsafe {
        let call = match f {
            Route::Public => gemm::<f32>,
            Route::Builtin => gemm_builtin::<f32>,
        };
        call(
            case.m,
            case.n,
            case.k,
            cp,
            args.5,
            args.4,
            case.read_dst,
            ap,
            args.1,
            args.0,
            bp,
            args.3,
            args.2,
            alpha,
            beta,
            false,
            false,
            false,
            par,
        );
    }
    let mut out = Vec::new();
    let mut bound = Vec::new();
    for i in 0..case.m {
        for j in 0..case.n {
            out.push(c.at(i, j));
            let mut mag = 0.0f32;
            for p in 0..case.k {
                mag += (a.at(i, p) * b.at(p, j)).abs();
            }
            let keep = if case.read_dst {
                (alpha * before[i * case.n + j]).abs()
            } else {
                0.0
            };
            bound.push(1e-5 * (beta * mag + keep) + 1e-30);
        }
    }
    (out, bound)
}

#[derive(Clone, Copy)]
enum Route {
    Public,
    Builtin,
}

/// The exact product in f64, for the same case and seed.
fn exact(case: &Case, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let a = store(case.m, case.k, case.lhs, &mut rng);
    let b = store(case.k, case.n, case.rhs, &mut rng);
    let c = store(case.m, case.n, case.dst, &mut rng);
    let mut out = Vec::new();
    for i in 0..case.m {
        for j in 0..case.n {
            let mut s = 0.0f64;
            for p in 0..case.k {
                s += a.at(i, p) as f64 * b.at(p, j) as f64;
            }
            let keep = if case.read_dst {
                0.75 * c.at(i, j) as f64
            } else {
                0.0
            };
            out.push(keep + 1.25 * s);
        }
    }
    out
}

/// Checks both routes against the exact product; returns whether `gemm` sent it to OpenBLAS.
fn check(case: &Case, seed: u64) -> bool {
    let want = exact(case, seed);
    let mut by_blas = false;
    for route in [Route::Public, Route::Builtin] {
        let before = blas_products_on_this_thread();
        let (got, bound) = run(case, seed, route);
        let sent = blas_products_on_this_thread() - before;
        match route {
            Route::Public => by_blas = sent == 1,
            Route::Builtin => assert_eq!(sent, 0, "gemm_builtin reached OpenBLAS"),
        }
        for (idx, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
            let err = (*g as f64 - w).abs();
            assert!(
                err <= *b as f64,
                "m={} n={} k={} lhs={:?} rhs={:?} dst={:?} read_dst={} threads={} route={}: \
                 element {idx} is {g}, exact {w}, error {err:e} > bound {b:e}",
                case.m,
                case.n,
                case.k,
                case.lhs,
                case.rhs,
                case.dst,
                case.read_dst,
                case.threads,
                match route {
                    Route::Public => "gemm",
                    Route::Builtin => "gemm_builtin",
                }
            );
        }
    }
    by_blas
}

/// Whether OpenBLAS is the route under test (see `openblas_is_the_route_under_cargo_xtask_test`).
fn blas_on() -> bool {
    blas_backend().is_some()
}

#[test]
fn openblas_is_the_route_under_cargo_xtask_test() {
    let off = std::env::var("ANTIBODY_BLAS").is_ok_and(|v| v == "off");
    match blas_backend() {
        Some(b) => {
            eprintln!("OpenBLAS: {} ({}), kernels {}", b.path, b.config, b.core);
            assert!(!off, "ANTIBODY_BLAS=off, yet OpenBLAS was loaded");
        }
        None => assert!(
            off,
            "OpenBLAS was not found: these tests would only check gemm's own kernels. Install it \
             (`cargo xtask test` does: apt-get install libopenblas0-serial) or set \
             ANTIBODY_BLAS=off to test the fallback alone"
        ),
    }
}

#[test]
fn every_layout_agrees_with_the_exact_product() {
    use Order::*;
    let orders = [Row, Col, RowPadded, ColPadded];
    let mut seed = 0;
    for (m, n, k) in [(7, 5, 3), (1, 9, 4), (6, 1, 5), (8, 8, 1), (33, 17, 29)] {
        for lhs in orders {
            for rhs in orders {
                for dst in orders {
                    for read_dst in [false, true] {
                        seed += 1;
                        let by_blas = check(
                            &Case {
                                m,
                                n,
                                k,
                                lhs,
                                rhs,
                                dst,
                                read_dst,
                                threads: 1,
                            },
                            seed,
                        );
                        assert_eq!(by_blas, blas_on(), "{lhs:?} {rhs:?} {dst:?} {m}x{n}x{k}");
                    }
                }
            }
        }
    }
}

#[test]
fn layouts_blas_cannot_address_fall_back_and_agree() {
    use Order::*;
    let mut seed = 1000;
    for (lhs, rhs, dst) in [
        (Broadcast, Row, Row),
        (Row, Broadcast, Col),
        (RowReversed, Row, Row),
        (Row, RowReversed, RowReversed),
        (Col, Row, RowReversed),
    ] {
        for read_dst in [false, true] {
            seed += 1;
            let by_blas = check(
                &Case {
                    m: 9,
                    n: 6,
                    k: 4,
                    lhs,
                    rhs,
                    dst,
                    read_dst,
                    threads: 1,
                },
                seed,
            );
            assert!(!by_blas, "{lhs:?} {rhs:?} {dst:?} went to OpenBLAS");
        }
    }
}

#[test]
fn products_split_over_threads_agree() {
    use Order::*;
    let mut seed = 2000;
    // Long enough along one side of the destination to be split (64 rows or columns a part).
    for (m, n, k) in [(300, 70, 48), (70, 300, 48), (257, 129, 65)] {
        for (lhs, rhs, dst) in [
            (Row, Row, Row),
            (Col, RowPadded, Col),
            (RowPadded, Col, Row),
        ] {
            for threads in [2, 3] {
                seed += 1;
                let by_blas = check(
                    &Case {
                        m,
                        n,
                        k,
                        lhs,
                        rhs,
                        dst,
                        read_dst: true,
                        threads,
                    },
                    seed,
                );
                assert_eq!(by_blas, blas_on());
            }
        }
    }
}
