//! The training loop on the golden batch: the loss falls, and a stopped run resumed from its
//! checkpoint ends bit-identical to an uninterrupted one.

mod common;

use common::{run, settings, B};
use deepspec_core::drafter::Drafter;
use deepspec_core::fixtures::golden_dir;
use deepspec_train::batch::TrainBatch;
use deepspec_train::dist::collective::Comm;
use deepspec_train::trainer::train;

#[test]
fn loss_falls_for_every_algorithm() {
    // The golden Eagle3 drafter is already warmed up and its soft cross-entropy is dominated
    // by the target's entropy, so its loss moves less in a few steps.
    for (algo, factor) in [("dspark", 0.95), ("dflash", 0.95), ("eagle3", 0.995)] {
        let out = tempfile::tempdir().unwrap();
        let summary = run(algo, out.path(), &settings(24), false);
        assert_eq!(summary.steps, 24);
        assert!(
            summary.last_loss < summary.first_loss * factor,
            "{algo}: loss {} -> {}",
            summary.first_loss,
            summary.last_loss
        );
        assert!(out.path().join("step_latest/model.safetensors").exists());
        assert!(out.path().join("step_24/config.json").exists());
        // keep_last = 2: only the two newest step folders remain.
        let steps = std::fs::read_dir(out.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("step_")
                    && !e
                        .as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with("latest")
            })
            .count();
        assert_eq!(steps, 2, "{algo}: keep_last");
    }
}

#[test]
fn stopped_and_resumed_run_is_bit_identical() {
    let whole = tempfile::tempdir().unwrap();
    run("dspark", whole.path(), &settings(8), false);
    let parts = tempfile::tempdir().unwrap();
    let mut first = settings(8);
    first.stop_after = Some(4);
    let summary = run("dspark", parts.path(), &first, false);
    assert_eq!(summary.steps, 4);
    run("dspark", parts.path(), &settings(8), true);
    let a = std::fs::read(whole.path().join("step_latest/model.safetensors")).unwrap();
    let b = std::fs::read(parts.path().join("step_latest/model.safetensors")).unwrap();
    assert!(a == b, "resumed run differs from the uninterrupted one");
}

#[test]
fn refuses_to_overwrite_a_run_without_resume() {
    let out = tempfile::tempdir().unwrap();
    run("dflash", out.path(), &settings(2), false);
    let golden = golden_dir();
    let data = TrainBatch::from_safetensors(&golden.join("inputs.safetensors")).unwrap();
    let device = Default::default();
    let (drafter, config) = Drafter::<B>::load(&golden.join("dflash"), &device).unwrap();
    let err = train(
        drafter,
        config,
        &data,
        &settings(2),
        out.path(),
        false,
        &device,
        &Comm::solo(&device),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--resume") && err.contains("step_latest"),
        "{err}"
    );
}
