//! The Eagle3 training-time-test loss (DEEPSPEC-SPEC §5.6): each unrolled step's soft
//! cross-entropy against the target's distribution one position further, gated by the
//! shifted loss mask, normalised by `b·L`, weighted `decay^k`.

use super::float;
use super::head::soft_token_losses;
use crate::batch::TrainBatch;
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::drafter::Eagle3Model;
use deepspec_core::model::rope::Rope;
use std::collections::BTreeMap;

pub struct Eagle3Loss<B: Backend> {
    pub total: Tensor<B, 1>,
    pub step_losses: Vec<f64>,
    /// Each step's pre-norm hidden state `[b, L, H]` (for inspection and tests).
    pub step_hidden: Vec<Tensor<B, 3>>,
    pub metrics: BTreeMap<String, (f64, f64)>,
}

/// `pm_k[b][t]`: `loss_mask[t + k]`, with each row's last real token excluded.
pub fn position_masks(batch: &TrainBatch, steps: usize) -> Vec<Vec<Vec<bool>>> {
    let len = batch.seq_len();
    (0..steps)
        .map(|k| {
            batch
                .loss_mask
                .iter()
                .zip(&batch.lens)
                .map(|(mask, &real)| {
                    (0..len)
                        .map(|t| {
                            let p = t + k;
                            p < len && mask[p] == 1 && p + 1 != real
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

pub fn eagle3_loss<B: Backend>(
    model: &Eagle3Model<B>,
    rope: &Rope,
    batch: &TrainBatch,
    steps: usize,
    step_decay: f64,
) -> Eagle3Loss<B> {
    let device = model.fc.weight.device();
    let (b, len) = (batch.batch(), batch.seq_len());
    let n = b * len;
    let hidden = model.lm_head.in_features();
    let ctx_width = batch.target_hidden.shape[2];
    let ctx = float(
        batch.target_hidden.data.clone(),
        [b, len, ctx_width],
        &device,
    );
    let step_hidden = model.ttt_forward(rope, ctx, &batch.input_ids, &batch.lens, steps);
    let masks = position_masks(batch, steps);
    let mut total: Option<Tensor<B, 1>> = None;
    let mut step_losses = Vec::with_capacity(steps);
    let mut metrics = BTreeMap::new();
    let mut survive_greedy = vec![1.0f64; n];
    let mut survive_prob = vec![1.0f64; n];
    let mut tau_greedy = vec![0.0f64; n];
    let mut tau_prob = vec![0.0f64; n];
    for (k, h) in step_hidden.iter().enumerate() {
        // Position t at step k learns the target's distribution for token t+k+2, which the
        // target computed at position t+k+1. Rows past the end are masked out anyway.
        let mut target_rows = Vec::with_capacity(n * hidden);
        for row in 0..b {
            for t in 0..len {
                let p = (t + k + 1).min(len - 1);
                let at = (row * len + p) * hidden;
                target_rows.extend_from_slice(&batch.target_last_hidden.data[at..at + hidden]);
            }
        }
        let mask: Vec<f32> = masks[k].iter().flatten().map(|&m| m as u8 as f32).collect();
        let normed = model.norm.forward(h.clone()).reshape([n, hidden]);
        let (soft_ce, l1, agree) = soft_token_losses(
            normed,
            model.lm_head.weight.val(),
            float(target_rows, [n, hidden], &device),
            model.lm_head.weight.val(),
        );
        let step_loss = (soft_ce * float::<B, 1>(mask.clone(), [n], &device)).sum() / (n as f64);
        let value = step_loss
            .clone()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap()[0] as f64;
        step_losses.push(value);
        let weighted = step_loss * step_decay.powi(k as i32);
        total = Some(match total {
            Some(t) => t + weighted,
            None => weighted,
        });
        let l1 = l1.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let agree = agree
            .into_data()
            .convert::<bool>()
            .into_vec::<bool>()
            .unwrap();
        let valid = mask.iter().filter(|&&m| m > 0.0).count() as f64;
        let mut correct = 0.0;
        let mut accept = 0.0;
        for i in 0..n {
            let a = (1.0 - 0.5 * l1[i] as f64).clamp(0.0, 1.0);
            let on = mask[i] > 0.0;
            if on {
                correct += agree[i] as u8 as f64;
                accept += a;
            }
            survive_greedy[i] *= (on && agree[i]) as u8 as f64;
            survive_prob[i] *= if on { a } else { 0.0 };
        }
        metrics.insert(format!("accuracy@{k}"), (correct, valid));
        metrics.insert(format!("accept_rate@{k}"), (accept, valid));
        metrics.insert(format!("ploss_{k}"), (value, 1.0));
        for i in 0..n {
            tau_greedy[i] += survive_greedy[i];
            tau_prob[i] += survive_prob[i];
        }
    }
    let step0: Vec<bool> = masks[0].iter().flatten().copied().collect();
    let count = step0.iter().filter(|&&v| v).count() as f64;
    let sum_over_valid =
        |tau: &[f64]| -> f64 { (0..n).filter(|&i| step0[i]).map(|i| 1.0 + tau[i]).sum() };
    metrics.insert("tau_greedy".into(), (sum_over_valid(&tau_greedy), count));
    metrics.insert(
        "tau_probabilistic".into(),
        (sum_over_valid(&tau_prob), count),
    );
    Eagle3Loss {
        total: total.expect("at least one step"),
        step_losses,
        step_hidden,
        metrics,
    }
}
