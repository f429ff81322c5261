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
    dispatch_at(kind, 0, job)
}

/// [`dispatch`] onto device `index` of its kind (a data-parallel rank's `LOCAL_RANK`); the
/// CPU has one.
pub fn dispatch_at<J: OnBackend>(
    kind: DeviceKind,
    index: usize,
    job: J,
) -> anyhow::Result<J::Output> {
    #[cfg(feature = "cuda")]
    let gpu = burn::backend::cuda::CudaDevice { index };
    #[cfg(not(feature = "cuda"))]
    let _ = index;
    match kind {
        DeviceKind::Cpu => job.run::<deepspec_core::backend::Cpu>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => job.run::<deepspec_core::backend::CudaF32>(gpu),
        #[cfg(feature = "cuda")]
        DeviceKind::CudaBf16 => job.run::<deepspec_core::backend::CudaBf16>(gpu),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda | DeviceKind::CudaBf16 => anyhow::bail!(
            "this deepspec was built without CUDA; rebuild with `cargo build --release --features cuda`"
        ),
    }
}
