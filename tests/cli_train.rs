//! `deepspec train` from the command line on the golden target and its reference cache
//! (imported): TensorBoard output read back by Python's `tensorboard`, kill -9 and resume,
//! and the errors a user meets.

use deepspec_core::fixtures::{golden_dir, workspace_root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn deepspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap()
}

/// A recipe for the golden target (tiny Qwen3) training DSpark on its 2-sample cache.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let golden = golden_dir();
    let cache = dir.join("cache");
    let out = deepspec(&[
        "cache",
        "import-deepspec",
        golden.join("cache").to_str().unwrap(),
        cache.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recipe = dir.join("golden-dspark.toml");
    std::fs::write(
        &recipe,
        format!(
            "seed = 42\n[model]\ntarget_model_name_or_path = \"{}\"\ntarget_layer_ids = [0, 1, 2, 3, 4]\n\
             algorithm = \"dspark\"\nnum_draft_layers = 2\nmask_token_id = 511\nnum_anchors = 8\nmarkov_rank = 16\n\
             confidence_head_alpha = 1.0\nce_loss_alpha = 0.1\nl1_loss_alpha = 0.9\n\
             [train]\nprecision = \"fp32\"\nlr = 3e-3\nglobal_batch_size = 2\nmax_train_steps = 12\n\
             [logging]\nlogging_steps = 2\ncheckpointing_steps = 2\n",
            golden.join("target").display()
        ),
    )
    .unwrap();
    (recipe, cache)
}

fn train(recipe: &Path, cache: &Path, out: &Path, extra: &[&str]) -> Output {
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
    deepspec(&args)
}

#[test]
fn tensorboard_file_reads_back_with_the_expected_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let out = dir.path().join("run");
    let result = train(&recipe, &cache, &out, &["--set", "train.max_train_steps=6"]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let script = r#"
import sys, glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
tags = acc.Tags()["scalars"]
for t in sorted(tags):
    print(t, len(acc.Scalars(t)), acc.Scalars(t)[-1].step)
"#;
    let py = Command::new("python3")
        .args(["-c", script, out.join("tensorboard").to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&py.stdout);
    assert!(
        py.status.success(),
        "python tensorboard reader failed: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/ce_loss",
        "train/l1_loss",
        "train/confidence_loss",
        "train/accept_rate@0",
        "train/tau_probabilistic",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{tag} ")))
            .unwrap_or_else(|| panic!("{tag} missing:\n{text}"));
        // Logged every 2 steps over 6 steps: 3 points, the last at step 6.
        assert!(line.ends_with(" 3 6"), "{line}");
    }
}

#[test]
fn killed_and_resumed_run_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let steps = [
        "--set",
        "train.max_train_steps=120",
        "--set",
        "logging.checkpointing_steps=5",
    ];
    let whole = dir.path().join("whole");
    assert!(train(&recipe, &cache, &whole, &steps).status.success());
    let parts = dir.path().join("parts");
    let mut kills = 0;
    for delay_ms in [700u64, 1100, 500] {
        let mut args = vec![
            "train",
            "--recipe",
            recipe.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--out",
            parts.to_str().unwrap(),
        ];
        args.extend_from_slice(&steps);
        if parts.join("step_latest").exists() {
            args.push("--resume");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_deepspec"))
            .args(&args)
            .current_dir(workspace_root())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    let mut extra = steps.to_vec();
    if parts.join("step_latest").exists() {
        extra.push("--resume");
    }
    let result = train(&recipe, &cache, &parts, &extra);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(kills > 0, "no run was killed: make the delays shorter");
    let a = std::fs::read(whole.join("step_latest/model.safetensors")).unwrap();
    let b = std::fs::read(parts.join("step_latest/model.safetensors")).unwrap();
    assert!(a == b, "resumed run differs from the uninterrupted one");
}

#[test]
fn bad_inputs_give_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let out = dir.path().join("run");
    let stderr = |o: Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let e = stderr(train(&recipe, &dir.path().join("nope"), &out, &[]));
    assert!(
        e.contains("nope") && e.contains("not a prepared cache"),
        "{e}"
    );

    let e = stderr(train(
        &recipe,
        &cache,
        &out,
        &["--set", "model.target_layer_ids=[0, 1, 2]"],
    ));
    assert!(
        e.contains("model.target_layer_ids") && e.contains("[0, 1, 2, 3, 4]"),
        "{e}"
    );

    let e = stderr(train(
        &recipe,
        &cache,
        &out,
        &["--set", "train.lerning_rate=1"],
    ));
    assert!(e.contains("lerning_rate"), "{e}");

    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let e = stderr(train(&recipe, &cache, &blocker.join("run"), &[]));
    assert!(e.contains("a-file"), "{e}");

    // A run in --out is never overwritten without --resume.
    assert!(
        train(&recipe, &cache, &out, &["--set", "train.max_train_steps=2"])
            .status
            .success()
    );
    let before = std::fs::read(out.join("step_latest/model.safetensors")).unwrap();
    let e = stderr(train(
        &recipe,
        &cache,
        &out,
        &["--set", "train.max_train_steps=2"],
    ));
    assert!(e.contains("--resume"), "{e}");
    assert_eq!(
        before,
        std::fs::read(out.join("step_latest/model.safetensors")).unwrap()
    );
}

/// Two trainings into one --out: while the first runs, the second stops at once naming the
/// lock; the lock goes with the first process even when it is killed with SIGKILL; and
/// --dry-run takes no lock and creates no folder.
#[test]
fn a_second_training_into_the_same_out_is_refused_while_the_first_runs() {
    use std::fs::{File, TryLockError};
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let out = dir.path().join("run");
    let mut first = Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args([
            "train",
            "--recipe",
            recipe.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            "train.max_train_steps=1000000",
        ])
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".train.lock");
    let held_by_first = || {
        File::options()
            .write(true)
            .open(&lock)
            .is_ok_and(|f| matches!(f.try_lock(), Err(TryLockError::WouldBlock)))
    };
    let started = std::time::Instant::now();
    while !held_by_first() {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before it was checked"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the first run never took {}",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = train(&recipe, &cache, &out, &["--resume"]);
    let e = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(!second.status.success(), "the second run was not refused");
    assert!(e.contains(&lock.display().to_string()), "{e}");
    assert!(e.contains("another `deepspec train` is writing"), "{e}");
    assert!(first.try_wait().unwrap().is_none(), "the first run stopped");
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    File::options()
        .write(true)
        .open(&lock)
        .unwrap()
        .try_lock()
        .expect("the lock outlived the killed run");

    let planned = dir.path().join("planned");
    let plan = train(&recipe, &cache, &planned, &["--dry-run"]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(!planned.exists(), "--dry-run created {}", planned.display());
}

/// `--recipe` takes a path, a name in recipes/ or that name with `.toml`; a name that is
/// neither lists the recipes. With RUST_BACKTRACE=1 a user error is its message alone;
/// --verbose adds the backtrace.
#[test]
fn recipe_names_resolve_and_errors_stay_readable_with_rust_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("planned");
    let run = |recipe: &str, extra: &[&str]| {
        let mut args = vec!["train", "--recipe", recipe, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_deepspec"))
            .args(&args)
            .current_dir(workspace_root())
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap()
    };
    for name in [
        "dspark-v4-flash",
        "dspark-v4-flash.toml",
        "recipes/dspark-v4-flash.toml",
    ] {
        let o = run(name, &["--dry-run"]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && stdout.contains("plan for recipes/dspark-v4-flash.toml"),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = run("dspark-v4-flsh.toml", &["--dry-run"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(e.contains("recipe `dspark-v4-flsh.toml` not found"), "{e}");
    assert!(
        e.contains("the recipes in recipes/ are: ")
            && e.contains("dspark-v4-flash, dspark-v4-pro")
            && e.contains("smollm2-dspark"),
        "{e}"
    );
    assert!(!e.contains("backtrace"), "{e}");
    let o = run("dspark-v4-flsh.toml", &["--dry-run", "--verbose"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        e.contains("not found") && e.contains("Stack backtrace"),
        "{e}"
    );
}

/// With stderr captured (a Slurm or CI log, not a terminal) every logging step prints one
/// line with the step, loss, draft tokens/s, elapsed time and ETA; the bar would print
/// nothing.
#[test]
fn training_in_a_log_prints_a_line_per_logging_step() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, cache) = setup(dir.path());
    let out = dir.path().join("run");
    let result = train(&recipe, &cache, &out, &["--set", "train.max_train_steps=4"]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("train step="))
        .collect();
    assert_eq!(lines.len(), 2, "logging every 2 of 4 steps:\n{stderr}");
    for (line, step) in lines.iter().zip(["step=2/4 ", "step=4/4 "]) {
        for field in [step, "loss=", "draft_tok/s=", "elapsed=", "eta="] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
    }
    assert!(lines[1].ends_with("eta=0s"), "{}", lines[1]);
}
