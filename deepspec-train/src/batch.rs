//! A collated training batch on the host: what the reference's collator hands `run_batch`.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::io::HostTensor;
use deepspec_core::LoadError;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// `[b][L]` token ids, right-padded with 0.
    pub input_ids: Vec<Vec<i64>>,
    /// `[b][L]` 1 where the token is a training target.
    pub loss_mask: Vec<Vec<u8>>,
    /// Real (unpadded) length of each row.
    pub lens: Vec<usize>,
    /// `[b, L, n_t*H]` tapped target layers, concatenated in `target_layer_ids` order.
    pub target_hidden: HostTensor,
    /// `[b, L, H]` the target's final normed hidden state.
    pub target_last_hidden: HostTensor,
}

/// A batch's cached target hidden states on the device.
pub struct Features<B: Backend> {
    /// `[b, L, n_t*H]`
    pub target_hidden: Tensor<B, 3>,
    /// `[b, L, H]`
    pub target_last_hidden: Tensor<B, 3>,
}

fn upload<B: Backend>(host: &mut HostTensor, device: &B::Device) -> Tensor<B, 3> {
    let shape: [usize; 3] = host.shape.clone().try_into().expect("rank-3 hidden states");
    Tensor::from_data(
        TensorData::new(std::mem::take(&mut host.data), shape),
        device,
    )
}

impl TrainBatch {
    /// Moves the hidden states onto `device`; the host copies are handed over, not cloned
    /// (the batch keeps its token ids, masks and lengths).
    pub fn upload<B: Backend>(&mut self, device: &B::Device) -> Features<B> {
        Features {
            target_hidden: upload(&mut self.target_hidden, device),
            target_last_hidden: upload(&mut self.target_last_hidden, device),
        }
    }

    pub fn batch(&self) -> usize {
        self.input_ids.len()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Reads a collated batch stored as safetensors (`input_ids`, `loss_mask`,
    /// `attention_mask`, `target_hidden_states`, `target_last_hidden_states`).
    pub fn from_safetensors(path: &Path) -> Result<Self, LoadError> {
        let file = SafetensorsFile::open(path)?;
        let (shape, ids) = file.i64("input_ids")?;
        let (_, mask) = file.i64("loss_mask")?;
        let (_, attention) = file.i64("attention_mask")?;
        let (batch, len) = (shape[0], shape[1]);
        let rows = |v: &[i64]| -> Vec<Vec<i64>> { v.chunks(len).map(<[i64]>::to_vec).collect() };
        Ok(TrainBatch {
            input_ids: rows(&ids),
            loss_mask: rows(&mask)
                .into_iter()
                .map(|r| r.into_iter().map(|m| m as u8).collect())
                .collect(),
            lens: (0..batch)
                .map(|b| {
                    attention[b * len..(b + 1) * len]
                        .iter()
                        .filter(|&&m| m != 0)
                        .count()
                })
                .collect(),
            target_hidden: file.f32("target_hidden_states")?,
            target_last_hidden: file.f32("target_last_hidden_states")?,
        })
    }
}
