//! Target model configuration, read from a Hugging Face `config.json` or GGUF metadata.

use crate::io::gguf::GgufFile;
use crate::LoadError;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Qwen3: per-head q/k RMSNorm.
    Qwen3,
    /// Llama (also SmolLM2): no q/k norm.
    Llama,
    /// DeepSeek-V4 (MoE, mHC, shared-KV attention): deepspec trains its DSpark drafter from
    /// an engine's cache and the target's `embed.weight` / `head.weight`, but does not run
    /// the target itself.
    #[serde(rename = "deepseek_v4")]
    DeepseekV4,
    /// Gemma4's text model (`model::gemma4`); a drafter's base config holds its
    /// full-attention settings (the only layer type a Gemma4 drafter has).
    Gemma4,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TargetConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    /// The share of each head's frequency pairs RoPE turns (Gemma4's "proportional" RoPE);
    /// 1 everywhere else.
    #[serde(default = "one")]
    pub partial_rotary_factor: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl TargetConfig {
    /// Parses a Hugging Face `config.json` (transformers 4 or 5 keys).
    pub fn from_hf_json(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::corrupt(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_value(path, &json)
    }

    pub fn from_hf_value(path: &Path, json: &Value) -> Result<Self, LoadError> {
        let usize_field = |key: &str| -> Result<usize, LoadError> {
            json[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| LoadError::field(path, key, "missing or not an unsigned integer"))
        };
        let model_type = json["model_type"].as_str().unwrap_or_default();
        if matches!(model_type, "gemma4" | "gemma4_text") {
            return Self::from_gemma4(path, json);
        }
        let family = match model_type {
            "qwen3" => Family::Qwen3,
            "llama" | "mistral" => Family::Llama,
            "deepseek_v4" => Family::DeepseekV4,
            other => {
                return Err(LoadError::field(
                    path,
                    "model_type",
                    format!(
                        "`{other}` is not supported (supported: qwen3, llama, mistral, deepseek_v4, gemma4)"
                    ),
                ))
            }
        };
        let v4 = family == Family::DeepseekV4;
        if let Some(scaling) = json.get("rope_scaling").filter(|v| !v.is_null() && !v4) {
            let kind = scaling["rope_type"]
                .as_str()
                .or(scaling["type"].as_str())
                .unwrap_or("?");
            if kind != "default" {
                return Err(LoadError::field(
                    path,
                    "rope_scaling",
                    format!("rope scaling `{kind}` is not supported (only unscaled RoPE)"),
                ));
            }
        }
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let rope_theta = json["rope_theta"]
            .as_f64()
            .or_else(|| json["rope_parameters"]["rope_theta"].as_f64())
            .or_else(|| json["rope_parameters"]["main"]["rope_theta"].as_f64())
            .ok_or_else(|| {
                LoadError::field(
                    path,
                    "rope_theta",
                    "missing (neither rope_theta nor rope_parameters.rope_theta)",
                )
            })?;
        let head_dim = json["head_dim"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        let eos_token_ids = match &json["eos_token_id"] {
            Value::Number(n) => n.as_u64().into_iter().map(|v| v as u32).collect(),
            Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        };
        Ok(TargetConfig {
            family,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            // DeepSeek-V4 has only MoE layers: the width of one expert.
            intermediate_size: if v4 {
                usize_field("moe_intermediate_size")?
            } else {
                usize_field("intermediate_size")?
            },
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: json["num_key_value_heads"]
                .as_u64()
                .map(|v| v as usize)
                .unwrap_or(num_attention_heads),
            head_dim,
            rope_theta,
            partial_rotary_factor: 1.0,
            rms_norm_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            tie_word_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: json["attention_bias"].as_bool().unwrap_or(false),
            max_position_embeddings: json["max_position_embeddings"]
                .as_u64()
                .map(|v| v as usize)
                .unwrap_or(4096),
            bos_token_id: json["bos_token_id"].as_u64().map(|v| v as u32),
            eos_token_ids,
        })
    }

    /// A Gemma4 config (`gemma4` with `text_config`, or `gemma4_text`): sizes, and the
    /// full-attention layers' head dim, KV heads and RoPE (a drafter's layers are all
    /// full-attention; the target's own layers read [`crate::model::gemma4::Gemma4Config`]).
    fn from_gemma4(path: &Path, json: &Value) -> Result<Self, LoadError> {
        let g = crate::model::gemma4::Gemma4Config::from_value(path, json)?;
        Ok(TargetConfig {
            family: Family::Gemma4,
            vocab_size: g.vocab_size,
            hidden_size: g.hidden_size,
            intermediate_size: g.intermediate_size,
            num_hidden_layers: g.num_hidden_layers,
            num_attention_heads: g.num_attention_heads,
            num_key_value_heads: g.num_global_key_value_heads,
            head_dim: g.global_head_dim,
            rope_theta: g.rope_full.theta,
            partial_rotary_factor: g.rope_full.partial_rotary_factor,
            rms_norm_eps: g.rms_norm_eps,
            tie_word_embeddings: g.tie_word_embeddings,
            attention_bias: false,
            max_position_embeddings: 4096,
            bos_token_id: g.bos_token_id,
            eos_token_ids: g.eos_token_ids,
        })
    }

    /// Reads a Llama-architecture GGUF's metadata. `has_output` says whether the file holds a
    /// separate `output.weight` (otherwise the head is tied to the embedding).
    pub fn from_gguf(file: &GgufFile, has_output: bool) -> Result<Self, LoadError> {
        let arch = file.require_str("general.architecture")?.to_string();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(LoadError::field(
                    file.path(),
                    "general.architecture",
                    format!("`{other}` is not supported (supported: llama, qwen3)"),
                ))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = file.require_u64(&key("embedding_length"))? as usize;
        let heads = file.require_u64(&key("attention.head_count"))? as usize;
        let kv_heads = file
            .get(&key("attention.head_count_kv"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(LoadError::field(
                file.path(),
                key("attention.head_count"),
                format!("{heads} query heads over {kv_heads} key/value heads: both must be positive and the first a multiple of the second"),
            ));
        }
        let vocab_size = match file.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => file.string_array("tokenizer.ggml.tokens")?.len(),
        };
        let f64_or = |k: &str, default: f64| {
            file.get(&key(k))
                .and_then(|v| v.as_f64())
                .unwrap_or(default)
        };
        Ok(TargetConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: file.require_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: file.require_u64(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: file
                .get(&key("attention.key_length"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(hidden_size / heads),
            rope_theta: f64_or("rope.freq_base", 10000.0),
            partial_rotary_factor: 1.0,
            rms_norm_eps: f64_or("attention.layer_norm_rms_epsilon", 1e-5),
            tie_word_embeddings: !has_output,
            attention_bias: false,
            max_position_embeddings: file
                .get(&key("context_length"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(4096),
            bos_token_id: file
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32),
            eos_token_ids: file
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| vec![v as u32])
                .unwrap_or_default(),
        })
    }
}
