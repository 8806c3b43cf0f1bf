//! LoRA on the tiny model, each fact against a computation that does not go through the
//! adapter code: a fresh adapter is the base bit for bit; a merged weight is `W + (α/r)·A·B`
//! computed on the host; the gradients of `A` and `B` are the chain rule applied to the
//! full model's weight gradient (`∂L/∂A = s·G·Bᵀ`, `∂L/∂B = s·Aᵀ·G`, the full model's gradient
//! itself checked against PyTorch by the model's parity tests); a run lowers the loss, is a
//! function of its seed, and moves no weight outside the targeted projections.

use antibody_finetune::lora::{Lora, LoraConfig, Projection, lora_finetune};
use antibody_finetune::optim::OptimConfig;
use antibody_finetune::sft::FinetuneConfig;
use antibody_losses::{Example, NextTokenTargets, token_logprobs};
use antibody_model::{Hooks, Llama, LlamaConfig, TokenBatch, tiny};
use antibody_testkit::{TestAutodiff, max_abs_diff, tiny_examples};
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};

type B = TestAutodiff;

fn loss(model: &Llama<B>, seqs: &[Example]) -> Tensor<B, 1> {
    let device = Default::default();
    let t = NextTokenTargets::new(seqs, 2);
    let n: f32 = t.mask.iter().sum();
    let ids: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids.clone()).collect();
    let (logits, _) = model
        .forward(&TokenBatch::right_padded(&ids, 2), &Hooks::none())
        .expect("forward");
    (token_logprobs(logits, t.targets_tensor(&device)).neg() * t.mask_tensor::<B>(&device)).sum()
        / n
}

fn logits(model: &Llama<B>) -> Vec<f32> {
    let ids: Vec<Vec<u32>> = tiny_examples().iter().map(|s| s.ids.clone()).collect();
    let (l, _) = model
        .forward(&TokenBatch::right_padded(&ids, 2), &Hooks::none())
        .expect("forward");
    l.into_data().to_vec().expect("f32")
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32")
}

fn config(targets: Vec<Projection>) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets,
    }
}

/// `adapters` with every `B` set to seeded nonzero values.
fn with_nonzero_b(mut adapters: Lora<B>) -> Lora<B> {
    let device = Default::default();
    for (k, ad) in adapters.adapters.iter_mut().enumerate() {
        let [r, out] = ad.b.val().dims();
        let v: Vec<f32> = (0..r * out)
            .map(|i| (((i * 31 + k * 17) % 23) as f32 - 11.0) * 0.01)
            .collect();
        ad.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, [r, out]), &device));
    }
    adapters
}

/// `[m, k]·[k, n]` on the host, row-major.
fn host_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for p in 0..k {
            for j in 0..n {
                c[i * n + j] += a[i * k + p] * b[p * n + j];
            }
        }
    }
    c
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

#[test]
fn a_fresh_adapter_is_the_base_and_a_merged_weight_is_w_plus_scaled_a_b() {
    let device = Default::default();
    let base = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let c = config(vec![Projection::QProj, Projection::DownProj]);
    let fresh = Lora::<B>::new(&base, &c, 7);
    assert_eq!(fresh.adapters.len(), 2 * base.model.layers.len());
    assert_eq!(
        logits(&fresh.merge(&base)),
        logits(&base),
        "B = 0 must be the base"
    );

    let adapters = with_nonzero_b(fresh);
    let merged = adapters.merge(&base);
    let s = c.alpha / c.rank as f64;
    for (l, (lb, lm)) in base
        .model
        .layers
        .iter()
        .zip(&merged.model.layers)
        .enumerate()
    {
        for (t, (wb, wm)) in [
            (0, (&lb.self_attn.q_proj, &lm.self_attn.q_proj)),
            (1, (&lb.mlp.down_proj, &lm.mlp.down_proj)),
        ] {
            let ad = &adapters.adapters[2 * l + t];
            let [d_in, d_out] = wb.weight.dims();
            let ab = host_matmul(&host(ad.a.val()), &host(ad.b.val()), d_in, c.rank, d_out);
            let want: Vec<f32> = host(wb.weight.val())
                .iter()
                .zip(&ab)
                .map(|(w, d)| w + s as f32 * d)
                .collect();
            let got = host(wm.weight.val());
            assert!(max_abs_diff(&got, &want) < 1e-6, "layer {l} target {t}");
            assert!(
                max_abs_diff(&got, &host(wb.weight.val())) > 1e-4,
                "no update"
            );
        }
        // Untargeted projections are the base's.
        assert_eq!(
            host(lm.self_attn.k_proj.weight.val()),
            host(lb.self_attn.k_proj.weight.val())
        );
        assert_eq!(
            host(lm.mlp.up_proj.weight.val()),
            host(lb.mlp.up_proj.weight.val())
        );
    }
}

