//! Safetensors files in the Hugging Face layout: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. The header is parsed here (not by the `safetensors` crate)
//! so that a truncated file is reported with the tensor whose bytes are missing.

use super::fp8::fp8_e8m0_decode;
use super::{HostTensor, WeightSource};
use crate::LoadError;
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Element types of a safetensors file. deepspec decodes the named ones; the others are
/// kept as [`Dtype::Undecoded`] so that a shard holding, say, a model's FP4 experts still
/// opens and its other tensors can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    /// float8 e4m3fn; DeepSeek stores weights this way with 128×128 block scales.
    F8E4M3,
    /// float8 e8m0fnu (a power of two); DeepSeek-V4 block scales.
    F8E8M0,
    I64,
    I32,
    U8,
    Bool,
    /// A safetensors dtype deepspec does not decode: its name and bits per element.
    Undecoded {
        name: &'static str,
        bits: usize,
    },
}

/// The safetensors dtypes deepspec does not decode, with their bits per element.
const UNDECODED: [(&str, usize); 13] = [
    ("F64", 64),
    ("C64", 64),
    ("U64", 64),
    ("U32", 32),
    ("I16", 16),
    ("U16", 16),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("F4", 4),
];

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => {
                let &(name, bits) = UNDECODED.iter().find(|(name, _)| *name == s)?;
                Dtype::Undecoded { name, bits }
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::Undecoded { name, .. } => name,
        }
    }

    pub fn bits(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 32,
            Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I64 => 64,
            Dtype::F8E4M3 | Dtype::F8E8M0 | Dtype::U8 | Dtype::Bool => 8,
            Dtype::Undecoded { bits, .. } => bits,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    pub end: usize,
}

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| LoadError::io(&path, e))?;
        // SAFETY: the file is opened read-only; deepspec never writes a checkpoint in place
        // (writes go to a temporary name and are renamed), so the mapping does not change.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(&path, e))?;
        if mmap.len() < 8 {
            return Err(LoadError::corrupt(
                &path,
                format!("{} bytes, too short for a safetensors header", mmap.len()),
            ));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap()) as usize;
        if header_len > mmap.len() - 8 {
            return Err(LoadError::corrupt(
                &path,
                format!(
                    "header claims {header_len} bytes but the file has only {} after the length prefix",
                    mmap.len() - 8
                ),
            ));
        }
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..8 + header_len])
                .map_err(|e| LoadError::corrupt(&path, format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                if let Some(map) = value.as_object() {
                    for (k, v) in map {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let info = parse_info(&path, &name, &value)?;
            if info.end > data_len {
                return Err(LoadError::corrupt(
                    &path,
                    format!(
                        "tensor `{name}` needs bytes {}..{} of the data section but the file holds only {data_len} (truncated download?)",
                        info.start, info.end
                    ),
                ));
            }
            tensors.insert(name, info);
        }
        Ok(SafetensorsFile {
            path,
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The stored bytes of `name`, undecoded, with its header entry.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8]), LoadError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                hint: String::new(),
            })?;
        let bytes = &self.mmap[self.data_start + info.start..self.data_start + info.end];
        Ok((info, bytes))
    }

    /// Reads a floating-point tensor (F32, F16, BF16 or F8_E8M0) widened to f32. F8_E4M3 is
    /// refused: its codes mean nothing without their block scales (see
    /// [`super::target_head::read_matrices`]).
    pub fn f32(&self, name: &str) -> Result<HostTensor, LoadError> {
        let (info, bytes) = self.raw(name)?;
        let data = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::F8E8M0 => bytes.iter().map(|&b| fp8_e8m0_decode(b)).collect(),
            Dtype::F8E4M3 => {
                return Err(LoadError::UnsupportedDtype {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    dtype: "F8_E4M3".into(),
                    supported: "F32, F16, BF16, F8_E8M0 here; F8_E4M3 weights need their block scale (`<name>_scale_inv` or `<prefix>.scale`) and are read by io::target_head::read_matrices".into(),
                })
            }
            other => {
                return Err(LoadError::UnsupportedDtype {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    dtype: other.name().to_string(),
                    supported: "F32, F16, BF16, F8_E8M0 for floating-point tensors".into(),
                })
            }
        };
        Ok(HostTensor::new(info.shape.clone(), data))
    }

    /// Reads an integer or boolean tensor (I64, I32, U8, BOOL) as i64, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), LoadError> {
        let (info, bytes) = self.raw(name)?;
        let data = match info.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            Dtype::U8 | Dtype::Bool => bytes.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(LoadError::UnsupportedDtype {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    dtype: other.name().to_string(),
                    supported: "I64, I32, U8, BOOL for integer tensors".into(),
                })
            }
        };
        Ok((info.shape.clone(), data))
    }
}

