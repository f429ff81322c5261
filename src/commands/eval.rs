//! `deepspec eval`: speculative decoding over the benchmark sets and a user's own prompt
//! sets, with the report, plots, confidence calibration and the regression gate.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use deepspec_core::drafter::Drafter;
use deepspec_core::io::chat::ChatTemplate;
use deepspec_core::io::lock::{lock_folder, FolderLock};
use deepspec_core::model::load_target;
use deepspec_core::progress::{Progress, ProgressMode};
use deepspec_core::recipe::Recipe;
use deepspec_eval::calibration::{calibrate, confidence_rounds};
use deepspec_eval::datasets::{load_sets, Domain, Lookup};
use deepspec_eval::engine::DecodeTrace;
use deepspec_eval::metrics::{threshold_sweep, AcceptanceStats};
use deepspec_eval::plan::{EvalChoices, EvalPlan};
use deepspec_eval::report::{regression_gate, CalibrationReport, Report, SetReport};
use deepspec_eval::runner::run_set;
use deepspec_eval::traces::TraceWriter;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Recipe naming the target model (`[model] target_model_name_or_path`).
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Target model path (overrides the recipe's).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Drafter checkpoint folder (config.json + model.safetensors).
    #[arg(long)]
    pub drafter: PathBuf,
    /// Folder of `<set>.jsonl` files: the nine reference sets
    /// (scripts/fetch-eval-datasets.sh builds them) and any of your own.
    #[arg(long, required_unless_present_any = ["prompts", "offline"])]
    pub datasets: Option<PathBuf>,
    /// Comma-separated sets in --datasets (default: the nine reference sets). Any other
    /// NAME.jsonl there is a custom set: every row in file order.
    #[arg(long, value_delimiter = ',')]
    pub sets: Vec<String>,
    /// One more set from this `{"turns": [...]}` JSONL file, named by the file's stem.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A custom set's domain in the report, `NAME=math|code|chat` (repeatable or
    /// comma-separated) [default: custom].
    #[arg(long = "domain", value_name = "NAME=DOMAIN", value_delimiter = ',', value_parser = parse_domain)]
    pub domains: Vec<(String, Domain)>,
    /// At most this many prompts per set: the first of the reference's selection (sets longer
    /// than their maximum are shuffled with the seed, as the reference does; others in file
    /// order).
    #[arg(long)]
    pub limit: Option<usize>,
    /// 0 = greedy [default: the recipe's eval.temperature, else 1.0 as the reference].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// [default: the recipe's eval.max_new_tokens, else 2048]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// DSpark: stop a block at the first slot whose confidence is below this (0 = full
    /// blocks) [default: the recipe's eval.confidence_threshold, else 0].
    #[arg(long)]
    pub confidence_threshold: Option<f64>,
    /// How many drafts each round verifies: full, fixed:N, threshold:T, alg1 (the
    /// hardware-aware prefix scheduler) or async (its production variant) [default:
    /// threshold:T with the confidence threshold, full at 0]. Confidences are read through
    /// the drafter's calibration.json (STS temperatures) when it has one.
    #[arg(long)]
    pub policy: Option<deepspec_eval::schedule::PolicySpec>,
    /// The step-cost profile alg1 and async weigh tokens against (`deepspec bench sps`).
    #[arg(long)]
    pub sps_table: Option<PathBuf>,
    /// [default: the recipe's eval.seed, else 980406]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts decoded together as one batch (rows of different lengths side by side).
    /// Every prompt draws from its own seeded generator, so this changes speed, not results.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Write the JSON report here (schema: docs/eval-report.md).
    #[arg(long)]
    pub report: PathBuf,
    /// Write PNG plots into this folder.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Write the Sequential Temperature Scaling temperatures (fitted on half the rounds, as
    /// the report's) to `calibration.json` beside the drafter.
    #[arg(long)]
    pub calibrate: bool,
    /// Compare with this report; exit non-zero when τ falls by more than --tolerance.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Relative drop of τ the gate allows (0.05 = 5 %).
    #[arg(long, default_value_t = 0.05)]
    pub tolerance: f64,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Teacher-forced τ from a cache's target hidden states through the frozen target head,
    /// with no target in the loop (any drafter family, DeepSeek-V4's included): the greedy
    /// prefix at T = 0, the expected accepted length at T = 1. Needs --recipe.
    #[arg(long, conflicts_with_all = ["datasets", "prompts", "calibrate"])]
    pub offline: bool,
    /// The cache --offline scores against [default: the recipe's data.target_cache_path].
    #[arg(long, requires = "offline")]
    pub cache: Option<PathBuf>,
    /// Write every verification round (and each prompt's output ids and text) as JSON lines
    /// to this file (fields: docs/eval-report.md).
    #[arg(long)]
    pub traces: Option<PathBuf>,
}

