//! Keeping the persistent target dir inside the disk it shares with CI.
//!
//! Cargo never deletes an artifact it has replaced: every change to a test file links a new
//! test executable beside the old one, and a checkout at another path (CI's clean clone)
//! links its own. Before building, `cargo xtask test` calls [`prune`]:
//!
//! - in `<target>/<profile>/deps`, of the executables built from one test target (the crate
//!   root their dep-info lists first), all but the [`KEEP`] newest are deleted: one for this
//!   checkout, one for CI's. Cargo relinks a deleted one that is still needed (it checks its
//!   outputs exist), so pruning costs at most a relink, never a wrong result;
//! - when the disk has less than [`LOW`] free after that, the profile's `incremental` dir too
//!   (the compiler's caches, rebuilt on demand).
//!
//! What remains free is reported; under [`TOO_LOW`] the run stops with an error naming the dir,
//! rather than dying in the linker with a bus error as a full disk makes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, bail};

/// Executables kept per test target: this checkout's and CI's.
pub const KEEP: usize = 2;
/// Free bytes under which the incremental caches go too.
pub const LOW: u64 = 16 << 30;
/// Free bytes under which a build is not started: a warm build (only the workspace's own
/// crates recompiled) writes about this much, a cold one several times more.
pub const TOO_LOW: u64 = 2 << 30;

/// What [`prune`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Executables deleted.
    pub executables: usize,
    /// Bytes they and any incremental caches held.
    pub bytes: u64,
    /// Whether the incremental caches were deleted.
    pub incremental: bool,
}

/// The stale executables in a `deps` dir: per test target, all but the `keep` newest by
/// modification time. A test target is named by the crate root its dep-info file (`<exe>.d`)
/// lists first (`crates/antibody-train/tests/method.rs`): file names alone collide (a crate's
/// lib and bin unit tests, a `tests/cli.rs` in two crates). Executables without dep-info are
/// left alone.
pub fn stale_executables(deps: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut by_target: BTreeMap<String, Vec<(SystemTime, PathBuf)>> = BTreeMap::new();
    let entries = match std::fs::read_dir(deps) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        // Executables carry no extension; libraries (.rlib, .rmeta, .so) and dep-info (.d) do.
        if !meta.is_file() || name.contains('.') || !is_executable(&meta) {
            continue;
        }
        let Ok(dep_info) = std::fs::read_to_string(deps.join(format!("{name}.d"))) else {
            continue;
        };
        let Some(root) = crate_root(&dep_info, name) else {
            continue;
        };
        by_target
            .entry(root.to_owned())
            .or_default()
            .push((meta.modified()?, entry.path()));
    }
    let mut stale = Vec::new();
    for (_, mut files) in by_target {
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        stale.extend(files.into_iter().skip(keep).map(|(_, path)| path));
    }
    stale.sort();
    Ok(stale)
}

/// The first source of the rule for `exe` in a Makefile-style dep-info file: rustc lists the
/// crate root first.
fn crate_root<'a>(dep_info: &'a str, exe: &str) -> Option<&'a str> {
    dep_info.lines().find_map(|line| {
        let (target, sources) = line.split_once(": ")?;
        let is_exe = Path::new(target).file_name().and_then(|f| f.to_str()) == Some(exe);
        is_exe.then(|| sources.split_whitespace().next()).flatten()
    })
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &std::fs::Metadata) -> bool {
    false
}

/// Bytes free to this user on the file system holding `dir` (or its nearest existing
/// ancestor), from POSIX `df -Pk`; `None` where `df` cannot tell.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|d| d.exists())?;
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(existing)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_df(&String::from_utf8_lossy(&out.stdout))
}

/// The available kibibytes of `df -Pk`'s one data line, in bytes.
fn parse_df(text: &str) -> Option<u64> {
    let line = text.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Prunes `<target_dir>/<profile>` as the module describes; `free` reads the free bytes
/// (a parameter so that tests can stand in for the disk).
pub fn prune(
    target_dir: &Path,
    profile: &str,
    free: impl Fn(&Path) -> Option<u64>,
) -> anyhow::Result<Pruned> {
    let profile_dir = target_dir.join(profile);
    let mut pruned = Pruned::default();
    for path in stale_executables(&profile_dir.join("deps"), KEEP)
        .with_context(|| format!("listing {}", profile_dir.join("deps").display()))?
    {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&path).with_context(|| format!("deleting {}", path.display()))?;
        pruned.executables += 1;
        pruned.bytes += len;
    }
    let incremental = profile_dir.join("incremental");
    if incremental.exists() && free(target_dir).is_some_and(|f| f < LOW) {
        pruned.bytes += dir_bytes(&incremental);
        std::fs::remove_dir_all(&incremental)
            .with_context(|| format!("deleting {}", incremental.display()))?;
        pruned.incremental = true;
    }
    Ok(pruned)
}

