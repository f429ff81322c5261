//! `deepspec eval --offline`: τ from a cache, no target in the loop (deepspec_train::offline).

use crate::commands::eval::{lock_outputs, EvalArgs};
use anyhow::{bail, Context};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use deepspec_core::cache::CacheReader;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::io::safetensors::SafetensorsCheckpoint;
use deepspec_core::io::WeightSource;
use deepspec_core::progress::{Progress, ProgressMode};
use deepspec_core::recipe::Recipe;
use deepspec_eval::datasets::Domain;
use deepspec_eval::report::{regression_gate, OfflineSummary, Report, SetReport};
use deepspec_eval::traces::{PromptRecord, RoundRecord, TraceWriter};
use deepspec_train::data::{CacheSource, SampleSource};
use deepspec_train::offline::{offline_eval, OfflineOptions, OfflineRound};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Loads the drafter for scoring: a training checkpoint stands alone; a DeepSeek-V4 export
/// (the `mtp.*` tensors only) takes the frozen embedding and head from the recipe's target.
fn load_drafter<B: burn::tensor::backend::AutodiffBackend>(
    dir: &Path,
    target: &Path,
    device: &B::Device,
) -> anyhow::Result<(Drafter<B>, DrafterConfig)> {
    let config = DrafterConfig::from_file(&dir.join("config.json"))?;
    let standalone = config.v4.is_none()
        || SafetensorsCheckpoint::open_dir(dir)
            .map(|src| src.contains("embed.weight"))
            .unwrap_or(true);
    Ok(if standalone {
        Drafter::<B>::load(dir, device)?
    } else {
        Drafter::<B>::load_export(dir, target, device)?
    })
}

