//! The target decoder (Qwen3 / Llama): embedding, decoder layers, final norm, LM head, with
//! taps on any decoder layer's output — exactly what the reference caches for drafters.

use super::attention::{SelfAttention, Visibility};
use super::config::TargetConfig;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::Rope;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: SelfAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// One pre-norm layer `h [b, s, H] -> [b, s, H]`: `h + o_proj(attend(input_layernorm(h)))`,
    /// then the MLP block. `attend` turns the layer's attention and its normed input into
    /// attended heads `[b, heads, s, head_dim]`: it decides where keys and values come from
    /// (a cache, context features, the block itself) and what each query sees.
    pub fn forward(
        &self,
        h: Tensor<B, 3>,
        attend: impl FnOnce(&SelfAttention<B>, Tensor<B, 3>) -> Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let attended = attend(&self.self_attn, self.input_layernorm.forward(h.clone()));
        residual_mlp(
            h,
            &self.self_attn,
            attended,
            &self.post_attention_layernorm,
            &self.mlp,
        )
    }
}

/// The second half of every decoder layer (target, DSpark, Eagle3): `h + o_proj(attended)`,
/// then `+ mlp(post_attention_layernorm(.))`.
pub fn residual_mlp<B: Backend>(
    h: Tensor<B, 3>,
    attn: &SelfAttention<B>,
    attended: Tensor<B, 4>,
    post_attention_layernorm: &RmsNorm<B>,
    mlp: &Mlp<B>,
) -> Tensor<B, 3> {
    let h = h + attn.output(attended);
    h.clone() + mlp.forward(post_attention_layernorm.forward(h))
}

/// Attention of a step through `cache`'s layer `layer`: the step's keys/values are written
/// into the cache and the queries attend to every cached key `visibility` allows.
pub fn cached_attention<B: Backend>(
    attn: &SelfAttention<B>,
    x: Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    cache: &mut KvCache<B>,
    layer: usize,
    visibility: &Visibility<B>,
) -> Tensor<B, 4> {
    let q = attn.queries(x.clone(), cos, sin);
    let (k, v) = attn.keys_values(x, cos, sin);
    let (k, v) = cache.append(layer, k, v);
    attn.attend(q, k, v, visibility)
}

/// Each row's last non-padding position of `hidden [batch, seq, H]`: `[batch, 1, H]`.
pub(crate) fn last_rows<B: Backend>(hidden: Tensor<B, 3>, positions: &[Vec<i64>]) -> Tensor<B, 3> {
    let [batch, _, h] = hidden.dims();
    let last: Vec<i64> = positions
        .iter()
        .map(|row| row.iter().rposition(|&p| p >= 0).unwrap_or(0) as i64)
        .collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [batch]), &hidden.device())
        .reshape([batch, 1, 1])
        .expand([batch, 1, h]);
    hidden.gather(1, index)
}

/// Step positions of `tokens` (one row per batch row, padded with `None`) continuing each
/// row at `cache.len(b)`, and their ids (`None` as 0).
pub(crate) fn step_positions<B: Backend>(
    tokens: &[Vec<Option<u32>>],
    cache: &KvCache<B>,
) -> (Vec<Vec<i64>>, Vec<i64>) {
    let seq = tokens.first().map_or(0, Vec::len);
    let mut positions = Vec::with_capacity(tokens.len());
    let mut ids = Vec::with_capacity(tokens.len() * seq);
    for (b, row) in tokens.iter().enumerate() {
        assert_eq!(row.len(), seq, "ragged step rows: pad with None");
        let mut next = cache.len(b) as i64;
        positions.push(
            row.iter()
                .map(|t| match t {
                    Some(_) => {
                        next += 1;
                        next - 1
                    }
                    None => -1,
                })
                .collect::<Vec<i64>>(),
        );
        ids.extend(row.iter().map(|t| t.unwrap_or(0) as i64));
    }
    (positions, ids)
}

/// Positions `0..len` of each right-padded row (`real[b][s]` false: padding, `-1`).
pub(crate) fn padded_positions(real: &[Vec<bool>]) -> Vec<Vec<i64>> {
    real.iter()
        .map(|row| {
            let mut next = 0i64;
            row.iter()
                .map(|&r| {
                    if r {
                        next += 1;
                        next - 1
                    } else {
                        -1
                    }
                })
                .collect()
        })
        .collect()
}

/// Which positions get LM-head logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position of the step: `[batch, seq, vocab]`.
    All,
    /// Only each row's last non-padding position: `[batch, 1, vocab]`.
    Last,
    /// No logits (feature extraction).
    None,
}

pub struct TargetOutput<B: Backend> {
    pub logits: Option<Tensor<B, 3>>,
    /// Output of each requested decoder layer, in request order: `[batch, seq, hidden]`.
    pub tapped: Vec<Tensor<B, 3>>,
    /// Last layer's output after the final norm (the LM head's input): `[batch, seq, hidden]`.
    pub final_hidden: Tensor<B, 3>,
}

#[derive(Module, Debug)]
pub struct TargetModel<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
}

