//! `deepspec train`: fit a drafter from a recipe on a prepared cache; and `deepspec recipe`.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::{bail, Context};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use deepspec_core::backend::{set_compute_dtype, Precision};
use deepspec_core::cache::reader::CacheReader;
use deepspec_core::drafter::init::{new_drafter, DrafterSpec};
use deepspec_core::drafter::{Algorithm, MarkovKind};
use deepspec_core::model::load_target;
use deepspec_core::recipe::Recipe;
use deepspec_train::data::CacheSource;
use deepspec_train::loss::dspark::DSparkLossConfig;
use deepspec_train::trainer::{train, TrainSettings};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Recipe file, or a name in recipes/ (e.g. `smollm2-dspark`).
    #[arg(long)]
    pub recipe: String,
    /// The prepared cache (default: the recipe's `data.target_cache_path`).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Output folder: `step_<n>/`, `step_latest`, `tensorboard/`.
    #[arg(long)]
    pub out: PathBuf,
    /// Override a recipe field: `--set train.max_train_steps=100` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in --out from its step_latest.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimizer steps of this invocation (a clean interruption; resume
    /// with --resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// Where to compute. The compute dtype is the recipe's `train.precision` on every device
    /// (bf16 keeps f32 master weights and moments in the optimizer).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

/// A recipe given by path, or by name under `recipes/`.
pub fn resolve_recipe(name: &str) -> PathBuf {
    let direct = PathBuf::from(name);
    if direct.exists() {
        return direct;
    }
    let named = Path::new("recipes").join(format!("{name}.toml"));
    if named.exists() {
        named
    } else {
        direct
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    dispatch(args.device, args)
}

/// What the recipe says about the drafter to build.
pub fn drafter_spec(recipe: &Recipe) -> anyhow::Result<DrafterSpec> {
    let m = &recipe.model;
    let algorithm = match m.algorithm.as_str() {
        "dspark" => Algorithm::DSpark,
        "dflash" => Algorithm::DFlash,
        _ => Algorithm::Eagle3,
    };
    let dense = algorithm != Algorithm::Eagle3;
    let mask_token_id = match (dense, m.mask_token_id) {
        (true, Some(id)) => id,
        (true, None) => bail!(
            "recipe field `model.mask_token_id` is required for {}",
            m.algorithm
        ),
        (false, _) => 0,
    };
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
        markov_kind: match m.markov_head_type.to_ascii_lowercase().as_str() {
            "gated" => MarkovKind::Gated,
            "rnn" => MarkovKind::Rnn,
            _ => MarkovKind::Vanilla,
        },
        confidence_head: confidence,
        confidence_with_markov: confidence && m.confidence_head_with_markov && markov_rank > 0,
        step_loss_decay: m.step_loss_decay,
        dtype: if recipe.train.precision == "fp32" {
            "float32"
        } else {
            "bfloat16"
        }
        .into(),
        initializer_range: 0.02,
        seed: recipe.seed,
        target_model_name_or_path: m.target_model_name_or_path.display().to_string(),
    })
}

pub fn train_settings(recipe: &Recipe, out: &Path, stop_after: Option<usize>) -> TrainSettings {
    let (m, t, l) = (&recipe.model, &recipe.train, &recipe.logging);
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
        dspark_loss: DSparkLossConfig {
            ce_alpha: m.ce_loss_alpha,
            l1_alpha: if m.algorithm == "dspark" {
                m.l1_loss_alpha
            } else {
                0.0
            },
            confidence_alpha: if m.algorithm == "dspark" {
                m.confidence_head_alpha
            } else {
                0.0
            },
            decay_gamma: Some(m.loss_decay_gamma),
        },
        tensorboard_dir: Some(
            l.tensorboard_dir
                .clone()
                .unwrap_or_else(|| out.join("tensorboard")),
        ),
        stop_after,
        show_progress: true,
    }
}

