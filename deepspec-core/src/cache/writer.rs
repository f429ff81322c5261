//! Writing one Parquet shard: streamed one sample (one row group) at a time under a temporary
//! name, hashed while written, committed with [`crate::io::atomic::PendingFile`].

use super::schema::{self, EncodedHidden, HiddenDtype};
use super::{CacheError, CacheSample};
use crate::io::atomic::PendingFile;
use crate::layers::TargetLayerIds;
use arrow_array::builder::{BooleanBuilder, Float32Builder, Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, UInt64Array};
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

/// The fixed `created_by` string: no version or time in the file, so equal input gives
/// equal bytes.
pub const CREATED_BY: &str = "deepspec cache v1";

/// Parquet key holding the shard's self-description (JSON: layers, hidden size, dtype).
pub const SHARD_METADATA_KEY: &str = "deepspec.cache";

/// What every sample of a shard must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    pub hidden_size: usize,
    pub target_layer_ids: TargetLayerIds,
    pub hidden_dtype: HiddenDtype,
}

impl ShardLayout {
    pub fn metadata_json(&self) -> String {
        serde_json::json!({
            "hidden_size": self.hidden_size,
            "target_layer_ids": self.target_layer_ids,
            "hidden_dtype": self.hidden_dtype,
        })
        .to_string()
    }
}

/// Totals of a finished shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub num_samples: u64,
    pub num_tokens: u64,
    pub num_loss_tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Hashes and counts everything written through it.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub struct ShardWriter {
    writer: ArrowWriter<HashingWriter>,
    schema: SchemaRef,
    layout: ShardLayout,
    /// The shard under its temporary name until [`ShardWriter::finish`] commits it.
    pending: PendingFile,
    num_samples: u64,
    num_tokens: u64,
    num_loss_tokens: u64,
}

fn parquet_err(path: &Path, e: parquet::errors::ParquetError) -> CacheError {
    CacheError::corrupt(path, format!("parquet: {e}"))
}

impl ShardWriter {
    /// Starts `path` (written as `path.tmp` until [`ShardWriter::finish`]).
    pub fn create(path: &Path, layout: &ShardLayout) -> Result<Self, CacheError> {
        let (pending, file) = PendingFile::create(path)?;
        let schema = schema::shard_schema(layout.hidden_dtype);
        // Hidden states are close to incompressible and never repeat: plain, uncompressed,
        // no dictionary and no statistics keeps writing cheap and reading a direct copy.
        let props = WriterProperties::builder()
            .set_created_by(CREATED_BY.into())
            .set_max_row_group_size(1)
            .set_compression(Compression::UNCOMPRESSED)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .set_key_value_metadata(Some(vec![KeyValue::new(
                SHARD_METADATA_KEY.into(),
                layout.metadata_json(),
            )]))
            .build();
        let sink = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let writer = ArrowWriter::try_new(sink, schema.clone(), Some(props))
            .map_err(|e| parquet_err(pending.tmp(), e))?;
        Ok(ShardWriter {
            writer,
            schema,
            layout: layout.clone(),
            pending,
            num_samples: 0,
            num_tokens: 0,
            num_loss_tokens: 0,
        })
    }

    /// Appends one sample as its own row group.
    pub fn push(&mut self, sample: &CacheSample) -> Result<(), CacheError> {
        sample.check(&self.layout).map_err(|detail| {
            CacheError::corrupt(
                self.pending.tmp(),
                format!("sample {}: {detail}", sample.source_index),
            )
        })?;
        let batch = record_batch(&self.schema, std::slice::from_ref(sample));
        self.writer
            .write(&batch)
            .and_then(|_| self.writer.flush())
            .map_err(|e| parquet_err(self.pending.tmp(), e))?;
        self.num_samples += 1;
        self.num_tokens += sample.input_ids.len() as u64;
        self.num_loss_tokens += sample.loss_mask.iter().map(|&m| m as u64).sum::<u64>();
        Ok(())
    }

    /// Closes the file, makes it durable and renames it into place.
    pub fn finish(self) -> Result<ShardSummary, CacheError> {
        let pending = self.pending;
        let tmp = pending.tmp().to_path_buf();
        let mut sink = self.writer.into_inner().map_err(|e| parquet_err(&tmp, e))?;
        sink.flush().map_err(|e| CacheError::io(&tmp, e))?;
        let file = sink
            .inner
            .into_inner()
            .map_err(|e| CacheError::io(&tmp, e.into_error()))?;
        pending.commit(file)?;
        Ok(ShardSummary {
            num_samples: self.num_samples,
            num_tokens: self.num_tokens,
            num_loss_tokens: self.num_loss_tokens,
            bytes: sink.bytes,
            sha256: hex(&sink.hasher.finalize()),
        })
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut file = File::open(path).map_err(|e| CacheError::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| CacheError::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

fn binary(values: impl Iterator<Item = Vec<u8>>) -> ArrayRef {
    let values: Vec<Vec<u8>> = values.collect();
    Arc::new(BinaryArray::from_iter_values(values.iter()))
}

fn scales(samples: &[CacheSample], pick: impl Fn(&CacheSample) -> &EncodedHidden) -> ArrayRef {
    let mut builder = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(
        arrow_schema::Field::new("item", arrow_schema::DataType::Float32, false),
    ));
    for s in samples {
        builder
            .values()
            .append_slice(pick(s).scales().unwrap_or_default());
        builder.append(true);
    }
    Arc::new(builder.finish())
}

fn record_batch(schema: &SchemaRef, samples: &[CacheSample]) -> RecordBatch {
    let item = |t: arrow_schema::DataType| Arc::new(arrow_schema::Field::new("item", t, false));
    let mut ids =
        ListBuilder::new(Int32Builder::new()).with_field(item(arrow_schema::DataType::Int32));
    let mut mask =
        ListBuilder::new(BooleanBuilder::new()).with_field(item(arrow_schema::DataType::Boolean));
    for s in samples {
        for &id in &s.input_ids {
            ids.values().append_value(id as i32);
        }
        ids.append(true);
        for &m in &s.loss_mask {
            mask.values().append_value(m != 0);
        }
        mask.append(true);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            samples.iter().map(|s| s.source_index),
        )),
        Arc::new(ids.finish()),
        Arc::new(mask.finish()),
        binary(samples.iter().map(|s| s.hidden.value_bytes())),
        binary(samples.iter().map(|s| s.last_hidden.value_bytes())),
    ];
    if schema.fields().len() > columns.len() {
        columns.push(scales(samples, |s| &s.hidden));
        columns.push(scales(samples, |s| &s.last_hidden));
    }
    RecordBatch::try_new(schema.clone(), columns).expect("columns match the shard schema")
}
