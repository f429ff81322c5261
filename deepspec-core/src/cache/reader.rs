//! Reading a cache: one sample by index (only its row group is read), whole shards, and
//! `validate`, which checks a cache end to end (manifest, checksums, schema, shapes).

use super::manifest::Manifest;
use super::schema::{self, EncodedHidden, HiddenDtype};
use super::writer::{sha256_file, ShardLayout, SHARD_METADATA_KEY};
use super::{CacheError, CacheSample};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A cache opened for reading. Each shard's footer is parsed once and kept, so reading a
/// sample costs one row group's bytes.
pub struct CacheReader {
    dir: PathBuf,
    pub manifest: Manifest,
    footers: Mutex<HashMap<usize, ArrowReaderMetadata>>,
}

impl CacheReader {
    /// Opens `dir` (its manifest must parse; shards are checked when read).
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        Ok(CacheReader {
            dir: dir.to_path_buf(),
            manifest: Manifest::load(dir)?,
            footers: Mutex::new(HashMap::new()),
        })
    }

    pub fn len(&self) -> u64 {
        self.manifest.num_samples
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layout(&self) -> ShardLayout {
        ShardLayout {
            hidden_size: self.manifest.hidden_size,
            target_layer_ids: self.manifest.target_layer_ids.clone(),
            hidden_dtype: self.manifest.hidden_dtype,
        }
    }

    pub fn shard_path(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// Sample `index` (dense over all shards): reads one row group (and, the first time a
    /// shard is touched, its footer).
    pub fn sample(&self, index: u64) -> Result<CacheSample, CacheError> {
        let k = self
            .manifest
            .shards
            .iter()
            .position(|s| index >= s.first_sample && index < s.first_sample + s.num_samples)
            .ok_or_else(|| {
                CacheError::field(
                    Manifest::path(&self.dir),
                    "num_samples",
                    format!(
                        "sample {index} is out of range (the cache holds {})",
                        self.len()
                    ),
                )
            })?;
        let shard = &self.manifest.shards[k];
        let path = self.shard_path(&shard.file_name);
        let row = (index - shard.first_sample) as usize;
        let file = File::open(&path).map_err(|e| CacheError::io(&path, e))?;
        let footer = {
            let mut footers = self.footers.lock().expect("footer cache lock");
            match footers.get(&k) {
                Some(footer) => footer.clone(),
                None => {
                    let footer = guarded(&path, || {
                        ArrowReaderMetadata::load(&file, ArrowReaderOptions::default())
                    })?
                    .map_err(|e| parquet_err(&path, e))?;
                    footers.insert(k, footer.clone());
                    footer
                }
            }
        };
        let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, footer);
        let mut samples = read_rows(&path, builder, Some(vec![row]), self.manifest.hidden_dtype)?;
        samples
            .pop()
            .ok_or_else(|| CacheError::corrupt(&path, format!("row group {row} is missing")))
    }

    /// Every sample of shard `k` (manifest order).
    pub fn shard_samples(&self, k: usize) -> Result<Vec<CacheSample>, CacheError> {
        let shard = &self.manifest.shards[k];
        read_shard(
            &self.shard_path(&shard.file_name),
            None,
            self.manifest.hidden_dtype,
        )
    }

    /// Sequence length of every sample, reading only the `input_ids` column.
    pub fn seq_lens(&self) -> Result<Vec<usize>, CacheError> {
        let mut lens = Vec::new();
        for shard in &self.manifest.shards {
            let path = self.shard_path(&shard.file_name);
            let builder = open_builder(&path)?;
            let expected = schema::shard_schema(self.manifest.hidden_dtype);
            if builder.schema().fields().get(1) != expected.fields().get(1) {
                return Err(CacheError::corrupt(
                    &path,
                    format!(
                        "column 1 is not `{}` as a list of token ids",
                        schema::INPUT_IDS
                    ),
                ));
            }
            check_column_ranges(&path, builder.metadata())?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), [1]);
            guarded(&path, || -> Result<(), CacheError> {
                let reader = builder
                    .with_projection(mask)
                    .build()
                    .map_err(|e| parquet_err(&path, e))?;
                for batch in reader {
                    let batch =
                        batch.map_err(|e| CacheError::corrupt(&path, format!("arrow: {e}")))?;
                    let list = batch.column(0).as_list::<i32>();
                    lens.extend((0..list.len()).map(|i| list.value_length(i) as usize));
                }
                Ok(())
            })??;
        }
        Ok(lens)
    }
}

