//! Training logs: ratio metrics accumulated over a window, TensorBoard event files (the
//! reference's `train/<name>` scalars) and the one-line summary per logging interval.

use crate::loss::{DeviceMetrics, Metrics};
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::model::to_host;
use std::collections::BTreeMap;
use std::path::Path;
use tensorboard_rs::summary_writer::SummaryWriter;

/// The current logging window, still on the device: ratio metrics and each optimizer
/// step's loss. Reading it is the loop's one sync point per logging interval (nanoGPT's
/// `loss.item()` per log line).
pub struct Window<B: Backend> {
    pub metrics: DeviceMetrics<B>,
    pub losses: Vec<Tensor<B, 1>>,
    /// Losses already read (a checkpoint step checks them before writing).
    read_losses: Vec<f64>,
    /// The global gradient norm of the last step.
    pub grad_norm: Option<f64>,
}

impl<B: Backend> Default for Window<B> {
    fn default() -> Self {
        Window {
            metrics: DeviceMetrics::default(),
            losses: Vec::new(),
            read_losses: Vec::new(),
            grad_norm: None,
        }
    }
}

/// A window read on the host.
pub struct ReadWindow {
    /// Every scalar, named as the reference names them (without `train/`).
    pub values: BTreeMap<String, f64>,
    /// Each step's loss, in order.
    pub losses: Vec<f64>,
}

impl<B: Backend> Window<B> {
    /// Each step's loss so far, read once.
    pub fn losses(&mut self) -> &[f64] {
        if !self.losses.is_empty() {
            let pending = std::mem::take(&mut self.losses);
            self.read_losses.extend(
                to_host(Tensor::cat(pending, 0))
                    .data
                    .into_iter()
                    .map(f64::from),
            );
        }
        &self.read_losses
    }

    /// Reads everything, with the learning rate of the next step.
    pub fn read(self, lr: f64) -> ReadWindow {
        self.read_with(lr, Ok::<_, std::convert::Infallible>)
            .expect("no reduction")
    }

    /// Reads everything, the ratio metrics' sums passed through `reduce` first (the sum
    /// over the ranks of a data-parallel run).
    pub fn read_with<E>(
        mut self,
        lr: f64,
        reduce: impl FnOnce(Metrics) -> Result<Metrics, E>,
    ) -> Result<ReadWindow, E> {
        let losses = self.losses().to_vec();
        let mut values: BTreeMap<String, f64> = reduce(self.metrics.read())?
            .into_iter()
            .map(|(n, (num, den))| (n, if den > 0.0 { num / den } else { 0.0 }))
            .collect();
        if !losses.is_empty() {
            values.insert(
                "loss".into(),
                losses.iter().sum::<f64>() / losses.len() as f64,
            );
        }
        values.insert("lr".into(), lr);
        values.insert("grad_norm".into(), self.grad_norm.unwrap_or(f64::NAN));
        Ok(ReadWindow { values, losses })
    }
}

pub struct Logger {
    writer: SummaryWriter,
}

impl Logger {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Logger {
            writer: SummaryWriter::new(dir),
        })
    }

    pub fn write(&mut self, step: usize, values: &BTreeMap<String, f64>) {
        for (name, value) in values {
            self.writer
                .add_scalar(&format!("train/{name}"), *value as f32, step);
        }
        self.writer.flush();
    }
}
