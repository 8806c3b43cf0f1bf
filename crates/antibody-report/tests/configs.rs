//! Every configuration in `configs/` parses with the loaders the stages use (`[data]` with
//! its sources table, `[teacher]`, `[train]`, `[eval]`), with unknown keys refused. It lives
//! here, at the top of the crate graph, where every stage's loader is in reach.

use antibody_testkit::toml_files;

#[test]
fn every_config_in_configs_parses() {
    let mut checked = 0;
    for path in toml_files("configs") {
        if path.file_name().and_then(|n| n.to_str()) == Some("sources.toml") {
            continue;
        }
        antibody_data::Config::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: [data]: {e}", path.display()));
        antibody_teacher::Teachers::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: [teacher]: {e}", path.display()));
        antibody_train::config::Train::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: [train]: {e}", path.display()));
        antibody_eval::Eval::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: [eval]: {e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 2, "default.toml and smoke.toml at least");
}

/// Every sweep in `configs/sweeps/` names a base configuration, and each of its runs'
/// overrides applies to it and parses (so a sweep does not fail an hour in).
#[test]
fn every_sweep_run_parses() {
    let mut checked = 0;
    for path in toml_files("configs/sweeps") {
        let text = std::fs::read_to_string(&path).expect("read");
        let sweep: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let base = path.parent().expect("dir").join(
            sweep["config"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: `config`", path.display())),
        );
        for (i, run) in sweep["run"].as_array().expect("[[run]]").iter().enumerate() {
            let sets: Vec<&str> = run
                .get("set")
                .and_then(toml::Value::as_array)
                .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
                .unwrap_or_default();
            let section = |name: &str| -> Vec<String> {
                sets.iter()
                    .filter_map(|s| s.strip_prefix(&format!("{name}.")))
                    .map(str::to_owned)
                    .collect()
            };
            antibody_data::Config::load(&base, &section("data"))
                .unwrap_or_else(|e| panic!("{}: run[{i}]: [data]: {e}", path.display()));
            antibody_teacher::Teachers::load(&base, &section("teacher"))
                .unwrap_or_else(|e| panic!("{}: run[{i}]: [teacher]: {e}", path.display()));
            antibody_train::config::Train::load(&base, &section("train"))
                .unwrap_or_else(|e| panic!("{}: run[{i}]: [train]: {e}", path.display()));
            antibody_eval::Eval::load(&base, &section("eval"))
                .unwrap_or_else(|e| panic!("{}: run[{i}]: [eval]: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 1, "configs/sweeps/cpu.toml has runs");
}
