//! `deepspec datasets`: the benchmark sets' rows as prompt files.

use deepspec_core::io::atomic::write_atomically;
use deepspec_eval::datasets::held_out;
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
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            write_atomically(&out, text.as_bytes())?;
            println!("{} prompts -> {}", lines.len(), out.display());
            Ok(())
        }
    }
}
