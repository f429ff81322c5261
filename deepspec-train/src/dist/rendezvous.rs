//! Rank 0's TCP rendezvous: every other rank connects to `MASTER_ADDR:MASTER_PORT`, says who
//! it is and which job it runs, and gets back every rank's host and what the collective
//! needs (an opaque payload: the NCCL unique id, or nothing). The connections then stay
//! open as the run's liveness channel: a rank that dies closes its socket, rank 0 sees it at
//! once and tells every other rank, so a dead rank becomes an error everywhere instead of a
//! hang inside a collective.
//!
//! One JSON object per line. Rank 0 listens on `MASTER_ADDR` only, never on every interface.

use super::World;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    Hello {
        rank: usize,
        local_rank: usize,
        world: usize,
        job: String,
    },
    Welcome {
        hosts: Vec<String>,
        local_ranks: Vec<usize>,
        payload: Vec<u8>,
    },
    Refused {
        reason: String,
    },
    /// Rank 0 to the others: stop, for this reason.
    Abort {
        reason: String,
    },
    /// A rank that finished cleanly.
    Bye {
        rank: usize,
    },
    /// A rank to rank 0: my first `count` collectives are over.
    Done {
        count: u64,
    },
    /// Rank 0 to the others: every rank's first `count` collectives are over.
    Go {
        count: u64,
    },
}

fn send(stream: &mut TcpStream, message: &Message) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).expect("messages serialize");
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

fn receive(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Option<Message>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(line.trim()).with_context(
        || format!("unreadable rendezvous message {:?}", line.trim()),
    )?))
}

/// Why the run must stop, once any rank knows; shared by the watcher threads and the
/// collective waiting on the other ranks.
#[derive(Clone, Default)]
pub struct Liveness {
    abort: Arc<Mutex<Option<String>>>,
    done: Arc<AtomicBool>,
    /// Rank 0: a writer per other rank (`None` once it said bye). Others: rank 0's.
    writers: Arc<Mutex<Vec<Option<TcpStream>>>>,
    rank: usize,
    /// Barrier counts: rank 0 holds each rank's `Done` (index = rank), the others rank
    /// 0's `Go` (index 0); woken on every change and on a failure.
    counts: Arc<(Mutex<Vec<u64>>, Condvar)>,
}

impl Liveness {
    /// `Err` with the reason once a rank is gone or another rank aborted.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.abort.lock().expect("liveness lock").as_ref() {
            Some(reason) => bail!("{reason}"),
            None => Ok(()),
        }
    }

    /// Returns once every rank has finished its first `count` collectives (rank 0 collects
    /// the others' word and then tells them), or with an error once a rank is gone or
    /// `timeout` passes. A world of one returns at once.
    pub fn barrier(&self, count: u64, world_size: usize, timeout: Duration) -> anyhow::Result<()> {
        if world_size == 1 {
            return Ok(());
        }
        if self.rank != 0 {
            let mut writers = self.writers.lock().expect("liveness lock");
            if let Some(w) = writers.get_mut(0).and_then(Option::as_mut) {
                send(w, &Message::Done { count }).with_context(|| {
                    format!("rank {}: telling rank 0 a collective is over", self.rank)
                })?;
            }
        }
        let ready = |counts: &[u64]| match self.rank {
            0 => counts.len() >= world_size && counts[1..world_size].iter().all(|&c| c >= count),
            _ => counts.first().is_some_and(|&c| c >= count),
        };
        let start = Instant::now();
        let (lock, changed) = &*self.counts;
        let mut counts = lock.lock().expect("barrier lock");
        while !ready(&counts) {
            self.check()?;
            if start.elapsed() > timeout {
                let reason = format!(
                    "rank {}: waited {} s for the other ranks to finish a collective (one is stuck or too slow: raise train.dist_timeout_s if steps are that long)",
                    self.rank,
                    timeout.as_secs()
                );
                self.fail(reason.clone());
                bail!("{reason}");
            }
            counts = changed
                .wait_timeout(counts, Duration::from_millis(50))
                .expect("barrier lock")
                .0;
        }
        drop(counts);
        if self.rank == 0 {
            let mut writers = self.writers.lock().expect("liveness lock");
            for w in writers.iter_mut().flatten() {
                send(w, &Message::Go { count }).context("rank 0: telling the ranks to go on")?;
            }
        }
        Ok(())
    }

    /// Records a barrier count (`slot`: the sending rank on rank 0, 0 elsewhere).
    fn count(&self, slot: usize, count: u64) {
        let (lock, changed) = &*self.counts;
        let mut counts = lock.lock().expect("barrier lock");
        if counts.len() <= slot {
            counts.resize(slot + 1, 0);
        }
        counts[slot] = counts[slot].max(count);
        changed.notify_all();
    }

    /// Records the first reason to stop; rank 0 passes it on to every other rank.
    pub fn fail(&self, reason: String) {
        if self.done.load(Ordering::SeqCst) {
            return;
        }
        let mut abort = self.abort.lock().expect("liveness lock");
        if abort.is_some() {
            return;
        }
        *abort = Some(reason.clone());
        drop(abort);
        self.counts.1.notify_all();
        if self.rank == 0 {
            let mut writers = self.writers.lock().expect("liveness lock");
            for w in writers.iter_mut().flatten() {
                send(
                    w,
                    &Message::Abort {
                        reason: reason.clone(),
                    },
                )
                .ok();
            }
        }
    }

    /// This rank finished cleanly: closing connections is no longer an error.
    pub fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        let mut writers = self.writers.lock().expect("liveness lock");
        if self.rank != 0 {
            for w in writers.iter_mut().flatten() {
                send(w, &Message::Bye { rank: self.rank }).ok();
            }
        }
        writers.clear();
    }
}

