//! Eagle3 (`Qwen3Eagle3Model`, DEEPSPEC-SPEC §4.5): one decoder layer fed two streams — the
//! next token's embedding and a hidden state (`fc` of the tapped target layers at step 0,
//! then the layer's own previous output) — unrolled for `ttt_length` steps in training.

use super::config::DrafterConfig;
use super::{attention_from, frozen, linear_from, mlp_from, norm_from};
use crate::io::WeightSource;
use crate::model::attention::{attention, SelfAttention};
use crate::model::embedding::Embedding;
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;
use crate::model::norm::RmsNorm;
use crate::model::param_from_host;
use crate::model::rope::Rope;
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
    /// The layer's input `[input_layernorm(emb) ; hidden_norm(h)]`: `[b, s, 2H]`.
    pub fn input(&self, emb: Tensor<B, 3>, h: Tensor<B, 3>) -> Tensor<B, 3> {
        Tensor::cat(
            vec![
                self.input_layernorm.forward(emb),
                self.hidden_norm.forward(h),
            ],
            2,
        )
    }

    /// Residual + MLP after attention: `h + attn_out`, then the MLP block.
    pub fn finish(&self, h: Tensor<B, 3>, attended: Tensor<B, 4>) -> Tensor<B, 3> {
        let h = h + self.self_attn.output(attended);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
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
        Ok(Eagle3Model {
            embed_tokens: Embedding::new(frozen(param_from_host(
                src.tensor_shaped("embed_tokens.weight", &[c.vocab_size, h])?,
                device,
            ))),
            fc: linear_from(src, "fc", h, config.context_width(), false, device)?,
            layers: vec![layer],
            norm: norm_from(src, "norm.weight", h, eps, device)?,
            lm_head: Linear::new(
                frozen(param_from_host(
                    src.tensor_shaped("lm_head.weight", &[c.vocab_size, h])?,
                    device,
                )),
                None,
            ),
        })
    }

    /// Logits from a pre-norm hidden state: `lm_head(norm(h))`.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.lm_head.forward(self.norm.forward(h))
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
        let [batch, len, _] = ctx_raw.dims();
        let layer = &self.layers[0];
        let attn = &layer.self_attn;
        let mut h = self.fc.forward(ctx_raw);
        let mut keys: Vec<Tensor<B, 4>> = Vec::with_capacity(steps);
        let mut values: Vec<Tensor<B, 4>> = Vec::with_capacity(steps);
        let mut outputs = Vec::with_capacity(steps);
        for step in 0..steps {
            let ids: Vec<i64> = input_ids
                .iter()
                .flat_map(|row| (0..len).map(move |t| row.get(t + step + 1).copied().unwrap_or(0)))
                .collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, len]), &device);
            let positions: Vec<Vec<i64>> = (0..batch)
                .map(|_| (0..len).map(|t| (t + step) as i64).collect())
                .collect();
            let (cos, sin) = rope.tables::<B>(&positions, &device);
            let x = layer.input(self.embed_tokens.forward(ids), h.clone());
            let q = attn.queries(x.clone(), &cos, &sin);
            let (k, v) = attn.keys_values(x, &cos, &sin);
            keys.push(k);
            values.push(v);
            let visible = ttt_visibility::<B>(lens, len, step, &device);
            let o = attention(
                q,
                Tensor::cat(keys.clone(), 2),
                Tensor::cat(values.clone(), 2),
                visible,
                (attn.head_dim as f64).powf(-0.5),
            );
            h = layer.finish(h, o);
            outputs.push(h.clone());
        }
        outputs
    }
}

/// TTT visibility at `step` over `(step+1)*L` cached keys: query `t` (active iff
/// `t < len_b - step`) sees step-0 keys `j <= t` with `j < len_b - step`, and the key at its
/// own position from each later step.
fn ttt_visibility<B: Backend>(
    lens: &[usize],
    len: usize,
    step: usize,
    device: &B::Device,
) -> Tensor<B, 4, burn::tensor::Bool> {
    let keys = (step + 1) * len;
    let mut visible = Vec::with_capacity(lens.len() * len * keys);
    for &real in lens {
        let valid = real.saturating_sub(step);
        for t in 0..len {
            for kv in 0..keys {
                let allowed = t < valid
                    && if kv < len {
                        kv <= t && kv < valid
                    } else {
                        kv % len == t
                    };
                visible.push(allowed);
            }
        }
    }
    Tensor::from_data(TensorData::new(visible, [lens.len(), 1, len, keys]), device)
}

/// The Eagle3 layer's keys/values at inference: `[1, kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct Eagle3Cache<B: Backend> {
    pub kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    pub len: usize,
}

impl<B: Backend> Eagle3Cache<B> {
    pub fn truncate(&mut self, len: usize) {
        if let Some((k, v)) = self.kv.take() {
            if len > 0 {
                self.kv = Some((k.narrow(2, 0, len), v.narrow(2, 0, len)));
            }
        }
        self.len = len;
    }
}

impl<B: Backend> Eagle3Model<B> {
    /// Runs the layer on hidden inputs `h [1, m, H or n_t*H]` (fc applied when it is raw
    /// target features) paired with `tokens [m]` at `positions`, appending to `cache`.
    /// `causal`: new queries see earlier new keys only; otherwise every new key. Returns the
    /// pre-norm outputs `[1, m, H]`.
    pub fn step_with_cache(
        &self,
        rope: &Rope,
        cache: &mut Eagle3Cache<B>,
        h: Tensor<B, 3>,
        tokens: &[u32],
        first_position: usize,
        causal: bool,
    ) -> Tensor<B, 3> {
        let device = h.device();
        let m = tokens.len();
        let h = if h.dims()[2] == self.fc.in_features() {
            self.fc.forward(h)
        } else {
            h
        };
        let layer = &self.layers[0];
        let attn = &layer.self_attn;
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, m]),
            &device,
        );
        let positions = vec![(first_position..first_position + m)
            .map(|p| p as i64)
            .collect::<Vec<_>>()];
        let (cos, sin) = rope.tables::<B>(&positions, &device);
        let x = layer.input(self.embed_tokens.forward(ids), h.clone());
        let q = attn.queries(x.clone(), &cos, &sin);
        let (k, v) = attn.keys_values(x, &cos, &sin);
        let (k, v) = match cache.kv.take() {
            Some((ck, cv)) => (Tensor::cat(vec![ck, k], 2), Tensor::cat(vec![cv, v], 2)),
            None => (k, v),
        };
        let past = cache.len;
        cache.kv = Some((k.clone(), v.clone()));
        cache.len += m;
        let visible: Vec<bool> = (0..m)
            .flat_map(|i| (0..past + m).map(move |j| !causal || j < past || j - past <= i))
            .collect();
        let visible = Tensor::<B, 4, burn::tensor::Bool>::from_data(
            TensorData::new(visible, [1, 1, m, past + m]),
            &device,
        );
        let o = attention(q, k, v, visible, (attn.head_dim as f64).powf(-0.5));
        layer.finish(h, o)
    }
}
