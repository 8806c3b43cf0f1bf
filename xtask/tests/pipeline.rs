//! The end-to-end smoke pipeline: `cargo xtask pipeline --config smoke.toml` on the tiny
//! model runs every stage (fetch, data, teachers, train, eval, report) to a report whose numbers exist
//! and are sane; a second invocation finds every stage current and skips the work. A pipeline
//! SIGKILLed at moments spread over every stage and rerun ends with the uninterrupted run's
//! weights and report numbers exactly.

use std::io::BufRead as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pipeline(config: &Path, device: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["pipeline", "--device", device, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .output()
        .expect("spawn xtask");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The repository root: from cargo's run-time `CARGO_MANIFEST_DIR` (the checkout the tests
/// run in), else the compile-time one. A target directory shared between checkouts at other
/// paths can hold a test binary compiled in another checkout, whose compile-time path may
/// no longer exist.
fn repository_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("..")
}

/// A directory with the smoke and sources configurations and a link to the datasets;
/// returns it and the smoke configuration's path.
fn smoke_dir() -> (tempfile::TempDir, PathBuf) {
    let root = repository_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = dir.path().join("configs");
    std::fs::create_dir_all(&configs).expect("configs dir");
    for f in ["smoke.toml", "sources.toml"] {
        std::fs::copy(root.join("configs").join(f), configs.join(f)).expect("copy config");
    }
    std::os::unix::fs::symlink(root.join("datasets"), dir.path().join("datasets"))
        .expect("datasets link");
    let config = configs.join("smoke.toml");
    (dir, config)
}

#[test]
fn the_smoke_pipeline_runs_to_a_sane_report_and_then_skips_what_is_current() {
    let (dir, config) = smoke_dir();
    let (ok, log) = pipeline(&config, "cpu");
    assert!(ok, "the smoke pipeline failed:\n{log}");
    check_smoke_run(dir.path());

    let (ok, log) = pipeline(&config, "cpu");
    assert!(ok, "the second run failed:\n{log}");
    for needle in [
        "teachers are current: skipped",
        "training is current: skipped",
        "base: result is current",
        "hardened: result is current",
    ] {
        assert!(log.contains(needle), "`{needle}` not in:\n{log}");
    }
}

/// The smoke pipeline in a fresh project (a private cache: nothing generated on the CPU is
/// reused) with `args`; the project's directory, whether it succeeded, and its output.
#[cfg(feature = "wgpu")]
fn smoke_with(args: &[&str]) -> (tempfile::TempDir, bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = smoke_project(dir.path());
    let out = pipeline_command(&config)
        .args(args)
        .output()
        .expect("spawn xtask");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (dir, out.status.success(), log)
}

/// The smoke pipeline with every stage on burn's wgpu backend (lavapipe, the software
/// Vulkan driver, where the machine has no GPU): the same sane report as on the CPU.
#[cfg(feature = "wgpu")]
#[test]
fn the_smoke_pipeline_runs_on_wgpu() {
    let (dir, ok, log) = smoke_with(&["--device", "wgpu"]);
    assert!(ok, "the smoke pipeline on wgpu failed:\n{log}");
    check_smoke_run(dir.path());
}

/// The smoke pipeline in mixed precision on wgpu (`--dtype f16`: every stage's models
/// compute in f16, the weights and optimizer state stay f32) through training: the data
/// build generates, the teachers are made and checked, and the method trains in f16, and the
/// run records its dtype (the evaluation's f16 generation is `tests/half.rs`'s cached
/// decoding; the evaluation stage is left out to keep CI's time). bf16, which lavapipe lacks,
/// is refused by the first stage that loads a model, naming the device, without a panic (on
/// a GPU that has it, it runs).
#[cfg(feature = "wgpu")]
#[test]
fn the_smoke_pipeline_trains_on_wgpu_in_f16_and_bf16_is_refused_where_missing() {
    let (dir, ok, log) = smoke_with(&[
        "--device", "wgpu", "--dtype", "f16", "--skip", "eval", "--skip", "report",
    ]);
    assert!(ok, "the f16 smoke pipeline on wgpu failed:\n{log}");
    let train = dir.path().join("runs/smoke/train");
    assert!(train.join("student/config.json").exists(), "{log}");
    let metrics = std::fs::read_to_string(train.join("metrics.jsonl")).expect("metrics");
    assert_eq!(
        metrics.lines().count(),
        8,
        "2 cycles x (2 harmful + 2 harmless)"
    );
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).expect("a metrics row");
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    }
    let env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(train.join("env.json")).expect("env.json"))
            .expect("env.json parses");
    assert_eq!(env["dtype"], "f16", "{env}");

    let (_dir, ok, log) = smoke_with(&["--device", "wgpu", "--dtype", "bf16"]);
    assert!(!log.contains("panicked"), "bf16 on wgpu panicked:\n{log}");
    if !ok {
        assert!(
            log.contains("cannot compute in BF16"),
            "bf16 refused without naming why:\n{log}"
        );
    }
}

