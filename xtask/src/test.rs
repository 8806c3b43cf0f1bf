//! `cargo xtask test`: the project's one test command, used by CI.
//!
//! Steps, in order, stopping at the first failure:
//!
//! 1. fetch and verify the pinned assets (in process);
//! 2. `cargo fmt --all -- --check`;
//! 3. `cargo clippy --workspace --all-targets --release -- -D warnings`;
//! 4. `cargo test --workspace --release [ARGS after --]`;
//! 5. unless `--no-wgpu`: the software Vulkan driver (Mesa's lavapipe) installed from Debian's
//!    packages if the machine has none;
//! 6. unless `--no-wgpu`: the backend-generic tests again on burn's wgpu backend: the tiny model's parity with
//!    transformers (logits, sites, `∂CE/∂δ`), half precision, the fused losses, LAT, the
//!    canaries, the method's trajectory, the SFT kill/resume, and the smoke pipeline end to
//!    end with `--device wgpu` ([`WGPU_TESTS`], less [`WGPU_SKIP`]); built at
//!    `opt-level = 1` ([`WGPU_PROFILE_ENV`]);
//! 7. `cargo check` of every crate with a `cuda` feature, with it (`--release`), and of the
//!    backend-generic tests on the CUDA backend (what `cargo xtask gpu-check --build` builds).
//!
//! Everything builds with the release profile: one optimized build serves
//! tests, binaries and benchmarks, and step 5 reuses its build scripts and
//! proc macros. Child cargos use `$CARGO_TARGET_DIR`, or else
//! `<cache root>/target`, a persistent dir outside the clone, so CI rebuilds
//! stay short; before step 1 its stale test executables are pruned ([`crate::disk`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Arguments of `cargo xtask test`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Skip step 7, the check of the crates with a `cuda` feature against the CUDA backend.
    #[arg(long)]
    pub skip_cuda_check: bool,
    /// Skip steps 5 and 6, the tests on burn's wgpu backend (software Vulkan).
    #[arg(long)]
    pub no_wgpu: bool,
    /// Skip step 3, clippy.
    #[arg(long)]
    pub no_clippy: bool,
    /// Passed on to `cargo test` (e.g. a test name filter; `-- --nocapture`
    /// for the test harness).
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    pub cargo_test_args: Vec<String>,
}

/// What a step does.
enum Action {
    /// Fetch and verify the assets in this process.
    Fetch,
    /// Install the software Vulkan driver if no Vulkan driver is present.
    SoftwareVulkan,
    /// Run `cargo` with these arguments.
    Cargo(Vec<String>),
}

struct Step {
    name: &'static str,
    action: Action,
    /// Environment variables set for this step's child process (and so for the cargos it
    /// starts in turn, as the wgpu smoke pipeline's build of the stages).
    env: &'static [(&'static str, &'static str)],
}

/// The wgpu step builds the project's own crates at `opt-level = 1` without line tables.
/// That build is the generic code monomorphized once more, for `Autodiff<Fusion<Cube<Wgpu>>>`,
/// and only it: every dependency keeps `opt-level = 3` (`[profile.release.package."*"]`), so
/// burn, CubeCL and wgpu are the CPU build's own artifacts where their features agree. The
/// variables reach the smoke pipeline's nested `cargo build` of the stages, which would
/// otherwise rebuild them at `opt-level = 3`. Run time is lavapipe's (its kernels are
/// compiled by Mesa), so this costs the tests little.
const WGPU_PROFILE_ENV: &[(&str, &str)] = &[
    ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1"),
    ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
];

