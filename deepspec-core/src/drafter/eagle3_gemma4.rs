//! The reference's `Gemma4Eagle3Model`: Eagle3's one unrolled layer as a Gemma4
//! full-attention layer.
//!
//! The layer reads `[input_layernorm(embed(ids) · sqrt(H)) ; hidden_norm(h)]` (width 2H). Keys
//! and values both come from `k_proj` (`attention_k_eq_v`), with the q/k norms and the
//! weight-free v norm, score scale 1.0 and the config's full-attention RoPE. The residual is
//! the un-normed `h`, then the Gemma4 MLP block and `layer_scalar`. The head's logits are
//! soft-capped.

use super::dspark_gemma4::layer as gemma4_layer;
use super::eagle3::{
    cached_step, lens_tensor, ttt_step, Eagle3Cache, Eagle3Drafter, Eagle3Inference,
};
use super::{frozen_embedding_and_head, linear_from, norm_from, DrafterConfig, HeadWeights};
use crate::io::WeightSource;
use crate::model::attention::attention;
use crate::model::embedding::Embedding;
use crate::model::gemma4::{layer_finish, Gemma4Attention, Gemma4Layer, Gemma4Mlp};
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;
use crate::model::rope::Rope;
use crate::LoadError;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Eagle3Gemma4Layer<B: Backend> {
    pub hidden_norm: RmsNorm<B>,
    pub input_layernorm: RmsNorm<B>,
    /// q/k read `2H`.
    pub self_attn: Gemma4Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: RmsNorm<B>,
    pub mlp: Gemma4Mlp<B>,
    pub post_feedforward_layernorm: RmsNorm<B>,
    pub layer_scalar: Param<Tensor<B, 1>>,
}

#[derive(Module, Debug)]
pub struct Eagle3Gemma4Model<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub fc: Linear<B>,
    pub layers: Vec<Eagle3Gemma4Layer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    pub softcap: Option<f64>,
}

impl<B: Backend> Eagle3Gemma4Model<B> {
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
        let Gemma4Layer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            pre_feedforward_layernorm,
            mlp,
            post_feedforward_layernorm,
            layer_scalar,
        } = gemma4_layer(src, "layers.0", g, 0, 2 * h, device)?;
        let layer = Eagle3Gemma4Layer {
            hidden_norm: norm_from(src, "layers.0.hidden_norm.weight", h, eps, device)?,
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            pre_feedforward_layernorm,
            mlp,
            post_feedforward_layernorm,
            layer_scalar,
        };
        let (embed_tokens, lm_head) = frozen_embedding_and_head(src, config, device)?;
        Ok(Eagle3Gemma4Model {
            embed_tokens,
            fc: linear_from(src, "fc", h, config.context_width(), false, device)?,
            layers: vec![layer],
            norm: norm_from(src, "norm.weight", h, eps, device)?,
            lm_head,
            softcap: g.final_logit_softcapping,
        })
    }
}

impl<B: Backend> Eagle3Drafter<B> for Eagle3Gemma4Model<B> {
    fn device(&self) -> B::Device {
        self.fc.weight.device()
    }

    fn head(&self) -> HeadWeights<B> {
        HeadWeights {
            lm_head: self.lm_head.weight.val(),
            markov_w2: None,
            softcap: self.softcap,
        }
    }

    fn head_input(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm.forward(h)
    }

    /// As [`super::Eagle3Model::ttt_forward`], on the Gemma4 layer.
    fn ttt_forward(
        &self,
        rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        input_ids: &[Vec<i64>],
        lens: &[usize],
        steps: usize,
    ) -> Vec<Tensor<B, 3>> {
        let device = ctx_raw.device();
        let [_, len, _] = ctx_raw.dims();
        let hidden = self.norm.weight.dims()[0];
        let layer = &self.layers[0];
        let attn = &layer.self_attn;
        let scale = (hidden as f32).sqrt() as f64;
        let mut h = self.fc.forward(ctx_raw);
        let mut keys: Vec<Tensor<B, 4>> = Vec::with_capacity(steps);
        let mut values: Vec<Tensor<B, 4>> = Vec::with_capacity(steps);
        let mut outputs = Vec::with_capacity(steps);
        let lens = lens_tensor::<B>(lens, &device);
        for step in 0..steps {
            let (ids, cos, sin, visibility) = ttt_step(rope, input_ids, &lens, len, step);
            let emb = self.embed_tokens.forward(ids) * scale;
            let x = Tensor::cat(
                vec![
                    layer.input_layernorm.forward(emb),
                    layer.hidden_norm.forward(h.clone()),
                ],
                2,
            );
            let q = attn.queries(x.clone(), &cos, &sin);
            let (k, v) = attn
                .keys_values(x, &cos, &sin)
                .expect("the Eagle3 layer has its own keys");
            keys.push(k);
            values.push(v);
            let attended = attention(
                q,
                Tensor::cat(keys.clone(), 2),
                Tensor::cat(values.clone(), 2),
                &visibility,
                1.0,
            );
            h = layer_finish(
                h,
                attn.output(attended),
                &layer.post_attention_layernorm,
                &layer.pre_feedforward_layernorm,
                &layer.mlp,
                &layer.post_feedforward_layernorm,
                &layer.layer_scalar,
            );
            outputs.push(h.clone());
        }
        outputs
    }
}

impl<B: Backend> Eagle3Inference<B> for Eagle3Gemma4Model<B> {
    fn head(&self) -> HeadWeights<B> {
        Eagle3Drafter::head(self)
    }

    fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        Eagle3Drafter::head(self).base_logits(self.norm.forward(h))
    }

    /// As [`super::Eagle3Model::step_with_cache`], on the Gemma4 layer.
    fn step_with_cache(
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
        let hidden = self.norm.weight.dims()[0];
        let (ids, cos, sin, visibility) = cached_step(rope, cache, tokens, causal, &device);
        let layer = &self.layers[0];
        let attn = &layer.self_attn;
        let emb = self.embed_tokens.forward(ids) * ((hidden as f32).sqrt() as f64);
        let x = Tensor::cat(
            vec![
                layer.input_layernorm.forward(emb),
                layer.hidden_norm.forward(h.clone()),
            ],
            2,
        );
        let q = attn.queries(x.clone(), &cos, &sin);
        let (k, v) = attn
            .keys_values(x, &cos, &sin)
            .expect("the Eagle3 layer has its own keys");
        let (k, v) = cache.kv.append(0, k, v);
        layer_finish(
            h,
            attn.output(attention(q, k, v, &visibility, 1.0)),
            &layer.post_attention_layernorm,
            &layer.pre_feedforward_layernorm,
            &layer.mlp,
            &layer.post_feedforward_layernorm,
            &layer.layer_scalar,
        )
    }
}
