//! antibody-eval: does the hardening hold?
//!
//! For every model of the comparison (base, harmful teacher, refusal-SFT baseline, hardened
//! student, …) on the held-out sets of a data build — every prompt by default, else a seeded
//! sample stratified by source and category:
//!
//! - **HS**, the harmful score: the share of held-out harmful prompts whose greedy answer the
//!   three-verdict judge calls *complied* ([`antibody_judge::ResponseJudge`]; fluency and
//!   relevance read by a scorer model, [`answers::Scorer`]), with the *degenerate* share beside
//!   it (never counted as harmful), GCG's keyword judge as its own column, per source and per
//!   category, each with its Wilson 95% interval and n;
//! - **post-attack HS** after each configured fine-tuning attack on a copy of the model (a
//!   grid of learning rates × steps of harmful SFT, a benign fine-tune with a share of harmful
//!   data), and the **worst case** over the attacks that leave the model fluent (degenerate
//!   share ≤ `max_degenerate`) — the headline number;
//! - **FA**: accuracy on the downstream task's test problems after benign fine-tuning;
//! - **over-refusal**: refusals of benign look-alikes (per category) and of plain harmless
//!   prompts;
//! - **capability**: perplexity of every held-out helpful answer `y_c`, and the DPO win rate
//!   on held-out harmless pairs against the first model.
//!
//! [`evaluate`] writes one result file per model (`models/<name>.json`, atomically, keyed by
//! the model's identity, the data build and the settings) and skips models whose result is
//! current, so an interrupted evaluation resumes. The report (`report.md`, `report.json`,
//! the plots, paired differences between models) is `antibody-report`'s.
//!
//! [`probe`] (`antibody-eval probe`) asks how far a model's own residual stream separates
//! harmful prompts from benign look-alikes: the best case of a refusal rule that reads it.

pub mod answers;
pub mod config;
pub mod judge;
mod model;
pub mod probe;
pub mod result;

use std::path::Path;

use antibody_base::Example;
use antibody_base::stats::stratified_sample;
use antibody_data::{Manifest, Record, SetKind, read_set};
use antibody_model::{Llama, ModelSpec, ModelSpecExt as _};
use burn::tensor::backend::{AutodiffBackend, Backend};
use sha2::{Digest, Sha256};

pub use answers::{JudgedAnswer, SetResult};
pub use config::{AttackConfig, Eval, EvalConfig};
pub use model::{Context, attack_examples, evaluate_model};
pub use result::{AttackResult, ModelResult, WorstCase};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Data.
    #[error(transparent)]
    Data(#[from] antibody_data::DataError),
    /// A model.
    #[error(transparent)]
    Model(#[from] antibody_model::ModelError),
    /// An attack or fine-tune.
    #[error(transparent)]
    Finetune(#[from] antibody_finetune::FinetuneError),
    /// Files.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What happened.
        reason: String,
    },
}

pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The held-out sets, as the evaluation uses them.
#[derive(Debug, Clone)]
pub struct EvalData {
    /// Harmful prompts.
    pub harmful: Vec<Record>,
    /// The harmful prompts of post-attack HS (all of `harmful`, or a stratified sample).
    pub attack_eval: Vec<Record>,
    /// Benign look-alikes.
    pub lookalike: Vec<Record>,
    /// Harmless prompts with `y_c`/`y_r`.
    pub harmless: Vec<Record>,
    /// The attacker's `(x, y_h)`.
    pub attack: Vec<Example>,
    /// Task training examples.
    pub task_train: Vec<Example>,
    /// Task test problems.
    pub task_test: Vec<Record>,
    /// The data build's inputs hash.
    pub inputs_hash: String,
}

/// All of `records` when `n` is 0, else a seeded sample of `n` stratified by source and
/// category, in the set's order.
pub fn sample(records: Vec<Record>, n: usize, seed: u64) -> Vec<Record> {
    let strata: Vec<String> = records
        .iter()
        .map(|r| format!("{}/{}", r.source, r.category))
        .collect();
    let keep = stratified_sample(&strata, n, seed);
    let mut records: Vec<Option<Record>> = records.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| records[i].take()).collect()
}

