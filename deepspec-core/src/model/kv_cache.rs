//! The target's KV cache. Rows of a batch may hold different lengths: every cached key keeps
//! its position (or -1 once rolled back), and visibility is decided by position, so rows
//! append and roll back independently without moving tensors around.

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};

/// Keys and values of one layer: `[batch, kv_heads, slots, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> LayerCache<B> {
    /// Appends this step's keys/values and returns the whole cache.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.kv.take() {
            Some((ck, cv)) => (Tensor::cat(vec![ck, k], 2), Tensor::cat(vec![cv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }

    fn keep_slots(&mut self, slots: usize) {
        if let Some((k, v)) = self.kv.take() {
            if slots > 0 {
                self.kv = Some((k.narrow(2, 0, slots), v.narrow(2, 0, slots)));
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
    /// `slot_positions[b][slot]`: the position of the key in that slot, -1 if none.
    slot_positions: Vec<Vec<i64>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| LayerCache { kv: None }).collect(),
            slot_positions: vec![Vec::new(); batch],
        }
    }

    pub fn batch(&self) -> usize {
        self.slot_positions.len()
    }

    /// Number of tokens cached for row `b` (its next position).
    pub fn len(&self, b: usize) -> usize {
        self.slot_positions[b].iter().filter(|&&p| p >= 0).count()
    }

    pub fn is_empty(&self) -> bool {
        (0..self.batch()).all(|b| self.len(b) == 0)
    }

    /// Registers the positions of a step about to be appended (`-1` for padding) and returns
    /// the visibility mask `[batch, 1, step, slots_after]` for it: a query sees every cached
    /// or new key whose position is at most its own.
    pub fn begin_step(
        &mut self,
        step_positions: &[Vec<i64>],
        device: &B::Device,
    ) -> Tensor<B, 4, Bool> {
        assert_eq!(step_positions.len(), self.batch(), "step batch size");
        let step = step_positions.first().map_or(0, Vec::len);
        for (row, new) in self.slot_positions.iter_mut().zip(step_positions) {
            assert_eq!(new.len(), step, "ragged step positions");
            row.extend_from_slice(new);
        }
        let slots = self.slot_positions[0].len();
        let mut visible = Vec::with_capacity(self.batch() * step * slots);
        for (row, new) in self.slot_positions.iter().zip(step_positions) {
            for &q in new {
                visible.extend(row.iter().map(|&k| q >= 0 && k >= 0 && k <= q));
            }
        }
        Tensor::from_data(
            TensorData::new(visible, [self.batch(), 1, step, slots]),
            device,
        )
    }

    /// Forgets every key of row `b` at position `len` or later.
    pub fn truncate(&mut self, b: usize, len: usize) {
        for p in self.slot_positions[b].iter_mut() {
            if *p >= len as i64 {
                *p = -1;
            }
        }
        self.compact();
    }

    /// Drops trailing slots that no row uses any more.
    fn compact(&mut self) {
        let used = self
            .slot_positions
            .iter()
            .map(|row| row.iter().rposition(|&p| p >= 0).map_or(0, |i| i + 1))
            .max()
            .unwrap_or(0);
        let slots = self.slot_positions.first().map_or(0, Vec::len);
        if used < slots {
            for row in self.slot_positions.iter_mut() {
                row.truncate(used);
            }
            for layer in self.layers.iter_mut() {
                layer.keep_slots(used);
            }
        }
    }
}
