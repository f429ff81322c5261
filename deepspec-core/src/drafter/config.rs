//! A drafter's `config.json`: the target's config deep-copied and extended with the drafter's
//! fields (the reference's `save_pretrained` output). The whole JSON object is kept so a save writes back exactly
//! what was read; typed accessors validate what the model needs.

use crate::drafter::dspark_v4::DSparkV4Keys;
use crate::layers::TargetLayerIds;
use crate::model::config::TargetConfig;
use crate::model::v4::V4Config;
use crate::LoadError;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `Qwen3DSparkModel` with a Markov head and/or confidence head.
    DSpark,
    /// `Qwen3DSparkModel` with `markov_rank = 0` and no confidence head.
    DFlash,
    /// `Qwen3Eagle3Model`.
    Eagle3,
}

impl Algorithm {
    /// A recipe's `model.algorithm`: `dspark`, `dflash` or `eagle3`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "dspark" => Some(Algorithm::DSpark),
            "dflash" => Some(Algorithm::DFlash),
            "eagle3" => Some(Algorithm::Eagle3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::DSpark => "dspark",
            Algorithm::DFlash => "dflash",
            Algorithm::Eagle3 => "eagle3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkovKind {
    Vanilla,
    Gated,
    Rnn,
}

impl MarkovKind {
    /// `markov_head_type` as recipes and configs write it, in any case (the reference's
    /// configs say `vanilla`, some hand-written ones `Vanilla`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "vanilla" => Some(MarkovKind::Vanilla),
            "gated" => Some(MarkovKind::Gated),
            "rnn" => Some(MarkovKind::Rnn),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MarkovKind::Vanilla => "vanilla",
            MarkovKind::Gated => "gated",
            MarkovKind::Rnn => "rnn",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrafterConfig {
    pub path: PathBuf,
    pub json: Map<String, Value>,
    pub algorithm: Algorithm,
    /// The architecture fields shared with the target (sizes, rope, eps).
    pub base: TargetConfig,
    /// Checked against `num_target_layers` at load; [`DrafterConfig::check_target`] checks
    /// that count against the target's.
    pub target_layer_ids: TargetLayerIds,
    pub num_target_layers: usize,
    /// DSpark/DFlash block size (Eagle3: the TTT length).
    pub block_size: usize,
    pub mask_token_id: Option<u32>,
    pub num_anchors: usize,
    pub markov_rank: usize,
    pub markov_kind: MarkovKind,
    pub confidence_head: bool,
    pub confidence_with_markov: bool,
    pub step_loss_decay: f64,
    /// `dtype` of the stored tensors ("float32" or "bfloat16").
    pub dtype: String,
    /// A DeepSeek-V4 DSpark drafter: the target's V4 architecture and the drafter's own keys.
    pub v4: Option<(V4Config, DSparkV4Keys)>,
    /// A Gemma4 drafter (`model_type: gemma4_text`): the target's Gemma4 settings, with the
    /// drafter's own layer count.
    pub gemma4: Option<crate::model::gemma4::Gemma4Config>,
}

impl DrafterConfig {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::corrupt(path, format!("not valid JSON: {e}")))?;
        Self::from_json(path, json)
    }

