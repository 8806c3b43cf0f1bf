//! The built sets: one [`Record`] per example, stored as Parquet (through polars) with a
//! fixed schema per [`SetKind`], and exported to or imported from JSONL with the same fields.
//!
//! # Schema
//!
//! Every set has these columns, in this order:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `id` | string | stable id, unique in the set |
//! | `source` | string | the source's name (`task` for the downstream task) |
//! | `split` | string | `train`, `attack`, `eval` or `test` |
//! | `category` | string | the source's category, or empty |
//! | `prompt` | string | the user's message, as written |
//! | `prompt_ids` | list\<u32\> | the chat-template rendering up to the assistant's turn, tokenized |
//! | `prompt_tokens` | u32 | its length |
//!
//! then `answer` (string, the exact answer; task sets only), then for each response `r` of
//! the set ([`SetKind::responses`]): `r` (string), `r_ids` (list\<u32\>: the assistant's turn,
//! ending with the end-of-turn token when the response ended), `r_tokens` (u32).
//! The loss mask of a response is implied: [`Record::sequence`] concatenates
//! `prompt_ids ++ r_ids` and marks the response positions.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use antibody_base::Example;
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::source::json_type;

/// The sets a build produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetKind {
    /// `D_adv`: harmful prompt, harmful response `y_h`, refusal `y_ref`.
    HarmfulTrain,
    /// The attacker's harmful fine-tuning data: prompt, `y_h` (never used for hardening).
    HarmfulAttack,
    /// Held-out harmful prompts (HarmBench and a hash-held-out slice).
    HarmfulEval,
    /// `D_harmless`: harmless prompt, preferred `y_c`, dispreferred `y_r`.
    HarmlessTrain,
    /// Held-out harmless pairs (over-refusal, perplexity, DPO win rate).
    HarmlessEval,
    /// Benign look-alike prompts (over-refusal only).
    LookalikeEval,
    /// The training half of the look-alikes (split by template from the evaluation half; the
    /// method's harmless phase may read it; empty when the look-alikes are evaluation-only).
    LookalikeTrain,
    /// Downstream task, training problems (`y` = target answer).
    TaskTrain,
    /// Downstream task, test problems.
    TaskTest,
}

impl SetKind {
    /// Every set, in build order.
    pub const ALL: [Self; 9] = [
        Self::HarmfulTrain,
        Self::HarmfulAttack,
        Self::HarmfulEval,
        Self::HarmlessTrain,
        Self::HarmlessEval,
        Self::LookalikeEval,
        Self::LookalikeTrain,
        Self::TaskTrain,
        Self::TaskTest,
    ];

    /// The set's name (and file stem).
    pub fn name(self) -> &'static str {
        match self {
            Self::HarmfulTrain => "harmful_train",
            Self::HarmfulAttack => "harmful_attack",
            Self::HarmfulEval => "harmful_eval",
            Self::HarmlessTrain => "harmless_train",
            Self::HarmlessEval => "harmless_eval",
            Self::LookalikeEval => "lookalike_eval",
            Self::LookalikeTrain => "lookalike_train",
            Self::TaskTrain => "task_train",
            Self::TaskTest => "task_test",
        }
    }

    /// The set named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The Parquet file name.
    pub fn file_name(self) -> String {
        format!("{}.parquet", self.name())
    }

    /// The responses each record carries.
    pub fn responses(self) -> &'static [&'static str] {
        match self {
            Self::HarmfulTrain => &["y_h", "y_ref"],
            Self::HarmfulAttack => &["y_h"],
            Self::HarmlessTrain | Self::HarmlessEval => &["y_c", "y_r"],
            Self::TaskTrain | Self::TaskTest => &["y"],
            Self::HarmfulEval | Self::LookalikeEval | Self::LookalikeTrain => &[],
        }
    }

    /// Whether records carry an exact `answer`.
    pub fn has_answer(self) -> bool {
        matches!(self, Self::TaskTrain | Self::TaskTest)
    }

    /// Whether the set may be trained on (evaluation sets never are).
    pub fn is_training(self) -> bool {
        matches!(
            self,
            Self::HarmfulTrain
                | Self::HarmfulAttack
                | Self::HarmlessTrain
                | Self::LookalikeTrain
                | Self::TaskTrain
        )
    }

    /// The columns, in order.
    pub fn columns(self) -> Vec<(String, ColumnType)> {
        let mut cols: Vec<(String, ColumnType)> = vec![
            ("id".into(), ColumnType::Str),
            ("source".into(), ColumnType::Str),
            ("split".into(), ColumnType::Str),
            ("category".into(), ColumnType::Str),
            ("prompt".into(), ColumnType::Str),
            ("prompt_ids".into(), ColumnType::Ids),
            ("prompt_tokens".into(), ColumnType::Count),
        ];
        if self.has_answer() {
            cols.push(("answer".into(), ColumnType::Str));
        }
        for r in self.responses() {
            cols.push(((*r).into(), ColumnType::Str));
            cols.push((format!("{r}_ids"), ColumnType::Ids));
            cols.push((format!("{r}_tokens"), ColumnType::Count));
        }
        cols
    }
}

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 string.
    Str,
    /// Token ids: list of u32.
    Ids,
    /// A token count: u32.
    Count,
}

