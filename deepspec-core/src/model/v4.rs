//! DeepSeek-V4's decoder block as its DSpark drafter stages use it: sliding-window attention
//! only (no compressor, no indexer), MoE, and mHC hyper-connections around both sub-layers.
//! Conventions follow Hugging Face transformers' `modeling_deepseek_v4.py` (the oracle our
//! `tests/golden-v4` fixtures come from; its README §3 writes each one down):
//!
//! - **mHC** (`hc_mix`, `hc_collapse`, `hc_update`): the mixes of the RMS-normed flattened
//!   streams split pre / post / comb; `pre = σ(.) + hc_eps`, `post = 2σ(.)`, comb is a
//!   softmax then Sinkhorn starting and ending with a normalisation over the input-stream
//!   axis; the sub-layer reads `Σ pre_j X_j` of the raw streams and the new streams are
//!   `post_k F + Σ_j comb[j][k] X_j` (comb applied transposed).
//! - **Attention**: low-rank queries with an unweighted per-head RMSNorm; one shared K = V
//!   head `kv_norm(wkv(x))`; RoPE on the last `rope_head_dim` channels in interleaved pairs,
//!   undone on the output; a per-head sink in the softmax denominator; grouped low-rank
//!   output projection.
//! - **MoE**: `sqrt(softplus)` scores, the `noaux_tc` bias used for the top-k choice only,
//!   normalised top-k weights times the route scale, SwiGLU with the gate clamped from above
//!   and the up projection on both sides (the shared expert too).
//!
//! Module fields carry DeepSeek's native checkpoint names (`attn.wq_a`, `ffn.experts.3.w1`,
//! `hc_attn_fn`, ...), so a parameter's module path is its key in a native checkpoint.

use super::attention::{attention_with_sink, Visibility};
use super::linear::Linear;
use super::norm::RmsNorm;
use super::{param_from_host, to_host};
use crate::drafter::heads::{ConfidenceHead, MarkovHead};
use crate::io::WeightSource;
use crate::LoadError;
use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};
use serde_json::Value;
use std::path::Path;

/// The architecture fields of a DeepSeek-V4 `config.json` a drafter stage needs.
#[derive(Debug, Clone, PartialEq)]
pub struct V4Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Target decoder layers (43 for V4-Flash).
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub head_dim: usize,
    /// Channels at the end of each head that rotate (`qk_rope_head_dim`).
    pub rope_head_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub routed_scaling_factor: f64,
    pub swiglu_limit: f64,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f64,
    pub rms_norm_eps: f64,
    pub sliding_window: usize,
    /// RoPE base of the sliding-window layers (`rope_parameters.main.rope_theta`).
    pub rope_theta: f64,
}

impl V4Config {
    /// Whether `json` is a DeepSeek-V4 config (`model_type = "deepseek_v4"`).
    pub fn is_v4(json: &Value) -> bool {
        json["model_type"].as_str() == Some("deepseek_v4")
    }

