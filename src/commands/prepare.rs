//! `deepspec prepare`: build (or resume) a training cache from a recipe and prompts.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::Context;
use burn::tensor::backend::Backend;
use deepspec_core::cache::HiddenDtype;
use deepspec_core::prepare::{
    self, Dropped, OnBadLine, PrepareOptions, Progress, PromptSource, ShardSpec, Throughput,
};
use deepspec_core::progress::{self as shown, ProgressMode};
use deepspec_core::recipe::Recipe;
use std::cell::RefCell;
use std::path::PathBuf;

/// Prompts the target writes itself when no prompt file is given.
const DEFAULT_SELF_INSTRUCT: usize = 16;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Re-running the same command after an interruption (even kill -9) finishes the job: finished \
shards are kept and the result is byte-identical to an uninterrupted run. A cache made with a \
different target, tokenizer, layer set or settings is refused.")]
pub struct PrepareArgs {
    /// Recipe (TOML): [model] target_model_name_or_path, target_layer_ids; [data]; [prepare].
    #[arg(long)]
    pub recipe: PathBuf,
    /// JSONL prompts: {"turns": [...]}, {"messages": [...]} (OpenAI) or {"conversations":
    /// [...]} (ShareGPT). Without it the target writes its own prompts (--self-instruct).
    #[arg(long, conflicts_with = "self_instruct")]
    pub prompts: Option<PathBuf>,
    /// Let the target write N distinct user prompts, then answer them [default: 16 when no
    /// --prompts is given].
    #[arg(long, value_name = "N")]
    pub self_instruct: Option<usize>,
    /// Use only the first N prompts.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Prepare only part I (from 0) of N of the prompt list, into its own --out folder; join
    /// the N folders with `deepspec cache merge`. Needs `prepare.shard_prompts` in the recipe
    /// (parts start at multiples of it) and a fixed list (--prompts). See
    /// docs/prepare-sharding.md.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<ShardSpec>,
    /// With --self-instruct: write the prompts the target writes to this JSONL file and stop
    /// (no answers, no cache); the list step of a sharded job, whose parts then use
    /// `--prompts FILE --shard i/n`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompts", "shard", "estimate"])]
    pub prompts_out: Option<PathBuf>,
    /// Cache folder (created; an existing cache of the same job is resumed). Not used with
    /// --prompts-out.
    #[arg(long, required_unless_present = "prompts_out")]
    pub out: Option<PathBuf>,
    /// What to do with a malformed prompt line: `fail` stops naming file, line and field;
    /// `skip` reports it and goes on.
    #[arg(long, value_enum, default_value_t = BadLine::Fail)]
    pub on_bad_line: BadLine,
    /// Hidden-state storage: bf16 (as the reference) or fp8 (e4m3 with per-vector scale,
    /// half the bytes). Overrides the recipe's `prepare.hidden_dtype`.
    #[arg(long, value_parser = parse_dtype)]
    pub hidden_dtype: Option<HiddenDtype>,
    /// Print the number of samples, tokens and bytes (upper bounds) and exit without work.
    #[arg(long)]
    pub estimate: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Override a recipe field: `--set prepare.max_new_tokens=64` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BadLine {
    Fail,
    Skip,
}

fn parse_dtype(s: &str) -> Result<HiddenDtype, String> {
    s.parse()
}

impl PrepareArgs {
    fn options(&self) -> anyhow::Result<PrepareOptions> {
        let recipe_path = crate::commands::train::resolve_recipe(&self.recipe.to_string_lossy())?;
        let mut recipe = Recipe::load_with(&recipe_path, &self.overrides)?;
        if let Some(dtype) = self.hidden_dtype {
            recipe.prepare.hidden_dtype = dtype;
        }
        let source = match &self.prompts {
            Some(path) => PromptSource::File {
                path: path.clone(),
                on_bad_line: match self.on_bad_line {
                    BadLine::Fail => OnBadLine::Fail,
                    BadLine::Skip => OnBadLine::Skip,
                },
            },
            None => PromptSource::SelfInstruct(self.self_instruct.unwrap_or(DEFAULT_SELF_INSTRUCT)),
        };
        Ok(PrepareOptions {
            recipe,
            recipe_path,
            source,
            limit: self.limit,
            out: self.out.clone().unwrap_or_default(),
            shard: self.shard,
        })
    }
}

pub fn run(args: PrepareArgs) -> anyhow::Result<()> {
    if args.estimate {
        let opts = args.options()?;
        let e = prepare::estimate(&opts)?;
        let bound = if e.upper_bound { "at most" } else { "about" };
        println!("samples:          {}", e.samples);
        println!("tokens ({bound}): {}", e.max_tokens);
        println!(
            "bytes ({bound}):  {} ({} hidden, {} B/token, {} shards)",
            e.bytes,
            e.hidden_dtype.name(),
            e.bytes_per_token,
            e.shards
        );
        println!("reference layout: {} bytes", e.reference_bytes);
        return Ok(());
    }
    dispatch(args.device, args)
}

/// Prompts answered and passed through the target, with tokens/s of both phases and the
/// ETA: a bar on a terminal, a line per batch (at most one per 10 s) in a log.
pub(crate) struct Bar {
    phase: RefCell<Option<shown::Progress>>,
    mode: ProgressMode,
}

impl Bar {
    pub(crate) fn new(mode: ProgressMode) -> Self {
        Bar {
            phase: RefCell::new(None),
            mode,
        }
    }
}

impl Progress for Bar {
    fn begin(&self, phase: &str, units: u64) {
        *self.phase.borrow_mut() = Some(shown::Progress::new(self.mode, phase, units, "prompts"));
    }

