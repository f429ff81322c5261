//! `deepspec eval` from the command line on the golden target and drafters: the report's
//! schema, plots, the gate's exit code, and the errors a user meets.

use deepspec_core::fixtures::{golden_dir, smollm2, workspace_root};
use std::path::Path;
use std::process::{Command, Output};

fn deepspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap()
}

/// A datasets folder with two small sets of word-level prompts (the golden tokenizer's).
fn datasets(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("sets");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("gsm8k.jsonl"),
        "{\"turns\": [\"<t183> <t451> <t153> <t476>\"]}\n{\"turns\": [\"<t94> <t144> <t305>\"]}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("mt-bench.jsonl"),
        "{\"turns\": [\"<t5> <t6>\", \"<t7> <t8>\"]}\n",
    )
    .unwrap();
    d
}

fn eval(dir: &Path, algo: &str, extra: &[&str]) -> Output {
    let golden = golden_dir();
    let sets = datasets(dir);
    let report = dir.join(format!("{algo}.json"));
    let temperature = extra
        .iter()
        .position(|a| *a == "--temperature")
        .map_or("0", |i| extra[i + 1]);
    let mut args = vec![
        "eval",
        "--target",
        golden.join("target").to_str().unwrap(),
        "--drafter",
        golden.join(algo).to_str().unwrap(),
        "--datasets",
        sets.to_str().unwrap(),
        "--sets",
        "gsm8k,mt-bench,alpaca",
        "--max-new-tokens",
        "24",
        "--temperature",
        temperature,
        "--report",
        report.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    let mut rest = extra.iter();
    while let Some(a) = rest.next() {
        if *a == "--temperature" {
            rest.next();
        } else {
            args.push(a.to_string());
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    deepspec(&args)
}

#[test]
fn report_schema_plots_and_missing_sets() {
    let dir = tempfile::tempdir().unwrap();
    let plots = dir.path().join("plots");
    let out = eval(dir.path(), "dspark", &["--plots", plots.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("alpaca: missing"), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dspark.json")).unwrap())
            .unwrap();
    assert!(report["macro_tau"].as_f64().unwrap() >= 1.0);
    assert_eq!(report["missing_sets"], serde_json::json!(["alpaca"]));
    for set in ["gsm8k", "mt-bench"] {
        let s = &report["sets"][set];
        assert!(s["tau"].as_f64().unwrap() >= 1.0, "{set}");
        assert!(s["rounds"].as_u64().unwrap() > 0, "{set}");
        assert_eq!(
            s["conditional_acceptance"].as_array().unwrap().len(),
            7,
            "{set}"
        );
    }
    assert_eq!(report["sets"]["mt-bench"]["domain"], "chat");
    // Prefix survival per position; this run is far too short to fit a temperature, so
    // every position keeps 1 and says why.
    let calibration = &report["calibration"];
    assert_eq!(calibration["ece_bins"], 20);
    let rounds = calibration["rounds"].as_u64().unwrap();
    assert!(rounds > 0);
    assert_eq!(
        calibration["fit_rounds"].as_u64().unwrap()
            + calibration["measured_rounds"].as_u64().unwrap(),
        rounds
    );
    assert_eq!(
        calibration["sts_temperatures"],
        serde_json::json!(vec![1.0; 7])
    );
    let notes = calibration["sts_notes"].as_array().unwrap();
    assert_eq!(notes.len(), 7, "{notes:?}");
    assert!(
        notes[0].as_str().unwrap().starts_with("position 1: ")
            && notes[0]
                .as_str()
                .unwrap()
                .contains("fewer than 100; temperature 1 (not fitted)"),
        "{notes:?}"
    );
    let positions = calibration["positions"].as_array().unwrap();
    assert_eq!(positions.len(), 7);
    assert_eq!(positions[0]["position"], 1);
    assert_eq!(positions[0]["ece_before"], positions[0]["ece_after"]);
    assert!(positions[0]["rounds"].as_u64().unwrap() > 0);
    assert!(!positions[0]["reliability_before"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(calibration["threshold_sweep"].as_array().unwrap().len(), 21);
    for png in [
        "acceptance_by_position.png",
        "reliability.png",
        "threshold_sweep.png",
    ] {
        let bytes = std::fs::read(plots.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("| gsm8k |") && table.contains("**macro**"),
        "{table}"
    );
    assert!(
        table.contains("| position | rounds | observed | τ | ECE before | ECE after |")
            && table.contains("STS: position 7: "),
        "{table}"
    );
}

/// Prompts decoded together (rows of different lengths, a multi-turn set fed back turn by
/// turn) give the report they give one at a time, greedy and sampled alike: every prompt draws
/// from its own generator.
#[test]
fn batch_size_changes_speed_not_results() {
    for temperature in ["0", "1"] {
        let dir = tempfile::tempdir().unwrap();
        let mut reports = Vec::new();
        for batch in ["1", "3"] {
            let out = eval(
                dir.path(),
                "dspark",
                &["--batch-size", batch, "--temperature", temperature],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join("dspark.json")).unwrap(),
            )
            .unwrap();
            reports.push(report);
        }
        for set in ["gsm8k", "mt-bench"] {
            for key in ["tau", "rounds", "tokens", "conditional_acceptance"] {
                assert_eq!(
                    reports[0]["sets"][set][key], reports[1]["sets"][set][key],
                    "T={temperature} {set}.{key}: batch 3 differs from batch 1"
                );
            }
        }
    }
}

#[test]
fn gate_passes_on_itself_and_fails_on_a_higher_baseline() {
    let dir = tempfile::tempdir().unwrap();
    assert!(eval(dir.path(), "eagle3", &[]).status.success());
    let report = dir.path().join("eagle3.json");
    let own = dir.path().join("own.json");
    std::fs::copy(&report, &own).unwrap();
    assert!(eval(
        dir.path(),
        "eagle3",
        &["--baseline", own.to_str().unwrap(), "--tolerance", "0.01"]
    )
    .status
    .success());
    let mut higher: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&own).unwrap()).unwrap();
    let tau = higher["sets"]["gsm8k"]["tau"].as_f64().unwrap();
    higher["sets"]["gsm8k"]["tau"] = serde_json::json!(tau * 1.5);
    std::fs::write(&own, higher.to_string()).unwrap();
    let out = eval(
        dir.path(),
        "eagle3",
        &["--baseline", own.to_str().unwrap(), "--tolerance", "0.05"],
    );
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL gsm8k") && stdout.contains("ok   macro_tau"),
        "{stdout}"
    );
}

#[test]
fn bad_inputs_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let sets = datasets(dir.path());
    std::fs::write(
        sets.join("gsm8k.jsonl"),
        "{\"turns\": [\"<t1>\"]}\n{\"turn\": [\"<t2>\"]}\n",
    )
    .unwrap();
    let golden = golden_dir();
    let report = dir.path().join("r.json");
    let run = |target: &Path| {
        deepspec(&[
            "eval",
            "--target",
            target.to_str().unwrap(),
            "--drafter",
            golden.join("dflash").to_str().unwrap(),
            "--datasets",
            sets.to_str().unwrap(),
            "--sets",
            "gsm8k",
            "--report",
            report.to_str().unwrap(),
        ])
    };
    let e = String::from_utf8_lossy(&run(&golden.join("target")).stderr).into_owned();
    assert!(e.contains("gsm8k.jsonl:2") && e.contains("turns"), "{e}");
    let e = String::from_utf8_lossy(&run(&smollm2()).stderr).into_owned();
    assert!(
        e.contains("hidden_size") && e.contains("another target"),
        "{e}"
    );
    let e = String::from_utf8_lossy(
        &deepspec(&[
            "eval",
            "--target",
            golden.join("target").to_str().unwrap(),
            "--drafter",
            golden.join("dflash").to_str().unwrap(),
            "--datasets",
            sets.to_str().unwrap(),
            "--sets",
            "mmlu",
            "--report",
            report.to_str().unwrap(),
        ])
        .stderr,
    )
    .into_owned();
    assert!(
        e.contains("unknown set `mmlu`") && e.contains("gsm8k"),
        "{e}"
    );
}

/// A drafter step that `keep_last` deleted is named as missing, with the steps that exist,
/// before any model is loaded; a second eval writing the same report or plots is refused.
#[test]
fn a_deleted_step_and_a_busy_report_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let golden = golden_dir();
    let run_dir = dir.path().join("run");
    for step in ["step_300", "step_200"] {
        std::fs::create_dir_all(run_dir.join(step)).unwrap();
    }
    std::os::unix::fs::symlink("step_300", run_dir.join("step_latest")).unwrap();
    let sets = datasets(dir.path());
    let report = dir.path().join("r.json");
    let target = golden.join("target");
    let eval_with = |drafter: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--target",
            target.to_str().unwrap(),
            "--drafter",
            drafter.to_str().unwrap(),
            "--datasets",
            sets.to_str().unwrap(),
            "--sets",
            "gsm8k",
            "--max-new-tokens",
            "4",
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = deepspec(&args);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, e) = eval_with(&run_dir.join("step_100"), &[]);
    assert!(!ok);
    assert!(
        e.contains("step_100: the folder does not exist")
            && e.contains("holds step_200, step_300, step_latest")
            && e.contains("train.keep_last"),
        "{e}"
    );
    assert!(!e.contains("Caused by"), "{e}");

    let lock = |dir: &Path, name: &str| {
        let file = std::fs::File::create(dir.join(name)).unwrap();
        file.try_lock().unwrap();
        file
    };
    let held = lock(dir.path(), ".r.json.lock");
    let (ok, e) = eval_with(&golden.join("dflash"), &[]);
    assert!(!ok);
    assert!(
        e.contains(".r.json.lock") && e.contains("another `deepspec eval` is writing"),
        "{e}"
    );
    drop(held);
    let plots = dir.path().join("plots");
    std::fs::create_dir(&plots).unwrap();
    let held = lock(&plots, ".eval.lock");
    let (ok, e) = eval_with(
        &golden.join("dflash"),
        &["--plots", plots.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(
        e.contains(".eval.lock") && e.contains("another `deepspec eval` is writing"),
        "{e}"
    );
    drop(held);
    let (ok, e) = eval_with(
        &golden.join("dflash"),
        &["--plots", plots.to_str().unwrap()],
    );
    assert!(ok, "{e}");
    assert!(report.is_file() && plots.join("acceptance_by_position.png").is_file());
}

/// `datasets held-out` writes prompts the evaluation never decodes.
#[test]
fn held_out_prompts_are_disjoint_from_the_eval_selection() {
    use deepspec_eval::datasets::{read_jsonl, Selection};
    let dir = tempfile::tempdir().unwrap();
    let sets = deepspec_core::fixtures::datasets_dir();
    let file = dir.path().join("prompts.jsonl");
    let out = deepspec(&[
        "datasets",
        "held-out",
        "--datasets",
        sets.to_str().unwrap(),
        "--sets",
        "gsm8k",
        "--per-set",
        "5",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["turns"][0].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(held.len(), 5);
    let selection = Selection {
        seed: 980_406,
        limit: None,
    };
    let eval = read_jsonl("gsm8k", &sets.join("gsm8k.jsonl"), selection).unwrap();
    assert_eq!(eval.samples.len(), 500);
    for prompt in &held {
        assert!(
            eval.samples.iter().all(|s| &s.turns[0] != prompt),
            "a held-out prompt is in the eval selection"
        );
    }
    let out = deepspec(&[
        "datasets",
        "held-out",
        "--datasets",
        sets.to_str().unwrap(),
        "--sets",
        "humaneval",
        "--out",
        file.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("none is held out"),
        "{stderr}"
    );
}

/// `--calibrate` writes the fitted temperatures beside the drafter, and identity where the
/// run is too short to fit, saying so.
#[test]
fn calibrate_writes_the_temperatures_beside_the_drafter() {
    let dir = tempfile::tempdir().unwrap();
    let drafter = dir.path().join("dspark");
    std::fs::create_dir_all(&drafter).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(golden_dir().join("dspark").join(file), drafter.join(file)).unwrap();
    }
    let sets = datasets(dir.path());
    let out = deepspec(&[
        "eval",
        "--target",
        golden_dir().join("target").to_str().unwrap(),
        "--drafter",
        drafter.to_str().unwrap(),
        "--datasets",
        sets.to_str().unwrap(),
        "--sets",
        "gsm8k,mt-bench",
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
        "--report",
        dir.path().join("r.json").to_str().unwrap(),
        "--calibrate",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(drafter.join("calibration.json")).unwrap())
            .unwrap();
    assert_eq!(written["method"], "sequential_temperature_scaling");
    assert_eq!(written["predicts"], "prefix_survival");
    assert_eq!(written["temperatures"], serde_json::json!(vec![1.0; 7]));
    assert_eq!(written["ece_bins"], 20);
    assert_eq!(written["notes"].as_array().unwrap().len(), 7);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(
        written["temperatures"],
        report["calibration"]["sts_temperatures"]
    );
}

/// A team's own prompts: any `NAME.jsonl` in `--datasets` and a `--prompts FILE` are
/// evaluated as custom sets, under their names, with the domain `--domain` gives or
/// `custom`; with stderr captured, each set prints a status line with turns, tokens/s, τ,
/// elapsed time and ETA.
#[test]
fn own_prompt_sets_are_evaluated_with_their_domains() {
    let dir = tempfile::tempdir().unwrap();
    let sets = datasets(dir.path());
    std::fs::write(
        sets.join("aime24.jsonl"),
        "{\"turns\": [\"<t12> <t40> <t7>\"]}\n{\"turns\": [\"<t3>\"]}\n",
    )
    .unwrap();
    let traffic = dir.path().join("traffic.jsonl");
    std::fs::write(&traffic, "{\"turns\": [\"<t99> <t100>\"]}\n").unwrap();
    let golden = golden_dir();
    let report = dir.path().join("r.json");
    let (target, drafter) = (golden.join("target"), golden.join("dflash"));
    let run = |sets_flag: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--target",
            target.to_str().unwrap(),
            "--drafter",
            drafter.to_str().unwrap(),
            "--datasets",
            sets.to_str().unwrap(),
            "--sets",
            sets_flag,
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        deepspec(&args)
    };
    let out = run(
        "aime24,gsm8k",
        &[
            "--prompts",
            traffic.to_str().unwrap(),
            "--domain",
            "aime24=math",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["sets"]["aime24"]["domain"], "math");
    assert_eq!(r["sets"]["aime24"]["samples"], 1);
    assert_eq!(r["sets"]["traffic"]["domain"], "custom");
    assert_eq!(r["sets"]["gsm8k"]["domain"], "math");
    assert!(r["domain_tau"]["custom"].as_f64().unwrap() >= 1.0);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("| aime24 |") && table.contains("| traffic |"),
        "{table}"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("aime24 turns=1/1 "))
        .unwrap_or_else(|| panic!("no progress line for aime24:\n{stderr}"));
    for field in ["tokens=", "tok/s=", "tau=", "elapsed=", "eta=0s"] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    let e = String::from_utf8_lossy(&run("aime24,lbpp", &[]).stderr).into_owned();
    assert!(
        e.contains("unknown set `lbpp`") && e.contains("lbpp.jsonl does not exist"),
        "{e}"
    );
    let e =
        String::from_utf8_lossy(&run("aime24", &["--domain", "aime24=poetry"]).stderr).into_owned();
    assert!(e.contains("`poetry` is not a domain"), "{e}");
}
