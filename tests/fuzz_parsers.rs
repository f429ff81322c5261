//! Mutation fuzzing of every file parser a user's files reach: recipes (TOML and `--set`),
//! prompt JSONL, benchmark-set JSONL, GGUF headers and tensor infos, safetensors headers and
//! index files, cache manifests, and cache shards (Parquet footer and key-value metadata).
//!
//! Seeds are the repository's real files (recipes, `data/eval-datasets`, `tests/golden*`), a
//! cache written with the real writer, and SmolLM2's GGUF header when the model is present
//! (`scripts/fetch-smollm2.sh`). A target fails on a panic, a hang, an allocation the input
//! cannot justify, or an accepted file that reads back inconsistent; an `Err` is the expected
//! answer to most inputs. Budget per target: `DEEPSPEC_FUZZ_SECS` (default 3) and
//! `DEEPSPEC_FUZZ_CASES`; see tests/fuzz/mod.rs.

mod fuzz;

use deepspec_core::cache::synthetic::{write_v4_cache, write_v4_target, SyntheticCache};
use deepspec_core::cache::{validate, CacheReader, Manifest};
use deepspec_core::io::gguf::{GgufFile, GgufWeights};
use deepspec_core::io::safetensors::{read_weight_map, SafetensorsFile};
use deepspec_core::io::WeightSource;
use deepspec_core::layers::TargetLayerIds;
use deepspec_core::model::config::TargetConfig;
use deepspec_core::prepare::prompts::{read_prompts, OnBadLine};
use deepspec_core::recipe::Recipe;
use deepspec_eval::datasets::{held_out, read_jsonl, Selection};
use fuzz::{fuzz, Seed};
use std::io::Read;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: fuzz::CountingAlloc = fuzz::CountingAlloc;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn files_in(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

fn name_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The first `n` lines of a text file.
fn head_lines(path: &Path, n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out: String = text.lines().take(n).collect::<Vec<_>>().join("\n");
    out.push('\n');
    out.into_bytes()
}

/// A scratch file rewritten for every input (one per target thread).
struct Scratch {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Scratch {
    fn new(file_name: &str) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name);
        Scratch { _dir: dir, path }
    }
    fn write(&self, bytes: &[u8]) -> &Path {
        std::fs::write(&self.path, bytes).unwrap();
        &self.path
    }
}

fn same_len(what: &str, shape: &[usize], len: usize) -> Result<(), String> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n == len => Ok(()),
        _ => Err(format!(
            "{what}: accepted with shape {shape:?} but {len} values"
        )),
    }
}

#[test]
fn fuzz_recipe_toml_and_overrides() {
    let overrides: [&[&str]; 4] = [
        &[],
        &["train.lr=1e-4", "model.target_layer_ids=[1, 3]"],
        &["train.max_train_steps=none", "data.max_length=2048"],
        &[
            "model.block_size=16",
            "prepare.temperature=0.7",
            "x.y.z=\"s\"",
        ],
    ];
    let mut seeds = Vec::new();
    for (i, path) in files_in("recipes", "toml").iter().enumerate() {
        let mut bytes = std::fs::read(path).unwrap();
        for o in overrides[i % overrides.len()] {
            bytes.push(0);
            bytes.extend_from_slice(o.as_bytes());
        }
        seeds.push(Seed::new(name_of(path), bytes));
    }
    // Input: the recipe text, then `--set` overrides, separated by NUL bytes.
    let report = fuzz("recipe", seeds, |input| {
        let text = String::from_utf8_lossy(input);
        let mut parts = text.split('\0');
        let body = parts.next().unwrap_or_default();
        let sets: Vec<String> = parts.map(str::to_string).collect();
        let path = Path::new("fuzz.toml");
        if let Ok(recipe) = Recipe::parse_with(path, body, &sets) {
            let again = Recipe::parse(path, &recipe.to_toml())
                .map_err(|e| format!("an accepted recipe's to_toml does not parse: {e}"))?;
            if again != recipe {
                return Err("an accepted recipe does not round-trip through to_toml".into());
            }
        }
        Ok(())
    });
    assert!(report.executions > 0);
}

