//! The real small model: SmolLM2-135M-Instruct as a Q4_1 GGUF (scripts/fetch-smollm2.sh),
//! checked against what llama.cpp gives on it (../shared/oracle/smollm2).

use deepspec_core::fixtures::{oracle_dir, smollm2};
use deepspec_core::io::chat::{tokenize_conversation, ChatTemplate, Message, TurnFormat};
use deepspec_core::io::gguf::GgufFile;
use deepspec_core::io::tokenizer::Tok;

fn tokenizer() -> Tok {
    Tok::from_gguf(&GgufFile::open(smollm2()).unwrap()).unwrap()
}

fn oracle(name: &str) -> serde_json::Value {
    let path = oracle_dir().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_tokenizer_matches_llama_cpp_ids() {
    let tok = tokenizer();
    let oracle = oracle("tokens.json");
    let cases = oracle["tokens"].as_array().unwrap();
    assert!(cases.len() > 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let special = case["special"].as_bool().unwrap_or(false);
        let got = if special {
            tok.encode(text).unwrap()
        } else {
            // llama.cpp was asked not to parse special tokens for these strings.
            tok.encode_plain(text).unwrap()
        };
        assert_eq!(got, want, "ids of {text:?}");
    }
}

#[test]
fn chat_prompts_tokenize_like_llama_cpp() {
    let tok = tokenizer();
    let template = ChatTemplate::for_tokenizer(&tok).unwrap();
    let oracle = oracle("greedy.json");
    for case in oracle["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let text = template
            .render(&[Message::new("user", prompt)], true, None)
            .unwrap();
        assert_eq!(
            tok.encode(&text).unwrap(),
            ids(&case["prompt_ids"]),
            "prompt {prompt:?}"
        );
    }
}

#[test]
fn utf8_round_trips() {
    let tok = tokenizer();
    for text in [
        "plain ASCII with  double spaces\tand tabs\n",
        "emoji 🦀🚀 flags 🇫🇷 ZWJ 👩\u{200d}💻",
        "日本語のテキストと中文文本, 한국어",
        "fn main() { println!(\"{}\", 1 << 3); } // code\r\n",
        "naïve café — “quotes” ‘single’ ∑∫√",
        "",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn chatml_two_turn_rendering_is_byte_exact() {
    let tok = tokenizer();
    let template = ChatTemplate::for_tokenizer(&tok).unwrap();
    let messages = [
        Message::new("user", "Hi! Can you help me?"),
        Message::new("assistant", "Of course. What do you need?"),
        Message::new("user", "Name a prime number."),
        Message::new("assistant", "7"),
    ];
    let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
<|im_start|>user\nHi! Can you help me?<|im_end|>\n\
<|im_start|>assistant\nOf course. What do you need?<|im_end|>\n\
<|im_start|>user\nName a prime number.<|im_end|>\n\
<|im_start|>assistant\n7<|im_end|>\n";
    assert_eq!(template.render(&messages, false, None).unwrap(), expected);
    let with_prompt = template.render(&messages[..3], true, None).unwrap();
    assert!(with_prompt
        .ends_with("<|im_start|>user\nName a prime number.<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn assistant_mask_covers_exactly_the_assistant_tokens() {
    let tok = tokenizer();
    let template = ChatTemplate::for_tokenizer(&tok).unwrap();
    let messages = [
        Message::new("user", "Hi! Can you help me?"),
        Message::new("assistant", "Of course. What do you need?"),
        Message::new("user", "Name a prime number."),
        Message::new("assistant", "Seven is prime."),
    ];
    let chat =
        tokenize_conversation(&tok, &template, &TurnFormat::CHATML, &messages, 4096).unwrap();
    // The masked tokens, read back, are each assistant turn's content plus its end of turn.
    let mut pieces = Vec::new();
    let mut run: Vec<u32> = Vec::new();
    for (&id, &m) in chat.input_ids.iter().zip(&chat.loss_mask) {
        if m == 1 {
            run.push(id);
        } else if !run.is_empty() {
            pieces.push(tok.decode(&run, false).unwrap());
            run.clear();
        }
    }
    if !run.is_empty() {
        pieces.push(tok.decode(&run, false).unwrap());
    }
    assert_eq!(
        pieces,
        vec![
            "Of course. What do you need?<|im_end|>\n".to_string(),
            "Seven is prime.<|im_end|>\n".to_string()
        ]
    );
    // Truncation keeps the first tokens and clips the mask with them.
    let short = tokenize_conversation(&tok, &template, &TurnFormat::CHATML, &messages, 40).unwrap();
    assert_eq!(short.input_ids, chat.input_ids[..40]);
    assert_eq!(short.loss_mask, chat.loss_mask[..40]);
}
