//! Where tests find the reference's golden fixtures and the SmolLM2 model. Lives in the
//! library (not in one crate's `tests/`) so every crate's tests resolve them the same way.

use std::path::PathBuf;

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `var` when set (relative paths are taken from the workspace root), else `default` under
/// the workspace root.
fn from_env(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join(default),
    }
}

/// The golden fixture folder: `DEEPSPEC_GOLDEN_DIR`, default the repository's copy
/// `tests/golden` (see its README). Panics with a clear message when the fixtures are not
/// there.
pub fn golden_dir() -> PathBuf {
    let dir = from_env("DEEPSPEC_GOLDEN_DIR", "tests/golden");
    assert!(
        dir.join("inputs.safetensors").exists(),
        "golden fixtures not found in {} (set DEEPSPEC_GOLDEN_DIR)",
        dir.display()
    );
    dir
}

/// SmolLM2-135M-Instruct, fetched by `scripts/fetch-smollm2.sh`.
pub fn smollm2() -> PathBuf {
    let path = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh first",
        path.display()
    );
    path
}

/// llama.cpp's outputs on SmolLM2 (`tests/oracle/smollm2`).
pub fn oracle_dir() -> PathBuf {
    workspace_root().join("tests/oracle/smollm2")
}

/// The benchmark prompt sets: `DEEPSPEC_DATASETS`, default the repository's copy
/// `data/eval-datasets`.
pub fn datasets_dir() -> PathBuf {
    from_env("DEEPSPEC_DATASETS", "data/eval-datasets")
}

/// Largest absolute difference between two slices, with its index.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut worst = (0.0f32, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    worst
}

/// The DeepSeek-V4 fixture folder: `DEEPSPEC_GOLDEN_V4_DIR`, default the repository's copy
/// `tests/golden-v4` (transformers' own DeepSeek-V4 code on tiny configs; see its README).
/// The reference's Gemma4 fixtures: `DEEPSPEC_GOLDEN_GEMMA4_DIR` or tests/golden-gemma4.
pub fn golden_gemma4_dir() -> PathBuf {
    let dir = from_env("DEEPSPEC_GOLDEN_GEMMA4_DIR", "tests/golden-gemma4");
    assert!(
        dir.join("inputs.safetensors").exists() && dir.join("target/config.json").exists(),
        "Gemma4 fixtures not found in {} (set DEEPSPEC_GOLDEN_GEMMA4_DIR)",
        dir.display()
    );
    dir
}

pub fn golden_v4_dir() -> PathBuf {
    let dir = from_env("DEEPSPEC_GOLDEN_V4_DIR", "tests/golden-v4");
    assert!(
        dir.join("config.json").exists() && dir.join("stack.safetensors").exists(),
        "DeepSeek-V4 fixtures not found in {} (set DEEPSPEC_GOLDEN_V4_DIR)",
        dir.display()
    );
    dir
}
