//! The DSpark / DFlash training loss (the reference's `dspark_trainer.py` loss terms):
//! position-weighted CE, the L1 (total-variation) term against the target's distribution
//! from the cached last hidden state, and the confidence BCE with soft labels. The forward is
//! the drafter's ([`BlockDrafter::block_features`]: the Qwen-style model's or DeepSeek-V4's); the vocabulary goes through the head seam.

use super::head::{head_loss, HeadLossBackend, HeadLossInput, HeadMode, HeadPlan};
use super::{float, int3, DeviceMetrics, Metrics};
use crate::batch::{Features, TrainBatch};
use crate::blocks::BlockLayout;
use burn::tensor::activation::sigmoid;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use deepspec_core::drafter::{BlockDrafter, BlockInputs};
use deepspec_core::model::rope::Rope;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DSparkLossConfig {
    pub ce_alpha: f64,
    pub l1_alpha: f64,
    pub confidence_alpha: f64,
    /// Slot `j` weighs `exp(-j / gamma)`; `None` or `<= 0` weighs every slot 1.
    pub decay_gamma: Option<f64>,
}

/// Numerators and denominators of the three terms (the reference's `loss_terms`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossTerms {
    pub ce_num: f64,
    pub ce_den: f64,
    pub l1_num: f64,
    pub l1_den: f64,
    pub confidence_num: f64,
    pub confidence_den: f64,
}

impl LossTerms {
    /// The terms inside read metrics (`ce_loss`, `l1_loss`, `confidence_loss`).
    pub fn from_metrics(metrics: &Metrics) -> Self {
        let get = |name: &str| metrics.get(name).copied().unwrap_or((0.0, 0.0));
        let (ce_num, ce_den) = get("ce_loss");
        let (l1_num, l1_den) = get("l1_loss");
        let (confidence_num, confidence_den) = get("confidence_loss");
        LossTerms {
            ce_num,
            ce_den,
            l1_num,
            l1_den,
            confidence_num,
            confidence_den,
        }
    }
}

pub struct DSparkLoss<B: Backend> {
    /// The scalar to back-propagate.
    pub total: Tensor<B, 1>,
    /// The reference's metrics (the loss terms included), still on the device.
    pub metrics: DeviceMetrics<B>,
    /// Every slot's outcome, for offline acceptance and its traces.
    pub slots: SlotValues<B>,
}

/// Per slot, `[blocks · block_size]` in layout order, detached: what verification would
/// decide there against the target's distribution.
pub struct SlotValues<B: Backend> {
    /// `Σ_v min(p_target, p_draft)`: the chance rejection sampling at T = 1 accepts the slot.
    pub accept: Tensor<B, 1>,
    /// 1 where the draft's argmax is the target's (greedy acceptance at T = 0).
    pub agree: Tensor<B, 1>,
    /// The draft's argmax token id.
    pub draft_ids: Tensor<B, 1>,
    /// σ of the confidence head's logit, when the drafter has one.
    pub confidence: Option<Tensor<B, 1>>,
}

pub fn slot_weight(j: usize, gamma: Option<f64>) -> f64 {
    match gamma {
        Some(g) if g > 0.0 => (-(j as f64) / g).exp(),
        _ => 1.0,
    }
}

