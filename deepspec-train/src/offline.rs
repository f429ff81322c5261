//! Offline acceptance: a drafter scored against a cache's target hidden states through the
//! frozen target head, with no target in the loop (`deepspec eval --offline`).
//!
//! Every sampled anchor is one would-be verification round, laid out as training lays out its
//! blocks (DSpark, DFlash, DeepSeek-V4's DSpark: `num_anchors` seeded anchors per sample,
//! `block_size` slots after each; Eagle3: every supervised position, `block_size` unrolled
//! steps). The drafter runs teacher-forced on the cache's tokens, exactly its training
//! forward. For each round:
//! - **T = 0**: the accepted prefix is the run of leading slots whose draft argmax is the
//!   target's argmax;
//! - **T = 1**: the expected accepted length under rejection sampling is
//!   `Σ_k Π_{j≤k} Σ_v min(p_target, p_draft)` at each slot.
//!
//! τ adds the bonus token, as the online τ does. The continuation is the cache's, not the
//! target's own (see docs/engine-caches.md).

use crate::anchors::{sample_anchors, RandomAnchors};
use crate::batch::TrainBatch;
use crate::blocks::{build_blocks, BlockLayout};
use crate::data::{collate, SampleSource};
use crate::loss::dspark::{dspark_loss, DSparkLossConfig, SlotValues};
use crate::loss::eagle3::{eagle3_loss, position_masks};
use crate::loss::head::HeadLossBackend;
use burn::tensor::backend::AutodiffBackend;
use deepspec_core::drafter::{BlockDrafter, Drafter, DrafterConfig};
use deepspec_core::model::to_host;
use deepspec_core::sampling::Rng;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct OfflineOptions {
    /// Seeds the anchor choice (the same seed, samples and batch size give the same anchors).
    pub seed: u64,
    /// At most this many cache samples, the first in cache order.
    pub limit: Option<usize>,
    /// Samples per forward.
    pub batch_size: usize,
    /// Samples are cut to this many tokens, as training cuts them.
    pub max_length: usize,
    /// Tokens per LM-head chunk (`None`: sized for the vocabulary).
    pub head_chunk_tokens: Option<usize>,
}

/// One anchor: a would-be verification round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OfflineRound {
    /// Index of the sample in the cache.
    pub sample: usize,
    /// Position of the last token the round starts from (the anchor).
    pub position: usize,
    /// The draft's argmax at each supervised slot.
    pub proposed: Vec<u32>,
    /// The cache's tokens at those slots (the teacher-forced continuation).
    pub continuation: Vec<u32>,
    /// `Σ_v min(p_target, p_draft)` at each slot.
    pub accept_probability: Vec<f64>,
    /// Leading slots whose argmax is the target's (T = 0).
    pub accepted_greedy: usize,
    /// `Σ_k Π_{j≤k} accept_probability[j]` (T = 1).
    pub accepted_expected: f64,
    /// σ of the confidence head at each slot (empty without one).
    pub confidences: Vec<f64>,
}

/// A round's accepted prefix at T = 0 and expected accepted length at T = 1, from its
/// supervised slots.
pub fn round_outcome(accept: &[f64], agree: &[bool]) -> (usize, f64) {
    let greedy = agree.iter().take_while(|&&a| a).count();
    let mut survive = 1.0;
    let mut expected = 0.0;
    for &a in accept {
        survive *= a;
        expected += survive;
    }
    (greedy, expected)
}

/// Per-position acceptance over rounds: `reached[k]` rounds had slot `k` supervised and every
/// earlier slot accepted (for T = 1: the probability that they were), `accepted[k]` accepted
/// slot `k` too.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PositionTable {
    pub reached: Vec<f64>,
    pub accepted: Vec<f64>,
}

impl PositionTable {
    fn add(&mut self, survive: impl Iterator<Item = (f64, f64)>) {
        for (k, (before, after)) in survive.enumerate() {
            if self.reached.len() <= k {
                self.reached.push(0.0);
                self.accepted.push(0.0);
            }
            self.reached[k] += before;
            self.accepted[k] += after;
        }
    }

    /// Acceptance at slot k given slots 0..k-1 were accepted.
    pub fn conditional(&self) -> Vec<f64> {
        self.reached
            .iter()
            .zip(&self.accepted)
            .map(|(&r, &a)| if r > 0.0 { a / r } else { 0.0 })
            .collect()
    }
}

/// What an offline run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OfflineStats {
    pub samples: usize,
    pub rounds: usize,
    /// Σ over rounds of (accepted prefix + bonus) at T = 0.
    pub tokens_greedy: f64,
    /// Σ over rounds of (expected accepted length + bonus) at T = 1.
    pub tokens_expected: f64,
    pub greedy: PositionTable,
    pub expected: PositionTable,
}

