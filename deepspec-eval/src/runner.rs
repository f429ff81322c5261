//! Runs the decoding engine over benchmark sets: chat-templates each turn, feeds answers
//! back for multi-turn sets, and collects traces and statistics.

use crate::datasets::Dataset;
use crate::engine::{decode, DecodeParams, DecodeTrace};
use crate::metrics::AcceptanceStats;
use crate::proposer::{DSparkProposer, Eagle3Proposer, Proposer};
use burn::tensor::backend::Backend;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::io::chat::{ChatTemplate, Message};
use deepspec_core::model::LoadedTarget;
use deepspec_core::sampling::Rng;
use indicatif::ProgressBar;
use std::time::Instant;

pub struct SetRun {
    pub stats: AcceptanceStats,
    pub traces: Vec<DecodeTrace>,
    pub wall_seconds: f64,
    /// Tokens generated (all turns).
    pub generated: usize,
}

/// Builds the proposer for a drafter.
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
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run_set<B: Backend>(
    target: &LoadedTarget<B>,
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    template: &ChatTemplate,
    dataset: &Dataset,
    params: &DecodeParams,
    seed: u64,
    progress: &ProgressBar,
) -> anyhow::Result<SetRun> {
    let started = Instant::now();
    let mut run = SetRun {
        stats: AcceptanceStats::default(),
        traces: Vec::new(),
        wall_seconds: 0.0,
        generated: 0,
    };
    for (index, sample) in dataset.samples.iter().enumerate() {
        let mut messages: Vec<Message> = Vec::new();
        let mut rng = Rng::for_item(seed, index as u64);
        for turn in &sample.turns {
            messages.push(Message::new("user", turn));
            let text = template.render(&messages, true, Some(false))?;
            let prompt = target.tokenizer.encode(&text)?;
            let mut proposer = proposer(drafter, config);
            let trace = decode(target, proposer.as_mut(), &prompt, params, &mut rng);
            let answer_ids = &trace.output_ids[trace.prompt_len..];
            run.generated += answer_ids.len();
            progress.inc(answer_ids.len() as u64);
            let answer = target.tokenizer.decode(answer_ids, true)?;
            messages.push(Message::new("assistant", &answer));
            run.stats.add(&trace);
            run.traces.push(trace);
        }
    }
    run.wall_seconds = started.elapsed().as_secs_f64();
    Ok(run)
}
