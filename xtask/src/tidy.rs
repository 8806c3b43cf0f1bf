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
