//! Draft proposals at inference (DEEPSPEC-SPEC §6.5–6.6): DSpark/DFlash draft a block in one
//! backbone pass and sample it left to right through the sequential head; Eagle3 drafts
//! token by token with its one-layer cache.

use crate::verify::probs;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepspec_core::drafter::dspark::ContextCache;
use deepspec_core::drafter::eagle3::Eagle3Cache;
use deepspec_core::drafter::heads::markov::rnn_step;
use deepspec_core::drafter::{DSparkModel, Eagle3Model};
use deepspec_core::model::rope::Rope;
use deepspec_core::sampling::Sampler;

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
    /// DSpark: stop the block at the first slot whose confidence is below this (0 = never).
    pub confidence_threshold: f64,
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

fn top2_margin(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in logits {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    a - b
}

fn host_rows<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [rows, cols] = t.dims();
    let flat = t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    (0..rows)
        .map(|r| flat[r * cols..(r + 1) * cols].to_vec())
        .collect()
}

fn draw(logits: &[f32], temperature: f32, sampler: &mut dyn Sampler) -> (u32, Vec<f64>) {
    let p = probs(logits, temperature);
    let token = if temperature < crate::verify::GREEDY_BELOW {
        deepspec_core::sampling::argmax(logits) as u32
    } else {
        sampler.sample(&p)
    };
    (token, p)
}

pub struct DSparkProposer<'m, B: Backend> {
    pub model: &'m DSparkModel<B>,
    pub rope: Rope,
    pub block_size: usize,
    pub mask_token_id: u32,
    cache: ContextCache<B>,
    pending: Option<Tensor<B, 3>>,
}

impl<'m, B: Backend> DSparkProposer<'m, B> {
    pub fn new(
        model: &'m DSparkModel<B>,
        rope: Rope,
        block_size: usize,
        mask_token_id: u32,
    ) -> Self {
        DSparkProposer {
            model,
            rope,
            block_size,
            mask_token_id,
            cache: ContextCache::default(),
            pending: None,
        }
    }
}

impl<B: Backend> Proposer<B> for DSparkProposer<'_, B> {
    fn init(&mut self, features: Tensor<B, 3>, _prompt: &[u32], _first_token: u32) {
        self.cache = ContextCache::default();
        self.pending = Some(features);
    }

    fn propose(
        &mut self,
        current: u32,
        start: usize,
        params: &ProposeParams,
        sampler: &mut dyn Sampler,
    ) -> Proposal {
        let model = self.model;
        if let Some(pending) = self.pending.take() {
            model.extend_context(&self.rope, &mut self.cache, pending);
        }
        debug_assert_eq!(
            self.cache.len, start,
            "context must cover every position before the block"
        );
        let device = model.fc.weight.device();
        let mut block = vec![self.mask_token_id as i64; self.block_size];
        block[0] = current as i64;
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(block, [1, self.block_size]), &device);
        let out = model.block_with_cache(&self.rope, &self.cache, tokens, start);
        let hidden = out.dims()[2];
        let out: Tensor<B, 2> = out.reshape([self.block_size, hidden]);
        let base = host_rows(model.lm_head.forward(out.clone()));
        let mut proposal = Proposal::default();
        let mut prev = current;
        let mut state: Option<Tensor<B, 3>> = None;
        for (slot, base_row) in base.iter().enumerate() {
            let h_slot: Tensor<B, 2> = out.clone().narrow(0, slot, 1);
            let prev_ids =
                Tensor::<B, 1, Int>::from_data(TensorData::new(vec![prev as i64], [1]), &device);
            let mut logits = base_row.clone();
            let mut prev_embedding = None;
            if let Some(head) = &model.markov_head {
                let e = head.markov_w1.lookup(prev_ids);
                let feature = if let Some(gate) = &head.gate_proj {
                    burn::tensor::activation::sigmoid(
                        gate.forward(Tensor::cat(vec![h_slot.clone(), e.clone()], 1)),
                    ) * e.clone()
                } else if let Some(joint) = &head.joint_proj {
                    let r = head.rank();
                    let s = state
                        .take()
                        .unwrap_or_else(|| Tensor::zeros([1, 1, r], &device));
                    let (next, feature) = rnn_step(
                        joint,
                        s,
                        e.clone().unsqueeze::<3>(),
                        h_slot.clone().unsqueeze::<3>(),
                        r,
                    );
                    state = Some(next);
                    feature.reshape([1, r])
                } else {
                    e.clone()
                };
                let bias = head
                    .bias(feature)
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .unwrap();
                for (l, b) in logits.iter_mut().zip(bias) {
                    *l += b;
                }
                prev_embedding = Some(e);
            }
            if let Some(conf) = &model.confidence_head {
                let e = prev_embedding.filter(|_| conf.proj.in_features() > hidden);
                let z: Tensor<B, 1> = conf.forward::<2, 1>(h_slot, e);
                proposal
                    .confidence_logits
                    .push(z.into_data().convert::<f32>().into_vec::<f32>().unwrap()[0]);
            }
            proposal.top2_margin.push(top2_margin(&logits));
            let (token, p) = draw(&logits, params.temperature, sampler);
            proposal.tokens.push(token);
            proposal.probs.push(p);
            prev = token;
        }
        if params.confidence_threshold > 0.0 && !proposal.confidence_logits.is_empty() {
            let keep = proposal
                .confidence_logits
                .iter()
                .position(|&z| 1.0 / (1.0 + (-(z as f64)).exp()) < params.confidence_threshold)
                .unwrap_or(self.block_size);
            proposal.tokens.truncate(keep);
            proposal.probs.truncate(keep);
        }
        proposal
    }

    fn update(&mut self, features: Tensor<B, 3>, _committed: &[u32], _start: usize) {
        self.pending = Some(features);
    }
}