/// The steps `args` asks for, in order.
fn steps(args: &Args) -> Vec<Step> {
    let cargo = |args: &[&str]| Action::Cargo(args.iter().map(|a| (*a).to_owned()).collect());
    let mut steps = vec![
        Step {
            name: "fetch assets",
            action: Action::Fetch,
            env: &[],
        },
        Step {
            name: "format",
            action: cargo(&["fmt", "--all", "--", "--check"]),
            env: &[],
        },
    ];
    if !args.no_clippy {
        steps.push(Step {
            name: "clippy",
            action: cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ]),
            env: &[],
        });
    }
    let mut test = vec!["test", "--workspace", "--release"];
    test.extend(args.cargo_test_args.iter().map(String::as_str));
    steps.push(Step {
        name: "tests",
        action: cargo(&test),
        env: &[],
    });
    if !args.no_wgpu {
        steps.push(Step {
            name: "software Vulkan",
            action: Action::SoftwareVulkan,
            env: &[],
        });
        steps.push(Step {
            name: "tests on wgpu",
            action: Action::Cargo(wgpu_test_args()),
            env: WGPU_PROFILE_ENV,
        });
    }
    if !args.skip_cuda_check {
        steps.push(Step {
            name: "check the CUDA backend",
            action: Action::Cargo(cuda_check_args()),
            env: &[],
        });
    }
    steps
}

/// `cargo check` of every crate with a `cuda` feature, with it, and of the backend-generic
/// tests on Autodiff<Cuda> as `cargo xtask gpu-check --build` builds them for a GPU machine.
fn cuda_check_args() -> Vec<String> {
    let mut a: Vec<String> = [
        "check",
        "-p",
        "antibody-model",
        "-p",
        "antibody-data",
        "-p",
        "antibody-canary",
        "-p",
        "antibody-finetune",
        "-p",
        "antibody-train",
        "-p",
        "antibody-teacher",
        "-p",
        "antibody-eval",
        "-p",
        "antibody-losses",
        "-p",
        "antibody-lat",
        "--features",
        "antibody-model/cuda,antibody-data/cuda,antibody-canary/cuda,antibody-finetune/cuda,antibody-train/cuda,antibody-teacher/cuda,antibody-eval/cuda,antibody-testkit/cuda",
        "--release",
        "--lib",
        "--bins",
    ]
    .map(String::from)
    .to_vec();
    for t in crate::gpu_check::cuda_test_targets() {
        a.extend(["--test".to_owned(), t.to_owned()]);
    }
    a
}

/// The backend-generic test targets run again on wgpu: `(package, test target)`. Their
/// backend is `antibody_testkit::TestBackend`, wgpu under `antibody-testkit/wgpu`.
/// `antibody-train`'s `on_wgpu` is one binary of the model's parity and half-precision tests,
/// the fused losses, LAT, the canaries and the method's trajectory (the crates' own test files
/// as modules), so their generic code is built for wgpu once, not six times; the SFT
/// kill/resume and the smoke pipeline run the stages' binaries, built with `wgpu`.
pub(crate) const WGPU_TESTS: [(&str, &str); 3] = [
    ("antibody-train", "on_wgpu"),
    ("antibody-finetune", "kill_resume"),
    ("xtask", "pipeline"),
];

/// Tests of [`WGPU_TESTS`]' targets that the wgpu step skips (name prefixes, `--skip`): each ran
/// on the CPU in the tests step, and on wgpu it would exercise no op the kept tests do not.
/// - the CPU smoke pipeline and its kill-in-every-stage test (the wgpu pipeline runs instead);
/// - the trainers' flag checks, which never reach a device;
/// - the generator's bits (host code), the untied head's save and the early stop of finished
///   sequences (the same forward and decoding the kept parity tests check);
/// - the trajectory's option variants (relative ε, retain term with length-normalized DPO,
///   pre-phase canaries with normalized drift, reset moments, the refusal-suppressing attack,
///   the contrast term in both forms):
///   the method's steps, per-phase optimizers and half precision keep the trajectory on wgpu.
pub(crate) const WGPU_SKIP: [&str; 13] = [
    "the_smoke_pipeline_runs_to_a_sane_report",
    "a_pipeline_killed_in_any_stage",
    "flags_are_checked_in_one_place",
    "generator_bits_match_the_python_generator",
    "untied_lm_head_matches_transformers",
    "finished_sequences_leave_the_batch",
    "a_relative_epsilon_follows",
    "a_retain_term_and_length_normalized_dpo",
    "pre_phase_canary_targets_and_normalized_drift",
    "reset_moments_follow",
    "the_refusal_suppressing_attack_follows",
    "a_contrast_term_follows",
    "the_rank_contrast_follows",
];

