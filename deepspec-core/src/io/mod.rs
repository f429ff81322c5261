//! Reading (and writing) model files: safetensors in the Hugging Face layout (with DeepSeek's
//! block-scaled FP8), a target's embedding and head on their own, GGUF, tokenizers and chat
//! templates; the atomic file replacement every writer uses, the folder lock every writing
//! command takes, and the check that a file name read from a file stays inside its folder.

pub mod atomic;
pub mod chat;
pub mod file_name;
pub mod fp8;
pub mod gguf;
pub mod lock;
pub mod safetensors;
pub mod target_head;
pub mod tokenizer;

use crate::LoadError;
use std::path::Path;

/// A tensor read from disk into host memory, dequantized / widened to f32, row-major, with
/// PyTorch's dimension order (for a Linear weight: `[out_features, in_features]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }
}

/// Anything that hands out named f32 tensors: a safetensors checkpoint, a GGUF file.
/// Names are Hugging Face checkpoint keys (`model.layers.3.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The file (or folder) the tensors come from, for error messages.
    fn origin(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError>;
    fn names(&self) -> Vec<String>;

    /// Reads `name` and checks that its shape is `expected`.
    fn tensor_shaped(&self, name: &str, expected: &[usize]) -> Result<HostTensor, LoadError> {
        let tensor = self.tensor(name)?;
        if tensor.shape != expected {
            return Err(LoadError::ShapeMismatch {
                path: self.origin().to_path_buf(),
                tensor: name.to_string(),
                found: tensor.shape,
                expected: expected.to_vec(),
            });
        }
        Ok(tensor)
    }
}