impl ColumnType {
    fn dtype(self) -> DataType {
        match self {
            Self::Str => DataType::String,
            Self::Ids => DataType::List(Box::new(DataType::UInt32)),
            Self::Count => DataType::UInt32,
        }
    }
}

/// One response: its text and its token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The text.
    pub text: String,
    /// The assistant turn's token ids (with the end-of-turn token when the response ended).
    pub ids: Vec<u32>,
}

/// One example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Stable id.
    pub id: String,
    /// Source name.
    pub source: String,
    /// `train`, `attack`, `eval` or `test`.
    pub split: String,
    /// Category, or empty.
    pub category: String,
    /// The user's message.
    pub prompt: String,
    /// Rendered prompt ids (through the assistant turn's header).
    pub prompt_ids: Vec<u32>,
    /// The exact answer (task sets).
    pub answer: Option<String>,
    /// Responses by name (`y_h`, `y_ref`, `y_c`, `y_r`, `y`).
    pub responses: BTreeMap<String, Response>,
}

impl Record {
    /// The response named `name`.
    pub fn response(&self, name: &str) -> Option<&Response> {
        self.responses.get(name)
    }

    /// `prompt_ids ++ response ids` and the loss mask (true on response tokens only).
    pub fn sequence(&self, name: &str) -> Option<Example> {
        let r = self.responses.get(name)?;
        Some(Example::from_parts(&self.prompt_ids, &r.ids))
    }

    /// The longest of `prompt ++ response` over the record's responses (the prompt alone if
    /// it has none).
    pub fn max_len(&self) -> usize {
        self.prompt_ids.len()
            + self
                .responses
                .values()
                .map(|r| r.ids.len())
                .max()
                .unwrap_or(0)
    }
}

