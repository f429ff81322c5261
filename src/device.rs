//! Backend selection: the one place that decides where numbers are computed.

use burn::tensor::backend::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// CPU (burn-flex), f32.
    Cpu,
    /// CUDA GPU, f32 (needs a build with `--features cuda`).
    Cuda,
    /// CUDA GPU, bf16 compute (needs a build with `--features cuda`).
    CudaBf16,
}

/// Work that runs on whichever backend the user picked.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

pub fn dispatch<J: OnBackend>(kind: DeviceKind, job: J) -> anyhow::Result<J::Output> {
    match kind {
        DeviceKind::Cpu => job.run::<deepspec_core::backend::Cpu>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => job.run::<deepspec_core::backend::CudaF32>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceKind::CudaBf16 => job.run::<deepspec_core::backend::CudaBf16>(Default::default()),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda | DeviceKind::CudaBf16 => anyhow::bail!(
            "this deepspec was built without CUDA; rebuild with `cargo build --release --features cuda`"
        ),
    }
}
