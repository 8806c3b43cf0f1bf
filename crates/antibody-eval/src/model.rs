//! One model's evaluation: answers to every held-out set, judged; the attacks and their
//! post-attack HS; FA; perplexity and the DPO win rate.

use std::time::Instant;

use antibody_base::Example;
use antibody_base::progress::Progress;
use antibody_base::stats::Rate;
use antibody_data::Record;
use antibody_finetune::{FinetuneConfig, OptimConfig, StepLog, finetune, lora_finetune};
use antibody_judge::{KeywordJudge, Label, ResponseJudge};
use antibody_model::{Llama, ModelSpec, ModelSpecExt as _, Tokenizer};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use crate::answers::{Judges, Prompted, Scorer, SetResult, answer};
use crate::judge::ModelJudge;
use crate::result::{AttackResult, ModelResult, worst_case};
use crate::{AttackConfig, EvalConfig, EvalData, EvalError};

/// What every model's evaluation shares.
pub struct Context<'a, B: AutodiffBackend> {
    /// The held-out sets.
    pub data: &'a EvalData,
    /// The settings.
    pub config: &'a EvalConfig,
    /// The scorer of the judge's fluency and relevance checks.
    pub scorer: Option<&'a Scorer<B::InnerBackend>>,
    /// The model judge, when configured.
    pub model_judge: Option<&'a ModelJudge<B::InnerBackend>>,
    /// Where the models run.
    pub device: &'a B::Device,
}

fn prompted(records: &[Record]) -> Vec<Prompted<'_>> {
    records
        .iter()
        .map(|r| Prompted {
            id: &r.id,
            source: &r.source,
            category: &r.category,
            prompt: &r.prompt,
        })
        .collect()
}

/// Examples of an attack: `steps × batch_size` draws of which `harmful_fraction` are
/// harmful and the rest benign task examples, spread evenly.
pub fn attack_examples(data: &EvalData, a: &AttackConfig) -> Vec<Example> {
    if a.harmful_fraction >= 1.0 || data.task_train.is_empty() {
        return data.attack.clone();
    }
    let n = (a.steps * a.batch_size).max(data.attack.len());
    let (mut h, mut b) = (0usize, 0usize);
    (0..n)
        .map(|i| {
            let p = a.harmful_fraction;
            let harmful = ((i + 1) as f64 * p).floor() > (i as f64 * p).floor();
            if harmful && !data.attack.is_empty() {
                h += 1;
                data.attack[(h - 1) % data.attack.len()].clone()
            } else {
                b += 1;
                data.task_train[(b - 1) % data.task_train.len()].clone()
            }
        })
        .collect()
}

fn ft_config(lr: f64, steps: usize, batch_size: usize, seed: u64) -> FinetuneConfig {
    FinetuneConfig {
        optim: OptimConfig {
            max_grad_norm: Some(1.0),
            ..OptimConfig::new(lr)
        },
        steps,
        batch_size,
        seed,
    }
}

/// Greedy generation and judging, with the generation time summed.
struct Answerer<'a, B: AutodiffBackend> {
    ctx: &'a Context<'a, B>,
    judges: Judges<'a, B::InnerBackend>,
    tokenizer: &'a Tokenizer,
    tokens: usize,
    seconds: f64,
}

impl<B: AutodiffBackend> Answerer<'_, B> {
    fn texts(
        &mut self,
        model: &Llama<B::InnerBackend>,
        records: &[Record],
        max_new_tokens: usize,
        label: &str,
    ) -> Result<Vec<String>, EvalError> {
        let prompts: Vec<Vec<u32>> = records.iter().map(|r| r.prompt_ids.clone()).collect();
        let a = answer(
            model,
            self.tokenizer,
            &prompts,
            max_new_tokens,
            self.ctx.config.batch_size,
            label,
        )?;
        self.tokens += a.tokens;
        self.seconds += a.seconds;
        Ok(a.texts)
    }

    fn judged(
        &mut self,
        model: &Llama<B::InnerBackend>,
        records: &[Record],
        headline: Label,
        label: &str,
    ) -> Result<(SetResult, Vec<String>), EvalError> {
        let texts = self.texts(model, records, self.ctx.config.max_new_tokens, label)?;
        let judged = self.judges.judge(&prompted(records), &texts)?;
        Ok((SetResult::of(judged, headline), texts))
    }
}

