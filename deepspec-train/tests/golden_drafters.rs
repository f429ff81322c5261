//! Parity of the drafters, their losses, gradients and one AdamW step with the reference
//! (golden `dspark/`, `dflash/`, `eagle3/`; the Gemma4 set's `dspark/` and `dflash/` for the
//! `golden_gemma4_*` tests). Every size comes from the fixture files.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepspec_core::drafter::{
    named_params, state_dict, BlockDrafter, BlockInputs, DSparkGemma4Model, DSparkModel, Drafter,
    DrafterConfig, Eagle3Drafter,
};
use deepspec_core::fixtures::{golden_dir, golden_gemma4_dir, max_abs_diff};
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::model::attention::Visibility;
use deepspec_core::model::{tensor_from_host, to_host};
use deepspec_train::anchors::{sample_anchors, Anchors, FixedAnchors};
use deepspec_train::batch::TrainBatch;
use deepspec_train::blocks::{build_blocks, BlockLayout};
use deepspec_train::loss::dspark::{dspark_loss, DSparkLossConfig, LossTerms};
use deepspec_train::loss::eagle3::{eagle3_loss, position_masks};
use deepspec_train::optim::{named_grads, AdamW, AdamWConfig};
use serde_json::Value;
use std::path::PathBuf;

type B = Autodiff<Flex>;

/// Tokens per LM-head chunk: `DEEPSPEC_HEAD_CHUNK` when set (the parity must not depend on
/// it), else a small chunk so the fixtures' few tokens still span several chunks.
fn chunk_rows() -> Option<usize> {
    Some(
        std::env::var("DEEPSPEC_HEAD_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(7),
    )
}

struct Fixture {
    dir: PathBuf,
    expected: SafetensorsFile,
    step: Value,
    batch: TrainBatch,
}

fn fixture(algo: &str) -> Fixture {
    fixture_in(golden_dir(), algo)
}

fn fixture_in(golden: PathBuf, algo: &str) -> Fixture {
    let dir = golden.join(algo);
    Fixture {
        expected: SafetensorsFile::open(dir.join("expected.safetensors")).unwrap(),
        step: serde_json::from_str(&std::fs::read_to_string(dir.join("train_step.json")).unwrap())
            .unwrap(),
        batch: TrainBatch::from_safetensors(&golden.join("inputs.safetensors")).unwrap(),
        dir,
    }
}

fn assert_abs(name: &str, got: &[f32], want: &[f32], tol: f32) {
    let (d, i) = max_abs_diff(got, want);
    assert!(
        d <= tol,
        "{name}: |diff| {d:.3e} > {tol:.0e} at {i} (got {}, want {})",
        got[i],
        want[i]
    );
    eprintln!("{name}: max |diff| {d:.3e}");
}

fn assert_rel(name: &str, got: f64, want: f64, tol: f64) {
    let rel = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        rel <= tol,
        "{name}: got {got}, want {want} (relative diff {rel:.3e} > {tol:.0e})"
    );
    eprintln!("{name}: relative diff {rel:.3e}");
}

fn ints(file: &SafetensorsFile, name: &str) -> Vec<i64> {
    file.i64(name).unwrap().1
}

/// The fixed anchors stored with the fixture.
fn fixed_anchors(f: &Fixture, num_anchors: usize) -> Anchors {
    let (shape, positions) = f.expected.i64("anchor_positions").unwrap();
    let keep = ints(&f.expected, "block_keep_mask");
    let n = shape[1];
    let chosen: Vec<Vec<usize>> = (0..shape[0])
        .map(|b| {
            (0..n)
                .filter(|&m| keep[b * n + m] == 1)
                .map(|m| positions[b * n + m] as usize)
                .collect()
        })
        .collect();
    sample_anchors(&f.batch.loss_mask, num_anchors, &mut FixedAnchors(chosen))
}

fn load_dspark(f: &Fixture) -> (DSparkModel<B>, DrafterConfig) {
    match Drafter::<B>::load(&f.dir, &Default::default()).unwrap() {
        (Drafter::DSpark(m), c) => (m, c),
        _ => panic!("{} is not a DSpark/DFlash drafter", f.dir.display()),
    }
}

fn load_gemma4(f: &Fixture) -> (DSparkGemma4Model<B>, DrafterConfig) {
    match Drafter::<B>::load(&f.dir, &Default::default()).unwrap() {
        (Drafter::DSparkGemma4(m), c) => (m, c),
        _ => panic!("{} is not a Gemma4 DSpark/DFlash drafter", f.dir.display()),
    }
}

