//! The all-reduce the ranks sum their gradients with, behind one type ([`Comm`]) the
//! trainer calls whatever the engine: one process (nothing to do), or burn's own
//! `burn-collective` in its multi-process (global) mode on any burn backend, the CPU
//! included. `docs/distributed.md` says why this engine for the CPU, and what its 0.21
//! release needs worked around:
//!
//! - a session hangs on its second collective, so every all-reduce registers anew and
//!   finishes (measured: about 45 ms for 4 MB over loopback, registration included);
//! - `GradientsParams::all_reduce` pairs parameters by their random ids, which differ
//!   between processes, so gradients travel as flat buckets in the module's own order
//!   ([`super::grads`]);
//! - its calls block without a timeout, so each runs on a thread of its own while the
//!   caller waits on it, the rendezvous' liveness and a deadline: a dead rank is an error.

use super::rendezvous::{rendezvous, Liveness};
use super::{DistSettings, World};
use anyhow::bail;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use deepspec_core::model::to_host;
use std::sync::mpsc;
use std::time::{Duration, Instant};

enum Engine {
    /// One rank: sums are the values themselves.
    Solo,
    /// burn-collective's global mode: one local device per process, one "node" per rank;
    /// collectives alternate between the two configurations (tensor server ports).
    Burn(Box<Burn>),
    /// NCCL on burn-cuda tensors, one GPU per process (`super::nccl`).
    #[cfg(feature = "cuda")]
    Nccl(Box<super::nccl::Nccl>),
}

/// Which engine a run uses: `DEEPSPEC_DIST_ENGINE` = `auto` (NCCL on CUDA,
/// burn-collective elsewhere), `nccl` or `burn-collective`. Naming one also runs it in a
/// world of one, which checks the whole path on a single device.
fn engine_choice() -> anyhow::Result<Option<&'static str>> {
    match std::env::var("DEEPSPEC_DIST_ENGINE").ok().as_deref() {
        None | Some("") | Some("auto") => Ok(None),
        Some("nccl") => Ok(Some("nccl")),
        Some("burn-collective") => Ok(Some("burn-collective")),
        Some(other) => {
            bail!("DEEPSPEC_DIST_ENGINE={other}: expected auto, nccl or burn-collective")
        }
    }
}

struct Burn {
    configs: [CollectiveConfig; 2],
    /// This rank's host (its tensor servers listen there only), its two tensor server
    /// ports, and every other rank's `host:port` pairs.
    host: String,
    own: [u16; 2],
    others: Vec<[String; 2]>,
}

/// This rank's handle on the others.
pub struct Comm<B: Backend> {
    pub world: World,
    engine: Engine,
    liveness: Liveness,
    timeout: Duration,
    device: B::Device,
    /// Collectives so far (every rank calls the same sequence).
    calls: std::sync::atomic::AtomicU64,
}

/// Ports a run uses on top of `MASTER_PORT` (the rendezvous): rank 0's collective
/// orchestrator on `MASTER_PORT + 1`, and each rank's two tensor servers on
/// `MASTER_PORT + 2 + 2 LOCAL_RANK` and the port after. burn-collective starts a rank's
/// tensor server anew for every collective (each registers anew, above), while the last
/// one may still hold its port; alternating two ports leaves a whole collective for it
/// to close (measured: with one port, about one 40-step run in three failed to connect).
pub fn ports(world: &World) -> (u16, [u16; 2]) {
    (
        world.master_port.wrapping_add(1),
        data_ports(world.master_port, world.local_rank),
    )
}

fn data_ports(master_port: u16, local_rank: usize) -> [u16; 2] {
    let first = master_port.wrapping_add(2 + 2 * local_rank as u16);
    [first, first.wrapping_add(1)]
}

impl<B: Backend> Comm<B> {
    /// A world of one.
    pub fn solo(device: &B::Device) -> Self {
        Comm {
            world: World::single(),
            engine: Engine::Solo,
            liveness: Liveness::default(),
            timeout: Duration::from_secs(300),
            device: device.clone(),
            calls: Default::default(),
        }
    }

