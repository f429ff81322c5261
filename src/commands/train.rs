//! `deepspec train`: fit a drafter from a recipe on a prepared cache; and `deepspec recipe`.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use deepspec_core::backend::set_compute_dtype;
use deepspec_core::drafter::init::{
    new_config, new_drafter, new_gemma4_drafter, new_v4_config_from, new_v4_drafter,
};
use deepspec_core::drafter::DrafterConfig;
use deepspec_core::model::v4::V4Config;
use deepspec_core::model::{
    is_deepseek_v4, is_gemma4, load_target, load_target_meta, TargetConfig,
};
use deepspec_core::recipe::Recipe;
use deepspec_train::data::CacheSource;
use deepspec_train::memory::plan_memory;
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
    /// Print the plan (parameters, bytes of weights / master weights / AdamW moments /
    /// activations per micro-step, GPUs needed) and stop; reads no weights and no cache.
    #[arg(long)]
    pub dry_run: bool,
    /// Memory of one device for the plan and the pre-flight check (default: what the device
    /// reports, the CPU's available memory or the CUDA device's total; 80 GiB GPUs for a
    /// --dry-run on the CPU).
    #[arg(long, value_name = "GIB")]
    pub device_memory_gib: Option<f64>,
}

/// A recipe given by path, or by name under `recipes/` (`smollm2-dspark` or
/// `smollm2-dspark.toml`). When neither exists the error lists the recipes in `recipes/`.
pub fn resolve_recipe(name: &str) -> anyhow::Result<PathBuf> {
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(direct);
    }
    let folder = Path::new("recipes");
    let file_name = if name.ends_with(".toml") {
        name.to_string()
    } else {
        format!("{name}.toml")
    };
    let named = folder.join(&file_name);
    if named.is_file() {
        return Ok(named);
    }
    let mut known: Vec<String> = std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix(".toml").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    known.sort();
    if known.is_empty() {
        anyhow::bail!(
            "recipe `{name}` not found: no such file, and there is no recipes/ folder with recipes here ({}); pass a recipe file's path or run from the repository root",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| ".".into())
        );
    }
    anyhow::bail!(
        "recipe `{name}` not found: no such file, nor {}; the recipes in recipes/ are: {}",
        named.display(),
        known.join(", ")
    )
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    dispatch(args.device, args)
}

/// The drafter's config for a plan, from the target's `config.json` (or GGUF metadata), or
/// the recipe's `model.target_config` when the target is not on this machine. Reads no
/// weights.
fn planned_config(plan: &TrainPlan, recipe: &Recipe) -> anyhow::Result<DrafterConfig> {
    let target = &plan.target;
    let file = if target.join("config.json").exists() {
        Some(target.join("config.json"))
    } else if target.exists() {
        None
    } else {
        Some(recipe.model.target_config.clone().with_context(|| {
            format!(
                "{} does not exist and {} sets no model.target_config (the target's config.json) to plan from",
                target.display(),
                plan.recipe_path.display()
            )
        })?)
    };
    if let Some(file) = &file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the target's config {}", file.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", file.display()))?;
        if V4Config::is_v4(&json) {
            return Ok(new_v4_config_from(file, &plan.drafter)?);
        }
        let config = TargetConfig::from_hf_json(file)?;
        return Ok(new_config(target, &config, &plan.drafter)?);
    }
    let (config, _) = load_target_meta(target)?;
    Ok(new_config(target, &config, &plan.drafter)?)
}

/// Bytes the chosen device can hold: `--device-memory-gib`, else what the machine reports
/// (`MemAvailable` on the CPU; `nvidia-smi`'s total for a CUDA device). `None` when unknown.
fn device_memory(kind: DeviceKind, flag: Option<f64>) -> Option<(u64, String)> {
    if let Some(gib) = flag {
        let name = if kind == DeviceKind::Cpu {
            "device"
        } else {
            "GPU"
        };
        return Some(((gib * (1u64 << 30) as f64) as u64, name.into()));
    }
    match kind {
        DeviceKind::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kib: u64 = info
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((kib * 1024, "CPU (available memory)".into()))
        }
        DeviceKind::Cuda | DeviceKind::CudaBf16 => {
            let out = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.total,name",
                    "--format=csv,noheader,nounits",
                ])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next()?;
            let (mib, name) = first.split_once(',')?;
            Some((
                mib.trim().parse::<u64>().ok()? << 20,
                name.trim().to_string(),
            ))
        }
    }
}

impl OnBackend for TrainArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let recipe_path = resolve_recipe(&self.recipe)?;
        let recipe = Recipe::load_with(&recipe_path, &self.overrides)?;
        // A dry run reads no cache: any cache folder (or none) plans the same.
        let no_cache = PathBuf::from("<not read by --dry-run>");
        let cache = match (&self.cache, self.dry_run) {
            (Some(c), _) => Some(c.as_path()),
            (None, true) => Some(
                recipe
                    .data
                    .target_cache_path
                    .as_deref()
                    .unwrap_or(&no_cache),
            ),
            (None, false) => None,
        };
        let plan =
            TrainPlan::from_recipe(&recipe, &recipe_path, &self.out, cache, self.stop_after)?;
        let planned = planned_config(&plan, &recipe)?;
        let memory = plan_memory(&planned, &plan.settings, plan.precision);
        if self.dry_run {
            let (bytes, name) = device_memory(self.device, self.device_memory_gib)
                .filter(|_| self.device != DeviceKind::Cpu || self.device_memory_gib.is_some())
                .unwrap_or((80 << 30, "GPU".into()));
            println!(
                "plan for {} ({} {}, {} at {}):",
                recipe_path.display(),
                plan.drafter.algorithm.name(),
                if planned.v4.is_some() {
                    "DeepSeek-V4"
                } else {
                    "drafter"
                },
                plan.target.display(),
                recipe.train.precision
            );
            print!("{}", memory.report(&planned, bytes, &name));
            return Ok(());
        }
        if let Some((bytes, name)) = device_memory(self.device, self.device_memory_gib) {
            if !memory.fits(bytes) {
                anyhow::bail!(
                    "this job does not fit, so nothing was allocated:\n{}",
                    memory.report(&planned, bytes, &name)
                );
            }
        }
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
        } else if is_gemma4(&plan.target) {
            // Gemma4 targets do not run here: the drafter's config from the target's
            // config.json, its frozen embedding and head from the folder.
            let target = TargetConfig::from_hf_json(&plan.target.join("config.json"))?;
            plan.check_target(&reader.manifest, &target)?;
            new_gemma4_drafter::<Autodiff<B>>(&plan.target, &plan.drafter, &device).with_context(
                || {
                    format!(
                        "building a Gemma4 drafter for {} (recipe field model.target_model_name_or_path)",
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
            let path = resolve_recipe(&name)?;
            let recipe = Recipe::load_with(&path, &overrides)?;
            print!("# {}\n{}", path.display(), recipe.to_toml());
            Ok(())
        }
    }
}
