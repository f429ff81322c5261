//! `deepspec prepare` and `deepspec cache` as a user runs them: on the tiny golden target
//! (fast) and on SmolLM2-135M-Instruct; a pyarrow read that must agree with our reader; the
//! kill-and-resume test; and every bad input the issue lists.

use deepspec_core::cache::{CacheReader, HiddenDtype};
use deepspec_core::sampling::Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

fn deepspec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The golden Qwen3 target (vocab 512, 6 layers): `DEEPSPEC_GOLDEN_DIR` or tests/golden.
fn golden_target() -> PathBuf {
    let dir = deepspec_core::fixtures::golden_dir();
    let target = dir.join("target");
    assert!(
        target.join("config.json").exists(),
        "golden target not found in {} (set DEEPSPEC_GOLDEN_DIR)",
        target.display()
    );
    target
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

/// A recipe in `dir` for `target`; `extra` is appended to `[prepare]`.
fn recipe(dir: &Path, name: &str, target: &Path, layers: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[model]\ntarget_model_name_or_path = {:?}\ntarget_layer_ids = {layers}\n\n\
         [data]\nmax_length = 128\nmin_loss_tokens = 2\n\n\
         [prepare]\nseed = 11\n{extra}\n",
        target.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn golden_recipe(dir: &Path, extra: &str) -> PathBuf {
    recipe(
        dir,
        "golden.toml",
        &golden_target(),
        "[0, 2, 4]",
        &format!("temperature = 1.0\ntop_k = 40\nbatch_size = 3\nmax_new_tokens = 24\n{extra}"),
    )
}

/// Prompts in all three accepted shapes.
fn prompt_file(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let mut text = String::new();
    for i in 0..n {
        let line = match i % 3 {
            0 => format!(r#"{{"turns": ["<t{i}> <t7> question", "<t9> follow up"]}}"#),
            1 => format!(
                r#"{{"messages": [{{"role": "system", "content": "be brief"}}, {{"role": "user", "content": "<t{i}> <t3>"}}]}}"#
            ),
            _ => format!(
                r#"{{"conversations": [{{"from": "human", "value": "<t{i}>"}}, {{"from": "gpt", "value": "old answer"}}]}}"#
            ),
        };
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "command failed: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).to_string() + &stderr
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "command should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn prepare(recipe: &Path, prompts: Option<&Path>, out: &Path) -> Command {
    let mut cmd = deepspec();
    cmd.args(["prepare", "--quiet", "--recipe"])
        .arg(recipe)
        .arg("--out")
        .arg(out);
    if let Some(p) = prompts {
        cmd.arg("--prompts").arg(p);
    }
    cmd
}

fn validate(dir: &Path) -> Output {
    run(deepspec().args(["cache", "validate"]).arg(dir))
}

/// Every file of a cache folder, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    all.sort();
    all
}

#[test]
fn prepare_smollm2_self_instruct_16_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(
        tmp.path(),
        "smollm2.toml",
        &smollm2(),
        "[1, 8, 15, 22, 28]",
        "max_new_tokens = 16\nself_instruct_max_tokens = 24\nbatch_size = 16\ntemperature = 0.8",
    );
    let out = tmp.path().join("cache");
    ok(&run(prepare(&r, None, &out).args(["--self-instruct", "16"])));
    ok(&validate(&out));
    let reader = CacheReader::open(&out).unwrap();
    assert_eq!(reader.manifest.job.num_prompts, 16, "16 distinct prompts");
    assert!(!reader.is_empty());
    assert_eq!(reader.manifest.hidden_size, 576);
    let prompts = std::fs::read_to_string(out.join("prompts.jsonl")).unwrap();
    assert_eq!(prompts.lines().count(), 16);
    // Each sample is the chat-templated prompt + answer; the loss mask covers exactly the
    // answer and its end-of-turn.
    let (_, tok) = deepspec_core::model::load_target_meta(&smollm2()).unwrap();
    for i in 0..reader.len() {
        let s = reader.sample(i).unwrap();
        let text = tok.decode(&s.input_ids, false).unwrap();
        let first = s.loss_mask.iter().position(|&m| m == 1).unwrap();
        let last = s.loss_mask.iter().rposition(|&m| m == 1).unwrap();
        assert!(
            s.loss_mask[first..=last].iter().all(|&m| m == 1),
            "one span"
        );
        let before = tok.decode(&s.input_ids[..first], false).unwrap();
        let trained = tok.decode(&s.input_ids[first..=last], false).unwrap();
        assert!(before.ends_with("<|im_start|>assistant\n"), "{text:?}");
        assert!(trained.ends_with("<|im_end|>\n"), "{text:?}");
        assert!(before.contains("<|im_start|>user\n"), "{text:?}");
    }
}

/// Runs the job once whole, then again killed (`kill -9`) at random moments several times and
/// resumed; every file must end byte-identical.
fn kill_and_resume(tmp: &Path, r: &Path, prompts: Option<&Path>, extra: &[&str]) {
    let job = |out: &Path| {
        let mut cmd = prepare(r, prompts, out);
        cmd.args(extra);
        cmd
    };
    let whole = tmp.join("whole");
    let started = Instant::now();
    ok(&run(&mut job(&whole)));
    let full_time = started.elapsed();
    let reference = files(&whole);
    assert!(
        reference
            .iter()
            .filter(|(n, _)| n.ends_with(".parquet"))
            .count()
            >= 4,
        "expected several shards"
    );

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng::new(seed);
    let cut = tmp.join("cut");
    let mut kills = 0;
    for attempt in 0..6 {
        // Early kills are likelier (later attempts have less work left), and the first lands
        // within the first half, so at least one run is surely cut.
        let u = rng.uniform();
        let reach = if attempt == 0 { 0.5 } else { 0.9 };
        let delay = full_time.mul_f64(u * u * reach);
        let mut child = job(&cut)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        // kill -9: no chance to clean up.
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        let done = std::fs::read_to_string(cut.join("manifest.json"))
            .map(|m| m.matches("\"file_name\"").count())
            .unwrap_or(0);
        eprintln!("attempt {attempt}: killed after {delay:?}, {done} shards done (seed {seed})");
    }
    ok(&run(&mut job(&cut)));
    assert!(kills > 0, "no run was interrupted (seed {seed})");
    let resumed = files(&cut);
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&resumed), names(&reference), "seed {seed}");
    for ((name, a), (_, b)) in resumed.iter().zip(&reference) {
        assert!(a == b, "{name} differs after kill and resume (seed {seed})");
    }
    ok(&validate(&cut));
    // A finished cache is left as it is.
    let again = ok(&run(&mut job(&cut)));
    assert!(again.contains("0 written now"), "{again}");
}

