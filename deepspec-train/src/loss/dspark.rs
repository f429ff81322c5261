//! The DSpark / DFlash training step's forward and loss (DEEPSPEC-SPEC §5.4–5.5, §5.7):
//! position-weighted CE, the L1 (total-variation) term against the target's distribution
//! recomputed from the cached last hidden state, and the confidence BCE with soft labels.

use super::head::block_token_losses;
use super::{float, int3};
use crate::batch::TrainBatch;
use crate::blocks::BlockLayout;
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use deepspec_core::drafter::DSparkModel;
use deepspec_core::model::rope::Rope;
use std::collections::BTreeMap;

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

/// A ratio metric: `num / den` over a logging window.
pub type Metrics = BTreeMap<String, (f64, f64)>;

pub struct DSparkLoss<B: Backend> {
    /// The scalar to back-propagate.
    pub total: Tensor<B, 1>,
    pub terms: LossTerms,
    pub metrics: Metrics,
}

pub fn slot_weight(j: usize, gamma: Option<f64>) -> f64 {
    match gamma {
        Some(g) if g > 0.0 => (-(j as f64) / g).exp(),
        _ => 1.0,
    }
}

fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 tensor")
}

/// Forward and loss of one micro-batch laid out as `layout`.
pub fn dspark_loss<B: Backend>(
    model: &DSparkModel<B>,
    rope: &Rope,
    batch: &TrainBatch,
    layout: &BlockLayout,
    config: &DSparkLossConfig,
) -> DSparkLoss<B> {
    let device = model.fc.weight.device();
    let (b, len) = (batch.batch(), batch.seq_len());
    let (nb, bs) = (layout.num_blocks, layout.block_size);
    let slots = nb * bs;
    let n = b * slots;
    let hidden = model.lm_head.in_features();
    let ctx_width = batch.target_hidden.shape[2];

    let context = model.context(float(
        batch.target_hidden.data.clone(),
        [b, len, ctx_width],
        &device,
    ));
    let block_tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(layout.block_tokens.concat(), [b, slots]),
        &device,
    );
    let visible_flat: Vec<bool> = layout.visible.iter().flatten().flatten().copied().collect();
    let visible = Tensor::<B, 4, Bool>::from_data(
        TensorData::new(visible_flat, [b, 1, slots, len + slots]),
        &device,
    );
    let out: Tensor<B, 4> = model
        .backbone(rope, context, block_tokens, &layout.positions, visible)
        .reshape([b, nb, bs, hidden]);

    let prev = int3::<B>(&layout.prev_tokens, &device);
    let markov = model
        .markov_head
        .as_ref()
        .map(|head| head.features(prev, out.clone()));
    let (features, head) = match (&model.markov_head, &markov) {
        (Some(h), Some(m)) => (
            Tensor::cat(vec![out.clone(), m.bias_features.clone()], 3),
            Tensor::cat(
                vec![model.lm_head.weight.val(), h.markov_w2.weight.val()],
                1,
            ),
        ),
        _ => (out.clone(), model.lm_head.weight.val()),
    };
    let width = features.dims()[3];

    // The target's distribution for each slot, from the cached post-norm hidden state.
    let mut target_rows = Vec::with_capacity(n * hidden);
    for (row, per_row) in layout.target_rows.iter().enumerate() {
        for &p in per_row.iter().flatten() {
            let at = (row * len + p) * hidden;
            target_rows.extend_from_slice(&batch.target_last_hidden.data[at..at + hidden]);
        }
    }
    let target_ids = Tensor::<B, 1, Int>::from_data(
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
    let losses = block_token_losses(
        features.reshape([n, width]),
        head,
        float(target_rows, [n, hidden], &device),
        model.lm_head.weight.val(),
        target_ids,
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
    let w = float::<B, 1>(weights.clone(), [n], &device);
    let denom = weight_sum + 1e-6;

    let ce_num = (w.clone() * losses.ce.clone()).sum();
    let mut total = ce_num.clone() * (config.ce_alpha / denom);
    let mut terms = LossTerms {
        ce_num: host_f32(ce_num)[0] as f64,
        ce_den: weight_sum,
        ..Default::default()
    };
    if config.l1_alpha > 0.0 {
        let l1_num = (w.clone() * losses.l1.clone()).sum();
        terms.l1_num = host_f32(l1_num.clone())[0] as f64;
        terms.l1_den = weight_sum;
        if weight_sum > 0.0 {
            total = total + l1_num * (config.l1_alpha / denom);
        }
    }
    let accept = (losses.l1.clone().detach() * -0.5 + 1.0).clamp(0.0, 1.0);
    let mut confidence_host = None;
    if let Some(conf_head) = &model.confidence_head {
        let e = markov
            .as_ref()
            .filter(|_| conf_head.proj.in_features() > hidden)
            .map(|m| m.prev_embedding.clone());
        let z: Tensor<B, 1> = conf_head.forward::<4, 3>(out, e).reshape([n]);
        // BCE with logits, stable form: max(z, 0) - z·y + log(1 + exp(-|z|)).
        let bce = z.clone().clamp_min(0.0) - z.clone() * accept.clone()
            + (z.clone().abs().neg().exp() + 1.0).log();
        let conf_num = (w * bce).sum();
        terms.confidence_num = host_f32(conf_num.clone())[0] as f64;
        terms.confidence_den = weight_sum;
        total = total + conf_num * (config.confidence_alpha / denom);
        confidence_host = Some(host_f32(z));
    }
    let metrics = block_metrics(
        layout,
        &host_f32(accept),
        confidence_host.as_deref(),
        &weights,
        &terms,
        config,
    );
    DSparkLoss {
        total,
        terms,
        metrics,
    }
}

fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-(x as f64)).exp())
}

