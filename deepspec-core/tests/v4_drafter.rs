//! DeepSeek-V4 DSpark checkpoints as the engines load them: the full V4-Flash layout from a
//! meta-construction (names and shapes only, nothing allocated) against the published list,
//! and a tiny drafter's export round trip, bit for bit.

use burn::backend::Flex;
use deepspec_core::cache::synthetic::write_v4_target;
use deepspec_core::drafter::dspark_v4::v4_layout;
use deepspec_core::drafter::init::{new_v4_drafter, DrafterSpec};
use deepspec_core::drafter::{
    export_dir, state_dict, Algorithm, Drafter, DrafterConfig, MarkovKind,
};
use deepspec_core::fixtures::workspace_root;
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::layers::TargetLayerIds;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

fn recipe_config(name: &str) -> Value {
    let path = workspace_root().join("recipes/configs").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The target's config plus the keys DeepSeek's published drafter config adds.
fn with_dspark_keys(mut c: Value, taps: &[usize], rank: usize) -> Value {
    let o = c.as_object_mut().unwrap();
    o.insert("dspark_block_size".into(), json!(5));
    o.insert("dspark_noise_token_id".into(), json!(128799));
    o.insert("dspark_target_layer_ids".into(), json!(taps));
    o.insert("dspark_markov_rank".into(), json!(rank));
    c
}

/// `mtp.2.ffn.experts.17.w1.weight` -> `mtp.{s}.ffn.experts.{e}.w1.weight`.
fn template(name: &str) -> String {
    let parts: Vec<String> = name
        .split('.')
        .enumerate()
        .map(|(i, p)| match (i, p.parse::<usize>()) {
            (1, Ok(_)) => "{s}".to_string(),
            (_, Ok(_)) => "{e}".to_string(),
            _ => p.to_string(),
        })
        .collect();
    parts.join(".")
}

#[test]
fn v4_flash_layout_matches_the_published_mtp_keys_and_shapes() {
    let json = with_dspark_keys(recipe_config("deepseek-v4-flash.json"), &[40, 41, 42], 256);
    let config = DrafterConfig::from_json(Path::new("flash/config.json"), json).unwrap();
    let (v4, keys) = config.v4.as_ref().unwrap();
    assert_eq!(keys.num_stages, 3, "one stage per tap");
    let layout = v4_layout(v4, keys, config.target_layer_ids.len(), false);
    let shapes: BTreeMap<&str, &Vec<usize>> = layout.iter().map(|(n, s)| (n.as_str(), s)).collect();
    assert_eq!(shapes.len(), layout.len(), "no name twice");

    // Every tensor the engines' loaders read, and nothing else (vLLM fails on extras).
    let mut published: Vec<String> = Vec::new();
    for part in ["wq_a", "wq_b", "wkv", "kv_norm", "q_norm", "wo_a", "wo_b"] {
        published.push(format!("mtp.{{s}}.attn.{part}.weight"));
    }
    published.push("mtp.{s}.attn.attn_sink".into());
    published.push("mtp.{s}.attn_norm.weight".into());
    published.push("mtp.{s}.ffn_norm.weight".into());
    published.push("mtp.{s}.ffn.gate.weight".into());
    published.push("mtp.{s}.ffn.gate.bias".into());
    for w in ["w1", "w2", "w3"] {
        published.push(format!("mtp.{{s}}.ffn.experts.{{e}}.{w}.weight"));
        published.push(format!("mtp.{{s}}.ffn.shared_experts.{w}.weight"));
    }
    for sub in ["attn", "ffn"] {
        for p in ["fn", "base", "scale"] {
            published.push(format!("mtp.{{s}}.hc_{sub}_{p}"));
        }
    }
    for extra in [
        "main_proj.weight",
        "main_norm.weight",
        "norm.weight",
        "hc_head_fn",
        "hc_head_base",
        "hc_head_scale",
        "markov_head.markov_w1.weight",
        "markov_head.markov_w2.weight",
        "confidence_head.proj.weight",
    ] {
        published.push(format!("mtp.{{s}}.{extra}"));
    }
    let mut ours: Vec<String> = layout.iter().map(|(n, _)| template(n)).collect();
    ours.sort();
    ours.dedup();
    published.sort();
    assert_eq!(ours, published);

    // Stage 0 alone projects the taps; the last stage alone holds the heads.
    for (name, _) in &layout {
        let stage: usize = name.split('.').nth(1).unwrap().parse().unwrap();
        if name.contains("main_") {
            assert_eq!(stage, 0, "{name}");
        }
        if ["norm.weight", "hc_head", "markov_head", "confidence_head"]
            .iter()
            .any(|k| name.starts_with(&format!("mtp.{stage}.{k}")))
        {
            assert_eq!(stage, 2, "{name}");
        }
    }
    let expect = |name: &str, shape: &[usize]| {
        assert_eq!(shapes[name].as_slice(), shape, "{name}");
    };
    expect("mtp.0.main_proj.weight", &[4096, 12288]);
    expect("mtp.0.main_norm.weight", &[4096]);
    expect("mtp.1.attn.wq_a.weight", &[1024, 4096]);
    expect("mtp.1.attn.q_norm.weight", &[1024]);
    expect("mtp.1.attn.wq_b.weight", &[64 * 512, 1024]);
    expect("mtp.1.attn.wkv.weight", &[512, 4096]);
    expect("mtp.1.attn.kv_norm.weight", &[512]);
    expect("mtp.1.attn.wo_a.weight", &[8 * 1024, 64 * 512 / 8]);
    expect("mtp.1.attn.wo_b.weight", &[4096, 8 * 1024]);
    expect("mtp.1.attn.attn_sink", &[64]);
    expect("mtp.2.ffn.gate.weight", &[256, 4096]);
    expect("mtp.2.ffn.gate.bias", &[256]);
    expect("mtp.2.ffn.experts.255.w1.weight", &[2048, 4096]);
    expect("mtp.2.ffn.experts.255.w2.weight", &[4096, 2048]);
    expect("mtp.2.ffn.experts.255.w3.weight", &[2048, 4096]);
    expect("mtp.0.ffn.shared_experts.w2.weight", &[4096, 2048]);
    expect("mtp.0.hc_attn_fn", &[24, 16384]);
    expect("mtp.0.hc_ffn_base", &[24]);
    expect("mtp.0.hc_attn_scale", &[3]);
    expect("mtp.2.norm.weight", &[4096]);
    expect("mtp.2.hc_head_fn", &[4, 16384]);
    expect("mtp.2.hc_head_base", &[4]);
    expect("mtp.2.hc_head_scale", &[1]);
    expect("mtp.2.markov_head.markov_w1.weight", &[129280, 256]);
    expect("mtp.2.markov_head.markov_w2.weight", &[129280, 256]);
    expect("mtp.2.confidence_head.proj.weight", &[1, 4352]);
    assert!(!shapes.contains_key("mtp.3.attn.wq_a.weight"));
    assert!(!shapes.contains_key("mtp.0.ffn.experts.256.w1.weight"));

    let params: u64 = layout
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let experts: u64 = layout
        .iter()
        .filter(|(n, _)| n.contains(".ffn.experts."))
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    assert!(
        (19_000_000_000..21_000_000_000).contains(&params),
        "{params} parameters"
    );
    assert!(
        experts * 100 / params >= 95,
        "experts are {experts} of {params}"
    );
}

fn tiny_spec(dtype: &str) -> DrafterSpec {
    DrafterSpec {
        algorithm: Algorithm::DSpark,
        num_draft_layers: 3,
        target_layer_ids: TargetLayerIds::new(vec![3, 4, 5]).unwrap(),
        block_size: 5,
        mask_token_id: 511,
        num_anchors: 8,
        markov_rank: 16,
        markov_kind: MarkovKind::Vanilla,
        confidence_head: true,
        confidence_with_markov: true,
        step_loss_decay: 0.8,
        dtype: dtype.into(),
        initializer_range: 0.02,
        seed: 7,
        target_model_name_or_path: String::new(),
    }
}

#[test]
fn v4_tiny_drafter_exports_the_published_layout_and_round_trips_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    write_v4_target(&target, &recipe_config("deepseek-v4-tiny.json"), 3).unwrap();
    let device = Default::default();
    let (drafter, config) =
        new_v4_drafter::<Flex>(&target, &tiny_spec("float32"), &device).unwrap();
    let (v4, keys) = config.v4.clone().unwrap();
    let step = dir.path().join("step_1");
    drafter.save(&step, &config).unwrap();

    let out = dir.path().join("export");
    let summary = export_dir(&step, &out).unwrap();
    assert_eq!(summary.left_out, vec!["embed.weight", "head.weight"]);
    // The exported file holds exactly the layout, and the module holds it too.
    let file = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    let mut stored: Vec<(String, Vec<usize>)> = file
        .tensor_names()
        .map(|n| (n.clone(), file.info(n).unwrap().shape.clone()))
        .collect();
    stored.sort();
    let mut layout = v4_layout(&v4, &keys, 3, false);
    layout.sort();
    assert_eq!(stored, layout);
    let mut module: Vec<(String, Vec<usize>)> = state_dict(&drafter)
        .into_iter()
        .filter(|(n, _)| n.starts_with("mtp."))
        .map(|(n, t)| (n, t.shape))
        .collect();
    module.sort();
    assert_eq!(module, layout);

    // config.json: the target's config plus the dspark keys, without quantization.
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["model_type"], "deepseek_v4");
    assert_eq!(json["dspark_block_size"], 5);
    assert_eq!(json["dspark_noise_token_id"], 511);
    assert_eq!(json["dspark_target_layer_ids"], json!([3, 4, 5]));
    assert_eq!(json["dspark_markov_rank"], 16);
    assert_eq!(json["n_mtp_layers"], 3);
    assert!(json.get("quantization_config").is_none());

    // Reloaded from the export and the target's embed/head: the same values, bit for bit.
    let (back, _) = Drafter::<Flex>::load_export(&out, &target, &device).unwrap();
    let (a, b) = (state_dict(&drafter), state_dict(&back));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&t.data), bits(&b[name].data), "{name}");
    }
    // The training checkpoint reloads alone.
    let (again, _) = Drafter::<Flex>::load(&step, &device).unwrap();
    assert_eq!(state_dict(&again), a);

    // An export with a tensor the engines would not know is refused by name.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(out.join("config.json"), bad.join("config.json")).unwrap();
    std::fs::copy(
        step.join("model.safetensors"),
        bad.join("model.safetensors"),
    )
    .unwrap();
    let err = Drafter::<Flex>::load_export(&bad, &target, &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("embed.weight") && err.contains("mtp."),
        "{err}"
    );
}
