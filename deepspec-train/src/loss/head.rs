//! "LM head + loss": the one place logits over the vocabulary are formed during training.
//!
//! Each function takes hidden features and head weights and returns per-token losses, so a
//! fused chunked kernel (logits computed tile by tile, never stored whole) can replace the
//! body without touching callers. This CPU/reference body materialises the logits.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{backend::Backend, Int, Tensor};

/// Per-token terms of a block loss.
pub struct TokenLosses<B: Backend> {
    /// `[n]` cross-entropy of the label under the draft distribution.
    pub ce: Tensor<B, 1>,
    /// `[n]` L1 distance `Σ_v |p_draft - p_target|` (twice the total variation).
    pub l1: Tensor<B, 1>,
}

/// Draft logits are `draft_features · draft_headᵀ` (`[n, F]`, `[V, F]`), the target
/// distribution is `softmax(target_hidden · target_headᵀ)` (`[n, H]`, `[V, H]`, no gradient).
pub fn block_token_losses<B: Backend>(
    draft_features: Tensor<B, 2>,
    draft_head: Tensor<B, 2>,
    target_hidden: Tensor<B, 2>,
    target_head: Tensor<B, 2>,
    target_ids: Tensor<B, 1, Int>,
) -> TokenLosses<B> {
    let [n, _] = draft_features.dims();
    let log_p = log_softmax(draft_features.matmul(draft_head.transpose()), 1);
    let ce = log_p
        .clone()
        .gather(1, target_ids.reshape([n, 1]))
        .neg()
        .reshape([n]);
    let p_target = softmax(target_hidden.matmul(target_head.transpose()), 1).detach();
    let l1 = (log_p.exp() - p_target).abs().sum_dim(1).reshape([n]);
    TokenLosses { ce, l1 }
}

/// Soft cross-entropy `-Σ_v p_target(v) · log p_draft(v)` per token, with draft logits
/// `draft_hidden · draft_headᵀ` and `p_target = softmax(target_hidden · target_headᵀ)`
/// (no gradient). Also returns the per-token L1 distance and whether the argmaxes agree.
pub fn soft_token_losses<B: Backend>(
    draft_hidden: Tensor<B, 2>,
    draft_head: Tensor<B, 2>,
    target_hidden: Tensor<B, 2>,
    target_head: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1, burn::tensor::Bool>) {
    let [n, _] = draft_hidden.dims();
    let logits = draft_hidden.matmul(draft_head.transpose());
    let log_p = log_softmax(logits.clone(), 1);
    let target_logits = target_hidden.matmul(target_head.transpose()).detach();
    let p_target = softmax(target_logits.clone(), 1);
    let soft_ce = (p_target.clone() * log_p.clone())
        .sum_dim(1)
        .neg()
        .reshape([n]);
    let l1 = (log_p.exp().detach() - p_target)
        .abs()
        .sum_dim(1)
        .reshape([n]);
    let agree = logits
        .detach()
        .argmax(1)
        .equal(target_logits.argmax(1))
        .reshape([n]);
    (soft_ce, l1, agree)
}
