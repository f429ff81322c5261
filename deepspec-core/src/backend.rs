//! The concrete backends the CLI may pick. Library code stays generic over `B: Backend`.

/// CPU backend (burn-flex), f32. The default everywhere.
pub type Cpu = burn::backend::Flex;

/// CUDA backend, f32 compute.
#[cfg(feature = "cuda")]
pub type CudaF32 = burn::backend::Cuda<f32>;

/// CUDA backend, bf16 compute.
#[cfg(feature = "cuda")]
pub type CudaBf16 = burn::backend::Cuda<half::bf16>;