impl OnBackend for TrainArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let recipe_path = resolve_recipe(&self.recipe);
        let recipe = Recipe::load_with(&recipe_path, &self.overrides)?;
        // The recipe's precision is the compute dtype on whichever device runs it; the
        // optimizer keeps f32 masters and moments for anything narrower.
        let precision =
            Precision::from_name(&recipe.train.precision).context("validated with the recipe")?;
        set_compute_dtype::<B>(&device, precision.dtype())
            .with_context(|| format!("{}: train.precision", recipe_path.display()))?;
        let cache_dir = match (&self.cache, &recipe.data.target_cache_path) {
            (Some(c), _) | (None, Some(c)) => c.clone(),
            (None, None) => bail!(
                "no cache: pass --cache DIR or set data.target_cache_path in {}",
                recipe_path.display()
            ),
        };
        if !cache_dir.join("manifest.json").exists() {
            bail!(
                "{}: no manifest.json, so this is not a prepared cache (make one with `deepspec prepare --recipe {} --out {}`)",
                cache_dir.display(),
                recipe_path.display(),
                cache_dir.display()
            );
        }
        let reader = CacheReader::open(&cache_dir)?;
        let manifest = &reader.manifest;
        if !manifest.complete {
            bail!(
                "{}: the cache is unfinished; run `deepspec prepare` again to complete it",
                cache_dir.display()
            );
        }
        if manifest.target_layer_ids != recipe.model.target_layer_ids {
            bail!(
                "{}: the cache holds layers {:?} but {} asks for model.target_layer_ids = {:?}; prepare a cache with the recipe's layers",
                cache_dir.display(),
                manifest.target_layer_ids,
                recipe_path.display(),
                recipe.model.target_layer_ids
            );
        }
        let target_path = &recipe.model.target_model_name_or_path;
        let target = load_target::<Autodiff<B>>(target_path, &device).with_context(|| {
            format!(
                "loading target {} (recipe field model.target_model_name_or_path)",
                target_path.display()
            )
        })?;
        if manifest.hidden_size != target.config.hidden_size {
            bail!(
                "{}: the cache's hidden size is {} but the target {} has {}; the cache was made with another target",
                cache_dir.display(),
                manifest.hidden_size,
                target_path.display(),
                target.config.hidden_size
            );
        }
        recipe.check_layers(&recipe_path, target.config.num_hidden_layers)?;
        let spec = drafter_spec(&recipe)?;
        let (drafter, config) = new_drafter(&target, &spec, &device)?;
        drop(target);
        let out = recipe
            .logging
            .checkpoint_dir
            .clone()
            .unwrap_or(self.out.clone());
        let settings = train_settings(&recipe, &out, self.stop_after);
        let data = CacheSource { reader };
        eprintln!(
            "training {} on {} samples from {} -> {}",
            recipe.model.algorithm,
            deepspec_train::data::SampleSource::len(&data),
            cache_dir.display(),
            out.display()
        );
        let summary = train(
            drafter,
            config,
            &data,
            &settings,
            &out,
            self.resume,
            &device,
        )?;
        println!(
            "trained {} steps: loss {:.4} -> {:.4}, {:.0} tokens/s, {:.0} draft tokens/s; checkpoint {}",
            summary.steps,
            summary.first_loss,
            summary.last_loss,
            summary.tokens_per_second,
            summary.draft_tokens_per_second,
            summary.checkpoint.display()
        );
        Ok(())
    }
}

#[derive(clap::Subcommand)]
pub enum RecipeCommand {
    /// Print the resolved recipe (defaults filled in, overrides applied).
    Show {
        /// Recipe file, or a name in recipes/.
        name: String,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
}

pub fn run_recipe(cmd: RecipeCommand) -> anyhow::Result<()> {
    match cmd {
        RecipeCommand::Show { name, overrides } => {
            let path = resolve_recipe(&name);
            let recipe = Recipe::load_with(&path, &overrides)?;
            print!("# {}\n{}", path.display(), recipe.to_toml());
            Ok(())
        }
    }
}
