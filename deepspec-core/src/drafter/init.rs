//! A fresh drafter for a target (as the reference's `train.py` builds one): the config is the target's config
//! extended with the drafter's fields; embedding and LM head are frozen copies of the
//! target's; every other Linear weight (and the Markov embedding) is drawn from
//! N(0, initializer_range), biases 0, norm weights 1.

use super::config::{Algorithm, DrafterConfig, MarkovKind};
use super::Drafter;
use crate::io::{HostTensor, WeightSource};
use crate::layers::TargetLayerIds;
use crate::model::config::{Family, TargetConfig};
use crate::model::LoadedTarget;
use crate::sampling::Rng;
use crate::LoadError;
use burn::tensor::backend::Backend;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The drafter-specific choices of a new drafter.
#[derive(Debug, Clone, PartialEq)]
pub struct DrafterSpec {
    pub algorithm: Algorithm,
    pub num_draft_layers: usize,
    pub target_layer_ids: TargetLayerIds,
    /// DSpark/DFlash block size; Eagle3 TTT length.
    pub block_size: usize,
    pub mask_token_id: u32,
    pub num_anchors: usize,
    pub markov_rank: usize,
    pub markov_kind: MarkovKind,
    pub confidence_head: bool,
    pub confidence_with_markov: bool,
    pub step_loss_decay: f64,
    /// "float32" or "bfloat16": the dtype checkpoints are written in.
    pub dtype: String,
    pub initializer_range: f64,
    pub seed: u64,
    /// Recorded in Eagle3 configs, as the reference does.
    pub target_model_name_or_path: String,
}