/// The report, plots, training outputs and stage timings of a finished smoke run in `dir`.
fn check_smoke_run(dir: &Path) {
    let eval = dir.join("runs/smoke/eval");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("report.json")).expect("report.json"))
            .expect("report.json parses");
    let models = report["models"].as_array().expect("models");
    let names: Vec<&str> = models.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(
        names,
        ["base", "harmful_teacher", "refusal_sft", "hardened"]
    );
    let unit = |v: &serde_json::Value| v.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x));
    for m in models {
        let hs = &m["harmful"]["complied"];
        assert!(unit(&hs["rate"]) && hs["n"].as_u64() == Some(8), "{m}");
        assert!(unit(&hs["lo"]) && unit(&hs["hi"]), "{m}");
        let attacks = m["attacks"].as_array().expect("attacks");
        assert_eq!(attacks.len(), 3);
        assert!(
            attacks
                .iter()
                .all(|a| unit(&a["harmful"]["complied"]["rate"])),
            "{m}"
        );
        assert!(unit(&m["fa"]["rate"]), "{m}");
        assert!(unit(&m["lookalike"]["refused"]["rate"]), "{m}");
        assert!(
            m["perplexity"]
                .as_f64()
                .is_some_and(|p| p.is_finite() && p > 1.0),
            "{m}"
        );
    }
    for f in [
        "report.md",
        "hs.png",
        "hs.svg",
        "training.png",
        "canaries.png",
    ] {
        assert!(eval.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(eval.join("report.md")).expect("report.md");
    assert!(md.contains("hardened: worst-case post-attack HS"), "{md}");
    let train = dir.join("runs/smoke/train");
    assert!(train.join("metrics.parquet").is_file() && train.join("student/config.json").is_file());
    let timings: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("runs/smoke/pipeline/timings.json")).expect("timings.json"),
    )
    .expect("timings.json parses");
    let stages: Vec<&str> = timings["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    assert_eq!(
        stages,
        ["fetch", "data", "teachers", "train", "eval", "report"]
    );
    assert!(
        timings["total_s"].as_f64().is_some_and(|t| t > 0.0),
        "{timings}"
    );
}

/// A project directory of its own: the smoke and sources configurations, the datasets, and a
/// private cache root (so no result is reused from another run) that shares the fetched
/// wheels and files.
fn smoke_project(dir: &Path) -> PathBuf {
    let root = repository_root();
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs).expect("configs dir");
    for f in ["smoke.toml", "sources.toml"] {
        std::fs::copy(root.join("configs").join(f), configs.join(f)).expect("copy config");
    }
    std::os::unix::fs::symlink(root.join("datasets"), dir.join("datasets")).expect("datasets");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).expect("cache");
    for shared in ["wheels", "files"] {
        let real = antibody_base::cache_root().join(shared);
        std::fs::create_dir_all(&real).expect("shared cache dir");
        std::os::unix::fs::symlink(real, cache.join(shared)).expect("link");
    }
    configs.join("smoke.toml")
}

