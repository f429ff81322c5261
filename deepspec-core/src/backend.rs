//! The concrete backends the CLI may pick, and the compute dtype a recipe asks for. Library
//! code stays generic over `B: Backend`.

use burn::tensor::backend::Backend;
use burn::tensor::{get_device_settings, set_default_dtypes, FloatDType, IntDType};

/// CPU backend (burn-flex), f32. The default everywhere.
pub type Cpu = burn::backend::Flex;

/// CUDA backend, f32 compute.
#[cfg(feature = "cuda")]
pub type CudaF32 = burn::backend::Cuda<f32>;

/// CUDA backend, bf16 compute.
#[cfg(feature = "cuda")]
pub type CudaBf16 = burn::backend::Cuda<half::bf16>;

/// A recipe's `train.precision`: the compute dtype of a training run on any device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Fp16,
    Fp32,
}

impl Precision {
    /// `bf16`, `fp16` or `fp32`, as the reference's configs write it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "bf16" => Some(Precision::Bf16),
            "fp16" => Some(Precision::Fp16),
            "fp32" => Some(Precision::Fp32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
        }
    }

    /// The float dtype tensors are created in.
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::Bf16 => FloatDType::BF16,
            Precision::Fp16 => FloatDType::F16,
            Precision::Fp32 => FloatDType::F32,
        }
    }

    /// The drafter checkpoint's `config.json` `dtype`: `float32` for fp32 runs, `bfloat16`
    /// otherwise (fp16 runs too: the reference's checkpoints are never float16).
    pub fn checkpoint_dtype(self) -> &'static str {
        match self {
            Precision::Fp32 => "float32",
            Precision::Bf16 | Precision::Fp16 => "bfloat16",
        }
    }
}

/// Makes `dtype` the dtype of every float tensor created on `device` from now on (weights as
/// they load, activations, inputs read from the cache). Must run before the first tensor on
/// the device exists; asking again for the dtype already in force is fine.
pub fn set_compute_dtype<B: Backend>(device: &B::Device, dtype: FloatDType) -> anyhow::Result<()> {
    // Reading the settings would fix them, so try to set them first.
    let int_dtype: IntDType = <B::IntElem as burn::tensor::Element>::dtype().into();
    match set_default_dtypes::<B>(device, dtype, int_dtype) {
        Ok(()) => Ok(()),
        Err(e) => {
            let current = get_device_settings::<B>(device).float_dtype;
            if current == dtype {
                Ok(())
            } else {
                anyhow::bail!(
                    "cannot compute in {dtype:?} on {device:?}: {e} (it already computes in {current:?})"
                )
            }
        }
    }
}

/// The process's peak resident memory so far (`VmHWM` in `/proc/self/status`), in bytes;
/// `None` where the system does not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Device memory the backend's allocator holds on `device` (CUDA: bytes reserved, which
/// its pools keep at their high-water mark); `None` on the CPU, where the process's RSS is
/// the figure.
pub fn device_memory_reserved_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        let any: &dyn std::any::Any = device;
        if let Some(cuda) = any.downcast_ref::<burn::backend::cuda::CudaDevice>() {
            use cubecl::Runtime;
            let client = cubecl::cuda::CudaRuntime::client(cuda);
            return client.memory_usage().ok().map(|u| u.bytes_reserved);
        }
    }
    let _ = device;
    None
}
