//! `deepspec prepare`: prompts → regenerated answers → target hidden states in a Parquet
//! cache. Resumable: each prompt samples from its own seeded generator, batches start at fixed
//! prompt indices and shards close only between batches, at sizes decided by the (therefore
//! deterministic) samples; the manifest lists finished shards, so a re-run after a crash goes
//! on from the first prompt they do not cover and ends with the same bytes as an uninterrupted
//! run. With `prepare.shard_prompts` set, shards also close at its multiples, so a job can run
//! as parts (`--shard i/n`, [`ShardSpec`]) that start there and are joined, byte for byte, by
//! [`crate::cache::merge`] (docs/prepare-sharding.md).
//!
//! - [`prompts`]: JSONL prompt files (reference, OpenAI, ShareGPT shapes);
//! - [`answer`]: answer regeneration and self-instruct prompts;
//! - [`target_pass`]: the forward that captures the hidden states;
//! - [`plan`]: the job's identity (hashes, settings) and the `--estimate` figures.

pub mod answer;
pub mod import_vllm;
pub mod plan;
pub mod prompts;
pub mod target_pass;

pub use plan::{estimate, Estimate, PrepareOptions, PromptSource, ShardSpec};
pub use prompts::{Conversation, OnBadLine};

use crate::cache::manifest::shard_file_name;
use crate::cache::{Manifest, ShardEntry, ShardWriter};
use crate::generate::GenerateParams;
use crate::io::atomic::write_atomically;
use crate::io::chat::{tokenize_conversation, ChatTemplate};
use crate::model::{load_target, LoadedTarget};
use answer::AnswerSettings;
use anyhow::Context;
use burn::tensor::backend::Backend;
use std::time::Instant;

/// Throughput so far, for progress display and the final report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Throughput {
    pub generated_tokens: u64,
    pub generation_secs: f64,
    pub target_tokens: u64,
    pub target_secs: f64,
}

impl Throughput {
    pub fn generation_rate(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_secs.max(1e-9)
    }

    pub fn target_rate(&self) -> f64 {
        self.target_tokens as f64 / self.target_secs.max(1e-9)
    }
}

/// Where a run reports what it is doing (the CLI draws a progress bar).
pub trait Progress {
    /// A phase of `units` steps starts.
    fn begin(&self, phase: &str, units: u64);
    fn advance(&self, units: u64, throughput: &Throughput);
    fn warn(&self, message: &str);
    fn finish(&self);
}

/// A `Progress` that prints nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64, _: &Throughput) {}
    fn warn(&self, _: &str) {}
    fn finish(&self) {}
}

/// Why prompts left no sample, counted over the prompts this run processed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// The conversation did not fit in `data.max_length` tokens with `data.min_loss_tokens`
    /// answer tokens (a prompt that long gets no answer at all).
    pub too_long: u64,
    /// It fit, but its answers have fewer than `data.min_loss_tokens` tokens.
    pub too_few_loss_tokens: u64,
    /// The target answered nothing (it stopped at once).
    pub empty_answer: u64,
}

impl Dropped {
    pub fn total(&self) -> u64 {
        self.too_long + self.too_few_loss_tokens + self.empty_answer
    }
}

