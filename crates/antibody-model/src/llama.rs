//! The Llama decoder in burn, built for training and analysis: full-sequence forward with
//! readable and perturbable activation sites, plus a KV-cached path for generation.
//!
//! The module tree mirrors transformers' `LlamaForCausalLM`, so burn module paths are the
//! Hugging Face tensor names (see [`crate::names`]).

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData, backend::Backend};

use crate::batch::{TokenBatch, attention_mask, rope_tables};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::site::{ForwardOutput, Hooks, Site, SiteKind};

/// Root-mean-square layer norm, computed in f32: `x / sqrt(mean(x²) + eps) · weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-feature scale.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    fn new(size: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([size], device)),
            eps,
        }
    }

    /// # Shapes
    /// `[.., d] → [.., d]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt();
        (x / rms) * self.weight.val().unsqueeze()
    }
}

/// Grouped-query self-attention with rotary position embeddings.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection, `hidden → heads·head_dim`.
    pub q_proj: Linear<B>,
    /// Key projection, `hidden → kv_heads·head_dim`.
    pub k_proj: Linear<B>,
    /// Value projection, `hidden → kv_heads·head_dim`.
    pub v_proj: Linear<B>,
    /// Output projection, `heads·head_dim → hidden`.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
}

/// The gated (SwiGLU) MLP.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection, `hidden → intermediate`.
    pub gate_proj: Linear<B>,
    /// Up projection, `hidden → intermediate`.
    pub up_proj: Linear<B>,
    /// Down projection, `intermediate → hidden`.
    pub down_proj: Linear<B>,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Self-attention block.
    pub self_attn: Attention<B>,
    /// MLP block.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

/// The decoder stack (`model.*` in Hugging Face names).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// Token embedding, `[vocab, hidden]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// A Llama causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// The decoder stack.
    pub model: LlamaModel<B>,
    /// Untied LM head, `hidden → vocab`; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// The architecture.
    #[module(skip)]
    pub config: LlamaConfig,
    /// The dtype the projections, attention and MLP compute in (mixed precision): the
    /// weights stay as loaded (f32, the master copy the optimizer updates) and are cast in
    /// the forward, so their gradients arrive in f32; the residual stream, the norms, the
    /// softmax and every hooked site stay f32. `F32` (the default) casts nothing.
    #[module(skip)]
    pub compute_dtype: FloatDType,
}

/// Rotary tables and the additive attention mask on the device, shared by all layers of
/// one pass.
struct Context<B: Backend> {
    /// RoPE tables repeated over the query heads, `[batch, seq, heads, head_dim]`.
    cos_q: Tensor<B, 4>,
    sin_q: Tensor<B, 4>,
    /// The same over the KV heads, `[batch, seq, kv_heads, head_dim]`.
    cos_k: Tensor<B, 4>,
    sin_k: Tensor<B, 4>,
    /// `0` where a query may attend, [`MASKED`] elsewhere:
    /// `[batch, kv_heads, n_rep·seq, keys]` (f32: added to the scores in f32).
    bias: Tensor<B, 4>,
    /// The compute dtype ([`Llama::compute_dtype`]); the RoPE tables are in it.
    dtype: FloatDType,
}

/// Added to the scores of masked keys: `exp` underflows to exactly 0 (every row keeps its
/// own position unmasked, so no row is all-masked).
const MASKED: f32 = -1e9;

