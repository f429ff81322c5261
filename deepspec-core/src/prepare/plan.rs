//! Before any heavy work: the job's identity (target and tokenizer hashes, layers, settings),
//! its shard plan, and the `--estimate` figures.

use super::prompts::{self, Conversation, OnBadLine};
use crate::cache::manifest::{FORMAT_NAME, FORMAT_VERSION};
use crate::cache::{
    part_range, HiddenDtype, JobSettings, Manifest, PartOf, ShardLayout, TargetIdentity,
};
use crate::io::chat::{ChatTemplate, Message, TurnFormat};
use crate::model::load_target_meta;
use crate::recipe::Recipe;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The normalized prompt list kept in the cache folder.
pub const PROMPTS_FILE: &str = "prompts.jsonl";

/// Parquet metadata and page headers allowed per sample when sizing shards (measured: about
/// 500 bytes for seven columns).
pub(crate) const SAMPLE_OVERHEAD_BYTES: u64 = 1024;

#[derive(Debug, Clone)]
pub enum PromptSource {
    File {
        path: PathBuf,
        on_bad_line: OnBadLine,
    },
    /// The target writes this many user prompts itself.
    SelfInstruct(usize),
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub recipe: Recipe,
    /// Where the recipe was read from (for error messages).
    pub recipe_path: PathBuf,
    pub source: PromptSource,
    /// Use only the first N prompts.
    pub limit: Option<usize>,
    pub out: PathBuf,
    /// Prepare only this part of the prompt list (`--shard i/n`).
    pub shard: Option<ShardSpec>,
}

/// `--shard INDEX/COUNT`: part `index` (from 0) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for ShardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not INDEX/COUNT with 0 <= INDEX < COUNT (e.g. `0/8`)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(ShardSpec { index, count })
    }
}

pub(crate) struct Planned {
    pub manifest: Manifest,
    pub layout: ShardLayout,
    pub format: TurnFormat,
    /// Known up front for prompt files; `None` until self-instruct has run.
    pub prompts: Option<Vec<Conversation>>,
    pub self_instruct: Option<usize>,
}

impl Planned {
    pub fn set_prompts(&mut self, jsonl: &str, count: u64) {
        self.manifest.job.prompts_sha256 = Some(sha256_hex(jsonl.as_bytes()));
        self.manifest.job.num_prompts = count;
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::cache::writer::hex(&Sha256::digest(bytes))
}

/// SHA-256 over a target's weight files: the GGUF file, or a folder's `config.json` and
/// `*.safetensors` in name order (each file's name and bytes).
pub fn target_sha256(path: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?
        {
            let p = entry?.path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if name == "config.json" || name.ends_with(".safetensors") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut hasher = Sha256::new();
    for f in files {
        hasher.update(
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        );
        let mut file =
            std::fs::File::open(&f).with_context(|| format!("opening {}", f.display()))?;
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("reading {}", f.display()))?;
    }
    Ok(crate::cache::writer::hex(&hasher.finalize()))
}

pub fn parse_prompts_jsonl(text: &str) -> anyhow::Result<Vec<Conversation>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            prompts::parse_line(line).map_err(|(field, detail)| {
                anyhow::anyhow!("{PROMPTS_FILE}:{}: field `{field}`: {detail}", i + 1)
            })
        })
        .collect()
}

fn read_source(
    opts: &PrepareOptions,
    warn: &mut dyn FnMut(&str),
) -> anyhow::Result<(Option<Vec<Conversation>>, Option<usize>)> {
    Ok(match &opts.source {
        PromptSource::File { path, on_bad_line } => (
            Some(prompts::read_prompts(path, *on_bad_line, opts.limit, warn)?),
            None,
        ),
        PromptSource::SelfInstruct(n) => {
            if let Some(shard) = opts.shard {
                anyhow::bail!(
                    "--shard {}/{} needs a fixed prompt list, and self-instruct prompts are written by the run: write the list first with `deepspec prepare --recipe R --self-instruct N --prompts-out prompts.jsonl`, then run every part with `--prompts prompts.jsonl --shard i/n`",
                    shard.index,
                    shard.count
                );
            }
            let n = opts.limit.map_or(*n, |l| l.min(*n));
            anyhow::ensure!(n > 0, "--self-instruct needs a positive count");
            (None, Some(n))
        }
    })
}

