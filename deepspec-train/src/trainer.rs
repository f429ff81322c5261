//! The training loop, top to bottom: data order, anchors and blocks, forward + loss,
//! backward with gradient accumulation, global-norm clipping, AdamW, schedule, logging and
//! checkpoints (the reference's `train.py`). Algorithm-specific parts live in `blocks` and `loss`.

use crate::anchors::{sample_anchors, PositionAnchors};
use crate::batch::{Features, TrainBatch};
use crate::blocks::build_blocks;
use crate::checkpoint::{self, TrainerState};
use crate::data::{collate, micro_batch, SampleSource};
use crate::dist::collective::Comm;
use crate::dist::grads::all_reduce_grads;
use crate::dist::DistSettings;
use crate::logging::{Logger, ReadWindow, Window};
use crate::loss::dspark::{dspark_loss, DSparkLossConfig};
use crate::loss::eagle3::eagle3_loss;
use crate::loss::head::HeadLossBackend;
use crate::loss::DeviceMetrics;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::learning_rate;
use anyhow::{bail, Context};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use deepspec_core::drafter::{BlockDrafter, Drafter, DrafterConfig, Eagle3Drafter};
use deepspec_core::io::lock::lock_folder;
use deepspec_core::progress::{Progress, ProgressMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The lock file a training run holds in its output folder.
pub const TRAIN_LOCK: &str = ".train.lock";

/// The per-logging-step JSON lines rank 0 appends in the output folder.
pub const TRAIN_LOG: &str = "train_log.jsonl";

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub local_batch_size: usize,
    pub global_batch_size: usize,
    pub num_train_epochs: usize,
    pub max_train_steps: Option<usize>,
    pub logging_steps: usize,
    pub checkpointing_steps: usize,
    pub keep_last: usize,
    pub seed: u64,
    pub max_length: usize,
    pub dspark_loss: DSparkLossConfig,
    /// Tokens per LM-head chunk in the loss (`None`: sized so one chunk's logits stay
    /// under 256 MiB).
    pub head_chunk_tokens: Option<usize>,
    pub tensorboard_dir: Option<PathBuf>,
    /// Stop (as if killed) after this many optimizer steps of this run; for tests of resume.
    pub stop_after: Option<usize>,
    /// A bar on a terminal and a line per logging step in a log; nothing when false.
    pub show_progress: bool,
    /// How a data-parallel run reduces gradients (no effect on one rank).
    pub dist: DistSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Target-sequence tokens processed per second.
    pub tokens_per_second: f64,
    /// Supervised draft predictions per second.
    pub draft_tokens_per_second: f64,
    pub checkpoint: PathBuf,
}

/// Micro-batch forward and loss; returns (loss, metrics on the device, supervised
/// predictions). `positions` are the rows' global positions in the run's sample stream
/// (they seed each sample's anchors).
pub fn micro_loss<B: AutodiffBackend + HeadLossBackend>(
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    batch: &TrainBatch,
    features: &Features<B>,
    positions: &[u64],
    settings: &TrainSettings,
) -> (Tensor<B, 1>, DeviceMetrics<B>, usize) {
    let rope = config.base.rope();
    let chunk = settings.head_chunk_tokens;
    let eagle3 = |model: &dyn Eagle3Drafter<B>| {
        let loss = eagle3_loss(
            model,
            &rope,
            batch,
            features,
            config.block_size,
            config.step_loss_decay,
            chunk,
        );
        (loss.total, loss.metrics, loss.supervised)
    };
    match drafter {
        Drafter::DSpark(model) => {
            block_micro_loss(model, config, batch, features, positions, settings)
        }
        Drafter::DSparkV4(model) => {
            block_micro_loss(model, config, batch, features, positions, settings)
        }
        Drafter::DSparkGemma4(model) => {
            block_micro_loss(model, config, batch, features, positions, settings)
        }
        Drafter::Eagle3(model) => eagle3(model),
        Drafter::Eagle3Gemma4(model) => eagle3(model),
    }
}

