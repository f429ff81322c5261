//! TOML recipes: the one file that names a run's target, data and settings.
//!
//! Only what `deepspec prepare` needs is defined yet (issue #4); the full schema (drafter,
//! training, evaluation, `--set` overrides) lands with issue #5. Section and field names follow
//! the reference's config where it has one (`[model] target_model_name_or_path`,
//! `target_layer_ids`; `[data] chat_template`, `max_length`, `min_loss_tokens`); `[prepare]` is
//! ours. Unknown keys are errors that name the key, so a typo never silently falls back to a
//! default.

use crate::cache::HiddenDtype;
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
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub prepare: PrepareSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A `.gguf` file or a Hugging Face folder, relative to the current directory.
    pub target_model_name_or_path: PathBuf,
    /// Decoder layers whose outputs are cached, strictly increasing, each below the last layer.
    pub target_layer_ids: Vec<usize>,
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
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            chat_template: None,
            max_length: default_max_length(),
            min_loss_tokens: default_min_loss_tokens(),
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
        let recipe: Recipe = toml::from_str(text).map_err(|e| RecipeError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    fn validate(&self, path: &Path) -> Result<(), RecipeError> {
        let invalid = |field: &str, detail: String| RecipeError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            detail,
        };
        let layers = &self.model.target_layer_ids;
        if layers.is_empty() {
            return Err(invalid(
                "model.target_layer_ids",
                "must list at least one layer".into(),
            ));
        }
        if layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(
                "model.target_layer_ids",
                format!("{layers:?} must be strictly increasing"),
            ));
        }
        if let Some(name) = &self.data.chat_template {
            if crate::io::chat::TurnFormat::by_name(name).is_none() {
                return Err(invalid(
                    "data.chat_template",
                    format!("`{name}` is not one of qwen, chatml, gemma4, gemma"),
                ));
            }
        }
        if self.data.max_length == 0 {
            return Err(invalid("data.max_length", "must be positive".into()));
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
        Ok(())
    }

    /// Checks the layer ids against the loaded target: each must be a decoder layer other than
    /// the last (the last layer's output is the final hidden state, cached separately).
    pub fn check_layers(&self, path: &Path, num_layers: usize) -> Result<(), RecipeError> {
        if let Some(&bad) = self
            .model
            .target_layer_ids
            .iter()
            .find(|&&l| l + 1 >= num_layers)
        {
            return Err(RecipeError::Invalid {
                path: path.to_path_buf(),
                field: "model.target_layer_ids".into(),
                detail: format!(
                    "layer {bad} is out of range: the target has {num_layers} decoder layers, so ids must be below {}",
                    num_layers.saturating_sub(1)
                ),
            });
        }
        Ok(())
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
}
