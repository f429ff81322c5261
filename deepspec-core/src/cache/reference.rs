//! The reference DeepSpec cache (format version 2: `manifest.json`, `samples.idx` of 56-byte
//! records, raw `shard-XXXXX.bin` files) and its conversion into ours, values bit-equal.

use super::manifest::{
    shard_file_name, JobSettings, Manifest, ShardEntry, TargetIdentity, FORMAT_NAME,
};
use super::schema::{EncodedHidden, HiddenDtype};
use super::writer::{ShardLayout, ShardWriter};
use super::{CacheError, CacheSample};
use crate::io::file_name::join_plain;
use crate::layers::TargetLayerIds;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const INDEX_RECORD_SIZE: usize = 56;

/// One `samples.idx` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRecord {
    pub sample_id: u64,
    pub shard_id: u32,
    pub seq_len: u32,
    pub input_ids_offset: u64,
    pub attention_mask_offset: u64,
    pub loss_mask_offset: u64,
    pub hidden_offset: u64,
    pub last_hidden_offset: u64,
}

impl IndexRecord {
    fn parse(bytes: &[u8]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        IndexRecord {
            sample_id: u64_at(0),
            shard_id: u32_at(8),
            seq_len: u32_at(12),
            input_ids_offset: u64_at(16),
            attention_mask_offset: u64_at(24),
            loss_mask_offset: u64_at(32),
            hidden_offset: u64_at(40),
            last_hidden_offset: u64_at(48),
        }
    }
}

/// A reference-format cache opened for reading.
pub struct ReferenceCache {
    pub dir: PathBuf,
    pub manifest: Value,
    pub hidden_size: usize,
    pub target_layer_ids: TargetLayerIds,
    pub records: Vec<IndexRecord>,
    shard_files: Vec<PathBuf>,
}

impl ReferenceCache {
    /// Opens `dir` with the reference loader's checks (required keys, version 2, dtypes,
    /// record size, contiguous shard ids, index size).
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| CacheError::io(&manifest_path, e))?;
        let manifest: Value = serde_json::from_str(&text).map_err(|e| {
            CacheError::field(&manifest_path, "(manifest)", format!("not valid JSON: {e}"))
        })?;
        let field = |name: &str, detail: String| CacheError::field(&manifest_path, name, detail);
        for key in [
            "version",
            "num_samples",
            "num_shards",
            "target_layer_ids",
            "hidden_dtype",
            "token_dtype",
            "mask_dtype",
            "index_record_size",
            "hidden_size",
            "shards",
        ] {
            if manifest.get(key).is_none() {
                return Err(field(
                    key,
                    "is missing (not a reference cache version 2?)".into(),
                ));
            }
        }
        let expect = |key: &str, want: Value| -> Result<(), CacheError> {
            if manifest[key] != want {
                return Err(field(key, format!("is {}, expected {want}", manifest[key])));
            }
            Ok(())
        };
        expect("version", 2.into())?;
        expect("hidden_dtype", "bfloat16".into())?;
        expect("token_dtype", "int32".into())?;
        expect("mask_dtype", "uint8".into())?;
        expect("index_record_size", (INDEX_RECORD_SIZE as u64).into())?;
        let hidden_size = manifest["hidden_size"]
            .as_u64()
            .filter(|&h| h > 0)
            .ok_or_else(|| field("hidden_size", "must be a positive integer".into()))?
            as usize;
        let target_layer_ids: TargetLayerIds =
            serde_json::from_value(manifest["target_layer_ids"].clone())
                .map_err(|e| field("target_layer_ids", e.to_string()))?;
        let shards = manifest["shards"].as_array().cloned().unwrap_or_default();
        if manifest["num_shards"].as_u64() != Some(shards.len() as u64) {
            return Err(field(
                "num_shards",
                "differs from the length of `shards`".into(),
            ));
        }
        let mut shard_files = Vec::with_capacity(shards.len());
        for (k, shard) in shards.iter().enumerate() {
            if shard["shard_id"].as_u64() != Some(k as u64) {
                return Err(field(
                    &format!("shards[{k}].shard_id"),
                    "shard ids must be contiguous from 0".into(),
                ));
            }
            let name = shard["file_name"]
                .as_str()
                .ok_or_else(|| field(&format!("shards[{k}].file_name"), "is missing".into()))?;
            let path = join_plain(dir, name).map_err(|e| {
                field(
                    &format!("shards[{k}].file_name"),
                    format!("{e}; a reference manifest may only name shards in its own folder"),
                )
            })?;
            if !path.is_file() {
                return Err(CacheError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in manifest.json is missing",
                    ),
                ));
            }
            shard_files.push(path);
        }
        let idx_path = dir.join("samples.idx");
        let idx = std::fs::read(&idx_path).map_err(|e| CacheError::io(&idx_path, e))?;
        let num_samples = manifest["num_samples"].as_u64().unwrap_or(u64::MAX);
        if idx.len() % INDEX_RECORD_SIZE != 0
            || (idx.len() / INDEX_RECORD_SIZE) as u64 != num_samples
        {
            return Err(CacheError::corrupt(
                &idx_path,
                format!(
                    "is {} bytes, expected num_samples ({num_samples}) × {INDEX_RECORD_SIZE}",
                    idx.len()
                ),
            ));
        }
        let records = idx
            .chunks_exact(INDEX_RECORD_SIZE)
            .map(IndexRecord::parse)
            .collect();
        Ok(ReferenceCache {
            dir: dir.to_path_buf(),
            manifest,
            hidden_size,
            target_layer_ids,
            records,
            shard_files,
        })
    }

    /// Sample `i` with the reference reader's checks (id matches, seq_len > 0, arrays inside
    /// the shard). `shard` is the shard file's bytes.
    pub fn sample(&self, i: usize, shard: &[u8]) -> Result<CacheSample, CacheError> {
        let r = self.records[i];
        let path = &self.shard_files[r.shard_id as usize];
        if r.sample_id != i as u64 || r.seq_len == 0 {
            return Err(CacheError::corrupt(
                self.dir.join("samples.idx"),
                format!(
                    "record {i}: sample_id {} / seq_len {} invalid",
                    r.sample_id, r.seq_len
                ),
            ));
        }
        let seq = r.seq_len as usize;
        let n = self.target_layer_ids.len();
        let h = self.hidden_size;
        let slice = |offset: u64, len: usize, what: &str| -> Result<&[u8], CacheError> {
            let start = offset as usize;
            shard.get(start..start + len).ok_or_else(|| {
                CacheError::corrupt(path, format!("sample {i}: `{what}` lies outside the shard"))
            })
        };
        let ids = slice(r.input_ids_offset, 4 * seq, "input_ids")?;
        let mask = slice(r.loss_mask_offset, seq, "loss_mask")?;
        let hidden = slice(r.hidden_offset, 2 * seq * n * h, "target_hidden_states")?;
        let last = slice(
            r.last_hidden_offset,
            2 * seq * h,
            "target_last_hidden_states",
        )?;
        let bf16 = |bytes: &[u8]| {
            EncodedHidden::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            )
        };
        Ok(CacheSample {
            source_index: i as u64,
            input_ids: ids
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect(),
            loss_mask: mask.to_vec(),
            hidden: bf16(hidden),
            last_hidden: bf16(last),
        })
    }

    pub fn shard_file(&self, shard_id: u32) -> &Path {
        &self.shard_files[shard_id as usize]
    }
}