/// What the rendezvous hands every rank.
pub struct Peers {
    /// Each rank's host, as rank 0's listener saw its connection (rank 0: `MASTER_ADDR`).
    pub hosts: Vec<String>,
    /// Each rank's `LOCAL_RANK` (which ports it serves on its host).
    pub local_ranks: Vec<usize>,
    /// What rank 0's `prepare` returned.
    pub payload: Vec<u8>,
    pub liveness: Liveness,
}

fn endpoint(world: &World) -> String {
    format!("{}:{}", world.master_addr, world.master_port)
}

/// Meets the other ranks. Rank 0 runs `prepare` (e.g. starts what the collective connects
/// to, or makes the NCCL id) once every rank has joined and before it welcomes them. `job`
/// must be equal on every rank (a digest of the recipe and data): ranks of different jobs
/// are refused.
pub fn rendezvous(
    world: &World,
    job: &str,
    timeout: Duration,
    prepare: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Peers> {
    if world.world_size == 1 {
        return Ok(Peers {
            hosts: vec![world.master_addr.clone()],
            local_ranks: vec![world.local_rank],
            payload: prepare()?,
            liveness: Liveness::default(),
        });
    }
    if world.is_main() {
        serve(world, job, timeout, prepare)
    } else {
        join(world, job, timeout)
    }
}

fn serve(
    world: &World,
    job: &str,
    timeout: Duration,
    prepare: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Peers> {
    let at = endpoint(world);
    let listener = TcpListener::bind(&at).with_context(|| {
        format!(
            "rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = {at} (address not on this host, or the port in use: choose another MASTER_PORT)"
        )
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let n = world.world_size;
    let mut joined: Vec<Option<(TcpStream, String, usize)>> = (0..n).map(|_| None).collect();
    while joined.iter().skip(1).any(Option::is_none) {
        let (stream, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..n)
                        .filter(|&r| joined[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    bail!(
                        "rendezvous on {at}: rank(s) {} of {n} did not join within {} s; start them with WORLD_SIZE={n}, MASTER_ADDR={}, MASTER_PORT={} (or raise train.dist_timeout_s)",
                        missing.join(", "),
                        timeout.as_secs(),
                        world.master_addr,
                        world.master_port
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("rendezvous on {at}: accept")),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        ))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut stream = stream;
        let hello = receive(&mut reader)
            .with_context(|| format!("rendezvous on {at}: reading the hello of {addr}"))?;
        let (rank, local_rank, size, theirs) = match hello {
            Some(Message::Hello {
                rank,
                local_rank,
                world,
                job,
            }) => (rank, local_rank, world, job),
            other => bail!("rendezvous on {at}: {addr} sent {other:?} instead of a hello (is another program using MASTER_PORT?)"),
        };
        let refuse = |stream: &mut TcpStream, reason: String| -> anyhow::Error {
            send(
                stream,
                &Message::Refused {
                    reason: reason.clone(),
                },
            )
            .ok();
            anyhow::anyhow!("rendezvous on {at}: {reason}")
        };
        if size != n {
            return Err(refuse(
                &mut stream,
                format!("rank {rank} at {addr} says WORLD_SIZE={size}, rank 0 has {n}"),
            ));
        }
        if theirs != job {
            return Err(refuse(&mut stream, format!("rank {rank} at {addr} runs another job (recipe, settings or data differ: job {theirs} vs rank 0's {job}); launch every rank with the same command")));
        }
        if rank == 0 || rank >= n || joined[rank].is_some() {
            return Err(refuse(&mut stream, format!("rank {rank} at {addr} joined twice or is out of range 1..{n}: give every process its own RANK")));
        }
        joined[rank] = Some((stream, addr.ip().to_string(), local_rank));
    }
    let payload = prepare()?;
    let mut hosts = vec![world.master_addr.clone()];
    hosts.extend(
        joined
            .iter()
            .skip(1)
            .map(|j| j.as_ref().expect("joined").1.clone()),
    );
    let mut local_ranks = vec![world.local_rank];
    local_ranks.extend(joined.iter().skip(1).map(|j| j.as_ref().expect("joined").2));
    let welcome = Message::Welcome {
        hosts: hosts.clone(),
        local_ranks: local_ranks.clone(),
        payload: payload.clone(),
    };
    let liveness = Liveness {
        rank: 0,
        ..Liveness::default()
    };
    let mut writers = Vec::new();
    for (rank, entry) in joined.into_iter().enumerate().skip(1) {
        let (mut stream, host, _) = entry.expect("joined");
        send(&mut stream, &welcome)
            .with_context(|| format!("rendezvous on {at}: welcoming rank {rank} at {host}"))?;
        stream.set_read_timeout(None)?;
        let reader = BufReader::new(stream.try_clone()?);
        writers.push(Some(stream));
        let watch = liveness.clone();
        std::thread::spawn(move || watch_rank(reader, rank, n, host, watch));
    }
    *liveness.writers.lock().expect("liveness lock") = writers;
    Ok(Peers {
        hosts,
        local_ranks,
        payload,
        liveness,
    })
}

/// Rank 0's watch over one other rank's connection.
fn watch_rank(
    mut reader: BufReader<TcpStream>,
    rank: usize,
    n: usize,
    host: String,
    live: Liveness,
) {
    loop {
        match receive(&mut reader) {
            Ok(Some(Message::Bye { .. })) => {
                let mut writers = live.writers.lock().expect("liveness lock");
                if let Some(w) = writers.get_mut(rank - 1) {
                    *w = None;
                }
                return;
            }
            Ok(Some(Message::Done { count })) => live.count(rank, count),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                live.fail(format!(
                    "rank {rank} of {n} (on {host}) is gone: its connection to rank 0 closed mid-run (killed or crashed); every rank stops. Checkpoints on disk are whole: start all ranks again with --resume"
                ));
                return;
            }
        }
    }
}

fn join(world: &World, job: &str, timeout: Duration) -> anyhow::Result<Peers> {
    let at = endpoint(world);
    let deadline = Instant::now() + timeout;
    let rank = world.rank;
    let mut stream = loop {
        let addrs: Vec<_> = at
            .to_socket_addrs()
            .with_context(|| {
                format!("rank {rank}: MASTER_ADDR:MASTER_PORT = {at} does not resolve")
            })?
            .collect();
        if let Some(s) = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok())
        {
            break s;
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {rank}: could not reach rank 0's rendezvous at {at} within {} s (is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?)",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    send(
        &mut stream,
        &Message::Hello {
            rank,
            local_rank: world.local_rank,
            world: world.world_size,
            job: job.to_string(),
        },
    )
    .with_context(|| format!("rank {rank}: saying hello to {at}"))?;
    stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1)),
    ))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let (hosts, local_ranks, payload) = match receive(&mut reader)
        .with_context(|| format!("rank {rank}: waiting for rank 0 at {at} to welcome every rank"))?
    {
        Some(Message::Welcome {
            hosts,
            local_ranks,
            payload,
        }) => (hosts, local_ranks, payload),
        Some(Message::Refused { reason }) => {
            bail!("rank {rank}: rank 0 refused this rank: {reason}")
        }
        other => bail!("rank {rank}: rank 0 at {at} answered {other:?} instead of a welcome"),
    };
    stream.set_read_timeout(None)?;
    let liveness = Liveness {
        rank,
        ..Liveness::default()
    };
    *liveness.writers.lock().expect("liveness lock") = vec![Some(stream)];
    let watch = liveness.clone();
    std::thread::spawn(move || loop {
        match receive(&mut reader) {
            Ok(Some(Message::Abort { reason })) => {
                watch.fail(format!("rank 0 stopped the run: {reason}"));
                return;
            }
            Ok(Some(Message::Go { count })) => watch.count(0, count),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                watch.fail(
                    "rank 0 is gone: its connection closed mid-run (killed or crashed); every rank stops. Checkpoints on disk are whole: start all ranks again with --resume".to_string(),
                );
                return;
            }
        }
    });
    Ok(Peers {
        hosts,
        local_ranks,
        payload,
        liveness,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn world(rank: usize, size: usize, port: u16) -> World {
        World {
            rank,
            world_size: size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: super::super::Launcher::Torchrun,
        }
    }

    #[test]
    fn ranks_meet_and_a_dead_rank_stops_the_others() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let others: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    rendezvous(&world(r, 3, port), "job", t, || unreachable!())
                })
            })
            .collect();
        let zero = rendezvous(&world(0, 3, port), "job", t, || Ok(vec![7, 8])).unwrap();
        let mut others: Vec<Peers> = others
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        for p in &others {
            assert_eq!(p.payload, vec![7, 8]);
            assert_eq!(p.hosts.len(), 3);
            p.liveness.check().unwrap();
        }
        // Rank 1 leaves without a bye (as if killed): rank 0 and rank 2 both learn it.
        let one = others.remove(0);
        // Its watcher thread holds a clone of the socket: shut the socket itself down.
        for w in one.liveness.writers.lock().unwrap().drain(..).flatten() {
            w.shutdown(std::net::Shutdown::Both).unwrap();
        }
        drop(one);
        let wait = |l: &Liveness| {
            let start = Instant::now();
            while l.check().is_ok() && start.elapsed() < t {
                std::thread::sleep(Duration::from_millis(10));
            }
            l.check().unwrap_err().to_string()
        };
        let e0 = wait(&zero.liveness);
        assert!(
            e0.contains("rank 1 of 3") && e0.contains("--resume"),
            "{e0}"
        );
        let e2 = wait(&others[0].liveness);
        assert!(e2.contains("rank 0 stopped the run: rank 1 of 3"), "{e2}");
    }

    #[test]
    fn the_barrier_waits_for_every_rank_and_fails_on_a_dead_one() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let join = |rank: usize| {
            std::thread::spawn(move || {
                rendezvous(&world(rank, 3, port), "job", t, || unreachable!())
            })
        };
        let (one, two) = (join(1), join(2));
        let zero = rendezvous(&world(0, 3, port), "job", t, || Ok(vec![])).unwrap();
        let (one, two) = (one.join().unwrap().unwrap(), two.join().unwrap().unwrap());
        // Rank 2 arrives 300 ms late: nobody leaves the barrier before it.
        let start = Instant::now();
        let late = {
            let l = two.liveness.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                l.barrier(1, 3, t)
            })
        };
        let first = {
            let l = one.liveness.clone();
            std::thread::spawn(move || l.barrier(1, 3, t).map(|_| start.elapsed()))
        };
        zero.liveness.barrier(1, 3, t).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(first.join().unwrap().unwrap() >= Duration::from_millis(300));
        late.join().unwrap().unwrap();
        // A second round, then rank 2 dies: the others' barrier fails naming it.
        let l = one.liveness.clone();
        let waiting = std::thread::spawn(move || l.barrier(2, 3, t));
        std::thread::sleep(Duration::from_millis(100));
        // As if killed (its watcher holds a clone of the socket: shut the socket down).
        for w in two.liveness.writers.lock().unwrap().drain(..).flatten() {
            w.shutdown(std::net::Shutdown::Both).unwrap();
        }
        drop(two);
        let e = zero.liveness.barrier(2, 3, t).unwrap_err().to_string();
        assert!(e.contains("rank 2 of 3"), "{e}");
        let e = waiting.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 2 of 3"), "{e}");
    }

    #[test]
    fn a_clean_finish_is_not_an_error_and_missing_ranks_are_named() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let one =
            std::thread::spawn(move || rendezvous(&world(1, 2, port), "job", t, || unreachable!()));
        let zero = rendezvous(&world(0, 2, port), "job", t, || Ok(vec![])).unwrap();
        let one = one.join().unwrap().unwrap();
        one.liveness.finish();
        drop(one);
        std::thread::sleep(Duration::from_millis(200));
        zero.liveness.check().unwrap();

        let port = free_port();
        let e = rendezvous(
            &world(0, 3, port),
            "job",
            Duration::from_millis(300),
            || Ok(vec![]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("rank(s) 1, 2 of 3 did not join"), "{e}");
        let e = rendezvous(
            &world(1, 2, free_port()),
            "job",
            Duration::from_millis(300),
            || Ok(vec![]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("could not reach rank 0's rendezvous"), "{e}");
    }

    #[test]
    fn a_rank_of_another_job_is_refused() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let one = std::thread::spawn(move || {
            rendezvous(&world(1, 2, port), "other", t, || unreachable!())
        });
        let e0 = rendezvous(&world(0, 2, port), "job", t, || Ok(vec![]))
            .err()
            .unwrap()
            .to_string();
        assert!(e0.contains("runs another job"), "{e0}");
        let e1 = one.join().unwrap().err().unwrap().to_string();
        assert!(e1.contains("rank 0 refused this rank"), "{e1}");
    }
}
