//! `deepspec eval --offline`: τ from the golden fixture cache (imported from the reference's
//! format) for every golden drafter, its report and traces agreeing with each other, and the
//! errors a user meets.

use deepspec_core::fixtures::golden_dir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deepspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "command failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string() + &stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The golden cache in deepspec's format, and a recipe for the golden target.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let golden = golden_dir();
    let cache = dir.join("golden-cache");
    ok(&deepspec(&[
        "cache",
        "import-deepspec",
        s(&golden.join("cache")),
        s(&cache),
    ]));
    let recipe = dir.join("golden.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\ntarget_model_name_or_path = {:?}\ntarget_layer_ids = [0, 1, 2, 3, 4]\n\n[data]\nmax_length = 4096\n",
            s(&golden.join("target"))
        ),
    )
    .unwrap();
    (cache, recipe)
}

fn offline(cache: &Path, recipe: &Path, drafter: &str, report: &Path, extra: &[&str]) -> Output {
    let drafter = golden_dir().join(drafter);
    let mut args = vec![
        "eval",
        "--offline",
        "--cache",
        s(cache),
        "--recipe",
        s(recipe),
        "--drafter",
        s(&drafter),
        "--report",
        s(report),
    ];
    args.extend_from_slice(extra);
    deepspec(&args)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn offline_tau_on_the_golden_cache_for_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, recipe) = setup(tmp.path());
    for algo in ["dspark", "dflash", "eagle3"] {
        let greedy = tmp.path().join(format!("{algo}-t0.json"));
        let traces = tmp.path().join(format!("{algo}-t0.jsonl"));
        let out = ok(&offline(
            &cache,
            &recipe,
            algo,
            &greedy,
            &["--temperature", "0", "--traces", s(&traces)],
        ));
        assert!(out.contains("offline (teacher-forced"), "{out}");
        let expected = tmp.path().join(format!("{algo}-t1.json"));
        ok(&offline(
            &cache,
            &recipe,
            algo,
            &expected,
            &["--temperature", "1"],
        ));
        let (g, e) = (json(&greedy), json(&expected));
        for r in [&g, &e] {
            assert_eq!(r["mode"], "offline", "{r}");
            assert_eq!(r["offline"]["samples"], 2, "{r}");
        }
        let summary = &g["offline"];
        let rounds = summary["rounds"].as_u64().unwrap() as usize;
        assert!(rounds > 0, "{summary}");
        let tau_g = g["sets"]["golden-cache"]["tau"].as_f64().unwrap();
        let tau_e = e["sets"]["golden-cache"]["tau"].as_f64().unwrap();
        // The report's τ is the one at its temperature; the summary holds both.
        assert_eq!(tau_g, summary["tau_greedy"].as_f64().unwrap());
        assert_eq!(tau_e, e["offline"]["tau_expected"].as_f64().unwrap());
        assert_eq!(
            e["offline"]["tau_greedy"], summary["tau_greedy"],
            "same anchors"
        );
        let bs = summary["conditional_acceptance_expected"]
            .as_array()
            .unwrap()
            .len() as f64;
        for tau in [tau_g, tau_e] {
            assert!((1.0..=1.0 + bs).contains(&tau), "{algo}: τ {tau}");
        }
        eprintln!("{algo}: offline τ {tau_g:.3} at T=0, {tau_e:.3} at T=1 over {rounds} anchors");

        // The traces: a line per round and per sample, and they add up to the report.
        let text = std::fs::read_to_string(&traces).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let round_lines: Vec<&serde_json::Value> =
            lines.iter().filter(|l| l["kind"] == "round").collect();
        let prompt_lines = lines.iter().filter(|l| l["kind"] == "prompt").count();
        assert_eq!(round_lines.len(), rounds);
        assert_eq!(prompt_lines, 2);
        let mut greedy_tokens = 0.0;
        let mut expected_tokens = 0.0;
        for l in &round_lines {
            assert_eq!(l["mode"], "offline");
            let proposed = l["proposed"].as_array().unwrap().len();
            let probs: Vec<f64> = l["accept_probability"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(probs.len(), proposed);
            // The record's expected length is its probabilities' prefix products.
            let mut survive = 1.0;
            let sum: f64 = probs
                .iter()
                .map(|p| {
                    survive *= p;
                    survive
                })
                .sum();
            let stated = l["expected_accepted"].as_f64().unwrap();
            assert!((sum - stated).abs() < 1e-9, "{l}");
            greedy_tokens += l["accepted"].as_f64().unwrap() + 1.0;
            expected_tokens += stated + 1.0;
        }
        assert!((greedy_tokens / rounds as f64 - tau_g).abs() < 1e-9);
        assert!((expected_tokens / rounds as f64 - tau_e).abs() < 1e-6);
    }
    // Seeded: the same seed gives the same report, another seed other anchors.
    let again = tmp.path().join("again.json");
    ok(&offline(
        &cache,
        &recipe,
        "dspark",
        &again,
        &["--temperature", "1"],
    ));
    assert_eq!(
        json(&again)["offline"],
        json(&tmp.path().join("dspark-t1.json"))["offline"]
    );
}

