//! Calibration of the confidence head's **prefix survival** with Sequential Temperature
//! Scaling as the DSpark paper describes it (its calibration section and Figure 6; the
//! reference ships no STS code).
//!
//! Slot j's confidence `σ(z_j)` predicts acceptance of slot j given slots before it were
//! accepted, so the probability that the first j drafts all survive is the prefix survival
//! `a_j = Π_{i≤j} σ(z_i / τ_i)`: what the prefix scheduler ranks and what Figure 6 plots
//! against the observed prefix acceptance. STS picks `τ_1, τ_2, …` left to right, each by a
//! grid search minimising the ECE of `a_j` with the temperatures before it fixed. Rounds are
//! split in two: temperatures are fitted on one half and every figure is measured on the
//! other.

use crate::engine::DecodeTrace;
use crate::metrics::{ece, reliability, roc_auc, sigmoid, ECE_BINS};
use serde::Serialize;

/// Grid points per unit of temperature: τ ∈ {1/20, 2/20, …, 200/20} = {0.05, …, 10.00},
/// identity exactly on it.
const GRID_PER_UNIT: usize = 20;
const GRID_POINTS: usize = 200;
/// Spacing of the temperature grid.
pub const GRID_STEP: f64 = 1.0 / GRID_PER_UNIT as f64;

/// A position reached by fewer fit rounds keeps temperature 1: the ECE of so few points over
/// [`ECE_BINS`] bins is mostly sampling noise, and a temperature fitted to it would not carry
/// over to new prompts.
pub const MIN_FIT_ROUNDS: usize = 100;

/// Predictions are clamped to `[1e-8, 1 − 1e-8]`, as the reference's evaluation does.
const PREDICTION_CLAMP: f64 = 1e-8;

fn temperature_grid() -> impl Iterator<Item = f64> {
    (1..=GRID_POINTS).map(|k| k as f64 / GRID_PER_UNIT as f64)
}

/// One verification round as the confidence head saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfidenceRound {
    /// Confidence logits `z_j` of the slots the round proposed (slots past an accepted stop
    /// token dropped).
    pub logits: Vec<f64>,
    /// Drafts accepted: slots `0..accepted` survived, slot `accepted` (if proposed) did not.
    pub accepted: usize,
}

/// The rounds of a trace that carry confidences (none for a drafter without the head).
pub fn confidence_rounds(trace: &DecodeTrace) -> Vec<ConfidenceRound> {
    trace
        .rounds
        .iter()
        .filter_map(|round| {
            let proposed = round
                .confidence_logits
                .len()
                .min(round.effective_proposal_length);
            (proposed > 0).then(|| ConfidenceRound {
                logits: round.confidence_logits[..proposed]
                    .iter()
                    .map(|&z| z as f64)
                    .collect(),
                accepted: round.accepted,
            })
        })
        .collect()
}

/// `(a_j, survived)` at 0-based `position` for every round that proposed it:
/// `a_j = Π_{i≤j} σ(z_i / τ_i)` (temperature 1 past the end of `temperatures`) and
/// `survived` = drafts `0..=j` were all accepted.
pub fn prefix_survival(
    rounds: &[ConfidenceRound],
    temperatures: &[f64],
    position: usize,
) -> Vec<(f64, bool)> {
    rounds
        .iter()
        .filter(|r| r.logits.len() > position)
        .map(|r| {
            let survival: f64 = r.logits[..=position]
                .iter()
                .enumerate()
                .map(|(i, &z)| sigmoid(z / temperatures.get(i).copied().unwrap_or(1.0)))
                .product();
            (clamp(survival), r.accepted > position)
        })
        .collect()
}

fn clamp(p: f64) -> f64 {
    p.clamp(PREDICTION_CLAMP, 1.0 - PREDICTION_CLAMP)
}

/// Temperatures fitted by STS and how they did on the rounds they were fitted on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StsFit {
    /// `τ_j` for positions 1..=γ (index j−1); 1 where a note says why.
    pub temperatures: Vec<f64>,
    /// Positions left at temperature 1 and why, or why the whole fit was dropped.
    pub notes: Vec<String>,
    /// ECE of prefix survival per position on the fit rounds, identity temperatures.
    pub fit_ece_before: Vec<f64>,
    /// The same with the temperatures stored here.
    pub fit_ece_after: Vec<f64>,
}