/// Converts the reference cache `src` into a new cache at `dst` (which must not hold one),
/// starting a new shard before one would exceed `shard_max_bytes` of payload.
pub fn import_reference(
    src: &Path,
    dst: &Path,
    shard_max_bytes: u64,
) -> Result<Manifest, CacheError> {
    let reference = ReferenceCache::open(src)?;
    if Manifest::path(dst).exists() {
        return Err(CacheError::io(
            Manifest::path(dst),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the destination already holds a cache; import into a new folder",
            ),
        ));
    }
    std::fs::create_dir_all(dst).map_err(|e| CacheError::io(dst, e))?;
    let layout = ShardLayout {
        hidden_size: reference.hidden_size,
        target_layer_ids: reference.target_layer_ids.clone(),
        hidden_dtype: HiddenDtype::Bf16,
    };
    let per_token =
        HiddenDtype::Bf16.bytes_per_token(layout.hidden_size, layout.target_layer_ids.len()) as u64;
    let m = &reference.manifest;
    let mut manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: super::manifest::FORMAT_VERSION,
        complete: false,
        target: TargetIdentity {
            name_or_path: m["target_model_name_or_path"]
                .as_str()
                .unwrap_or_default()
                .into(),
            sha256: None,
            num_layers: None,
            vocab_size: None,
        },
        tokenizer_sha256: None,
        target_layer_ids: layout.target_layer_ids.clone(),
        hidden_size: layout.hidden_size,
        hidden_dtype: HiddenDtype::Bf16,
        token_dtype: "int32".into(),
        job: JobSettings {
            source: format!("import:{}", src.display()),
            prompts_sha256: None,
            num_prompts: reference.records.len() as u64,
            chat_template: m["chat_template"].as_str().map(str::to_string),
            max_length: m["max_length"].as_u64().unwrap_or(0) as usize,
            min_loss_tokens: m["min_loss_tokens"].as_u64().unwrap_or(0) as usize,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 0,
            stop_tokens: Vec::new(),
            enable_thinking: false,
            seed: 0,
            batch_size: 0,
            shard_max_bytes,
            shard_prompts: None,
        },
        num_samples: 0,
        num_tokens: 0,
        num_loss_tokens: 0,
        shards: Vec::new(),
        import: None,
        part: None,
    };
    // Group samples into shards by payload size, then write them.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current_bytes = 0u64;
    for (i, r) in reference.records.iter().enumerate() {
        let bytes = r.seq_len as u64 * per_token;
        if groups.is_empty() || (current_bytes > 0 && current_bytes + bytes > shard_max_bytes) {
            groups.push(Vec::new());
            current_bytes = 0;
        }
        groups.last_mut().unwrap().push(i);
        current_bytes += bytes;
    }
    let mut loaded: Option<(u32, Vec<u8>)> = None;
    for (k, group) in groups.iter().enumerate() {
        let file_name = shard_file_name(k as u64);
        let mut writer = ShardWriter::create(&dst.join(&file_name), &layout)?;
        for &i in group {
            let shard_id = reference.records[i].shard_id;
            if loaded.as_ref().map(|l| l.0) != Some(shard_id) {
                let path = reference.shard_file(shard_id);
                loaded = Some((
                    shard_id,
                    std::fs::read(path).map_err(|e| CacheError::io(path, e))?,
                ));
            }
            let sample = reference.sample(i, &loaded.as_ref().unwrap().1)?;
            writer.push(&sample)?;
        }
        let summary = writer.finish()?;
        manifest.shards.push(ShardEntry {
            file_name,
            shard_id: k as u64,
            source_start: group[0] as u64,
            source_end: *group.last().unwrap() as u64 + 1,
            first_sample: 0,
            num_samples: summary.num_samples,
            num_tokens: summary.num_tokens,
            num_loss_tokens: summary.num_loss_tokens,
            bytes: summary.bytes,
            sha256: summary.sha256,
        });
        manifest.recount();
        manifest.store(dst)?;
    }
    manifest.recount();
    manifest.store(dst)?;
    Ok(manifest)
}
