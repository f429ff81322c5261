//! Acceptance metrics over decoding traces: τ (committed tokens per verification, bonus
//! included), position-wise conditional acceptance, calibration measures (reliability, ECE,
//! ROC-AUC) and the confidence-threshold sweep. Sequential Temperature Scaling is in
//! `calibration.rs`.

use crate::engine::DecodeTrace;

/// Totals over the rounds of one set.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AcceptanceStats {
    pub rounds: usize,
    /// Tokens committed by verification rounds (Σ acceptance lengths).
    pub tokens: usize,
    /// `proposed[k]`: rounds whose proposal reached slot k with slots 0..k-1 all accepted.
    pub reached: Vec<usize>,
    /// `accepted[k]`: of those, rounds that accepted slot k too.
    pub accepted: Vec<usize>,
}

impl AcceptanceStats {
    pub fn add(&mut self, trace: &DecodeTrace) {
        for round in &trace.rounds {
            self.rounds += 1;
            self.tokens += round.acceptance_length();
            let proposed = round.effective_proposal_length;
            if self.reached.len() < proposed {
                self.reached.resize(proposed, 0);
                self.accepted.resize(proposed, 0);
            }
            for k in 0..proposed.min(round.accepted + 1) {
                self.reached[k] += 1;
                if k < round.accepted {
                    self.accepted[k] += 1;
                }
            }
        }
    }

    /// τ: mean tokens committed per verification (≥ 1 unless a stop token ends a round).
    pub fn tau(&self) -> f64 {
        if self.rounds == 0 {
            0.0
        } else {
            self.tokens as f64 / self.rounds as f64
        }
    }

    /// Acceptance at slot k given slots 0..k-1 were accepted.
    pub fn conditional_acceptance(&self) -> Vec<f64> {
        self.reached
            .iter()
            .zip(&self.accepted)
            .map(|(&r, &a)| if r == 0 { 0.0 } else { a as f64 / r as f64 })
            .collect()
    }
}

pub use deepspec_core::sampling::sigmoid;

/// Reliability bins: (mean confidence, accuracy, count) over `bins` equal-width bins.
pub fn reliability(probs: &[(f64, bool)], bins: usize) -> Vec<(f64, f64, usize)> {
    let mut acc = vec![(0.0, 0.0, 0usize); bins];
    for &(p, y) in probs {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        acc[b].0 += p;
        acc[b].1 += y as u8 as f64;
        acc[b].2 += 1;
    }
    acc.into_iter()
        .map(|(p, y, n)| {
            if n == 0 {
                (0.0, 0.0, 0)
            } else {
                (p / n as f64, y / n as f64, n)
            }
        })
        .collect()
}

/// Bins of the expected calibration error: the 20 equal-width bins of the reference evaluator's
/// confidence-head metrics.
pub const ECE_BINS: usize = 20;

/// Expected calibration error over [`ECE_BINS`] equal-width bins: the count-weighted mean of
/// |mean prediction − observed rate| per bin.
pub fn ece(probs: &[(f64, bool)]) -> f64 {
    let total = probs.len().max(1) as f64;
    reliability(probs, ECE_BINS)
        .iter()
        .map(|&(p, y, n)| n as f64 / total * (p - y).abs())
        .sum()
}

/// Area under the ROC curve (probability a random positive outranks a random negative).
pub fn roc_auc(probs: &[(f64, bool)]) -> Option<f64> {
    let mut sorted: Vec<(f64, bool)> = probs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = sorted.iter().filter(|p| p.1).count() as f64;
    let negatives = sorted.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    // Rank-sum with average ranks for ties.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1].0 == sorted[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += sorted[i..=j].iter().filter(|p| p.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// One threshold of the static sweep.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SweepPoint {
    pub threshold: f64,
    /// Committed tokens per verification step.
    pub tokens_per_step: f64,
    /// Accepted drafts / proposed drafts.
    pub acceptance_rate: f64,
    /// Mean drafts proposed per step.
    pub proposal_length: f64,
}

/// Replays threshold-0 rounds under confidence thresholds: a round stops proposing at the
/// first slot whose own confidence is below the threshold, so it keeps `min(a, k_t)` of its
/// accepted drafts. Exact for greedy decoding, where dropping later drafts changes nothing
/// before them.
pub fn threshold_sweep(traces: &[&DecodeTrace], thresholds: &[f64]) -> Vec<SweepPoint> {
    thresholds
        .iter()
        .map(|&t| {
            let (mut steps, mut tokens, mut proposed, mut accepted) =
                (0usize, 0usize, 0usize, 0usize);
            for round in traces.iter().flat_map(|tr| &tr.rounds) {
                let k = round
                    .confidence_logits
                    .iter()
                    .position(|&z| sigmoid(z as f64) < t)
                    .unwrap_or(round.effective_proposal_length)
                    .min(round.effective_proposal_length);
                let a = round.accepted.min(k);
                steps += 1;
                tokens += a + 1;
                proposed += k;
                accepted += a;
            }
            SweepPoint {
                threshold: t,
                tokens_per_step: tokens as f64 / steps.max(1) as f64,
                acceptance_rate: if proposed == 0 {
                    0.0
                } else {
                    accepted as f64 / proposed as f64
                },
                proposal_length: proposed as f64 / steps.max(1) as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_ece_of_perfect_and_useless_predictors() {
        let perfect = [(0.9, true), (0.8, true), (0.2, false), (0.1, false)];
        assert_eq!(roc_auc(&perfect), Some(1.0));
        let useless = [(0.5, true), (0.5, false)];
        assert_eq!(roc_auc(&useless), Some(0.5));
        let calibrated = [(0.75, true), (0.75, true), (0.75, true), (0.75, false)];
        assert!(ece(&calibrated) < 1e-12);
    }

    /// 0.72 and 0.78 share a bin of ten but not of twenty: the reference's binning.
    #[test]
    fn ece_uses_twenty_bins() {
        let probs = [(0.72, false), (0.78, true)];
        assert!(
            (ece(&probs) - (0.72 + 0.22) / 2.0).abs() < 1e-12,
            "{}",
            ece(&probs)
        );
    }
}
