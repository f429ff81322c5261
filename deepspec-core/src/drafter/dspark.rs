//! The DSpark / DFlash parallel drafter (`Qwen3DSparkModel`, DEEPSPEC-SPEC §4.2): a block of
//! `[anchor, mask, ...]` slots attends to the target's context features injected as extra
//! keys/values in every layer; slot `j` predicts the token at `anchor + j + 1`. DSpark adds
//! the Markov and confidence heads; DFlash is the same class without them.

use super::config::{DrafterConfig, MarkovKind};
use super::heads::markov::MarkovFeatures;
use super::heads::{ConfidenceHead, MarkovHead};
use super::{attention_from, frozen, linear_from, mlp_from, norm_from};
use crate::io::WeightSource;
use crate::model::attention::attention;
use crate::model::embedding::Embedding;
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;
use crate::model::param_from_host;
use crate::model::rope::Rope;
use crate::model::transformer::DecoderLayer;
use crate::LoadError;
use burn::module::Module;
use burn::tensor::{backend::Backend, Bool, Int, Tensor};

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

/// What the heads make of a block's backbone output.
pub struct BlockLogits<B: Backend> {
    /// `[b, n, k, V]`: `lm_head(out)` plus the Markov bias.
    pub logits: Tensor<B, 4>,
    /// `[b, n, k]` confidence logits, when the model has the head.
    pub confidence: Option<Tensor<B, 3>>,
    /// Markov outputs (bias features and previous-token embeddings), when present.
    pub markov: Option<MarkovFeatures<B>>,
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
        Ok(DSparkModel {
            embed_tokens: Embedding::new(frozen(param_from_host(
                src.tensor_shaped("embed_tokens.weight", &[c.vocab_size, h])?,
                device,
            ))),
            layers,
            norm: norm_from(src, "norm.weight", h, eps, device)?,
            fc: linear_from(src, "fc", h, config.context_width(), false, device)?,
            hidden_norm: norm_from(src, "hidden_norm.weight", h, eps, device)?,
            lm_head: Linear::new(
                frozen(param_from_host(
                    src.tensor_shaped("lm_head.weight", &[c.vocab_size, h])?,
                    device,
                )),
                None,
            ),
            markov_head,
            confidence_head,
        })
    }

    /// Context features `hidden_norm(fc(ctx_raw))`: `[b, L, n_t*H] -> [b, L, H]`.
    pub fn context(&self, ctx_raw: Tensor<B, 3>) -> Tensor<B, 3> {
        self.hidden_norm.forward(self.fc.forward(ctx_raw))
    }

    /// The backbone over `block_tokens [b, S]` with context features `context [b, L, H]`.
    ///
    /// `positions[b]` holds the `L` context positions followed by the `S` block positions;
    /// `visible [b, 1, S, L + S]` says which context keys and block slots each slot sees.
    /// Returns the post-norm output `[b, S, H]`.
    pub fn backbone(
        &self,
        rope: &Rope,
        context: Tensor<B, 3>,
        block_tokens: Tensor<B, 2, Int>,
        positions: &[Vec<i64>],
        visible: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let [_, ctx_len, _] = context.dims();
        let [_, slots] = block_tokens.dims();
        let (cos, sin) = rope.tables::<B>(positions, &context.device());
        let cos_q = cos.clone().narrow(2, ctx_len, slots);
        let sin_q = sin.clone().narrow(2, ctx_len, slots);
        let mut h = self.embed_tokens.forward(block_tokens);
        for layer in &self.layers {
            let attn = &layer.self_attn;
            let a = layer.input_layernorm.forward(h.clone());
            let q = attn.queries(a.clone(), &cos_q, &sin_q);
            let (k, v) = attn.keys_values(Tensor::cat(vec![context.clone(), a], 1), &cos, &sin);
            let o = attention(q, k, v, visible.clone(), (attn.head_dim as f64).powf(-0.5));
            h = h + attn.output(o);
            h = h.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(h));
        }
        self.norm.forward(h)
    }

    /// Heads over the backbone output `out [b, n, k, H]` with the token before each slot
    /// `prev_tokens [b, n, k]` (teacher-forced in training).
    pub fn block_logits(
        &self,
        out: Tensor<B, 4>,
        prev_tokens: Tensor<B, 3, Int>,
    ) -> BlockLogits<B> {
        let mut logits = self.lm_head.forward(out.clone());
        let markov = self
            .markov_head
            .as_ref()
            .map(|head| head.features(prev_tokens, out.clone()));
        if let (Some(head), Some(features)) = (&self.markov_head, &markov) {
            logits = logits + head.bias(features.bias_features.clone());
        }
        let confidence = self.confidence_head.as_ref().map(|head| {
            let e = markov
                .as_ref()
                .filter(|_| head.proj.in_features() > out.dims()[3])
                .map(|m| m.prev_embedding.clone());
            head.forward::<4, 3>(out.clone(), e)
        });
        BlockLogits {
            logits,
            confidence,
            markov,
        }
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

/// The drafter's cache at inference: keys/values of the context positions already fed (per
/// layer, `[b, kv_heads, len, head_dim]`, keys normed and rotated).
#[derive(Debug, Clone, Default)]
pub struct ContextCache<B: Backend> {
    pub layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    pub len: usize,
}

impl<B: Backend> DSparkModel<B> {
    /// Appends context features `ctx_raw [1, m, n_t*H]` at positions `cache.len..+m`.
    /// Context keys depend only on `hidden_norm(fc(ctx))`, never on the block, so feeding
    /// them ahead of a block is the reference's single combined forward.
    pub fn extend_context(&self, rope: &Rope, cache: &mut ContextCache<B>, ctx_raw: Tensor<B, 3>) {
        let [batch, m, _] = ctx_raw.dims();
        if m == 0 {
            return;
        }
        let positions: Vec<Vec<i64>> = (0..batch)
            .map(|_| (cache.len..cache.len + m).map(|p| p as i64).collect())
            .collect();
        let (cos, sin) = rope.tables::<B>(&positions, &ctx_raw.device());
        let context = self.context(ctx_raw);
        for (i, layer) in self.layers.iter().enumerate() {
            let (k, v) = layer.self_attn.keys_values(context.clone(), &cos, &sin);
            if let Some((ck, cv)) = cache.layers.get_mut(i) {
                *ck = Tensor::cat(vec![ck.clone(), k], 2);
                *cv = Tensor::cat(vec![cv.clone(), v], 2);
            } else {
                cache.layers.push((k, v));
            }
        }
        cache.len += m;
    }

    /// One block `block_tokens [b, B]` at positions `first..first+B`, attending to every cached
    /// context key and to all its own slots. The cache is not changed. Returns `[b, B, H]`.
    pub fn block_with_cache(
        &self,
        rope: &Rope,
        cache: &ContextCache<B>,
        block_tokens: Tensor<B, 2, Int>,
        first: usize,
    ) -> Tensor<B, 3> {
        let device = block_tokens.device();
        let [batch, slots] = block_tokens.dims();
        let positions: Vec<Vec<i64>> = (0..batch)
            .map(|_| (first..first + slots).map(|p| p as i64).collect())
            .collect();
        let (cos, sin) = rope.tables::<B>(&positions, &device);
        let visible = Tensor::<B, 4, Bool>::from_data(
            burn::tensor::TensorData::new(
                vec![true; batch * slots * (cache.len + slots)],
                [batch, 1, slots, cache.len + slots],
            ),
            &device,
        );
        let mut h = self.embed_tokens.forward(block_tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            let a = layer.input_layernorm.forward(h.clone());
            let q = attn.queries(a.clone(), &cos, &sin);
            let (mut k, mut v) = attn.keys_values(a, &cos, &sin);
            if let Some((ck, cv)) = cache.layers.get(i) {
                k = Tensor::cat(vec![ck.clone(), k], 2);
                v = Tensor::cat(vec![cv.clone(), v], 2);
            }
            let o = attention(q, k, v, visible.clone(), (attn.head_dim as f64).powf(-0.5));
            h = h + attn.output(o);
            h = h.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(h));
        }
        self.norm.forward(h)
    }
}