#[test]
fn fuzz_prompt_jsonl() {
    let mut seeds: Vec<Seed> = files_in("data/eval-datasets", "jsonl")
        .iter()
        .map(|p| Seed::new(name_of(p), head_lines(p, 12)))
        .collect();
    seeds.push(Seed::new(
        "shapes.jsonl",
        concat!(
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            "\n\n",
            r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#,
            "\n",
            r#"{"conversations": [{"role": "user", "content": "q"}]}"#,
            "\n",
            r#"[{"role": "user", "content": "q\u00e9"}]"#,
            "\n",
            r#"{"turns": ["one", "two"]}"#,
            "\n"
        )
        .as_bytes()
        .to_vec(),
    ));
    thread_local!(static FILE: Scratch = Scratch::new("prompts.jsonl"));
    fuzz("prompt-jsonl", seeds, |input| {
        FILE.with(|f| {
            let path = f.write(input);
            for mode in [OnBadLine::Fail, OnBadLine::Skip] {
                if let Ok(prompts) = read_prompts(path, mode, None, |_| {}) {
                    if prompts.is_empty() || prompts.iter().any(|c| c.is_empty()) {
                        return Err("read_prompts accepted an empty conversation list".into());
                    }
                }
            }
            let _ = read_prompts(path, OnBadLine::Skip, Some(2), |_| {});
            Ok(())
        })
    });
}

#[test]
fn fuzz_dataset_jsonl() {
    // Input: the set's name on the first line, then its JSONL.
    let with_name = |name: &str, body: Vec<u8>| {
        let mut bytes = format!("{name}\n").into_bytes();
        bytes.extend(body);
        bytes
    };
    let mut seeds = Vec::new();
    for path in files_in("data/eval-datasets", "jsonl") {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let body = if name == "aime25" || name == "mt-bench" {
            std::fs::read(&path).unwrap()
        } else {
            head_lines(&path, 8)
        };
        seeds.push(Seed::new(name_of(&path), with_name(&name, body)));
    }
    // More rows than aime25's 30, so the seeded shuffle and the held-out split run.
    let rows: String = (0..40)
        .map(|i| format!("{{\"turns\": [\"question {i}\"]}}\n"))
        .collect();
    seeds.push(Seed::new(
        "aime25-40-rows",
        with_name("aime25", rows.into()),
    ));
    thread_local!(static FILE: Scratch = Scratch::new("set.jsonl"));
    fuzz("dataset-jsonl", seeds, |input| {
        let split = input
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(input.len());
        let name = String::from_utf8_lossy(&input[..split]).into_owned();
        let body = input.get(split + 1..).unwrap_or_default();
        FILE.with(|f| {
            let path = f.write(body);
            for limit in [None, Some(3)] {
                let selection = Selection {
                    seed: 980406,
                    limit,
                };
                if let Ok(set) = read_jsonl(&name, path, selection) {
                    if set.samples.iter().any(|s| s.turns.is_empty()) {
                        return Err("read_jsonl accepted a sample without turns".into());
                    }
                }
            }
            let _ = held_out(&name, path, 980406, Some(5));
            Ok(())
        })
    });
}

