//! The serving loop: continuous batching over a fixed number of slots. A request waits until
//! it has arrived and a slot is free, is prefilled alone and joins the running batch; then
//! each round every active request drafts, the verification policy picks how many of each
//! request's drafts the round verifies, and one target pass verifies every active request's
//! chosen prefix (rows of different lengths side by side, left-padded; rejection sampling per
//! row). A finished request leaves at once and its slot takes the next waiting request.
//!
//! `engine::decode_batch` is this loop with every request arriving at once and as many slots
//! as requests.

use crate::engine::{DecodeParams, DecodeTrace, Round};
use crate::proposer::{Proposal, ProposeParams, Proposer};
use crate::schedule::{confidences, Candidate, VerifyPolicy};
use crate::verify::{probs, verify};
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::model::{KvCache, LoadedTarget, LogitsFor};
use deepspec_core::sampling::Sampler;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One request: its prompt and when it arrives (seconds after the run starts).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub arrival: f64,
}

/// What one round cost and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundCost {
    /// Requests decoding this round.
    pub requests: usize,
    /// Draft tokens on offer, over all requests.
    pub drafted: usize,
    /// Draft tokens verified (`Σ ℓ_r`).
    pub verified: usize,
    /// Token slots of the target pass (rows × widest row).
    pub pass_tokens: usize,
    /// Tokens committed (accepted drafts plus bonus/correction tokens).
    pub committed: usize,
    /// Seconds spent drafting (every request's proposal).
    pub draft_s: f64,
    /// Seconds of the target pass, its logits read back.
    pub verify_s: f64,
    /// Everything else: scheduling, probabilities, rejection sampling, cache bookkeeping.
    pub host_s: f64,
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Served {
    pub trace: DecodeTrace,
    /// Seconds after the start: arrival, admission (prefill start), first token, finish.
    pub arrival: f64,
    pub admitted: f64,
    pub first_token: f64,
    pub finished: f64,
}

impl Served {
    /// Tokens generated (the output past the prompt).
    pub fn new_tokens(&self) -> usize {
        self.trace.output_ids.len() - self.trace.prompt_len
    }

    /// The request's decode speed: tokens after the first over the time it took to make
    /// them (`None` for a request that made one token or none).
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        let n = self.new_tokens();
        let dt = self.finished - self.first_token;
        (n > 1 && dt > 0.0).then(|| (n - 1) as f64 / dt)
    }
}

/// A whole serving run.
#[derive(Debug, Clone)]
pub struct ServeRun {
    /// In request order.
    pub requests: Vec<Served>,
    pub rounds: Vec<RoundCost>,
    /// Seconds spent in prefill passes.
    pub prefill_s: f64,
    pub wall_s: f64,
}

/// A request in a slot.
struct Active {
    request: usize,
    out: Vec<u32>,
    /// Position of the current token (committed, not yet in the target's cache).
    start: usize,
    max_len: usize,
    trace: DecodeTrace,
    admitted: f64,
    first_token: f64,
}

/// `rows` left-padded with `None` to the longest; `None` rows are all padding.
fn left_padded(rows: &[Option<Vec<u32>>]) -> Vec<Vec<Option<u32>>> {
    let width = rows.iter().flatten().map(Vec::len).max().unwrap_or(0);
    rows.iter()
        .map(|r| {
            let mut row = vec![None; width];
            if let Some(r) = r {
                for (slot, &t) in row[width - r.len()..].iter_mut().zip(r) {
                    *slot = Some(t);
                }
            }
            row
        })
        .collect()
}

/// `[1, n, C]` of row `b` starting at column `first` of every tapped layer.
fn row_features<B: Backend>(
    tapped: &[Tensor<B, 3>],
    b: usize,
    first: usize,
    n: usize,
) -> Tensor<B, 3> {
    Tensor::cat(
        tapped
            .iter()
            .map(|t| t.clone().narrow(0, b, 1).narrow(1, first, n))
            .collect(),
        2,
    )
}

/// The output as the reference reports it: cut at `max_len` (the last round may overshoot;
/// its tokens still count in the rounds) and after the first stop token.
fn finish(mut active: Active, stop_ids: &[u32]) -> DecodeTrace {
    let n = active.trace.prompt_len;
    active.out.truncate(active.max_len);
    if let Some(stop) = active.out[n..].iter().position(|t| stop_ids.contains(t)) {
        active.out.truncate(n + stop + 1);
    }
    active.trace.output_ids = active.out;
    active.trace
}

