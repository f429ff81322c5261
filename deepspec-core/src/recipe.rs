//! TOML recipes: the one file that names a run's target, data and settings.
//!
//! Only what `deepspec prepare` needs is defined yet (issue #4); the full schema (drafter,
//! training, evaluation, `--set` overrides) lands with issue #5. Section and field names follow
//! the reference's config where it has one (`[model] target_model_name_or_path`,
//! `target_layer_ids`; `[data] chat_template`, `max_length`, `min_loss_tokens`); `[prepare]` is
//! ours. Unknown keys are errors that name the key, so a typo never silently falls back to a
//! default.

use crate::backend::Precision;
use crate::cache::HiddenDtype;
use crate::drafter::{Algorithm, MarkovKind};
use crate::layers::TargetLayerIds;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path}: field `{field}`: {detail}")]
    Invalid {
        path: PathBuf,
        field: String,
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default = "default_project")]
    pub project_name: String,
    /// Names the run (the reference's checkpoint folder name).
    #[serde(default)]
    pub exp_name: String,
    /// Seeds initialisation and anchor sampling (reference: 42 DSpark/DFlash, 0 Eagle3).
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub prepare: PrepareSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub eval: EvalSection,
}

fn default_project() -> String {
    "deepspec".into()
}

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A `.gguf` file or a Hugging Face folder, relative to the current directory.
    pub target_model_name_or_path: PathBuf,
    /// The target's `config.json` when the target folder is not on this machine: `train
    /// --dry-run` plans from it (DeepSeek-V4 recipes ship the published architectures in
    /// `recipes/configs/`). The target folder's own `config.json` wins when it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_config: Option<PathBuf>,
    /// Decoder layers whose outputs are cached, strictly increasing, each below the last layer
    /// (checked against the target by [`Recipe::check_layers`]).
    pub target_layer_ids: TargetLayerIds,
    /// `dspark`, `dflash` or `eagle3` (the reference picks this through `train.trainer_cls`
    /// and the model fields).
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    #[serde(default = "default_draft_layers")]
    pub num_draft_layers: usize,
    /// The frozen embedding row that fills block slots 1..B-1 (DSpark/DFlash).
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    #[serde(default = "default_num_anchors")]
    pub num_anchors: usize,
    /// 0 = no Markov head (DFlash).
    #[serde(default)]
    pub markov_rank: usize,
    #[serde(default = "default_markov_type")]
    pub markov_head_type: String,
    /// > 0 enables the confidence head.
    #[serde(default)]
    pub confidence_head_alpha: f64,
    #[serde(default = "default_true")]
    pub confidence_head_with_markov: bool,
    #[serde(default = "default_decay")]
    pub loss_decay_gamma: f64,
    #[serde(default = "default_one")]
    pub ce_loss_alpha: f64,
    #[serde(default)]
    pub l1_loss_alpha: f64,
    /// Eagle3 training-time-test steps.
    #[serde(default = "default_block_size")]
    pub ttt_length: usize,
    #[serde(default = "default_step_decay")]
    pub step_loss_decay: f64,
    #[serde(default = "default_eagle_layers")]
    pub draft_num_hidden_layers: usize,
}

fn default_algorithm() -> String {
    "dspark".into()
}
fn default_block_size() -> usize {
    7
}
fn default_draft_layers() -> usize {
    5
}
fn default_num_anchors() -> usize {
    512
}
fn default_markov_type() -> String {
    "vanilla".into()
}
fn default_true() -> bool {
    true
}
fn default_decay() -> f64 {
    4.0
}
fn default_one() -> f64 {
    1.0
}
fn default_step_decay() -> f64 {
    0.8
}
fn default_eagle_layers() -> usize {
    1
}

