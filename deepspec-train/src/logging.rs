//! Training logs: ratio metrics accumulated over a window, TensorBoard event files (the
//! reference's `train/<name>` scalars) and the one-line summary per logging interval.

use std::collections::BTreeMap;
use std::path::Path;
use tensorboard_rs::summary_writer::SummaryWriter;

/// Metrics of the current logging window: ratios as (Σnum, Σden), scalars as values.
#[derive(Default)]
pub struct Window {
    pub ratios: BTreeMap<String, (f64, f64)>,
    pub losses: Vec<f64>,
}

impl Window {
    pub fn add_ratios(&mut self, metrics: &BTreeMap<String, (f64, f64)>) {
        for (name, (num, den)) in metrics {
            let e = self.ratios.entry(name.clone()).or_insert((0.0, 0.0));
            e.0 += num;
            e.1 += den;
        }
    }

    /// Every scalar of the window, named as the reference names them (without `train/`).
    pub fn values(&self, lr: f64, grad_norm: f64) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = self
            .ratios
            .iter()
            .map(|(n, (num, den))| (n.clone(), if *den > 0.0 { num / den } else { 0.0 }))
            .collect();
        if !self.losses.is_empty() {
            out.insert(
                "loss".into(),
                self.losses.iter().sum::<f64>() / self.losses.len() as f64,
            );
        }
        out.insert("lr".into(), lr);
        out.insert("grad_norm".into(), grad_norm);
        out
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