/// Reads the recipe's target metadata (not its weights) and builds the job's manifest.
pub(crate) fn plan_job(opts: &PrepareOptions) -> anyhow::Result<Planned> {
    plan_job_warn(opts, &mut |m| eprintln!("warning: {m}"))
}

fn plan_job_warn(opts: &PrepareOptions, warn: &mut dyn FnMut(&str)) -> anyhow::Result<Planned> {
    let recipe = &opts.recipe;
    let target_path = &recipe.model.target_model_name_or_path;
    let (config, tok) = load_target_meta(target_path).with_context(|| {
        format!(
            "{}: recipe field `model.target_model_name_or_path` = {}",
            opts.recipe_path.display(),
            target_path.display()
        )
    })?;
    recipe.check_layers(&opts.recipe_path, config.num_hidden_layers)?;
    let template =
        ChatTemplate::for_tokenizer(&tok).context("compiling the model's chat template")?;
    let format = match &recipe.data.chat_template {
        Some(name) => TurnFormat::by_name(name).expect("validated with the recipe"),
        None => template.format.with_context(|| {
            format!(
                "{}: field `data.chat_template`: the target's chat template is not one deepspec recognises; set it to one of {}",
                opts.recipe_path.display(),
                TurnFormat::names()
            )
        })?,
    };
    let (prompts, self_instruct) = read_source(opts, warn)?;
    let p = &recipe.prepare;
    let layout = ShardLayout {
        hidden_size: config.hidden_size,
        target_layer_ids: recipe.model.target_layer_ids.clone(),
        hidden_dtype: p.hidden_dtype,
    };
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        complete: false,
        target: TargetIdentity {
            name_or_path: target_path.display().to_string(),
            sha256: Some(target_sha256(target_path)?),
            num_layers: Some(config.num_hidden_layers),
            vocab_size: Some(config.vocab_size),
        },
        tokenizer_sha256: Some(sha256_hex(tok.to_json().as_bytes())),
        target_layer_ids: layout.target_layer_ids.clone(),
        hidden_size: config.hidden_size,
        hidden_dtype: p.hidden_dtype,
        token_dtype: "int32".into(),
        job: JobSettings {
            source: match self_instruct {
                Some(n) => format!("self-instruct:{n}"),
                None => "prompts".into(),
            },
            prompts_sha256: None,
            num_prompts: 0,
            chat_template: Some(format.name.into()),
            max_length: recipe.data.max_length,
            min_loss_tokens: recipe.data.min_loss_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            max_new_tokens: p.max_new_tokens,
            stop_tokens: p.stop_tokens.clone(),
            enable_thinking: p.enable_thinking,
            seed: p.seed,
            batch_size: p.batch_size,
            shard_max_bytes: p.shard_max_bytes,
            shard_prompts: p.shard_prompts.map(|n| n as u64),
        },
        num_samples: 0,
        num_tokens: 0,
        num_loss_tokens: 0,
        shards: Vec::new(),
        import: None,
        part: None,
    };
    let mut planned = Planned {
        manifest,
        layout,
        format,
        prompts: None,
        self_instruct,
    };
    if let Some(prompts) = prompts {
        planned.set_prompts(&prompts::to_jsonl(&prompts), prompts.len() as u64);
        if let Some(shard) = opts.shard {
            let Some(block) = planned.manifest.job.shard_prompts else {
                anyhow::bail!(
                    "{}: field `prepare.shard_prompts` is not set: --shard {}/{} cuts the prompt list at multiples of it, so set it in the recipe (a multiple of prepare.batch_size = {}, e.g. `shard_prompts = {}`) and use the same recipe for every part",
                    opts.recipe_path.display(),
                    shard.index,
                    shard.count,
                    p.batch_size,
                    p.batch_size * 128
                );
            };
            let (start, end) = part_range(prompts.len() as u64, block, shard.index, shard.count);
            planned.manifest.part = Some(PartOf {
                index: shard.index,
                count: shard.count,
                source_start: start,
                source_end: end,
            });
        }
        planned.prompts = Some(prompts);
    }
    Ok(planned)
}