/// One `cargo test` of [`WGPU_TESTS`] with the wgpu features, less [`WGPU_SKIP`].
fn wgpu_test_args() -> Vec<String> {
    let mut a: Vec<String> = ["test", "--release"].map(String::from).to_vec();
    let mut packages: Vec<&str> = WGPU_TESTS.iter().map(|(p, _)| *p).collect();
    packages.dedup();
    for p in &packages {
        a.extend(["-p".to_owned(), (*p).to_owned()]);
    }
    let features = [
        "antibody-testkit/wgpu",
        "antibody-model/wgpu",
        "antibody-finetune/wgpu",
        "antibody-canary/wgpu",
        "antibody-train/wgpu",
        "xtask/wgpu",
    ];
    a.extend(["--features".to_owned(), features.join(",")]);
    for (_, t) in WGPU_TESTS {
        if !a.iter().any(|x| x == t) {
            a.extend(["--test".to_owned(), t.to_owned()]);
        }
    }
    a.push("--".to_owned());
    for t in WGPU_SKIP {
        a.extend(["--skip".to_owned(), t.to_owned()]);
    }
    a
}

/// Where Mesa's lavapipe registers itself with the Vulkan loader.
const LAVAPIPE_ICD: &str = "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json";

/// Makes sure a Vulkan driver is present: lavapipe (Debian's `mesa-vulkan-drivers`, with the
/// loader `libvulkan1`) is installed with apt when no driver is registered and this runs as
/// root; otherwise the error says what to install.
fn ensure_vulkan() -> anyhow::Result<()> {
    let registered = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "json"));
    let loader = [
        "/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
        "/usr/lib/libvulkan.so.1",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if registered && loader {
        eprintln!("a Vulkan driver is registered");
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        bail!(
            "no Vulkan driver: install Debian's `mesa-vulkan-drivers` and `libvulkan1` (the \
             software driver lavapipe, {LAVAPIPE_ICD}), or run with --no-wgpu"
        );
    }
    let install = |update: bool| -> anyhow::Result<bool> {
        if update {
            Command::new("apt-get").args(["update", "-q"]).status()?;
        }
        Ok(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(["mesa-vulkan-drivers", "libvulkan1"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success())
    };
    if !install(false).context("apt-get")? && !install(true).context("apt-get")? {
        bail!("apt-get could not install mesa-vulkan-drivers and libvulkan1");
    }
    if !std::path::Path::new(LAVAPIPE_ICD).exists() {
        bail!("mesa-vulkan-drivers is installed but {LAVAPIPE_ICD} is missing");
    }
    Ok(())
}

/// The target dir for child cargos: `$CARGO_TARGET_DIR`, else
/// `<cache root>/target`; and where that choice came from.
pub(crate) fn target_dir() -> (PathBuf, &'static str) {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => (PathBuf::from(dir), "from CARGO_TARGET_DIR"),
        None => (
            antibody_base::cache_root().join("target"),
            "<cache root>/target; set CARGO_TARGET_DIR to change",
        ),
    }
}

/// Variables `cargo run` sets for xtask itself that must not leak into child
/// builds (they would look like changed build inputs and cause rebuilds).
fn is_leaked_cargo_var(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// A `cargo` command with `args`, building into `target_dir`.
pub(crate) fn cargo_command(args: &[String], target_dir: &PathBuf) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    command.args(args).env("CARGO_TARGET_DIR", target_dir);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_leaked_cargo_var) {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `cargo xtask test`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (target_dir, why) = target_dir();
    eprintln!("xtask test: target dir {} ({why})", target_dir.display());
    crate::disk::prepare(&target_dir)?;

    let steps = steps(&args);
    let total = steps.len();
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let mut counts = TestCounts::default();
    for (i, step) in steps.iter().enumerate() {
        let n = i + 1;
        let started = Instant::now();
        match &step.action {
            Action::Fetch => {
                eprintln!("\n==> [{n}/{total}] {}", step.name);
                let fetched = crate::fetch::fetch_all()
                    .with_context(|| format!("step {n}/{total} ({}) failed", step.name))?;
                for (asset, path) in &fetched {
                    crate::fetch::print(asset, path);
                }
            }
            Action::SoftwareVulkan => {
                eprintln!("\n==> [{n}/{total}] {}", step.name);
                ensure_vulkan()
                    .with_context(|| format!("step {n}/{total} ({}) failed", step.name))?;
            }
            Action::Cargo(cargo_args) => {
                let line = format!("cargo {}", cargo_args.join(" "));
                eprintln!("\n==> [{n}/{total}] {}: {line}", step.name);
                let mut command = cargo_command(cargo_args, &target_dir);
                command.envs(step.env.iter().copied());
                let status = if cargo_args.first().map(String::as_str) == Some("test") {
                    run_counting(&mut command, &mut counts)
                } else {
                    command.status()
                }
                .with_context(|| {
                    format!("step {n}/{total} ({}): cannot run `{line}`", step.name)
                })?;
                if !status.success() {
                    bail!(
                        "step {n}/{total} ({}) failed: `{line}` exited with {status}",
                        step.name
                    );
                }
            }
        }
        timings.push((step.name, started.elapsed()));
    }

    eprintln!("\n==> all {total} steps passed");
    for (name, took) in timings {
        eprintln!("    {name:<24} {:>7.1}s", took.as_secs_f64());
    }
    // The closing line CI reads: every test binary's results added up.
    println!("tests: {} passed, {} failed", counts.passed, counts.failed);
    Ok(())
}

/// Passed and failed tests summed over every `test result:` line of `cargo test`.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestCounts {
    passed: u64,
    failed: u64,
}

