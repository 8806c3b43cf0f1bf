//! Writes that are all or nothing: a file written to a temporary name beside its final place
//! and renamed, or a directory staged beside its final place and swapped in whole (the
//! previous one is moved aside first and removed only once the new one is in place, and put
//! back if the swap fails). Every crate's outputs go through these.
//!
//! I/O errors keep their kind; [`describe`] words them for a message ("the disk is full"
//! where the kind is `StorageFull`). For the tests of that path, `ANTIBODY_FAULT_DISK_FULL`
//! set to a path fragment makes every write here to a path containing it fail as a full disk
//! would (after the temporary file is created, before anything is renamed).

use std::io;
use std::path::Path;

/// A write to `path` fails as on a full disk when `ANTIBODY_FAULT_DISK_FULL` names a fragment
/// of it (the disk-full tests' fault injection).
fn injected_fault(path: &Path) -> io::Result<()> {
    match std::env::var("ANTIBODY_FAULT_DISK_FULL") {
        Ok(fragment) if !fragment.is_empty() && path.to_string_lossy().contains(&fragment) => {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device (injected)",
            ))
        }
        _ => Ok(()),
    }
}

/// An I/O error in words: a full disk is named as such.
pub fn describe(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::StorageFull {
        format!("the disk is full ({e})")
    } else {
        e.to_string()
    }
}

/// Writes `bytes` to a new file at `path` (inside a staging directory, whose swap makes it
/// atomic), with the same fault injection as [`write_with`].
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    injected_fault(path)?;
    std::fs::write(path, bytes)
}

/// Writes `bytes` to `path` atomically ([`write_with`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with::<io::Error>(path, |tmp| std::fs::write(tmp, bytes))
}

use tempfile::TempDir;

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `path` by calling `write` on a temporary path beside it (with the same extension,
/// for writers that choose a format by it), then renaming.
pub fn write_with<E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let dir = parent_of(path);
    std::fs::create_dir_all(dir)?;
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(&suffix)
        .tempfile_in(dir)?;
    write(tmp.path())?;
    injected_fault(path)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A hidden, empty directory beside `dest` to stage its new contents in (removed on drop
/// unless passed to [`replace_dir`]).
pub fn staging_dir(dest: &Path) -> io::Result<TempDir> {
    let parent = parent_of(dest);
    std::fs::create_dir_all(parent)?;
    let stem = dest
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    tempfile::Builder::new()
        .prefix(&format!(".{stem}.staging-"))
        .tempdir_in(parent)
}

/// Puts the staged directory in place of `dest`. A `dest` that exists and is not a directory
/// is refused before anything moves (the staged directory is removed).
pub fn replace_dir(staged: TempDir, dest: &Path) -> io::Result<()> {
    if dest.exists() && !dest.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", dest.display()),
        ));
    }
    injected_fault(dest)?;
    let staged = staged.keep();
    let stem = dest
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let old = parent_of(dest).join(format!(".{stem}.old-{}", std::process::id()));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(dest, &old)?;
    }
    if let Err(e) = std::fs::rename(&staged, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        return Err(e);
    }
    if had_old {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_a_directory_whole_and_writes_files_atomically() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let dest = root.path().join("out");
        for content in ["one", "two"] {
            let staged = staging_dir(&dest)?;
            std::fs::write(staged.path().join("f"), content)?;
            replace_dir(staged, &dest)?;
            assert_eq!(std::fs::read_to_string(dest.join("f"))?, content);
        }
        let file = root.path().join("a.txt");
        write_with::<io::Error>(&file, |tmp| std::fs::write(tmp, "x"))?;
        assert_eq!(std::fs::read_to_string(&file)?, "x");
        let failed: io::Result<()> = write_with(&file, |_| Err(io::Error::other("boom")));
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(&file)?, "x");
        // Nothing hidden is left behind.
        let hidden = std::fs::read_dir(root.path())?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(hidden, 0);
        // A file where the directory should go is refused, and left as it was.
        let staged = staging_dir(&file)?;
        assert!(replace_dir(staged, &file).is_err());
        assert_eq!(std::fs::read_to_string(&file)?, "x");
        let hidden = std::fs::read_dir(root.path())?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(hidden, 0, "nothing hidden is left behind");
        Ok(())
    }
}
