//! Configuration files: one TOML file holds a section per stage (`[data]`, `[teacher]`,
//! `[train]`, `[eval]`); each stage reads its own with [`load_section`] into a typed struct
//! (`deny_unknown_fields` there), after the `--set KEY=VALUE` overrides of the command line
//! are applied. This module is the workspace's one reader of configuration files and its one
//! `--set` parser ([`Override`]).
//!
//! Errors ([`ConfigError`]) name where the value came from — the file, or the `--set`
//! override — and the dotted key (`train.lat.layers`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// The command-line flags by which every stage's binary names its configuration:
/// `--config FILE` (default `configs/default.toml`) and `--set SECTION.KEY=VALUE`, repeated
/// (TOML values; a stage's own section may be left out of the key).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file.
    #[arg(long, default_value = "configs/default.toml")]
    pub config: PathBuf,
    /// Override a key: `--set train.lat.epsilon=2.0` (TOML values).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    File,
    /// A `--set` override (the text as given).
    Override(String),
}

/// A configuration error: the file, the route that supplied the value, the dotted key and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// The key at fault (`train.lat.layers`; `(file)` for the file as a whole).
    pub key: String,
    /// What is wrong.
    pub reason: String,
    /// Whether the file or a `--set` override supplied it.
    pub origin: Origin,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File => write!(
                f,
                "{}: `{}`: {}",
                self.file.display(),
                self.key,
                self.reason
            ),
            Origin::Override(o) => write!(
                f,
                "--set {o} (over {}): `{}`: {}",
                self.file.display(),
                self.key,
                self.reason
            ),
        }
    }
}

impl ConfigError {
    /// An error about `key` of `file`.
    pub fn new(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
            origin: Origin::File,
        }
    }

    /// The same error, attributed to a `--set` override.
    pub fn from_override(mut self, text: &str) -> Self {
        self.origin = Origin::Override(text.to_owned());
        self
    }
}

/// One `--set KEY=VALUE` override: a dotted key and a TOML value (a bare word that is not
/// valid TOML is taken as a string).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The text as given.
    pub text: String,
    /// The dotted key (`train.lat.epsilon`).
    pub key: String,
    /// The value.
    pub value: toml::Value,
}

impl Override {
    /// Parses `KEY=VALUE`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| "expected KEY=VALUE".to_owned())?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("`{key}` is not a dotted key"));
        }
        let value = value.trim();
        let parsed: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()));
        Ok(Self {
            text: text.to_owned(),
            key: key.to_owned(),
            value: parsed,
        })
    }

    /// The section this override names (the key's first part).
    pub fn section(&self) -> &str {
        self.key.split('.').next().unwrap_or_default()
    }

    /// Sets the key in `table` (intermediate tables are created).
    pub fn apply(&self, table: &mut toml::Table) -> Result<(), String> {
        let parts: Vec<&str> = self.key.split('.').collect();
        let (last, path) = parts.split_last().ok_or_else(|| "empty key".to_owned())?;
        let mut node = table;
        for p in path {
            node = node
                .entry((*p).to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| format!("`{p}` is not a table"))?;
        }
        node.insert((*last).to_owned(), self.value.clone());
        Ok(())
    }
}

/// Reads `file` as a TOML table.
pub fn read_table(file: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, "(file)", e.to_string()))?;
    text.parse()
        .map_err(|e| ConfigError::new(file, "(file)", format!("not valid TOML: {e}")))
}

/// Reads `file` with `overrides` applied. Every override's key starts with its section
/// (`train.lat.epsilon=4`).
pub fn read_with_overrides(file: &Path, overrides: &[String]) -> Result<toml::Table, ConfigError> {
    let mut table = read_table(file)?;
    for text in overrides {
        let o = Override::parse(text)
            .map_err(|reason| ConfigError::new(file, text.as_str(), reason).from_override(text))?;
        o.apply(&mut table)
            .map_err(|reason| ConfigError::new(file, o.key.as_str(), reason).from_override(text))?;
    }
    Ok(table)
}

/// Deserializes `value` into `T`; errors name `prefix.path` (the path serde reached).
pub fn deserialize<T: DeserializeOwned>(
    file: &Path,
    prefix: &str,
    value: toml::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = match (prefix.is_empty(), path.as_str()) {
            (true, p) => p.to_owned(),
            (false, "." | "") => prefix.to_owned(),
            (false, p) => format!("{prefix}.{p}"),
        };
        ConfigError::new(file, key, e.into_inner().to_string())
    })
}

