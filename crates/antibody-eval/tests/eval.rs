//! `antibody-eval` on the tiny model and the smoke data: every number of every model is
//! present and in range, a second run skips the models whose results are current, and bad
//! input is refused with the file and key named.

use std::path::Path;

use antibody_eval::{Eval, evaluate};
use antibody_model::device::CpuAutodiff;
use antibody_testkit::{configs, smoke_data};

fn eval(dir: &Path, overrides: &[&str]) -> Result<Eval, antibody_eval::config::ConfigError> {
    let mut o: Vec<String> = vec![
        "models=[{name = \"base\", model = \"tiny:0\"}, {name = \"broken\", model = \"tiny:1\"}]"
            .into(),
    ];
    o.extend(overrides.iter().map(|s| (*s).to_owned()));
    let mut e = Eval::load(&configs().join("smoke.toml"), &o)?;
    e.out_dir = dir.join("eval");
    e.train_run = None;
    Ok(e)
}

#[test]
fn every_model_gets_every_number_and_a_second_run_does_no_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = smoke_data(dir.path());
    // With a model judge beside the keyword judge.
    let e = eval(
        dir.path(),
        &["model_judge={model = \"tiny:2\", batch_size = 4}"],
    )
    .expect("config");
    let results = evaluate::<CpuAutodiff>(&e, &data, &Default::default()).expect("evaluate");
    assert_eq!(results.len(), 2);
    let unit = |x: f64| (0.0..=1.0).contains(&x);
    for r in &results {
        assert!(unit(r.hs.rate) && r.hs.n == 8, "{}: HS {:?}", r.name, r.hs);
        let judged = r.hs_model_judge.as_ref().expect("model-judge HS");
        assert!(unit(judged.rate) && judged.n == 8, "{judged:?}");
        assert_eq!(r.attacks.len(), 2, "{}", r.name);
        for a in &r.attacks {
            assert!(
                unit(a.hs.rate) && a.hs.n == 8 && a.final_loss.is_finite(),
                "{a:?}"
            );
        }
        let fa = r.fa.as_ref().expect("FA");
        assert!(unit(fa.rate) && fa.n == 4, "{fa:?}");
        assert!(unit(r.over_refusal_lookalike.rate) && r.over_refusal_lookalike.n == 4);
        assert!(unit(r.over_refusal_harmless.rate) && r.over_refusal_harmless.n == 4);
        assert!(
            r.perplexity.is_finite() && r.perplexity > 1.0,
            "{}",
            r.perplexity
        );
        assert_eq!(r.samples.len(), 4, "2 harmful + 2 look-alike samples");
        assert!(r.generated_tokens > 0);
    }
    assert!(
        results[0].dpo_win_rate.is_none(),
        "the reference has no win rate"
    );
    assert!(results[1].dpo_win_rate.is_some_and(unit));
    // The tiny random models never refuse: HS 1 (a check of the judge's direction).
    assert_eq!(results[0].hs.rate, 1.0);

    // A second run finds both results current and does no work.
    let mtime = || {
        std::fs::metadata(e.out_dir.join("models/base.json"))
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    let before = mtime();
    let again = evaluate::<CpuAutodiff>(&e, &data, &Default::default()).expect("again");
    for (a, r) in again.iter().zip(&results) {
        assert_eq!(
            (&a.name, &a.key, &a.hs, &a.samples),
            (&r.name, &r.key, &r.hs, &r.samples)
        );
    }
    assert_eq!(before, mtime(), "a current result was recomputed");
}

#[test]
fn bad_input_is_refused_with_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (o, needles) in [
        (
            "max_new_tokenz=3",
            vec!["smoke.toml", "eval", "max_new_tokenz"],
        ),
        (
            "attacks=[{name = \"a\", lr = 1e-3, steps = 0}]",
            vec!["eval.attacks[0]"],
        ),
        ("models=[]", vec!["eval.models"]),
    ] {
        let err = match Eval::load(&configs().join("smoke.toml"), &[o.to_owned()]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{o} accepted"),
        };
        for n in needles {
            assert!(err.contains(n), "{o}: `{n}` not in {err}");
        }
    }
    // A checkpoint that is not a model.
    let data = smoke_data(dir.path());
    let not_a_model = dir.path().join("not-a-model");
    std::fs::create_dir_all(&not_a_model).expect("dir");
    std::fs::write(not_a_model.join("config.json"), "{}").expect("write");
    let models = format!(
        "models=[{{name = \"x\", model = \"{}\"}}]",
        not_a_model.display()
    );
    let e = eval(dir.path(), &[&models]).expect("config");
    let err = evaluate::<CpuAutodiff>(&e, &data, &Default::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("not-a-model"), "{err}");
}
