//! `manifest.json`: what a cache holds, what made it, and which shards are finished.
//!
//! The manifest is rewritten atomically (temporary file, fsync, rename) after every finished
//! shard, so after a crash it lists exactly the shards that are whole. It carries no
//! timestamps or timings: the same job gives the same bytes.

use super::schema::HiddenDtype;
use super::CacheError;
use crate::io::atomic::write_atomically;
use crate::io::file_name::check_plain_file_name;
use crate::layers::TargetLayerIds;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "deepspec-cache";
pub const FORMAT_VERSION: u32 = 1;

/// Which target produced the hidden states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetIdentity {
    /// The recipe's `target_model_name_or_path`, as written there.
    pub name_or_path: String,
    /// SHA-256 of the weight files (a GGUF file, or `config.json` + `*.safetensors` in name
    /// order); `None` for imported caches, whose source records no hash.
    pub sha256: Option<String>,
    pub num_layers: Option<usize>,
    pub vocab_size: Option<usize>,
}

/// The settings that decide a cache's content besides the target (a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    /// `prompts:<file>`, `self-instruct:<n>` or `import:<dir>`.
    pub source: String,
    /// SHA-256 of the prompt list the job answers (`prompts.jsonl` in the cache folder).
    pub prompts_sha256: Option<String>,
    pub num_prompts: u64,
    pub chat_template: Option<String>,
    pub max_length: usize,
    pub min_loss_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub stop_tokens: Vec<String>,
    pub enable_thinking: bool,
    pub seed: u64,
    /// Prompts per generation and target-pass batch; shards break only between batches.
    pub batch_size: usize,
    /// A shard is closed before the next batch would push its payload past this, so shard
    /// boundaries depend only on the (deterministic) samples, never on interruptions.
    pub shard_max_bytes: u64,
}

/// One finished shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file_name: String,
    pub shard_id: u64,
    /// The prompts this shard answers: `[source_start, source_end)`.
    pub source_start: u64,
    pub source_end: u64,
    /// Cache index of the shard's first sample (samples are dense over all shards).
    pub first_sample: u64,
    pub num_samples: u64,
    pub num_tokens: u64,
    pub num_loss_tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// True once the shards cover every prompt of the job.
    pub complete: bool,
    pub target: TargetIdentity,
    /// SHA-256 of the tokenizer's serialized JSON.
    pub tokenizer_sha256: Option<String>,
    /// Shape-checked when read; against `target.num_layers` too when the target is known.
    pub target_layer_ids: TargetLayerIds,
    pub hidden_size: usize,
    pub hidden_dtype: HiddenDtype,
    pub token_dtype: String,
    pub job: JobSettings,
    pub num_samples: u64,
    pub num_tokens: u64,
    pub num_loss_tokens: u64,
    pub shards: Vec<ShardEntry>,
    /// Where an imported cache's hidden states came from; absent for `prepare`'s caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportSource>,
}