/// A GGUF file written field by field, recording where its integers are.
#[derive(Default)]
struct GgufBuilder {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

impl GgufBuilder {
    fn kv(&mut self, key: &str, type_id: u32, value: Vec<u8>) -> &mut Self {
        self.kv.push((key.to_string(), type_id, value));
        self
    }
    fn string(&mut self, key: &str, value: &str) -> &mut Self {
        self.kv(key, 8, gguf_string(value))
    }
    fn u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.kv(key, 4, value.to_le_bytes().to_vec())
    }
    fn strings(&mut self, key: &str, items: &[&str]) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend(gguf_string(s));
        }
        self.kv(key, 9, v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id, data));
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (key, type_id, value) in &self.kv {
            out.extend(gguf_string(key));
            out.extend(type_id.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0u64;
        for (name, dims, type_id, data) in &self.tensors {
            out.extend(gguf_string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            let start = out.len();
            out.extend(data);
            out.resize(start + data.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

/// Byte length of a GGUF value of `type_id` at `pos`, or `None` past the end.
fn gguf_value_len(bytes: &[u8], pos: usize, type_id: u32) -> Option<usize> {
    let u64_at = |p: usize| Some(u64::from_le_bytes(bytes.get(p..p + 8)?.try_into().ok()?));
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8 + usize::try_from(u64_at(pos)?).ok()?,
        9 => {
            let item = u32::from_le_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?);
            let n = u64_at(pos + 4)?;
            let mut p = pos + 12;
            for _ in 0..n {
                p += gguf_value_len(bytes, p, item)?;
            }
            p - pos
        }
        _ => return None,
    })
}

/// The integer fields of a GGUF header (counts, lengths, types, dims, offsets) and where the
/// header ends. Array items past the fourth are skipped: their lengths are all alike.
fn gguf_int_fields(bytes: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let u64_at = |p: usize| u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap());
    let u32_at = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap());
    let mut fields = vec![(4, 4), (8, 8), (16, 8)];
    let (tensors, kvs) = (u64_at(8), u64_at(16));
    let mut p = 24;
    for _ in 0..kvs {
        fields.push((p, 8));
        p += 8 + u64_at(p) as usize;
        let type_id = u32_at(p);
        fields.push((p, 4));
        p += 4;
        match type_id {
            8 => fields.push((p, 8)),
            9 => {
                fields.extend([(p, 4), (p + 4, 8)]);
                let item = u32_at(p);
                let mut q = p + 12;
                for _ in 0..u64_at(p + 4).min(4) {
                    if item == 8 {
                        fields.push((q, 8));
                    }
                    q += gguf_value_len(bytes, q, item).unwrap();
                }
            }
            2..=5 | 10 | 11 => fields.push((p, gguf_value_len(bytes, p, type_id).unwrap())),
            _ => {}
        }
        p += gguf_value_len(bytes, p, type_id).unwrap();
    }
    for _ in 0..tensors {
        fields.push((p, 8));
        p += 8 + u64_at(p) as usize;
        let n_dims = u32_at(p) as usize;
        fields.push((p, 4));
        p += 4;
        for _ in 0..n_dims {
            fields.push((p, 8));
            p += 8;
        }
        fields.extend([(p, 4), (p + 4, 8)]);
        p += 12;
    }
    (fields, p)
}

fn gguf_seed(name: &str, bytes: Vec<u8>) -> Seed {
    let (fields, header_end) = gguf_int_fields(&bytes);
    let mut seed = Seed::new(name, bytes);
    seed.int_fields = fields;
    seed.hot = 0..header_end;
    seed
}

/// SmolLM2's real metadata with its three vocabulary arrays cut to 8 items, and its small
/// tensors (norms) with their real bytes: a whole, valid file of a few KiB.
fn smollm2_trimmed(header: &[u8], model: &Path) -> Vec<u8> {
    let u64_at = |p: usize| u64::from_le_bytes(header[p..p + 8].try_into().unwrap());
    let u32_at = |p: usize| u32::from_le_bytes(header[p..p + 4].try_into().unwrap());
    let mut b = GgufBuilder::default();
    let (tensors, kvs) = (u64_at(8), u64_at(16));
    let mut p = 24;
    for _ in 0..kvs {
        let key_len = u64_at(p) as usize;
        let key = String::from_utf8_lossy(&header[p + 8..p + 8 + key_len]).into_owned();
        p += 8 + key_len;
        let type_id = u32_at(p);
        p += 4;
        let len = gguf_value_len(header, p, type_id).unwrap();
        let value = if type_id == 9 {
            let item = u32_at(p);
            let mut q = p + 12;
            for _ in 0..u64_at(p + 4).min(8) {
                q += gguf_value_len(header, q, item).unwrap();
            }
            let mut v = header[p..p + 4].to_vec();
            v.extend(u64_at(p + 4).min(8).to_le_bytes());
            v.extend_from_slice(&header[p + 12..q]);
            v
        } else {
            header[p..p + len].to_vec()
        };
        b.kv(&key, type_id, value);
        p += len;
    }
    let mut infos = Vec::new();
    for _ in 0..tensors {
        let name_len = u64_at(p) as usize;
        let name = String::from_utf8_lossy(&header[p + 8..p + 8 + name_len]).into_owned();
        p += 8 + name_len;
        let n_dims = u32_at(p) as usize;
        p += 4;
        let dims: Vec<u64> = (0..n_dims).map(|i| u64_at(p + 8 * i)).collect();
        p += 8 * n_dims;
        infos.push((name, dims, u32_at(p), u64_at(p + 4)));
        p += 12;
    }
    let data_start = p.div_ceil(32) * 32;
    let mut file = std::fs::File::open(model).unwrap();
    for (name, dims, type_id, offset) in infos.iter().filter(|t| t.2 == 0).take(4) {
        let len = dims.iter().product::<u64>() as usize * 4;
        let mut data = vec![0u8; len];
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(data_start as u64 + offset))
            .unwrap();
        file.read_exact(&mut data).unwrap();
        b.tensor(name, dims, *type_id, data);
    }
    b.build()
}

