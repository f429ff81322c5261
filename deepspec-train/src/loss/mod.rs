//! Training losses. The LM head and the token-level loss sit behind [`head`]'s functions, the
//! seam a chunked GPU kernel replaces (one that never holds `[tokens × vocab]` logits).

pub mod dspark;
pub mod eagle3;
pub mod head;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepspec_core::io::HostTensor;
use deepspec_core::model::tensor_from_host;

/// Host `[b][n][k]` ints -> tensor `[b, n, k]`.
pub(crate) fn int3<B: Backend>(rows: &[Vec<Vec<i64>>], device: &B::Device) -> Tensor<B, 3, Int> {
    let (b, n, k) = (rows.len(), rows[0].len(), rows[0][0].len());
    let flat: Vec<i64> = rows.iter().flatten().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, n, k]), device)
}

/// Host f32 values with a shape -> tensor of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    tensor_from_host(HostTensor::new(shape.to_vec(), data), device)
}