/// A set's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Which set.
    pub kind: SetKind,
    /// The records.
    pub records: Vec<Record>,
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Dataset {
    /// Checks that every record has the set's fields, and that ids are unique.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let mut ids = std::collections::HashSet::new();
        for (row, r) in self.records.iter().enumerate() {
            let err =
                |col: &str, reason: String| DataError::parquet(file, Some(col), Some(row), reason);
            if !ids.insert(r.id.as_str()) {
                return Err(err("id", format!("duplicate id `{}`", r.id)));
            }
            if r.prompt_ids.is_empty() {
                return Err(err("prompt_ids", "empty".into()));
            }
            if self.kind.has_answer() != r.answer.is_some() {
                return Err(err(
                    "answer",
                    "present where the set has none, or missing".into(),
                ));
            }
            for name in self.kind.responses() {
                if !r.responses.contains_key(*name) {
                    return Err(err(name, "missing".into()));
                }
            }
            if let Some(extra) = r
                .responses
                .keys()
                .find(|k| !self.kind.responses().contains(&k.as_str()))
            {
                return Err(err(
                    extra,
                    format!("not a response of `{}`", self.kind.name()),
                ));
            }
        }
        Ok(())
    }

    /// The records as a polars frame with the documented schema.
    pub fn to_frame(&self) -> Result<DataFrame> {
        let rs = &self.records;
        let str_col = |name: &str, f: &dyn Fn(&Record) -> String| -> Column {
            Column::new(name.into(), rs.iter().map(f).collect::<Vec<String>>())
        };
        let ids_col = |name: &str, f: &dyn Fn(&Record) -> Vec<u32>| -> Result<Column> {
            let list: ListChunked = rs
                .iter()
                .map(|r| Some(Series::new("".into(), f(r))))
                .collect();
            let series = list
                .into_series()
                .cast(&ColumnType::Ids.dtype())
                .map_err(|e| DataError::parquet("<memory>", Some(name), None, e.to_string()))?
                .with_name(name.into());
            Ok(series.into_column())
        };
        let count_col = |name: &str, f: &dyn Fn(&Record) -> u32| -> Column {
            Column::new(name.into(), rs.iter().map(f).collect::<Vec<u32>>())
        };
        let mut cols = vec![
            str_col("id", &|r| r.id.clone()),
            str_col("source", &|r| r.source.clone()),
            str_col("split", &|r| r.split.clone()),
            str_col("category", &|r| r.category.clone()),
            str_col("prompt", &|r| r.prompt.clone()),
            ids_col("prompt_ids", &|r| r.prompt_ids.clone())?,
            count_col("prompt_tokens", &|r| count(r.prompt_ids.len())),
        ];
        if self.kind.has_answer() {
            cols.push(str_col("answer", &|r| r.answer.clone().unwrap_or_default()));
        }
        for name in self.kind.responses() {
            let get = |r: &Record| r.responses.get(*name).cloned();
            cols.push(str_col(name, &|r| {
                get(r).map(|x| x.text).unwrap_or_default()
            }));
            cols.push(ids_col(&format!("{name}_ids"), &|r| {
                get(r).map(|x| x.ids).unwrap_or_default()
            })?);
            cols.push(count_col(&format!("{name}_tokens"), &|r| {
                count(get(r).map(|x| x.ids.len()).unwrap_or(0))
            }));
        }
        DataFrame::new(rs.len(), cols)
            .map_err(|e| DataError::parquet("<memory>", None, None, e.to_string()))
    }

    /// Reads a frame, checking it has exactly the set's schema.
    pub fn from_frame(kind: SetKind, df: &DataFrame, file: &Path) -> Result<Self> {
        let expected = kind.columns();
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        for (name, ty) in &expected {
            let col = df.column(name).map_err(|_| {
                DataError::parquet(
                    file,
                    Some(name),
                    None,
                    format!(
                        "missing (a `{}` file has columns {:?})",
                        kind.name(),
                        kind.columns()
                            .iter()
                            .map(|c| c.0.clone())
                            .collect::<Vec<_>>()
                    ),
                )
            })?;
            if col.dtype() != &ty.dtype() {
                return Err(DataError::parquet(
                    file,
                    Some(name),
                    None,
                    format!("has type {}, expected {}", col.dtype(), ty.dtype()),
                ));
            }
        }
        if let Some(extra) = names
            .iter()
            .find(|n| !expected.iter().any(|(e, _)| e == *n))
        {
            return Err(DataError::parquet(
                file,
                Some(extra),
                None,
                format!("unexpected column in a `{}` file", kind.name()),
            ));
        }
        let strs = |name: &str| -> Result<Vec<String>> {
            let ca = df
                .column(name)
                .and_then(|c| c.str().cloned())
                .map_err(|e| DataError::parquet(file, Some(name), None, e.to_string()))?;
            ca.iter()
                .enumerate()
                .map(|(row, v)| {
                    v.map(str::to_owned)
                        .ok_or_else(|| DataError::parquet(file, Some(name), Some(row), "null"))
                })
                .collect()
        };
        let counts = |name: &str| -> Result<Vec<u32>> {
            let ca = df
                .column(name)
                .and_then(|c| c.u32().cloned())
                .map_err(|e| DataError::parquet(file, Some(name), None, e.to_string()))?;
            ca.iter()
                .enumerate()
                .map(|(row, v)| {
                    v.ok_or_else(|| DataError::parquet(file, Some(name), Some(row), "null"))
                })
                .collect()
        };
        let ids = |name: &str| -> Result<Vec<Vec<u32>>> {
            let ca = df
                .column(name)
                .and_then(|c| c.list().cloned())
                .map_err(|e| DataError::parquet(file, Some(name), None, e.to_string()))?;
            ca.series_iter()
                .enumerate()
                .map(|(row, v)| {
                    let s =
                        v.ok_or_else(|| DataError::parquet(file, Some(name), Some(row), "null"))?;
                    let inner = s.u32().map_err(|e| {
                        DataError::parquet(file, Some(name), Some(row), e.to_string())
                    })?;
                    inner
                        .iter()
                        .map(|x| {
                            x.ok_or_else(|| {
                                DataError::parquet(file, Some(name), Some(row), "null token id")
                            })
                        })
                        .collect()
                })
                .collect()
        };
        let check_counts = |ids_name: &str, ids: &[Vec<u32>], count_name: &str| -> Result<()> {
            for (row, (i, c)) in ids.iter().zip(counts(count_name)?).enumerate() {
                if i.len() != c as usize {
                    return Err(DataError::parquet(
                        file,
                        Some(count_name),
                        Some(row),
                        format!("says {c} tokens but `{ids_name}` has {}", i.len()),
                    ));
                }
            }
            Ok(())
        };
        let id = strs("id")?;
        let source = strs("source")?;
        let split = strs("split")?;
        let category = strs("category")?;
        let prompt = strs("prompt")?;
        let prompt_ids = ids("prompt_ids")?;
        check_counts("prompt_ids", &prompt_ids, "prompt_tokens")?;
        let answer = if kind.has_answer() {
            Some(strs("answer")?)
        } else {
            None
        };
        let mut responses: Vec<(String, Vec<String>, Vec<Vec<u32>>)> = Vec::new();
        for name in kind.responses() {
            let texts = strs(name)?;
            let r_ids = ids(&format!("{name}_ids"))?;
            check_counts(&format!("{name}_ids"), &r_ids, &format!("{name}_tokens"))?;
            responses.push(((*name).to_owned(), texts, r_ids));
        }
        let mut records = Vec::with_capacity(df.height());
        for row in 0..df.height() {
            records.push(Record {
                id: id[row].clone(),
                source: source[row].clone(),
                split: split[row].clone(),
                category: category[row].clone(),
                prompt: prompt[row].clone(),
                prompt_ids: prompt_ids[row].clone(),
                answer: answer.as_ref().map(|a| a[row].clone()),
                responses: responses
                    .iter()
                    .map(|(n, t, i)| {
                        (
                            n.clone(),
                            Response {
                                text: t[row].clone(),
                                ids: i[row].clone(),
                            },
                        )
                    })
                    .collect(),
            });
        }
        let data = Self { kind, records };
        data.validate(file)?;
        Ok(data)
    }

    /// Writes the set as Parquet to `path` (not atomically: callers stage the directory).
    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let mut df = self.to_frame()?;
        let file = File::create(path).map_err(|e| DataError::io("create", path, e))?;
        ParquetWriter::new(BufWriter::new(file))
            .finish(&mut df)
            .map_err(|e| DataError::parquet(path, None, None, format!("writing: {e}")))?;
        Ok(())
    }

    /// Reads a set from a Parquet file, checking its schema.
    pub fn read_parquet(kind: SetKind, path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
        let df = ParquetReader::new(file).finish().map_err(|e| {
            DataError::parquet(
                path,
                None,
                None,
                format!("not a readable Parquet file: {e}"),
            )
        })?;
        Self::from_frame(kind, &df, path)
    }

    /// Writes one JSON object per record with the Parquet columns as fields.
    pub fn write_jsonl(&self, path: &Path) -> Result<()> {
        let file = File::create(path).map_err(|e| DataError::io("create", path, e))?;
        let mut w = BufWriter::new(file);
        for r in &self.records {
            let mut obj = serde_json::Map::new();
            obj.insert("id".into(), r.id.clone().into());
            obj.insert("source".into(), r.source.clone().into());
            obj.insert("split".into(), r.split.clone().into());
            obj.insert("category".into(), r.category.clone().into());
            obj.insert("prompt".into(), r.prompt.clone().into());
            obj.insert("prompt_ids".into(), r.prompt_ids.clone().into());
            obj.insert("prompt_tokens".into(), r.prompt_ids.len().into());
            if let Some(a) = &r.answer {
                obj.insert("answer".into(), a.clone().into());
            }
            for (name, resp) in &r.responses {
                obj.insert(name.clone(), resp.text.clone().into());
                obj.insert(format!("{name}_ids"), resp.ids.clone().into());
                obj.insert(format!("{name}_tokens"), resp.ids.len().into());
            }
            let line = serde_json::to_string(&obj)
                .map_err(|e| DataError::parquet(path, None, None, e.to_string()))?;
            writeln!(w, "{line}").map_err(|e| DataError::io("write", path, e))?;
        }
        w.flush().map_err(|e| DataError::io("write", path, e))
    }

    /// Reads records written by [`Dataset::write_jsonl`] (or by hand, with the same fields);
    /// every error names the line and the field.
    pub fn read_jsonl(kind: SetKind, path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
        let mut records = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line_no = i + 1;
            let line = line.map_err(|e| DataError::io("read", path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| DataError::row(path, line_no, None, format!("not valid JSON: {e}")))?;
            let obj = value
                .as_object()
                .ok_or_else(|| DataError::row(path, line_no, None, "expected a JSON object"))?;
            let known: Vec<String> = kind.columns().into_iter().map(|c| c.0).collect();
            if let Some(k) = obj.keys().find(|k| !known.contains(k)) {
                return Err(DataError::row(
                    path,
                    line_no,
                    Some(k),
                    format!("unknown field for `{}`", kind.name()),
                ));
            }
            let string = |name: &str| -> Result<String> {
                match obj.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(v) => Err(DataError::row(
                        path,
                        line_no,
                        Some(name),
                        format!("expected a string, found {}", json_type(v)),
                    )),
                    None => Err(DataError::row(path, line_no, Some(name), "missing")),
                }
            };
            let id_list = |name: &str| -> Result<Vec<u32>> {
                let bad = |why: String| DataError::row(path, line_no, Some(name), why);
                match obj.get(name) {
                    Some(serde_json::Value::Array(xs)) => xs
                        .iter()
                        .map(|x| {
                            x.as_u64()
                                .and_then(|v| u32::try_from(v).ok())
                                .ok_or_else(|| bad(format!("expected token ids (u32), found {x}")))
                        })
                        .collect(),
                    Some(v) => Err(bad(format!(
                        "expected an array of token ids, found {}",
                        json_type(v)
                    ))),
                    None => Err(bad("missing".into())),
                }
            };
            let check_count = |name: &str, n: usize| -> Result<()> {
                match obj.get(name) {
                    None => Ok(()),
                    Some(v) if v.as_u64() == Some(n as u64) => Ok(()),
                    Some(v) => Err(DataError::row(
                        path,
                        line_no,
                        Some(name),
                        format!("is {v}, but the ids have {n} tokens"),
                    )),
                }
            };
            let prompt_ids = id_list("prompt_ids")?;
            check_count("prompt_tokens", prompt_ids.len())?;
            let mut responses = BTreeMap::new();
            for name in kind.responses() {
                let ids = id_list(&format!("{name}_ids"))?;
                check_count(&format!("{name}_tokens"), ids.len())?;
                responses.insert(
                    (*name).to_owned(),
                    Response {
                        text: string(name)?,
                        ids,
                    },
                );
            }
            records.push(Record {
                id: string("id")?,
                source: string("source")?,
                split: string("split")?,
                category: match obj.get("category") {
                    None => String::new(),
                    Some(_) => string("category")?,
                },
                prompt: string("prompt")?,
                prompt_ids,
                answer: if kind.has_answer() {
                    Some(string("answer")?)
                } else {
                    None
                },
                responses,
            });
        }
        if records.is_empty() {
            return Err(DataError::EmptySet {
                set: path.display().to_string(),
                why: "the file has no rows".into(),
            });
        }
        let data = Self { kind, records };
        data.validate(path)?;
        Ok(data)
    }

    /// Every token id (prompt and responses) is below `vocab_size`; an error names the file,
    /// the row (1-based, as a JSONL line) and the field.
    pub fn check_vocabulary(&self, file: &Path, vocab_size: usize) -> Result<()> {
        for (row, r) in self.records.iter().enumerate() {
            let fields = std::iter::once(("prompt_ids", &r.prompt_ids))
                .chain(r.responses.iter().map(|(k, v)| (k.as_str(), &v.ids)));
            for (field, ids) in fields {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(DataError::row(
                        file,
                        row + 1,
                        Some(field),
                        format!("token id {bad} is outside the vocabulary (size {vocab_size})"),
                    ));
                }
            }
        }
        Ok(())
    }
}
