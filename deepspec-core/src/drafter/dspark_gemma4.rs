//! The reference's `Gemma4DSparkModel` (DSpark, and DFlash without the heads): the DSpark
//! block drafter on Gemma4 layers.
//!
//! - Block tokens are embedded times `sqrt(H)`.
//! - Every layer is a full-attention Gemma4 layer: q/k norms, weight-free v norm,
//!   `attention_k_eq_v` (keys and values from `k_proj`), score scale 1.0, four norms,
//!   `layer_scalar`, GELU-tanh MLP (double-wide per the target's KV-sharing rule).
//! - The context `hidden_norm(fc(taps))` is projected by each layer's `k_proj` into extra keys
//!   and values, as in the Qwen3 drafter; RoPE is the config's full-attention ("proportional")
//!   one.
//! - Logits are soft-capped, and the Markov bias is added after the cap.
//!
//! Checkpoint keys are the Qwen3 drafter's, minus `v_proj`, plus the Gemma4 norms and
//! `layers.<i>.layer_scalar`.

use super::dspark::{
    block_heads, draft_slots, BlockDraft, BlockFeatures, BlockInference, BlockInputs, ContextCache,
};
use super::heads::{ConfidenceHead, MarkovHead};
use super::{
    frozen_embedding_and_head, linear_from, norm_from, BlockDrafter, DrafterConfig, HeadWeights,
};
use crate::io::WeightSource;
use crate::model::attention::{attention, Visibility};
use crate::model::embedding::Embedding;
use crate::model::gemma4::{Gemma4Attention, Gemma4Config, Gemma4Layer, Gemma4Mlp, LayerType};
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;
use crate::model::param_from_host;
use crate::model::rope::Rope;
use crate::LoadError;
use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct DSparkGemma4Model<B: Backend> {
    /// Frozen copy of the target's embedding.
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<Gemma4Layer<B>>,
    pub norm: RmsNorm<B>,
    pub fc: Linear<B>,
    pub hidden_norm: RmsNorm<B>,
    /// Frozen copy of the target's LM head.
    pub lm_head: Linear<B>,
    pub markov_head: Option<MarkovHead<B>>,
    pub confidence_head: Option<ConfidenceHead<B>>,
    /// The final logit soft-cap `c` (none: no cap).
    pub softcap: Option<f64>,
}

/// Drafter layer `i` (`p = layers.<i>`): full attention reading `input_width` features.
pub(crate) fn layer<B: Backend>(
    src: &dyn WeightSource,
    p: &str,
    g: &Gemma4Config,
    i: usize,
    input_width: usize,
    device: &B::Device,
) -> Result<Gemma4Layer<B>, LoadError> {
    let (h, eps) = (g.hidden_size, g.rms_norm_eps);
    let (d, kv_heads) = g.attention_shape(LayerType::Full);
    let heads = g.num_attention_heads;
    let width = g.mlp_width(i, g.num_hidden_layers);
    let lin = |name: &str, out: usize, inp: usize| {
        linear_from(src, &format!("{p}.{name}"), out, inp, false, device)
    };
    let norm =
        |name: &str, dim: usize| norm_from(src, &format!("{p}.{name}.weight"), dim, eps, device);
    Ok(Gemma4Layer {
        input_layernorm: norm("input_layernorm", h)?,
        self_attn: Gemma4Attention {
            q_proj: lin("self_attn.q_proj", heads * d, input_width)?,
            k_proj: Some(lin("self_attn.k_proj", kv_heads * d, input_width)?),
            v_proj: if g.k_eq_v(LayerType::Full) {
                None
            } else {
                Some(lin("self_attn.v_proj", kv_heads * d, input_width)?)
            },
            o_proj: lin("self_attn.o_proj", h, heads * d)?,
            q_norm: norm("self_attn.q_norm", d)?,
            k_norm: Some(norm("self_attn.k_norm", d)?),
            heads,
            kv_heads,
            head_dim: d,
            eps,
        },
        post_attention_layernorm: norm("post_attention_layernorm", h)?,
        pre_feedforward_layernorm: norm("pre_feedforward_layernorm", h)?,
        mlp: Gemma4Mlp {
            gate_proj: lin("mlp.gate_proj", width, h)?,
            up_proj: lin("mlp.up_proj", width, h)?,
            down_proj: lin("mlp.down_proj", h, width)?,
        },
        post_feedforward_layernorm: norm("post_feedforward_layernorm", h)?,
        // A buffer (1.0 in the reference's drafters), never trained.
        layer_scalar: super::frozen(param_from_host(
            src.tensor_shaped(&format!("{p}.layer_scalar"), &[1])?,
            device,
        )),
    })
}

impl<B: Backend> DSparkGemma4Model<B> {
    pub fn load(
        src: &dyn WeightSource,
        config: &DrafterConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let g = config
            .gemma4
            .as_ref()
            .expect("a Gemma4 drafter config carries its Gemma4 settings");
        let (h, eps) = (g.hidden_size, g.rms_norm_eps);
        let layers = (0..g.num_hidden_layers)
            .map(|i| layer(src, &format!("layers.{i}"), g, i, h, device))
            .collect::<Result<Vec<_>, _>>()?;
        let (markov_head, confidence_head) = block_heads(src, config, device)?;
        let (embed_tokens, lm_head) = frozen_embedding_and_head(src, config, device)?;
        Ok(DSparkGemma4Model {
            embed_tokens,
            layers,
            norm: norm_from(src, "norm.weight", h, eps, device)?,
            fc: linear_from(src, "fc", h, config.context_width(), false, device)?,
            hidden_norm: norm_from(src, "hidden_norm.weight", h, eps, device)?,
            lm_head,
            markov_head,
            confidence_head,
            softcap: g.final_logit_softcapping,
        })
    }

