//! The method's loop: Dual Distillation with LAT and Canary Stabilization.
//!
//! A [`Method`] owns the student, its optimizer, the two frozen teachers (on the inner
//! backend: they never enter an autodiff graph), the teachers' cached sequence
//! log-probabilities ([`crate::data::TeacherCache`]), and the run's [`MethodState`].
//! [`Method::advance`] executes the next [`Event`] of the plan:
//!
//! - **harmful / harmless step**: one optimizer step of a phase ([`crate::step`]);
//! - **baseline / canaries**: `A_pre` before a harmful phase, `A_post` after it (harmful
//!   prompts), drift, the quantile threshold, and `A_target` with the just-updated student on
//!   a harmless sample's `x ++ y_c` (the tokens `A_current` is averaged over).

use antibody_canary::{Activations, CanarySet, mean_activations, monitored_sites, select};
use antibody_finetune::{Adamw, order};
use antibody_model::{Llama, TokenBatch};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::config::{CanaryTarget, TrainConfig};
use crate::data::{HARMFUL_SALT, HARMLESS_SALT, MethodData, PROBE_SALT, RETAIN_SALT, TeacherCache};
use crate::metrics::StepMetrics;
use crate::plan::{Event, counts, plan};

/// The canary state a checkpoint carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CanaryState {
    /// `A_pre` of the current harmful phase (or refresh window).
    pub baseline: Option<Activations>,
    /// The current canaries.
    pub set: Option<CanarySet>,
    /// Their `A_target`, in the set's order.
    pub target: Option<Vec<f32>>,
    /// Under `canary.target = "pre"`: every monitored neuron's mean over the harmless sample,
    /// measured with the model before the current harmful phase (or refresh window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmless_baseline: Option<Activations>,
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
    /// The optimizer of every step (`optimizer_state = "shared"` or `"reset"`), or of the
    /// harmful phase (`"per_phase"`).
    pub(crate) optim: Adamw<B>,
    /// The harmless phase's own optimizer (`optimizer_state = "per_phase"` only).
    pub(crate) optim_harmless: Option<Adamw<B>>,
    /// Where the run stands.
    pub state: MethodState,
    pub(crate) harmful_teacher: Llama<B::InnerBackend>,
    pub(crate) benign_teacher: Llama<B::InnerBackend>,
    pub(crate) cache: TeacherCache,
    pub(crate) data: MethodData,
    pub(crate) config: TrainConfig,
    pub(crate) plan: Vec<Event>,
    pub(crate) harmful_order: Vec<usize>,
    pub(crate) harmless_order: Vec<usize>,
    /// Harmless rows of the harmful steps' retain and contrast terms (`adv.retain > 0` or
    /// `adv.contrast > 0`), a batch per step.
    pub(crate) retain_order: Vec<usize>,
    harmful_probe: Vec<TokenBatch>,
    harmless_probe: Vec<TokenBatch>,
}

