//! The DSpark / DFlash parallel drafter (the reference's `Qwen3DSparkModel`): a block of
//! `[anchor, mask, ...]` slots attends to the target's context features injected as extra
//! keys/values in every layer; slot `j` predicts the token at `anchor + j + 1`. DSpark adds
//! the Markov and confidence heads; DFlash is the same class without them.
//!
//! This file is the whole family: loading, the training forward ([`DSparkModel::block_features`]:
//! every block slot's LM-head input, Markov features and confidence) and the inference forward
//! ([`DSparkModel::extend_context`] + [`DSparkModel::propose`], with the drafter's own KV
//! cache). Both run the same [`DSparkModel::backbone`].

use super::config::{DrafterConfig, MarkovKind};
use super::heads::{ConfidenceHead, MarkovHead};
use super::{
    attention_from, frozen_embedding_and_head, linear_from, mlp_from, norm_from, HeadWeights,
};
use crate::io::WeightSource;
use crate::model::attention::{SelfAttention, Visibility};
use crate::model::embedding::Embedding;
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;
use crate::model::param_from_host;
use crate::model::rope::Rope;
use crate::model::transformer::DecoderLayer;
use crate::LoadError;
use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct DSparkModel<B: Backend> {
    /// Frozen copy of the target's embedding.
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `n_t*H -> H`: fuses the tapped target layers.
    pub fc: Linear<B>,
    pub hidden_norm: RmsNorm<B>,
    /// Frozen copy of the target's LM head.
    pub lm_head: Linear<B>,
    pub markov_head: Option<MarkovHead<B>>,
    pub confidence_head: Option<ConfidenceHead<B>>,
}

/// The blocks of one training micro-batch, described for the device.
pub struct BlockInputs<'a, B: Backend> {
    /// `[b, N*k]` block input tokens (anchor token in slot 0, mask elsewhere).
    pub tokens: Tensor<B, 2, Int>,
    /// `[b][L + N*k]` RoPE positions: the context `0..L`, then each slot's.
    pub positions: &'a [Vec<i64>],
    /// `[b, N]` each block's anchor position, `-1` for a dropped block.
    pub anchors: Tensor<B, 2, Int>,
    /// `[b, N, k]` the token before each slot (teacher-forced).
    pub prev_tokens: Tensor<B, 3, Int>,
    /// Context keys a slot may see before its anchor (`None`: all of them).
    pub window: Option<usize>,
}

/// What the training forward gives each block slot: the LM-head input and the Markov
/// features whose bias the head adds (the "LM head + loss" seam consumes both), and the
/// confidence logits.
pub struct BlockFeatures<B: Backend> {
    /// `[b, N, k, H]` post-norm backbone output.
    pub hidden: Tensor<B, 4>,
    /// `[b, N, k, r]` Markov bias features `f` (the bias is `markov_w2 · f`).
    pub markov: Option<Tensor<B, 4>>,
    /// `[b, N, k]` confidence logits.
    pub confidence: Option<Tensor<B, 3>>,
}

/// One drafted block at inference.
#[derive(Debug, Clone, Default)]
pub struct BlockDraft {
    pub tokens: Vec<u32>,
    /// Confidence logit of each slot (empty without a confidence head).
    pub confidence_logits: Vec<f32>,
}