#[test]
fn the_gradients_of_a_and_b_are_the_chain_rule_of_the_weight_gradient() {
    let device = Default::default();
    let base = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device)
        .expect("model")
        .no_grad();
    let c = config(vec![Projection::VProj, Projection::GateProj]);
    let adapters = with_nonzero_b(Lora::<B>::new(&base, &c, 3));
    let seqs = tiny_examples();

    // Through the adapters.
    let grads = loss(&adapters.merge(&base), &seqs).backward();
    // The same weights as leaves of a plain model: G = ∂L/∂W.
    let mut plain = adapters.merge(&base);
    for layer in &mut plain.model.layers {
        for w in [&mut layer.self_attn.v_proj, &mut layer.mlp.gate_proj] {
            w.weight = Param::from_tensor(w.weight.val().detach());
        }
    }
    let plain_grads = loss(&plain, &seqs).backward();

    let s = (c.alpha / c.rank as f64) as f32;
    let r = c.rank;
    let mut checked = 0;
    for (l, layer) in plain.model.layers.iter().enumerate() {
        for (t, w) in [(0, &layer.self_attn.v_proj), (1, &layer.mlp.gate_proj)] {
            let ad = &adapters.adapters[2 * l + t];
            let [d_in, d_out] = w.weight.dims();
            let g = host(
                w.weight
                    .val()
                    .grad(&plain_grads)
                    .map(Tensor::<B, 2>::from_inner)
                    .expect("G"),
            );
            let (a, b) = (host(ad.a.val()), host(ad.b.val()));
            let ga = host(
                ad.a.val()
                    .grad(&grads)
                    .map(Tensor::<B, 2>::from_inner)
                    .expect("∂A"),
            );
            let gb = host(
                ad.b.val()
                    .grad(&grads)
                    .map(Tensor::<B, 2>::from_inner)
                    .expect("∂B"),
            );
            // ∂L/∂A = s·G·Bᵀ: [in, out]·[out, r].
            let want_a: Vec<f32> = host_matmul(&g, &transpose(&b, r, d_out), d_in, d_out, r)
                .iter()
                .map(|x| s * x)
                .collect();
            // ∂L/∂B = s·Aᵀ·G: [r, in]·[in, out].
            let want_b: Vec<f32> = host_matmul(&transpose(&a, d_in, r), &g, r, d_in, d_out)
                .iter()
                .map(|x| s * x)
                .collect();
            let scale = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
            assert!(
                max_abs_diff(&ga, &want_a) < 1e-4 * scale(&want_a),
                "layer {l} target {t}: ∂A off by {}",
                max_abs_diff(&ga, &want_a)
            );
            assert!(
                max_abs_diff(&gb, &want_b) < 1e-4 * scale(&want_b),
                "layer {l} target {t}: ∂B off by {}",
                max_abs_diff(&gb, &want_b)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * plain.model.layers.len());
}

#[test]
fn a_lora_run_lowers_the_loss_is_seeded_and_moves_only_the_targets() {
    let device = Default::default();
    let base = tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let seqs = tiny_examples();
    let ft = FinetuneConfig {
        optim: OptimConfig {
            max_grad_norm: Some(1.0),
            ..OptimConfig::new(1e-2)
        },
        steps: 6,
        batch_size: 4,
        seed: 5,
    };
    let c = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: Projection::ALL.to_vec(),
    };
    let value = |m: &Llama<B>| host(loss(m, &seqs))[0];
    let before = value(&base);
    let mut logs = Vec::new();
    let a = lora_finetune(base.clone(), &seqs, &ft, &c, |l| logs.push(l.clone())).expect("lora");
    assert_eq!(logs.len(), 6);
    assert!(logs.iter().all(|l| l.grad_norm.is_finite() && l.tokens > 0));
    let after = value(&a);
    assert!(after < before - 0.05, "loss {before} → {after}");
    let b = lora_finetune(base.clone(), &seqs, &ft, &c, |_| {}).expect("lora");
    assert_eq!(logits(&a), logits(&b), "same seed, different model");

    // The embedding and the norms are the base's; every projection moved.
    assert_eq!(
        host(a.model.embed_tokens.weight.val()),
        host(base.model.embed_tokens.weight.val())
    );
    for (la, lb) in a.model.layers.iter().zip(&base.model.layers) {
        assert_eq!(
            host(la.input_layernorm.weight.val()),
            host(lb.input_layernorm.weight.val())
        );
        for p in Projection::ALL {
            let (wa, wb) = (p.of(la), p.of(lb));
            assert!(
                max_abs_diff(&host(wa.weight.val()), &host(wb.weight.val())) > 0.0,
                "{p:?}"
            );
        }
    }

    let bad = LoraConfig { rank: 0, ..c };
    let err = lora_finetune(base, &seqs, &ft, &bad, |_| {}).expect_err("rank 0");
    assert!(err.to_string().contains("lora.rank"), "{err}");
}