fn synthetic_gguf() -> Vec<u8> {
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // f16 scales: 0.5 is 0x3800, 0.25 is 0x3400, -1.0 is 0xbc00.
    let mut q8 = vec![0x00, 0x38];
    q8.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    let mut q4 = vec![0x00, 0x34, 0x00, 0xbc];
    q4.extend((0..16u8).map(|i| i * 17));
    let mut b = GgufBuilder::default();
    b.string("general.architecture", "llama")
        .u32("general.alignment", 32)
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 4)
        .u32("llama.feed_forward_length", 8)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .kv("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec())
        .kv("tokenizer.ggml.add_bos_token", 7, vec![1])
        .kv("general.i64", 11, (-5i64).to_le_bytes().to_vec())
        .kv("general.f64", 12, 0.5f64.to_le_bytes().to_vec())
        .string("tokenizer.ggml.model", "gpt2")
        .strings("tokenizer.ggml.tokens", &["a", "b", "ab", "Ġ"])
        .strings("tokenizer.ggml.merges", &["a b"])
        .kv("tokenizer.ggml.token_type", 9, {
            let mut v = 5u32.to_le_bytes().to_vec();
            v.extend(4u64.to_le_bytes());
            for t in [1i32, 1, 1, 3] {
                v.extend(t.to_le_bytes());
            }
            v
        })
        .kv("nested", 9, {
            let mut v = 9u32.to_le_bytes().to_vec();
            v.extend(1u64.to_le_bytes());
            v.extend(0u32.to_le_bytes());
            v.extend(2u64.to_le_bytes());
            v.extend([1, 2]);
            v
        })
        .tensor("token_embd.weight", &[4, 4], 0, f32s(&[0.5; 16]))
        .tensor(
            "output_norm.weight",
            &[4],
            1,
            vec![0, 60, 0, 60, 0, 60, 0, 60],
        )
        .tensor(
            "blk.0.attn_norm.weight",
            &[4],
            30,
            vec![128, 63, 128, 63, 0, 64, 0, 64],
        )
        .tensor("blk.0.attn_q.weight", &[32, 1], 8, q8)
        .tensor("blk.0.attn_k.weight", &[32], 3, q4)
        .tensor("blk.0.ffn_up.weight", &[256], 12, vec![0; 144]);
    b.build()
}

