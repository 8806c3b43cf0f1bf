//! Claiming an output directory: one process at a time writes a run, build or evaluation
//! directory. [`DirLock::acquire`] creates `.<name>.lock` beside the directory (beside, so a
//! directory swapped in whole keeps its claim) holding the owner's pid, host and start; a
//! second claimant is refused with a message naming the owner. A lock whose owner is gone
//! (same host, no such pid) is stale: it is taken over, with a warning. The lock is released
//! when the [`DirLock`] is dropped.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// What the owner is doing (`antibody-train run`).
    pub what: String,
    /// Unix time the lock was taken.
    pub since_unix: u64,
}

/// A directory another process is writing.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Held by a live process (or one on another host).
    #[error(
        "{} is in use by {} (pid {} on {}, since unix time {}): wait for it to finish; if that \
         process is gone, remove {}",
        dir.display(), owner.what, owner.pid, owner.host, owner.since_unix, lock.display()
    )]
    Busy {
        /// The directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Its owner.
        owner: Owner,
    },
    /// The lock file could not be created or read.
    #[error("cannot lock {}: {source}", lock.display())]
    Io {
        /// The lock file.
        lock: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A held claim on a directory; released on drop.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether process `pid` is alive on this host (Linux: `/proc/<pid>/stat` exists and its state
/// is not zombie or dead: a killed process whose parent died may stay a zombie). Without
/// `/proc`, every owner counts as alive.
fn alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
    else {
        return false;
    };
    // `pid (comm) state ...`: the state follows the last `)`.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x"))
}

/// The lock file of `dir`: `.<name>.lock` beside it.
pub fn lock_path(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.lock"))
}

impl DirLock {
    /// Claims `dir` for `what`, or says who holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self, LockError> {
        let path = lock_path(dir);
        let io = |source| LockError::Io {
            lock: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let me = Owner {
            pid: std::process::id(),
            host: host_name(),
            what: what.to_owned(),
            since_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let text = serde_json::to_string(&me).unwrap_or_default();
                    f.write_all(text.as_bytes()).map_err(io)?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    match serde_json::from_str::<Owner>(&text) {
                        Ok(owner) if owner.host != me.host || alive(owner.pid) => {
                            return Err(LockError::Busy {
                                dir: dir.to_path_buf(),
                                lock: path,
                                owner,
                            });
                        }
                        // The owner is gone (or the file was left half-written by a kill).
                        _ => {
                            tracing::warn!("{}: stale lock ({text}): taken over", path.display());
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(io(e)),
            }
        }
        Err(io(std::io::Error::other("the lock file keeps reappearing")))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_refused_and_a_stale_one_taken_over()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("run");
        let held = DirLock::acquire(&dir, "test one")?;
        let busy = DirLock::acquire(&dir, "test two")
            .err()
            .ok_or("second claim accepted")?;
        let msg = busy.to_string();
        assert!(
            msg.contains("in use by test one") && msg.contains(".run.lock"),
            "{msg}"
        );
        drop(held);
        assert!(!lock_path(&dir).exists(), "released on drop");
        // A lock left by a process that no longer exists is stale.
        let dead = Owner {
            pid: u32::MAX - 1,
            host: host_name(),
            what: "killed".into(),
            since_unix: 0,
        };
        std::fs::write(lock_path(&dir), serde_json::to_string(&dead)?)?;
        let _taken = DirLock::acquire(&dir, "test three")?;
        // One from another host is not judged: refused.
        drop(_taken);
        let remote = Owner {
            host: "elsewhere".into(),
            ..dead
        };
        std::fs::write(lock_path(&dir), serde_json::to_string(&remote)?)?;
        assert!(DirLock::acquire(&dir, "test four").is_err());
        Ok(())
    }
}
