//! Runs the decoding engine over benchmark sets: chat-templates each turn, feeds answers
//! back for multi-turn sets, and collects traces and statistics.

use crate::datasets::Dataset;
use crate::engine::{decode_scheduled, DecodeParams, DecodeTrace};
use crate::metrics::AcceptanceStats;
use crate::proposer::{DSparkProposer, Eagle3Proposer, Proposer};
use crate::schedule::Schedule;
use burn::tensor::backend::Backend;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::io::chat::{ChatTemplate, Message};
use deepspec_core::io::tokenizer::Tok;
use deepspec_core::model::LoadedTarget;
use deepspec_core::progress::Progress;
use deepspec_core::sampling::{Rng, Sampler};
use std::time::Instant;

pub struct SetRun {
    pub stats: AcceptanceStats,
    pub traces: Vec<DecodeTrace>,
    /// `(sample index in the set, turn)` of each trace.
    pub trace_ids: Vec<(usize, usize)>,
    pub wall_seconds: f64,
    /// Tokens generated (all turns).
    pub generated: usize,
}

/// The token ids of an evaluation prompt: the conversation so far, rendered in Qwen3's
/// no-thinking mode as the reference evaluates (other templates ignore the flag).
pub fn turn_prompt(
    template: &ChatTemplate,
    tok: &Tok,
    messages: &[Message],
) -> anyhow::Result<Vec<u32>> {
    template.prompt_ids(tok, messages, Some(false))
}

/// Whether `drafter` can be evaluated online (drafting against a target this binary runs).
/// DeepSeek-V4 drafters cannot: their target does not run in deepspec.
pub fn check_online<B: Backend>(drafter: &Drafter<B>) -> anyhow::Result<()> {
    if matches!(drafter, Drafter::DSparkV4(_)) {
        anyhow::bail!(
            "DeepSeek-V4 drafters cannot be evaluated online here: their target does not run in deepspec (serve it with SGLang or vLLM, which load the exported drafter)"
        );
    }

    Ok(())
}

/// Builds the proposer for a drafter ([`check_online`] first: a DeepSeek-V4 drafter has
/// none).
pub fn proposer<'m, B: Backend>(
    drafter: &'m Drafter<B>,
    config: &DrafterConfig,
) -> Box<dyn Proposer<B> + 'm> {
    let rope = config.base.rope();
    match drafter {
        Drafter::DSpark(m) => Box::new(DSparkProposer::new(
            m,
            rope,
            config.block_size,
            config
                .mask_token_id
                .expect("DSpark configs carry mask_token_id"),
        )),
        Drafter::Eagle3(m) => Box::new(Eagle3Proposer::new(m, rope, config.block_size)),
        Drafter::DSparkGemma4(m) => Box::new(DSparkProposer::new(
            m,
            rope,
            config.block_size,
            config
                .mask_token_id
                .expect("DSpark configs carry mask_token_id"),
        )),
        Drafter::Eagle3Gemma4(m) => Box::new(Eagle3Proposer::new(m, rope, config.block_size)),
        Drafter::DSparkV4(_) => panic!("{}", check_online(drafter).unwrap_err()),
    }
}

/// Decodes every sample of `dataset`, `batch_size` samples at a time: turn `t` of every
/// sample in a batch that has one decodes together, then each answer is fed back before turn
/// `t + 1`. Sample `i` draws from its own generator (`seed`, `i`), so the batch size changes
/// speed, not results. `progress` counts turns (a sample's user messages), updated after
/// every batch with the tokens, tokens/s and τ so far.
#[allow(clippy::too_many_arguments)]
pub fn run_set<B: Backend>(
    target: &LoadedTarget<B>,
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    template: &ChatTemplate,
    dataset: &Dataset,
    params: &DecodeParams,
    seed: u64,
    batch_size: usize,
    schedule: &Schedule,
    progress: &Progress,
) -> anyhow::Result<SetRun> {
    check_online(drafter)?;
    let started = Instant::now();
    let mut run = SetRun {
        stats: AcceptanceStats::default(),
        traces: Vec::new(),
        trace_ids: Vec::new(),
        wall_seconds: 0.0,
        generated: 0,
    };
    let indexed: Vec<(usize, &_)> = dataset.samples.iter().enumerate().collect();
    for chunk in indexed.chunks(batch_size.max(1)) {
        let mut rngs: Vec<Rng> = chunk
            .iter()
            .map(|(i, _)| Rng::for_item(seed, *i as u64))
            .collect();
        let mut messages: Vec<Vec<Message>> = vec![Vec::new(); chunk.len()];
        let mut traces: Vec<Vec<DecodeTrace>> = vec![Vec::new(); chunk.len()];
        let turns = chunk.iter().map(|(_, s)| s.turns.len()).max().unwrap_or(0);
        for turn in 0..turns {
            let rows: Vec<usize> = (0..chunk.len())
                .filter(|&r| turn < chunk[r].1.turns.len())
                .collect();
            let mut prompts = Vec::with_capacity(rows.len());
            for &r in &rows {
                messages[r].push(Message::new("user", &chunk[r].1.turns[turn]));
                prompts.push(turn_prompt(template, &target.tokenizer, &messages[r])?);
            }
            let mut boxed: Vec<Box<dyn Proposer<B> + '_>> =
                rows.iter().map(|_| proposer(drafter, config)).collect();
            let mut proposers: Vec<&mut dyn Proposer<B>> =
                boxed.iter_mut().map(|p| p.as_mut() as _).collect();
            let mut samplers: Vec<&mut dyn Sampler> = rngs
                .iter_mut()
                .enumerate()
                .filter(|(r, _)| rows.contains(r))
                .map(|(_, g)| g as &mut dyn Sampler)
                .collect();
            let mut policy = schedule.policy()?;
            let decoded = decode_scheduled(
                target,
                &mut proposers,
                &prompts,
                params,
                &mut samplers,
                policy.as_mut(),
                &schedule.temperatures,
            );
            for (&r, trace) in rows.iter().zip(decoded) {
                let answer_ids = &trace.output_ids[trace.prompt_len..];
                run.generated += answer_ids.len();
                let answer = target.tokenizer.decode(answer_ids, true)?;
                messages[r].push(Message::new("assistant", &answer));
                run.stats.add(&trace);
                traces[r].push(trace);
            }
            progress.inc(rows.len() as u64);
            progress.update(&format!(
                "tokens={} tok/s={:.1} tau={:.3}",
                run.generated,
                run.generated as f64 / started.elapsed().as_secs_f64().max(1e-9),
                run.stats.tau()
            ));
        }
        // Traces in sample order, each sample's turns together.
        for ((i, _), sample_traces) in chunk.iter().zip(traces) {
            run.trace_ids
                .extend((0..sample_traces.len()).map(|turn| (*i, turn)));
            run.traces.extend(sample_traces);
        }
    }
    run.wall_seconds = started.elapsed().as_secs_f64();
    Ok(run)
}
