//! `antibody-data build`: sources → split → rendered, tokenized, answered sets → Parquet and
//! a manifest, staged in a temporary directory and swapped into place only when complete.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use antibody_fetch::Cache;
use antibody_judge::KeywordJudge;
use antibody_model::{
    ChatMessage, Generated, GenerationConfig, Llama, ModelSpecExt as _, Tokenizer,
    balanced_batch_size, generate,
};
use burn::tensor::backend::Backend;
use sha2::{Digest, Sha256};

use crate::config::{Config, SourceKind, hex};
use crate::error::{DataError, Result};
use crate::gencache::GenCache;
use crate::manifest::{
    GenerationRecord, Manifest, ModelRecord, PhrasingRecord, SetRecord, SourceRecord,
};
use crate::source::{Row, locate, read_rows};
use crate::split::{Pools, cap, normalize, pick, split};
use crate::store::{Dataset, Record, Response, SetKind};
use crate::task;

/// Options that are not part of the configuration (they do not change what is built).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Rebuild even when the manifest says the outputs are current, and replace a build made
    /// from other inputs.
    pub force: bool,
    /// Replace a build made from other inputs (the pipeline's choice: its stamps decide);
    /// without it or `force`, such a build is refused, naming what differs.
    pub replace: bool,
    /// Where fetched sources live.
    pub cache: Cache,
    /// Where generated responses are kept between builds ([`GenCache`]).
    pub generations: PathBuf,
}

impl Default for BuildOptions {
    fn default() -> Self {
        let cache = Cache::from_env();
        let generations = cache.root().join("generations");
        Self {
            force: false,
            replace: false,
            cache,
            generations,
        }
    }
}

/// What a build did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The sets were built and swapped into place.
    Built(Manifest),
    /// The outputs were complete and built from the same inputs: nothing was done.
    UpToDate(Manifest),
}

impl Outcome {
    /// The manifest of the sets now in place.
    pub fn manifest(&self) -> &Manifest {
        match self {
            Self::Built(m) | Self::UpToDate(m) => m,
        }
    }
}

/// A source's rows with what the manifest records of it.
struct Loaded {
    record: SourceRecord,
    kind: SourceKind,
    rows: Vec<Row>,
}

/// Fetches and verifies every enabled source, and reads its rows.
fn load_sources(
    config: &Config,
    cache: &Cache,
) -> Result<Vec<(crate::config::SourceConfig, Loaded)>> {
    let mut out = Vec::new();
    for s in config.enabled_sources() {
        let located = locate(s, cache)?;
        let rows = read_rows(s, &located.path)?;
        if rows.is_empty() {
            return Err(DataError::EmptySet {
                set: format!("source `{}`", s.config.name),
                why: format!("{} has no rows", located.path.display()),
            });
        }
        let record = SourceRecord {
            name: s.config.name.clone(),
            kind: s.config.kind,
            role: s.config.is_prompt_source().then(|| s.config.role()),
            origin: s.config.origin(),
            license: s.config.license.clone(),
            sha256: located.sha256,
            rows: rows.len(),
            duplicates: 0,
            paraphrases: 0,
        };
        out.push((
            s.config.clone(),
            Loaded {
                record,
                kind: s.config.kind,
                rows,
            },
        ));
    }
    Ok(out)
}

/// SHA-256 of everything that determines the outputs.
fn inputs_hash(
    config_hash: &str,
    sources: &[SourceRecord],
    models: &BTreeMap<String, ModelRecord>,
) -> String {
    let mut json = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "format": Manifest::FORMAT,
        "config": config_hash,
        "sources": sources.iter().map(|s| (&s.name, &s.sha256)).collect::<Vec<_>>(),
        "models": models,
    });
    with_dtype(&mut json);
    hex(&Sha256::digest(json.to_string().as_bytes()))
}

