//! Broken model files give one clear error naming the file and the tensor.

use deepspec_core::backend::Cpu;
use deepspec_core::fixtures::{golden_dir, smollm2};
use deepspec_core::io::gguf::GgufFile;
use deepspec_core::io::safetensors::{write_f32, NamedTensor, SafetensorsCheckpoint};
use deepspec_core::io::{HostTensor, WeightSource};
use deepspec_core::model::load_target;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A copy of the golden target whose tensors pass through `edit` first.
fn target_copy(edit: impl Fn(&mut BTreeMap<String, HostTensor>)) -> (tempfile::TempDir, PathBuf) {
    let src = golden_dir().join("target");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let ckpt = SafetensorsCheckpoint::open_dir(&src).unwrap();
    let mut tensors: BTreeMap<String, HostTensor> = ckpt
        .names()
        .into_iter()
        .map(|n| {
            let t = ckpt.tensor(&n).unwrap();
            (n, t)
        })
        .collect();
    edit(&mut tensors);
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, t)| NamedTensor {
            name: n,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    let path = dir.path().join("model.safetensors");
    write_f32(&path, &named, &BTreeMap::new()).unwrap();
    (dir, path)
}

fn load_error(dir: &Path) -> String {
    match load_target::<Cpu>(dir, &Default::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let (dir, _) = target_copy(|t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let err = load_error(dir.path());
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    assert!(err.contains("is missing"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn shape_mismatch_names_tensor_and_both_shapes() {
    let (dir, _) = target_copy(|t| {
        let w = t.get_mut("model.layers.0.self_attn.o_proj.weight").unwrap();
        let cols = w.shape[1];
        w.shape[0] -= 1;
        w.data.truncate(w.shape[0] * cols);
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.o_proj.weight"),
        "{err}"
    );
    assert!(err.contains("has shape"), "{err}");
    assert!(err.contains("expected"), "{err}");
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let (dir, path) = target_copy(|_| {});
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    // The last tensor in the file (sorted by name) is the one cut short.
    assert!(err.contains("model.norm.weight"), "{err}");
}

/// Writes a GGUF v3 file holding one tensor of ggml type `type_id` (no metadata).
fn write_gguf(path: &Path, name: &str, dims: &[u64], type_id: u32, data_len: usize) {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(name.len() as u64).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&type_id.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, out).unwrap();
}

#[test]
fn unsupported_gguf_quantization_names_type_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4k.gguf");
    // Q4_K (ggml type 12): 256 elements in a 144-byte block.
    write_gguf(&path, "blk.0.ffn_up.weight", &[256, 2], 12, 288);
    let file = GgufFile::open(&path).unwrap();
    let err = file
        .dequantize("blk.0.ffn_up.weight")
        .unwrap_err()
        .to_string();
    assert!(err.contains("q4k.gguf"), "{err}");
    assert!(err.contains("blk.0.ffn_up.weight"), "{err}");
    assert!(err.contains("Q4_K"), "{err}");
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.gguf");
    // A Q8_0 tensor of 64 elements needs 68 bytes; give it 40.
    write_gguf(&path, "token_embd.weight", &[32, 2], 8, 40);
    let err = match GgufFile::open(&path) {
        Ok(_) => panic!("truncated GGUF should not open"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("short.gguf") && err.contains("token_embd.weight"),
        "{err}"
    );
}

#[test]
fn not_a_model_path_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_error(&dir.path().join("nothing-here"));
    assert!(err.contains("nothing-here"), "{err}");
    assert!(
        err.contains(".gguf file or a Hugging Face model folder"),
        "{err}"
    );
}

/// SmolLM2 with one tensor name damaged in its header (same length, so the file stays
/// readable): the error names the missing Hugging Face tensor, the GGUF name it needs and the
/// unexpected GGUF tensor found instead.
#[test]
fn damaged_gguf_tensor_name_names_the_unexpected_tensor() {
    let mut bytes = std::fs::read(smollm2()).unwrap();
    let name = b"blk.3.ffn_up.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("SmolLM2 has blk.3.ffn_up.weight");
    bytes[at + "blk.3.ffn_u".len()] = b'q';
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = load_error(&path);
    assert!(err.contains("damaged.gguf"), "{err}");
    assert!(
        err.contains("tensor `model.layers.3.mlp.up_proj.weight` is missing"),
        "{err}"
    );
    assert!(
        err.contains("no GGUF tensor `blk.3.ffn_up.weight` in the file"),
        "{err}"
    );
    assert!(
        err.contains("unexpected GGUF tensor `blk.3.ffn_uq.weight`"),
        "{err}"
    );
}
