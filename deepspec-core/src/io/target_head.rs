//! The target's token embedding and output head, read on their own from a checkpoint folder.
//!
//! A drafter trained on a cached target (DeepSeek-V4, whose hidden states come from a serving
//! engine) needs only these two `[vocab, hidden]` matrices of the target, not its layers. So
//! only the shards that hold them (and their scales) are opened: `model.safetensors`, or the
//! shards `model.safetensors.index.json`'s `weight_map` names for them.
//!
//! Stored dtypes: F32, F16, BF16, and F8_E4M3 with 128×128 block scales. Where the scale of
//! an FP8 weight `<prefix>.weight` lives, as the checkpoints' own loaders show:
//! - `<prefix>.weight_scale_inv`, F32 `[ceil(out/128), ceil(in/128)]`, the Hugging Face
//!   layout of DeepSeek-V3 (deepseek-ai/DeepSeek-V3 `inference/fp8_cast_bf16.py` looks up
//!   `f"{weight_name}_scale_inv"`; `inference/kernel.py` `weight_dequant` multiplies each
//!   128×128 block by its scale).
//! - `<prefix>.scale`, the native layout: DeepSeek-V3 `inference/convert.py` renames
//!   `weight_scale_inv` to `scale`, and DeepSeek-V4 checkpoints ship that layout (vLLM
//!   `model_executor/models/deepseek_v4.py` maps `\.scale$` to `.weight_scale_inv`). V4 stores
//!   these scales as F32 (`expert_dtype = "fp8"`, V4-Flash-Base) or as F8_E8M0 powers of two
//!   (`expert_dtype = "fp4"`, V4-Flash: vLLM's `DeepseekV4FP8Config.is_scale_e8m0`).
//!
//! Either scale dtype is read; the value is always `e4m3(code) * scale`.

use super::fp8::{block_count, dequantize_blocks, FP8_BLOCK};
use super::safetensors::{no_checkpoint, read_weight_map, Dtype, SafetensorsFile};
use super::HostTensor;
use crate::LoadError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// DeepSeek's native name of the token embedding, `[vocab, hidden]`.
pub const DEEPSEEK_EMBED: &str = "embed.weight";
/// DeepSeek's native name of the output head, `[vocab, hidden]`.
pub const DEEPSEEK_HEAD: &str = "head.weight";

/// The target's embedding and head, both `[vocab, hidden]`, f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetHead {
    pub embed: HostTensor,
    pub head: HostTensor,
}

impl TargetHead {
    pub fn vocab_size(&self) -> usize {
        self.embed.shape[0]
    }

    pub fn hidden_size(&self) -> usize {
        self.embed.shape[1]
    }
}

/// Reads DeepSeek's `embed.weight` and `head.weight` from the checkpoint folder `dir`.
pub fn load_target_head(dir: &Path) -> Result<TargetHead, LoadError> {
    load_target_head_named(dir, DEEPSEEK_EMBED, DEEPSEEK_HEAD)
}

/// Reads the embedding `embed` and head `head` (checkpoint keys, e.g.
/// `model.embed_tokens.weight` and `lm_head.weight` for a Hugging Face layout) from `dir`, and
/// checks that both are `[vocab, hidden]` with the same sizes.
pub fn load_target_head_named(
    dir: &Path,
    embed: &str,
    head: &str,
) -> Result<TargetHead, LoadError> {
    let mut folder = CheckpointFolder::open(dir)?;
    let embed_tensor = folder.matrix(embed)?;
    let head_tensor = folder.matrix(head)?;
    if embed_tensor.shape != head_tensor.shape {
        return Err(LoadError::tensor(
            dir,
            head,
            format!(
                "has shape {:?} but the embedding `{embed}` has {:?}; both must be [vocab, hidden] of the same model",
                head_tensor.shape, embed_tensor.shape
            ),
        ));
    }
    Ok(TargetHead {
        embed: embed_tensor,
        head: head_tensor,
    })
}

/// Reads each of `names`, a 2-D tensor, from the checkpoint folder `dir` as f32 (FP8 weights
/// dequantized with their block scales), opening only the shards that hold them.
pub fn read_matrices(dir: &Path, names: &[&str]) -> Result<Vec<HostTensor>, LoadError> {
    let mut folder = CheckpointFolder::open(dir)?;
    names.iter().map(|name| folder.matrix(name)).collect()
}

/// Where DeepSeek checkpoints keep the block scale of an FP8 weight, most specific first.
pub fn scale_names(name: &str) -> Vec<String> {
    let mut names = vec![format!("{name}_scale_inv")];
    if let Some(prefix) = name.strip_suffix(".weight") {
        names.push(format!("{prefix}.scale"));
    }
    names
}