    fn advance(&self, units: u64, t: &Throughput) {
        if let Some(phase) = &*self.phase.borrow() {
            phase.inc(units);
            phase.update(&format!(
                "generate_tok/s={:.0} target_pass_tok/s={:.0}",
                t.generation_rate(),
                t.target_rate()
            ));
        }
    }

    fn warn(&self, message: &str) {
        let line = format!("warning: {message}");
        // Warnings print even with --quiet; above the bar when one is drawn.
        match &*self.phase.borrow() {
            Some(phase) if self.mode == ProgressMode::Bar => phase.println(&line),
            _ => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(phase) = self.phase.borrow_mut().take() {
            phase.finish();
        }
    }
}

/// `dropped 7 of 24 prompts: 5 too long (...), 2 too few loss tokens (...), 0 empty answer`.
pub(crate) fn dropped_line(
    processed: u64,
    d: &Dropped,
    max_length: usize,
    min_loss_tokens: usize,
) -> String {
    format!(
        "dropped {} of {processed} prompts: {} too long (over data.max_length = {max_length} tokens), \
         {} too few loss tokens (under data.min_loss_tokens = {min_loss_tokens}), {} empty answer",
        d.total(),
        d.too_long,
        d.too_few_loss_tokens,
        d.empty_answer
    )
}

impl OnBackend for PrepareArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let opts = self.options()?;
        let mode = if self.quiet {
            ProgressMode::Silent
        } else {
            ProgressMode::detect()
        };
        if let Some(path) = &self.prompts_out {
            let n = prepare::write_self_instruct_list::<B>(&opts, &device, &Bar::new(mode), path)?;
            eprintln!(
                "{}: {n} self-instruct prompts; prepare them with `--prompts {} --shard i/n`",
                path.display(),
                path.display()
            );
            return Ok(());
        }
        if !self.quiet {
            let e = prepare::estimate(&opts)?;
            eprintln!(
                "plan: {} prompts, {} {} tokens and {} bytes ({} hidden states)",
                e.samples,
                if e.upper_bound { "at most" } else { "about" },
                e.max_tokens,
                e.bytes,
                e.hidden_dtype.name()
            );
        }
        let bar = Bar::new(mode);
        let report = prepare::prepare::<B>(&opts, &device, &bar)
            .with_context(|| format!("preparing {}", opts.out.display()))?;
        let m = &report.manifest;
        let t = &report.throughput;
        if let Some(part) = m.part {
            eprintln!(
                "{}: {part}{}",
                opts.out.display(),
                if m.part_finished() {
                    ", finished; join the parts with `deepspec cache merge`"
                } else {
                    ""
                }
            );
        }
        eprintln!(
            "{}: {} samples, {} tokens ({} trained) in {} shards ({} written now, {} kept)",
            opts.out.display(),
            m.num_samples,
            m.num_tokens,
            m.num_loss_tokens,
            m.shards.len(),
            report.shards_written,
            report.shards_kept
        );
        if report.prompts_processed > 0 {
            eprintln!(
                "{}",
                dropped_line(
                    report.prompts_processed,
                    &report.dropped,
                    opts.recipe.data.max_length,
                    opts.recipe.data.min_loss_tokens
                )
            );
        }
        if report.shards_written > 0 {
            eprintln!(
                "generation: {} tokens in {:.1} s ({:.1} tok/s); target pass: {} tokens in {:.1} s ({:.1} tok/s)",
                t.generated_tokens,
                t.generation_secs,
                t.generation_rate(),
                t.target_tokens,
                t.target_secs,
                t.target_rate()
            );
        }
        let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
        if m.num_tokens > 0 {
            eprintln!(
                "cache: {bytes} bytes, {:.1} bytes/token ({})",
                bytes as f64 / m.num_tokens as f64,
                m.hidden_dtype.name()
            );
        }
        Ok(())
    }
}
