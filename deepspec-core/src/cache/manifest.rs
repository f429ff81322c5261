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
    /// When set, a shard also closes before every prompt index that is a multiple of this
    /// (a multiple of `batch_size`), so `prepare --shard i/n` parts, whose boundaries fall on
    /// such indices, write exactly the shards a single run writes. Absent: shards close by
    /// size only (and the job cannot be sharded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_prompts: Option<u64>,
}

/// That a cache is part `index` of `count` of a sharded `prepare` job: it answers the prompts
/// `[source_start, source_end)` of the job's list (see [`part_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOf {
    pub index: u64,
    pub count: u64,
    pub source_start: u64,
    pub source_end: u64,
}

impl std::fmt::Display for PartOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "part {}/{} (prompts [{}, {}))",
            self.index, self.count, self.source_start, self.source_end
        )
    }
}

/// The prompts `[start, end)` of part `index` of `count` of a job of `num_prompts` prompts
/// whose shards close at multiples of `shard_prompts`: the list is cut into blocks of
/// `shard_prompts` prompts (the last one may be shorter) and part `index` takes blocks
/// `[index·B/count, (index+1)·B/count)` of the `B` blocks, so the parts are contiguous, cover
/// every prompt once, and depend only on these four numbers. A part may be empty when there
/// are fewer blocks than parts.
pub fn part_range(num_prompts: u64, shard_prompts: u64, index: u64, count: u64) -> (u64, u64) {
    assert!(shard_prompts > 0 && count > 0 && index < count);
    let blocks = num_prompts.div_ceil(shard_prompts) as u128;
    let edge = |i: u64| {
        let block = (i as u128 * blocks / count as u128) as u64;
        (block * shard_prompts).min(num_prompts)
    };
    (edge(index), edge(index + 1))
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
    /// Present on the output of `prepare --shard i/n`: which part of the job this is (its
    /// shards are numbered from 0 within the part). `deepspec cache merge` joins the parts
    /// into a cache without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartOf>,
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
        // A part is never a whole cache, however finished (see `part_finished`).
        self.complete = self.part.is_none() && self.prompts_covered() == self.job.num_prompts;
    }

    /// The first prompt this cache answers: 0, or a part's `source_start`.
    pub fn first_prompt(&self) -> u64 {
        self.part.map_or(0, |p| p.source_start)
    }

    /// The prompt after the last one this cache is meant to answer: the job's `num_prompts`,
    /// or a part's `source_end`.
    pub fn end_prompt(&self) -> u64 {
        self.part.map_or(self.job.num_prompts, |p| p.source_end)
    }

    /// True for a part whose shards answer its whole range.
    pub fn part_finished(&self) -> bool {
        self.part.is_some() && self.prompts_covered() == self.end_prompt()
    }

    /// Where the shards' answers end, counting only the contiguous run from
    /// [`Manifest::first_prompt`] (prompt 0 for a whole cache).
    pub fn prompts_covered(&self) -> u64 {
        let mut next = self.first_prompt();
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

    /// Refuses to add to this cache with a different target, tokenizer, layer set, storage,
    /// job or part: the error names the first field that differs.
    pub fn check_same_job(&self, dir: &Path, other: &Manifest) -> Result<(), CacheError> {
        let path = Self::path(dir);
        let difference = self.job_difference(other).or_else(|| {
            let describe = |p: &Option<PartOf>| match p {
                None => "no part (a whole job)".to_string(),
                Some(p) => p.to_string(),
            };
            (self.part != other.part)
                .then(|| ("part".into(), describe(&self.part), describe(&other.part)))
        });
        match difference {
            None => Ok(()),
            Some((field, ours, theirs)) => Err(CacheError::field(
                &path,
                field,
                format!(
                    "the cache was made with {ours}, this run uses {theirs}; refusing to mix them (use a new --out folder)"
                ),
            )),
        }
    }

    /// The first field that decides the content and differs between the two manifests
    /// (target, tokenizer, layers, storage, import, job settings; not the part, the shards or
    /// the totals), as (field, this manifest's value, the other's value).
    pub fn job_difference(&self, other: &Manifest) -> Option<(String, String, String)> {
        let differs =
            |field: &str, ours: String, theirs: String| Some((field.to_string(), ours, theirs));
        if self.target.sha256 != other.target.sha256 {
            return differs(
                "target.sha256",
                format!(
                    "target {} ({:?})",
                    self.target.name_or_path, self.target.sha256
                ),
                format!(
                    "target {} ({:?})",
                    other.target.name_or_path, other.target.sha256
                ),
            );
        }
        if self.tokenizer_sha256 != other.tokenizer_sha256 {
            return differs(
                "tokenizer_sha256",
                format!("tokenizer {:?}", self.tokenizer_sha256),
                format!("tokenizer {:?}", other.tokenizer_sha256),
            );
        }
        if self.target_layer_ids != other.target_layer_ids {
            return differs(
                "target_layer_ids",
                format!("layers {:?}", self.target_layer_ids),
                format!("layers {:?}", other.target_layer_ids),
            );
        }
        if self.hidden_dtype != other.hidden_dtype {
            return differs(
                "hidden_dtype",
                self.hidden_dtype.name().into(),
                other.hidden_dtype.name().into(),
            );
        }
        if self.hidden_size != other.hidden_size {
            return differs(
                "hidden_size",
                format!("hidden size {}", self.hidden_size),
                format!("hidden size {}", other.hidden_size),
            );
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
            return differs("import", describe(&self.import), describe(&other.import));
        }
        if self.job != other.job {
            let ours = serde_json::to_value(&self.job).expect("job serializes");
            let theirs = serde_json::to_value(&other.job).expect("job serializes");
            let null = serde_json::Value::Null;
            let key = ours
                .as_object()
                .into_iter()
                .chain(theirs.as_object())
                .flat_map(|o| o.keys())
                .find(|k| {
                    ours.get(k.as_str()).unwrap_or(&null) != theirs.get(k.as_str()).unwrap_or(&null)
                })
                .cloned()
                .unwrap_or_default();
            let value = |v: &serde_json::Value| v.get(key.as_str()).unwrap_or(&null).to_string();
            return differs(
                &format!("job.{key}"),
                format!("{key} = {}", value(&ours)),
                format!("{key} = {}", value(&theirs)),
            );
        }
        None
    }
}

