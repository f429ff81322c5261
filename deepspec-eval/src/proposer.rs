//! Draft proposals at inference (the reference's `dspark_generate` / `eagle3_generate`):
//! thin callers of the drafters' own inference forwards. DSpark/DFlash draft a block in one
//! backbone pass and pick it left to right through the sequential head; Eagle3 drafts token
//! by token with its one-layer cache. What each slot's logits become — a greedy pick read
//! back as one id, or a distribution to sample from — is decided here, in [`pick`].

use crate::verify::probs;
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::drafter::dspark::ContextCache;
use deepspec_core::drafter::eagle3::Eagle3Cache;
use deepspec_core::drafter::{BlockInference, Eagle3Inference};
use deepspec_core::model::rope::Rope;
use deepspec_core::sampling::{is_greedy, Sampler};

/// One round's proposal.
#[derive(Debug, Clone, Default)]
pub struct Proposal {
    /// Draft tokens `d_1..d_k` (the current token is not included).
    pub tokens: Vec<u32>,
    /// The drafter's distribution at each drafted position (`[k][V]`, one-hot when greedy).
    pub probs: Vec<Vec<f64>>,
    /// Top-1 minus top-2 draft logit per drafted slot (every slot of a block).
    pub top2_margin: Vec<f32>,
    /// DSpark confidence logits per slot.
    pub confidence_logits: Vec<f32>,
}

pub struct ProposeParams {
    pub temperature: f32,
    pub stop_ids: Vec<u32>,
}

/// A drafter as the decoding loop sees it.
pub trait Proposer<B: Backend> {
    /// After prefill: `features [1, n, n_t*H]` of the prompt, the prompt, the first token.
    fn init(&mut self, features: Tensor<B, 3>, prompt: &[u32], first_token: u32);
    /// Drafts after `current` at position `start`.
    fn propose(
        &mut self,
        current: u32,
        start: usize,
        params: &ProposeParams,
        sampler: &mut dyn Sampler,
    ) -> Proposal;
    /// After verification: the verify pass's features of its first `a+1` rows and the
    /// committed tokens (`a` accepted drafts + the next token).
    fn update(&mut self, features: Tensor<B, 3>, committed: &[u32], start: usize);
}

/// The token drawn from draft logits `[V]` at `temperature`, its distribution (one-hot when
/// greedy) and the top-1 minus top-2 logit margin. The row is read back once and scanned on
/// the host: burn-flex's `topk` sorts the whole vocabulary, which cost more than the rest
/// of a drafted slot on the CPU.
fn pick<B: Backend>(
    logits: Tensor<B, 1>,
    temperature: f32,
    sampler: &mut dyn Sampler,
) -> (u32, Vec<f64>, f32) {
    let row = deepspec_core::model::to_host(logits).data;
    let (first, margin) = top1_and_margin(&row);
    if is_greedy(temperature) {
        let mut p = vec![0.0; row.len()];
        p[first] = 1.0;
        (first as u32, p, margin)
    } else {
        let p = probs(&row, temperature);
        (sampler.sample(&p), p, margin)
    }
}

/// The index of the largest value (the first of equal ones, as `argmax` takes it) and its
/// lead over the second largest (infinite for one value).
fn top1_and_margin(row: &[f32]) -> (usize, f32) {
    let (mut best, mut top, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > top {
            second = top;
            top = v;
            best = i;
        } else if v > second {
            second = v;
        }
    }
    let margin = if row.len() >= 2 {
        top - second
    } else {
        f32::INFINITY
    };
    (best, margin)
}

pub struct DSparkProposer<'m, B: Backend> {
    pub model: &'m dyn BlockInference<B>,
    pub rope: Rope,
    pub block_size: usize,
    pub mask_token_id: u32,
    cache: ContextCache<B>,
    pending: Option<Tensor<B, 3>>,
}

impl<'m, B: Backend> DSparkProposer<'m, B> {
    pub fn new(
        model: &'m dyn BlockInference<B>,
        rope: Rope,
        block_size: usize,
        mask_token_id: u32,
    ) -> Self {
        DSparkProposer {
            model,
            rope,
            block_size,
            mask_token_id,
            cache: model.new_cache(),
            pending: None,
        }
    }
}

impl<B: Backend> Proposer<B> for DSparkProposer<'_, B> {
    fn init(&mut self, features: Tensor<B, 3>, _prompt: &[u32], _first_token: u32) {
        self.cache = self.model.new_cache();
        self.pending = Some(features);
    }

    fn propose(
        &mut self,
        current: u32,
        start: usize,
        params: &ProposeParams,
        sampler: &mut dyn Sampler,
    ) -> Proposal {
        if let Some(pending) = self.pending.take() {
            self.model
                .extend_context(&self.rope, &mut self.cache, pending);
        }
        debug_assert_eq!(
            self.cache.len(),
            start,
            "context must cover every position before the block"
        );
        let mut proposal = Proposal::default();
        let draft = self.model.propose(
            &self.rope,
            &mut self.cache,
            current,
            self.block_size,
            self.mask_token_id,
            &mut |_, logits| {
                let (token, p, margin) = pick(logits, params.temperature, sampler);
                proposal.probs.push(p);
                proposal.top2_margin.push(margin);
                token
            },
        );
        proposal.tokens = draft.tokens;
        proposal.confidence_logits = draft.confidence_logits;
        proposal
    }

    fn update(&mut self, features: Tensor<B, 3>, _committed: &[u32], _start: usize) {
        // Rounds that did not draft (a scheduler saw no gain in it) leave their features
        // pending too: the next proposal extends the context by all of them.
        self.pending = Some(match self.pending.take() {
            Some(old) => Tensor::cat(vec![old, features], 1),
            None => features,
        });
    }
}

