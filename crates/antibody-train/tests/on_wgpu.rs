//! The backend-generic tests of the model, the losses, LAT, the canaries and the method, in
//! one test binary for `cargo xtask test`'s wgpu step (built with `antibody-train/wgpu` and
//! `antibody-testkit/wgpu`, which puts `TestBackend` on burn's wgpu backend).
//!
//! The files are the crates' own integration tests, included as modules rather than copied:
//! each still runs as its crate's test target on the CPU. On wgpu they share this one binary,
//! so the model, its autodiff and the losses are monomorphized for
//! `Autodiff<Fusion<Cube<Wgpu>>>` once rather than once per test target: that build is most
//! of what the wgpu step costs on 2 cores (docs/PERFORMANCE.md).

#![cfg(feature = "wgpu")]

#[path = "../../antibody-model/tests/tiny_reference.rs"]
mod model_tiny_reference;

#[path = "../../antibody-model/tests/half.rs"]
mod model_half;

#[path = "../../antibody-losses/tests/fused_sequence.rs"]
mod losses_fused_sequence;

#[path = "../../antibody-lat/tests/tiny_reference.rs"]
mod lat_tiny_reference;

#[path = "../../antibody-canary/tests/reference.rs"]
mod canary_reference;

#[path = "trajectory.rs"]
mod trajectory;

/// The binary is only worth its name if the tests above ran on wgpu: without
/// `antibody-testkit/wgpu` they would run on the CPU backend again.
#[test]
fn the_test_backend_is_wgpu() {
    let name = std::any::type_name::<antibody_testkit::TestBackend>();
    assert!(name.contains("Wgpu"), "TestBackend is {name}");
}