fn layout_of(f: &Fixture, config: &DrafterConfig) -> (Anchors, BlockLayout) {
    let anchors = fixed_anchors(f, config.num_anchors);
    let layout = build_blocks(
        &f.batch.input_ids,
        &f.batch.loss_mask,
        &anchors,
        config.block_size,
        config.mask_token_id.unwrap(),
    );
    (anchors, layout)
}

fn check_blocks(f: &Fixture) {
    let config = DrafterConfig::from_file(&f.dir.join("config.json")).unwrap();
    let (anchors, layout) = layout_of(f, &config);
    let flat_keep: Vec<i64> = anchors.keep.iter().flatten().map(|&k| k as i64).collect();
    assert_eq!(flat_keep, ints(&f.expected, "block_keep_mask"));
    assert_eq!(
        layout.positions.concat(),
        ints(&f.expected, "position_ids"),
        "position ids"
    );
    // The blocks' visibility description reproduces the reference's dense mask.
    let (b, len) = (f.batch.batch(), f.batch.seq_len());
    let n = layout.num_blocks;
    let slots = n * layout.block_size;
    let device = Default::default();
    let visibility = Visibility::<B>::Blocks {
        anchors: Tensor::from_data(TensorData::new(layout.anchors.concat(), [b, n]), &device),
        block_size: layout.block_size,
        context_len: len,
        window: None,
    };
    let dense: Vec<i64> = visibility
        .dense_mask(b, slots, len + slots, &device)
        .into_data()
        .into_vec::<bool>()
        .unwrap()
        .into_iter()
        .map(|v| v as i64)
        .collect();
    assert_eq!(
        dense,
        ints(&f.expected, "attention_mask_dense"),
        "attention mask"
    );
    let targets: Vec<i64> = layout
        .target_ids
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    assert_eq!(targets, ints(&f.expected, "target_ids"), "target ids");
    let eval: Vec<i64> = layout
        .eval_mask
        .iter()
        .flatten()
        .flatten()
        .map(|&e| e as i64)
        .collect();
    assert_eq!(eval, ints(&f.expected, "eval_mask"), "eval mask");
    if f.expected.info("prev_token_ids").is_some() {
        let prev: Vec<i64> = layout
            .prev_tokens
            .iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        assert_eq!(prev, ints(&f.expected, "prev_token_ids"), "previous tokens");
    }
}

fn check_logits<M: BlockDrafter<B>>(
    algo: &str,
    f: &Fixture,
    model: &M,
    config: &DrafterConfig,
    tol: f32,
) {
    let (_, layout) = layout_of(f, config);
    let device = Default::default();
    let b = f.batch.batch();
    let slots = layout.num_blocks * layout.block_size;
    let ctx = tensor_from_host::<B, 3>(f.batch.target_hidden.clone(), &device);
    let ints2 = |rows: &[Vec<i64>]| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(rows.concat(), [rows.len(), rows[0].len()]),
            &device,
        )
    };
    let prev = Tensor::<B, 3, Int>::from_data(
        TensorData::new(
            layout
                .prev_tokens
                .iter()
                .flatten()
                .flatten()
                .copied()
                .collect::<Vec<_>>(),
            [b, layout.num_blocks, layout.block_size],
        ),
        &device,
    );
    let rope = config.base.rope();
    let heads = model.block_features(
        &rope,
        ctx,
        &BlockInputs {
            tokens: ints2(&layout.block_tokens),
            positions: &layout.positions,
            anchors: ints2(&layout.anchors),
            prev_tokens: prev,
            window: None,
        },
    );
    assert_eq!(heads.hidden.dims()[1] * heads.hidden.dims()[2], slots);
    assert_abs(
        &format!("{algo} backbone_hidden"),
        &to_host(heads.hidden.clone()).data,
        &f.expected.f32("backbone_hidden").unwrap().data,
        tol,
    );
    let head = model.head();
    if f.expected.info("base_draft_logits").is_some() {
        let base = head.base_logits(heads.hidden.clone());
        assert_abs(
            &format!("{algo} base_draft_logits"),
            &to_host(base).data,
            &f.expected.f32("base_draft_logits").unwrap().data,
            tol,
        );
    }
    assert_abs(
        &format!("{algo} draft_logits"),
        &to_host(heads.logits(&head)).data,
        &f.expected.f32("draft_logits").unwrap().data,
        tol,
    );
    match (
        heads.confidence,
        f.expected.info("confidence_pred").is_some(),
    ) {
        (Some(conf), true) => assert_abs(
            &format!("{algo} confidence_pred"),
            &to_host(conf).data,
            &f.expected.f32("confidence_pred").unwrap().data,
            tol,
        ),
        (None, false) => {}
        (got, _) => panic!(
            "{algo}: confidence head present here: {}, in the fixture: {}",
            got.is_some(),
            got.is_none()
        ),
    }
}

