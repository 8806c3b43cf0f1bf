//! The tiny random model against transformers (`tests/reference/tiny.py` wrote the fixture):
//! generator bits, logits with left padding, activation sites, and `∂CE/∂δ` at a residual
//! site against PyTorch autograd.

mod common;
use common::{argmax, logsumexp, max_abs_diff, to_vec};

use antibody_model::{Hooks, LlamaConfig, Site, TokenBatch, tiny};
use antibody_testkit::{TestAutodiff, TestBackend};
use burn::tensor::{Tensor, TensorData, activation::log_softmax};
use serde_json::Value;

/// fp32 logits of a 4-layer model: transformers and burn agree far below this.
const LOGIT_TOL: f32 = 1e-4;
/// Activation sites and the perturbation gradient.
const SITE_TOL: f32 = 1e-5;

fn fixture() -> Value {
    let path = antibody_testkit::fixtures().join("tiny.json");
    let text = std::fs::read_to_string(path).expect("tiny.json: run tests/reference/tiny.py");
    serde_json::from_str(&text).expect("tiny.json parses")
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number") as f32],
        other => panic!("not a number: {other}"),
    }
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(items) => items.iter().flat_map(ints).collect(),
        Value::Number(n) => vec![n.as_i64().expect("integer")],
        other => panic!("not an integer: {other}"),
    }
}

fn fixture_batch(f: &Value) -> TokenBatch {
    let ids = ints(&f["batch"]["input_ids"]);
    let mask = ints(&f["batch"]["attention_mask"]);
    TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        mask: mask.iter().map(|&m| m == 1).collect(),
        batch: 2,
        seq: ids.len() / 2,
    }
}

#[test]
fn generator_bits_match_the_python_generator() {
    let f = fixture();
    let config = LlamaConfig::tiny_test();
    let specs = antibody_model::names::checkpoint_tensors(&config);
    for (name, probe) in f["probes"].as_object().expect("probes") {
        let spec = specs.iter().find(|s| &s.hf == name).expect("known tensor");
        let values = tiny::tensor_values(name, &spec.shape, 0);
        let bits: Vec<i64> = values[..4].iter().map(|v| v.to_bits() as i64).collect();
        assert_eq!(bits, ints(&probe["bits"]), "{name}");
    }
}

#[test]
fn logits_and_sites_match_transformers() {
    let f = fixture();
    let device = Default::default();
    let model =
        tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let batch = fixture_batch(&f);
    let positions: Vec<usize> = ints(&f["batch"]["position_ids"])
        .iter()
        .map(|&p| p as usize)
        .collect();
    assert_eq!(batch.positions(), positions);

    let sites = [Site::residual(1), Site::attn_out(1), Site::mlp_hidden(1)];
    let (logits, out) = model
        .forward(&batch, &Hooks::capture(sites))
        .expect("forward");
    let [b, t, v] = logits.dims();
    let logits = to_vec(logits);
    let head = f["batch"]["logits_head_len"].as_u64().expect("len") as usize;
    let (mut worst_logit, mut worst_lse) = (0f32, 0f32);
    for p in f["batch"]["positions"].as_array().expect("positions") {
        let (row, pos) = (
            p["row"].as_u64().expect("row") as usize,
            p["pos"].as_u64().expect("pos") as usize,
        );
        let ours = &logits[(row * t + pos) * v..(row * t + pos + 1) * v];
        worst_logit = worst_logit.max(max_abs_diff(&ours[..head], &floats(&p["logits_head"])));
        let lse = logsumexp(ours);
        worst_lse = worst_lse.max((lse - floats(&p["logsumexp"])[0]).abs());
        let argmax = argmax(ours);
        assert_eq!(
            argmax as i64,
            p["argmax"].as_i64().expect("argmax"),
            "row {row} pos {pos}"
        );
    }
    assert!(worst_logit < LOGIT_TOL, "logits differ by {worst_logit}");
    assert!(worst_lse < LOGIT_TOL, "logsumexp differs by {worst_lse}");
    assert_eq!(b, 2);

    let row = f["batch"]["layer1_sites_row"].as_u64().expect("row") as usize;
    let expected = &f["batch"]["layer1_sites"];
    for (site, key) in sites.iter().zip(["resid_1", "attn_out_1", "mlp_hidden_1"]) {
        let act = out.sites[site].clone();
        let [_, t, w] = act.dims();
        let act = act.slice([row..row + 1, 0..t, 0..w]);
        let diff = max_abs_diff(&to_vec(act), &floats(&expected[key]));
        assert!(diff < SITE_TOL, "{key} differs by {diff}");
    }
}