/// Reads section `name` of the TOML file `file` into `T`, with `overrides` (`key=value`, TOML
/// values, keys relative to the section or starting with `name.`) applied first. Errors name
/// the file, the dotted key (`name.a.b`) and, where an override supplied the value, the
/// override.
pub fn load_section<T: DeserializeOwned>(
    file: &Path,
    name: &str,
    overrides: &[String],
) -> Result<T, ConfigError> {
    section(file, &read_table(file)?, name, overrides)
}

/// [`load_section`] on a table already read from `file` (a stage that reads several
/// sections reads the file once).
pub fn section<T: DeserializeOwned>(
    file: &Path,
    table: &toml::Table,
    name: &str,
    overrides: &[String],
) -> Result<T, ConfigError> {
    let mut section = match table.get(name).cloned() {
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(ConfigError::new(file, name, "must be a table")),
        None => {
            return Err(ConfigError::new(
                file,
                name,
                format!("missing section `[{name}]`"),
            ));
        }
    };
    let prefix = format!("{name}.");
    for text in overrides {
        let relative = text.strip_prefix(&prefix).unwrap_or(text);
        let o = Override::parse(relative).map_err(|reason| {
            ConfigError::new(file, format!("{prefix}{relative}"), reason).from_override(text)
        })?;
        o.apply(&mut section).map_err(|reason| {
            ConfigError::new(file, format!("{prefix}{}", o.key), reason).from_override(text)
        })?;
    }
    deserialize(file, name, toml::Value::Table(section)).map_err(|e| attribute(e, name, overrides))
}

/// Attributes an error about a key that one of `overrides` set (`name.key=...` or, relative to
/// section `name`, `key=...`) to that override: the message then names the `--set` route, not
/// the file. Checks that run after [`load_section`] pass their errors through it too.
pub fn attribute(e: ConfigError, name: &str, overrides: &[String]) -> ConfigError {
    if e.origin != Origin::File {
        return e;
    }
    let prefix = format!("{name}.");
    let hit = overrides.iter().rev().find(|text| {
        let Some((key, _)) = text.split_once('=') else {
            return false;
        };
        let key = key.trim();
        let full = if key.starts_with(&prefix) {
            key.to_owned()
        } else {
            format!("{prefix}{key}")
        };
        e.key == full || e.key.starts_with(&format!("{full}."))
    });
    match hit {
        Some(text) => e.from_override(text),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_nested_keys_with_toml_values() {
        let mut t: toml::Table = "a = 1\n[lat]\nepsilon = 1.0\n".parse().expect("toml");
        for o in ["lat.epsilon=2.5", "student=patient", "lat.layers=[1, 2]"] {
            Override::parse(o)
                .and_then(|o| o.apply(&mut t))
                .expect("set");
        }
        assert_eq!(t["lat"]["epsilon"].as_float(), Some(2.5));
        assert_eq!(t["student"].as_str(), Some("patient"));
        assert_eq!(t["lat"]["layers"].as_array().map(Vec::len), Some(2));
        assert!(Override::parse("novalue").is_err());
        assert!(Override::parse("a..b=1").is_err());
        assert!(Override::parse("a=1").and_then(|o| o.apply(&mut t)).is_ok());
        assert!(
            Override::parse("a.b=1")
                .and_then(|o| o.apply(&mut t))
                .is_err()
        );
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Section {
        n: usize,
    }

    #[test]
    fn errors_name_the_file_or_the_override_and_the_key() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[s]\nn = 1\n")?;
        let ok: Section = load_section(&file, "s", &["s.n=3".into()])?;
        assert_eq!(ok.n, 3);
        let e = load_section::<Section>(&file, "s", &["s.n=-1".into()])
            .err()
            .ok_or("accepted")?;
        assert_eq!(e.key, "s.n");
        assert_eq!(e.origin, Origin::Override("s.n=-1".into()));
        assert!(e.to_string().starts_with("--set s.n=-1"), "{e}");
        std::fs::write(&file, "[s]\nn = \"x\"\n")?;
        let e = load_section::<Section>(&file, "s", &[])
            .err()
            .ok_or("accepted")?;
        assert_eq!((e.key.as_str(), &e.origin), ("s.n", &Origin::File));
        let e = load_section::<Section>(&file, "t", &[])
            .err()
            .ok_or("accepted")?;
        assert!(e.reason.contains("missing section"), "{e}");
        Ok(())
    }
}
