//! The method's trajectory on the tiny model against PyTorch: `tests/reference/method.py`
//! runs the same 2 cycles (LAT + NPO + capped immunization KL + refusal SFT under the prompt's
//! `δ`; canaries;
//! DPO + alignment KL + canary MSE; AdamW, clipping, warmup + cosine) on the same data and
//! records every step's loss terms in `fixtures/method.json`; two variants change how the
//! optimizer crosses phase boundaries (`method_per_phase.json`, `method_reset.json`), one where
//! the canaries' targets and drifts are taken differently (`method_canary_pre.json`).
//!
//! Tolerances: the first step's terms within 1e-4 relative (the same arithmetic in another
//! order); later steps within 2e-3 relative, 1e-4 absolute (differences compound through
//! AdamW); canary counts exact.

use antibody_losses::Example;
use antibody_model::{LlamaConfig, tiny};
use antibody_testkit::{TestAutodiff, TestBackend};
use antibody_train::config::TrainConfig;
use antibody_train::data::{HarmfulExample, HarmlessExample, MethodData, TeacherCache};
use antibody_train::method::{Method, Outcome};
use antibody_train::metrics::StepMetrics;
use burn::tensor::FloatDType;
use burn::tensor::backend::Backend as _;
use serde_json::Value;

fn example(v: &Value, ids: &str, mask: &str) -> Example {
    let ids = v[ids]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect();
    let mask = v[mask]
        .as_array()
        .expect("mask")
        .iter()
        .map(|x| x.as_bool().expect("bool"))
        .collect();
    Example {
        ids,
        response_mask: mask,
    }
}

