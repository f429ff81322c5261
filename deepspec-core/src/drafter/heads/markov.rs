//! Sequential heads (`markov_head.*`, DEEPSPEC-SPEC §4.3): a bias on each block slot's logits
//! from the token before it. Every variant reduces to `bias_k = markov_w2 · f_k` for a rank-r
//! feature `f_k`, which is what the loss seam consumes (`[out ; f] · [lm_head ; markov_w2]ᵀ`).

use crate::model::embedding::Embedding;
use crate::model::linear::Linear;
use burn::module::Module;
use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::{backend::Backend, Int, Tensor};

#[derive(Module, Debug)]
pub struct MarkovHead<B: Backend> {
    /// `[V, r]`: embedding of the previous token (`e_k`).
    pub markov_w1: Embedding<B>,
    /// Linear `r -> V`, weight `[V, r]`.
    pub markov_w2: Linear<B>,
    /// Gated variant: Linear `H + r -> r` with bias.
    pub gate_proj: Option<Linear<B>>,
    /// RNN variant: Linear `2r + H -> 3r` with bias.
    pub joint_proj: Option<Linear<B>>,
}

/// Per-slot outputs of the head.
pub struct MarkovFeatures<B: Backend> {
    /// `f_k`, `[batch, blocks, slots, r]`: the bias is `markov_w2 · f_k`.
    pub bias_features: Tensor<B, 4>,
    /// `e_k = W1[x_prev]`, `[batch, blocks, slots, r]` (the confidence head's extra input).
    pub prev_embedding: Tensor<B, 4>,
}

impl<B: Backend> MarkovHead<B> {
    pub fn rank(&self) -> usize {
        self.markov_w1.weight.dims()[1]
    }

    /// Features for a whole block at once, teacher-forced: `prev_tokens [b, n, k]` (the token
    /// before each slot), `hidden [b, n, k, H]` (backbone output).
    pub fn features(
        &self,
        prev_tokens: Tensor<B, 3, Int>,
        hidden: Tensor<B, 4>,
    ) -> MarkovFeatures<B> {
        let [b, n, k] = prev_tokens.dims();
        let r = self.rank();
        let e: Tensor<B, 4> = self
            .markov_w1
            .lookup(prev_tokens.reshape([b * n * k]))
            .reshape([b, n, k, r]);
        let bias_features = if let Some(gate) = &self.gate_proj {
            let g = sigmoid(gate.forward(Tensor::cat(vec![hidden, e.clone()], 3)));
            g * e.clone()
        } else if let Some(joint) = &self.joint_proj {
            let mut state: Tensor<B, 3> = Tensor::zeros([b, n, r], &e.device());
            let mut outputs = Vec::with_capacity(k);
            for slot in 0..k {
                let e_k: Tensor<B, 3> = e.clone().narrow(2, slot, 1).reshape([b, n, r]);
                let h_k: Tensor<B, 3> = hidden.clone().narrow(2, slot, 1).squeeze_dim(2);
                let (next, out) = rnn_step(joint, state, e_k, h_k, r);
                state = next;
                outputs.push(out.unsqueeze_dim::<4>(2));
            }
            Tensor::cat(outputs, 2)
        } else {
            e.clone()
        };
        MarkovFeatures {
            bias_features,
            prev_embedding: e,
        }
    }

    /// The bias on the logits: `markov_w2 · f`, `[.., r] -> [.., V]`.
    pub fn bias<const D: usize>(&self, features: Tensor<B, D>) -> Tensor<B, D> {
        self.markov_w2.forward(features)
    }
}

/// One RNN-head step: `z = [s ; e ; h]`, gate/candidate/output chunks of `joint_proj(z)`.
/// Returns the next state and the bias feature `tanh(o~)`.
pub fn rnn_step<B: Backend>(
    joint: &Linear<B>,
    state: Tensor<B, 3>,
    e: Tensor<B, 3>,
    h: Tensor<B, 3>,
    r: usize,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let z = joint.forward(Tensor::cat(vec![state.clone(), e, h], 2));
    let gate = sigmoid(z.clone().narrow(2, 0, r));
    let candidate = tanh(z.clone().narrow(2, r, r));
    let output = tanh(z.narrow(2, 2 * r, r));
    let next = gate.clone() * state + (gate.neg() + 1.0) * candidate;
    (next, output)
}