pub struct Eagle3Proposer<'m, B: Backend> {
    pub model: &'m Eagle3Model<B>,
    pub rope: Rope,
    pub steps: usize,
    cache: Eagle3Cache<B>,
    /// Pre-norm output of the last fed position.
    hidden: Option<Tensor<B, 3>>,
    /// Cache length before the current proposal's drafts.
    committed_len: usize,
}

impl<'m, B: Backend> Eagle3Proposer<'m, B> {
    pub fn new(model: &'m Eagle3Model<B>, rope: Rope, steps: usize) -> Self {
        Eagle3Proposer {
            model,
            rope,
            steps,
            cache: Eagle3Cache::default(),
            hidden: None,
            committed_len: 0,
        }
    }

    fn feed(&mut self, features: Tensor<B, 3>, tokens: &[u32], first: usize, causal: bool) {
        let out = self.model.step_with_cache(
            &self.rope,
            &mut self.cache,
            features,
            tokens,
            first,
            causal,
        );
        let m = out.dims()[1];
        self.hidden = Some(out.narrow(1, m - 1, 1));
        self.committed_len = self.cache.len;
    }
}

impl<B: Backend> Proposer<B> for Eagle3Proposer<'_, B> {
    fn init(&mut self, features: Tensor<B, 3>, prompt: &[u32], first_token: u32) {
        self.cache = Eagle3Cache::default();
        let mut tokens: Vec<u32> = prompt[1..].to_vec();
        tokens.push(first_token);
        self.feed(features, &tokens, 0, true);
    }

    fn propose(
        &mut self,
        _current: u32,
        start: usize,
        params: &ProposeParams,
        sampler: &mut dyn Sampler,
    ) -> Proposal {
        let mut proposal = Proposal::default();
        let mut h = self.hidden.clone().expect("init before propose");
        for j in 0..self.steps {
            let logits = self.model.logits(h.clone());
            let row = logits
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap();
            proposal.top2_margin.push(top2_margin(&row));
            let (token, p) = draw(&row, params.temperature, sampler);
            proposal.tokens.push(token);
            proposal.probs.push(p);
            if params.stop_ids.contains(&token) || j + 1 == self.steps {
                break;
            }
            h = self.model.step_with_cache(
                &self.rope,
                &mut self.cache,
                h,
                &[token],
                start + j,
                false,
            );
        }
        proposal
    }

    fn update(&mut self, features: Tensor<B, 3>, committed: &[u32], start: usize) {
        self.cache.truncate(self.committed_len);
        self.feed(features, committed, start, false);
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