impl<B: Backend> TargetModel<B> {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings `[batch, seq] -> [batch, seq, hidden]`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let hidden = self.embed_tokens.dims()[1];
        self.embed_tokens
            .val()
            .select(0, ids.reshape([batch * seq]))
            .reshape([batch, seq, hidden])
    }

    /// LM head over hidden states `[batch, seq, hidden] -> [batch, seq, vocab]`.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [batch, seq, h] = hidden.dims();
                let vocab = self.embed_tokens.dims()[0];
                super::small_matmul::matmul_wt(
                    hidden.reshape([batch * seq, h]),
                    self.embed_tokens.val(),
                )
                .reshape([batch, seq, vocab])
            }
        }
    }

    /// Runs one step over `tokens` (one row per batch row, padded with `None`), appending it to
    /// `cache`. Row `b` continues at position `cache.len(b)`.
    pub fn step(
        &self,
        rope: &Rope,
        tokens: &[Vec<Option<u32>>],
        cache: &mut KvCache<B>,
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        let device = self.embed_tokens.device();
        let (batch, seq) = (tokens.len(), tokens.first().map_or(0, Vec::len));
        let (positions, ids) = step_positions(tokens, cache);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
        self.forward(rope, ids, &positions, cache, taps, logits)
    }

    /// Full forward of right-padded rows (`real[b][s]` false for padding), as the reference's
    /// target pass runs it: positions `0..len` per row, no cache kept.
    pub fn forward_padded(
        &self,
        rope: &Rope,
        ids: Tensor<B, 2, Int>,
        real: &[Vec<bool>],
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        let positions = padded_positions(real);
        let mut cache = KvCache::new(self.num_layers(), real.len());
        self.forward(rope, ids, &positions, &mut cache, taps, logits)
    }

    /// `ids: [batch, seq]` at `positions[b][s]` (-1 = padding, ignored as a key).
    pub fn forward(
        &self,
        rope: &Rope,
        ids: Tensor<B, 2, Int>,
        positions: &[Vec<i64>],
        cache: &mut KvCache<B>,
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        let device = ids.device();
        for &t in taps {
            assert!(
                t < self.num_layers(),
                "tapped layer {t} does not exist (the model has {} layers)",
                self.num_layers()
            );
        }
        let (cos, sin) = rope.tables::<B>(positions, &device);
        let visibility = cache.begin_step(positions, &device);
        let mut hidden = self.embed(ids);
        let mut tapped: Vec<Option<Tensor<B, 3>>> = vec![None; taps.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(hidden, |attn, x| {
                cached_attention(attn, x, &cos, &sin, cache, i, &visibility)
            });
            for (slot, &t) in tapped.iter_mut().zip(taps) {
                if t == i {
                    *slot = Some(hidden.clone());
                }
            }
        }
        let final_hidden = self.norm.forward(hidden);
        let logits = match logits {
            LogitsFor::All => Some(self.head(final_hidden.clone())),
            LogitsFor::Last => Some(self.head(last_rows(final_hidden.clone(), positions))),
            LogitsFor::None => None,
        };
        TargetOutput {
            logits,
            tapped: tapped.into_iter().map(|t| t.expect("tap filled")).collect(),
            final_hidden,
        }
    }
}

impl TargetConfig {
    pub fn rope(&self) -> Rope {
        Rope::partial(self.rope_theta, self.head_dim, self.partial_rotary_factor)
    }
}

/// A target network of either family the binary runs: the Qwen3/Llama decoder, or Gemma4's
/// text model (with its config: layer types, windows, soft-cap).
// One value per loaded target: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum TargetNet<B: Backend> {
    Decoder(TargetModel<B>),
    Gemma4 {
        model: super::gemma4::Gemma4Target<B>,
        config: super::gemma4::Gemma4Config,
    },
}

impl<B: Backend> TargetNet<B> {
    pub fn num_layers(&self) -> usize {
        match self {
            TargetNet::Decoder(m) => m.num_layers(),
            TargetNet::Gemma4 { model, .. } => model.layers.len(),
        }
    }

    pub fn device(&self) -> B::Device {
        match self {
            TargetNet::Decoder(m) => m.embed_tokens.device(),
            TargetNet::Gemma4 { model, .. } => model.embed_tokens.device(),
        }
    }

    /// The embedding `[V, H]` and the LM head `[V, H]` (the embedding when tied), on the host.
    pub fn embedding_and_head(&self) -> (crate::io::HostTensor, crate::io::HostTensor) {
        let (embed, head) = match self {
            TargetNet::Decoder(m) => (&m.embed_tokens, m.lm_head.as_ref()),
            TargetNet::Gemma4 { model, .. } => (&model.embed_tokens, model.lm_head.as_ref()),
        };
        let embed = super::to_host(embed.val());
        let head = match head {
            Some(h) => super::to_host(h.weight.val()),
            None => embed.clone(),
        };
        (embed, head)
    }

    /// [`TargetModel::step`] (a Gemma4 target brings its own RoPE; `rope` is not read).
    pub fn step(
        &self,
        rope: &Rope,
        tokens: &[Vec<Option<u32>>],
        cache: &mut KvCache<B>,
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        match self {
            TargetNet::Decoder(m) => m.step(rope, tokens, cache, taps, logits),
            TargetNet::Gemma4 { model, config } => model.step(config, tokens, cache, taps, logits),
        }
    }

    /// [`TargetModel::forward_padded`].
    pub fn forward_padded(
        &self,
        rope: &Rope,
        ids: Tensor<B, 2, Int>,
        real: &[Vec<bool>],
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        match self {
            TargetNet::Decoder(m) => m.forward_padded(rope, ids, real, taps, logits),
            TargetNet::Gemma4 { model, config } => {
                model.forward_padded(config, ids, real, taps, logits)
            }
        }
    }
}