/// `cargo xtask pipeline` on a project made by [`smoke_project`], in its own process group.
fn pipeline_command(config: &Path) -> Command {
    let dir = config.parent().and_then(Path::parent).expect("project dir");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| antibody_base::cache_root().join("target"), PathBuf::from);
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(["pipeline", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("ANTIBODY_CACHE", dir.join("cache"))
        .env("CARGO_TARGET_DIR", target)
        .process_group(0);
    c
}

/// Runs the pipeline until a log line contains `marker`, waits `delay`, then SIGKILLs its
/// whole process group (the stage binary with it). Returns whether the kill happened
/// before the pipeline ended.
fn kill_during(config: &Path, marker: &str, delay: Duration) -> bool {
    let mut child = pipeline_command(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xtask");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no `{marker}` in 10 min"
        );
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(marker) => break,
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                return false;
            }
        }
    }
    std::thread::sleep(delay);
    let status = child.try_wait().expect("poll");
    let alive = status.is_none();
    if let Some(status) = status {
        // Ended within the delay: say how (a failure shows in the final run's assertion).
        let tail: Vec<String> = rx.try_iter().collect();
        eprintln!(
            "`{marker}` +{delay:?}: ended first ({status}); last lines: {:?}",
            &tail[tail.len().saturating_sub(3)..]
        );
    }
    // `--`: without it, `kill` reads a negative pid (a process group) as an option.
    let killed = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill of the process group failed");
    let _ = child.wait();
    alive
}

/// The numbers of `report.json` without wall-clock fields.
fn report_numbers(project: &Path) -> serde_json::Value {
    let path = project.join("runs/smoke/eval/report.json");
    // Model paths name the project's directory: the same place in both.
    let text = std::fs::read_to_string(&path)
        .expect("report.json")
        .replace(&project.display().to_string(), "<project>");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("parses");
    for m in v["models"].as_array_mut().expect("models") {
        let m = m.as_object_mut().expect("model");
        m.remove("seconds");
        m.remove("generation_seconds");
        m.remove("seconds_without_attacks");
        for a in m
            .get_mut("attacks")
            .and_then(|a| a.as_array_mut())
            .expect("attacks")
        {
            a.as_object_mut().expect("attack").remove("seconds");
        }
    }
    v.as_object_mut().expect("report").remove("config");
    v
}

/// The paths at which two JSON values differ.
fn json_diff(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let (u, v) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                json_diff(&format!("{at}.{k}"), u, v, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{at}[{i}]"), u, v, out);
            }
        }
        _ if a != b => out.push(format!("{at}: {a} vs {b}")),
        _ => {}
    }
}

fn file(project: &Path, rel: &str) -> Vec<u8> {
    std::fs::read(project.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn a_pipeline_killed_in_any_stage_resumes_to_the_uninterrupted_result() {
    let straight = tempfile::tempdir().expect("tempdir");
    let config = smoke_project(straight.path());
    let out = pipeline_command(&config).output().expect("spawn xtask");
    assert!(
        out.status.success(),
        "uninterrupted run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let killed = tempfile::tempdir().expect("tempdir");
    let config = smoke_project(killed.path());
    // Each attempt continues from the last; a kill lands in the stage just started (or, if
    // that stage ends within the delay, in the next).
    let mut landed = Vec::new();
    for (marker, delay_ms) in [
        ("== data", 200),
        ("== teachers", 300),
        ("== train", 1500),
        ("== train", 4000),
        ("== eval", 800),
        ("== report", 0),
    ] {
        if kill_during(&config, marker, Duration::from_millis(delay_ms)) {
            landed.push(format!("{marker} +{delay_ms} ms"));
        }
    }
    assert!(
        landed.len() >= 4,
        "only these kills landed before the pipeline ended: {landed:?}"
    );
    let out = pipeline_command(&config).output().expect("spawn xtask");
    assert!(
        out.status.success(),
        "the resumed run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (a, b) = (straight.path(), killed.path());
    for rel in [
        "runs/smoke/train/student/model.safetensors",
        "runs/smoke/teachers/aligned/model.safetensors",
        "runs/smoke/data/harmful_train.parquet",
        "runs/smoke/data/harmless_train.parquet",
        "runs/smoke/train/canaries/cycle-1.json",
    ] {
        assert!(
            file(a, rel) == file(b, rel),
            "{rel} differs after the kills"
        );
    }
    let mut diffs = Vec::new();
    json_diff("", &report_numbers(a), &report_numbers(b), &mut diffs);
    assert!(diffs.is_empty(), "report numbers differ: {diffs:?}");
}