impl<B: Backend> DSparkModel<B> {
    pub fn load(
        src: &dyn WeightSource,
        config: &DrafterConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let c = &config.base;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|i| decoder_layer(src, &format!("layers.{i}"), config, h, device))
            .collect::<Result<Vec<_>, _>>()?;
        let (markov_head, confidence_head) = block_heads(src, config, device)?;
        let (embed_tokens, lm_head) = frozen_embedding_and_head(src, config, device)?;
        Ok(DSparkModel {
            embed_tokens,
            layers,
            norm: norm_from(src, "norm.weight", h, eps, device)?,
            fc: linear_from(src, "fc", h, config.context_width(), false, device)?,
            hidden_norm: norm_from(src, "hidden_norm.weight", h, eps, device)?,
            lm_head,
            markov_head,
            confidence_head,
        })
    }

    pub fn device(&self) -> B::Device {
        self.fc.weight.device()
    }

    pub fn hidden_size(&self) -> usize {
        self.lm_head.in_features()
    }

    /// The weights the "LM head + loss" seam needs: the frozen LM head and the Markov
    /// head's output projection.
    pub fn head(&self) -> HeadWeights<B> {
        HeadWeights {
            lm_head: self.lm_head.weight.val(),
            markov_w2: self.markov_head.as_ref().map(|m| m.markov_w2.weight.val()),
            softcap: None,
        }
    }

    /// Context features `hidden_norm(fc(ctx_raw))`: `[b, L, n_t*H] -> [b, L, H]`.
    pub fn context(&self, ctx_raw: Tensor<B, 3>) -> Tensor<B, 3> {
        self.hidden_norm.forward(self.fc.forward(ctx_raw))
    }

    /// The backbone over `block_tokens [b, S]` at RoPE tables `cos/sin [b, 1, S, d]`.
    /// `context_kv(layer, attention, block_keys, block_values)` returns the keys/values the
    /// block attends to (context then block); `visibility` says what each slot sees.
    /// Returns the post-norm output `[b, S, H]`.
    pub fn backbone(
        &self,
        block_tokens: Tensor<B, 2, Int>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        visibility: &Visibility<B>,
        mut context_kv: impl FnMut(
            usize,
            &SelfAttention<B>,
            Tensor<B, 4>,
            Tensor<B, 4>,
        ) -> (Tensor<B, 4>, Tensor<B, 4>),
    ) -> Tensor<B, 3> {
        let mut h = self.embed_tokens.forward(block_tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h, |attn, a| {
                let q = attn.queries(a.clone(), cos, sin);
                let (k, v) = attn.keys_values(a, cos, sin);
                let (k, v) = context_kv(i, attn, k, v);
                attn.attend(q, k, v, visibility)
            });
        }
        self.norm.forward(h)
    }

    /// The training forward over every block of a micro-batch with context features
    /// `ctx_raw [b, L, n_t*H]`: backbone, then the Markov features and the confidence head.
    pub fn block_features(
        &self,
        rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        blocks: &BlockInputs<B>,
    ) -> BlockFeatures<B> {
        let [b, ctx_len, _] = ctx_raw.dims();
        let [_, slots] = blocks.tokens.dims();
        let [_, n, k] = blocks.prev_tokens.dims();
        let context = self.context(ctx_raw);
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
        let out = self.backbone(
            blocks.tokens.clone(),
            &cos_q,
            &sin_q,
            &visibility,
            |_, attn, k_block, v_block| {
                let (k_ctx, v_ctx) = attn.keys_values(context.clone(), &cos_ctx, &sin_ctx);
                (
                    Tensor::cat(vec![k_ctx, k_block], 2),
                    Tensor::cat(vec![v_ctx, v_block], 2),
                )
            },
        );
        let hidden: Tensor<B, 4> = out.reshape([b, n, k, self.hidden_size()]);
        BlockFeatures::with_heads(
            hidden,
            self.markov_head.as_ref(),
            self.confidence_head.as_ref(),
            blocks.prev_tokens.clone(),
        )
    }
}

/// A block drafter's Markov and confidence heads, either absent.
pub(crate) type BlockHeads<B> = (Option<MarkovHead<B>>, Option<ConfidenceHead<B>>);

/// The Markov and confidence heads a DSpark config asks for (`markov_head.*`,
/// `confidence_head.*`); DFlash has neither.
pub(crate) fn block_heads<B: Backend>(
    src: &dyn WeightSource,
    config: &DrafterConfig,
    device: &B::Device,
) -> Result<BlockHeads<B>, LoadError> {
    let c = &config.base;
    let h = c.hidden_size;
    let markov_head = if config.markov_rank > 0 {
        let r = config.markov_rank;
        let v = c.vocab_size;
        Some(MarkovHead {
            markov_w1: Embedding::new(param_from_host(
                src.tensor_shaped("markov_head.markov_w1.weight", &[v, r])?,
                device,
            )),
            markov_w2: linear_from(src, "markov_head.markov_w2", v, r, false, device)?,
            gate_proj: match config.markov_kind {
                MarkovKind::Gated => Some(linear_from(
                    src,
                    "markov_head.gate_proj",
                    r,
                    h + r,
                    true,
                    device,
                )?),
                _ => None,
            },
            joint_proj: match config.markov_kind {
                MarkovKind::Rnn => Some(linear_from(
                    src,
                    "markov_head.joint_proj",
                    3 * r,
                    2 * r + h,
                    true,
                    device,
                )?),
                _ => None,
            },
        })
    } else {
        None
    };
    let confidence_head = if config.confidence_head {
        let width = if config.confidence_with_markov {
            h + config.markov_rank
        } else {
            h
        };
        Some(ConfidenceHead {
            proj: linear_from(src, "confidence_head.proj", 1, width, true, device)?,
        })
    } else {
        None
    };
    Ok((markov_head, confidence_head))
}