/// A checkpoint folder whose shards are opened on first use.
struct CheckpointFolder {
    dir: PathBuf,
    /// Where the tensor list came from, for error messages.
    listing: PathBuf,
    /// tensor name -> shard file name
    weight_map: BTreeMap<String, String>,
    opened: BTreeMap<String, SafetensorsFile>,
}

impl CheckpointFolder {
    fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            let weight_map = file
                .tensor_names()
                .map(|t| (t.clone(), "model.safetensors".to_string()))
                .collect();
            Ok(CheckpointFolder {
                dir: dir.to_path_buf(),
                listing: single,
                weight_map,
                opened: BTreeMap::from([("model.safetensors".to_string(), file)]),
            })
        } else if index_path.exists() {
            Ok(CheckpointFolder {
                dir: dir.to_path_buf(),
                weight_map: read_weight_map(&index_path)?,
                listing: index_path,
                opened: BTreeMap::new(),
            })
        } else {
            Err(no_checkpoint(dir))
        }
    }

    /// The shard holding `name`, opened.
    fn file_of(&mut self, name: &str) -> Result<&SafetensorsFile, LoadError> {
        let shard = self
            .weight_map
            .get(name)
            .ok_or_else(|| self.missing(name))?
            .clone();
        if !self.opened.contains_key(&shard) {
            let file = SafetensorsFile::open(self.dir.join(&shard))?;
            if file.info(name).is_none() {
                return Err(LoadError::MissingTensor {
                    path: file.path().to_path_buf(),
                    tensor: name.to_string(),
                    hint: format!(
                        " ({} says this shard holds it; the index and the shard disagree, re-download them)",
                        self.listing.display()
                    ),
                });
            }
            self.opened.insert(shard.clone(), file);
        }
        Ok(&self.opened[&shard])
    }

    /// Reads the 2-D tensor `name` as f32, dequantizing an F8_E4M3 weight with its scale.
    fn matrix(&mut self, name: &str) -> Result<HostTensor, LoadError> {
        let file = self.file_of(name)?;
        let info = file.info(name).expect("file_of checked the shard holds it");
        let (dtype, shape) = (info.dtype, info.shape.clone());
        let &[rows, cols] = shape.as_slice() else {
            return Err(LoadError::tensor(
                file.path(),
                name,
                format!(
                    "has shape {shape:?} ({}-D); expected a 2-D [vocab, hidden] matrix (is this the right tensor name?)",
                    shape.len()
                ),
            ));
        };
        if dtype != Dtype::F8E4M3 {
            return file.f32(name);
        }
        let tried = scale_names(name);
        let Some(scale_name) = tried.iter().find(|s| self.weight_map.contains_key(*s)) else {
            return Err(LoadError::MissingTensor {
                path: self.dir.clone(),
                tensor: tried.join("` or `"),
                hint: format!(
                    " (the block scale of the F8_E4M3 weight `{name}`; {} lists neither)",
                    self.listing.display()
                ),
            });
        };
        let scale_file = self.file_of(scale_name)?;
        let scale = scale_file.f32(scale_name)?;
        let expected = [block_count(rows), block_count(cols)];
        if scale.shape != expected {
            return Err(LoadError::tensor(
                scale_file.path(),
                scale_name,
                format!(
                    "has shape {:?}, expected {expected:?}: one scale per {FP8_BLOCK}×{FP8_BLOCK} block of the F8_E4M3 weight `{name}` [{rows}, {cols}]",
                    scale.shape
                ),
            ));
        }
        let file = &self.opened[&self.weight_map[name]];
        let (_, codes) = file.raw(name)?;
        Ok(HostTensor::new(
            shape,
            dequantize_blocks(codes, rows, cols, &scale.data),
        ))
    }

    /// The error for a tensor the folder does not list, naming the listed tensors that look
    /// like it (`lm_head.weight` for `head.weight`).
    fn missing(&self, name: &str) -> LoadError {
        let words = name_words(name);
        let close: Vec<&str> = self
            .weight_map
            .keys()
            .filter(|k| name_words(k).iter().any(|w| words.contains(w)))
            .map(String::as_str)
            .take(8)
            .collect();
        let listed = format!(
            "{} lists {} tensors",
            self.listing.display(),
            self.weight_map.len()
        );
        let hint = if close.is_empty() {
            format!(" ({listed}, none named like it; pass the checkpoint's own tensor names)")
        } else {
            format!(
                " ({listed}; close: `{}`; pass the checkpoint's own tensor names)",
                close.join("`, `")
            )
        };
        LoadError::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
            hint,
        }
    }
}

/// The distinctive words of a tensor name: `model.embed_tokens.weight` -> `embed`, `tokens`.
fn name_words(name: &str) -> Vec<&str> {
    name.split(['.', '_'])
        .filter(|w| {
            !w.is_empty()
                && !w.chars().all(|c| c.is_ascii_digit())
                && !matches!(*w, "weight" | "model" | "bias" | "scale" | "inv")
        })
        .collect()
}