#[test]
fn fuzz_gguf_header_and_tensor_infos() {
    let mut seeds = vec![gguf_seed("synthetic.gguf", synthetic_gguf())];
    let model = repo("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if model.exists() {
        // Only the header (1.8 MB of the 98 MB file) is read.
        let mut header = vec![0u8; 4 << 20];
        let mut file = std::fs::File::open(&model).unwrap();
        file.read_exact(&mut header).unwrap();
        let trimmed = smollm2_trimmed(&header, &model);
        seeds.push(gguf_seed("smollm2-trimmed.gguf", trimmed));
        let (_, header_end) = gguf_int_fields(&header);
        header.truncate(header_end + 4096);
        seeds.push(gguf_seed("smollm2-header.gguf", header));
    } else {
        eprintln!(
            "fuzz gguf: {} is missing (scripts/fetch-smollm2.sh), fuzzing synthetic seeds only",
            model.display()
        );
    }
    thread_local!(static FILE: Scratch = Scratch::new("model.gguf"));
    fuzz("gguf", seeds, |input| {
        FILE.with(|f| {
            let Ok(file) = GgufFile::open(f.write(input)) else {
                return Ok(());
            };
            let names: Vec<String> = file.gguf_tensor_names().cloned().collect();
            for name in &names {
                if let Ok(t) = file.dequantize(name) {
                    same_len(name, &t.shape, t.data.len())?;
                }
            }
            let has_output = names.iter().any(|n| n == "output.weight");
            let _ = deepspec_core::io::tokenizer::Tok::from_gguf(&file);
            if let Ok(config) = TargetConfig::from_gguf(&file, has_output) {
                let weights =
                    GgufWeights::new(file, config.num_attention_heads, config.num_key_value_heads);
                for name in weights.names() {
                    if let Ok(t) = weights.tensor(&name) {
                        same_len(&name, &t.shape, t.data.len())?;
                    }
                }
            }
            Ok(())
        })
    });
}

