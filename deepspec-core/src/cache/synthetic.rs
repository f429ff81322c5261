//! A synthetic DeepSeek-V4-shaped target and cache, for tests and CPU demos where no V4
//! target can run: a target folder holding only what the trainer reads (`config.json`,
//! `embed.weight`, `head.weight`) and a finished cache whose features have V4's shape.
//!
//! **Feature semantics.** A V4 tap is what SGLang's DSpark capture returns: the mean over the
//! `hc_mult` mHC residual streams of that layer's completed output, one `[T, D]` vector per
//! tapped layer, concatenated in `target_layer_ids` order. Here each tap's streams are
//! made up as `S_j[t] = α_j · embed[x_t] + β_j · embed[x_{t+1}] + noise` (a layer that
//! already "knows" the next token, as a trained target's late layers do), and the cache
//! stores their mean over `j`. The final hidden state is `head[x_{t+1}]` scaled, so the
//! target's head puts most of its mass on the true next token. Tokens follow a fixed random
//! successor map 80 % of the time, so a drafter can learn something.

use super::manifest::{shard_file_name, FORMAT_NAME, FORMAT_VERSION};
use super::{
    CacheError, CacheSample, EncodedHidden, HiddenDtype, JobSettings, Manifest, ShardEntry,
    ShardLayout, ShardWriter, TargetIdentity,
};
use crate::io::safetensors::{write_tensors, Dtype, NamedTensor};
use crate::layers::TargetLayerIds;
use crate::sampling::Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// A tiny DeepSeek-V4 target folder: `config.json` (`config`, a V4 config) and
/// `model.safetensors` with random bf16 `embed.weight` and `head.weight` `[V, D]`.
pub fn write_v4_target(
    dir: &Path,
    config: &serde_json::Value,
    seed: u64,
) -> Result<(), CacheError> {
    std::fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
    let v = config["vocab_size"].as_u64().unwrap_or(0) as usize;
    let d = config["hidden_size"].as_u64().unwrap_or(0) as usize;
    let mut rng = Rng::new(seed);
    let embed = rng.normal_f32(v * d, 1.0);
    let head = rng.normal_f32(v * d, 1.0 / (d as f64).sqrt());
    let shape = vec![v, d];
    let tensors = [
        NamedTensor {
            name: "embed.weight",
            shape: &shape,
            data: &embed,
        },
        NamedTensor {
            name: "head.weight",
            shape: &shape,
            data: &head,
        },
    ];
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(&dir.join("model.safetensors"), &tensors, Dtype::BF16, &meta)
        .map_err(|e| CacheError::io(dir, std::io::Error::other(e.to_string())))?;
    let text = serde_json::to_string_pretty(config).expect("config serializes") + "\n";
    crate::io::atomic::write_atomically(&dir.join("config.json"), text.as_bytes()).map_err(|e| {
        CacheError::io(
            dir.join("config.json"),
            std::io::Error::other(e.to_string()),
        )
    })
}

/// What [`write_v4_cache`] makes.
#[derive(Debug, Clone)]
pub struct SyntheticCache {
    pub samples: usize,
    pub seq_len: usize,
    /// Tokens at the start of each sample outside the loss (the "prompt").
    pub prompt_len: usize,
    pub target_layer_ids: TargetLayerIds,
    pub hc_mult: usize,
    pub seed: u64,
}