impl<B: Backend> BlockFeatures<B> {
    /// The heads on a block's post-norm output `hidden [b, N, k, H]`: the Markov features of
    /// each slot's previous token `prev_tokens [b, N, k]` and the confidence logits.
    pub fn with_heads(
        hidden: Tensor<B, 4>,
        markov_head: Option<&MarkovHead<B>>,
        confidence_head: Option<&ConfidenceHead<B>>,
        prev_tokens: Tensor<B, 3, Int>,
    ) -> Self {
        let (markov, prev_embedding) = match markov_head {
            Some(head) => {
                let e = head.embed_prev(prev_tokens);
                (Some(head.features(e.clone(), hidden.clone())), Some(e))
            }
            None => (None, None),
        };
        let confidence =
            confidence_head.map(|head| head.forward::<4, 3>(hidden.clone(), prev_embedding));
        BlockFeatures {
            hidden,
            markov,
            confidence,
        }
    }

    /// Dense draft logits `[b, N, k, V]` = `lm_head(hidden)` + the Markov bias: the whole
    /// vocabulary for every slot, for inspection and tests (training goes through the
    /// chunked seam instead).
    pub fn logits(&self, head: &HeadWeights<B>) -> Tensor<B, 4> {
        head.logits(self.hidden.clone(), self.markov.clone())
    }
}

fn decoder_layer<B: Backend>(
    src: &dyn WeightSource,
    p: &str,
    config: &DrafterConfig,
    input_width: usize,
    device: &B::Device,
) -> Result<DecoderLayer<B>, LoadError> {
    let (h, eps) = (config.base.hidden_size, config.base.rms_norm_eps);
    Ok(DecoderLayer {
        input_layernorm: norm_from(src, &format!("{p}.input_layernorm.weight"), h, eps, device)?,
        self_attn: attention_from(src, p, config, input_width, device)?,
        post_attention_layernorm: norm_from(
            src,
            &format!("{p}.post_attention_layernorm.weight"),
            h,
            eps,
            device,
        )?,
        mlp: mlp_from(src, p, config, device)?,
    })
}

/// The drafter's inference cache: keys/values of the context positions fed so far, one
/// row, in the shared [`KvCache`].
#[derive(Debug, Clone)]
pub struct ContextCache<B: Backend> {
    pub(crate) kv: KvCache<B>,
}

