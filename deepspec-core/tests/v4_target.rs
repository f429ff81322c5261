//! DeepSeek-V4 target pieces that run without the target: its embedding and head read from a
//! (sharded, FP8) checkpoint folder, and its chat format.

use deepspec_core::io::chat::{assistant_spans, ChatTemplate, Message, TurnFormat};
use deepspec_core::io::fp8::{fp8_e4m3_decode, fp8_e8m0_decode};
use deepspec_core::io::target_head::{load_target_head, load_target_head_named, read_matrices};
use half::bf16;
use serde_json::json;
use std::path::Path;

/// e4m3fn built from its bit fields as an f32 bit pattern (independent of the decoder's
/// arithmetic): normal codes re-bias the exponent, subnormals are `mantissa * 2^-9`.
fn e4m3_reference(code: u8) -> f32 {
    let sign = (code >> 7) as u32;
    let exp = ((code >> 3) & 0x0F) as u32;
    let mant = (code & 0x07) as u32;
    if exp == 0x0F && mant == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        let magnitude = mant as f32 * f32::from_bits((127 - 9) << 23);
        return if sign == 1 { -magnitude } else { magnitude };
    }
    f32::from_bits((sign << 31) | ((exp + 127 - 7) << 23) | (mant << 20))
}

#[test]
fn e4m3_decodes_every_byte_like_its_bit_fields() {
    for code in 0..=255u8 {
        let (got, want) = (fp8_e4m3_decode(code), e4m3_reference(code));
        if want.is_nan() {
            assert!(got.is_nan(), "code {code:#04x}: {got} should be NaN");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "code {code:#04x}: {got} vs {want}"
            );
        }
    }
    let known = [
        (0x38, 1.0),
        (0x7E, 448.0),
        (0xFE, -448.0),
        (0x77, 240.0),
        (0x40, 2.0),
        (0x30, 0.5),
        (0xB8, -1.0),
        (0x08, 2f32.powi(-6)),
        (0x07, 7.0 * 2f32.powi(-9)),
        (0x01, 2f32.powi(-9)),
        (0x00, 0.0),
    ];
    for (code, value) in known {
        assert_eq!(fp8_e4m3_decode(code), value, "code {code:#04x}");
    }
    assert_eq!(fp8_e4m3_decode(0x80).to_bits(), (-0.0f32).to_bits());
    assert!(fp8_e4m3_decode(0x7F).is_nan() && fp8_e4m3_decode(0xFF).is_nan());
}

#[test]
fn e8m0_is_a_power_of_two() {
    assert_eq!(fp8_e8m0_decode(127), 1.0);
    assert_eq!(fp8_e8m0_decode(120), 1.0 / 128.0);
    assert_eq!(fp8_e8m0_decode(130), 8.0);
    assert_eq!(fp8_e8m0_decode(254), 2f32.powi(127));
    assert_eq!(fp8_e8m0_decode(0), 2f32.powi(-127));
    assert!(fp8_e8m0_decode(0xFF).is_nan());
}

/// One tensor to write by hand: name, safetensors dtype, shape, raw little-endian bytes.
struct Raw {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn write_safetensors(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.bytes);
        header.insert(
            t.name.into(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn write_index(dir: &Path, weight_map: serde_json::Value) {
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

const VOCAB: usize = 300;
const HIDDEN: usize = 200;

/// Embedding values, exact in bf16.
fn embed_values() -> Vec<f32> {
    (0..VOCAB * HIDDEN)
        .map(|i| ((i % 97) as f32 - 48.0) / 16.0)
        .collect()
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect()
}

/// Head codes: every e4m3 value but NaN, in a scrambled order.
fn head_codes() -> Vec<u8> {
    (0..VOCAB * HIDDEN)
        .map(|i| match ((i * 37 + 11) % 256) as u8 {
            0x7F | 0xFF => 0x3C,
            code => code,
        })
        .collect()
}

/// The head the loader must return: each code times its 128×128 block's scale, `scales`
/// being `[3, 2]` row-major (300 rows -> blocks 0..128, 128..256, 256..300; 200 columns ->
/// 0..128, 128..200).
fn expected_head(codes: &[u8], scales: &[f32; 6]) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            let (row, col) = (i / HIDDEN, i % HIDDEN);
            let block = (row / 128) * 2 + col / 128;
            e4m3_reference(code) * scales[block]
        })
        .collect()
}

/// A V4-style sharded folder: BF16 `embed.weight` in shard 1, FP8 `head.weight` with F32
/// `head.scale` in shard 2 next to an I8 tensor deepspec does not decode.
fn write_v4_folder(dir: &Path, head_scales: &[f32; 6], scale_shape: Vec<usize>) {
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            Raw {
                name: "embed.weight",
                dtype: "BF16",
                shape: vec![VOCAB, HIDDEN],
                bytes: bf16_bytes(&embed_values()),
            },
            Raw {
                name: "layers.0.attn_norm.weight",
                dtype: "F32",
                shape: vec![HIDDEN],
                bytes: vec![0; HIDDEN * 4],
            },
        ],
    );
    let scale_len: usize = scale_shape.iter().product();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[
            Raw {
                name: "head.weight",
                dtype: "F8_E4M3",
                shape: vec![VOCAB, HIDDEN],
                bytes: head_codes(),
            },
            Raw {
                name: "head.scale",
                dtype: "F32",
                shape: scale_shape,
                bytes: head_scales[..scale_len]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            },
            Raw {
                name: "layers.0.ffn.experts.0.w1.weight",
                dtype: "I8",
                shape: vec![4, 2],
                bytes: vec![1; 8],
            },
        ],
    );
    write_index(
        dir,
        json!({
            "embed.weight": "model-00001-of-00002.safetensors",
            "layers.0.attn_norm.weight": "model-00001-of-00002.safetensors",
            "head.weight": "model-00002-of-00002.safetensors",
            "head.scale": "model-00002-of-00002.safetensors",
            "layers.0.ffn.experts.0.w1.weight": "model-00002-of-00002.safetensors",
        }),
    );
}

