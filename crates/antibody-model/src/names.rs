//! The one table of checkpoint tensor names.
//!
//! Hugging Face names are also this crate's burn module paths (the module tree mirrors
//! `LlamaForCausalLM`), so safetensors load and save without renaming; GGUF names map onto
//! them here. No other module spells a checkpoint tensor name.

use crate::config::LlamaConfig;

/// A fix-up applied to a GGUF tensor to bring it into Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufFix {
    /// Stored as in Hugging Face.
    None,
    /// llama.cpp's converter permutes q/k rows for its interleaved RoPE; undo it for the
    /// rotate-half RoPE with this many heads.
    UnpermuteHeads(usize),
}

/// One tensor of a Llama checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face name, which is also the burn module path.
    pub hf: String,
    /// GGUF name.
    pub gguf: String,
    /// Shape in Hugging Face layout (`[out, in]` for projections).
    pub shape: Vec<usize>,
    /// Fix-up on the GGUF side.
    pub fix: GgufFix,
}

/// (GGUF template, HF template) for per-layer tensors; `{i}` is the layer index.
const LAYER_TENSORS: [(&str, &str); 9] = [
    (
        "blk.{i}.attn_norm.weight",
        "model.layers.{i}.input_layernorm.weight",
    ),
    (
        "blk.{i}.attn_q.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
    ),
    (
        "blk.{i}.attn_k.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
    ),
    (
        "blk.{i}.attn_v.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    (
        "blk.{i}.attn_output.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
    ),
    (
        "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
    ),
    (
        "blk.{i}.ffn_gate.weight",
        "model.layers.{i}.mlp.gate_proj.weight",
    ),
    (
        "blk.{i}.ffn_up.weight",
        "model.layers.{i}.mlp.up_proj.weight",
    ),
    (
        "blk.{i}.ffn_down.weight",
        "model.layers.{i}.mlp.down_proj.weight",
    ),
];

/// Every tensor a checkpoint of `config` holds, in a fixed order.
pub fn checkpoint_tensors(config: &LlamaConfig) -> Vec<TensorSpec> {
    let h = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let ff = config.intermediate_size;
    let spec = |gguf: &str, hf: &str, shape: Vec<usize>, fix| TensorSpec {
        hf: hf.into(),
        gguf: gguf.into(),
        shape,
        fix,
    };
    let mut out = vec![spec(
        "token_embd.weight",
        "model.embed_tokens.weight",
        vec![config.vocab_size, h],
        GgufFix::None,
    )];
    for i in 0..config.num_layers {
        for (gguf, hf) in LAYER_TENSORS {
            let (shape, fix) = match hf.rsplit('.').nth(1).unwrap_or_default() {
                "input_layernorm" | "post_attention_layernorm" => (vec![h], GgufFix::None),
                "q_proj" => (vec![q, h], GgufFix::UnpermuteHeads(config.num_heads)),
                "k_proj" => (vec![kv, h], GgufFix::UnpermuteHeads(config.num_kv_heads)),
                "v_proj" => (vec![kv, h], GgufFix::None),
                "o_proj" => (vec![h, q], GgufFix::None),
                "gate_proj" | "up_proj" => (vec![ff, h], GgufFix::None),
                _ => (vec![h, ff], GgufFix::None), // down_proj
            };
            let idx = i.to_string();
            out.push(spec(
                &gguf.replace("{i}", &idx),
                &hf.replace("{i}", &idx),
                shape,
                fix,
            ));
        }
    }
    out.push(spec(
        "output_norm.weight",
        "model.norm.weight",
        vec![h],
        GgufFix::None,
    ));
    if !config.tie_word_embeddings {
        out.push(spec(
            "output.weight",
            "lm_head.weight",
            vec![config.vocab_size, h],
            GgufFix::None,
        ));
    }
    out
}

/// Applies llama.cpp's q/k permutation (Hugging Face → GGUF row order): HF row
/// `h·2r + p·r + j` becomes GGUF row `h·2r + 2j + p`. [`unpermute_heads`] undoes it.
pub fn permute_heads(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(data, rows, cols, heads, |h, j, p, half| {
        (h * 2 * half + p * half + j, h * 2 * half + 2 * j + p)
    })
}

/// Moves row `src` to row `dst` for every `(src, dst)` that `map(head, j, p, half)` gives.
fn move_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
    map: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for p in 0..2 {
                let (src, dst) = map(h, j, p, half);
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Reverses llama.cpp's q/k permutation on a row-major `[rows, cols]` matrix.
///
/// llama.cpp stores, per head, the rows of pair `j` as `(2j, 2j+1)` (interleaved);
/// Hugging Face stores them as `(j, j + d/2)` (rotate-half). With `r = rows / heads / 2`,
/// GGUF row `h·2r + 2j + p` is HF row `h·2r + p·r + j`.
pub fn unpermute_heads(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(data, rows, cols, heads, |h, j, p, half| {
        (h * 2 * half + 2 * j + p, h * 2 * half + p * half + j)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_tensor_once() {
        let c = LlamaConfig::smollm2_135m();
        let specs = checkpoint_tensors(&c);
        assert_eq!(specs.len(), 1 + 9 * 30 + 1);
        let mut hf: Vec<_> = specs.iter().map(|s| s.hf.clone()).collect();
        hf.sort();
        hf.dedup();
        assert_eq!(hf.len(), specs.len());
        let total: usize = specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(total, c.num_parameters());
        let q = &specs[2];
        assert_eq!(q.gguf, "blk.0.attn_q.weight");
        assert_eq!(q.hf, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(q.fix, GgufFix::UnpermuteHeads(9));
        assert_eq!(specs[3].fix, GgufFix::UnpermuteHeads(3));
        assert_eq!(specs[9].hf, "model.layers.0.mlp.down_proj.weight");
        assert_eq!(specs[9].shape, vec![576, 1536]);
    }

    #[test]
    fn untied_models_have_an_lm_head() {
        let mut c = LlamaConfig::tiny_test();
        c.tie_word_embeddings = false;
        let last = checkpoint_tensors(&c).pop().expect("non-empty");
        assert_eq!(
            (last.gguf.as_str(), last.hf.as_str()),
            ("output.weight", "lm_head.weight")
        );
    }

    #[test]
    fn permutation_matches_llama_cpp_and_inverts() {
        // One head of width 4 (r = 2), one column: HF rows [x0, x1 | y0, y1] (rotate-half
        // pairs (x_j, y_j)) are stored by llama.cpp interleaved as [x0, y0, x1, y1].
        let hf = [0.0, 1.0, 10.0, 11.0];
        assert_eq!(permute_heads(&hf, 4, 1, 1), vec![0.0, 10.0, 1.0, 11.0]);
        let (heads, r, cols) = (3, 4, 2);
        let rows = heads * 2 * r;
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let gguf = permute_heads(&data, rows, cols, heads);
        assert_ne!(gguf, data);
        assert_eq!(unpermute_heads(&gguf, rows, cols, heads), data);
    }
}