    /// Meets the other ranks of `world` (rendezvous on `MASTER_ADDR:MASTER_PORT`) and sets
    /// up the collective between them. `job` identifies the run; ranks of another job are
    /// refused.
    pub fn connect(
        world: &World,
        job: &str,
        settings: &DistSettings,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        let forced = engine_choice()?;
        if world.world_size == 1 && forced.is_none() {
            return Ok(Comm {
                world: world.clone(),
                ..Comm::solo(device)
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = super::nccl::cuda_device::<B>(device) {
            if forced != Some("burn-collective") {
                let peers = rendezvous(world, job, settings.timeout, super::nccl::unique_id)?;
                let nccl = super::nccl::Nccl::join(
                    &peers.payload,
                    world.rank,
                    world.world_size,
                    &gpu,
                    settings.timeout,
                    peers.liveness.clone(),
                )?;
                return Ok(Comm {
                    world: world.clone(),
                    engine: Engine::Nccl(Box::new(nccl)),
                    liveness: peers.liveness,
                    timeout: settings.timeout,
                    device: device.clone(),
                    calls: Default::default(),
                });
            }
        }
        if forced == Some("nccl") {
            bail!("DEEPSPEC_DIST_ENGINE=nccl needs a CUDA device (a build with --features cuda and a run with --device cuda)");
        }
        quiet_collective_logs();
        if world.local_rank == 0 {
            warn_if_ephemeral(world.master_port);
        }
        let (orchestrator, own) = ports(world);
        let master = world.master_addr.clone();
        let peers = rendezvous(world, job, settings.timeout, || {
            start_orchestrator(&master, orchestrator, settings.timeout)?;
            Ok(Vec::new())
        })?;
        let host = &peers.hosts[world.rank];
        let bad = |e: String| anyhow::anyhow!("collective address: {e}");
        let config = |port: u16| -> anyhow::Result<CollectiveConfig> {
            Ok(CollectiveConfig::default()
                .with_num_devices(1)
                .with_num_nodes(world.world_size as u32)
                .with_global_address(
                    format!("ws://{master}:{orchestrator}")
                        .parse()
                        .map_err(bad)?,
                )
                .with_node_address(format!("ws://{host}:{port}").parse().map_err(bad)?)
                .with_data_service_port(port)
                // Its ring all-reduce slices a tensor differently on different nodes for
                // some lengths (19 against 21 elements of a 40-element sum, measured), and
                // panics.
                .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2)))
        };
        let configs = [config(own[0])?, config(own[1])?];
        let others = (0..world.world_size)
            .filter(|&r| r != world.rank)
            .map(|r| {
                data_ports(world.master_port, peers.local_ranks[r])
                    .map(|port| format!("{}:{port}", peers.hosts[r]))
            })
            .collect();
        Ok(Comm {
            world: world.clone(),
            engine: Engine::Burn(Box::new(Burn {
                configs,
                host: host.clone(),
                own,
                others,
            })),
            liveness: peers.liveness,
            timeout: settings.timeout,
            device: device.clone(),
            calls: Default::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank
    }

    /// One rank and no collective engine: sums are the values themselves.
    pub fn is_solo(&self) -> bool {
        matches!(self.engine, Engine::Solo)
    }

    pub fn world_size(&self) -> usize {
        self.world.world_size
    }

    /// Element-wise sum of `tensor` over every rank, returned to every rank. Fails (on
    /// every rank) when a rank is gone or the others do not arrive within the timeout.
    pub fn all_reduce_sum(&self, tensor: Tensor<B, 1>) -> anyhow::Result<Tensor<B, 1>> {
        let (config, own_host, own, others, call) = match &self.engine {
            Engine::Solo => return Ok(tensor),
            #[cfg(feature = "cuda")]
            Engine::Nccl(nccl) => {
                self.liveness.check()?;
                return nccl.all_reduce_sum(tensor);
            }
            Engine::Burn(burn) => {
                let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let i = (call % 2) as usize;
                let others: Vec<String> = burn.others.iter().map(|o| o[i].clone()).collect();
                let config = burn.configs[i].clone();
                (config, burn.host.clone(), burn.own[i], others, call)
            }
        };
        self.liveness.check()?;
        let peer = PeerId(self.world.rank as u32);
        let device = self.device.clone();
        let (tx, rx) = mpsc::channel();
        let phase = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let at = phase.clone();
        let step = move |p: usize| at.store(p, std::sync::atomic::Ordering::SeqCst);
        std::thread::spawn(move || {
            let run = || -> anyhow::Result<Tensor<B, 1>> {
                let fail = |what: &str, e: burn_collective::CollectiveError| {
                    anyhow::anyhow!("burn-collective {what}: {e:?}")
                };
                // burn-collective neither waits for its last tensor server to let go of
                // the port nor for the others' new servers to listen (a refused
                // connection panics it), so this does both: every rank's old server is
                // gone before it registers, hence a listening port after registration is
                // the new server.
                port_released(&own_host, own)?;
                step(1);
                burn_collective::register::<B>(peer, device, config)
                    .map_err(|e| fail("register", e))?;
                step(2);
                for other in &others {
                    listening(other)?;
                }
                step(3);
                let sum = burn_collective::all_reduce::<B>(
                    peer,
                    tensor.into_primitive().tensor(),
                    ReduceOperation::Sum,
                )
                .map_err(|e| fail("all-reduce", e))?;
                step(4);
                burn_collective::finish_collective::<B>(peer).map_err(|e| fail("finish", e))?;
                Ok(Tensor::from_primitive(TensorPrimitive::Float(sum)))
            };
            tx.send(run()).ok();
        });
        const PHASES: [&str; 5] = [
            "waiting for its tensor port",
            "registering",
            "waiting for the others' tensor servers",
            "all-reduce",
            "finishing",
        ];
        let what = || {
            let at = phase.load(std::sync::atomic::Ordering::SeqCst);
            format!(
                "collective {call} (stuck in burn-collective's {})",
                PHASES[at.min(4)]
            )
        };
        match wait_on(&rx, self.world.rank, self.timeout, &self.liveness, what)? {
            Ok(sum) => {
                // Nobody registers for the next collective before every rank has
                // finished this one: burn-collective's orchestrator counts a rank still
                // registered for the last one as registered for the next and answers
                // early with that rank's old address.
                self.liveness
                    .barrier(call + 1, self.world.world_size, self.timeout)?;
                Ok(sum)
            }
            Err(e) => Err(self.explain(e)),
        }
    }

    /// Every rank's `mine`, in rank order (two all-reduces: the lengths, then the bytes
    /// each in its rank's row).
    pub fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        let (w, r) = (self.world_size(), self.rank());
        if w == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let mut lens = vec![0f32; w];
        lens[r] = mine.len() as f32;
        let lens = self.all_reduce_sum(Tensor::from_floats(lens.as_slice(), &self.device))?;
        let lens: Vec<usize> = to_host(lens).data.into_iter().map(|l| l as usize).collect();
        let width = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut rows = vec![0f32; w * width];
        for (slot, &b) in rows[r * width..].iter_mut().zip(mine) {
            *slot = b as f32;
        }
        let rows = self.all_reduce_sum(Tensor::from_floats(rows.as_slice(), &self.device))?;
        let rows = to_host(rows).data;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                rows[i * width..i * width + n]
                    .iter()
                    .map(|&b| b as u8)
                    .collect()
            })
            .collect())
    }

    /// A failed collective usually means a peer died: burn-collective can see the lost
    /// data connection before the rendezvous watcher sees the closed control connection.
    /// Wait briefly for the watcher, whose reason names the rank; else say what failed.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Err(gone) = self.liveness.check() {
                return gone;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let reason = format!(
            "rank {}: {e:#}; a peer's connection dropped (a rank died or the network failed), every rank stops. Checkpoints on disk are whole: start all ranks again with --resume",
            self.world.rank
        );
        self.liveness.fail(reason.clone());
        anyhow::anyhow!("{reason}")
    }

    /// Stop waiting for the run's end: connections closing from now on are not errors.
    pub fn finish(&self) {
        self.liveness.finish();
    }
}