const HEAD_SCALES: [f32; 6] = [0.5, 2.0, 0.25, 4.0, 1.5, 0.125];

#[test]
fn sharded_v4_folder_gives_bf16_embed_and_dequantized_fp8_head() {
    let dir = tempfile::tempdir().unwrap();
    write_v4_folder(dir.path(), &HEAD_SCALES, vec![3, 2]);
    let target = load_target_head(dir.path()).unwrap();
    assert_eq!((target.vocab_size(), target.hidden_size()), (VOCAB, HIDDEN));
    assert_eq!(target.embed.shape, vec![VOCAB, HIDDEN]);
    assert_eq!(target.embed.data, embed_values());
    assert_eq!(target.head.shape, vec![VOCAB, HIDDEN]);
    let want = expected_head(&head_codes(), &HEAD_SCALES);
    for (i, (got, want)) in target.head.data.iter().zip(&want).enumerate() {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "head[{}][{}]",
            i / HIDDEN,
            i % HIDDEN
        );
    }
    // Spot checks by hand: row 0 col 0 is code 11 (0x0B = 1.375 * 2^-6) in block (0, 0);
    // row 299 col 199 is in the last, partial block (2, 1) with scale 0.125.
    assert_eq!(target.head.data[0], 1.375 * 2f32.powi(-6) * 0.5);
    let last = VOCAB * HIDDEN - 1;
    let code = ((last * 37 + 11) % 256) as u8;
    assert_eq!(target.head.data[last], e4m3_reference(code) * 0.125);
}

