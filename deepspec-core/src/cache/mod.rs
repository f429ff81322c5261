//! The training cache: Parquet shards of token ids, loss masks and the target's hidden
//! states, plus a manifest (docs/cache-format.md describes the layout for other readers).
//!
//! - [`schema`]: columns and hidden-state encodings (bf16, fp8 e4m3 with per-vector scale);
//! - [`manifest`]: `manifest.json` (written with [`crate::io::atomic`]), identity checks;
//! - [`writer`]: one shard, streamed, temporary name then rename;
//! - [`reader`]: one sample by index (one row group), and full validation;
//! - [`merge`]: the parts of a sharded `prepare` joined into one cache;
//! - [`reference`]: the reference's binary cache (version 2), for import.

pub mod manifest;
pub mod merge;
pub mod reader;
pub mod reference;
pub mod schema;
pub mod synthetic;
pub mod writer;

pub use manifest::{
    part_range, ImportSource, ImportedFile, JobSettings, Manifest, PartOf, ShardEntry,
    TargetIdentity,
};
pub use reader::{validate, CacheReader, ValidationReport};
pub use schema::{EncodedHidden, HiddenDtype};
pub use writer::{ShardLayout, ShardSummary, ShardWriter};

use std::path::PathBuf;

/// A cache problem, naming the file and (where there is one) the field.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: field `{field}`: {detail}")]
    Field {
        path: PathBuf,
        field: String,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

impl CacheError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CacheError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        CacheError::Field {
            path: path.into(),
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        CacheError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }
}

/// One cached training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSample {
    /// The prompt's index in the job's prompt list.
    pub source_index: u64,
    /// `[seq_len]`
    pub input_ids: Vec<u32>,
    /// `[seq_len]`, 0/1.
    pub loss_mask: Vec<u8>,
    /// Tapped layer outputs, `[seq_len, n_layers * hidden]` (layers in `target_layer_ids`
    /// order), encoded with one scale per `hidden`-long vector for fp8.
    pub hidden: EncodedHidden,
    /// Final hidden state after the final norm, `[seq_len, hidden]`.
    pub last_hidden: EncodedHidden,
}

impl CacheSample {
    pub fn seq_len(&self) -> usize {
        self.input_ids.len()
    }

    /// Checks every array's length against `seq_len` and the layout.
    pub fn check(&self, layout: &ShardLayout) -> Result<(), String> {
        let seq = self.seq_len();
        let n = layout.target_layer_ids.len();
        let h = layout.hidden_size;
        if seq == 0 {
            return Err("`input_ids` is empty".into());
        }
        if self.loss_mask.len() != seq {
            return Err(format!(
                "`loss_mask` has {} values, `input_ids` {seq}",
                self.loss_mask.len()
            ));
        }
        for (name, enc, rows) in [
            (schema::HIDDEN, &self.hidden, seq * n),
            (schema::LAST_HIDDEN, &self.last_hidden, seq),
        ] {
            if enc.dtype() != layout.hidden_dtype {
                return Err(format!(
                    "`{name}` is {}, the cache stores {}",
                    enc.dtype().name(),
                    layout.hidden_dtype.name()
                ));
            }
            if enc.len() != rows * h {
                return Err(format!(
                    "`{name}` has {} values, expected {} ({rows} vectors of {h})",
                    enc.len(),
                    rows * h
                ));
            }
            if let Some(scales) = enc.scales() {
                if scales.len() != rows {
                    return Err(format!(
                        "`{name}_scale` has {} values, expected {rows}",
                        scales.len()
                    ));
                }
            }
        }
        Ok(())
    }
}
