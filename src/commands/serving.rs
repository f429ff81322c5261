//! `deepspec bench sps` (the step-cost profile) and `deepspec bench serve` (policies × loads
//! through the continuous-batching engine).

use crate::device::{DeviceKind, OnBackend};
use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::io::chat::{ChatTemplate, Message};
use deepspec_core::model::{load_target, LoadedTarget};
use deepspec_core::progress::{Progress, ProgressMode};
use deepspec_core::recipe::Recipe;
use deepspec_core::sampling::{Rng, Sampler};
use deepspec_eval::engine::DecodeParams;
use deepspec_eval::plan::{EvalChoices, EvalPlan};
use deepspec_eval::profile::{profile, ProfileSpec};
use deepspec_eval::proposer::{NoDraft, Proposer};
use deepspec_eval::schedule::{CostModel, PassShape, PolicySpec, SpsTable};
use deepspec_eval::serve::{serve, Request};
use deepspec_eval::serving::{fill_ratios, summarize, ServeReport};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SpsBench {
    /// Recipe naming the target.
    #[arg(long, required_unless_present = "target")]
    pub recipe: Option<String>,
    /// The target model (instead of a recipe's).
    #[arg(long, conflicts_with = "recipe")]
    pub target: Option<PathBuf>,
    /// Also profile this drafter's proposals (drafting cost per number of requests).
    #[arg(long)]
    pub drafter: Option<PathBuf>,
    /// Tokens in the target's cache before every timed pass (L).
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Largest verification batch in tokens (B = 1, 2, 4, … up to it).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Largest number of drafting requests (R = 1, 2, 4, … up to it).
    #[arg(long, default_value_t = 16)]
    pub max_requests: usize,
    /// Timed repeats per point, after one warm-up; the median is kept.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Where to write the profile (JSON, for `--sps-table`).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

/// A context of `n` tokens: a paragraph of the target's own text, repeated.
fn filler(target: &LoadedTarget<impl Backend>, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = "Speculative decoding drafts several tokens cheaply and lets the target verify \
                them in one pass; the scheduler decides how many are worth the pass. ";
    let piece = target.tokenizer.encode(text)?;
    if piece.is_empty() {
        bail!("the tokenizer encodes the profile's text to nothing");
    }
    Ok(piece.iter().copied().cycle().take(n.max(1)).collect())
}

fn profile_here<'m, B: Backend>(
    target: &LoadedTarget<B>,
    drafter: Option<(&'m Drafter<B>, &'m DrafterConfig)>,
    spec: &ProfileSpec,
    target_path: &str,
) -> SpsTable {
    let points = deepspec_eval::profile::doubling(spec.max_tokens).len()
        + deepspec_eval::profile::doubling(if drafter.is_some() {
            spec.max_requests
        } else {
            0
        })
        .len();
    let progress = Progress::new(ProgressMode::detect(), "sps", points as u64, "points");
    let make = drafter.map(|(d, c)| {
        move || -> Box<dyn Proposer<B> + 'm> { deepspec_eval::runner::proposer(d, c) }
    });
    let mut table = profile(
        target,
        make.as_ref()
            .map(|m| m as &dyn Fn() -> Box<dyn Proposer<B> + 'm>),
        spec,
        &mut |what, p| {
            progress.inc(1);
            progress.update(&format!("{what} n={} {:.2}ms", p.n, p.seconds * 1e3));
        },
    );
    progress.finish();
    table.target = target_path.to_string();
    table
}

impl OnBackend for SpsBench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let target_file = match (&self.target, &self.recipe) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => {
                let recipe = Recipe::load(&crate::commands::train::resolve_recipe(r)?)?;
                recipe.model.target_model_name_or_path.clone()
            }
            (None, None) => bail!("name the target with --recipe R or --target PATH"),
        };
        let target_path = target_file.display().to_string();
        let target = load_target::<B>(&target_file, &device)?;
        let loaded = match &self.drafter {
            Some(dir) => {
                crate::commands::require_checkpoint_dir(dir, "--drafter")?;
                let (drafter, config) = Drafter::<B>::load(dir, &device)?;
                config.check_target(&target.config, &target_file)?;
                deepspec_eval::runner::check_online(&drafter)?;
                Some((drafter, config))
            }
            None => None,
        };
        let taps = loaded
            .as_ref()
            .map(|(_, c)| c.target_layer_ids.to_vec())
            .unwrap_or_default();
        let spec = ProfileSpec {
            context: filler(&target, self.context)?,
            max_tokens: self.max_tokens.max(1),
            max_requests: self.max_requests.max(1),
            repeats: self.repeats.max(1),
            target_layer_ids: taps,
            temperature: 0.0,
        };
        let table = profile_here(
            &target,
            loaded.as_ref().map(|(d, c)| (d, c)),
            &spec,
            &target_path,
        );
        print_table(&table);
        let text = serde_json::to_string_pretty(&table)? + "\n";
        deepspec_core::io::atomic::write_atomically(&self.out, text.as_bytes())?;
        eprintln!("wrote {}", self.out.display());
        Ok(())
    }
}

