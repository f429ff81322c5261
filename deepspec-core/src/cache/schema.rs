//! The Parquet schema of a cache shard and how hidden states are encoded in it.
//!
//! One row per sample, one row group per sample (so a reader fetches one sample without
//! reading its neighbours). Columns (docs/cache-format.md is the reader's reference):
//!
//! | column | arrow type | shape per row |
//! | --- | --- | --- |
//! | `source_index` | uint64 | the prompt's index in the job's prompt list |
//! | `input_ids` | list<int32> | `[seq_len]` |
//! | `loss_mask` | list<bool> | `[seq_len]` |
//! | `target_hidden_states` | binary | `[seq_len, n_layers * hidden]` encoded, row-major |
//! | `target_last_hidden_states` | binary | `[seq_len, hidden]` encoded |
//! | `target_hidden_states_scale` | list<float32> | fp8 only: `[seq_len, n_layers]` |
//! | `target_last_hidden_states_scale` | list<float32> | fp8 only: `[seq_len]` |
//!
//! bf16 values are little-endian raw bf16 bit patterns (2 bytes each); fp8 values are
//! e4m3fn codes (1 byte each) times the scale of their `hidden`-long vector.

use crate::io::fp8::{fp8_e4m3_decode, fp8_e4m3_encode, FP8_MAX};
use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const SOURCE_INDEX: &str = "source_index";
pub const INPUT_IDS: &str = "input_ids";
pub const LOSS_MASK: &str = "loss_mask";
pub const HIDDEN: &str = "target_hidden_states";
pub const HIDDEN_SCALE: &str = "target_hidden_states_scale";
pub const LAST_HIDDEN: &str = "target_last_hidden_states";
pub const LAST_HIDDEN_SCALE: &str = "target_last_hidden_states_scale";

/// How cached hidden states are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HiddenDtype {
    /// bfloat16, as the reference stores them (exact for a bf16 target).
    #[default]
    Bf16,
    /// float8 e4m3fn with one f32 scale per `hidden`-long vector (half the bytes of bf16).
    Fp8,
}

impl HiddenDtype {
    pub fn name(self) -> &'static str {
        match self {
            HiddenDtype::Bf16 => "bf16",
            HiddenDtype::Fp8 => "fp8",
        }
    }

    /// Bytes of one value.
    pub fn value_bytes(self) -> usize {
        match self {
            HiddenDtype::Bf16 => 2,
            HiddenDtype::Fp8 => 1,
        }
    }

    /// Payload bytes per cached token: ids (4) + mask (1 bit, rounded to 1) + hidden values
    /// + fp8 scales (4 per vector).
    pub fn bytes_per_token(self, hidden_size: usize, n_layers: usize) -> usize {
        let values = hidden_size * (n_layers + 1) * self.value_bytes();
        let scales = match self {
            HiddenDtype::Bf16 => 0,
            HiddenDtype::Fp8 => 4 * (n_layers + 1),
        };
        4 + 1 + values + scales
    }
}

impl std::str::FromStr for HiddenDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" | "bfloat16" => Ok(HiddenDtype::Bf16),
            "fp8" | "fp8-e4m3" | "float8_e4m3fn" => Ok(HiddenDtype::Fp8),
            other => Err(format!("unknown hidden dtype `{other}` (bf16 or fp8)")),
        }
    }
}

/// The arrow schema of a shard holding hidden states as `dtype`.
pub fn shard_schema(dtype: HiddenDtype) -> Arc<Schema> {
    let list = |item: DataType| DataType::List(Arc::new(Field::new("item", item, false)));
    let mut fields = vec![
        Field::new(SOURCE_INDEX, DataType::UInt64, false),
        Field::new(INPUT_IDS, list(DataType::Int32), false),
        Field::new(LOSS_MASK, list(DataType::Boolean), false),
        Field::new(HIDDEN, DataType::Binary, false),
        Field::new(LAST_HIDDEN, DataType::Binary, false),
    ];
    if dtype == HiddenDtype::Fp8 {
        fields.push(Field::new(HIDDEN_SCALE, list(DataType::Float32), false));
        fields.push(Field::new(
            LAST_HIDDEN_SCALE,
            list(DataType::Float32),
            false,
        ));
    }
    Arc::new(Schema::new(fields))
}

/// Hidden states of one sample as stored: `[rows, row_len]` values, where a row is one
/// `hidden`-long vector (one layer of one token).
#[derive(Debug, Clone, PartialEq)]
pub enum EncodedHidden {
    /// Raw bf16 bit patterns.
    Bf16(Vec<u16>),
    /// e4m3fn codes and one scale per row.
    Fp8 { codes: Vec<u8>, scales: Vec<f32> },
}

impl EncodedHidden {
    /// Encodes f32 values whose rows are `row_len` long.
    pub fn encode(values: &[f32], row_len: usize, dtype: HiddenDtype) -> Self {
        match dtype {
            HiddenDtype::Bf16 => EncodedHidden::Bf16(
                values
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
            ),
            HiddenDtype::Fp8 => {
                assert!(
                    row_len > 0 && values.len().is_multiple_of(row_len),
                    "hidden values ({}) are not whole rows of {row_len}",
                    values.len()
                );
                let mut codes = Vec::with_capacity(values.len());
                let mut scales = Vec::with_capacity(values.len() / row_len);
                for row in values.chunks(row_len) {
                    let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = if max > 0.0 && max.is_finite() {
                        max / FP8_MAX
                    } else {
                        1.0
                    };
                    scales.push(scale);
                    codes.extend(row.iter().map(|&v| fp8_e4m3_encode(v / scale)));
                }
                EncodedHidden::Fp8 { codes, scales }
            }
        }
    }

    pub fn dtype(&self) -> HiddenDtype {
        match self {
            EncodedHidden::Bf16(_) => HiddenDtype::Bf16,
            EncodedHidden::Fp8 { .. } => HiddenDtype::Fp8,
        }
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        match self {
            EncodedHidden::Bf16(v) => v.len(),
            EncodedHidden::Fp8 { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (exact for bf16; code × scale for fp8).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            EncodedHidden::Bf16(bits) => bits
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect(),
            EncodedHidden::Fp8 { codes, scales } => {
                let row_len = if scales.is_empty() {
                    1
                } else {
                    codes.len() / scales.len()
                };
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| fp8_e4m3_decode(c) * scales[i / row_len])
                    .collect()
            }
        }
    }

    /// The stored bytes of the values column (little-endian).
    pub fn value_bytes(&self) -> Vec<u8> {
        match self {
            EncodedHidden::Bf16(bits) => bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            EncodedHidden::Fp8 { codes, .. } => codes.clone(),
        }
    }

    pub fn scales(&self) -> Option<&[f32]> {
        match self {
            EncodedHidden::Bf16(_) => None,
            EncodedHidden::Fp8 { scales, .. } => Some(scales),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_rows_scale_to_their_max_and_stay_close() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.37).collect();
        let enc = EncodedHidden::encode(&values, 16, HiddenDtype::Fp8);
        let back = enc.to_f32();
        for (row, (a, b)) in values.chunks(16).zip(back.chunks(16)).enumerate() {
            let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= max / 16.0, "row {row}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn bf16_is_exact_for_bf16_values() {
        let values = [1.0f32, -2.5, 0.0078125, -65536.0];
        let enc = EncodedHidden::encode(&values, 2, HiddenDtype::Bf16);
        assert_eq!(enc.to_f32(), values.to_vec());
    }
}