#[test]
fn kill_and_resume_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    // Tiny shards (one or two prompts each) so a kill lands between and inside shards.
    let r = golden_recipe(tmp.path(), "shard_max_bytes = 250000");
    let prompts = prompt_file(tmp.path(), 30);
    kill_and_resume(tmp.path(), &r, Some(&prompts), &[]);
}

#[test]
fn kill_and_resume_self_instruct_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(
        tmp.path(),
        "shard_max_bytes = 250000\nself_instruct_max_tokens = 10",
    );
    kill_and_resume(tmp.path(), &r, None, &["--self-instruct", "24"]);
}

/// What pyarrow reads from one shard (decoded to f32 by numpy) equals our reader.
fn pyarrow_agrees(dtype: HiddenDtype) {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), &format!("hidden_dtype = {:?}", dtype.name()));
    let prompts = prompt_file(tmp.path(), 4);
    let out = tmp.path().join("cache");
    ok(&run(&mut prepare(&r, Some(&prompts), &out)));
    let reader = CacheReader::open(&out).unwrap();
    let shard = out.join(&reader.manifest.shards[0].file_name);
    let script = r#"
import json, sys
import numpy as np
import pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
meta = json.loads(f.metadata.metadata[b"deepspec.cache"])
H, n = meta["hidden_size"], len(meta["target_layer_ids"])
def decode(row, name, rows_per_token):
    raw = row[name][0].as_py()
    L = len(row["input_ids"][0])
    if meta["hidden_dtype"] == "bf16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        v = bits.view(np.float32)
    else:
        codes = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        sign = np.where(codes & 0x80, -1.0, 1.0)
        e = (codes >> 3) & 0xF
        m = (codes & 7).astype(np.float64)
        mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
        scale = np.array(row[name + "_scale"][0].as_py(), dtype=np.float32)
        v = (sign * mag).astype(np.float32).reshape(-1, H) * scale[:, None]
    return v.reshape(L, rows_per_token * H)
