//! Grouped-query self-attention and the single attention seam every model goes through.
//!
//! [`attention`] is one function with a narrow signature: queries, keys, values and a
//! [`Visibility`] *description* (positions, anchors, lengths, window), never a host-built
//! mask. A fused (flash) kernel for the GPU replaces its body, not its callers. The body
//! here is the reference: it builds whatever mask it needs on the device from iota
//! comparisons, and computes DSpark/DFlash block attention and Eagle3's training-time test as
//! two parts merged exactly by log-sum-exp, so the mostly hidden `[slots × slots]` (or
//! `[L × steps·L]`) part of a dense mask is never formed.

use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::apply_rotary;
use burn::module::Module;
use burn::tensor::{activation::sigmoid, backend::Backend, Bool, Int, Tensor};

/// Scores of hidden keys are pushed this far down before the softmax; large enough to vanish
/// against any real score, finite so a row with no visible key stays free of NaN.
const HIDDEN_SCORE: f32 = -1.0e30;

/// Which keys each query may attend to, described rather than spelled out.
#[derive(Debug, Clone)]
pub enum Visibility<B: Backend> {
    /// Every query sees every key.
    All,
    /// Query `i` of row `b` sees key `j` iff `0 <= key_positions[b, j] <= query_positions[b, i]`;
    /// a query at position `-1` (padding) sees nothing.
    Causal {
        /// `[batch, q_len]`
        query_positions: Tensor<B, 2, Int>,
        /// `[batch, k_len]`, `-1` for an empty or rolled-back slot.
        key_positions: Tensor<B, 2, Int>,
    },
    /// Sliding-window causal attention (DeepSeek-V4's layers): query `i` of row `b` sees key
    /// `j` iff `query_positions[b, i] - window < key_positions[b, j] <= query_positions[b, i]`
    /// and the key position is not `-1`; the window holds `window` keys, the query's own
    /// included.
    Window {
        /// `[batch, q_len]`
        query_positions: Tensor<B, 2, Int>,
        /// `[batch, k_len]`
        key_positions: Tensor<B, 2, Int>,
        window: usize,
    },
    /// DSpark/DFlash blocks: the keys are `context_len` context positions followed by the
    /// blocks' own slots (`num_blocks × block_size`, one query per slot). A slot of block `m`
    /// sees the context keys `j < anchors[b, m]` (only the last `window` of them when a
    /// window is set) and every slot of its own block; a block whose anchor is `-1` (dropped)
    /// sees nothing.
    Blocks {
        /// `[batch, num_blocks]`
        anchors: Tensor<B, 2, Int>,
        block_size: usize,
        context_len: usize,
        window: Option<usize>,
    },
    /// Eagle3's training-time test at `step`: the keys are the step-0 keys of every position
    /// followed by `step` more groups of `len` (one per later step). Query `t` of row `b` is
    /// active iff `t < lens[b] - step`; it sees the step-0 keys `j <= t` with
    /// `j < lens[b] - step`, and the key at its own position from each later step.
    Ttt {
        /// `[batch]` real lengths.
        lens: Tensor<B, 1, Int>,
        len: usize,
        step: usize,
    },
}