/// Sequential Temperature Scaling over `positions` draft positions. Never returns
/// temperatures under which the fit rounds' count-weighted mean ECE of prefix survival is
/// higher than with identity temperatures.
pub fn fit_sts(rounds: &[ConfidenceRound], positions: usize) -> StsFit {
    let mut temperatures = vec![1.0; positions];
    let mut notes = Vec::new();
    // Π_{i<j} σ(z_i / τ_i) per round, with the temperatures chosen so far.
    let mut earlier = vec![1.0f64; rounds.len()];
    let mut scratch: Vec<(f64, bool)> = Vec::with_capacity(rounds.len());
    for (j, temperature) in temperatures.iter_mut().enumerate() {
        let reached: Vec<usize> = (0..rounds.len())
            .filter(|&r| rounds[r].logits.len() > j)
            .collect();
        if reached.len() < MIN_FIT_ROUNDS {
            notes.push(format!(
                "position {}: {} fit rounds, fewer than {MIN_FIT_ROUNDS}; temperature 1 (not fitted)",
                j + 1,
                reached.len()
            ));
            continue;
        }
        let mut ece_at = |tau: f64| {
            scratch.clear();
            scratch.extend(reached.iter().map(|&r| {
                let round = &rounds[r];
                (
                    clamp(earlier[r] * sigmoid(round.logits[j] / tau)),
                    round.accepted > j,
                )
            }));
            ece(&scratch)
        };
        // Identity is the incumbent: another temperature must do strictly better.
        let mut best = (1.0, ece_at(1.0));
        for tau in temperature_grid() {
            let e = ece_at(tau);
            if e < best.1 - 1e-12 {
                best = (tau, e);
            }
        }
        *temperature = best.0;
        for &r in &reached {
            earlier[r] *= sigmoid(rounds[r].logits[j] / best.0);
        }
    }
    let fit_ece_before = per_position_ece(rounds, &[], positions);
    let mut fit_ece_after = per_position_ece(rounds, &temperatures, positions);
    let counts: Vec<usize> = (0..positions)
        .map(|j| rounds.iter().filter(|r| r.logits.len() > j).count())
        .collect();
    let (mean_before, mean_after) = (
        weighted_mean(&fit_ece_before, &counts),
        weighted_mean(&fit_ece_after, &counts),
    );
    if mean_after > mean_before {
        notes.push(format!(
            "the fitted temperatures raised the fit rounds' mean ECE of prefix survival \
             ({mean_before:.4} -> {mean_after:.4}); all temperatures left at 1"
        ));
        temperatures = vec![1.0; positions];
        fit_ece_after = fit_ece_before.clone();
    }
    StsFit {
        temperatures,
        notes,
        fit_ece_before,
        fit_ece_after,
    }
}

fn per_position_ece(
    rounds: &[ConfidenceRound],
    temperatures: &[f64],
    positions: usize,
) -> Vec<f64> {
    (0..positions)
        .map(|j| ece(&prefix_survival(rounds, temperatures, j)))
        .collect()
}

/// Mean of `values` weighted by `counts`; 0 when every count is 0.
fn weighted_mean(values: &[f64], counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    values
        .iter()
        .zip(counts)
        .map(|(v, &n)| v * n as f64)
        .sum::<f64>()
        / total as f64
}

/// One non-empty reliability bin of prefix survival.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReliabilityBin {
    pub mean_prediction: f64,
    pub observed: f64,
    pub count: usize,
}

fn reliability_bins(probs: &[(f64, bool)]) -> Vec<ReliabilityBin> {
    reliability(probs, ECE_BINS)
        .into_iter()
        .filter(|&(_, _, count)| count > 0)
        .map(|(mean_prediction, observed, count)| ReliabilityBin {
            mean_prediction,
            observed,
            count,
        })
        .collect()
}

/// Prefix survival at one draft position on the measured rounds, before and after STS.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionCalibration {
    /// 1-based draft position j.
    pub position: usize,
    pub temperature: f64,
    /// Measured rounds that proposed position j.
    pub rounds: usize,
    /// Observed prefix acceptance: the fraction of those rounds that accepted drafts 1..=j.
    pub target_mean: f64,
    pub pred_mean_before: f64,
    pub pred_mean_after: f64,
    pub ece_before: f64,
    pub ece_after: f64,
    /// None when every round, or none, survived.
    pub roc_auc_before: Option<f64>,
    pub roc_auc_after: Option<f64>,
    pub reliability_before: Vec<ReliabilityBin>,
    pub reliability_after: Vec<ReliabilityBin>,
}

