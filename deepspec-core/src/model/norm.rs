//! RMSNorm as Qwen3 and Llama define it: normalise in f32, then scale by the weight.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(weight: Param<Tensor<B, 1>>, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// Normalises the last axis: `[..., dim] -> [..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = x * (variance + self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze::<D>()
    }
}
