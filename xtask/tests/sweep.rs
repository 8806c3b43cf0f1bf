//! The smoke sweep: `cargo xtask sweep` over the tiny model's smoke configuration runs each
//! named override set through the pipeline into its own directories, records a run that
//! fails (and goes on), and writes one table with the reference models and every run.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_smoke_sweep_tables_every_run_failures_included() {
    // Cargo's run-time manifest directory first: a test binary compiled in another checkout
    // that shares the target directory carries that checkout's path.
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = dir.path().join("configs");
    std::fs::create_dir_all(configs.join("sweeps")).expect("configs dir");
    for f in ["smoke.toml", "sources.toml"] {
        std::fs::copy(root.join("configs").join(f), configs.join(f)).expect("copy config");
    }
    std::os::unix::fs::symlink(root.join("datasets"), dir.path().join("datasets"))
        .expect("datasets link");
    let sweep = configs.join("sweeps/smoke.toml");
    std::fs::write(
        &sweep,
        r#"config = "../smoke.toml"
out_dir = "../../runs/smoke-sweep"
targets = { hs = 0.05, lookalike = 0.15, harmless = 0.05 }
archive = "../../points.json"

[[run]]
name = "fast"
set = ["train.optim.lr=2e-3", "train.cycles=1"]
note = "a higher learning rate, one cycle"

[[run]]
name = "bad-layers"
set = ["train.lat.layers=[99]"]
note = "fails: the tiny model has 2 layers"

[[run]]
name = "fast.seed7"
set = ["train.optim.lr=2e-3", "train.cycles=1", "train.seed=7"]
replicates = "fast"
note = "fast with another training seed"

[[run]]
name = "base-only"
set = ['eval.models=[{ name = "base", model = "tiny:0" }]']
skip = ["train"]
note = "a baseline: the base model evaluated, nothing trained"
"#,
    )
    .expect("sweep file");

    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["sweep", "--sweep"])
        .arg(&sweep)
        .env("RUST_LOG", "info")
        .output()
        .expect("spawn xtask");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed run fails the sweep:\n{log}"
    );
    assert!(log.contains("1 run(s) failed: bad-layers"), "{log}");

    let results = dir.path().join("runs/smoke-sweep");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.join("results.json")).expect("json"))
            .expect("results.json parses");
    let runs = json["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{json}");
    let fast = &runs[0];
    assert_eq!(fast["name"], "fast");
    assert_eq!(fast["status"]["ok"], true, "{fast}");
    // The run's own student was evaluated (not the configuration's).
    let model = fast["result"]["model"].as_str().expect("model");
    assert!(
        model.ends_with("runs/smoke-sweep/fast/train/student"),
        "{model}"
    );
    let hs = fast["result"]["harmful"]["complied"]["rate"]
        .as_f64()
        .expect("hs");
    assert!((0.0..=1.0).contains(&hs), "{hs}");
    assert!(results.join("fast/train/metrics.parquet").is_file());
    assert!(results.join("fast/eval/report.md").is_file());
    let bad = &runs[1];
    assert_eq!(bad["status"]["ok"], false, "{bad}");
    let error = bad["status"]["error"].as_str().expect("error");
    assert!(error.contains("antibody-train"), "{error}");
    // The replicate trained its own student; the baseline trained nothing and is the model
    // it named.
    assert_eq!(runs[2]["status"]["ok"], true, "{}", runs[2]);
    assert!(
        runs[2]["result"]["model"]
            .as_str()
            .is_some_and(|m| m.ends_with("fast.seed7/train/student")),
        "{}",
        runs[2]
    );
    assert_eq!(runs[3]["status"]["ok"], true, "{}", runs[3]);
    assert_eq!(runs[3]["result"]["model"], "tiny:0", "{}", runs[3]);
    assert!(!results.join("base-only/train").exists());
    let refs: Vec<&str> = json["references"]
        .as_array()
        .expect("references")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(refs, ["base", "harmful_teacher", "refusal_sft"]);

    let md = std::fs::read_to_string(results.join("results.md")).expect("results.md");
    for needle in [
        "*base*",
        "| fast |",
        "| bad-layers |",
        "failed:",
        "| base-only |",
        "## Settings over seeds",
        "| fast | `fast`, `fast.seed7` |",
        "](results.svg)",
    ] {
        assert!(md.contains(needle), "{needle} missing:\n{md}");
    }
    // The trade-off plot names every run that finished (and no failed one).
    let svg = std::fs::read_to_string(results.join("results.svg")).expect("results.svg");
    for needle in ["fast.seed7", "base-only", "base (reference)"] {
        assert!(svg.contains(needle), "{needle} missing from the plot");
    }
    assert!(!svg.contains("bad-layers"));

    // The archive holds every plotted point; a run whose directory is gone keeps its point.
    let archive = dir.path().join("points.json");
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&archive).expect("the archive")).expect("JSON");
    let labels: Vec<&str> = points
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| p["label"].as_str())
        .collect();
    for needle in ["base (reference)", "fast", "fast.seed7", "base-only"] {
        assert!(
            labels.contains(&needle),
            "{needle} not archived: {labels:?}"
        );
    }
    std::fs::remove_dir_all(results.join("fast.seed7")).expect("remove a run");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["sweep", "--table-only", "--sweep"])
        .arg(&sweep)
        .output()
        .expect("spawn xtask");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(results.join("results.svg")).expect("results.svg");
    assert!(
        svg.contains("fast.seed7"),
        "the archived point is not plotted"
    );
    let md = std::fs::read_to_string(results.join("results.md")).expect("results.md");
    assert!(
        md.contains("1 of the plot's") && md.contains("come from the sweep's archive"),
        "{md}"
    );
    assert!(
        !md.contains("| fast.seed7 |"),
        "a gone run has no table row"
    );
}
