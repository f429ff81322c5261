//! Writer → reader round trips of synthetic samples, without a model: both hidden dtypes,
//! single-sample reads, determinism, and what `validate` catches.

use deepspec_core::cache::manifest::{shard_file_name, FORMAT_NAME, FORMAT_VERSION};
use deepspec_core::cache::{
    validate, CacheReader, CacheSample, EncodedHidden, HiddenDtype, JobSettings, Manifest,
    ShardEntry, ShardLayout, ShardWriter, TargetIdentity,
};
use deepspec_core::sampling::Rng;
use std::path::Path;

const H: usize = 8;
const LAYERS: [usize; 2] = [0, 2];

fn sample(source: u64, len: usize, dtype: HiddenDtype) -> (CacheSample, Vec<f32>) {
    let mut rng = Rng::for_item(7, source);
    let values: Vec<f32> = (0..len * LAYERS.len() * H)
        .map(|_| (rng.uniform() as f32 - 0.5) * 8.0)
        .collect();
    let last: Vec<f32> = (0..len * H).map(|_| rng.uniform() as f32).collect();
    let s = CacheSample {
        source_index: source,
        input_ids: (0..len as u32).map(|i| i * 3 + source as u32).collect(),
        loss_mask: (0..len).map(|i| (i % 3 == 0) as u8).collect(),
        hidden: EncodedHidden::encode(&values, H, dtype),
        last_hidden: EncodedHidden::encode(&last, H, dtype),
    };
    (s, values)
}

fn write_cache(dir: &Path, dtype: HiddenDtype, samples: &[CacheSample]) -> Manifest {
    let layout = ShardLayout {
        hidden_size: H,
        target_layer_ids: LAYERS.to_vec().try_into().unwrap(),
        hidden_dtype: dtype,
    };
    let file_name = shard_file_name(0);
    let mut writer = ShardWriter::create(&dir.join(&file_name), &layout).unwrap();
    for s in samples {
        writer.push(s).unwrap();
    }
    let summary = writer.finish().unwrap();
    let mut manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        complete: false,
        target: TargetIdentity {
            name_or_path: "synthetic".into(),
            sha256: None,
            num_layers: Some(4),
            vocab_size: None,
        },
        tokenizer_sha256: None,
        target_layer_ids: LAYERS.to_vec().try_into().unwrap(),
        hidden_size: H,
        hidden_dtype: dtype,
        token_dtype: "int32".into(),
        job: JobSettings {
            source: "test".into(),
            prompts_sha256: None,
            num_prompts: samples.len() as u64,
            chat_template: None,
            max_length: 64,
            min_loss_tokens: 0,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 1,
            stop_tokens: Vec::new(),
            enable_thinking: false,
            seed: 0,
            batch_size: 1,
            shard_max_bytes: 1 << 30,
            shard_prompts: None,
        },
        num_samples: 0,
        num_tokens: 0,
        num_loss_tokens: 0,
        shards: vec![ShardEntry {
            file_name,
            shard_id: 0,
            source_start: 0,
            source_end: samples.len() as u64,
            first_sample: 0,
            num_samples: summary.num_samples,
            num_tokens: summary.num_tokens,
            num_loss_tokens: summary.num_loss_tokens,
            bytes: summary.bytes,
            sha256: summary.sha256,
        }],
        import: None,
        part: None,
    };
    manifest.recount();
    manifest.store(dir).unwrap();
    manifest
}

#[test]
fn bf16_and_fp8_round_trip_one_sample_at_a_time() {
    for dtype in [HiddenDtype::Bf16, HiddenDtype::Fp8] {
        let dir = tempfile::tempdir().unwrap();
        let made: Vec<(CacheSample, Vec<f32>)> = (0..5)
            .map(|i| sample(i, 3 + 2 * i as usize, dtype))
            .collect();
        let samples: Vec<CacheSample> = made.iter().map(|m| m.0.clone()).collect();
        write_cache(dir.path(), dtype, &samples);
        validate(dir.path()).unwrap();
        let reader = CacheReader::open(dir.path()).unwrap();
        for (i, (want, values)) in made.iter().enumerate().rev() {
            let got = reader.sample(i as u64).unwrap();
            assert_eq!(&got, want, "{dtype:?} sample {i}");
            let decoded = got.hidden.to_f32();
            let tolerance = if dtype == HiddenDtype::Bf16 {
                0.02
            } else {
                0.3
            };
            for (a, b) in decoded.iter().zip(values) {
                assert!((a - b).abs() <= tolerance, "{dtype:?}: {a} vs {b}");
            }
        }
        assert_eq!(reader.seq_lens().unwrap(), vec![3, 5, 7, 9, 11]);
    }
}