out = []
for g in range(f.metadata.num_row_groups):
    row = f.read_row_group(g)
    hs = decode(row, "target_hidden_states", n)
    last = decode(row, "target_last_hidden_states", 1)
    out.append({
        "source_index": row["source_index"][0].as_py(),
        "input_ids": row["input_ids"][0].as_py(),
        "loss_mask": [int(b) for b in row["loss_mask"][0].as_py()],
        "shape": list(hs.shape),
        "hidden": hs.ravel().tolist(),
        "last": last.ravel().tolist(),
    })
print(json.dumps(out))
"#;
    let py = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&shard)
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "the pyarrow reader failed (scripts/test.sh installs pyarrow: python3 -m pip install pyarrow): {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&py.stdout).unwrap();
    let samples = reader.shard_samples(0).unwrap();
    assert_eq!(rows.len(), samples.len());
    assert!(!samples.is_empty());
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for (row, s) in rows.iter().zip(&samples) {
        assert_eq!(row["source_index"].as_u64().unwrap(), s.source_index);
        let ids: Vec<u32> = row["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, s.input_ids);
        let mask: Vec<u8> = row["loss_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(mask, s.loss_mask);
        assert_eq!(
            row["shape"],
            serde_json::json!([s.seq_len(), 3 * reader.manifest.hidden_size])
        );
        assert_eq!(floats(&row["hidden"]), s.hidden.to_f32(), "{dtype:?}");
        assert_eq!(floats(&row["last"]), s.last_hidden.to_f32(), "{dtype:?}");
    }
}

#[test]
fn pyarrow_reads_what_we_read_bf16() {
    pyarrow_agrees(HiddenDtype::Bf16);
}

#[test]
fn pyarrow_reads_what_we_read_fp8() {
    pyarrow_agrees(HiddenDtype::Fp8);
}

#[test]
fn estimate_prints_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let prompts = prompt_file(tmp.path(), 5);
    let out = tmp.path().join("cache");
    let text = ok(&run(prepare(&r, Some(&prompts), &out).arg("--estimate")));
    assert!(text.contains("samples:          5"), "{text}");
    assert!(
        text.contains("tokens (at most)") && text.contains("bytes"),
        "{text}"
    );
    assert!(!out.exists(), "--estimate must not create the cache");
}

#[test]
fn malformed_jsonl_names_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let prompts = tmp.path().join("bad.jsonl");
    std::fs::write(
        &prompts,
        "{\"turns\": [\"<t1> hi\"]}\n{\"turns\": [\"ok\", 5]}\n{\"turns\": [\"<t2> fine\"]}\n",
    )
    .unwrap();
    let out = tmp.path().join("cache");
    let err = failed(&run(&mut prepare(&r, Some(&prompts), &out)));
    assert!(
        err.contains("bad.jsonl:2") && err.contains("turns[1]"),
        "{err}"
    );
    let text = ok(&run(
        prepare(&r, Some(&prompts), &out).args(["--on-bad-line", "skip"])
    ));
    assert!(
        text.contains("bad.jsonl:2"),
        "a skipped line is reported: {text}"
    );
    let reader = CacheReader::open(&out).unwrap();
    assert_eq!(reader.manifest.job.num_prompts, 2);
}