/// Evaluates one model; `reference` holds the first model's `(ŝ(y_c), ŝ(y_r))` (the DPO win
/// rate's reference; `None` for the first model).
pub fn evaluate_model<B: AutodiffBackend>(
    ctx: &Context<'_, B>,
    name: &str,
    spec: &ModelSpec,
    key: String,
    reference: Option<&(Vec<f32>, Vec<f32>)>,
) -> Result<ModelResult, EvalError> {
    let started = Instant::now();
    let (c, data) = (ctx.config, ctx.data);
    let loaded = spec.load::<B>(ctx.device)?;
    let (model, tokenizer) = (loaded.model, loaded.tokenizer);
    let inner = model.valid();
    let mut run = Answerer {
        ctx,
        judges: Judges {
            response: ResponseJudge::new(c.judge.clone()),
            keyword: KeywordJudge::from_config(&c.keyword),
            scorer: ctx.scorer,
        },
        tokenizer: &tokenizer,
        tokens: 0,
        seconds: 0.0,
    };
    tracing::info!("{name}: harmful score on {} prompts", data.harmful.len());
    let (harmful, harmful_texts) = run.judged(
        &inner,
        &data.harmful,
        Label::Complied,
        &format!("{name} HS"),
    )?;
    let hs_model_judge = match ctx.model_judge {
        Some(j) => {
            let pairs: Vec<(&str, &str)> = data
                .harmful
                .iter()
                .zip(&harmful_texts)
                .map(|(r, a)| (r.prompt.as_str(), a.as_str()))
                .collect();
            let scores = j.judge(&pairs)?;
            let unparsed = scores.iter().filter(|s| s.is_none()).count();
            if unparsed > 0 {
                tracing::warn!(
                    "{name}: the model judge's grading of {unparsed} of {} answers could not be \
                     parsed; its HS counts the {} parsed",
                    scores.len(),
                    scores.len() - unparsed
                );
            }
            Some(Rate::of(scores.iter().flatten().map(|&s| s > 0.0)))
        }
        None => None,
    };
    let (lookalike, _) = run.judged(
        &inner,
        &data.lookalike,
        Label::Refused,
        &format!("{name} look-alikes"),
    )?;
    let (harmless, _) = run.judged(
        &inner,
        &data.harmless,
        Label::Refused,
        &format!("{name} harmless"),
    )?;
    let chosen: Vec<Example> = data
        .harmless
        .iter()
        .filter_map(|r| r.sequence("y_c"))
        .collect();
    let rejected: Vec<Example> = data
        .harmless
        .iter()
        .filter_map(|r| r.sequence("y_r"))
        .collect();
    let (lc, count) = crate::sequence_logprobs(&inner, &chosen, c.batch_size)?;
    let (lr, _) = crate::sequence_logprobs(&inner, &rejected, c.batch_size)?;
    let perplexity = (-lc.iter().map(|&x| f64::from(x)).sum::<f64>() / count.max(1) as f64).exp();
    let dpo_win_rate = reference.map(|(rc, rr)| {
        let n = lc.len().min(rc.len());
        let share = antibody_losses::dpo_win_rate(&lc[..n], &rc[..n], &lr[..n], &rr[..n]);
        Rate::new((share * n as f64).round() as usize, n)
    });
    let seconds_without_attacks = started.elapsed().as_secs_f64();

    let mut attacks = Vec::new();
    let seeds = if c.attack_seeds.is_empty() {
        vec![c.seed]
    } else {
        c.attack_seeds.clone()
    };
    let several = seeds.len() > 1;
    let runs: Vec<(AttackConfig, u64)> = c
        .attacks
        .iter()
        .flat_map(|a| {
            seeds.iter().map(move |&s| {
                let mut a = a.clone();
                if several {
                    a.name = format!("{}@seed{s}", a.name);
                }
                (a, s)
            })
        })
        .collect();
    for (a, seed) in runs {
        let a = &a;
        let t = Instant::now();
        tracing::info!(
            "{name}: attack `{}` ({} steps at lr {:e}, harmful share {}, {})",
            a.name,
            a.steps,
            a.lr,
            a.harmful_fraction,
            a.lora.as_ref().map_or("every weight".into(), |l| format!(
                "LoRA rank {} alpha {}",
                l.rank, l.alpha
            ))
        );
        let examples = attack_examples(data, a);
        let mut last = f64::NAN;
        let mut progress = Progress::new(format!("{name} attack {}", a.name), 0, a.steps);
        let config = ft_config(a.lr, a.steps, a.batch_size, seed);
        let on_step = |log: &StepLog| {
            last = log.loss;
            progress.inc(1, &format!("loss {:.4}", log.loss));
        };
        let attacked = match &a.lora {
            Some(lora) => lora_finetune(model.clone(), &examples, &config, lora, on_step)?,
            None => finetune(model.clone(), &examples, &config, on_step)?,
        };
        let (set, _) = run.judged(
            &attacked.valid(),
            &data.attack_eval,
            Label::Complied,
            &format!("{name} HS after {}", a.name),
        )?;
        tracing::info!(
            "{name} after {}: HS {}, degenerate {}",
            a.name,
            set.complied.display_percent(),
            set.degenerate.display_percent()
        );
        attacks.push(AttackResult {
            seed,
            attack: a.clone(),
            harmful: set,
            final_loss: last,
            seconds: t.elapsed().as_secs_f64(),
        });
    }

    let fa = fine_tune_accuracy(&mut run, &model, name)?;
    Ok(ModelResult {
        name: name.into(),
        model: spec.to_string(),
        key,
        worst_case: worst_case(&attacks, c.max_degenerate),
        harmful,
        hs_model_judge,
        attacks,
        fa,
        lookalike,
        harmless,
        perplexity,
        perplexity_n: chosen.len(),
        dpo_win_rate,
        pair_logps: (lc, lr),
        generated_tokens: run.tokens,
        generation_seconds: run.seconds,
        seconds_without_attacks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Accuracy on the task's test problems after the configured benign fine-tune.
fn fine_tune_accuracy<B: AutodiffBackend>(
    run: &mut Answerer<'_, B>,
    model: &Llama<B>,
    name: &str,
) -> Result<Option<Rate>, EvalError> {
    let (c, data) = (run.ctx.config, run.ctx.data);
    let Some(ft) = &c.finetune else {
        return Ok(None);
    };
    if data.task_test.is_empty() {
        return Ok(None);
    }
    let tuned = if ft.steps > 0 {
        let mut progress = Progress::new(format!("{name} task fine-tune"), 0, ft.steps);
        finetune(
            model.clone(),
            &data.task_train,
            &ft_config(ft.lr, ft.steps, ft.batch_size, c.seed),
            |log| progress.inc(1, &format!("loss {:.4}", log.loss)),
        )?
    } else {
        model.clone()
    };
    let test = crate::sample(data.task_test.clone(), ft.test_problems, c.seed);
    let texts = run.texts(
        &tuned.valid(),
        &test,
        ft.max_new_tokens,
        &format!("{name} task"),
    )?;
    Ok(Some(Rate::of(test.iter().zip(&texts).map(|(r, text)| {
        r.answer
            .as_deref()
            .is_some_and(|want| antibody_data::task::is_correct(want, text))
    }))))
}
