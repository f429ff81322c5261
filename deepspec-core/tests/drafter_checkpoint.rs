//! Drafter checkpoints in the reference's layout: round trip and mismatches.

use burn::backend::Flex;
use deepspec_core::drafter::{state_dict, Drafter, DrafterConfig};
use deepspec_core::fixtures::golden_dir;
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::model::config::TargetConfig;
use std::path::Path;

type B = Flex;

/// Keys, shapes, dtypes and raw bytes of every tensor in a safetensors file.
fn contents(path: &Path) -> Vec<(String, Vec<usize>, String, Vec<f32>)> {
    let file = SafetensorsFile::open(path).unwrap();
    let mut names: Vec<String> = file.tensor_names().cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let info = file.info(&n).unwrap().clone();
            let t = file.f32(&n).unwrap();
            (n, info.shape, info.dtype.name().to_string(), t.data)
        })
        .collect()
}

#[test]
fn golden_checkpoint_round_trip_for_every_algorithm() {
    for algo in ["dspark", "dflash", "eagle3"] {
        let src = golden_dir().join(algo);
        let (drafter, config) = Drafter::<B>::load(&src, &Default::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        drafter.save(out.path(), &config).unwrap();
        assert_eq!(
            contents(&src.join("model.safetensors")),
            contents(&out.path().join("model.safetensors")),
            "{algo}: saved tensors differ from the reference checkpoint"
        );
        let saved = SafetensorsFile::open(out.path().join("model.safetensors")).unwrap();
        assert_eq!(
            saved.metadata().get("format").map(String::as_str),
            Some("pt")
        );
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(original, written, "{algo}: config.json changed");
        let (again, _) = Drafter::<B>::load(out.path(), &Default::default()).unwrap();
        assert_eq!(
            state_dict(&drafter),
            state_dict(&again),
            "{algo}: reload differs"
        );
    }
}

/// Copies a golden drafter, editing its config first.
fn edited_copy(algo: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = golden_dir().join(algo);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match Drafter::<B>::load(dir, &Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_that_disagrees_with_tensors_is_refused() {
    let dir = edited_copy("dspark", |c| c["markov_rank"] = 8.into());
    let err = load_error(dir.path());
    assert!(
        err.contains("markov_head.markov_w1.weight") && err.contains("has shape"),
        "{err}"
    );

    let dir = edited_copy("dspark", |c| c["enable_confidence_head"] = false.into());
    let err = load_error(dir.path());
    assert!(err.contains("confidence_head.proj"), "{err}");
    assert!(err.contains("does config.json match the weights"), "{err}");

    let dir = edited_copy("dflash", |c| {
        c["target_layer_ids"] = serde_json::json!([0, 1, 2])
    });
    let err = load_error(dir.path());
    assert!(err.contains("fc.weight"), "{err}");

    let dir = edited_copy("eagle3", |c| {
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"])
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("architectures") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn a_layer_id_the_target_lacks_is_refused_at_load() {
    // The golden target has 6 layers (num_target_layers = 6): ids must be in 0..=4.
    for (ids, expect) in [
        (
            serde_json::json!([0, 1, 2, 3, 5]),
            "layer 5 is out of range",
        ),
        (
            serde_json::json!([0, 1, 2, 3, 40]),
            "layer 40 is out of range",
        ),
        (serde_json::json!([-1, 1, 2, 3, 4]), "layer -1 is negative"),
    ] {
        for algo in ["dspark", "eagle3"] {
            let dir = edited_copy(algo, |c| c["target_layer_ids"] = ids.clone());
            let err = load_error(dir.path());
            assert!(
                err.contains("config.json")
                    && err.contains("target_layer_ids")
                    && err.contains(expect),
                "{algo} {ids}: {err}"
            );
        }
    }
    let dir = edited_copy("dflash", |c| {
        c["target_layer_ids"] = serde_json::json!([0, 1, 2, 3, 5])
    });
    let err = load_error(dir.path());
    assert!(err.contains("0..=4"), "names the valid range: {err}");
}

#[test]
fn drafter_for_another_target_is_refused() {
    let golden = golden_dir();
    let config = DrafterConfig::from_file(&golden.join("dspark/config.json")).unwrap();
    let target_path = golden.join("target");
    let target = TargetConfig::from_hf_json(&target_path.join("config.json")).unwrap();
    config.check_target(&target, &target_path).unwrap();
    let mut wider = target.clone();
    wider.hidden_size *= 2;
    let err = config
        .check_target(&wider, &target_path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden_size") && err.contains("another target"),
        "{err}"
    );
    assert!(err.contains("config.json"), "{err}");
}
