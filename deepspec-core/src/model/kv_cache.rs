//! The one KV cache: the target's, the DSpark/DFlash drafter's context and Eagle3's layer.
//!
//! Per layer, keys and values live in a preallocated `[batch, kv_heads, capacity, head_dim]`
//! buffer written in place (`slice_assign`); when a step does not fit, the capacity doubles.
//! Rows of a batch may hold different lengths: every slot keeps the position of the key in
//! it (or -1 once rolled back), and visibility is described by those positions, so rows
//! append and roll back independently without moving tensors around.

use super::attention::Visibility;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// Slots reserved on a layer's first write (before doubling).
const INITIAL_CAPACITY: usize = 64;

#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: keys and values `[batch, kv_heads, capacity, head_dim]`, written up to
    /// `slots()`; `None` until the layer's first write.
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// `slot_positions[b][slot]`: the position of the key in that slot, -1 if none.
    slot_positions: Vec<Vec<i64>>,
    /// Slots of the step being written (`begin_step` .. the layers' appends).
    step_len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            slot_positions: vec![Vec::new(); batch],
            step_len: 0,
        }
    }

    pub fn batch(&self) -> usize {
        self.slot_positions.len()
    }

    /// Slots in use (the longest row, padding and rolled-back slots included).
    pub fn slots(&self) -> usize {
        self.slot_positions.first().map_or(0, Vec::len)
    }

    /// Number of tokens cached for row `b` (its next position).
    pub fn len(&self, b: usize) -> usize {
        self.slot_positions[b].iter().filter(|&&p| p >= 0).count()
    }

    pub fn is_empty(&self) -> bool {
        (0..self.batch()).all(|b| self.len(b) == 0)
    }

    /// Registers the positions of a step about to be appended (`-1` for padding) and
    /// describes what it sees: a query sees every cached or new key whose position is at most
    /// its own.
    pub fn begin_step(&mut self, step_positions: &[Vec<i64>], device: &B::Device) -> Visibility<B> {
        assert_eq!(step_positions.len(), self.batch(), "step batch size");
        let step = step_positions.first().map_or(0, Vec::len);
        for (row, new) in self.slot_positions.iter_mut().zip(step_positions) {
            assert_eq!(new.len(), step, "ragged step positions");
            row.extend_from_slice(new);
        }
        self.step_len = step;
        let ints = |rows: &[Vec<i64>], width: usize| {
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(rows.concat(), [rows.len(), width]),
                device,
            )
        };
        Visibility::Causal {
            query_positions: ints(step_positions, step),
            key_positions: ints(&self.slot_positions, self.slots()),
        }
    }

    /// Writes layer `layer`'s keys/values of the current step `[batch, kv_heads, step, d]`
    /// into its slots and returns every slot's keys/values so far.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        assert_eq!(
            k.dims()[2],
            self.step_len,
            "append: keys of the registered step"
        );
        self.write_and_read(layer, self.slots() - self.step_len, k, v)
    }

    /// Every cached slot of `layer` followed by `k`/`v` `[batch, kv_heads, m, d]`, which are
    /// written past the last slot as scratch: the cache itself does not grow (a DSpark
    /// block's own keys, attended once and never kept).
    pub fn with_scratch(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        self.write_and_read(layer, self.slots(), k, v)
    }

    /// Forgets every key of row `b` at position `len` or later.
    pub fn truncate(&mut self, b: usize, len: usize) {
        for p in self.slot_positions[b].iter_mut() {
            if *p >= len as i64 {
                *p = -1;
            }
        }
        // Trailing slots no row uses any more are free again (the buffers keep their size).
        let used = self
            .slot_positions
            .iter()
            .map(|row| row.iter().rposition(|&p| p >= 0).map_or(0, |i| i + 1))
            .max()
            .unwrap_or(0);
        for row in self.slot_positions.iter_mut() {
            row.truncate(used);
        }
    }

    /// Takes layer `layer`'s buffers, doubled until they hold `end` slots (the first `keep`
    /// slots kept), allocated `[self.batch(), heads, _, d]` like `like` on a first write.
    fn take_with_capacity(
        &mut self,
        layer: usize,
        end: usize,
        keep: usize,
        like: &Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, heads, _, d] = like.dims();
        let batch = self.batch();
        match self.layers[layer].take() {
            Some((ck, cv)) if ck.dims()[2] >= end => (ck, cv),
            old => {
                let mut capacity = old
                    .as_ref()
                    .map_or(INITIAL_CAPACITY, |(ck, _)| ck.dims()[2].max(1));
                while capacity < end {
                    capacity *= 2;
                }
                let device = like.device();
                let grown =
                    || Tensor::<B, 4>::zeros([batch, heads, capacity, d], (&device, like.dtype()));
                let (mut nk, mut nv) = (grown(), grown());
                if let Some((ok, ov)) = old {
                    let kept = ok.dims()[2].min(keep);
                    nk =
                        nk.slice_assign([0..batch, 0..heads, 0..kept, 0..d], ok.narrow(2, 0, kept));
                    nv =
                        nv.slice_assign([0..batch, 0..heads, 0..kept, 0..d], ov.narrow(2, 0, kept));
                }
                (nk, nv)
            }
        }
    }

    /// Writes `k`/`v` at slots `at..`, doubling the buffers until they fit.
    fn write(&mut self, layer: usize, at: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let [batch, heads, m, d] = k.dims();
        let end = at + m;
        let (ck, cv) = self.take_with_capacity(layer, end, at, &k);
        let range = [0..batch, 0..heads, at..end, 0..d];
        self.layers[layer] = Some((ck.slice_assign(range.clone(), k), cv.slice_assign(range, v)));
    }

    /// Replaces row `b` with the one row of `row` (a request prefilled alone joining a running
    /// batch): its keys go to this row's first slots, the other rows are untouched (they gain
    /// empty slots if `row` is longer than every slot in use).
    pub fn load_row(&mut self, b: usize, row: &KvCache<B>) {
        assert_eq!(row.batch(), 1, "load_row takes a one-row cache");
        assert_eq!(row.layers.len(), self.layers.len(), "load_row: layer count");
        let n = row.slots();
        let slots = self.slots().max(n);
        for positions in self.slot_positions.iter_mut() {
            positions.resize(slots, -1);
        }
        for p in self.slot_positions[b].iter_mut() {
            *p = -1;
        }
        self.slot_positions[b][..n].copy_from_slice(&row.slot_positions[0]);
        for layer in 0..self.layers.len() {
            let Some((rk, rv)) = row.layers[layer].as_ref() else {
                continue;
            };
            let (rk, rv) = (rk.clone().narrow(2, 0, n), rv.clone().narrow(2, 0, n));
            let [_, heads, _, d] = rk.dims();
            let kept = self.slots();
            let (ck, cv) = self.take_with_capacity(layer, slots, kept, &rk);
            let range = [b..b + 1, 0..heads, 0..n, 0..d];
            self.layers[layer] = Some((
                ck.slice_assign(range.clone(), rk),
                cv.slice_assign(range, rv),
            ));
        }
    }

    /// Slots that hold no key in any row but lie below a slot in use: rolled-back drafts of a
    /// batch whose rows kept different lengths.
    pub fn dead_slots(&self) -> usize {
        let live = (0..self.batch()).map(|b| self.len(b)).max().unwrap_or(0);
        self.slots() - live
    }

    /// Moves every row's keys to its first slots, in slot order, and frees the rest: the
    /// same keys at the same positions, so attention sees exactly what it saw before.
    pub fn compact(&mut self) {
        let live: Vec<Vec<usize>> = self
            .slot_positions
            .iter()
            .map(|row| (0..row.len()).filter(|&s| row[s] >= 0).collect())
            .collect();
        let width = live.iter().map(Vec::len).max().unwrap_or(0);
        if width == self.slots() {
            return;
        }
        for layer in self.layers.iter_mut() {
            let Some((ck, cv)) = layer.take() else {
                continue;
            };
            let device = ck.device();
            let [batch, heads, capacity, d] = ck.dims();
            let (mut nk, mut nv) = (ck.clone(), cv.clone());
            for (b, slots) in live.iter().enumerate() {
                if slots.is_empty() {
                    continue;
                }
                let index = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(
                        slots.iter().map(|&s| s as i64).collect::<Vec<_>>(),
                        [slots.len()],
                    ),
                    &device,
                );
                let range = [b..b + 1, 0..heads, 0..slots.len(), 0..d];
                let row = |t: &Tensor<B, 4>| t.clone().narrow(0, b, 1).select(2, index.clone());
                nk = nk.slice_assign(range.clone(), row(&ck));
                nv = nv.slice_assign(range, row(&cv));
            }
            debug_assert!(width <= capacity && batch == self.slot_positions.len());
            *layer = Some((nk, nv));
        }
        for (positions, slots) in self.slot_positions.iter_mut().zip(&live) {
            let mut row: Vec<i64> = slots.iter().map(|&s| positions[s]).collect();
            row.resize(width, -1);
            *positions = row;
        }
    }

    /// Writes `k`/`v` at slots `at..` and returns slots `0..` up to the last one written.
    fn write_and_read(
        &mut self,
        layer: usize,
        at: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let end = at + k.dims()[2];
        self.write(layer, at, k, v);
        let (k, v) = self.layers[layer].as_ref().expect("layer written");
        (k.clone().narrow(2, 0, end), v.clone().narrow(2, 0, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn step(cache: &mut KvCache<B>, positions: &[Vec<i64>], value: f32) -> Vec<f32> {
        let device = Default::default();
        let m = positions[0].len();
        cache.begin_step(positions, &device);
        let k = Tensor::<B, 4>::full([positions.len(), 1, m, 2], value, &device);
        let (keys, _) = cache.append(0, k.clone(), k);
        keys.into_data().into_vec::<f32>().unwrap()
    }

    /// Appends past the initial capacity keep every earlier key; rollback frees the tail.
    #[test]
    fn grows_by_doubling_and_keeps_what_was_written() {
        let mut cache = KvCache::<B>::new(1, 1);
        for i in 0..(INITIAL_CAPACITY + 3) {
            let keys = step(&mut cache, &[vec![i as i64]], i as f32);
            assert_eq!(keys.len(), (i + 1) * 2);
            assert!(keys.chunks(2).enumerate().all(|(j, kv)| kv[0] == j as f32));
        }
        let buffer = cache.layers[0].as_ref().unwrap().0.dims()[2];
        assert_eq!(buffer, INITIAL_CAPACITY * 2);
        cache.truncate(0, 10);
        assert_eq!(cache.len(0), 10);
        let keys = step(&mut cache, &[vec![10, 11]], 99.0);
        assert_eq!(keys.len(), 12 * 2);
        assert_eq!(&keys[18..], &[9.0, 9.0, 99.0, 99.0, 99.0, 99.0]);
    }

    /// Compaction keeps each row's keys in order at their positions and drops the holes; a
    /// row loaded from a one-row cache reads back its keys without touching the others.
    #[test]
    fn compact_and_load_row_keep_every_key() {
        let mut cache = KvCache::<B>::new(1, 2);
        step(&mut cache, &[vec![0, 1, 2], vec![0, 1, 2]], 1.0);
        step(&mut cache, &[vec![3, 4, 5], vec![3, 4, 5]], 2.0);
        cache.truncate(0, 4);
        step(&mut cache, &[vec![4, 5], vec![6, 7]], 3.0);
        cache.truncate(1, 7);
        assert_eq!(cache.slots(), 8);
        assert_eq!(cache.dead_slots(), 1);
        cache.compact();
        assert_eq!(
            cache.slot_positions,
            vec![vec![0, 1, 2, 3, 4, 5, -1], vec![0, 1, 2, 3, 4, 5, 6]]
        );
        let read = |cache: &KvCache<B>, b: usize, n: usize| -> Vec<f32> {
            let (keys, _) = cache.layers[0].clone().unwrap();
            let row = keys.narrow(0, b, 1).narrow(2, 0, n).narrow(3, 0, 1);
            row.into_data().into_vec::<f32>().unwrap()
        };
        assert_eq!(read(&cache, 0, 6), vec![1., 1., 1., 2., 3., 3.]);
        assert_eq!(read(&cache, 1, 7), vec![1., 1., 1., 2., 2., 2., 3.]);
        let mut row = KvCache::<B>::new(1, 1);
        step(&mut row, &[vec![0, 1, 2, 3, 4, 5, 6]], 7.0);
        cache.load_row(0, &row);
        assert_eq!(cache.slots(), 7);
        assert_eq!((cache.len(0), cache.len(1)), (7, 7));
        step(&mut cache, &[vec![7], vec![7]], 8.0);
        assert_eq!(read(&cache, 0, 8), vec![7., 7., 7., 7., 7., 7., 7., 8.]);
        assert_eq!(read(&cache, 1, 8), vec![1., 1., 1., 2., 2., 2., 3., 8.]);
        // A longer row widens the cache; the other row's keys stay where they were.
        let mut long = KvCache::<B>::new(1, 1);
        step(&mut long, &[(0..10).collect()], 9.0);
        cache.load_row(0, &long);
        assert_eq!(cache.slots(), 10);
        assert_eq!(
            cache.slot_positions[1],
            vec![0, 1, 2, 3, 4, 5, 6, 7, -1, -1]
        );
        assert_eq!(read(&cache, 1, 8), vec![1., 1., 1., 2., 2., 2., 3., 8.]);
        assert_eq!(read(&cache, 0, 10), vec![9.; 10]);
    }

    /// Rows roll back independently: a row's freed slots read as -1 for visibility.
    #[test]
    fn rows_keep_their_own_lengths() {
        let mut cache = KvCache::<B>::new(1, 2);
        step(&mut cache, &[vec![0, 1, 2], vec![-1, 0, 1]], 1.0);
        cache.truncate(0, 1);
        assert_eq!((cache.len(0), cache.len(1)), (1, 2));
        assert_eq!(cache.slots(), 3);
        let Visibility::Causal { key_positions, .. } =
            cache.begin_step(&[vec![1], vec![2]], &Default::default())
        else {
            panic!("causal")
        };
        assert_eq!(
            key_positions
                .into_data()
                .convert::<i64>()
                .into_vec::<i64>()
                .unwrap(),
            vec![0, -1, -1, 1, -1, 0, 1, 2]
        );
    }
}