impl TestCounts {
    /// Adds one line of `cargo test` output if it is a `test result:` summary.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `command`, echoing its stdout line by line while counting test results.
fn run_counting(
    command: &mut Command,
    counts: &mut TestCounts,
) -> std::io::Result<std::process::ExitStatus> {
    use std::io::{BufRead as _, Write as _};
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    if let Some(stdout) = child.stdout.take() {
        let mut out = std::io::stdout().lock();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            counts.add_line(&line);
            writeln!(out, "{line}")?;
        }
    }
    child.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cargo_lines(args: &Args) -> Vec<String> {
        steps(args)
            .iter()
            .map(|s| match &s.action {
                Action::Fetch => "<fetch>".to_owned(),
                Action::SoftwareVulkan => "<vulkan>".to_owned(),
                Action::Cargo(a) => a.join(" "),
            })
            .collect()
    }

    #[test]
    fn test_result_lines_are_summed() {
        let mut c = TestCounts::default();
        c.add_line("test result: ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        c.add_line(
            "test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        c.add_line("test foo ... ok");
        assert_eq!(
            c,
            TestCounts {
                passed: 19,
                failed: 1
            }
        );
    }

    #[test]
    fn all_steps_by_default() {
        let wgpu = wgpu_test_args().join(" ");
        assert_eq!(
            cargo_lines(&Args::default()),
            [
                "<fetch>",
                "fmt --all -- --check",
                "clippy --workspace --all-targets --release -- -D warnings",
                "test --workspace --release",
                "<vulkan>",
                wgpu.as_str(),
                "check -p antibody-model -p antibody-data -p antibody-canary -p antibody-finetune -p antibody-train -p antibody-teacher -p antibody-eval -p antibody-losses -p antibody-lat --features antibody-model/cuda,antibody-data/cuda,antibody-canary/cuda,antibody-finetune/cuda,antibody-train/cuda,antibody-teacher/cuda,antibody-eval/cuda,antibody-testkit/cuda --release --lib --bins --test tiny_reference --test half --test fused_sequence --test reference --test trajectory",
            ]
        );
    }

    #[test]
    fn the_driver_and_the_tests_on_wgpu_run_by_default() {
        let args = Args {
            skip_cuda_check: true,
            ..Args::default()
        };
        let lines = cargo_lines(&args);
        assert_eq!(
            lines[lines.len() - 2..],
            [
                "<vulkan>",
                "test --release -p antibody-train -p antibody-finetune -p xtask --features antibody-testkit/wgpu,antibody-model/wgpu,antibody-finetune/wgpu,antibody-canary/wgpu,antibody-train/wgpu,xtask/wgpu --test on_wgpu --test kill_resume --test pipeline -- --skip the_smoke_pipeline_runs_to_a_sane_report --skip a_pipeline_killed_in_any_stage --skip flags_are_checked_in_one_place --skip generator_bits_match_the_python_generator --skip untied_lm_head_matches_transformers --skip finished_sequences_leave_the_batch --skip a_relative_epsilon_follows --skip a_retain_term_and_length_normalized_dpo --skip pre_phase_canary_targets_and_normalized_drift --skip reset_moments_follow --skip the_refusal_suppressing_attack_follows --skip a_contrast_term_follows --skip the_rank_contrast_follows",
            ]
        );
    }

    #[test]
    fn the_wgpu_step_builds_the_projects_crates_at_opt_level_1_only() {
        let steps = steps(&Args::default());
        let wgpu = steps
            .iter()
            .find(|s| s.name == "tests on wgpu")
            .expect("a wgpu step");
        assert!(wgpu.env.contains(&("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1")));
        assert!(
            steps
                .iter()
                .all(|s| s.name == "tests on wgpu" || s.env.is_empty())
        );
        // Every dependency keeps release's opt-level 3 under that variable.
        let manifest = include_str!("../../Cargo.toml");
        let deps = manifest
            .split("[profile.release.package.\"*\"]")
            .nth(1)
            .and_then(|t| t.split("\n[").next())
            .expect("[profile.release.package.\"*\"] in Cargo.toml");
        assert!(deps.contains("opt-level = 3"), "{deps}");
    }

    #[test]
    fn flags_skip_steps_and_extra_args_go_to_cargo_test() {
        let args = Args {
            skip_cuda_check: true,
            no_wgpu: true,
            no_clippy: true,
            cargo_test_args: vec!["tidy".to_owned(), "--".to_owned(), "--nocapture".to_owned()],
        };
        assert_eq!(
            cargo_lines(&args),
            [
                "<fetch>",
                "fmt --all -- --check",
                "test --workspace --release tidy -- --nocapture",
            ]
        );
    }

    #[test]
    fn cargo_run_variables_do_not_leak() {
        assert!(is_leaked_cargo_var("CARGO_PKG_NAME"));
        assert!(is_leaked_cargo_var("CARGO_MANIFEST_DIR"));
        assert!(!is_leaked_cargo_var("CARGO_HOME"));
        assert!(!is_leaked_cargo_var("CARGO_TARGET_DIR"));
        assert!(!is_leaked_cargo_var("CARGO"));
    }

    #[test]
    fn cli_parses_flags_and_trailing_args() -> anyhow::Result<()> {
        use clap::Parser as _;
        let cli =
            crate::Cli::try_parse_from(["xtask", "test", "--skip-cuda-check", "--", "some_test"])?;
        match cli.task {
            crate::Task::Test(args) => {
                assert!(args.skip_cuda_check);
                assert!(!args.no_clippy);
                assert_eq!(args.cargo_test_args, ["some_test"]);
            }
            other => bail!("parsed as {other:?}"),
        }
        Ok(())
    }
}