impl<B: Backend> Visibility<B> {
    /// The dense `[batch, 1, q_len, k_len]` mask this description stands for, built on the
    /// device. The reference body uses it only for `Causal`; tests compare every other path
    /// against attention under this mask.
    pub fn dense_mask(
        &self,
        batch: usize,
        q_len: usize,
        k_len: usize,
        device: &B::Device,
    ) -> Tensor<B, 4, Bool> {
        let iota = |n: usize| Tensor::<B, 1, Int>::arange(0..n as i64, device);
        let grid = |t: Tensor<B, 1, Int>, rows: bool| -> Tensor<B, 3, Int> {
            if rows {
                t.reshape([1, q_len, 1]).expand([batch, q_len, k_len])
            } else {
                t.reshape([1, 1, k_len]).expand([batch, q_len, k_len])
            }
        };
        let mask: Tensor<B, 3, Bool> = match self {
            Visibility::All => {
                Tensor::<B, 3, Int>::ones([batch, q_len, k_len], device).equal_elem(1)
            }
            Visibility::Causal {
                query_positions,
                key_positions,
            } => causal_mask(query_positions.clone(), key_positions.clone()),
            Visibility::Window {
                query_positions,
                key_positions,
                window,
            } => {
                let q = query_positions
                    .clone()
                    .reshape([batch, q_len, 1])
                    .expand([batch, q_len, k_len]);
                let k = key_positions
                    .clone()
                    .reshape([batch, 1, k_len])
                    .expand([batch, q_len, k_len]);
                causal_mask(query_positions.clone(), key_positions.clone())
                    .bool_and(k.greater(q - *window as i64))
            }
            Visibility::Blocks {
                anchors,
                block_size,
                context_len,
                window,
            } => {
                let (bs, ctx) = (*block_size, *context_len);
                let slot_anchor = slot_anchors(anchors.clone(), bs)
                    .reshape([batch, q_len, 1])
                    .expand([batch, q_len, k_len]);
                let key = grid(iota(k_len), false);
                let in_context = key.clone().lower_elem(ctx as i64);
                let context = context_visible(key.clone(), slot_anchor.clone(), *window);
                let own_block = grid(iota(q_len).div_scalar(bs as i64), true)
                    .equal((key.clone() - ctx as i64).div_scalar(bs as i64))
                    .bool_and(in_context.clone().bool_not())
                    .bool_and(slot_anchor.greater_equal_elem(0));
                in_context.bool_and(context).bool_or(own_block)
            }
            Visibility::Ttt { lens, len, step } => {
                let (len, step) = (*len, *step);
                let valid = (lens.clone() - step as i64)
                    .reshape([batch, 1, 1])
                    .expand([batch, q_len, k_len]);
                let query = grid(iota(q_len), true);
                let key = grid(iota(k_len), false);
                let step0 = key.clone().lower_elem(len as i64);
                let causal = key
                    .clone()
                    .lower_equal(query.clone())
                    .bool_and(key.clone().lower(valid.clone()));
                let own = key.remainder_scalar(len as i64).equal(query.clone());
                query.lower(valid).bool_and(
                    step0
                        .clone()
                        .bool_and(causal)
                        .bool_or(step0.bool_not().bool_and(own)),
                )
            }
        };
        mask.unsqueeze_dim(1)
    }
}

/// `[batch, q, k]`: `0 <= key <= query`.
fn causal_mask<B: Backend>(
    query_positions: Tensor<B, 2, Int>,
    key_positions: Tensor<B, 2, Int>,
) -> Tensor<B, 3, Bool> {
    let [batch, q_len] = query_positions.dims();
    let [_, k_len] = key_positions.dims();
    let q = query_positions
        .reshape([batch, q_len, 1])
        .expand([batch, q_len, k_len]);
    let k = key_positions
        .reshape([batch, 1, k_len])
        .expand([batch, q_len, k_len]);
    k.clone().greater_equal_elem(0).bool_and(k.lower_equal(q))
}

/// Each slot's anchor `[batch, num_blocks * block_size]`.
fn slot_anchors<B: Backend>(anchors: Tensor<B, 2, Int>, block_size: usize) -> Tensor<B, 2, Int> {
    let [batch, blocks] = anchors.dims();
    anchors
        .reshape([batch, blocks, 1])
        .expand([batch, blocks, block_size])
        .reshape([batch, blocks * block_size])
}

/// Context key `key` is visible to a slot anchored at `anchor`: `key < anchor`, and within
/// the window when there is one.
fn context_visible<B: Backend, const D: usize>(
    key: Tensor<B, D, Int>,
    anchor: Tensor<B, D, Int>,
    window: Option<usize>,
) -> Tensor<B, D, Bool> {
    let before = key.clone().lower(anchor.clone());
    match window {
        Some(w) => before.bool_and(key.greater_equal(anchor - w as i64)),
        None => before,
    }
}

