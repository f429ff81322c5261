//! Confidence head (`confidence_head.proj`, the reference's `ConfidenceHead`): the logit that
//! a slot is accepted given every earlier slot was.

use crate::model::linear::Linear;
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct ConfidenceHead<B: Backend> {
    /// Linear `H (+ r) -> 1` with bias; `H + r` when it also reads the Markov embedding.
    pub proj: Linear<B>,
}

impl<B: Backend> ConfidenceHead<B> {
    /// `hidden [.., H]` and the previous token's Markov embedding `prev_embedding [.., r]`
    /// (read only when the head was built to use it) -> logits `[..]` (one fewer axis).
    pub fn forward<const D: usize, const DO: usize>(
        &self,
        hidden: Tensor<B, D>,
        prev_embedding: Option<Tensor<B, D>>,
    ) -> Tensor<B, DO> {
        let input = if self.proj.in_features() > hidden.dims()[D - 1] {
            let e = prev_embedding.expect("the confidence head reads the Markov embedding");
            Tensor::cat(vec![hidden, e], D - 1)
        } else {
            hidden
        };
        self.proj.forward(input).squeeze_dim(D - 1)
    }
}
