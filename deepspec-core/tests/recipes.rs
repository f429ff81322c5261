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

#[test]
fn deepseek_v4_recipes_hold_the_published_values() {
    for (name, taps, rank, hidden, experts, width) in [
        ("dspark-v4-flash", [40, 41, 42], 256, 4096, 256, 2048),
        ("dspark-v4-pro", [58, 59, 60], 512, 7168, 384, 3072),
    ] {
        let r = load(name);
        let m = &r.model;
        assert_eq!(m.target_layer_ids.as_slice(), taps, "{name}");
        assert_eq!(m.algorithm, "dspark", "{name}");
        assert_eq!(m.block_size, 5, "{name}");
        assert_eq!(m.num_draft_layers, 3, "{name}");
        assert_eq!(m.mask_token_id, Some(128799), "{name}");
        assert_eq!(m.markov_rank, rank, "{name}");
        assert_eq!(m.markov_head_type, "vanilla", "{name}");
        assert!(
            m.confidence_head_alpha > 0.0 && m.confidence_head_with_markov,
            "{name}"
        );
        assert_eq!(
            r.data.chat_template.as_deref(),
            Some("deepseek-v4"),
            "{name}"
        );
        let config = workspace_root().join(m.target_config.as_ref().unwrap());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        let v4 = deepspec_core::model::v4::V4Config::from_json(&config, &json).unwrap();
        assert_eq!(v4.hidden_size, hidden, "{name}");
        assert_eq!(v4.n_routed_experts, experts, "{name}");
        assert_eq!(v4.moe_intermediate_size, width, "{name}");
        assert_eq!(v4.vocab_size, 129280, "{name}");
        assert_eq!(v4.sliding_window, 128, "{name}");
        assert_eq!(v4.hc_mult, 4, "{name}");
        assert_eq!(v4.num_experts_per_tok, 6, "{name}");
        assert_eq!(v4.rms_norm_eps, 1e-6, "{name}");
        assert_eq!(
            (v4.num_attention_heads, v4.head_dim, v4.rope_head_dim),
            (64, 512, 64)
        );
    }
    let tiny = load("dspark-v4-tiny");
    assert_eq!(
        tiny.model.num_draft_layers,
        tiny.model.target_layer_ids.len()
    );
}