    pub fn from_json(path: &Path, json: &Value) -> Result<Self, LoadError> {
        let uint = |key: &str| -> Result<usize, LoadError> {
            json[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| LoadError::field(path, key, "missing or not an unsigned integer"))
        };
        let float = |key: &str| -> Result<f64, LoadError> {
            json[key]
                .as_f64()
                .ok_or_else(|| LoadError::field(path, key, "missing or not a number"))
        };
        if let Some(f) = json["scoring_func"].as_str() {
            if f != "sqrtsoftplus" {
                return Err(LoadError::field(
                    path,
                    "scoring_func",
                    format!("`{f}` is not supported (DeepSeek-V4 uses sqrtsoftplus)"),
                ));
            }
        }
        let head_dim = uint("head_dim")?;
        let rope_head_dim = match json["qk_rope_head_dim"].as_u64() {
            Some(r) => r as usize,
            None => (float("partial_rotary_factor")? * head_dim as f64).round() as usize,
        };
        let rope_theta = json["rope_parameters"]["main"]["rope_theta"]
            .as_f64()
            .or_else(|| json["rope_theta"].as_f64())
            .ok_or_else(|| {
                LoadError::field(
                    path,
                    "rope_theta",
                    "missing (neither rope_parameters.main.rope_theta nor rope_theta)",
                )
            })?;
        let config = V4Config {
            vocab_size: uint("vocab_size")?,
            hidden_size: uint("hidden_size")?,
            num_hidden_layers: uint("num_hidden_layers")?,
            num_attention_heads: uint("num_attention_heads")?,
            head_dim,
            rope_head_dim,
            q_lora_rank: uint("q_lora_rank")?,
            o_groups: uint("o_groups")?,
            o_lora_rank: uint("o_lora_rank")?,
            n_routed_experts: uint("n_routed_experts")?,
            num_experts_per_tok: uint("num_experts_per_tok")?,
            moe_intermediate_size: uint("moe_intermediate_size")?,
            routed_scaling_factor: float("routed_scaling_factor")?,
            swiglu_limit: float("swiglu_limit")?,
            hc_mult: uint("hc_mult")?,
            hc_sinkhorn_iters: uint("hc_sinkhorn_iters")?,
            hc_eps: float("hc_eps")?,
            rms_norm_eps: float("rms_norm_eps")?,
            sliding_window: uint("sliding_window")?,
            rope_theta,
        };
        let bad = |key: &str, detail: String| Err(LoadError::field(path, key, detail));
        if rope_head_dim == 0 || !rope_head_dim.is_multiple_of(2) || rope_head_dim > head_dim {
            return bad(
                "qk_rope_head_dim",
                format!("{rope_head_dim} must be even and at most head_dim ({head_dim})"),
            );
        }
        let heads_width = config.num_attention_heads * head_dim;
        if config.o_groups == 0 || !heads_width.is_multiple_of(config.o_groups) {
            return bad(
                "o_groups",
                format!(
                    "{} must divide num_attention_heads × head_dim ({heads_width})",
                    config.o_groups
                ),
            );
        }
        if config.num_experts_per_tok == 0 || config.num_experts_per_tok > config.n_routed_experts {
            return bad(
                "num_experts_per_tok",
                format!(
                    "{} must be between 1 and n_routed_experts ({})",
                    config.num_experts_per_tok, config.n_routed_experts
                ),
            );
        }
        if config.hc_mult == 0 || config.hc_sinkhorn_iters == 0 {
            return bad(
                "hc_mult",
                "hc_mult and hc_sinkhorn_iters must be at least 1".into(),
            );
        }
        Ok(config)
    }

    /// Width of one mHC mixing vector: `(2 + N) N`.
    pub fn hc_mix_width(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }

    /// `(name, shape)` of every tensor of one decoder block under `prefix` (native names), in
    /// the order [`V4Block::load`] reads them. No tensor is allocated.
    pub fn block_layout(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let (d, h, hd) = (self.hidden_size, self.num_attention_heads, self.head_dim);
        let (q, g, r) = (self.q_lora_rank, self.o_groups, self.o_lora_rank);
        let (e, i, n) = (
            self.n_routed_experts,
            self.moe_intermediate_size,
            self.hc_mult,
        );
        let p = |s: &str| format!("{prefix}.{s}");
        let mut out = vec![
            (p("attn_norm.weight"), vec![d]),
            (p("attn.wq_a.weight"), vec![q, d]),
            (p("attn.q_norm.weight"), vec![q]),
            (p("attn.wq_b.weight"), vec![h * hd, q]),
            (p("attn.wkv.weight"), vec![hd, d]),
            (p("attn.kv_norm.weight"), vec![hd]),
            (p("attn.wo_a.weight"), vec![g * r, h * hd / g]),
            (p("attn.wo_b.weight"), vec![d, g * r]),
            (p("attn.attn_sink"), vec![h]),
            (p("ffn_norm.weight"), vec![d]),
            (p("ffn.gate.weight"), vec![e, d]),
            (p("ffn.gate.bias"), vec![e]),
        ];
        for x in 0..e {
            out.push((p(&format!("ffn.experts.{x}.w1.weight")), vec![i, d]));
            out.push((p(&format!("ffn.experts.{x}.w2.weight")), vec![d, i]));
            out.push((p(&format!("ffn.experts.{x}.w3.weight")), vec![i, d]));
        }
        out.push((p("ffn.shared_experts.w1.weight"), vec![i, d]));
        out.push((p("ffn.shared_experts.w2.weight"), vec![d, i]));
        out.push((p("ffn.shared_experts.w3.weight"), vec![i, d]));
        for part in ["attn", "ffn"] {
            out.push((
                p(&format!("hc_{part}_fn")),
                vec![self.hc_mix_width(), n * d],
            ));
            out.push((p(&format!("hc_{part}_base")), vec![self.hc_mix_width()]));
            out.push((p(&format!("hc_{part}_scale")), vec![3]));
        }
        out
    }
}

