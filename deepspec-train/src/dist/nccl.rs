//! The GPU engine: NCCL (through cudarc, which burn-cuda already links) on burn-cuda
//! tensors, one process per GPU.
//!
//! - **The id.** Rank 0 makes the NCCL unique id and the rendezvous hands it to every
//!   rank (its welcome's payload); each rank then joins the communicator on its GPU.
//! - **In place.** A bucket (a fresh contiguous tensor, made by [`super::grads`]) is taken
//!   out of burn's fusion layer as the CubeCL tensor it is, summed by `ncclAllReduce` in
//!   its own device memory (f32, or bf16 when the recipe's `train.allreduce_dtype` says
//!   so), and handed back to the fusion layer as a new tensor over the same memory.
//! - **Ordering against burn-cuda's stream, explicitly by synchronising:** before the
//!   all-reduce the device is synced (every kernel that writes the bucket has finished),
//!   the all-reduce runs on a stream of its own, and that stream is synced before the
//!   bucket goes back to burn. Simple and safe; it gives up overlapping the all-reduce
//!   with the backward pass.
//! - **Dead or hung ranks.** Joining and every all-reduce run on a worker thread while the
//!   caller watches the rendezvous' liveness and the timeout; on either it aborts the
//!   communicator (`ncclCommAbort`, which releases the kernels waiting on the other
//!   ranks) and returns an error, which ends the process.

use super::collective::wait_on;
use super::rendezvous::Liveness;
use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::OperationStreams;
use burn_fusion::{FusionTensor, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nccl, sys};
use std::any::Any;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

type Runtime = FusionCubeRuntime<CudaRuntime>;
/// The backend under burn-cuda's fusion layer; its float type does not matter here (the
/// tensor carries its dtype).
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;

/// The communicator handle, moved to the worker threads; NCCL allows using it from
/// another thread than the one that made it as long as calls do not overlap, which
/// `Nccl::busy` ensures.
#[derive(Clone, Copy)]
struct Raw(sys::ncclComm_t);
// SAFETY: see above; the pointer is only dereferenced by NCCL.
unsafe impl Send for Raw {}

impl Raw {
    /// The handle (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> sys::ncclComm_t {
        self.0
    }
}

pub struct Nccl {
    comm: Raw,
    stream: Arc<CudaStream>,
    /// Held while a call is in flight (the worker may outlive a caller that timed out).
    busy: Arc<Mutex<()>>,
    rank: usize,
    timeout: Duration,
    liveness: Liveness,
}

/// The CUDA device behind a backend's device, when the backend is burn-cuda.
pub fn cuda_device<B: Backend>(device: &B::Device) -> Option<CudaDevice> {
    let any: &dyn Any = device;
    any.downcast_ref::<CudaDevice>().cloned()
}

fn library() -> anyhow::Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        bail!("NCCL's library (libnccl.so) was not found: install NCCL (e.g. the nvidia-nccl wheel PyTorch uses) and add the folder holding libnccl.so to LD_LIBRARY_PATH (link libnccl.so to libnccl.so.2 if only that exists)")
    }
}