pub struct Eagle3Proposer<'m, B: Backend> {
    pub model: &'m dyn Eagle3Inference<B>,
    pub rope: Rope,
    pub steps: usize,
    cache: Eagle3Cache<B>,
    /// Pre-norm output of the last fed position.
    hidden: Option<Tensor<B, 3>>,
    /// Cache length before the current proposal's drafts.
    committed_len: usize,
}

impl<'m, B: Backend> Eagle3Proposer<'m, B> {
    pub fn new(model: &'m dyn Eagle3Inference<B>, rope: Rope, steps: usize) -> Self {
        Eagle3Proposer {
            model,
            rope,
            steps,
            cache: Eagle3Cache::new(),
            hidden: None,
            committed_len: 0,
        }
    }

    fn feed(&mut self, features: Tensor<B, 3>, tokens: &[u32], causal: bool) {
        let out = self
            .model
            .step_with_cache(&self.rope, &mut self.cache, features, tokens, causal);
        let m = out.dims()[1];
        self.hidden = Some(out.narrow(1, m - 1, 1));
        self.committed_len = self.cache.len();
    }
}

impl<B: Backend> Proposer<B> for Eagle3Proposer<'_, B> {
    fn init(&mut self, features: Tensor<B, 3>, prompt: &[u32], first_token: u32) {
        self.cache = Eagle3Cache::new();
        let mut tokens: Vec<u32> = prompt[1..].to_vec();
        tokens.push(first_token);
        self.feed(features, &tokens, true);
    }

    fn propose(
        &mut self,
        _current: u32,
        start: usize,
        params: &ProposeParams,
        sampler: &mut dyn Sampler,
    ) -> Proposal {
        debug_assert_eq!(
            self.cache.len(),
            start,
            "fed every position before the draft"
        );
        let mut proposal = Proposal::default();
        let mut h = self.hidden.clone().expect("init before propose");
        let vocab = self.model.head().vocab_size();
        for j in 0..self.steps {
            let logits = self.model.logits(h.clone()).reshape([vocab]);
            let (token, p, margin) = pick(logits, params.temperature, sampler);
            proposal.top2_margin.push(margin);
            proposal.tokens.push(token);
            proposal.probs.push(p);
            if params.stop_ids.contains(&token) || j + 1 == self.steps {
                break;
            }
            h = self
                .model
                .step_with_cache(&self.rope, &mut self.cache, h, &[token], false);
        }
        proposal
    }

    fn update(&mut self, features: Tensor<B, 3>, committed: &[u32], _start: usize) {
        self.cache.truncate(self.committed_len);
        self.feed(features, committed, false);
    }
}

/// Proposes nothing: every round verifies the current token alone, which is plain
/// autoregressive decoding through the same engine (the baseline of `bench eval`).
pub struct NoDraft;

impl<B: Backend> Proposer<B> for NoDraft {
    fn init(&mut self, _features: Tensor<B, 3>, _prompt: &[u32], _first_token: u32) {}

    fn propose(
        &mut self,
        _current: u32,
        _start: usize,
        _params: &ProposeParams,
        _sampler: &mut dyn Sampler,
    ) -> Proposal {
        Proposal::default()
    }

    fn update(&mut self, _features: Tensor<B, 3>, _committed: &[u32], _start: usize) {}
}

#[cfg(test)]
mod tests {
    use super::top1_and_margin;
    use burn::tensor::{Tensor, TensorData};
    use deepspec_core::backend::Cpu;

    #[test]
    fn the_host_scan_agrees_with_the_device_argmax_and_topk() {
        let device = Default::default();
        let rows: [&[f32]; 4] = [
            &[0.5, 2.0, -1.0, 1.5],
            &[3.0, 1.0, 3.0, 2.0],
            &[-4.0, -2.0, -3.0],
            &[1.0, 5.0, 4.5, 5.0, -2.0],
        ];
        for row in rows {
            let t =
                Tensor::<Cpu, 1>::from_data(TensorData::new(row.to_vec(), [row.len()]), &device);
            let argmax = deepspec_core::model::host_ints(t.clone().argmax(0))[0] as usize;
            let top = deepspec_core::model::to_host(t.topk(2, 0)).data;
            assert_eq!(top1_and_margin(row), (argmax, top[0] - top[1]), "{row:?}");
        }
        // burn's topk wants more than k values.
        assert_eq!(top1_and_margin(&[7.0]), (0, f32::INFINITY));
        assert_eq!(top1_and_margin(&[1.0, 1.0]), (0, 0.0));
    }
}