/// RoPE in DeepSeek-V4's layout: the last `dim` channels of a head rotate in interleaved
/// pairs `(2i, 2i+1)` at angle `pos · θ^(-2i/dim)`.
#[derive(Debug, Clone)]
pub struct V4Rope {
    pub inv_freq: Vec<f32>,
}

/// cos and sin `[batch, seq, 1, dim/2, 1]` for a step's positions.
#[derive(Debug, Clone)]
pub struct V4RopeTables<B: Backend> {
    pub cos: Tensor<B, 5>,
    pub sin: Tensor<B, 5>,
}

impl V4Rope {
    pub fn new(theta: f64, dim: usize) -> Self {
        let base = theta as f32;
        V4Rope {
            inv_freq: (0..dim / 2)
                .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
                .collect(),
        }
    }

    /// Tables for per-row positions (`positions[b][s]`; a negative position counts as 0).
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<i64>],
        device: &B::Device,
    ) -> V4RopeTables<B> {
        let (batch, seq, half) = (
            positions.len(),
            positions.first().map_or(0, Vec::len),
            self.inv_freq.len(),
        );
        let mut cos = Vec::with_capacity(batch * seq * half);
        let mut sin = Vec::with_capacity(batch * seq * half);
        for row in positions {
            assert_eq!(row.len(), seq, "ragged position rows");
            for &p in row {
                for &f in &self.inv_freq {
                    let angle = p.max(0) as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = [batch, seq, 1, half, 1];
        V4RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

impl<B: Backend> V4RopeTables<B> {
    /// Rotates the trailing rope channels of `x [batch, seq, heads, d]` (`inverse`: by the
    /// negative angle).
    pub fn apply(&self, x: Tensor<B, 4>, inverse: bool) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let half = self.cos.dims()[3];
        let r = 2 * half;
        let nope = x.clone().narrow(3, 0, d - r);
        let pairs: Tensor<B, 5> = x.narrow(3, d - r, r).reshape([b, s, h, half, 2]);
        let a = pairs.clone().narrow(4, 0, 1);
        let c = pairs.narrow(4, 1, 1);
        let sin = if inverse {
            self.sin.clone().neg()
        } else {
            self.sin.clone()
        };
        let ra = a.clone() * self.cos.clone() - c.clone() * sin.clone();
        let rc = c * self.cos.clone() + a * sin;
        let rotated: Tensor<B, 4> = Tensor::cat(vec![ra, rc], 4).reshape([b, s, h, r]);
        Tensor::cat(vec![nope, rotated], 3)
    }
}

fn param1<B: Backend>(
    src: &dyn WeightSource,
    name: &str,
    len: usize,
    device: &B::Device,
) -> Result<Param<Tensor<B, 1>>, LoadError> {
    Ok(param_from_host(src.tensor_shaped(name, &[len])?, device))
}

fn param2<B: Backend>(
    src: &dyn WeightSource,
    name: &str,
    shape: [usize; 2],
    device: &B::Device,
) -> Result<Param<Tensor<B, 2>>, LoadError> {
    Ok(param_from_host(src.tensor_shaped(name, &shape)?, device))
}

/// `x · rsqrt(mean(x²) + eps)` over the last axis, no weight.
pub fn rms<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    x * (variance + eps).sqrt().recip()
}

/// The numbers mHC needs besides its weights.
#[derive(Module, Debug, Clone, Copy)]
pub struct HcSettings {
    pub mult: usize,
    pub sinkhorn_iters: usize,
    pub eps: f64,
    /// The RMSNorm eps of the flattened-stream norm (`rms_norm_eps`, not `hc_eps`).
    pub norm_eps: f64,
}

impl HcSettings {
    pub fn from_config(c: &V4Config) -> Self {
        HcSettings {
            mult: c.hc_mult,
            sinkhorn_iters: c.hc_sinkhorn_iters,
            eps: c.hc_eps,
            norm_eps: c.rms_norm_eps,
        }
    }
}

/// One mHC's weights for a token batch: `pre`, `post` `[T, N]` and the Sinkhorn-normalised
/// `comb [T, N, N]` (`comb[t, j, k]`: input stream `j` into output stream `k`).
pub struct HcMix<B: Backend> {
    /// `rms(flat X) · fnᵀ` before scale and base, `[T, (2+N)N]`.
    pub mixes: Tensor<B, 2>,
    pub pre: Tensor<B, 2>,
    pub post: Tensor<B, 2>,
    /// Softmax + `hc_eps`, the Sinkhorn input.
    pub comb_before_sinkhorn: Tensor<B, 3>,
    pub comb: Tensor<B, 3>,
}

/// Mixing weights of streams `x [T, N, D]` under `fn [(2+N)N, N·D]`, `base [(2+N)N]`,
/// `scale [3]`.
pub fn hc_mix<B: Backend>(
    x: Tensor<B, 3>,
    hc_fn: Tensor<B, 2>,
    base: Tensor<B, 1>,
    scale: Tensor<B, 1>,
    s: HcSettings,
) -> HcMix<B> {
    let [t, n, d] = x.dims();
    let flat: Tensor<B, 2> = x.reshape([t, n * d]);
    let mixes = rms(flat, s.norm_eps).matmul(hc_fn.transpose());
    let base: Tensor<B, 2> = base.unsqueeze();
    let part = |i: usize| -> Tensor<B, 2> { scale.clone().narrow(0, i, 1).unsqueeze() };
    let pre =
        sigmoid(mixes.clone().narrow(1, 0, n) * part(0) + base.clone().narrow(1, 0, n)) + s.eps;
    let post =
        sigmoid(mixes.clone().narrow(1, n, n) * part(1) + base.clone().narrow(1, n, n)) * 2.0;
    let logits: Tensor<B, 3> = (mixes.clone().narrow(1, 2 * n, n * n) * part(2)
        + base.narrow(1, 2 * n, n * n))
    .reshape([t, n, n]);
    let comb_before_sinkhorn = softmax(logits, 2) + s.eps;
    let mut comb = comb_before_sinkhorn.clone();
    comb = comb.clone() / (comb.sum_dim(1) + s.eps);
    for _ in 1..s.sinkhorn_iters {
        comb = comb.clone() / (comb.sum_dim(2) + s.eps);
        comb = comb.clone() / (comb.sum_dim(1) + s.eps);
    }
    HcMix {
        mixes,
        pre,
        post,
        comb_before_sinkhorn,
        comb,
    }
}

/// The sub-layer input `Σ_j pre_j X_j`: `[T, N, D] -> [T, D]`.
pub fn hc_collapse<B: Backend>(x: Tensor<B, 3>, pre: Tensor<B, 2>) -> Tensor<B, 2> {
    let [t, _, d] = x.dims();
    (x * pre.unsqueeze_dim::<3>(2)).sum_dim(1).reshape([t, d])
}

/// New streams `X'_k = post_k F + Σ_j comb[j][k] X_j` from sub-layer output `f [T, D]`.
pub fn hc_update<B: Backend>(x: Tensor<B, 3>, f: Tensor<B, 2>, mix: &HcMix<B>) -> Tensor<B, 3> {
    mix.post.clone().unsqueeze_dim::<3>(2) * f.unsqueeze_dim::<3>(1)
        + mix.comb.clone().swap_dims(1, 2).matmul(x)
}

/// The hyper head before the final norm: `Σ_j pre_j X_j` with
/// `pre = σ(rms(flat X) · fnᵀ · scale + base) + hc_eps`. Returns the output `[T, D]` and `pre`.
pub fn hc_head<B: Backend>(
    x: Tensor<B, 3>,
    hc_fn: Tensor<B, 2>,
    base: Tensor<B, 1>,
    scale: Tensor<B, 1>,
    s: HcSettings,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [t, n, d] = x.dims();
    let flat: Tensor<B, 2> = x.clone().reshape([t, n * d]);
    let mixes = rms(flat, s.norm_eps).matmul(hc_fn.transpose());
    let pre = sigmoid(mixes * scale.unsqueeze::<2>() + base.unsqueeze::<2>()) + s.eps;
    (hc_collapse(x, pre.clone()), pre)
}

/// Sliding-window shared-KV attention (`attn.*`).
#[derive(Module, Debug)]
pub struct V4Attention<B: Backend> {
    pub wq_a: Linear<B>,
    pub q_norm: RmsNorm<B>,
    pub wq_b: Linear<B>,
    pub wkv: Linear<B>,
    pub kv_norm: RmsNorm<B>,
    /// `[G·R, H·d/G]`: rows `g·R..(g+1)·R` project group `g`.
    pub wo_a: Linear<B>,
    pub wo_b: Linear<B>,
    /// `[H]` per-head sink logit.
    pub attn_sink: Param<Tensor<B, 1>>,
    pub num_heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub eps: f64,
}

impl<B: Backend> V4Attention<B> {
    /// Reads `prefix.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,wo_b}.weight` and `prefix.attn_sink`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        c: &V4Config,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (d, h, hd) = (c.hidden_size, c.num_attention_heads, c.head_dim);
        let (q, g, r) = (c.q_lora_rank, c.o_groups, c.o_lora_rank);
        let linear = |name: &str, shape: [usize; 2]| -> Result<Linear<B>, LoadError> {
            Ok(Linear::new(
                param2(src, &format!("{prefix}.{name}.weight"), shape, device)?,
                None,
            ))
        };
        let norm = |name: &str, len: usize| -> Result<RmsNorm<B>, LoadError> {
            Ok(RmsNorm::new(
                param1(src, &format!("{prefix}.{name}.weight"), len, device)?,
                c.rms_norm_eps,
            ))
        };
        Ok(V4Attention {
            wq_a: linear("wq_a", [q, d])?,
            q_norm: norm("q_norm", q)?,
            wq_b: linear("wq_b", [h * hd, q])?,
            wkv: linear("wkv", [hd, d])?,
            kv_norm: norm("kv_norm", hd)?,
            wo_a: linear("wo_a", [g * r, h * hd / g])?,
            wo_b: linear("wo_b", [d, g * r])?,
            attn_sink: param1(src, &format!("{prefix}.attn_sink"), h, device)?,
            num_heads: h,
            head_dim: hd,
            groups: g,
            eps: c.rms_norm_eps,
        })
    }

    /// `q_norm(wq_a(x))`, `[.., Q]`.
    pub fn query_residual(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.q_norm.forward(self.wq_a.forward(x))
    }

    /// Queries `[batch, heads, seq, d]`: up-projected, RMS-normed per head, rotated.
    pub fn queries(&self, x: Tensor<B, 3>, rope: &V4RopeTables<B>) -> Tensor<B, 4> {
        let [b, s, _] = x.dims();
        let q: Tensor<B, 4> = self.wq_b.forward(self.query_residual(x)).reshape([
            b,
            s,
            self.num_heads,
            self.head_dim,
        ]);
        rope.apply(rms(q, self.eps), false).swap_dims(1, 2)
    }

    /// The one key = value head `[batch, 1, seq, d]`: `kv_norm(wkv(x))`, rotated.
    pub fn key_values(&self, x: Tensor<B, 3>, rope: &V4RopeTables<B>) -> Tensor<B, 4> {
        let [b, s, _] = x.dims();
        let kv: Tensor<B, 4> =
            self.kv_norm
                .forward(self.wkv.forward(x))
                .reshape([b, s, 1, self.head_dim]);
        rope.apply(kv, false).swap_dims(1, 2)
    }

    /// Attends (the seam, with this layer's sinks): `[batch, heads, q, d]`.
    pub fn attend(
        &self,
        query: Tensor<B, 4>,
        kv: Tensor<B, 4>,
        visibility: &Visibility<B>,
    ) -> Tensor<B, 4> {
        let scale = (self.head_dim as f64).powf(-0.5);
        attention_with_sink(
            query,
            kv.clone(),
            kv,
            visibility,
            scale,
            self.attn_sink.val(),
        )
    }

    /// Attended heads `[batch, heads, seq, d]` de-rotated at the queries' positions, then
    /// the grouped low-rank output: `[batch, seq, D]`.
    pub fn output(&self, attended: Tensor<B, 4>, rope: &V4RopeTables<B>) -> Tensor<B, 3> {
        let [b, h, s, d] = attended.dims();
        let o = rope.apply(attended.swap_dims(1, 2), true);
        self.wo_b.forward(self.grouped(o.reshape([b, s, h * d])))
    }

    /// `wo_a` per group: `[batch, seq, H·d] -> [batch, seq, G·R]`.
    pub fn grouped(&self, o: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, width] = o.dims();
        let g = self.groups;
        let per = width / g;
        let r = self.wo_a.out_features() / g;
        let w: Tensor<B, 3> = self.wo_a.weight.val().reshape([g, r, per]);
        let x: Tensor<B, 3> = o.reshape([b * s, g, per]).swap_dims(0, 1);
        x.matmul(w.swap_dims(1, 2))
            .swap_dims(0, 1)
            .reshape([b, s, g * r])
    }

    /// Self-attention of `x [batch, seq, D]` under `visibility` at `rope`'s positions.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &V4RopeTables<B>,
        visibility: &Visibility<B>,
    ) -> Tensor<B, 3> {
        let q = self.queries(x.clone(), rope);
        let kv = self.key_values(x, rope);
        self.output(self.attend(q, kv, visibility), rope)
    }
}

