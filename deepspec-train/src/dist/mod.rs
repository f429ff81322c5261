//! Data-parallel training across processes: who this process is ([`World`], from torchrun's,
//! Slurm's or our own launcher's environment), how the ranks find each other
//! ([`rendezvous`]), and the collective that sums their gradients ([`collective`], over
//! [`grads`]' fixed parameter order). `docs/distributed.md` is the user's guide.

pub mod collective;
pub mod grads;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;

use anyhow::{bail, Context};
use std::time::Duration;

/// The port rank 0's rendezvous listens on when the environment names none (torchrun's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where a world came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// One process, no environment.
    Single,
    /// torchrun (or anything else that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`).
    Torchrun,
    /// `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`.
    Slurm,
}

/// This process's place among the training processes. `rank` is the global process rank
/// (one process per device), `world_size` the number of processes: torchrun's meaning. The
/// reference's launcher reads `RANK`/`WORLD_SIZE` as node rank and node count instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this machine (the device index on a GPU node).
    pub local_rank: usize,
    /// Rank 0's host: its rendezvous listens there, and only there.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

impl World {
    pub fn single() -> World {
        World {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            launcher: Launcher::Single,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The world the environment describes: torchrun's variables first, then Slurm's, else
    /// one process. `env` reads a variable (`std::env::var` in the binary).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<World> {
        let number = |name: &str| -> anyhow::Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).with_context(|| {
                    format!("environment variable {name}={v:?} is not a non-negative integer")
                }),
            }
        };
        let port = || -> anyhow::Result<u16> {
            match env("MASTER_PORT") {
                None => Ok(DEFAULT_MASTER_PORT),
                Some(v) => v.trim().parse().with_context(|| {
                    format!("environment variable MASTER_PORT={v:?} is not a port number")
                }),
            }
        };
        let world = if let (Some(rank), Some(size)) = (number("RANK")?, number("WORLD_SIZE")?) {
            let master_addr = match env("MASTER_ADDR") {
                Some(a) => a,
                None if size == 1 => "127.0.0.1".into(),
                None => bail!(
                    "RANK and WORLD_SIZE are set but MASTER_ADDR is not: set MASTER_ADDR (and MASTER_PORT) to rank 0's host, as torchrun does"
                ),
            };
            World {
                rank,
                world_size: size,
                local_rank: number("LOCAL_RANK")?.unwrap_or(rank),
                master_addr,
                master_port: port()?,
                launcher: Launcher::Torchrun,
            }
        } else if let (Some(rank), Some(size)) = (number("SLURM_PROCID")?, number("SLURM_NTASKS")?)
        {
            let nodes = env("SLURM_STEP_NODELIST")
                .or_else(|| env("SLURM_JOB_NODELIST"))
                .or_else(|| env("SLURM_NODELIST"));
            let master_addr = match (env("MASTER_ADDR"), nodes) {
                (Some(a), _) => a,
                (None, Some(list)) => first_host(&list).with_context(|| {
                    format!("reading the first host of SLURM_JOB_NODELIST={list:?}")
                })?,
                (None, None) if size == 1 => "127.0.0.1".into(),
                (None, None) => bail!(
                    "SLURM_PROCID and SLURM_NTASKS are set but no node list (SLURM_JOB_NODELIST) nor MASTER_ADDR: run under srun, or set MASTER_ADDR"
                ),
            };
            World {
                rank,
                world_size: size,
                local_rank: number("SLURM_LOCALID")?.unwrap_or(0),
                master_addr,
                master_port: port()?,
                launcher: Launcher::Slurm,
            }
        } else {
            World::single()
        };
        if world.world_size == 0 || world.rank >= world.world_size {
            bail!(
                "rank {} is not below the world size {}: check RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS)",
                world.rank,
                world.world_size
            );
        }
        Ok(world)
    }
}

/// The first host of a Slurm node list: `gpu[03-05,07],cpu1` → `gpu03`.
pub fn first_host(list: &str) -> anyhow::Result<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let close = inner
            .find(']')
            .with_context(|| format!("`{list}` opens a [ range it does not close"))?;
        let first = inner[..close]
            .split([',', '-'])
            .next()
            .filter(|s| !s.is_empty())
            .with_context(|| format!("`{list}` has an empty [] range"))?;
        return Ok(format!("{prefix}{first}"));
    }
    if prefix.is_empty() {
        bail!("empty node list");
    }
    Ok(prefix.to_string())
}

/// How gradients travel between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceDtype {
    F32,
    /// Halves the bytes on the wire, as the reference's FSDP `reduce_dtype`; sums are
    /// rounded to bf16.
    Bf16,
}

impl std::str::FromStr for ReduceDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" | "f32" | "float32" => Ok(ReduceDtype::F32),
            "bf16" | "bfloat16" => Ok(ReduceDtype::Bf16),
            other => Err(format!("`{other}` is not a reduce dtype: use fp32 or bf16")),
        }
    }
}

/// The distributed part of a run's settings (recipe `[train]`: `allreduce_dtype`,
/// `allreduce_bucket_mb`, `dist_timeout_s`).
#[derive(Debug, Clone, PartialEq)]
pub struct DistSettings {
    pub reduce_dtype: ReduceDtype,
    /// Gradient elements per all-reduce bucket.
    pub bucket_elements: usize,
    /// How long a rank waits for the others (rendezvous, one collective) before it stops
    /// with an error.
    pub timeout: Duration,
}

impl Default for DistSettings {
    fn default() -> Self {
        DistSettings {
            reduce_dtype: ReduceDtype::F32,
            bucket_elements: 25 << 20 >> 2,
            timeout: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> anyhow::Result<World> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_env(&|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_then_slurm_then_single() {
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "1234"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
        ])
        .unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_rank, w.master_port),
            (3, 8, 1, 1234)
        );
        assert_eq!(w.launcher, Launcher::Torchrun);
        let w = world(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-05,07],cpu1"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (5, 16, 1));
        assert_eq!(w.master_addr, "gpu03");
        assert_eq!(w.master_port, DEFAULT_MASTER_PORT);
        assert_eq!(world(&[]).unwrap(), World::single());
    }

    #[test]
    fn bad_environments_are_named() {
        let e = world(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 2 is not below the world size 2"),
            "{e}"
        );
        let e = world(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        let e = world(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{e:#}").contains("RANK=\"x\""), "{e:#}");
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("node7").unwrap(), "node7");
        assert_eq!(first_host("a1,a2").unwrap(), "a1");
        assert_eq!(first_host("gpu[12,15-16]").unwrap(), "gpu12");
        assert!(first_host("gpu[1-2").is_err());
    }
}
