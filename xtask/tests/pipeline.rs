//! The end-to-end smoke pipeline: `cargo xtask pipeline --config smoke.toml` on the tiny
//! model runs every stage (fetch, data, teachers, train, eval, report) to a report whose numbers exist
//! and are sane; a second invocation finds every stage current and skips the work.

use std::path::Path;
use std::process::Command;

fn pipeline(config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["pipeline", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .output()
        .expect("spawn xtask");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_smoke_pipeline_runs_to_a_sane_report_and_then_skips_what_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = dir.path().join("configs");
    std::fs::create_dir_all(&configs).expect("configs dir");
    for f in ["smoke.toml", "sources.toml"] {
        std::fs::copy(root.join("configs").join(f), configs.join(f)).expect("copy config");
    }
    std::os::unix::fs::symlink(root.join("datasets"), dir.path().join("datasets"))
        .expect("datasets link");
    let config = configs.join("smoke.toml");

    let (ok, log) = pipeline(&config);
    assert!(ok, "the smoke pipeline failed:\n{log}");
    let eval = dir.path().join("runs/smoke/eval");
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
        assert!(unit(&m["hs"]["rate"]), "{m}");
        assert!(m["hs"]["n"].as_u64() == Some(8), "{m}");
        let attacks = m["attacks"].as_array().expect("attacks");
        assert_eq!(attacks.len(), 2);
        assert!(attacks.iter().all(|a| unit(&a["hs"]["rate"])), "{m}");
        assert!(unit(&m["fa"]["rate"]), "{m}");
        assert!(unit(&m["over_refusal_lookalike"]["rate"]), "{m}");
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
    assert!(md.contains("hardened: HS"), "{md}");
    let train = dir.path().join("runs/smoke/train");
    assert!(train.join("metrics.parquet").is_file() && train.join("student/config.json").is_file());
    let timings: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("runs/smoke/pipeline/timings.json")).expect("timings.json"),
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

    let (ok, log) = pipeline(&config);
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