    pub fn from_json(path: &Path, json: Value) -> Result<Self, LoadError> {
        let obj = json
            .as_object()
            .ok_or_else(|| LoadError::corrupt(path, "config is not a JSON object"))?
            .clone();
        let field = |key: &str, detail: &str| LoadError::field(path, key, detail.to_string());
        if V4Config::is_v4(&json) {
            return Self::from_v4_json(path, json, obj);
        }
        let arch = obj
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                field(
                    "architectures",
                    "missing; expected [\"Qwen3DSparkModel\"] or [\"Qwen3Eagle3Model\"]",
                )
            })?
            .to_string();
        let uint = |key: &str, default: Option<u64>| -> Result<u64, LoadError> {
            match obj.get(key) {
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| field(key, "is not an unsigned integer")),
                None => default.ok_or_else(|| field(key, "is missing")),
            }
        };
        let signed_ids: Vec<i64> = obj
            .get("target_layer_ids")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_i64).collect())
            .ok_or_else(|| field("target_layer_ids", "missing or not a list of integers"))?;
        let base = TargetConfig::from_hf_value(path, &json)?;
        let num_target_layers = uint("num_target_layers", None)? as usize;
        let target_layer_ids = TargetLayerIds::from_signed(&signed_ids)
            .and_then(|ids| ids.check(num_target_layers).map(|()| ids))
            .map_err(|e| {
                field(
                    "target_layer_ids",
                    &format!("{e} (num_target_layers = {num_target_layers})"),
                )
            })?;
        let dtype = obj
            .get("dtype")
            .or(obj.get("torch_dtype"))
            .and_then(Value::as_str)
            .unwrap_or("bfloat16")
            .to_string();
        let mut config = DrafterConfig {
            path: path.to_path_buf(),
            algorithm: Algorithm::DFlash,
            base,
            target_layer_ids,
            num_target_layers,
            block_size: 0,
            mask_token_id: None,
            num_anchors: 0,
            markov_rank: 0,
            markov_kind: MarkovKind::Vanilla,
            confidence_head: false,
            confidence_with_markov: false,
            step_loss_decay: 0.8,
            dtype,
            json: obj.clone(),
            v4: None,
            gemma4: None,
        };
        if crate::model::gemma4::Gemma4Config::is_gemma4(&json) {
            config.gemma4 = Some(crate::model::gemma4::Gemma4Config::from_value(path, &json)?);
        }
        match arch.as_str() {
            "Qwen3DSparkModel" | "Gemma4DSparkModel" => {
                config.block_size = uint("block_size", None)? as usize;
                config.mask_token_id = Some(uint("mask_token_id", None)? as u32);
                config.num_anchors = uint("num_anchors", Some(512))? as usize;
                config.markov_rank = uint("markov_rank", Some(0))? as usize;
                config.confidence_head = obj
                    .get("enable_confidence_head")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                config.confidence_with_markov = config.confidence_head
                    && obj
                        .get("confidence_head_with_markov")
                        .and_then(Value::as_bool)
                        .unwrap_or(true);
                if config.markov_rank > 0 {
                    let kind = obj
                        .get("markov_head_type")
                        .and_then(Value::as_str)
                        .unwrap_or("vanilla");
                    config.markov_kind = MarkovKind::from_name(kind).ok_or_else(|| {
                        field(
                            "markov_head_type",
                            &format!("`{kind}` is not one of vanilla, gated, rnn"),
                        )
                    })?;
                }
                if config.confidence_with_markov && config.markov_rank == 0 {
                    return Err(field(
                        "confidence_head_with_markov",
                        "needs a Markov head (markov_rank > 0)",
                    ));
                }
                config.algorithm = if config.markov_rank > 0 || config.confidence_head {
                    Algorithm::DSpark
                } else {
                    Algorithm::DFlash
                };
            }
            "Qwen3Eagle3Model" | "Eagle3DraftModel" | "Gemma4Eagle3Model" => {
                config.algorithm = Algorithm::Eagle3;
                config.block_size = uint("ttt_length", Some(7))? as usize;
                config.step_loss_decay = obj
                    .get("step_loss_decay")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.8);
                if config.base.num_hidden_layers != 1 {
                    return Err(field(
                        "num_hidden_layers",
                        "Eagle3 drafters have exactly 1 layer",
                    ));
                }
            }
            other => {
                return Err(field(
                    "architectures",
                    &format!("`{other}` is not supported (Qwen3DSparkModel, Qwen3Eagle3Model, Gemma4DSparkModel, Gemma4Eagle3Model)"),
                ))
            }
        }
        Ok(config)
    }

    /// A DeepSeek-V4 drafter's config: the target's `config.json` with the keys SGLang's and
    /// vLLM's DSpark loaders read (`dspark_block_size`, `dspark_noise_token_id`,
    /// `dspark_target_layer_ids`, `dspark_markov_rank`, `enable_confidence_head`,
    /// `confidence_head_with_markov`, `n_mtp_layers`). One stage per tapped layer, as SGLang
    /// builds it.
    fn from_v4_json(path: &Path, json: Value, obj: Map<String, Value>) -> Result<Self, LoadError> {
        let field = |key: &str, detail: String| LoadError::field(path, key, detail);
        let v4 = V4Config::from_json(path, &json)?;
        let base = TargetConfig::from_hf_value(path, &json)?;
        let uint = |key: &str| -> Result<usize, LoadError> {
            obj.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    field(
                        key,
                        "missing or not an unsigned integer (a DeepSeek-V4 DSpark drafter config needs dspark_block_size, dspark_noise_token_id, dspark_target_layer_ids, dspark_markov_rank)".into(),
                    )
                })
        };
        let signed_ids: Vec<i64> = obj
            .get("dspark_target_layer_ids")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_i64).collect())
            .ok_or_else(|| {
                field(
                    "dspark_target_layer_ids",
                    "missing or not a list of integers".into(),
                )
            })?;
        let target_layer_ids = TargetLayerIds::from_signed(&signed_ids)
            .and_then(|ids| ids.check_including_last(v4.num_hidden_layers).map(|()| ids))
            .map_err(|e| {
                field(
                    "dspark_target_layer_ids",
                    format!("{e} (num_hidden_layers = {})", v4.num_hidden_layers),
                )
            })?;
        let markov_rank = uint("dspark_markov_rank")?;
        let confidence_head = obj
            .get("enable_confidence_head")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let confidence_with_markov = confidence_head
            && obj
                .get("confidence_head_with_markov")
                .and_then(Value::as_bool)
                .unwrap_or(markov_rank > 0);
        if confidence_with_markov && markov_rank == 0 {
            return Err(field(
                "confidence_head_with_markov",
                "needs a Markov head (dspark_markov_rank > 0)".into(),
            ));
        }
        let num_stages = target_layer_ids.len();
        if let Some(n) = obj.get("n_mtp_layers").and_then(Value::as_u64) {
            if n as usize != num_stages {
                return Err(field(
                    "n_mtp_layers",
                    format!(
                        "{n} stages, but dspark_target_layer_ids has {num_stages} entries; SGLang builds one stage per tapped layer, so the two must agree"
                    ),
                ));
            }
        }
        let dtype = obj
            .get("dtype")
            .or(obj.get("torch_dtype"))
            .and_then(Value::as_str)
            .unwrap_or("bfloat16")
            .to_string();
        let mask = uint("dspark_noise_token_id")?;
        if mask >= v4.vocab_size {
            return Err(field(
                "dspark_noise_token_id",
                format!("{mask} is not below vocab_size ({})", v4.vocab_size),
            ));
        }
        Ok(DrafterConfig {
            path: path.to_path_buf(),
            algorithm: Algorithm::DSpark,
            num_target_layers: v4.num_hidden_layers,
            target_layer_ids,
            block_size: uint("dspark_block_size")?,
            mask_token_id: Some(mask as u32),
            num_anchors: obj
                .get("num_anchors")
                .and_then(Value::as_u64)
                .unwrap_or(512) as usize,
            markov_rank,
            markov_kind: MarkovKind::Vanilla,
            confidence_head,
            confidence_with_markov,
            step_loss_decay: 0.8,
            dtype,
            base,
            json: obj,
            v4: Some((
                v4,
                DSparkV4Keys {
                    num_stages,
                    markov_rank,
                    confidence_head,
                    confidence_with_markov,
                },
            )),
            gemma4: None,
        })
    }

    /// Width of the concatenated tapped features: `len(target_layer_ids) * hidden_size`.
    pub fn context_width(&self) -> usize {
        self.target_layer_ids.len() * self.base.hidden_size
    }

    /// Checks that this drafter was made for `target` (hidden size, vocabulary, layer count).
    pub fn check_target(&self, target: &TargetConfig, target_path: &Path) -> Result<(), LoadError> {
        let mismatch = |what: &str, ours: usize, theirs: usize| {
            LoadError::field(
                &self.path,
                what,
                format!(
                    "the drafter has {what} = {ours} but the target {} has {theirs}; this drafter was trained for another target",
                    target_path.display()
                ),
            )
        };
        if self.base.hidden_size != target.hidden_size {
            return Err(mismatch(
                "hidden_size",
                self.base.hidden_size,
                target.hidden_size,
            ));
        }
        if self.base.vocab_size != target.vocab_size {
            return Err(mismatch(
                "vocab_size",
                self.base.vocab_size,
                target.vocab_size,
            ));
        }
        if self.num_target_layers != target.num_hidden_layers {
            return Err(mismatch(
                "num_target_layers",
                self.num_target_layers,
                target.num_hidden_layers,
            ));
        }
        Ok(())
    }
}
