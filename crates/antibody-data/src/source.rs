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
    /// Group (template), if the source has one: rows of one group land in one slice.
    pub group: String,
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
    for (line_no, fields) in records(c.format, c.text_field(), path, &text)? {
        let field = |name: &str, required: bool| -> Result<Option<String>> {
            match fields.get(name) {
                None if required => Err(DataError::row(path, line_no, Some(name), "missing")),
                None => Ok(None),
                Some(Field::Text(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
                Some(Field::Text(_)) if !required => Ok(None),
                Some(Field::Text(_)) => {
                    Err(DataError::row(path, line_no, Some(name), "empty string"))
                }
                Some(Field::Other(t)) => Err(DataError::row(
                    path,
                    line_no,
                    Some(name),
                    format!("expected a string, found {t}"),
                )),
            }
        };
        if let Some((f, want)) = &c.only
            && field(f, true)?.as_deref() != Some(want.as_str())
        {
            continue;
        }
        let text = field(c.text_field(), true)?.unwrap_or_default();
        let id = match &c.id_field {
            Some(f) => field(f, true)?.unwrap_or_default(),
            None => format!("{}-{line_no:04}", c.name),
        };
        let optional = |f: &Option<String>| -> Result<String> {
            match f {
                Some(f) => Ok(field(f, true)?.unwrap_or_default()),
                None => Ok(String::new()),
            }
        };
        let row = Row {
            id,
            source: c.name.clone(),
            category: optional(&c.category_field)?,
            group: optional(&c.group_field)?,
            text,
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

/// A record's fields by name.
type Fields = std::collections::HashMap<String, Field>;

/// A field of a record: text, or a JSON value of another type (named for errors).
enum Field {
    Text(String),
    Other(&'static str),
}

/// The records of a file with the line each starts on: the whole line as the field
/// `text_field` (lines), one field per key (JSONL), one field per header column (CSV).
fn records(
    format: Format,
    text_field: &str,
    path: &Path,
    text: &str,
) -> Result<Vec<(usize, Fields)>> {
    let mut out = Vec::new();
    match format {
        Format::Lines | Format::Jsonl => {
            for (i, line) in text.lines().enumerate() {
                let line_no = i + 1;
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let fields = if format == Format::Lines {
                    [(text_field.to_owned(), Field::Text(line.to_owned()))].into()
                } else {
                    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                        DataError::row(path, line_no, None, format!("not valid JSON: {e}"))
                    })?;
                    let serde_json::Value::Object(obj) = value else {
                        return Err(DataError::row(
                            path,
                            line_no,
                            None,
                            "expected a JSON object",
                        ));
                    };
                    obj.into_iter()
                        .map(|(k, v)| {
                            let f = match v {
                                serde_json::Value::String(s) => Field::Text(s),
                                other => Field::Other(json_type(&other)),
                            };
                            (k, f)
                        })
                        .collect()
                };
                out.push((line_no, fields));
            }
        }
        Format::Csv => {
            let mut rows =
                csv_rows(text).map_err(|(line, why)| DataError::row(path, line, None, why))?;
            if rows.is_empty() {
                return Ok(out);
            }
            let (_, header) = rows.remove(0);
            for (line_no, cells) in rows {
                if cells.len() == 1 && cells[0].trim().is_empty() {
                    continue;
                }
                if cells.len() != header.len() {
                    return Err(DataError::row(
                        path,
                        line_no,
                        None,
                        format!("{} cells, the header has {}", cells.len(), header.len()),
                    ));
                }
                let fields = header
                    .iter()
                    .cloned()
                    .zip(cells.into_iter().map(Field::Text))
                    .collect();
                out.push((line_no, fields));
            }
        }
    }
    Ok(out)
}

/// A CSV record: the line it starts on, and its cells.
pub type CsvRecord = (usize, Vec<String>);

/// RFC 4180 CSV: comma-separated cells, double-quoted cells may hold commas, line breaks and
/// doubled quotes. Returns each record with the line it starts on.
pub fn csv_rows(text: &str) -> std::result::Result<Vec<CsvRecord>, (usize, String)> {
    let mut out = Vec::new();
    let (mut cells, mut cell) = (Vec::new(), String::new());
    let (mut line, mut start) = (1usize, 1usize);
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    cell.push(c);
                }
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' if cell.is_empty() => quoted = true,
            '"' => return Err((line, "a quote inside an unquoted cell".into())),
            ',' => cells.push(std::mem::take(&mut cell)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                cells.push(std::mem::take(&mut cell));
                out.push((start, std::mem::take(&mut cells)));
                line += 1;
                start = line;
            }
            _ => cell.push(c),
        }
    }
    if quoted {
        return Err((start, "a quoted cell is not closed".into()));
    }
    if !cell.is_empty() || !cells.is_empty() {
        cells.push(cell);
        out.push((start, cells));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_quotes_and_line_breaks() {
        let text = "a,b,c\n\"x, y\",\"say \"\"hi\"\"\",z\n\"two\nlines\",,w\r\nlast,1,2";
        let rows = csv_rows(text).expect("valid CSV");
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[1],
            (2, vec!["x, y".into(), "say \"hi\"".into(), "z".into()])
        );
        assert_eq!(
            rows[2],
            (3, vec!["two\nlines".into(), String::new(), "w".into()])
        );
        assert_eq!(rows[3].0, 5, "the line a record starts on");
        assert_eq!(csv_rows("a,\"open\n").err().map(|e| e.0), Some(1));
        assert!(csv_rows("a,b\"c\n").is_err());
    }
}
