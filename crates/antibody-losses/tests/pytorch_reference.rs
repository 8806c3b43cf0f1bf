//! Every loss against PyTorch autograd (`tests/reference/losses.py`): values and gradients
//! with respect to the student logits, with padding and masked positions.
//!
//! Tolerances (f32 on both sides, different summation orders): values 1e-5 relative to
//! `max(1, |value|)`; gradients 1e-6 absolute (the largest gradient entries are ~0.1–1).

use antibody_losses::kl::{KlDirection, immunization, kl_per_position};
use antibody_losses::{HeadKl, head_immunization, head_kl_loss};
use antibody_losses::{
    dpo, entropy, entropy_loss, gradient_ascent, masked_mean, npo, sequence_logprob, sft,
    token_logprobs,
};
use antibody_testkit::max_abs_diff;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;

type B = Autodiff<Flex>;

const VALUE_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-6;

fn fixture() -> Value {
    let path = antibody_testkit::fixtures().join("losses.json");
    let text = std::fs::read_to_string(path).expect("losses.json (run tests/reference/losses.py)");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn shape(f: &Value) -> [usize; 3] {
    let s: Vec<usize> = f["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|x| x.as_u64().expect("dim") as usize)
        .collect();
    [s[0], s[1], s[2]]
}

fn logits(f: &Value, name: &str) -> Tensor<B, 3> {
    Tensor::from_data(
        TensorData::new(floats(&f["inputs"][name]), shape(f)),
        &Default::default(),
    )
}

fn leaf(f: &Value, name: &str) -> Tensor<B, 3> {
    logits(f, name).require_grad()
}

fn targets(f: &Value) -> Tensor<B, 2, Int> {
    let [b, t, _] = shape(f);
    let ids: Vec<i64> = f["inputs"]["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect();
    Tensor::from_data(TensorData::new(ids, [b, t]), &Default::default())
}

fn mask(f: &Value) -> Tensor<B, 2> {
    let [b, t, _] = shape(f);
    Tensor::from_data(
        TensorData::new(floats(&f["inputs"]["mask"]), [b, t]),
        &Default::default(),
    )
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 data")
}

fn check_value(name: &str, got: f32, expected: f32) {
    let tol = VALUE_TOL * expected.abs().max(1.0);
    assert!(
        (got - expected).abs() <= tol,
        "{name}: {got} vs PyTorch {expected}"
    );
}

fn check_grad(
    name: &str,
    leaf: &Tensor<B, 3>,
    grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients,
    expected: &Value,
) {
    let g = leaf.grad(grads).expect("gradient");
    let diff = max_abs_diff(
        &g.into_data().to_vec::<f32>().expect("f32"),
        &floats(expected),
    );
    assert!(
        diff <= GRAD_TOL,
        "{name}: gradient differs from PyTorch's by {diff}"
    );
}

fn check_scalar_loss(name: &str, loss: Tensor<B, 1>, leaf: &Tensor<B, 3>, expected: &Value) {
    check_value(
        name,
        values(loss.clone())[0],
        expected["value"].as_f64().expect("value") as f32,
    );
    let grads = loss.backward();
    check_grad(name, leaf, &grads, &expected["grad"]);
}

#[test]
fn per_token_quantities() {
    let f = fixture();
    let student = logits(&f, "student");
    let diff = max_abs_diff(
        &values(token_logprobs(student.clone(), targets(&f))),
        &floats(&f["token_logprobs"]),
    );
    assert!(diff <= VALUE_TOL, "token log-probs differ by {diff}");
    let diff = max_abs_diff(
        &values(sequence_logprob(student.clone(), targets(&f), mask(&f))),
        &floats(&f["sequence_logprob"]),
    );
    assert!(diff <= 1e-4, "sequence log-probs differ by {diff}");
    let diff = max_abs_diff(&values(entropy(student)), &floats(&f["entropy"]));
    assert!(diff <= VALUE_TOL, "entropy differs by {diff}");
}

#[test]
fn npo_both_forms() {
    let f = fixture();
    let beta = f["beta"].as_f64().expect("beta");
    for (name, scaled) in [("npo", false), ("npo_scaled", true)] {
        let s = leaf(&f, "student");
        let reference = sequence_logprob(logits(&f, "teacher"), targets(&f), mask(&f)).detach();
        let policy = sequence_logprob(s.clone(), targets(&f), mask(&f));
        check_scalar_loss(name, npo(policy, reference, beta, scaled), &s, &f[name]);
    }
}

#[test]
fn dpo_matches() {
    let f = fixture();
    let beta = f["beta"].as_f64().expect("beta");
    let (c, r) = (leaf(&f, "chosen"), leaf(&f, "rejected"));
    let seq = |l: Tensor<B, 3>| sequence_logprob(l, targets(&f), mask(&f));
    let loss = dpo(
        seq(c.clone()),
        seq(logits(&f, "ref_chosen")).detach(),
        seq(r.clone()),
        seq(logits(&f, "ref_rejected")).detach(),
        beta,
    );
    check_value(
        "dpo",
        values(loss.clone())[0],
        f["dpo"]["value"].as_f64().expect("value") as f32,
    );
    let grads = loss.backward();
    check_grad("dpo chosen", &c, &grads, &f["dpo"]["grad_chosen"]);
    check_grad("dpo rejected", &r, &grads, &f["dpo"]["grad_rejected"]);
}

#[test]
fn kl_both_directions() {
    let f = fixture();
    for (name, direction) in [
        ("kl_forward", KlDirection::Forward),
        ("kl_reverse", KlDirection::Reverse),
    ] {
        let s = leaf(&f, "student");
        let per = kl_per_position(logits(&f, "teacher"), s.clone(), direction);
        let diff = max_abs_diff(&values(per.clone()), &floats(&f[name]["per_position"]));
        assert!(diff <= 1e-4, "{name} per position differs by {diff}");
        check_scalar_loss(name, masked_mean(per, mask(&f)), &s, &f[name]);
    }
}

#[test]
fn immunization_is_capped_and_reports_its_cap_rate() {
    let f = fixture();
    let e = &f["immunization"];
    let cap = e["cap"].as_f64().expect("cap");
    let s = leaf(&f, "student");
    let per = kl_per_position(logits(&f, "teacher"), s.clone(), KlDirection::Forward);
    let imm = immunization(per, mask(&f), cap);
    let expected_rate = e["cap_rate"].as_f64().expect("rate");
    assert!(
        (imm.cap_rate - expected_rate).abs() < 1e-9,
        "cap rate {} vs {expected_rate}",
        imm.cap_rate
    );
    check_scalar_loss("immunization", imm.loss, &s, e);
}

fn head_tensor<const D: usize>(f: &Value, name: &str, shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(floats(&f["head"]["inputs"][name]), shape),
        &Default::default(),
    )
}

#[test]
fn head_fused_kl_matches_pytorch_for_every_chunk_size() {
    let f = fixture();
    let h = &f["head"];
    let d = h["hidden"].as_u64().expect("hidden") as usize;
    let [b, t, v] = shape(&f);
    // Every position, and the counted ones only (the head's work restricted to `rows`: the
    // KL is then 0 elsewhere, and the loss and its gradients must not change).
    let host_mask = floats(&f["inputs"]["mask"]);
    assert!(
        host_mask.contains(&0.0),
        "the fixture's mask must leave positions out for the `rows` case to test anything"
    );
    let rows: Vec<i64> = (0..host_mask.len())
        .filter(|&i| host_mask[i] != 0.0)
        .map(|i| i as i64)
        .collect();
    let n_rows = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n_rows]), &Default::default());
    for (chunk, restricted) in [1, 8, 16, 37, 4096]
        .into_iter()
        .flat_map(|c| [(c, false), (c, true)])
    {
        for (name, direction) in [
            ("kl_forward", KlDirection::Forward),
            ("kl_reverse", KlDirection::Reverse),
            ("immunization", KlDirection::Forward),
        ] {
            let sh = head_tensor(&f, "student_h", [b, t, d]).require_grad();
            let sw = head_tensor(&f, "student_w", [v, d]).require_grad();
            let kl = HeadKl::new(
                head_tensor(&f, "teacher_h", [b, t, d]),
                head_tensor(&f, "teacher_w", [v, d]),
                sh.clone(),
                sw.clone(),
                direction,
                restricted.then(|| rows.clone()),
                chunk,
            );
            let e = &h[name];
            let mut expected = floats(&e["per_position"]);
            if restricted {
                for (x, m) in expected.iter_mut().zip(&host_mask) {
                    if *m == 0.0 {
                        *x = 0.0;
                    }
                }
            }
            let diff = max_abs_diff(&values(kl.values()), &expected);
            assert!(
                diff <= 1e-4,
                "{name} chunk {chunk} rows {restricted}: per position differs by {diff}"
            );
            let loss = if name == "immunization" {
                let (loss, rate) =
                    head_immunization(&kl, mask(&f), e["cap"].as_f64().expect("cap"));
                let expected = e["cap_rate"].as_f64().expect("rate");
                assert!(
                    (rate - expected).abs() < 1e-9,
                    "cap rate {rate} vs {expected}"
                );
                loss
            } else {
                head_kl_loss(&kl, mask(&f))
            };
            let label = format!("head {name} chunk {chunk} rows {restricted}");
            check_value(
                &label,
                values(loss.clone())[0],
                e["value"].as_f64().expect("value") as f32,
            );
            let grads = loss.backward();
            let gh: Vec<f32> = sh
                .grad(&grads)
                .expect("grad")
                .into_data()
                .to_vec()
                .expect("f32");
            let gw: Vec<f32> = sw
                .grad(&grads)
                .expect("grad")
                .into_data()
                .to_vec()
                .expect("f32");
            for (g, key) in [(gh, "grad_h"), (gw, "grad_w")] {
                let diff = max_abs_diff(&g, &floats(&e[key]));
                assert!(
                    diff <= 1e-5,
                    "{label}: {key} differs from PyTorch's by {diff}"
                );
            }
        }
    }
}

