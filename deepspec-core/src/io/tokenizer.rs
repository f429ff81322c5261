//! Tokenizers through the `tokenizers` crate: `tokenizer.json` for Hugging Face models, and a
//! byte-level BPE rebuilt from GGUF metadata (`tokenizer.ggml.*`) for GGUF models.

use super::gguf::{GgufFile, Value};
use crate::LoadError;
use serde_json::json;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A tokenizer plus what the chat template needs from the model's files.
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    /// The same tokenizer with special-token matching off: their strings are plain text.
    plain: Tokenizer,
    origin: PathBuf,
    /// The model's own Jinja chat template, if its files carry one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("origin", &self.origin)
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

fn token_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn plain_copy(inner: &Tokenizer) -> Tokenizer {
    let mut plain = inner.clone();
    plain.set_encode_special_tokens(true);
    plain
}

impl Tok {
    /// `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja` when present).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| LoadError::corrupt(&path, format!("cannot load tokenizer: {e}")))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| LoadError::corrupt(&config_path, format!("not valid JSON: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let chat_template = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(items) => items
                .iter()
                .find(|t| t["name"] == "default")
                .or(items.first())
                .and_then(|t| t["template"].as_str().map(str::to_string)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let bos_token = token_string(&config["bos_token"]);
        let eos_token = token_string(&config["eos_token"]);
        let mut tok = Tok {
            plain: plain_copy(&inner),
            inner,
            origin: path,
            chat_template,
            bos_token,
            eos_token,
            eos_ids: Vec::new(),
        };
        // generation_config.json lists the ids that end a reply; fall back to the eos token.
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let gen: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::corrupt(&gen_path, format!("not valid JSON: {e}")))?;
            tok.eos_ids = match &gen["eos_token_id"] {
                serde_json::Value::Number(n) => n.as_u64().into_iter().map(|v| v as u32).collect(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                _ => Vec::new(),
            };
        }
        if tok.eos_ids.is_empty() {
            if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
                tok.eos_ids.push(id);
            }
        }
        Ok(tok)
    }

    /// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, LoadError> {
        let path = file.path();
        let model = file.require_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(LoadError::field(
                path,
                "tokenizer.ggml.model",
                format!("`{model}` tokenizers are not supported (only byte-level BPE, `gpt2`)"),
            ));
        }
        let tokens = file.string_array("tokenizer.ggml.tokens")?;
        let merges = file.string_array("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
        {
            Some(items) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre_tokenizer = match pre {
            "default" | "gpt2" => byte_level(true),
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
            other => {
                return Err(LoadError::field(
                    path,
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer `{other}` is not supported (supported: default, gpt2, smollm, qwen2, llama-bpe)"),
                ))
            }
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<serde_json::Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
                json!([a, b])
            })
            .collect();
        // Control (3) and user-defined (4) tokens are matched whole in text, as llama.cpp does.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner: Tokenizer = serde_json::from_value(spec).map_err(|e| {
            LoadError::field(
                path,
                "tokenizer.ggml.tokens",
                format!("cannot build a tokenizer: {e}"),
            )
        })?;
        let id_token = |key: &str| {
            file.get(key)
                .and_then(Value::as_u64)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let eos_ids = file
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        Ok(Tok {
            plain: plain_copy(&inner),
            inner,
            origin: path.to_path_buf(),
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            bos_token: id_token("tokenizer.ggml.bos_token_id"),
            eos_token: id_token("tokenizer.ggml.eos_token_id"),
            eos_ids,
        })
    }

    /// Where the tokenizer came from (for error messages and cache identity).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special-token strings inside it become their special ids, and no
    /// BOS/EOS is added (the chat template writes those itself).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LoadError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| LoadError::corrupt(&self.origin, format!("cannot encode text: {e}")))
    }

    /// Token ids of `text` with special-token strings tokenized as ordinary text (for user
    /// content that must not inject control tokens).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, LoadError> {
        self.plain
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| LoadError::corrupt(&self.origin, format!("cannot encode text: {e}")))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, LoadError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| LoadError::corrupt(&self.origin, format!("cannot decode ids: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The serialized tokenizer (what a cache records a hash of).
    pub fn to_json(&self) -> String {
        self.inner.to_string(false).unwrap_or_default()
    }
}
