pub mod bench;
pub mod cache;
pub mod datasets;
pub mod eval;
pub mod export;
pub mod generate;
pub mod offline;
pub mod prepare;
pub mod serving;
pub mod train;

use std::path::Path;

/// Stops early, before any model is loaded, when the checkpoint folder `dir` (given with
/// `flag`) does not exist, naming the `step_*` folders that do exist next to it: the usual
/// cause is a step that `train.keep_last` has since deleted.
pub fn require_checkpoint_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        anyhow::bail!(
            "{flag} {} is a file; it must be a checkpoint folder (config.json + model.safetensors)",
            dir.display()
        );
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else {
        anyhow::bail!(
            "{flag} {}: the folder does not exist, nor does {}",
            dir.display(),
            parent.display()
        );
    };
    let mut steps: Vec<(usize, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with("step_"))
        .map(|name| {
            // Numbered steps in step order, then `step_latest` and anything else by name.
            let order = name["step_".len()..].parse().unwrap_or(usize::MAX);
            (order, name)
        })
        .collect();
    steps.sort();
    if steps.is_empty() {
        anyhow::bail!(
            "{flag} {}: the folder does not exist, and {} holds no step_* checkpoint folders",
            dir.display(),
            parent.display()
        );
    }
    let names: Vec<String> = steps.into_iter().map(|(_, name)| name).collect();
    anyhow::bail!(
        "{flag} {}: the folder does not exist; {} holds {} (older steps are deleted as training goes on, see train.keep_last)",
        dir.display(),
        parent.display(),
        names.join(", ")
    )
}