/// Optimisation settings; names and defaults are the reference's (`config/*.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Accepted for compatibility (`Qwen3DSparkTrainer`, `Qwen3Eagle3Trainer`, ...); the
    /// algorithm comes from `model.algorithm`.
    pub trainer_cls: Option<String>,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    /// `bf16`, `fp16` or `fp32`. On CPU deepspec computes in f32 whatever this says.
    pub precision: String,
    pub local_batch_size: usize,
    pub global_batch_size: usize,
    pub num_train_epochs: usize,
    pub max_train_steps: Option<usize>,
    pub max_grad_norm: f64,
    /// Accepted for compatibility: deepspec's data parallel replicates the drafter on
    /// every rank (`no_shard`); see docs/distributed.md.
    pub sharding_strategy: String,
    /// Data parallel: the dtype gradients are summed in across ranks, `fp32` (exact up to
    /// summation order) or `bf16` (half the bytes, as the reference's FSDP reduce).
    pub allreduce_dtype: String,
    /// Data parallel: gradient elements per all-reduce, in MiB of f32.
    pub allreduce_bucket_mb: usize,
    /// Data parallel: seconds a rank waits for the others (to join, or in one all-reduce)
    /// before every rank stops with an error.
    pub dist_timeout_s: u64,
    /// Accepted for compatibility; no effect.
    pub torch_compile: bool,
    /// Keep only the newest N `step_<n>` checkpoints (0 keeps all).
    pub keep_last: usize,
    /// Tokens per LM-head chunk in the loss (unset: sized so one chunk's logits stay under
    /// 256 MiB). Changes memory and speed, not the maths.
    pub head_chunk_tokens: Option<usize>,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            trainer_cls: None,
            lr: 6.0e-4,
            warmup_ratio: 0.04,
            weight_decay: 0.0,
            precision: "bf16".into(),
            local_batch_size: 1,
            global_batch_size: 512,
            num_train_epochs: 10,
            max_train_steps: None,
            max_grad_norm: 1.0,
            sharding_strategy: "no_shard".into(),
            allreduce_dtype: "fp32".into(),
            allreduce_bucket_mb: 25,
            dist_timeout_s: 300,
            torch_compile: false,
            keep_last: 3,
            head_chunk_tokens: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    pub logging_steps: usize,
    pub checkpointing_steps: usize,
    /// Default: `<--out>`.
    pub checkpoint_dir: Option<PathBuf>,
    /// Default: `<--out>/tensorboard`.
    pub tensorboard_dir: Option<PathBuf>,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            logging_steps: 10,
            checkpointing_steps: 3000,
            checkpoint_dir: None,
            tensorboard_dir: None,
        }
    }
}

/// Evaluation defaults (ours; the reference passes them on its command line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub confidence_threshold: f64,
    pub seed: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            temperature: 1.0,
            max_new_tokens: 2048,
            confidence_threshold: 0.0,
            seed: 980406,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Turn format for the loss mask (`qwen`, `chatml`, `gemma4`, `gemma`); detected from the
    /// model's chat template when absent.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Samples are truncated to this many tokens (the first ones are kept).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Samples with fewer trained tokens than this (after truncation) are dropped.
    #[serde(default = "default_min_loss_tokens")]
    pub min_loss_tokens: usize,
    /// The prepared cache (`deepspec train --cache` overrides it).
    #[serde(default)]
    pub target_cache_path: Option<PathBuf>,
    /// Accepted for compatibility (the reference's loader workers); deepspec prefetches on
    /// one thread.
    #[serde(default = "default_workers")]
    pub num_workers: usize,
}

fn default_workers() -> usize {
    4
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            chat_template: None,
            max_length: default_max_length(),
            min_loss_tokens: default_min_loss_tokens(),
            target_cache_path: None,
            num_workers: default_workers(),
        }
    }
}

fn default_max_length() -> usize {
    4096
}

fn default_min_loss_tokens() -> usize {
    14
}

/// Answer regeneration and cache layout (ours; the reference used an external server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareSection {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1 keeps all tokens.
    pub top_p: f32,
    /// 0 keeps all tokens.
    pub top_k: usize,
    /// Per answer (each assistant turn).
    pub max_new_tokens: usize,
    /// Extra stop token strings besides the tokenizer's end-of-sequence ids.
    pub stop_tokens: Vec<String>,
    pub seed: u64,
    /// Rows per generation and target-pass batch.
    pub batch_size: usize,
    /// Upper bound of one Parquet shard's payload, in bytes.
    pub shard_max_bytes: u64,
    /// Also close a shard before every prompt index that is a multiple of this (a multiple
    /// of `batch_size`). Needed by `prepare --shard i/n`, whose part boundaries fall on such
    /// indices; a single run with the same value writes the same shards as the merged parts.
    pub shard_prompts: Option<usize>,
    pub hidden_dtype: HiddenDtype,
    /// Longest user prompt `--self-instruct` lets the target write, in tokens.
    pub self_instruct_max_tokens: usize,
    /// Render generation prompts with `enable_thinking` = this (Qwen3 templates; the paper
    /// regenerated in non-thinking mode).
    pub enable_thinking: bool,
}

impl Default for PrepareSection {
    fn default() -> Self {
        PrepareSection {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
            max_new_tokens: 1024,
            stop_tokens: Vec::new(),
            seed: 0,
            batch_size: 8,
            shard_max_bytes: 1 << 30,
            shard_prompts: None,
            hidden_dtype: HiddenDtype::Bf16,
            self_instruct_max_tokens: 64,
            enable_thinking: false,
        }
    }
}