/// The whole calibration: the split, the fit and the per-position measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// Rounds with confidences; even-indexed ones fit the temperatures, odd-indexed ones
    /// measure.
    pub rounds: usize,
    pub fit_rounds: usize,
    pub measured_rounds: usize,
    pub ece_bins: usize,
    pub sts_temperatures: Vec<f64>,
    pub sts_notes: Vec<String>,
    pub fit_ece_mean: f64,
    pub fit_ece_mean_after: f64,
    /// Count-weighted over positions, on the measured rounds.
    pub ece_mean: f64,
    pub ece_mean_after: f64,
    /// Count-weighted over the positions where AUC is defined.
    pub roc_auc_mean: Option<f64>,
    pub roc_auc_mean_after: Option<f64>,
    pub positions: Vec<PositionCalibration>,
}

/// Splits `rounds` (even indices fit, odd indices measure), fits STS over `positions` draft
/// positions and measures prefix survival per position before and after.
pub fn calibrate(rounds: &[ConfidenceRound], positions: usize) -> Calibration {
    let fit: Vec<ConfidenceRound> = rounds.iter().step_by(2).cloned().collect();
    let measured: Vec<ConfidenceRound> = rounds.iter().skip(1).step_by(2).cloned().collect();
    let sts = fit_sts(&fit, positions);
    let per_position: Vec<PositionCalibration> = (0..positions)
        .map(|j| {
            let before = prefix_survival(&measured, &[], j);
            let after = prefix_survival(&measured, &sts.temperatures, j);
            let mean = |v: &[(f64, bool)], f: fn(&(f64, bool)) -> f64| {
                if v.is_empty() {
                    0.0
                } else {
                    v.iter().map(f).sum::<f64>() / v.len() as f64
                }
            };
            PositionCalibration {
                position: j + 1,
                temperature: sts.temperatures[j],
                rounds: before.len(),
                target_mean: mean(&before, |p| p.1 as u8 as f64),
                pred_mean_before: mean(&before, |p| p.0),
                pred_mean_after: mean(&after, |p| p.0),
                ece_before: ece(&before),
                ece_after: ece(&after),
                roc_auc_before: roc_auc(&before),
                roc_auc_after: roc_auc(&after),
                reliability_before: reliability_bins(&before),
                reliability_after: reliability_bins(&after),
            }
        })
        .collect();
    let counts: Vec<usize> = per_position.iter().map(|p| p.rounds).collect();
    let fit_counts: Vec<usize> = (0..positions)
        .map(|j| fit.iter().filter(|r| r.logits.len() > j).count())
        .collect();
    let column =
        |f: fn(&PositionCalibration) -> f64| -> Vec<f64> { per_position.iter().map(f).collect() };
    let auc_mean = |f: fn(&PositionCalibration) -> Option<f64>| {
        let defined: Vec<(f64, usize)> = per_position
            .iter()
            .filter_map(|p| f(p).map(|auc| (auc, p.rounds)))
            .collect();
        let (values, counts): (Vec<f64>, Vec<usize>) = defined.into_iter().unzip();
        (!values.is_empty()).then(|| weighted_mean(&values, &counts))
    };
    Calibration {
        rounds: rounds.len(),
        fit_rounds: fit.len(),
        measured_rounds: measured.len(),
        ece_bins: ECE_BINS,
        fit_ece_mean: weighted_mean(&sts.fit_ece_before, &fit_counts),
        fit_ece_mean_after: weighted_mean(&sts.fit_ece_after, &fit_counts),
        ece_mean: weighted_mean(&column(|p| p.ece_before), &counts),
        ece_mean_after: weighted_mean(&column(|p| p.ece_after), &counts),
        roc_auc_mean: auc_mean(|p| p.roc_auc_before),
        roc_auc_mean_after: auc_mean(|p| p.roc_auc_after),
        sts_temperatures: sts.temperatures,
        sts_notes: sts.notes,
        positions: per_position,
    }
}