pub fn run<B: Backend>(
    args: &EvalArgs,
    recipe_path: &Path,
    recipe: &Recipe,
    device: B::Device,
) -> anyhow::Result<bool> {
    if args.plots.is_some() {
        bail!("--plots draws the online eval's figures; an offline report has none (drop --plots)");
    }
    let temperature = args.temperature.unwrap_or(recipe.eval.temperature);
    if temperature != 0.0 && temperature != 1.0 {
        bail!(
            "--offline scores T = 0 (greedy agreement) and T = 1 (rejection sampling); the temperature is {temperature} (from {}): pass --temperature 0 or 1",
            if args.temperature.is_some() { "--temperature" } else { "the recipe's eval.temperature" }
        );
    }
    let Some(cache) = args.cache.clone().or(recipe.data.target_cache_path.clone()) else {
        bail!(
            "--offline needs a cache: pass --cache DIR or set data.target_cache_path in {}",
            recipe_path.display()
        );
    };
    crate::commands::require_checkpoint_dir(&args.drafter, "--drafter")?;
    let mut _locks = lock_outputs(&args.report, None, None)?;
    if let Some(t) = &args.traces {
        _locks.extend(lock_outputs(t, None, None)?);
    }
    let reader = CacheReader::open(&cache)
        .with_context(|| format!("opening --cache {}", cache.display()))?;
    let (drafter, config) = load_drafter::<Autodiff<B>>(
        &args.drafter,
        &recipe.model.target_model_name_or_path,
        &device,
    )
    .with_context(|| format!("loading drafter {}", args.drafter.display()))?;
    let m = &reader.manifest;
    if config.target_layer_ids != m.target_layer_ids || config.base.hidden_size != m.hidden_size {
        bail!(
            "{}: the drafter reads layers {} of hidden size {}, the cache {} holds layers {} of hidden size {}: score a drafter against a cache of its own target and taps",
            args.drafter.display(),
            config.target_layer_ids,
            config.base.hidden_size,
            cache.display(),
            m.target_layer_ids,
            m.hidden_size
        );
    }
    let seed = args.seed.unwrap_or(recipe.eval.seed);
    let opts = OfflineOptions {
        seed,
        limit: args.limit,
        batch_size: args.batch_size,
        max_length: recipe.data.max_length,
        head_chunk_tokens: recipe.train.head_chunk_tokens,
    };
    let tok = deepspec_core::model::load_target_meta(&recipe.model.target_model_name_or_path)
        .ok()
        .map(|(_, tok)| tok);
    let data = CacheSource { reader };
    let set_name = cache
        .file_name()
        .map_or("cache".into(), |n| n.to_string_lossy().into_owned());
    let total = opts.limit.unwrap_or(usize::MAX).min(data.len());
    let progress = Progress::new(ProgressMode::detect(), "offline", total as u64, "samples");
    let mut traces = match &args.traces {
        Some(path) => Some(TraceWriter::create(path)?),
        None => None,
    };
    let mut failure: Option<anyhow::Error> = None;
    let mut per_sample: BTreeMap<usize, (usize, f64)> = BTreeMap::new();
    let mut round_index: BTreeMap<usize, usize> = BTreeMap::new();
    let started = Instant::now();
    let mut done = 0;
    let stats = offline_eval(
        &drafter,
        &config,
        &data,
        &opts,
        |r: &OfflineRound| {
            let tokens = if temperature == 0.0 {
                r.accepted_greedy as f64 + 1.0
            } else {
                r.accepted_expected + 1.0
            };
            let e = per_sample.entry(r.sample).or_default();
            e.0 += 1;
            e.1 += tokens;
            let Some(out) = &mut traces else { return };
            let i = round_index.entry(r.sample).or_default();
            let record = RoundRecord {
                kind: "round",
                mode: "offline",
                set: &set_name,
                prompt: r.sample,
                turn: 0,
                round: *i,
                position: r.position,
                proposed: &r.proposed,
                accepted: r.accepted_greedy,
                bonus: r.continuation.get(r.accepted_greedy).copied(),
                confidences: r.confidences.clone(),
                expected_accepted: Some(r.accepted_expected),
                accept_probability: Some(&r.accept_probability),
            };
            *i += 1;
            if let Err(e) = out.write(&record) {
                failure.get_or_insert(e);
            }
        },
        |end| {
            progress.inc((end - done) as u64);
            done = end;
        },
    )?;
    progress.finish();
    if let Some(e) = failure {
        return Err(e.context("writing --traces"));
    }
    if let Some(mut out) = traces {
        // Each sample's line: its ids and text, and its τ at the report's temperature.
        for i in 0..total {
            let sample = data.sample(i)?;
            let ids: Vec<u32> = sample.input_ids.iter().map(|&t| t as u32).collect();
            let (rounds, tokens) = per_sample.get(&i).copied().unwrap_or_default();
            let text = match &tok {
                Some(tok) => tok.decode(&ids, false)?,
                None => String::new(),
            };
            out.write(&PromptRecord {
                kind: "prompt",
                mode: "offline",
                set: &set_name,
                prompt: i,
                turn: 0,
                output_ids: &ids,
                prompt_len: sample
                    .loss_mask
                    .iter()
                    .position(|&m| m == 1)
                    .unwrap_or(ids.len()),
                text,
                rounds,
                tau: tokens / rounds.max(1) as f64,
            })?;
        }
        out.finish()?;
        eprintln!("traces: {}", args.traces.as_ref().unwrap().display());
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    let (tau, table, tokens) = if temperature == 0.0 {
        (stats.tau_greedy(), &stats.greedy, stats.tokens_greedy)
    } else {
        (stats.tau_expected(), &stats.expected, stats.tokens_expected)
    };
    let mut report = Report {
        mode: "offline".into(),
        macro_tau: 0.0,
        domain_tau: BTreeMap::new(),
        sets: BTreeMap::new(),
        missing_sets: Vec::new(),
        target: recipe.model.target_model_name_or_path.display().to_string(),
        drafter: args.drafter.display().to_string(),
        algorithm: config.algorithm.name().to_string(),
        temperature,
        max_new_tokens: 0,
        confidence_threshold: 0.0,
        policy: "full".into(),
        calibration: None,
        offline: Some(OfflineSummary {
            cache: cache.display().to_string(),
            samples: stats.samples,
            rounds: stats.rounds,
            anchor_seed: seed,
            tau_greedy: stats.tau_greedy(),
            tau_expected: stats.tau_expected(),
            conditional_acceptance_greedy: stats.greedy.conditional(),
            conditional_acceptance_expected: stats.expected.conditional(),
        }),
    };
    report.sets.insert(
        set_name.clone(),
        SetReport {
            domain: Domain::Custom,
            samples: stats.samples,
            tau,
            rounds: stats.rounds,
            tokens: tokens.round() as usize,
            conditional_acceptance: table.conditional(),
            wall_seconds,
        },
    );
    report.aggregate();
    report.write(&args.report)?;
    println!("{}", report.markdown());
    println!(
        "offline (teacher-forced on {}): τ {:.3} at T = 0, {:.3} at T = 1 over {} anchors of {} samples in {wall_seconds:.1} s",
        cache.display(),
        stats.tau_greedy(),
        stats.tau_expected(),
        stats.rounds,
        stats.samples
    );
    eprintln!("report: {}", args.report.display());
    if let Some(baseline) = &args.baseline {
        let (lines, ok) = regression_gate(&report, baseline, args.tolerance)?;
        for line in &lines {
            println!("{line}");
        }
        return Ok(ok);
    }
    Ok(true)
}