impl<B: Backend> ContextCache<B> {
    /// Context positions cached (the next block's anchor position).
    pub fn len(&self) -> usize {
        self.kv.len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> DSparkModel<B> {
    pub fn new_cache(&self) -> ContextCache<B> {
        ContextCache {
            kv: KvCache::new(self.layers.len(), 1),
        }
    }

    /// Appends context features `ctx_raw [1, m, n_t*H]` at positions `cache.len()..+m`.
    /// Context keys depend only on `hidden_norm(fc(ctx))`, never on the block, so feeding
    /// them ahead of a block is the reference's single combined forward.
    pub fn extend_context(&self, rope: &Rope, cache: &mut ContextCache<B>, ctx_raw: Tensor<B, 3>) {
        let [_, m, _] = ctx_raw.dims();
        if m == 0 {
            return;
        }
        let first = cache.len() as i64;
        let positions = vec![(first..first + m as i64).collect::<Vec<_>>()];
        let device = ctx_raw.device();
        let (cos, sin) = rope.tables::<B>(&positions, &device);
        cache.kv.begin_step(&positions, &device);
        let context = self.context(ctx_raw);
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = layer.self_attn.keys_values(context.clone(), &cos, &sin);
            cache.kv.append(i, k, v);
        }
    }

    /// Drafts one block after `current` (at position `cache.len()`): the backbone over
    /// `[current, mask × (block_size - 1)]` attending to every cached context key, then the
    /// sequential heads slot by slot. `choose(slot, logits [V])` picks each slot's token from
    /// its draft logits (Markov bias included), on the device; what it reads back is its own
    /// business. The cache is not changed.
    pub fn propose(
        &self,
        rope: &Rope,
        cache: &mut ContextCache<B>,
        current: u32,
        block_size: usize,
        mask_token_id: u32,
        choose: &mut dyn FnMut(usize, Tensor<B, 1>) -> u32,
    ) -> BlockDraft {
        let device = self.device();
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
        let out = self.backbone(tokens, &cos, &sin, &visibility, |i, _, k, v| {
            cache.kv.with_scratch(i, k, v)
        });
        draft_slots(
            &self.head(),
            self.markov_head.as_ref(),
            self.confidence_head.as_ref(),
            out,
            current,
            choose,
        )
    }
}

/// The sequential heads over a drafted block's post-norm output `out [1, k, H]`, slot by
/// slot: each slot's logits (capped where the head caps, plus the Markov bias of the token
/// chosen before it), its confidence, and `choose`'s token.
pub(crate) fn draft_slots<B: Backend>(
    head: &HeadWeights<B>,
    markov_head: Option<&MarkovHead<B>>,
    confidence_head: Option<&ConfidenceHead<B>>,
    out: Tensor<B, 3>,
    current: u32,
    choose: &mut dyn FnMut(usize, Tensor<B, 1>) -> u32,
) -> BlockDraft {
    let [_, block_size, hidden] = out.dims();
    let device = out.device();
    let out: Tensor<B, 3> = out.reshape([block_size, 1, hidden]);
    let base = head.base_logits(out.clone());
    let mut draft = BlockDraft::default();
    let mut confidence = Vec::with_capacity(block_size);
    let mut prev = current;
    let mut state = None;
    for slot in 0..block_size {
        let h_slot = out.clone().narrow(0, slot, 1);
        let mut logits = base.clone().narrow(0, slot, 1);
        let mut prev_embedding = None;
        if let Some(markov) = markov_head {
            let prev_ids = Tensor::<B, 3, Int>::from_data(
                TensorData::new(vec![prev as i64], [1, 1, 1]),
                &device,
            );
            let e: Tensor<B, 3> = markov.embed_prev(prev_ids).reshape([1, 1, markov.rank()]);
            let (feature, next) = markov.step(e.clone(), h_slot.clone(), state.take());
            state = next;
            logits = logits + markov.bias(feature);
            prev_embedding = Some(e);
        }
        if let Some(conf) = confidence_head {
            let z: Tensor<B, 2> = conf.forward::<3, 2>(h_slot, prev_embedding);
            confidence.push(z.reshape([1]));
        }
        let token = choose(slot, logits.reshape([head.vocab_size()]));
        draft.tokens.push(token);
        prev = token;
    }
    if !confidence.is_empty() {
        draft.confidence_logits = crate::model::to_host(Tensor::cat(confidence, 0)).data;
    }
    draft
}

/// What speculative decoding needs from a block drafter at inference: its context cache, the
/// context fed ahead of a block, and one drafted block (the Qwen3 and Gemma4 DSpark/DFlash
/// models).
pub trait BlockInference<B: Backend> {
    fn new_cache(&self) -> ContextCache<B>;
    /// Appends context features `ctx_raw [1, m, n_t·H]` at positions `cache.len()..+m`.
    fn extend_context(&self, rope: &Rope, cache: &mut ContextCache<B>, ctx_raw: Tensor<B, 3>);
    /// Drafts one block after `current` (at position `cache.len()`); the cache is not changed.
    fn propose(
        &self,
        rope: &Rope,
        cache: &mut ContextCache<B>,
        current: u32,
        block_size: usize,
        mask_token_id: u32,
        choose: &mut dyn FnMut(usize, Tensor<B, 1>) -> u32,
    ) -> BlockDraft;
}

impl<B: Backend> BlockInference<B> for DSparkModel<B> {
    fn new_cache(&self) -> ContextCache<B> {
        DSparkModel::new_cache(self)
    }
    fn extend_context(&self, rope: &Rope, cache: &mut ContextCache<B>, ctx_raw: Tensor<B, 3>) {
        DSparkModel::extend_context(self, rope, cache, ctx_raw)
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
        DSparkModel::propose(
            self,
            rope,
            cache,
            current,
            block_size,
            mask_token_id,
            choose,
        )
    }
}