/// What differs between the inputs of the build in place and this one's.
fn changed_inputs(
    old: &Manifest,
    config_hash: &str,
    sources: &[SourceRecord],
    models: &BTreeMap<String, ModelRecord>,
) -> String {
    let mut what = Vec::new();
    if old.config_hash != config_hash {
        what.push("the [data] section or its sources table".to_owned());
    }
    for (role, m) in models {
        if old.models.get(role).map(|o| &o.identity) != Some(&m.identity) {
            what.push(format!("the {role} model ({})", m.spec));
        }
    }
    for s in sources {
        if !old
            .sources
            .iter()
            .any(|o| o.name == s.name && o.sha256 == s.sha256)
        {
            what.push(format!("source `{}`", s.name));
        }
    }
    if what.is_empty() {
        what.push(format!(
            "the format or version (built by {})",
            old.antibody_data_version
        ));
    }
    what.join(", ")
}

/// Whether `manifest` (of `out_dir`) is a complete build from `inputs`.
fn current(out_dir: &Path, manifest: &Manifest, inputs: &str) -> bool {
    manifest.inputs_hash == inputs
        && manifest.sets.values().all(|set| {
            antibody_fetch::sha256_file(out_dir.join(&set.file)).is_ok_and(|d| d == set.sha256)
        })
}

/// Builds the sets `config` describes into `config.out_dir` with models on `device`: the
/// sources are read ([`load_sources`]), the refusal phrasings filtered ([`phrasings`]), the
/// prompts split and capped ([`pools`]), the responses generated and written
/// ([`answer_sets`], [`task_sets`]), every set checked, and the build staged and swapped in
/// whole ([`write_build`]).
pub fn build<B: Backend>(
    config: &Config,
    options: &BuildOptions,
    device: &B::Device,
) -> Result<Outcome> {
    let started = Instant::now();
    let d = &config.data;
    if config.out_dir.exists() && !config.out_dir.is_dir() {
        return Err(DataError::config(
            &config.file,
            "data.out_dir",
            format!("{} exists and is not a directory", config.out_dir.display()),
        ));
    }
    let _lock = antibody_base::DirLock::acquire(&config.out_dir, "antibody-data build")?;
    let sources = load_sources(config, &options.cache)?;
    let models = model_records(config)?;
    let config_hash = config.hash();
    let records: Vec<SourceRecord> = sources.iter().map(|(_, l)| l.record.clone()).collect();
    let inputs = inputs_hash(&config_hash, &records, &models);
    let old = Manifest::read(&config.out_dir.join(Manifest::FILE)).ok();
    if !options.force
        && let Some(manifest) = old
            .as_ref()
            .filter(|m| current(&config.out_dir, m, &inputs))
    {
        tracing::info!(
            "{}: up to date (inputs {})",
            config.out_dir.display(),
            &inputs[..12]
        );
        return Ok(Outcome::UpToDate(manifest.clone()));
    }
    if !(options.force || options.replace)
        && let Some(old) = &old
        && old.inputs_hash != inputs
    {
        return Err(DataError::Replace {
            dir: config.out_dir.clone(),
            what: changed_inputs(old, &config_hash, &records, &models),
        });
    }
    let judge = KeywordJudge::from_config(&d.judge);
    let mut phrasings = phrasings(&sources, &judge, d.disjoint_phrasings)?;
    let (pools, source_records) = pools(config, &sources, records);

    // Models: one load when both roles name the same model.
    let harmful = config.harmful_model.load::<B>(device)?;
    let helpful = if config.helpful_model == config.harmful_model {
        None
    } else {
        Some(config.helpful_model.load::<B>(device)?)
    };
    let tok = &harmful.tokenizer;
    if let Some(h) = &helpful {
        same_vocabulary(config, tok, &h.tokenizer)?;
    }
    let generators = Generators {
        harmful: &harmful.model,
        helpful: helpful.as_ref().map_or(&harmful.model, |h| &h.model),
        harmful_key: gen_key(
            &models["harmful"].identity,
            &GenerationConfig::greedy(d.generation.max_new_tokens),
            tok,
        )?,
        helpful_key: gen_key(
            &models["helpful"].identity,
            &GenerationConfig::greedy(d.generation.max_new_tokens),
            tok,
        )?,
    };
    let mut ctx = Ctx {
        tok,
        decoding: GenerationConfig::greedy(d.generation.max_new_tokens),
        batch_size: d.generation.batch_size,
        max_len: d.max_len,
        gen_stats: GenerationRecord::default(),
        dropped: BTreeMap::new(),
    };
    let (refusals, refusal_rec) = phrasings.remove(&SourceKind::Refusal).unwrap_or_default();
    let (unneeded, unneeded_rec) = phrasings
        .remove(&SourceKind::UnnecessaryRefusal)
        .unwrap_or_default();
    let written = Written {
        refusals: &refusals,
        unneeded: &unneeded,
    };
    let mut sets = answer_sets(&mut ctx, pools, &generators, written, &judge, options, d)?;
    let task_rows: Vec<(String, String, String)> = sources
        .iter()
        .filter(|(c, _)| c.kind == crate::config::SourceKind::Task)
        .flat_map(|(_, l)| {
            l.rows
                .iter()
                .map(|r| (r.id.clone(), r.category.clone(), r.text.clone()))
        })
        .collect();
    sets.extend(task_sets(
        &mut ctx,
        d.seed,
        &task_rows,
        d.task.train,
        d.task.test,
    )?);
    check_no_leak(&sets)?;
    check_nonempty(&sets, &ctx.dropped)?;
    let manifest = Manifest {
        format: Manifest::FORMAT,
        antibody_data_version: env!("CARGO_PKG_VERSION").into(),
        config_file: config.file.display().to_string(),
        config_hash,
        inputs_hash: inputs,
        seed: d.seed,
        max_len: d.max_len,
        models,
        sources: source_records,
        refusal_phrasings: refusal_rec,
        unnecessary_refusal_phrasings: unneeded_rec,
        judge_markers: judge.markers().len(),
        sets: BTreeMap::new(),
        generation: std::mem::take(&mut ctx.gen_stats),
        wall_time_s: 0.0,
    };
    write_build(&config.out_dir, sets, &mut ctx.dropped, manifest, started).map(Outcome::Built)
}

