//! The verifying decoding loop (the reference's `eval.py`): prefill the target, then per round let
//! the drafter propose, verify `[current + drafts]` in one target pass, commit the accepted
//! drafts plus the correction/bonus token, and roll the target cache back.

use crate::proposer::Proposer;
use crate::schedule::{Threshold, VerifyPolicy};
use crate::serve::{serve, Request};
use burn::tensor::backend::Backend;
use deepspec_core::model::LoadedTarget;
use deepspec_core::sampling::Sampler;

#[derive(Debug, Clone)]
pub struct DecodeParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub confidence_threshold: f64,
    pub stop_ids: Vec<u32>,
    /// The target layers whose outputs the drafter reads.
    pub target_layer_ids: Vec<usize>,
}

/// One verification round.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// Position of the current token.
    pub start: usize,
    /// The current token followed by the drafts.
    pub verify_input_ids: Vec<u32>,
    pub accepted: usize,
    pub effective_proposal_length: usize,
    pub terminated_by_stop: bool,
    pub next_token: u32,
    pub committed: Vec<u32>,
    pub confidence_logits: Vec<f32>,
    pub uniforms: Vec<f64>,
    pub p_target: Vec<f64>,
    pub q_draft: Vec<f64>,
}

impl Round {
    /// Tokens this round adds per verification, the bonus included (τ's summand).
    pub fn acceptance_length(&self) -> usize {
        if self.terminated_by_stop {
            self.accepted
        } else {
            self.accepted + 1
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeTrace {
    /// Prompt followed by everything generated, cut after the first stop token.
    pub output_ids: Vec<u32>,
    pub prompt_len: usize,
    pub rounds: Vec<Round>,
}

impl DecodeTrace {
    pub fn acceptance_lengths(&self) -> Vec<usize> {
        self.rounds.iter().map(Round::acceptance_length).collect()
    }
}

/// Decodes one prompt speculatively.
pub fn decode<B: Backend>(
    target: &LoadedTarget<B>,
    proposer: &mut dyn Proposer<B>,
    prompt: &[u32],
    params: &DecodeParams,
    sampler: &mut dyn Sampler,
) -> DecodeTrace {
    decode_batch(
        target,
        &mut [proposer],
        &[prompt.to_vec()],
        params,
        &mut [sampler],
    )
    .pop()
    .expect("one trace per prompt")
}

/// Decodes several prompts as one batch: one target pass per round verifies every unfinished
/// row's block, rows of different lengths side by side (left-padded; the cache keeps each
/// row's own positions and rolls rows back independently). Row `b` drafts with
/// `proposers[b]` and draws from `samplers[b]`, so a row decodes as it would alone. Each row
/// verifies its drafts up to the first below `params.confidence_threshold` (every draft at 0).
pub fn decode_batch<B: Backend>(
    target: &LoadedTarget<B>,
    proposers: &mut [&mut dyn Proposer<B>],
    prompts: &[Vec<u32>],
    params: &DecodeParams,
    samplers: &mut [&mut dyn Sampler],
) -> Vec<DecodeTrace> {
    decode_scheduled(
        target,
        proposers,
        prompts,
        params,
        samplers,
        &mut Threshold(params.confidence_threshold),
        &[],
    )
}

/// [`decode_batch`] verifying what `policy` chooses, confidences read through the STS
/// `temperatures` (empty: raw).
pub fn decode_scheduled<B: Backend>(
    target: &LoadedTarget<B>,
    proposers: &mut [&mut dyn Proposer<B>],
    prompts: &[Vec<u32>],
    params: &DecodeParams,
    samplers: &mut [&mut dyn Sampler],
    policy: &mut dyn VerifyPolicy,
    temperatures: &[f64],
) -> Vec<DecodeTrace> {
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            arrival: 0.0,
        })
        .collect();
    serve(
        target,
        proposers,
        &requests,
        samplers,
        policy,
        params,
        temperatures,
        prompts.len(),
    )
    .requests
    .into_iter()
    .map(|s| s.trace)
    .collect()
}