/// The reference's training metrics for one micro-batch, as (numerator, denominator).
fn block_metrics(
    layout: &BlockLayout,
    accept: &[f32],
    confidence: Option<&[f32]>,
    weights: &[f32],
    terms: &LossTerms,
    config: &DSparkLossConfig,
) -> Metrics {
    let mut m = Metrics::new();
    let mut add = |name: String, num: f64, den: f64| {
        let e = m.entry(name).or_insert((0.0, 0.0));
        e.0 += num;
        e.1 += den;
    };
    add("ce_loss".into(), terms.ce_num, terms.ce_den);
    if config.l1_alpha > 0.0 {
        add("l1_loss".into(), terms.l1_num, terms.l1_den);
    }
    if confidence.is_some() {
        add(
            "confidence_loss".into(),
            terms.confidence_num,
            terms.confidence_den,
        );
    }
    let bs = layout.block_size;
    let mut slot = 0;
    for blocks in &layout.eval_mask {
        // Slot 0 of a kept block is always supervised (its anchor is a candidate).
        let kept = blocks.iter().filter(|b| b[0]).count();
        let supervised: usize = blocks
            .iter()
            .map(|b| b.iter().filter(|&&e| e).count())
            .sum();
        for block in blocks {
            let mut survive = 1.0;
            let mut conf_survive = 1.0;
            let mut tau = 1.0;
            for (j, &eval) in block.iter().enumerate() {
                let a = accept[slot + j] as f64;
                if eval {
                    add(format!("accept_rate@{j}"), a, 1.0);
                    survive *= a;
                    tau += survive;
                    if let Some(z) = confidence {
                        let c = sigmoid(z[slot + j]);
                        let w = weights[slot + j] as f64;
                        conf_survive *= c;
                        add("confidence_abs_error".into(), w * (c - a).abs(), w);
                        add("confidence_bias".into(), w * (c - a), w);
                        add(
                            "confidence_cumprod_bias".into(),
                            w * (conf_survive - survive),
                            w,
                        );
                    }
                }
            }
            if block[0] {
                add("tau_probabilistic".into(), tau, 1.0);
            }
            slot += bs;
        }
        add(
            "block_supervised_tokens_abs".into(),
            supervised as f64 / kept.max(1) as f64,
            1.0,
        );
        add(
            "block_supervised_tokens_ratio".into(),
            supervised as f64 / kept.max(1) as f64 / bs as f64,
            1.0,
        );
    }
    m
}
