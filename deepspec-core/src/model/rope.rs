//! Rotary position embeddings, Hugging Face "rotate-half" convention. The cos/sin tables are
//! built on the host for the exact positions of a step (rows may sit at different positions).

use burn::tensor::{backend::Backend, Tensor, TensorData};

#[derive(Debug, Clone)]
pub struct Rope {
    /// `theta^(-2i/d)` for `i < d/2`, computed in f32 as the reference does.
    pub inv_freq: Vec<f32>,
    pub head_dim: usize,
}

impl Rope {
    pub fn new(theta: f64, head_dim: usize) -> Self {
        let base = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { inv_freq, head_dim }
    }

    /// Gemma4's "proportional" RoPE: the first `floor(factor · d / 2)` frequency pairs turn
    /// as [`Rope::new`]'s, the rest not at all (frequency 0). `factor = 1` is `new`.
    pub fn partial(theta: f64, head_dim: usize, factor: f64) -> Self {
        let mut rope = Rope::new(theta, head_dim);
        let rotated = (factor * head_dim as f64 / 2.0).floor() as usize;
        for f in rope.inv_freq.iter_mut().skip(rotated) {
            *f = 0.0;
        }
        rope
    }

    /// cos and sin tables `[batch, 1, seq, head_dim]` for per-row positions
    /// (`positions[b][s]`; negative positions — padding — get position 0).
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<i64>],
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let batch = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let d = self.head_dim;
        let mut cos = Vec::with_capacity(batch * seq * d);
        let mut sin = Vec::with_capacity(batch * seq * d);
        for row in positions {
            assert_eq!(row.len(), seq, "ragged position rows");
            for &p in row {
                let p = p.max(0) as f32;
                for _ in 0..2 {
                    for &f in &self.inv_freq {
                        let angle = p * f;
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
        }
        let shape = [batch, 1, seq, d];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// `x * cos + rotate_half(x) * sin` for `x: [batch, heads, seq, head_dim]`.
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
