//! The method's two optimizer steps over one skeleton.
//!
//! [`Method::step`] draws the step's rows, computes the whole batch's normalizers, runs one
//! micro-step per micro-batch (accumulating gradients), then clips, takes the AdamW step and
//! reports [`StepMetrics`]. The micro-steps differ only in their terms:
//!
//! - **harmful** (`x ++ y_h`): LAT finds `δ` at the configured residual sites; under it,
//!   `L_adv = (1 − γ)·L_forget + γ·L_KL_imm + ρ·L_ref` (NPO against the cached `ŝ_H(y_h|x)`,
//!   the capped immunization KL against π_H fused with the output head, the refusal term on
//!   `x ++ y_ref` under the same `δ` on the prompt positions the two share, `lat.refusal`);
//! - **harmless** (`x ++ y_c`): `L_align = (1 − α)·L_DPO + α·KL(π_B ‖ π_θ) + λ_stab·L_stab`,
//!   the canaries' means read from the same forward that computes the DPO term.
//!
//! Both start from [`Micro::new`] (the micro-batch's padded batch, targets, mask and token
//! count) and [`Method::score`] (the student's fused `ŝ` over it), and every term goes
//! through [`term`] (checked finite, summed into the step's record).
//!
//! Accumulation: every micro-batch's term is scaled by its share of the step's rows (batch
//! means: NPO, DPO, `L_stab`) or counted tokens (token means: the KL terms, SFT), so the
//! summed gradient is the whole batch's. `L_stab` is the exception: the MSE of a batch mean
//! is not a sum over rows, so under accumulation it is the mean of the micro-batches' MSEs.

use std::time::Instant;

use antibody_base::Example;
use antibody_canary::{CanarySet, canary_means, stab_loss};
use antibody_finetune::optim::{apply_step, scaled};
use antibody_lat::{Positions, RefusalDelta};
use antibody_losses::combine::{
    AdvKl, ContrastLoss, ForgetLoss, NpoReference, PrefLoss, RefusalLoss,
};
use antibody_losses::{
    HeadKl, HeadLogprob, KlDirection, NextTokenTargets, dpo, fused_sequence_loss,
    head_immunization, head_kl_loss, npo,
};
use antibody_model::{Hooks, Llama, TokenBatch};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use crate::TrainError;
use crate::config::OptimizerState;
use crate::error::check;
use crate::method::Method;
use crate::metrics::StepMetrics;
use crate::plan::{opens_phase, schedule_position};

/// Term values of one step, summed over micro-batches.
#[derive(Default)]
struct Sums {
    forget: Option<f64>,
    kl: Option<f64>,
    cap_bound: f64,
    refusal: Option<f64>,
    retain: Option<f64>,
    contrast: Option<f64>,
    pref: Option<f64>,
    kl_align: Option<f64>,
    stab: Option<f64>,
    logp: f64,
    margin: Option<f64>,
    lat: Option<(f64, f64)>,
    lat_norm: Option<f64>,
    tokens: usize,
}

fn add(slot: &mut Option<f64>, v: f64) {
    *slot = Some(slot.unwrap_or(0.0) + v);
}

/// Checks a term's value, adds it to its slot of the step's record, and passes it on.
fn term<B: Backend>(
    step: usize,
    name: &str,
    slot: &mut Option<f64>,
    t: Tensor<B, 1>,
) -> Result<Tensor<B, 1>, TrainError> {
    let v = scalar(&t);
    check(step, name, v)?;
    add(slot, v);
    Ok(t)
}

/// A micro-batch of examples, padded, with its next-token targets on the device.
struct Micro<B: Backend> {
    batch: TokenBatch,
    targets: Tensor<B, 2, burn::tensor::Int>,
    mask: Tensor<B, 2>,
    /// The flat positions where `mask` is not 0 (`None`: all or none): the output head's
    /// work is restricted to them.
    rows: Option<Tensor<B, 1, burn::tensor::Int>>,
    /// Counted (response) tokens.
    tokens: f32,
}

