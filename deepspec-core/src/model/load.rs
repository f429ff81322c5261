//! Loading a target model from disk: a Hugging Face folder (`config.json` + safetensors) or a
//! GGUF file. Every tensor's shape is checked against the config before it reaches a device.

use super::attention::SelfAttention;
use super::config::{Family, TargetConfig};
use super::linear::Linear;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::param_from_host;
use super::rope::Rope;
use super::transformer::{DecoderLayer, TargetModel, TargetNet};
use crate::io::gguf::{GgufFile, GgufWeights};
use crate::io::safetensors::SafetensorsCheckpoint;
use crate::io::tokenizer::Tok;
use crate::io::WeightSource;
use crate::LoadError;
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

/// A target ready to run: weights on a device, its config, rotary tables and tokenizer.
pub struct LoadedTarget<B: Backend> {
    pub model: TargetNet<B>,
    pub config: TargetConfig,
    pub rope: Rope,
    pub tokenizer: Tok,
    pub path: PathBuf,
}

/// Loads `path`: a `.gguf` file or a Hugging Face model folder.
pub fn load_target<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<LoadedTarget<B>, LoadError> {
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let (model, config, tokenizer) = if is_gguf {
        let file = GgufFile::open(path)?;
        let has_output = file.gguf_tensor_names().any(|n| n == "output.weight");
        let config = TargetConfig::from_gguf(&file, has_output)?;
        let tokenizer = Tok::from_gguf(&file)?;
        let weights =
            GgufWeights::new(file, config.num_attention_heads, config.num_key_value_heads);
        (
            TargetNet::Decoder(build_target(&weights, &config, device)?),
            config,
            tokenizer,
        )
    } else {
        if !path.is_dir() {
            return Err(LoadError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "expected a .gguf file or a Hugging Face model folder (config.json + model.safetensors)",
                ),
            ));
        }
        let config = TargetConfig::from_hf_json(&path.join("config.json"))?;
        if config.family == Family::DeepseekV4 {
            return Err(LoadError::field(
                path.join("config.json"),
                "model_type",
                "DeepSeek-V4 targets do not run in deepspec: train its DSpark drafter from a cache captured by your serving engine (the trainer reads only embed.weight and head.weight from this folder)".to_string(),
            ));
        }
        let tokenizer = Tok::from_hf_dir(path)?;
        if config.family == Family::Gemma4 {
            let gemma4 = super::gemma4::LoadedGemma4::<B>::load(path, device)?;
            (
                TargetNet::Gemma4 {
                    model: gemma4.model,
                    config: gemma4.config,
                },
                config,
                tokenizer,
            )
        } else {
            let weights = SafetensorsCheckpoint::open_dir(path)?;
            (
                TargetNet::Decoder(build_target(&weights, &config, device)?),
                config,
                tokenizer,
            )
        }
    };
    Ok(LoadedTarget {
        rope: config.rope(),
        model,
        config,
        tokenizer,
        path: path.to_path_buf(),
    })
}

pub(crate) fn linear<B: Backend>(
    src: &dyn WeightSource,
    prefix: &str,
    out_features: usize,
    in_features: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>, LoadError> {
    let weight = src.tensor_shaped(&format!("{prefix}.weight"), &[out_features, in_features])?;
    let bias = if bias {
        Some(param_from_host(
            src.tensor_shaped(&format!("{prefix}.bias"), &[out_features])?,
            device,
        ))
    } else {
        None
    };
    Ok(Linear::new(param_from_host(weight, device), bias))
}

pub(crate) fn rms_norm<B: Backend>(
    src: &dyn WeightSource,
    name: &str,
    dim: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, LoadError> {
    Ok(RmsNorm::new(
        param_from_host(src.tensor_shaped(name, &[dim])?, device),
        eps,
    ))
}

/// Whether `path` is a Hugging Face folder of a DeepSeek-V4 model (`config.json` with
/// `model_type = "deepseek_v4"`): deepspec trains its DSpark drafter without running it.
pub fn is_deepseek_v4(path: &Path) -> bool {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| crate::model::v4::V4Config::is_v4(&v))
}

/// Whether `path` is a Gemma4 model folder (its `config.json`'s `model_type`).
pub fn is_gemma4(path: &Path) -> bool {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| crate::model::gemma4::Gemma4Config::is_gemma4(&v))
}

/// Builds the decoder from Hugging Face keys (`model.layers.<i>.self_attn.q_proj.weight`, ...).
pub fn build_target<B: Backend>(
    src: &dyn WeightSource,
    config: &TargetConfig,
    device: &B::Device,
) -> Result<TargetModel<B>, LoadError> {
    let h = config.hidden_size;
    let d = config.head_dim;
    let eps = config.rms_norm_eps;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let qk_norm = |which: &str| -> Result<Option<RmsNorm<B>>, LoadError> {
            match config.family {
                Family::Qwen3 => Ok(Some(rms_norm(
                    src,
                    &format!("{p}.self_attn.{which}.weight"),
                    d,
                    eps,
                    device,
                )?)),
                Family::Llama | Family::DeepseekV4 | Family::Gemma4 => Ok(None),
            }
        };
        let bias = config.attention_bias;
        layers.push(DecoderLayer {
            input_layernorm: rms_norm(src, &format!("{p}.input_layernorm.weight"), h, eps, device)?,
            self_attn: SelfAttention {
                q_proj: linear(
                    src,
                    &format!("{p}.self_attn.q_proj"),
                    config.num_attention_heads * d,
                    h,
                    bias,
                    device,
                )?,
                k_proj: linear(
                    src,
                    &format!("{p}.self_attn.k_proj"),
                    config.num_key_value_heads * d,
                    h,
                    bias,
                    device,
                )?,
                v_proj: linear(
                    src,
                    &format!("{p}.self_attn.v_proj"),
                    config.num_key_value_heads * d,
                    h,
                    bias,
                    device,
                )?,
                o_proj: linear(
                    src,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    config.num_attention_heads * d,
                    false,
                    device,
                )?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
                head_dim: d,
            },
            post_attention_layernorm: rms_norm(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            mlp: Mlp {
                gate_proj: linear(
                    src,
                    &format!("{p}.mlp.gate_proj"),
                    config.intermediate_size,
                    h,
                    false,
                    device,
                )?,
                up_proj: linear(
                    src,
                    &format!("{p}.mlp.up_proj"),
                    config.intermediate_size,
                    h,
                    false,
                    device,
                )?,
                down_proj: linear(
                    src,
                    &format!("{p}.mlp.down_proj"),
                    h,
                    config.intermediate_size,
                    false,
                    device,
                )?,
            },
        });
    }
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(linear(src, "lm_head", config.vocab_size, h, false, device)?)
    };
    Ok(TargetModel {
        embed_tokens: param_from_host(
            src.tensor_shaped("model.embed_tokens.weight", &[config.vocab_size, h])?,
            device,
        ),
        layers,
        norm: rms_norm(src, "model.norm.weight", h, eps, device)?,
        lm_head,
    })
}

/// The config and tokenizer of the target at `path`, without loading its weights (for
/// estimates and checks that must run before any heavy work).
pub fn load_target_meta(path: &Path) -> Result<(TargetConfig, Tok), LoadError> {
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        let file = GgufFile::open(path)?;
        let has_output = file.gguf_tensor_names().any(|n| n == "output.weight");
        Ok((
            TargetConfig::from_gguf(&file, has_output)?,
            Tok::from_gguf(&file)?,
        ))
    } else {
        Ok((
            TargetConfig::from_hf_json(&path.join("config.json"))?,
            Tok::from_hf_dir(path)?,
        ))
    }
}
