//! `deepspec train`: fit a drafter from a recipe on a prepared cache; and `deepspec recipe`.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use deepspec_core::backend::set_compute_dtype;
use deepspec_core::drafter::init::{new_drafter, new_v4_drafter};
use deepspec_core::model::{is_deepseek_v4, load_target, TargetConfig};
use deepspec_core::recipe::Recipe;
use deepspec_train::data::CacheSource;
use deepspec_train::plan::TrainPlan;
use deepspec_train::trainer::train;
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

impl OnBackend for TrainArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let recipe_path = resolve_recipe(&self.recipe);
        let recipe = Recipe::load_with(&recipe_path, &self.overrides)?;
        let plan = TrainPlan::from_recipe(
            &recipe,
            &recipe_path,
            &self.out,
            self.cache.as_deref(),
            self.stop_after,
        )?;
        // The recipe's precision is the compute dtype on whichever device runs it; the
        // optimizer keeps f32 masters and moments for anything narrower.
        set_compute_dtype::<B>(&device, plan.precision.dtype())
            .with_context(|| format!("{}: train.precision", recipe_path.display()))?;
        let reader = plan.open_cache()?;
        let (drafter, config) = if is_deepseek_v4(&plan.target) {
            // The V4 target does not run here: its architecture from config.json, its frozen
            // embedding and head from the folder, its features from the engine's cache.
            let target = TargetConfig::from_hf_json(&plan.target.join("config.json"))?;
            plan.check_target(&reader.manifest, &target)?;
            new_v4_drafter::<Autodiff<B>>(&plan.target, &plan.drafter, &device).with_context(
                || {
                    format!(
                        "building a DeepSeek-V4 DSpark drafter for {} (recipe field model.target_model_name_or_path)",
                        plan.target.display()
                    )
                },
            )?
        } else {
            let target = load_target::<Autodiff<B>>(&plan.target, &device).with_context(|| {
                format!(
                    "loading target {} (recipe field model.target_model_name_or_path)",
                    plan.target.display()
                )
            })?;
            plan.check_target(&reader.manifest, &target.config)?;
            new_drafter(&target, &plan.drafter, &device)?
        };
        let data = CacheSource { reader };
        eprintln!(
            "training {} on {} samples from {} -> {}",
            plan.drafter.algorithm.name(),
            deepspec_train::data::SampleSource::len(&data),
            plan.cache.display(),
            plan.out.display()
        );
        let summary = train(
            drafter,
            config,
            &data,
            &plan.settings,
            &plan.out,
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