/// Locks what this eval writes: the report (a lock file beside it, named after it), the
/// plots folder and, with `--calibrate`, the drafter folder that receives `calibration.json`.
pub(crate) fn lock_outputs(
    report: &Path,
    plots: Option<&Path>,
    calibrated_drafter: Option<&Path>,
) -> anyhow::Result<Vec<FolderLock>> {
    let holder = "`deepspec eval`";
    let report_dir = report
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let report_name = report
        .file_name()
        .with_context(|| format!("--report {}: not a file name", report.display()))?;
    std::fs::create_dir_all(report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let mut locks = vec![lock_folder(
        report_dir,
        &format!(".{}.lock", report_name.to_string_lossy()),
        holder,
    )?];
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        locks.push(lock_folder(dir, ".eval.lock", holder)?);
    }
    if let Some(dir) = calibrated_drafter {
        locks.push(lock_folder(dir, ".calibrate.lock", holder)?);
    }
    Ok(locks)
}

fn parse_domain(s: &str) -> Result<(String, Domain), String> {
    let (name, domain) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: write NAME=DOMAIN, e.g. aime24=math"))?;
    Ok((name.to_string(), domain.parse()?))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let gate = dispatch(args.device, args)?;
    if !gate {
        std::process::exit(3);
    }
    Ok(())
}

impl EvalArgs {
    /// The verification policy: `--policy`, else the plan's confidence threshold.
    fn schedule(
        &self,
        plan: &deepspec_eval::plan::EvalPlan,
        config: &deepspec_core::drafter::DrafterConfig,
    ) -> anyhow::Result<deepspec_eval::schedule::Schedule> {
        use deepspec_eval::schedule::{CostModel, PassShape, PolicySpec, Schedule, SpsTable};
        let spec = match &self.policy {
            Some(p) => p.clone(),
            None if plan.confidence_threshold > 0.0 => {
                PolicySpec::Threshold(plan.confidence_threshold)
            }
            None => PolicySpec::Full,
        };
        // The default threshold policy keeps eval's old behaviour on any drafter.
        if self.policy.is_some() {
            spec.check_drafter(config, &self.drafter)?;
        }
        let cost = match &self.sps_table {
            Some(path) => Some(CostModel {
                table: SpsTable::load(path)?,
                shape: PassShape::Padded,
            }),
            None => None,
        };
        // Fails here, naming --sps-table, rather than at the first batch.
        spec.build(cost.as_ref())?;
        Ok(Schedule {
            spec,
            cost,
            temperatures: deepspec_eval::schedule::sts_temperatures(&self.drafter)?,
        })
    }
}