/// The answering models, named and identified by content.
fn model_records(config: &Config) -> Result<BTreeMap<String, ModelRecord>> {
    let mut models = BTreeMap::new();
    for (role, spec) in [
        ("harmful", &config.harmful_model),
        ("helpful", &config.helpful_model),
    ] {
        let record = ModelRecord {
            spec: spec.to_string(),
            identity: spec.identity()?,
        };
        models.insert(role.to_owned(), record);
    }
    Ok(models)
}

/// Both answering models must share one tokenizer.
fn same_vocabulary(config: &Config, harmful: &Tokenizer, helpful: &Tokenizer) -> Result<()> {
    if helpful.vocab_size() == harmful.vocab_size() {
        return Ok(());
    }
    Err(DataError::config(
        &config.file,
        "data.generation.helpful_model",
        format!(
            "its vocabulary ({} tokens) differs from the harmful model's ({}): both must share one tokenizer",
            helpful.vocab_size(),
            harmful.vocab_size()
        ),
    ))
}

/// Every set must keep rows: an empty one would leave nothing to train or evaluate on.
fn check_nonempty(
    sets: &BTreeMap<SetKind, Vec<Record>>,
    dropped: &BTreeMap<SetKind, BTreeMap<String, usize>>,
) -> Result<()> {
    // The look-alikes' training half exists only where a look-alike source has the
    // training role.
    for kind in SetKind::ALL
        .into_iter()
        .filter(|&k| k != SetKind::LookalikeTrain)
    {
        if sets.get(&kind).map_or(0, Vec::len) == 0 {
            let dropped = dropped.get(&kind).cloned().unwrap_or_default();
            return Err(DataError::EmptySet {
                set: kind.name().into(),
                why: format!(
                    "0 rows kept; dropped: {dropped:?} (check the sources, limits, split fractions and max_len)"
                ),
            });
        }
    }
    Ok(())
}

