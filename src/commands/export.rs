//! `deepspec export`: a training checkpoint in the layout serving engines load.

use anyhow::{bail, Context};
use deepspec_core::drafter::export_dir;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// A training checkpoint folder (`RUN/step_<n>` or `RUN/step_latest`).
    #[arg(long)]
    pub drafter: PathBuf,
    /// A new folder for `model.safetensors` + `config.json`.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    crate::commands::require_checkpoint_dir(&args.drafter, "--drafter")?;
    if args.out.join("model.safetensors").exists() || args.out.join("config.json").exists() {
        bail!(
            "{} already holds a model; export into a new folder",
            args.out.display()
        );
    }
    let summary = export_dir(&args.drafter, &args.out).with_context(|| {
        format!(
            "exporting {} to {}",
            args.drafter.display(),
            args.out.display()
        )
    })?;
    let p = summary.parameters as f64;
    let count = if p >= 1e9 {
        format!("{:.2} B", p / 1e9)
    } else {
        format!("{:.2} M", p / 1e6)
    };
    println!(
        "exported {} tensors ({count} parameters) to {}",
        summary.tensors,
        args.out.display()
    );
    if !summary.left_out.is_empty() {
        println!(
            "left out {:?}: the target repository already holds them",
            summary.left_out
        );
    }
    Ok(())
}
