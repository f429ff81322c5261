//! Training losses. The LM head and the token-level loss sit behind [`head`]'s one function,
//! the seam a fused GPU kernel replaces; metrics stay on the device until the trainer reads
//! them at its logging cadence.

pub mod dspark;
pub mod eagle3;
pub mod head;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use std::collections::BTreeMap;

/// A ratio metric read on the host: (Σ numerator, Σ denominator).
pub type Metrics = BTreeMap<String, (f64, f64)>;

/// Ratio metrics of one or more micro-steps: numerators on the device (no host trip inside
/// a step), denominators known on the host.
pub struct DeviceMetrics<B: Backend> {
    on_device: BTreeMap<String, (Tensor<B, 1>, f64)>,
    on_host: Metrics,
}

impl<B: Backend> Default for DeviceMetrics<B> {
    fn default() -> Self {
        DeviceMetrics {
            on_device: BTreeMap::new(),
            on_host: Metrics::new(),
        }
    }
}

impl<B: Backend> DeviceMetrics<B> {
    /// Adds `num` (`[1]`, detached here) over `den`.
    pub fn add(&mut self, name: impl Into<String>, num: Tensor<B, 1>, den: f64) {
        let num = num.detach();
        match self.on_device.entry(name.into()) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let (sum, d) = e.get_mut();
                *sum = sum.clone() + num;
                *d += den;
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert((num, den));
            }
        }
    }

    /// Adds a metric the host already knows.
    pub fn add_host(&mut self, name: impl Into<String>, num: f64, den: f64) {
        let e = self.on_host.entry(name.into()).or_insert((0.0, 0.0));
        e.0 += num;
        e.1 += den;
    }

    pub fn merge(&mut self, other: DeviceMetrics<B>) {
        for (name, (num, den)) in other.on_device {
            self.add(name, num, den);
        }
        for (name, (num, den)) in other.on_host {
            self.add_host(name, num, den);
        }
    }

    /// Every metric on the host: one read of all device numerators together.
    pub fn read(self) -> Metrics {
        let mut out = self.on_host;
        if self.on_device.is_empty() {
            return out;
        }
        let (names, parts): (Vec<String>, Vec<(Tensor<B, 1>, f64)>) =
            self.on_device.into_iter().unzip();
        let (nums, dens): (Vec<Tensor<B, 1>>, Vec<f64>) = parts.into_iter().unzip();
        let values = deepspec_core::model::to_host(Tensor::cat(nums, 0)).data;
        for ((name, num), den) in names.into_iter().zip(values).zip(dens) {
            let e = out.entry(name).or_insert((0.0, 0.0));
            e.0 += num as f64;
            e.1 += den;
        }
        out
    }
}

/// Host `[b][n][k]` ints -> tensor `[b, n, k]`.
pub(crate) fn int3<B: Backend>(rows: &[Vec<Vec<i64>>], device: &B::Device) -> Tensor<B, 3, Int> {
    let (b, n, k) = (rows.len(), rows[0].len(), rows[0][0].len());
    let flat: Vec<i64> = rows.iter().flatten().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, n, k]), device)
}

/// Host f32 values with a shape -> tensor of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}
