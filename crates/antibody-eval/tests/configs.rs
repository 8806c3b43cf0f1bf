//! Every configuration in `configs/` parses with the loaders the stages use (`[data]` with
//! its sources table, `[train]`, `[eval]`), with unknown keys refused.

use std::path::Path;

#[test]
fn every_config_in_configs_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml")
            || path.file_name().and_then(|n| n.to_str()) == Some("sources.toml")
        {
            continue;
        }
        antibody_data::Config::load(&path)
            .unwrap_or_else(|e| panic!("{}: [data]: {e}", path.display()));
        antibody_schedule::config::Train::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: [train]: {e}", path.display()));
        antibody_eval::Eval::load(&path, &[])
            .unwrap_or_else(|e| panic!("{}: [eval]: {e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 2, "default.toml and smoke.toml at least");
}
