//! DeepSeek-V4's DSpark drafter end to end on CPU at toy width (`recipes/dspark-v4-tiny.toml`):
//! a synthetic V4-shaped target and cache, training whose loss falls, kill -9 and resume
//! bit-exact, the checkpoint reloading, and the export the engines load.

use burn::backend::Flex;
use deepspec_core::drafter::{state_dict, Drafter};
use deepspec_core::fixtures::workspace_root;
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

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tiny recipe with its target and cache inside `dir`; writes both.
fn setup(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(workspace_root().join("recipes/dspark-v4-tiny.toml")).unwrap();
    let target = dir.join("target");
    let cache = dir.join("cache");
    let text = text
        .replace(
            "\"models/deepseek-v4-tiny\"",
            &format!("{:?}", target.display().to_string()),
        )
        .replace(
            "\"cache/v4-tiny\"",
            &format!("{:?}", cache.display().to_string()),
        );
    let recipe = dir.join("v4-tiny.toml");
    std::fs::write(&recipe, text).unwrap();
    let out = ok(&deepspec(&[
        "cache",
        "synthetic-v4",
        "--recipe",
        recipe.to_str().unwrap(),
        "--samples",
        "16",
        "--seq-len",
        "64",
    ]));
    assert!(out.contains("taps [3, 4, 5]"), "{out}");
    ok(&deepspec(&["cache", "validate", cache.to_str().unwrap()]));
    recipe
}

fn train_args<'a>(recipe: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.max_train_steps=24",
        "--set",
        "logging.checkpointing_steps=4",
    ]
}

/// `trained N steps: loss A -> B, ...` -> (A, B).
fn losses(stdout: &str) -> (f64, f64) {
    let line = stdout.lines().find(|l| l.starts_with("trained")).unwrap();
    let rest = line.split("loss ").nth(1).unwrap();
    let mut it = rest.split([' ', ',']);
    let first: f64 = it.next().unwrap().parse().unwrap();
    let last: f64 = it.nth(1).unwrap().parse().unwrap();
    (first, last)
}

#[test]
fn v4_tiny_trains_resumes_bit_exact_reloads_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path());
    let whole = dir.path().join("whole");
    let stdout = ok(&deepspec(&train_args(&recipe, &whole)));
    let (first, last) = losses(&stdout);
    assert!(
        last < first * 0.95,
        "the loss did not fall: {first} -> {last}"
    );

    // Interrupted twice (a clean stop after 6 steps, then SIGKILL), resumed to the end.
    let parts = dir.path().join("parts");
    let mut args = train_args(&recipe, &parts);
    args.extend(["--stop-after", "6"]);
    ok(&deepspec(&args));
    let mut kills = 0;
    for delay_ms in [900u64, 400] {
        let mut args = train_args(&recipe, &parts);
        args.push("--resume");
        let mut child = Command::new(env!("CARGO_BIN_EXE_deepspec"))
            .args(&args)
            .current_dir(workspace_root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    let mut args = train_args(&recipe, &parts);
    args.push("--resume");
    ok(&deepspec(&args));
    assert!(kills > 0, "no run was killed: make the delays shorter");
    let a = std::fs::read(whole.join("step_latest/model.safetensors")).unwrap();
    let b = std::fs::read(parts.join("step_latest/model.safetensors")).unwrap();
    assert!(a == b, "the resumed run differs from the uninterrupted one");

    // The checkpoint reloads; its export holds the mtp.* tensors alone and reloads with the
    // target's embedding and head to the same values.
    let device = Default::default();
    let (trained, _) = Drafter::<Flex>::load(&whole.join("step_latest"), &device).unwrap();
    let export = dir.path().join("export");
    let said = ok(&deepspec(&[
        "export",
        "--drafter",
        whole.join("step_latest").to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]));
    assert!(
        said.contains("left out [\"embed.weight\", \"head.weight\"]"),
        "{said}"
    );
    let (back, _) =
        Drafter::<Flex>::load_export(&export, &dir.path().join("target"), &device).unwrap();
    assert_eq!(state_dict(&trained), state_dict(&back));
    // A second export into the same folder is refused; nothing is overwritten.
    let again = deepspec(&[
        "export",
        "--drafter",
        whole.join("step_latest").to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a model"));

    // Offline τ needs no target in the loop: the checkpoint and its export (embedding and head
    // from the target folder) score the recipe's cache alike.
    let tau = |drafter: &Path, name: &str| -> serde_json::Value {
        let report = dir.path().join(name);
        ok(&deepspec(&[
            "eval",
            "--offline",
            "--recipe",
            recipe.to_str().unwrap(),
            "--drafter",
            drafter.to_str().unwrap(),
            "--temperature",
            "1",
            "--report",
            report.to_str().unwrap(),
        ]));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(r["mode"], "offline");
        assert_eq!(r["algorithm"], "dspark");
        r["offline"].clone()
    };
    let from_checkpoint = tau(&whole.join("step_latest"), "offline-checkpoint.json");
    let from_export = tau(&export, "offline-export.json");
    let expected = from_checkpoint["tau_expected"].as_f64().unwrap();
    assert!(expected >= 1.0, "{from_checkpoint}");
    assert_eq!(from_checkpoint["rounds"], from_export["rounds"]);
    assert!((expected - from_export["tau_expected"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn v4_flash_dry_run_prints_the_plan_and_a_run_that_cannot_fit_stops_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let plan = ok(&deepspec(&[
        "train",
        "--recipe",
        "dspark-v4-flash",
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
    ]));
    for want in [
        "19.85 B trainable (19.33 B in routed experts), 1.06 B frozen",
        "AdamW moments 147.86 GiB",
        "one GPU of 80 GiB cannot hold this job",
        "expert sharding would need the 256 routed experts",
    ] {
        assert!(plan.contains(want), "missing `{want}` in:\n{plan}");
    }
    let h200 = ok(&deepspec(&[
        "train",
        "--recipe",
        "dspark-v4-flash",
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
        "--device",
        "cpu",
        "--device-memory-gib",
        "141",
    ]));
    assert!(h200.contains("at least 3 GPUs of 141 GiB"), "{h200}");
    // The tiny recipe fits anywhere.
    let tiny = ok(&deepspec(&[
        "train",
        "--recipe",
        "dspark-v4-tiny",
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
    ]));
    assert!(tiny.contains("GPUs needed: 1"), "{tiny}");

    // A real run on a device too small stops with the plan, before reading or writing.
    let run = deepspec(&[
        "train",
        "--recipe",
        "dspark-v4-tiny",
        "--cache",
        dir.path().join("no-cache").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device-memory-gib",
        "0.001",
    ]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("does not fit, so nothing was allocated"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}
