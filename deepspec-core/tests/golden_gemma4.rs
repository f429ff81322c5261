//! Parity of the Gemma4 target with transformers' outputs stored in the Gemma4 fixtures
//! (`DEEPSPEC_GOLDEN_GEMMA4_DIR`, default tests/golden-gemma4): logits, the logits before
//! soft-capping, the scaled embeddings, every layer's output (after its `layer_scalar`), the
//! final norm, and the cached bf16 features. Every size and switch comes from the files.

use burn::tensor::{Int, Tensor, TensorData};
use deepspec_core::backend::Cpu;
use deepspec_core::cache::reference::ReferenceCache;
use deepspec_core::fixtures::{golden_gemma4_dir, max_abs_diff};
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::model::{load_target, to_host, KvCache, LoadedTarget, LogitsFor, TargetOutput};

type B = Cpu;

struct Batch {
    ids: Vec<i64>,
    real: Vec<Vec<bool>>,
    batch: usize,
    seq: usize,
}

fn inputs() -> Batch {
    let file = SafetensorsFile::open(golden_gemma4_dir().join("inputs.safetensors")).unwrap();
    let (shape, ids) = file.i64("input_ids").unwrap();
    let (_, mask) = file.i64("attention_mask").unwrap();
    let (batch, seq) = (shape[0], shape[1]);
    let real = (0..batch)
        .map(|b| {
            mask[b * seq..(b + 1) * seq]
                .iter()
                .map(|&m| m != 0)
                .collect()
        })
        .collect();
    Batch {
        ids,
        real,
        batch,
        seq,
    }
}

/// Worst `|diff|` over real positions of `[batch, seq, width]` values, asserted below `tol`
/// relative to the largest expected magnitude (layer outputs are O(10)).
fn assert_close(name: &str, got: &[f32], want: &[f32], inputs: &Batch, tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{name}: sizes");
    let width = want.len() / (inputs.batch * inputs.seq);
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for b in 0..inputs.batch {
        for s in 0..inputs.seq {
            if !inputs.real[b][s] {
                continue;
            }
            let at = (b * inputs.seq + s) * width;
            let (d, i) = max_abs_diff(&got[at..at + width], &want[at..at + width]);
            assert!(
                d <= tol * scale,
                "{name}: |diff| {d} > {tol}·{scale} at row {b}, position {s}, feature {i}"
            );
            worst = worst.max(d);
        }
    }
    eprintln!("{name}: max |diff| {worst:.3e} (largest value {scale:.2})");
    worst
}

fn run() -> (Batch, LoadedTarget<B>, TargetOutput<B>, Vec<usize>) {
    let device = Default::default();
    let target = load_target::<B>(&golden_gemma4_dir().join("target"), &device).unwrap();
    let inputs = inputs();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(inputs.ids.clone(), [inputs.batch, inputs.seq]),
        &device,
    );
    let taps: Vec<usize> = (0..target.model.num_layers() - 1).collect();
    let out = target
        .model
        .forward_padded(&target.rope, ids, &inputs.real, &taps, LogitsFor::All);
    (inputs, target, out, taps)
}

#[test]
fn golden_gemma4_target_logits_and_layers() {
    let (inputs, target, out, taps) = run();
    let expected =
        SafetensorsFile::open(golden_gemma4_dir().join("target/expected.safetensors")).unwrap();
    let want = |name: &str| expected.f32(name).unwrap().data;
    assert_close(
        "logits",
        &to_host(out.logits.unwrap()).data,
        &want("logits"),
        &inputs,
        2e-5,
    );
    let deepspec_core::model::TargetNet::Gemma4 { model, .. } = &target.model else {
        panic!("a Gemma4 folder loads as a Gemma4 target");
    };
    let before = to_host(model.head(out.final_hidden.clone())).data;
    assert_close(
        "logits_before_softcap",
        &before,
        &want("logits_before_softcap"),
        &inputs,
        2e-5,
    );
    let device = Default::default();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(inputs.ids.clone(), [inputs.batch, inputs.seq]),
        &device,
    );
    assert_close(
        "embeddings",
        &to_host(model.embed(ids)).data,
        &want("embeddings"),
        &inputs,
        1e-6,
    );
    for (tensor, layer) in out.tapped.into_iter().zip(&taps) {
        let name = format!("layer_output.{layer}");
        assert_close(&name, &to_host(tensor).data, &want(&name), &inputs, 2e-5);
    }
    assert_close(
        "final_norm_hidden",
        &to_host(out.final_hidden).data,
        &want("final_norm_hidden"),
        &inputs,
        2e-5,
    );
}

