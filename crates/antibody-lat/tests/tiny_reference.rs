//! LAT on the tiny model against PyTorch: `tests/reference/tiny.py` records the loss and
//! `∂loss/∂δ` (PyTorch autograd) for a zero perturbation at `resid.2` on a left-padded batch
//! with a response mask; the one-step `δ = −ε·g/‖g‖` is computed from that gradient on the
//! host, in f64, and compared with the crate's.

use antibody_lat::{LatConfig, Positions, attack};
use antibody_model::{LlamaConfig, TokenBatch, tiny};
use antibody_testkit::{TestAutodiff, TestBackend};
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;

type B = TestAutodiff;

fn fixture() -> Value {
    let path = antibody_testkit::fixtures().join("tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("tiny.json")).expect("JSON")
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(xs) => xs.iter().flat_map(ints).collect(),
        Value::Number(n) => vec![n.as_i64().expect("int")],
        _ => panic!("not ints: {v}"),
    }
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(xs) => xs.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("float")],
        _ => panic!("not floats: {v}"),
    }
}

struct Case {
    batch: TokenBatch,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    rows: Tensor<B, 1, Int>,
    real: Tensor<B, 2>,
    response: Tensor<B, 2>,
}

fn case(f: &Value) -> Case {
    let ids = ints(&f["batch"]["input_ids"]);
    let attn = ints(&f["batch"]["attention_mask"]);
    let resp = ints(&f["grad"]["response_mask"]);
    let (b, t) = (2, ids.len() / 2);
    let batch = TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        mask: attn.iter().map(|&m| m == 1).collect(),
        batch: b,
        seq: t,
    };
    let mut targets = vec![0i64; b * t];
    let mut mask = vec![0f32; b * t];
    for r in 0..b {
        for i in 0..t - 1 {
            targets[r * t + i] = ids[r * t + i + 1];
            mask[r * t + i] = resp[r * t + i + 1] as f32;
        }
    }
    let device = Default::default();
    let m = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [b, t]), &device);
    // The counted positions, to which the attack's head work is restricted.
    let rows: Vec<i64> = (0..b * t)
        .filter(|&i| mask[i] != 0.0)
        .map(|i| i as i64)
        .collect();
    assert!(rows.len() < b * t, "the case must leave positions out");
    let n = rows.len();
    Case {
        targets: Tensor::from_data(TensorData::new(targets, [b, t]), &device),
        rows: Tensor::from_data(TensorData::new(rows, [n]), &device),
        mask: m(mask),
        real: m(attn.iter().map(|&x| x as f32).collect()),
        response: m(resp.iter().map(|&x| x as f32).collect()),
        batch,
    }
}

fn config(steps: usize, epsilon: f64, step_size: Option<f64>, positions: Positions) -> LatConfig {
    LatConfig {
        enabled: true,
        layers: vec![2],
        epsilon,
        steps,
        step_size,
        positions,
        report_final_loss: true,
        refusal: antibody_lat::RefusalDelta::Prompt,
        epsilon_scale: antibody_lat::EpsilonScale::Absolute,
    }
}

/// The refusal forward's `δ` is the harmful forward's on each row's prompt positions and zero
/// elsewhere, whether the refusal sequence is shorter or longer than `x ++ y_h`.
#[test]
fn the_refusal_forward_shares_the_prompts_perturbation_only() {
    let device = Default::default();
    let (b, t, h) = (2usize, 5usize, 3usize);
    let values: Vec<f32> = (0..b * t * h).map(|i| i as f32 + 1.0).collect();
    let delta =
        Tensor::<TestBackend, 3>::from_data(TensorData::new(values.clone(), [b, t, h]), &device);
    let lens = [2usize, 4];
    for t_ref in [3usize, 7] {
        let got: Vec<f32> = antibody_lat::prompt_shared(delta.clone(), &lens, t_ref)
            .into_data()
            .to_vec()
            .expect("f32");
        assert_eq!(got.len(), b * t_ref * h);
        for row in 0..b {
            for pos in 0..t_ref {
                for k in 0..h {
                    let want = if pos < lens[row] {
                        values[(row * t + pos) * h + k]
                    } else {
                        0.0
                    };
                    assert_eq!(
                        got[(row * t_ref + pos) * h + k],
                        want,
                        "row {row} pos {pos} t_ref {t_ref}"
                    );
                }
            }
        }
    }
}