#[test]
fn same_samples_same_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let samples: Vec<CacheSample> = (0..3).map(|i| sample(i, 4, HiddenDtype::Bf16).0).collect();
    write_cache(a.path(), HiddenDtype::Bf16, &samples);
    write_cache(b.path(), HiddenDtype::Bf16, &samples);
    for name in ["manifest.json", "shard-00000.parquet"] {
        assert_eq!(
            std::fs::read(a.path().join(name)).unwrap(),
            std::fs::read(b.path().join(name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn validate_names_the_corrupt_shard_and_an_unfinished_cache() {
    let dir = tempfile::tempdir().unwrap();
    let samples: Vec<CacheSample> = (0..3).map(|i| sample(i, 4, HiddenDtype::Bf16).0).collect();
    let mut manifest = write_cache(dir.path(), HiddenDtype::Bf16, &samples);
    let shard = dir.path().join("shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let err = validate(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("shard-00000.parquet") && err.contains("sha256"),
        "{err}"
    );

    manifest.job.num_prompts = 5;
    manifest.recount();
    manifest.store(dir.path()).unwrap();
    let err = validate(dir.path()).unwrap_err().to_string();
    assert!(err.contains("complete") && err.contains("3 of 5"), "{err}");
}

#[test]
fn a_sample_with_wrong_shapes_is_refused_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let layout = ShardLayout {
        hidden_size: H,
        target_layer_ids: LAYERS.to_vec().try_into().unwrap(),
        hidden_dtype: HiddenDtype::Bf16,
    };
    let mut writer = ShardWriter::create(&dir.path().join("s.parquet"), &layout).unwrap();
    let (mut s, _) = sample(0, 4, HiddenDtype::Bf16);
    s.loss_mask.pop();
    let err = writer.push(&s).unwrap_err().to_string();
    assert!(err.contains("loss_mask"), "{err}");
}

#[test]
fn one_sample_reads_without_the_rest_of_the_shard() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let samples: Vec<CacheSample> = (0..3).map(|i| sample(i, 6, HiddenDtype::Bf16).0).collect();
    write_cache(dir.path(), HiddenDtype::Bf16, &samples);
    let shard = dir.path().join("shard-00000.parquet");
    let meta = SerializedFileReader::new(std::fs::File::open(&shard).unwrap())
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta.num_row_groups(), 3, "one row group per sample");
    // Wreck every column chunk of samples 0 and 2: sample 1 must still read, exactly.
    let mut bytes = std::fs::read(&shard).unwrap();
    for rg in [0, 2] {
        for column in meta.row_group(rg).columns() {
            let (start, len) = column.byte_range();
            bytes[start as usize..(start + len) as usize].fill(0xAB);
        }
    }
    std::fs::write(&shard, &bytes).unwrap();
    let reader = CacheReader::open(dir.path()).unwrap();
    assert_eq!(reader.sample(1).unwrap(), samples[1]);
    assert!(reader.sample(0).is_err() || reader.sample(0).unwrap() != samples[0]);
}

/// A manifest is file contents: a shard name that leaves the cache folder is refused by
/// `validate` and by the reader, and the file outside is never opened.
#[test]
fn a_shard_name_outside_the_cache_folder_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    let samples: Vec<CacheSample> = (0..2).map(|i| sample(i, 5, HiddenDtype::Bf16).0).collect();
    let mut manifest = write_cache(&dir, HiddenDtype::Bf16, &samples);
    // A whole, valid shard outside the folder: the escape must be refused by name, not
    // because the file is missing or corrupt.
    std::fs::rename(
        dir.join(shard_file_name(0)),
        root.path().join("outside.parquet"),
    )
    .unwrap();
    for bad in [
        "../outside.parquet".to_string(),
        root.path().join("outside.parquet").display().to_string(),
        "sub/shard.parquet".to_string(),
        "..".to_string(),
    ] {
        manifest.shards[0].file_name = bad.clone();
        manifest.store(&dir).unwrap();
        for err in [
            validate(&dir).err().map(|e| e.to_string()),
            CacheReader::open(&dir).err().map(|e| e.to_string()),
        ] {
            let err = err.unwrap_or_else(|| panic!("`{bad}` was accepted"));
            assert!(err.contains("manifest.json"), "{err}");
            assert!(err.contains("shards[0].file_name"), "{err}");
            assert!(
                err.contains(&format!("`{bad}` is not a plain file name")),
                "{err}"
            );
        }
    }
}