impl<B: Backend> Micro<B> {
    /// Pads `seqs` and counts their real tokens into `sums`.
    fn new(seqs: &[Example], pad: u32, device: &B::Device, sums: &mut Sums) -> Self {
        let ids: Vec<Vec<u32>> = seqs.iter().map(|e| e.ids.clone()).collect();
        let batch = TokenBatch::right_padded(&ids, pad);
        let t = NextTokenTargets::new(seqs, pad);
        sums.tokens += batch.mask.iter().filter(|&&m| m).count();
        Self {
            batch,
            targets: t.targets_tensor::<B>(device),
            mask: t.mask_tensor::<B>(device),
            rows: t.rows_tensor::<B>(device),
            tokens: t.mask.iter().sum(),
        }
    }
}

impl<B: AutodiffBackend> Method<B> {
    /// One optimizer step of the harmful (`harmful`) or harmless phase: the `k`-th batch of
    /// its order.
    pub(crate) fn step(
        &mut self,
        harmful: bool,
        cycle: usize,
        k: usize,
    ) -> Result<StepMetrics, TrainError> {
        let started = Instant::now();
        let step = self.state.step;
        let bs = self.config.batch_size;
        let rows: Vec<usize> = self.batch_rows(harmful, k).to_vec();
        let micro = bs.div_ceil(self.config.optim.accumulation).max(1);
        let totals = self.normalizers(harmful, &rows);
        if totals[0] == 0.0 {
            return Err(antibody_finetune::FinetuneError::EmptyBatch { step }.into());
        }
        // The harmless rows of the retain and contrast terms (harmful steps with
        // `adv.retain > 0` or `adv.contrast > 0`), split into the same micro-batches.
        let retain_rows: Vec<usize> = if harmful && self.config.adv.reads_harmless() {
            self.retain_order[k * bs..(k + 1) * bs].to_vec()
        } else {
            Vec::new()
        };
        let retain_total = self.chosen_tokens(&retain_rows);
        let mut acc = GradientsAccumulator::<Llama<B>>::new();
        let mut sums = Sums::default();
        let mut loss_total = 0.0;
        let loss_scale = self.config.optim.loss_scale_for(self.model.compute_dtype);
        for (i, part) in rows.chunks(micro).enumerate() {
            let share = part.len() as f64 / bs as f64;
            let retain_part = retain_rows.chunks(micro).nth(i).unwrap_or(&[]);
            let loss = if harmful {
                let loss = self.harmful_micro(part, retain_part, share, totals, &mut sums, step)?;
                let rows_share = retain_part.len() as f64 / retain_rows.len().max(1) as f64;
                let benign = self.benign_micro(
                    retain_part,
                    part,
                    retain_total,
                    rows_share,
                    &mut sums,
                    step,
                )?;
                match benign {
                    Some(terms) => loss + terms,
                    None => loss,
                }
            } else {
                self.harmless_micro(part, share, totals[0], &mut sums, step)?
            };
            let value = scalar(&loss);
            check(step, "loss", value)?;
            loss_total += value;
            acc.accumulate(
                &self.model,
                GradientsParams::from_grads(scaled(loss, loss_scale).backward(), &self.model),
            );
        }
        let cursor = self.state.cursor;
        let (index, span) = schedule_position(&self.plan, cursor, self.config.lr_scope);
        let lr = self.config.optim.lr_at(index, span);
        let fresh = || self.config.optim.adamw().init::<B, Llama<B>>();
        if self.config.optimizer_state == OptimizerState::Reset && opens_phase(&self.plan, cursor) {
            self.optim = fresh();
        }
        let optim = match (&mut self.optim_harmless, harmful) {
            (Some(own), false) => own,
            _ => &mut self.optim,
        };
        let (model, grad_norm) = apply_step(
            self.model.clone(),
            optim,
            acc.grads(),
            &self.config.optim,
            lr,
            step,
            loss_scale,
        )?;
        self.model = model;
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
            retain: sums.retain,
            contrast: sums.contrast,
            pref: sums.pref,
            kl_align: sums.kl_align,
            stab: sums.stab,
            harmful_logp: harmful.then_some(sums.logp / tokens_total),
            chosen_logp: (!harmful).then_some(sums.logp / tokens_total),
            dpo_margin: sums.margin.map(|m| m / bs as f64),
            lat_loss_start: sums.lat.map(|l| l.0),
            lat_loss_end: sums.lat.map(|l| l.1),
            lat_residual_norm: sums.lat_norm,
            grad_norm,
            lr,
            tokens: sums.tokens,
            tokens_per_s: sums.tokens as f64 / seconds.max(1e-9),
            seconds,
            canaries: self.state.canary.set.as_ref().map_or(0, CanarySet::count),
        })
    }

    /// The whole batch's counted tokens: `[y_h, y_ref]` (harmful) or `[y_c, 0]` (harmless).
    fn normalizers(&self, harmful: bool, rows: &[usize]) -> [f32; 2] {
        let pad = self.model.config.pad_token_id;
        let count = |seqs: Vec<Example>| NextTokenTargets::new(&seqs, pad).mask.iter().sum::<f32>();
        let harmful_rows = || rows.iter().map(|&i| &self.data.harmful[i]);
        if harmful {
            [
                count(harmful_rows().map(|e| e.harmful.clone()).collect()),
                count(harmful_rows().filter_map(|e| e.refusal.clone()).collect()),
            ]
        } else {
            let chosen = rows.iter().map(|&i| self.data.harmless[i].chosen.clone());
            [count(chosen.collect()), 0.0]
        }
    }

    /// Counted tokens of the harmless rows' helpful answers `y_c`.
    fn chosen_tokens(&self, rows: &[usize]) -> f32 {
        let pad = self.model.config.pad_token_id;
        let chosen: Vec<Example> = rows
            .iter()
            .map(|&i| self.data.harmless[i].chosen.clone())
            .collect();
        NextTokenTargets::new(&chosen, pad).mask.iter().sum()
    }

    /// The harmless terms of a harmful micro-step on `part` (harmless rows), unperturbed, from
    /// one forward of `x ++ y_c`: `η·retain + κ·contrast` (the contrast's DPO form; the rank
    /// form is in [`Self::harmful_micro`]). Retain is `KL(π_B ‖ π_θ)` on the helpful answers,
    /// as their share of the step's `total` counted tokens. Contrast is DPO of `y_c` over the
    /// refusal this step teaches: row `j`'s rejected answer is the `y_ref` of the step's
    /// harmful row `harmful[j]` after the harmless prompt, so the same refusal is raised after
    /// the harmful prompt and lowered after the harmless one in one update; the reference is
    /// the benign teacher, β and length normalization are `[align]`'s, and the term is the
    /// rows' `share` of the step's batch.
    fn benign_micro(
        &self,
        part: &[usize],
        harmful: &[usize],
        total: f32,
        share: f64,
        sums: &mut Sums,
        step: usize,
    ) -> Result<Option<Tensor<B, 1>>, TrainError> {
        let adv = &self.config.adv;
        let dpo_contrast = adv.contrast() == Some(ContrastLoss::Dpo);
        if part.is_empty() || !(adv.retain > 0.0 || dpo_contrast) {
            return Ok(None);
        }
        let chosen: Vec<Example> = part
            .iter()
            .map(|&i| self.data.harmless[i].chosen.clone())
            .collect();
        let device = self.model.device();
        let mut scratch = Sums::default();
        let m = Micro::<B>::new(
            &chosen,
            self.model.config.pad_token_id,
            &device,
            &mut scratch,
        );
        sums.tokens += scratch.tokens;
        let hidden = self.model.forward_hidden(&m.batch, &Hooks::none())?.hidden;
        let head = self.model.head_weight();
        let mut out: Option<Tensor<B, 1>> = None;
        if dpo_contrast {
            let rejected: Vec<Example> = part
                .iter()
                .enumerate()
                .map(|(j, &i)| self.refusal_after(i, harmful[j % harmful.len()]))
                .collect();
            let both: Vec<Example> = chosen.iter().chain(&rejected).cloned().collect();
            let reference = antibody_finetune::sequence_logprobs(
                &self.benign_teacher,
                &both,
                both.len(),
                self.config.vocab_chunk,
            )?;
            let (bc, br) = reference.split_at(part.len());
            let s_c = self.score(hidden.clone(), head.clone(), &m);
            let c_values = host(s_c.values());
            let (t, _) = self.preference(
                (&chosen, &s_c, &c_values),
                &rejected,
                [bc, br],
                head.clone(),
                sums,
            )?;
            let t = term(step, "contrast", &mut sums.contrast, t * share)? * adv.contrast;
            out = Some(t);
        }
        if adv.retain > 0.0 && total > 0.0 {
            let kl = self.benign_kl(&m, hidden, head, KlDirection::Forward)?;
            let t = kl * f64::from(m.tokens / total);
            let t = term(step, "retain", &mut sums.retain, t)? * adv.retain;
            out = Some(match out {
                Some(o) => o + t,
                None => t,
            });
        }
        Ok(out)
    }

    /// Harmless row `i`'s prompt followed by harmful row `h`'s refusal (the response tokens
    /// of its `x ++ y_ref`).
    fn refusal_after(&self, i: usize, h: usize) -> Example {
        let prompt = &self.data.harmless[i].prompt;
        let harmful = &self.data.harmful[h];
        let refusal = harmful
            .refusal
            .as_ref()
            .expect("Method::new checks that every harmful row has a refusal");
        let start = harmful.prompt.len();
        let mut ids = prompt.clone();
        ids.extend_from_slice(&refusal.ids[start..]);
        let mut response_mask = vec![false; prompt.len()];
        response_mask.extend_from_slice(&refusal.response_mask[start..]);
        Example { ids, response_mask }
    }

    /// DPO of the chosen answers (`chosen`: the sequences, their fused `ŝ` and its values)
    /// over `rejected` (scored here, unperturbed), against the benign teacher's per-row values
    /// `reference` (`[chosen, rejected]`), with `[align]`'s β and length normalization: the
    /// mean over the rows, and the rows' summed margin.
    fn preference(
        &self,
        chosen: (&[Example], &HeadLogprob<B>, &[f32]),
        rejected: &[Example],
        reference: [&[f32]; 2],
        head: Tensor<B, 2>,
        sums: &mut Sums,
    ) -> Result<(Tensor<B, 1>, f64), TrainError> {
        let (chosen, s_c, c_values) = chosen;
        let align = &self.config.align;
        let device = self.model.device();
        let s_r = self.score_side(rejected, head, &Hooks::none(), sums)?;
        let r_values = host(s_r.values());
        // Per-token means under `align.length_normalized`: every sequence log-probability
        // over its counted tokens.
        let lengths = |seqs: &[Example]| -> Vec<f32> {
            seqs.iter()
                .map(|e| {
                    if align.length_normalized {
                        let n = e.response_mask.iter().skip(1).filter(|&&m| m).count();
                        n.max(1) as f32
                    } else {
                        1.0
                    }
                })
                .collect()
        };
        let (len_c, len_r) = (lengths(chosen), lengths(rejected));
        let [bc, br] = reference;
        let margin: f64 = (0..chosen.len())
            .map(|j| f64::from((c_values[j] - bc[j]) / len_c[j] - (r_values[j] - br[j]) / len_r[j]))
            .sum();
        let tensor = |vals: Vec<f32>| -> Tensor<B, 1> {
            let n = vals.len();
            Tensor::from_data(TensorData::new(vals, [n]), &device)
        };
        let per_row =
            |v: &[f32], lens: &[f32]| tensor(v.iter().zip(lens).map(|(x, l)| x / l).collect());
        let (bc, br) = (per_row(bc, &len_c), per_row(br, &len_r));
        let (lc, lr) = (tensor(len_c), tensor(len_r));
        let loss = fused_sequence_loss(&[s_c, &s_r], |v| {
            dpo(v[0].clone() / lc, bc, v[1].clone() / lr, br, align.beta)
        });
        Ok((loss, margin))
    }

    /// The KL between the benign teacher and the student on `m`'s counted tokens (mean over
    /// them), fused with the output heads: the alignment KL and the retain term.
    fn benign_kl(
        &self,
        m: &Micro<B>,
        hidden: Tensor<B, 3>,
        head: Tensor<B, 2>,
        direction: KlDirection,
    ) -> Result<Tensor<B, 1>, TrainError> {
        let teacher = self
            .benign_teacher
            .forward_hidden(&m.batch, &Hooks::none())?
            .hidden;
        let kl = HeadKl::new(
            Tensor::from_inner(teacher),
            Tensor::from_inner(self.benign_teacher.head_weight()),
            hidden,
            head,
            direction,
            m.rows.clone(),
            self.config.vocab_chunk,
        );
        Ok(head_kl_loss(&kl, m.mask.clone()))
    }

    /// The student's fused `ŝ` over a micro-batch's hidden states (`head`: the student's
    /// output head, one tensor per micro-step, so its gradient gathers in one node).
    fn score(&self, hidden: Tensor<B, 3>, head: Tensor<B, 2>, m: &Micro<B>) -> HeadLogprob<B> {
        HeadLogprob::new(
            hidden,
            head,
            m.targets.clone(),
            m.mask.clone(),
            m.rows.clone(),
            self.config.vocab_chunk,
        )
    }

    /// A second sequence of the same rows (`y_ref`, `y_r`): its own forward (under `hooks`),
    /// scored.
    fn score_side(
        &self,
        seqs: &[Example],
        head: Tensor<B, 2>,
        hooks: &Hooks<B>,
        sums: &mut Sums,
    ) -> Result<HeadLogprob<B>, TrainError> {
        let device = self.model.device();
        let m = Micro::<B>::new(seqs, self.model.config.pad_token_id, &device, sums);
        let hidden = self.model.forward_hidden(&m.batch, hooks)?.hidden;
        Ok(self.score(hidden, head, &m))
    }

    /// Per-row values of a cached teacher column, as a tensor.
    fn pick(&self, part: &[usize], column: &[f32]) -> Tensor<B, 1> {
        let vals: Vec<f32> = part.iter().map(|&i| column[i]).collect();
        Tensor::from_data(TensorData::new(vals, [part.len()]), &self.model.device())
    }

    /// The LAT attack on a harmful micro-batch (none when LAT is off); its first and last
    /// losses go into the record.
    fn lat_attack(
        &self,
        seqs: &[Example],
        m: &Micro<B>,
        share: f64,
        sums: &mut Sums,
    ) -> Result<Option<antibody_lat::Attack<B>>, TrainError> {
        let cfg = &self.config;
        if !(cfg.lat.enabled && cfg.lat.epsilon > 0.0) {
            return Ok(None);
        }
        let device = self.model.device();
        let shape = [m.batch.batch, m.batch.seq];
        let positions = match cfg.lat.positions {
            Positions::All => float_mask::<B>(&m.batch.mask, shape, &device),
            Positions::Response => response_positions::<B>(seqs, m.batch.seq, &device),
        };
        let attack = antibody_lat::attack(
            &self.model,
            &m.batch,
            m.targets.clone(),
            m.mask.clone(),
            m.rows.clone(),
            positions,
            &cfg.lat,
        )?;
        let first = attack.losses.first().copied().map_or(f64::NAN, f64::from);
        let last = attack.losses.last().copied().map_or(f64::NAN, f64::from);
        let prev = sums.lat.unwrap_or((0.0, 0.0));
        sums.lat = Some((prev.0 + first * share, prev.1 + last * share));
        let norms = &attack.residual_norms;
        if !norms.is_empty() {
            let mean = norms.iter().map(|(_, n)| f64::from(*n)).sum::<f64>() / norms.len() as f64;
            add(&mut sums.lat_norm, mean * share);
        }
        Ok(Some(attack))
    }

    /// The hooks of the refusal forward over `refs` (the rows of `part` that have a refusal,
    /// in order): under `lat.refusal = "prompt"`, the attack's `δ` on the prompt positions
    /// `x ++ y_ref` shares with `x ++ y_h`; under `"away"`, that plus a second attack on the
    /// refusal's own positions that makes `y_ref` unlikely; under `"none"`, none.
    fn refusal_hooks(
        &self,
        attack: Option<&antibody_lat::Attack<B>>,
        part: &[usize],
        refs: &[Example],
    ) -> Result<Hooks<B>, TrainError> {
        let Some(attack) = attack else {
            return Ok(Hooks::none());
        };
        if self.config.lat.refusal == RefusalDelta::None {
            return Ok(Hooks::none());
        }
        let with: Vec<usize> = (0..part.len())
            .filter(|&j| self.data.harmful[part[j]].refusal.is_some())
            .collect();
        let lens: Vec<usize> = with
            .iter()
            .map(|&j| self.data.harmful[part[j]].prompt.len())
            .collect();
        let t_ref = refs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let device = self.model.device();
        let rows = Tensor::<B, 1, burn::tensor::Int>::from_data(
            TensorData::new(
                with.iter().map(|&j| j as i64).collect::<Vec<_>>(),
                [with.len()],
            ),
            &device,
        );
        let shared: Vec<(antibody_model::Site, Tensor<B, 3>)> = attack
            .deltas
            .iter()
            .map(|(site, d)| {
                let d = if with.len() == part.len() {
                    d.clone()
                } else {
                    d.clone().select(0, rows.clone())
                };
                (*site, antibody_lat::prompt_shared(d, &lens, t_ref))
            })
            .collect();
        if self.config.lat.refusal == RefusalDelta::Prompt {
            return Ok(shared
                .into_iter()
                .fold(Hooks::none(), |h, (site, d)| h.with_perturbation(site, d)));
        }
        // The refusal-suppressing attack on the refusal's response positions, the prompt's
        // perturbation held in place.
        let mut scratch = Sums::default();
        let m = Micro::<B>::new(refs, self.model.config.pad_token_id, &device, &mut scratch);
        let seq = m.batch.seq;
        let positions = response_positions::<B>(refs, seq, &device);
        let fixed: Vec<Tensor<B, 3>> = shared.into_iter().map(|(_, d)| d).collect();
        let away = antibody_lat::attack_with(
            &self.model,
            &m.batch,
            m.targets.clone(),
            m.mask.clone(),
            m.rows.clone(),
            positions,
            &self.config.lat,
            antibody_lat::Objective::Away,
            &fixed,
        )?;
        Ok(away.hooks())
    }

    /// The harmful terms of a micro-step on `part` (harmful rows); `paired`: the harmless rows
    /// of the retain and contrast terms, row `j` with `part[j]` (the rank contrast reads them
    /// here).
    fn harmful_micro(
        &self,
        part: &[usize],
        paired: &[usize],
        share: f64,
        totals: [f32; 2],
        sums: &mut Sums,
        step: usize,
    ) -> Result<Tensor<B, 1>, TrainError> {
        let adv = &self.config.adv;
        let needs = adv.needs();
        let seqs: Vec<Example> = part
            .iter()
            .map(|&i| self.data.harmful[i].harmful.clone())
            .collect();
        let m = Micro::<B>::new(
            &seqs,
            self.model.config.pad_token_id,
            &self.model.device(),
            sums,
        );
        let token_share = f64::from(m.tokens / totals[0]);
        let attack = self.lat_attack(&seqs, &m, share, sums)?;
        let hooks = attack
            .as_ref()
            .map_or_else(Hooks::none, antibody_lat::Attack::hooks);
        let hidden = self.model.forward_hidden(&m.batch, &hooks)?.hidden;
        let head = self.model.head_weight();
        let s_h = self.score(hidden.clone(), head.clone(), &m);
        sums.logp += host(s_h.values())
            .iter()
            .map(|&x| f64::from(x))
            .sum::<f64>();
        let forget = if needs.first {
            let t = match adv.forget {
                ForgetLoss::Npo => {
                    let reference = match adv.npo_reference {
                        NpoReference::HarmfulTeacher => self.pick(part, &self.cache.harmful_h),
                        NpoReference::Initial => self.pick(part, &self.cache.initial_h),
                    };
                    fused_sequence_loss(&[&s_h], |v| {
                        npo(v[0].clone(), reference, adv.beta, adv.npo_scaled)
                    }) * share
                }
                ForgetLoss::GradientAscent => {
                    fused_sequence_loss(&[&s_h], |v| v[0].clone().sum() / totals[0])
                }
                ForgetLoss::Entropy => {
                    antibody_losses::entropy_loss(self.model.logits(hidden.clone()), m.mask.clone())
                        * token_share
                }
                ForgetLoss::None => unreachable!("needs.first is false for `none`"),
            };
            Some(term(step, "forget", &mut sums.forget, t)?)
        } else {
            None
        };
        let kl = if needs.kl {
            let teacher = self
                .harmful_teacher
                .forward_hidden(&m.batch, &Hooks::none())?
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
                m.rows.clone(),
                self.config.vocab_chunk,
            );
            let (t, rate) = head_immunization(&kl, m.mask.clone(), adv.kl_cap);
            sums.cap_bound += rate * f64::from(m.tokens);
            Some(term(step, "kl_imm", &mut sums.kl, t * token_share)?)
        } else {
            None
        };
        let rank = adv.contrast() == Some(ContrastLoss::Rank) && !paired.is_empty();
        let (refusal, contrast) = if needs.third || rank {
            let refs: Vec<Example> = part
                .iter()
                .filter_map(|&i| self.data.harmful[i].refusal.clone())
                .collect();
            let ref_hooks = self.refusal_hooks(attack.as_ref(), part, &refs)?;
            let s_ref = self.score_side(&refs, head.clone(), &ref_hooks, sums)?;
            let refusal = if needs.third {
                let t = match adv.refusal {
                    RefusalLoss::Sft => {
                        fused_sequence_loss(&[&s_ref], |v| v[0].clone().sum().neg() / totals[1])
                    }
                    RefusalLoss::Dpo => {
                        let b_ref = self.pick(part, &self.cache.benign_ref);
                        let b_h = self.pick(part, &self.cache.benign_h);
                        fused_sequence_loss(&[&s_ref, &s_h], |v| {
                            dpo(v[0].clone(), b_ref, v[1].clone(), b_h, adv.beta)
                        }) * share
                    }
                };
                Some(term(step, "refusal", &mut sums.refusal, t)?)
            } else {
                None
            };
            // The rank contrast: the same refusal after the paired harmless prompt (every
            // harmful row has a refusal when the contrast is on, so `refs` is `part`'s rows).
            let contrast = if rank {
                let after: Vec<Example> = part
                    .iter()
                    .enumerate()
                    .map(|(j, &h)| self.refusal_after(paired[j % paired.len()], h))
                    .collect();
                let s_after = self.score_side(&after, head, &Hooks::none(), sums)?;
                let zeros = || Tensor::<B, 1>::zeros([part.len()], &self.model.device());
                let beta = self.config.align.beta;
                let t = fused_sequence_loss(&[&s_ref, &s_after], |v| {
                    dpo(v[0].clone(), zeros(), v[1].clone(), zeros(), beta)
                }) * share;
                Some(term(step, "contrast", &mut sums.contrast, t)? * adv.contrast)
            } else {
                None
            };
            (refusal, contrast)
        } else {
            (None, None)
        };
        let loss = adv
            .combine(forget, kl, refusal)
            .ok_or(TrainError::NoTerms { section: "adv" })?;
        Ok(match contrast {
            Some(c) => loss + c,
            None => loss,
        })
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
        let chosen: Vec<Example> = part
            .iter()
            .map(|&i| self.data.harmless[i].chosen.clone())
            .collect();
        let m = Micro::<B>::new(&chosen, self.model.config.pad_token_id, &device, sums);
        let canaries = match (&self.state.canary.set, &self.state.canary.target) {
            (Some(set), Some(target)) if needs.third && cfg.canary.enabled && set.count() > 0 => {
                Some((set, target))
            }
            _ => None,
        };
        let hooks = canaries.map_or_else(Hooks::none, |(set, _)| Hooks::capture(set.sites()));
        let out = self.model.forward_hidden(&m.batch, &hooks)?;
        let head = self.model.head_weight();
        let s_c = self.score(out.hidden.clone(), head.clone(), &m);
        let c_values = host(s_c.values());
        sums.logp += c_values.iter().map(|&x| f64::from(x)).sum::<f64>();
        let pref = if needs.first {
            let t = match align.pref {
                PrefLoss::Dpo => {
                    let rejected: Vec<Example> = part
                        .iter()
                        .map(|&i| self.data.harmless[i].rejected.clone())
                        .collect();
                    let pick = |v: &[f32]| -> Vec<f32> { part.iter().map(|&i| v[i]).collect() };
                    let (bc, br) = (pick(&self.cache.benign_c), pick(&self.cache.benign_r));
                    let (loss, margin) = self.preference(
                        (&chosen, &s_c, &c_values),
                        &rejected,
                        [&bc, &br],
                        head.clone(),
                        sums,
                    )?;
                    add(&mut sums.margin, margin);
                    loss * share
                }
                PrefLoss::Sft => {
                    fused_sequence_loss(&[&s_c], |v| v[0].clone().sum().neg() / total_tokens)
                }
            };
            Some(term(step, "pref", &mut sums.pref, t)?)
        } else {
            None
        };
        let kl = if needs.kl {
            let kl = self.benign_kl(&m, out.hidden.clone(), head, align.kl)?;
            let t = kl * f64::from(m.tokens / total_tokens);
            Some(term(step, "kl_align", &mut sums.kl_align, t)?)
        } else {
            None
        };
        let stab = match canaries {
            Some((set, target)) => {
                let shape = [m.batch.batch, m.batch.seq];
                let real = float_mask::<B>(&m.batch.mask, shape, &device);
                let current = canary_means(&out.sites, real, set)?;
                let t = stab_loss(current, target) * share;
                Some(term(step, "stab", &mut sums.stab, t)?)
            }
            None => None,
        };
        align
            .combine(pref, kl, stab)
            .ok_or(TrainError::NoTerms { section: "align" })
    }
}

/// `[b, seq]`: 1 on each row's response tokens (right-padded rows), 0 elsewhere.
fn response_positions<B: Backend>(
    seqs: &[Example],
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mask: Vec<bool> = seqs
        .iter()
        .flat_map(|e| (0..seq).map(move |i| i < e.ids.len() && e.response_mask[i]))
        .collect();
    float_mask::<B>(&mask, [seqs.len(), seq], device)
}

fn float_mask<B: Backend>(m: &[bool], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    let v: Vec<f32> = m.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    antibody_losses::sync::read(t)
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    host(t.clone()).first().copied().map_or(f64::NAN, f64::from)
}