impl OnBackend for EvalArgs {
    /// Whether the regression gate passed (true without a baseline).
    type Output = bool;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<bool> {
        let recipe = match &self.recipe {
            Some(r) => {
                let path = crate::commands::train::resolve_recipe(&r.display().to_string())?;
                let recipe = Recipe::load(&path)?;
                Some((path, recipe))
            }
            None => None,
        };
        if self.offline {
            let Some((path, recipe)) = recipe else {
                bail!("--offline needs --recipe: its target's head scores the cache, and its data.target_cache_path is the default --cache");
            };
            return crate::commands::offline::run::<B>(&self, &path, &recipe, device);
        }
        let plan = EvalPlan::from_recipe(
            recipe.as_ref().map(|(p, r)| (p.as_path(), r)),
            EvalChoices {
                target: self.target.clone(),
                datasets: self.datasets.clone(),
                sets: self.sets.clone(),
                prompts: self.prompts.clone(),
                domains: self.domains.clone(),
                limit: self.limit,
                temperature: self.temperature,
                max_new_tokens: self.max_new_tokens,
                confidence_threshold: self.confidence_threshold,
                seed: self.seed,
                batch_size: self.batch_size,
            },
        )?;
        crate::commands::require_checkpoint_dir(&self.drafter, "--drafter")?;
        // Held until the report and plots are written: a second eval writing the same files
        // stops here instead of interleaving its temporary files with ours.
        let mut _locks = lock_outputs(
            &self.report,
            self.plots.as_deref(),
            self.calibrate.then_some(self.drafter.as_path()),
        )?;
        if let Some(t) = &self.traces {
            _locks.extend(lock_outputs(t, None, None)?);
        }
        let target_path = &plan.target;
        let target = load_target::<B>(target_path, &device)
            .with_context(|| format!("loading target {}", target_path.display()))?;
        let (drafter, config) = Drafter::<B>::load(&self.drafter, &device)
            .with_context(|| format!("loading drafter {}", self.drafter.display()))?;
        config.check_target(&target.config, target_path)?;
        let template = ChatTemplate::for_tokenizer(&target.tokenizer)
            .context("compiling the chat template")?;
        let sets = load_sets(&plan.sets, plan.selection())?;
        let params = plan.decode_params(&target.tokenizer, &template, &config)?;
        let schedule = self.schedule(&plan, &config)?;
        let mut traces_out = match &self.traces {
            Some(path) => Some(TraceWriter::create(path)?),
            None => None,
        };
        let mut report = Report {
            mode: "online".into(),
            macro_tau: 0.0,
            domain_tau: BTreeMap::new(),
            sets: BTreeMap::new(),
            missing_sets: Vec::new(),
            target: target_path.display().to_string(),
            drafter: self.drafter.display().to_string(),
            algorithm: config.algorithm.name().to_string(),
            temperature: plan.temperature,
            max_new_tokens: plan.max_new_tokens,
            confidence_threshold: plan.confidence_threshold,
            policy: schedule.spec.to_string(),
            calibration: None,
            offline: None,
        };
        let mut all_traces: Vec<(Domain, DecodeTrace)> = Vec::new();
        let mut per_domain: BTreeMap<Domain, AcceptanceStats> = BTreeMap::new();
        for lookup in sets {
            let dataset = match lookup {
                Lookup::Found(d) => d,
                Lookup::Missing { name, expected } => {
                    eprintln!(
                        "set {name}: missing ({} not found); skipped, reported as missing",
                        expected.display()
                    );
                    report.missing_sets.push(name);
                    continue;
                }
            };
            let turns: usize = dataset.samples.iter().map(|s| s.turns.len()).sum();
            let progress =
                Progress::new(ProgressMode::detect(), &dataset.name, turns as u64, "turns");
            let run = run_set(
                &target,
                &drafter,
                &config,
                &template,
                &dataset,
                &params,
                plan.seed,
                plan.batch_size,
                &schedule,
                &progress,
            )?;
            progress.finish();
            eprintln!(
                "set {}: τ {:.3} over {} rounds ({} tokens in {:.1}s)",
                dataset.name,
                run.stats.tau(),
                run.stats.rounds,
                run.generated,
                run.wall_seconds
            );
            for trace in &run.traces {
                per_domain.entry(dataset.domain).or_default().add(trace);
            }
            if let Some(out) = &mut traces_out {
                for (trace, &(prompt, turn)) in run.traces.iter().zip(&run.trace_ids) {
                    let text = target
                        .tokenizer
                        .decode(&trace.output_ids[trace.prompt_len..], false)?;
                    out.online(&dataset.name, prompt, turn, trace, text)?;
                }
            }
            report.sets.insert(
                dataset.name.clone(),
                SetReport::new(
                    dataset.domain,
                    dataset.samples.len(),
                    &run.stats,
                    run.wall_seconds,
                ),
            );
            all_traces.extend(run.traces.into_iter().map(|t| (dataset.domain, t)));
        }
        if report.sets.is_empty() {
            bail!(
                "no set found: none of {} exists",
                plan.sets
                    .iter()
                    .map(|s| s.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        report.aggregate();

        let traces: Vec<&DecodeTrace> = all_traces.iter().map(|(_, t)| t).collect();
        let rounds: Vec<_> = traces.iter().flat_map(|t| confidence_rounds(t)).collect();
        if !rounds.is_empty() {
            let prefix_survival = calibrate(&rounds, config.block_size);
            if self.calibrate {
                let path = self.drafter.join("calibration.json");
                let text =
                    serde_json::to_string_pretty(&prefix_survival.temperatures_file())? + "\n";
                deepspec_core::io::atomic::write_atomically(&path, text.as_bytes())?;
                eprintln!("wrote {}", path.display());
            }
            report.calibration = Some(CalibrationReport {
                prefix_survival,
                threshold_sweep: threshold_sweep(&traces, &plan.sweep_thresholds),
            });
        } else if self.calibrate {
            bail!(
                "--calibrate needs a drafter with a confidence head (this is {})",
                config.algorithm.name()
            );
        }
        report.write(&self.report)?;
        if let Some(out) = traces_out {
            out.finish()?;
            eprintln!("traces: {}", self.traces.as_ref().unwrap().display());
        }
        println!("{}", report.markdown());
        if let Some(c) = &report.calibration {
            let c = &c.prefix_survival;
            println!(
                "confidence prefix survival by position (ECE over {} bins; STS fitted on {} rounds, measured on the other {}):\n{}",
                c.ece_bins,
                c.fit_rounds,
                c.measured_rounds,
                c.markdown()
            );
            for note in &c.sts_notes {
                println!("STS: {note}");
            }
        }
        eprintln!("report: {}", self.report.display());
        if let Some(dir) = &self.plots {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let per_domain: BTreeMap<Domain, Vec<f64>> = per_domain
                .iter()
                .map(|(d, s)| (*d, s.conditional_acceptance()))
                .collect();
            deepspec_eval::plots::acceptance_by_position(
                &dir.join("acceptance_by_position.png"),
                &per_domain,
            )?;
            if let Some(c) = &report.calibration {
                deepspec_eval::plots::reliability(
                    &dir.join("reliability.png"),
                    &c.prefix_survival.positions,
                )?;
                deepspec_eval::plots::threshold_sweep(
                    &dir.join("threshold_sweep.png"),
                    &c.threshold_sweep,
                )?;
            }
            eprintln!("plots: {}", dir.display());
        }
        if let Some(baseline) = &self.baseline {
            let (lines, ok) = regression_gate(&report, baseline, self.tolerance)?;
            for line in &lines {
                println!("{line}");
            }
            if !ok {
                eprintln!(
                    "regression gate: τ fell by more than {:.1}% against {}",
                    self.tolerance * 100.0,
                    baseline.display()
                );
            }
            return Ok(ok);
        }
        Ok(true)
    }
}