/// Prunes the release profile of `target_dir`, reports it, and refuses to build on a disk
/// with less than [`TOO_LOW`] free.
pub fn prepare(target_dir: &Path) -> anyhow::Result<()> {
    let pruned = prune(target_dir, "release", free_bytes)?;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    if pruned.executables > 0 || pruned.incremental {
        eprintln!(
            "xtask test: pruned {} stale test executables{} ({:.1} GiB)",
            pruned.executables,
            if pruned.incremental {
                " and the incremental caches"
            } else {
                ""
            },
            gib(pruned.bytes)
        );
    }
    match free_bytes(target_dir) {
        Some(free) if free < TOO_LOW => bail!(
            "{} is on a disk with {:.1} GiB free; even a warm build needs about {:.0} GiB: \
             free space there or set CARGO_TARGET_DIR to a dir on another disk",
            target_dir.display(),
            gib(free),
            gib(TOO_LOW)
        ),
        Some(free) => eprintln!("xtask test: {:.1} GiB free for the build", gib(free)),
        None => eprintln!("xtask test: df cannot tell the free space; building anyway"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn touch(path: &Path, executable: bool, age_s: u64) {
        std::fs::write(path, vec![0u8; 100]).expect("test fixture");
        if executable {
            // The dep-info cargo writes beside a test executable; `lib-*` and `bin-*` are one
            // crate's lib and bin unit tests, which share a file name.
            let name = path
                .file_name()
                .expect("test fixture")
                .to_str()
                .expect("test fixture");
            let root = match name.split('-').next().expect("test fixture") {
                "unit" if name.ends_with('1') => "crates/a/src/main.rs".to_owned(),
                "unit" => "crates/a/src/lib.rs".to_owned(),
                stem => format!("crates/a/tests/{stem}.rs"),
            };
            let d = format!(
                "{p}.d: {root}\n\n{p}: {root} crates/a/tests/common.rs\n\n{root}:\n",
                p = path.display()
            );
            std::fs::write(path.with_file_name(format!("{name}.d")), d).expect("test fixture");
        }
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .expect("test fixture");
        let when = SystemTime::now() - std::time::Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(path)
            .expect("test fixture")
            .set_modified(when)
            .expect("test fixture");
    }

    #[test]
    fn keeps_the_newest_executables_per_test_target_and_every_library() {
        let dir = tempfile::tempdir().expect("test fixture");
        let deps = dir.path().join("release/deps");
        std::fs::create_dir_all(&deps).expect("test fixture");
        for (name, exe, age) in [
            ("method-aaaa", true, 300),
            ("method-bbbb", true, 200),
            ("method-cccc", true, 100),
            ("lora-dddd", true, 500),
            ("libburn-eeee.rlib", false, 900),
            ("libburn-ffff.rlib", false, 800),
            ("libburn-0000.rlib", false, 700),
            ("unit-0000", true, 100),
            ("unit-0001", true, 100),
            ("unit-0010", true, 900),
            ("notes-1111", false, 900),
        ] {
            touch(&deps.join(name), exe, age);
        }
        touch(&dir.path().join("release/method-9999"), true, 900);
        let incremental = dir.path().join("release/incremental/x");
        std::fs::create_dir_all(&incremental).expect("test fixture");
        std::fs::write(incremental.join("cache"), [0u8; 10]).expect("test fixture");

        // An executable without dep-info is not judged.
        touch(&deps.join("orphan-2222"), true, 999);
        std::fs::remove_file(deps.join("orphan-2222.d")).expect("test fixture");

        // Plenty of room: only the oldest `method` executable goes; the three `unit`
        // executables are two targets (lib and bin), each within KEEP.
        let pruned = prune(dir.path(), "release", |_| Some(LOW + 1)).expect("test fixture");
        assert_eq!(
            pruned,
            Pruned {
                executables: 1,
                bytes: 100,
                incremental: false
            }
        );
        let mut left: Vec<String> = std::fs::read_dir(&deps)
            .expect("test fixture")
            .map(|e| {
                e.expect("test fixture")
                    .file_name()
                    .into_string()
                    .expect("test fixture")
            })
            .filter(|n| !n.ends_with(".d"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "libburn-0000.rlib",
                "libburn-eeee.rlib",
                "libburn-ffff.rlib",
                "lora-dddd",
                "method-bbbb",
                "method-cccc",
                "notes-1111",
                "orphan-2222",
                "unit-0000",
                "unit-0001",
                "unit-0010"
            ]
        );
        assert!(dir.path().join("release/method-9999").exists());
        assert!(incremental.exists());

        // A full disk: the incremental caches go too; pruning again deletes no executable.
        let pruned = prune(dir.path(), "release", |_| Some(LOW - 1)).expect("test fixture");
        assert_eq!(
            pruned,
            Pruned {
                executables: 0,
                bytes: 10,
                incremental: true
            }
        );
        assert!(!dir.path().join("release/incremental").exists());
    }

    #[test]
    fn the_crate_root_is_the_first_source_of_the_executables_rule() {
        let d = "/t/deps/m-1.d: crates/x/tests/m.rs\n\n/t/deps/m-1: crates/x/tests/m.rs \
                 crates/x/tests/common/mod.rs\n\ncrates/x/tests/m.rs:\n";
        assert_eq!(crate_root(d, "m-1"), Some("crates/x/tests/m.rs"));
        assert_eq!(crate_root(d, "m-2"), None);
    }

    #[test]
    fn a_missing_target_dir_prunes_nothing() {
        let dir = tempfile::tempdir().expect("test fixture");
        let pruned = prune(&dir.path().join("none"), "release", |_| Some(0)).expect("test fixture");
        assert_eq!(pruned, Pruned::default());
    }

    #[test]
    fn reads_the_available_column_of_posix_df() {
        let text = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n\
                    /dev/vda        263174212  65432100  30000000      69% /\n";
        assert_eq!(parse_df(text), Some(30_000_000 * 1024));
        assert_eq!(parse_df("Filesystem\n"), None);
        assert!(free_bytes(Path::new("/")).is_some_and(|b| b > 0));
    }
}