impl EvalData {
    /// Reads a data build.
    pub fn load(dir: &Path, c: &EvalConfig) -> Result<Self, EvalError> {
        let missing = |reason: String| EvalError::Io {
            path: dir
                .join(SetKind::HarmfulEval.file_name())
                .display()
                .to_string(),
            reason,
        };
        let mut harmful = read_set(dir, SetKind::HarmfulEval)?.records;
        if !c.harmful_sources.is_empty() {
            harmful.retain(|r| c.harmful_sources.contains(&r.source));
            if let Some(s) = c
                .harmful_sources
                .iter()
                .find(|s| !harmful.iter().any(|r| &r.source == *s))
            {
                return Err(missing(format!(
                    "no prompt from source `{s}` (eval.harmful_sources)"
                )));
            }
        }
        let harmful = sample(harmful, c.harmful_prompts, c.seed);
        let mut attack_eval = harmful.clone();
        if !c.attack_sources.is_empty() {
            attack_eval.retain(|r| c.attack_sources.contains(&r.source));
            if attack_eval.is_empty() {
                return Err(missing(format!(
                    "no HS prompt from eval.attack_sources {:?}",
                    c.attack_sources
                )));
            }
        }
        let attack_eval = sample(attack_eval, c.attack_prompts, c.seed ^ 0xA77A);
        let manifest = Manifest::read(&dir.join(Manifest::FILE))?;
        Ok(Self {
            harmful,
            attack_eval,
            lookalike: sample(
                read_set(dir, SetKind::LookalikeEval)?.records,
                c.lookalike_prompts,
                c.seed,
            ),
            harmless: sample(
                read_set(dir, SetKind::HarmlessEval)?.records,
                c.harmless_prompts,
                c.seed,
            ),
            attack: read_set(dir, SetKind::HarmfulAttack)?
                .records
                .iter()
                .filter_map(|r| r.sequence("y_h"))
                .collect(),
            task_train: read_set(dir, SetKind::TaskTrain)?
                .records
                .iter()
                .filter_map(|r| r.sequence("y"))
                .collect(),
            task_test: read_set(dir, SetKind::TaskTest)?.records,
            inputs_hash: manifest.inputs_hash,
        })
    }
}

/// `ŝ(y|x)` per sequence ([`antibody_finetune::sequence_logprobs`]) and the counted
/// response tokens.
pub fn sequence_logprobs<B: Backend>(
    model: &Llama<B>,
    seqs: &[Example],
    batch: usize,
) -> Result<(Vec<f32>, usize), EvalError> {
    let values = antibody_finetune::sequence_logprobs(model, seqs, batch, 8192)?;
    // A response token counts when it has a predecessor (as in `NextTokenTargets`).
    let count = seqs
        .iter()
        .map(|e| e.response_mask.iter().skip(1).filter(|&&x| x).count())
        .sum();
    Ok((values, count))
}

/// The key a model's result is current for: the model's content, the reference model's (the
/// DPO win rate is measured against it; `None` for the reference itself), the data and every
/// setting that changes an answer — never where the results are written, which other models
/// share the table (so a sweep's runs share their reference models' results), nor the judges'
/// settings (stored answers are judged again, [`ModelResult::rejudged`]).
pub fn result_key(
    spec: &ModelSpec,
    reference: Option<&ModelSpec>,
    scorer: Option<&ModelSpec>,
    data: &EvalData,
    c: &EvalConfig,
) -> Result<String, EvalError> {
    // What is measured, without where results go or how stored answers are judged. The
    // judges' sections are removed from the serialized settings rather than reset to their
    // defaults, so a new judge setting (a new field, a new default) never invalidates stored
    // answers: they are judged again under the configured judges.
    let mut settings = serde_json::to_value(c).map_err(|e| io(Path::new("."), e))?;
    if let Some(map) = settings.as_object_mut() {
        for field in [
            "out_dir",
            "models",
            "samples",
            "train_run",
            "judge",
            "keyword",
            "max_degenerate",
        ] {
            map.remove(field);
        }
    }
    let mut h = Sha256::new();
    h.update(spec.identity()?.as_bytes());
    if let Some(dtype) = antibody_model::DTypeSpec::process_key() {
        h.update(format!("|dtype:{dtype}").as_bytes());
    }
    if let Some(r) = reference {
        h.update(b"|reference:");
        h.update(r.identity()?.as_bytes());
    }
    if let Some(s) = scorer {
        h.update(b"|scorer:");
        h.update(s.identity()?.as_bytes());
    }
    h.update(data.inputs_hash.as_bytes());
    h.update(settings.to_string().as_bytes());
    Ok(format!("{:x}", h.finalize()))
}

