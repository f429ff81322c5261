//! bf16 compute with f32 master weights (as the reference's `train.py` runs bf16), on the CPU backend computing in
//! bf16. The compute dtype is a per-device setting of the process, so these tests live in a
//! test binary of their own where every float tensor is bf16.

mod common;

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{DType, FloatDType, Tensor};
use common::{run, settings, B};
use deepspec_core::backend::set_compute_dtype;
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::model::linear::Linear;
use deepspec_train::optim::{AdamW, AdamWConfig};

fn bf16_device() -> burn::backend::flex::FlexDevice {
    let device = Default::default();
    set_compute_dtype::<B>(&device, FloatDType::BF16).unwrap();
    device
}

fn values(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Steps of 1e-4 on a weight of 1.0 are far below half a bf16 ulp (2^-8): applied to the bf16
/// weight each would round away. The f32 master accumulates them and the weight follows it.
#[test]
fn bf16_updates_below_the_rounding_step_accumulate_in_the_f32_master() {
    let device = bf16_device();
    let w = Tensor::<B, 2>::ones([1, 4], &device);
    assert_eq!(w.dtype(), DType::BF16, "the device computes in bf16");
    let mut linear = Linear::new(Param::from_tensor(w), None);
    let mut optim = AdamW::<B>::new(AdamWConfig {
        max_grad_norm: None,
        ..AdamWConfig::default()
    });
    let x = Tensor::<B, 2>::ones([1, 4], &device);
    let steps = 100;
    for _ in 0..steps {
        let loss = linear.forward(x.clone()).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &linear);
        linear = optim.step(linear, &grads, 1e-4).0;
    }
    let weight = linear.weight.val();
    assert_eq!(weight.dtype(), DType::BF16, "parameters stay bf16");
    let master = optim
        .masters
        .values()
        .next()
        .expect("an f32 master")
        .clone();
    assert_eq!(master.dtype(), DType::F32);
    let moments = optim.moments.values().next().unwrap();
    assert_eq!(moments.exp_avg.dtype(), DType::F32, "moments are f32");
    // Adam's step is ~lr for a constant gradient: the master moved by ~100 * 1e-4.
    let master = values(Tensor::from_inner(master));
    for m in &master {
        assert!((m - (1.0 - steps as f32 * 1e-4)).abs() < 1e-5, "master {m}");
    }
    let weight = values(weight.reshape([4]));
    for (w, m) in weight.iter().zip(&master) {
        assert!(*w < 1.0, "the bf16 weight never moved: {w}");
        assert_eq!(
            *w,
            burn::tensor::bf16::from_f32(*m).to_f32(),
            "weight = bf16(master)"
        );
    }
}

/// The trainer in bf16: the loss falls, checkpoints carry the f32 masters, and a stopped run
/// resumed from its checkpoint ends bit-identical to an uninterrupted one.
#[test]
fn bf16_training_learns_and_resumes_exactly() {
    bf16_device();
    let out = tempfile::tempdir().unwrap();
    let summary = run("dspark", out.path(), &settings(16), false);
    assert!(
        summary.last_loss < summary.first_loss * 0.95,
        "bf16 loss {} -> {}",
        summary.first_loss,
        summary.last_loss
    );
    let optim =
        SafetensorsFile::open(out.path().join("step_latest/optimizer.safetensors")).unwrap();
    let masters = optim
        .tensor_names()
        .filter(|n| n.ends_with(".master"))
        .count();
    assert!(masters > 0, "bf16 checkpoints keep the f32 masters");

    let whole = tempfile::tempdir().unwrap();
    run("dspark", whole.path(), &settings(8), false);
    let parts = tempfile::tempdir().unwrap();
    let mut first = settings(8);
    first.stop_after = Some(4);
    run("dspark", parts.path(), &first, false);
    run("dspark", parts.path(), &settings(8), true);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(whole.path().join("step_latest").join(file)).unwrap();
        let b = std::fs::read(parts.path().join("step_latest").join(file)).unwrap();
        assert!(a == b, "{file}: the resumed bf16 run differs");
    }
}
