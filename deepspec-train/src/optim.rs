//! AdamW with clipping by the global gradient norm (the reference's `train.py`) — the reference clips
//! all gradients together, not each tensor alone.
//!
//! Mixed precision as the reference runs it: when the model's parameters are bf16 (or any
//! dtype narrower than f32), the optimizer keeps an **f32 master copy** of each trainable
//! parameter and f32 moments; gradients are read as f32, the step updates the master, and
//! the parameter becomes the master rounded to its own dtype. Updates smaller than half a
//! bf16 ulp therefore accumulate in the master instead of vanishing. With f32 parameters the
//! parameter is its own master.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip when the global norm exceeds this; `None` or `<= 0` disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// First and second moments of one parameter, flattened, always f32.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

/// AdamW state over the trainable parameters of one module.
pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub moments: HashMap<ParamId, Moments<B::InnerBackend>>,
    /// f32 master copies (flattened) of the parameters whose own dtype is narrower.
    pub masters: HashMap<ParamId, Tensor<B::InnerBackend, 1>>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of all trainable gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were scaled by (1 when not clipped).
    pub clip_coef: f64,
}

/// Sums the squared gradients of every parameter on the device.
struct NormVisitor<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum_sq: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NormVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.cast(FloatDType::F32).powi_scalar(2).sum();
            self.sum_sq = Some(match self.sum_sq.take() {
                Some(acc) => acc + sq,
                None => sq,
            });
        }
    }
}

struct StepMapper<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    optim: &'a mut AdamW<B>,
    lr: f64,
    scale: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for StepMapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.get::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape = tensor.dims();
        let n: usize = shape.iter().product();
        let c = self.optim.config;
        let t = self.optim.step as i32;
        let dtype = tensor.dtype();
        let value: Tensor<B::InnerBackend, 1> = match self.optim.masters.remove(&id) {
            Some(master) => master,
            None => tensor.inner().reshape([n]).cast(FloatDType::F32),
        };
        let grad: Tensor<B::InnerBackend, 1> = grad.reshape([n]).cast(FloatDType::F32) * self.scale;
        let value = if c.weight_decay > 0.0 {
            value.clone() - value * (self.lr * c.weight_decay)
        } else {
            value
        };
        let moments = self.optim.moments.entry(id).or_insert_with(|| Moments {
            exp_avg: grad.zeros_like(),
            exp_avg_sq: grad.zeros_like(),
        });
        moments.exp_avg = moments.exp_avg.clone() * c.beta1 + grad.clone() * (1.0 - c.beta1);
        moments.exp_avg_sq =
            moments.exp_avg_sq.clone() * c.beta2 + grad.powi_scalar(2) * (1.0 - c.beta2);
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let denom = moments.exp_avg_sq.clone().sqrt() / bias2.sqrt() + c.eps;
        let value = value - moments.exp_avg.clone() / denom * (self.lr / bias1);
        let param = if dtype == DType::F32 {
            value
        } else {
            self.optim.masters.insert(id, value.clone());
            value.cast(FloatDType::from(dtype))
        };
        let updated = Tensor::<B, D>::from_inner(param.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            moments: HashMap::new(),
            masters: HashMap::new(),
        }
    }

    /// The global norm of the gradients `grads` holds for `module`'s parameters, reduced on
    /// the device and read once (the optimizer step's one sync point).
    pub fn grad_norm<M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> f64 {
        let mut visitor = NormVisitor::<B> {
            grads,
            sum_sq: None,
        };
        module.visit(&mut visitor);
        visitor
            .sum_sq
            .map_or(0.0, |s| deepspec_core::model::read_scalar(s).sqrt())
    }

    /// Clips by the global norm, then takes one AdamW step at learning rate `lr`.
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        module: M,
        grads: &GradientsParams,
        lr: f64,
    ) -> (M, StepReport) {
        let grad_norm = Self::grad_norm(&module, grads);
        let clip_coef = match self.config.max_grad_norm {
            Some(max) if max > 0.0 => (max / (grad_norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        self.step += 1;
        let mut mapper = StepMapper {
            grads,
            optim: self,
            lr,
            scale: clip_coef,
        };
        let module = module.map(&mut mapper);
        (
            module,
            StepReport {
                grad_norm,
                clip_coef,
            },
        )
    }
}

struct GradCollector<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    path: Vec<String>,
    out: std::collections::BTreeMap<String, Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            let values = deepspec_core::model::to_host(g).data;
            let key = self
                .path
                .iter()
                .filter(|p| !matches!(p.as_str(), "DSpark" | "Eagle3"))
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            self.out.insert(key, values);
        }
    }
}

/// Each trainable parameter's gradient, flattened, by checkpoint key.
pub fn named_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &B::Gradients,
) -> std::collections::BTreeMap<String, Vec<f32>> {
    let mut collector = GradCollector {
        grads,
        path: Vec::new(),
        out: Default::default(),
    };
    module.visit(&mut collector);
    collector.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use deepspec_core::model::linear::Linear;

    type B = Autodiff<Flex>;

    /// Two parameters whose gradients have norms 3 and 4: the global norm is 5, and clipping
    /// to 1 scales both by 1/5 (clipping each alone would scale them differently).
    #[test]
    fn clipping_uses_the_global_norm() {
        let device = Default::default();
        let w = Tensor::<B, 2>::zeros([1, 2], &device);
        let b = Tensor::<B, 1>::zeros([1], &device);
        let linear = Linear::new(Param::from_tensor(w), Some(Param::from_tensor(b)));
        let x = Tensor::<B, 2>::from_data([[3.0f32, 0.0]], &device);
        // d/dw (y * 1) = x = [3, 0] (norm 3); d/db (4 y) = 4.
        let y = linear.forward(x);
        let loss =
            y.clone().sum() + (y * 0.0).sum() + linear.bias.as_ref().unwrap().val().sum() * 3.0;
        let grads = GradientsParams::from_grads(loss.backward(), &linear);
        let norm = AdamW::<B>::grad_norm(&linear, &grads);
        assert!((norm - 5.0).abs() < 1e-6, "norm {norm}");
        let mut optim = AdamW::<B>::new(AdamWConfig::default());
        let (_, report) = optim.step(linear, &grads, 1e-3);
        assert!((report.clip_coef - 1.0 / (5.0 + 1e-6)).abs() < 1e-9);
    }
}
