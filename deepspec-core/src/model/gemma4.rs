//! Gemma4's text decoder (transformers' `Gemma4TextModel`, the reference's
//! `model.language_model`): every size and switch from the config.
//!
//! - Embedding scaled by `sqrt(H)`.
//! - Gemma4 RMSNorm `x · rsqrt(mean x² + eps) · w` (not `1 + w`), four norms per layer.
//! - Per-head q/k norms and a weight-free v norm; attention scale 1.0.
//! - Sliding-window and full-attention layers with their own head dims, KV head counts and
//!   RoPE (full layers: "proportional" partial RoPE); `attention_k_eq_v`: a full layer has no
//!   `v_proj`, its values come from the raw key projection.
//! - KV sharing: the last `num_kv_shared_layers` layers compute no keys or values and read
//!   those of the last earlier layer of their type.
//! - GELU-tanh MLP, double-wide in the kv-shared layers when `use_double_wide_mlp`.
//! - Each layer's output multiplied by its `layer_scalar`.
//! - Final logit soft-capping `c · tanh(z / c)`.

use super::attention::{attention, Visibility};
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::param_from_host;
use super::rope::{apply_rotary, Rope};
use super::transformer::{last_rows, padded_positions, step_positions, LogitsFor, TargetOutput};
use super::v4::rms;
use crate::io::safetensors::SafetensorsCheckpoint;
use crate::io::tokenizer::Tok;
use crate::io::WeightSource;
use crate::LoadError;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A layer's attention kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Full,
}

/// One RoPE setting (`rope_parameters.<layer type>`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSetting {
    pub theta: f64,
    /// `proportional`: only the first `partial_rotary_factor · d / 2` frequency pairs turn.
    pub partial_rotary_factor: f64,
}

impl RopeSetting {
    /// The rotary tables' frequencies for head dim `d`: `theta^(-2i/d)`, zero past the
    /// rotated pairs (those channels are left as they are).
    pub fn rope(&self, d: usize) -> Rope {
        Rope::partial(self.theta, d, self.partial_rotary_factor)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_global_key_value_heads: usize,
    pub head_dim: usize,
    pub global_head_dim: usize,
    pub layer_types: Vec<LayerType>,
    pub sliding_window: usize,
    pub rope_sliding: RopeSetting,
    pub rope_full: RopeSetting,
    pub rms_norm_eps: f64,
    pub final_logit_softcapping: Option<f64>,
    pub attention_k_eq_v: bool,
    pub num_kv_shared_layers: usize,
    pub use_double_wide_mlp: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl Gemma4Config {
    /// Whether `json` (a `config.json`) is a Gemma4 config: `gemma4` with a `text_config`,
    /// or the text config itself (`gemma4_text`, as drafter checkpoints store it).
    pub fn is_gemma4(json: &Value) -> bool {
        matches!(json["model_type"].as_str(), Some("gemma4" | "gemma4_text"))
    }

    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::corrupt(path, format!("not valid JSON: {e}")))?;
        Self::from_value(path, &json)
    }

