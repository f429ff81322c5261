//! The target pass: one forward over each right-padded batch of tokenized samples, capturing
//! the tapped decoder layers and the final hidden state (the reference's
//! `prepare_target_cache.py`), encoded for the cache.

use crate::cache::{CacheSample, EncodedHidden, HiddenDtype};
use crate::io::chat::TokenizedChat;
use crate::model::{LoadedTarget, LogitsFor};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Runs the target over `samples` (one batch; row `b` is prompt `sources[b]`) and returns
/// their cache records. Rows are right-padded with id 0; padding is not stored.
pub fn target_pass<B: Backend>(
    target: &LoadedTarget<B>,
    samples: &[TokenizedChat],
    sources: &[u64],
    layer_ids: &[usize],
    dtype: HiddenDtype,
) -> Vec<CacheSample> {
    let batch = samples.len();
    if batch == 0 {
        return Vec::new();
    }
    let width = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch * width);
    let mut real = Vec::with_capacity(batch);
    for s in samples {
        let len = s.input_ids.len();
        ids.extend(s.input_ids.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0i64, width - len));
        real.push((0..width).map(|i| i < len).collect::<Vec<bool>>());
    }
    let device = target.model.device();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, width]), &device);
    let out = target
        .model
        .forward_padded(&target.rope, ids, &real, layer_ids, LogitsFor::None);
    let host = |t: Tensor<B, 3>| -> Vec<f32> { crate::model::to_host(t).data };
    let hidden_size = target.config.hidden_size;
    // [batch, width, hidden] per tapped layer, and the final state.
    let tapped: Vec<Vec<f32>> = out.tapped.into_iter().map(host).collect();
    let last = host(out.final_hidden);
    samples
        .iter()
        .zip(sources)
        .enumerate()
        .map(|(b, (s, &source))| {
            let len = s.input_ids.len();
            let mut hidden = Vec::with_capacity(len * layer_ids.len() * hidden_size);
            for pos in 0..len {
                let at = (b * width + pos) * hidden_size;
                for layer in &tapped {
                    hidden.extend_from_slice(&layer[at..at + hidden_size]);
                }
            }
            let start = b * width * hidden_size;
            let last_rows = &last[start..start + len * hidden_size];
            CacheSample {
                source_index: source,
                input_ids: s.input_ids.clone(),
                loss_mask: s.loss_mask.clone(),
                hidden: EncodedHidden::encode(&hidden, hidden_size, dtype),
                last_hidden: EncodedHidden::encode(last_rows, hidden_size, dtype),
            }
        })
        .collect()
}
