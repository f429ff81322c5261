//! DeepSeek-V4's DSpark drafter (the published `DeepSeek-V4-Flash-DSpark` layout): `L` full
//! V4 decoder blocks at the target's width, sliding-window attention only.
//!
//! - The tapped target features (each tap the mean of the layer's 4 mHC streams,
//!   concatenated) become `main_x = main_norm(main_proj(features))` on stage 0.
//! - Every stage derives its context keys/values from `main_x` with its own `wkv` +
//!   `kv_norm` + RoPE; a block slot sees the last `sliding_window` context positions before
//!   its anchor and every slot of its own block (bidirectional), with the layer's sinks.
//! - The block is `embed([anchor, noise × (γ−1)])` copied into the mHC streams, through every
//!   stage; then the last stage's hyper head, `norm`, the target's `head`, and the Markov bias
//!   per slot. The confidence head reads the hyper head's output *before* the norm, with the
//!   Markov embedding of the slot's previous token (SGLang's and vLLM's loaders do the same).
//!
//! Checkpoints use the native names the engines load (`mtp.{s}.attn.wq_a.weight`, ...):
//! `main_proj`/`main_norm` on `mtp.0`; `norm`, `hc_head_*`, `markov_head.*`,
//! `confidence_head.*` on the last stage. Training checkpoints also carry the frozen
//! `embed.weight` and `head.weight` so they reload alone; `deepspec export` writes the
//! drafter tensors only, as DeepSeek ships them.

use super::dspark::{BlockFeatures, BlockInputs};
use super::heads::{ConfidenceHead, MarkovHead};
use super::{frozen, BlockDrafter, DrafterConfig, HeadWeights};
use crate::io::{HostTensor, WeightSource};
use crate::model::attention::Visibility;
use crate::model::embedding::Embedding;
use crate::model::linear::Linear;
use crate::model::norm::RmsNorm;
use crate::model::param_from_host;
use crate::model::rope::Rope;
use crate::model::v4::{expand_streams, hc_head, V4Block, V4Config, V4Rope};
use crate::LoadError;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Module, Debug)]
pub struct DSparkV4Model<B: Backend> {
    /// The target's embedding, frozen.
    pub embed: Embedding<B>,
    /// The target's output head, frozen.
    pub head: Linear<B>,
    pub mtp: Vec<V4Block<B>>,
    pub rope_theta: f64,
    pub rope_dim: usize,
    pub window: usize,
    pub hc_mult: usize,
}

/// The V4 drafter's own `config.json` keys, beside the target's.
#[derive(Debug, Clone, PartialEq)]
pub struct DSparkV4Keys {
    pub num_stages: usize,
    pub markov_rank: usize,
    pub confidence_head: bool,
    pub confidence_with_markov: bool,
}

/// `(name, shape)` of every tensor of the drafter `config` describes (native names, the
/// engines' layout), without allocating any; `with_frozen` adds the target's `embed.weight`
/// and `head.weight`, which training checkpoints carry and exports do not.
pub fn v4_layout(
    v4: &V4Config,
    keys: &DSparkV4Keys,
    taps: usize,
    with_frozen: bool,
) -> Vec<(String, Vec<usize>)> {
    let (d, v, r, n) = (v4.hidden_size, v4.vocab_size, keys.markov_rank, v4.hc_mult);
    let mut out = Vec::new();
    if with_frozen {
        out.push(("embed.weight".to_string(), vec![v, d]));
        out.push(("head.weight".to_string(), vec![v, d]));
    }
    let last = keys.num_stages - 1;
    for s in 0..keys.num_stages {
        let p = format!("mtp.{s}");
        if s == 0 {
            out.push((format!("{p}.main_proj.weight"), vec![d, taps * d]));
            out.push((format!("{p}.main_norm.weight"), vec![d]));
        }
        out.extend(v4.block_layout(&p));
        if s == last {
            out.push((format!("{p}.norm.weight"), vec![d]));
            out.push((format!("{p}.hc_head_fn"), vec![n, n * d]));
            out.push((format!("{p}.hc_head_base"), vec![n]));
            out.push((format!("{p}.hc_head_scale"), vec![1]));
            if r > 0 {
                out.push((format!("{p}.markov_head.markov_w1.weight"), vec![v, r]));
                out.push((format!("{p}.markov_head.markov_w2.weight"), vec![v, r]));
            }
            if keys.confidence_head {
                let width = if keys.confidence_with_markov {
                    d + r
                } else {
                    d
                };
                out.push((format!("{p}.confidence_head.proj.weight"), vec![1, width]));
            }
        }
    }
    out
}