#[test]
fn sft_entropy_and_gradient_ascent() {
    let f = fixture();
    let s = leaf(&f, "student");
    check_scalar_loss("sft", sft(s.clone(), targets(&f), mask(&f)), &s, &f["sft"]);
    let s = leaf(&f, "student");
    check_scalar_loss(
        "entropy",
        entropy_loss(s.clone(), mask(&f)),
        &s,
        &f["entropy_loss"],
    );
    let ga = values(gradient_ascent(
        logits(&f, "student"),
        targets(&f),
        mask(&f),
    ))[0];
    check_value(
        "gradient ascent",
        ga,
        -(f["sft"]["value"].as_f64().expect("value") as f32),
    );
}

#[test]
fn extreme_logits_stay_finite() {
    let device = Default::default();
    let big = Tensor::<B, 3>::from_data(
        TensorData::new(vec![1000.0f32, -1000.0, 0.0, 500.0, -500.0, 0.0], [1, 2, 3]),
        &device,
    );
    let small = big.clone().neg();
    let m = Tensor::<B, 2>::ones([1, 2], &device);
    for per in [
        kl_per_position(big.clone(), small.clone(), KlDirection::Forward),
        kl_per_position(big.clone(), small.clone(), KlDirection::Reverse),
    ] {
        assert!(values(per).iter().all(|x| x.is_finite()));
    }
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2], [1, 2]), &device);
    assert!(
        values(sft(big.clone(), t, m.clone()))
            .iter()
            .all(|x| x.is_finite())
    );
    let s = Tensor::<B, 1>::from_data(TensorData::new(vec![-5000.0f32], [1]), &device);
    let r = Tensor::<B, 1>::from_data(TensorData::new(vec![0.0f32], [1]), &device);
    assert!(values(npo(s, r, 1.0, true)).iter().all(|x| x.is_finite()));
}

#[test]
fn losses_compute_in_f32_whatever_the_logits_dtype() {
    let f = fixture();
    let wide = logits(&f, "student").cast(burn::tensor::FloatDType::F64);
    let loss = sft(wide, targets(&f), mask(&f));
    assert_eq!(loss.dtype(), burn::tensor::DType::F32);
    check_value(
        "sft from f64 logits",
        values(loss)[0],
        f["sft"]["value"].as_f64().expect("value") as f32,
    );
}
