//! The Eagle3 training-time-test loss (the reference's `eagle3_trainer.py`): each unrolled
//! step's soft cross-entropy against the target's distribution one position further, gated
//! by the shifted loss mask, normalised by `b·L`, weighted `decay^k`. The forward is the
//! drafter's ([`Eagle3Drafter::ttt_forward`]); all steps go through the head seam together, so
//! each target row's distribution is computed once, not once per step.

use super::head::{head_loss, HeadLossBackend, HeadLossInput, HeadMode, HeadPlan};
use super::{float, DeviceMetrics};
use crate::batch::{Features, TrainBatch};
use burn::tensor::{backend::Backend, Tensor};
use deepspec_core::drafter::Eagle3Drafter;
use deepspec_core::model::rope::Rope;

pub struct Eagle3Loss<B: Backend> {
    pub total: Tensor<B, 1>,
    /// Each step's weighted loss `Σ mask·soft_ce / (b·L)`, `[steps]` on the device.
    pub step_losses: Tensor<B, 1>,
    /// Each step's pre-norm hidden state `[b, L, H]` (for inspection and tests).
    pub step_hidden: Vec<Tensor<B, 3>>,
    pub metrics: DeviceMetrics<B>,
    /// Positions supervised at step 0 (the drafter's predictions per unrolled step).
    pub supervised: usize,
    /// Every (step, position) outcome, `[steps · b · L]` step-major, for offline acceptance;
    /// [`position_masks`] says which are supervised.
    pub slots: super::dspark::SlotValues<B>,
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

pub fn eagle3_loss<B: HeadLossBackend>(
    model: &(impl Eagle3Drafter<B> + ?Sized),
    rope: &Rope,
    batch: &TrainBatch,
    features: &Features<B>,
    steps: usize,
    step_decay: f64,
    chunk_rows: Option<usize>,
) -> Eagle3Loss<B> {
    let device = model.device();
    let (b, len) = (batch.batch(), batch.seq_len());
    let n = b * len;
    let step_hidden = model.ttt_forward(
        rope,
        features.target_hidden.clone(),
        &batch.input_ids,
        &batch.lens,
        steps,
    );
    let hidden = step_hidden[0].dims()[2];
    let masks = position_masks(batch, steps);
    // Position t at step k learns the target's distribution for token t+k+2, which the
    // target computed at position t+k+1. Rows past the end are masked out anyway.
    let mut target_of = Vec::with_capacity(steps * n);
    let mut weights = Vec::with_capacity(steps * n);
    for (k, mask) in masks.iter().enumerate() {
        for (row, row_mask) in mask.iter().enumerate() {
            for (t, &on) in row_mask.iter().enumerate() {
                target_of.push(row * len + (t + k + 1).min(len - 1));
                weights.push(if on {
                    (step_decay.powi(k as i32) / n as f64) as f32
                } else {
                    0.0
                });
            }
        }
    }
    let head = model.head();
    let plan = HeadPlan::weighted(&target_of, &weights, chunk_rows, head.vocab_size());
    let normed: Vec<Tensor<B, 2>> = step_hidden
        .iter()
        .map(|h| model.head_input(h.clone()).reshape([n, hidden]))
        .collect();
    let losses = head_loss(
        HeadLossInput {
            hidden: Tensor::cat(normed, 0),
            markov: None,
            head,
            target_hidden: features.target_last_hidden.clone().reshape([n, hidden]),
            labels: None,
            loss_weight: float::<B, 1>(weights, [steps * n], &device),
            l1_weight: None,
            mode: HeadMode::Soft,
        },
        &plan,
    );
    let mask_host: Vec<f32> = masks
        .iter()
        .flatten()
        .flatten()
        .map(|&m| m as u8 as f32)
        .collect();
    let mask = float::<B, 2>(mask_host.clone(), [steps, n], &device);
    let soft_ce: Tensor<B, 2> = losses.per_token.clone().narrow(1, 0, 1).reshape([steps, n]);
    let l1: Tensor<B, 2> = losses.per_token.clone().narrow(1, 1, 1).reshape([steps, n]);
    let agree: Tensor<B, 2> = losses.per_token.clone().narrow(1, 2, 1).reshape([steps, n]);
    let draft_ids: Tensor<B, 1> = losses.per_token.narrow(1, 3, 1).reshape([steps * n]);
    let step_losses: Tensor<B, 1> = (soft_ce * mask.clone()).sum_dim(1).reshape([steps]) / n as f64;

    let mut metrics = DeviceMetrics::default();
    let accept = (l1 * -0.5 + 1.0).clamp(0.0, 1.0) * mask.clone();
    let slots = super::dspark::SlotValues {
        accept: accept.clone().detach().reshape([steps * n]),
        agree: agree.clone().reshape([steps * n]),
        draft_ids,
        confidence: None,
    };
    let correct = agree * mask;
    // Survival along the steps: a position's step-k draft counts only if every earlier step
    // was (greedily / probabilistically) accepted.
    let survive_greedy = correct.clone().cumprod(0);
    let survive_prob = accept.clone().cumprod(0);
    for k in 0..steps {
        let valid = mask_host[k * n..(k + 1) * n].iter().sum::<f32>() as f64;
        metrics.add(
            format!("accuracy@{k}"),
            correct.clone().narrow(0, k, 1).sum(),
            valid,
        );
        metrics.add(
            format!("accept_rate@{k}"),
            accept.clone().narrow(0, k, 1).sum(),
            valid,
        );
        metrics.add(
            format!("ploss_{k}"),
            step_losses.clone().narrow(0, k, 1),
            1.0,
        );
    }
    // τ over the positions valid at step 0: 1 + Σ_k survival.
    let step0 = mask_host[..n].iter().sum::<f32>() as f64;
    let first = float::<B, 1>(mask_host[..n].to_vec(), [n], &device);
    let tau =
        |survive: Tensor<B, 2>| (survive.sum_dim(0).reshape([n]) * first.clone()).sum() + step0;
    metrics.add("tau_greedy", tau(survive_greedy), step0);
    metrics.add("tau_probabilistic", tau(survive_prob), step0);
    Eagle3Loss {
        supervised: step0 as usize,
        total: losses.total,
        step_losses,
        step_hidden,
        metrics,
        slots,
    }
}