/// The answer of a worker thread running a collective step, or an error once the
/// liveness fails or `timeout` passes (then every rank is told). `what` names the step
/// for the timeout's message.
pub(super) fn wait_on<T>(
    rx: &mpsc::Receiver<T>,
    rank: usize,
    timeout: Duration,
    liveness: &Liveness,
    what: impl Fn() -> String,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(v) => return Ok(v),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("rank {rank}: the thread running {} died", what())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                liveness.check()?;
                if start.elapsed() > timeout {
                    let reason = format!(
                        "rank {rank}: {} waited {} s for the other ranks (one rank is stuck or too slow: raise train.dist_timeout_s if steps are that long)",
                        what(),
                        timeout.as_secs()
                    );
                    liveness.fail(reason.clone());
                    bail!("{reason}");
                }
            }
        }
    }
}

/// The kernel hands out ports of its ephemeral range as the local ends of outgoing
/// connections, so a run's ports there can be taken at any moment (measured: runs on
/// such ports failed now and then, on ports below it never).
fn warn_if_ephemeral(master_port: u16) {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut bounds = range
        .split_whitespace()
        .filter_map(|b| b.parse::<u32>().ok());
    let (Some(low), Some(high)) = (bounds.next(), bounds.next()) else {
        return;
    };
    let (first, last) = (master_port as u32, master_port as u32 + 17);
    if first <= high && last >= low {
        eprintln!(
            "warning: MASTER_PORT {master_port} and the ports after it lie in this host's ephemeral port range {low}-{high}, where outgoing connections may take them mid-run; choose a port below {low} (torchrun's default is 29500)"
        );
    }
}

