//! Eagle3 (the reference's `Qwen3Eagle3Model`): one decoder layer fed two streams — the
//! next token's embedding and a hidden state (`fc` of the tapped target layers at step 0,
//! then the layer's own previous output) — unrolled for `ttt_length` steps in training.
//!
//! This file is the whole family: loading, the training forward ([`Eagle3Model::ttt_forward`])
//! and the inference step ([`Eagle3Model::step_with_cache`], with its own KV cache).

use super::config::DrafterConfig;
use super::HeadWeights;
use super::{attention_from, frozen_embedding_and_head, linear_from, mlp_from, norm_from};
use crate::io::WeightSource;
use crate::model::attention::{SelfAttention, Visibility};
use crate::model::embedding::Embedding;
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::model::norm::RmsNorm;
use crate::model::rope::Rope;
use crate::model::transformer::residual_mlp;
use crate::LoadError;
use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct Eagle3Layer<B: Backend> {
    pub hidden_norm: RmsNorm<B>,
    pub input_layernorm: RmsNorm<B>,
    /// q/k/v read `2H` (`[input_layernorm(emb) ; hidden_norm(h)]`).
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

#[derive(Module, Debug)]
pub struct Eagle3Model<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub fc: Linear<B>,
    pub layers: Vec<Eagle3Layer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
}

impl<B: Backend> Eagle3Layer<B> {
    /// The layer over the hidden stream `h [b, s, H]` with token embeddings `emb [b, s, H]`:
    /// attention reads `[input_layernorm(emb) ; hidden_norm(h)]` (`attend` decides keys and
    /// visibility), the residual stream is `h`. Returns the pre-norm output `[b, s, H]`.
    pub fn forward(
        &self,
        emb: Tensor<B, 3>,
        h: Tensor<B, 3>,
        attend: impl FnOnce(&SelfAttention<B>, Tensor<B, 3>) -> Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let x = Tensor::cat(
            vec![
                self.input_layernorm.forward(emb),
                self.hidden_norm.forward(h.clone()),
            ],
            2,
        );
        let attended = attend(&self.self_attn, x);
        residual_mlp(
            h,
            &self.self_attn,
            attended,
            &self.post_attention_layernorm,
            &self.mlp,
        )
    }
}