/// Rank 0: a fresh NCCL unique id, as the bytes the rendezvous hands out.
pub fn unique_id() -> anyhow::Result<Vec<u8>> {
    library()?;
    let id = nccl::get_uniqueid().map_err(|e| anyhow::anyhow!("NCCL unique id: {e:?}"))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world_size` on `device`.
    pub fn join(
        id: &[u8],
        rank: usize,
        world_size: usize,
        device: &CudaDevice,
        timeout: Duration,
        liveness: Liveness,
    ) -> anyhow::Result<Self> {
        library()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            bail!(
                "rank {rank}: rank 0 sent a {}-byte NCCL id, not 128 (do all ranks run the same deepspec build, all on CUDA?)",
                id.len()
            );
        }
        for (slot, &b) in internal.iter_mut().zip(id) {
            *slot = b as std::ffi::c_char;
        }
        let ctx = CudaContext::new(device.index)
            .with_context(|| format!("rank {rank}: CUDA context on GPU {}", device.index))?;
        let stream = ctx
            .new_stream()
            .with_context(|| format!("rank {rank}: a CUDA stream for NCCL"))?;
        let (tx, rx) = mpsc::channel();
        let index = device.index;
        std::thread::spawn(move || {
            let joined = (|| -> anyhow::Result<Raw> {
                ctx.bind_to_thread()?;
                let mut comm = std::mem::MaybeUninit::uninit();
                // SAFETY: `comm` is written by a successful init before it is read.
                unsafe {
                    nccl::comm_init_rank(
                        comm.as_mut_ptr(),
                        world_size as i32,
                        sys::ncclUniqueId { internal },
                        rank as i32,
                    )
                    .map_err(|e| anyhow::anyhow!("ncclCommInitRank on GPU {index}: {e:?}"))?;
                    Ok(Raw(comm.assume_init()))
                }
            })();
            tx.send(joined).ok();
        });
        let comm = wait_on(&rx, rank, timeout, &liveness, || {
            "joining the NCCL communicator".into()
        })??;
        Ok(Nccl {
            comm,
            stream,
            busy: Arc::new(Mutex::new(())),
            rank,
            timeout,
            liveness,
        })
    }

    /// `tensor` summed over every rank, in place on this rank's GPU.
    pub fn all_reduce_sum<B: Backend>(&self, tensor: Tensor<B, 1>) -> anyhow::Result<Tensor<B, 1>> {
        let primitive: Box<dyn Any> = Box::new(tensor.into_primitive().tensor());
        let fused = match primitive.downcast::<FusionTensor<Runtime>>() {
            Ok(t) => *t,
            Err(_) => bail!(
                "rank {}: the NCCL engine got a tensor that is not burn-cuda's",
                self.rank
            ),
        };
        let (client, shape, dtype) = (fused.client.clone(), fused.shape.clone(), fused.dtype);
        let datatype = match dtype {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            other => bail!("rank {}: NCCL all-reduce of {other:?} tensors", self.rank),
        };
        let count = shape.num_elements();
        // Runs every queued kernel that makes the tensor, and takes it out of the fusion
        // layer (this call owns the only reference).
        let cube = client.resolve_tensor_float::<Inner>(fused);
        if !cube.is_contiguous() {
            bail!("rank {}: an all-reduce bucket is not contiguous", self.rank);
        }
        Inner::sync(&cube.device).map_err(|e| {
            anyhow::anyhow!("rank {}: syncing the GPU before NCCL: {e:?}", self.rank)
        })?;
        let resource = cube.client.get_resource(cube.handle.clone()).map_err(|e| {
            anyhow::anyhow!("rank {}: the bucket's device memory: {e:?}", self.rank)
        })?;
        let ptr = resource.resource().ptr;
        let (comm, stream, busy) = (self.comm, self.stream.clone(), self.busy.clone());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _held = busy.lock();
            let done = (|| -> anyhow::Result<()> {
                stream.context().bind_to_thread()?;
                // SAFETY: `ptr` points at `count` elements of `datatype` that stay
                // allocated while `resource` lives (the caller keeps it until this
                // thread has answered or the communicator is aborted), and no kernel
                // touches them (the device was synced, burn gets them back after).
                unsafe {
                    nccl::all_reduce(
                        ptr as *const std::ffi::c_void,
                        ptr as *mut std::ffi::c_void,
                        count,
                        datatype,
                        sys::ncclRedOp_t::ncclSum,
                        comm.get(),
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                    .map_err(|e| anyhow::anyhow!("ncclAllReduce: {e:?}"))?;
                }
                stream.synchronize()?;
                Ok(())
            })();
            tx.send(done).ok();
        });
        wait_on(&rx, self.rank, self.timeout, &self.liveness, || {
            "an NCCL all-reduce".into()
        })
        .and_then(|r| r)
        .inspect_err(|_| self.abort())?;
        drop(resource);
        let handle = <Inner as BackendIr>::float_tensor_handle(cube);
        let init = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
        let out = client
            .register(
                OperationStreams::default(),
                OperationIr::Init(init),
                NoOp::<Inner>::new(),
            )
            .pop()
            .expect("an init has one output");
        let out: Box<dyn Any> = Box::new(out);
        let out = *out
            .downcast::<B::FloatTensorPrimitive>()
            .map_err(|_| anyhow::anyhow!("burn-cuda's float tensor type"))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Releases whatever waits on the other ranks; the communicator is unusable after.
    fn abort(&self) {
        // SAFETY: abort is the one call NCCL allows while another is blocked.
        unsafe {
            nccl::comm_abort(self.comm.get()).ok();
        }
    }
}
