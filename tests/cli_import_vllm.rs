//! `deepspec cache import-vllm`: vLLM-format hidden-state dumps written from SmolLM2 by our
//! own target pass (one `{request}.safetensors` per conversation: `token_ids` [T] int64,
//! `hidden_states` [T, n, H] bf16 in ascending vLLM layer-id order, the last slot the
//! residual before the final norm) import into the cache `prepare` makes from the same
//! token ids; every bad input is one error naming the file and tensor.

use deepspec_core::backend::Cpu;
use deepspec_core::cache::{CacheReader, CacheSample, EncodedHidden, HiddenDtype};
use deepspec_core::io::chat::TokenizedChat;
use deepspec_core::model::load_target;
use deepspec_core::prepare::target_pass::target_pass;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deepspec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2() -> PathBuf {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh first",
        path.display()
    );
    path
}

/// SmolLM2's taps in recipes/smollm2-*.toml (of 30 layers), so those recipes train on the
/// imported cache.
const TAPS: [usize; 5] = [1, 8, 15, 22, 28];

fn recipe(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("smollm2.toml");
    let text = format!(
        "[model]\ntarget_model_name_or_path = {:?}\ntarget_layer_ids = {TAPS:?}\n\n\
         [data]\nmax_length = 96\nmin_loss_tokens = 2\n\n\
         [prepare]\nseed = 3\ntemperature = 0.0\nmax_new_tokens = 10\nbatch_size = 1\n{extra}\n",
        smollm2().display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "command failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string() + &stderr
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "command should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn import(recipe: &Path, dumps: &Path, out: &Path, extra: &[&str]) -> Output {
    deepspec()
        .args(["cache", "import-vllm", "--quiet", "--recipe"])
        .arg(recipe)
        .arg(dumps)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// A safetensors file written by hand (8-byte header length, JSON header, data), so the
/// dumps do not go through the writer under test: `(name, dtype, shape, bytes)`.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
    }
    std::fs::write(path, out).unwrap();
}

fn bf16_bytes(codes: &[u16]) -> Vec<u8> {
    codes.iter().flat_map(|c| c.to_le_bytes()).collect()
}

fn ids_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect()
}

/// One dump per cached sample, in vLLM's layout: the taps and the last layer's (pre-norm)
/// output as vLLM ids `tap + 1` and `L`, ascending; a `.lock` sidecar beside each, as the
/// connector leaves them. Returns the dump of sample 0's `(ids, hidden codes, slots)`.
fn write_dumps(dir: &Path, samples: &[CacheSample]) -> (Vec<u32>, Vec<u16>, usize) {
    std::fs::create_dir_all(dir).unwrap();
    let target = load_target::<Cpu>(&smollm2(), &Default::default()).unwrap();
    let layers = target.config.num_hidden_layers;
    let hidden = target.config.hidden_size;
    let mut captured: Vec<usize> = TAPS.to_vec();
    captured.push(layers - 1);
    let mut first = None;
    for (i, sample) in samples.iter().enumerate() {
        let chat = TokenizedChat {
            text: String::new(),
            input_ids: sample.input_ids.clone(),
            loss_mask: sample.loss_mask.clone(),
        };
        let pass = target_pass(&target, &[chat], &[0], &captured, HiddenDtype::Bf16);
        let EncodedHidden::Bf16(codes) = &pass[0].hidden else {
            unreachable!()
        };
        let name = format!(
            "cmpl-{i:03}-{:08x}-0.safetensors",
            0x9e37_79b9u32.wrapping_mul(i as u32 + 1)
        );
        let path = dir.join(&name);
        let t = sample.input_ids.len();
        write_safetensors(
            &path,
            &[
                (
                    "hidden_states",
                    "BF16",
                    vec![t, captured.len(), hidden],
                    bf16_bytes(codes),
                ),
                ("token_ids", "I64", vec![t], ids_bytes(&sample.input_ids)),
            ],
        );
        std::fs::write(dir.join(format!("{name}.lock")), b"").unwrap();
        if i == 0 {
            first = Some((sample.input_ids.clone(), codes.clone(), captured.len()));
        }
    }
    first.unwrap()
}

fn samples(dir: &Path) -> Vec<CacheSample> {
    let reader = CacheReader::open(dir).unwrap();
    (0..reader.len())
        .map(|i| reader.sample(i).unwrap())
        .collect()
}

