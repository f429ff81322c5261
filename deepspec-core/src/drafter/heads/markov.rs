//! Sequential heads (`markov_head.*`, the reference's `MarkovHead`): a bias on each block
//! slot's logits from the token before it. Every variant reduces to `bias_k = markov_w2 · f_k`
//! for a rank-r feature `f_k`; the variants differ only in how `f_k` is formed, which is
//! [`MarkovHead::step`] — the one place, for training (teacher-forced) and inference alike.

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

impl<B: Backend> MarkovHead<B> {
    pub fn rank(&self) -> usize {
        self.markov_w1.weight.dims()[1]
    }

    /// `e = W1[prev]`: `prev [b, n, k] -> [b, n, k, r]`.
    pub fn embed_prev(&self, prev: Tensor<B, 3, Int>) -> Tensor<B, 4> {
        let [b, n, k] = prev.dims();
        self.markov_w1
            .lookup(prev.reshape([b * n * k]))
            .reshape([b, n, k, self.rank()])
    }

    /// One slot: the bias feature `f_k` from `e_k [.., s, r]`, the slot's backbone output
    /// `h_k [.., s, H]` and (RNN) the state carried from the slot before (`None`: zeros).
    /// Returns `f_k` and the RNN's next state.
    pub fn step(
        &self,
        e: Tensor<B, 3>,
        h: Tensor<B, 3>,
        state: Option<Tensor<B, 3>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        if let Some(gate) = &self.gate_proj {
            let g = sigmoid(gate.forward(Tensor::cat(vec![h, e.clone()], 2)));
            (g * e, None)
        } else if let Some(joint) = &self.joint_proj {
            let r = self.rank();
            let state = state.unwrap_or_else(|| e.zeros_like());
            let z = joint.forward(Tensor::cat(vec![state.clone(), e, h], 2));
            let gate = sigmoid(z.clone().narrow(2, 0, r));
            let candidate = tanh(z.clone().narrow(2, r, r));
            let output = tanh(z.narrow(2, 2 * r, r));
            let next = gate.clone() * state + (gate.neg() + 1.0) * candidate;
            (output, Some(next))
        } else {
            (e, None)
        }
    }

    /// Whether a slot's feature depends on the slots before it (the RNN variant).
    pub fn is_sequential(&self) -> bool {
        self.joint_proj.is_some()
    }

    /// Teacher-forced features of whole blocks: `e [b, n, k, r]`, `hidden [b, n, k, H]` ->
    /// `f [b, n, k, r]`. Stateless variants take every slot at once; the RNN walks the slots.
    pub fn features(&self, e: Tensor<B, 4>, hidden: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, n, k, r] = e.dims();
        let h = hidden.dims()[3];
        if !self.is_sequential() {
            let (f, _) = self.step(
                e.reshape([b, n * k, r]),
                hidden.reshape([b, n * k, h]),
                None,
            );
            return f.reshape([b, n, k, r]);
        }
        let mut state = None;
        let mut outputs = Vec::with_capacity(k);
        for slot in 0..k {
            let e_k: Tensor<B, 3> = e.clone().narrow(2, slot, 1).reshape([b, n, r]);
            let h_k: Tensor<B, 3> = hidden.clone().narrow(2, slot, 1).reshape([b, n, h]);
            let (f, next) = self.step(e_k, h_k, state);
            state = next;
            outputs.push(f.unsqueeze_dim::<4>(2));
        }
        Tensor::cat(outputs, 2)
    }

    /// The bias on the logits: `markov_w2 · f`, `[.., r] -> [.., V]`.
    pub fn bias<const D: usize>(&self, features: Tensor<B, D>) -> Tensor<B, D> {
        self.markov_w2.forward(features)
    }
}
