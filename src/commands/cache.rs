//! `deepspec cache ...`: check, summarize and import training caches.

use deepspec_core::cache::{self, CacheReader};
use std::path::PathBuf;

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
}

pub fn run(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
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
