//! A training run as typed parts, translated once from a recipe (ripgrep's `LowArgs` →
//! `HiArgs`): the CLI reads flags and the recipe, [`TrainPlan::from_recipe`] turns them into
//! the drafter to build, the trainer's settings, the cache and output folders and the compute
//! precision; [`TrainPlan::open_cache`] and [`TrainPlan::check_target`] check the cache and
//! the target against the recipe when they are opened. Nothing downstream reads a recipe
//! string.

use crate::dist::DistSettings;
use crate::loss::dspark::DSparkLossConfig;
use crate::trainer::TrainSettings;
use deepspec_core::backend::Precision;
use deepspec_core::cache::reader::CacheReader;
use deepspec_core::cache::{CacheError, Manifest};
use deepspec_core::drafter::init::DrafterSpec;
use deepspec_core::drafter::{Algorithm, MarkovKind};
use deepspec_core::model::config::TargetConfig;
use deepspec_core::recipe::{Recipe, RecipeError};
use std::path::{Path, PathBuf};

/// Why a recipe, a cache and a target do not make a training run. Each names the file and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("no cache: pass --cache DIR or set data.target_cache_path in {recipe}")]
    NoCache { recipe: PathBuf },
    #[error("{cache}: no manifest.json, so this is not a prepared cache (make one with `deepspec prepare --recipe {recipe} --out {cache}`)")]
    NotACache { cache: PathBuf, recipe: PathBuf },
    #[error("{cache}: the cache is unfinished; run `deepspec prepare` again to complete it")]
    Unfinished { cache: PathBuf },
    #[error("{cache}: the cache holds layers {cached} but {recipe} asks for model.target_layer_ids = {asked}; prepare a cache with the recipe's layers")]
    LayerMismatch {
        cache: PathBuf,
        cached: String,
        recipe: PathBuf,
        asked: String,
    },
    #[error("{cache}: the cache's hidden size is {cached} but the target {target} has {expected}; the cache was made with another target")]
    HiddenSizeMismatch {
        cache: PathBuf,
        cached: usize,
        target: PathBuf,
        expected: usize,
    },
}

/// Everything `deepspec train` needs besides the device, decided before any weight loads.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    /// The recipe file, for error messages.
    pub recipe_path: PathBuf,
    /// `model.target_model_name_or_path`.
    pub target: PathBuf,
    /// `--cache`, else `data.target_cache_path`.
    pub cache: PathBuf,
    /// Where `step_<n>/` go: `logging.checkpoint_dir`, else `--out`.
    pub out: PathBuf,
    /// `train.precision`: the compute dtype on any device.
    pub precision: Precision,
    pub drafter: DrafterSpec,
    pub settings: TrainSettings,
}

impl TrainPlan {
    /// Translates `recipe` (read from `recipe_path`) with the command line's `out`, `cache`
    /// and `stop_after`.
    pub fn from_recipe(
        recipe: &Recipe,
        recipe_path: &Path,
        out: &Path,
        cache: Option<&Path>,
        stop_after: Option<usize>,
    ) -> Result<TrainPlan, PlanError> {
        let invalid = |field: &str, detail: String| RecipeError::Invalid {
            path: recipe_path.to_path_buf(),
            field: field.into(),
            detail,
        };
        let precision = Precision::from_name(&recipe.train.precision).ok_or_else(|| {
            invalid(
                "train.precision",
                format!(
                    "`{}` is not one of bf16, fp16, fp32",
                    recipe.train.precision
                ),
            )
        })?;
        let drafter = drafter_spec(recipe, precision, &invalid)?;
        let cache = match (cache, &recipe.data.target_cache_path) {
            (Some(c), _) => c.to_path_buf(),
            (None, Some(c)) => c.clone(),
            (None, None) => {
                return Err(PlanError::NoCache {
                    recipe: recipe_path.to_path_buf(),
                })
            }
        };
        let out = recipe
            .logging
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| out.to_path_buf());
        let tensorboard_dir = recipe
            .logging
            .tensorboard_dir
            .clone()
            .unwrap_or_else(|| out.join("tensorboard"));
        let settings = recipe_settings(recipe, drafter.algorithm, tensorboard_dir, stop_after);
        Ok(TrainPlan {
            recipe_path: recipe_path.to_path_buf(),
            target: recipe.model.target_model_name_or_path.clone(),
            cache,
            out,
            precision,
            drafter,
            settings,
        })
    }

    /// Opens the cache and checks that it is finished and holds the recipe's layers.
    pub fn open_cache(&self) -> Result<CacheReader, PlanError> {
        if !Manifest::path(&self.cache).exists() {
            return Err(PlanError::NotACache {
                cache: self.cache.clone(),
                recipe: self.recipe_path.clone(),
            });
        }
        let reader = CacheReader::open(&self.cache)?;
        let manifest = &reader.manifest;
        if !manifest.complete {
            return Err(PlanError::Unfinished {
                cache: self.cache.clone(),
            });
        }
        if manifest.target_layer_ids != self.drafter.target_layer_ids {
            return Err(PlanError::LayerMismatch {
                cache: self.cache.clone(),
                cached: manifest.target_layer_ids.to_string(),
                recipe: self.recipe_path.clone(),
                asked: self.drafter.target_layer_ids.to_string(),
            });
        }
        Ok(reader)
    }

    /// Checks the loaded target against the cache (hidden size) and the recipe's layer ids
    /// against the target's layer count.
    pub fn check_target(
        &self,
        manifest: &Manifest,
        target: &TargetConfig,
    ) -> Result<(), PlanError> {
        if manifest.hidden_size != target.hidden_size {
            return Err(PlanError::HiddenSizeMismatch {
                cache: self.cache.clone(),
                cached: manifest.hidden_size,
                target: self.target.clone(),
                expected: target.hidden_size,
            });
        }
        let ids = &self.drafter.target_layer_ids;
        // DeepSeek-V4 taps may include the last layer (its final hidden state comes after
        // the hyper head); the other families cache the last layer's output separately.
        let checked = if target.family == deepspec_core::model::Family::DeepseekV4 {
            ids.check_including_last(target.num_hidden_layers)
        } else {
            ids.check(target.num_hidden_layers)
        };
        checked.map_err(|e| RecipeError::Invalid {
            path: self.recipe_path.clone(),
            field: "model.target_layer_ids".into(),
            detail: e.to_string(),
        })?;
        Ok(())
    }
}

