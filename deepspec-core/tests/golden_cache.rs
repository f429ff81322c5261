//! The reference's own target cache (golden `cache/`) imported into ours: every value equal
//! to what the reference collator produced from it (golden `inputs.safetensors`).

use deepspec_core::cache::reference::{import_reference, ReferenceCache};
use deepspec_core::cache::{validate, CacheReader};
use deepspec_core::fixtures::golden_dir;
use deepspec_core::io::safetensors::SafetensorsFile;

#[test]
fn golden_cache_import() {
    let golden = golden_dir();
    let dst = tempfile::tempdir().unwrap();
    let out = dst.path().join("imported");
    let manifest = import_reference(&golden.join("cache"), &out, 1 << 30).unwrap();
    assert!(manifest.complete);
    assert_eq!(manifest.target.name_or_path, "target");
    assert_eq!(manifest.target_layer_ids, vec![0, 1, 2, 3, 4]);
    let report = validate(&out).unwrap();
    assert_eq!(report.num_samples, 2);

    let inputs = SafetensorsFile::open(golden.join("inputs.safetensors")).unwrap();
    let (shape, ids) = inputs.i64("input_ids").unwrap();
    let (_, loss) = inputs.i64("loss_mask").unwrap();
    let (_, attention) = inputs.i64("attention_mask").unwrap();
    let hidden = inputs.f32("target_hidden_states").unwrap();
    let last = inputs.f32("target_last_hidden_states").unwrap();
    let (batch, seq) = (shape[0], shape[1]);
    let width = hidden.shape[2];
    let h = last.shape[2];

    let reader = CacheReader::open(&out).unwrap();
    assert_eq!(reader.len(), batch as u64);
    for b in 0..batch {
        let sample = reader.sample(b as u64).unwrap();
        let len = sample.seq_len();
        assert_eq!(
            len as i64,
            attention[b * seq..(b + 1) * seq].iter().sum::<i64>(),
            "sample {b}: length"
        );
        let ids_ref: Vec<u32> = ids[b * seq..b * seq + len]
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(sample.input_ids, ids_ref, "sample {b}: input_ids");
        let loss_ref: Vec<u8> = loss[b * seq..b * seq + len]
            .iter()
            .map(|&v| v as u8)
            .collect();
        assert_eq!(sample.loss_mask, loss_ref, "sample {b}: loss_mask");
        let ours = sample.hidden.to_f32();
        let theirs = &hidden.data[b * seq * width..(b * seq + len) * width];
        assert!(ours == theirs, "sample {b}: target_hidden_states differ");
        let ours = sample.last_hidden.to_f32();
        let theirs = &last.data[b * seq * h..(b * seq + len) * h];
        assert!(
            ours == theirs,
            "sample {b}: target_last_hidden_states differ"
        );
    }
}

#[test]
fn golden_cache_import_copies_reference_bits() {
    let golden = golden_dir();
    let reference = ReferenceCache::open(&golden.join("cache")).unwrap();
    let shard = std::fs::read(reference.shard_file(0)).unwrap();
    let dst = tempfile::tempdir().unwrap();
    import_reference(&golden.join("cache"), dst.path(), 1 << 30).unwrap();
    let reader = CacheReader::open(dst.path()).unwrap();
    for i in 0..reference.records.len() {
        let theirs = reference.sample(i, &shard).unwrap();
        let ours = reader.sample(i as u64).unwrap();
        assert_eq!(ours, theirs, "sample {i}");
    }
}

#[test]
fn import_refuses_a_folder_that_is_not_a_reference_cache() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), r#"{"version": 2}"#).unwrap();
    let err = import_reference(dir.path(), &dir.path().join("out"), 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest.json") && err.contains("num_samples"),
        "{err}"
    );
}

/// Our target pass over the reference cache's own token ids reproduces its hidden states:
/// tapped layers are raw decoder-layer outputs, the last state is after the final norm.
#[test]
fn golden_cache_target_pass_matches_reference() {
    use deepspec_core::backend::Cpu;
    use deepspec_core::cache::HiddenDtype;
    use deepspec_core::io::chat::TokenizedChat;
    use deepspec_core::model::load_target;
    use deepspec_core::prepare::target_pass::target_pass;

    let golden = golden_dir();
    let reference = ReferenceCache::open(&golden.join("cache")).unwrap();
    let shard = std::fs::read(reference.shard_file(0)).unwrap();
    let theirs: Vec<_> = (0..reference.records.len())
        .map(|i| reference.sample(i, &shard).unwrap())
        .collect();
    let target = load_target::<Cpu>(&golden.join("target"), &Default::default()).unwrap();
    let chats: Vec<TokenizedChat> = theirs
        .iter()
        .map(|s| TokenizedChat {
            text: String::new(),
            input_ids: s.input_ids.clone(),
            loss_mask: s.loss_mask.clone(),
        })
        .collect();
    let sources: Vec<u64> = (0..chats.len() as u64).collect();
    let ours = target_pass(
        &target,
        &chats,
        &sources,
        &reference.target_layer_ids,
        HiddenDtype::Bf16,
    );
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.input_ids, b.input_ids);
        for (name, x, y) in [
            ("target_hidden_states", &a.hidden, &b.hidden),
            ("target_last_hidden_states", &a.last_hidden, &b.last_hidden),
        ] {
            let (x, y) = (x.to_f32(), y.to_f32());
            // bf16 rounding of slightly different f32 sums may differ by one bf16 step.
            for (j, (p, q)) in x.iter().zip(&y).enumerate() {
                let step = q.abs().max(1e-3) / 128.0;
                assert!(
                    (p - q).abs() <= step * 1.01,
                    "sample {i} {name}[{j}]: ours {p}, reference {q}"
                );
            }
        }
    }
}

/// A reference manifest whose shard name leaves its folder is refused before anything is
/// read or written, naming the field.
#[test]
fn import_refuses_a_reference_shard_outside_its_folder() {
    let golden = golden_dir();
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("reference");
    std::fs::create_dir(&src).unwrap();
    for name in ["samples.idx", "shard-00000.bin"] {
        std::fs::copy(golden.join("cache").join(name), src.join(name)).unwrap();
    }
    // The shard itself sits next to the folder, so only the name can make it fail.
    std::fs::copy(
        golden.join("cache/shard-00000.bin"),
        root.path().join("outside.bin"),
    )
    .unwrap();
    let text = std::fs::read_to_string(golden.join("cache/manifest.json")).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    manifest["shards"][0]["file_name"] = "../outside.bin".into();
    std::fs::write(src.join("manifest.json"), manifest.to_string()).unwrap();
    let dst = root.path().join("imported");
    let err = import_reference(&src, &dst, 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("manifest.json"), "{err}");
    assert!(err.contains("shards[0].file_name"), "{err}");
    assert!(
        err.contains("`../outside.bin` is not a plain file name"),
        "{err}"
    );
    assert!(!dst.join("manifest.json").exists());
}
