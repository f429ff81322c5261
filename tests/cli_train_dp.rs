//! Data-parallel `deepspec train` on the CPU over loopback: two ranks train the model one
//! rank trains (same global batch), a killed rank stops the other and the run resumes
//! bit-exactly, a two-rank checkpoint continues on one rank, the rendezvous' errors, and
//! every server listens on the given address only.

use deepspec_core::fixtures::{golden_dir, workspace_root};
use deepspec_core::io::safetensors::SafetensorsFile;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn deepspec(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepspec"));
    c.args(args).current_dir(workspace_root());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// A recipe for the golden target training DSpark on its 2-sample cache, one sample per
/// micro-batch and two per optimizer step.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let golden = golden_dir();
    let cache = dir.join("cache");
    ok(deepspec(
        &[
            "cache",
            "import-deepspec",
            golden.join("cache").to_str().unwrap(),
            cache.to_str().unwrap(),
        ],
        &[],
    ));
    let recipe = dir.join("golden-dspark.toml");
    std::fs::write(
        &recipe,
        format!(
            "seed = 42\n[model]\ntarget_model_name_or_path = \"{}\"\ntarget_layer_ids = [0, 1, 2, 3, 4]\n\
             algorithm = \"dspark\"\nnum_draft_layers = 2\nmask_token_id = 511\nnum_anchors = 8\nmarkov_rank = 16\n\
             confidence_head_alpha = 1.0\nce_loss_alpha = 0.1\nl1_loss_alpha = 0.9\n\
             [train]\nprecision = \"fp32\"\nlr = 3e-3\nlocal_batch_size = 1\nglobal_batch_size = 2\nmax_train_steps = 4\n\
             dist_timeout_s = 20\n\
             [logging]\nlogging_steps = 1\ncheckpointing_steps = 2\n",
            golden.join("target").display()
        ),
    )
    .unwrap();
    (recipe, cache)
}

