//! SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`.

use super::linear::Linear;
use burn::module::Module;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// `[batch, seq, hidden] -> [batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