#[test]
fn single_file_with_hf_names_and_e8m0_scale_inv() {
    let dir = tempfile::tempdir().unwrap();
    // ue8m0 scales 2^-1, 2^1, 2^-2, 2^2, 2^0, 2^-3.
    let scale_codes = [126u8, 128, 125, 129, 127, 124];
    let scales = scale_codes.map(fp8_e8m0_decode);
    assert_eq!(scales, [0.5, 2.0, 0.25, 4.0, 1.0, 0.125]);
    let embed_f16: Vec<u8> = embed_values()
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &[
            Raw {
                name: "model.embed_tokens.weight",
                dtype: "F16",
                shape: vec![VOCAB, HIDDEN],
                bytes: embed_f16,
            },
            Raw {
                name: "lm_head.weight",
                dtype: "F8_E4M3",
                shape: vec![VOCAB, HIDDEN],
                bytes: head_codes(),
            },
            Raw {
                name: "lm_head.weight_scale_inv",
                dtype: "F8_E8M0",
                shape: vec![3, 2],
                bytes: scale_codes.to_vec(),
            },
        ],
    );
    let target =
        load_target_head_named(dir.path(), "model.embed_tokens.weight", "lm_head.weight").unwrap();
    assert_eq!(target.embed.data, embed_values());
    assert_eq!(target.head.data, expected_head(&head_codes(), &scales));

    // DeepSeek's native names are not in this folder: the error names the close ones.
    let err = load_target_head(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tensor `embed.weight` is missing"), "{err}");
    assert!(err.contains("close: `model.embed_tokens.weight`"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn shard_names_outside_the_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_v4_folder(dir.path(), &HEAD_SCALES, vec![3, 2]);
    write_index(
        dir.path(),
        json!({
            "embed.weight": "model-00001-of-00002.safetensors",
            "head.weight": "../evil.safetensors",
        }),
    );
    let err = load_target_head(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors.index.json"), "{err}");
    assert!(err.contains("weight_map.head.weight"), "{err}");
    assert!(
        err.contains("shard `../evil.safetensors` is not a plain file name inside the folder"),
        "{err}"
    );
    for bad in ["/etc/passwd", "sub/model.safetensors", ".."] {
        write_index(dir.path(), json!({ "head.weight": bad }));
        let err = read_matrices(dir.path(), &["head.weight"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a plain file name"), "{bad}: {err}");
    }
}

#[test]
fn scale_shape_rank_and_missing_scale_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_v4_folder(dir.path(), &HEAD_SCALES, vec![2, 2]);
    let err = load_target_head(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    assert!(
        err.contains("tensor `head.scale`: has shape [2, 2], expected [3, 2]"),
        "{err}"
    );
    assert!(
        err.contains("F8_E4M3 weight `head.weight` [300, 200]"),
        "{err}"
    );

    let err = read_matrices(dir.path(), &["layers.0.attn_norm.weight"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `layers.0.attn_norm.weight`: has shape [200] (1-D); expected a 2-D"),
        "{err}"
    );

    let err = read_matrices(dir.path(), &["layers.0.ffn.experts.0.w1.weight"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("has dtype I8"), "{err}");

    write_index(
        dir.path(),
        json!({ "head.weight": "model-00002-of-00002.safetensors" }),
    );
    let err = read_matrices(dir.path(), &["head.weight"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `head.weight_scale_inv` or `head.scale` is missing"),
        "{err}"
    );
}

const BOS: &str = "<\u{FF5C}begin\u{2581}of\u{2581}sentence\u{FF5C}>";
const EOS: &str = "<\u{FF5C}end\u{2581}of\u{2581}sentence\u{FF5C}>";
const USER: &str = "<\u{FF5C}User\u{FF5C}>";
const ASSISTANT: &str = "<\u{FF5C}Assistant\u{FF5C}>";

fn v4_template() -> ChatTemplate {
    let format = TurnFormat::by_name("deepseek_v4").unwrap();
    ChatTemplate::new(format.template.unwrap(), None, None).unwrap()
}

#[test]
fn deepseek_v4_renders_two_turns_byte_exact_with_loss_spans() {
    let messages = [
        Message::new("system", "You are terse."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "2+2?"),
        Message::new("assistant", "4"),
    ];
    let template = v4_template();
    assert_eq!(template.format, Some(TurnFormat::DEEPSEEK_V4));
    let text = template.render(&messages, false, None).unwrap();
    let want = format!(
        "{BOS}You are terse.{USER}Hi{ASSISTANT}</think>Hello!{EOS}{USER}2+2?{ASSISTANT}</think>4{EOS}"
    );
    assert_eq!(text, want);
    // `｜` is U+FF5C (EF BD 9C) and `▁` U+2581 (E2 96 81).
    assert_eq!(
        &text.as_bytes()[..10],
        &[b'<', 0xEF, 0xBD, 0x9C, b'b', b'e', b'g', b'i', b'n', 0xE2]
    );

    let spans = assistant_spans(&text, &TurnFormat::DEEPSEEK_V4);
    let first_start = BOS.len() + "You are terse.".len() + USER.len() + 2 + ASSISTANT.len() + 8;
    let first_end = first_start + "Hello!".len() + EOS.len();
    let second_start = first_end + USER.len() + 4 + ASSISTANT.len() + 8;
    assert_eq!(
        spans,
        vec![
            (first_start, first_end),
            (second_start, second_start + 1 + EOS.len())
        ]
    );
    assert_eq!(second_start + 1 + EOS.len(), text.len());
    let trained: Vec<&str> = spans.iter().map(|&(s, e)| &text[s..e]).collect();
    assert_eq!(trained, vec![format!("Hello!{EOS}"), format!("4{EOS}")]);
    // `<｜Assistant｜></think>` is not trained.
    assert_eq!(
        &text[first_start - ASSISTANT.len() - 8..first_start],
        format!("{ASSISTANT}</think>")
    );
}

#[test]
fn deepseek_v4_generation_prompt_ends_with_assistant_and_think_close() {
    let template = v4_template();
    let messages = [
        Message::new("system", "S"),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "2+2?"),
    ];
    let prompt = template.render(&messages, true, None).unwrap();
    assert_eq!(
        prompt,
        format!("{BOS}S{USER}Hi{ASSISTANT}</think>Hello!{EOS}{USER}2+2?{ASSISTANT}</think>")
    );
    let no_prompt = template.render(&messages[1..2], false, None).unwrap();
    assert_eq!(no_prompt, format!("{BOS}{USER}Hi"));
    let err = template
        .render(&[Message::new("tool", "42")], false, None)
        .unwrap_err();
    assert!(format!("{err:#}").contains("not `tool`"), "{err:#}");
}

#[test]
fn deepseek_v4_is_a_named_format() {
    assert_eq!(
        TurnFormat::by_name("deepseek-v4"),
        Some(TurnFormat::DEEPSEEK_V4)
    );
    assert_eq!(
        TurnFormat::by_name("deepseek_v4"),
        Some(TurnFormat::DEEPSEEK_V4)
    );
    assert!(TurnFormat::names().ends_with("deepseek-v4"));
    let header = TurnFormat::DEEPSEEK_V4.assistant_header;
    assert_eq!(header, format!("{ASSISTANT}</think>"));
    assert_eq!(TurnFormat::DEEPSEEK_V4.end_of_turn, EOS);
}