#[test]
fn empty_prompt_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let prompts = tmp.path().join("empty.jsonl");
    std::fs::write(&prompts, "\n").unwrap();
    let err = failed(&run(&mut prepare(
        &r,
        Some(&prompts),
        &tmp.path().join("c"),
    )));
    assert!(
        err.contains("empty.jsonl") && err.contains("no prompts"),
        "{err}"
    );
}

#[test]
fn unknown_layer_id_names_the_recipe_field() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "r.toml", &golden_target(), "[0, 5]", "");
    let prompts = prompt_file(tmp.path(), 2);
    let err = failed(&run(&mut prepare(
        &r,
        Some(&prompts),
        &tmp.path().join("c"),
    )));
    assert!(
        err.contains("r.toml") && err.contains("model.target_layer_ids") && err.contains('5'),
        "{err}"
    );
}

#[test]
fn unknown_recipe_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "max_new_tokenz = 3");
    let prompts = prompt_file(tmp.path(), 2);
    let err = failed(&run(&mut prepare(
        &r,
        Some(&prompts),
        &tmp.path().join("c"),
    )));
    assert!(
        err.contains("max_new_tokenz") && err.contains("golden.toml"),
        "{err}"
    );
}

#[test]
fn a_cache_of_another_target_or_layer_set_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let prompts = prompt_file(tmp.path(), 2);
    let out = tmp.path().join("cache");
    ok(&run(&mut prepare(&r, Some(&prompts), &out)));

    let other_layers = recipe(tmp.path(), "layers.toml", &golden_target(), "[0, 1]", "");
    let err = failed(&run(&mut prepare(&other_layers, Some(&prompts), &out)));
    assert!(
        err.contains("manifest.json") && err.contains("target_layer_ids"),
        "{err}"
    );

    let other_target = recipe(tmp.path(), "smol.toml", &smollm2(), "[0, 2, 4]", "");
    let err = failed(&run(&mut prepare(&other_target, Some(&prompts), &out)));
    assert!(
        err.contains("manifest.json") && err.contains("target.sha256"),
        "{err}"
    );
    ok(&validate(&out));
}

#[test]
fn a_corrupted_shard_fails_validation_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let prompts = prompt_file(tmp.path(), 3);
    let out = tmp.path().join("cache");
    ok(&run(&mut prepare(&r, Some(&prompts), &out)));
    let stats = ok(&run(deepspec().args(["cache", "stats"]).arg(&out)));
    assert!(stats.contains("bytes/token"), "{stats}");
    let shard = out.join("shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() / 3;
    bytes[at] = bytes[at].wrapping_add(1);
    std::fs::write(&shard, &bytes).unwrap();
    let err = failed(&validate(&out));
    assert!(
        err.contains("shard-00000.parquet") && err.contains("sha256"),
        "{err}"
    );
    // A truncated shard is named too.
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = failed(&validate(&out));
    assert!(err.contains("shard-00000.parquet"), "{err}");
    // A missing folder: exit non-zero, naming the manifest.
    let err = failed(&validate(&tmp.path().join("nothing")));
    assert!(err.contains("manifest.json"), "{err}");
}

#[test]
fn import_deepspec_then_validate() {
    let golden_cache = golden_target().parent().unwrap().join("cache");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    ok(&run(deepspec()
        .args(["cache", "import-deepspec"])
        .arg(&golden_cache)
        .arg(&out)));
    let text = ok(&validate(&out));
    assert!(text.contains("2 samples"), "{text}");
    // The reference cache itself is not ours: validate says how to convert it.
    let err = failed(&validate(&golden_cache));
    assert!(err.contains("import-deepspec"), "{err}");
}