    /// Block token embeddings times `sqrt(H)`.
    fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let h = self.hidden_size();
        self.embed_tokens.forward(tokens) * ((h as f32).sqrt() as f64)
    }
}

impl<B: Backend> BlockDrafter<B> for DSparkGemma4Model<B> {
    fn device(&self) -> B::Device {
        self.fc.weight.device()
    }

    fn hidden_size(&self) -> usize {
        self.lm_head.in_features()
    }

    fn head(&self) -> HeadWeights<B> {
        HeadWeights {
            lm_head: self.lm_head.weight.val(),
            markov_w2: self.markov_head.as_ref().map(|m| m.markov_w2.weight.val()),
            softcap: self.softcap,
        }
    }

    /// `rope` is the config's full-attention RoPE (`DrafterConfig::base.rope()`), which
    /// every Gemma4 drafter layer uses.
    fn block_features(
        &self,
        rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        blocks: &BlockInputs<B>,
    ) -> BlockFeatures<B> {
        let [b, ctx_len, _] = ctx_raw.dims();
        let [_, slots] = blocks.tokens.dims();
        let [_, n, k] = blocks.prev_tokens.dims();
        let context = self.hidden_norm.forward(self.fc.forward(ctx_raw));
        let (cos, sin) = rope.tables::<B>(blocks.positions, &context.device());
        let (cos_ctx, sin_ctx) = (
            cos.clone().narrow(2, 0, ctx_len),
            sin.clone().narrow(2, 0, ctx_len),
        );
        let (cos_q, sin_q) = (cos.narrow(2, ctx_len, slots), sin.narrow(2, ctx_len, slots));
        let visibility = Visibility::Blocks {
            anchors: blocks.anchors.clone(),
            block_size: k,
            context_len: ctx_len,
            window: blocks.window,
        };
        let mut h = self.embed(blocks.tokens.clone());
        for layer in &self.layers {
            let attn = &layer.self_attn;
            let x = layer.input_layernorm.forward(h.clone());
            let q = attn.queries(x.clone(), &cos_q, &sin_q);
            let (k_ctx, v_ctx) = attn
                .keys_values(context.clone(), &cos_ctx, &sin_ctx)
                .expect("drafter layers have their own keys");
            let (k_blk, v_blk) = attn
                .keys_values(x, &cos_q, &sin_q)
                .expect("drafter layers have their own keys");
            let keys = Tensor::cat(vec![k_ctx, k_blk], 2);
            let values = Tensor::cat(vec![v_ctx, v_blk], 2);
            h = layer.finish(h, attention(q, keys, values, &visibility, 1.0));
        }
        let hidden: Tensor<B, 4> = self.norm.forward(h).reshape([b, n, k, self.hidden_size()]);
        BlockFeatures::with_heads(
            hidden,
            self.markov_head.as_ref(),
            self.confidence_head.as_ref(),
            blocks.prev_tokens.clone(),
        )
    }
}

impl<B: Backend> BlockInference<B> for DSparkGemma4Model<B> {
    fn new_cache(&self) -> ContextCache<B> {
        ContextCache {
            kv: KvCache::new(self.layers.len(), 1),
        }
    }

    fn extend_context(&self, rope: &Rope, cache: &mut ContextCache<B>, ctx_raw: Tensor<B, 3>) {
        let [_, m, _] = ctx_raw.dims();
        if m == 0 {
            return;
        }
        let first = cache.len() as i64;
        let positions = vec![(first..first + m as i64).collect::<Vec<_>>()];
        let device = ctx_raw.device();
        let (cos, sin) = rope.tables::<B>(&positions, &device);
        cache.kv.begin_step(&positions, &device);
        let context = self.hidden_norm.forward(self.fc.forward(ctx_raw));
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = layer
                .self_attn
                .keys_values(context.clone(), &cos, &sin)
                .expect("drafter layers have their own keys");
            cache.kv.append(i, k, v);
        }
    }

    fn propose(
        &self,
        rope: &Rope,
        cache: &mut ContextCache<B>,
        current: u32,
        block_size: usize,
        mask_token_id: u32,
        choose: &mut dyn FnMut(usize, Tensor<B, 1>) -> u32,
    ) -> BlockDraft {
        let device = self.fc.weight.device();
        let start = cache.len();
        let mut block = vec![mask_token_id as i64; block_size];
        block[0] = current as i64;
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(block, [1, block_size]), &device);
        let positions = vec![(start as i64..(start + block_size) as i64).collect::<Vec<_>>()];
        let (cos, sin) = rope.tables::<B>(&positions, &device);
        let visibility = Visibility::Blocks {
            anchors: Tensor::from_data(TensorData::new(vec![start as i64], [1, 1]), &device),
            block_size,
            context_len: cache.kv.slots(),
            window: None,
        };
        let mut h = self.embed(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            let x = layer.input_layernorm.forward(h.clone());
            let q = attn.queries(x.clone(), &cos, &sin);
            let (k, v) = attn
                .keys_values(x, &cos, &sin)
                .expect("drafter layers have their own keys");
            let (k, v) = cache.kv.with_scratch(i, k, v);
            h = layer.finish(h, attention(q, k, v, &visibility, 1.0));
        }
        draft_slots(
            &self.head(),
            self.markov_head.as_ref(),
            self.confidence_head.as_ref(),
            self.norm.forward(h),
            current,
            choose,
        )
    }
}
