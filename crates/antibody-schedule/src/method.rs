//! The method's training loop: Dual Distillation with LAT and Canary Stabilization.
//!
//! A [`Method`] owns the student, its optimizer, the two frozen teachers (on the inner
//! backend: they never enter an autodiff graph), the teachers' cached sequence
//! log-probabilities, and the run's [`MethodState`]. [`Method::advance`] executes the next
//! [`Event`] of the plan:
//!
//! - **harmful step**: per micro-batch of `(x, y_h)`, a LAT attack finds `δ` at the
//!   configured residual sites; under it, `L_adv = (1 − γ)·L_forget + γ·L_KL_imm + ρ·L_ref`
//!   (NPO against the cached `ŝ_H(y_h|x)`, the capped immunization KL against π_H's
//!   per-token distributions, fused with the output head over vocabulary chunks);
//! - **canaries**: `A_pre` before a harmful phase, `A_post` after it (harmful prompts), drift,
//!   the quantile threshold, `A_target` with the just-updated student on a harmless sample's
//!   `x ++ y_c` (the tokens `A_current` is averaged over);
//! - **harmless step**: `L_align = (1 − α)·L_DPO + α·KL(π_B ‖ π_θ) + λ_stab·L_stab`, the
//!   canaries' means read from the same forward that computes the DPO term.
//!
//! Accumulation: every micro-batch's term is scaled by its share of the step's rows (batch
//! means: NPO, DPO, `L_stab`) or counted tokens (token means: the KL terms, SFT), so the
//! summed gradient is the whole batch's. `L_stab` is the exception: the MSE of a batch mean
//! is not a sum over rows, so under accumulation it is the mean of the micro-batches' MSEs.

use std::time::Instant;

use antibody_canary::{
    Activations, CanarySet, canary_means, drift, mean_activations, monitored_sites, select,
    stab_loss,
};
use antibody_data::Record;
use antibody_lat::Positions;
use antibody_losses::combine::{AdvKl, ForgetLoss, NpoReference, PrefLoss, RefusalLoss};
use antibody_losses::{
    HeadKl, HeadLogprob, HeadLogprobValues, KlDirection, NextTokenTargets, dpo,
    fused_sequence_loss, head_immunization, head_kl_loss, npo,
};
use antibody_model::{Hooks, Llama, TokenBatch};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::optim::{clip_global_norm, global_norm};
use crate::plan::{Event, counts, plan, steps};
use crate::sft::{Adamw, Example, TrainError, order};

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

