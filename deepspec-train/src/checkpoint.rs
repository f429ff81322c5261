//! Training checkpoints: `OUT/step_<n>/` holds the drafter in the reference's layout
//! (`config.json` + `model.safetensors`) plus our resume state (`trainer_state.json`,
//! `optimizer.safetensors`); `OUT/step_latest` points at the newest. Every checkpoint is
//! written into a temporary folder and renamed, so a crash never leaves half of one.

use crate::optim::{AdamW, Moments};
use anyhow::{bail, Context};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use deepspec_core::drafter::{named_params, Drafter, DrafterConfig};
use deepspec_core::io::file_name::join_plain;
use deepspec_core::io::safetensors::{write_f32, NamedTensor, SafetensorsFile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything besides weights and moments that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Micro-batches consumed (the data position).
    pub next_micro_step: usize,
    pub local_batch_size: usize,
    pub global_batch_size: usize,
    pub max_train_steps: usize,
}

/// The resume state's file in a checkpoint folder; also what marks a folder as one this
/// trainer wrote.
pub const TRAINER_STATE: &str = "trainer_state.json";

pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("step_{step}"))
}

pub fn latest(out: &Path) -> PathBuf {
    out.join("step_latest")
}

/// The checkpoint folder `OUT/step_latest` stands for, never outside `OUT`: the link must
/// name a folder next to it (as [`save`] writes it, `step_<n>`), and that folder must be a
/// real directory, not another link. A `step_latest` that is itself a folder is used as is.
pub fn resolve_latest(out: &Path) -> anyhow::Result<PathBuf> {
    let link = latest(out);
    let meta = std::fs::symlink_metadata(&link)
        .with_context(|| format!("no checkpoint to resume at {}", link.display()))?;
    if !meta.file_type().is_symlink() {
        return Ok(link);
    }
    let target = std::fs::read_link(&link)
        .with_context(|| format!("reading the link {}", link.display()))?;
    let outside = || {
        anyhow::anyhow!(
            "{} points at `{}`, which is not a step_<n> folder in {}; a checkpoint link may only name a folder next to it (repoint it with `ln -sfn step_<n> {}`)",
            link.display(),
            target.display(),
            out.display(),
            link.display()
        )
    };
    let name = target.to_str().ok_or_else(outside)?;
    let dir = join_plain(out, name).map_err(|_| outside())?;
    let is_folder = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir());
    if !is_folder {
        bail!(
            "{} points at `{name}`, but {} is not a checkpoint folder (deleted, or a link itself); resume from another step by repointing it with `ln -sfn step_<n> {}`",
            link.display(),
            dir.display(),
            link.display()
        );
    }
    Ok(dir)
}

/// The step of a folder named exactly as [`step_dir`] names it (`step_7`, not `step_07`,
/// `step_+7` or `step_latest`).
fn step_of(name: &str) -> Option<usize> {
    let step: usize = name.strip_prefix("step_")?.parse().ok()?;
    (name == format!("step_{step}")).then_some(step)
}

/// Deletes all but the newest `keep_last` checkpoints in `out`. Only folders this trainer
/// wrote are candidates: real directories (not links) in `out`, named `step_<n>` exactly,
/// holding a `trainer_state.json`; anything else in `out` is left alone.
fn prune(out: &Path, keep_last: usize) -> anyhow::Result<()> {
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let step = step_of(e.file_name().to_str()?)?;
            e.path()
                .join(TRAINER_STATE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep_last);
    for (_, path) in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("removing old checkpoint {}", path.display()))?;
    }
    Ok(())
}

