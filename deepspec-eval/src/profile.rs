//! The step-cost profile (`deepspec bench sps`): what one target pass over `B` new tokens
//! costs after a context of `L` tokens, and what one drafting round costs for `R` requests,
//! on the device the engine runs on. Medians of timed repeats after a warm-up, made
//! non-decreasing; the schedulers read SPS(B) off it.

use crate::proposer::{ProposeParams, Proposer};
use crate::schedule::{monotone, CostPoint, SpsTable, SPS_FORMAT};
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::model::{host_rows, KvCache, LoadedTarget, LogitsFor};
use deepspec_core::sampling::Rng;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    /// The context every pass follows (its length is `L`).
    pub context: Vec<u32>,
    /// Largest verification batch, in tokens (powers of two up to it, and it).
    pub max_tokens: usize,
    /// Largest number of drafting requests (powers of two up to it, and it); 0: no drafting.
    pub max_requests: usize,
    /// Timed repeats per point (after one untimed warm-up).
    pub repeats: usize,
    pub target_layer_ids: Vec<usize>,
    pub temperature: f32,
}

/// 1, 2, 4, … below `max`, then `max`.
pub fn doubling(max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut n = 1;
    while n < max {
        out.push(n);
        n *= 2;
    }
    if max > 0 {
        out.push(max);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f` once untimed and `repeats` times; the median.
fn timed(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..repeats.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Profiles `target` (and, with `proposer`, the drafter it makes) as `spec` says. `on_point`
/// hears each point as it is measured (for progress).
pub fn profile<'m, B: Backend>(
    target: &LoadedTarget<B>,
    proposer: Option<&dyn Fn() -> Box<dyn Proposer<B> + 'm>>,
    spec: &ProfileSpec,
    on_point: &mut dyn FnMut(&str, CostPoint),
) -> SpsTable {
    assert!(!spec.context.is_empty(), "the profile needs a context");
    let layers = target.model.num_layers();
    let len = spec.context.len();
    let mut cache = KvCache::<B>::new(layers, 1);
    let prefill = target.model.step(
        &target.rope,
        &[spec.context.iter().map(|&t| Some(t)).collect()],
        &mut cache,
        &spec.target_layer_ids,
        LogitsFor::None,
    );
    let mut verify = Vec::new();
    for n in doubling(spec.max_tokens) {
        let row: Vec<Option<u32>> = spec
            .context
            .iter()
            .cycle()
            .take(n)
            .map(|&t| Some(t))
            .collect();
        let seconds = timed(spec.repeats, || {
            let pass = target.model.step(
                &target.rope,
                std::slice::from_ref(&row),
                &mut cache,
                &spec.target_layer_ids,
                LogitsFor::All,
            );
            let _ = host_rows(pass.logits.expect("logits"));
            cache.truncate(0, len);
        });
        let point = CostPoint { n, seconds };
        on_point("verify", point);
        verify.push(point);
    }
    monotone(&mut verify);

    let mut draft = Vec::new();
    if let Some(make) = proposer {
        let features: Tensor<B, 3> = Tensor::cat(prefill.tapped, 2);
        let params = ProposeParams {
            temperature: spec.temperature,
            stop_ids: Vec::new(),
        };
        // One committed token's features, fed back after every proposal as a round would.
        let step_features = features.clone().narrow(1, len - 1, 1);
        let current = spec.context[len - 1];
        for n in doubling(spec.max_requests) {
            let mut proposers: Vec<Box<dyn Proposer<B> + 'm>> = (0..n).map(|_| make()).collect();
            for p in proposers.iter_mut() {
                p.init(features.clone(), &spec.context, current);
            }
            let mut rng = Rng::new(0);
            let mut times = Vec::new();
            for (repeat, start) in (0..=spec.repeats.max(1)).zip(len..) {
                let t = Instant::now();
                for p in proposers.iter_mut() {
                    p.propose(current, start, &params, &mut rng);
                }
                // The first round (the whole context entering the drafter) is the warm-up.
                if repeat > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
                for p in proposers.iter_mut() {
                    p.update(step_features.clone(), &[current], start);
                }
            }
            let point = CostPoint {
                n,
                seconds: median(times),
            };
            on_point("draft", point);
            draft.push(point);
        }
        monotone(&mut draft);
    }
    SpsTable {
        format: SPS_FORMAT.into(),
        backend: std::any::type_name::<B>().into(),
        target: String::new(),
        context_len: len,
        repeats: spec.repeats.max(1),
        verify,
        draft,
    }
}