#[test]
fn a_second_run_on_the_same_cache_is_refused_while_the_first_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let out = tmp.path().join("cache");
    let mut first = prepare(&r, None, &out)
        .args(["--self-instruct", "400"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".prepare.lock");
    let started = Instant::now();
    while !lock.exists() && started.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = run(prepare(&r, None, &out).args(["--self-instruct", "400"]));
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().ok();
    first.wait().unwrap();
    if still_running {
        let err = failed(&second);
        assert!(
            err.contains(".prepare.lock") && err.contains("another"),
            "{err}"
        );
    }
}

/// Run with stderr captured (not a terminal), prepare prints a status line per batch and
/// says how many prompts it dropped for each reason: here one prompt longer than
/// `data.max_length`.
#[test]
fn prepare_in_a_log_prints_progress_lines_and_why_prompts_were_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(tmp.path(), "");
    let prompts = tmp.path().join("prompts.jsonl");
    let long = vec!["<t5>"; 200].join(" ");
    std::fs::write(
        &prompts,
        format!(
            "{{\"turns\": [\"<t1> <t7>\"]}}\n{{\"turns\": [\"{long}\"]}}\n{{\"turns\": [\"<t2>\"]}}\n{{\"turns\": [\"<t3> <t4>\"]}}\n"
        ),
    )
    .unwrap();
    let out = tmp.path().join("cache");
    let result = run(deepspec()
        .args(["prepare", "--recipe"])
        .arg(&r)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&out));
    let stderr = ok(&result);
    let last = stderr
        .lines()
        .rfind(|l| l.starts_with("prepare prompts="))
        .unwrap_or_else(|| panic!("no progress line:\n{stderr}"));
    for field in [
        "prompts=4/4 ",
        "generate_tok/s=",
        "target_pass_tok/s=",
        "elapsed=",
        "eta=0s",
    ] {
        assert!(last.contains(field), "{field} missing in {last}");
    }
    assert!(
        stderr.contains(
            "dropped 1 of 4 prompts: 1 too long (over data.max_length = 128 tokens), \
             0 too few loss tokens (under data.min_loss_tokens = 2), 0 empty answer"
        ),
        "{stderr}"
    );
    assert!(stderr.contains(": 3 samples"), "{stderr}");
}

/// A recipe whose shards also close at multiples of 9 prompts (three batches of 3), with
/// shards small enough (about 58 KB a sample) that the size limit cuts inside a block too.
fn sharding_recipe(dir: &Path, extra: &str) -> PathBuf {
    golden_recipe(
        dir,
        &format!("shard_max_bytes = 500000\nshard_prompts = 9\n{extra}"),
    )
}

/// Prepares part `i` of `n` of `prompts` into `out`.
fn prepare_part(r: &Path, prompts: &Path, out: &Path, i: usize, n: usize) -> Output {
    run(prepare(r, Some(prompts), out).args(["--shard", &format!("{i}/{n}")]))
}

fn merge(parts: &[&Path], out: &Path) -> Output {
    run(deepspec()
        .args(["cache", "merge"])
        .args(parts)
        .arg("--out")
        .arg(out))
}

fn shard_ranges(dir: &Path) -> Vec<(u64, u64)> {
    let m = deepspec_core::cache::Manifest::load(dir).unwrap();
    m.shards
        .iter()
        .map(|s| (s.source_start, s.source_end))
        .collect()
}