fn print_table(table: &SpsTable) {
    println!(
        "backend {}  context {} tokens  median of {}",
        table.backend, table.context_len, table.repeats
    );
    println!("verify: B tokens  ms/pass  SPS(B)  ms/token");
    for p in &table.verify {
        println!(
            "        {:>8} {:>8.2} {:>7.1} {:>9.2}",
            p.n,
            p.seconds * 1e3,
            1.0 / p.seconds,
            p.seconds * 1e3 / p.n as f64
        );
    }
    if !table.draft.is_empty() {
        println!("draft:  requests  ms/round  ms/request");
        for p in &table.draft {
            println!(
                "        {:>8} {:>9.2} {:>11.2}",
                p.n,
                p.seconds * 1e3,
                p.seconds * 1e3 / p.n as f64
            );
        }
    }
}

fn comma_list<T: std::str::FromStr>(s: &str, flag: &str) -> anyhow::Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("{flag} {x:?}: {e}"))
        })
        .collect()
}

#[derive(clap::Args, Debug)]
pub struct ServeBench {
    /// Recipe naming the target (and the eval and prepare settings: stop tokens, seed).
    #[arg(long, required_unless_present = "target")]
    pub recipe: Option<String>,
    /// The target model (instead of a recipe's).
    #[arg(long, conflicts_with = "recipe")]
    pub target: Option<PathBuf>,
    #[arg(long)]
    pub drafter: PathBuf,
    /// Folder of `<set>.jsonl` benchmark files.
    #[arg(long)]
    pub datasets: PathBuf,
    /// Comma-separated sets the requests come from.
    #[arg(long, default_value = "gsm8k")]
    pub sets: String,
    /// Comma-separated slot counts (requests decoding at once).
    #[arg(long, default_value = "1,2,4,8,16")]
    pub concurrency: String,
    /// Comma-separated policies: none, fixed:N, threshold:T, alg1, async (none is always run:
    /// it is what the ratios divide by).
    #[arg(long, default_value = "none,fixed:1,fixed:7,threshold:0.5,alg1,async")]
    pub policies: String,
    /// Requests per set (the first turn of each of the set's first N samples).
    #[arg(long, default_value_t = 8)]
    pub limit: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature [default: the recipe's eval.temperature].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Requests arrive as a Poisson stream of this many per second (seeded) instead of all
    /// waiting from the start.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The step-cost profile from `bench sps`; without it, one is measured first and written
    /// beside the report.
    #[arg(long)]
    pub sps_table: Option<PathBuf>,
    /// How the schedulers count a pass's tokens: padded (rows × widest row, what this engine
    /// runs) or packed (Σ of row lengths, as ragged kernels do).
    #[arg(long, value_enum, default_value_t = Shape::Padded)]
    pub pass_shape: Shape,
    #[arg(long)]
    pub report: PathBuf,
    /// Folder for the PNG plots (throughput against per-user speed, verified budget).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    Padded,
    Packed,
}

/// Seconds after the start at which each of `n` requests arrives, a Poisson stream of `rate`.
fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += -(1.0 - rng.uniform()).ln() / rate;
            t
        })
        .collect()
}