/// The reference cache's features are the target's taps and final state rounded to bf16:
/// ours, rounded the same way, are at most one bf16 step from them, plus the f32 tolerance
/// (1e-4 absolute) where a value sits near a rounding boundary.
/// The spacing of bf16 values around `v`.
fn bf16_step(v: f32) -> f32 {
    let b = half::bf16::from_f32(v.abs());
    (half::bf16::from_bits(b.to_bits() + 1).to_f32() - b.to_f32()).abs()
}

#[test]
fn golden_gemma4_target_cached_features() {
    let (inputs, _, out, _) = run();
    let cache = ReferenceCache::open(&golden_gemma4_dir().join("cache")).unwrap();
    let layers: Vec<usize> = cache.target_layer_ids.iter().copied().collect();
    let taps: Vec<Vec<f32>> = out.tapped.into_iter().map(|t| to_host(t).data).collect();
    let last = to_host(out.final_hidden).data;
    let h = cache.hidden_size;
    let shard = std::fs::read(cache.shard_file(0)).unwrap();
    for b in 0..inputs.batch {
        let sample = cache.sample(b, &shard).unwrap();
        let n = sample.input_ids.len();
        let cached = sample.hidden.to_f32();
        let cached_last = sample.last_hidden.to_f32();
        let mut worst = 0f32;
        for s in 0..n {
            for (k, &layer) in layers.iter().enumerate() {
                let ours = &taps[layer][(b * inputs.seq + s) * h..][..h];
                let theirs = &cached[(s * layers.len() + k) * h..][..h];
                for (a, c) in ours.iter().zip(theirs) {
                    let d = (half::bf16::from_f32(*a).to_f32() - c).abs();
                    assert!(
                        d <= bf16_step(*c) + 1e-4,
                        "sample {b}, position {s}, layer {layer}: {a} vs {c}"
                    );
                    worst = worst.max(d);
                }
            }
            let ours = &last[(b * inputs.seq + s) * h..][..h];
            let theirs = &cached_last[s * h..][..h];
            for (a, c) in ours.iter().zip(theirs) {
                let d = (half::bf16::from_f32(*a).to_f32() - c).abs();
                assert!(
                    d <= bf16_step(*c) + 1e-4,
                    "sample {b}, position {s}: final {a} vs {c}"
                );
            }
        }
        eprintln!("sample {b}: cached taps within {worst:.3e} after bf16 rounding");
    }
}

/// A Gemma4 drafter checkpoint written here has the reference's keys, shapes and values and
/// its config fields, for DSpark, DFlash and Eagle3.
#[test]
fn golden_gemma4_drafter_checkpoint_round_trip() {
    use deepspec_core::drafter::{Drafter, DrafterConfig};
    for algo in ["dspark", "dflash", "eagle3"] {
        let dir = golden_gemma4_dir().join(algo);
        let device = Default::default();
        let (drafter, config) = Drafter::<B>::load(&dir, &device).unwrap();
        assert!(
            matches!(drafter, Drafter::DSparkGemma4(_) | Drafter::Eagle3Gemma4(_)),
            "{algo}"
        );
        let out = tempfile::tempdir().unwrap();
        drafter.save(out.path(), &config).unwrap();
        let theirs = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
        let ours = SafetensorsFile::open(out.path().join("model.safetensors")).unwrap();
        let names = |f: &SafetensorsFile| {
            let mut v: Vec<String> = f.tensor_names().cloned().collect();
            v.sort();
            v
        };
        assert_eq!(names(&ours), names(&theirs), "{algo}: checkpoint keys");
        for name in names(&theirs) {
            let (a, b) = (ours.f32(&name).unwrap(), theirs.f32(&name).unwrap());
            assert_eq!(a.shape, b.shape, "{algo}: {name} shape");
            assert_eq!(a.data, b.data, "{algo}: {name} values");
        }
        let reread = DrafterConfig::from_file(&out.path().join("config.json")).unwrap();
        assert_eq!(reread.json, config.json, "{algo}: config fields");
        let theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            serde_json::Value::Object(reread.json),
            theirs,
            "{algo}: config.json"
        );
    }
}