/// Forward and loss of one micro-batch laid out as `layout`; `chunk_rows` tokens go through
/// the LM head at a time (`None`: sized for the vocabulary).
pub fn dspark_loss<B: HeadLossBackend, M: BlockDrafter<B>>(
    model: &M,
    rope: &Rope,
    batch: &TrainBatch,
    features: &Features<B>,
    layout: &BlockLayout,
    config: &DSparkLossConfig,
    chunk_rows: Option<usize>,
) -> DSparkLoss<B> {
    let device = model.device();
    let (b, len) = (batch.batch(), batch.seq_len());
    let (nb, bs) = (layout.num_blocks, layout.block_size);
    let n = b * nb * bs;
    let hidden = model.hidden_size();

    let ints2 = |rows: &[Vec<i64>]| {
        let width = rows.first().map_or(0, Vec::len);
        Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [rows.len(), width]), &device)
    };
    let blocks = model.block_features(
        rope,
        features.target_hidden.clone(),
        &BlockInputs {
            tokens: ints2(&layout.block_tokens),
            positions: &layout.positions,
            anchors: ints2(&layout.anchors),
            prev_tokens: int3::<B>(&layout.prev_tokens, &device),
            window: None,
        },
    );

    let weights: Vec<f32> = layout
        .eval_mask
        .iter()
        .flatten()
        .flat_map(|block| {
            block.iter().enumerate().map(|(j, &e)| {
                if e {
                    slot_weight(j, config.decay_gamma) as f32
                } else {
                    0.0
                }
            })
        })
        .collect();
    let weight_sum: f64 = weights.iter().map(|&w| w as f64).sum();
    let denom = weight_sum + 1e-6;
    let w = float::<B, 1>(weights.clone(), [n], &device);

    // The target's distribution for each slot comes from the cached post-norm hidden state
    // at the row where the target predicted the slot's label.
    let target_of: Vec<usize> = layout
        .target_rows
        .iter()
        .enumerate()
        .flat_map(|(row, per_row)| per_row.iter().flatten().map(move |&p| row * len + p))
        .collect();
    let head = model.head();
    let plan = HeadPlan::weighted(&target_of, &weights, chunk_rows, head.vocab_size());
    let with_l1 = config.l1_alpha > 0.0 && weight_sum > 0.0;
    let labels = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            layout
                .target_ids
                .iter()
                .flatten()
                .flatten()
                .copied()
                .collect::<Vec<_>>(),
            [n],
        ),
        &device,
    );
    let r = blocks.markov.as_ref().map_or(0, |m| m.dims()[3]);
    let losses = head_loss(
        HeadLossInput {
            hidden: blocks.hidden.clone().reshape([n, hidden]),
            markov: blocks.markov.clone().map(|m| m.reshape([n, r])),
            head,
            target_hidden: features
                .target_last_hidden
                .clone()
                .reshape([b * len, hidden]),
            labels: Some(labels),
            loss_weight: w.clone() * (config.ce_alpha / denom),
            l1_weight: with_l1.then(|| w.clone() * (config.l1_alpha / denom)),
            mode: HeadMode::Labels,
        },
        &plan,
    );
    let mut total = losses.total;
    let ce: Tensor<B, 1> = losses.per_token.clone().narrow(1, 0, 1).reshape([n]);
    let l1: Tensor<B, 1> = losses.per_token.clone().narrow(1, 1, 1).reshape([n]);
    let agree: Tensor<B, 1> = losses.per_token.clone().narrow(1, 2, 1).reshape([n]);
    let draft_ids: Tensor<B, 1> = losses.per_token.narrow(1, 3, 1).reshape([n]);

    let mut metrics = DeviceMetrics::default();
    metrics.add("ce_loss", (w.clone() * ce).sum(), weight_sum);
    if config.l1_alpha > 0.0 {
        metrics.add("l1_loss", (w.clone() * l1.clone()).sum(), weight_sum);
    }
    let accept = (l1 * -0.5 + 1.0).clamp(0.0, 1.0);
    let mut confidence = None;
    if let Some(z) = blocks.confidence {
        let z: Tensor<B, 1> = z.reshape([n]);
        // BCE with logits, stable form: max(z, 0) - z·y + log(1 + exp(-|z|)).
        let bce = z.clone().clamp_min(0.0) - z.clone() * accept.clone()
            + (z.clone().abs().neg().exp() + 1.0).log();
        let conf_num = (w.clone() * bce).sum();
        metrics.add("confidence_loss", conf_num.clone(), weight_sum);
        total = total + conf_num * (config.confidence_alpha / denom);
        confidence = Some(sigmoid(z.detach()));
    }
    block_metrics(
        &mut metrics,
        layout,
        accept.clone(),
        agree.clone(),
        confidence.clone(),
        w,
        weight_sum,
    );
    DSparkLoss {
        total,
        metrics,
        slots: SlotValues {
            accept: accept.detach(),
            agree,
            draft_ids,
            confidence,
        },
    }
}

/// The reference's per-position training metrics, computed on the device: acceptance per
/// slot, expected accepted length `τ` per block, and how well the confidence head tracks
/// acceptance (per slot and as a cumulative product).
fn block_metrics<B: Backend>(
    metrics: &mut DeviceMetrics<B>,
    layout: &BlockLayout,
    accept: Tensor<B, 1>,
    agree: Tensor<B, 1>,
    confidence: Option<Tensor<B, 1>>,
    weights: Tensor<B, 1>,
    weight_sum: f64,
) {
    let device = accept.device();
    let bs = layout.block_size;
    let blocks = layout.eval_mask.iter().map(Vec::len).sum::<usize>();
    let eval_host: Vec<f32> = layout
        .eval_mask
        .iter()
        .flatten()
        .flatten()
        .map(|&e| e as u8 as f32)
        .collect();
    let eval = float::<B, 2>(eval_host.clone(), [blocks, bs], &device);
    let accept = accept.reshape([blocks, bs]) * eval.clone();
    // Supervision is a prefix of each block, so a slot's survival is the plain cumulative
    // product up to it.
    let survive = accept.clone().cumprod(1) * eval.clone();
    for j in 0..bs {
        let count = eval_host.iter().skip(j).step_by(bs).sum::<f32>() as f64;
        if count > 0.0 {
            metrics.add(
                format!("accept_rate@{j}"),
                accept.clone().narrow(1, j, 1).sum(),
                count,
            );
        }
    }
    let kept = eval_host.iter().step_by(bs).sum::<f32>() as f64;
    if kept > 0.0 {
        metrics.add("tau_probabilistic", survive.clone().sum() + kept, kept);
        let agree = agree.reshape([blocks, bs]) * eval.clone();
        metrics.add("tau_greedy", agree.cumprod(1).sum() + kept, kept);
    }
    if let Some(c) = confidence {
        let c = c.reshape([blocks, bs]) * eval.clone();
        let w = weights.reshape([blocks, bs]);
        let conf_survive = c.clone().cumprod(1) * eval;
        let a = accept;
        metrics.add(
            "confidence_abs_error",
            (w.clone() * (c.clone() - a.clone()).abs()).sum(),
            weight_sum,
        );
        metrics.add("confidence_bias", (w.clone() * (c - a)).sum(), weight_sum);
        metrics.add(
            "confidence_cumprod_bias",
            (w * (conf_survive - survive)).sum(),
            weight_sum,
        );
    }
    for row in &layout.eval_mask {
        // Slot 0 of a kept block is always supervised (its anchor is a candidate).
        let kept = row.iter().filter(|b| b[0]).count();
        let supervised: usize = row.iter().map(|b| b.iter().filter(|&&e| e).count()).sum();
        let per_block = supervised as f64 / kept.max(1) as f64;
        metrics.add_host("block_supervised_tokens_abs", per_block, 1.0);
        metrics.add_host("block_supervised_tokens_ratio", per_block / bs as f64, 1.0);
    }
}
