//! What the trainer tests share: settings sized for the golden batch, and one run on it.

use burn::backend::{Autodiff, Flex};
use deepspec_core::drafter::Drafter;
use deepspec_core::fixtures::golden_dir;
use deepspec_train::batch::TrainBatch;
use deepspec_train::dist::collective::Comm;
use deepspec_train::loss::dspark::DSparkLossConfig;
use deepspec_train::trainer::{train, TrainSettings};
use std::path::Path;

pub type B = Autodiff<Flex>;

pub fn settings(steps: usize) -> TrainSettings {
    TrainSettings {
        lr: 3e-3,
        warmup_ratio: 0.04,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        local_batch_size: 1,
        global_batch_size: 2,
        num_train_epochs: 1,
        max_train_steps: Some(steps),
        logging_steps: 5,
        checkpointing_steps: 4,
        keep_last: 2,
        seed: 42,
        max_length: 4096,
        dspark_loss: DSparkLossConfig {
            ce_alpha: 0.1,
            l1_alpha: 0.9,
            confidence_alpha: 1.0,
            decay_gamma: Some(4.0),
        },
        head_chunk_tokens: None,
        tensorboard_dir: None,
        stop_after: None,
        show_progress: false,
        dist: Default::default(),
    }
}

pub fn run(
    algo: &str,
    out: &Path,
    settings: &TrainSettings,
    resume: bool,
) -> deepspec_train::trainer::TrainSummary {
    let golden = golden_dir();
    let data = TrainBatch::from_safetensors(&golden.join("inputs.safetensors")).unwrap();
    let device = Default::default();
    let (drafter, config) = Drafter::<B>::load(&golden.join(algo), &device).unwrap();
    let comm = Comm::solo(&device);
    train(
        drafter, config, &data, settings, out, resume, &device, &comm,
    )
    .unwrap()
}
