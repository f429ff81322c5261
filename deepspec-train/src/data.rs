//! Training samples: the source the trainer reads (a prepared cache), collation into
//! right-padded batches, and the seeded epoch order (the reference's stateless sampler in `train.py`).

use crate::batch::TrainBatch;
use deepspec_core::io::HostTensor;
use deepspec_core::sampling::Rng;

/// One cached sample, unpadded.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<i64>,
    pub loss_mask: Vec<u8>,
    /// `[len, n_t*H]` row-major.
    pub target_hidden: Vec<f32>,
    /// `[len, H]` row-major.
    pub target_last_hidden: Vec<f32>,
}

/// Random access to samples (a cache reader).
pub trait SampleSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Feature widths: (`n_t*H`, `H`).
    fn widths(&self) -> (usize, usize);
    fn sample(&self, index: usize) -> anyhow::Result<Sample>;
}

/// The rows of an already padded batch as unpadded samples (a fixture, or a batch held in
/// memory), e.g. the golden `inputs.safetensors`.
impl SampleSource for TrainBatch {
    fn len(&self) -> usize {
        self.batch()
    }
    fn widths(&self) -> (usize, usize) {
        (
            self.target_hidden.shape[2],
            self.target_last_hidden.shape[2],
        )
    }
    fn sample(&self, i: usize) -> anyhow::Result<Sample> {
        let (ctx, h) = self.widths();
        let (len, n) = (self.seq_len(), self.lens[i]);
        Ok(Sample {
            input_ids: self.input_ids[i][..n].to_vec(),
            loss_mask: self.loss_mask[i][..n].to_vec(),
            target_hidden: self.target_hidden.data[i * len * ctx..(i * len + n) * ctx].to_vec(),
            target_last_hidden: self.target_last_hidden.data[i * len * h..(i * len + n) * h]
                .to_vec(),
        })
    }
}

/// Right-pads samples to the longest, truncated to `max_length`.
pub fn collate(samples: &[Sample], widths: (usize, usize), max_length: usize) -> TrainBatch {
    let (ctx, hidden) = widths;
    let len = samples
        .iter()
        .map(|s| s.input_ids.len().min(max_length))
        .max()
        .unwrap_or(0);
    let b = samples.len();
    let mut batch = TrainBatch {
        input_ids: Vec::with_capacity(b),
        loss_mask: Vec::with_capacity(b),
        lens: Vec::with_capacity(b),
        target_hidden: HostTensor::new(vec![b, len, ctx], vec![0.0; b * len * ctx]),
        target_last_hidden: HostTensor::new(vec![b, len, hidden], vec![0.0; b * len * hidden]),
    };
    for (row, s) in samples.iter().enumerate() {
        let n = s.input_ids.len().min(max_length);
        let mut ids = s.input_ids[..n].to_vec();
        ids.resize(len, 0);
        let mut mask = s.loss_mask[..n].to_vec();
        mask.resize(len, 0);
        batch.input_ids.push(ids);
        batch.loss_mask.push(mask);
        batch.lens.push(n);
        batch.target_hidden.data[row * len * ctx..(row * len + n) * ctx]
            .copy_from_slice(&s.target_hidden[..n * ctx]);
        batch.target_last_hidden.data[row * len * hidden..(row * len + n) * hidden]
            .copy_from_slice(&s.target_last_hidden[..n * hidden]);
    }
    batch
}

/// The sample indices of epoch `epoch`: a permutation of `0..len` seeded by `42 + epoch`
/// (the reference's sampler seed, independent of the run's seed), cut to
/// `samples_per_epoch`.
pub fn epoch_order(len: usize, epoch: usize, samples_per_epoch: usize) -> Vec<usize> {
    let mut rng = Rng::new(42 + epoch as u64);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order.truncate(samples_per_epoch);
    order
}

/// The indices of micro-batch `micro` (0-based over the whole run) of size `batch`.
pub fn micro_batch(len: usize, samples_per_epoch: usize, batch: usize, micro: usize) -> Vec<usize> {
    let start = micro * batch;
    (start..start + batch)
        .map(|i| {
            let epoch = i / samples_per_epoch;
            epoch_order(len, epoch, samples_per_epoch)[i % samples_per_epoch]
        })
        .collect()
}

/// A prepared Parquet cache as a sample source.
pub struct CacheSource {
    pub reader: deepspec_core::cache::reader::CacheReader,
}

impl SampleSource for CacheSource {
    fn len(&self) -> usize {
        self.reader.len() as usize
    }

    fn widths(&self) -> (usize, usize) {
        let m = &self.reader.manifest;
        (m.target_layer_ids.len() * m.hidden_size, m.hidden_size)
    }

    fn sample(&self, index: usize) -> anyhow::Result<Sample> {
        let s = self.reader.sample(index as u64)?;
        Ok(Sample {
            input_ids: s.input_ids.iter().map(|&t| t as i64).collect(),
            loss_mask: s.loss_mask.clone(),
            target_hidden: s.hidden.to_f32(),
            target_last_hidden: s.last_hidden.to_f32(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_differ() {
        let a = epoch_order(10, 0, 10);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(10, 1, 10));
        assert_eq!(
            micro_batch(10, 8, 4, 2),
            epoch_order(10, 1, 8)[..4].to_vec()
        );
    }

    #[test]
    fn collate_pads_right_with_zeros() {
        let s = |n: usize| Sample {
            input_ids: (1..=n as i64).collect(),
            loss_mask: vec![1; n],
            target_hidden: vec![1.0; n * 2],
            target_last_hidden: vec![2.0; n],
        };
        let b = collate(&[s(3), s(1)], (2, 1), 16);
        assert_eq!(b.input_ids, vec![vec![1, 2, 3], vec![1, 0, 0]]);
        assert_eq!(b.lens, vec![3, 1]);
        assert_eq!(b.target_hidden.data[6..], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