/// Scaled dot-product attention with grouped key/value heads — the seam.
///
/// - `query`: `[batch, heads, q_len, head_dim]`
/// - `key`, `value`: `[batch, kv_heads, k_len, head_dim]`; query head `h` reads key/value head
///   `h / (heads / kv_heads)` (repeat-interleave)
/// - `visibility`: which keys each query sees (see [`Visibility`])
///
/// Returns `[batch, heads, q_len, head_dim]`. A query that sees no key gets an all-zero
/// output (flex-attention semantics), never NaN.
pub fn attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visibility: &Visibility<B>,
    scale: f64,
) -> Tensor<B, 4> {
    attention_lse(query, key, value, visibility, scale).0
}

/// [`attention`] with a learnable per-head *sink* (DeepSeek-V4's `attn_sink`): a logit
/// `sink[h]` that joins every softmax denominator of head `h` without a value, so a row's
/// weights sum to less than one. Equal to `attention(..) · σ(lse − sink[h])`, with `lse` the
/// log-sum-exp of the row's visible scores; the same seam, one more description.
pub fn attention_with_sink<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visibility: &Visibility<B>,
    scale: f64,
    sink: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let heads = query.dims()[1];
    let (out, lse) = attention_lse(query, key, value, visibility, scale);
    let sink = sink.reshape([1, heads, 1, 1]);
    out * sigmoid(lse - sink)
}

/// The attention output and each row's log-sum-exp of visible scores (`[batch, heads,
/// q_len, 1]`; about `-1e30` for a row that sees nothing).
fn attention_lse<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visibility: &Visibility<B>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, heads, q_len, _] = query.dims();
    let [_, kv_heads, k_len, _] = key.dims();
    assert_eq!(
        heads % kv_heads,
        0,
        "attention: {heads} query heads not divisible by {kv_heads} kv heads"
    );
    match visibility {
        Visibility::All => dense_attention_lse(query, key, value, None, scale),
        Visibility::Causal { .. } | Visibility::Window { .. } => {
            let mask = visibility.dense_mask(batch, q_len, k_len, &query.device());
            dense_attention_lse(query, key, value, Some(mask), scale)
        }
        Visibility::Blocks {
            anchors,
            block_size,
            context_len,
            ..
        } => block_attention(
            query,
            key,
            value,
            visibility,
            anchors.clone(),
            *block_size,
            *context_len,
            scale,
        ),
        Visibility::Ttt { len, step, .. } => {
            ttt_attention(query, key, value, visibility, *len, *step, scale)
        }
    }
}

/// Attention under a dense mask `[batch, 1, q_len, k_len]` (`None`: every key visible) — the
/// plain reference every described path is tested against.
pub fn dense_attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visible: Option<Tensor<B, 4, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    dense_attention_lse(query, key, value, visible, scale).0
}

fn dense_attention_lse<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visible: Option<Tensor<B, 4, Bool>>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, heads, q_len, head_dim] = query.dims();
    let [_, kv_heads, k_len, _] = key.dims();
    let group = heads / kv_heads;
    // Fold the query heads of one group into the sequence axis so K and V are never copied.
    let query = query.reshape([batch, kv_heads, group * q_len, head_dim]);
    let scores = query.matmul(key.swap_dims(2, 3)) * scale;
    let (scores, any_visible) = match visible {
        None => (scores, None),
        Some(visible) => {
            assert_eq!(
                visible.dims(),
                [batch, 1, q_len, k_len],
                "attention: visibility mask shape"
            );
            let visible = visible.repeat_dim(2, group);
            let any = visible.clone().any_dim(3).float();
            (
                scores.mask_fill(visible.bool_not(), HIDDEN_SCORE),
                Some(any),
            )
        }
    };
    let part = Partial::new(scores, value);
    let lse = part.lse();
    let mut out = part.out / part.sum;
    if let Some(any) = any_visible {
        out = out * any;
    }
    (
        out.reshape([batch, heads, q_len, head_dim]),
        lse.reshape([batch, heads, q_len, 1]),
    )
}

/// One part of a split softmax: the row maxima `m`, the sums `Σ exp(s - m)` and the
/// unnormalised outputs `Σ exp(s - m) · v` (`[.., rows, 1]`, `[.., rows, 1]`, `[.., rows, d]`).
struct Partial<B: Backend, const D: usize> {
    max: Tensor<B, D>,
    sum: Tensor<B, D>,
    out: Tensor<B, D>,
}