/// Why a tokenized conversation is dropped, if it is: `input_tokens` and `loss_tokens` are
/// its tokens and answer tokens within `max_length`, `truncated` says the whole conversation
/// is longer than that, `answers_empty` that every answer the target wrote is empty.
pub fn drop_reason(
    input_tokens: usize,
    loss_tokens: usize,
    min_loss_tokens: usize,
    truncated: bool,
    answers_empty: bool,
) -> Option<DropReason> {
    if input_tokens > 0 && loss_tokens >= min_loss_tokens {
        None
    } else if truncated {
        Some(DropReason::TooLong)
    } else if answers_empty {
        Some(DropReason::EmptyAnswer)
    } else {
        Some(DropReason::TooFewLossTokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    TooLong,
    TooFewLossTokens,
    EmptyAnswer,
}

impl Dropped {
    pub(crate) fn count(&mut self, reason: DropReason) {
        match reason {
            DropReason::TooLong => self.too_long += 1,
            DropReason::TooFewLossTokens => self.too_few_loss_tokens += 1,
            DropReason::EmptyAnswer => self.empty_answer += 1,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub throughput: Throughput,
    pub shards_written: usize,
    pub shards_kept: usize,
    /// Prompts answered and passed through the target by this run (a resumed run skips
    /// those its finished shards cover).
    pub prompts_processed: u64,
    pub dropped: Dropped,
}

/// Runs (or resumes) a prepare job on device `device`.
pub fn prepare<B: Backend>(
    opts: &PrepareOptions,
    device: &B::Device,
    progress: &dyn Progress,
) -> anyhow::Result<PrepareReport> {
    let recipe = &opts.recipe;
    let out = &opts.out;
    // Identity, layer check and an existing cache's compatibility come before any heavy work.
    let mut planned = plan::plan_job(opts)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Held while this run writes the cache, so two runs never interleave their writes.
    let _lock = crate::io::lock::lock_folder(out, ".prepare.lock", "`deepspec prepare`")?;
    remove_temporaries(out)?;
    let existing = if Manifest::path(out).exists() {
        let m = Manifest::load(out)?;
        let mut expected = planned.manifest.clone();
        if planned.prompts.is_none() {
            // Self-instruct prompts are not known yet: compare everything else now.
            expected.job.prompts_sha256 = m.job.prompts_sha256.clone();
            expected.job.num_prompts = m.job.num_prompts;
        }
        m.check_same_job(out, &expected)?;
        Some(m)
    } else {
        None
    };

    let (target, template, settings) = load_for_job::<B>(opts, &planned, device)?;
    let p = &recipe.prepare;
    let mut throughput = Throughput::default();

    let prompts_file = out.join(plan::PROMPTS_FILE);
    let prompts = match planned.prompts.take() {
        Some(prompts) => prompts,
        None => {
            let reuse = existing.as_ref().and_then(|m| {
                let text = std::fs::read_to_string(&prompts_file).ok()?;
                (Some(plan::sha256_hex(text.as_bytes())) == m.job.prompts_sha256)
                    .then(|| plan::parse_prompts_jsonl(&text))
            });
            match reuse {
                Some(prompts) => prompts?,
                None => run_self_instruct(
                    &target,
                    &template,
                    &planned,
                    &settings,
                    opts,
                    progress,
                    &mut throughput,
                )?,
            }
        }
    };
    let jsonl = prompts::to_jsonl(&prompts);
    planned.set_prompts(&jsonl, prompts.len() as u64);
    let mut manifest = match existing {
        Some(m) => {
            m.check_same_job(out, &planned.manifest)?;
            m
        }
        None => planned.manifest.clone(),
    };
    if std::fs::read_to_string(&prompts_file).ok().as_deref() != Some(jsonl.as_str()) {
        write_atomically(&prompts_file, jsonl.as_bytes())?;
    }
    manifest.recount();
    manifest.store(out)?;

    // Keep the finished shards that form a whole prefix; redo everything after it.
    let kept = kept_prefix(out, &manifest);
    manifest.shards.truncate(kept);
    manifest.recount();
    let layout = planned.layout.clone();
    // The whole list, or a part's range of it (`--shard i/n`).
    let end = manifest.end_prompt();
    let resume_at = manifest.prompts_covered();
    progress.begin("prepare", end - resume_at);
    let per_token = layout
        .hidden_dtype
        .bytes_per_token(layout.hidden_size, layout.target_layer_ids.len())
        as u64;
    let mut open: Option<OpenShard> = None;
    let mut written = 0;
    let mut dropped = Dropped::default();
    for batch_start in (resume_at..end).step_by(p.batch_size) {
        let batch_end = (batch_start + p.batch_size as u64).min(end);
        let sources: Vec<u64> = (batch_start..batch_end).collect();
        let batch = &prompts[batch_start as usize..batch_end as usize];
        let started = Instant::now();
        let (answered, generated) =
            answer::answer_batch(&target, &template, batch, &sources, &settings)?;
        throughput.generated_tokens += generated;
        throughput.generation_secs += started.elapsed().as_secs_f64();

        let mut tokenized = Vec::new();
        let mut kept_sources = Vec::new();
        for (conversation, &source) in answered.iter().zip(&sources) {
            let chat = tokenize_conversation(
                &target.tokenizer,
                &template,
                &planned.format,
                conversation,
                recipe.data.max_length,
            )
            .with_context(|| format!("tokenizing prompt {source}"))?;
            let trained: usize = chat.loss_mask.iter().map(|&m| m as usize).sum();
            let kept = !chat.input_ids.is_empty() && trained >= recipe.data.min_loss_tokens;
            let reason = if kept {
                None
            } else {
                // Only a dropped conversation is tokenized again, whole, to tell why.
                let truncated = target.tokenizer.encode(&chat.text)?.len() > chat.input_ids.len();
                let answers_empty = conversation
                    .iter()
                    .filter(|m| m.role == "assistant")
                    .all(|m| m.content.trim().is_empty());
                drop_reason(
                    chat.input_ids.len(),
                    trained,
                    recipe.data.min_loss_tokens,
                    truncated,
                    answers_empty,
                )
            };
            match reason {
                None => {
                    tokenized.push(chat);
                    kept_sources.push(source);
                }
                Some(reason) => dropped.count(reason),
            }
        }
        let started = Instant::now();
        let samples = target_pass::target_pass(
            &target,
            &tokenized,
            &kept_sources,
            &recipe.model.target_layer_ids,
            layout.hidden_dtype,
        );
        throughput.target_tokens += samples.iter().map(|s| s.seq_len() as u64).sum::<u64>();
        throughput.target_secs += started.elapsed().as_secs_f64();

        // Close the open shard before this batch would overflow it (a batch larger than the
        // limit goes alone into its shard), and at every multiple of `shard_prompts`, where
        // parts of a sharded job may begin.
        let batch_bytes: u64 = samples
            .iter()
            .map(|s| s.seq_len() as u64 * per_token + plan::SAMPLE_OVERHEAD_BYTES)
            .sum();
        let at_block = manifest
            .job
            .shard_prompts
            .is_some_and(|n| batch_start.is_multiple_of(n));
        if open.as_ref().is_some_and(|o| {
            at_block || (o.payload > 0 && o.payload + batch_bytes > p.shard_max_bytes)
        }) {
            let shard = open.take().expect("checked");
            shard.finish(out, batch_start, &mut manifest)?;
            written += 1;
        }
        let shard = match &mut open {
            Some(shard) => shard,
            None => open.insert(OpenShard::create(
                out,
                manifest.shards.len() as u64,
                batch_start,
                &layout,
            )?),
        };
        for sample in &samples {
            shard.writer.push(sample)?;
        }
        shard.payload += batch_bytes;
        progress.advance(batch.len() as u64, &throughput);
    }
    if let Some(shard) = open {
        shard.finish(out, end, &mut manifest)?;
        written += 1;
    }
    manifest.recount();
    manifest.store(out)?;
    progress.finish();
    Ok(PrepareReport {
        manifest,
        throughput,
        shards_written: written,
        shards_kept: kept,
        prompts_processed: end - resume_at,
        dropped,
    })
}

/// The target, its chat template and the answer settings of the job `planned`.
fn load_for_job<B: Backend>(
    opts: &PrepareOptions,
    planned: &plan::Planned,
    device: &B::Device,
) -> anyhow::Result<(LoadedTarget<B>, ChatTemplate, AnswerSettings)> {
    let recipe = &opts.recipe;
    let target =
        load_target::<B>(&recipe.model.target_model_name_or_path, device).with_context(|| {
            format!(
                "loading the target model {} (recipe field `model.target_model_name_or_path`)",
                recipe.model.target_model_name_or_path.display()
            )
        })?;
    let template = ChatTemplate::for_format(&target.tokenizer, &planned.format)
        .context("compiling the model's chat template")?;
    let stop_ids = crate::generate::stop_ids(
        &target.tokenizer,
        Some(&planned.format),
        &recipe.prepare.stop_tokens,
    )
    .with_context(|| opts.recipe_path.display().to_string())?;
    let p = &recipe.prepare;
    let settings = AnswerSettings {
        params: GenerateParams {
            max_new_tokens: p.max_new_tokens,
            sampling: crate::sampling::SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
            },
            stop_ids,
        },
        enable_thinking: p.enable_thinking,
        max_length: recipe.data.max_length,
        seed: p.seed,
    };
    Ok((target, template, settings))
}

/// Lets the target write the job's `--self-instruct N` prompts.
#[allow(clippy::too_many_arguments)]
fn run_self_instruct<B: Backend>(
    target: &LoadedTarget<B>,
    template: &ChatTemplate,
    planned: &plan::Planned,
    settings: &AnswerSettings,
    opts: &PrepareOptions,
    progress: &dyn Progress,
    throughput: &mut Throughput,
) -> anyhow::Result<Vec<Conversation>> {
    let p = &opts.recipe.prepare;
    let count = planned.self_instruct.unwrap_or(0);
    progress.begin("self-instruct", count as u64);
    let mut si = settings.clone();
    si.params.max_new_tokens = p.self_instruct_max_tokens;
    let started = Instant::now();
    let mut kept_before = 0;
    let prompts = answer::self_instruct(
        target,
        template,
        &planned.format,
        count,
        &si,
        p.batch_size,
        |kept, tokens| {
            throughput.generated_tokens += tokens;
            throughput.generation_secs = started.elapsed().as_secs_f64();
            progress.advance((kept - kept_before) as u64, throughput);
            kept_before = kept;
        },
    )?;
    progress.finish();
    if prompts.len() < count {
        progress.warn(&format!(
            "self-instruct wrote only {} distinct prompts of {count} asked",
            prompts.len()
        ));
    }
    Ok(prompts)
}

/// The list step of a sharded self-instruct job: the target writes `--self-instruct N`
/// prompts (exactly those `prepare --self-instruct N` would answer) and they are saved,
/// normalized, to `path` (atomically; an existing file is refused so that parts already run
/// on it keep their list). The parts then run `prepare --prompts path --shard i/n`. Returns
/// how many prompts were written.
pub fn write_self_instruct_list<B: Backend>(
    opts: &PrepareOptions,
    device: &B::Device,
    progress: &dyn Progress,
    path: &std::path::Path,
) -> anyhow::Result<usize> {
    anyhow::ensure!(
        matches!(opts.source, PromptSource::SelfInstruct(_)),
        "--prompts-out writes a self-instruct prompt list; it does not go with --prompts"
    );
    if path.exists() {
        anyhow::bail!(
            "--prompts-out {}: the file already exists; parts may already answer it, so it is not overwritten (delete it or choose another path)",
            path.display()
        );
    }
    let planned = plan::plan_job(opts)?;
    let (target, template, settings) = load_for_job::<B>(opts, &planned, device)?;
    let mut throughput = Throughput::default();
    let prompts = run_self_instruct(
        &target,
        &template,
        &planned,
        &settings,
        opts,
        progress,
        &mut throughput,
    )?;
    write_atomically(path, prompts::to_jsonl(&prompts).as_bytes())
        .with_context(|| format!("writing --prompts-out {}", path.display()))?;
    Ok(prompts.len())
}

/// The shard being filled.
pub(crate) struct OpenShard {
    pub(crate) writer: ShardWriter,
    file_name: String,
    shard_id: u64,
    source_start: u64,
    /// Estimated payload so far (what `shard_max_bytes` bounds).
    pub(crate) payload: u64,
}

impl OpenShard {
    pub(crate) fn create(
        dir: &std::path::Path,
        shard_id: u64,
        source_start: u64,
        layout: &crate::cache::ShardLayout,
    ) -> anyhow::Result<Self> {
        let file_name = shard_file_name(shard_id);
        Ok(OpenShard {
            writer: ShardWriter::create(&dir.join(&file_name), layout)?,
            file_name,
            shard_id,
            source_start,
            payload: 0,
        })
    }

    /// Closes the shard (prompts `[source_start, source_end)`) and records it in the manifest.
    pub(crate) fn finish(
        self,
        dir: &std::path::Path,
        source_end: u64,
        manifest: &mut Manifest,
    ) -> anyhow::Result<()> {
        let summary = self.writer.finish()?;
        manifest.shards.push(ShardEntry {
            file_name: self.file_name,
            shard_id: self.shard_id,
            source_start: self.source_start,
            source_end,
            first_sample: 0,
            num_samples: summary.num_samples,
            num_tokens: summary.num_tokens,
            num_loss_tokens: summary.num_loss_tokens,
            bytes: summary.bytes,
            sha256: summary.sha256,
        });
        manifest.recount();
        manifest.store(dir)?;
        Ok(())
    }
}

/// How many of the manifest's shards are kept: the longest prefix that is contiguous from
/// the first prompt (0, or a part's start) and whose files have the listed sizes (a full check is `deepspec cache validate`).
pub(crate) fn kept_prefix(dir: &std::path::Path, manifest: &Manifest) -> usize {
    let mut next = manifest.first_prompt();
    for (k, s) in manifest.shards.iter().enumerate() {
        let whole = s.shard_id == k as u64
            && s.source_start == next
            && std::fs::metadata(dir.join(&s.file_name)).is_ok_and(|m| m.len() == s.bytes);
        if !whole {
            return k;
        }
        next = s.source_end;
    }
    manifest.shards.len()
}

/// Deletes what an interrupted run left half-written (`*.tmp`).
pub(crate) fn remove_temporaries(dir: &std::path::Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt too long to answer has an empty answer too: it counts as too long.
    #[test]
    fn drop_reasons_in_order_too_long_then_empty_then_too_few() {
        assert_eq!(drop_reason(100, 5, 2, false, false), None);
        assert_eq!(
            drop_reason(128, 0, 2, true, true),
            Some(DropReason::TooLong)
        );
        assert_eq!(
            drop_reason(128, 1, 2, true, false),
            Some(DropReason::TooLong)
        );
        assert_eq!(
            drop_reason(20, 1, 2, false, true),
            Some(DropReason::EmptyAnswer)
        );
        assert_eq!(
            drop_reason(20, 1, 2, false, false),
            Some(DropReason::TooFewLossTokens)
        );
        assert_eq!(drop_reason(0, 0, 0, true, false), Some(DropReason::TooLong));
        let mut dropped = Dropped::default();
        for reason in [
            DropReason::TooLong,
            DropReason::EmptyAnswer,
            DropReason::TooLong,
        ] {
            dropped.count(reason);
        }
        assert_eq!(
            dropped,
            Dropped {
                too_long: 2,
                too_few_loss_tokens: 0,
                empty_answer: 1
            }
        );
        assert_eq!(dropped.total(), 3);
    }
}