/// The target's `embed.weight` and `head.weight` from its Hugging Face folder, as a weight
/// source holding just those two.
pub fn target_embedding_and_head(target: &Path) -> Result<HostSource, LoadError> {
    let head = crate::io::target_head::load_target_head(target)?;
    Ok(HostSource {
        origin: target.to_path_buf(),
        tensors: BTreeMap::from([
            ("embed.weight".to_string(), head.embed),
            ("head.weight".to_string(), head.head),
        ]),
    })
}

/// Tensors already on the host, by name.
pub struct HostSource {
    pub origin: PathBuf,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl WeightSource for HostSource {
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.to_string(),
                hint: String::new(),
            })
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

impl<B: Backend> DSparkV4Model<B> {
    /// Builds the drafter from `src` (the `mtp.*` tensors) and `frozen_src` (the target's
    /// `embed.weight` and `head.weight`; the same source for a training checkpoint).
    pub fn load(
        src: &dyn WeightSource,
        frozen_src: &dyn WeightSource,
        config: &DrafterConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (v4, keys) = config
            .v4
            .as_ref()
            .expect("a DeepSeek-V4 drafter config carries its V4 fields");
        let (d, v, eps) = (v4.hidden_size, v4.vocab_size, v4.rms_norm_eps);
        let taps = config.target_layer_ids.len();
        let p1 = |name: &str, shape: &[usize]| -> Result<Param<Tensor<B, 1>>, LoadError> {
            Ok(param_from_host(src.tensor_shaped(name, shape)?, device))
        };
        let p2 = |name: &str, shape: &[usize]| -> Result<Param<Tensor<B, 2>>, LoadError> {
            Ok(param_from_host(src.tensor_shaped(name, shape)?, device))
        };
        let last = keys.num_stages - 1;
        let mut mtp = Vec::with_capacity(keys.num_stages);
        for s in 0..keys.num_stages {
            let p = format!("mtp.{s}");
            let mut block = V4Block::load(src, &p, v4, device)?;
            if s == 0 {
                block.main_proj = Some(Linear::new(
                    p2(&format!("{p}.main_proj.weight"), &[d, taps * d])?,
                    None,
                ));
                block.main_norm = Some(RmsNorm::new(
                    p1(&format!("{p}.main_norm.weight"), &[d])?,
                    eps,
                ));
            }
            if s == last {
                let n = v4.hc_mult;
                block.norm = Some(RmsNorm::new(p1(&format!("{p}.norm.weight"), &[d])?, eps));
                block.hc_head_fn = Some(p2(&format!("{p}.hc_head_fn"), &[n, n * d])?);
                block.hc_head_base = Some(p1(&format!("{p}.hc_head_base"), &[n])?);
                block.hc_head_scale = Some(p1(&format!("{p}.hc_head_scale"), &[1])?);
                let r = keys.markov_rank;
                if r > 0 {
                    block.markov_head = Some(MarkovHead {
                        markov_w1: Embedding::new(p2(
                            &format!("{p}.markov_head.markov_w1.weight"),
                            &[v, r],
                        )?),
                        markov_w2: Linear::new(
                            p2(&format!("{p}.markov_head.markov_w2.weight"), &[v, r])?,
                            None,
                        ),
                        gate_proj: None,
                        joint_proj: None,
                    });
                }
                if keys.confidence_head {
                    let width = if keys.confidence_with_markov {
                        d + r
                    } else {
                        d
                    };
                    block.confidence_head = Some(ConfidenceHead {
                        proj: Linear::new(
                            p2(&format!("{p}.confidence_head.proj.weight"), &[1, width])?,
                            None,
                        ),
                    });
                }
            }
            mtp.push(block);
        }
        let frozen_2d = |name: &str| -> Result<Param<Tensor<B, 2>>, LoadError> {
            Ok(frozen(param_from_host(
                frozen_src.tensor_shaped(name, &[v, d])?,
                device,
            )))
        };
        Ok(DSparkV4Model {
            embed: Embedding::new(frozen_2d("embed.weight")?),
            head: Linear::new(frozen_2d("head.weight")?, None),
            mtp,
            rope_theta: v4.rope_theta,
            rope_dim: v4.rope_head_dim,
            window: v4.sliding_window,
            hc_mult: v4.hc_mult,
        })
    }

