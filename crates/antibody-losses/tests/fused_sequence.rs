//! The head-fused sequence log-probability against the materialized-logits path (itself
//! checked against PyTorch in `pytorch_reference.rs`): ŝ values, and NPO / DPO / SFT-style
//! losses with their gradients into the hidden states and the head, for several chunk sizes.

use antibody_losses::{HeadLogprob, dpo, fused_sequence_loss, npo, sequence_logprob};
use antibody_testkit::{TestAutodiff, max_abs_diff};
use burn::tensor::{Int, Tensor, TensorData};

type B = TestAutodiff;
const B_: usize = 3;
const T: usize = 5;
const D: usize = 6;
const V: usize = 29;

fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let z = antibody_model::tiny::splitmix64(seed.wrapping_mul(1_000_003).wrapping_add(i));
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn t3(seed: u64) -> Tensor<B, 3> {
    Tensor::from_data(
        TensorData::new(values(seed, B_ * T * D, 1.5), [B_, T, D]),
        &Default::default(),
    )
}

fn t2(seed: u64) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(values(seed, V * D, 1.0), [V, D]),
        &Default::default(),
    )
}

fn targets(seed: u64) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = values(seed, B_ * T, 1.0)
        .iter()
        .map(|x| (((x + 1.0) / 2.0 * V as f32) as i64).clamp(0, V as i64 - 1))
        .collect();
    Tensor::from_data(TensorData::new(ids, [B_, T]), &Default::default())
}

fn mask() -> Tensor<B, 2> {
    let mut m = vec![1.0f32; B_ * T];
    m[0] = 0.0;
    m[T - 1] = 0.0;
    for x in &mut m[2 * T + 3..] {
        *x = 0.0;
    }
    Tensor::from_data(TensorData::new(m, [B_, T]), &Default::default())
}

fn host<const D2: usize>(t: Tensor<B, D2>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32")
}

fn grad<const D2: usize>(
    leaf: &Tensor<B, D2>,
    grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Vec<f32> {
    leaf.grad(grads)
        .expect("gradient")
        .into_data()
        .to_vec()
        .expect("f32")
}

fn logits(h: Tensor<B, 3>, w: Tensor<B, 2>) -> Tensor<B, 3> {
    h.reshape([B_ * T, D])
        .matmul(w.transpose())
        .reshape([B_, T, V])
}

/// The flat positions where [`mask`] is not 0: the fused terms' `rows`.
fn rows() -> Tensor<B, 1, Int> {
    let m = host(mask());
    let r: Vec<i64> = (0..m.len())
        .filter(|&i| m[i] != 0.0)
        .map(|i| i as i64)
        .collect();
    let n = r.len();
    assert!(n < B_ * T, "the mask must leave positions out");
    Tensor::from_data(TensorData::new(r, [n]), &Default::default())
}

#[test]
fn fused_npo_and_dpo_match_the_materialized_path() {
    for (chunk, restricted) in [1, 7, 29, 4096]
        .into_iter()
        .flat_map(|c| [(c, false), (c, true)])
    {
        let rows = || restricted.then(rows);
        // NPO on one side against a fixed reference.
        let reference = Tensor::<B, 1>::from_data(
            TensorData::new(vec![-20.0f32, -15.0, -8.0], [3]),
            &Default::default(),
        );
        let (h1, w1) = (t3(1).require_grad(), t2(2).require_grad());
        let unfused = npo(
            sequence_logprob(logits(h1.clone(), w1.clone()), targets(3), mask()),
            reference.clone(),
            0.5,
            true,
        );
        let g1 = unfused.clone().backward();
        let (h2, w2) = (t3(1).require_grad(), t2(2).require_grad());
        let side = HeadLogprob::new(h2.clone(), w2.clone(), targets(3), mask(), rows(), chunk);
        let s_unfused = host(sequence_logprob(logits(t3(1), t2(2)), targets(3), mask()));
        assert!(
            max_abs_diff(&host(side.values()), &s_unfused) < 1e-4,
            "ŝ, chunk {chunk}, rows {restricted}"
        );
        let fused = fused_sequence_loss(&[&side], |s| {
            npo(s[0].clone(), reference.clone(), 0.5, true)
        });
        assert!(
            (host(fused.clone())[0] - host(unfused)[0]).abs() < 1e-5,
            "NPO value, chunk {chunk}, rows {restricted}"
        );
        let g2 = fused.backward();
        for (a, b, what) in [
            (grad(&h1, &g1), grad(&h2, &g2), "∂h"),
            (grad(&w1, &g1), grad(&w2, &g2), "∂W"),
        ] {
            let diff = max_abs_diff(&a, &b);
            assert!(
                diff < 1e-5,
                "NPO {what}, chunk {chunk}, rows {restricted}: {diff}"
            );
        }

        // DPO: two sides sharing one head (chosen and rejected through the same student).
        let w = t2(4).require_grad();
        let (hc, hr) = (t3(5).require_grad(), t3(6).require_grad());
        let (rc, rr) = (
            Tensor::<B, 1>::from_data(
                TensorData::new(vec![-9.0f32, -7.0, -3.0], [3]),
                &Default::default(),
            ),
            Tensor::<B, 1>::from_data(
                TensorData::new(vec![-8.0f32, -9.5, -2.0], [3]),
                &Default::default(),
            ),
        );
        let unfused = dpo(
            sequence_logprob(logits(hc.clone(), w.clone()), targets(7), mask()),
            rc.clone(),
            sequence_logprob(logits(hr.clone(), w.clone()), targets(8), mask()),
            rr.clone(),
            0.3,
        );
        let g1 = unfused.clone().backward();
        let w_ = t2(4).require_grad();
        let (hc_, hr_) = (t3(5).require_grad(), t3(6).require_grad());
        let chosen = HeadLogprob::new(hc_.clone(), w_.clone(), targets(7), mask(), rows(), chunk);
        let rejected = HeadLogprob::new(hr_.clone(), w_.clone(), targets(8), mask(), rows(), chunk);
        let fused = fused_sequence_loss(&[&chosen, &rejected], |s| {
            dpo(s[0].clone(), rc.clone(), s[1].clone(), rr.clone(), 0.3)
        });
        assert!(
            (host(fused.clone())[0] - host(unfused)[0]).abs() < 1e-5,
            "DPO value, chunk {chunk}, rows {restricted}"
        );
        let g2 = fused.backward();
        for (a, b, what) in [
            (grad(&hc, &g1), grad(&hc_, &g2), "∂h chosen"),
            (grad(&hr, &g1), grad(&hr_, &g2), "∂h rejected"),
            (grad(&w, &g1), grad(&w_, &g2), "∂W"),
        ] {
            let diff = max_abs_diff(&a, &b);
            assert!(
                diff < 1e-5,
                "DPO {what}, chunk {chunk}, rows {restricted}: {diff}"
            );
        }
    }
}
