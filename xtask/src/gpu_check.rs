//! `cargo xtask gpu-check --build`: builds here, with the CUDA backend, everything
//! `bench/gpu_check.sh` runs on a GPU machine that has no Rust toolchain — the
//! backend-generic test binaries on `Autodiff<Cuda>` (the tiny model's parity with
//! transformers, the fused losses, LAT, the canaries, the method's trajectory) and
//! `antibody-train` (its `bench` subcommand) — into one ignored folder, stripped and
//! xz-compressed so the folder travels with a working tree (`.device/gpu-check`: six binaries
//! of 45–90 MB each with symbols, about 12 MB each stripped and compressed; the script unpacks
//! them).
//!
//! The test binaries find the fixtures through `$ANTIBODY_REPO` (antibody-testkit), which the
//! script sets to the checkout it runs in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::test::{cargo_command, target_dir};

/// Arguments of `cargo xtask gpu-check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build the CUDA binaries into `--out` (the only action; the check itself is
    /// `bench/gpu_check.sh`, run on the GPU machine).
    #[arg(long)]
    pub build: bool,
    /// Where the binaries go (ignored by git).
    #[arg(long, default_value = ".device/gpu-check")]
    pub out: PathBuf,
}

/// The backend-generic test targets built for CUDA: `(package, test target)`.
pub const CUDA_TESTS: &[(&str, &str)] = &[
    ("antibody-model", "tiny_reference"),
    ("antibody-model", "half"),
    ("antibody-losses", "fused_sequence"),
    ("antibody-lat", "tiny_reference"),
    ("antibody-canary", "reference"),
    ("antibody-train", "trajectory"),
];

/// The features that put those tests and `antibody-train` on the CUDA backend.
const FEATURES: &str =
    "antibody-testkit/cuda,antibody-model/cuda,antibody-canary/cuda,antibody-train/cuda";

/// The test target names of [`CUDA_TESTS`], each once, in order (`--test NAME` selects it in
/// every package that has it).
pub fn cuda_test_targets() -> Vec<&'static str> {
    let mut targets: Vec<&str> = Vec::new();
    for (_, t) in CUDA_TESTS {
        if !targets.contains(t) {
            targets.push(t);
        }
    }
    targets
}

/// `cargo test --no-run` of [`CUDA_TESTS`] with the CUDA features, JSON messages.
fn test_build_args() -> Vec<String> {
    let mut args: Vec<String> = ["test", "--no-run", "--release", "--message-format=json"]
        .map(String::from)
        .to_vec();
    let mut packages: Vec<&str> = CUDA_TESTS.iter().map(|(p, _)| *p).collect();
    packages.dedup();
    for p in packages {
        args.extend(["-p".to_owned(), p.to_owned()]);
    }
    args.extend(["--features".to_owned(), FEATURES.to_owned()]);
    for t in cuda_test_targets() {
        args.extend(["--test".to_owned(), t.to_owned()]);
    }
    args
}

/// The test executables in cargo's JSON messages: `(package, target, path)` for each one
/// [`CUDA_TESTS`] names (a target name two packages share is told apart by the package).
fn executables(messages: &str) -> anyhow::Result<Vec<(String, String, PathBuf)>> {
    let mut found = Vec::new();
    for line in messages.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(target)) = (v["executable"].as_str(), v["target"]["name"].as_str())
        else {
            continue;
        };
        // package_id: `path+file:///…/crates/antibody-model#0.0.0` (or `name 0.0.0 (…)`).
        let id = v["package_id"].as_str().unwrap_or_default();
        let package = CUDA_TESTS
            .iter()
            .map(|(p, _)| *p)
            .find(|p| id.contains(&format!("/{p}#")) || id.starts_with(&format!("{p} ")));
        if let Some(package) = package
            && CUDA_TESTS.contains(&(package, target))
        {
            found.push((package.to_owned(), target.to_owned(), PathBuf::from(exe)));
        }
    }
    for (p, t) in CUDA_TESTS {
        if !found.iter().any(|(fp, ft, _)| fp == p && ft == t) {
            bail!("cargo built no test executable `{t}` of {p}");
        }
    }
    Ok(found)
}