/// What the recipe says about the drafter to build.
fn drafter_spec(
    recipe: &Recipe,
    precision: Precision,
    invalid: &dyn Fn(&str, String) -> RecipeError,
) -> Result<DrafterSpec, RecipeError> {
    let m = &recipe.model;
    let algorithm = Algorithm::from_name(&m.algorithm).ok_or_else(|| {
        invalid(
            "model.algorithm",
            format!("`{}` is not one of dspark, dflash, eagle3", m.algorithm),
        )
    })?;
    let markov_kind = MarkovKind::from_name(&m.markov_head_type).ok_or_else(|| {
        invalid(
            "model.markov_head_type",
            format!("`{}` is not one of vanilla, gated, rnn", m.markov_head_type),
        )
    })?;
    // DSpark and DFlash draft a block in parallel; Eagle3 unrolls its one layer `ttt_length`
    // times and has no mask token.
    let dense = algorithm != Algorithm::Eagle3;
    let mask_token_id = match (dense, m.mask_token_id) {
        (true, Some(id)) => id,
        (true, None) => {
            return Err(invalid(
                "model.mask_token_id",
                format!(
                    "is required for {} (the frozen embedding row that fills block slots 1..B-1; set it to an id the target never generates)",
                    algorithm.name()
                ),
            ))
        }
        (false, _) => 0,
    };
    // The Markov and confidence heads are DSpark's; a DFlash recipe that sets them trains
    // without them, as the reference does.
    let markov_rank = if algorithm == Algorithm::DSpark {
        m.markov_rank
    } else {
        0
    };
    let confidence = algorithm == Algorithm::DSpark && m.confidence_head_alpha > 0.0;
    Ok(DrafterSpec {
        algorithm,
        num_draft_layers: if dense {
            m.num_draft_layers
        } else {
            m.draft_num_hidden_layers
        },
        target_layer_ids: m.target_layer_ids.clone(),
        block_size: if dense { m.block_size } else { m.ttt_length },
        mask_token_id,
        num_anchors: m.num_anchors,
        markov_rank,
        markov_kind,
        confidence_head: confidence,
        confidence_with_markov: confidence && m.confidence_head_with_markov && markov_rank > 0,
        step_loss_decay: m.step_loss_decay,
        dtype: precision.checkpoint_dtype().into(),
        initializer_range: 0.02,
        seed: recipe.seed,
        target_model_name_or_path: m.target_model_name_or_path.display().to_string(),
    })
}