fn decoded(enc: &EncodedHidden) -> Vec<f32> {
    let EncodedHidden::Bf16(codes) = enc else {
        unreachable!("bf16 cache")
    };
    codes
        .iter()
        .map(|&c| half::bf16::from_bits(c).to_f32())
        .collect()
}

#[test]
fn a_vllm_dump_imports_as_the_cache_prepare_makes_and_bad_dumps_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "");
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"turns\": [\"What is 2+3?\"]}\n{\"turns\": [\"Name a colour.\", \"And another?\"]}\n{\"turns\": [\"Say hi.\"]}\n",
    )
    .unwrap();
    let prepared = tmp.path().join("prepared");
    ok(&deepspec()
        .args(["prepare", "--quiet", "--recipe"])
        .arg(&r)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&prepared)
        .output()
        .unwrap());
    let expected = samples(&prepared);
    assert_eq!(expected.len(), 3);

    let dumps = tmp.path().join("dumps");
    let (ids0, codes0, n) = write_dumps(&dumps, &expected);
    let imported = tmp.path().join("imported");
    let started = std::time::Instant::now();
    let out = ok(&import(&r, &dumps, &imported, &[]));
    eprintln!("import: {out} ({:?})", started.elapsed());
    ok(&deepspec()
        .args(["cache", "validate"])
        .arg(&imported)
        .output()
        .unwrap());
    let got = samples(&imported);
    assert_eq!(got.len(), expected.len());
    let mut worst_last = 0f32;
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.source_index, e.source_index, "sample {i}");
        assert_eq!(g.input_ids, e.input_ids, "sample {i}: token ids");
        assert_eq!(
            g.loss_mask, e.loss_mask,
            "sample {i}: loss mask from the ids"
        );
        // The taps are the same bf16 values.
        assert_eq!(g.hidden, e.hidden, "sample {i}: tapped hidden states");
        // The final state: vLLM stores the residual before the final norm in bf16, so the
        // norm applied here starts from rounded inputs; prepare normalises the f32 residual.
        for (a, b) in decoded(&g.last_hidden).iter().zip(decoded(&e.last_hidden)) {
            let rel = (a - b).abs() / b.abs().max(1e-3);
            worst_last = worst_last.max(rel);
        }
    }
    eprintln!("final hidden state: worst relative difference {worst_last:.2e}");
    assert!(worst_last <= 1.6e-2, "final state differs by {worst_last}");
    let manifest = std::fs::read_to_string(imported.join("manifest.json")).unwrap();
    for field in [
        "\"engine\": \"vllm\"",
        "\"dump_layer_ids\"",
        "\"sha256\"",
        "import-vllm:",
    ] {
        assert!(
            manifest.contains(field),
            "manifest lacks {field}: {manifest}"
        );
    }
    // Done: a second run writes nothing and keeps the bytes.
    let before = std::fs::read(imported.join("shard-00000.parquet")).unwrap();
    ok(&import(&r, &dumps, &imported, &[]));
    assert_eq!(
        std::fs::read(imported.join("shard-00000.parquet")).unwrap(),
        before
    );

    // The imported cache trains (two steps) and scores offline.
    let run = tmp.path().join("run");
    let recipe = root().join("recipes/smollm2-dspark.toml");
    ok(&deepspec()
        .args(["train", "--recipe"])
        .arg(&recipe)
        .arg("--cache")
        .arg(&imported)
        .arg("--out")
        .arg(&run)
        .args([
            "--set",
            "train.max_train_steps=2",
            "--set",
            "train.global_batch_size=1",
        ])
        .output()
        .unwrap());
    let report = tmp.path().join("offline.json");
    let out = ok(&deepspec()
        .args(["eval", "--offline", "--recipe"])
        .arg(&recipe)
        .arg("--cache")
        .arg(&imported)
        .arg("--drafter")
        .arg(run.join("step_latest"))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap());
    let scored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let tau = scored["sets"]["imported"]["tau"].as_f64().unwrap();
    assert!((1.0..=8.0).contains(&tau), "{out}");
    assert!(
        scored["offline"]["rounds"].as_u64().unwrap() > 0,
        "{scored}"
    );

    // Bad dumps, each alone in its folder: one error naming the file and the tensor.
    let t = ids0.len();
    let hidden = codes0.len() / (t * n);
    let bad = |name: &str, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]| -> String {
        let dir = tmp.path().join(format!("bad-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        write_safetensors(&dir.join(format!("{name}.safetensors")), tensors);
        let err = failed(&import(
            &r,
            &dir,
            &tmp.path().join(format!("out-{name}")),
            &[],
        ));
        assert!(err.contains(&format!("{name}.safetensors")), "{err}");
        err
    };
    let good_hidden = || {
        (
            "hidden_states",
            "BF16",
            vec![t, n, hidden],
            bf16_bytes(&codes0),
        )
    };
    let good_ids = || ("token_ids", "I64", vec![t], ids_bytes(&ids0));
    let err = bad("missing", &[good_ids()]);
    assert!(err.contains("no tensor `hidden_states`"), "{err}");
    let err = bad(
        "width",
        &[
            (
                "hidden_states",
                "BF16",
                vec![t, n * 2, hidden / 2],
                bf16_bytes(&codes0),
            ),
            good_ids(),
        ],
    );
    assert!(
        err.contains("hidden size 288") && err.contains("another model"),
        "{err}"
    );
    let err = bad(
        "layers",
        &[
            (
                "hidden_states",
                "BF16",
                vec![t, n - 1, hidden],
                bf16_bytes(&codes0[..t * (n - 1) * hidden]),
            ),
            good_ids(),
        ],
    );
    assert!(
        err.contains(&format!("holds {} layers", n - 1)) && err.contains("--dump-layer-ids"),
        "{err}"
    );
    let mut far = ids0.clone();
    far[2] = 1_000_000;
    let err = bad(
        "vocab",
        &[
            good_hidden(),
            ("token_ids", "I64", vec![t], ids_bytes(&far)),
        ],
    );
    assert!(
        err.contains("id 1000000 at position 2") && err.contains("vocabulary"),
        "{err}"
    );
    // A truncated file (a copy cut short).
    let dir = tmp.path().join("bad-truncated");
    std::fs::create_dir_all(&dir).unwrap();
    let whole = std::fs::read(
        std::fs::read_dir(&dumps)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("truncated.safetensors"), &whole[..whole.len() / 2]).unwrap();
    let err = failed(&import(&r, &dir, &tmp.path().join("out-truncated"), &[]));
    assert!(
        err.contains("truncated.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A recipe tap the dump does not hold (launched with other ids).
    let err = failed(&import(
        &r,
        &dumps,
        &tmp.path().join("out-ids"),
        &["--dump-layer-ids", "2,9,16,23,30"],
    ));
    assert!(err.contains("taps layer 28 (vLLM id 29)"), "{err}");
}

/// An import stopped by a damaged dump keeps every finished shard; once the file is
/// replaced, the re-run finishes with the bytes of an uninterrupted import, and a leftover
/// temporary file is removed.
#[test]
fn an_interrupted_import_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    // One sample per shard.
    let r = recipe(tmp.path(), "shard_max_bytes = 1");
    let prompts = tmp.path().join("prompts.jsonl");
    let text: String = (0..4)
        .map(|i| format!("{{\"turns\": [\"Count to {}.\"]}}\n", i + 2))
        .collect();
    std::fs::write(&prompts, text).unwrap();
    let prepared = tmp.path().join("prepared");
    ok(&deepspec()
        .args(["prepare", "--quiet", "--recipe"])
        .arg(&r)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&prepared)
        .output()
        .unwrap());
    let dumps = tmp.path().join("dumps");
    write_dumps(&dumps, &samples(&prepared));
    let whole = tmp.path().join("whole");
    ok(&import(&r, &dumps, &whole, &[]));

    let mut names: Vec<PathBuf> = std::fs::read_dir(&dumps)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    names.sort();
    let third = std::fs::read(&names[2]).unwrap();
    std::fs::write(&names[2], &third[..100]).unwrap();
    let cut = tmp.path().join("cut");
    let err = failed(&import(&r, &dumps, &cut, &[]));
    assert!(
        err.contains(&names[2].file_name().unwrap().to_string_lossy().to_string()),
        "{err}"
    );
    let kept = std::fs::read_to_string(cut.join("manifest.json")).unwrap();
    assert_eq!(kept.matches("\"file_name\": \"shard-").count(), 1, "{kept}");
    std::fs::write(cut.join("shard-00001.parquet.tmp"), b"half a shard").unwrap();
    std::fs::write(&names[2], &third).unwrap();
    ok(&import(&r, &dumps, &cut, &[]));
    let listing = |d: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().to_string(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (a, b) = (listing(&cut), listing(&whole));
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after the resumed import");
    }
}
