//! GGUF (llama.cpp's model file): metadata, tensor directory, and dequantization of F32, F16,
//! BF16, Q8_0 and Q4_1 tensors to f32. Tensors are exposed under Hugging Face names so the
//! same model code loads either format.

use super::{HostTensor, WeightSource};
use crate::LoadError;
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types deepspec dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

fn ggml_type_name(id: u32) -> String {
    let known = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    known
        .get(id as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("ggml type {id}"))
}

#[derive(Debug, Clone)]
struct TensorEntry {
    /// ggml dims, innermost first (`ne[0]` is the row length).
    dims: Vec<usize>,
    type_id: u32,
    offset: usize,
}

impl TensorEntry {
    /// Bytes the tensor's data takes, `None` if its claimed dims overflow.
    fn byte_len(&self, ty: GgmlType) -> Option<usize> {
        let (per_block, block_bytes) = ty.block();
        let count = self
            .dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        (count / per_block).checked_mul(block_bytes)
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    pub metadata: BTreeMap<String, Value>,
    tensors: BTreeMap<String, TensorEntry>,
}

/// How deep metadata arrays may nest (real files use one level; recursion must stay bounded).
const MAX_ARRAY_DEPTH: usize = 4;

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        if n > self.bytes.len() - self.pos {
            return Err(LoadError::corrupt(
                self.path,
                format!(
                    "header ends early at byte {} (needed {n} more bytes; truncated download?)",
                    self.pos
                ),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A length or count read from the header, which can claim any number: past what the
    /// file can hold it is a truncated or damaged file, and must not size an allocation.
    fn len(&mut self) -> Result<usize, LoadError> {
        let at = self.pos;
        let n = self.u64()?;
        let left = self.bytes.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= left => Ok(n),
            _ => Err(LoadError::corrupt(
                self.path,
                format!(
                    "the header claims {n} items or bytes at byte {at} but only {left} bytes follow (truncated or damaged file?)"
                ),
            )),
        }
    }
    fn string(&mut self) -> Result<String, LoadError> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, type_id: u32, depth: usize) -> Result<Value, LoadError> {
        Ok(match type_id {
            0 => Value::U64(self.take(1)?[0] as u64),
            1 => Value::I64(self.take(1)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let item_type = self.u32()?;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(LoadError::corrupt(
                        self.path,
                        format!(
                            "metadata arrays nest deeper than {MAX_ARRAY_DEPTH} at byte {}",
                            self.pos
                        ),
                    ));
                }
                // Every item takes at least one byte, so `len` bounds the count by the file.
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => {
                return Err(LoadError::corrupt(
                    self.path,
                    format!("unknown metadata value type {other} at byte {}", self.pos),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| LoadError::io(&path, e))?;
        // SAFETY: read-only mapping of a file deepspec never modifies.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(&path, e))?;
        let mut r = Reader {
            path: &path,
            bytes: &mmap,
            pos: 0,
        };
        if r.take(4)? != b"GGUF" {
            return Err(LoadError::corrupt(
                &path,
                "not a GGUF file (magic is not `GGUF`)",
            ));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(LoadError::corrupt(
                &path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let tensor_count = r.len()?;
        let kv_count = r.len()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let type_id = r.u32()?;
            let value = r.value(type_id, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(LoadError::corrupt(
                    &path,
                    format!(
                        "tensor `{name}` claims {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})"
                    ),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(usize::try_from(r.u64()?).unwrap_or(usize::MAX));
            }
            let type_id = r.u32()?;
            let offset = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
            tensors.insert(
                name,
                TensorEntry {
                    dims,
                    type_id,
                    offset,
                },
            );
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => {
                    return Err(LoadError::field(
                        &path,
                        "general.alignment",
                        format!("is {v:?}; GGUF needs a power of two (32 by default)"),
                    ))
                }
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let data_len = mmap.len().saturating_sub(data_start);
        for (name, entry) in &tensors {
            if let Some(ty) = GgmlType::from_id(entry.type_id) {
                let end = entry.byte_len(ty).and_then(|n| n.checked_add(entry.offset));
                if end.is_none_or(|end| end > data_len) {
                    return Err(LoadError::corrupt(
                        &path,
                        format!(
                            "tensor `{name}` ({:?} at offset {}) needs more than the {data_len} bytes of the data section (truncated download?)",
                            entry.dims, entry.offset
                        ),
                    ));
                }
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            data_start,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn require(&self, key: &str) -> Result<&Value, LoadError> {
        self.metadata
            .get(key)
            .ok_or_else(|| LoadError::field(&self.path, key, "missing from the GGUF metadata"))
    }

    pub fn require_u64(&self, key: &str) -> Result<u64, LoadError> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| LoadError::field(&self.path, key, "is not an unsigned integer"))
    }

    pub fn require_str(&self, key: &str) -> Result<&str, LoadError> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| LoadError::field(&self.path, key, "is not a string"))
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>, LoadError> {
        self.require(key)?
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| LoadError::field(&self.path, key, "is not an array of strings"))
    }

    pub fn gguf_tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Dequantizes a tensor by its GGUF name. The shape is returned PyTorch-style
    /// (outermost first), i.e. ggml's `ne` reversed.
    pub fn dequantize(&self, name: &str) -> Result<HostTensor, LoadError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                hint: String::new(),
            })?;
        let ty = GgmlType::from_id(entry.type_id).ok_or_else(|| LoadError::UnsupportedDtype {
            path: self.path.clone(),
            tensor: name.to_string(),
            dtype: ggml_type_name(entry.type_id),
            supported: "F32, F16, BF16, Q8_0, Q4_1 (re-quantize the model with one of these)"
                .into(),
        })?;
        // `open` checked that the product and the byte range fit in the file.
        let count: usize = entry.dims.iter().product();
        let (per_block, _) = ty.block();
        if !count.is_multiple_of(per_block) {
            return Err(LoadError::corrupt(
                &self.path,
                format!("tensor `{name}` has {count} elements, not a multiple of the {per_block}-element block"),
            ));
        }
        let start = self.data_start + entry.offset;
        let bytes = &self.mmap[start..start + entry.byte_len(ty).unwrap_or(0)];
        let data = dequantize_bytes(ty, bytes, count);
        let shape = entry.dims.iter().rev().copied().collect();
        Ok(HostTensor::new(shape, data))
    }
}

fn dequantize_bytes(ty: GgmlType, bytes: &[u8], count: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(count);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for block in bytes.chunks_exact(20) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
    }
    out
}

/// Undoes the row permutation llama.cpp's converter applies to Llama q/k projections (it
/// interleaves the two rotary halves of each head so that ggml's "normal" RoPE matches).
/// deepspec uses the Hugging Face rotate-half RoPE, so the rows go back to HF order.
fn unpermute_rotary_rows(
    path: &Path,
    name: &str,
    tensor: HostTensor,
    n_heads: usize,
) -> Result<HostTensor, LoadError> {
    let rows = tensor.shape[0];
    if n_heads == 0 || !rows.is_multiple_of(n_heads) {
        return Err(LoadError::corrupt(
            path,
            format!(
                "`{name}` has {rows} rows, not a multiple of the {n_heads} heads of the metadata"
            ),
        ));
    }
    let cols: usize = tensor.shape[1..].iter().product();
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut data = vec![0.0f32; tensor.data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) holds HF row (h, j, i).
                let src = h * head_dim + i * 2 + j;
                let dst = h * head_dim + j * half + i;
                data[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&tensor.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(HostTensor::new(tensor.shape, data))
}

/// A GGUF file seen through Hugging Face tensor names (Llama architecture).
pub struct GgufWeights {
    file: GgufFile,
    n_heads: usize,
    n_kv_heads: usize,
    /// HF name -> GGUF name
    names: BTreeMap<String, String>,
    /// GGUF tensors that map to no Hugging Face name (a damaged or unknown name), named
    /// when a tensor turns out missing.
    unmapped: Vec<String>,
}

impl GgufWeights {
    pub fn new(file: GgufFile, n_heads: usize, n_kv_heads: usize) -> Self {
        let mut names = BTreeMap::new();
        let mut unmapped = Vec::new();
        for g in file.gguf_tensor_names() {
            match hf_name(g) {
                Some(hf) => {
                    names.insert(hf, g.clone());
                }
                None => unmapped.push(g.clone()),
            }
        }
        unmapped.sort();
        GgufWeights {
            file,
            n_heads,
            n_kv_heads,
            names,
            unmapped,
        }
    }

    /// Why `hf` has no GGUF tensor: the GGUF name it would have, and the file's tensors that
    /// map to nothing (those of the same layer first), which is where a damaged name shows.
    fn missing_hint(&self, hf: &str) -> String {
        let expected = gguf_name(hf).map_or(String::new(), |g| format!(" `{g}`"));
        let layer = hf
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .map(|(layer, _)| format!("blk.{layer}."));
        let same_layer: Vec<&String> = self
            .unmapped
            .iter()
            .filter(|g| layer.as_ref().is_some_and(|l| g.starts_with(l.as_str())))
            .collect();
        let shown = if same_layer.is_empty() {
            self.unmapped.iter().collect()
        } else {
            same_layer
        };
        let unexpected = match shown.len() {
            0 => String::new(),
            n => format!(
                "; unexpected GGUF tensor{} {} (a damaged or unsupported name?)",
                if n == 1 { "" } else { "s" },
                shown
                    .iter()
                    .take(8)
                    .map(|g| format!("`{g}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(" (no GGUF tensor{expected} in the file{unexpected})")
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// llama.cpp's names for the whole-model tensors and the Hugging Face keys.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names for a layer's tensors (after `blk.<n>.`) and the Hugging Face keys
/// (after `model.layers.<n>.`).
const LAYER_NAMES: [(&str, &str); 11] = [
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Maps a llama.cpp tensor name to the Hugging Face key.
fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The llama.cpp tensor name of a Hugging Face key (the inverse of [`hf_name`]).
fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, suffix) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

impl WeightSource for GgufWeights {
    fn origin(&self) -> &Path {
        self.file.path()
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError> {
        let gguf_name = self
            .names
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.file.path().to_path_buf(),
                tensor: name.to_string(),
                hint: self.missing_hint(name),
            })?;
        let tensor = self.file.dequantize(gguf_name)?;
        let path = self.file.path();
        if name.ends_with("self_attn.q_proj.weight") {
            unpermute_rotary_rows(path, name, tensor, self.n_heads)
        } else if name.ends_with("self_attn.k_proj.weight") {
            unpermute_rotary_rows(path, name, tensor, self.n_kv_heads)
        } else {
            Ok(tensor)
        }
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_dequantizes_low_nibbles_then_high() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block.extend((0u8..16).map(|i| i | ((15 - i) << 4)));
        let out = dequantize_bytes(GgmlType::Q4_1, &block, 32);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[15], 0.5 * 15.0 - 1.0);
        assert_eq!(out[16], 0.5 * 15.0 - 1.0);
        assert_eq!(out[31], -1.0);
    }

    #[test]
    fn q8_0_block_scales_signed_bytes() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.25).to_le_bytes());
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let out = dequantize_bytes(GgmlType::Q8_0, &block, 32);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 15.0 * 0.25);
    }

    #[test]
    fn unpermute_restores_rotate_half_order() {
        // One head of dim 4, one column: HF rows [a0, a1, b0, b1] are stored by llama.cpp as
        // [a0, b0, a1, b1].
        let gguf = HostTensor::new(vec![4, 1], vec![0.0, 2.0, 1.0, 3.0]);
        let hf = unpermute_rotary_rows(Path::new("t.gguf"), "q", gguf, 1).unwrap();
        assert_eq!(hf.data, vec![0.0, 1.0, 2.0, 3.0]);
    }
}