/// A block drafter's micro-step: sample anchors, lay out the blocks, forward and loss.
fn block_micro_loss<B: AutodiffBackend + HeadLossBackend, M: BlockDrafter<B>>(
    model: &M,
    config: &DrafterConfig,
    batch: &TrainBatch,
    features: &Features<B>,
    positions: &[u64],
    settings: &TrainSettings,
) -> (Tensor<B, 1>, DeviceMetrics<B>, usize) {
    let rope = config.base.rope();
    let anchors = sample_anchors(
        &batch.loss_mask,
        config.num_anchors,
        &mut PositionAnchors {
            seed: settings.seed,
            positions,
        },
    );
    let layout = build_blocks(
        &batch.input_ids,
        &batch.loss_mask,
        &anchors,
        config.block_size,
        config
            .mask_token_id
            .expect("DSpark config has mask_token_id"),
    );
    let supervised = layout
        .eval_mask
        .iter()
        .flatten()
        .flatten()
        .filter(|&&e| e)
        .count();
    let mut loss = dspark_loss(
        model,
        &rope,
        batch,
        features,
        &layout,
        &settings.dspark_loss,
        settings.head_chunk_tokens,
    );
    let n = anchors.candidates.len() as f64;
    let kept: usize = anchors.keep.iter().flatten().filter(|&&k| k).count();
    let len = batch.seq_len() as f64;
    let candidates: usize = anchors.candidates.iter().sum();
    let m = &mut loss.metrics;
    m.add_host("valid_anchors_abs", candidates as f64, n);
    m.add_host("valid_anchors_ratio", candidates as f64 / len.max(1.0), n);
    m.add_host("sampled_anchors_abs", kept as f64, n);
    m.add_host(
        "sampled_anchors_ratio",
        kept as f64 / config.num_anchors as f64,
        n,
    );
    (loss.total, loss.metrics, supervised)
}

/// The metrics of every rank summed (numerators and denominators), for the log line of a
/// data-parallel run. A rank whose micro-batches never reached a metric (a block slot no
/// anchor supervised) has no entry for it: the names are gathered first, a missing one
/// counts (0, 0), and one that no rank saw stays out, as on one rank.
fn reduce_metrics<B: burn::tensor::backend::Backend>(
    metrics: crate::loss::Metrics,
    comm: &Comm<B>,
    device: &B::Device,
) -> anyhow::Result<crate::loss::Metrics> {
    if comm.world_size() == 1 {
        return Ok(metrics);
    }
    let mine = metrics.keys().cloned().collect::<Vec<_>>().join("\n");
    let mut names: Vec<String> = Vec::new();
    for list in comm.all_gather_bytes(mine.as_bytes())? {
        let list = String::from_utf8(list).context("metric names from another rank")?;
        names.extend(
            list.split('\n')
                .filter(|n| !n.is_empty())
                .map(str::to_string),
        );
    }
    names.sort();
    names.dedup();
    let flat: Vec<f32> = names
        .iter()
        .flat_map(|n| {
            let (num, den) = metrics.get(n).copied().unwrap_or((0.0, 0.0));
            [num as f32, den as f32]
        })
        .collect();
    let summed = comm.all_reduce_sum(Tensor::<B, 1>::from_floats(flat.as_slice(), device))?;
    let summed = deepspec_core::model::to_host(summed).data;
    Ok(names
        .into_iter()
        .zip(summed.chunks(2))
        .filter(|(_, nd)| nd[1] != 0.0)
        .map(|(k, nd)| (k, (nd[0] as f64, nd[1] as f64)))
        .collect())
}