/// `ŝ(y|x)` per sequence on any backend, `batch_size` sequences per forward, without an
/// autodiff graph (teachers here, every model in evaluation).
pub fn sequence_logprobs<I: Backend>(
    model: &Llama<I>,
    seqs: &[Example],
    batch_size: usize,
    chunk: usize,
) -> Result<Vec<f32>, antibody_model::ModelError> {
    let pad = model.config.pad_token_id;
    let device = model.device();
    let head = model.head_weight();
    let mut out = Vec::with_capacity(seqs.len());
    for part in seqs.chunks(batch_size.max(1)) {
        let t = NextTokenTargets::new(part, pad);
        let ids: Vec<Vec<u32>> = part.iter().map(|e| e.0.clone()).collect();
        let hidden = model
            .forward_hidden(&TokenBatch::right_padded(&ids, pad), &Hooks::none())?
            .hidden;
        let v = HeadLogprobValues::new(
            hidden,
            head.clone(),
            t.targets_tensor(&device),
            t.mask_tensor(&device),
            chunk,
        )
        .values();
        out.extend(host(v));
    }
    Ok(out)
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

/// The canary state a checkpoint carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CanaryState {
    /// `A_pre` of the current harmful phase (or refresh window).
    pub baseline: Option<Activations>,
    /// The current canaries.
    pub set: Option<CanarySet>,
    /// Their `A_target`, in the set's order.
    pub target: Option<Vec<f32>>,
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodState {
    /// Events of the plan done.
    pub cursor: usize,
    /// Optimizer steps done.
    pub step: usize,
    /// The seed.
    pub seed: u64,
    /// Harmful and harmless examples the order was drawn over.
    pub examples: [usize; 2],
    /// Canaries.
    pub canary: CanaryState,
}

/// Every number one optimizer step reports (`None`: the term was not computed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 0-based optimizer step.
    pub step: usize,
    /// `harmful` or `harmless`.
    pub phase: String,
    /// Cycle (mixed: canary window).
    pub cycle: usize,
    /// The step's total loss.
    pub loss: f64,
    /// NPO (or the configured forgetting term).
    pub forget: Option<f64>,
    /// The capped immunization KL term (`−mean min(KL, cap)`).
    pub kl_imm: Option<f64>,
    /// Share of counted positions where the cap binds.
    pub kl_cap_rate: Option<f64>,
    /// The refusal term.
    pub refusal: Option<f64>,
    /// The preference term (DPO, or SFT on `y_c`).
    pub pref: Option<f64>,
    /// The alignment KL.
    pub kl_align: Option<f64>,
    /// Canary stabilization MSE (before `λ_stab`).
    pub stab: Option<f64>,
    /// Mean per-token log-likelihood of `y_h` under the student (perturbed).
    pub harmful_logp: Option<f64>,
    /// Mean per-token log-likelihood of `y_c`.
    pub chosen_logp: Option<f64>,
    /// Mean DPO margin `(ŝ_θ(y_c) − ŝ_B(y_c)) − (ŝ_θ(y_r) − ŝ_B(y_r))`, nats.
    pub dpo_margin: Option<f64>,
    /// LAT attack loss (CE of `y_h`) at `δ = 0`.
    pub lat_loss_start: Option<f64>,
    /// LAT attack loss at the last evaluated `δ`.
    pub lat_loss_end: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate.
    pub lr: f64,
    /// Real tokens processed (all forwards of the step's sequences, prompt included).
    pub tokens: usize,
    /// `tokens` per second of the step's wall time.
    pub tokens_per_s: f64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Canaries in force.
    pub canaries: usize,
}

/// What an event produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// `A_pre` measured.
    Baseline,
    /// An optimizer step.
    Step(Box<StepMetrics>),
    /// Canaries selected: the cycle and what the report needs.
    Canaries {
        /// Cycle (mixed: window).
        cycle: usize,
        /// `A_pre`.
        pre: Box<Activations>,
        /// `A_post`.
        post: Box<Activations>,
        /// The new set.
        set: Box<CanarySet>,
    },
}

/// A training run of the method.
pub struct Method<B: AutodiffBackend> {
    /// The student.
    pub model: Llama<B>,
    optim: Adamw<B>,
    /// Where the run stands.
    pub state: MethodState,
    harmful_teacher: Llama<B::InnerBackend>,
    benign_teacher: Llama<B::InnerBackend>,
    cache: TeacherCache,
    data: MethodData,
    config: TrainConfig,
    plan: Vec<Event>,
    harmful_order: Vec<usize>,
    harmless_order: Vec<usize>,
    harmful_probe: Vec<TokenBatch>,
    harmless_probe: Vec<TokenBatch>,
}

const HARMFUL_SALT: u64 = 0x4841_524D;
const HARMLESS_SALT: u64 = 0x4F4B_4159;
const PROBE_SALT: u64 = 0x5052_4F42;

/// Term values of one step, summed over micro-batches.
#[derive(Default)]
struct Sums {
    forget: Option<f64>,
    kl: Option<f64>,
    cap_bound: f64,
    refusal: Option<f64>,
    pref: Option<f64>,
    kl_align: Option<f64>,
    stab: Option<f64>,
    logp: f64,
    margin: Option<f64>,
    lat: Option<(f64, f64)>,
    tokens: usize,
}

fn add(slot: &mut Option<f64>, v: f64) {
    *slot = Some(slot.unwrap_or(0.0) + v);
}