/// Evaluates every configured model (skipping those whose result file is current) and
/// returns the results in configuration order.
pub fn evaluate<B: AutodiffBackend>(
    eval: &Eval,
    data_dir: &Path,
    device: &B::Device,
) -> Result<Vec<ModelResult>, EvalError> {
    let c = &eval.config;
    let _lock = antibody_base::DirLock::acquire(&eval.out_dir, "antibody-eval run")
        .map_err(|e| io(&eval.out_dir, e))?;
    let data = EvalData::load(data_dir, c)?;
    let dir = eval.out_dir.join("models");
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let model_judge = match &c.model_judge {
        Some(j) => {
            let spec: ModelSpec = j
                .model
                .parse::<ModelSpec>()
                .map_err(antibody_model::ModelError::from)?
                .resolved_against(eval.file.parent().unwrap_or(Path::new(".")));
            let loaded = spec.load::<B::InnerBackend>(device)?;
            Some(judge::ModelJudge::with_rubric(
                loaded.model,
                loaded.tokenizer,
                j,
            )?)
        }
        None => None,
    };
    let scorer = match &eval.scorer {
        Some(spec) => {
            tracing::info!("scorer: {spec}");
            let loaded = spec.load::<B::InnerBackend>(device)?;
            Some(answers::Scorer::new(
                loaded.model,
                loaded.tokenizer,
                c.batch_size,
            ))
        }
        None => None,
    };
    let ctx = Context::<B> {
        data: &data,
        config: c,
        scorer: scorer.as_ref(),
        model_judge: model_judge.as_ref(),
        device,
    };
    let shared = antibody_base::cache_root().join("eval");
    let reference_spec = eval.models.first().map(|(_, s)| s.clone());
    let mut results: Vec<ModelResult> = Vec::new();
    for (i, (name, spec)) in eval.models.iter().enumerate() {
        let path = dir.join(format!("{name}.json"));
        let reference = if i == 0 {
            None
        } else {
            reference_spec.as_ref()
        };
        let key = result_key(spec, reference, eval.scorer.as_ref(), &data, c)?;
        let shared_path = shared.join(format!("{key}.json"));
        tracing::debug!("{name}: result key {key}");
        let read = |p: &Path| {
            std::fs::read(p)
                .ok()
                .and_then(|b| serde_json::from_slice::<ModelResult>(&b).ok())
                .filter(|r| r.key == key)
                .map(|r| (r.rejudged(c), r))
        };
        // `write_bytes` creates the parent directories.
        let write = |p: &Path, r: &ModelResult| -> Result<(), EvalError> {
            let bytes = serde_json::to_vec_pretty(r).map_err(|e| io(p, e))?;
            antibody_base::atomic::write_bytes(p, &bytes)
                .map_err(|e| io(p, antibody_base::atomic::describe(&e)))
        };
        let result = if let Some((r, stored)) = read(&path) {
            tracing::info!("{name}: result is current ({}), skipped", path.display());
            if r != stored {
                tracing::info!("{name}: judged again under the configured judges");
                write(&path, &r)?;
            }
            r
        } else if let Some((mut r, _)) = read(&shared_path) {
            // The same weights under the same data and settings were evaluated before
            // (another run of a sweep): the numbers are reused, the names are this run's.
            tracing::info!(
                "{name}: the same model was evaluated under the same settings ({}), reused",
                shared_path.display()
            );
            r.name = name.clone();
            r.model = spec.to_string();
            write(&path, &r)?;
            r
        } else {
            let reference = results.first().map(|r| r.pair_logps.clone());
            let r = evaluate_model::<B>(&ctx, name, spec, key.clone(), reference.as_ref())?;
            write(&path, &r)?;
            write(&shared_path, &r)?;
            tracing::info!(
                "{name}: HS {}, degenerate {}, look-alike refusals {}, perplexity {:.2} ({:.0} s)",
                r.hs().display_percent(),
                r.harmful.degenerate.display_percent(),
                r.lookalike.refused.display_percent(),
                r.perplexity,
                r.seconds
            );
            r
        };
        results.push(result);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn data() -> EvalData {
        EvalData {
            harmful: Vec::new(),
            attack_eval: Vec::new(),
            lookalike: Vec::new(),
            harmless: Vec::new(),
            attack: Vec::new(),
            task_train: Vec::new(),
            task_test: Vec::new(),
            inputs_hash: "inputs".into(),
        }
    }

    fn config(extra: &str) -> EvalConfig {
        toml::from_str(&format!("out_dir = \"runs/a\"\nmodels = []\n{extra}"))
            .expect("a minimal section")
    }

    #[test]
    fn result_key_ignores_where_results_go_but_not_what_is_measured() {
        let spec = ModelSpec::Tiny { seed: 0 };
        let key = |c: &EvalConfig| result_key(&spec, None, None, &data(), c).expect("a key");
        let a = config("");
        let mut moved = a.clone();
        moved.out_dir = PathBuf::from("runs/search/other/eval");
        moved.train_run = Some(PathBuf::from("runs/search/other/train"));
        moved.samples += 3;
        assert_eq!(
            key(&a),
            key(&moved),
            "the output place is not part of the key"
        );
        assert_ne!(key(&a), key(&config("max_new_tokens = 7")));
        // The judges' settings are not: stored answers are judged again.
        assert_eq!(
            key(&a),
            key(&config(
                "max_degenerate = 0.5\n[judge]\nmin_relevance = 0.3\n[keyword]\ngcg_markers = false"
            ))
        );
        let other = ModelSpec::Tiny { seed: 1 };
        assert_ne!(
            key(&a),
            result_key(&spec, Some(&other), None, &data(), &a).expect("a key"),
            "the reference model is part of the key"
        );
    }
}