#[test]
fn one_step_delta_matches_pytorch() {
    let f = fixture();
    let c = case(&f);
    let model =
        tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &Default::default()).expect("model");
    let eps = 0.5;
    let out = attack(
        &model,
        &c.batch,
        c.targets,
        c.mask,
        Some(c.rows),
        c.real,
        &config(1, eps, None, Positions::All),
    )
    .expect("attack");
    // The attack loss at δ = 0 is PyTorch's loss.
    let expected_loss = floats(&f["grad"]["loss"])[0];
    assert!(
        (f64::from(out.losses[0]) - expected_loss).abs() < 1e-4,
        "{} vs {expected_loss}",
        out.losses[0]
    );
    // δ = −ε·g/‖g‖ per token from PyTorch's gradient; zero on padding and where g = 0.
    let g = floats(&f["grad"]["delta_grad"]);
    let attn = ints(&f["batch"]["attention_mask"]);
    let h = 64;
    let expected: Vec<f64> = g
        .chunks(h)
        .zip(&attn)
        .flat_map(|(tok, &real)| {
            let norm = tok.iter().map(|x| x * x).sum::<f64>().sqrt();
            tok.iter()
                .map(move |x| {
                    if real == 1 && norm > 0.0 {
                        -eps * x / norm
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let (site, delta) = &out.deltas[0];
    assert_eq!(site.to_string(), "resid.2");
    let got: Vec<f32> = delta.clone().into_data().to_vec().expect("f32");
    let diff = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "δ differs from PyTorch's by {diff}");
    // Every perturbed token sits on the sphere of radius ε.
    for tok in got.chunks(h) {
        let n = tok
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(n < 1e-6 || (n - eps).abs() < 1e-4, "token norm {n}");
    }
    // The attack made y_h more likely.
    assert!(out.losses[1] < out.losses[0], "{:?}", out.losses);
}

#[test]
fn pgd_steps_never_decrease_the_attackers_objective() {
    let f = fixture();
    let c = case(&f);
    let model =
        tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &Default::default()).expect("model");
    let out = attack(
        &model,
        &c.batch,
        c.targets,
        c.mask,
        None,
        c.real,
        &config(6, 2.0, Some(0.25), Positions::All),
    )
    .expect("attack");
    assert_eq!(out.losses.len(), 7);
    // The attacker maximizes log p(y_h): the CE must not increase from step to step.
    for w in out.losses.windows(2) {
        assert!(w[1] <= w[0] + 1e-6, "attack loss rose: {:?}", out.losses);
    }
    assert!(out.losses[6] < out.losses[0] - 1e-3, "{:?}", out.losses);
    // Every token stays inside the ε-ball.
    let d: Vec<f32> = out.deltas[0].1.clone().into_data().to_vec().expect("f32");
    for tok in d.chunks(64) {
        let n = tok
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(n <= 2.0 + 1e-4, "token norm {n} outside the ball");
    }
}

#[test]
fn response_only_leaves_the_prompt_unperturbed() {
    let f = fixture();
    let c = case(&f);
    let resp = ints(&f["grad"]["response_mask"]);
    let model =
        tiny::random_model::<B>(&LlamaConfig::tiny_test(), 0, &Default::default()).expect("model");
    let out = attack(
        &model,
        &c.batch,
        c.targets,
        c.mask,
        Some(c.rows),
        c.response,
        &config(1, 1.0, None, Positions::Response),
    )
    .expect("attack");
    let d: Vec<f32> = out.deltas[0].1.clone().into_data().to_vec().expect("f32");
    for (tok, &r) in d.chunks(64).zip(&resp) {
        let n = tok
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        if r == 0 {
            assert_eq!(n, 0.0);
        }
    }
    assert!(
        d.iter().any(|x| *x != 0.0),
        "some response token is perturbed"
    );
}