fn prompt(v: &Value) -> Vec<u32> {
    v["prompt"]
        .as_array()
        .expect("prompt")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn close_abs(what: &str, step: usize, ours: Option<f64>, theirs: &Value, rel: f64, abs: f64) {
    let Some(theirs) = theirs.as_f64() else {
        assert!(
            ours.is_none(),
            "step {step} {what}: PyTorch has none, we have {ours:?}"
        );
        return;
    };
    let ours = ours.unwrap_or_else(|| panic!("step {step} {what}: not recorded"));
    let tol = rel * theirs.abs() + abs * f64::from(u8::from(rel > 1e-4));
    assert!(
        (ours - theirs).abs() <= tol.max(1e-6),
        "step {step} {what}: ours {ours}, PyTorch {theirs} (tolerance {tol:e})"
    );
}

/// The most device reads a harmful step may make with every option on (measured: 11 by
/// default — LAT's attack loss per PGD step (2) and its residual norms (1), the forgetting,
/// KL and refusal terms' checks (3), the cap rate's values and mask (2), the logged
/// log-likelihood (1), the step's loss (1), the gradient norm (1); the retain term adds 1, the
/// refusal-suppressing attack 3, the contrast term 3 in its DPO form, 1 in its rank form) and a harmless one (7: both sides' log-likelihoods, three
/// terms, the loss, the gradient norm). docs/PERFORMANCE.md states them.
const HARMFUL_STEP_READS: u64 = 18;
const HARMLESS_STEP_READS: u64 = 7;

#[test]
fn the_methods_steps_follow_pytorchs_trajectory() {
    follows("method.json");
}

/// Each phase with its own AdamW (moments kept across cycles) and the schedule restarted in
/// every phase block.
#[test]
fn per_phase_optimizers_follow_pytorchs_trajectory() {
    follows("method_per_phase.json");
}

/// Fresh moments at every phase block, the schedule restarted every cycle, and the refusal
/// term trained without the perturbation.
#[test]
fn reset_moments_follow_pytorchs_trajectory() {
    follows("method_reset.json");
}

/// `A_target` from the model before each harmful phase, drifts scaled per site.
#[test]
fn pre_phase_canary_targets_and_normalized_drift_follow_pytorchs_trajectory() {
    follows("method_canary_pre.json");
}

/// A retain term (the benign teacher's KL on harmless answers) in every harmful step, and DPO
/// on per-token means.
#[test]
fn a_retain_term_and_length_normalized_dpo_follow_pytorchs_trajectory() {
    follows("method_retain.json");
}

/// A contrast term (the harmless phase's DPO on a harmless batch) beside a retain term in every
/// harmful step, both from one forward of `x ++ y_c`.
#[test]
fn a_contrast_term_follows_pytorchs_trajectory() {
    follows("method_contrast.json");
}

/// The contrast term's rank form: the step's refusal likelier after its harmful prompt than
/// after the paired harmless one.
#[test]
fn the_rank_contrast_follows_pytorchs_trajectory() {
    follows("method_contrast_rank.json");
}

/// `ε` and the step size as fractions of each token's residual norm at the site.
#[test]
fn a_relative_epsilon_follows_pytorchs_trajectory() {
    follows("method_relative_eps.json");
}

/// The refusal term under the prompt's `δ` plus a second attack that suppresses `y_ref`.
#[test]
fn the_refusal_suppressing_attack_follows_pytorchs_trajectory() {
    follows("method_away.json");
}

/// The method in mixed precision (f16: the projections, attention and MLP in half, loss
/// scale 1024; bf16 where the backend has it) against PyTorch's f32 trajectory. Tolerances
/// (measured on flex, f16 / bf16: the largest relative difference of a loss term 0.18% /
/// 0.72%): every term within 1% (f16) and 4% (bf16) relative plus 2e-3 absolute; the canary
/// selections happen at the same points, their counts may differ by rounding at the
/// quantile.
#[test]
fn the_method_in_half_precision_stays_on_pytorchs_f32_trajectory() {
    let device = Default::default();
    for (dtype, rel) in [(FloatDType::F16, 0.01), (FloatDType::BF16, 0.04)] {
        if TestBackend::supports_dtype(&device, dtype.into()) {
            follows_in("method_per_phase.json", dtype, Tol::half(rel));
        } else {
            assert_eq!(dtype, FloatDType::BF16, "f16 is on every test backend");
        }
    }
}

/// How close each step's terms must be to PyTorch's.
struct Tol {
    first: f64,
    later: f64,
    abs: f64,
    exact_canaries: bool,
}

impl Tol {
    fn f32() -> Self {
        Self {
            first: 1e-4,
            later: 2e-3,
            abs: 1e-4,
            exact_canaries: true,
        }
    }
    fn half(rel: f64) -> Self {
        Self {
            first: rel,
            later: rel,
            abs: 2e-3,
            exact_canaries: false,
        }
    }
}

fn follows(name: &str) {
    follows_in(name, FloatDType::F32, Tol::f32());
}

fn follows_in(name: &str, dtype: FloatDType, tol: Tol) {
    let path = antibody_testkit::fixtures().join(name);
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json");
    let s = &fixture["settings"];
    let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("settings.{k}"));
    let u = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("settings.{k}"));
    let text = |k: &str| s[k].as_str().unwrap_or_else(|| panic!("settings.{k}"));
    let config: TrainConfig = toml::from_str(&format!(
        r#"
        run_dir = "unused"
        student = "tiny:0"
        harmful_teacher = "tiny:1"
        benign_teacher = "tiny:0"
        schedule = "cyclic"
        cycles = {cycles}
        harmful_steps = {hs}
        harmless_steps = {ls}
        batch_size = {bs}
        checkpoint_every = 100
        optimizer_state = "{optimizer_state}"
        lr_scope = "{lr_scope}"
        [optim]
        lr = {lr}
        warmup_steps = {warmup}
        decay = "cosine"
        max_grad_norm = {clip}
        weight_decay = {wd}
        eps = {eps}
        [adv]
        forget = "npo"
        beta = {npo_beta}
        gamma = {gamma}
        kl = "immunization"
        kl_cap = {cap}
        rho = {rho}
        refusal = "sft"
        retain = {retain}
        contrast = {contrast}
        contrast_loss = "{contrast_loss}"
        [align]
        pref = "dpo"
        beta = {dpo_beta}
        alpha = {alpha}
        kl = "forward"
        lambda_stab = {lambda}
        length_normalized = {dpo_length_normalized}
        [lat]
        layers = [1, 2]
        epsilon = {lat_eps}
        steps = {lat_steps}
        positions = "all"
        refusal = "{lat_refusal}"
        epsilon_scale = "{lat_epsilon_scale}"
        [canary]
        q = {q}
        harmful_sample = 4
        harmless_sample = 4
        batch_size = 4
        target = "{canary_target}"
        drift = "{canary_drift}"
        "#,
        cycles = u("cycles"),
        hs = u("harmful_steps"),
        ls = u("harmless_steps"),
        bs = u("batch_size"),
        lr = f("lr"),
        warmup = u("warmup_steps"),
        clip = f("max_grad_norm"),
        wd = f("weight_decay"),
        eps = f("eps_adam"),
        npo_beta = f("npo_beta"),
        gamma = f("gamma"),
        cap = f("kl_cap"),
        rho = f("rho"),
        dpo_beta = f("dpo_beta"),
        alpha = f("alpha"),
        lambda = f("lambda_stab"),
        lat_eps = f("lat_epsilon"),
        lat_steps = u("lat_steps"),
        q = f("q"),
        optimizer_state = text("optimizer_state"),
        lr_scope = text("lr_scope"),
        lat_refusal = text("lat_refusal"),
        canary_target = text("canary_target"),
        canary_drift = text("canary_drift"),
        retain = f("retain"),
        contrast = s["contrast"].as_f64().unwrap_or(0.0),
        contrast_loss = s["contrast_loss"].as_str().unwrap_or("dpo"),
        lat_epsilon_scale = text("lat_epsilon_scale"),
        dpo_length_normalized = s["dpo_length_normalized"].as_bool().expect("a bool"),
    ))
    .expect("config");
    let data = MethodData {
        harmful: fixture["harmful"]
            .as_array()
            .expect("harmful")
            .iter()
            .map(|v| HarmfulExample {
                harmful: example(v, "y_h", "y_h_mask"),
                refusal: Some(example(v, "y_ref", "y_ref_mask")),
                prompt: prompt(v),
            })
            .collect(),
        harmless: fixture["harmless"]
            .as_array()
            .expect("harmless")
            .iter()
            .map(|v| HarmlessExample {
                chosen: example(v, "y_c", "y_c_mask"),
                rejected: example(v, "y_r", "y_r_mask"),
                prompt: prompt(v),
            })
            .collect(),
    };
    let device = Default::default();
    let tiny_cfg = LlamaConfig::tiny_test();
    let student = tiny::random_model::<TestAutodiff>(&tiny_cfg, 0, &device)
        .and_then(|m| m.with_compute_dtype(dtype))
        .expect("student");
    let teacher = |seed| {
        tiny::random_model::<TestBackend>(&tiny_cfg, seed, &device)
            .and_then(|m| m.with_compute_dtype(dtype))
            .expect("teacher")
    };
    let (harmful_teacher, benign_teacher) = (teacher(1), teacher(0));
    let cache = TeacherCache::compute(
        String::new(),
        &harmful_teacher,
        &benign_teacher,
        &benign_teacher,
        &data,
        &config,
    )
    .expect("teacher cache");
    let mut method = Method::new(
        student,
        Vec::new(),
        None,
        harmful_teacher,
        benign_teacher,
        cache,
        data,
        config,
    )
    .expect("method");
    let mut steps: Vec<StepMetrics> = Vec::new();
    let mut counts = Vec::new();
    let mut reads = Vec::new();
    loop {
        let before = antibody_losses::sync::reads();
        let Some((_, outcome)) = method.advance().expect("event") else {
            break;
        };
        match outcome {
            Outcome::Step(m) => {
                reads.push((m.phase.clone(), antibody_losses::sync::reads() - before));
                steps.push(*m);
            }
            Outcome::Canaries { set, .. } => counts.push(set.count()),
            Outcome::Baseline => {}
        }
    }
    // Device reads per optimizer step (each waits for the device on a GPU): a constant of
    // the step's terms, never of the model's size (the gradient norm is one read).
    for (phase, n) in &reads {
        let bound = if phase == "harmful" {
            HARMFUL_STEP_READS
        } else {
            HARMLESS_STEP_READS
        };
        assert!(
            *n <= bound,
            "{name}: a {phase} step read the device {n} times (bound {bound}): {reads:?}"
        );
    }
    eprintln!("{name}: device reads per step {reads:?}");
    let expected_counts: Vec<usize> = fixture["canaries"]
        .as_array()
        .expect("canaries")
        .iter()
        .map(|c| c["count"].as_u64().expect("count") as usize)
        .collect();
    if tol.exact_canaries {
        assert_eq!(counts, expected_counts, "canaries per cycle");
    } else {
        assert_eq!(counts.len(), expected_counts.len(), "canary selections");
        assert!(
            counts.iter().all(|&c| c > 0),
            "{dtype:?}: canaries {counts:?}"
        );
    }
    // The largest relative difference of any term, for the tolerances' doc comment.
    let mut worst = 0.0f64;
    let expected = fixture["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), expected.len());
    for (ours, theirs) in steps.iter().zip(expected) {
        let rel = if ours.step == 0 { tol.first } else { tol.later };
        assert_eq!(ours.phase, theirs["phase"].as_str().expect("phase"));
        let k = ours.step;
        let close = |what: &str, step, ours: Option<f64>, theirs: &Value, rel: f64| {
            close_abs(what, step, ours, theirs, rel, tol.abs);
        };
        for (ours, theirs) in [
            (Some(ours.loss), &theirs["loss"]),
            (ours.forget, &theirs["forget"]),
            (ours.refusal, &theirs["refusal"]),
            (ours.pref, &theirs["pref"]),
            (ours.kl_align, &theirs["kl_align"]),
        ] {
            if let (Some(o), Some(t)) = (ours, theirs.as_f64()) {
                worst = worst.max((o - t).abs() / t.abs().max(1e-3));
            }
        }
        close("loss", k, Some(ours.loss), &theirs["loss"], rel);
        close(
            "grad_norm",
            k,
            Some(ours.grad_norm),
            &theirs["grad_norm"],
            rel,
        );
        close("lr", k, Some(ours.lr), &theirs["lr"], 1e-9);
        close("forget", k, ours.forget, &theirs["forget"], rel);
        close("kl_imm", k, ours.kl_imm, &theirs["kl_imm"], rel);
        close(
            "kl_cap_rate",
            k,
            ours.kl_cap_rate,
            &theirs["kl_cap_rate"],
            1e-9,
        );
        close("refusal", k, ours.refusal, &theirs["refusal"], rel);
        close("retain", k, ours.retain, &theirs["retain"], rel);
        close("contrast", k, ours.contrast, &theirs["contrast"], rel);
        close(
            "harmful_logp",
            k,
            ours.harmful_logp,
            &theirs["harmful_logp"],
            rel,
        );
        close(
            "lat_loss_start",
            k,
            ours.lat_loss_start,
            &theirs["lat_loss_start"],
            rel,
        );
        close(
            "lat_loss_end",
            k,
            ours.lat_loss_end,
            &theirs["lat_loss_end"],
            rel,
        );
        close(
            "lat_residual_norm",
            k,
            ours.lat_residual_norm,
            &theirs["lat_residual_norm"],
            rel,
        );
        close("pref", k, ours.pref, &theirs["pref"], rel);
        close("kl_align", k, ours.kl_align, &theirs["kl_align"], rel);
        close("stab", k, ours.stab, &theirs["stab"], rel);
        close(
            "chosen_logp",
            k,
            ours.chosen_logp,
            &theirs["chosen_logp"],
            rel,
        );
        close("dpo_margin", k, ours.dpo_margin, &theirs["dpo_margin"], rel);
    }
    eprintln!("{name} in {dtype:?}: largest relative difference of a loss term {worst:.2e}");
}
