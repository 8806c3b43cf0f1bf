//! A resumable store of generated responses.
//!
//! Generation is the slow part of a build. Each finished batch is appended to a JSONL file
//! keyed by the model's identity and the decoding settings, and flushed to disk, so a build
//! that dies loses at most the batch in flight, and a rebuild that changes anything but the
//! model or the decoding (caps, `max_len`, sources) regenerates only the new prompts.
//! A torn last line (a crash mid-write) is skipped on reading.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use antibody_model::Generated;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::hex;
use crate::error::{DataError, Result};

#[derive(Serialize, Deserialize)]
struct Line {
    /// SHA-256 of the prompt ids (little-endian u32s).
    p: String,
    /// Generated ids.
    t: Vec<u32>,
    /// Whether a stop token ended it.
    s: bool,
}

/// Generated responses by prompt, backed by an append-only file.
pub struct GenCache {
    path: PathBuf,
    entries: HashMap<String, Generated>,
    file: File,
}

/// The key of a prompt.
fn prompt_key(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    hex(&h.finalize())
}

impl GenCache {
    /// Opens (creating if needed) the cache for `key` under `dir`.
    pub fn open(dir: &Path, key: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
        let path = dir.join(format!("{key}.jsonl"));
        let mut entries = HashMap::new();
        if path.exists() {
            let f = File::open(&path).map_err(|e| DataError::io("open", &path, e))?;
            let mut torn = 0usize;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(|e| DataError::io("read", &path, e))?;
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => {
                        entries.insert(
                            l.p,
                            Generated {
                                tokens: l.t,
                                stopped: l.s,
                            },
                        );
                    }
                    Err(_) => torn += 1,
                }
            }
            if torn > 0 {
                tracing::warn!("{}: skipped {torn} unreadable line(s)", path.display());
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| DataError::io("open", &path, e))?;
        // A torn last line must not swallow the next batch's first line.
        let ends_mid_line = std::fs::read(&path)
            .map_err(|e| DataError::io("read", &path, e))?
            .last()
            .is_some_and(|&b| b != b'\n');
        if ends_mid_line {
            file.write_all(b"\n")
                .map_err(|e| DataError::io("append to", &path, e))?;
        }
        Ok(Self {
            path,
            entries,
            file,
        })
    }

    /// The file backing the cache.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached response to `prompt`.
    pub fn get(&self, prompt: &[u32]) -> Option<&Generated> {
        self.entries.get(&prompt_key(prompt))
    }

    /// Records a finished batch and flushes it to disk.
    pub fn put(&mut self, batch: &[(&[u32], Generated)]) -> Result<()> {
        let mut buf = String::new();
        for (prompt, g) in batch {
            let line = Line {
                p: prompt_key(prompt),
                t: g.tokens.clone(),
                s: g.stopped,
            };
            let json = serde_json::to_string(&line)
                .map_err(|e| DataError::io("encode", &self.path, std::io::Error::other(e)))?;
            buf.push_str(&json);
            buf.push('\n');
            self.entries.insert(line.p, g.clone());
        }
        // One write per batch: a crash leaves at most one torn line.
        self.file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| DataError::io("append to", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| DataError::io("create", "tempdir", e))?;
        let g = Generated {
            tokens: vec![5, 6, 2],
            stopped: true,
        };
        {
            let mut c = GenCache::open(dir.path(), "k")?;
            c.put(&[(&[1, 2, 3], g.clone())])?;
        }
        let path = dir.path().join("k.jsonl");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| DataError::io("open", &path, e))?;
        f.write_all(b"{\"p\":\"abc\",\"t\":[1,")
            .map_err(|e| DataError::io("write", &path, e))?;
        let mut c = GenCache::open(dir.path(), "k")?;
        assert_eq!(c.get(&[1, 2, 3]), Some(&g));
        assert_eq!(c.get(&[1, 2]), None);
        c.put(&[(&[9], g.clone())])?;
        drop(c);
        let c = GenCache::open(dir.path(), "k")?;
        assert_eq!(c.get(&[9]), Some(&g));
        Ok(())
    }
}