fn parse_info(path: &Path, name: &str, value: &serde_json::Value) -> Result<TensorInfo, LoadError> {
    let bad = |detail: &str| LoadError::corrupt(path, format!("tensor `{name}`: {detail}"));
    let dtype_str = value["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
    let dtype = Dtype::parse(dtype_str).ok_or_else(|| LoadError::UnsupportedDtype {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: dtype_str.to_string(),
        supported:
            "the safetensors dtypes (F32, F16, BF16, F8_E4M3, F8_E8M0, I64, I32, U8, BOOL, ...)"
                .into(),
    })?;
    let shape: Vec<usize> = value["shape"]
        .as_array()
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape is not a list of integers"))?;
    let offsets = value["data_offsets"]
        .as_array()
        .ok_or_else(|| bad("no data_offsets"))?;
    let (start, end) = match offsets.as_slice() {
        [s, e] => (
            s.as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize,
            e.as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize,
        ),
        _ => return Err(bad("data_offsets must hold two integers")),
    };
    let expected = shape
        .iter()
        .try_fold(dtype.bits(), |a, &d| a.checked_mul(d))
        .map(|bits| bits.div_ceil(8))
        .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
    if end < start || end - start != expected {
        return Err(bad(&format!(
            "data_offsets {start}..{end} do not fit shape {shape:?} of {dtype_str} ({expected} bytes)"
        )));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start,
        end,
    })
}

/// A Hugging Face checkpoint folder: `model.safetensors`, or the shards of
/// `model.safetensors.index.json`.
pub struct SafetensorsCheckpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl SafetensorsCheckpoint {
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        let dir = dir.as_ref().to_path_buf();
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if single.exists() {
            vec!["model.safetensors".into()]
        } else if index_path.exists() {
            let mut names: Vec<String> = read_weight_map(&index_path)?.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else {
            return Err(no_checkpoint(&dir));
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let file = SafetensorsFile::open(dir.join(name))?;
            for tensor in file.tensor_names() {
                index.insert(tensor.clone(), i);
            }
            files.push(file);
        }
        Ok(SafetensorsCheckpoint { dir, files, index })
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile, LoadError> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(LoadError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
                hint: format!(
                    " (the checkpoint has {} tensors; is this the right model?)",
                    self.index.len()
                ),
            }),
        }
    }
}

impl WeightSource for SafetensorsCheckpoint {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError> {
        self.file_of(name)?.f32(name)
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
}

/// The `weight_map` of a `model.safetensors.index.json`: tensor name -> shard file name.
/// Every shard name must be a plain file name inside the folder (no `/` or `\`, not `..`, not
/// absolute), so an index cannot make deepspec open a file elsewhere.
pub fn read_weight_map(index_path: &Path) -> Result<BTreeMap<String, String>, LoadError> {
    let text = std::fs::read_to_string(index_path).map_err(|e| LoadError::io(index_path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| LoadError::field(index_path, "weight_map", format!("not valid JSON: {e}")))?;
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| LoadError::field(index_path, "weight_map", "missing or not an object"))?;
    let mut weight_map = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            LoadError::field(
                index_path,
                format!("weight_map.{tensor}"),
                "must be a shard file name (a string)",
            )
        })?;
        super::file_name::check_plain_file_name(shard).map_err(|e| {
            LoadError::field(
                index_path,
                format!("weight_map.{tensor}"),
                format!("shard {e}; an index may only name files next to it (fix or re-download the index)"),
            )
        })?;
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    Ok(weight_map)
}

/// The error for a folder with neither `model.safetensors` nor an index.
pub(crate) fn no_checkpoint(dir: &Path) -> LoadError {
    LoadError::io(
        dir.join("model.safetensors"),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors nor model.safetensors.index.json in this folder",
        ),
    )
}

/// A tensor to write: name, shape and f32 values (stored as F32).
pub struct NamedTensor<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

/// Writes tensors as one safetensors file in `dtype` (F32, BF16 or F16; the `safetensors`
/// crate sorts them the way `save_pretrained` does) through a temporary file renamed into
/// place, so a crash never leaves half a file.
pub fn write_tensors(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoadError> {
    use safetensors::tensor::TensorView;
    let st_dtype = match dtype {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::BF16 => safetensors::Dtype::BF16,
        Dtype::F16 => safetensors::Dtype::F16,
        other => {
            return Err(LoadError::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: "*".into(),
                dtype: other.name().into(),
                supported: "F32, BF16, F16 for writing".into(),
            })
        }
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| match dtype {
            Dtype::BF16 => t
                .data
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::F16 => t
                .data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(st_dtype, t.shape.to_vec(), b)
            .map_err(|e| LoadError::corrupt(path, format!("tensor `{}`: {e}", t.name)))?;
        views.push((t.name.to_string(), view));
    }
    let info = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let out = safetensors::tensor::serialize(views, info)
        .map_err(|e| LoadError::corrupt(path, format!("cannot serialize: {e}")))?;
    Ok(super::atomic::write_atomically(path, &out)?)
}

/// [`write_tensors`] in F32.
pub fn write_f32(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoadError> {
    write_tensors(path, tensors, Dtype::F32, metadata)
}
