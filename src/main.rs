//! `deepspec`: the command-line front end. Thin: parses arguments, picks the backend once, and
//! hands over to the library crates.

mod commands;
mod device;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deepspec",
    version,
    about = "Train and evaluate draft models for speculative decoding (Eagle3, DFlash, DSpark)"
)]
struct Cli {
    /// On an error, also print where in deepspec it was raised (a backtrace), for a bug
    /// report; RUST_LIB_BACKTRACE=1 does the same.
    #[arg(long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a training cache: chat-template prompts, regenerate answers with the target, store
    /// the tapped hidden states as Parquet shards.
    Prepare(commands::prepare::PrepareArgs),
    /// Training caches: validate, stats, import a reference DeepSpec cache.
    #[command(subcommand)]
    Cache(commands::cache::CacheCommand),
    /// Benchmark sets as prompt files (held-out rows for in-domain training).
    #[command(subcommand)]
    Datasets(commands::datasets::DatasetsCommand),
    /// Train an Eagle3, DFlash or DSpark drafter from a recipe on a prepared cache.
    Train(commands::train::TrainArgs),
    /// Measure accepted length with a verifying speculative-decoding loop on benchmark sets,
    /// or offline from a cache (`--offline`).
    Eval(Box<commands::eval::EvalArgs>),
    /// Write a training checkpoint the way serving engines load it (DeepSeek-V4: the `mtp.*`
    /// tensors alone, to merge into the target repository).
    Export(commands::export::ExportArgs),
    /// Recipes: show the resolved settings.
    #[command(subcommand)]
    Recipe(commands::train::RecipeCommand),
    /// Chat-template a prompt and stream the target model's reply.
    Generate(commands::generate::GenerateArgs),
    /// Benchmarks (throughput figures, not tests).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

/// Whether errors carry a backtrace. A user error (a missing file, a bad field) reads best as
/// its chain of causes alone, so RUST_BACKTRACE=1, often set machine-wide, does not add one;
/// `--verbose` or RUST_LIB_BACKTRACE (which std reads first) asks for it. Panics, which are
/// bugs, keep RUST_BACKTRACE's backtraces.
fn choose_error_backtraces(verbose: bool) {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Before any error exists (std reads the variable once, at the first capture) and
        // while this is the only thread.
        std::env::set_var("RUST_LIB_BACKTRACE", if verbose { "1" } else { "0" });
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    choose_error_backtraces(cli.verbose);
    match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Cache(cmd) => commands::cache::run(cmd),
        Command::Datasets(cmd) => commands::datasets::run(cmd),
        Command::Train(args) => commands::train::run(args),
        Command::Eval(args) => commands::eval::run(*args),
        Command::Export(args) => commands::export::run(args),
        Command::Recipe(cmd) => commands::train::run_recipe(cmd),
        Command::Generate(args) => commands::generate::run(args),
        Command::Bench(cmd) => commands::bench::run(cmd),
    }
}
