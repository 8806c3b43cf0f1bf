//! The tokenizer (the `tokenizers` crate) and the model's own chat template (rendered with
//! minijinja, as transformers renders it with jinja2).
//!
//! A tokenizer comes from a `tokenizer.json` or is built from GGUF metadata
//! (`tokenizer.ggml.*`: byte-level BPE vocabulary and merges, token types, special ids).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with the special tokens and chat template of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// `chat_template` compiled on first use and shared by clones.
    chat_env: Arc<OnceLock<ChatEnv>>,
    bos_token: Option<String>,
    eos_token: String,
    eos_id: u32,
    stop_ids: Vec<u32>,
}

fn tok_err(origin: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        origin: origin.into(),
        reason: e.to_string(),
    }
}

/// A compiled chat template (or the compiler's message), built once per tokenizer.
type ChatEnv = Option<Result<minijinja::Environment<'static>, String>>;

/// Compiles `template` as transformers does (jinja2 with `trim_blocks`, `lstrip_blocks`,
/// Python string methods and `raise_exception`).
fn compile_chat_template(template: &str) -> Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", template.to_owned())
        .map_err(|e| e.to_string())?;
    Ok(env)
}

/// GGUF token type of control tokens (`<|im_start|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

impl Tokenizer {
    /// Builds the byte-level BPE tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let origin = format!("GGUF metadata of {}", gguf.path().display());
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::BadKey {
                path: gguf.path().to_path_buf(),
                key: "tokenizer.ggml.model".into(),
                expected: "\"gpt2\" (byte-level BPE)".into(),
                found: format!("{model:?}"),
            });
        }
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
        let types = match gguf.metadata("tokenizer.ggml.token_type") {
            Some(_) => gguf.get_int_array("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::BadKey {
                        path: gguf.path().to_path_buf(),
                        key: format!("tokenizer.ggml.merges[{i}]"),
                        expected: "two tokens separated by a space".into(),
                        found: format!("{m:?}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(&origin, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // SmolLM-style pre-tokenization (llama.cpp `smollm`, `starcoder`, ...): digits one by
        // one, then the GPT-2 regex with byte-level mapping and no prefix space.
        let pre = gguf
            .metadata("tokenizer.ggml.pre")
            .and_then(|_| gguf.get_str("tokenizer.ggml.pre").ok())
            .unwrap_or("gpt2");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "gpt2" | "default" => byte_level.into(),
            "smollm" | "starcoder" | "refact" | "codeshell" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            other => {
                return Err(ModelError::BadKey {
                    path: gguf.path().to_path_buf(),
                    key: "tokenizer.ggml.pre".into(),
                    expected: "one of gpt2, smollm, starcoder, refact, codeshell".into(),
                    found: format!("{other:?}"),
                });
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| tok_err(&origin, e))?;
        let id = |key: &str| -> Result<Option<u32>> {
            match gguf.metadata(key) {
                Some(_) => Ok(Some(gguf.get_usize(key)? as u32)),
                None => Ok(None),
            }
        };
        let eos_id = id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| ModelError::MissingKey {
            path: gguf.path().to_path_buf(),
            key: "tokenizer.ggml.eos_token_id".into(),
        })?;
        let name = |i: u32| tokens.get(i as usize).map(|s| s.to_string());
        let bos_token = id("tokenizer.ggml.bos_token_id")?.and_then(name);
        let eos_token = name(eos_id).ok_or_else(|| ModelError::BadKey {
            path: gguf.path().to_path_buf(),
            key: "tokenizer.ggml.eos_token_id".into(),
            expected: format!("an id below {}", tokens.len()),
            found: eos_id.to_string(),
        })?;
        let chat_template = match gguf.metadata("tokenizer.chat_template") {
            Some(_) => Some(gguf.get_str("tokenizer.chat_template")?.to_string()),
            None => None,
        };
        Ok(Self::assemble(
            inner,
            chat_template,
            bos_token,
            eos_token,
            eos_id,
        ))
    }

    /// Loads `tokenizer.json` and, if present, `tokenizer_config.json` (chat template,
    /// BOS/EOS) from a Hugging Face directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| tok_err(&path.display().to_string(), e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: cfg_path.clone(),
                source: e,
            })?
        } else {
            serde_json::Value::Null
        };
        let token = |key: &str| -> Option<String> {
            match &cfg[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            }
        };
        let eos_token = token("eos_token").unwrap_or_else(|| "<|im_end|>".into());
        let eos_id = inner
            .token_to_id(&eos_token)
            .ok_or_else(|| ModelError::BadKey {
                path: cfg_path.clone(),
                key: "eos_token".into(),
                expected: "a token of the vocabulary".into(),
                found: format!("{eos_token:?}"),
            })?;
        let chat_template = cfg["chat_template"].as_str().map(String::from);
        Ok(Self::assemble(
            inner,
            chat_template,
            token("bos_token"),
            eos_token,
            eos_id,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: String,
        eos_id: u32,
    ) -> Self {
        let mut stop_ids = vec![eos_id];
        if let Some(id) = inner.token_to_id("<|im_end|>").filter(|id| *id != eos_id) {
            stop_ids.push(id);
        }
        Self {
            inner,
            chat_template,
            chat_env: Arc::new(OnceLock::new()),
            bos_token,
            eos_token,
            eos_id,
            stop_ids,
        }
    }

    /// Token ids of `text`; special-token text such as `<|im_start|>` maps to its id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err("decode", e))
    }

    /// The end-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Ids that end a generated answer (EOS and `<|im_end|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's chat template (Jinja source), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self
            .chat_env
            .get_or_init(|| self.chat_template.as_deref().map(compile_chat_template))
            .as_ref()
            .ok_or_else(|| ModelError::ChatTemplate("the tokenizer has no chat template".into()))?
            .as_ref()
            .map_err(|e| ModelError::ChatTemplate(e.clone()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }

    /// Token ids of `messages` rendered with the chat template: what
    /// `apply_chat_template(messages, add_generation_prompt=..)` returns.
    pub fn chat_ids(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?)
    }

    /// Writes `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| tok_err(&path.display().to_string(), e))
    }

    /// The `tokenizer_config.json` transformers needs beside `tokenizer.json`. It names the
    /// model's inputs as the original checkpoint's GPT-2 tokenizer class does: without
    /// `model_input_names`, `PreTrainedTokenizerFast` also returns `token_type_ids`, which
    /// `LlamaForCausalLM.generate(**tokenizer(text, return_tensors="pt"))` rejects.
    pub fn hf_tokenizer_config(&self) -> serde_json::Value {
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"],
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "add_bos_token": false,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 8192,
        })
    }
}
