//! The training loop, top to bottom: data order, anchors and blocks, forward + loss,
//! backward with gradient accumulation, global-norm clipping, AdamW, schedule, logging and
//! checkpoints (the reference's `train.py`). Algorithm-specific parts live in `blocks` and `loss`.

use crate::anchors::{sample_anchors, RandomAnchors};
use crate::batch::{Features, TrainBatch};
use crate::blocks::build_blocks;
use crate::checkpoint::{self, TrainerState};
use crate::data::{collate, micro_batch, SampleSource};
use crate::logging::{Logger, Window};
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
use deepspec_core::sampling::Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The lock file a training run holds in its output folder.
pub const TRAIN_LOCK: &str = ".train.lock";

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
/// predictions).
pub fn micro_loss<B: AutodiffBackend + HeadLossBackend>(
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    batch: &TrainBatch,
    features: &Features<B>,
    rng: &mut Rng,
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
        Drafter::DSpark(model) => block_micro_loss(model, config, batch, features, rng, settings),
        Drafter::DSparkV4(model) => block_micro_loss(model, config, batch, features, rng, settings),
        Drafter::DSparkGemma4(model) => {
            block_micro_loss(model, config, batch, features, rng, settings)
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
    rng: &mut Rng,
    settings: &TrainSettings,
) -> (Tensor<B, 1>, DeviceMetrics<B>, usize) {
    let rope = config.base.rope();
    let anchors = sample_anchors(
        &batch.loss_mask,
        config.num_anchors,
        &mut RandomAnchors { rng },
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

/// Trains `drafter` on `data`, checkpointing into `out`. With `resume`, continues from
/// `out/step_latest` exactly where it stopped.
pub fn train<B: AutodiffBackend + HeadLossBackend>(
    mut drafter: Drafter<B>,
    mut config: DrafterConfig,
    data: &dyn SampleSource,
    settings: &TrainSettings,
    out: &Path,
    resume: bool,
    device: &B::Device,
) -> anyhow::Result<TrainSummary> {
    let b = settings.local_batch_size;
    if b == 0 || !settings.global_batch_size.is_multiple_of(b) {
        bail!(
            "train.global_batch_size ({}) must be a multiple of train.local_batch_size ({b})",
            settings.global_batch_size
        );
    }
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
        anchor_rng: Rng::new(settings.seed),
        local_batch_size: b,
        global_batch_size: settings.global_batch_size,
        max_train_steps: max_steps,
    };
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))?;
    // Held until training ends (the OS releases it if the process dies), so a second run
    // into the same folder stops here instead of writing the same step folders and logs.
    let _lock = lock_folder(out, TRAIN_LOCK, "`deepspec train`")?;
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
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("output folder {} is not writable", out.display()))?;
    std::fs::remove_file(&probe).ok();

    let mut logger = match &settings.tensorboard_dir {
        Some(dir) => Some(Logger::new(dir)?),
        None => None,
    };
    let mode = if settings.show_progress {
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
    let load = |micro: usize| -> anyhow::Result<TrainBatch> {
        let indices = micro_batch(data.len(), samples_per_epoch, b, micro);
        let samples = indices
            .iter()
            .map(|&i| data.sample(i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(collate(&samples, data.widths(), settings.max_length))
    };
    std::thread::scope(|scope| -> anyhow::Result<()> {
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
            for _ in 0..accum {
                // The batch read ahead while the previous one computed, then the next read-ahead.
                let mut batch = match pending.take() {
                    Some(handle) => handle.join().expect("prefetch thread panicked")?,
                    None => load(state.next_micro_step)?,
                };
                let ahead = state.next_micro_step + 1;
                pending = Some(scope.spawn(move || load(ahead)));
                tokens += batch.lens.iter().sum::<usize>();
                let features = batch.upload::<B>(device);
                let (loss, metrics, supervised) = micro_loss(
                    &drafter,
                    &config,
                    &batch,
                    &features,
                    &mut state.anchor_rng,
                    settings,
                );
                predictions += supervised;
                // Nothing is read back inside a step: the loss and metrics stay on the
                // device until the next logging (or checkpoint) step reads them at once.
                step_loss = Some(match step_loss {
                    Some(sum) => sum + loss.clone().detach() / accum as f64,
                    None => loss.clone().detach() / accum as f64,
                });
                window.metrics.merge(metrics);
                let grads = (loss / accum as f64).backward();
                accumulator.accumulate(&drafter, GradientsParams::from_grads(grads, &drafter));
                state.next_micro_step += 1;
            }
            let grads = accumulator.grads();
            let lr = learning_rate(
                settings.lr,
                settings.warmup_ratio,
                max_steps,
                state.global_step + 1,
            );
            let (next, report) = optim.step(drafter, &grads, lr);
            drafter = next;
            state.global_step += 1;
            window
                .losses
                .push(step_loss.expect("at least one micro-step"));
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
            if checkpoint_due || log_due {
                let losses = window.losses();
                if let Some(bad) = losses.iter().position(|l| !l.is_finite()) {
                    let step = state.global_step - losses.len() + bad + 1;
                    let read = std::mem::take(&mut window).read(next_lr);
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
                let read = std::mem::take(&mut window).read(next_lr);
                if first_loss.is_nan() {
                    first_loss = read.losses[0];
                }
                last_loss = *read.losses.last().expect("a step in the window");
                if let Some(l) = logger.as_mut() {
                    l.write(state.global_step, &read.values);
                }
                progress.log(&format!(
                    "epoch={} loss={:.4} lr={lr:.2e} tok/s={:.0} draft_tok/s={:.0}",
                    state.next_micro_step / (samples_per_epoch / b) + 1,
                    read.values.get("loss").copied().unwrap_or(f64::NAN),
                    tokens as f64 / elapsed,
                    predictions as f64 / elapsed,
                ));
            }
            if checkpoint_due {
                last_checkpoint =
                    checkpoint::save(out, &drafter, &config, &optim, &state, settings.keep_last)?;
            }
        }
        Ok(())
    })?;
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