impl OfflineStats {
    pub fn add(&mut self, round: &OfflineRound) {
        self.rounds += 1;
        self.tokens_greedy += round.accepted_greedy as f64 + 1.0;
        self.tokens_expected += round.accepted_expected + 1.0;
        let greedy = (0..round.accept_probability.len()).map(|k| {
            (
                (k <= round.accepted_greedy) as u8 as f64,
                (k < round.accepted_greedy) as u8 as f64,
            )
        });
        self.greedy.add(greedy);
        let mut survive = 1.0;
        let expected = round.accept_probability.iter().map(|&a| {
            let before = survive;
            survive *= a;
            (before, survive)
        });
        self.expected.add(expected);
    }

    /// τ at T = 0.
    pub fn tau_greedy(&self) -> f64 {
        self.tokens_greedy / self.rounds.max(1) as f64
    }

    /// τ at T = 1.
    pub fn tau_expected(&self) -> f64 {
        self.tokens_expected / self.rounds.max(1) as f64
    }
}

/// The slot values on the host.
struct HostSlots {
    accept: Vec<f32>,
    agree: Vec<f32>,
    draft_ids: Vec<f32>,
    confidence: Option<Vec<f32>>,
}

fn to_host_slots<B: burn::tensor::backend::Backend>(slots: SlotValues<B>) -> HostSlots {
    HostSlots {
        accept: to_host(slots.accept).data,
        agree: to_host(slots.agree).data,
        draft_ids: to_host(slots.draft_ids).data,
        confidence: slots.confidence.map(|c| to_host(c).data),
    }
}

/// A block drafter's rounds in one batch: one per kept block.
fn block_rounds<B: AutodiffBackend + HeadLossBackend, M: BlockDrafter<B>>(
    model: &M,
    config: &DrafterConfig,
    batch: &mut TrainBatch,
    first_sample: usize,
    rng: &mut Rng,
    opts: &OfflineOptions,
) -> Vec<OfflineRound> {
    let device = model.device();
    let features = batch.upload::<B>(&device);
    let anchors = sample_anchors(
        &batch.loss_mask,
        config.num_anchors,
        &mut RandomAnchors { rng },
    );
    let layout: BlockLayout = build_blocks(
        &batch.input_ids,
        &batch.loss_mask,
        &anchors,
        config.block_size,
        config
            .mask_token_id
            .expect("block drafter config has mask_token_id"),
    );
    // Only the metrics' slot values are read; the loss weights do not change them.
    let loss_config = DSparkLossConfig {
        ce_alpha: 1.0,
        l1_alpha: 0.0,
        confidence_alpha: 0.0,
        decay_gamma: None,
    };
    let loss = dspark_loss(
        model,
        &config.base.rope(),
        batch,
        &features,
        &layout,
        &loss_config,
        opts.head_chunk_tokens,
    );
    let slots = to_host_slots(loss.slots);
    let bs = layout.block_size;
    let mut rounds = Vec::new();
    for (row, blocks) in layout.eval_mask.iter().enumerate() {
        for (m, eval) in blocks.iter().enumerate() {
            let anchor = layout.anchors[row][m];
            let supervised = eval.iter().take_while(|&&e| e).count();
            if anchor < 0 || supervised == 0 {
                continue;
            }
            let at = (row * layout.num_blocks + m) * bs;
            let range = at..at + supervised;
            rounds.push(round_from(
                first_sample + row,
                anchor as usize,
                &slots,
                range,
                layout.target_ids[row][m][..supervised]
                    .iter()
                    .map(|&t| t as u32)
                    .collect(),
            ));
        }
    }
    rounds
}

fn round_from(
    sample: usize,
    position: usize,
    slots: &HostSlots,
    range: std::ops::Range<usize>,
    continuation: Vec<u32>,
) -> OfflineRound {
    let accept: Vec<f64> = slots.accept[range.clone()]
        .iter()
        .map(|&a| a as f64)
        .collect();
    let agree: Vec<bool> = slots.agree[range.clone()]
        .iter()
        .map(|&a| a > 0.5)
        .collect();
    let (accepted_greedy, accepted_expected) = round_outcome(&accept, &agree);
    OfflineRound {
        sample,
        position,
        proposed: slots.draft_ids[range.clone()]
            .iter()
            .map(|&t| t as u32)
            .collect(),
        continuation,
        accept_probability: accept,
        accepted_greedy,
        accepted_expected,
        confidences: slots
            .confidence
            .as_ref()
            .map(|c| c[range].iter().map(|&v| v as f64).collect())
            .unwrap_or_default(),
    }
}

