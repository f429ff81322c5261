//! Answer regeneration and self-instruct prompts, both by the target itself: batched sampling
//! with the KV cache, one seeded generator per prompt, so a prompt's answer does not depend
//! on how the run was batched or interrupted.

use super::prompts::Conversation;
use crate::generate::{generate, GenerateParams};
use crate::io::chat::{ChatTemplate, Message, TurnFormat};
use crate::model::LoadedTarget;
use crate::sampling::Rng;
use anyhow::Context;
use burn::tensor::backend::Backend;

/// How answers are sampled.
#[derive(Debug, Clone)]
pub struct AnswerSettings {
    pub params: GenerateParams,
    /// Qwen3 templates: `enable_thinking` for generation prompts.
    pub enable_thinking: bool,
    /// Prompts this long or longer get an empty answer (the sample would be all prompt).
    pub max_length: usize,
    pub seed: u64,
}

/// Decodes an answer, dropping a final stop token.
fn answer_text<B: Backend>(
    target: &LoadedTarget<B>,
    mut ids: Vec<u32>,
    stop_ids: &[u32],
) -> anyhow::Result<String> {
    if ids.last().is_some_and(|t| stop_ids.contains(t)) {
        ids.pop();
    }
    Ok(target.tokenizer.decode(&ids, true)?)
}

/// Regenerates every assistant turn of `conversations` (row `b` is prompt `sources[b]`):
/// system messages are kept, assistant messages dropped, and each user message answered with
/// the target's own previous answers as history (the reference's regeneration rule).
/// Returns the answered conversations and the number of generated tokens.
pub fn answer_batch<B: Backend>(
    target: &LoadedTarget<B>,
    template: &ChatTemplate,
    conversations: &[Conversation],
    sources: &[u64],
    settings: &AnswerSettings,
) -> anyhow::Result<(Vec<Conversation>, u64)> {
    let n = conversations.len();
    let mut rngs: Vec<Rng> = sources
        .iter()
        .map(|&s| Rng::for_item(settings.seed, s))
        .collect();
    let mut out: Vec<Conversation> = vec![Vec::new(); n];
    let mut cursor = vec![0usize; n];
    let mut generated = 0u64;
    loop {
        let mut rows = Vec::new();
        for b in 0..n {
            while let Some(m) = conversations[b].get(cursor[b]) {
                cursor[b] += 1;
                match m.role.as_str() {
                    "assistant" => {}
                    "user" => {
                        out[b].push(m.clone());
                        rows.push(b);
                        break;
                    }
                    _ => out[b].push(m.clone()),
                }
            }
        }
        if rows.is_empty() {
            return Ok((out, generated));
        }
        let mut prompts = Vec::with_capacity(rows.len());
        let mut active = Vec::with_capacity(rows.len());
        for &b in &rows {
            let ids =
                template.prompt_ids(&target.tokenizer, &out[b], Some(settings.enable_thinking))?;
            if ids.len() < settings.max_length {
                prompts.push(ids);
                active.push(b);
            } else {
                out[b].push(Message::new("assistant", ""));
            }
        }
        let mut row_rngs: Vec<Rng> = active.iter().map(|&b| rngs[b].clone()).collect();
        let answers = generate(target, &prompts, &settings.params, &mut row_rngs, |_, _| {});
        for ((&b, ids), rng) in active.iter().zip(answers).zip(row_rngs) {
            generated += ids.len() as u64;
            rngs[b] = rng;
            let text = answer_text(target, ids, &settings.params.stop_ids)?;
            out[b].push(Message::new("assistant", &text));
        }
    }
}

/// Whitespace-collapsed, lower-cased: the key duplicates are found by.
fn dedup_key(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Has the target write `count` distinct user prompts: the template is rendered up to the
/// start of a user turn and the user message is sampled (candidate `i` from
/// `Rng::for_item(seed ^ SALT, i)`), empty and duplicate prompts discarded. Gives up after
/// `4 * count + 8` candidates and returns what it has. `on_batch(kept, tokens)` reports
/// progress.
pub fn self_instruct<B: Backend>(
    target: &LoadedTarget<B>,
    template: &ChatTemplate,
    format: &TurnFormat,
    count: usize,
    settings: &AnswerSettings,
    batch_size: usize,
    mut on_batch: impl FnMut(usize, u64),
) -> anyhow::Result<Vec<Conversation>> {
    const SALT: u64 = 0x5e1f_1257_0c7a_11ed;
    const SENTINEL: &str = "\u{1}deepspec-user-turn\u{1}";
    let mut lead = Vec::new();
    if let Some(system) = format.default_system {
        lead.push(Message::new("system", system));
    }
    lead.push(Message::new("user", SENTINEL));
    let rendered = template
        .render(&lead, false, None)
        .context("rendering the chat template for self-instruct")?;
    let prefix = &rendered[..rendered.find(SENTINEL).context(
        "the chat template does not render the user message verbatim; self-instruct needs it to",
    )?];
    let prefix_ids = target.tokenizer.encode(prefix)?;
    let mut seen = std::collections::HashSet::new();
    let mut prompts = Vec::new();
    let mut next = 0u64;
    let max_candidates = 4 * count as u64 + 8;
    while prompts.len() < count && next < max_candidates {
        let rows = batch_size.min((max_candidates - next) as usize);
        let inputs = vec![prefix_ids.clone(); rows];
        let mut rngs: Vec<Rng> = (0..rows as u64)
            .map(|i| Rng::for_item(settings.seed ^ SALT, next + i))
            .collect();
        next += rows as u64;
        let outputs = generate(target, &inputs, &settings.params, &mut rngs, |_, _| {});
        let mut tokens = 0;
        for ids in outputs {
            tokens += ids.len() as u64;
            let text = answer_text(target, ids, &settings.params.stop_ids)?;
            let text = text.trim();
            if prompts.len() < count && !text.is_empty() && seen.insert(dedup_key(text)) {
                prompts.push(vec![Message::new("user", text)]);
            }
        }
        on_batch(prompts.len(), tokens);
    }
    anyhow::ensure!(
        !prompts.is_empty(),
        "self-instruct produced no usable prompt in {next} tries (the target writes only empty text)"
    );
    Ok(prompts)
}