impl<B: Backend, const D: usize> Partial<B, D> {
    /// From masked scores `[.., rows, keys]` and values `[.., keys, d]`. The maximum is a
    /// constant of the graph: the merged result does not depend on it.
    fn new(scores: Tensor<B, D>, values: Tensor<B, D>) -> Self {
        let max = scores.clone().max_dim(D - 1).detach();
        let e = (scores - max.clone()).exp();
        Partial {
            max,
            sum: e.clone().sum_dim(D - 1),
            out: e.matmul(values),
        }
    }

    /// `log Σ exp(s)` over this part's keys.
    fn lse(&self) -> Tensor<B, D> {
        self.max.clone() + self.sum.clone().log()
    }

    /// Two parts over disjoint key sets merged exactly: the softmax over their union, and its
    /// log-sum-exp.
    fn merge(self, other: Self) -> (Tensor<B, D>, Tensor<B, D>) {
        let max = self.max.clone().max_pair(other.max.clone());
        let a = (self.max - max.clone()).exp();
        let b = (other.max - max.clone()).exp();
        let sum = self.sum * a.clone() + other.sum * b.clone();
        let out = (self.out * a + other.out * b) / sum.clone();
        (out, max + sum.log())
    }
}

/// The part of attention over the first `keys` keys, masked as `visibility`'s dense mask
/// restricted to those keys says. `query` is folded to `[batch, kv_heads, group·q, d]`.
/// Also returns which rows see any of these keys (`[batch, 1, group·q, 1]`, 0/1).
fn leading_part<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visibility: &Visibility<B>,
    group: usize,
    keys: usize,
    scale: f64,
) -> (Partial<B, 4>, Tensor<B, 4>) {
    let [batch, _, rows, _] = query.dims();
    let visible = visibility
        .dense_mask(batch, rows / group, keys, &query.device())
        .repeat_dim(2, group);
    let any = visible.clone().any_dim(3).float();
    let scores = query.matmul(key.narrow(2, 0, keys).swap_dims(2, 3)) * scale;
    let part = Partial::new(
        scores.mask_fill(visible.bool_not(), HIDDEN_SCORE),
        value.narrow(2, 0, keys),
    );
    (part, any)
}

/// DSpark/DFlash block attention: context part `[slots × context]` masked by anchor (and
/// window), block-diagonal part `[blocks, block × block]`, merged by log-sum-exp.
#[allow(clippy::too_many_arguments)]
fn block_attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visibility: &Visibility<B>,
    anchors: Tensor<B, 2, Int>,
    block_size: usize,
    context_len: usize,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, heads, slots, d] = query.dims();
    let [_, kv_heads, k_len, _] = key.dims();
    let blocks = anchors.dims()[1];
    assert_eq!(
        slots,
        blocks * block_size,
        "attention: one query per block slot"
    );
    assert_eq!(
        k_len,
        context_len + slots,
        "attention: keys are context then block slots"
    );
    let group = heads / kv_heads;
    let query = query.reshape([batch, kv_heads, group * slots, d]);

    // Context part: rows `g·slots + s`, a slot's anchor (and the window) decides what it sees.
    let (context, _) = leading_part(
        query.clone(),
        key.clone(),
        value.clone(),
        visibility,
        group,
        context_len,
        scale,
    );

    // Block part: a slot sees every slot of its own block (and nothing once dropped).
    let by_block =
        |t: Tensor<B, 4>| -> Tensor<B, 3> { t.reshape([batch * kv_heads * blocks, block_size, d]) };
    let q_blocks: Tensor<B, 3> = query
        .reshape([batch, kv_heads, group, blocks, block_size, d])
        .swap_dims(2, 3)
        .reshape([batch * kv_heads * blocks, group * block_size, d]);
    let k_blocks = by_block(key.narrow(2, context_len, slots));
    let v_blocks = by_block(value.narrow(2, context_len, slots));
    let kept = anchors.greater_equal_elem(0);
    let hidden = kept
        .clone()
        .bool_not()
        .reshape([batch, 1, blocks, 1, 1])
        .expand([batch, kv_heads, blocks, group * block_size, block_size])
        .reshape([batch * kv_heads * blocks, group * block_size, block_size]);
    let scores = q_blocks.matmul(k_blocks.swap_dims(1, 2)) * scale;
    let own = Partial::new(scores.mask_fill(hidden, HIDDEN_SCORE), v_blocks);
    // Bring the block part back to rows `g·slots + s`.
    let own = Partial {
        max: unblock(own.max, batch, kv_heads, group, blocks, block_size, 1),
        sum: unblock(own.sum, batch, kv_heads, group, blocks, block_size, 1),
        out: unblock(own.out, batch, kv_heads, group, blocks, block_size, d),
    };
    let kept = kept
        .float()
        .reshape([batch, 1, 1, blocks, 1])
        .expand([batch, 1, group, blocks, block_size])
        .reshape([batch, 1, group * slots, 1]);
    let (out, lse) = context.merge(own);
    (
        (out * kept).reshape([batch, heads, slots, d]),
        lse.reshape([batch, heads, slots, 1]),
    )
}