/// Eagle3's rounds in one batch: one per position supervised at step 0, its slots the
/// unrolled steps while they stay supervised.
fn eagle3_rounds<B: AutodiffBackend + HeadLossBackend>(
    model: &impl deepspec_core::drafter::Eagle3Drafter<B>,
    config: &DrafterConfig,
    batch: &mut TrainBatch,
    first_sample: usize,
    opts: &OfflineOptions,
) -> Vec<OfflineRound> {
    let device = model.device();
    let features = batch.upload::<B>(&device);
    let steps = config.block_size;
    let loss = eagle3_loss(
        model,
        &config.base.rope(),
        batch,
        &features,
        steps,
        config.step_loss_decay,
        opts.head_chunk_tokens,
    );
    let slots = to_host_slots(loss.slots);
    let masks = position_masks(batch, steps);
    let (b, len) = (batch.batch(), batch.seq_len());
    let n = b * len;
    let mut rounds = Vec::new();
    for row in 0..b {
        for t in 0..len {
            let supervised = (0..steps).take_while(|&k| masks[k][row][t]).count();
            if supervised == 0 {
                continue;
            }
            let pick = |values: &[f32]| -> Vec<f32> {
                (0..supervised)
                    .map(|k| values[k * n + row * len + t])
                    .collect()
            };
            let gathered = HostSlots {
                accept: pick(&slots.accept),
                agree: pick(&slots.agree),
                draft_ids: pick(&slots.draft_ids),
                confidence: None,
            };
            // Step k at position t drafts token t + k + 2 after the verified token t + 1.
            let continuation = (0..supervised)
                .map(|k| batch.input_ids[row][(t + k + 2).min(len - 1)] as u32)
                .collect();
            rounds.push(round_from(
                first_sample + row,
                t + 1,
                &gathered,
                0..supervised,
                continuation,
            ));
        }
    }
    rounds
}

/// Scores `drafter` on the first samples of `data`, calling `on_round` for every round (in
/// sample order) and `on_batch` with the samples done so far.
pub fn offline_eval<B: AutodiffBackend + HeadLossBackend>(
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    data: &dyn SampleSource,
    opts: &OfflineOptions,
    mut on_round: impl FnMut(&OfflineRound),
    mut on_batch: impl FnMut(usize),
) -> anyhow::Result<OfflineStats> {
    let total = opts.limit.unwrap_or(usize::MAX).min(data.len());
    let mut stats = OfflineStats {
        samples: total,
        ..OfflineStats::default()
    };
    let mut rng = Rng::new(opts.seed);
    let batch_size = opts.batch_size.max(1);
    for start in (0..total).step_by(batch_size) {
        let end = (start + batch_size).min(total);
        let samples = (start..end)
            .map(|i| data.sample(i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut batch = collate(&samples, data.widths(), opts.max_length);
        let rounds = match drafter {
            Drafter::DSpark(m) => block_rounds(m, config, &mut batch, start, &mut rng, opts),
            Drafter::DSparkV4(m) => block_rounds(m, config, &mut batch, start, &mut rng, opts),
            Drafter::DSparkGemma4(m) => block_rounds(m, config, &mut batch, start, &mut rng, opts),
            Drafter::Eagle3(m) => eagle3_rounds(m, config, &mut batch, start, opts),
            Drafter::Eagle3Gemma4(m) => eagle3_rounds(m, config, &mut batch, start, opts),
        };
        for round in &rounds {
            stats.add(round);
            on_round(round);
        }
        on_batch(end);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(accept: &[f64], agree: &[bool]) -> OfflineRound {
        let (g, e) = round_outcome(accept, agree);
        OfflineRound {
            sample: 0,
            position: 0,
            proposed: vec![0; accept.len()],
            continuation: vec![0; accept.len()],
            accept_probability: accept.to_vec(),
            accepted_greedy: g,
            accepted_expected: e,
            confidences: Vec::new(),
        }
    }

    /// Two rounds worked by hand. Round A: acceptance 0.5, 0.5, 1.0 with argmax agreement
    /// yes, no, yes; round B: 0.8, 0.25 with yes, yes.
    /// - T = 0: A accepts 1 (the second slot disagrees), B accepts 2; τ = ((1+1) + (2+1)) / 2
    ///   = 2.5. Slot 0 is reached by both and accepted by both (1.0); slot 1 reached by both,
    ///   accepted by B only (0.5); slot 2 reached by neither (A stopped at slot 1; B has no
    ///   slot 2).
    /// - T = 1: A expects 0.5 + 0.25 + 0.25 = 1.0, B 0.8 + 0.2 = 1.0; τ = (2 + 2) / 2 = 2.0.
    ///   Slot 0: reached 2, accepted 1.3 → 0.65; slot 1: reached 0.5 + 0.8 = 1.3, accepted
    ///   0.25 + 0.2 = 0.45 → 0.45/1.3; slot 2: reached 0.25, accepted 0.25 → 1.0.
    #[test]
    fn offline_tau_matches_a_hand_computed_case() {
        let mut stats = OfflineStats::default();
        stats.add(&round(&[0.5, 0.5, 1.0], &[true, false, true]));
        stats.add(&round(&[0.8, 0.25], &[true, true]));
        assert_eq!(stats.rounds, 2);
        assert!((stats.tau_greedy() - 2.5).abs() < 1e-12);
        assert!((stats.tau_expected() - 2.0).abs() < 1e-12);
        assert_eq!(stats.greedy.reached, vec![2.0, 2.0, 0.0]);
        assert_eq!(stats.greedy.conditional(), vec![1.0, 0.5, 0.0]);
        let c = stats.expected.conditional();
        assert!((c[0] - 0.65).abs() < 1e-12, "{c:?}");
        assert!((c[1] - 0.45 / 1.3).abs() < 1e-12, "{c:?}");
        assert!((c[2] - 1.0).abs() < 1e-12, "{c:?}");
    }
}