/// The target's config as Hugging Face JSON: its own `config.json` when it has one, else the
/// equivalent fields (GGUF targets).
fn target_json(target_path: &Path, config: &TargetConfig) -> Result<Map<String, Value>, LoadError> {
    let file = target_path.join("config.json");
    if target_path.is_dir() && file.exists() {
        let text = std::fs::read_to_string(&file).map_err(|e| LoadError::io(&file, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::corrupt(&file, format!("not valid JSON: {e}")))?;
        if let Value::Object(map) = value {
            return Ok(map);
        }
    }
    let model_type = match config.family {
        Family::Qwen3 => "qwen3",
        Family::Llama => "llama",
        Family::DeepseekV4 => "deepseek_v4",
        Family::Gemma4 => "gemma4_text",
    };
    let value = json!({
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "initializer_range": 0.02,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids.first(),
    });
    Ok(value.as_object().cloned().unwrap_or_default())
}

/// The drafter's `config.json` for `target`.
pub fn new_config(
    target_path: &Path,
    target: &TargetConfig,
    spec: &DrafterSpec,
) -> Result<DrafterConfig, LoadError> {
    let mut c = target_json(target_path, target)?;
    let gemma4 = target.family == Family::Gemma4;
    if gemma4 {
        // The reference deep-copies the target's text config and extends it; its rotary
        // module still reads `rope_parameters.full_attention`, next to the top-level
        // `rope_type` / `rope_theta` transformers adds when it standardises the dict.
        if let Some(Value::Object(mut text)) = c.get("text_config").cloned() {
            if let Some(version) = c.get("transformers_version") {
                text.insert("transformers_version".into(), version.clone());
            }
            c = text;
        }
        if let Some(Value::Object(rope)) = c.get_mut("rope_parameters") {
            rope.insert("rope_type".into(), json!("default"));
            rope.insert("rope_theta".into(), Value::Null);
        }
        c.insert("target_model_type".into(), json!("gemma4"));
        c.insert("target_text_model_type".into(), json!("gemma4_text"));
    }
    let layers = spec.num_draft_layers;
    c.insert("num_target_layers".into(), json!(target.num_hidden_layers));
    c.insert("num_hidden_layers".into(), json!(layers));
    c.insert("layer_types".into(), json!(vec!["full_attention"; layers]));
    c.insert("tie_word_embeddings".into(), json!(false));
    c.insert("target_layer_ids".into(), json!(spec.target_layer_ids));
    c.insert("dtype".into(), json!(spec.dtype));
    c.insert("initializer_range".into(), json!(spec.initializer_range));
    match spec.algorithm {
        Algorithm::DSpark | Algorithm::DFlash => {
            let arch = if gemma4 {
                "Gemma4DSparkModel"
            } else {
                "Qwen3DSparkModel"
            };
            c.insert("architectures".into(), json!([arch]));
            c.insert("block_size".into(), json!(spec.block_size));
            c.insert("mask_token_id".into(), json!(spec.mask_token_id));
            c.insert("num_anchors".into(), json!(spec.num_anchors));
            c.insert("enable_confidence_head".into(), json!(spec.confidence_head));
            if spec.confidence_head {
                c.insert(
                    "confidence_head_with_markov".into(),
                    json!(spec.confidence_with_markov),
                );
            }
            c.insert("markov_rank".into(), json!(spec.markov_rank));
            if spec.markov_rank > 0 {
                c.insert("markov_head_type".into(), json!(spec.markov_kind.name()));
            }
        }
        Algorithm::Eagle3 => {
            let arch = if gemma4 {
                "Gemma4Eagle3Model"
            } else {
                "Qwen3Eagle3Model"
            };
            c.insert("architectures".into(), json!([arch]));
            c.insert("draft_num_hidden_layers".into(), json!(layers));
            c.insert("ttt_length".into(), json!(spec.block_size));
            c.insert("step_loss_decay".into(), json!(spec.step_loss_decay));
            c.insert(
                "target_model_name_or_path".into(),
                json!(spec.target_model_name_or_path),
            );
        }
    }
    DrafterConfig::from_json(
        &PathBuf::from("<new drafter>/config.json"),
        Value::Object(c),
    )
}

/// Hands out the target's embedding and head, and fresh values for everything else.
struct InitSource {
    origin: PathBuf,
    /// The target's embedding and head; random when absent (synthetic benchmarks).
    embed: Option<HostTensor>,
    head: Option<HostTensor>,
    std: f64,
    rng: std::cell::RefCell<Rng>,
}

impl InitSource {
    fn normal(&self, n: usize) -> Vec<f32> {
        self.rng.borrow_mut().normal_f32(n, self.std)
    }
}

impl WeightSource for InitSource {
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
    fn tensor(&self, name: &str) -> Result<HostTensor, LoadError> {
        Err(LoadError::MissingTensor {
            path: self.origin.clone(),
            tensor: name.into(),
            hint: " (a new drafter's tensors are requested with their shapes)".into(),
        })
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let n: usize = shape.iter().product();
        let data = match name {
            "embed_tokens.weight" if self.embed.is_some() => {
                return Ok(self.embed.clone().unwrap())
            }
            "lm_head.weight" | "head.weight" if self.head.is_some() => {
                return Ok(self.head.clone().unwrap())
            }
            "embed.weight" if self.embed.is_some() => return Ok(self.embed.clone().unwrap()),
            _ if name.ends_with("norm.weight") => vec![1.0; n],
            // Gemma4's per-layer output scale: a buffer of 1 in the reference's drafters.
            _ if name.ends_with("layer_scalar") => vec![1.0; n],
            _ if name.ends_with(".bias") => vec![0.0; n],
            // DeepSeek-V4's mHC and sinks start where transformers' own init puts them:
            // scales 1, biases and sinks 0 (uniform mixing, pre/post weights at σ(0)).
            _ if name.ends_with("_scale") => vec![1.0; n],
            _ if name.ends_with("_base") || name.ends_with("attn_sink") => vec![0.0; n],
            _ => self.normal(n),
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
}

/// A freshly initialised drafter for `target`.
pub fn new_drafter<B: Backend>(
    target: &LoadedTarget<B>,
    spec: &DrafterSpec,
    device: &B::Device,
) -> Result<(Drafter<B>, DrafterConfig), LoadError> {
    let config = new_config(&target.path, &target.config, spec)?;
    let (embed, head) = target.model.embedding_and_head();
    let source = InitSource {
        origin: target.path.clone(),
        embed: Some(embed),
        head: Some(head),
        std: spec.initializer_range,
        rng: std::cell::RefCell::new(Rng::new(spec.seed)),
    };
    let drafter = Drafter::from_source(&source, &config, device)?;
    Ok((drafter, config))
}

/// A freshly initialised drafter for the Gemma4 target folder `target_dir`, whose weights
/// are not loaded (Gemma4 targets do not run here): its config, and the frozen embedding
/// (`model.language_model.embed_tokens.weight`) and head (the embedding when tied, else
/// `lm_head.weight`) read from its safetensors.
pub fn new_gemma4_drafter<B: Backend>(
    target_dir: &Path,
    spec: &DrafterSpec,
    device: &B::Device,
) -> Result<(Drafter<B>, DrafterConfig), LoadError> {
    let target = TargetConfig::from_hf_json(&target_dir.join("config.json"))?;
    let config = new_config(target_dir, &target, spec)?;
    let src = crate::io::safetensors::SafetensorsCheckpoint::open_dir(target_dir)?;
    let shape = [target.vocab_size, target.hidden_size];
    let embed = src.tensor_shaped("model.language_model.embed_tokens.weight", &shape)?;
    // As the target loads it: a stored `lm_head.weight` is the head.
    let head = if src.contains("lm_head.weight") || !target.tie_word_embeddings {
        src.tensor_shaped("lm_head.weight", &shape)?
    } else {
        embed.clone()
    };
    let source = InitSource {
        origin: target_dir.to_path_buf(),
        embed: Some(embed),
        head: Some(head),
        std: spec.initializer_range,
        rng: std::cell::RefCell::new(Rng::new(spec.seed)),
    };
    let drafter = Drafter::from_source(&source, &config, device)?;
    Ok((drafter, config))
}

/// A drafter with random weights throughout (embedding and head included) for a target of
/// `target`'s shape: for throughput measurements without the target's files.
pub fn random_drafter<B: Backend>(
    target: &TargetConfig,
    spec: &DrafterSpec,
    device: &B::Device,
) -> Result<(Drafter<B>, DrafterConfig), LoadError> {
    let config = new_config(Path::new("<synthetic target>"), target, spec)?;
    let source = InitSource {
        origin: PathBuf::from("<synthetic target>"),
        embed: None,
        head: None,
        std: spec.initializer_range,
        rng: std::cell::RefCell::new(Rng::new(spec.seed)),
    };
    let drafter = Drafter::from_source(&source, &config, device)?;
    Ok((drafter, config))
}

/// The `config.json` of a new DeepSeek-V4 DSpark drafter: the target's own config without
/// its `quantization_config` (the drafter is stored unquantized), `compress_ratios` extended
/// by one 0 per stage (sliding-window only, as DeepSeek's published drafter config has it),
/// and the `dspark_*` keys the engines read.
pub fn new_v4_config(target_path: &Path, spec: &DrafterSpec) -> Result<DrafterConfig, LoadError> {
    new_v4_config_from(&target_path.join("config.json"), spec)
}

/// [`new_v4_config`] from the target's `config.json` at `file`.
pub fn new_v4_config_from(file: &Path, spec: &DrafterSpec) -> Result<DrafterConfig, LoadError> {
    let file = file.to_path_buf();
    let text = std::fs::read_to_string(&file).map_err(|e| LoadError::io(&file, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| LoadError::corrupt(&file, format!("not valid JSON: {e}")))?;
    let Value::Object(mut c) = value else {
        return Err(LoadError::corrupt(&file, "config is not a JSON object"));
    };
    let stages = spec.target_layer_ids.len();
    if spec.num_draft_layers != stages {
        return Err(LoadError::field(
            &file,
            "model.num_draft_layers",
            format!(
                "a DeepSeek-V4 DSpark drafter has one stage per tapped layer: the recipe asks for {} draft layers and {stages} target_layer_ids; make them equal",
                spec.num_draft_layers
            ),
        ));
    }
    if spec.algorithm != Algorithm::DSpark || spec.markov_kind != MarkovKind::Vanilla {
        return Err(LoadError::field(
            &file,
            "model.algorithm",
            "DeepSeek-V4 targets take `dspark` drafters with a vanilla Markov head (what SGLang and vLLM load)".to_string(),
        ));
    }
    c.remove("quantization_config");
    let layers = c["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    if let Some(Value::Array(ratios)) = c.get_mut("compress_ratios") {
        if ratios.len() == layers {
            ratios.extend(std::iter::repeat_n(json!(0), stages));
        }
    }
    c.insert("dspark_block_size".into(), json!(spec.block_size));
    c.insert("dspark_noise_token_id".into(), json!(spec.mask_token_id));
    c.insert(
        "dspark_target_layer_ids".into(),
        json!(spec.target_layer_ids),
    );
    c.insert("dspark_markov_rank".into(), json!(spec.markov_rank));
    c.insert("enable_confidence_head".into(), json!(spec.confidence_head));
    c.insert(
        "confidence_head_with_markov".into(),
        json!(spec.confidence_head && spec.confidence_with_markov),
    );
    c.insert("n_mtp_layers".into(), json!(stages));
    c.insert("num_anchors".into(), json!(spec.num_anchors));
    c.insert("dtype".into(), json!(spec.dtype));
    DrafterConfig::from_json(&file, Value::Object(c))
}

/// A fresh DeepSeek-V4 DSpark drafter for the V4 target folder `target_path`: its
/// `config.json`, and its `embed.weight` and `head.weight` (the only target tensors read:
/// bf16, or FP8 with block scales, from `model.safetensors` or the shards an index names).
pub fn new_v4_drafter<B: Backend>(
    target_path: &Path,
    spec: &DrafterSpec,
    device: &B::Device,
) -> Result<(Drafter<B>, DrafterConfig), LoadError> {
    let config = new_v4_config(target_path, spec)?;
    let weights = crate::io::safetensors::SafetensorsCheckpoint::open_dir(target_path)?;
    let (embed, head) = (
        weights.tensor("embed.weight")?,
        weights.tensor("head.weight")?,
    );
    let source = InitSource {
        origin: target_path.to_path_buf(),
        embed: Some(embed),
        head: Some(head),
        std: spec.initializer_range,
        rng: std::cell::RefCell::new(Rng::new(spec.seed)),
    };
    let drafter = Drafter::from_source(&source, &config, device)?;
    Ok((drafter, config))
}
