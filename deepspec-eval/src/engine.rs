//! The verifying decoding loop (the reference's `eval.py`): prefill the target, then per round let
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

/// Logits `[batch, n, V]` as `batch * n` host rows.
fn rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    deepspec_core::model::host_rows(logits)
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

/// One prompt's progress through the batch.
struct RowState {
    out: Vec<u32>,
    /// Position of the current token (committed, not yet in the target's cache).
    start: usize,
    max_len: usize,
    done: bool,
    trace: DecodeTrace,
}

/// `[1, n, C]` of row `b` starting at column `first` of every tapped layer.
fn row_features<B: Backend>(
    tapped: &[Tensor<B, 3>],
    b: usize,
    first: usize,
    n: usize,
) -> Tensor<B, 3> {
    features(
        tapped
            .iter()
            .map(|t| t.clone().narrow(0, b, 1).narrow(1, first, n))
            .collect(),
    )
}

/// `rows` left-padded with `None` to the longest; rows not in `active` are all padding.
fn left_padded(rows: &[Vec<u32>], active: &[bool]) -> Vec<Vec<Option<u32>>> {
    let width = rows
        .iter()
        .zip(active)
        .filter(|(_, &a)| a)
        .map(|(r, _)| r.len())
        .max()
        .unwrap_or(0);
    rows.iter()
        .zip(active)
        .map(|(r, &a)| {
            let mut row = vec![None; width];
            if a {
                for (slot, &t) in row[width - r.len()..].iter_mut().zip(r) {
                    *slot = Some(t);
                }
            }
            row
        })
        .collect()
}

/// Decodes several prompts as one batch: one target pass per round verifies every unfinished
/// row's block, rows of different lengths side by side (left-padded; the cache keeps each
/// row's own positions and rolls rows back independently). Row `b` drafts with
/// `proposers[b]` and draws from `samplers[b]`, so a row decodes as it would alone.
pub fn decode_batch<B: Backend>(
    target: &LoadedTarget<B>,
    proposers: &mut [&mut dyn Proposer<B>],
    prompts: &[Vec<u32>],
    params: &DecodeParams,
    samplers: &mut [&mut dyn Sampler],
) -> Vec<DecodeTrace> {
    let batch = prompts.len();
    assert_eq!(proposers.len(), batch, "one proposer per prompt");
    assert_eq!(samplers.len(), batch, "one sampler per prompt");
    if batch == 0 {
        return Vec::new();
    }
    let mut cache = KvCache::<B>::new(target.model.num_layers(), batch);
    let everyone = vec![true; batch];
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prefill = target.model.step(
        &target.rope,
        &left_padded(prompts, &everyone),
        &mut cache,
        &params.target_layer_ids,
        LogitsFor::Last,
    );
    let last = rows(prefill.logits.expect("logits"));
    let propose_params = ProposeParams {
        temperature: params.temperature,
        confidence_threshold: params.confidence_threshold,
        stop_ids: params.stop_ids.clone(),
    };
    let mut state: Vec<RowState> = Vec::with_capacity(batch);
    for (b, prompt) in prompts.iter().enumerate() {
        let n = prompt.len();
        let first = samplers[b].sample(&probs(&last[b], params.temperature));
        let mut out = prompt.clone();
        out.push(first);
        let done = params.stop_ids.contains(&first);
        if !done {
            let feats = row_features(&prefill.tapped, b, width - n, n);
            proposers[b].init(feats, prompt, first);
        }
        state.push(RowState {
            out,
            start: n,
            max_len: n + params.max_new_tokens,
            done,
            trace: DecodeTrace {
                output_ids: Vec::new(),
                prompt_len: n,
                rounds: Vec::new(),
            },
        });
    }
    loop {
        let active: Vec<bool> = state
            .iter()
            .map(|r| !r.done && r.start < r.max_len)
            .collect();
        if !active.iter().any(|&a| a) {
            break;
        }
        let mut proposals = Vec::with_capacity(batch);
        let mut verify_rows = Vec::with_capacity(batch);
        for (b, row) in state.iter().enumerate() {
            if !active[b] {
                proposals.push(None);
                verify_rows.push(Vec::new());
                continue;
            }
            let current = row.out[row.start];
            let proposal =
                proposers[b].propose(current, row.start, &propose_params, &mut *samplers[b]);
            let mut ids = vec![current];
            ids.extend_from_slice(&proposal.tokens);
            verify_rows.push(ids);
            proposals.push(Some(proposal));
        }
        let width = verify_rows.iter().map(Vec::len).max().unwrap_or(0);
        let pass = target.model.step(
            &target.rope,
            &left_padded(&verify_rows, &active),
            &mut cache,
            &params.target_layer_ids,
            LogitsFor::All,
        );
        let logits = rows(pass.logits.expect("logits"));
        for (b, proposal) in proposals.into_iter().enumerate() {
            let Some(proposal) = proposal else { continue };
            let row = &mut state[b];
            let verify_ids = std::mem::take(&mut verify_rows[b]);
            let first_col = width - verify_ids.len();
            let target_probs: Vec<Vec<f64>> = logits[b * width + first_col..(b + 1) * width]
                .iter()
                .map(|r| probs(r, params.temperature))
                .collect();
            let verdict = verify(
                &proposal.tokens,
                &target_probs,
                &proposal.probs,
                &params.stop_ids,
                &mut *samplers[b],
            );
            let a = verdict.accepted;
            let start = row.start;
            row.out.truncate(start + 1);
            row.out.extend_from_slice(&proposal.tokens[..a]);
            let mut committed: Vec<u32> = proposal.tokens[..a].to_vec();
            if !verdict.terminated_by_stop {
                committed.push(verdict.next_token);
            }
            row.trace.rounds.push(Round {
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
            });
            if verdict.terminated_by_stop {
                row.start += a;
                cache.truncate(b, row.start);
                row.done = true;
                continue;
            }
            row.out.push(verdict.next_token);
            row.start += a + 1;
            cache.truncate(b, row.start);
            proposers[b].update(
                row_features(&pass.tapped, b, first_col, a + 1),
                &committed,
                start,
            );
            if committed.iter().any(|t| params.stop_ids.contains(t)) {
                row.done = true;
            }
        }
    }
    state
        .into_iter()
        .map(|mut row| {
            // The last round may overshoot `max_len`; its tokens count in the rounds, but the
            // output stops at `max_len` (and after the first stop token), as the reference
            // reports it.
            let n = row.trace.prompt_len;
            row.out.truncate(row.max_len);
            if let Some(stop) = row.out[n..]
                .iter()
                .position(|t| params.stop_ids.contains(t))
            {
                row.out.truncate(n + stop + 1);
            }
            row.trace.output_ids = row.out;
            row.trace
        })
        .collect()
}