/// Writes a finished cache into `dst` for the V4 target folder `target` (see the module
/// docs for what the features mean).
pub fn write_v4_cache(
    dst: &Path,
    target: &Path,
    spec: &SyntheticCache,
) -> Result<Manifest, CacheError> {
    let crate::io::target_head::TargetHead { embed, head } =
        crate::io::target_head::load_target_head(target)
            .map_err(|e| CacheError::io(target, std::io::Error::other(e.to_string())))?;
    let (v, d) = (embed.shape[0], embed.shape[1]);
    let taps = spec.target_layer_ids.len();
    let mut rng = Rng::new(spec.seed);
    let successor: Vec<u32> = (0..v)
        .map(|_| (rng.uniform() * v as f64) as u32 % v as u32)
        .collect();
    let mixing: Vec<(f32, f32)> = (0..taps * spec.hc_mult)
        .map(|_| (0.5 + rng.uniform() as f32, 0.5 + rng.uniform() as f32))
        .collect();
    std::fs::create_dir_all(dst).map_err(|e| CacheError::io(dst, e))?;
    let layout = ShardLayout {
        hidden_size: d,
        target_layer_ids: spec.target_layer_ids.clone(),
        hidden_dtype: HiddenDtype::Bf16,
    };
    let file_name = shard_file_name(0);
    let mut writer = ShardWriter::create(&dst.join(&file_name), &layout)?;
    for i in 0..spec.samples {
        let mut ids = Vec::with_capacity(spec.seq_len + 1);
        ids.push((rng.uniform() * v as f64) as u32 % v as u32);
        for _ in 0..spec.seq_len {
            let prev = *ids.last().unwrap();
            ids.push(if rng.uniform() < 0.8 {
                successor[prev as usize]
            } else {
                (rng.uniform() * v as f64) as u32 % v as u32
            });
        }
        let mut hidden = Vec::with_capacity(spec.seq_len * taps * d);
        let mut last = Vec::with_capacity(spec.seq_len * d);
        for t in 0..spec.seq_len {
            let (now, next) = (row(&embed.data, d, ids[t]), row(&embed.data, d, ids[t + 1]));
            for tap in 0..taps {
                // The tap is the mean of the layer's streams.
                let mut mean = vec![0.0f32; d];
                for j in 0..spec.hc_mult {
                    let (a, b) = mixing[tap * spec.hc_mult + j];
                    for (c, m) in mean.iter_mut().enumerate() {
                        let noise = (rng.uniform() as f32 - 0.5) * 0.2;
                        *m += (a * now[c] + b * next[c] + noise) / spec.hc_mult as f32;
                    }
                }
                hidden.extend(mean);
            }
            last.extend(row(&head.data, d, ids[t + 1]).iter().map(|x| x * 4.0));
        }
        let loss_mask = (0..spec.seq_len)
            .map(|t| u8::from(t >= spec.prompt_len))
            .collect();
        writer.push(&CacheSample {
            source_index: i as u64,
            input_ids: ids[..spec.seq_len].to_vec(),
            loss_mask,
            hidden: EncodedHidden::encode(&hidden, d, HiddenDtype::Bf16),
            last_hidden: EncodedHidden::encode(&last, d, HiddenDtype::Bf16),
        })?;
    }
    let summary = writer.finish()?;
    let mut manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        complete: true,
        target: TargetIdentity {
            name_or_path: target.display().to_string(),
            sha256: None,
            num_layers: None,
            vocab_size: Some(v),
        },
        tokenizer_sha256: None,
        target_layer_ids: spec.target_layer_ids.clone(),
        hidden_size: d,
        hidden_dtype: HiddenDtype::Bf16,
        token_dtype: "int32".into(),
        job: JobSettings {
            source: format!("synthetic-v4:{}", spec.seed),
            prompts_sha256: None,
            num_prompts: spec.samples as u64,
            chat_template: Some("deepseek-v4".into()),
            max_length: spec.seq_len,
            min_loss_tokens: 0,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 0,
            stop_tokens: Vec::new(),
            enable_thinking: false,
            seed: spec.seed,
            batch_size: 0,
            shard_max_bytes: u64::MAX,
            shard_prompts: None,
        },
        num_samples: 0,
        num_tokens: 0,
        num_loss_tokens: 0,
        shards: vec![ShardEntry {
            file_name,
            shard_id: 0,
            source_start: 0,
            source_end: spec.samples as u64,
            first_sample: 0,
            num_samples: summary.num_samples,
            num_tokens: summary.num_tokens,
            num_loss_tokens: summary.num_loss_tokens,
            bytes: summary.bytes,
            sha256: summary.sha256,
        }],
        import: None,
        part: None,
    };
    manifest.recount();
    manifest.store(dst)?;
    Ok(manifest)
}

/// Row `id` of a row-major `[_, d]` matrix.
fn row(m: &[f32], d: usize, id: u32) -> &[f32] {
    &m[id as usize * d..(id as usize + 1) * d]
}