/// `shard-00012.parquet`
pub fn shard_file_name(k: u64) -> String {
    format!("shard-{k:05}.parquet")
}

#[cfg(test)]
mod tests {
    use super::part_range;

    /// Parts are contiguous, cover every prompt once, start at block multiples, and depend
    /// only on (prompts, block, index, count).
    #[test]
    fn part_ranges_tile_the_list_at_block_boundaries() {
        for prompts in [0u64, 1, 5, 9, 24, 25, 1000] {
            for block in [1u64, 3, 9, 64] {
                for count in 1..=9u64 {
                    let mut next = 0;
                    for index in 0..count {
                        let (s, e) = part_range(prompts, block, index, count);
                        assert_eq!(s, next, "{prompts} {block} {index}/{count}");
                        assert!(s <= e);
                        assert!(s.is_multiple_of(block) || s == prompts);
                        next = e;
                    }
                    assert_eq!(next, prompts);
                }
            }
        }
        assert_eq!(part_range(24, 9, 0, 3), (0, 9));
        assert_eq!(part_range(24, 9, 1, 3), (9, 18));
        assert_eq!(part_range(24, 9, 2, 3), (18, 24));
        // More parts than blocks: some parts are empty.
        assert_eq!(part_range(6, 3, 0, 3), (0, 0));
        assert_eq!(part_range(6, 3, 1, 3), (0, 3));
        assert_eq!(part_range(6, 3, 2, 3), (3, 6));
    }
}
