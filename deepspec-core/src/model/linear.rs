//! A bias-optional linear layer that keeps PyTorch's weight layout `[out, in]`, so checkpoint
//! keys and shapes load and save without transposition.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[out_features]`
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(weight: Param<Tensor<B, 2>>, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        Linear { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `[..., in] -> [..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let in_features = dims[D - 1];
        assert_eq!(
            in_features,
            self.in_features(),
            "linear input has {in_features} features, weight expects {}",
            self.in_features()
        );
        let rows = dims[..D - 1].iter().product::<usize>();
        let flat: Tensor<B, 2> = x.reshape([rows, in_features]);
        let mut y = super::small_matmul::matmul_wt(flat, self.weight.val());
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze::<2>();
        }
        let mut out_dims = dims;
        out_dims[D - 1] = self.out_features();
        y.reshape(out_dims)
    }
}
