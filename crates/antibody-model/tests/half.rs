//! Mixed precision (`Llama::with_compute_dtype`) on the tiny model: the f16 and bf16
//! forwards stay close to f32, gradients reach the f32 weights and an f32 LAT perturbation
//! in f32 and point the same way as f32's, the KV-cached decode agrees with the full
//! forward, and a dtype the device cannot compute in is an error, not a panic.
//!
//! Tolerances: f16 carries 11 significant bits and bf16 8, so each matmul's output is off
//! by about 2⁻¹¹ and 2⁻⁸ of its scale; over four layers with f32 residuals, norms and softmax
//! the logits stay within 1% (f16) and 4% (bf16) of their largest magnitude, and the
//! gradients' cosine with f32's above 0.999 (f16) and 0.99 (bf16). Measured on flex: 0.12% and
//! 0.84%, cosines 0.99999 and 0.99997.

mod common;
use common::{max_abs_diff, to_vec};

use antibody_model::{Hooks, KvCache, Llama, LlamaConfig, Site, TokenBatch, tiny};
use antibody_testkit::{TestAutodiff, TestBackend};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

fn batch() -> TokenBatch {
    TokenBatch::left_padded(
        &[
            vec![1, 17, 305, 4021, 9, 88, 1200, 7, 64, 33],
            vec![1, 250, 12, 900, 41, 5],
        ],
        2,
    )
}

/// The dtypes the test backend computes in (bf16 is missing on lavapipe).
fn half_dtypes() -> Vec<(FloatDType, f32, f32)> {
    let device = Default::default();
    [
        (FloatDType::F16, 0.01, 0.999),
        (FloatDType::BF16, 0.04, 0.99),
    ]
    .into_iter()
    .filter(|(d, ..)| TestBackend::supports_dtype(&device, DType::from(*d)))
    .collect()
}

fn model<B: Backend>(dtype: FloatDType) -> Llama<B> {
    let device = Default::default();
    tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &device)
        .expect("model")
        .with_compute_dtype(dtype)
        .expect("supported dtype")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn half_forwards_stay_close_to_f32_and_return_f32() {
    let reference = {
        let (logits, _) = model::<TestBackend>(FloatDType::F32)
            .forward(&batch(), &Hooks::none())
            .expect("forward");
        to_vec(logits)
    };
    let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    let dtypes = half_dtypes();
    assert!(
        dtypes.iter().any(|(d, ..)| *d == FloatDType::F16),
        "f16 is supported on every backend the tests run on"
    );
    for (dtype, tol, _) in dtypes {
        let (logits, out) = model::<TestBackend>(dtype)
            .forward(&batch(), &Hooks::capture([Site::residual(1)]))
            .expect("forward");
        assert_eq!(logits.dtype(), DType::F32, "{dtype:?}: logits are f32");
        assert_eq!(out.hidden.dtype(), DType::F32, "{dtype:?}: hidden is f32");
        let site = out.sites.values().next().expect("captured site");
        assert_eq!(site.dtype(), DType::F32, "{dtype:?}: sites are f32");
        let got = to_vec(logits);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{dtype:?}: non-finite logits"
        );
        let diff = max_abs_diff(&got, &reference);
        eprintln!("{dtype:?}: logits differ from f32 by {diff} (scale {scale})");
        assert!(
            diff <= tol * scale,
            "{dtype:?}: logits differ by {diff} (scale {scale}, tolerance {tol})"
        );
        // Not f32 in disguise: the half forward rounds where f32 does not.
        assert!(
            diff > 0.0,
            "{dtype:?}: identical to f32, so not computed in half"
        );
    }
}