/// One JSON line per logging step in `OUT/train_log.jsonl` (every scalar at full
/// precision; what TensorBoard shows, readable without it).
fn append_log(out: &Path, step: usize, values: &BTreeMap<String, f64>) -> anyhow::Result<()> {
    use std::io::Write;
    let path = out.join(TRAIN_LOG);
    let mut line = serde_json::Map::new();
    line.insert("step".into(), step.into());
    for (k, v) in values {
        line.insert(k.clone(), serde_json::Value::from(*v));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{}", serde_json::Value::Object(line))
        .with_context(|| format!("writing {}", path.display()))
}

/// Trains `drafter` on `data`, checkpointing into `out`. With `resume`, continues from
/// `out/step_latest` exactly where it stopped.
///
/// Data parallel when `comm` spans several ranks: every optimizer step reads the same
/// global batch whatever the world size; its micro-batches are dealt to the ranks in turn
/// (micro-batch `j` of the step to rank `j mod W`, the reference's strided sampler), each
/// sample's anchors are seeded by its global position, and the gradients (with the step's
/// loss) are summed once per optimizer step before clipping. Rank 0 alone holds the lock
/// and writes checkpoints and logs; a checkpoint resumes at any world size with the same
/// local and global batch.
#[allow(clippy::too_many_arguments)]
pub fn train<B: AutodiffBackend + HeadLossBackend>(
    mut drafter: Drafter<B>,
    mut config: DrafterConfig,
    data: &dyn SampleSource,
    settings: &TrainSettings,
    out: &Path,
    resume: bool,
    device: &B::Device,
    comm: &Comm<B::InnerBackend>,
) -> anyhow::Result<TrainSummary> {
    let b = settings.local_batch_size;
    let (world, rank) = (comm.world_size(), comm.rank());
    if b == 0 || !settings.global_batch_size.is_multiple_of(b * world) {
        if world == 1 {
            bail!(
                "train.global_batch_size ({}) must be a multiple of train.local_batch_size ({b})",
                settings.global_batch_size
            );
        }
        bail!(
            "train.global_batch_size ({}) must be a multiple of train.local_batch_size × ranks ({b} × {world}): every rank takes the same number of micro-batches per step",
            settings.global_batch_size
        );
    }
    // Micro-batches per optimizer step, over all ranks; this rank takes every `world`-th.
    let accum = settings.global_batch_size / b;
    let samples_per_epoch = data.len() / settings.global_batch_size * settings.global_batch_size;
    if samples_per_epoch == 0 {
        bail!(
            "the cache holds {} samples, fewer than one global batch ({}): lower train.global_batch_size",
            data.len(),
            settings.global_batch_size
        );
    }
    let steps_per_epoch = samples_per_epoch / settings.global_batch_size;
    let max_steps = settings
        .max_train_steps
        .unwrap_or(settings.num_train_epochs * steps_per_epoch);

    let mut optim = AdamW::<B>::new(AdamWConfig {
        weight_decay: settings.weight_decay,
        max_grad_norm: Some(settings.max_grad_norm),
        ..AdamWConfig::default()
    });
    let mut state = TrainerState {
        global_step: 0,
        next_micro_step: 0,
        local_batch_size: b,
        global_batch_size: settings.global_batch_size,
        max_train_steps: max_steps,
    };
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    // Held by rank 0 until training ends (the OS releases it if the process dies), so a
    // second run into the same folder stops here instead of writing the same step folders
    // and logs.
    let _lock = match comm.world.is_main() {
        true => Some(lock_folder(out, TRAIN_LOCK, "`deepspec train`")?),
        false => None,
    };
    // A dangling `step_latest` (its folder deleted) still counts as a run to resume: the
    // resume then says what is wrong instead of silently starting over.
    let has_run = std::fs::symlink_metadata(checkpoint::latest(out)).is_ok();
    if resume && has_run {
        let (d, c, s) = checkpoint::load(out, &mut optim, device)?;
        if s.local_batch_size != b || s.global_batch_size != settings.global_batch_size {
            bail!(
                "{}: the checkpoint was trained with local/global batch {}/{}, this run asks for {b}/{}; resume needs the same",
                checkpoint::latest(out).display(),
                s.local_batch_size,
                s.global_batch_size,
                settings.global_batch_size
            );
        }
        drafter = d;
        config = c;
        state = s;
        state.max_train_steps = max_steps;
    } else if !resume && has_run {
        bail!(
            "{} already holds a run (step_latest exists): pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    if comm.world.is_main() {
        let probe = out.join(".write-test");
        std::fs::write(&probe, b"")
            .with_context(|| format!("output folder {} is not writable", out.display()))?;
        std::fs::remove_file(&probe).ok();
    }

    let mut logger = match (&settings.tensorboard_dir, comm.world.is_main()) {
        (Some(dir), true) => Some(Logger::new(dir)?),
        _ => None,
    };
    let mode = if settings.show_progress && comm.world.is_main() {
        ProgressMode::detect()
    } else {
        ProgressMode::Silent
    };
    let progress = Progress::new(mode, "train", max_steps as u64, "step")
        .starting_at(state.global_step as u64);

    let started = Instant::now();
    let (mut tokens, mut predictions) = (0usize, 0usize);
    let mut window = Window::<B>::default();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let steps_at_start = state.global_step;
    let mut last_checkpoint = checkpoint::latest(out);
    // This rank's k-th micro-batch of the step whose first micro-batch is `first`.
    let mine = |first: usize, k: usize| first + k * world + rank;
    let load = |micro: usize| -> anyhow::Result<TrainBatch> {
        let indices = micro_batch(data.len(), samples_per_epoch, b, micro);
        let samples = indices
            .iter()
            .map(|&i| data.sample(i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(collate(&samples, data.widths(), settings.max_length))
    };
    let read_window = |window: &mut Window<B>, lr: f64| -> anyhow::Result<ReadWindow> {
        std::mem::take(window).read_with(lr, |m| reduce_metrics(m, comm, device))
    };
    let result = std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut pending: Option<std::thread::ScopedJoinHandle<anyhow::Result<TrainBatch>>> = None;
        while state.global_step < max_steps {
            if settings
                .stop_after
                .is_some_and(|n| state.global_step - steps_at_start >= n)
            {
                break;
            }
            let mut accumulator = GradientsAccumulator::<Drafter<B>>::new();
            let mut step_loss: Option<Tensor<B, 1>> = None;
            let (mut step_tokens, mut step_predictions) = (0usize, 0usize);
            for k in 0..accum / world {
                let micro = mine(state.next_micro_step, k);
                // The batch read ahead while the previous one computed, then the next read-ahead.
                let mut batch = match pending.take() {
                    Some(handle) => handle.join().expect("prefetch thread panicked")?,
                    None => load(micro)?,
                };
                let ahead = if k + 1 < accum / world {
                    mine(state.next_micro_step, k + 1)
                } else {
                    mine(state.next_micro_step + accum, 0)
                };
                pending = Some(scope.spawn(move || load(ahead)));
                step_tokens += batch.lens.iter().sum::<usize>();
                let features = batch.upload::<B>(device);
                let positions: Vec<u64> = (0..b).map(|row| (micro * b + row) as u64).collect();
                let (loss, metrics, supervised) =
                    micro_loss(&drafter, &config, &batch, &features, &positions, settings);
                step_predictions += supervised;
                // Nothing is read back inside a step: the loss and metrics stay on the
                // device until the next logging (or checkpoint) step reads them at once.
                step_loss = Some(match step_loss {
                    Some(sum) => sum + loss.clone().detach() / accum as f64,
                    None => loss.clone().detach() / accum as f64,
                });
                window.metrics.merge(metrics);
                let grads = (loss / accum as f64).backward();
                accumulator.accumulate(&drafter, GradientsParams::from_grads(grads, &drafter));
            }
            state.next_micro_step += accum;
            let step_loss = step_loss.expect("at least one micro-step");
            let (grads, step_loss) = if world > 1 {
                // One reduction per optimizer step: the gradients, the loss and the counts.
                let counts = Tensor::<B::InnerBackend, 1>::from_floats(
                    [step_tokens as f32, step_predictions as f32],
                    device,
                );
                let local = Tensor::cat(vec![step_loss.inner(), counts], 0);
                let (grads, sums) = all_reduce_grads::<B, _>(
                    &drafter,
                    accumulator.grads(),
                    local,
                    comm,
                    &settings.dist,
                )?;
                let host = deepspec_core::model::to_host(sums.clone().narrow(0, 1, 2)).data;
                tokens += host[0].round() as usize;
                predictions += host[1].round() as usize;
                (grads, Tensor::from_inner(sums.narrow(0, 0, 1)))
            } else {
                tokens += step_tokens;
                predictions += step_predictions;
                (accumulator.grads(), step_loss)
            };
            let lr = learning_rate(
                settings.lr,
                settings.warmup_ratio,
                max_steps,
                state.global_step + 1,
            );
            let (next, report) = optim.step(drafter, &grads, lr);
            drafter = next;
            state.global_step += 1;
            window.losses.push(step_loss);
            window.grad_norm = Some(report.grad_norm);
            let next_lr = learning_rate(
                settings.lr,
                settings.warmup_ratio,
                max_steps,
                state.global_step + 1,
            );
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            progress.set_position(state.global_step as u64);
            let checkpoint_due = state
                .global_step
                .is_multiple_of(settings.checkpointing_steps.max(1))
                || state.global_step == max_steps;
            let log_due = state
                .global_step
                .is_multiple_of(settings.logging_steps.max(1))
                || state.global_step == max_steps;
            // Every rank holds the summed losses and takes the same branches below (the
            // metrics' reduction is a collective).
            if checkpoint_due || log_due {
                let losses = window.losses();
                if let Some(bad) = losses.iter().position(|l| !l.is_finite()) {
                    let step = state.global_step - losses.len() + bad + 1;
                    let read = read_window(&mut window, next_lr)?;
                    let terms: Vec<&String> = read
                        .values
                        .iter()
                        .filter(|(_, v)| !v.is_finite())
                        .map(|(k, _)| k)
                        .collect();
                    bail!(
                        "step {step}: the loss is {} (non-finite terms: {terms:?}); stopping before writing a checkpoint",
                        read.losses[bad]
                    );
                }
            }
            if log_due {
                let read = read_window(&mut window, next_lr)?;
                if first_loss.is_nan() {
                    first_loss = read.losses[0];
                }
                last_loss = *read.losses.last().expect("a step in the window");
                if let Some(l) = logger.as_mut() {
                    l.write(state.global_step, &read.values);
                    append_log(out, state.global_step, &read.values)?;
                }
                progress.log(&format!(
                    "epoch={} loss={:.4} lr={lr:.2e} tok/s={:.0} draft_tok/s={:.0}",
                    state.next_micro_step / (samples_per_epoch / b) + 1,
                    read.values.get("loss").copied().unwrap_or(f64::NAN),
                    tokens as f64 / elapsed,
                    predictions as f64 / elapsed,
                ));
            }
            if checkpoint_due && comm.world.is_main() {
                last_checkpoint =
                    checkpoint::save(out, &drafter, &config, &optim, &state, settings.keep_last)?;
            }
        }
        Ok(())
    });
    // A rank that stops on an error leaves its connections to close as an error for the
    // others; one that finished says so.
    result?;
    comm.finish();
    progress.finish();
    // Steps after the last logging step (a run stopped early) still count in the summary.
    let rest = window.losses();
    if let (Some(&first), Some(&last)) = (rest.first(), rest.last()) {
        if first_loss.is_nan() {
            first_loss = first;
        }
        last_loss = last;
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    Ok(TrainSummary {
        steps: state.global_step,
        first_loss,
        last_loss,
        tokens_per_second: tokens as f64 / elapsed,
        draft_tokens_per_second: predictions as f64 / elapsed,
        checkpoint: last_checkpoint,
    })
}