#[test]
fn padding_does_not_change_a_sequences_logits() {
    let f = fixture();
    let device = Default::default();
    let model =
        tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let batch = fixture_batch(&f);
    let (padded, _) = model.forward(&batch, &Hooks::none()).expect("forward");
    // row 0 alone, without its padding
    let real: Vec<u32> = batch.ids[..batch.seq]
        .iter()
        .zip(&batch.mask[..batch.seq])
        .filter(|(_, m)| **m)
        .map(|(i, _)| *i)
        .collect();
    let n = real.len();
    assert!(n < batch.seq, "row 0 of the fixture is padded");
    let alone = TokenBatch::right_padded(&[real], 2);
    let (single, _) = model.forward(&alone, &Hooks::none()).expect("forward");
    let v = single.dims()[2];
    let padded_row = padded.slice([0..1, batch.seq - n..batch.seq, 0..v]);
    let diff = max_abs_diff(&to_vec(padded_row), &to_vec(single));
    assert!(diff < 1e-4, "left padding changed logits by {diff}");
}

#[test]
fn kv_cached_decoding_matches_the_full_forward() {
    let f = fixture();
    let device = Default::default();
    let model =
        tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let batch = fixture_batch(&f);
    let (full, _) = model.forward(&batch, &Hooks::none()).expect("forward");
    let [b, t, v] = full.dims();
    let split = 6;
    let cut = |from: usize, to: usize, x: &[u32]| -> Vec<u32> {
        (0..b)
            .flat_map(|r| x[r * t + from..r * t + to].to_vec())
            .collect()
    };
    let cut_mask = |from: usize, to: usize| -> Vec<bool> {
        (0..b)
            .flat_map(|r| batch.mask[r * t + from..r * t + to].to_vec())
            .collect()
    };
    let mut cache = antibody_model::KvCache::new(&model.config, b, t, &device);
    let mut last = model
        .forward_cached(
            &cut(0, split, &batch.ids),
            &cut_mask(0, split),
            split,
            &mut cache,
        )
        .expect("prefill");
    for pos in split..t {
        last = model
            .forward_cached(
                &cut(pos, pos + 1, &batch.ids),
                &cut_mask(pos, pos + 1),
                1,
                &mut cache,
            )
            .expect("decode");
    }
    let cached = to_vec(model.logits(last.unsqueeze_dim(1)));
    let reference = to_vec(full.slice([0..b, t - 1..t, 0..v]));
    let diff = max_abs_diff(&cached, &reference);
    assert!(diff < 1e-4, "cached decoding differs by {diff}");
}