fn safetensors_seed(name: &str, bytes: Vec<u8>) -> Seed {
    let header_end = bytes
        .get(..8)
        .map(|b| 8 + u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .unwrap_or(0)
        .min(bytes.len());
    let mut seed = Seed::new(name, bytes);
    seed.int_fields = vec![(0, 8), (0, 4), (4, 4)];
    seed.hot = 0..header_end;
    seed
}

/// A cache written by the real writer (a synthetic DeepSeek-V4-shaped target), in `dir`.
fn write_cache(dir: &Path) -> Manifest {
    let target = dir.join("target");
    let config = serde_json::json!({"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 3});
    write_v4_target(&target, &config, 7).unwrap();
    let spec = SyntheticCache {
        samples: 3,
        seq_len: 5,
        prompt_len: 2,
        target_layer_ids: TargetLayerIds::new(vec![0, 1]).unwrap(),
        hc_mult: 2,
        seed: 11,
    };
    write_v4_cache(&dir.join("cache"), &target, &spec).unwrap()
}

#[test]
fn fuzz_safetensors_header() {
    let mut seeds = Vec::new();
    for path in [
        "tests/golden-v4/hc.expected.safetensors",
        "tests/golden-v4/moe.expected.safetensors",
    ] {
        let p = repo(path);
        seeds.push(safetensors_seed(&name_of(&p), std::fs::read(&p).unwrap()));
    }
    // Real headers of the large fixtures, with the first 4 KiB of their data.
    for path in [
        "tests/golden/target/model.safetensors",
        "tests/golden/dspark/model.safetensors",
    ] {
        let mut bytes = std::fs::read(repo(path)).unwrap();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes.truncate(header_end + 4096);
        seeds.push(safetensors_seed(&format!("{path} (header)"), bytes));
    }
    let dir = tempfile::tempdir().unwrap();
    write_cache(dir.path());
    let written = std::fs::read(dir.path().join("target/model.safetensors")).unwrap();
    seeds.push(safetensors_seed("written-bf16.safetensors", written));
    thread_local!(static FILE: Scratch = Scratch::new("model.safetensors"));
    fuzz("safetensors", seeds, |input| {
        FILE.with(|f| {
            let Ok(file) = SafetensorsFile::open(f.write(input)) else {
                return Ok(());
            };
            let names: Vec<String> = file.tensor_names().cloned().collect();
            for name in &names {
                let info = file.info(name).unwrap().clone();
                let (_, raw) = file.raw(name).map_err(|e| e.to_string())?;
                if raw.len() != info.end - info.start {
                    return Err(format!("`{name}`: raw bytes do not match its offsets"));
                }
                if let Ok(t) = file.f32(name) {
                    same_len(name, &t.shape, t.data.len())?;
                }
                if let Ok((shape, values)) = file.i64(name) {
                    same_len(name, &shape, values.len())?;
                }
            }
            Ok(())
        })
    });
}

#[test]
fn fuzz_safetensors_index() {
    let mut seeds = Vec::new();
    for path in [
        "tests/golden/target/model.safetensors",
        "tests/golden/dspark/model.safetensors",
    ] {
        let file = SafetensorsFile::open(repo(path)).unwrap();
        let map: serde_json::Map<String, serde_json::Value> = file
            .tensor_names()
            .enumerate()
            .map(|(i, n)| {
                let shard = format!("model-{:05}-of-00002.safetensors", i % 2 + 1);
                (n.clone(), serde_json::Value::String(shard))
            })
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": 1026904}, "weight_map": map});
        seeds.push(Seed::new(path, index.to_string().into_bytes()));
    }
    thread_local!(static FILE: Scratch = Scratch::new("model.safetensors.index.json"));
    fuzz("safetensors-index", seeds, |input| {
        FILE.with(|f| {
            if let Ok(map) = read_weight_map(f.write(input)) {
                if let Some(bad) = map
                    .values()
                    .find(|s| s.contains(['/', '\\']) || *s == ".." || s.is_empty())
                {
                    return Err(format!("read_weight_map accepted shard name `{bad}`"));
                }
            }
            Ok(())
        })
    });
}

/// Copies the written cache into a scratch folder per worker thread.
struct CacheScratch {
    _dir: tempfile::TempDir,
    cache: PathBuf,
}

fn cache_scratch(source: &Path) -> CacheScratch {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, cache.join(path.file_name().unwrap())).unwrap();
    }
    CacheScratch { _dir: dir, cache }
}

/// Every reader entry point on the cache in `dir`: it must error or hold together.
fn exercise_cache(dir: &Path) -> Result<(), String> {
    let _ = validate(dir);
    let Ok(reader) = CacheReader::open(dir) else {
        return Ok(());
    };
    let _ = reader.seq_lens();
    for k in 0..reader.manifest.shards.len().min(4) {
        let _ = reader.shard_samples(k);
    }
    for index in [0, 1, reader.len().saturating_sub(1), reader.len(), u64::MAX] {
        let _ = reader.sample(index);
    }
    Ok(())
}

#[test]
fn fuzz_cache_manifest() {
    let dir = tempfile::tempdir().unwrap();
    write_cache(dir.path());
    let source = dir.path().join("cache");
    let manifest = std::fs::read(Manifest::path(&source)).unwrap();
    let golden = std::fs::read(repo("tests/golden/cache/manifest.json")).unwrap();
    let seeds = vec![
        Seed::new("written manifest.json", manifest),
        Seed::new(
            "tests/golden/cache/manifest.json (reference format)",
            golden,
        ),
    ];
    let source_for_threads = source.clone();
    thread_local!(static CACHE: std::cell::OnceCell<CacheScratch> = const { std::cell::OnceCell::new() });
    fuzz("cache-manifest", seeds, move |input| {
        CACHE.with(|c| {
            let scratch = c.get_or_init(|| cache_scratch(&source_for_threads));
            std::fs::write(Manifest::path(&scratch.cache), input).unwrap();
            exercise_cache(&scratch.cache)
        })
    });
}

#[test]
fn fuzz_cache_shard_parquet_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_cache(dir.path());
    let source = dir.path().join("cache");
    let shard_name = manifest.shards[0].file_name.clone();
    let shard = std::fs::read(source.join(&shard_name)).unwrap();
    let len = shard.len();
    let footer_len = u32::from_le_bytes(shard[len - 8..len - 4].try_into().unwrap()) as usize;
    let mut seed = Seed::new(shard_name.clone(), shard);
    seed.int_fields = vec![(len - 8, 4)];
    seed.hot = len - 8 - footer_len..len;
    let source_for_threads = source.clone();
    thread_local!(static CACHE: std::cell::OnceCell<CacheScratch> = const { std::cell::OnceCell::new() });
    // The manifest is rewritten with the mutated shard's size and checksum, so `validate`
    // gets past them to the Parquet footer, its key-value metadata and the rows.
    fuzz("cache-shard", vec![seed], move |input| {
        CACHE.with(|c| {
            let scratch = c.get_or_init(|| cache_scratch(&source_for_threads));
            let path = scratch.cache.join(&shard_name);
            std::fs::write(&path, input).unwrap();
            let mut m = manifest.clone();
            m.shards[0].bytes = input.len() as u64;
            m.shards[0].sha256 = deepspec_core::cache::writer::sha256_file(&path).unwrap();
            m.store(&scratch.cache).unwrap();
            exercise_cache(&scratch.cache)
        })
    });
}