impl Recipe {
    /// Reads and checks a recipe file.
    pub fn load(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses recipe text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, RecipeError> {
        Self::parse_with(path, text, &[])
    }

    /// Reads a recipe and applies `--set section.key=value` overrides.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with(path, &text, overrides)
    }

    /// Parses recipe text with overrides applied on top. An override's value is read as TOML
    /// (`3`, `1e-4`, `true`, `[1, 2]`, `"text"`), and as a plain string when it is not TOML.
    pub fn parse_with(path: &Path, text: &str, overrides: &[String]) -> Result<Self, RecipeError> {
        let parse_err = |detail: String| RecipeError::Parse {
            path: path.to_path_buf(),
            detail,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        for item in overrides {
            let (key, raw) = item.split_once('=').ok_or_else(|| RecipeError::Invalid {
                path: path.to_path_buf(),
                field: item.clone(),
                detail: "an override is `section.key=value`".into(),
            })?;
            let key = key.trim();
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let mut parts: Vec<&str> = key.split('.').collect();
            let leaf = parts.pop().unwrap_or_default();
            let mut node = &mut table;
            for part in parts {
                node = node
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| RecipeError::Invalid {
                        path: path.to_path_buf(),
                        field: key.to_string(),
                        detail: format!("`{part}` is a value, not a section"),
                    })?;
            }
            // `none`/`null` unset an optional field (the reference's `max_train_steps=None`).
            if matches!(raw.trim(), "none" | "None" | "null") {
                node.remove(leaf);
            } else {
                node.insert(leaf.to_string(), value);
            }
        }
        let recipe: Recipe = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| value_error(path, e))?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// The resolved recipe as TOML (every default filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a recipe serializes")
    }

    fn validate(&self, path: &Path) -> Result<(), RecipeError> {
        let invalid = |field: &str, detail: String| RecipeError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            detail,
        };
        if let Some(name) = &self.data.chat_template {
            if crate::io::chat::TurnFormat::by_name(name).is_none() {
                return Err(invalid(
                    "data.chat_template",
                    format!(
                        "`{name}` is not one of {}",
                        crate::io::chat::TurnFormat::names()
                    ),
                ));
            }
        }
        if self.data.max_length == 0 {
            return Err(invalid("data.max_length", "must be positive".into()));
        }
        let m = &self.model;
        match Algorithm::from_name(&m.algorithm) {
            Some(Algorithm::DSpark | Algorithm::DFlash) => {
                if m.block_size == 0 {
                    return Err(invalid("model.block_size", "must be positive".into()));
                }
                if m.num_anchors == 0 {
                    return Err(invalid("model.num_anchors", "must be positive".into()));
                }
            }
            Some(Algorithm::Eagle3) => {
                if m.draft_num_hidden_layers != 1 {
                    return Err(invalid(
                        "model.draft_num_hidden_layers",
                        "Eagle3 drafters have exactly one layer".into(),
                    ));
                }
                if m.ttt_length == 0 {
                    return Err(invalid("model.ttt_length", "must be positive".into()));
                }
            }
            None => {
                return Err(invalid(
                    "model.algorithm",
                    format!("`{}` is not one of dspark, dflash, eagle3", m.algorithm),
                ))
            }
        }
        if MarkovKind::from_name(&m.markov_head_type).is_none() {
            return Err(invalid(
                "model.markov_head_type",
                format!("`{}` is not one of vanilla, gated, rnn", m.markov_head_type),
            ));
        }
        let t = &self.train;
        if Precision::from_name(&t.precision).is_none() {
            return Err(invalid(
                "train.precision",
                format!("`{}` is not one of bf16, fp16, fp32", t.precision),
            ));
        }
        if !matches!(t.allreduce_dtype.as_str(), "fp32" | "bf16") {
            return Err(invalid(
                "train.allreduce_dtype",
                format!("`{}` is not one of fp32, bf16", t.allreduce_dtype),
            ));
        }
        if t.allreduce_bucket_mb == 0 || t.dist_timeout_s == 0 {
            return Err(invalid(
                "train.allreduce_bucket_mb",
                "train.allreduce_bucket_mb and train.dist_timeout_s must be positive".into(),
            ));
        }
        if t.local_batch_size == 0 || !t.global_batch_size.is_multiple_of(t.local_batch_size) {
            return Err(invalid(
                "train.global_batch_size",
                format!(
                    "{} must be a positive multiple of train.local_batch_size ({})",
                    t.global_batch_size, t.local_batch_size
                ),
            ));
        }
        if t.lr.is_nan() || t.lr <= 0.0 {
            return Err(invalid("train.lr", format!("{} must be positive", t.lr)));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(invalid(
                "train.warmup_ratio",
                format!("{} is outside [0, 1)", t.warmup_ratio),
            ));
        }
        let p = &self.prepare;
        if !(0.0..=2.0).contains(&p.temperature) {
            return Err(invalid(
                "prepare.temperature",
                format!("{} is outside [0, 2]", p.temperature),
            ));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(invalid(
                "prepare.top_p",
                format!("{} is outside (0, 1]", p.top_p),
            ));
        }
        if p.max_new_tokens == 0 {
            return Err(invalid("prepare.max_new_tokens", "must be positive".into()));
        }
        if p.batch_size == 0 {
            return Err(invalid("prepare.batch_size", "must be positive".into()));
        }
        if p.shard_max_bytes == 0 {
            return Err(invalid(
                "prepare.shard_max_bytes",
                "must be positive".into(),
            ));
        }
        if let Some(n) = p.shard_prompts {
            if n == 0 || !n.is_multiple_of(p.batch_size) {
                return Err(invalid(
                    "prepare.shard_prompts",
                    format!(
                        "{n} must be a positive multiple of prepare.batch_size ({}), so batches never straddle a part boundary",
                        p.batch_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the layer ids against the loaded target: each must be a decoder layer other than
    /// the last (the last layer's output is the final hidden state, cached separately).
    pub fn check_layers(&self, path: &Path, num_layers: usize) -> Result<(), RecipeError> {
        self.model
            .target_layer_ids
            .check(num_layers)
            .map_err(|e| RecipeError::Invalid {
                path: path.to_path_buf(),
                field: "model.target_layer_ids".into(),
                detail: e.to_string(),
            })
    }
}

/// A recipe value serde refused. toml names where with a trailing "in `section.key`" line;
/// that becomes the error's field, so every recipe error reads `file: field `key`: detail`.
fn value_error(path: &Path, e: toml::de::Error) -> RecipeError {
    let text = e.to_string();
    if let Some((detail, place)) = text.trim_end().rsplit_once("\nin `") {
        if let Some(field) = place.strip_suffix('`') {
            return RecipeError::Invalid {
                path: path.to_path_buf(),
                field: field.to_string(),
                detail: detail.trim().to_string(),
            };
        }
    }
    RecipeError::Parse {
        path: path.to_path_buf(),
        detail: text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[model]\ntarget_model_name_or_path = \"m.gguf\"\ntarget_layer_ids = [1, 2]\n";

    #[test]
    fn minimal_recipe_takes_defaults() {
        let r = Recipe::parse(Path::new("r.toml"), MINIMAL).unwrap();
        assert_eq!(r.data.min_loss_tokens, 14);
        assert_eq!(r.prepare.hidden_dtype, HiddenDtype::Bf16);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{MINIMAL}[prepare]\ntemprature = 0.5\n");
        let err = Recipe::parse(Path::new("r.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("temprature") && err.contains("r.toml"),
            "{err}"
        );
    }

    #[test]
    fn layers_must_increase_and_fit_the_model() {
        let text = MINIMAL.replace("[1, 2]", "[2, 1]");
        let err = Recipe::parse(Path::new("r.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.target_layer_ids"), "{err}");
        let r = Recipe::parse(Path::new("r.toml"), MINIMAL).unwrap();
        assert!(r.check_layers(Path::new("r.toml"), 3).is_err());
        assert!(r.check_layers(Path::new("r.toml"), 4).is_ok());
    }

    #[test]
    fn a_negative_layer_id_names_the_field() {
        let text = MINIMAL.replace("[1, 2]", "[-1, 2]");
        let err = Recipe::parse(Path::new("r.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.toml")
                && err.contains("field `model.target_layer_ids`")
                && err.contains("layer -1 is negative"),
            "{err}"
        );
        // The same through an override.
        let err = Recipe::parse_with(
            Path::new("r.toml"),
            MINIMAL,
            &["model.target_layer_ids=[0, -3]".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("field `model.target_layer_ids`") && err.contains("-3"),
            "{err}"
        );
    }

    #[test]
    fn a_layer_id_past_the_target_names_the_field_and_the_range() {
        let text = MINIMAL.replace("[1, 2]", "[1, 30]");
        let r = Recipe::parse(Path::new("r.toml"), &text).unwrap();
        let err = r
            .check_layers(Path::new("r.toml"), 30)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.toml")
                && err.contains("field `model.target_layer_ids`")
                && err.contains("layer 30")
                && err.contains("30 decoder layers")
                && err.contains("0..=28"),
            "{err}"
        );
    }

    #[test]
    fn a_wrongly_typed_value_names_its_field() {
        let text = format!("{MINIMAL}[train]\nlr = \"fast\"\n");
        let err = Recipe::parse(Path::new("r.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("r.toml: field `train.lr`"), "{err}");
    }
}