/// Upper bounds of a job's size, computed before any generation.
#[derive(Debug, Clone)]
pub struct Estimate {
    pub samples: u64,
    /// Σ min(max_length, prompt tokens + turns × (max_new_tokens + turn markers)).
    pub max_tokens: u64,
    /// True when `max_tokens` bounds the result (prompt files); self-instruct prompts are
    /// only estimated, since sampled text may re-tokenize to a different length.
    pub upper_bound: bool,
    pub hidden_dtype: HiddenDtype,
    pub bytes_per_token: u64,
    /// Our Parquet payload for `max_tokens`.
    pub bytes: u64,
    /// The reference's binary layout for the same tokens (bf16, + 56-byte index records).
    pub reference_bytes: u64,
    /// About how many shards `bytes` fills.
    pub shards: u64,
}

/// Prints nothing and loads no weights: the tokenizer renders each prompt to count tokens.
pub fn estimate(opts: &PrepareOptions) -> anyhow::Result<Estimate> {
    let planned = plan_job(opts)?;
    let recipe = &opts.recipe;
    let (config, tok) = load_target_meta(&recipe.model.target_model_name_or_path)?;
    let template = ChatTemplate::for_format(&tok, &planned.format)?;
    let max_length = recipe.data.max_length as u64;
    let max_new = recipe.prepare.max_new_tokens as u64;
    let format = &planned.format;
    // Each answer adds at most max_new tokens plus its turn's header and end-of-turn.
    let per_turn = max_new
        + tok.encode(format.assistant_header)?.len() as u64
        + tok.encode(format.end_of_turn)?.len() as u64;
    let thinking = Some(recipe.prepare.enable_thinking);
    let with_system = |messages: &[Message]| -> Vec<Message> {
        match (format.default_system, messages.first()) {
            (Some(system), Some(first)) if first.role != "system" => {
                std::iter::once(Message::new("system", system))
                    .chain(messages.iter().cloned())
                    .collect()
            }
            _ => messages.to_vec(),
        }
    };
    let (samples, max_tokens, upper_bound) = match &planned.prompts {
        Some(prompts) => {
            let mut tokens = 0;
            for c in prompts {
                let asked: Vec<Message> = c
                    .iter()
                    .filter(|m| m.role != "assistant")
                    .cloned()
                    .collect();
                let turns = asked.iter().filter(|m| m.role == "user").count() as u64;
                let prompt_tokens = template
                    .prompt_ids(&tok, &with_system(&asked), thinking)?
                    .len() as u64;
                tokens += max_length.min(prompt_tokens + turns * per_turn);
            }
            (prompts.len() as u64, tokens, true)
        }
        None => {
            // The prompts do not exist yet: count the template around an empty user message
            // and the longest prompt self-instruct may write.
            let n = planned.self_instruct.unwrap_or(0) as u64;
            let lead =
                template.prompt_ids(&tok, &with_system(&[Message::new("user", "")]), thinking)?;
            let per = max_length
                .min(lead.len() as u64 + recipe.prepare.self_instruct_max_tokens as u64 + per_turn);
            (n, n * per, false)
        }
    };
    let n_layers = recipe.model.target_layer_ids.len();
    let dtype = recipe.prepare.hidden_dtype;
    let bytes_per_token = dtype.bytes_per_token(config.hidden_size, n_layers) as u64;
    let reference_per_token = 4 + 1 + 1 + 2 * config.hidden_size as u64 * (n_layers as u64 + 1);
    Ok(Estimate {
        samples,
        max_tokens,
        upper_bound,
        hidden_dtype: dtype,
        bytes_per_token,
        bytes: max_tokens * bytes_per_token + samples * SAMPLE_OVERHEAD_BYTES,
        reference_bytes: max_tokens * reference_per_token + samples * 56,
        shards: (max_tokens * bytes_per_token + samples * SAMPLE_OVERHEAD_BYTES)
            .div_ceil(recipe.prepare.shard_max_bytes)
            .max(1),
    })
}