impl Calibration {
    /// The per-position table (the paper's Figure 6 figures), measured rounds only.
    pub fn markdown(&self) -> String {
        let auc = |a: Option<f64>| a.map_or("n/a".to_string(), |a| format!("{a:.3}"));
        let mut out = String::from(
            "| position | rounds | observed | τ | ECE before | ECE after | AUC before | AUC after |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for p in &self.positions {
            out += &format!(
                "| {} | {} | {:.3} | {:.2} | {:.4} | {:.4} | {} | {} |\n",
                p.position,
                p.rounds,
                p.target_mean,
                p.temperature,
                p.ece_before,
                p.ece_after,
                auc(p.roc_auc_before),
                auc(p.roc_auc_after)
            );
        }
        out += &format!(
            "| **mean** | {} | | | **{:.4}** | **{:.4}** | {} | {} |\n",
            self.measured_rounds,
            self.ece_mean,
            self.ece_mean_after,
            auc(self.roc_auc_mean),
            auc(self.roc_auc_mean_after)
        );
        out
    }

    /// `calibration.json` as written beside the drafter by `eval --calibrate`.
    pub fn temperatures_file(&self) -> serde_json::Value {
        serde_json::json!({
            "method": "sequential_temperature_scaling",
            "predicts": "prefix_survival",
            "temperatures": self.sts_temperatures,
            "grid": {"from": GRID_STEP, "to": GRID_STEP * GRID_POINTS as f64, "step": GRID_STEP},
            "ece_bins": self.ece_bins,
            "fit_rounds": self.fit_rounds,
            "fit_ece_mean": self.fit_ece_mean,
            "fit_ece_mean_after": self.fit_ece_mean_after,
            "notes": self.sts_notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Round;
    use deepspec_core::sampling::Rng;

    /// Rounds whose slot j is accepted (given the earlier ones were) with probability
    /// `σ(z_j / true_temperatures[j])`; every round proposes every slot.
    fn synthetic(rounds: usize, true_temperatures: &[f64], seed: u64) -> Vec<ConfidenceRound> {
        let mut rng = Rng::new(seed);
        (0..rounds)
            .map(|_| {
                let logits: Vec<f64> = true_temperatures
                    .iter()
                    .map(|_| rng.uniform() * 10.0 - 2.0)
                    .collect();
                let accepted = logits
                    .iter()
                    .zip(true_temperatures)
                    .position(|(&z, &t)| rng.uniform() >= sigmoid(z / t))
                    .unwrap_or(logits.len());
                ConfidenceRound { logits, accepted }
            })
            .collect()
    }

    #[test]
    fn prefix_survival_is_the_product_and_the_accepted_prefix() {
        let round = Round {
            start: 0,
            verify_input_ids: vec![],
            accepted: 2,
            effective_proposal_length: 3,
            terminated_by_stop: false,
            next_token: 0,
            committed: vec![],
            // The fourth slot lies past an accepted stop token: dropped.
            confidence_logits: vec![1.0, 0.0, -1.0, 5.0],
            uniforms: vec![],
            p_target: vec![],
            q_draft: vec![],
        };
        let trace = DecodeTrace {
            output_ids: vec![],
            prompt_len: 0,
            rounds: vec![round],
        };
        let rounds = confidence_rounds(&trace);
        assert_eq!(rounds[0].logits, vec![1.0, 0.0, -1.0]);
        let s1 = sigmoid(1.0);
        let expected = [
            (s1, true),
            (s1 * 0.5, true),
            (s1 * 0.5 * sigmoid(-1.0), false),
        ];
        for (j, &(p, y)) in expected.iter().enumerate() {
            let got = prefix_survival(&rounds, &[], j);
            assert_eq!(got.len(), 1);
            assert!(
                (got[0].0 - p).abs() < 1e-12 && got[0].1 == y,
                "position {j}: {got:?}"
            );
        }
        assert!(prefix_survival(&rounds, &[], 3).is_empty());
        // Temperatures scale each factor of the product.
        let got = prefix_survival(&rounds, &[2.0, 1.0, 0.5], 2)[0].0;
        assert!((got - sigmoid(0.5) * 0.5 * sigmoid(-2.0)).abs() < 1e-12);
    }

    #[test]
    fn sts_recovers_known_temperatures_position_by_position() {
        let truth = [2.0, 0.5, 1.5];
        let rounds = synthetic(200_000, &truth, 7);
        let fit = fit_sts(&rounds, truth.len());
        assert!(fit.notes.is_empty(), "{:?}", fit.notes);
        for (j, (&got, &want)) in fit.temperatures.iter().zip(&truth).enumerate() {
            assert!(
                (got - want).abs() <= GRID_STEP + 1e-9,
                "position {}: fitted {got}, true {want} (all {:?})",
                j + 1,
                fit.temperatures
            );
        }
        for j in 0..truth.len() {
            assert!(
                fit.fit_ece_after[j] <= fit.fit_ece_before[j],
                "position {}: ECE {} -> {}",
                j + 1,
                fit.fit_ece_before[j],
                fit.fit_ece_after[j]
            );
        }
        assert!(
            fit.fit_ece_before[0] > 0.02,
            "the raw head is miscalibrated"
        );
    }

    #[test]
    fn calibration_improves_held_out_prefix_survival() {
        let truth = [2.0, 0.5, 1.5, 3.0];
        let calibration = calibrate(&synthetic(40_000, &truth, 11), truth.len());
        assert_eq!(
            (calibration.fit_rounds, calibration.measured_rounds),
            (20_000, 20_000)
        );
        assert_eq!(calibration.positions.len(), 4);
        // Of 20 000 perfectly calibrated points over 20 bins, sampling noise alone leaves an
        // ECE near 0.01.
        for p in &calibration.positions {
            assert!(
                p.ece_after < 0.02 && p.ece_after < p.ece_before / 2.0,
                "position {}: ECE {} -> {}",
                p.position,
                p.ece_before,
                p.ece_after
            );
        }
        // Position 1 is one monotone map of the logit: AUC cannot move.
        let first = &calibration.positions[0];
        assert_eq!(first.roc_auc_before, first.roc_auc_after);
        assert!(calibration.ece_mean_after < calibration.ece_mean);
        assert!(calibration.markdown().contains("| 1 | 20000 |"));
    }

    #[test]
    fn a_position_with_too_few_rounds_keeps_temperature_one_and_says_so() {
        // 150 rounds; only 60 of them propose a second slot.
        let mut rounds = synthetic(150, &[2.0, 2.0], 3);
        for r in rounds.iter_mut().skip(60) {
            r.logits.truncate(1);
            r.accepted = r.accepted.min(1);
        }
        let fit = fit_sts(&rounds, 2);
        assert_ne!(fit.temperatures[0], 1.0);
        assert_eq!(fit.temperatures[1], 1.0);
        assert_eq!(
            fit.notes,
            vec![format!(
                "position 2: 60 fit rounds, fewer than {MIN_FIT_ROUNDS}; temperature 1 (not fitted)"
            )]
        );
    }

    #[test]
    fn identity_is_kept_when_already_calibrated() {
        // σ(±ln 3) = 0.75 / 0.25 with exactly that share accepted: ECE 0 at temperature 1,
        // and any other temperature moves the predictions off the observed rates.
        let z = 3f64.ln();
        let rounds: Vec<ConfidenceRound> = (0..400)
            .map(|i| {
                let (logit, accepted) = if i % 2 == 0 {
                    (z, (i / 2) % 4 != 0)
                } else {
                    (-z, (i / 2) % 4 == 0)
                };
                ConfidenceRound {
                    logits: vec![logit],
                    accepted: accepted as usize,
                }
            })
            .collect();
        let fit = fit_sts(&rounds, 1);
        assert_eq!(fit.temperatures, vec![1.0]);
        assert!(fit.notes.is_empty(), "{:?}", fit.notes);
        assert!(fit.fit_ece_before[0] < 1e-12);
    }

    #[test]
    fn temperatures_that_worsen_the_fit_set_are_not_stored() {
        // Slot 1 claims 0.75 while 90 % survive: STS sharpens it to τ₁ = 0.5. Slots 2 and 3
        // are σ(200/τ) ≈ 1 for every τ on the grid and 75 % survive both, which identity gets
        // exactly right; with τ₁ = 0.5 no τ₂, τ₃ can bring 0.9 back to 0.75, so positions
        // 2 and 3 lose twice what position 1 gains.
        let rounds: Vec<ConfidenceRound> = (0..400)
            .map(|i| ConfidenceRound {
                logits: vec![3f64.ln(), 200.0, 200.0],
                accepted: match i % 20 {
                    0 | 1 => 0,
                    2..=4 => 1,
                    _ => 3,
                },
            })
            .collect();
        let fit = fit_sts(&rounds, 3);
        assert_eq!(fit.temperatures, vec![1.0, 1.0, 1.0]);
        assert_eq!(fit.fit_ece_after, fit.fit_ece_before);
        assert!(
            fit.notes.len() == 1 && fit.notes[0].contains("all temperatures left at 1"),
            "{:?}",
            fit.notes
        );
    }
}
