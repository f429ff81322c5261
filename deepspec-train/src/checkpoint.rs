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
use deepspec_core::io::safetensors::{write_f32, NamedTensor, SafetensorsFile};
use deepspec_core::sampling::Rng;
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
    /// The anchor sampler's generator.
    pub anchor_rng: Rng,
    pub local_batch_size: usize,
    pub global_batch_size: usize,
    pub max_train_steps: usize,
}

pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(format!("step_{step}"))
}

pub fn latest(out: &Path) -> PathBuf {
    out.join("step_latest")
}

/// Writes `OUT/step_<step>` and repoints `OUT/step_latest`, then keeps only the newest
/// `keep_last` step folders (0 keeps all).
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
        tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state)? + "\n",
    )
    .with_context(|| format!("writing {}", tmp.join("trainer_state.json").display()))?;
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
        let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(out)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n: usize = name.strip_prefix("step_")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        steps.sort();
        let excess = steps.len().saturating_sub(keep_last);
        for (_, path) in steps.into_iter().take(excess) {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing old checkpoint {}", path.display()))?;
        }
    }
    Ok(final_dir)
}

/// Loads `OUT/step_latest`: the drafter, the optimizer and the trainer state.
pub fn load<B: AutodiffBackend>(
    out: &Path,
    optim: &mut AdamW<B>,
    device: &B::Device,
) -> anyhow::Result<(Drafter<B>, DrafterConfig, TrainerState)> {
    let dir = std::fs::canonicalize(latest(out))
        .with_context(|| format!("no checkpoint to resume at {}", latest(out).display()))?;
    let (drafter, config) = Drafter::<B>::load(&dir, device)?;
    let state_path = dir.join("trainer_state.json");
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