/// A clamped SwiGLU expert (`w1` gate, `w3` up, `w2` down).
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    pub w1: Linear<B>,
    pub w2: Linear<B>,
    pub w3: Linear<B>,
}

impl<B: Backend> Expert<B> {
    /// `w2(silu(min(w1 x, L)) · clamp(w3 x, −L, L))`.
    pub fn forward(&self, x: Tensor<B, 2>, limit: f64) -> Tensor<B, 2> {
        let gate = self.w1.forward(x.clone()).clamp_max(limit);
        let up = self.w3.forward(x).clamp(-limit, limit);
        self.w2.forward(silu(gate) * up)
    }
}

/// The router: `weight [E, D]`, and `bias [E]` (`noaux_tc`'s correction, selection only,
/// no gradient).
#[derive(Module, Debug)]
pub struct Gate<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Param<Tensor<B, 1>>,
}

/// What the router decided for a token batch.
pub struct Routing<B: Backend> {
    /// `[T, E]` `x · gateᵀ`.
    pub logits: Tensor<B, 2>,
    /// `[T, E]` `sqrt(softplus(logits))`.
    pub scores: Tensor<B, 2>,
    /// `[T][k]` the chosen experts, by descending `scores + bias`.
    pub ids: Vec<Vec<usize>>,
    /// `[T, k]` routing weights aligned with `ids`.
    pub weights: Tensor<B, 2>,
}

