//! The real patient (SmolLM2-135M-Instruct Q4_1 GGUF, fetched and cached) against
//! transformers loading the same file (`tests/reference/model.py` wrote the fixture):
//! tokenizer ids, chat-template ids, last-position and full-sequence logits, greedy
//! continuations, and an HF-directory save that reloads to the same logits.

mod common;
use common::{argmax, logsumexp, max_abs_diff, to_vec};

use std::sync::OnceLock;

use antibody_model::device::Cpu;
use antibody_model::{
    ChatMessage, GenerationConfig, Hooks, Loaded, TokenBatch, generate, load, save_hf_dir,
};
use serde_json::Value;

/// fp32 logits vs transformers (both dequantize the same Q4_1 weights to f32).
const LOGIT_TOL: f32 = 2e-3;

fn fixture() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| {
        let path = antibody_testkit::fixtures().join("smollm2.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("smollm2.json")).expect("parses")
    })
}

fn logits_fixture() -> Vec<u8> {
    let path = antibody_testkit::fixtures().join("smollm2_logits.safetensors");
    std::fs::read(path).expect("smollm2_logits.safetensors")
}

fn f32s(st: &safetensors::SafeTensors<'_>, key: &str) -> Vec<f32> {
    let view = st.tensor(key).expect(key);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn patient() -> &'static Loaded<Cpu> {
    static M: OnceLock<Loaded<Cpu>> = OnceLock::new();
    M.get_or_init(|| {
        let path = antibody_fetch::fetch(&antibody_fetch::patient()).expect("fetch the patient");
        load::<Cpu>(&path, &Default::default()).expect("load the patient")
    })
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("messages")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|i| i.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn config_comes_from_the_gguf_metadata() {
    let c = &patient().model.config;
    let mut expected = antibody_model::LlamaConfig::smollm2_135m();
    expected.rms_norm_eps = c.rms_norm_eps; // stored as f32 in the GGUF
    assert_eq!(c, &expected);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
}

#[test]
fn tokenizer_ids_match_transformers() {
    let tok = &patient().tokenizer;
    for case in fixture()["tokenizer"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text).expect("encode"),
            ids(&case["ids"]),
            "{text:?}"
        );
        let decoded = tok.decode(&ids(&case["ids"])).expect("decode");
        assert_eq!(
            decoded,
            case["decoded_skip_special"].as_str().expect("decoded"),
            "{text:?}"
        );
    }
}

#[test]
fn chat_template_ids_match_apply_chat_template() {
    let tok = &patient().tokenizer;
    assert_eq!(tok.chat_template(), fixture()["chat_template"].as_str());
    for chat in fixture()["chats"].as_array().expect("chats") {
        let msgs = messages(&chat["messages"]);
        assert_eq!(
            tok.render_chat(&msgs, true).expect("render"),
            chat["rendered"].as_str().expect("rendered")
        );
        assert_eq!(tok.chat_ids(&msgs, true).expect("ids"), ids(&chat["ids"]));
    }
}