#[test]
fn three_parts_merged_are_byte_identical_to_one_prepare() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sharding_recipe(tmp.path(), "");
    let prompts = prompt_file(tmp.path(), 24);
    let whole = tmp.path().join("whole");
    ok(&run(&mut prepare(&r, Some(&prompts), &whole)));
    // Shards close at the blocks (9, 18) and, by size, inside them (6, 15).
    assert_eq!(
        shard_ranges(&whole),
        vec![(0, 6), (6, 9), (9, 15), (15, 18), (18, 24)]
    );

    let parts: Vec<PathBuf> = (0..3)
        .map(|i| tmp.path().join(format!("part{i}")))
        .collect();
    for (i, part) in parts.iter().enumerate() {
        let said = ok(&prepare_part(&r, &prompts, part, i, 3));
        assert!(said.contains(&format!("part {i}/3")), "{said}");
    }
    // 24 prompts in blocks of 9: [0, 9), [9, 18), [18, 24); each part numbers its shards
    // from 0 and is not a cache by itself.
    assert_eq!(shard_ranges(&parts[1]), vec![(9, 15), (15, 18)]);
    let m1 = deepspec_core::cache::Manifest::load(&parts[1]).unwrap();
    let part = m1.part.expect("a part records it");
    assert_eq!(
        (part.index, part.count, part.source_start, part.source_end),
        (1, 3, 9, 18)
    );
    assert!(!m1.complete && m1.part_finished());
    assert_eq!(m1.job.num_prompts, 24);
    let err = failed(&validate(&parts[1]));
    assert!(
        err.contains("cache merge") && err.contains("part 1/3"),
        "{err}"
    );

    // Any order of the parts.
    let merged = tmp.path().join("merged");
    let said = ok(&merge(&[&parts[2], &parts[0], &parts[1]], &merged));
    assert!(said.contains("3 parts merged"), "{said}");
    let expected = files(&whole);
    let got = files(&merged);
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&expected));
    assert!(expected.iter().any(|(n, _)| n == "manifest.json"));
    for ((name, a), (_, b)) in got.iter().zip(&expected) {
        assert!(
            a == b,
            "{name} differs between the merged parts and one prepare"
        );
    }
    ok(&validate(&merged));

    // A merged cache is not merged over.
    let err = failed(&merge(&[&parts[0], &parts[1], &parts[2]], &merged));
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn merge_refuses_other_jobs_missing_repeated_cut_differently_and_unfinished_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let r = sharding_recipe(tmp.path(), "");
    let prompts = prompt_file(tmp.path(), 24);
    let part = |name: &str| tmp.path().join(name);
    for i in 0..3 {
        ok(&prepare_part(&r, &prompts, &part(&format!("a{i}")), i, 3));
    }
    let (a0, a1, a2) = (part("a0"), part("a1"), part("a2"));
    let out = |name: &str| tmp.path().join("out").join(name);

    // Another job: the same part of a run with another seed.
    let other = sharding_recipe(tmp.path(), "");
    let other = {
        let text = std::fs::read_to_string(&other)
            .unwrap()
            .replace("seed = 11", "seed = 12");
        let path = tmp.path().join("other.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    ok(&prepare_part(&other, &prompts, &part("b1"), 1, 3));
    let err = failed(&merge(&[&a0, &part("b1"), &a2], &out("jobs")));
    assert!(
        err.contains("different jobs") && err.contains("job.seed") && err.contains("b1"),
        "{err}"
    );

    // A missing part, named with its prompts.
    let err = failed(&merge(&[&a0, &a2], &out("missing")));
    assert!(
        err.contains("part 1/3 (prompts [9, 18)) is missing"),
        "{err}"
    );

    // The same part twice: both folders named.
    std::fs::create_dir_all(part("copy")).unwrap();
    let a1_copy = part("copy").join("a1");
    ok(&run(Command::new("cp").arg("-r").arg(&a1).arg(&a1_copy)));
    let err = failed(&merge(&[&a0, &a1, &a1_copy, &a2], &out("twice")));
    assert!(
        err.contains("are both part 1/3")
            && err.contains(&a1.display().to_string())
            && err.contains(&a1_copy.display().to_string()),
        "{err}"
    );

    // Parts of a cut into 2 overlap those of a cut into 3.
    ok(&prepare_part(&r, &prompts, &part("h0"), 0, 2));
    let err = failed(&merge(&[&part("h0"), &a1, &a2], &out("cuts")));
    assert!(err.contains("different numbers of parts"), "{err}");

    // An interrupted part (its manifest lists one shard fewer than it needs).
    let cut = part("cut2");
    ok(&run(Command::new("cp").arg("-r").arg(&a1).arg(&cut)));
    let mut m = deepspec_core::cache::Manifest::load(&cut).unwrap();
    m.shards.pop();
    m.recount();
    m.store(&cut).unwrap();
    let err = failed(&merge(&[&a0, &cut, &a2], &out("unfinished")));
    assert!(
        err.contains("part 1/3")
            && err.contains("unfinished")
            && err.contains("[9, 15) of [9, 18)"),
        "{err}"
    );

    // A whole cache is not a part.
    let whole = part("whole");
    ok(&run(&mut prepare(&r, Some(&prompts), &whole)));
    let err = failed(&merge(&[&whole], &out("whole")));
    assert!(err.contains("field `part` is absent"), "{err}");

    // Nothing was written by a refused merge.
    assert!(!tmp.path().join("out").exists());
    // The parts themselves merge.
    ok(&merge(&[&a0, &a1, &a2], &out("good")));
}

#[test]
fn shard_needs_a_fixed_list_and_shard_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompt_file(tmp.path(), 6);
    // Self-instruct prompts are written by the run: the list comes first.
    let r = sharding_recipe(tmp.path(), "self_instruct_max_tokens = 10");
    let err = failed(&run(prepare(&r, None, &tmp.path().join("si")).args([
        "--self-instruct",
        "6",
        "--shard",
        "0/2",
    ])));
    assert!(
        err.contains("--prompts-out") && err.contains("write the list first"),
        "{err}"
    );
    // Without prepare.shard_prompts there are no fixed boundaries to cut at.
    let plain = golden_recipe(tmp.path(), "");
    let err = failed(&prepare_part(&plain, &prompts, &tmp.path().join("p"), 0, 2));
    assert!(
        err.contains("prepare.shard_prompts") && err.contains("golden.toml"),
        "{err}"
    );
    // A part folder resumes only the same part.
    let r = sharding_recipe(tmp.path(), "");
    let dir = tmp.path().join("part");
    ok(&prepare_part(&r, &prompts, &dir, 0, 2));
    let err = failed(&prepare_part(&r, &prompts, &dir, 1, 2));
    assert!(err.contains("field `part`"), "{err}");
    let err = failed(&run(
        prepare(&r, Some(&prompts), &dir).args(["--shard", "2/2"])
    ));
    assert!(err.contains("INDEX/COUNT"), "{err}");
}