impl<B: Backend> Eagle3Model<B> {
    pub fn load(
        src: &dyn WeightSource,
        config: &DrafterConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let c = &config.base;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let p = "layers.0";
        let layer = Eagle3Layer {
            hidden_norm: norm_from(src, &format!("{p}.hidden_norm.weight"), h, eps, device)?,
            input_layernorm: norm_from(
                src,
                &format!("{p}.input_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            self_attn: attention_from(src, p, config, 2 * h, device)?,
            post_attention_layernorm: norm_from(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            mlp: mlp_from(src, p, config, device)?,
        };
        let (embed_tokens, lm_head) = frozen_embedding_and_head(src, config, device)?;
        Ok(Eagle3Model {
            embed_tokens,
            fc: linear_from(src, "fc", h, config.context_width(), false, device)?,
            layers: vec![layer],
            norm: norm_from(src, "norm.weight", h, eps, device)?,
            lm_head,
        })
    }

    pub fn device(&self) -> B::Device {
        self.fc.weight.device()
    }

    /// The frozen LM head, as the "LM head + loss" seam takes it.
    pub fn head(&self) -> HeadWeights<B> {
        HeadWeights {
            lm_head: self.lm_head.weight.val(),
            markov_w2: None,
            softcap: None,
        }
    }

    /// The LM head's input from a pre-norm hidden state: `norm(h)`.
    pub fn head_input(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm.forward(h)
    }

    /// Dense logits from a pre-norm hidden state: `lm_head(norm(h))`, `[b, s, V]`.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head().base_logits(self.head_input(h))
    }

    /// Training-time test: `steps` unrolled steps over a right-padded batch.
    ///
    /// `ctx_raw [b, L, n_t*H]`, `input_ids[b]` (length L, padding included), `lens[b]` real
    /// lengths. Step `k` pairs position `t` with token `t+k+1` at RoPE position `t+k`; its
    /// keys join a cache, and a query sees the step-0 keys causally plus the later steps' keys
    /// at its own position. Returns each step's pre-norm output `[b, L, H]`.
    pub fn ttt_forward(
        &self,
        rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        input_ids: &[Vec<i64>],
        lens: &[usize],
        steps: usize,
    ) -> Vec<Tensor<B, 3>> {
        let device = ctx_raw.device();
        let [_, len, _] = ctx_raw.dims();
        let layer = &self.layers[0];
        let mut h = self.fc.forward(ctx_raw);
        let mut keys: Vec<Tensor<B, 4>> = Vec::with_capacity(steps);
        let mut values: Vec<Tensor<B, 4>> = Vec::with_capacity(steps);
        let mut outputs = Vec::with_capacity(steps);
        let lens = lens_tensor::<B>(lens, &device);
        for step in 0..steps {
            let (ids, cos, sin, visibility) = ttt_step(rope, input_ids, &lens, len, step);
            h = layer.forward(self.embed_tokens.forward(ids), h, |attn, x| {
                let q = attn.queries(x.clone(), &cos, &sin);
                let (k, v) = attn.keys_values(x, &cos, &sin);
                keys.push(k);
                values.push(v);
                attn.attend(
                    q,
                    Tensor::cat(keys.clone(), 2),
                    Tensor::cat(values.clone(), 2),
                    &visibility,
                )
            });
            outputs.push(h.clone());
        }
        outputs
    }
}

/// One step's inputs: token ids `[b, s]`, RoPE tables and what each query sees.
pub(crate) type StepInputs<B> = (Tensor<B, 2, Int>, Tensor<B, 4>, Tensor<B, 4>, Visibility<B>);

/// `[b]` real lengths on the device.
pub(crate) fn lens_tensor<B: Backend>(lens: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(values, [lens.len()]), device)
}

/// Training-time-test step `step` over right-padded rows of length `len`: position `t` is
/// paired with token `t + step + 1` (0 past the row) at RoPE position `t + step`.
pub(crate) fn ttt_step<B: Backend>(
    rope: &Rope,
    input_ids: &[Vec<i64>],
    lens: &Tensor<B, 1, Int>,
    len: usize,
    step: usize,
) -> StepInputs<B> {
    let device = lens.device();
    let batch = input_ids.len();
    let ids: Vec<i64> = input_ids
        .iter()
        .flat_map(|row| (0..len).map(move |t| row.get(t + step + 1).copied().unwrap_or(0)))
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, len]), &device);
    let positions: Vec<Vec<i64>> = (0..batch)
        .map(|_| (0..len).map(|t| (t + step) as i64).collect())
        .collect();
    let (cos, sin) = rope.tables::<B>(&positions, &device);
    let visibility = Visibility::Ttt {
        lens: lens.clone(),
        len,
        step,
    };
    (ids, cos, sin, visibility)
}

/// An inference step of `tokens [m]` at positions `cache.len()..`, registered with `cache`:
/// `causal` new queries see earlier new keys only; otherwise every key.
pub(crate) fn cached_step<B: Backend>(
    rope: &Rope,
    cache: &mut Eagle3Cache<B>,
    tokens: &[u32],
    causal: bool,
    device: &B::Device,
) -> StepInputs<B> {
    let m = tokens.len();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, m]),
        device,
    );
    let first = cache.len() as i64;
    let positions = vec![(first..first + m as i64).collect::<Vec<_>>()];
    let (cos, sin) = rope.tables::<B>(&positions, device);
    let causal_visibility = cache.kv.begin_step(&positions, device);
    let visibility = if causal {
        causal_visibility
    } else {
        Visibility::All
    };
    (ids, cos, sin, visibility)
}