/// Per-layer key/value cache for generation: `[batch, kv_heads, capacity, head_dim]` each.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    keys: Vec<Option<Tensor<B, 4>>>,
    values: Vec<Option<Tensor<B, 4>>>,
    /// Which cached key slots hold real tokens, `[batch, capacity]` row-major.
    key_valid: Vec<bool>,
    /// Next position id of each sequence.
    next_position: Vec<usize>,
    len: usize,
    capacity: usize,
    batch: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` sequences of at most `capacity` tokens.
    pub fn new(config: &LlamaConfig, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let shape = [batch, config.num_kv_heads, capacity, config.head_dim];
        Self {
            keys: (0..config.num_layers)
                .map(|_| Some(Tensor::zeros(shape, device)))
                .collect(),
            values: (0..config.num_layers)
                .map(|_| Some(Tensor::zeros(shape, device)))
                .collect(),
            key_valid: vec![false; batch * capacity],
            next_position: vec![0; batch],
            len: 0,
            capacity,
            batch,
        }
    }

    /// Tokens cached so far (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the sequences at `rows` (indices into the current batch, in the order
    /// given) and drops the rest, so that decoding stops paying for sequences that have
    /// finished. The kept sequences' keys, values, validity and positions are unchanged.
    ///
    /// # Panics
    /// When a row is out of range.
    pub fn retain(&mut self, rows: &[usize]) {
        assert!(
            rows.iter().all(|&r| r < self.batch),
            "retain: a row is outside the batch of {}",
            self.batch
        );
        if rows.len() == self.batch && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        let keep = |slot: &mut Option<Tensor<B, 4>>| {
            let t = slot.take().expect("cache slot is always refilled");
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(
                    rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                    [rows.len()],
                ),
                &t.device(),
            );
            *slot = Some(t.select(0, idx));
        };
        self.keys.iter_mut().for_each(&keep);
        self.values.iter_mut().for_each(&keep);
        let cap = self.capacity;
        self.key_valid = rows
            .iter()
            .flat_map(|&r| self.key_valid[r * cap..(r + 1) * cap].to_vec())
            .collect();
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
        self.batch = rows.len();
    }

    fn store(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, t, d] = k.dims();
        let range = [0..b, 0..h, self.len..self.len + t, 0..d];
        let end = self.len + t;
        let put = |slot: &mut Option<Tensor<B, 4>>, x: Tensor<B, 4>| {
            let cached = slot.take().expect("cache slot is always refilled");
            // The cache is created f32; under a half compute dtype it takes the keys' dtype
            // at the first store (a no-op when they already agree).
            let cached = cached.cast(FloatDType::from(x.dtype()));
            let updated = cached.slice_assign(range.clone(), x);
            *slot = Some(updated.clone());
            updated.slice([0..b, 0..h, 0..end, 0..d])
        };
        let k_all = put(&mut self.keys[layer], k);
        let v_all = put(&mut self.values[layer], v);
        (k_all, v_all)
    }
}

impl LlamaConfig {
    /// A model of this architecture with burn's default random initialization; load weights
    /// into it with [`crate::checkpoint`] or [`crate::tiny`].
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let h = self.hidden_size;
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        let layers = (0..self.num_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(h, self.num_heads * self.head_dim),
                    k_proj: linear(h, self.num_kv_heads * self.head_dim),
                    v_proj: linear(h, self.num_kv_heads * self.head_dim),
                    o_proj: linear(self.num_heads * self.head_dim, h),
                    num_heads: self.num_heads,
                    num_kv_heads: self.num_kv_heads,
                    head_dim: self.head_dim,
                },
                mlp: Mlp {
                    gate_proj: linear(h, self.intermediate_size),
                    up_proj: linear(h, self.intermediate_size),
                    down_proj: linear(self.intermediate_size, h),
                },
                input_layernorm: RmsNorm::new(h, self.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::new(h, self.rms_norm_eps, device),
            })
            .collect();
        Llama {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, h).init(device),
                layers,
                norm: RmsNorm::new(h, self.rms_norm_eps, device),
            },
            lm_head: (!self.tie_word_embeddings).then(|| linear(h, self.vocab_size)),
            config: self.clone(),
            compute_dtype: crate::DTypeSpec::process().float(),
        }
    }
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// `x: [batch, seq, hidden] → [batch, seq, hidden]`; the context's mask bias is
    /// `[batch, kv_heads, n_rep·seq, keys]` (keys = cached + seq).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &Context<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let dt = ctx.dtype;
        // RoPE in the projections' own contiguous [b, t, heads, head_dim] layout (full-shape
        // tables: no broadcasting), then heads to the front for the matmuls.
        let q = project(&self.q_proj, x.clone(), dt).reshape([b, t, nh, hd]);
        let q = rotate(q, &ctx.cos_q, &ctx.sin_q).swap_dims(1, 2);
        let k = project(&self.k_proj, x.clone(), dt).reshape([b, t, nkv, hd]);
        let k = rotate(k, &ctx.cos_k, &ctx.sin_k).swap_dims(1, 2);
        let v = project(&self.v_proj, x, dt)
            .reshape([b, t, nkv, hd])
            .swap_dims(1, 2);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.store(layer, k, v),
            None => (k, v),
        };
        // Grouped-query attention without copying K/V per head: the n_rep query heads that
        // share a KV head are stacked along the query axis (row r·t + i). Written as two
        // batched matmuls around a softmax: the same ops for inference and autodiff.
        let n_rep = nh / nkv;
        let q = q.reshape([b, nkv, n_rep * t, hd]) * (1.0 / (hd as f64).sqrt());
        // Scores and softmax in f32 under a half compute dtype (the mask bias is f32, and
        // -1e9 is not finite in f16); the casts are no-ops in f32.
        let scores = q.matmul(k.swap_dims(2, 3)).cast(FloatDType::F32) + ctx.bias.clone();
        let out = softmax(scores, 3).cast(dt).matmul(v);
        let out = out
            .reshape([b, nh, t, hd])
            .swap_dims(1, 2)
            .reshape([b, t, nh * hd]);
        project(&self.o_proj, out, dt)
    }
}

/// A projection applied to every token at once: `[b, t, in]` is flattened to one
/// `[b·t, in]` matrix so the backend runs a single GEMM (burn's rank-3 `linear` runs one
/// matmul per batch row, which for decoding, `t = 1`, means a GEMV per sequence).
///
/// Under a half compute dtype `dt` the input and the weight are cast to it first (the
/// weight's cast is in the autodiff graph, so its gradient reaches the f32 weight in f32);
/// in f32 this is exactly burn's `Linear::forward`.
///
/// # Shapes
/// `[b, t, in] → [b, t, out]`
fn project<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>, dt: FloatDType) -> Tensor<B, 3> {
    let [b, t, i] = x.dims();
    let x = x.reshape([b * t, i]);
    let y = if dt == FloatDType::F32 {
        linear.forward(x)
    } else {
        x.cast(dt).matmul(linear.weight.val().cast(dt))
    };
    let o = y.dims()[1];
    y.reshape([b, t, o])
}

/// `Ok` when `dtype` is a compute dtype (f32, f16, bf16) that `device` can store and compute
/// in; an error naming the device otherwise (bf16 on a Vulkan device without it).
pub(crate) fn check_compute_dtype<B: Backend>(device: &B::Device, dtype: FloatDType) -> Result<()> {
    if !matches!(dtype, FloatDType::F32 | FloatDType::F16 | FloatDType::BF16) {
        return Err(ModelError::Invalid(format!(
            "compute dtype {dtype:?}: use f32, f16 or bf16"
        )));
    }
    if !B::supports_dtype(device, dtype.into()) {
        return Err(ModelError::Invalid(format!(
            "device {device:?} cannot compute in {dtype:?} (the backend reports no storage and \
             arithmetic for it); use f32{}",
            if dtype == FloatDType::BF16 {
                " or f16"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// `x·sigmoid(x)` written as `x / (1 + e^(−x))`: the same function as burn's `silu`, about
/// twice as fast on the CPU backend, and differentiable through the same basic ops. In a
/// half dtype `e^(−x)` overflows for x < −11 (f16) and its backward multiplies 0 by ∞, so
/// half tensors take burn's `x·sigmoid(x)` (sigmoid is computed in f32 and its backward is
/// `s·(1 − s)`).
fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if FloatDType::from(x.dtype()) == FloatDType::F32 {
        x.clone() / (x.neg().exp() + 1.0)
    } else {
        burn::tensor::activation::silu(x)
    }
}

/// Rotate-half RoPE: `x·cos + rotate_half(x)·sin`, with `rotate_half(x) = [−x₂, x₁]`.
///
/// # Shapes
/// `x, cos, sin: [batch, seq, heads, head_dim]`.
fn rotate<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, t, h, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..t, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..t, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

impl<B: Backend> Llama<B> {
    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// This model computing in `dtype` ([`Llama::compute_dtype`]: the weights stay as they
    /// are, the projections, attention and MLP run in `dtype`). An error, never a panic,
    /// when the device cannot store and compute in it (bf16 on a Vulkan device without it)
    /// or when it is not one of f32, f16 and bf16.
    pub fn with_compute_dtype(mut self, dtype: FloatDType) -> Result<Self> {
        check_compute_dtype::<B>(&self.device(), dtype)?;
        self.compute_dtype = dtype;
        Ok(self)
    }

    fn context(
        &self,
        positions: &[usize],
        key_valid: &[bool],
        batch: usize,
        past: usize,
        tq: usize,
    ) -> Context<B> {
        let c = &self.config;
        let device = self.device();
        let (cos, sin) = rope_tables(positions, c.head_dim, c.rope_theta);
        let table = |v: &[f32], heads: usize| {
            let mut full = Vec::with_capacity(v.len() * heads);
            for row in v.chunks(c.head_dim) {
                for _ in 0..heads {
                    full.extend_from_slice(row);
                }
            }
            Tensor::<B, 4>::from_data(
                TensorData::new(full, [batch, tq, heads, c.head_dim]),
                &device,
            )
            .cast(self.compute_dtype)
        };
        let n_rep = c.num_heads / c.num_kv_heads;
        let keys = key_valid.len() / batch.max(1);
        let mask = attention_mask(key_valid, batch, past, tq, n_rep);
        let per_row = n_rep * tq * keys;
        let mut bias = Vec::with_capacity(batch * c.num_kv_heads * per_row);
        for row in mask.chunks(per_row) {
            for _ in 0..c.num_kv_heads {
                bias.extend(row.iter().map(|&m| if m { MASKED } else { 0.0 }));
            }
        }
        let bias = Tensor::<B, 4>::from_data(
            TensorData::new(bias, [batch, c.num_kv_heads, n_rep * tq, keys]),
            &device,
        );
        Context {
            cos_q: table(&cos, c.num_heads),
            sin_q: table(&sin, c.num_heads),
            cos_k: table(&cos, c.num_kv_heads),
            sin_k: table(&sin, c.num_kv_heads),
            bias,
            dtype: self.compute_dtype,
        }
    }

    fn ids_tensor(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Tensor<B, 2, Int>> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Ok(Tensor::from_data(
            TensorData::new(ids, [batch, seq]),
            &self.device(),
        ))
    }

    fn check_hooks(&self, hooks: &Hooks<B>, batch: usize, seq: usize) -> Result<()> {
        let c = &self.config;
        for site in hooks.capture.iter().chain(hooks.perturb.keys()) {
            if site.layer >= c.num_layers {
                return Err(ModelError::Invalid(format!(
                    "site {site}: layer index out of range (the model has {} layers)",
                    c.num_layers
                )));
            }
        }
        for (site, delta) in &hooks.perturb {
            let width = match site.kind {
                SiteKind::MlpHidden => c.intermediate_size,
                _ => c.hidden_size,
            };
            if delta.dims() != [batch, seq, width] {
                return Err(ModelError::Invalid(format!(
                    "perturbation at {site} has shape {:?}, expected {:?}",
                    delta.dims(),
                    [batch, seq, width]
                )));
            }
        }
        Ok(())
    }

    /// Runs the decoder over a whole batch, reading and perturbing sites as `hooks` asks.
    ///
    /// # Shapes
    /// `batch: [B, T]` tokens → `hidden: [B, T, hidden]` (after the final norm) and one
    /// `[B, T, width]` tensor per captured site.
    pub fn forward_hidden(&self, batch: &TokenBatch, hooks: &Hooks<B>) -> Result<ForwardOutput<B>> {
        let (b, t) = (batch.batch, batch.seq);
        self.check_hooks(hooks, b, t)?;
        let ids = self.ids_tensor(&batch.ids, b, t)?;
        let ctx = self.context(&batch.positions(), &batch.mask, b, 0, t);
        let mut sites = std::collections::BTreeMap::new();
        let hidden = self.run_layers(ids, &ctx, hooks, &mut sites, None);
        Ok(ForwardOutput { hidden, sites })
    }

    /// Full-sequence logits.
    ///
    /// # Shapes
    /// `batch: [B, T]` → `logits: [B, T, vocab]`, plus the [`ForwardOutput`].
    pub fn forward(
        &self,
        batch: &TokenBatch,
        hooks: &Hooks<B>,
    ) -> Result<(Tensor<B, 3>, ForwardOutput<B>)> {
        let out = self.forward_hidden(batch, hooks)?;
        Ok((self.logits(out.hidden.clone()), out))
    }

    /// The LM head (tied or not).
    ///
    /// # Shapes
    /// `[B, T, hidden] → [B, T, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        match &self.lm_head {
            Some(head) => project(head, hidden, FloatDType::F32),
            None => {
                let w = self.model.embed_tokens.weight.val();
                let v = w.dims()[0];
                hidden
                    .reshape([b * t, h])
                    .matmul(w.transpose())
                    .reshape([b, t, v])
            }
        }
    }

    /// The output projection as `[vocab, hidden]` (`logits = hidden · Wᵀ`): the tied
    /// embedding, or the untied head's weight transposed. Chunked losses project vocabulary
    /// slices of it themselves instead of materializing `[B, T, vocab]` logits.
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(),
            None => self.model.embed_tokens.weight.val(),
        }
    }

    fn run_layers(
        &self,
        ids: Tensor<B, 2, Int>,
        ctx: &Context<B>,
        hooks: &Hooks<B>,
        sites: &mut std::collections::BTreeMap<Site, Tensor<B, 3>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let dt = ctx.dtype;
        let f32 = FloatDType::F32;
        // The residual stream is f32 whatever the compute dtype; each branch's output is
        // cast back to f32 before its site (so hooks read and perturb f32 tensors, and LAT's
        // f32 perturbations get f32 gradients) and before the residual add.
        let mut x = self.model.embed_tokens.forward(ids);
        let at = |kind, layer, t: Tensor<B, 3>, sites: &mut std::collections::BTreeMap<_, _>| {
            let site = Site { layer, kind };
            let t = t.cast(f32);
            let t = match hooks.perturb.get(&site) {
                Some(delta) => t + delta.clone(),
                None => t,
            };
            if hooks.capture.contains(&site) {
                sites.insert(site, t.clone());
            }
            t
        };
        for (l, layer) in self.model.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(x.clone());
            let attn = layer
                .self_attn
                .forward(normed, ctx, cache.as_deref_mut().map(|c| (c, l)));
            let attn = at(SiteKind::AttnOut, l, attn, sites);
            x = x + attn;
            let normed = layer.post_attention_layernorm.forward(x.clone());
            let mlp = &layer.mlp;
            let hidden = silu(project(&mlp.gate_proj, normed.clone(), dt))
                * project(&mlp.up_proj, normed, dt);
            let hidden = at(SiteKind::MlpHidden, l, hidden, sites);
            x = x + project(&mlp.down_proj, hidden, dt).cast(f32);
            x = at(SiteKind::Residual, l, x, sites);
        }
        self.model.norm.forward(x)
    }

    /// Feeds `new_ids` (`[batch, t]`, `new_valid` marking real tokens) through the model,
    /// appending to `cache`, and returns the final hidden state of the last new position.
    ///
    /// # Shapes
    /// `new_ids: [B, t]` → `[B, hidden]`
    pub fn forward_cached(
        &self,
        new_ids: &[u32],
        new_valid: &[bool],
        t: usize,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 2>> {
        let b = cache.batch;
        if cache.len + t > cache.capacity {
            return Err(ModelError::Invalid(format!(
                "KV cache full: {} cached + {t} new > capacity {}",
                cache.len, cache.capacity
            )));
        }
        let mut positions = Vec::with_capacity(b * t);
        for row in 0..b {
            for i in 0..t {
                let valid = new_valid[row * t + i];
                cache.key_valid[row * cache.capacity + cache.len + i] = valid;
                let p = cache.next_position[row];
                positions.push(if valid { p } else { p.saturating_sub(1) });
                if valid {
                    cache.next_position[row] += 1;
                }
            }
        }
        let keys = cache.len + t;
        let key_valid: Vec<bool> = (0..b)
            .flat_map(|row| {
                cache.key_valid[row * cache.capacity..row * cache.capacity + keys].to_vec()
            })
            .collect();
        let ctx = self.context(&positions, &key_valid, b, cache.len, t);
        let ids = self.ids_tensor(new_ids, b, t)?;
        let mut sites = std::collections::BTreeMap::new();
        let hidden = self.run_layers(ids, &ctx, &Hooks::none(), &mut sites, Some(&mut *cache));
        cache.len += t;
        let h = self.config.hidden_size;
        Ok(hidden.slice([0..b, t - 1..t, 0..h]).reshape([b, h]))
    }
}