/// A base port with it and the next five free (rendezvous, orchestrator, two tensor
/// servers for each of two ranks).
/// A base of six free ports below the kernel's ephemeral range (32768 and up here): a
/// port in that range can be taken at any moment as the local end of some connection,
/// which is what made the runs here fail now and then.
fn free_ports() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let spread = (std::process::id() % 500) as u16 * 16;
    for _ in 0..500 {
        let step = NEXT.fetch_add(8, Ordering::SeqCst);
        let base = 20000 + (spread + step) % 12000;
        if (0..6).all(|i| TcpListener::bind(("0.0.0.0", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no six free ports in a row below 32000");
}

fn train_args<'a>(
    recipe: &'a Path,
    cache: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs `command`, which must succeed; its output.
fn ok(mut command: Command) -> Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One rank of a world started the way torchrun starts it.
fn rank(args: &[&str], rank: usize, world: usize, port: u16) -> Child {
    deepspec(
        args,
        &[
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// The largest difference between two checkpoints' tensors, relative to the largest value.
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let fa = SafetensorsFile::open(a.join("step_latest/model.safetensors")).unwrap();
    let fb = SafetensorsFile::open(b.join("step_latest/model.safetensors")).unwrap();
    let names: Vec<String> = fa.tensor_names().cloned().collect();
    assert_eq!(names.len(), fb.tensor_names().count());
    let mut worst: f64 = 0.0;
    for name in names {
        let (x, y) = (fa.f32(&name).unwrap(), fb.f32(&name).unwrap());
        assert_eq!(x.shape, y.shape, "{name}");
        let scale = x.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
        for (p, q) in x.data.iter().zip(&y.data) {
            worst = worst.max((p - q).abs() as f64 / scale);
        }
    }
    worst
}

fn assert_same_curve(a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        assert!(
            (x.1 - y.1).abs() <= 1e-6 * x.1.abs().max(1.0),
            "step {}: loss {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
}

#[test]
fn two_ranks_train_what_one_rank_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let one = dir.path().join("one");
    ok(deepspec(&train_args(&recipe, &cache, &one, &[]), &[]));
    let two = dir.path().join("two");
    let port = free_ports().to_string();
    let out = ok(deepspec(
        &train_args(
            &recipe,
            &cache,
            &two,
            &["--nproc-per-node", "2", "--master-port", &port],
        ),
        &[],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("on 2 ranks"), "{stderr}");
    // One summary line, from rank 0.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("trained 4 steps").count(), 1, "{stdout}");
    // burn-collective's line per collective stays out of the launcher's stdout.
    assert!(!stdout.contains("Connecting to"), "{stdout}");
    let worst = max_relative_difference(&one, &two);
    assert!(worst <= 1e-6, "parameters differ by {worst:e} (relative)");
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 4);
    assert_same_curve(&a, &b);
}

#[test]
fn a_killed_rank_stops_the_other_and_the_run_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    // 16 steps (enough to kill a rank mid-run) with metrics every 8 (fewer collectives,
    // a quicker test).
    let long = [
        "--set",
        "train.max_train_steps=16",
        "--set",
        "logging.checkpointing_steps=1",
        "--set",
        "logging.logging_steps=8",
    ];
    let whole = dir.path().join("whole");
    let port = free_ports().to_string();
    let mut spawn = long.to_vec();
    spawn.extend(["--nproc-per-node", "2", "--master-port", &port]);
    ok(deepspec(&train_args(&recipe, &cache, &whole, &spawn), &[]));

    let parts = dir.path().join("parts");
    let port = free_ports();
    let args = train_args(&recipe, &cache, &parts, &long);
    let zero = rank(&args, 0, 2, port);
    let mut one = rank(&args, 1, 2, port);
    let start = Instant::now();
    while !parts.join("step_2").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    one.kill().unwrap(); // SIGKILL
    one.wait().unwrap();
    let stopped = Instant::now();
    let out = zero.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "rank 0 finished although rank 1 was killed"
    );
    assert!(
        stderr.contains("rank 1 of 2") && stderr.contains("--resume"),
        "{stderr}"
    );
    // Well within the 20 s timeout: the closed connection, not the timeout, stopped it.
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopped.elapsed()
    );
    let latest = std::fs::read_link(parts.join("step_latest")).unwrap();
    assert_ne!(
        latest,
        PathBuf::from("step_16"),
        "the run finished before the kill"
    );

    let port = free_ports().to_string();
    let mut resume = long.to_vec();
    resume.extend(["--nproc-per-node", "2", "--master-port", &port, "--resume"]);
    ok(deepspec(&train_args(&recipe, &cache, &parts, &resume), &[]));
    let a = std::fs::read(whole.join("step_latest/model.safetensors")).unwrap();
    let b = std::fs::read(parts.join("step_latest/model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed two-rank run differs from the uninterrupted one"
    );
}

#[test]
fn a_two_rank_checkpoint_continues_on_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let one = dir.path().join("one");
    ok(deepspec(&train_args(&recipe, &cache, &one, &[]), &[]));
    let mixed = dir.path().join("mixed");
    let port = free_ports().to_string();
    ok(deepspec(
        &train_args(
            &recipe,
            &cache,
            &mixed,
            &[
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
                "--stop-after",
                "2",
            ],
        ),
        &[],
    ));
    ok(deepspec(
        &train_args(&recipe, &cache, &mixed, &["--resume"]),
        &[],
    ));
    let worst = max_relative_difference(&one, &mixed);
    assert!(worst <= 1e-6, "parameters differ by {worst:e} (relative)");
    assert_same_curve(&losses(&one), &losses(&mixed));
}

#[test]
fn rendezvous_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let port = free_ports();
    let quick = ["--set", "train.dist_timeout_s=2"];
    // Rank 1 of 2 never starts.
    let out = rank(
        &train_args(&recipe, &cache, &dir.path().join("a"), &quick),
        0,
        2,
        port,
    )
    .wait_with_output()
    .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("rank(s) 1 of 2 did not join within 2 s"), "{e}");
    // A rank of another job (other settings) is refused on both sides.
    let port = free_ports();
    let out_dir = dir.path().join("b");
    let zero = rank(&train_args(&recipe, &cache, &out_dir, &quick), 0, 2, port);
    let other = ["--set", "train.dist_timeout_s=2", "--set", "train.lr=1e-3"];
    let one = rank(&train_args(&recipe, &cache, &out_dir, &other), 1, 2, port);
    let (z, o) = (
        zero.wait_with_output().unwrap(),
        one.wait_with_output().unwrap(),
    );
    let (ez, eo) = (
        String::from_utf8_lossy(&z.stderr),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(ez.contains("runs another job"), "{ez}");
    assert!(eo.contains("rank 0 refused this rank"), "{eo}");
    // A global batch the ranks cannot split evenly.
    let port = free_ports().to_string();
    let out = deepspec(
        &train_args(
            &recipe,
            &cache,
            &dir.path().join("c"),
            &["--nproc-per-node", "3", "--master-port", &port],
        ),
        &[],
    )
    .output()
    .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("local_batch_size × ranks (1 × 3)"), "{e}");
}