/// The MoE feed-forward (`ffn.*`).
#[derive(Module, Debug)]
pub struct V4Moe<B: Backend> {
    pub gate: Gate<B>,
    pub experts: Vec<Expert<B>>,
    pub shared_experts: Expert<B>,
    pub top_k: usize,
    pub route_scale: f64,
    pub swiglu_limit: f64,
}

impl<B: Backend> V4Moe<B> {
    /// Reads `prefix.gate.{weight,bias}`, `prefix.experts.{e}.w{1,2,3}.weight` and
    /// `prefix.shared_experts.w{1,2,3}.weight`. The shared expert has the routed experts'
    /// width, as transformers builds it (SGLang and vLLM size it `I · n_shared_experts`; V4
    /// has one).
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        c: &V4Config,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (d, i, e) = (c.hidden_size, c.moe_intermediate_size, c.n_routed_experts);
        let linear = |name: &str, shape: [usize; 2]| -> Result<Linear<B>, LoadError> {
            Ok(Linear::new(
                param2(src, &format!("{prefix}.{name}.weight"), shape, device)?,
                None,
            ))
        };
        let expert = |name: &str| -> Result<Expert<B>, LoadError> {
            Ok(Expert {
                w1: linear(&format!("{name}.w1"), [i, d])?,
                w2: linear(&format!("{name}.w2"), [d, i])?,
                w3: linear(&format!("{name}.w3"), [i, d])?,
            })
        };
        Ok(V4Moe {
            gate: Gate {
                weight: param2(src, &format!("{prefix}.gate.weight"), [e, d], device)?,
                bias: param1(src, &format!("{prefix}.gate.bias"), e, device)?
                    .set_require_grad(false),
            },
            experts: (0..e)
                .map(|x| expert(&format!("experts.{x}")))
                .collect::<Result<Vec<_>, _>>()?,
            shared_experts: expert("shared_experts")?,
            top_k: c.num_experts_per_tok,
            route_scale: c.routed_scaling_factor,
            swiglu_limit: c.swiglu_limit,
        })
    }

    /// Routes tokens `x [T, D]`. The top-k choice is made on the host from
    /// `scores + bias` (ties go to the lower expert id); the weights stay on the graph.
    pub fn route(&self, x: Tensor<B, 2>) -> Routing<B> {
        let [t, _] = x.dims();
        let e = self.experts.len();
        let device = x.device();
        let logits = x.matmul(self.gate.weight.val().transpose());
        // softplus, stably: max(z, 0) + log(1 + exp(-|z|)).
        let softplus =
            logits.clone().clamp_min(0.0) + (logits.clone().abs().neg().exp() + 1.0).log();
        let scores = softplus.sqrt();
        let selection = scores.clone().detach() + self.gate.bias.val().detach().unsqueeze::<2>();
        let host = to_host(selection).data;
        let k = self.top_k;
        let ids: Vec<Vec<usize>> = host
            .chunks(e)
            .map(|row| {
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                order.truncate(k);
                order
            })
            .collect();
        let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
        let index = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [t, k]), &device);
        let chosen = scores.clone().gather(1, index);
        let weights = chosen.clone() / (chosen.sum_dim(1) + 1e-20) * self.route_scale;
        Routing {
            logits,
            scores,
            ids,
            weights,
        }
    }

    /// Routed experts' output alone, `[T, D]`.
    pub fn routed(&self, x: Tensor<B, 2>, routing: &Routing<B>) -> Tensor<B, 2> {
        let [t, d] = x.dims();
        let k = self.top_k;
        let device = x.device();
        let mut per_expert: Vec<(Vec<i64>, Vec<i64>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, chosen) in routing.ids.iter().enumerate() {
            for (slot, &e) in chosen.iter().enumerate() {
                per_expert[e].0.push(token as i64);
                per_expert[e].1.push((token * k + slot) as i64);
            }
        }
        let weights: Tensor<B, 1> = routing.weights.clone().reshape([t * k]);
        let mut out = Tensor::<B, 2>::zeros([t, d], &device);
        for (expert, (tokens, slots)) in self.experts.iter().zip(per_expert) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [n]), &device);
            let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [n]), &device);
            let y = expert.forward(x.clone().select(0, tokens.clone()), self.swiglu_limit);
            let w: Tensor<B, 2> = weights.clone().select(0, slots).unsqueeze_dim(1);
            out = out.select_assign(0, tokens, y * w, IndexingUpdateOp::Add);
        }
        out
    }

    /// `routed(x) + shared(x)`: `[T, D] -> [T, D]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let routing = self.route(x.clone());
        self.routed(x.clone(), &routing) + self.shared_experts.forward(x, self.swiglu_limit)
    }
}