/// What the Eagle3 training loss needs from a drafter: the unrolled training forward, the
/// LM head's input and the head seam's weights (the Qwen3 and the Gemma4 Eagle3 models).
pub trait Eagle3Drafter<B: Backend> {
    fn device(&self) -> B::Device;
    fn head(&self) -> HeadWeights<B>;
    /// The LM head's input from a pre-norm hidden state.
    fn head_input(&self, h: Tensor<B, 3>) -> Tensor<B, 3>;
    /// Each unrolled step's pre-norm output `[b, L, H]` (see [`Eagle3Model::ttt_forward`]).
    fn ttt_forward(
        &self,
        rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        input_ids: &[Vec<i64>],
        lens: &[usize],
        steps: usize,
    ) -> Vec<Tensor<B, 3>>;
}

impl<B: Backend> Eagle3Drafter<B> for Eagle3Model<B> {
    fn device(&self) -> B::Device {
        Eagle3Model::device(self)
    }
    fn head(&self) -> HeadWeights<B> {
        Eagle3Model::head(self)
    }
    fn head_input(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        Eagle3Model::head_input(self, h)
    }
    fn ttt_forward(
        &self,
        rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        input_ids: &[Vec<i64>],
        lens: &[usize],
        steps: usize,
    ) -> Vec<Tensor<B, 3>> {
        Eagle3Model::ttt_forward(self, rope, ctx_raw, input_ids, lens, steps)
    }
}

/// What speculative decoding needs from an Eagle3 drafter at inference (the Qwen3 and the
/// Gemma4 models).
pub trait Eagle3Inference<B: Backend> {
    fn head(&self) -> HeadWeights<B>;
    /// Dense logits from a pre-norm hidden state, `[b, s, V]`.
    fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3>;
    /// See [`Eagle3Model::step_with_cache`].
    fn step_with_cache(
        &self,
        rope: &Rope,
        cache: &mut Eagle3Cache<B>,
        h: Tensor<B, 3>,
        tokens: &[u32],
        causal: bool,
    ) -> Tensor<B, 3>;
}

impl<B: Backend> Eagle3Inference<B> for Eagle3Model<B> {
    fn head(&self) -> HeadWeights<B> {
        Eagle3Model::head(self)
    }
    fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        Eagle3Model::logits(self, h)
    }
    fn step_with_cache(
        &self,
        rope: &Rope,
        cache: &mut Eagle3Cache<B>,
        h: Tensor<B, 3>,
        tokens: &[u32],
        causal: bool,
    ) -> Tensor<B, 3> {
        Eagle3Model::step_with_cache(self, rope, cache, h, tokens, causal)
    }
}

/// The Eagle3 layer's inference cache (one row, the shared [`KvCache`]).
#[derive(Debug, Clone)]
pub struct Eagle3Cache<B: Backend> {
    pub(crate) kv: KvCache<B>,
}

impl<B: Backend> Eagle3Cache<B> {
    pub fn new() -> Self {
        Eagle3Cache {
            kv: KvCache::new(1, 1),
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.kv.len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.kv.truncate(0, len);
    }
}

impl<B: Backend> Default for Eagle3Cache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Eagle3Model<B> {
    /// Runs the layer on hidden inputs `h [1, m, H or n_t*H]` (fc applied when it is raw
    /// target features) paired with `tokens [m]` at positions `cache.len()..`, appending to
    /// `cache`. `causal`: new queries see earlier new keys only; otherwise every new key.
    /// Returns the pre-norm outputs `[1, m, H]`.
    pub fn step_with_cache(
        &self,
        rope: &Rope,
        cache: &mut Eagle3Cache<B>,
        h: Tensor<B, 3>,
        tokens: &[u32],
        causal: bool,
    ) -> Tensor<B, 3> {
        let device = h.device();
        let h = if h.dims()[2] == self.fc.in_features() {
            self.fc.forward(h)
        } else {
            h
        };
        let (ids, cos, sin, visibility) = cached_step(rope, cache, tokens, causal, &device);
        self.layers[0].forward(self.embed_tokens.forward(ids), h, |attn, x| {
            crate::model::transformer::cached_attention(
                attn,
                x,
                &cos,
                &sin,
                &mut cache.kv,
                0,
                &visibility,
            )
        })
    }
}