impl OnBackend for ServeBench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let recipe = match &self.recipe {
            Some(r) => {
                let path = crate::commands::train::resolve_recipe(r)?;
                let recipe = Recipe::load(&path)?;
                Some((path, recipe))
            }
            None => None,
        };
        let mut policies: Vec<PolicySpec> = comma_list(&self.policies, "--policies")?;
        if !policies.contains(&PolicySpec::TargetOnly) {
            policies.insert(0, PolicySpec::TargetOnly);
        }
        let loads: Vec<usize> = comma_list(&self.concurrency, "--concurrency")?;
        if loads.is_empty() || loads.contains(&0) {
            bail!("--concurrency needs slot counts of at least 1, e.g. 1,2,4,8,16");
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate is {rate}: give requests per second, a positive number");
            }
        }
        let sets: Vec<String> = comma_list(&self.sets, "--sets")?;
        let plan = EvalPlan::from_recipe(
            recipe.as_ref().map(|(p, r)| (p.as_path(), r)),
            EvalChoices {
                target: self.target.clone(),
                datasets: Some(self.datasets.clone()),
                sets: sets.clone(),
                limit: Some(self.limit),
                temperature: self.temperature,
                max_new_tokens: Some(self.max_new_tokens),
                confidence_threshold: Some(0.0),
                ..Default::default()
            },
        )?;
        crate::commands::require_checkpoint_dir(&self.drafter, "--drafter")?;
        let target = load_target::<B>(&plan.target, &device)?;
        let (drafter, config) = Drafter::<B>::load(&self.drafter, &device)?;
        config.check_target(&target.config, &plan.target)?;
        deepspec_eval::runner::check_online(&drafter)?;
        for p in &policies {
            if let PolicySpec::Fixed(n) = p {
                if *n > config.block_size {
                    bail!(
                        "policy {p} verifies more drafts than the drafter makes per round (its \
                         block size is {}): use fixed:1 … fixed:{}",
                        config.block_size,
                        config.block_size
                    );
                }
            }
            p.check_drafter(&config, &self.drafter)?;
        }
        let temperatures = deepspec_eval::schedule::sts_temperatures(&self.drafter)?;
        let template = ChatTemplate::for_tokenizer(&target.tokenizer)?;
        let params: DecodeParams = plan.decode_params(&target.tokenizer, &template, &config)?;

        let mut prompts = Vec::new();
        for set in &sets {
            let path = self.datasets.join(format!("{set}.jsonl"));
            let data = deepspec_eval::datasets::read_jsonl(set, &path, plan.selection())?;
            for s in &data.samples {
                prompts.push(deepspec_eval::runner::turn_prompt(
                    &template,
                    &target.tokenizer,
                    &[Message::new("user", &s.turns[0])],
                )?);
            }
        }
        if prompts.is_empty() {
            bail!("no requests: the sets {} have no samples", sets.join(","));
        }
        let arrivals = match self.rate {
            Some(rate) => poisson_arrivals(prompts.len(), rate, self.seed),
            None => vec![0.0; prompts.len()],
        };
        let requests: Vec<Request> = prompts
            .iter()
            .zip(&arrivals)
            .map(|(p, &a)| Request {
                prompt: p.clone(),
                arrival: a,
            })
            .collect();

        let table = match &self.sps_table {
            Some(path) => SpsTable::load(path)?,
            None => {
                let mean = prompts.iter().map(Vec::len).sum::<usize>() / prompts.len();
                let spec = ProfileSpec {
                    context: filler(&target, mean + self.max_new_tokens / 2)?,
                    max_tokens: (1 + config.block_size) * loads.iter().max().copied().unwrap_or(1),
                    max_requests: loads.iter().max().copied().unwrap_or(1),
                    repeats: 5,
                    target_layer_ids: params.target_layer_ids.clone(),
                    temperature: params.temperature,
                };
                eprintln!("no --sps-table: profiling this device first (as `bench sps`)");
                let table = profile_here(
                    &target,
                    Some((&drafter, &config)),
                    &spec,
                    &plan.target.display().to_string(),
                );
                let path = self.report.with_extension("sps.json");
                let text = serde_json::to_string_pretty(&table)? + "\n";
                deepspec_core::io::atomic::write_atomically(&path, text.as_bytes())?;
                eprintln!("wrote {}", path.display());
                table
            }
        };
        print_table(&table);
        let cost = CostModel {
            table: table.clone(),
            shape: match self.pass_shape {
                Shape::Padded => PassShape::Padded,
                Shape::Packed => PassShape::Packed,
            },
        };

        // Warm-up: one request through the speculative path.
        {
            let mut p = deepspec_eval::runner::proposer(&drafter, &config);
            let mut rng = Rng::new(0);
            let mut policy = PolicySpec::Fixed(config.block_size).build(None)?;
            serve(
                &target,
                &mut [p.as_mut()],
                &requests[..1],
                &mut [&mut rng as &mut dyn Sampler],
                policy.as_mut(),
                &params,
                &temperatures,
                1,
            );
        }
        let runs = (policies.len() * loads.len()) as u64;
        let progress = Progress::new(
            ProgressMode::detect(),
            "serve",
            runs * requests.len() as u64,
            "requests",
        );
        let mut points = Vec::new();
        for &slots in &loads {
            for spec in &policies {
                let mut policy = spec.build(Some(&cost))?;
                let mut boxed: Vec<Box<dyn Proposer<B> + '_>> = requests
                    .iter()
                    .map(|_| -> Box<dyn Proposer<B> + '_> {
                        if policy.drafts() {
                            deepspec_eval::runner::proposer(&drafter, &config)
                        } else {
                            Box::new(NoDraft)
                        }
                    })
                    .collect();
                let mut proposers: Vec<&mut dyn Proposer<B>> =
                    boxed.iter_mut().map(|p| p.as_mut() as _).collect();
                let mut rngs: Vec<Rng> = (0..requests.len())
                    .map(|i| Rng::for_item(self.seed, i as u64))
                    .collect();
                let mut samplers: Vec<&mut dyn Sampler> =
                    rngs.iter_mut().map(|r| r as &mut dyn Sampler).collect();
                let run = serve(
                    &target,
                    &mut proposers,
                    &requests,
                    &mut samplers,
                    policy.as_mut(),
                    &params,
                    &temperatures,
                    slots,
                );
                let point = summarize(&policy.name(), slots, self.rate, &run);
                progress.inc(requests.len() as u64);
                progress.update(&format!(
                    "{} C={slots} {:.1} tok/s τ {:.2}",
                    point.policy, point.aggregate_tokens_per_s, point.tau
                ));
                points.push(point);
            }
        }
        progress.finish();
        let greedy = deepspec_core::sampling::is_greedy(params.temperature);
        fill_ratios(&mut points, greedy);
        let report = ServeReport {
            bench: "serve",
            backend: std::any::type_name::<B>().into(),
            target: plan.target.display().to_string(),
            drafter: self.drafter.display().to_string(),
            sets,
            limit: self.limit,
            max_new_tokens: self.max_new_tokens,
            temperature: params.temperature,
            sts_temperatures: temperatures,
            pass_shape: cost.shape,
            sps_table: table,
            points,
        };
        print!("{}", report.table());
        report.write(&self.report)?;
        eprintln!("wrote {}", self.report.display());
        if let Some(dir) = &self.plots {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the plots folder {}", dir.display()))?;
            deepspec_eval::plots::serving_frontier(
                &dir.join("throughput_vs_user_speed.png"),
                &report.points,
            )?;
            deepspec_eval::plots::verified_budget(
                &dir.join("verified_per_request.png"),
                &report.points,
            )?;
            eprintln!("plots in {}", dir.display());
        }
        if greedy
            && report
                .points
                .iter()
                .any(|p| p.identical_to_target_only == Some(false))
        {
            eprintln!(
                "warning: at temperature 0 some policy's outputs differ from target-only's \
                 (see identical_to_target_only in the report)"
            );
        }
        Ok(())
    }
}