/// The trainer's settings for `recipe`. The only place [`TrainSettings`] is built from a
/// recipe; [`bench_settings`] is the other one.
fn recipe_settings(
    recipe: &Recipe,
    algorithm: Algorithm,
    tensorboard_dir: PathBuf,
    stop_after: Option<usize>,
) -> TrainSettings {
    let (m, t, l) = (&recipe.model, &recipe.train, &recipe.logging);
    let dspark = algorithm == Algorithm::DSpark;
    TrainSettings {
        lr: t.lr,
        warmup_ratio: t.warmup_ratio,
        weight_decay: t.weight_decay,
        max_grad_norm: t.max_grad_norm,
        local_batch_size: t.local_batch_size,
        global_batch_size: t.global_batch_size,
        num_train_epochs: t.num_train_epochs,
        max_train_steps: t.max_train_steps,
        logging_steps: l.logging_steps,
        checkpointing_steps: l.checkpointing_steps,
        keep_last: t.keep_last,
        seed: recipe.seed,
        max_length: recipe.data.max_length,
        // L1 and confidence terms exist only with DSpark's heads.
        dspark_loss: DSparkLossConfig {
            ce_alpha: m.ce_loss_alpha,
            l1_alpha: if dspark { m.l1_loss_alpha } else { 0.0 },
            confidence_alpha: if dspark { m.confidence_head_alpha } else { 0.0 },
            decay_gamma: Some(m.loss_decay_gamma),
        },
        head_chunk_tokens: t.head_chunk_tokens,
        tensorboard_dir: Some(tensorboard_dir),
        stop_after,
        show_progress: true,
        dist: DistSettings {
            reduce_dtype: t
                .allreduce_dtype
                .parse()
                .expect("the recipe checked train.allreduce_dtype"),
            bucket_elements: t.allreduce_bucket_mb << 20 >> 2,
            timeout: std::time::Duration::from_secs(t.dist_timeout_s),
        },
    }
}

/// Settings for timing training steps on synthetic data (`deepspec bench train`): one
/// sequence of `max_length` tokens per step, no logging or checkpoints, the loss weights of
/// the reference's recipes for `algorithm`.
pub fn bench_settings(algorithm: Algorithm, max_length: usize) -> TrainSettings {
    TrainSettings {
        lr: 6e-4,
        warmup_ratio: 0.0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        local_batch_size: 1,
        global_batch_size: 1,
        num_train_epochs: 1,
        max_train_steps: Some(1),
        logging_steps: 10,
        checkpointing_steps: 1000,
        keep_last: 1,
        seed: 0,
        max_length,
        dspark_loss: if algorithm == Algorithm::DSpark {
            DSparkLossConfig {
                ce_alpha: 0.1,
                l1_alpha: 0.9,
                confidence_alpha: 1.0,
                decay_gamma: Some(4.0),
            }
        } else {
            DSparkLossConfig {
                ce_alpha: 1.0,
                l1_alpha: 0.0,
                confidence_alpha: 0.0,
                decay_gamma: Some(4.0),
            }
        },
        head_chunk_tokens: None,
        tensorboard_dir: None,
        stop_after: None,
        show_progress: false,
        dist: DistSettings::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = "[model]\ntarget_model_name_or_path = \"t.gguf\"\ntarget_layer_ids = [0, 2]\nmask_token_id = 5\n";

    fn plan(overrides: &[&str]) -> Result<TrainPlan, PlanError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let recipe = Recipe::parse_with(Path::new("r.toml"), RECIPE, &overrides).unwrap();
        TrainPlan::from_recipe(
            &recipe,
            Path::new("r.toml"),
            Path::new("out"),
            Some(Path::new("cache")),
            None,
        )
    }

    #[test]
    fn a_dspark_recipe_becomes_typed_parts() {
        let p = plan(&["model.markov_rank=8", "model.markov_head_type=Gated"]).unwrap();
        assert_eq!(p.drafter.algorithm, Algorithm::DSpark);
        assert_eq!(p.drafter.markov_kind, MarkovKind::Gated);
        assert_eq!(p.drafter.target_layer_ids, vec![0, 2]);
        assert_eq!(p.precision, Precision::Bf16);
        assert_eq!(p.drafter.dtype, "bfloat16");
        assert_eq!(p.cache, Path::new("cache"));
        assert_eq!(
            p.settings.tensorboard_dir.as_deref(),
            Some(Path::new("out/tensorboard"))
        );
    }

    #[test]
    fn dflash_drops_dspark_heads_and_losses() {
        let p = plan(&[
            "model.algorithm=dflash",
            "model.markov_rank=8",
            "model.confidence_head_alpha=1.0",
            "model.l1_loss_alpha=0.5",
            "train.precision=fp32",
        ])
        .unwrap();
        assert_eq!(p.drafter.markov_rank, 0);
        assert!(!p.drafter.confidence_head);
        assert_eq!(p.settings.dspark_loss.l1_alpha, 0.0);
        assert_eq!(p.settings.dspark_loss.confidence_alpha, 0.0);
        assert_eq!(p.drafter.dtype, "float32");
    }

    #[test]
    fn a_dense_drafter_without_mask_token_names_the_field() {
        let recipe = Recipe::parse(
            Path::new("r.toml"),
            &RECIPE.replace("mask_token_id = 5\n", ""),
        )
        .unwrap();
        let err = TrainPlan::from_recipe(&recipe, Path::new("r.toml"), Path::new("o"), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.toml") && err.contains("model.mask_token_id"),
            "{err}"
        );
    }

    #[test]
    fn no_cache_says_how_to_name_one() {
        let recipe = Recipe::parse(Path::new("r.toml"), RECIPE).unwrap();
        let err = TrainPlan::from_recipe(&recipe, Path::new("r.toml"), Path::new("o"), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--cache") && err.contains("data.target_cache_path"),
            "{err}"
        );
    }
}
