//! CI's guard on acceptance length: a deterministic tiny pipeline (SmolLM2 target, greedy
//! answers to a fixed prompt subset, small DSpark and DFlash drafters, a fixed eval subset)
//! whose τ must stay within the regression gate of `data/ci-baseline.json`; and proof that
//! the gate fails on a broken drafter.
//!
//! Update the baseline (after a change that legitimately moves τ; see README):
//! `DEEPSPEC_UPDATE_BASELINE=1 cargo test --release --test ci_regression`

use burn::backend::Flex;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::fixtures::{smollm2, workspace_root};
use deepspec_eval::datasets::{read_jsonl, Selection};
use std::path::{Path, PathBuf};
use std::process::Command;

const SETS: &str = "gsm8k,humaneval,arena-hard-v2";
const PROMPTS_PER_SET: usize = 2;
const TOLERANCE: &str = "0.1";

fn deepspec(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap();
    out
}

fn ok(args: &[&str]) -> String {
    let out = deepspec(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deepspec {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn datasets() -> PathBuf {
    deepspec_core::fixtures::datasets_dir()
}

/// The eval subset (the first prompts of each set's reference selection, as `--limit`
/// picks them), as the training prompt file.
fn prompt_file(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let mut lines = Vec::new();
    for set in SETS.split(',') {
        let selection = Selection {
            seed: 980_406,
            limit: Some(PROMPTS_PER_SET),
        };
        let data = read_jsonl(set, &datasets().join(format!("{set}.jsonl")), selection).unwrap();
        for sample in data.samples {
            lines.push(serde_json::json!({"turns": [sample.turns[0]]}).to_string());
        }
    }
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn train(algo: &str, cache: &Path, out: &Path) -> PathBuf {
    let recipe = format!("recipes/smollm2-{algo}.toml");
    ok(&[
        "train",
        "--recipe",
        &recipe,
        "--cache",
        cache.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.max_train_steps=120",
        "--set",
        "train.global_batch_size=1",
        "--set",
        "train.lr=5e-3",
        "--set",
        "model.num_anchors=32",
        "--set",
        "logging.checkpointing_steps=1000",
    ]);
    out.join("step_latest")
}

fn eval(
    algo: &str,
    drafter: &Path,
    report: &Path,
    baseline: Option<&Path>,
) -> std::process::Output {
    let recipe = format!("recipes/smollm2-{algo}.toml");
    let mut args = vec![
        "eval".to_string(),
        "--recipe".into(),
        recipe,
        "--drafter".into(),
        drafter.display().to_string(),
        "--datasets".into(),
        datasets().display().to_string(),
        "--sets".into(),
        SETS.into(),
        "--limit".into(),
        PROMPTS_PER_SET.to_string(),
        "--max-new-tokens".into(),
        "48".into(),
        "--temperature".into(),
        "0".into(),
        "--report".into(),
        report.display().to_string(),
    ];
    if let Some(b) = baseline {
        args.extend([
            "--baseline".into(),
            b.display().to_string(),
            "--tolerance".into(),
            TOLERANCE.into(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    deepspec(&args)
}

/// A drafter whose trained weights are scrambled: every trainable matrix reversed.
fn shuffled_copy(src: &Path, dst: &Path) {
    let (drafter, config): (Drafter<Flex>, DrafterConfig) =
        Drafter::load(src, &Default::default()).unwrap();
    drafter.save(dst, &config).unwrap();
    let path = dst.join("model.safetensors");
    let file = deepspec_core::io::safetensors::SafetensorsFile::open(&path).unwrap();
    let mut tensors = Vec::new();
    for name in file.tensor_names().cloned().collect::<Vec<_>>() {
        let mut t = file.f32(&name).unwrap();
        let frozen = name == "embed_tokens.weight" || name == "lm_head.weight";
        if t.shape.len() == 2 && !frozen {
            t.data.reverse();
        }
        tensors.push((name, t));
    }
    drop(file);
    let named: Vec<_> = tensors
        .iter()
        .map(|(n, t)| deepspec_core::io::safetensors::NamedTensor {
            name: n,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    deepspec_core::io::safetensors::write_f32(&path, &named, &Default::default()).unwrap();
}

#[test]
fn acceptance_length_holds_against_the_baseline_and_the_gate_catches_a_broken_drafter() {
    smollm2();
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompt_file(dir.path());
    let cache = dir.path().join("cache");
    ok(&[
        "prepare",
        "--recipe",
        "recipes/smollm2-dspark.toml",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        cache.to_str().unwrap(),
        "--set",
        "prepare.temperature=0",
        "--set",
        "prepare.max_new_tokens=48",
        "--quiet",
    ]);
    let baseline = workspace_root().join("data/ci-baseline.json");
    let update = std::env::var_os("DEEPSPEC_UPDATE_BASELINE").is_some();
    let mut reports = serde_json::Map::new();
    let mut dspark_drafter = PathBuf::new();
    for algo in ["dspark", "dflash"] {
        let drafter = train(algo, &cache, &dir.path().join(algo));
        let report = dir.path().join(format!("{algo}.json"));
        let out = eval(
            algo,
            &drafter,
            &report,
            (!update).then_some(baseline.as_path()),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{algo}:\n{stdout}");
        assert!(
            out.status.success(),
            "{algo}: τ regressed against {}:\n{stdout}\n{}",
            baseline.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        for (set, s) in value["sets"].as_object().unwrap() {
            assert!(s["tau"].as_f64().unwrap() >= 1.0, "{algo} {set}: τ below 1");
        }
        reports.insert(algo.into(), value);
        if algo == "dspark" {
            dspark_drafter = drafter;
        }
    }
    if update {
        std::fs::write(
            &baseline,
            serde_json::to_string_pretty(&reports).unwrap() + "\n",
        )
        .unwrap();
        eprintln!("wrote {}", baseline.display());
        return;
    }
    let broken = dir.path().join("broken");
    shuffled_copy(&dspark_drafter, &broken);
    let out = eval(
        "dspark",
        &broken,
        &dir.path().join("broken.json"),
        Some(baseline.as_path()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the gate must fail on a scrambled drafter:\n{stdout}"
    );
    assert!(stdout.contains("FAIL macro_tau"), "{stdout}");
}
