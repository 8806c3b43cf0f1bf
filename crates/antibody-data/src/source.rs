//! Locating (fetching, verifying) a source and reading its rows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use antibody_fetch::Cache;

use crate::config::{Format, Source};
use crate::error::{DataError, Result};

/// One row of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Stable id: the source's id field, or `<source>-<line>`.
    pub id: String,
    /// The source's name.
    pub source: String,
    /// Category, if the source has one (else empty).
    pub category: String,
    /// The prompt or phrasing, trimmed.
    pub text: String,
}

/// A source's file, located and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The file.
    pub path: PathBuf,
    /// Its SHA-256.
    pub sha256: String,
}

/// Fetches (or finds in `cache`) a fetched source, or checks a local one against its pinned
/// digest if it has one.
pub fn locate(source: &Source, cache: &Cache) -> Result<Located> {
    if let Some(asset) = source.config.asset() {
        let path = cache.fetch(&asset)?;
        return Ok(Located {
            path,
            sha256: asset.sha256,
        });
    }
    let path = source
        .local_file
        .clone()
        .ok_or_else(|| DataError::config(&source.declared_in, &source.key, "source has no file"))?;
    let found = antibody_fetch::sha256_file(&path)?;
    if let Some(expected) = &source.config.sha256
        && !expected.eq_ignore_ascii_case(&found)
    {
        return Err(DataError::Checksum {
            file: path,
            source_name: source.config.name.clone(),
            expected: expected.clone(),
            found,
        });
    }
    Ok(Located {
        path,
        sha256: found,
    })
}

/// Reads every non-empty row of `path` as `source` describes it.
pub fn read_rows(source: &Source, path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io("read", path, e))?;
    let c = &source.config;
    let mut rows = Vec::new();
    let mut ids = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let row = match c.format {
            Format::Lines => Row {
                id: format!("{}-{line_no:04}", c.name),
                source: c.name.clone(),
                category: String::new(),
                text: line.to_owned(),
            },
            Format::Jsonl => {
                let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    DataError::row(path, line_no, None, format!("not valid JSON: {e}"))
                })?;
                let obj = value
                    .as_object()
                    .ok_or_else(|| DataError::row(path, line_no, None, "expected a JSON object"))?;
                let field = |name: &str, required: bool| -> Result<Option<String>> {
                    match obj.get(name) {
                        None if required => {
                            Err(DataError::row(path, line_no, Some(name), "missing"))
                        }
                        None => Ok(None),
                        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                            Ok(Some(s.trim().to_owned()))
                        }
                        Some(serde_json::Value::String(_)) => {
                            Err(DataError::row(path, line_no, Some(name), "empty string"))
                        }
                        Some(other) => Err(DataError::row(
                            path,
                            line_no,
                            Some(name),
                            format!("expected a string, found {}", json_type(other)),
                        )),
                    }
                };
                let text = field(c.text_field(), true)?.unwrap_or_default();
                let id = match &c.id_field {
                    Some(f) => field(f, true)?.unwrap_or_default(),
                    None => format!("{}-{line_no:04}", c.name),
                };
                let category = match &c.category_field {
                    Some(f) => field(f, true)?.unwrap_or_default(),
                    None => String::new(),
                };
                Row {
                    id,
                    source: c.name.clone(),
                    category,
                    text,
                }
            }
        };
        if !ids.insert(row.id.clone()) {
            return Err(DataError::row(
                path,
                line_no,
                c.id_field.as_deref(),
                format!("duplicate id `{}`", row.id),
            ));
        }
        rows.push(row);
    }
    Ok(rows)
}

pub(crate) fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