/// The CPU form of the one-rank check docs/distributed.md gives for NCCL: naming the
/// engine runs the whole path (rendezvous, buckets in module order, the all-reduce,
/// splitting back) in a world of one, which must train exactly what a plain run trains;
/// an unknown engine is refused by name.
#[test]
fn a_named_engine_in_a_world_of_one_trains_what_a_plain_run_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let plain = dir.path().join("plain");
    ok(deepspec(&train_args(&recipe, &cache, &plain, &[]), &[]));
    let named = dir.path().join("named");
    let port = free_ports().to_string();
    let env = [
        ("DEEPSPEC_DIST_ENGINE", "burn-collective".to_string()),
        ("RANK", "0".into()),
        ("WORLD_SIZE", "1".into()),
        ("MASTER_PORT", port),
    ];
    ok(deepspec(&train_args(&recipe, &cache, &named, &[]), &env));
    assert_eq!(max_relative_difference(&plain, &named), 0.0);
    assert_eq!(losses(&plain), losses(&named));

    let out = deepspec(
        &train_args(&recipe, &cache, &dir.path().join("bad"), &[]),
        &[("DEEPSPEC_DIST_ENGINE", "mpi".to_string())],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("DEEPSPEC_DIST_ENGINE=mpi") && stderr.contains("burn-collective"),
        "{stderr}"
    );
    let out = deepspec(
        &train_args(&recipe, &cache, &dir.path().join("cpu-nccl"), &[]),
        &[("DEEPSPEC_DIST_ENGINE", "nccl".to_string())],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs a CUDA device"), "{stderr}");
}

/// The listening TCP sockets on ports `ports` right now: (port, local address as
/// /proc/net/tcp{,6} writes it, hex).
#[cfg(target_os = "linux")]
fn listeners(ports: std::ops::Range<u16>) -> Vec<(u16, String)> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let Some((addr, port)) = local.split_once(':') else {
                continue;
            };
            let port = u16::from_str_radix(port, 16).unwrap();
            if *state == "0A" && ports.contains(&port) {
                found.push((port, addr.to_owned()));
            }
        }
    }
    found
}

#[cfg(target_os = "linux")]
#[test]
fn every_server_listens_on_the_given_address_only() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let base = free_ports();
    let port = base.to_string();
    let out = dir.path().join("out");
    let args = train_args(
        &recipe,
        &cache,
        &out,
        &[
            "--set",
            "train.max_train_steps=8",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
        ],
    );
    // Its stderr goes to a file: a pipe nobody reads while polling could fill and stall it.
    let log = dir.path().join("stderr.log");
    let mut run = deepspec(&args, &[])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while run.try_wait().unwrap().is_none() {
        seen.extend(listeners(base..base + 6));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        run.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The orchestrator (base + 1, the whole run) and tensor servers (base + 2.., during
    // collectives) were seen listening (the rendezvous, base, closes once the ranks have
    // joined and may be missed), all on 127.0.0.1 (--nproc-per-node's MASTER_ADDR):
    // 0100007F.
    let ports: std::collections::BTreeSet<u16> = seen.iter().map(|(p, _)| *p).collect();
    assert!(ports.contains(&(base + 1)), "{seen:?}");
    assert!(ports.iter().any(|&p| p >= base + 2), "{seen:?}");
    assert!(
        seen.iter().all(|(_, addr)| addr == "0100007F"),
        "a server listened beyond 127.0.0.1: {seen:?}"
    );
}
