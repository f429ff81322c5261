//! Every recipe in recipes/ parses and validates; the reference-mirroring ones hold the
//! reference's values (its `config/` files); overrides and bad keys behave.

use deepspec_core::fixtures::workspace_root;
use deepspec_core::recipe::Recipe;
use std::path::Path;

fn load(name: &str) -> Recipe {
    Recipe::load(
        &workspace_root()
            .join("recipes")
            .join(format!("{name}.toml")),
    )
    .unwrap()
}

#[test]
fn every_recipe_parses_and_validates() {
    let mut count = 0;
    for entry in std::fs::read_dir(workspace_root().join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Recipe::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            count += 1;
        }
    }
    assert!(
        count >= 15,
        "expected the twelve reference recipes and the SmolLM2 ones, found {count}"
    );
}

#[test]
fn reference_recipes_hold_the_reference_values() {
    // (target, layers, mask token, chat template) from the spec's target table.
    let targets = [
        (
            "qwen3-4b",
            "Qwen/Qwen3-4B",
            vec![1, 9, 17, 25, 33],
            151669,
            "qwen",
        ),
        (
            "qwen3-8b",
            "Qwen/Qwen3-8B",
            vec![1, 9, 17, 25, 33],
            151669,
            "qwen",
        ),
        (
            "qwen3-14b",
            "Qwen/Qwen3-14B",
            vec![1, 10, 19, 28, 37],
            151669,
            "qwen",
        ),
        (
            "gemma4-12b",
            "google/gemma-4-12B-it",
            vec![5, 17, 29, 41, 46],
            4,
            "gemma4",
        ),
    ];
    for (suffix, path, layers, mask, template) in targets {
        for algo in ["dspark", "dflash", "eagle3"] {
            let r = load(&format!("{algo}-{suffix}"));
            let who = format!("{algo}-{suffix}");
            assert_eq!(r.model.target_model_name_or_path, Path::new(path), "{who}");
            assert_eq!(r.model.target_layer_ids, layers, "{who}");
            assert_eq!(r.data.chat_template.as_deref(), Some(template), "{who}");
            assert_eq!(r.data.max_length, 4096, "{who}");
            let t = &r.train;
            assert_eq!(
                (t.lr, t.warmup_ratio, t.weight_decay),
                (6.0e-4, 0.04, 0.0),
                "{who}"
            );
            assert_eq!(
                (t.local_batch_size, t.global_batch_size, t.num_train_epochs),
                (1, 512, 10),
                "{who}"
            );
            assert_eq!(
                (t.max_train_steps, t.max_grad_norm, t.precision.as_str()),
                (None, 1.0, "bf16"),
                "{who}"
            );
            assert_eq!(
                (r.logging.logging_steps, r.logging.checkpointing_steps),
                (10, 3000),
                "{who}"
            );
            let m = &r.model;
            match algo {
                "dspark" => {
                    assert_eq!(r.seed, 42);
                    assert_eq!(
                        (m.block_size, m.num_draft_layers, m.num_anchors),
                        (7, 5, 512),
                        "{who}"
                    );
                    assert_eq!(
                        (m.markov_rank, m.markov_head_type.as_str()),
                        (256, "vanilla"),
                        "{who}"
                    );
                    assert_eq!(
                        (m.confidence_head_alpha, m.confidence_head_with_markov),
                        (1.0, true),
                        "{who}"
                    );
                    assert_eq!(
                        (m.ce_loss_alpha, m.l1_loss_alpha, m.loss_decay_gamma),
                        (0.1, 0.9, 4.0),
                        "{who}"
                    );
                    assert_eq!(m.mask_token_id, Some(mask), "{who}");
                }
                "dflash" => {
                    assert_eq!(r.seed, 42);
                    assert_eq!((m.markov_rank, m.confidence_head_alpha), (0, 0.0), "{who}");
                    assert_eq!((m.ce_loss_alpha, m.l1_loss_alpha), (1.0, 0.0), "{who}");
                    assert_eq!(m.mask_token_id, Some(mask), "{who}");
                }
                _ => {
                    assert_eq!(r.seed, 0, "{who}: Eagle3 configs seed 0");
                    assert_eq!(
                        (m.ttt_length, m.step_loss_decay, m.draft_num_hidden_layers),
                        (7, 0.8, 1),
                        "{who}"
                    );
                }
            }
        }
    }
}

#[test]
fn overrides_set_any_field_and_unknown_keys_are_named() {
    let path = workspace_root().join("recipes/smollm2-dspark.toml");
    let r = Recipe::load_with(
        &path,
        &[
            "train.max_train_steps=7".into(),
            "model.num_anchors=8".into(),
        ],
    )
    .unwrap();
    assert_eq!((r.train.max_train_steps, r.model.num_anchors), (Some(7), 8));
    let err = Recipe::load_with(&path, &["train.max_trian_steps=7".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_trian_steps") && err.contains("smollm2-dspark.toml"),
        "{err}"
    );
    let err = Recipe::load_with(&path, &["train.lr=fast".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("lr"), "{err}");
    let err = Recipe::load_with(&path, &["model.algorithm=medusa".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.algorithm") && err.contains("medusa"),
        "{err}"
    );
}