/// The list step writes the prompts `prepare --self-instruct N` answers; parts of that list
/// merge to what one `prepare --prompts` of it gives.
#[test]
fn self_instruct_list_step_then_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let r = golden_recipe(
        tmp.path(),
        "shard_max_bytes = 500000\nshard_prompts = 3\nself_instruct_max_tokens = 10",
    );
    let list = tmp.path().join("list.jsonl");
    let said = ok(&run(deepspec()
        .args(["prepare", "--quiet", "--recipe"])
        .arg(&r)
        .args(["--self-instruct", "6", "--prompts-out"])
        .arg(&list)));
    assert!(said.contains("--shard i/n"), "{said}");
    let whole_si = tmp.path().join("si");
    ok(&run(
        prepare(&r, None, &whole_si).args(["--self-instruct", "6"])
    ));
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        std::fs::read_to_string(whole_si.join("prompts.jsonl")).unwrap()
    );
    // The list is not overwritten.
    let err = failed(&run(deepspec()
        .args(["prepare", "--quiet", "--recipe"])
        .arg(&r)
        .args(["--self-instruct", "6", "--prompts-out"])
        .arg(&list)));
    assert!(err.contains("already exists"), "{err}");

    let whole = tmp.path().join("whole");
    ok(&run(&mut prepare(&r, Some(&list), &whole)));
    let (p0, p1) = (tmp.path().join("p0"), tmp.path().join("p1"));
    ok(&prepare_part(&r, &list, &p0, 0, 2));
    ok(&prepare_part(&r, &list, &p1, 1, 2));
    let merged = tmp.path().join("merged");
    ok(&merge(&[&p0, &p1], &merged));
    assert_eq!(files(&merged), files(&whole));
}
