//! The `deepspec` binary as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn deepspec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepspec"))
}

fn smollm2() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh first",
        path.display()
    );
    path
}

#[test]
fn help_lists_the_stages() {
    let out = deepspec().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for stage in ["prepare", "train", "eval", "generate", "bench"] {
        assert!(help.contains(stage), "--help lacks {stage}:\n{help}");
    }
}

#[test]
fn generate_answers_paris_greedily() {
    let out = deepspec()
        .args(["generate", "--model"])
        .arg(smollm2())
        .args([
            "--prompt",
            "What is the capital of France? Answer in one word.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {stderr}");
    let reply = String::from_utf8(out.stdout).unwrap();
    assert!(reply.contains("Paris"), "reply: {reply:?}");
}

#[test]
fn generate_with_a_missing_model_says_which_file() {
    let out = deepspec()
        .args([
            "generate",
            "--model",
            "no/such/model.gguf",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no/such/model.gguf"), "{stderr}");
}