    /// Reads the text config (`text_config` of a `gemma4` config, or the object itself).
    pub fn from_value(path: &Path, json: &Value) -> Result<Self, LoadError> {
        let (t, prefix) = match json["model_type"].as_str() {
            Some("gemma4") => (&json["text_config"], "text_config."),
            Some("gemma4_text") => (json, ""),
            other => {
                return Err(LoadError::field(
                    path,
                    "model_type",
                    format!("{other:?} is not a Gemma4 config (gemma4 or gemma4_text)"),
                ))
            }
        };
        let field = |key: &str| format!("{prefix}{key}");
        let uint = |key: &str| -> Result<usize, LoadError> {
            t[key].as_u64().map(|v| v as usize).ok_or_else(|| {
                LoadError::field(path, field(key), "missing or not an unsigned integer")
            })
        };
        let flag = |key: &str| t[key].as_bool().unwrap_or(false);
        if let Some(act) = t["hidden_activation"].as_str() {
            if act != "gelu_pytorch_tanh" {
                return Err(LoadError::field(
                    path,
                    field("hidden_activation"),
                    format!("`{act}` is not supported (gelu_pytorch_tanh)"),
                ));
            }
        }
        for (key, what) in [
            ("enable_moe_block", "MoE blocks"),
            ("use_bidirectional_attention", "bidirectional attention"),
        ] {
            if flag(key) {
                return Err(LoadError::field(
                    path,
                    field(key),
                    format!("{what} are not supported in Gemma4 targets here"),
                ));
            }
        }
        if t["hidden_size_per_layer_input"].as_u64().unwrap_or(0) != 0 {
            return Err(LoadError::field(
                path,
                field("hidden_size_per_layer_input"),
                "per-layer inputs are not supported (0 only)",
            ));
        }
        let num_hidden_layers = uint("num_hidden_layers")?;
        let layer_types = match t["layer_types"].as_array() {
            Some(items) => items
                .iter()
                .map(|v| match v.as_str() {
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    Some("full_attention") => Ok(LayerType::Full),
                    other => Err(LoadError::field(
                        path,
                        field("layer_types"),
                        format!("{other:?} is not sliding_attention or full_attention"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![LayerType::Full; num_hidden_layers],
        };
        if layer_types.len() != num_hidden_layers {
            return Err(LoadError::field(
                path,
                field("layer_types"),
                format!(
                    "names {} layers, num_hidden_layers is {num_hidden_layers}",
                    layer_types.len()
                ),
            ));
        }
        let rope = |kind: &str| -> Result<RopeSetting, LoadError> {
            let p = &t["rope_parameters"][kind];
            let theta = p["rope_theta"].as_f64().ok_or_else(|| {
                LoadError::field(
                    path,
                    field(&format!("rope_parameters.{kind}.rope_theta")),
                    "missing",
                )
            })?;
            let partial = match p["rope_type"].as_str().unwrap_or("default") {
                "default" => 1.0,
                "proportional" => p["partial_rotary_factor"].as_f64().unwrap_or(1.0),
                other => {
                    return Err(LoadError::field(
                        path,
                        field(&format!("rope_parameters.{kind}.rope_type")),
                        format!("`{other}` is not supported (default, proportional)"),
                    ))
                }
            };
            Ok(RopeSetting {
                theta,
                partial_rotary_factor: partial,
            })
        };
        let num_key_value_heads = uint("num_key_value_heads")?;
        let head_dim = uint("head_dim")?;
        let ids = |v: &Value| -> Vec<u32> {
            match v {
                Value::Number(n) => n.as_u64().into_iter().map(|v| v as u32).collect(),
                Value::Array(items) => items
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let config = Gemma4Config {
            vocab_size: uint("vocab_size")?,
            hidden_size: uint("hidden_size")?,
            intermediate_size: uint("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: uint("num_attention_heads")?,
            num_key_value_heads,
            num_global_key_value_heads: t["num_global_key_value_heads"]
                .as_u64()
                .map_or(num_key_value_heads, |v| v as usize),
            head_dim,
            global_head_dim: t["global_head_dim"]
                .as_u64()
                .map_or(head_dim, |v| v as usize),
            sliding_window: t["sliding_window"]
                .as_u64()
                .map_or(usize::MAX, |v| v as usize),
            rope_sliding: if layer_types.contains(&LayerType::Sliding) {
                rope("sliding_attention")?
            } else {
                RopeSetting {
                    theta: 10000.0,
                    partial_rotary_factor: 1.0,
                }
            },
            rope_full: rope("full_attention")?,
            layer_types,
            rms_norm_eps: t["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            final_logit_softcapping: t["final_logit_softcapping"].as_f64(),
            attention_k_eq_v: flag("attention_k_eq_v"),
            num_kv_shared_layers: t["num_kv_shared_layers"].as_u64().unwrap_or(0) as usize,
            use_double_wide_mlp: flag("use_double_wide_mlp"),
            tie_word_embeddings: t["tie_word_embeddings"]
                .as_bool()
                .or(json["tie_word_embeddings"].as_bool())
                .unwrap_or(true),
            bos_token_id: t["bos_token_id"].as_u64().map(|v| v as u32),
            eos_token_ids: ids(&t["eos_token_id"]),
            pad_token_id: t["pad_token_id"].as_u64().map(|v| v as u32),
        };
        Ok(config)
    }

    /// The first layer that reads another layer's keys and values.
    pub fn first_kv_shared(&self) -> usize {
        self.num_hidden_layers
            .saturating_sub(self.num_kv_shared_layers)
    }

    /// The layer whose keys and values layer `i` reads: itself, or for a kv-shared layer the
    /// last earlier non-shared layer of the same type.
    pub fn kv_source(&self, i: usize) -> usize {
        let first = self.first_kv_shared();
        if i < first {
            return i;
        }
        (0..first)
            .rev()
            .find(|&j| self.layer_types[j] == self.layer_types[i])
            .unwrap_or(i)
    }

    /// `(head_dim, kv_heads)` of a layer type.
    pub fn attention_shape(&self, t: LayerType) -> (usize, usize) {
        match t {
            LayerType::Sliding => (self.head_dim, self.num_key_value_heads),
            LayerType::Full => (self.global_head_dim, self.num_global_key_value_heads),
        }
    }

    /// The MLP width of layer `i` of a model with `layers` layers built from this config:
    /// doubled in the last `num_kv_shared_layers` layers when `use_double_wide_mlp` (and at
    /// least one layer is not shared).
    pub fn mlp_width(&self, i: usize, layers: usize) -> usize {
        let first = layers.saturating_sub(self.num_kv_shared_layers);
        if self.use_double_wide_mlp && first > 0 && i >= first {
            2 * self.intermediate_size
        } else {
            self.intermediate_size
        }
    }

    /// Whether a layer of type `t` takes its values from the key projection.
    pub fn k_eq_v(&self, t: LayerType) -> bool {
        self.attention_k_eq_v && t == LayerType::Full
    }

    pub fn rope(&self, t: LayerType) -> Rope {
        match t {
            LayerType::Sliding => self.rope_sliding.rope(self.head_dim),
            LayerType::Full => self.rope_full.rope(self.global_head_dim),
        }
    }
}

/// `0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³)))` (`gelu_pytorch_tanh`).
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner =
        (x.clone() + x.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    x * (inner.tanh() + 1.0) * 0.5
}

/// `c · tanh(z / c)`.
pub fn softcap<B: Backend, const D: usize>(z: Tensor<B, D>, cap: Option<f64>) -> Tensor<B, D> {
    match cap {
        Some(c) if c > 0.0 => (z / c).tanh() * c,
        _ => z,
    }
}

#[derive(Module, Debug)]
pub struct Gemma4Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Gemma4Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj
            .forward(gelu_tanh(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct Gemma4Attention<B: Backend> {
    pub q_proj: Linear<B>,
    /// `None` in a kv-shared layer.
    pub k_proj: Option<Linear<B>>,
    /// `None` in a kv-shared layer and where `attention_k_eq_v` takes values from `k_proj`.
    pub v_proj: Option<Linear<B>>,
    pub o_proj: Linear<B>,
    pub q_norm: RmsNorm<B>,
    pub k_norm: Option<RmsNorm<B>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
}

/// `[b, s, heads·d] -> [b, heads, s, d]`.
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, d: usize) -> Tensor<B, 4> {
    let [b, s, _] = x.dims();
    x.reshape([b, s, heads, d]).swap_dims(1, 2)
}

impl<B: Backend> Gemma4Attention<B> {
    /// Normed, rotated queries `[b, heads, s, d]`.
    pub fn queries(&self, x: Tensor<B, 3>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let q = split_heads(self.q_proj.forward(x), self.heads, self.head_dim);
        apply_rotary(self.q_norm.forward(q), cos, sin)
    }

    /// Normed, rotated keys and normed values `[b, kv_heads, s, d]` (a kv-shared layer has
    /// none of its own).
    pub fn keys_values(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let k_proj = self.k_proj.as_ref()?;
        let raw = k_proj.forward(x.clone());
        let v = match &self.v_proj {
            Some(v_proj) => v_proj.forward(x),
            None => raw.clone(),
        };
        let k = split_heads(raw, self.kv_heads, self.head_dim);
        let k = apply_rotary(
            self.k_norm.as_ref().expect("k_norm with k_proj").forward(k),
            cos,
            sin,
        );
        let v = rms(split_heads(v, self.kv_heads, self.head_dim), self.eps);
        Some((k, v))
    }

    /// `o_proj` of attended heads `[b, heads, s, d]`.
    pub fn output(&self, attended: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, s, d] = attended.dims();
        self.o_proj
            .forward(attended.swap_dims(1, 2).reshape([b, s, h * d]))
    }
}

#[derive(Module, Debug)]
pub struct Gemma4Layer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Gemma4Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: RmsNorm<B>,
    pub mlp: Gemma4Mlp<B>,
    pub post_feedforward_layernorm: RmsNorm<B>,
    /// `[1]`
    pub layer_scalar: Param<Tensor<B, 1>>,
}

impl<B: Backend> Gemma4Layer<B> {
    /// The layer's second half: `h + post_attention_layernorm(o_proj(attended))`, then
    /// `+ post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.)))`, times
    /// `layer_scalar`.
    pub fn finish(&self, h: Tensor<B, 3>, attended: Tensor<B, 4>) -> Tensor<B, 3> {
        layer_finish(
            h,
            self.self_attn.output(attended),
            &self.post_attention_layernorm,
            &self.pre_feedforward_layernorm,
            &self.mlp,
            &self.post_feedforward_layernorm,
            &self.layer_scalar,
        )
    }
}

/// A Gemma4 layer's second half from the attention output `o [b, s, H]` (after `o_proj`):
/// `h + post_attention(o)`, `+ post_feedforward(mlp(pre_feedforward(.)))`, times the scalar.
pub fn layer_finish<B: Backend>(
    h: Tensor<B, 3>,
    o: Tensor<B, 3>,
    post_attention: &RmsNorm<B>,
    pre_feedforward: &RmsNorm<B>,
    mlp: &Gemma4Mlp<B>,
    post_feedforward: &RmsNorm<B>,
    layer_scalar: &Param<Tensor<B, 1>>,
) -> Tensor<B, 3> {
    let h = h + post_attention.forward(o);
    let m = mlp.forward(pre_feedforward.forward(h.clone()));
    let h = h + post_feedforward.forward(m);
    h * layer_scalar.val().reshape([1, 1, 1])
}

#[derive(Module, Debug)]
pub struct Gemma4Target<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<Gemma4Layer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
}

/// A Gemma4 target ready to run.
pub struct LoadedGemma4<B: Backend> {
    pub model: Gemma4Target<B>,
    pub config: Gemma4Config,
    pub tokenizer: Tok,
    pub path: PathBuf,
}

fn linear<B: Backend>(
    src: &dyn WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    device: &B::Device,
) -> Result<Linear<B>, LoadError> {
    Ok(Linear::new(
        param_from_host(
            src.tensor_shaped(&format!("{name}.weight"), &[out, inp])?,
            device,
        ),
        None,
    ))
}

fn norm<B: Backend>(
    src: &dyn WeightSource,
    name: &str,
    dim: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, LoadError> {
    Ok(RmsNorm::new(
        param_from_host(
            src.tensor_shaped(&format!("{name}.weight"), &[dim])?,
            device,
        ),
        eps,
    ))
}

impl<B: Backend> Gemma4Target<B> {
    /// Builds the text model from `src`, tensors named `{prefix}embed_tokens.weight`,
    /// `{prefix}layers.<i>.…`, `{prefix}norm.weight` (the target: `model.language_model.`).
    pub fn load(
        src: &dyn WeightSource,
        config: &Gemma4Config,
        prefix: &str,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let c = config;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let embed =
            src.tensor_shaped(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (i, &t) in c.layer_types.iter().enumerate() {
            let p = format!("{prefix}layers.{i}");
            let (d, kv_heads) = c.attention_shape(t);
            let shared = c.kv_source(i) != i;
            let width = c.mlp_width(i, c.num_hidden_layers);
            let attn = Gemma4Attention {
                q_proj: linear(
                    src,
                    &format!("{p}.self_attn.q_proj"),
                    c.num_attention_heads * d,
                    h,
                    device,
                )?,
                k_proj: (!shared)
                    .then(|| {
                        linear(
                            src,
                            &format!("{p}.self_attn.k_proj"),
                            kv_heads * d,
                            h,
                            device,
                        )
                    })
                    .transpose()?,
                v_proj: (!shared && !c.k_eq_v(t))
                    .then(|| {
                        linear(
                            src,
                            &format!("{p}.self_attn.v_proj"),
                            kv_heads * d,
                            h,
                            device,
                        )
                    })
                    .transpose()?,
                o_proj: linear(
                    src,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    c.num_attention_heads * d,
                    device,
                )?,
                q_norm: norm(src, &format!("{p}.self_attn.q_norm"), d, eps, device)?,
                k_norm: (!shared)
                    .then(|| norm(src, &format!("{p}.self_attn.k_norm"), d, eps, device))
                    .transpose()?,
                heads: c.num_attention_heads,
                kv_heads,
                head_dim: d,
                eps,
            };
            layers.push(Gemma4Layer {
                input_layernorm: norm(src, &format!("{p}.input_layernorm"), h, eps, device)?,
                self_attn: attn,
                post_attention_layernorm: norm(
                    src,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                    device,
                )?,
                pre_feedforward_layernorm: norm(
                    src,
                    &format!("{p}.pre_feedforward_layernorm"),
                    h,
                    eps,
                    device,
                )?,
                mlp: Gemma4Mlp {
                    gate_proj: linear(src, &format!("{p}.mlp.gate_proj"), width, h, device)?,
                    up_proj: linear(src, &format!("{p}.mlp.up_proj"), width, h, device)?,
                    down_proj: linear(src, &format!("{p}.mlp.down_proj"), h, width, device)?,
                },
                post_feedforward_layernorm: norm(
                    src,
                    &format!("{p}.post_feedforward_layernorm"),
                    h,
                    eps,
                    device,
                )?,
                layer_scalar: param_from_host(
                    src.tensor_shaped(&format!("{p}.layer_scalar"), &[1])?,
                    device,
                ),
            });
        }
        // A stored `lm_head.weight` is an untied head whatever the flags say (the text
        // config's `tie_word_embeddings` defaults to true under an untied wrapper).
        let lm_head = if src.contains("lm_head.weight") || !c.tie_word_embeddings {
            Some(linear(src, "lm_head", c.vocab_size, h, device)?)
        } else {
            None
        };
        Ok(Gemma4Target {
            embed_tokens: param_from_host(embed, device),
            layers,
            norm: norm(src, &format!("{prefix}norm"), h, eps, device)?,
            lm_head,
        })
    }

    /// Token embeddings times `sqrt(H)`: `[b, s] -> [b, s, H]`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let h = self.embed_tokens.dims()[1];
        let scale = (h as f32).sqrt() as f64;
        self.embed_tokens
            .val()
            .select(0, ids.reshape([b * s]))
            .reshape([b, s, h])
            * scale
    }

    /// The LM head before soft-capping.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                let w = self.embed_tokens.val();
                let v = w.dims()[0];
                hidden
                    .reshape([b * s, h])
                    .matmul(w.transpose())
                    .reshape([b, s, v])
            }
        }
    }

    /// A full forward over right-padded rows (`real[b][s]`: a token, not padding), tapping
    /// the outputs of layers `taps`; no cache kept.
    pub fn forward_padded(
        &self,
        config: &Gemma4Config,
        ids: Tensor<B, 2, Int>,
        real: &[Vec<bool>],
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        let positions = padded_positions(real);
        let mut cache = KvCache::new(self.layers.len(), real.len());
        self.forward(config, ids, &positions, &mut cache, taps, logits)
    }

    /// One step over `tokens` (rows padded with `None`), appended to `cache`; row `b`
    /// continues at position `cache.len(b)`.
    pub fn step(
        &self,
        config: &Gemma4Config,
        tokens: &[Vec<Option<u32>>],
        cache: &mut KvCache<B>,
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        let device = self.embed_tokens.device();
        let (batch, seq) = (tokens.len(), tokens.first().map_or(0, Vec::len));
        let (positions, ids) = step_positions(tokens, cache);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
        self.forward(config, ids, &positions, cache, taps, logits)
    }

    /// `ids [b, s]` at `positions[b][s]` (`-1`: padding) through `cache`. Each layer that has
    /// keys of its own appends them to its cache slot; a kv-shared layer attends to its
    /// source layer's (this step's included). Sliding layers see the last `sliding_window`
    /// positions, full layers every earlier one.
    pub fn forward(
        &self,
        config: &Gemma4Config,
        ids: Tensor<B, 2, Int>,
        positions: &[Vec<i64>],
        cache: &mut KvCache<B>,
        taps: &[usize],
        logits: LogitsFor,
    ) -> TargetOutput<B> {
        let device = ids.device();
        for &t in taps {
            assert!(
                t < self.layers.len(),
                "tapped layer {t} does not exist (the model has {} layers)",
                self.layers.len()
            );
        }
        let causal = cache.begin_step(positions, &device);
        let window = match &causal {
            Visibility::Causal {
                query_positions,
                key_positions,
            } => Visibility::Window {
                query_positions: query_positions.clone(),
                key_positions: key_positions.clone(),
                window: config.sliding_window,
            },
            _ => unreachable!("a cache step is causal"),
        };
        let tables: Vec<(Tensor<B, 4>, Tensor<B, 4>)> = [LayerType::Sliding, LayerType::Full]
            .iter()
            .map(|&t| config.rope(t).tables::<B>(positions, &device))
            .collect();
        let mut h = self.embed(ids);
        let mut kv: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>> = vec![None; self.layers.len()];
        let mut tapped: Vec<Option<Tensor<B, 3>>> = vec![None; taps.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            let t = config.layer_types[i];
            let (cos, sin) = &tables[(t == LayerType::Full) as usize];
            let x = layer.input_layernorm.forward(h.clone());
            let q = layer.self_attn.queries(x.clone(), cos, sin);
            if let Some((k, v)) = layer.self_attn.keys_values(x, cos, sin) {
                kv[i] = Some(cache.append(i, k, v));
            }
            let (k, v) = kv[config.kv_source(i)]
                .clone()
                .expect("a kv-shared layer reads an earlier layer");
            let visibility = if t == LayerType::Sliding {
                &window
            } else {
                &causal
            };
            h = layer.finish(h, attention(q, k, v, visibility, 1.0));
            for (slot, &tap) in tapped.iter_mut().zip(taps) {
                if tap == i {
                    *slot = Some(h.clone());
                }
            }
        }
        let final_hidden = self.norm.forward(h);
        let cap = config.final_logit_softcapping;
        let logits = match logits {
            LogitsFor::All => Some(softcap(self.head(final_hidden.clone()), cap)),
            LogitsFor::Last => Some(softcap(
                self.head(last_rows(final_hidden.clone(), positions)),
                cap,
            )),
            LogitsFor::None => None,
        };
        TargetOutput {
            logits,
            tapped: tapped
                .into_iter()
                .map(|t| t.expect("tapped layer exists"))
                .collect(),
            final_hidden,
        }
    }
}

impl<B: Backend> LoadedGemma4<B> {
    /// Loads a Hugging Face Gemma4 folder: `config.json` (with `text_config`),
    /// `model.safetensors` or shards, the tokenizer.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, LoadError> {
        let config = Gemma4Config::from_file(&dir.join("config.json"))?;
        if config.num_kv_shared_layers > 0 && config.first_kv_shared() == 0 {
            return Err(LoadError::field(
                dir.join("config.json"),
                "text_config.num_kv_shared_layers",
                "must leave at least one layer computing its own keys and values",
            ));
        }
        let src = SafetensorsCheckpoint::open_dir(dir)?;
        let model = Gemma4Target::load(&src, &config, "model.language_model.", device)?;
        let tokenizer = Tok::from_hf_dir(dir)?;
        Ok(LoadedGemma4 {
            model,
            config,
            tokenizer,
            path: dir.to_path_buf(),
        })
    }
}