#[test]
fn offline_errors_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, recipe) = setup(tmp.path());
    let report = tmp.path().join("r.json");
    let err = |out: Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(offline(
        &cache,
        &recipe,
        "dspark",
        &report,
        &["--temperature", "0.7"],
    ));
    assert!(e.contains("--temperature 0 or 1"), "{e}");
    let e = err(deepspec(&[
        "eval",
        "--offline",
        "--cache",
        s(&cache),
        "--drafter",
        s(&golden_dir().join("dspark")),
        "--report",
        s(&report),
    ]));
    assert!(e.contains("--offline needs --recipe"), "{e}");
    // A recipe without data.target_cache_path and no --cache.
    let e = err(deepspec(&[
        "eval",
        "--offline",
        "--recipe",
        s(&recipe),
        "--drafter",
        s(&golden_dir().join("dspark")),
        "--report",
        s(&report),
    ]));
    assert!(
        e.contains("--cache DIR or set data.target_cache_path"),
        "{e}"
    );
    assert!(!report.exists());
}

/// Online traces: a line per round and per prompt turn that add up to the report's τ, with
/// a two-turn prompt's turns told apart.
#[test]
fn online_traces_add_up_to_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = golden_dir();
    let prompts = tmp.path().join("tiny.jsonl");
    std::fs::write(
        &prompts,
        "{\"turns\": [\"<t183> <t451> <t153>\"]}\n{\"turns\": [\"<t5> <t6>\", \"<t7> <t8>\"]}\n",
    )
    .unwrap();
    let report = tmp.path().join("r.json");
    let traces = tmp.path().join("t.jsonl");
    ok(&deepspec(&[
        "eval",
        "--target",
        s(&golden.join("target")),
        "--drafter",
        s(&golden.join("dspark")),
        "--prompts",
        s(&prompts),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--report",
        s(&report),
        "--traces",
        s(&traces),
    ]));
    let r = json(&report);
    assert_eq!(r["mode"], "online");
    let set = &r["sets"]["tiny"];
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&traces)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rounds: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "round").collect();
    let prompts: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "prompt").collect();
    assert_eq!(rounds.len() as u64, set["rounds"].as_u64().unwrap());
    let turns: Vec<(u64, u64)> = prompts
        .iter()
        .map(|p| (p["prompt"].as_u64().unwrap(), p["turn"].as_u64().unwrap()))
        .collect();
    assert_eq!(turns, vec![(0, 0), (1, 0), (1, 1)]);
    let tokens: u64 = rounds
        .iter()
        .map(|l| {
            assert_eq!(l["mode"], "online");
            assert_eq!(
                l["confidences"].as_array().unwrap().len(),
                l["proposed"].as_array().unwrap().len()
            );
            l["accepted"].as_u64().unwrap() + l["bonus"].is_u64() as u64
        })
        .sum();
    assert_eq!(tokens, set["tokens"].as_u64().unwrap());
    for p in &prompts {
        let ids = p["output_ids"].as_array().unwrap();
        assert!(
            ids.len() > p["prompt_len"].as_u64().unwrap() as usize,
            "{p}"
        );
        assert!(!p["text"].as_str().unwrap().is_empty(), "{p}");
    }
}
