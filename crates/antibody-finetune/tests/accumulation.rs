//! Gradient accumulation on the tiny model: batch 8 equals 4 micro-batches of 2 (each loss
//! normalized by the whole batch's token count, gradients summed), and one AdamW step from
//! either lands on the same loss; global-norm clipping clips to the norm asked for.

use antibody_finetune::optim::{OptimConfig, clip_global_norm, global_norm};
use antibody_losses::Example;
use antibody_losses::{NextTokenTargets, sft, token_logprobs};
use antibody_model::device::CpuAutodiff;
use antibody_model::{Hooks, Llama, LlamaConfig, TokenBatch, tiny};
use antibody_testkit::{max_abs_diff, tiny_examples};
use burn::module::{ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

type B = CpuAutodiff;

/// Σ nll over response targets / `count` (the whole batch's count).
fn loss(model: &Llama<B>, seqs: &[Example], count: f32) -> Tensor<B, 1> {
    let device = Default::default();
    let t = NextTokenTargets::new(seqs, 2);
    let batch =
        TokenBatch::right_padded(&seqs.iter().map(|s| s.ids.clone()).collect::<Vec<_>>(), 2);
    let (logits, _) = model.forward(&batch, &Hooks::none()).expect("forward");
    let nll = token_logprobs(logits, t.targets_tensor(&device)).neg() * t.mask_tensor::<B>(&device);
    nll.sum() / count
}

fn count(seqs: &[Example]) -> f32 {
    NextTokenTargets::new(seqs, 2).mask.iter().sum()
}

struct MaxDiff<'a> {
    a: &'a GradientsParams,
    b: &'a GradientsParams,
    max: f32,
    params: usize,
}

impl ModuleVisitor<B> for MaxDiff<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        type I = <B as AutodiffBackend>::InnerBackend;
        let (Some(x), Some(y)) = (self.a.get::<I, D>(param.id), self.b.get::<I, D>(param.id))
        else {
            panic!("a parameter has no gradient");
        };
        let d: Vec<f32> = (x - y).abs().max().into_data().to_vec().expect("f32");
        self.max = self.max.max(d[0]);
        self.params += 1;
    }
}

#[test]
fn batch_8_equals_2_x_4_accumulated() {
    let device = Default::default();
    let model = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let seqs = tiny_examples();
    let n = count(&seqs);

    let full = loss(&model, &seqs, n);
    let full_value: f32 = full.clone().into_data().to_vec::<f32>().expect("f32")[0];
    let full_grads = GradientsParams::from_grads(full.backward(), &model);

    let mut acc = GradientsAccumulator::<Llama<B>>::new();
    let mut summed = 0.0f32;
    for micro in seqs.chunks(2) {
        let l = loss(&model, micro, n);
        summed += l.clone().into_data().to_vec::<f32>().expect("f32")[0];
        acc.accumulate(&model, GradientsParams::from_grads(l.backward(), &model));
    }
    let acc_grads = acc.grads();
    assert!(
        (summed - full_value).abs() < 1e-5 * full_value.abs().max(1.0),
        "{summed} vs {full_value}"
    );

    let mut v = MaxDiff {
        a: &full_grads,
        b: &acc_grads,
        max: 0.0,
        params: 0,
    };
    burn::module::Module::visit(&model, &mut v);
    assert!(v.params > 10, "visited {} parameters", v.params);
    let norm = global_norm(&model, &full_grads);
    assert!(
        v.max < 1e-5 * (norm as f32).max(1.0),
        "accumulated gradients differ by {} (norm {norm})",
        v.max
    );

    // One AdamW step from each lands on the same loss.
    let config = OptimConfig::new(1e-3);
    let mut opt_a = config.adamw().init::<B, Llama<B>>();
    let mut opt_b = config.adamw().init::<B, Llama<B>>();
    let stepped_a = opt_a.step(config.lr, model.clone(), full_grads);
    let stepped_b = opt_b.step(config.lr, model.clone(), acc_grads);
    let after =
        |m: &Llama<B>| -> f32 { loss(m, &seqs, n).into_data().to_vec::<f32>().expect("f32")[0] };
    let (la, lb) = (after(&stepped_a), after(&stepped_b));
    assert!(
        la < full_value,
        "the step did not lower the loss: {full_value} → {la}"
    );
    assert!(
        (la - lb).abs() < 1e-4 * la.abs().max(1.0),
        "after one step: {la} vs {lb}"
    );
}