/// The response phrasings of each written kind, kept only where the judge recognizes them as
/// refusals: a target the evaluation judge would call compliance would teach nothing it can
/// measure.
fn phrasings(
    sources: &[(crate::config::SourceConfig, Loaded)],
    judge: &KeywordJudge,
    disjoint: bool,
) -> Result<BTreeMap<SourceKind, (Vec<String>, PhrasingRecord)>> {
    let mut phrasings = BTreeMap::new();
    let mut refusal_openings = std::collections::BTreeSet::new();
    for kind in [SourceKind::Refusal, SourceKind::UnnecessaryRefusal] {
        let mut kept = Vec::new();
        let mut rec = PhrasingRecord::default();
        for (_, l) in sources.iter().filter(|(_, l)| l.kind == kind) {
            for row in &l.rows {
                if !judge.judge(&row.text).is_refusal() {
                    rec.not_a_refusal_to_the_judge += 1;
                } else if disjoint
                    && kind == SourceKind::UnnecessaryRefusal
                    && refusal_openings.contains(&opening(&row.text))
                {
                    rec.same_opening_as_y_ref += 1;
                } else {
                    if kind == SourceKind::Refusal {
                        refusal_openings.insert(opening(&row.text));
                    }
                    kept.push(row.text.clone());
                    rec.kept += 1;
                }
            }
        }
        if kept.is_empty() {
            return Err(DataError::EmptySet {
                set: format!("{kind:?} phrasings"),
                why: format!(
                    "{} phrasing(s) read, none recognized as a refusal by the judge (add a source of kind `{}` or extend `data.judge.extra_markers`)",
                    rec.not_a_refusal_to_the_judge,
                    serde_json::to_value(kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            });
        }
        phrasings.insert(kind, (kept, rec));
    }
    Ok(phrasings)
}

/// A phrasing's opening: its first three words, lowercased, without punctuation
/// ("I'm sorry, but ..." and "i’m sorry but ..." open the same way).
pub fn opening(text: &str) -> String {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .map(|c| if c == '\u{2019}' { '\'' } else { c })
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The prompts split and deduplicated across sources (evaluation first), each set capped
/// by a seeded sample; the source records get their duplicate counts.
fn pools(
    config: &Config,
    sources: &[(crate::config::SourceConfig, Loaded)],
    mut records: Vec<SourceRecord>,
) -> (Pools, Vec<SourceRecord>) {
    let d = &config.data;
    let prompt_sources: Vec<(&crate::config::SourceConfig, &[Row])> = sources
        .iter()
        .map(|(c, l)| (c, l.rows.as_slice()))
        .collect();
    let pools = split(&prompt_sources, &d.split, d.seed);
    for r in &mut records {
        r.duplicates = pools.duplicates.get(&r.name).copied().unwrap_or(0);
        r.paraphrases = pools.paraphrases.get(&r.name).copied().unwrap_or(0);
    }
    let lim = &d.limits;
    let capped = |rows: Vec<Row>, n: usize, name: &str| cap(rows, n, d.seed, name);
    let pools = Pools {
        harmful_train: capped(pools.harmful_train, lim.harmful_train, "harmful_train"),
        harmful_attack: capped(pools.harmful_attack, lim.harmful_attack, "harmful_attack"),
        harmful_eval: capped(pools.harmful_eval, lim.harmful_eval, "harmful_eval"),
        harmless_train: capped(pools.harmless_train, lim.harmless_train, "harmless_train"),
        harmless_eval: capped(pools.harmless_eval, lim.harmless_eval, "harmless_eval"),
        lookalike_eval: capped(pools.lookalike_eval, lim.lookalike_eval, "lookalike_eval"),
        lookalike_train: capped(
            pools.lookalike_train,
            lim.lookalike_train,
            "lookalike_train",
        ),
        paraphrases: pools.paraphrases,
        duplicates: pools.duplicates,
    };
    (pools, records)
}

/// The models that answer, and their generation caches' keys.
struct Generators<'m, B: Backend> {
    harmful: &'m Llama<B>,
    helpful: &'m Llama<B>,
    harmful_key: String,
    helpful_key: String,
}

/// The project-written response phrasings.
#[derive(Clone, Copy)]
struct Written<'a> {
    refusals: &'a [String],
    unneeded: &'a [String],
}

/// The prompt sets: harmful ones with `y_h` (generated, kept where the judge says it
/// complied) and, for training, `y_ref` (written); harmless ones with `y_c` (generated, kept
/// where it is not a refusal) and `y_r` (written); the evaluation-only prompt sets.
fn answer_sets<B: Backend>(
    ctx: &mut Ctx<'_>,
    pools: Pools,
    generators: &Generators<'_, B>,
    written: Written<'_>,
    judge: &KeywordJudge,
    options: &BuildOptions,
    d: &crate::config::DataConfig,
) -> Result<BTreeMap<SetKind, Vec<Record>>> {
    let (seed, lookalike_responses) = (d.seed, d.lookalike_responses);
    let cache_dir = &options.generations;
    let mut sets: BTreeMap<SetKind, Vec<Record>> = BTreeMap::new();
    let mut harmful_cache = GenCache::open(cache_dir, &generators.harmful_key)?;
    for (kind, rows) in [
        (SetKind::HarmfulTrain, pools.harmful_train),
        (SetKind::HarmfulAttack, pools.harmful_attack),
    ] {
        let answering = Answering {
            cache: &mut harmful_cache,
            generated: "y_h",
            written: (kind == SetKind::HarmfulTrain).then_some(("y_ref", written.refusals)),
        };
        let out = ctx.answer(kind, &rows, generators.harmful, answering, judge, seed)?;
        sets.insert(kind, out);
    }
    let mut helpful_cache = GenCache::open(cache_dir, &generators.helpful_key)?;
    // With `data.lookalike_responses`, the look-alikes' training half is also answered like
    // the harmless prompts and joins `harmless_train` (its rows keep their source and
    // category); `lookalike_train` keeps the prompts either way.
    let mut harmless_train = pools.harmless_train;
    if lookalike_responses {
        harmless_train.extend(pools.lookalike_train.iter().cloned());
    }
    for (kind, rows) in [
        (SetKind::HarmlessTrain, harmless_train),
        (SetKind::HarmlessEval, pools.harmless_eval),
    ] {
        let answering = Answering {
            cache: &mut helpful_cache,
            generated: "y_c",
            written: Some(("y_r", written.unneeded)),
        };
        let out = ctx.answer(kind, &rows, generators.helpful, answering, judge, seed)?;
        sets.insert(kind, out);
    }
    for (kind, rows) in [
        (SetKind::HarmfulEval, pools.harmful_eval),
        (SetKind::LookalikeEval, pools.lookalike_eval),
        (SetKind::LookalikeTrain, pools.lookalike_train),
    ] {
        let mut out = Vec::new();
        for (_, rec) in ctx.prompts(kind, &rows)? {
            ctx.keep(kind, rec, &mut out);
        }
        sets.insert(kind, out);
    }
    Ok(sets)
}

/// The downstream task's train and test problems, with their written answers.
fn task_sets(
    ctx: &mut Ctx<'_>,
    seed: u64,
    labelled: &[(String, String, String)],
    n_train: usize,
    n_test: usize,
) -> Result<BTreeMap<SetKind, Vec<Record>>> {
    let (train, test) = if labelled.is_empty() {
        task::problems(seed, n_train, n_test)
    } else {
        task::labelled_problems(labelled, seed, n_train, n_test)
    };
    let mut sets = BTreeMap::new();
    for (kind, problems, split_name) in [
        (SetKind::TaskTrain, train, "train"),
        (SetKind::TaskTest, test, "test"),
    ] {
        let mut out = Vec::new();
        for p in problems {
            let prompt_ids = ctx.prompt_ids(&p.prompt)?;
            let y = ctx.written(&p.prompt, &p.response)?;
            let rec = Record {
                id: p.id,
                source: "task".into(),
                split: split_name.into(),
                category: p.template,
                prompt: p.prompt,
                prompt_ids,
                answer: Some(p.answer),
                responses: BTreeMap::from([("y".to_owned(), y)]),
            };
            ctx.keep(kind, rec, &mut out);
        }
        sets.insert(kind, out);
    }
    Ok(sets)
}

/// Writes every set and the manifest into a staging directory beside `out_dir`, then swaps it
/// in whole.
fn write_build(
    out_dir: &Path,
    sets: BTreeMap<SetKind, Vec<Record>>,
    dropped: &mut BTreeMap<SetKind, BTreeMap<String, usize>>,
    mut manifest: Manifest,
    started: Instant,
) -> Result<Manifest> {
    let staging = antibody_base::atomic::staging_dir(out_dir)
        .map_err(|e| DataError::io("create a staging directory beside", out_dir, e))?;
    for (kind, records) in sets {
        let data = Dataset { kind, records };
        let file = kind.file_name();
        let path = staging.path().join(&file);
        data.validate(&path)?;
        data.write_parquet(&path)?;
        manifest.sets.insert(
            kind.name().to_owned(),
            SetRecord {
                file,
                sha256: antibody_fetch::sha256_file(&path)?,
                rows: data.records.len(),
                dropped: dropped.remove(&kind).unwrap_or_default(),
            },
        );
    }
    manifest.wall_time_s = started.elapsed().as_secs_f64();
    manifest.write(&staging.path().join(Manifest::FILE))?;
    antibody_base::atomic::replace_dir(staging, out_dir)
        .map_err(|e| DataError::io("move the build into place at", out_dir, e))?;
    tracing::info!(
        "{}: built {} sets in {:.1} s",
        out_dir.display(),
        manifest.sets.len(),
        manifest.wall_time_s
    );
    Ok(manifest)
}

/// Proves that no evaluation prompt (normalized) is in a training set.
pub fn check_no_leak(sets: &BTreeMap<SetKind, Vec<Record>>) -> Result<()> {
    let mut train: HashMap<String, SetKind> = HashMap::new();
    for (kind, records) in sets.iter().filter(|(k, _)| k.is_training()) {
        for r in records {
            train.insert(normalize(&r.prompt), *kind);
        }
    }
    for (kind, records) in sets.iter().filter(|(k, _)| !k.is_training()) {
        for r in records {
            let n = normalize(&r.prompt);
            if let Some(t) = train.get(&n) {
                return Err(DataError::Leak {
                    prompt: n,
                    eval_set: kind.name().into(),
                    train_set: t.name().into(),
                });
            }
        }
    }
    // The attacker's data is disjoint from the defender's, too.
    let defended: HashSet<String> = sets
        .get(&SetKind::HarmfulTrain)
        .into_iter()
        .flatten()
        .map(|r| normalize(&r.prompt))
        .collect();
    if let Some(r) = sets
        .get(&SetKind::HarmfulAttack)
        .into_iter()
        .flatten()
        .find(|r| defended.contains(&normalize(&r.prompt)))
    {
        return Err(DataError::Leak {
            prompt: normalize(&r.prompt),
            eval_set: SetKind::HarmfulAttack.name().into(),
            train_set: SetKind::HarmfulTrain.name().into(),
        });
    }
    Ok(())
}

/// The generation cache key: model, decoding settings and stop tokens.
fn gen_key(identity: &str, decoding: &GenerationConfig, tok: &Tokenizer) -> Result<String> {
    let mut json = serde_json::json!({
        "model": identity,
        "max_new_tokens": decoding.max_new_tokens,
        "min_new_tokens": decoding.min_new_tokens,
        "sampling": format!("{:?}", decoding.sampling),
        "stop": tok.stop_ids(),
    });
    with_dtype(&mut json);
    Ok(hex(&Sha256::digest(json.to_string().as_bytes()))[..32].to_owned())
}

/// Adds the process's compute dtype to a hashed record ([`antibody_model::DTypeSpec::process_key`]).
fn with_dtype(json: &mut serde_json::Value) {
    if let Some(dtype) = antibody_model::DTypeSpec::process_key()
        && let Some(map) = json.as_object_mut()
    {
        map.insert("dtype".into(), dtype.to_string().into());
    }
}

/// How one set is answered: the generated response (kept only where the judge does not
/// call it a refusal) and an optional written one drawn from `phrasings` by row id.
struct Answering<'c, 'p> {
    cache: &'c mut GenCache,
    generated: &'static str,
    written: Option<(&'static str, &'p [String])>,
}

struct Ctx<'a> {
    tok: &'a Tokenizer,
    decoding: GenerationConfig,
    batch_size: usize,
    max_len: usize,
    gen_stats: GenerationRecord,
    dropped: BTreeMap<SetKind, BTreeMap<String, usize>>,
}

