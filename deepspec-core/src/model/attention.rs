//! Grouped-query self-attention and the single attention seam every model goes through.
//!
//! [`attention`] is deliberately one function with a narrow signature: a fused (flash)
//! kernel for the GPU replaces its body, not its callers.

use super::kv_cache::LayerCache;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::apply_rotary;
use burn::module::Module;
use burn::tensor::{activation::softmax, backend::Backend, Bool, Tensor};

/// Scores of hidden keys are pushed this far down before the softmax; large enough to vanish
/// against any real score, finite so a row with no visible key stays free of NaN.
const HIDDEN_SCORE: f32 = -1.0e30;

/// Scaled dot-product attention with grouped key/value heads.
///
/// - `query`: `[batch, heads, q_len, head_dim]`
/// - `key`, `value`: `[batch, kv_heads, k_len, head_dim]`; query head `h` reads key/value head
///   `h / (heads / kv_heads)` (repeat-interleave)
/// - `visible`: `[batch, 1, q_len, k_len]`, true where the query may attend to the key
///
/// Returns `[batch, heads, q_len, head_dim]`. A query that sees no key gets an all-zero
/// output (flex-attention semantics), never NaN.
pub fn attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visible: Tensor<B, 4, Bool>,
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, heads, q_len, head_dim] = query.dims();
    let [_, kv_heads, k_len, _] = key.dims();
    assert_eq!(
        heads % kv_heads,
        0,
        "attention: {heads} query heads not divisible by {kv_heads} kv heads"
    );
    assert_eq!(
        visible.dims(),
        [batch, 1, q_len, k_len],
        "attention: visibility mask shape"
    );
    let group = heads / kv_heads;
    // Fold the query heads of one group into the sequence axis so K and V are never copied.
    let query = query.reshape([batch, kv_heads, group * q_len, head_dim]);
    let scores = query.matmul(key.swap_dims(2, 3)) * scale;
    let visible = visible.repeat_dim(2, group);
    let scores = scores.mask_fill(visible.clone().bool_not(), HIDDEN_SCORE);
    let probs = softmax(scores, 3);
    let any_visible = visible.any_dim(3).float();
    let out = probs.matmul(value) * any_visible;
    out.reshape([batch, heads, q_len, head_dim])
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// Qwen3's per-head RMSNorm on queries and keys (absent for Llama).
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> SelfAttention<B> {
    /// Projects `x: [batch, seq, in]` to heads `[batch, n, seq, head_dim]`, applying the
    /// per-head norm if there is one.
    fn heads(
        &self,
        proj: &Linear<B>,
        norm: Option<&RmsNorm<B>>,
        x: Tensor<B, 3>,
        n: usize,
    ) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        let mut h: Tensor<B, 4> = proj.forward(x).reshape([batch, seq, n, self.head_dim]);
        if let Some(norm) = norm {
            h = norm.forward(h);
        }
        h.swap_dims(1, 2)
    }

    /// Queries `[batch, heads, seq, head_dim]`, rotated.
    pub fn queries(&self, x: Tensor<B, 3>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let q = self.heads(&self.q_proj, self.q_norm.as_ref(), x, self.num_heads);
        apply_rotary(q, cos, sin)
    }

    /// Keys (rotated) and values `[batch, kv_heads, seq, head_dim]`.
    pub fn keys_values(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = self.heads(
            &self.k_proj,
            self.k_norm.as_ref(),
            x.clone(),
            self.num_kv_heads,
        );
        let v = self.heads(&self.v_proj, None, x, self.num_kv_heads);
        (apply_rotary(k, cos, sin), v)
    }

    /// Output projection of attended heads `[batch, heads, seq, head_dim] -> [batch, seq, hidden]`.
    pub fn output(&self, attended: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = attended.dims();
        self.o_proj.forward(
            attended
                .swap_dims(1, 2)
                .reshape([batch, seq, heads * head_dim]),
        )
    }

    /// Causal self-attention of a step appended to `cache`.
    ///
    /// `x: [batch, seq, hidden]`; `visible: [batch, 1, seq, cached + seq]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        cache: &mut LayerCache<B>,
        visible: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let q = self.queries(x.clone(), cos, sin);
        let (k, v) = self.keys_values(x, cos, sin);
        let (k, v) = cache.append(k, v);
        let attended = attention(q, k, v, visible, (self.head_dim as f64).powf(-0.5));
        self.output(attended)
    }
}