/// One DeepSeek-V4 decoder block (sliding attention, MoE, mHC), and the extras a DSpark
/// stage carries: the first stage projects the target's features (`main_proj`,
/// `main_norm`); the last holds the hyper head, the final norm and the DSpark heads.
#[derive(Module, Debug)]
pub struct V4Block<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub attn: V4Attention<B>,
    pub ffn_norm: RmsNorm<B>,
    pub ffn: V4Moe<B>,
    pub hc_attn_fn: Param<Tensor<B, 2>>,
    pub hc_attn_base: Param<Tensor<B, 1>>,
    pub hc_attn_scale: Param<Tensor<B, 1>>,
    pub hc_ffn_fn: Param<Tensor<B, 2>>,
    pub hc_ffn_base: Param<Tensor<B, 1>>,
    pub hc_ffn_scale: Param<Tensor<B, 1>>,
    pub hc: HcSettings,
    /// DSpark stage 0: `[D, n·D]`, the tapped target features into the drafter's width.
    pub main_proj: Option<Linear<B>>,
    pub main_norm: Option<RmsNorm<B>>,
    /// DSpark's last stage: the final norm and the hyper head before it.
    pub norm: Option<RmsNorm<B>>,
    pub hc_head_fn: Option<Param<Tensor<B, 2>>>,
    pub hc_head_base: Option<Param<Tensor<B, 1>>>,
    pub hc_head_scale: Option<Param<Tensor<B, 1>>>,
    /// DSpark's last stage: the Markov and confidence heads.
    pub markov_head: Option<MarkovHead<B>>,
    pub confidence_head: Option<ConfidenceHead<B>>,
}