#[test]
fn global_norm_clipping_clips_to_the_norm_asked_for() {
    let device = Default::default();
    let model = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let seqs = tiny_examples();
    let t = NextTokenTargets::new(&seqs, 2);
    let batch =
        TokenBatch::right_padded(&seqs.iter().map(|s| s.ids.clone()).collect::<Vec<_>>(), 2);
    let (logits, _) = model.forward(&batch, &Hooks::none()).expect("forward");
    let l = sft(logits, t.targets_tensor(&device), t.mask_tensor(&device));
    let mut grads = GradientsParams::from_grads(l.backward(), &model);
    let before = global_norm(&model, &grads);
    assert!(before > 0.0);
    let reported = clip_global_norm(&model, &mut grads, before / 2.0);
    assert!((reported - before).abs() < 1e-9);
    let after = global_norm(&model, &grads);
    assert!(
        (after - before / 2.0).abs() < 1e-3 * before,
        "{after} vs {}",
        before / 2.0
    );
    // Below the limit nothing changes.
    let unchanged = clip_global_norm(&model, &mut grads, before * 10.0);
    assert!((global_norm(&model, &grads) - unchanged).abs() < 1e-9);
}

#[test]
fn finetuning_lowers_the_loss_and_the_same_seed_gives_the_same_weights() {
    use antibody_finetune::sft::{FinetuneConfig, finetune};
    let device = Default::default();
    let seqs = tiny_examples();
    let config = FinetuneConfig {
        optim: OptimConfig {
            max_grad_norm: Some(1.0),
            accumulation: 2,
            ..OptimConfig::new(3e-3)
        },
        steps: 6,
        batch_size: 4,
        seed: 11,
    };
    let n = count(&seqs);
    let base = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let before: f32 = loss(&base, &seqs, n)
        .into_data()
        .to_vec::<f32>()
        .expect("f32")[0];
    let mut logs = Vec::new();
    let a = finetune(base.clone(), &seqs, &config, |l| logs.push(l.clone())).expect("finetune");
    let after: f32 = loss(&a, &seqs, n).into_data().to_vec::<f32>().expect("f32")[0];
    assert_eq!(logs.len(), 6);
    assert!(after < before, "loss {before} → {after}");
    assert!(logs.iter().all(|l| l.grad_norm.is_finite() && l.tokens > 0));
    let b = finetune(base, &seqs, &config, |_| {}).expect("finetune");
    let bits = |m: &Llama<B>| -> Vec<u32> {
        m.head_weight()
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(bits(&a), bits(&b), "same seed, different weights");
}

#[test]
fn a_run_resumed_from_a_checkpoint_ends_bit_identical_to_an_uninterrupted_one() {
    use antibody_finetune::sft::{FinetuneConfig, SftRun};
    let device = Default::default();
    let seqs = tiny_examples();
    let config = FinetuneConfig {
        optim: OptimConfig {
            max_grad_norm: Some(1.0),
            warmup_steps: 2,
            accumulation: 2,
            ..OptimConfig::new(3e-3)
        },
        steps: 5,
        batch_size: 4,
        seed: 5,
    };
    let template =
        || tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let bits = |m: &Llama<B>| -> Vec<u32> {
        let mut out = Vec::new();
        for t in [
            m.head_weight(),
            m.model.layers[1].mlp.down_proj.weight.val(),
        ] {
            out.extend(
                t.into_data()
                    .to_vec::<f32>()
                    .expect("f32")
                    .iter()
                    .map(|x| x.to_bits()),
            );
        }
        out
    };

    let mut straight = SftRun::new(template(), seqs.len(), &config);
    straight
        .run(&seqs, &config, None, |_, _| Ok(()))
        .expect("run");

    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("checkpoint");
    let mut first = SftRun::new(template(), seqs.len(), &config);
    first
        .run(&seqs, &config, Some(2), |_, run| run.save(&ckpt))
        .expect("first part");
    assert_eq!(first.state.step, 2);
    drop(first);
    // A different template: the checkpoint must restore the weights, not inherit them.
    let other = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 9, &device).expect("model");
    let mut resumed = SftRun::resume(&ckpt, other, &config).expect("resume");
    assert_eq!(resumed.state.step, 2);
    resumed
        .run(&seqs, &config, None, |_, _| Ok(()))
        .expect("second part");
    assert_eq!(resumed.state.step, 5);
    assert_eq!(
        bits(&straight.model),
        bits(&resumed.model),
        "resumed run differs"
    );
}

