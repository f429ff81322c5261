//! `deepspec train`: fit a drafter from a recipe on a prepared cache; and `deepspec recipe`.

use crate::device::{dispatch_at, DeviceKind, OnBackend};
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
use deepspec_train::dist::collective::Comm;
use deepspec_train::dist::World;
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
    /// Data parallel on this machine: start N ranks (processes) of this same command and
    /// wait for them. Under torchrun or srun, leave it out: the ranks come from their
    /// environment (docs/distributed.md).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// The rendezvous port for --nproc-per-node (rank 0 listens on 127.0.0.1 there; the
    /// collective uses the next 1 + 2N ports; keep them below the ephemeral range, 32768
    /// on most Linux hosts) [default: MASTER_PORT, else 29500].
    #[arg(long, value_name = "PORT", requires = "nproc_per_node")]
    pub master_port: Option<u16>,
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
    if let Some(n) = args.nproc_per_node {
        if !args.dry_run {
            return spawn_ranks(n, args.master_port);
        }
    }
    let world = World::from_env(&|name| std::env::var(name).ok())?;
    dispatch_at(args.device, world.local_rank, (args, world))
}

/// `--nproc-per-node N`: this command N times as ranks 0..N of a local world (torchrun's
/// variables set for each), waited for; the first rank that fails fails the whole.
fn spawn_ranks(n: usize, port: Option<u16>) -> anyhow::Result<()> {
    if n == 0 {
        anyhow::bail!("--nproc-per-node must be at least 1");
    }
    if std::env::var_os("RANK").is_some() || std::env::var_os("SLURM_PROCID").is_some() {
        anyhow::bail!(
            "--nproc-per-node starts the ranks itself, but RANK (torchrun) or SLURM_PROCID (srun) is already set: leave --nproc-per-node out under a launcher"
        );
    }
    let port = match (port, std::env::var("MASTER_PORT").ok()) {
        (Some(p), _) => p,
        (None, Some(p)) => p
            .parse()
            .with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
        (None, None) => deepspec_train::dist::DEFAULT_MASTER_PORT,
    };
    let exe = std::env::current_exe().context("finding this deepspec executable")?;
    // The same arguments without the launcher's own.
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut given = std::env::args_os().skip(1);
    while let Some(a) = given.next() {
        let text = a.to_string_lossy();
        if text == "--nproc-per-node" || text == "--master-port" {
            given.next();
        } else if !(text.starts_with("--nproc-per-node=") || text.starts_with("--master-port=")) {
            args.push(a);
        }
    }
    let mut children = Vec::new();
    let mut forwarders = Vec::new();
    for rank in 0..n {
        let mut child = std::process::Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
        let out = child.stdout.take().expect("piped stdout");
        forwarders.push(std::thread::spawn(move || forward_stdout(out)));
        children.push(Some(child));
    }
    let mut failed: Option<String> = None;
    while children.iter().any(Option::is_some) {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                if !status.success() && failed.is_none() {
                    failed = Some(format!("rank {rank} of {n} failed ({status})"));
                }
                *slot = None;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for f in forwarders {
        f.join().ok();
    }
    match failed {
        Some(why) => anyhow::bail!("{why}; its error is above"),
        None => Ok(()),
    }
}

/// Copies a rank's stdout to ours, less the line burn-collective 0.21 prints for every
/// collective it joins (`Connecting to ws://…`).
fn forward_stdout(out: std::process::ChildStdout) {
    use std::io::{BufRead, Write};
    for line in std::io::BufReader::new(out).lines() {
        let Ok(line) = line else { return };
        if line.starts_with("Connecting to ws://") {
            continue;
        }
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}").ok();
    }
}

/// A digest of what every rank must agree on (the resolved recipe, the data, the run's
/// folder), for the rendezvous to refuse a rank of another job.
fn job_digest(recipe: &Recipe, cache: &Path, samples: usize, out: &Path, resume: bool) -> String {
    let text = format!(
        "{}\n{}\n{samples}\n{}\n{resume}",
        recipe.to_toml(),
        cache.display(),
        out.display()
    );
    // FNV-1a: stable across builds and machines.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
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

impl OnBackend for (TrainArgs, World) {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let (args, world) = self;
        args.train::<B>(device, world)
    }
}

impl TrainArgs {
    fn train<B: Backend>(self, device: B::Device, world: World) -> anyhow::Result<()> {
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
        let samples = deepspec_train::data::SampleSource::len(&data);
        let job = job_digest(&recipe, &plan.cache, samples, &plan.out, self.resume);
        let comm = Comm::<B>::connect(&world, &job, &plan.settings.dist, &device)?;
        if world.is_main() {
            eprintln!(
                "training {} on {samples} samples from {} -> {}{}",
                plan.drafter.algorithm.name(),
                plan.cache.display(),
                plan.out.display(),
                match world.world_size {
                    1 => String::new(),
                    n => format!(" on {n} ranks"),
                }
            );
        }
        let summary = train(
            drafter,
            config,
            &data,
            &plan.settings,
            &plan.out,
            self.resume,
            &device,
            &comm,
        )?;
        if !world.is_main() {
            return Ok(());
        }
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
