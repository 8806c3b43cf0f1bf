//! Streaming SHA-256 of files.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::FetchError;

/// Read buffer size for hashing and extraction.
pub(crate) const BUF_SIZE: usize = 1 << 20;

/// SHA-256 of a file as lowercase hex, read in a streaming fashion.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String, FetchError> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(FetchError::io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FetchError::io("read", path)(e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Lowercase hex of a digest.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether a found digest equals a pinned one (case-insensitive, trimmed).
pub(crate) fn same_digest(expected: &str, found: &str) -> bool {
    expected.trim().eq_ignore_ascii_case(found.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_small_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("abc.txt");
        std::fs::write(&path, b"abc")?;
        assert_eq!(
            sha256_file(&path)?,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"")?;
        assert_eq!(
            sha256_file(&empty)?,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        Ok(())
    }

    #[test]
    fn sha256_of_missing_file_names_it() {
        let err = sha256_file("/nonexistent/antibody/file").err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("/nonexistent/antibody/file"), "{msg}");
    }

    #[test]
    fn digest_comparison_ignores_case() {
        assert!(same_digest("ABcd", "abcd"));
        assert!(!same_digest("abce", "abcd"));
    }
}
