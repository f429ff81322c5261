//! `deepspec cache ...`: check, summarize, merge and import training caches.

use anyhow::{bail, Context};
use deepspec_core::cache::synthetic::{write_v4_cache, write_v4_target, SyntheticCache};
use deepspec_core::cache::{self, CacheReader, Manifest};
use deepspec_core::recipe::Recipe;
use std::path::PathBuf;

fn synthetic_v4(
    recipe_name: &str,
    out: Option<PathBuf>,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let path = crate::commands::train::resolve_recipe(recipe_name)?;
    let recipe = Recipe::load_with(&path, &[])?;
    let target = &recipe.model.target_model_name_or_path;
    let Some(out) = out.or(recipe.data.target_cache_path.clone()) else {
        bail!(
            "no cache folder: pass --out DIR or set data.target_cache_path in {}",
            path.display()
        );
    };
    if Manifest::path(&out).exists() {
        bail!(
            "{} already holds a cache; choose another --out",
            out.display()
        );
    }
    if seq_len > recipe.data.max_length {
        bail!(
            "--seq-len {seq_len} is longer than data.max_length ({}) in {}",
            recipe.data.max_length,
            path.display()
        );
    }
    if !target.join("config.json").exists() {
        let Some(config) = &recipe.model.target_config else {
            bail!(
                "{} has no config.json and {} sets no model.target_config to make one from",
                target.display(),
                path.display()
            );
        };
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("reading model.target_config {}", config.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config.display()))?;
        if !deepspec_core::model::v4::V4Config::is_v4(&json) {
            bail!(
                "{}: model_type is not deepseek_v4; synthetic-v4 makes DeepSeek-V4 targets only",
                config.display()
            );
        }
        write_v4_target(target, &json, seed)?;
        println!(
            "wrote a synthetic DeepSeek-V4 target to {}",
            target.display()
        );
    } else if !deepspec_core::model::is_deepseek_v4(target) {
        bail!(
            "{} is not a DeepSeek-V4 model folder (its config.json's model_type)",
            target.display()
        );
    }
    let hc_mult = {
        let text = std::fs::read_to_string(target.join("config.json"))?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        json["hc_mult"].as_u64().unwrap_or(4) as usize
    };
    let spec = SyntheticCache {
        samples,
        seq_len,
        prompt_len: seq_len / 8,
        target_layer_ids: recipe.model.target_layer_ids.clone(),
        hc_mult,
        seed,
    };
    let m = write_v4_cache(&out, target, &spec)?;
    println!(
        "wrote a synthetic V4-shaped cache to {}: {} samples, {} tokens, taps {}",
        out.display(),
        m.num_samples,
        m.num_tokens,
        m.target_layer_ids
    );
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Check a cache end to end: manifest, shard checksums, schema, every sample's shapes.
    /// Exits 0 only when the cache is whole.
    Validate {
        /// Cache folder (holding manifest.json).
        dir: PathBuf,
    },
    /// Print a cache's size, token counts and sequence-length distribution.
    Stats { dir: PathBuf },
    /// Join the parts of a sharded `deepspec prepare --shard i/n` into one cache,
    /// byte-identical to a single `prepare` of the whole list. Refuses parts of different jobs
    /// (target, tokenizer, layers, settings, prompt list) or cuts, a missing, repeated or
    /// unfinished part, and an --out that holds anything. Shards are hard-linked where the
    /// file system allows (copied otherwise) and checked against their SHA-256.
    Merge {
        /// Every part folder of the job (any order).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// New cache folder (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert a reference DeepSpec cache (manifest.json + samples.idx + shard-*.bin,
    /// format version 2) into a deepspec Parquet cache; values are copied bit for bit.
    ImportDeepspec {
        /// Reference cache folder.
        src: PathBuf,
        /// New cache folder.
        dst: PathBuf,
        /// Largest shard payload in bytes.
        #[arg(long, default_value_t = 1 << 30)]
        shard_max_bytes: u64,
    },
    /// Import vLLM hidden-state dumps (one `*.safetensors` per request with `token_ids` [T]
    /// and `hidden_states` [T, layers, H], from the ExampleHiddenStatesConnector; see
    /// docs/engine-caches.md) as a training cache for the recipe's target and taps. The loss
    /// mask comes from the token ids and the recipe's chat format; resumable like `prepare`.
    ImportVllm {
        /// The dump folder (the connector's `shared_storage_path`).
        dumps: PathBuf,
        /// Recipe naming the target (its config, tokenizer and final norm are read) and its
        /// `model.target_layer_ids`.
        #[arg(long)]
        recipe: String,
        /// New (or interrupted) cache folder [default: the recipe's data.target_cache_path].
        #[arg(long)]
        out: Option<PathBuf>,
        /// The `eagle_aux_hidden_state_layer_ids` vLLM was launched with, in vLLM's numbering
        /// (id k = after k decoder layers, so deepspec's tap i is k = i + 1) [default: each
        /// recipe tap + 1, then the layer count L for the final state].
        #[arg(long, value_delimiter = ',')]
        dump_layer_ids: Vec<usize>,
        /// What the slot of id L holds: vLLM's residual before the final norm (normalised
        /// here with the target's norm weight) or an already normalised state.
        #[arg(long, value_enum, default_value_t = LastSlotArg::PreNorm)]
        last_slot: LastSlotArg,
        /// No progress bar or lines.
        #[arg(long)]
        quiet: bool,
    },
    /// A synthetic DeepSeek-V4-shaped target and cache for a V4 recipe, where no V4 target
    /// runs (CPU demos and tests): the target folder gets `config.json` from the recipe's
    /// `model.target_config` and random `embed.weight` / `head.weight` (only when it does not
    /// exist yet); the cache gets features with V4's shape and meaning (each tap the mean
    /// over the mHC streams).
    SyntheticV4 {
        /// A DeepSeek-V4 recipe (e.g. `dspark-v4-tiny`).
        #[arg(long)]
        recipe: String,
        /// New cache folder (default: the recipe's `data.target_cache_path`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        samples: usize,
        /// Tokens per sample (at most the recipe's `data.max_length`).
        #[arg(long, default_value_t = 96)]
        seq_len: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LastSlotArg {
    PreNorm,
    PostNorm,
}

fn import_vllm(
    dumps: PathBuf,
    recipe_name: &str,
    out: Option<PathBuf>,
    dump_layer_ids: Vec<usize>,
    last_slot: LastSlotArg,
    quiet: bool,
) -> anyhow::Result<()> {
    use deepspec_core::prepare::import_vllm::{import_vllm, LastSlot, VllmImportOptions};
    use deepspec_core::progress::ProgressMode;
    let recipe_path = crate::commands::train::resolve_recipe(recipe_name)?;
    let recipe = Recipe::load_with(&recipe_path, &[])?;
    let Some(out) = out.or(recipe.data.target_cache_path.clone()) else {
        bail!(
            "no cache folder: pass --out DIR or set data.target_cache_path in {}",
            recipe_path.display()
        );
    };
    let opts = VllmImportOptions {
        recipe,
        recipe_path,
        dumps,
        out,
        dump_layer_ids: (!dump_layer_ids.is_empty()).then_some(dump_layer_ids),
        last_slot: match last_slot {
            LastSlotArg::PreNorm => LastSlot::PreNorm,
            LastSlotArg::PostNorm => LastSlot::PostNorm,
        },
    };
    let bar = crate::commands::prepare::Bar::new(if quiet {
        ProgressMode::Silent
    } else {
        ProgressMode::detect()
    });
    let report = import_vllm(&opts, &bar).with_context(|| {
        format!(
            "importing {} into {}",
            opts.dumps.display(),
            opts.out.display()
        )
    })?;
    let m = &report.manifest;
    eprintln!(
        "{}: {} samples, {} tokens ({} trained) in {} shards from {} dumps ({} imported now)",
        opts.out.display(),
        m.num_samples,
        m.num_tokens,
        m.num_loss_tokens,
        m.shards.len(),
        report.files,
        report.imported
    );
    if report.imported > 0 {
        eprintln!(
            "{}",
            crate::commands::prepare::dropped_line(
                report.imported,
                &report.dropped,
                opts.recipe.data.max_length,
                opts.recipe.data.min_loss_tokens
            )
        );
        eprintln!(
            "import: {} tokens in {:.2} s ({:.0} tokens/s)",
            report.tokens,
            report.seconds,
            report.tokens as f64 / report.seconds.max(1e-9)
        );
    }
    Ok(())
}

pub fn run(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::ImportVllm {
            dumps,
            recipe,
            out,
            dump_layer_ids,
            last_slot,
            quiet,
        } => import_vllm(dumps, &recipe, out, dump_layer_ids, last_slot, quiet),
        CacheCommand::Validate { dir } => {
            let report = cache::validate(&dir)?;
            println!(
                "{}: ok ({} shards, {} samples, {} tokens, {} bytes)",
                dir.display(),
                report.num_shards,
                report.num_samples,
                report.num_tokens,
                report.bytes
            );
            Ok(())
        }
        CacheCommand::Stats { dir } => stats(&dir),
        CacheCommand::Merge { parts, out } => {
            let r = cache::merge::merge_parts(&parts, &out)
                .with_context(|| format!("merging {} parts into {}", parts.len(), out.display()))?;
            let m = &r.manifest;
            println!(
                "{}: {} parts merged: {} samples, {} tokens in {} shards ({} hard-linked, {} copied)",
                out.display(),
                r.parts,
                m.num_samples,
                m.num_tokens,
                m.shards.len(),
                r.linked,
                r.copied
            );
            Ok(())
        }
        CacheCommand::SyntheticV4 {
            recipe,
            out,
            samples,
            seq_len,
            seed,
        } => synthetic_v4(&recipe, out, samples, seq_len, seed),
        CacheCommand::ImportDeepspec {
            src,
            dst,
            shard_max_bytes,
        } => {
            let m = cache::reference::import_reference(&src, &dst, shard_max_bytes)?;
            println!(
                "{} -> {}: {} samples, {} tokens in {} shards",
                src.display(),
                dst.display(),
                m.num_samples,
                m.num_tokens,
                m.shards.len()
            );
            Ok(())
        }
    }
}

fn stats(dir: &std::path::Path) -> anyhow::Result<()> {
    let reader = CacheReader::open(dir)?;
    let m = &reader.manifest;
    let lens = reader.seq_lens()?;
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let per_token = |b: u64| b as f64 / m.num_tokens as f64;
    let n_layers = m.target_layer_ids.len() as u64;
    let reference =
        m.num_tokens * (6 + 2 * m.hidden_size as u64 * (n_layers + 1)) + 56 * m.num_samples;
    println!("cache:            {}", dir.display());
    println!(
        "complete:         {} ({} shards answer {} of {} prompts)",
        m.complete,
        m.shards.len(),
        m.prompts_covered(),
        m.job.num_prompts
    );
    println!(
        "target:           {} (sha256 {})",
        m.target.name_or_path,
        m.target.sha256.as_deref().unwrap_or("unknown")
    );
    println!(
        "layers:           {}, hidden size {}",
        m.target_layer_ids, m.hidden_size
    );
    println!("hidden dtype:     {}", m.hidden_dtype.name());
    println!("samples:          {}", m.num_samples);
    println!(
        "tokens:           {} ({} trained, {:.1}%)",
        m.num_tokens,
        m.num_loss_tokens,
        100.0 * m.num_loss_tokens as f64 / m.num_tokens.max(1) as f64
    );
    if !lens.is_empty() {
        let min = lens.iter().min().unwrap();
        let max = lens.iter().max().unwrap();
        let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
        println!("seq len:          min {min}, mean {mean:.1}, max {max}");
    }
    if m.num_tokens > 0 {
        println!(
            "bytes:            {bytes} ({:.1} bytes/token; the reference layout would take {reference}, {:.1} bytes/token)",
            per_token(bytes),
            per_token(reference)
        );
    } else {
        println!("bytes:            {bytes}");
    }
    Ok(())
}