/// The GGUF headers the fuzzer found wanting, as fixed cases: each is an error naming what
/// is wrong, before anything the header claims is allocated.
#[test]
fn gguf_header_claims_past_the_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path).err().map(|e| e.to_string())
    };
    let good = synthetic_gguf();
    assert_eq!(open("good.gguf", &good), None);
    let with = |offset: usize, value: u64, width: usize| {
        let mut bytes = good.clone();
        bytes[offset..offset + width].copy_from_slice(&value.to_le_bytes()[..width]);
        bytes
    };
    // 2^40 tensors, 2^60 metadata pairs: counts past the file's length.
    for (offset, value) in [(8, 1u64 << 40), (16, 1 << 60)] {
        let err = open("count.gguf", &with(offset, value, 8)).expect("refused");
        assert!(
            err.contains("claims") && err.contains("bytes follow"),
            "{err}"
        );
    }
    // One tensor `x` and no metadata: its info is the name (8 + 1 bytes at 24), the
    // dimension count at 33, then the dims.
    let mut b = GgufBuilder::default();
    b.tensor("x", &[4], 0, vec![0; 16]);
    let one = b.build();
    assert_eq!(open("one.gguf", &one), None);
    let patched = |offset: usize, value: u64, width: usize| {
        let mut bytes = one.clone();
        bytes[offset..offset + width].copy_from_slice(&value.to_le_bytes()[..width]);
        bytes
    };
    let err = open("dims.gguf", &patched(33, 1 << 20, 4)).expect("refused");
    assert!(err.contains("claims 1048576 dimensions"), "{err}");
    // A 2^60-element tensor: its byte size overflows or passes the data section.
    let err = open("huge.gguf", &patched(37, 1 << 60, 8)).expect("refused");
    assert!(err.contains("needs more than"), "{err}");
    // An alignment of 0 (a division by zero before) names the key.
    let mut b = GgufBuilder::default();
    b.u32("general.alignment", 0)
        .tensor("x", &[1], 0, vec![0; 4]);
    let err = open("align.gguf", &b.build()).expect("refused");
    assert!(err.contains("general.alignment"), "{err}");
    // Arrays nested past any real file's depth.
    let mut nested = 5u32.to_le_bytes().to_vec();
    nested.extend(0u64.to_le_bytes());
    for _ in 0..64 {
        let mut outer = 9u32.to_le_bytes().to_vec();
        outer.extend(1u64.to_le_bytes());
        outer.extend(nested);
        nested = outer;
    }
    let mut b = GgufBuilder::default();
    b.kv("deep", 9, nested);
    let err = open("deep.gguf", &b.build()).expect("refused");
    assert!(err.contains("nest deeper"), "{err}");
}

/// Zero heads (a division by zero before) is a config error naming the key.
#[test]
fn gguf_zero_heads_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = GgufBuilder::default();
    b.string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 4)
        .u32("llama.feed_forward_length", 8)
        .u32("llama.attention.head_count", 0)
        .strings("tokenizer.ggml.tokens", &["a"]);
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, b.build()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let err = TargetConfig::from_gguf(&file, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("llama.attention.head_count"), "{err}");
}