/// A static loss scale is undone before clipping and the update: in f32, where multiplying by
/// a power of two is exact, a run at scale 1024 ends where the unscaled run ends (to the
/// rounding of the combined unscale-and-clip factor) and reports the same gradient norms;
/// an f16 model (scale 1024 by default) has the f32 run's losses within 1% and moves the
/// weights the same way (cosine of the updates > 0.99; measured 0.9998).
#[test]
fn a_loss_scale_is_undone_before_the_step_and_f16_training_follows_f32() {
    use antibody_finetune::sft::{FinetuneConfig, finetune};
    use burn::tensor::FloatDType;
    let device = Default::default();
    let seqs = tiny_examples();
    let config = |loss_scale: Option<f64>| FinetuneConfig {
        optim: OptimConfig {
            max_grad_norm: Some(1.0),
            loss_scale,
            ..OptimConfig::new(3e-3)
        },
        steps: 4,
        batch_size: 4,
        seed: 3,
    };
    assert_eq!(config(None).optim.loss_scale_for(FloatDType::F32), 1.0);
    assert_eq!(config(None).optim.loss_scale_for(FloatDType::F16), 1024.0);
    assert_eq!(config(Some(8.0)).optim.loss_scale_for(FloatDType::F16), 8.0);
    let base = || tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let values = |m: &Llama<B>| -> Vec<f32> {
        m.model.layers[1]
            .mlp
            .down_proj
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
    };
    let run = |model: Llama<B>, c: &FinetuneConfig| {
        let mut logs = Vec::new();
        let m = finetune(model, &seqs, c, |l| logs.push(l.clone())).expect("finetune");
        (m, logs)
    };
    let (plain, plain_logs) = run(base(), &config(None));
    let (scaled, scaled_logs) = run(base(), &config(Some(1024.0)));
    for (a, b) in plain_logs.iter().zip(&scaled_logs) {
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-6 * a.grad_norm,
            "step {}: norm {} unscaled, {} under scale 1024",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
    let diff = max_abs_diff(&values(&plain), &values(&scaled));
    assert!(
        diff <= 1e-6,
        "weights differ by {diff} under loss scale 1024"
    );
    // f16: the same run in mixed precision ends near the f32 one.
    let half = base().with_compute_dtype(FloatDType::F16).expect("f16");
    let (half, half_logs) = run(half, &config(None));
    for (a, b) in plain_logs.iter().zip(&half_logs) {
        assert!(
            (a.loss - b.loss).abs() <= 0.01 * a.loss.abs(),
            "step {}: loss {} in f32, {} in f16",
            a.step,
            a.loss,
            b.loss
        );
    }
    // AdamW's update is close to sign(g)·lr per weight, so weights whose gradients are near
    // zero move differently under any rounding: compare the updates' directions.
    let start = values(&base());
    let update =
        |m: &Llama<B>| -> Vec<f32> { values(m).iter().zip(&start).map(|(a, b)| a - b).collect() };
    let (u32_, u16_) = (update(&plain), update(&half));
    let dot: f32 = u32_.iter().zip(&u16_).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cosine = dot / (norm(&u32_) * norm(&u16_));
    eprintln!("f16 update's cosine with f32's: {cosine}");
    assert!(cosine > 0.99, "f16 update's cosine with f32's {cosine}");
}

#[test]
fn sequence_logprobs_do_not_depend_on_the_inference_shards() {
    use antibody_model::device::Cpu;
    use antibody_model::shards::{inference_shards, with_shards};
    let device = Default::default();
    let model = tiny::random_model::<Cpu>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    // 24 examples (three copies of the eight, one id shifted per copy): three parts of 8.
    let seqs: Vec<Example> = (0..3u32)
        .flat_map(|c| {
            tiny_examples().into_iter().map(move |mut e| {
                e.ids[1] += c;
                e
            })
        })
        .collect();
    let one = with_shards(1, || {
        antibody_finetune::sequence_logprobs(&model, &seqs, 6, 64)
    })
    .expect("one part");
    let parts = with_shards(3, || {
        assert_eq!(inference_shards(), 3);
        antibody_finetune::sequence_logprobs(&model, &seqs, 6, 64)
    })
    .expect("three parts");
    assert_eq!(one.len(), seqs.len());
    assert!(one.iter().all(|v| v.is_finite() && *v < 0.0));
    let diff = max_abs_diff(&one, &parts);
    assert!(diff < 1e-4, "three parts differ from one batch by {diff}");
}
