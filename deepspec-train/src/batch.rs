//! A collated training batch on the host: what the reference's collator hands `run_batch`.

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

impl TrainBatch {
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
