//! antibody-testkit: what the workspace's tests share (a dev-dependency, never a dependency).
//!
//! - [`repo`], [`configs`], [`fixtures`]: the repository's directories;
//! - [`smoke_config`] and [`smoke_data`]: the smoke configuration's data build on the tiny
//!   model, in a test's own directory with a private generation cache (tests run in parallel);
//! - [`toml_files`]: the configuration files of a directory;
//! - [`tiny_examples`]: the fine-tuning tests' batch for the tiny model;
//! - [`max_abs_diff`]: the numeric comparison every reference test states its tolerance in;
//! - [`TestBackend`], [`TestAutodiff`], [`TEST_DEVICE`]: the backend the backend-generic
//!   tests run on — burn's CPU backend, or burn's wgpu backend when this crate's `wgpu`
//!   feature is on (`cargo xtask test` runs those tests both ways; on a machine without a GPU
//!   the wgpu device is Mesa's lavapipe, the software Vulkan driver), or burn's CUDA backend
//!   under `cuda` (`cargo xtask gpu-check --build` builds them so for `bench/gpu_check.sh`).

use std::path::{Path, PathBuf};

use antibody_data::{BuildOptions, Config};
use antibody_model::device::Cpu;

#[cfg(all(feature = "wgpu", feature = "cuda"))]
compile_error!("antibody-testkit: pick one test backend, `wgpu` or `cuda`");

/// The inference backend of the backend-generic tests.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
pub type TestBackend = antibody_model::device::Cpu;
/// The inference backend of the backend-generic tests.
#[cfg(feature = "wgpu")]
pub type TestBackend = antibody_model::device::Wgpu;
/// The inference backend of the backend-generic tests.
#[cfg(feature = "cuda")]
pub type TestBackend = antibody_model::device::Gpu;
/// The training backend of the backend-generic tests.
pub type TestAutodiff = burn::backend::Autodiff<TestBackend>;
/// The `--device` the backend-generic tests pass to the stages' binaries.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
pub const TEST_DEVICE: &str = "cpu";
/// The `--device` the backend-generic tests pass to the stages' binaries.
#[cfg(feature = "wgpu")]
pub const TEST_DEVICE: &str = "wgpu";
/// The `--device` the backend-generic tests pass to the stages' binaries.
#[cfg(feature = "cuda")]
pub const TEST_DEVICE: &str = "cuda";

/// Eight token sequences of 6–12 tokens, the first 2–4 the prompt and the rest the response:
/// the fine-tuning tests' batch for the tiny model (pad id 2 never occurs).
pub fn tiny_examples() -> Vec<antibody_base::Example> {
    (0..8u32)
        .map(|r| {
            let len = 6 + (r as usize * 3) % 7;
            let ids: Vec<u32> = (0..len as u32)
                .map(|i| 100 + (r * 7919 + i * 104_729) % 40_000)
                .collect();
            let prompt = 2 + r as usize % 3;
            let mask = (0..len).map(|i| i >= prompt).collect();
            (ids, mask).into()
        })
        .collect()
}

/// The repository's root: `$ANTIBODY_REPO` when set (a test binary built here and run in
/// another checkout, as `bench/gpu_check.sh` does on a GPU machine); else the checkout that
/// holds the running test's crate (`$CARGO_MANIFEST_DIR`, which `cargo test` sets at run
/// time); else the one this crate was compiled in.
///
/// The compile-time path alone is not enough: checkouts at different paths that share one
/// target dir (this machine's and CI's clone) share this crate's compiled library, so the
/// path baked into it can name the other checkout, or one that no longer exists.
pub fn repo() -> PathBuf {
    if let Some(dir) = std::env::var_os("ANTIBODY_REPO").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let is_root = |d: &Path| d.join("ARCHITECTURE.md").is_file() && d.join("crates").is_dir();
    if let Some(found) = std::env::var_os("CARGO_MANIFEST_DIR")
        .as_deref()
        .and_then(|dir| Path::new(dir).ancestors().find(|d| is_root(d)))
    {
        return found.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `configs/`.
pub fn configs() -> PathBuf {
    repo().join("configs")
}

/// `tests/reference/fixtures/`: the PyTorch/transformers expected values.
pub fn fixtures() -> PathBuf {
    repo().join("tests/reference/fixtures")
}

/// The smoke configuration's `[data]`, its output moved to `dir/data`.
pub fn smoke_config(dir: &Path) -> Config {
    let mut config = Config::load(&configs().join("smoke.toml"), &[]).expect("smoke config");
    config.out_dir = dir.join("data");
    config
}

/// Build options whose generation cache is private to `dir`.
pub fn build_options(dir: &Path) -> BuildOptions {
    BuildOptions {
        generations: dir.join("generations"),
        ..BuildOptions::default()
    }
}

/// Builds the smoke data set into `dir/data` and returns its directory.
pub fn smoke_data(dir: &Path) -> PathBuf {
    let config = smoke_config(dir);
    antibody_data::build::<Cpu>(&config, &build_options(dir), &Default::default())
        .expect("smoke data");
    config.out_dir
}

/// The `.toml` files directly in `dir` (relative to the repository), sorted.
pub fn toml_files(dir: &str) -> Vec<PathBuf> {
    let dir = repo().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    files.sort();
    files
}

/// The largest absolute elementwise difference (the slices must have equal lengths).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A step count that varies from run to run, in `lo..lo + span` (where to kill a child).
pub fn varying_step(lo: usize, span: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    lo + (nanos as usize) % span.max(1)
}

/// Spawns `command` and SIGKILLs it once `progress()` reaches `at` (panicking if the child
/// ends first or makes no progress within `patience`); returns `progress()` at the kill.
pub fn kill_when(
    mut command: std::process::Command,
    at: usize,
    patience: std::time::Duration,
    progress: impl Fn() -> usize,
) -> usize {
    let mut child = command.spawn().expect("spawn the child");
    let started = std::time::Instant::now();
    while progress() < at {
        assert!(started.elapsed() < patience, "the child made no progress");
        assert!(
            child.try_wait().expect("poll").is_none(),
            "the child ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    progress()
}