/// A logged metric's value: ratio metrics carry `value`, scalar ones `values`.
fn reference_value(metric: &Value) -> f64 {
    metric["value"]
        .as_f64()
        .or_else(|| metric["values"][0].as_f64())
        .unwrap()
}

/// Every metric we log that the reference also logged agrees within 1e-4.
fn check_metrics(
    algo: &str,
    metrics: &std::collections::BTreeMap<String, (f64, f64)>,
    step: &Value,
) {
    let mut compared = 0;
    for (name, (num, den)) in metrics {
        if let Some(want) = step["reference_metrics"].get(format!("train/{name}")) {
            let want_value = reference_value(want);
            let got = if *den > 0.0 { num / den } else { 0.0 };
            assert!(
                (got - want_value).abs() <= 1e-4,
                "{algo} metric {name}: got {got}, want {want_value}"
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 5,
        "{algo}: only {compared} metrics matched reference names"
    );
}

fn loss_config(step: &Value) -> DSparkLossConfig {
    DSparkLossConfig {
        ce_alpha: step["ce_loss_alpha"].as_f64().unwrap(),
        l1_alpha: step["l1_loss_alpha"].as_f64().unwrap(),
        confidence_alpha: step["confidence_head_alpha"].as_f64().unwrap(),
        decay_gamma: step["loss_decay_gamma"].as_f64(),
    }
}

fn scalar<Bk: Backend>(t: Tensor<Bk, 1>) -> f64 {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap()[0]
}

/// Gradients and one AdamW step against `train_step.json` and the stored `grad.*` tensors.
fn check_backward_and_step<M>(f: &Fixture, model: M, total: Tensor<B, 1>)
where
    M: burn::module::AutodiffModule<B> + Clone,
{
    let step = &f.step;
    let raw_grads = total.backward();
    let all_grads = named_grads(&model, &raw_grads);
    let grads = burn::optim::GradientsParams::from_grads(raw_grads, &model);
    let norm = AdamW::<B>::grad_norm(&model, &grads);
    assert_rel("grad_norm", norm, step["grad_norm"].as_f64().unwrap(), 1e-4);
    let params = named_params(&model, true);
    let expected_names: Vec<&str> = step["trainable_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut ours: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    ours.sort();
    let mut theirs = expected_names.clone();
    theirs.sort();
    assert_eq!(ours, theirs, "trainable parameter names");
    for p in &params {
        let grad = &all_grads[&p.name];
        let g_norm = grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        let want = step["per_param_grad_norm"][&p.name].as_f64().unwrap();
        if want > 1e-8 {
            assert_rel(&format!("grad norm of {}", p.name), g_norm, want, 1e-4);
        } else {
            assert!(
                g_norm < 1e-6,
                "{}: gradient norm {g_norm}, expected ~0",
                p.name
            );
        }
        let key = format!("grad.{}", p.name);
        if f.expected.info(&key).is_some() {
            assert_abs(&key, grad, &f.expected.f32(&key).unwrap().data, 1e-4);
        }
    }
    let before = state_dict(&model);
    let lr = step["lr_used_for_step"].as_f64().unwrap();
    let mut optim = AdamW::<B>::new(AdamWConfig {
        max_grad_norm: step["max_grad_norm"].as_f64(),
        ..AdamWConfig::default()
    });
    let (model, report) = optim.step(model, &grads, lr);
    assert_rel(
        "clip_coef",
        report.clip_coef,
        step["clip_coef"].as_f64().unwrap(),
        1e-4,
    );
    let after = state_dict(&model);
    for (name, want) in step["per_param_update"].as_object().unwrap() {
        let (old, new) = (&before[name], &after[name]);
        let max_update = old
            .data
            .iter()
            .zip(&new.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let sum: f64 = new.data.iter().map(|&v| v as f64).sum();
        let l2: f64 = new
            .data
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert_rel(
            &format!("{name} max |update|"),
            max_update as f64,
            want["max_abs_update"].as_f64().unwrap(),
            1e-3,
        );
        let want_sum = want["sum_after"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-4 * want_sum.abs().max(1.0),
            "{name}: sum after step {sum}, want {want_sum}"
        );
        assert_rel(
            &format!("{name} l2 after"),
            l2,
            want["l2_after"].as_f64().unwrap(),
            1e-5,
        );
    }
}

fn check_dspark_loss<M>(algo: &str, f: Fixture, model: M, config: DrafterConfig)
where
    M: BlockDrafter<B> + burn::module::AutodiffModule<B> + Clone,
{
    let (_, layout) = layout_of(&f, &config);
    let cfg = loss_config(&f.step);
    let mut batch = f.batch.clone();
    let features = batch.upload::<B>(&Default::default());
    let loss = dspark_loss(
        &model,
        &config.base.rope(),
        &batch,
        &features,
        &layout,
        &cfg,
        chunk_rows(),
    );
    let metrics = loss.metrics.read();
    let terms = &f.step["loss_terms"];
    let close = |name: &str, got: f64, want: f64, tol: f64| {
        assert!(
            (got - want).abs() <= tol,
            "{algo} {name}: got {got}, want {want}"
        );
        eprintln!("{algo} {name}: |diff| {:.3e}", (got - want).abs());
    };
    let t = LossTerms::from_metrics(&metrics);
    for (name, got) in [
        ("ce_loss_num", t.ce_num),
        ("ce_loss_den", t.ce_den),
        ("l1_loss_num", t.l1_num),
        ("l1_loss_den", t.l1_den),
        ("confidence_loss_num", t.confidence_num),
        ("confidence_loss_den", t.confidence_den),
    ] {
        let want = terms[name].as_f64().unwrap();
        close(name, got, want, 1e-5 * want.abs().max(1.0));
    }
    let ratio = |num: f64, den: f64| if den > 0.0 { num / (den + 1e-6) } else { 0.0 };
    close(
        "ce_loss",
        ratio(t.ce_num, t.ce_den),
        f.step["ce_loss"].as_f64().unwrap(),
        1e-5,
    );
    close(
        "l1_loss",
        ratio(t.l1_num, t.l1_den),
        f.step["l1_loss"].as_f64().unwrap(),
        1e-5,
    );
    close(
        "confidence_loss",
        ratio(t.confidence_num, t.confidence_den),
        f.step["confidence_loss"].as_f64().unwrap(),
        1e-5,
    );
    close(
        "total_loss",
        scalar(loss.total.clone()),
        f.step["total_loss"].as_f64().unwrap(),
        1e-5,
    );
    check_metrics(algo, &metrics, &f.step);
    check_backward_and_step(&f, model, loss.total);
}

fn qwen3_logits(algo: &str) {
    let f = fixture(algo);
    let (model, config) = load_dspark(&f);
    check_logits(algo, &f, &model, &config, 1e-5);
}

fn qwen3_loss(algo: &str) {
    let f = fixture(algo);
    let (model, config) = load_dspark(&f);
    check_dspark_loss(algo, f, model, config);
}

fn gemma4_logits(algo: &str) {
    let f = fixture_in(golden_gemma4_dir(), algo);
    let (model, config) = load_gemma4(&f);
    // The Gemma4 fixtures' own f32 logits sit up to 8.7e-6 from their float64 recompute
    // (their README): twice that is the f32 noise floor here.
    check_logits(algo, &f, &model, &config, 2e-5);
}

fn gemma4_loss(algo: &str) {
    let f = fixture_in(golden_gemma4_dir(), algo);
    let (model, config) = load_gemma4(&f);
    check_dspark_loss(algo, f, model, config);
}

#[test]
fn golden_dspark_blocks() {
    check_blocks(&fixture("dspark"));
}

#[test]
fn golden_dflash_blocks() {
    check_blocks(&fixture("dflash"));
}

#[test]
fn golden_dspark_logits() {
    qwen3_logits("dspark");
}

#[test]
fn golden_dflash_logits() {
    qwen3_logits("dflash");
}

#[test]
fn golden_dspark_loss_gradients_and_step() {
    qwen3_loss("dspark");
}

#[test]
fn golden_dflash_loss_gradients_and_step() {
    qwen3_loss("dflash");
}

#[test]
fn golden_gemma4_dspark_blocks() {
    check_blocks(&fixture_in(golden_gemma4_dir(), "dspark"));
}

#[test]
fn golden_gemma4_dflash_blocks() {
    check_blocks(&fixture_in(golden_gemma4_dir(), "dflash"));
}

#[test]
fn golden_gemma4_dspark_logits() {
    gemma4_logits("dspark");
}

#[test]
fn golden_gemma4_dflash_logits() {
    gemma4_logits("dflash");
}

#[test]
fn golden_gemma4_dspark_loss_gradients_and_step() {
    gemma4_loss("dspark");
}

#[test]
fn golden_gemma4_dflash_loss_gradients_and_step() {
    gemma4_loss("dflash");
}

#[test]
fn golden_eagle3_loss_gradients_and_step() {
    let f = fixture("eagle3");
    let (model, config) = match Drafter::<B>::load(&f.dir, &Default::default()).unwrap() {
        (Drafter::Eagle3(m), c) => (m, c),
        _ => panic!("not an Eagle3 drafter"),
    };
    check_eagle3(f, model, config, 1e-4);
}

#[test]
fn golden_gemma4_eagle3_loss_gradients_and_step() {
    let f = fixture_in(golden_gemma4_dir(), "eagle3");
    let (model, config) = match Drafter::<B>::load(&f.dir, &Default::default()).unwrap() {
        (Drafter::Eagle3Gemma4(m), c) => (m, c),
        _ => panic!("not a Gemma4 Eagle3 drafter"),
    };
    // The fixtures' own f32 step hidden states sit up to 1.7e-5 from float64 (their README).
    check_eagle3(f, model, config, 1e-4);
}

/// The Eagle3 training-time test against a fixture: position masks, every step's hidden
/// state (within `hidden_tol`), the step-0 logits, step losses, metrics, gradients and the
/// AdamW step.
fn check_eagle3<M>(f: Fixture, model: M, config: DrafterConfig, hidden_tol: f32)
where
    M: Eagle3Drafter<B> + burn::module::AutodiffModule<B> + Clone,
{
    let steps = f.step["ttt_length"].as_u64().unwrap() as usize;
    let decay = f.step["step_loss_decay"].as_f64().unwrap();
    let mut batch = f.batch.clone();
    let features = batch.upload::<B>(&Default::default());
    let loss = eagle3_loss(
        &model,
        &config.base.rope(),
        &batch,
        &features,
        steps,
        decay,
        chunk_rows(),
    );
    let step_losses = to_host(loss.step_losses.clone()).data;
    // Position masks.
    let masks: Vec<f32> = position_masks(&f.batch, steps)
        .iter()
        .flatten()
        .flatten()
        .map(|&m| m as u8 as f32)
        .collect();
    assert_eq!(
        masks,
        f.expected.f32("position_masks").unwrap().data,
        "position masks"
    );
    // Per-step hidden states and step-0 logits.
    let hidden: Vec<f32> = loss
        .step_hidden
        .iter()
        .flat_map(|h| to_host(h.clone()).data)
        .collect();
    assert_abs(
        "eagle3 step_hidden_states",
        &hidden,
        &f.expected.f32("step_hidden_states").unwrap().data,
        hidden_tol,
    );
    let logits0 = model
        .head()
        .base_logits(model.head_input(loss.step_hidden[0].clone()));
    assert_abs(
        "eagle3 step0_draft_logits",
        &to_host(logits0).data,
        &f.expected.f32("step0_draft_logits").unwrap().data,
        1e-5,
    );
    for (k, want) in f.step["step_losses"].as_array().unwrap().iter().enumerate() {
        let want = want.as_f64().unwrap();
        assert!(
            (step_losses[k] as f64 - want).abs() <= 1e-5,
            "step {k} loss {} vs {want}",
            step_losses[k]
        );
    }
    let total = scalar(loss.total.clone());
    let want = f.step["total_loss"].as_f64().unwrap();
    assert!(
        (total - want).abs() <= 1e-5 * want.max(1.0),
        "total {total} vs {want}"
    );
    check_metrics("eagle3", &loss.metrics.read(), &f.step);
    check_backward_and_step(&f, model, loss.total);
}