/// Copies `from` to `to`, strips it (binutils' `strip`) and compresses it to `to.xz`; returns
/// the compressed size.
fn install(from: &Path, to: &Path) -> anyhow::Result<u64> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    for (tool, args) in [("strip", &["--strip-all"][..]), ("xz", &["-T0", "-f"][..])] {
        let status = Command::new(tool)
            .args(args)
            .arg(to)
            .status()
            .with_context(|| format!("running {tool} (binutils, xz-utils)"))?;
        if !status.success() {
            bail!("{tool} {} failed ({status})", to.display());
        }
    }
    let packed = to.with_file_name(format!(
        "{}.xz",
        to.file_name().unwrap_or_default().to_string_lossy()
    ));
    Ok(std::fs::metadata(&packed)
        .with_context(|| format!("{}", packed.display()))?
        .len())
}

/// Runs `cargo xtask gpu-check`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.build {
        bail!(
            "gpu-check: nothing to do — `--build` builds the CUDA binaries here; run `bench/gpu_check.sh` on the GPU machine"
        );
    }
    let (target, _) = target_dir();
    let tests_dir = args.out.join("tests");
    std::fs::create_dir_all(&tests_dir)
        .with_context(|| format!("creating {}", tests_dir.display()))?;

    tracing::info!("building antibody-train with the CUDA backend");
    let build: Vec<String> = [
        "build",
        "--release",
        "-p",
        "antibody-train",
        "--features",
        "antibody-train/cuda",
    ]
    .map(String::from)
    .to_vec();
    let status = cargo_command(&build, &target)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", build.join(" "));
    }
    let mut total = install(
        &target.join("release/antibody-train"),
        &args.out.join("antibody-train"),
    )?;

    tracing::info!("building the backend-generic tests on the CUDA backend");
    let output = cargo_command(&test_build_args(), &target)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!(
            "cargo test --no-run with the CUDA features failed ({})",
            output.status
        );
    }
    for (package, test, exe) in executables(&String::from_utf8_lossy(&output.stdout))? {
        total += install(&exe, &tests_dir.join(format!("{package}--{test}")))?;
    }
    let revision = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    std::fs::write(args.out.join("REVISION"), format!("{revision}\n"))?;
    println!(
        "{}: antibody-train and {} test binaries, {:.1} MiB compressed, built at {revision}; on the GPU machine: bash bench/gpu_check.sh {}",
        args.out.display(),
        CUDA_TESTS.len(),
        total as f64 / (1u64 << 20) as f64,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_build_names_every_package_target_and_feature() {
        let a = test_build_args().join(" ");
        for (p, t) in CUDA_TESTS {
            assert!(a.contains(&format!("-p {p}")), "{a}");
            assert!(a.contains(&format!("--test {t}")), "{a}");
        }
        assert!(a.contains("antibody-testkit/cuda"), "{a}");
        assert_eq!(a.matches("--test tiny_reference").count(), 1, "{a}");
    }

    #[test]
    fn executables_are_told_apart_by_package() {
        let msg = |p: &str, t: &str| {
            serde_json::json!({
                "reason": "compiler-artifact",
                "package_id": format!("path+file:///w/crates/{p}#0.0.0"),
                "target": { "name": t },
                "executable": format!("/t/{p}-{t}"),
            })
            .to_string()
        };
        let mut lines: Vec<String> = CUDA_TESTS.iter().map(|(p, t)| msg(p, t)).collect();
        lines.push(msg("antibody-eval", "tiny_reference"));
        lines.push("not json".into());
        let found = executables(&lines.join("\n")).expect("all found");
        assert_eq!(found.len(), CUDA_TESTS.len());
        assert!(found.iter().any(|(p, t, e)| p == "antibody-lat"
            && t == "tiny_reference"
            && e == Path::new("/t/antibody-lat-tiny_reference")));
        let e = executables(&lines[1..].join("\n")).expect_err("one missing");
        assert!(e.to_string().contains("antibody-model"), "{e}");
    }
}
