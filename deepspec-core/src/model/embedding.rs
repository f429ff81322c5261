//! A token embedding table whose key is `<name>.weight`, as in Hugging Face checkpoints.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Int, Tensor};

#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, dim]`
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    pub fn new(weight: Param<Tensor<B, 2>>) -> Self {
        Embedding { weight }
    }

    /// `[d0, d1] -> [d0, d1, dim]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [d0, d1] = ids.dims();
        let dim = self.weight.dims()[1];
        self.weight
            .val()
            .select(0, ids.reshape([d0 * d1]))
            .reshape([d0, d1, dim])
    }

    /// `[n] -> [n, dim]`
    pub fn lookup(&self, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        self.weight.val().select(0, ids)
    }
}
