//! `deepspec datasets`: the benchmark sets' rows as prompt files.

use anyhow::Context;
use deepspec_eval::datasets::held_out;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum DatasetsCommand {
    /// Write the rows the evaluation never decodes (past each set's maximum in the seeded
    /// shuffle) as a `{"turns": [...]}` prompt file for `deepspec prepare --prompts`:
    /// in-domain training prompts disjoint from the eval prompts.
    HeldOut {
        /// Folder of `<set>.jsonl` files.
        #[arg(long)]
        datasets: PathBuf,
        /// Comma-separated sets with spare rows (gsm8k, mbpp, livecodebench, alpaca,
        /// arena-hard-v2).
        #[arg(long, value_delimiter = ',', required = true)]
        sets: Vec<String>,
        /// At most this many prompts per set.
        #[arg(long)]
        per_set: Option<usize>,
        /// The evaluation's seed (its subsets depend on it).
        #[arg(long, default_value_t = 980_406)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: DatasetsCommand) -> anyhow::Result<()> {
    match cmd {
        DatasetsCommand::HeldOut {
            datasets,
            sets,
            per_set,
            seed,
            out,
        } => {
            let mut lines = Vec::new();
            for name in &sets {
                let path = datasets.join(format!("{name}.jsonl"));
                let set = held_out(name, &path, seed, per_set)?;
                eprintln!("{name}: {} held-out prompts", set.samples.len());
                for sample in set.samples {
                    lines.push(serde_json::json!({ "turns": sample.turns }).to_string());
                }
            }
            let tmp = out.with_extension("jsonl.tmp");
            let mut file = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            for line in &lines {
                writeln!(file, "{line}")?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
            println!("{} prompts -> {}", lines.len(), out.display());
            Ok(())
        }
    }
}
