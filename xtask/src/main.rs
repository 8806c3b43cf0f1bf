//! The project's task runner, run as `cargo xtask <task>` (an alias in
//! `.cargo/config.toml`). It is light on purpose: it does not depend on burn,
//! and builds in its own target dir (`target/xtask`).
//!
//! Tasks, one module each, each with `pub fn run(args) -> anyhow::Result<()>`:
//!
//! - [`fetch`]: fetch and verify every pinned asset (the patient, later the
//!   harmful-prompt datasets); print paths and digests.
//! - [`test`]: the project's one test command, used by CI.
//! - [`bench`]: antibody beside its peer on the same work, as ratios.
//! - [`pipeline`]: the whole job, stage by stage, skipping what is current.
//! - [`sweep`]: the pipeline once per setting of a search, and one results table.
//! - [`tradeoff`]: a sweep's plot of HS against over-refusal.
//! - [`gpu_check`]: builds the CUDA binaries `bench/gpu_check.sh` runs on a GPU machine.
//!
//! Source-tree checks (`tidy`) are tests of this crate: `cargo test -p xtask`.

#![allow(
    clippy::print_stdout,
    reason = "a task runner's output on stdout is its interface"
)]

mod bench;
mod disk;
mod fetch;
mod gpu_check;
mod pipeline;
mod sweep;
mod test;
#[cfg(test)]
mod tidy;
mod tradeoff;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// The project's task runner (`cargo xtask <task>`).
#[derive(Debug, Parser)]
#[command(about, long_about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Fetch and verify every pinned asset (pip + sha256); print paths and digests.
    Fetch(fetch::Args),
    /// Run the project's tests as CI does: fetch, fmt, clippy, test, cuda check.
    Test(test::Args),
    /// Benchmark antibody beside its PyTorch/transformers peer on the same work.
    Bench(bench::Args),
    /// The whole job: fetch, data, teachers, train, eval and report.
    Pipeline(pipeline::Args),
    /// The pipeline once per setting of a search (a sweep file), and one results table.
    Sweep(sweep::Args),
    /// Build (`--build`) the CUDA binaries `bench/gpu_check.sh` runs on a GPU machine.
    GpuCheck(gpu_check::Args),
}

/// The project root: the parent of xtask's manifest directory — cargo's run-time
/// `CARGO_MANIFEST_DIR` when it names an existing `xtask` directory (`cargo xtask`, and the
/// tests that run this binary), else the compile-time one. A target directory shared with a
/// checkout at another path can hand this checkout a binary compiled there.
pub(crate) fn project_root() -> PathBuf {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.ends_with("xtask") && d.join("Cargo.toml").is_file());
    let manifest_dir = runtime.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), Path::to_path_buf)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The chain of contexts, without a backtrace even under RUST_BACKTRACE:
            // the messages say which step failed and how.
            eprintln!("\nerror: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let root = project_root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("changing directory to the project root {}", root.display()))?;

    antibody_base::logging::init();

    match Cli::parse().task {
        Task::Fetch(args) => fetch::run(args),
        Task::Test(args) => test::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Pipeline(args) => pipeline::run(args),
        Task::Sweep(args) => sweep::run(args),
        Task::GpuCheck(args) => gpu_check::run(args),
    }
}