#[test]
fn logits_match_transformers() {
    let loaded = patient();
    let f = fixture();
    let bytes = logits_fixture();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let chats = f["chats"].as_array().expect("chats");
    let prompts: Vec<Vec<u32>> = chats.iter().map(|c| ids(&c["ids"])).collect();

    // Full sequence of chat 0: logits[:, :512], logsumexp and argmax at every position.
    let seq = &f["seq_logits"];
    let c0 = &prompts[seq["chat_index"].as_u64().expect("index") as usize];
    let batch = TokenBatch::right_padded(std::slice::from_ref(c0), 2);
    let (logits, _) = loaded
        .model
        .forward(&batch, &Hooks::none())
        .expect("forward");
    let [_, t, v] = logits.dims();
    let logits = to_vec(logits);
    let head = seq["head_len"].as_u64().expect("head") as usize;
    let expected_head = f32s(&st, "seq_logits_head_0");
    let expected_lse = f32s(&st, "seq_lse_0");
    let margins: Vec<f64> = seq["argmax_margin"]
        .as_array()
        .expect("m")
        .iter()
        .map(|m| m.as_f64().expect("m"))
        .collect();
    let (mut worst, mut worst_lse) = (0f32, 0f32);
    for pos in 0..t {
        let row = &logits[pos * v..(pos + 1) * v];
        worst = worst.max(max_abs_diff(
            &row[..head],
            &expected_head[pos * head..(pos + 1) * head],
        ));
        let lse = logsumexp(row);
        worst_lse = worst_lse.max((lse - expected_lse[pos]).abs());
        let argmax = argmax(row);
        if margins[pos] > 1e-2 {
            assert_eq!(
                argmax as u64,
                seq["argmax"][pos].as_u64().expect("argmax"),
                "position {pos}"
            );
        }
    }
    eprintln!("full-sequence logits[:512]: max |Δ| = {worst:.2e}; logsumexp: {worst_lse:.2e}");
    assert!(worst < LOGIT_TOL && worst_lse < LOGIT_TOL);

    // Last-position logits over the whole vocabulary, two prompts in one left-padded batch.
    let idx: Vec<usize> = ["last_logits_0", "last_logits_1"]
        .iter()
        .map(|k| f["last_logits"][k]["chat_index"].as_u64().expect("index") as usize)
        .collect();
    let pair: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
    let batch = TokenBatch::left_padded(&pair, 2);
    let (logits, _) = loaded
        .model
        .forward(&batch, &Hooks::none())
        .expect("forward");
    let t = batch.seq;
    for (row, key) in ["last_logits_0", "last_logits_1"].iter().enumerate() {
        let last = to_vec(logits.clone().slice([row..row + 1, t - 1..t, 0..v]));
        let diff = max_abs_diff(&last, &f32s(&st, key));
        eprintln!("{key} (left-padded batch): max |Δ| over 49152 logits = {diff:.2e}");
        assert!(diff < LOGIT_TOL, "{key}: {diff}");
    }
}

#[test]
fn batched_greedy_generation_matches_transformers() {
    let loaded = patient();
    let cases = fixture()["greedy"].as_array().expect("greedy");
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let out = generate(
        &loaded.model,
        &prompts,
        loaded.tokenizer.stop_ids(),
        &GenerationConfig::greedy(32),
    )
    .expect("generate");
    for (case, got) in cases.iter().zip(&out) {
        assert_eq!(got.tokens, ids(&case["new_ids"]), "{}", case["text"]);
        assert_eq!(
            got.stopped,
            case["stopped_at_eos"].as_bool().expect("stopped")
        );
        assert_eq!(
            loaded.tokenizer.decode(&got.tokens).expect("decode"),
            case["text"].as_str().expect("text")
        );
    }
}

#[test]
fn saved_hf_directory_reloads_to_the_same_logits() {
    let loaded = patient();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("smollm2-hf");
    save_hf_dir(&loaded.model, &loaded.tokenizer, &out).expect("save");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    // transformers' everyday call, `generate(**tokenizer(text, return_tensors="pt"))`, needs
    // the tokenizer to return only what the model takes (tests/reference/model.py
    // --check-saved runs that call on a saved directory).
    let tc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("tokenizer_config.json")).expect("tokenizer_config.json"),
    )
    .expect("tokenizer_config.json parses");
    assert_eq!(
        tc["model_input_names"],
        serde_json::json!(["input_ids", "attention_mask"])
    );
    let again = load::<Cpu>(&out, &Default::default()).expect("reload");
    assert_eq!(again.model.config, loaded.model.config);
    let chat = &fixture()["chats"][1];
    let msgs = messages(&chat["messages"]);
    let prompt = again.tokenizer.chat_ids(&msgs, true).expect("ids");
    assert_eq!(prompt, ids(&chat["ids"]));
    let batch = TokenBatch::right_padded(&[prompt], 2);
    let (a, _) = loaded
        .model
        .forward(&batch, &Hooks::none())
        .expect("forward");
    let (b, _) = again
        .model
        .forward(&batch, &Hooks::none())
        .expect("forward");
    assert_eq!(to_vec(a), to_vec(b), "save → load is exact in f32");
}
