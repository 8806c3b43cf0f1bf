//! The method's data and what the frozen models contribute to it once: [`MethodData`]
//! (`D_adv` and `D_harmless` as [`Example`]s), the plan's draw of examples
//! ([`used_examples`]) and [`TeacherCache`], the teachers' sequence log-probabilities over
//! exactly the examples the plan reads.

use antibody_base::Example;
use antibody_data::Record;
use antibody_finetune::{order, sequence_logprobs};
use antibody_losses::combine::{NpoReference, PrefLoss, RefusalLoss};
use antibody_model::Llama;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::config::TrainConfig;
use crate::plan::{counts, plan};

/// Salts of the seeded draws: harmful order, harmless order, canary probes.
pub(crate) const HARMFUL_SALT: u64 = 0x4841_524D;
pub(crate) const HARMLESS_SALT: u64 = 0x4F4B_4159;
pub(crate) const PROBE_SALT: u64 = 0x5052_4F42;
/// The harmless batches of the harmful steps' retain and contrast terms.
pub(crate) const RETAIN_SALT: u64 = 0x5245_5441;

/// A harmful training example.
#[derive(Debug, Clone, PartialEq)]
pub struct HarmfulExample {
    /// `x ++ y_h` with its response mask.
    pub harmful: Example,
    /// `x ++ y_ref`, when the record has a refusal.
    pub refusal: Option<Example>,
    /// The rendered prompt `x`.
    pub prompt: Vec<u32>,
}

/// A harmless training example.
#[derive(Debug, Clone, PartialEq)]
pub struct HarmlessExample {
    /// `x ++ y_c`.
    pub chosen: Example,
    /// `x ++ y_r`.
    pub rejected: Example,
    /// The rendered prompt `x`.
    pub prompt: Vec<u32>,
}

/// The training data of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodData {
    /// `D_adv`.
    pub harmful: Vec<HarmfulExample>,
    /// `D_harmless`.
    pub harmless: Vec<HarmlessExample>,
}

impl MethodData {
    /// From built `harmful_train` and `harmless_train` records (`None` for a record that
    /// lacks a response the method needs).
    pub fn from_records(harmful: &[Record], harmless: &[Record]) -> Self {
        Self {
            harmful: harmful
                .iter()
                .filter_map(|r| {
                    Some(HarmfulExample {
                        harmful: r.sequence("y_h")?,
                        refusal: r.sequence("y_ref"),
                        prompt: r.prompt_ids.clone(),
                    })
                })
                .collect(),
            harmless: harmless
                .iter()
                .filter_map(|r| {
                    Some(HarmlessExample {
                        chosen: r.sequence("y_c")?,
                        rejected: r.sequence("y_r")?,
                        prompt: r.prompt_ids.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// Sequence log-probabilities of the frozen models, computed once per example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherCache {
    /// Identities of (harmful teacher, benign teacher, student) and a digest of the data.
    pub key: String,
    /// `ŝ_H(y_h|x)` per harmful example.
    pub harmful_h: Vec<f32>,
    /// `ŝ_B(y_h|x)` (the refusal DPO's reference).
    pub benign_h: Vec<f32>,
    /// `ŝ_B(y_ref|x)` (NaN where an example has no refusal).
    pub benign_ref: Vec<f32>,
    /// `ŝ_B(y_c|x)` per harmless example.
    pub benign_c: Vec<f32>,
    /// `ŝ_B(y_r|x)`.
    pub benign_r: Vec<f32>,
    /// The initial student's `ŝ(y_h|x)` (NPO with the published reference).
    pub initial_h: Vec<f32>,
}

/// The examples a run's plan reads: (harmful, harmless) indices, each flagged `true` when used.
pub fn used_examples(config: &TrainConfig, data: &MethodData) -> (Vec<bool>, Vec<bool>) {
    let (nh, nl) = counts(&plan(config));
    let bs = config.batch_size;
    let mark = |n: usize, salt: u64, len: usize| {
        let mut used = vec![false; n];
        for i in order(n, config.seed ^ salt, len) {
            used[i] = true;
        }
        used
    };
    (
        mark(data.harmful.len(), HARMFUL_SALT, nh * bs),
        mark(data.harmless.len(), HARMLESS_SALT, nl * bs),
    )
}

/// `sequence_logprobs` of the flagged sequences only; `NaN` for the others.
fn logprobs_where<I: Backend>(
    model: &Llama<I>,
    seqs: &[Example],
    used: &[bool],
    batch_size: usize,
    chunk: usize,
) -> Result<Vec<f32>, antibody_model::ModelError> {
    let picked: Vec<Example> = seqs
        .iter()
        .zip(used)
        .filter(|(_, u)| **u)
        .map(|(s, _)| s.clone())
        .collect();
    let mut values = sequence_logprobs(model, &picked, batch_size, chunk)?.into_iter();
    Ok(used
        .iter()
        .map(|&u| {
            if u {
                values.next().unwrap_or(f32::NAN)
            } else {
                f32::NAN
            }
        })
        .collect())
}

impl TeacherCache {
    /// Computes every cached value for the examples the plan reads (`NaN` for the others, which
    /// no step reads); no autodiff graph: the models are on the inner backend.
    pub fn compute<I: Backend>(
        key: String,
        harmful_teacher: &Llama<I>,
        benign_teacher: &Llama<I>,
        student: &Llama<I>,
        data: &MethodData,
        config: &TrainConfig,
    ) -> Result<Self, TrainError> {
        let (bs, chunk) = (config.canary.batch_size, config.vocab_chunk);
        let (used_h, used_l) = used_examples(config, data);
        let h: Vec<Example> = data.harmful.iter().map(|e| e.harmful.clone()).collect();
        let c: Vec<Example> = data.harmless.iter().map(|e| e.chosen.clone()).collect();
        let r: Vec<Example> = data.harmless.iter().map(|e| e.rejected.clone()).collect();
        let adv = &config.adv;
        let needs_benign_h = adv.rho > 0.0 && adv.refusal == RefusalLoss::Dpo;
        let benign_ref = if adv.rho > 0.0 {
            // An example without y_ref scores NaN (Method::new refuses rho > 0 then).
            let refs: Vec<Example> = data
                .harmful
                .iter()
                .map(|e| e.refusal.clone().unwrap_or_default())
                .collect();
            let has: Vec<bool> = data
                .harmful
                .iter()
                .zip(&used_h)
                .map(|(e, &u)| u && e.refusal.is_some())
                .collect();
            logprobs_where(benign_teacher, &refs, &has, bs, chunk)?
        } else {
            vec![f32::NAN; data.harmful.len()]
        };
        let align_pref = config.align.pref == PrefLoss::Dpo && config.align.alpha < 1.0;
        Ok(Self {
            key,
            harmful_h: logprobs_where(harmful_teacher, &h, &used_h, bs, chunk)?,
            benign_h: if needs_benign_h {
                logprobs_where(benign_teacher, &h, &used_h, bs, chunk)?
            } else {
                Vec::new()
            },
            benign_ref,
            benign_c: if align_pref {
                logprobs_where(benign_teacher, &c, &used_l, bs, chunk)?
            } else {
                Vec::new()
            },
            benign_r: if align_pref {
                logprobs_where(benign_teacher, &r, &used_l, bs, chunk)?
            } else {
                Vec::new()
            },
            initial_h: if adv.npo_reference == NpoReference::Initial {
                logprobs_where(student, &h, &used_h, bs, chunk)?
            } else {
                Vec::new()
            },
        })
    }
}