impl Ctx<'_> {
    fn drop(&mut self, kind: SetKind, why: &str) {
        *self
            .dropped
            .entry(kind)
            .or_default()
            .entry(why.into())
            .or_default() += 1;
    }

    /// Keeps `rec` unless its longest sequence exceeds `max_len` (then it is counted).
    fn keep(&mut self, kind: SetKind, rec: Record, out: &mut Vec<Record>) {
        if rec.max_len() > self.max_len {
            self.drop(kind, "too_long");
        } else {
            out.push(rec);
        }
    }

    fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.tok.chat_ids(&[ChatMessage::user(prompt)], true)?)
    }

    /// Renders and tokenizes each row's prompt; prompts that leave no room for a response
    /// are dropped and counted.
    fn prompts(&mut self, kind: SetKind, rows: &[Row]) -> Result<Vec<(Row, Record)>> {
        let split = match kind {
            SetKind::HarmfulTrain | SetKind::HarmlessTrain | SetKind::TaskTrain => "train",
            SetKind::HarmfulAttack => "attack",
            SetKind::TaskTest => "test",
            _ => "eval",
        };
        let mut out = Vec::new();
        for row in rows {
            let prompt_ids = self.prompt_ids(&row.text)?;
            if prompt_ids.len() >= self.max_len {
                self.drop(kind, "too_long");
                continue;
            }
            out.push((
                row.clone(),
                Record {
                    id: row.id.clone(),
                    source: row.source.clone(),
                    split: split.into(),
                    category: row.category.clone(),
                    prompt: row.text.clone(),
                    prompt_ids,
                    answer: None,
                    responses: BTreeMap::new(),
                },
            ));
        }
        Ok(out)
    }

    /// A written response's ids: the assistant turn as the chat template renders it, up to
    /// and including the end-of-turn token.
    fn written(&self, prompt: &str, text: &str) -> Result<Response> {
        let rendered_prompt = self.tok.render_chat(&[ChatMessage::user(prompt)], true)?;
        let full = self.tok.render_chat(
            &[ChatMessage::user(prompt), ChatMessage::assistant(text)],
            false,
        )?;
        let turn = full.strip_prefix(&rendered_prompt).ok_or_else(|| {
            antibody_model::ModelError::ChatTemplate(
                "the rendering of a conversation does not start with the rendering of its prompt"
                    .into(),
            )
        })?;
        let mut ids = self.tok.encode(turn)?;
        if let Some(end) = ids.iter().position(|i| self.tok.stop_ids().contains(i)) {
            ids.truncate(end + 1);
        }
        Ok(Response {
            text: text.to_owned(),
            ids,
        })
    }

    /// Answers `rows`: generated response, judge filter, written response, length filter.
    fn answer<B: Backend>(
        &mut self,
        kind: SetKind,
        rows: &[Row],
        model: &Llama<B>,
        answering: Answering<'_, '_>,
        judge: &KeywordJudge,
        seed: u64,
    ) -> Result<Vec<Record>> {
        let prompts = self.prompts(kind, rows)?;
        let answers = self.respond(model, &prompts, answering.cache, kind)?;
        let mut out = Vec::new();
        for ((row, mut rec), g) in prompts.into_iter().zip(answers) {
            let text = self.tok.decode(&g.tokens)?;
            if judge.judge(&text).is_refusal() {
                self.drop(kind, &format!("{}_refused", answering.generated));
                continue;
            }
            let generated = Response {
                text,
                ids: g.tokens,
            };
            rec.responses.insert(answering.generated.into(), generated);
            if let Some((name, phrasings)) = answering.written {
                let key = format!("{name}:{}", row.id);
                let phrasing = &phrasings[pick(seed, &key, phrasings.len())];
                rec.responses
                    .insert(name.into(), self.written(&row.text, phrasing)?);
            }
            self.keep(kind, rec, &mut out);
        }
        Ok(out)
    }

    /// Greedy responses to `prompts`, from the cache where present, else generated in
    /// length-sorted batches and appended to the cache batch by batch.
    fn respond<B: Backend>(
        &mut self,
        model: &Llama<B>,
        prompts: &[(Row, Record)],
        cache: &mut GenCache,
        kind: SetKind,
    ) -> Result<Vec<Generated>> {
        let mut todo: Vec<usize> = (0..prompts.len())
            .filter(|&i| cache.get(&prompts[i].1.prompt_ids).is_none())
            .collect();
        self.gen_stats.from_cache += prompts.len() - todo.len();
        todo.sort_by_key(|&i| prompts[i].1.prompt_ids.len());
        let batches: Vec<&[usize]> = todo
            .chunks(balanced_batch_size(todo.len(), self.batch_size))
            .collect();
        let started = Instant::now();
        let mut tokens = 0usize;
        for (b, batch) in batches.iter().enumerate() {
            let ids: Vec<Vec<u32>> = batch
                .iter()
                .map(|&i| prompts[i].1.prompt_ids.clone())
                .collect();
            let out = generate(model, &ids, self.tok.stop_ids(), &self.decoding)?;
            tokens += out.iter().map(|g| g.tokens.len()).sum::<usize>();
            let pairs: Vec<(&[u32], Generated)> = ids.iter().map(Vec::as_slice).zip(out).collect();
            cache.put(&pairs)?;
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                "{}: generated batch {}/{} ({} prompts), {} new tokens, {:.0} tok/s, {:.0} s",
                kind.name(),
                b + 1,
                batches.len(),
                batch.len(),
                tokens,
                tokens as f64 / secs.max(1e-9),
                secs
            );
        }
        self.gen_stats.generated += todo.len();
        self.gen_stats.new_tokens += tokens;
        self.gen_stats.seconds += started.elapsed().as_secs_f64();
        prompts
            .iter()
            .map(|(_, rec)| {
                cache.get(&rec.prompt_ids).cloned().ok_or_else(|| {
                    DataError::io(
                        "find a generated response in",
                        cache.path(),
                        std::io::Error::other("missing after generation"),
                    )
                })
            })
            .collect()
    }
}