impl<B: AutodiffBackend> Method<B> {
    /// A run at its start (or, with `state`, at a checkpoint's position).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Llama<B>,
        optim: Option<Adamw<B>>,
        state: Option<MethodState>,
        harmful_teacher: Llama<B::InnerBackend>,
        benign_teacher: Llama<B::InnerBackend>,
        cache: TeacherCache,
        data: MethodData,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        if data.harmful.is_empty() && config.harmful_steps > 0 {
            return Err(TrainError::Config("no harmful training examples".into()));
        }
        if data.harmless.is_empty() && config.harmless_steps > 0 {
            return Err(TrainError::Config("no harmless training examples".into()));
        }
        if config.adv.rho > 0.0 && data.harmful.iter().any(|e| e.refusal.is_none()) {
            return Err(TrainError::Config(
                "adv.rho > 0 needs a refusal y_ref for every harmful example".into(),
            ));
        }
        let plan = plan(&config);
        let (nh, nl) = counts(&plan);
        let bs = config.batch_size;
        let examples = [data.harmful.len(), data.harmless.len()];
        let state = state.unwrap_or(MethodState {
            cursor: 0,
            step: 0,
            seed: config.seed,
            examples,
            canary: CanaryState::default(),
        });
        if state.seed != config.seed || state.examples != examples {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint was written with seed {} on {:?} examples, not seed {} on {:?}",
                state.seed, state.examples, config.seed, examples
            )));
        }
        let pad = model.config.pad_token_id;
        let probe = |prompts: Vec<Vec<u32>>, n: usize, salt: u64| -> Vec<TokenBatch> {
            let pick = order(prompts.len(), config.seed ^ salt, n.min(prompts.len()));
            let chosen: Vec<Vec<u32>> = pick.iter().map(|&i| prompts[i].clone()).collect();
            chosen
                .chunks(config.canary.batch_size.max(1))
                .map(|c| TokenBatch::right_padded(c, pad))
                .collect()
        };
        let harmful_probe = probe(
            data.harmful.iter().map(|e| e.prompt.clone()).collect(),
            config.canary.harmful_sample,
            PROBE_SALT,
        );
        // A_target is taken over the same token population as A_current (the real tokens of
        // `x ++ y_c`), so the canary MSE can reach zero.
        let harmless_probe = probe(
            data.harmless.iter().map(|e| e.chosen.0.clone()).collect(),
            config.canary.harmless_sample,
            PROBE_SALT ^ 1,
        );
        Ok(Self {
            optim: optim.unwrap_or_else(|| config.optim.adamw().init::<B, Llama<B>>()),
            harmful_order: order(examples[0], config.seed ^ HARMFUL_SALT, nh * bs),
            harmless_order: order(examples[1], config.seed ^ HARMLESS_SALT, nl * bs),
            model,
            state,
            harmful_teacher,
            benign_teacher,
            cache,
            data,
            plan,
            harmful_probe,
            harmless_probe,
            config,
        })
    }

    /// The optimizer (for checkpoints).
    pub fn optimizer(&self) -> &Adamw<B> {
        &self.optim
    }

    /// The plan.
    pub fn plan(&self) -> &[Event] {
        &self.plan
    }

    /// Whether every event is done.
    pub fn done(&self) -> bool {
        self.state.cursor >= self.plan.len()
    }

    /// The next event, if any.
    pub fn next_event(&self) -> Option<Event> {
        self.plan.get(self.state.cursor).copied()
    }

    /// Runs the next event.
    pub fn advance(&mut self) -> Result<Option<(Event, Outcome)>, TrainError> {
        let Some(event) = self.next_event() else {
            return Ok(None);
        };
        let outcome = match event {
            Event::Baseline { .. } => {
                let sites = monitored_sites(self.model.config.num_layers);
                let pre = mean_activations(&self.model.valid(), &self.harmful_probe, &sites)?;
                self.state.canary.baseline = Some(pre);
                Outcome::Baseline
            }
            Event::Canaries { cycle } => self.canaries(cycle)?,
            Event::Harmful { cycle, k } => Outcome::Step(Box::new(self.step(true, cycle, k)?)),
            Event::Harmless { cycle, k } => Outcome::Step(Box::new(self.step(false, cycle, k)?)),
        };
        self.state.cursor += 1;
        Ok(Some((event, outcome)))
    }

    fn canaries(&mut self, cycle: usize) -> Result<Outcome, TrainError> {
        let inner = self.model.valid();
        let sites = monitored_sites(self.model.config.num_layers);
        let post = mean_activations(&inner, &self.harmful_probe, &sites)?;
        let pre = self
            .state
            .canary
            .baseline
            .clone()
            .ok_or_else(|| TrainError::Config("canaries without a baseline".into()))?;
        let set = select(&drift(&pre, &post), self.config.canary.q);
        let target = mean_activations(&inner, &self.harmless_probe, &set.sites())?;
        self.state.canary.target = Some(set.values(&target));
        self.state.canary.set = Some(set.clone());
        self.state.canary.baseline = Some(post.clone());
        Ok(Outcome::Canaries {
            cycle,
            pre: Box::new(pre),
            post: Box::new(post),
            set: Box::new(set),
        })
    }

    fn step(&mut self, harmful: bool, cycle: usize, k: usize) -> Result<StepMetrics, TrainError> {
        let started = Instant::now();
        let step = self.state.step;
        let bs = self.config.batch_size;
        let order = if harmful {
            &self.harmful_order
        } else {
            &self.harmless_order
        };
        let rows: Vec<usize> = order[k * bs..(k + 1) * bs].to_vec();
        let micro = bs.div_ceil(self.config.optim.accumulation).max(1);
        let pad = self.model.config.pad_token_id;
        let count = |seqs: Vec<Example>| NextTokenTargets::new(&seqs, pad).mask.iter().sum::<f32>();
        // Whole-batch normalizers.
        let totals = if harmful {
            [
                count(
                    rows.iter()
                        .map(|&i| self.data.harmful[i].harmful.clone())
                        .collect(),
                ),
                count(
                    rows.iter()
                        .filter_map(|&i| self.data.harmful[i].refusal.clone())
                        .collect(),
                ),
            ]
        } else {
            [
                count(
                    rows.iter()
                        .map(|&i| self.data.harmless[i].chosen.clone())
                        .collect(),
                ),
                0.0,
            ]
        };
        if totals[0] == 0.0 {
            return Err(TrainError::Config(format!(
                "step {step}: the batch has no response tokens"
            )));
        }
        let mut acc = GradientsAccumulator::<Llama<B>>::new();
        let mut sums = Sums::default();
        let mut loss_total = 0.0;
        for part in rows.chunks(micro) {
            let share = part.len() as f64 / bs as f64;
            let loss = if harmful {
                self.harmful_micro(part, share, totals, &mut sums, step)?
            } else {
                self.harmless_micro(part, share, totals[0], &mut sums, step)?
            };
            let value = scalar(&loss);
            check(step, "loss", value)?;
            loss_total += value;
            acc.accumulate(
                &self.model,
                GradientsParams::from_grads(loss.backward(), &self.model),
            );
        }
        let mut grads = acc.grads();
        let grad_norm = match self.config.optim.max_grad_norm {
            Some(max) => clip_global_norm(&self.model, &mut grads, max),
            None => global_norm(&self.model, &grads),
        };
        check(step, "grad_norm", grad_norm)?;
        let lr = self.config.optim.lr_at(step, steps(&self.plan));
        self.model = self.optim.step(lr, self.model.clone(), grads);
        self.state.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        let tokens_total = f64::from(totals[0]);
        Ok(StepMetrics {
            step,
            phase: if harmful { "harmful" } else { "harmless" }.into(),
            cycle,
            loss: loss_total,
            forget: sums.forget,
            kl_imm: sums.kl,
            kl_cap_rate: sums.kl.map(|_| sums.cap_bound / tokens_total),
            refusal: sums.refusal,
            pref: sums.pref,
            kl_align: sums.kl_align,
            stab: sums.stab,
            harmful_logp: harmful.then_some(sums.logp / tokens_total),
            chosen_logp: (!harmful).then_some(sums.logp / tokens_total),
            dpo_margin: sums.margin.map(|m| m / bs as f64),
            lat_loss_start: sums.lat.map(|l| l.0),
            lat_loss_end: sums.lat.map(|l| l.1),
            grad_norm,
            lr,
            tokens: sums.tokens,
            tokens_per_s: sums.tokens as f64 / seconds.max(1e-9),
            seconds,
            canaries: self.state.canary.set.as_ref().map_or(0, CanarySet::count),
        })
    }

    fn harmful_micro(
        &self,
        part: &[usize],
        share: f64,
        totals: [f32; 2],
        sums: &mut Sums,
        step: usize,
    ) -> Result<Tensor<B, 1>, TrainError> {
        let cfg = &self.config;
        let adv = &cfg.adv;
        let needs = adv.needs();
        let device = self.model.device();
        let pad = self.model.config.pad_token_id;
        let seqs: Vec<Example> = part
            .iter()
            .map(|&i| self.data.harmful[i].harmful.clone())
            .collect();
        let (batch, t) = prepare(&seqs, pad);
        sums.tokens += batch.mask.iter().filter(|&&m| m).count();
        let targets = t.targets_tensor::<B>(&device);
        let mask = t.mask_tensor::<B>(&device);
        let micro_tokens: f32 = t.mask.iter().sum();
        let token_share = f64::from(micro_tokens / totals[0]);
        let hooks = if cfg.lat.enabled && cfg.lat.epsilon > 0.0 {
            let positions = match cfg.lat.positions {
                Positions::All => float_mask::<B>(&batch.mask, [batch.batch, batch.seq], &device),
                Positions::Response => {
                    let m: Vec<bool> = seqs
                        .iter()
                        .flat_map(|(ids, m)| (0..batch.seq).map(move |i| i < ids.len() && m[i]))
                        .collect();
                    float_mask::<B>(&m, [batch.batch, batch.seq], &device)
                }
            };
            let attack = antibody_lat::attack(
                &self.model,
                &batch,
                targets.clone(),
                mask.clone(),
                positions,
                &cfg.lat,
            )
            .map_err(|e| TrainError::Config(e.to_string()))?;
            let first = attack.losses.first().copied().map_or(f64::NAN, f64::from);
            let last = attack.losses.last().copied().map_or(f64::NAN, f64::from);
            let prev = sums.lat.unwrap_or((0.0, 0.0));
            sums.lat = Some((prev.0 + first * share, prev.1 + last * share));
            attack.hooks()
        } else {
            Hooks::none()
        };
        let hidden = self.model.forward_hidden(&batch, &hooks)?.hidden;
        let head = self.model.head_weight();
        let s_h = HeadLogprob::new(
            hidden.clone(),
            head.clone(),
            targets.clone(),
            mask.clone(),
            cfg.vocab_chunk,
        );
        let s_values = host(s_h.values());
        sums.logp += s_values.iter().map(|&x| f64::from(x)).sum::<f64>();
        let pick = |v: &[f32]| -> Tensor<B, 1> {
            let vals: Vec<f32> = part.iter().map(|&i| v[i]).collect();
            Tensor::from_data(TensorData::new(vals, [part.len()]), &device)
        };
        let forget = if needs.first {
            let term = match adv.forget {
                ForgetLoss::Npo => {
                    let reference = match adv.npo_reference {
                        NpoReference::HarmfulTeacher => pick(&self.cache.harmful_h),
                        NpoReference::Initial => pick(&self.cache.initial_h),
                    };
                    fused_sequence_loss(&[&s_h], |v| {
                        npo(v[0].clone(), reference, adv.beta, adv.npo_scaled)
                    }) * share
                }
                ForgetLoss::GradientAscent => {
                    fused_sequence_loss(&[&s_h], |v| v[0].clone().sum() / totals[0])
                }
                ForgetLoss::Entropy => {
                    antibody_losses::entropy_loss(self.model.logits(hidden.clone()), mask.clone())
                        * token_share
                }
                ForgetLoss::None => unreachable!("needs.first is false for `none`"),
            };
            let v = scalar(&term);
            check(step, "forget", v)?;
            add(&mut sums.forget, v);
            Some(term)
        } else {
            None
        };
        let kl = if needs.kl {
            let teacher = self
                .harmful_teacher
                .forward_hidden(&batch, &Hooks::none())?
                .hidden;
            let direction = match adv.kl {
                AdvKl::Immunization => KlDirection::Forward,
                AdvKl::ImmunizationReverse => KlDirection::Reverse,
            };
            let kl = HeadKl::new(
                Tensor::from_inner(teacher),
                Tensor::from_inner(self.harmful_teacher.head_weight()),
                hidden,
                head.clone(),
                direction,
                cfg.vocab_chunk,
            );
            let (term, rate) = head_immunization(&kl, mask, adv.kl_cap);
            let term = term * token_share;
            let v = scalar(&term);
            check(step, "kl_imm", v)?;
            add(&mut sums.kl, v);
            sums.cap_bound += rate * f64::from(micro_tokens);
            Some(term)
        } else {
            None
        };
        let refusal = if needs.third {
            let refs: Vec<Example> = part
                .iter()
                .filter_map(|&i| self.data.harmful[i].refusal.clone())
                .collect();
            let (rbatch, rt) = prepare(&refs, pad);
            sums.tokens += rbatch.mask.iter().filter(|&&m| m).count();
            let rhidden = self.model.forward_hidden(&rbatch, &Hooks::none())?.hidden;
            let s_ref = HeadLogprob::new(
                rhidden,
                head,
                rt.targets_tensor(&device),
                rt.mask_tensor(&device),
                cfg.vocab_chunk,
            );
            let term = match adv.refusal {
                RefusalLoss::Sft => {
                    fused_sequence_loss(&[&s_ref], |v| v[0].clone().sum().neg() / totals[1])
                }
                RefusalLoss::Dpo => {
                    let (b_ref, b_h) = (pick(&self.cache.benign_ref), pick(&self.cache.benign_h));
                    fused_sequence_loss(&[&s_ref, &s_h], |v| {
                        dpo(v[0].clone(), b_ref, v[1].clone(), b_h, adv.beta)
                    }) * share
                }
            };
            let v = scalar(&term);
            check(step, "refusal", v)?;
            add(&mut sums.refusal, v);
            Some(term)
        } else {
            None
        };
        adv.combine(forget, kl, refusal)
            .ok_or_else(|| TrainError::Config("adv: every term of L_adv has weight 0".into()))
    }

    fn harmless_micro(
        &self,
        part: &[usize],
        share: f64,
        total_tokens: f32,
        sums: &mut Sums,
        step: usize,
    ) -> Result<Tensor<B, 1>, TrainError> {
        let cfg = &self.config;
        let align = &cfg.align;
        let needs = align.needs();
        let device = self.model.device();
        let pad = self.model.config.pad_token_id;
        let chosen: Vec<Example> = part
            .iter()
            .map(|&i| self.data.harmless[i].chosen.clone())
            .collect();
        let (batch, t) = prepare(&chosen, pad);
        sums.tokens += batch.mask.iter().filter(|&&m| m).count();
        let targets = t.targets_tensor::<B>(&device);
        let mask = t.mask_tensor::<B>(&device);
        let micro_tokens: f32 = t.mask.iter().sum();
        let canaries = match (&self.state.canary.set, &self.state.canary.target) {
            (Some(set), Some(target)) if needs.third && cfg.canary.enabled && set.count() > 0 => {
                Some((set, target))
            }
            _ => None,
        };
        let hooks = canaries.map_or_else(Hooks::none, |(set, _)| Hooks::capture(set.sites()));
        let out = self.model.forward_hidden(&batch, &hooks)?;
        let head = self.model.head_weight();
        let s_c = HeadLogprob::new(
            out.hidden.clone(),
            head.clone(),
            targets,
            mask.clone(),
            cfg.vocab_chunk,
        );
        let c_values = host(s_c.values());
        sums.logp += c_values.iter().map(|&x| f64::from(x)).sum::<f64>();
        let pick = |v: &[f32]| -> Vec<f32> { part.iter().map(|&i| v[i]).collect() };
        let tensor = |v: Vec<f32>| -> Tensor<B, 1> {
            let n = v.len();
            Tensor::from_data(TensorData::new(v, [n]), &device)
        };
        let pref = if needs.first {
            let term = match align.pref {
                PrefLoss::Dpo => {
                    let rejected: Vec<Example> = part
                        .iter()
                        .map(|&i| self.data.harmless[i].rejected.clone())
                        .collect();
                    let (rbatch, rt) = prepare(&rejected, pad);
                    sums.tokens += rbatch.mask.iter().filter(|&&m| m).count();
                    let rhidden = self.model.forward_hidden(&rbatch, &Hooks::none())?.hidden;
                    let s_r = HeadLogprob::new(
                        rhidden,
                        head.clone(),
                        rt.targets_tensor(&device),
                        rt.mask_tensor(&device),
                        cfg.vocab_chunk,
                    );
                    let (bc, br) = (pick(&self.cache.benign_c), pick(&self.cache.benign_r));
                    let r_values = host(s_r.values());
                    let margin: f64 = (0..part.len())
                        .map(|j| f64::from((c_values[j] - bc[j]) - (r_values[j] - br[j])))
                        .sum();
                    add(&mut sums.margin, margin);
                    fused_sequence_loss(&[&s_c, &s_r], |v| {
                        dpo(
                            v[0].clone(),
                            tensor(bc),
                            v[1].clone(),
                            tensor(br),
                            align.beta,
                        )
                    }) * share
                }
                PrefLoss::Sft => {
                    fused_sequence_loss(&[&s_c], |v| v[0].clone().sum().neg() / total_tokens)
                }
            };
            let v = scalar(&term);
            check(step, "pref", v)?;
            add(&mut sums.pref, v);
            Some(term)
        } else {
            None
        };
        let kl = if needs.kl {
            let teacher = self
                .benign_teacher
                .forward_hidden(&batch, &Hooks::none())?
                .hidden;
            let kl = HeadKl::new(
                Tensor::from_inner(teacher),
                Tensor::from_inner(self.benign_teacher.head_weight()),
                out.hidden.clone(),
                head,
                align.kl,
                cfg.vocab_chunk,
            );
            let term = head_kl_loss(&kl, mask) * f64::from(micro_tokens / total_tokens);
            let v = scalar(&term);
            check(step, "kl_align", v)?;
            add(&mut sums.kl_align, v);
            Some(term)
        } else {
            None
        };
        let stab = match canaries {
            Some((set, target)) => {
                let real = float_mask::<B>(&batch.mask, [batch.batch, batch.seq], &device);
                let current = canary_means(&out.sites, real, set)?;
                let term = stab_loss(current, target) * share;
                let v = scalar(&term);
                check(step, "stab", v)?;
                add(&mut sums.stab, v);
                Some(term)
            }
            None => None,
        };
        align
            .combine(pref, kl, stab)
            .ok_or_else(|| TrainError::Config("align: every term of L_align has weight 0".into()))
    }
}

fn prepare(seqs: &[Example], pad: u32) -> (TokenBatch, NextTokenTargets) {
    let ids: Vec<Vec<u32>> = seqs.iter().map(|e| e.0.clone()).collect();
    (
        TokenBatch::right_padded(&ids, pad),
        NextTokenTargets::new(seqs, pad),
    )
}

fn float_mask<B: Backend>(m: &[bool], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    let v: Vec<f32> = m.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().to_vec().unwrap_or_default()
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    host(t.clone()).first().copied().map_or(f64::NAN, f64::from)
}

fn check(step: usize, term: &str, value: f64) -> Result<(), TrainError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(TrainError::NonFinite {
            step,
            term: term.into(),
            value,
        })
    }
}
