//! Confidence head (`confidence_head.proj`, DEEPSPEC-SPEC §4.4): the logit that a slot is
//! accepted given every earlier slot was.

use crate::model::linear::Linear;
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct ConfidenceHead<B: Backend> {
    /// Linear `H (+ r) -> 1` with bias.
    pub proj: Linear<B>,
}

impl<B: Backend> ConfidenceHead<B> {
    /// `hidden [.., H]` and, with Markov features, `prev_embedding [.., r]` -> logits `[..]`
    /// (one fewer axis).
    pub fn forward<const D: usize, const DO: usize>(
        &self,
        hidden: Tensor<B, D>,
        prev_embedding: Option<Tensor<B, D>>,
    ) -> Tensor<B, DO> {
        let input = match prev_embedding {
            Some(e) => Tensor::cat(vec![hidden, e], D - 1),
            None => hidden,
        };
        self.proj.forward(input).squeeze_dim(D - 1)
    }
}