/// Waits until this rank's tensor server `host:port` can be bound again (its last server
/// closed).
fn port_released(host: &str, port: u16) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        match std::net::TcpListener::bind((host, port)) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(10) => bail!(
                "port {port} (a tensor server port, MASTER_PORT + 2 + 2 LOCAL_RANK or the next) stayed busy for 10 s: {e}; another program holds it, so pick another MASTER_PORT (or --master-port)"
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Waits until another rank's tensor server at `addr` accepts connections.
fn listening(addr: &str) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let start = Instant::now();
    let target = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| anyhow::anyhow!("tensor server address {addr} does not resolve"))?;
    loop {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                bail!("the tensor server of another rank at {addr} did not listen within 10 s: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// burn-communication installs a tracing subscriber printing every connection at INFO
/// unless one is installed already: install a silent one first (deepspec logs nothing
/// through `tracing`).
fn quiet_collective_logs() {
    tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default()).ok();
}

/// Starts burn-collective's orchestrator on rank 0 and waits until it accepts connections.
fn start_orchestrator(host: &str, port: u16, timeout: Duration) -> anyhow::Result<()> {
    // It would return at once on a port in use, which reads like the signal below.
    if let Err(e) = std::net::TcpListener::bind((host, port)) {
        bail!("rank 0: the collective orchestrator's port {port} (MASTER_PORT + 1) is in use: {e}; choose another MASTER_PORT (or --master-port)");
    }
    let on = host.to_owned();
    std::thread::Builder::new()
        .name("collective-orchestrator".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime for the collective orchestrator");
            runtime.block_on(burn_collective::start_global_orchestrator_on(&on, port));
            // It returns on SIGINT or SIGTERM, which it caught for the whole process:
            // the process stops as the signal meant.
            eprintln!("deepspec train: interrupted");
            std::process::exit(130);
        })?;
    let at = format!("{host}:{port}");
    let start = Instant::now();
    loop {
        if std::net::TcpStream::connect(&at).is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("rank 0: the collective orchestrator did not start on port {port} within {} s (port in use? choose another MASTER_PORT)", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