/// Serves `requests` through `slots` slots. Request `i` drafts with `proposers[i]` and
/// draws from `samplers[i]`, so it decodes as it would alone; `temperatures` are the STS
/// temperatures its confidences are read through (empty: none).
#[allow(clippy::too_many_arguments)]
pub fn serve<B: Backend>(
    target: &LoadedTarget<B>,
    proposers: &mut [&mut dyn Proposer<B>],
    requests: &[Request],
    samplers: &mut [&mut dyn Sampler],
    policy: &mut dyn VerifyPolicy,
    params: &DecodeParams,
    temperatures: &[f64],
    slots: usize,
) -> ServeRun {
    let n = requests.len();
    assert_eq!(proposers.len(), n, "one proposer per request");
    assert_eq!(samplers.len(), n, "one sampler per request");
    let clock = Instant::now();
    let now = || clock.elapsed().as_secs_f64();
    let mut run = ServeRun {
        requests: Vec::with_capacity(n),
        rounds: Vec::new(),
        prefill_s: 0.0,
        wall_s: 0.0,
    };
    if n == 0 {
        return run;
    }
    let slots = slots.clamp(1, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| requests[a].arrival.total_cmp(&requests[b].arrival));
    let mut waiting = order.into_iter().peekable();
    let mut done: Vec<Option<Served>> = vec![None; n];
    let mut cache = KvCache::<B>::new(target.model.num_layers(), slots);
    let mut rows: Vec<Option<Active>> = (0..slots).map(|_| None).collect();
    let propose_params = ProposeParams {
        temperature: params.temperature,
        stop_ids: params.stop_ids.clone(),
    };
    let retire = |active: Active, done: &mut Vec<Option<Served>>, at: f64| {
        let request = active.request;
        let (admitted, first_token) = (active.admitted, active.first_token);
        done[request] = Some(Served {
            trace: finish(active, &params.stop_ids),
            arrival: requests[request].arrival,
            admitted,
            first_token,
            finished: at,
        });
    };
    loop {
        // Admission: arrived requests take free slots, each prefilled alone.
        for (slot, free) in rows.iter_mut().enumerate() {
            if free.is_some() {
                continue;
            }
            let Some(&next) = waiting.peek() else { break };
            if requests[next].arrival > now() {
                break;
            }
            waiting.next();
            let admitted = now();
            let prompt = &requests[next].prompt;
            let mut row_cache = KvCache::<B>::new(target.model.num_layers(), 1);
            let prefill = target.model.step(
                &target.rope,
                &[prompt.iter().map(|&t| Some(t)).collect()],
                &mut row_cache,
                &params.target_layer_ids,
                LogitsFor::Last,
            );
            let last = deepspec_core::model::host_rows(prefill.logits.expect("logits"));
            let first = samplers[next].sample(&probs(&last[0], params.temperature));
            let mut out = prompt.clone();
            out.push(first);
            let len = prompt.len();
            let active = Active {
                request: next,
                out,
                start: len,
                max_len: len + params.max_new_tokens,
                trace: DecodeTrace {
                    output_ids: Vec::new(),
                    prompt_len: len,
                    rounds: Vec::new(),
                },
                admitted,
                first_token: now(),
            };
            run.prefill_s += now() - admitted;
            if params.stop_ids.contains(&first) || active.start >= active.max_len {
                retire(active, &mut done, now());
                continue;
            }
            proposers[next].init(row_features(&prefill.tapped, 0, 0, len), prompt, first);
            cache.load_row(slot, &row_cache);
            *free = Some(active);
        }
        if rows.iter().all(Option::is_none) {
            match waiting.peek() {
                None => break,
                Some(&next) => {
                    let wait = requests[next].arrival - now();
                    if wait > 0.0 {
                        std::thread::sleep(Duration::from_secs_f64(wait));
                    }
                    continue;
                }
            }
        }

        // Drafting.
        let round_start = now();
        let ids: Vec<usize> = rows.iter().flatten().map(|a| a.request).collect();
        let draft_now = policy.draft_this_round(&ids);
        let mut proposals: Vec<Option<Proposal>> = Vec::with_capacity(slots);
        for row in rows.iter() {
            proposals.push(row.as_ref().map(|a| {
                if draft_now {
                    let current = a.out[a.start];
                    proposers[a.request].propose(
                        current,
                        a.start,
                        &propose_params,
                        &mut *samplers[a.request],
                    )
                } else {
                    Proposal::default()
                }
            }));
        }
        let draft_s = now() - round_start;

        // Scheduling: how many drafts of each request the pass verifies.
        let active_slots: Vec<usize> = (0..slots).filter(|&s| rows[s].is_some()).collect();
        let candidates: Vec<Candidate> = active_slots
            .iter()
            .map(|&s| {
                let p = proposals[s].as_ref().expect("active row has a proposal");
                Candidate {
                    request: rows[s].as_ref().expect("active").request,
                    drafted: p.tokens.len(),
                    confidences: confidences(&p.confidence_logits, temperatures),
                }
            })
            .collect();
        let lengths = policy.choose(&candidates);
        assert_eq!(lengths.len(), candidates.len(), "one length per request");
        let mut verify_rows: Vec<Option<Vec<u32>>> = vec![None; slots];
        let mut verified = 0;
        for (&s, &l) in active_slots.iter().zip(&lengths) {
            let p = proposals[s].as_mut().expect("active");
            let l = l.min(p.tokens.len());
            verified += l;
            p.tokens.truncate(l);
            p.probs.truncate(l);
            let a = rows[s].as_ref().expect("active");
            let mut ids = vec![a.out[a.start]];
            ids.extend_from_slice(&p.tokens);
            verify_rows[s] = Some(ids);
        }

        // One target pass over every active request's chosen prefix.
        let verify_start = now();
        let width = verify_rows
            .iter()
            .flatten()
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let pass = target.model.step(
            &target.rope,
            &left_padded(&verify_rows),
            &mut cache,
            &params.target_layer_ids,
            LogitsFor::All,
        );
        let logits = deepspec_core::model::host_rows(pass.logits.expect("logits"));
        let verify_s = now() - verify_start;

        let mut cost = RoundCost {
            requests: active_slots.len(),
            drafted: candidates.iter().map(|c| c.drafted).sum(),
            verified,
            pass_tokens: slots * width,
            draft_s,
            verify_s,
            ..Default::default()
        };
        for &s in &active_slots {
            let proposal = proposals[s].take().expect("active");
            let verify_ids = verify_rows[s].take().expect("active");
            let row = rows[s].as_mut().expect("active");
            let first_col = width - verify_ids.len();
            let target_probs: Vec<Vec<f64>> = logits[s * width + first_col..(s + 1) * width]
                .iter()
                .map(|r| probs(r, params.temperature))
                .collect();
            let sampler = &mut *samplers[row.request];
            let verdict = verify(
                &proposal.tokens,
                &target_probs,
                &proposal.probs,
                &params.stop_ids,
                sampler,
            );
            let a = verdict.accepted;
            let start = row.start;
            row.out.truncate(start + 1);
            row.out.extend_from_slice(&proposal.tokens[..a]);
            let mut committed: Vec<u32> = proposal.tokens[..a].to_vec();
            if !verdict.terminated_by_stop {
                committed.push(verdict.next_token);
            }
            cost.committed += committed.len();
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
            let finished = if verdict.terminated_by_stop {
                row.start += a;
                true
            } else {
                row.out.push(verdict.next_token);
                row.start += a + 1;
                cache.truncate(s, row.start);
                proposers[row.request].update(
                    row_features(&pass.tapped, s, first_col, a + 1),
                    &committed,
                    start,
                );
                committed.iter().any(|t| params.stop_ids.contains(t)) || row.start >= row.max_len
            };
            if finished {
                cache.truncate(s, 0);
                let active = rows[s].take().expect("active");
                retire(active, &mut done, now());
            }
        }
        // Rolled-back drafts of rows that kept different lengths leave holes below slots in
        // use; once they are most of the cache, pack every row to the front.
        if cache.dead_slots() > 64 && 2 * cache.dead_slots() > cache.slots() {
            cache.compact();
        }
        cost.host_s = now() - round_start - draft_s - verify_s;
        run.rounds.push(cost);
    }
    run.wall_s = now();
    run.requests = done
        .into_iter()
        .map(|s| s.expect("every request served"))
        .collect();
    run
}
