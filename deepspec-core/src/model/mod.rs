//! Decoder-only target models (Qwen3 and Llama families) and the building blocks the drafters
//! reuse: Linear with PyTorch weight layout, RMSNorm, rotary embeddings, grouped-query
//! attention behind one seam function, SwiGLU MLP, and the KV cache.

pub mod attention;
pub mod config;
pub mod embedding;
pub mod gemma4;
pub mod kv_cache;
pub mod linear;
pub mod load;
pub mod mlp;
pub mod norm;
pub mod rope;
pub mod small_matmul;
pub mod transformer;
pub mod v4;

pub use config::{Family, TargetConfig};
pub use kv_cache::KvCache;
pub use load::{is_deepseek_v4, is_gemma4, load_target, load_target_meta, LoadedTarget};
pub use transformer::{LogitsFor, TargetModel, TargetNet, TargetOutput};

use crate::io::HostTensor;
use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Moves a host tensor onto `device` as a trainable-or-frozen parameter of rank `D`.
pub fn param_from_host<B: Backend, const D: usize>(
    host: HostTensor,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(tensor_from_host(host, device))
}

/// Moves a host tensor onto `device` as a plain tensor of rank `D`.
pub fn tensor_from_host<B: Backend, const D: usize>(
    host: HostTensor,
    device: &B::Device,
) -> Tensor<B, D> {
    assert_eq!(
        host.shape.len(),
        D,
        "tensor of shape {:?} loaded as rank {D}",
        host.shape
    );
    Tensor::from_data(TensorData::new(host.data, host.shape), device)
}

/// Reads a tensor back to the host as rows of its last axis (`[.., V]` -> `n × V`).
pub fn host_rows<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<Vec<f32>> {
    let width = tensor.dims()[D - 1];
    to_host(tensor)
        .data
        .chunks(width.max(1))
        .map(<[f32]>::to_vec)
        .collect()
}

/// Reads an int tensor back to the host.
pub fn host_ints<B: Backend, const D: usize>(tensor: Tensor<B, D, burn::tensor::Int>) -> Vec<i64> {
    tensor
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("int tensor converts to i64")
}

/// Reads a one-element tensor back to the host.
pub fn read_scalar<B: Backend>(tensor: Tensor<B, 1>) -> f64 {
    tensor
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .expect("float tensor converts to f64")[0]
}

/// Reads a tensor back to the host as f32 values.
pub fn to_host<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> HostTensor {
    let shape = tensor.dims().to_vec();
    let data = tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("float tensor converts to f32");
    HostTensor::new(shape, data)
}