    fn first(&self) -> &V4Block<B> {
        &self.mtp[0]
    }

    fn last(&self) -> &V4Block<B> {
        self.mtp.last().expect("at least one stage")
    }

    /// `main_x = main_norm(main_proj(features))`: `[b, L, n·D] -> [b, L, D]`.
    pub fn main_x(&self, features: Tensor<B, 3>) -> Tensor<B, 3> {
        let first = self.first();
        let proj = first.main_proj.as_ref().expect("stage 0 has main_proj");
        let norm = first.main_norm.as_ref().expect("stage 0 has main_norm");
        norm.forward(proj.forward(features))
    }

    /// The last stage's hyper head over streams `[T, N, D]`: `[T, D]` before the final norm.
    pub fn hyper_head(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let last = self.last();
        let get = |p: &Option<Param<Tensor<B, 1>>>| p.as_ref().expect("last stage").val();
        hc_head(
            x,
            last.hc_head_fn
                .as_ref()
                .expect("last stage has hc_head_fn")
                .val(),
            get(&last.hc_head_base),
            get(&last.hc_head_scale),
            last.hc,
        )
        .0
    }
}

impl<B: Backend> BlockDrafter<B> for DSparkV4Model<B> {
    fn device(&self) -> B::Device {
        self.head.weight.device()
    }

    fn hidden_size(&self) -> usize {
        self.head.in_features()
    }

    fn head(&self) -> HeadWeights<B> {
        HeadWeights {
            lm_head: self.head.weight.val(),
            markov_w2: self
                .last()
                .markov_head
                .as_ref()
                .map(|m| m.markov_w2.weight.val()),
            softcap: None,
        }
    }

    /// The training forward. V4 brings its own RoPE (partial, interleaved) and window, so
    /// `rope` and `blocks.window` are not read.
    fn block_features(
        &self,
        _rope: &Rope,
        ctx_raw: Tensor<B, 3>,
        blocks: &BlockInputs<B>,
    ) -> BlockFeatures<B> {
        let [b, ctx_len, _] = ctx_raw.dims();
        let [_, slots] = blocks.tokens.dims();
        let [_, n, k] = blocks.prev_tokens.dims();
        let d = self.hidden_size();
        let device = ctx_raw.device();
        let main_x = self.main_x(ctx_raw);
        let rope = V4Rope::new(self.rope_theta, self.rope_dim);
        let split = |from: usize, len: usize| -> Vec<Vec<i64>> {
            blocks
                .positions
                .iter()
                .map(|row| row[from..from + len].to_vec())
                .collect()
        };
        let rope_ctx = rope.tables::<B>(&split(0, ctx_len), &device);
        let rope_q = rope.tables::<B>(&split(ctx_len, slots), &device);
        let visibility = Visibility::Blocks {
            anchors: blocks.anchors.clone(),
            block_size: k,
            context_len: ctx_len,
            window: Some(self.window),
        };
        let mut x = expand_streams(self.embed.forward(blocks.tokens.clone()), self.hc_mult);
        for stage in &self.mtp {
            x = stage.forward(x, |attn, input| {
                let q = attn.queries(input.clone(), &rope_q);
                let kv = Tensor::cat(
                    vec![
                        attn.key_values(main_x.clone(), &rope_ctx),
                        attn.key_values(input, &rope_q),
                    ],
                    2,
                );
                attn.output(attn.attend(q, kv, &visibility), &rope_q)
            });
        }
        let x_hc = self.hyper_head(x.reshape([b * slots, self.hc_mult, d]));
        let last = self.last();
        let hidden: Tensor<B, 4> = last
            .norm
            .as_ref()
            .expect("last stage has norm")
            .forward(x_hc.clone())
            .reshape([b, n, k, d]);
        let x_hc: Tensor<B, 4> = x_hc.reshape([b, n, k, d]);
        let (markov, prev_embedding) = match &last.markov_head {
            Some(head) => {
                let e = head.embed_prev(blocks.prev_tokens.clone());
                (Some(head.features(e.clone(), hidden.clone())), Some(e))
            }
            None => (None, None),
        };
        let confidence = last
            .confidence_head
            .as_ref()
            .map(|head| head.forward::<4, 3>(x_hc, prev_embedding));
        BlockFeatures {
            hidden,
            markov,
            confidence,
        }
    }
}
