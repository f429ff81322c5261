//! What training may touch in its output folder: one run at a time (an OS lock), only the
//! checkpoint folders it wrote are pruned, and `step_latest` never leads outside the folder.

mod common;

use common::{run, settings, B};
use deepspec_core::drafter::Drafter;
use deepspec_core::fixtures::golden_dir;
use deepspec_core::io::lock::lock_folder;
use deepspec_train::batch::TrainBatch;
use deepspec_train::trainer::{train, TRAIN_LOCK};
use std::path::Path;

fn try_train(out: &Path, steps: usize, resume: bool) -> anyhow::Result<()> {
    let golden = golden_dir();
    let data = TrainBatch::from_safetensors(&golden.join("inputs.safetensors")).unwrap();
    let device = Default::default();
    let (drafter, config) = Drafter::<B>::load(&golden.join("dflash"), &device).unwrap();
    train(
        drafter,
        config,
        &data,
        &settings(steps),
        out,
        resume,
        &device,
        &deepspec_train::dist::collective::Comm::solo(&device),
    )
    .map(|_| ())
}

#[test]
fn a_second_run_into_a_locked_folder_stops_before_writing() {
    let out = tempfile::tempdir().unwrap();
    // Another process's lock looks the same: flock locks belong to the open file.
    let held = lock_folder(out.path(), TRAIN_LOCK, "test").unwrap();
    let err = try_train(out.path(), 2, false).unwrap_err().to_string();
    assert!(err.contains(".train.lock"), "{err}");
    assert!(err.contains("another `deepspec train` is writing"), "{err}");
    let written: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written, vec![TRAIN_LOCK.to_string()], "wrote {written:?}");
    drop(held);
    try_train(out.path(), 2, false).unwrap();
    assert!(out.path().join("step_latest/model.safetensors").exists());
}

#[test]
fn keep_last_deletes_only_the_checkpoints_it_wrote() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    std::fs::create_dir(&out).unwrap();
    // Folders a user (or a file's contents) could plant: none is the trainer's to delete.
    let outside = root.path().join("precious");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("trainer_state.json"), "{}").unwrap();
    std::os::unix::fs::symlink(&outside, out.join("step_0")).unwrap();
    for name in ["step_01", "step_+2", "step_3"] {
        std::fs::create_dir(out.join(name)).unwrap();
        std::fs::write(out.join(name).join("notes.txt"), name).unwrap();
    }
    std::fs::create_dir(out.join("step_02")).unwrap();
    std::fs::write(out.join("step_02/trainer_state.json"), "{}").unwrap();
    // keep_last = 2 with checkpoints at 4, 8 and 12: step_4 goes.
    run("dflash", &out, &settings(12), false);
    assert!(!out.join("step_4").exists(), "step_4 was kept");
    for kept in ["step_8", "step_12"] {
        assert!(
            out.join(kept).join("trainer_state.json").is_file(),
            "{kept}"
        );
    }
    for planted in ["step_01", "step_+2", "step_3"] {
        assert_eq!(
            std::fs::read_to_string(out.join(planted).join("notes.txt")).unwrap(),
            planted
        );
    }
    assert!(out.join("step_02/trainer_state.json").is_file());
    assert!(std::fs::symlink_metadata(out.join("step_0")).is_ok());
    assert!(outside.join("trainer_state.json").is_file());
}

#[test]
fn resume_refuses_a_step_latest_that_leads_outside_the_folder() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    run("dflash", &out, &settings(4), false);
    // A whole, loadable checkpoint outside: only the link's target can make it fail.
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::rename(out.join("step_4"), elsewhere.join("step_4")).unwrap();
    let latest = out.join("step_latest");
    for target in [
        elsewhere.join("step_4"),
        Path::new("../elsewhere/step_4").to_path_buf(),
    ] {
        std::fs::remove_file(&latest).unwrap();
        std::os::unix::fs::symlink(&target, &latest).unwrap();
        let err = try_train(&out, 8, true).unwrap_err().to_string();
        assert!(
            err.contains(&format!("points at `{}`", target.display())),
            "{err}"
        );
        assert!(err.contains("not a step_<n> folder in"), "{err}");
        assert!(err.contains("ln -sfn step_<n>"), "{err}");
    }
    // A link to a step folder next to it that is itself a link out is refused too.
    std::os::unix::fs::symlink(elsewhere.join("step_4"), out.join("step_4")).unwrap();
    std::fs::remove_file(&latest).unwrap();
    std::os::unix::fs::symlink("step_4", &latest).unwrap();
    let err = try_train(&out, 8, true).unwrap_err().to_string();
    assert!(err.contains("is not a checkpoint folder"), "{err}");
    // A dangling link (its folder deleted) is an error, not a fresh start over the run.
    std::fs::remove_file(out.join("step_4")).unwrap();
    let err = try_train(&out, 8, true).unwrap_err().to_string();
    assert!(
        err.contains("step_latest points at `step_4`")
            && err.contains("is not a checkpoint folder"),
        "{err}"
    );
    // Put back as `save` writes it, the run resumes.
    std::fs::rename(elsewhere.join("step_4"), out.join("step_4")).unwrap();
    try_train(&out, 8, true).unwrap();
    assert!(out.join("step_8/trainer_state.json").is_file());
}
