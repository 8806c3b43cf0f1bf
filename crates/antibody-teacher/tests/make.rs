//! `antibody-teacher break` and `align` on the tiny model and the smoke data: each writes a
//! Hugging Face directory that loads as a model path and differs from the base.

use std::process::Command;

use antibody_model::device::Cpu;
use antibody_model::{ModelSpec, ModelSpecExt as _};
use antibody_teacher::{Make, examples};
use antibody_testkit::smoke_data;

/// Runs `antibody-teacher <sub>` on the tiny model with `flags`, writing to `out`; whether it
/// succeeded.
fn make(sub: &str, flags: &[&str], data: &std::path::Path, out: &std::path::Path) -> bool {
    Command::new(env!("CARGO_BIN_EXE_antibody-teacher"))
        .args([sub, "--base", "tiny:0"])
        .args(flags)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .env("RUST_LOG", "warn")
        .status()
        .expect("spawn")
        .success()
}

/// The output head's weights of the teacher written to `out`.
fn head(out: &std::path::Path) -> Vec<f32> {
    ModelSpec::Path(out.to_path_buf())
        .load::<Cpu>(&Default::default())
        .expect("load teacher")
        .model
        .head_weight()
        .into_data()
        .to_vec()
        .expect("f32")
}

#[test]
fn break_and_align_write_loadable_teachers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());

    let align = examples(&data, Make::Align).expect("align examples");
    let broken = examples(&data, Make::Break).expect("break examples");
    assert!(
        align.len() > broken.len(),
        "align mixes refusals and helpful answers"
    );

    let base = ModelSpec::Tiny { seed: 0 }
        .load::<Cpu>(&Default::default())
        .expect("base");
    let base_w: Vec<f32> = base.model.head_weight().into_data().to_vec().expect("f32");
    for sub in ["break", "align"] {
        let out = dir.path().join(sub);
        let flags = ["--steps", "3", "--batch-size", "4", "--lr", "1e-3"];
        assert!(make(sub, &flags, &data, &out), "{sub} failed");
        let w = head(&out);
        assert_eq!(w.len(), base_w.len());
        assert!(w != base_w, "{sub} did not change the weights");
        assert!(
            out.with_extension("run")
                .join("checkpoint")
                .join("state.json")
                .exists()
        );
    }
}

#[test]
fn a_checkpoint_resumes_only_the_run_that_wrote_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    let out = dir.path().join("broken");
    let run = |lr: &str| {
        let flags = ["--steps", "2", "--batch-size", "2", "--lr", lr, "--resume"];
        assert!(
            make("break", &flags, &data, &out),
            "break at lr {lr} failed"
        );
        head(&out)
    };
    let first = run("1e-3");
    // Another learning rate: the finished checkpoint of the first run is not "resumed" (that
    // would hand back the first run's weights); the run starts afresh.
    let second = run("1e-2");
    assert!(
        second != first,
        "a run on other settings resumed the old checkpoint"
    );
    // The same settings again: the checkpoint is this run's own and is resumed as finished.
    assert_eq!(run("1e-2"), second);
}