/// `[batch·kv_heads·blocks, group·block, w]` -> `[batch, kv_heads, group·blocks·block, w]`.
fn unblock<B: Backend>(
    t: Tensor<B, 3>,
    batch: usize,
    kv_heads: usize,
    group: usize,
    blocks: usize,
    block_size: usize,
    w: usize,
) -> Tensor<B, 4> {
    t.reshape([batch, kv_heads, blocks, group, block_size * w])
        .swap_dims(2, 3)
        .reshape([batch, kv_heads, group * blocks * block_size, w])
}

/// Eagle3 training-time-test attention: causal over the step-0 keys, plus the key at the
/// query's own position from each later step, merged by log-sum-exp.
fn ttt_attention<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    visibility: &Visibility<B>,
    len: usize,
    step: usize,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, heads, q_len, d] = query.dims();
    let [_, kv_heads, k_len, _] = key.dims();
    assert_eq!(q_len, len, "attention: one TTT query per position");
    assert_eq!(
        k_len,
        (step + 1) * len,
        "attention: step+1 groups of TTT keys"
    );
    let group = heads / kv_heads;
    let query = query.reshape([batch, kv_heads, group * len, d]);
    // Step-0 keys, causally; a query that sees none of them is inactive (past its row's
    // length) and sees nothing at all.
    let (causal, active) = leading_part(
        query.clone(),
        key.clone(),
        value.clone(),
        visibility,
        group,
        len,
        scale,
    );
    if step == 0 {
        let lse = causal.lse().reshape([batch, heads, len, 1]);
        let out = causal.out / causal.sum;
        return ((out * active).reshape([batch, heads, len, d]), lse);
    }
    // Later steps: one key per query, the score is a row-wise dot product.
    let per_group = |t: Tensor<B, 4>| -> Tensor<B, 5> { t.reshape([batch, kv_heads, 1, len, d]) };
    let q5: Tensor<B, 5> = query.clone().reshape([batch, kv_heads, group, len, d]);
    let scores: Vec<Tensor<B, 5>> = (1..=step)
        .map(|s| (q5.clone() * per_group(key.clone().narrow(2, s * len, len))).sum_dim(4) * scale)
        .collect();
    let scores = Tensor::cat(scores, 4); // [batch, kv_heads, group, len, step]
    let max = scores.clone().max_dim(4).detach();
    let e = (scores - max.clone()).exp();
    let sum = e.clone().sum_dim(4);
    let mut out: Option<Tensor<B, 5>> = None;
    for s in 1..=step {
        let term = e.clone().narrow(4, s - 1, 1) * per_group(value.clone().narrow(2, s * len, len));
        out = Some(match out {
            Some(o) => o + term,
            None => term,
        });
    }
    let rows = |t: Tensor<B, 5>, w: usize| -> Tensor<B, 4> {
        t.reshape([batch, kv_heads, group * len, w])
    };
    let later = Partial {
        max: rows(max, 1),
        sum: rows(sum, 1),
        out: rows(out.expect("step >= 1"), d),
    };
    let (out, lse) = causal.merge(later);
    (
        (out * active).reshape([batch, heads, len, d]),
        lse.reshape([batch, heads, len, 1]),
    )
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
    /// The softmax scale `head_dim^-1/2`.
    pub fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

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

    /// Attends `query` over `key`/`value` as `visibility` describes (the seam, at this
    /// layer's scale).
    pub fn attend(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        value: Tensor<B, 4>,
        visibility: &Visibility<B>,
    ) -> Tensor<B, 4> {
        attention(query, key, value, visibility, self.scale())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn tensor(seed: u64, shape: [usize; 4]) -> Tensor<B, 4> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(values(seed, n), shape), &Default::default())
    }

    fn ints<const D: usize>(v: Vec<i64>, shape: [usize; D]) -> Tensor<B, D, Int> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// The described path against attention under the dense mask the description stands for.
    fn assert_matches_dense(
        visibility: &Visibility<B>,
        q: [usize; 4],
        kv_heads: usize,
        k_len: usize,
        seed: u64,
    ) {
        let [batch, _, q_len, d] = q;
        let query = tensor(seed, q);
        let key = tensor(seed + 1, [batch, kv_heads, k_len, d]);
        let value = tensor(seed + 2, [batch, kv_heads, k_len, d]);
        let mask = visibility.dense_mask(batch, q_len, k_len, &Default::default());
        let want = dense_attention(query.clone(), key.clone(), value.clone(), Some(mask), 0.3);
        let got = attention(query, key, value, visibility, 0.3);
        let (got, want) = (
            got.into_data().into_vec::<f32>().unwrap(),
            want.into_data().into_vec::<f32>().unwrap(),
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{visibility:?}: worst |diff| {worst:.2e}");
    }

    #[test]
    fn block_attention_equals_the_dense_masked_path() {
        // (batch, heads, kv_heads, context, blocks, block size, window)
        type Case = (usize, usize, usize, usize, usize, usize, Option<usize>);
        let cases: [Case; 5] = [
            (1, 2, 1, 6, 2, 3, None),
            (2, 4, 2, 11, 3, 4, None),
            (2, 4, 4, 9, 4, 2, Some(3)),
            (1, 6, 2, 20, 3, 5, Some(7)),
            (3, 2, 1, 5, 1, 7, Some(1)),
        ];
        for (i, &(batch, heads, kv_heads, ctx, blocks, bs, window)) in cases.iter().enumerate() {
            // Anchors include a dropped block (-1) and an anchor at 0 (no context at all).
            let anchors: Vec<i64> = (0..batch * blocks)
                .map(|j| match j % 4 {
                    0 => -1,
                    1 => 0,
                    _ => ((j * 7) % (ctx + 1)) as i64,
                })
                .collect();
            let visibility = Visibility::Blocks {
                anchors: ints(anchors, [batch, blocks]),
                block_size: bs,
                context_len: ctx,
                window,
            };
            let slots = blocks * bs;
            assert_matches_dense(
                &visibility,
                [batch, heads, slots, 8],
                kv_heads,
                ctx + slots,
                10 * i as u64,
            );
        }
    }

    #[test]
    fn ttt_attention_equals_the_dense_masked_path() {
        for (i, &(batch, heads, kv_heads, len, step)) in [
            (1, 2, 1, 5, 0),
            (2, 4, 2, 7, 1),
            (3, 4, 1, 6, 3),
            (2, 2, 2, 4, 6),
        ]
        .iter()
        .enumerate()
        {
            // Rows shorter than the step leave every query of theirs empty.
            let lens: Vec<i64> = (0..batch).map(|b| (len - b * 2) as i64).collect();
            let visibility = Visibility::Ttt {
                lens: ints(lens, [batch]),
                len,
                step,
            };
            assert_matches_dense(
                &visibility,
                [batch, heads, len, 4],
                kv_heads,
                (step + 1) * len,
                100 + i as u64,
            );
        }
    }

    #[test]
    fn empty_rows_attend_to_nothing() {
        let visibility = Visibility::Blocks {
            anchors: ints(vec![-1], [1, 1]),
            block_size: 3,
            context_len: 4,
            window: None,
        };
        let out = attention(
            tensor(1, [1, 2, 3, 4]),
            tensor(2, [1, 1, 7, 4]),
            tensor(3, [1, 1, 7, 4]),
            &visibility,
            0.5,
        );
        assert!(out
            .into_data()
            .into_vec::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }
}