/// Writes `OUT/step_<step>` and repoints `OUT/step_latest`, then keeps only the newest
/// `keep_last` step folders (0 keeps all; see [`prune`] for which folders count).
pub fn save<B: AutodiffBackend>(
    out: &Path,
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    optim: &AdamW<B>,
    state: &TrainerState,
    keep_last: usize,
) -> anyhow::Result<PathBuf> {
    let final_dir = step_dir(out, state.global_step);
    let tmp = out.join(format!(".tmp-step_{}", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    drafter.valid().save(&tmp, config)?;
    let names: BTreeMap<_, _> = named_params(drafter, true)
        .into_iter()
        .map(|p| (p.id, p.name))
        .collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (id, m) in &optim.moments {
        let name = names
            .get(id)
            .context("optimizer state for a parameter the drafter does not have")?;
        let n = m.exp_avg.dims()[0];
        let host = |t: &Tensor<B::InnerBackend, 1>| deepspec_core::model::to_host(t.clone()).data;
        tensors.push((format!("{name}.exp_avg"), vec![n], host(&m.exp_avg)));
        tensors.push((format!("{name}.exp_avg_sq"), vec![n], host(&m.exp_avg_sq)));
        if let Some(master) = optim.masters.get(id) {
            tensors.push((format!("{name}.master"), vec![n], host(master)));
        }
    }
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, s, d)| NamedTensor {
            name: n,
            shape: s,
            data: d,
        })
        .collect();
    let meta = BTreeMap::from([("adam_step".to_string(), optim.step.to_string())]);
    write_f32(&tmp.join("optimizer.safetensors"), &named, &meta)?;
    std::fs::write(
        tmp.join(TRAINER_STATE),
        serde_json::to_string_pretty(state)? + "\n",
    )
    .with_context(|| format!("writing {}", tmp.join(TRAINER_STATE).display()))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    // Repoint step_latest atomically: a new link under a temporary name renamed over it.
    let link_tmp = out.join(".tmp-step_latest");
    let _ = std::fs::remove_file(&link_tmp);
    std::os::unix::fs::symlink(final_dir.file_name().unwrap(), &link_tmp)
        .with_context(|| format!("creating {}", link_tmp.display()))?;
    std::fs::rename(&link_tmp, latest(out))
        .with_context(|| format!("updating {}", latest(out).display()))?;
    if keep_last > 0 {
        prune(out, keep_last)?;
    }
    Ok(final_dir)
}

/// Loads `OUT/step_latest`: the drafter, the optimizer and the trainer state.
pub fn load<B: AutodiffBackend>(
    out: &Path,
    optim: &mut AdamW<B>,
    device: &B::Device,
) -> anyhow::Result<(Drafter<B>, DrafterConfig, TrainerState)> {
    let dir = resolve_latest(out)?;
    let (drafter, config) = Drafter::<B>::load(&dir, device)?;
    let state_path = dir.join(TRAINER_STATE);
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a trainer state", state_path.display()))?;
    let file = SafetensorsFile::open(dir.join("optimizer.safetensors"))?;
    optim.step = file
        .metadata()
        .get("adam_step")
        .and_then(|s| s.parse().ok())
        .context("optimizer.safetensors lacks its `adam_step` metadata")?;
    optim.moments.clear();
    optim.masters.clear();
    for p in named_params(&drafter, true) {
        // Optimizer state is f32 whatever the model computes in.
        let read = |suffix: &str| -> anyhow::Result<Tensor<B::InnerBackend, 1>> {
            let t = file.f32(&format!("{}.{suffix}", p.name))?;
            let n = t.data.len();
            Ok(Tensor::from_data(
                TensorData::new(t.data, [n]),
                (device, DType::F32),
            ))
        };
        if file.info(&format!("{}.exp_avg", p.name)).is_none() {
            if optim.step > 0 {
                bail!("{}: no optimizer state for `{}`", dir.display(), p.name);
            }
            continue;
        }
        optim.moments.insert(
            p.id,
            Moments {
                exp_avg: read("exp_avg")?,
                exp_avg_sq: read("exp_avg_sq")?,
            },
        );
        // A model narrower than f32 resumes from its f32 masters, not from its rounded
        // weights; a checkpoint written by an f32 run has none and needs none.
        if file.info(&format!("{}.master", p.name)).is_some() {
            optim.masters.insert(p.id, read("master")?);
        } else if p.tensor.dtype() != DType::F32 && optim.step > 0 {
            bail!(
                "{}: `{}` is {:?} but the checkpoint has no f32 master for it \
                 (written by an fp32 run?); resume with the precision it was trained in",
                dir.display(),
                p.name,
                p.tensor.dtype()
            );
        }
    }
    Ok((drafter, config, state))
}