#[test]
fn residual_perturbation_gradient_matches_pytorch() {
    let f = fixture();
    let device = Default::default();
    let model =
        tiny::random_model::<TestAutodiff>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let batch = fixture_batch(&f);
    let (b, t, h) = (batch.batch, batch.seq, 64);
    let layer = f["grad"]["delta_layer"].as_u64().expect("layer") as usize;
    let delta = Tensor::<TestAutodiff, 3>::zeros([b, t, h], &device).require_grad();
    let hooks = Hooks::none().with_perturbation(Site::residual(layer), delta.clone());
    let (logits, _) = model.forward(&batch, &hooks).expect("forward");
    let v = logits.dims()[2];
    // next-token CE: logits at t-1 predict ids at t, counted where response_mask[t] = 1
    let logp = log_softmax(logits.slice([0..b, 0..t - 1, 0..v]), 2);
    let targets: Vec<i64> = (0..b)
        .flat_map(|r| batch.ids[r * t + 1..(r + 1) * t].iter().map(|&i| i as i64))
        .collect();
    let targets = Tensor::<TestAutodiff, 3, burn::tensor::Int>::from_data(
        TensorData::new(targets, [b, t - 1, 1]),
        &device,
    );
    let nll = logp.gather(2, targets).neg().reshape([b, t - 1]);
    let response: Vec<f32> = ints(&f["grad"]["response_mask"])
        .chunks(t)
        .flat_map(|row| row[1..].iter().map(|&m| m as f32).collect::<Vec<_>>())
        .collect();
    let counted: f32 = response.iter().sum();
    let weights =
        Tensor::<TestAutodiff, 2>::from_data(TensorData::new(response, [b, t - 1]), &device);
    let loss = (nll * weights).sum() / counted;
    let loss_value = to_vec(loss.clone())[0];
    let expected_loss = floats(&f["grad"]["loss"])[0];
    assert!(
        (loss_value - expected_loss).abs() < 1e-4,
        "loss {loss_value} vs {expected_loss}"
    );
    let grads = loss.backward();
    let grad = delta.grad(&grads).expect("δ receives a gradient");
    let diff = max_abs_diff(&to_vec(grad), &floats(&f["grad"]["delta_grad"]));
    assert!(diff < SITE_TOL, "∂loss/∂δ differs by {diff}");
}

#[test]
fn sampling_is_seeded_and_greedy_is_deterministic() {
    use antibody_model::{GenerationConfig, Sampling, generate};
    let device = Default::default();
    let model =
        tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let prompts = vec![vec![1, 504, 3458, 28], vec![1, 9, 12345]];
    let sampled = |seed| {
        let config = GenerationConfig {
            max_new_tokens: 12,
            min_new_tokens: 12,
            sampling: Sampling::Sample {
                temperature: 1.0,
                top_p: 0.95,
                seed,
            },
        };
        generate(&model, &prompts, &[2], &config).expect("generate")
    };
    let (a, b, c) = (sampled(1), sampled(1), sampled(2));
    assert_eq!(a, b, "the same seed gives the same tokens");
    assert_ne!(a, c, "another seed gives other tokens");
    assert!(
        a.iter()
            .all(|g| g.tokens.len() == 12 && !g.tokens.contains(&2)),
        "min_new_tokens suppresses the stop id"
    );
    let greedy = GenerationConfig::greedy(6);
    let g1 = generate(&model, &prompts, &[2], &greedy).expect("greedy");
    assert_eq!(
        g1,
        generate(&model, &prompts, &[2], &greedy).expect("greedy")
    );
    // a stop id ends a sequence: stop on whatever greedy emits first
    let first = g1[0].tokens[0];
    let stopped = generate(&model, &prompts[..1], &[first], &greedy).expect("greedy");
    assert_eq!(stopped[0].tokens, vec![first]);
    assert!(stopped[0].stopped);
}

#[test]
fn finished_sequences_leave_the_batch_without_changing_the_others() {
    use antibody_model::{GenerationConfig, generate};
    let device = Default::default();
    let model =
        tiny::random_model::<TestBackend>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..3 + i).map(|j| 1 + (i * 37 + j * 101) % 500).collect())
        .collect();
    let greedy = GenerationConfig::greedy(10);
    // Stop on the second token of the first four sequences: those finish after at most two
    // steps, which drops them from the batch (half of it) while the others keep decoding.
    let free = generate(&model, &prompts, &[], &greedy).expect("greedy");
    let stops: Vec<u32> = free[..4].iter().map(|g| g.tokens[1]).collect();
    let batched = generate(&model, &prompts, &stops, &greedy).expect("batched");
    let early = batched
        .iter()
        .filter(|g| g.stopped && g.tokens.len() <= 2)
        .count();
    assert!(
        early >= 4,
        "{early} sequences stopped early: the batch was not compacted"
    );
    assert!(
        batched.iter().any(|g| g.tokens.len() == 10),
        "some sequences run to the limit after the others left"
    );
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&model, std::slice::from_ref(p), &stops, &greedy).expect("alone");
        assert_eq!(batched[i], alone[0], "prompt {i}: batched and alone differ");
    }
}