fn parquet_err(path: &Path, e: parquet::errors::ParquetError) -> CacheError {
    CacheError::corrupt(path, format!("not a readable Parquet shard: {e}"))
}

/// Runs a parquet call that may panic on a damaged shard (see [`crate::guard`]).
fn guarded<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T, CacheError> {
    crate::guard::decoder(f).map_err(|panic| {
        CacheError::corrupt(
            path,
            format!("the Parquet decoder gave up on this shard ({panic}); the file is damaged, re-run `deepspec prepare`"),
        )
    })
}

fn open_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, CacheError> {
    let file = File::open(path).map_err(|e| CacheError::io(path, e))?;
    guarded(path, || ParquetRecordBatchReaderBuilder::try_new(file))?
        .map_err(|e| parquet_err(path, e))
}

/// Reads the rows of `path` (all, or only the given row groups) as samples.
pub fn read_shard(
    path: &Path,
    row_groups: Option<Vec<usize>>,
    dtype: HiddenDtype,
) -> Result<Vec<CacheSample>, CacheError> {
    read_rows(path, open_builder(path)?, row_groups, dtype)
}

/// Every column chunk the footer describes lies inside the file. The parquet crate asserts
/// this while reading (a panic, not an error), so a damaged footer is caught here first.
fn check_column_ranges(
    path: &Path,
    metadata: &parquet::file::metadata::ParquetMetaData,
) -> Result<(), CacheError> {
    let file_len = std::fs::metadata(path)
        .map_err(|e| CacheError::io(path, e))?
        .len();
    for (g, group) in metadata.row_groups().iter().enumerate() {
        for column in group.columns() {
            let start = column
                .dictionary_page_offset()
                .unwrap_or_else(|| column.data_page_offset());
            let len = column.compressed_size();
            let inside = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l))
                .is_some_and(|end| end <= file_len);
            if !inside {
                return Err(CacheError::corrupt(
                    path,
                    format!(
                        "row group {g}, column `{}`: the footer puts its {len} bytes at offset {start}, outside the file's {file_len} bytes (damaged shard; re-run `deepspec prepare`)",
                        column.column_path()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn read_rows(
    path: &Path,
    mut builder: ParquetRecordBatchReaderBuilder<File>,
    row_groups: Option<Vec<usize>>,
    dtype: HiddenDtype,
) -> Result<Vec<CacheSample>, CacheError> {
    let expected = schema::shard_schema(dtype);
    if builder.schema().fields() != expected.fields() {
        return Err(CacheError::corrupt(
            path,
            format!(
                "columns are {:?}, expected {:?} for {} hidden states",
                builder
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>(),
                expected
                    .fields()
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>(),
                dtype.name()
            ),
        ));
    }
    if let Some(groups) = row_groups {
        let available = builder.metadata().num_row_groups();
        if let Some(bad) = groups.iter().find(|&&g| g >= available) {
            return Err(CacheError::corrupt(
                path,
                format!("row group {bad} requested, the shard has {available}"),
            ));
        }
        builder = builder.with_row_groups(groups);
    }
    check_column_ranges(path, builder.metadata())?;
    guarded(path, || {
        let reader = builder.build().map_err(|e| parquet_err(path, e))?;
        let mut samples = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| CacheError::corrupt(path, format!("arrow: {e}")))?;
            samples.extend(decode_batch(&batch, dtype));
        }
        Ok(samples)
    })?
}

fn decode_batch(batch: &RecordBatch, dtype: HiddenDtype) -> Vec<CacheSample> {
    let column = |name: &str| batch.column_by_name(name).expect("schema checked");
    let source = column(schema::SOURCE_INDEX).as_primitive::<UInt64Type>();
    let ids = column(schema::INPUT_IDS).as_list::<i32>();
    let mask = column(schema::LOSS_MASK).as_list::<i32>();
    let hidden = column(schema::HIDDEN).as_binary::<i32>();
    let last = column(schema::LAST_HIDDEN).as_binary::<i32>();
    let scales = |name: &str, row: usize| -> Vec<f32> {
        column(name)
            .as_list::<i32>()
            .value(row)
            .as_primitive::<Float32Type>()
            .values()
            .to_vec()
    };
    let encoded = |bytes: &[u8], name: &str, row: usize| match dtype {
        HiddenDtype::Bf16 => EncodedHidden::Bf16(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
        ),
        HiddenDtype::Fp8 => EncodedHidden::Fp8 {
            codes: bytes.to_vec(),
            scales: scales(name, row),
        },
    };
    (0..batch.num_rows())
        .map(|row| CacheSample {
            source_index: source.value(row),
            input_ids: ids
                .value(row)
                .as_primitive::<Int32Type>()
                .values()
                .iter()
                .map(|&v| v as u32)
                .collect(),
            loss_mask: {
                let values = mask.value(row);
                let bools = values.as_boolean();
                (0..bools.len()).map(|i| bools.value(i) as u8).collect()
            },
            hidden: encoded(hidden.value(row), schema::HIDDEN_SCALE, row),
            last_hidden: encoded(last.value(row), schema::LAST_HIDDEN_SCALE, row),
        })
        .collect()
}

/// What `validate` found in a whole cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationReport {
    pub num_shards: usize,
    pub num_samples: u64,
    pub num_tokens: u64,
    pub bytes: u64,
}

/// Checks a cache end to end: manifest fields, every shard's size and SHA-256, its Parquet
/// schema and self-description, and every sample's shapes and counts. Fails on an incomplete
/// cache (a run that has not finished).
pub fn validate(dir: &Path) -> Result<ValidationReport, CacheError> {
    let reader = CacheReader::open(dir)?;
    let m = &reader.manifest;
    let manifest_path = Manifest::path(dir);
    let layout = reader.layout();
    if m.hidden_size == 0 {
        return Err(CacheError::field(
            &manifest_path,
            "hidden_size",
            "must be positive",
        ));
    }
    if let Some(part) = m.part {
        return Err(CacheError::field(
            &manifest_path,
            "part",
            format!(
                "this folder is {part} of a sharded `deepspec prepare`, not a whole cache; join all {} parts with `deepspec cache merge PART... --out CACHE` and validate that",
                part.count
            ),
        ));
    }
    if !m.complete || m.prompts_covered() != m.job.num_prompts {
        return Err(CacheError::field(
            &manifest_path,
            "complete",
            format!(
                "the cache is unfinished: its shards answer {} of {} prompts (re-run the same `deepspec prepare` command to finish it)",
                m.prompts_covered(),
                m.job.num_prompts
            ),
        ));
    }
    let mut expected_first = 0;
    let mut bytes = 0;
    for (k, shard) in m.shards.iter().enumerate() {
        let field = |name: &str| format!("shards[{k}].{name}");
        if shard.shard_id != k as u64 {
            return Err(CacheError::field(
                &manifest_path,
                field("shard_id"),
                format!("is {}, expected {k} (ids are dense)", shard.shard_id),
            ));
        }
        if shard.first_sample != expected_first {
            return Err(CacheError::field(
                &manifest_path,
                field("first_sample"),
                format!("is {}, expected {expected_first}", shard.first_sample),
            ));
        }
        expected_first += shard.num_samples;
        let expected_start = if k == 0 {
            0
        } else {
            m.shards[k - 1].source_end
        };
        if shard.source_start != expected_start || shard.source_end < shard.source_start {
            return Err(CacheError::field(
                &manifest_path,
                field("source_start"),
                format!(
                    "shard covers prompts [{}, {}), expected it to start at {expected_start}",
                    shard.source_start, shard.source_end
                ),
            ));
        }
        let path = reader.shard_path(&shard.file_name);
        let size = std::fs::metadata(&path)
            .map_err(|e| CacheError::io(&path, e))?
            .len();
        if size != shard.bytes {
            return Err(CacheError::corrupt(
                &path,
                format!(
                    "is {size} bytes, the manifest ({}) says {}",
                    field("bytes"),
                    shard.bytes
                ),
            ));
        }
        let sha = sha256_file(&path)?;
        if sha != shard.sha256 {
            return Err(CacheError::corrupt(
                &path,
                format!(
                    "checksum mismatch: SHA-256 is {sha}, the manifest ({}) says {}; the shard is corrupt (delete it and its manifest entry, then re-run prepare)",
                    field("sha256"),
                    shard.sha256
                ),
            ));
        }
        let builder = open_builder(&path)?;
        let described = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|e| e.key == SHARD_METADATA_KEY))
            .and_then(|e| e.value.clone());
        if described.as_deref() != Some(layout.metadata_json().as_str()) {
            return Err(CacheError::corrupt(
                &path,
                format!(
                    "key-value metadata `{SHARD_METADATA_KEY}` is {described:?}, the manifest implies {}",
                    layout.metadata_json()
                ),
            ));
        }
        drop(builder);
        let samples = read_shard(&path, None, m.hidden_dtype)?;
        if samples.len() as u64 != shard.num_samples {
            return Err(CacheError::corrupt(
                &path,
                format!(
                    "holds {} samples, the manifest ({}) says {}",
                    samples.len(),
                    field("num_samples"),
                    shard.num_samples
                ),
            ));
        }
        let mut tokens = 0;
        let mut loss_tokens = 0;
        let mut previous: Option<u64> = None;
        for (row, s) in samples.iter().enumerate() {
            s.check(&layout)
                .map_err(|detail| CacheError::corrupt(&path, format!("row {row}: {detail}")))?;
            if s.source_index < shard.source_start
                || s.source_index >= shard.source_end
                || previous.is_some_and(|p| p >= s.source_index)
            {
                return Err(CacheError::corrupt(
                    &path,
                    format!(
                        "row {row}: `source_index` {} is out of order or outside [{}, {})",
                        s.source_index, shard.source_start, shard.source_end
                    ),
                ));
            }
            previous = Some(s.source_index);
            tokens += s.seq_len() as u64;
            loss_tokens += s.loss_mask.iter().map(|&v| v as u64).sum::<u64>();
        }
        if tokens != shard.num_tokens || loss_tokens != shard.num_loss_tokens {
            return Err(CacheError::corrupt(
                &path,
                format!(
                    "holds {tokens} tokens ({loss_tokens} trained), the manifest says {} ({})",
                    shard.num_tokens, shard.num_loss_tokens
                ),
            ));
        }
        bytes += size;
    }
    if expected_first != m.num_samples {
        return Err(CacheError::field(
            &manifest_path,
            "num_samples",
            format!("is {}, the shards hold {expected_first}", m.num_samples),
        ));
    }
    let tokens: u64 = m.shards.iter().map(|s| s.num_tokens).sum();
    if tokens != m.num_tokens {
        return Err(CacheError::field(
            &manifest_path,
            "num_tokens",
            format!("is {}, the shards hold {tokens}", m.num_tokens),
        ));
    }
    Ok(ValidationReport {
        num_shards: m.shards.len(),
        num_samples: m.num_samples,
        num_tokens: m.num_tokens,
        bytes,
    })
}