/// The provenance of a cache imported from a serving engine's hidden-state dumps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSource {
    /// `vllm`.
    pub engine: String,
    /// The layer ids the engine was asked to capture, in its numbering (vLLM: id `k` is the
    /// residual stream after `k` decoder layers), in the dump's (ascending) slot order.
    pub dump_layer_ids: Vec<usize>,
    /// For each of `target_layer_ids`, the dump slot it was read from.
    pub tap_slots: Vec<usize>,
    /// The dump slot the final hidden state was read from.
    pub last_slot: usize,
    /// `pre-norm` (vLLM: the target's final norm is applied on import) or `post-norm`.
    pub last_hidden: String,
    /// Every dump file, in sample order.
    pub files: Vec<ImportedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedFile {
    pub file_name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads `dir/manifest.json` and checks its header fields and that every shard is a plain
    /// file name in `dir`.
    pub fn load(dir: &Path) -> Result<Self, CacheError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| CacheError::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CacheError::field(&path, "(manifest)", format!("not valid JSON: {e}")))?;
        if value.get("format").is_none() && value.get("index_record_size").is_some() {
            return Err(CacheError::field(
                &path,
                "format",
                "is missing: this is a reference DeepSpec cache (binary shards + samples.idx); convert it with `deepspec cache import-deepspec SRC DST`",
            ));
        }
        // Read first on its own so a bad id names the field rather than "(manifest)".
        let layers: TargetLayerIds = serde_json::from_value(value["target_layer_ids"].clone())
            .map_err(|e| CacheError::field(&path, "target_layer_ids", e.to_string()))?;
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| {
            CacheError::field(
                &path,
                "(manifest)",
                format!("not a deepspec cache manifest: {e}"),
            )
        })?;
        if manifest.format != FORMAT_NAME {
            return Err(CacheError::field(
                &path,
                "format",
                format!(
                    "is `{}`, expected `{FORMAT_NAME}` (a reference-format cache? convert it with `deepspec cache import-deepspec`)",
                    manifest.format
                ),
            ));
        }
        if manifest.version != FORMAT_VERSION {
            return Err(CacheError::field(
                &path,
                "version",
                format!(
                    "is {}, this deepspec reads version {FORMAT_VERSION}",
                    manifest.version
                ),
            ));
        }
        for (k, shard) in manifest.shards.iter().enumerate() {
            check_plain_file_name(&shard.file_name).map_err(|e| {
                CacheError::field(
                    &path,
                    format!("shards[{k}].file_name"),
                    format!("{e}; a manifest may only name shards in the cache folder (fix the entry or rebuild the cache)"),
                )
            })?;
        }
        if let Some(n) = manifest.target.num_layers {
            layers.check(n).map_err(|e| {
                CacheError::field(
                    &path,
                    "target_layer_ids",
                    format!("{e} (target.num_layers = {n})"),
                )
            })?;
        }
        Ok(manifest)
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn store(&self, dir: &Path) -> Result<(), CacheError> {
        let mut text = serde_json::to_string_pretty(self).expect("manifest serializes");
        text.push('\n');
        Ok(write_atomically(&Self::path(dir), text.as_bytes())?)
    }

    /// Recomputes the totals, the dense sample numbering and `complete` from the shard list.
    pub fn recount(&mut self) {
        self.shards.sort_by_key(|s| s.shard_id);
        let mut next = 0;
        for shard in &mut self.shards {
            shard.first_sample = next;
            next += shard.num_samples;
        }
        self.num_samples = next;
        self.num_tokens = self.shards.iter().map(|s| s.num_tokens).sum();
        self.num_loss_tokens = self.shards.iter().map(|s| s.num_loss_tokens).sum();
        self.complete = self.prompts_covered() == self.job.num_prompts;
    }

    /// How many prompts the shards answer, counting only the contiguous run from prompt 0.
    pub fn prompts_covered(&self) -> u64 {
        let mut next = 0;
        for shard in &self.shards {
            if shard.source_start != next {
                break;
            }
            next = shard.source_end;
        }
        next
    }

    pub fn num_layers(&self) -> usize {
        self.target_layer_ids.len()
    }

    /// Refuses to add to this cache with a different target, tokenizer, layer set, storage
    /// or job: the error names the first field that differs.
    pub fn check_same_job(&self, dir: &Path, other: &Manifest) -> Result<(), CacheError> {
        let path = Self::path(dir);
        let differs = |field: &str, ours: String, theirs: String| {
            CacheError::field(
                &path,
                field,
                format!(
                    "the cache was made with {ours}, this run uses {theirs}; refusing to mix them (use a new --out folder)"
                ),
            )
        };
        if self.target.sha256 != other.target.sha256 {
            return Err(differs(
                "target.sha256",
                format!(
                    "target {} ({:?})",
                    self.target.name_or_path, self.target.sha256
                ),
                format!(
                    "target {} ({:?})",
                    other.target.name_or_path, other.target.sha256
                ),
            ));
        }
        if self.tokenizer_sha256 != other.tokenizer_sha256 {
            return Err(differs(
                "tokenizer_sha256",
                format!("tokenizer {:?}", self.tokenizer_sha256),
                format!("tokenizer {:?}", other.tokenizer_sha256),
            ));
        }
        if self.target_layer_ids != other.target_layer_ids {
            return Err(differs(
                "target_layer_ids",
                format!("layers {:?}", self.target_layer_ids),
                format!("layers {:?}", other.target_layer_ids),
            ));
        }
        if self.hidden_dtype != other.hidden_dtype {
            return Err(differs(
                "hidden_dtype",
                self.hidden_dtype.name().into(),
                other.hidden_dtype.name().into(),
            ));
        }
        if self.import != other.import {
            let describe = |i: &Option<ImportSource>| match i {
                None => "no import".to_string(),
                Some(i) => format!(
                    "{} dumps {:?} (slots {:?}, last {}), {} files",
                    i.engine,
                    i.dump_layer_ids,
                    i.tap_slots,
                    i.last_slot,
                    i.files.len()
                ),
            };
            return Err(differs(
                "import",
                describe(&self.import),
                describe(&other.import),
            ));
        }
        if self.job != other.job {
            let ours = serde_json::to_value(&self.job).expect("job serializes");
            let theirs = serde_json::to_value(&other.job).expect("job serializes");
            let key = ours
                .as_object()
                .and_then(|o| o.keys().find(|k| ours[k.as_str()] != theirs[k.as_str()]))
                .cloned()
                .unwrap_or_default();
            return Err(differs(
                &format!("job.{key}"),
                format!("{key} = {}", ours[key.as_str()]),
                format!("{key} = {}", theirs[key.as_str()]),
            ));
        }
        Ok(())
    }
}

/// `shard-00012.parquet`
pub fn shard_file_name(k: u64) -> String {
    format!("shard-{k:05}.parquet")
}
