//! Gemma4 from the command line: the fixtures' reference cache imported, a DSpark, a DFlash and
//! an Eagle3 drafter trained on it from the recipes' settings (sized to the fixture target),
//! their checkpoints holding exactly the reference's keys, shapes and config fields, scored
//! offline and online against the fixture target; and `prepare` on that target.

use deepspec_core::fixtures::{golden_gemma4_dir, workspace_root};
use deepspec_core::io::safetensors::SafetensorsFile;
use std::path::Path;
use std::process::{Command, Output};

fn deepspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "command failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string() + &stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `recipes/<algo>-gemma4-12b.toml` pointed at the fixture target and cache, with the
/// fixture drafters' sizes.
fn recipe(dir: &Path, algo: &str, cache: &Path) -> std::path::PathBuf {
    let text =
        std::fs::read_to_string(workspace_root().join(format!("recipes/{algo}-gemma4-12b.toml")))
            .unwrap();
    let target = golden_gemma4_dir().join("target");
    let text = text
        .replace("\"google/gemma-4-12B-it\"", &format!("{:?}", s(&target)))
        .replace(
            "[data]\n",
            &format!("[data]\ntarget_cache_path = {:?}\n", s(cache)),
        );
    let text = text
        .replace("[5, 17, 29, 41, 46]", "[0, 1, 2, 3, 4]")
        .replace("num_anchors = 512", "num_anchors = 8")
        .replace("markov_rank = 256", "markov_rank = 16")
        .replace("precision = \"bf16\"", "precision = \"fp32\"")
        .replace("global_batch_size = 512", "global_batch_size = 2");
    let text = if algo == "eagle3" {
        text
    } else {
        text.replace("num_draft_layers = 5", "num_draft_layers = 3")
    };
    let path = dir.join(format!("{algo}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn gemma4_drafters_train_from_an_imported_cache_and_score_offline_and_online() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    ok(&deepspec(&[
        "cache",
        "import-deepspec",
        s(&golden_gemma4_dir().join("cache")),
        s(&cache),
    ]));
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"turns\": [\"<t5> <t6> <t7>\"]}\n").unwrap();
    for algo in ["dspark", "dflash", "eagle3"] {
        let r = recipe(tmp.path(), algo, &cache);
        let out = tmp.path().join(format!("run-{algo}"));
        let said = ok(&deepspec(&[
            "train",
            "--recipe",
            s(&r),
            "--out",
            s(&out),
            "--set",
            "train.max_train_steps=3",
        ]));
        assert!(said.contains("trained 3 steps"), "{said}");
        // Exactly the reference's tensors and config fields.
        let reference = golden_gemma4_dir().join(algo);
        let ours = out.join("step_latest");
        let shapes = |dir: &Path| {
            let f = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
            let mut v: Vec<(String, Vec<usize>)> = f
                .tensor_names()
                .map(|n| (n.clone(), f.info(n).unwrap().shape.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(shapes(&ours), shapes(&reference), "{algo}: tensors");
        let keys = |dir: &Path| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&ours), keys(&reference), "{algo}: config fields");
        let report = tmp.path().join(format!("{algo}.json"));
        ok(&deepspec(&[
            "eval",
            "--offline",
            "--recipe",
            s(&r),
            "--drafter",
            s(&ours),
            "--report",
            s(&report),
        ]));
        let scored: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let tau = scored["offline"]["tau_greedy"].as_f64().unwrap();
        assert!(tau >= 1.0, "{algo}: {scored}");
        // And online, the Gemma4 target verifying.
        let online = tmp.path().join(format!("{algo}-online.json"));
        ok(&deepspec(&[
            "eval",
            "--recipe",
            s(&r),
            "--drafter",
            s(&ours),
            "--prompts",
            s(&prompts),
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--report",
            s(&online),
        ]));
        let on: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&online).unwrap()).unwrap();
        let online_tau = on["sets"]["prompts"]["tau"].as_f64().unwrap();
        assert!(online_tau >= 1.0, "{algo}: {on}");
        eprintln!("{algo}: τ after 3 steps: offline {tau:.3} (T=0), online {online_tau:.3} (T=0)");
    }
}

/// `prepare` runs a Gemma4 target: the fixture target answers two prompts in the Gemma4 chat
/// format and its taps and final state are cached, then validated.
#[test]
fn prepare_caches_a_gemma4_target() {
    let tmp = tempfile::tempdir().unwrap();
    let target = golden_gemma4_dir().join("target");
    let recipe = tmp.path().join("prepare.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\ntarget_model_name_or_path = {:?}\ntarget_layer_ids = [0, 1, 2, 3, 4]\n\n\
             [data]\nchat_template = \"gemma4\"\nmax_length = 256\nmin_loss_tokens = 2\n\n\
             [prepare]\ntemperature = 0.0\nmax_new_tokens = 12\nbatch_size = 2\n",
            s(&target)
        ),
    )
    .unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"turns\": [\"<t5> <t6> <t7>\"]}\n{\"turns\": [\"<t9> <t8>\"]}\n",
    )
    .unwrap();
    let cache = tmp.path().join("cache");
    let said = ok(&deepspec(&[
        "prepare",
        "--quiet",
        "--recipe",
        s(&recipe),
        "--prompts",
        s(&prompts),
        "--out",
        s(&cache),
    ]));
    assert!(said.contains("2 samples"), "{said}");
    let valid = ok(&deepspec(&["cache", "validate", s(&cache)]));
    assert!(valid.contains("ok (1 shards, 2 samples"), "{valid}");
}
