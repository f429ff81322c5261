//! The names and shapes `drafter_layout` computes from a config (what `train --dry-run`
//! counts) are exactly the tensors each family's module holds, trainable flags included.

use burn::backend::{Autodiff, Flex};

/// Autodiff, so the frozen flags are real.
type B = Autodiff<Flex>;
use deepspec_core::cache::synthetic::write_v4_target;
use deepspec_core::drafter::init::{new_v4_drafter, random_drafter, DrafterSpec};
use deepspec_core::drafter::layout::drafter_layout;
use deepspec_core::drafter::{named_params, Algorithm, Drafter, DrafterConfig, MarkovKind};
use deepspec_core::fixtures::{golden_dir, workspace_root};
use deepspec_core::layers::TargetLayerIds;
use deepspec_core::model::TargetConfig;

fn spec(algorithm: Algorithm, kind: MarkovKind, layers: usize, taps: Vec<usize>) -> DrafterSpec {
    DrafterSpec {
        algorithm,
        num_draft_layers: layers,
        target_layer_ids: TargetLayerIds::new(taps).unwrap(),
        block_size: 5,
        mask_token_id: 7,
        num_anchors: 8,
        markov_rank: if algorithm == Algorithm::DSpark { 8 } else { 0 },
        markov_kind: kind,
        confidence_head: algorithm == Algorithm::DSpark,
        confidence_with_markov: kind != MarkovKind::Gated,
        step_loss_decay: 0.8,
        dtype: "float32".into(),
        initializer_range: 0.02,
        seed: 1,
        target_model_name_or_path: String::new(),
    }
}

fn assert_layout(drafter: &Drafter<B>, config: &DrafterConfig, what: &str) {
    let trainable: Vec<String> = named_params(drafter, true)
        .into_iter()
        .map(|p| p.name)
        .collect();
    let mut module: Vec<(String, Vec<usize>, bool)> = named_params(drafter, false)
        .into_iter()
        .map(|p| {
            let t = trainable.contains(&p.name);
            (p.name, p.shape, t)
        })
        .collect();
    module.sort();
    let mut computed: Vec<(String, Vec<usize>, bool)> = drafter_layout(config)
        .into_iter()
        .map(|s| (s.name, s.shape, s.trainable))
        .collect();
    computed.sort();
    assert_eq!(computed, module, "{what}");
}

#[test]
fn every_family_layout_matches_its_module() {
    let target = TargetConfig::from_hf_json(&golden_dir().join("target/config.json")).unwrap();
    let n = target.num_hidden_layers;
    let taps = vec![0, n / 2, n - 2];
    let device = Default::default();
    for (algorithm, kind, layers) in [
        (Algorithm::DSpark, MarkovKind::Vanilla, 2),
        (Algorithm::DSpark, MarkovKind::Gated, 1),
        (Algorithm::DSpark, MarkovKind::Rnn, 2),
        (Algorithm::DFlash, MarkovKind::Vanilla, 2),
        (Algorithm::Eagle3, MarkovKind::Vanilla, 1),
    ] {
        let s = spec(algorithm, kind, layers, taps.clone());
        let (drafter, config) = random_drafter::<B>(&target, &s, &device).unwrap();
        assert_layout(&drafter, &config, &format!("{algorithm:?} {kind:?}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("recipes/configs/deepseek-v4-tiny.json"))
            .unwrap(),
    )
    .unwrap();
    write_v4_target(dir.path(), &json, 1).unwrap();
    let s = spec(Algorithm::DSpark, MarkovKind::Vanilla, 3, vec![3, 4, 5]);
    let (drafter, config) = new_v4_drafter::<B>(dir.path(), &s, &device).unwrap();
    assert_layout(&drafter, &config, "DeepSeek-V4");
}

/// The reference's Gemma4 drafters (the Gemma4 fixtures): layer scalars, the four norms,
/// no `v_proj` (keys are values) and the double-wide MLP rule.
#[test]
fn gemma4_drafter_layouts_match_their_modules() {
    for algo in ["dspark", "dflash", "eagle3"] {
        let dir = deepspec_core::fixtures::golden_gemma4_dir().join(algo);
        let (drafter, config) = Drafter::<B>::load(&dir, &Default::default()).unwrap();
        assert_layout(&drafter, &config, &format!("gemma4 {algo}"));
    }
}