impl<B: AutodiffBackend> Method<B> {
    /// A run at its start (or, with `state` and the checkpoint's optimizers, at a
    /// checkpoint's position: one optimizer, two under `optimizer_state = "per_phase"`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Llama<B>,
        optims: Vec<Adamw<B>>,
        state: Option<MethodState>,
        harmful_teacher: Llama<B::InnerBackend>,
        benign_teacher: Llama<B::InnerBackend>,
        cache: TeacherCache,
        data: MethodData,
        config: TrainConfig,
    ) -> Result<Self, TrainError> {
        if data.harmful.is_empty() && config.harmful_steps > 0 {
            return Err(TrainError::NoExamples { phase: "harmful" });
        }
        if data.harmless.is_empty() && (config.harmless_steps > 0 || config.adv.reads_harmless()) {
            return Err(TrainError::NoExamples { phase: "harmless" });
        }
        // The terms that read every harmful row's refusal y_ref.
        let missing = data.harmful.iter().any(|e| e.refusal.is_none());
        for (key, weight, reason) in [
            (
                "adv.rho",
                config.adv.rho,
                "rho > 0 needs a refusal y_ref for every harmful example",
            ),
            (
                "adv.contrast",
                config.adv.contrast,
                "contrast > 0 needs a refusal y_ref for every harmful example (the answer it \
                 lowers after the harmless prompts)",
            ),
        ] {
            if weight > 0.0 && missing {
                return Err(TrainError::Setting {
                    key,
                    reason: reason.into(),
                });
            }
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
            return Err(TrainError::Resume {
                written: format!("with seed {} on {:?} examples", state.seed, state.examples),
                configured: format!("seed {} on {:?}", config.seed, examples),
            });
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
            data.harmless.iter().map(|e| e.chosen.ids.clone()).collect(),
            config.canary.harmless_sample,
            PROBE_SALT ^ 1,
        );
        let wanted = config.optimizers();
        if !(optims.is_empty() || optims.len() == wanted) {
            return Err(TrainError::Setting {
                key: "optimizer_state",
                reason: format!(
                    "the checkpoint holds {} optimizer states, {:?} needs {wanted}",
                    optims.len(),
                    config.optimizer_state
                ),
            });
        }
        let mut optims = optims.into_iter();
        let fresh = || config.optim.adamw().init::<B, Llama<B>>();
        let optim = optims.next().unwrap_or_else(fresh);
        let optim_harmless = (wanted == 2).then(|| optims.next().unwrap_or_else(fresh));
        Ok(Self {
            optim,
            optim_harmless,
            harmful_order: order(examples[0], config.seed ^ HARMFUL_SALT, nh * bs),
            harmless_order: order(examples[1], config.seed ^ HARMLESS_SALT, nl * bs),
            retain_order: if config.adv.reads_harmless() {
                order(examples[1], config.seed ^ RETAIN_SALT, nh * bs)
            } else {
                Vec::new()
            },
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

    /// The optimizers (for checkpoints): the run's, or the harmful then the harmless phase's.
    pub fn optimizers(&self) -> Vec<&Adamw<B>> {
        std::iter::once(&self.optim)
            .chain(self.optim_harmless.as_ref())
            .collect()
    }

    /// The rows of `data` that the `k`-th step of the harmful (`harmful`) or harmless phase
    /// reads, in order (`k` counts that phase's steps over the whole run).
    pub fn batch_rows(&self, harmful: bool, k: usize) -> &[usize] {
        let order = if harmful {
            &self.harmful_order
        } else {
            &self.harmless_order
        };
        let bs = self.config.batch_size;
        let start = (k * bs).min(order.len());
        &order[start..((k + 1) * bs).min(order.len())]
    }

    /// The examples the run reads.
    pub fn data(&self) -> &MethodData {
        &self.data
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
                let inner = self.model.valid();
                let pre = mean_activations(&inner, &self.harmful_probe, &sites)?;
                self.state.canary.baseline = Some(pre);
                if self.config.canary.target == CanaryTarget::Pre {
                    let harmless = mean_activations(&inner, &self.harmless_probe, &sites)?;
                    self.state.canary.harmless_baseline = Some(harmless);
                }
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
            .ok_or(TrainError::NoBaseline)?;
        let set = select(
            &self.config.canary.drift.drift(&pre, &post),
            self.config.canary.q,
        );
        let target = match self.config.canary.target {
            CanaryTarget::Post => set.values(&mean_activations(
                &inner,
                &self.harmless_probe,
                &set.sites(),
            )?),
            CanaryTarget::Pre => {
                // The next window's "before" is this model (mixed schedules; cyclic ones
                // measure it again at their next baseline).
                let now = mean_activations(&inner, &self.harmless_probe, &sites)?;
                let before = self
                    .state
                    .canary
                    .harmless_baseline
                    .replace(now)
                    .ok_or(TrainError::NoBaseline)?;
                set.values(&before)
            }
        };
        self.state.canary.target = Some(target);
        self.state.canary.set = Some(set.clone());
        self.state.canary.baseline = Some(post.clone());
        Ok(Outcome::Canaries {
            cycle,
            pre: Box::new(pre),
            post: Box::new(post),
            set: Box::new(set),
        })
    }
}
