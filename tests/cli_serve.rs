//! `deepspec bench sps`, `deepspec bench serve` and `eval --policy` from the command line on
//! the golden target and drafters: the profile and the report a user reads, the plots, and
//! the errors they meet.

use deepspec_core::fixtures::{golden_dir, workspace_root};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deepspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A set of word-level prompts (the golden tokenizer's).
fn datasets(dir: &Path) -> PathBuf {
    let d = dir.join("sets");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("gsm8k.jsonl"),
        "{\"turns\": [\"<t183> <t451> <t153> <t476>\"]}\n{\"turns\": [\"<t94> <t144> <t305>\"]}\n\
         {\"turns\": [\"<t5> <t6> <t7>\"]}\n",
    )
    .unwrap();
    d
}

fn profile(dir: &Path) -> PathBuf {
    let golden = golden_dir();
    let out = dir.join("sps.json");
    let o = deepspec(&[
        "bench",
        "sps",
        "--target",
        golden.join("target").to_str().unwrap(),
        "--drafter",
        golden.join("dspark").to_str().unwrap(),
        "--context",
        "32",
        "--max-tokens",
        "16",
        "--max-requests",
        "2",
        "--repeats",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "bench sps: {}", stderr(&o));
    out
}

#[test]
fn sps_profile_and_serving_report() {
    let dir = tempfile::tempdir().unwrap();
    let sps = profile(dir.path());
    let table: Value = serde_json::from_str(&std::fs::read_to_string(&sps).unwrap()).unwrap();
    assert_eq!(table["format"], "deepspec-sps/1");
    let verify = table["verify"].as_array().unwrap();
    let ns: Vec<u64> = verify.iter().map(|p| p["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, [1, 2, 4, 8, 16]);
    let secs: Vec<f64> = verify
        .iter()
        .map(|p| p["seconds"].as_f64().unwrap())
        .collect();
    assert!(
        secs.windows(2).all(|w| w[0] <= w[1]),
        "not monotone: {secs:?}"
    );
    assert_eq!(table["draft"].as_array().unwrap().len(), 2);

    let golden = golden_dir();
    let report = dir.path().join("serve.json");
    let plots = dir.path().join("plots");
    let o = deepspec(&[
        "bench",
        "serve",
        "--target",
        golden.join("target").to_str().unwrap(),
        "--drafter",
        golden.join("dspark").to_str().unwrap(),
        "--datasets",
        datasets(dir.path()).to_str().unwrap(),
        "--sets",
        "gsm8k",
        "--concurrency",
        "1,2",
        "--policies",
        "fixed:1,fixed:7,threshold:0.5,alg1,async",
        "--limit",
        "3",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--sps-table",
        sps.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "bench serve: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("alg1") && stdout.contains("verified/req"),
        "{stdout}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let points = r["points"].as_array().unwrap();
    // `none` is added: it is what the ratios divide by.
    assert_eq!(points.len(), 6 * 2);
    for p in points {
        assert_eq!(p["requests"], 3);
        assert_eq!(
            p["identical_to_target_only"], true,
            "{} at {}: greedy outputs differ from target-only",
            p["policy"], p["concurrency"]
        );
        assert!(p["aggregate_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(p["tau"].as_f64().unwrap() >= 1.0);
        for k in ["draft_s", "verify_s", "host_s", "total_s"] {
            assert!(p["round"][k].as_f64().unwrap() >= 0.0);
        }
        if p["policy"] == "none" {
            assert_eq!(p["aggregate_ratio"], 1.0);
            assert_eq!(p["verified_per_request"], 1.0);
            // Nothing drafted: the drafting phase is an empty loop.
            assert!(p["round"]["draft_s"].as_f64().unwrap() < 1e-4);
        }
        if p["policy"] == "fixed:1" {
            let v = p["verified_per_request"].as_f64().unwrap();
            assert!(v > 1.0 && v <= 2.0, "fixed:1 verifies {v} per request");
        }
    }
    for png in ["throughput_vs_user_speed.png", "verified_per_request.png"] {
        let bytes = std::fs::read(plots.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    // The same profile drives eval's scheduler; the report names the policy.
    let eval_report = dir.path().join("eval.json");
    let o = deepspec(&[
        "eval",
        "--target",
        golden.join("target").to_str().unwrap(),
        "--drafter",
        golden.join("dspark").to_str().unwrap(),
        "--datasets",
        datasets(dir.path()).to_str().unwrap(),
        "--sets",
        "gsm8k",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--policy",
        "async",
        "--sps-table",
        sps.to_str().unwrap(),
        "--report",
        eval_report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "eval --policy: {}", stderr(&o));
    let e: Value = serde_json::from_str(&std::fs::read_to_string(&eval_report).unwrap()).unwrap();
    assert_eq!(e["policy"], "async");
}

#[test]
fn serving_errors_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let golden = golden_dir();
    let sets = datasets(dir.path());
    let serve = |drafter: &str, extra: &[&str]| -> Output {
        let mut args = vec![
            "bench".to_string(),
            "serve".into(),
            "--target".into(),
            golden.join("target").to_str().unwrap().into(),
            "--drafter".into(),
            golden.join(drafter).to_str().unwrap().into(),
            "--datasets".into(),
            sets.to_str().unwrap().into(),
            "--limit".into(),
            "1".into(),
            "--max-new-tokens".into(),
            "4".into(),
            "--report".into(),
            dir.path().join("r.json").to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        deepspec(&args)
    };
    let e = stderr(&serve("dspark", &["--policies", "greedy"]));
    assert!(
        e.contains("unknown policy \"greedy\"") && e.contains("alg1"),
        "{e}"
    );
    let e = stderr(&serve("dflash", &["--policies", "alg1"]));
    assert!(
        e.contains("no confidence head") && e.contains("fixed:N"),
        "{e}"
    );
    let e = stderr(&serve("dspark", &["--policies", "fixed:99"]));
    assert!(e.contains("block size"), "{e}");
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"format": "deepspec-sps/1", "backend": "x", "target": "x", "context_len": 1,
            "repeats": 1, "verify": [{"n": 2, "seconds": 1.0}, {"n": 1, "seconds": 2.0}]}"#,
    )
    .unwrap();
    let e = stderr(&serve("dspark", &["--sps-table", bad.to_str().unwrap()]));
    assert!(e.contains("bad.json") && e.contains("ascending"), "{e}");
    let e = stderr(&deepspec(&[
        "eval",
        "--target",
        golden.join("target").to_str().unwrap(),
        "--drafter",
        golden.join("dspark").to_str().unwrap(),
        "--datasets",
        sets.to_str().unwrap(),
        "--sets",
        "gsm8k",
        "--policy",
        "alg1",
        "--report",
        dir.path().join("e.json").to_str().unwrap(),
    ]));
    assert!(e.contains("--sps-table"), "{e}");
}
