//! `antibody-report` on the smoke data's evaluation of two tiny models: the report renders
//! (Markdown table with n, JSON, PNG and SVG plots), and a missing result is named.

use antibody_eval::{Eval, evaluate};
use antibody_model::device::CpuAutodiff;
use antibody_report::{ReportError, read_results};
use antibody_testkit::{configs, smoke_data};

#[test]
fn the_report_renders_from_the_results_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let models =
        "models=[{name = \"base\", model = \"tiny:0\"}, {name = \"broken\", model = \"tiny:1\"}]";
    let mut e = Eval::load(&configs().join("smoke.toml"), &[models.into()]).expect("config");
    e.out_dir = dir.path().join("eval");
    e.train_run = None;
    assert!(matches!(read_results(&e), Err(ReportError::Missing { .. })));
    evaluate::<CpuAutodiff>(&e, &data, &Default::default()).expect("evaluate");
    let results = read_results(&e).expect("results");
    assert_eq!(results.len(), 2);
    // The verdict compares the last model's look-alike refusals with the first's; with one
    // model it compares with nothing.
    let both = antibody_report::verdict(&results);
    assert!(both.contains(" for base"), "{both}");
    let one = antibody_report::verdict(&results[1..]);
    assert!(
        one.starts_with("broken: ") && !one.contains(" vs ") && one.contains("look-alike refusals"),
        "{one}"
    );
    let options = antibody_report::Options {
        samples: 2,
        max_degenerate: 0.2,
    };
    let md = antibody_report::write(&e.out_dir, &e.file, &results, None, &options).expect("report");
    let text = std::fs::read_to_string(&md).expect("report.md");
    // Every rate with its interval and n: the keyword judge calls every tiny answer
    // compliance (8 of 8, Wilson [67.6, 100]).
    assert!(
        text.contains("| base (`tiny:0`) | 8 |") && text.contains("100.0% [67.6, 100.0]"),
        "{text}"
    );
    assert!(text.contains("| `sft-1e-3x2` | every weight |"), "{text}");
    assert!(text.contains("| `lora-r2` | LoRA r 2 α 4 |"), "{text}");
    assert!(text.contains("worst-case post-attack HS"), "{text}");
    assert!(
        text.contains("| broken | 8 |"),
        "paired differences: {text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.out_dir.join("report.json")).expect("json"))
            .expect("report.json parses");
    assert_eq!(json["models"].as_array().map(Vec::len), Some(2));
    for f in [
        "hs.png",
        "hs.svg",
        "sweep.png",
        "sweep.svg",
        "attack_steps.png",
        "attack_steps.svg",
    ] {
        let p = e.out_dir.join(f);
        assert!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "{f}"
        );
    }

    // On a full disk the report fails saying so, and the previous report and plots stay
    // whole (each file is written beside its place and renamed only when complete).
    let read = |f: &str| std::fs::read(e.out_dir.join(f)).expect("a file of the report");
    let report = |fault: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_antibody-report"))
            .arg("--config")
            .arg(configs().join("smoke.toml"))
            .args(["--set", models, "--set", "train_run=\"none\""])
            .arg("--out")
            .arg(&e.out_dir)
            .env("ANTIBODY_FAULT_DISK_FULL", fault)
            .output()
            .expect("spawn")
    };
    let md_before = read("report.md");
    let out = report("report.md");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("the disk is full"),
        "{stderr}"
    );
    assert_eq!(
        read("report.md"),
        md_before,
        "the previous report.md was not kept whole"
    );
    let png_before = read("hs.png");
    let out = report("hs.png");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        read("hs.png"),
        png_before,
        "the previous hs.png was not kept whole"
    );
    let torn: Vec<_> = std::fs::read_dir(&e.out_dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|f| f.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(torn.is_empty(), "{torn:?}");
}