#[test]
fn half_gradients_reach_the_f32_weights_and_perturbations() {
    let grads_of = |dtype: FloatDType| -> (Vec<f32>, Vec<f32>, DType, DType) {
        let device = Default::default();
        let model = model::<TestAutodiff>(dtype);
        let b = batch();
        let delta = Tensor::<TestAutodiff, 3>::zeros([b.batch, b.seq, 64], &device).require_grad();
        let hooks = Hooks::none().with_perturbation(Site::residual(2), delta.clone());
        let (logits, _) = model.forward(&b, &hooks).expect("forward");
        let loss = burn::tensor::activation::log_softmax(logits, 2)
            .slice([0..b.batch, 0..b.seq, 0..64])
            .mean();
        let grads = loss.backward();
        let w = model.model.layers[0]
            .self_attn
            .q_proj
            .weight
            .grad(&grads)
            .expect("the weight receives a gradient");
        let d = delta.grad(&grads).expect("δ receives a gradient");
        let (wd, dd) = (w.dtype(), d.dtype());
        (to_vec(w), to_vec(d), wd, dd)
    };
    let (w32, d32, ..) = grads_of(FloatDType::F32);
    for (dtype, _, min_cos) in half_dtypes() {
        let (w, d, wd, dd) = grads_of(dtype);
        assert_eq!(wd, DType::F32, "{dtype:?}: the weight's gradient is f32");
        assert_eq!(dd, DType::F32, "{dtype:?}: δ's gradient is f32");
        assert!(
            w.iter().chain(&d).all(|x| x.is_finite()),
            "{dtype:?}: non-finite gradients"
        );
        let (cw, cd) = (cosine(&w, &w32), cosine(&d, &d32));
        eprintln!("{dtype:?}: gradient cosine with f32: weight {cw}, δ {cd}");
        assert!(
            cw > min_cos && cd > min_cos,
            "{dtype:?}: gradient cosine with f32: weight {cw}, δ {cd} (need > {min_cos})"
        );
    }
}

#[test]
fn half_cached_decoding_matches_the_half_full_forward() {
    for (dtype, tol, _) in half_dtypes() {
        let device = Default::default();
        let model = model::<TestBackend>(dtype);
        let b = batch();
        let (full, _) = model.forward(&b, &Hooks::none()).expect("forward");
        let [n, t, v] = full.dims();
        let reference = to_vec(full.slice([0..n, t - 1..t, 0..v]));
        let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let mut cache = KvCache::new(&model.config, n, t, &device);
        let split = 4;
        let cut = |from: usize, to: usize| -> (Vec<u32>, Vec<bool>) {
            (0..n)
                .flat_map(|r| (from..to).map(move |i| r * t + i))
                .map(|i| (b.ids[i], b.mask[i]))
                .unzip()
        };
        let (ids, valid) = cut(0, split);
        let mut last = model
            .forward_cached(&ids, &valid, split, &mut cache)
            .expect("prefill");
        for pos in split..t {
            let (ids, valid) = cut(pos, pos + 1);
            last = model
                .forward_cached(&ids, &valid, 1, &mut cache)
                .expect("decode");
        }
        let cached = to_vec(model.logits(last.unsqueeze_dim(1)));
        let diff = max_abs_diff(&cached, &reference);
        assert!(
            diff <= tol * scale,
            "{dtype:?}: cached decoding differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn a_dtype_the_device_cannot_compute_in_is_an_error() {
    let device = Default::default();
    let base = || tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &device);
    let e = base()
        .expect("model")
        .with_compute_dtype(FloatDType::F64)
        .expect_err("f64 is not a compute dtype");
    assert!(e.to_string().contains("use f32, f16 or bf16"), "{e}");
    // bf16: computed where the backend says so (the CPU), an error naming the device where
    // it does not (lavapipe).
    let bf16 = base().expect("model").with_compute_dtype(FloatDType::BF16);
    if TestBackend::supports_dtype(&device, DType::BF16) {
        assert_eq!(bf16.expect("bf16").compute_dtype, FloatDType::BF16);
    } else {
        let e = bf16.expect_err("bf16 unsupported");
        assert!(e.to_string().contains("cannot compute in BF16"), "{e}");
    }
}
