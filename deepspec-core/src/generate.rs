//! Autoregressive generation with the target and its KV cache, batched over rows of different
//! lengths. Each row draws from its own seeded generator, so a row's output does not depend
//! on which other rows share its batch.

use crate::io::chat::TurnFormat;
use crate::io::tokenizer::Tok;
use crate::model::rope::Rope;
use crate::model::{KvCache, LoadedTarget, LogitsFor, TargetNet};
use crate::sampling::{sample, Rng, SamplingParams};
use burn::tensor::backend::Backend;

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation of a row ends after it emits one of these (the stop token is kept).
    pub stop_ids: Vec<u32>,
}

/// A recipe stop string that is not one token of the target's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recipe field `prepare.stop_tokens`: `{0}` is not a single token of the target's vocabulary (list token strings such as `<|im_end|>`)")]
pub struct StopTokenError(pub String);

/// The ids that end a generated answer, sorted: the tokenizer's end-of-sequence ids, the
/// chat format's end-of-turn token when it is a single token (a template may end turns with
/// a token the tokenizer does not call end-of-sequence), and `stop_tokens`, the recipe's
/// `prepare.stop_tokens`. Answer regeneration, evaluation and `deepspec generate` all stop
/// on this set, so a drafter is evaluated on answers that end where its training answers
/// ended.
pub fn stop_ids(
    tok: &Tok,
    format: Option<&TurnFormat>,
    stop_tokens: &[String],
) -> Result<Vec<u32>, StopTokenError> {
    let mut ids = tok.eos_ids.clone();
    if let Some(id) = format.and_then(|f| tok.token_id(f.end_of_turn.trim_end())) {
        ids.push(id);
    }
    for s in stop_tokens {
        ids.push(tok.token_id(s).ok_or_else(|| StopTokenError(s.clone()))?);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Last-position logits of each row, on the host.
fn last_logits<B: Backend>(
    model: &TargetNet<B>,
    rope: &Rope,
    tokens: &[Vec<Option<u32>>],
    cache: &mut KvCache<B>,
) -> Vec<Vec<f32>> {
    let out = model.step(rope, tokens, cache, &[], LogitsFor::Last);
    crate::model::host_rows(out.logits.expect("logits requested"))
}

/// Generates a continuation for every prompt. `rngs[b]` drives row `b`; `on_token(b, id)` is
/// called for each new token as it is produced. Returns the generated ids of each row.
pub fn generate<B: Backend>(
    target: &LoadedTarget<B>,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    rngs: &mut [Rng],
    mut on_token: impl FnMut(usize, u32),
) -> Vec<Vec<u32>> {
    assert_eq!(prompts.len(), rngs.len(), "one generator per prompt");
    let batch = prompts.len();
    let mut outputs = vec![Vec::new(); batch];
    if batch == 0 || params.max_new_tokens == 0 {
        return outputs;
    }
    let mut cache = KvCache::new(target.model.num_layers(), batch);
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prefill: Vec<Vec<Option<u32>>> = prompts
        .iter()
        .map(|p| {
            let mut row: Vec<Option<u32>> = p.iter().copied().map(Some).collect();
            row.resize(width, None);
            row
        })
        .collect();
    let mut logits = last_logits(&target.model, &target.rope, &prefill, &mut cache);
    let mut done = vec![false; batch];
    loop {
        let mut step = Vec::with_capacity(batch);
        for b in 0..batch {
            if done[b] {
                step.push(vec![None]);
                continue;
            }
            let token = sample(&logits[b], &params.sampling, &mut rngs[b]);
            outputs[b].push(token);
            on_token(b, token);
            if params.stop_ids.contains(&token) || outputs[b].len() >= params.max_new_tokens {
                done[b] = true;
                step.push(vec![None]);
            } else {
                step.push(vec![Some(token)]);
            }
        }
        if done.iter().all(|&d| d) {
            return outputs;
        }
        logits = last_logits(&target.model, &target.rope, &step, &mut cache);
    }
}