/// Reads the set `kind` of a build directory.
///
/// The set is checked against the build's manifest first: its sha256 and its row count must
/// be those the build recorded, so a set swapped or edited after the build is refused,
/// naming the file.
pub fn read_set(out_dir: &Path, kind: SetKind) -> Result<Dataset> {
    let path = out_dir.join(kind.file_name());
    let manifest_path = out_dir.join(Manifest::FILE);
    if !manifest_path.is_file() {
        return Err(DataError::Unverified {
            file: path,
            reason: format!(
                "{} is not a complete data build (no {}); build it with `antibody-data build`",
                out_dir.display(),
                Manifest::FILE
            ),
        });
    }
    let manifest = Manifest::read(&manifest_path)?;
    let record = manifest
        .sets
        .get(kind.name())
        .ok_or_else(|| DataError::Unverified {
            file: path.clone(),
            reason: format!("the manifest lists no set `{}`", kind.name()),
        })?;
    let found = antibody_fetch::sha256_file(&path)?;
    if found != record.sha256 {
        return Err(DataError::Unverified {
            file: path,
            reason: format!(
                "sha256 {found} is not the {} the build recorded: the set was changed after \
                 the build; rebuild it (`antibody-data build --force`)",
                record.sha256
            ),
        });
    }
    let data = Dataset::read_parquet(kind, &path)?;
    if data.records.len() != record.rows {
        return Err(DataError::Unverified {
            file: path,
            reason: format!(
                "{} rows, the manifest says {}",
                data.records.len(),
                record.rows
            ),
        });
    }
    Ok(data)
}