#[test]
fn untied_lm_head_matches_transformers_and_survives_a_save() {
    let f = fixture();
    let u = &f["untied"];
    let device = Default::default();
    let mut config = LlamaConfig::tiny_test();
    config.tie_word_embeddings = false;
    let model = tiny::random_model::<TestBackend>(&config, 0, &device).expect("untied model");
    assert!(model.lm_head.is_some());
    let ids: Vec<u32> = ints(&u["input_ids"]).iter().map(|&i| i as u32).collect();
    let batch = TokenBatch::right_padded(&[ids], 2);
    let (logits, _) = model.forward(&batch, &Hooks::none()).expect("forward");
    let [_, t, v] = logits.dims();
    let ours = to_vec(logits.clone());
    let head = u["logits_head_len"].as_u64().expect("len") as usize;
    let expected = floats(&u["logits_head"]);
    let mut worst = 0f32;
    for pos in 0..t {
        let row = &ours[pos * v..(pos + 1) * v];
        worst = worst.max(max_abs_diff(
            &row[..head],
            &expected[pos * head..(pos + 1) * head],
        ));
        let argmax = argmax(row);
        assert_eq!(argmax as i64, ints(&u["argmax"])[pos], "position {pos}");
    }
    assert!(worst < LOGIT_TOL, "untied logits differ by {worst}");

    // the HF directory keeps lm_head.weight in [vocab, hidden] and reloads exactly
    let gguf = antibody_fetch::fetch(&antibody_fetch::patient()).expect("patient");
    let tokenizer = antibody_model::Tokenizer::from_gguf(
        &antibody_model::gguf::GgufFile::open(&gguf).expect("open"),
    )
    .expect("tokenizer");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("untied");
    antibody_model::save_hf_dir(&model, &tokenizer, &out).expect("save");
    let again =
        antibody_model::checkpoint::load_hf_dir::<TestBackend>(&out, &device).expect("reload");
    let (reloaded, _) = again.forward(&batch, &Hooks::none()).expect("forward");
    assert_eq!(to_vec(reloaded), ours);
}

#[test]
fn greedy_answers_do_not_depend_on_the_inference_shards() {
    use antibody_model::GenerationConfig;
    use antibody_model::device::Cpu;
    use antibody_model::generate;
    use antibody_model::shards::{inference_shards, with_shards};
    // The CPU backend whatever TestBackend is: only `with_backend!`'s CPU arm shards (the
    // wgpu binary runs this file too).
    let device = Default::default();
    let model = tiny::random_model::<Cpu>(&LlamaConfig::tiny_test(), 0, &device).expect("model");
    // 26 prompts of 3 to 15 tokens: three parts of 9, 9 and 8 prompts under 3 shards
    // (a part holds at least MIN_PART_PROMPTS = 8).
    let prompts: Vec<Vec<u32>> = (0..26u32)
        .map(|i| {
            (0..3 + i % 13)
                .map(|j| 1 + (i * 53 + j * 97) % 500)
                .collect()
        })
        .collect();
    let greedy = GenerationConfig::greedy(9);
    let one = with_shards(1, || generate(&model, &prompts, &[7], &greedy)).expect("one batch");
    let sharded = with_shards(3, || {
        assert_eq!(inference_shards(), 3);
        generate(&model, &prompts, &[7], &greedy)
    })
    .expect("three shards");
    assert_eq!(one.len(), prompts.len());
    assert_eq!(sharded, one, "three shards and one batch answer alike");
    assert!(
        one.iter().any(|g| g.tokens.len() == 9),
        "some answers run to the limit"
    );
}