impl<B: Backend> V4Block<B> {
    /// Reads the block under `prefix` (native names) with every size from `config`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        config: &V4Config,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (d, w) = (config.hidden_size, config.hc_mix_width());
        let n = config.hc_mult;
        let p1 = |name: &str, len: usize| param1(src, &format!("{prefix}.{name}"), len, device);
        let p2 =
            |name: &str, shape: [usize; 2]| param2(src, &format!("{prefix}.{name}"), shape, device);
        let eps = config.rms_norm_eps;
        Ok(V4Block {
            attn_norm: RmsNorm::new(p1("attn_norm.weight", d)?, eps),
            attn: V4Attention::load(src, &format!("{prefix}.attn"), config, device)?,
            ffn_norm: RmsNorm::new(p1("ffn_norm.weight", d)?, eps),
            ffn: V4Moe::load(src, &format!("{prefix}.ffn"), config, device)?,
            hc_attn_fn: p2("hc_attn_fn", [w, n * d])?,
            hc_attn_base: p1("hc_attn_base", w)?,
            hc_attn_scale: p1("hc_attn_scale", 3)?,
            hc_ffn_fn: p2("hc_ffn_fn", [w, n * d])?,
            hc_ffn_base: p1("hc_ffn_base", w)?,
            hc_ffn_scale: p1("hc_ffn_scale", 3)?,
            hc: HcSettings::from_config(config),
            main_proj: None,
            main_norm: None,
            norm: None,
            hc_head_fn: None,
            hc_head_base: None,
            hc_head_scale: None,
            markov_head: None,
            confidence_head: None,
        })
    }

    /// The attention sub-layer's mHC weights for streams `x [T, N, D]`.
    pub fn attn_mix(&self, x: Tensor<B, 3>) -> HcMix<B> {
        hc_mix(
            x,
            self.hc_attn_fn.val(),
            self.hc_attn_base.val(),
            self.hc_attn_scale.val(),
            self.hc,
        )
    }

    /// The MoE sub-layer's mHC weights.
    pub fn ffn_mix(&self, x: Tensor<B, 3>) -> HcMix<B> {
        hc_mix(
            x,
            self.hc_ffn_fn.val(),
            self.hc_ffn_base.val(),
            self.hc_ffn_scale.val(),
            self.hc,
        )
    }

    /// The block over streams `x [batch, seq, N, D]`. `attend(attention, input)` runs the
    /// attention on its normed input `[batch, seq, D]` (the caller decides the keys and what
    /// each query sees) and returns its output `[batch, seq, D]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        attend: impl FnOnce(&V4Attention<B>, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let [b, s, n, d] = x.dims();
        let x: Tensor<B, 3> = x.reshape([b * s, n, d]);
        let mix = self.attn_mix(x.clone());
        let u = self
            .attn_norm
            .forward(hc_collapse(x.clone(), mix.pre.clone()))
            .reshape([b, s, d]);
        let f: Tensor<B, 2> = attend(&self.attn, u).reshape([b * s, d]);
        let x = hc_update(x, f, &mix);
        let mix = self.ffn_mix(x.clone());
        let u = self
            .ffn_norm
            .forward(hc_collapse(x.clone(), mix.pre.clone()));
        let f = self.ffn.forward(u);
        hc_update(x, f, &mix).reshape([b, s, n, d])
    }
}

/// Streams for a token batch `[batch, seq, D]`: `N` identical copies, `[batch, seq, N, D]`.
pub fn expand_streams<B: Backend>(x: Tensor<B, 3>, n: usize) -> Tensor<B, 4> {
    let [b, s, d] = x.dims();
    x.unsqueeze_dim::<4>(2).expand([b, s, n, d])
}
