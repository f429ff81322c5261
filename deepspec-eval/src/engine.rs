//! The verifying decoding loop (DEEPSPEC-SPEC §6.3): prefill the target, then per round let
//! the drafter propose, verify `[current + drafts]` in one target pass, commit the accepted
//! drafts plus the correction/bonus token, and roll the target cache back.

use crate::proposer::{ProposeParams, Proposer};
use crate::verify::{probs, verify};
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::model::{KvCache, LoadedTarget, LogitsFor};
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

fn rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [_, n, v] = logits.dims();
    let flat = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap();
    (0..n).map(|i| flat[i * v..(i + 1) * v].to_vec()).collect()
}

/// Concatenates tapped layer outputs on the feature axis: `[1, n, n_t*H]`.
fn features<B: Backend>(tapped: Vec<Tensor<B, 3>>) -> Tensor<B, 3> {
    Tensor::cat(tapped, 2)
}

/// Decodes one prompt speculatively.
pub fn decode<B: Backend>(
    target: &LoadedTarget<B>,
    proposer: &mut dyn Proposer<B>,
    prompt: &[u32],
    params: &DecodeParams,
    sampler: &mut dyn Sampler,
) -> DecodeTrace {
    let n = prompt.len();
    let max_len = n + params.max_new_tokens;
    let mut cache = KvCache::<B>::new(target.model.num_layers(), 1);
    let prefill = target.model.step(
        &target.rope,
        &[prompt.iter().copied().map(Some).collect()],
        &mut cache,
        &params.target_layer_ids,
        LogitsFor::Last,
    );
    let last = rows(prefill.logits.expect("logits"));
    let first = sampler.sample(&probs(&last[0], params.temperature));
    let mut out: Vec<u32> = prompt.to_vec();
    out.push(first);
    let mut trace = DecodeTrace {
        output_ids: Vec::new(),
        prompt_len: n,
        rounds: Vec::new(),
    };
    if params.stop_ids.contains(&first) {
        trace.output_ids = out;
        return trace;
    }
    proposer.init(features(prefill.tapped), prompt, first);
    let propose_params = ProposeParams {
        temperature: params.temperature,
        confidence_threshold: params.confidence_threshold,
        stop_ids: params.stop_ids.clone(),
    };
    let mut start = n;
    while start < max_len {
        let current = out[start];
        let proposal = proposer.propose(current, start, &propose_params, sampler);
        let mut verify_ids = vec![current];
        verify_ids.extend_from_slice(&proposal.tokens);
        let pass = target.model.step(
            &target.rope,
            &[verify_ids.iter().copied().map(Some).collect()],
            &mut cache,
            &params.target_layer_ids,
            LogitsFor::All,
        );
        let target_probs: Vec<Vec<f64>> = rows(pass.logits.expect("logits"))
            .iter()
            .map(|r| probs(r, params.temperature))
            .collect();
        let verdict = verify(
            &proposal.tokens,
            &target_probs,
            &proposal.probs,
            &params.stop_ids,
            sampler,
        );
        let a = verdict.accepted;
        out.truncate(start + 1);
        out.extend_from_slice(&proposal.tokens[..a]);
        let mut committed: Vec<u32> = proposal.tokens[..a].to_vec();
        if !verdict.terminated_by_stop {
            committed.push(verdict.next_token);
        }
        let round = Round {
            start,
            verify_input_ids: verify_ids,
            accepted: a,
            effective_proposal_length: verdict.effective_len,
            terminated_by_stop: verdict.terminated_by_stop,
            next_token: verdict.next_token,
            committed: committed.clone(),
            confidence_logits: proposal.confidence_logits,
            uniforms: verdict.uniforms,
            p_target: verdict.p_target,
            q_draft: verdict.q_draft,
        };
        trace.rounds.push(round);
        if verdict.terminated_by_stop {
            start += a;
            cache.truncate(0, start);
            break;
        }
        out.push(verdict.next_token);
        start += a + 1;
        cache.truncate(0, start);
        let kept: Vec<Tensor<B, 3>> = pass
            .tapped
            .into_iter()
            .map(|t| t.narrow(1, 0, a + 1))
            .collect();
        proposer.update(features(kept), &committed, start - a - 1);
        if committed.iter().any(|t| params.stop_ids.contains(t)) {
            break;
        }
    }
    // The last round may overshoot `max_len`; its tokens count in the rounds, but the output
    // stops at `max_len` (and after the first stop token), as the reference reports it.
    out.truncate(max_len);
    if let Some(stop) = out[n..].iter().position(|t| params.stop_ids.contains(t)) {
        out.truncate(n + stop + 1);
    }
    trace.output_ids = out;
    trace
}