/// Decoding through the KV cache (a prefill, then one token at a time, both rows together)
/// gives the full forward's soft-capped logits: sliding windows, full layers and the
/// kv-shared layers' reuse of the cache.
#[test]
fn golden_gemma4_target_incremental_matches_full_forward() {
    let (inputs, target, full, _) = run();
    let full = to_host(full.logits.unwrap());
    let vocab = full.shape[2];
    let mut cache = KvCache::<B>::new(target.model.num_layers(), inputs.batch);
    let prefill = 20;
    let token =
        |b: usize, s: usize| inputs.real[b][s].then(|| inputs.ids[b * inputs.seq + s] as u32);
    let rows: Vec<Vec<Option<u32>>> = (0..inputs.batch)
        .map(|b| (0..prefill).map(|s| token(b, s)).collect())
        .collect();
    let out = target
        .model
        .step(&target.rope, &rows, &mut cache, &[], LogitsFor::All);
    let (batch, seq) = (inputs.batch, inputs.seq);
    let mut got = vec![0f32; batch * seq * vocab];
    let first = to_host(out.logits.unwrap()).data;
    for b in 0..batch {
        let (from, to) = (b * prefill * vocab, b * seq * vocab);
        got[to..to + prefill * vocab].copy_from_slice(&first[from..from + prefill * vocab]);
    }
    for s in prefill..seq {
        let rows: Vec<Vec<Option<u32>>> = (0..batch).map(|b| vec![token(b, s)]).collect();
        let out = target
            .model
            .step(&target.rope, &rows, &mut cache, &[], LogitsFor::All);
        let step = to_host(out.logits.unwrap()).data;
        for b in 0..batch {
            let to = (b * seq + s) * vocab;
            got[to..to + vocab].copy_from_slice(&step[b * vocab..(b + 1) * vocab]);
        }
    }
    let mut worst = 0f32;
    for (row, real) in inputs.real.iter().enumerate() {
        for (pos, &is_real) in real.iter().enumerate() {
            if !is_real {
                continue;
            }
            let at = (row * seq + pos) * vocab;
            let (d, _) = max_abs_diff(&got[at..at + vocab], &full.data[at..at + vocab]);
            assert!(d <= 1e-4, "row {row}, position {pos}: |diff| {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("incremental against full forward: max |diff| {worst:.3e}");
}

/// An untied head: the fixture target with an `lm_head.weight` of twice the embedding (and
/// its text config still saying `tie_word_embeddings: true`, the library default) loads that
/// head, so its logits before the cap are exactly twice the tied model's.
#[test]
fn golden_gemma4_target_untied_head() {
    use deepspec_core::io::safetensors::{write_f32, NamedTensor};
    let src = golden_gemma4_dir().join("target");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let file = SafetensorsFile::open(src.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, deepspec_core::io::HostTensor)> = file
        .tensor_names()
        .map(|n| (n.clone(), file.f32(n).unwrap()))
        .collect();
    let mut head = file
        .f32("model.language_model.embed_tokens.weight")
        .unwrap();
    head.data.iter_mut().for_each(|v| *v *= 2.0);
    tensors.push(("lm_head.weight".into(), head));
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(name, t)| NamedTensor {
            name,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    write_f32(
        &dir.path().join("model.safetensors"),
        &named,
        &Default::default(),
    )
    .unwrap();
    let device = Default::default();
    let untied = load_target::<B>(dir.path(), &device).unwrap();
    let (inputs, tied, out, _) = run();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(inputs.ids.clone(), [inputs.batch, inputs.seq]),
        &device,
    );
    let again = untied
        .model
        .forward_padded(&untied.rope, ids, &inputs.real, &[], LogitsFor::None);
    let (
        deepspec_core::model::TargetNet::Gemma4 { model: a, .. },
        deepspec_core::model::TargetNet::Gemma4 { model: b, .. },
    ) = (&untied.model, &tied.model)
    else {
        panic!("Gemma4 targets");
    };
    assert!(a.lm_head.is_some() && b.lm_head.is_none());
    let doubled: Vec<f32> = to_host(b.head(out.final_hidden))
        .data
        .iter()
        .map(|v| 2.0 * v)
        .collect();
    let got = to_host(a.head(again.final_hidden)).data;
    assert_close(
        "untied logits_before_softcap",
        &got,
        &doubled,
        &inputs,
        1e-6,
    );
}
