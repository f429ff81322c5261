//! Anchor sampling for DSpark/DFlash training (as the reference's `train.py` samples them). The random choice is
//! behind [`AnchorSource`] so a test can fix the anchors.

use deepspec_core::sampling::Rng;

/// Positions `p` with `loss_mask[p] = loss_mask[p+1] = 1`, `p <= L-2`, ascending.
pub fn anchor_candidates(loss_mask: &[u8]) -> Vec<usize> {
    (0..loss_mask.len().saturating_sub(1))
        .filter(|&p| loss_mask[p] == 1 && loss_mask[p + 1] == 1)
        .collect()
}

/// Chooses which candidates become anchors.
pub trait AnchorSource {
    /// Returns `min(candidates.len(), num_anchors)` distinct candidates for batch row `row`.
    fn choose(&mut self, row: usize, candidates: &[usize], num_anchors: usize) -> Vec<usize>;
}

/// A uniformly random subset (random keys, keep the smallest), as the reference samples.
pub struct RandomAnchors<'a> {
    pub rng: &'a mut Rng,
}

impl AnchorSource for RandomAnchors<'_> {
    fn choose(&mut self, _row: usize, candidates: &[usize], num_anchors: usize) -> Vec<usize> {
        if candidates.len() <= num_anchors {
            return candidates.to_vec();
        }
        let mut keyed: Vec<(f64, usize)> = candidates
            .iter()
            .map(|&c| (self.rng.uniform(), c))
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        keyed
            .into_iter()
            .take(num_anchors)
            .map(|(_, c)| c)
            .collect()
    }
}

/// The anchors of each sample drawn from a generator of its own, seeded by the run's seed
/// and the sample's global position in the run's data stream: a sample at a given step gets
/// the same anchors whichever rank, micro-batch or row it lands in (same maths at any world
/// size).
pub struct PositionAnchors<'a> {
    pub seed: u64,
    /// Global position of each batch row.
    pub positions: &'a [u64],
}

impl AnchorSource for PositionAnchors<'_> {
    fn choose(&mut self, row: usize, candidates: &[usize], num_anchors: usize) -> Vec<usize> {
        let mut rng = Rng::for_item(self.seed, self.positions[row]);
        RandomAnchors { rng: &mut rng }.choose(row, candidates, num_anchors)
    }
}

/// Anchors given up front (tests, replays). Each must be a candidate.
pub struct FixedAnchors(pub Vec<Vec<usize>>);

impl AnchorSource for FixedAnchors {
    fn choose(&mut self, row: usize, candidates: &[usize], num_anchors: usize) -> Vec<usize> {
        let chosen = self.0[row].clone();
        for a in &chosen {
            assert!(
                candidates.contains(a),
                "fixed anchor {a} of row {row} is not a valid candidate"
            );
        }
        assert_eq!(
            chosen.len(),
            candidates.len().min(num_anchors),
            "row {row}: wrong number of fixed anchors"
        );
        chosen
    }
}

/// `num_anchors` anchors per row, sorted, padded with dummies (position 0, keep = false).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchors {
    pub positions: Vec<Vec<usize>>,
    pub keep: Vec<Vec<bool>>,
    /// Number of candidates per row (for the `valid_anchors_*` metrics).
    pub candidates: Vec<usize>,
}

pub fn sample_anchors(
    loss_mask: &[Vec<u8>],
    num_anchors: usize,
    source: &mut dyn AnchorSource,
) -> Anchors {
    let mut anchors = Anchors {
        positions: Vec::new(),
        keep: Vec::new(),
        candidates: Vec::new(),
    };
    for (row, mask) in loss_mask.iter().enumerate() {
        let candidates = anchor_candidates(mask);
        let mut chosen = source.choose(row, &candidates, num_anchors);
        chosen.sort_unstable();
        let kept = chosen.len();
        chosen.resize(num_anchors, 0);
        anchors
            .keep
            .push((0..num_anchors).map(|m| m < kept).collect());
        anchors.positions.push(chosen);
        anchors.candidates.push(candidates.len());
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_need_two_supervised_tokens() {
        assert_eq!(anchor_candidates(&[0, 1, 1, 1, 0, 1, 1]), vec![1, 2, 5]);
        assert!(anchor_candidates(&[1]).is_empty());
    }

    #[test]
    fn random_anchors_are_sorted_distinct_candidates() {
        let mask = vec![vec![1u8; 50], vec![0, 1, 1, 0]];
        let mut rng = Rng::new(5);
        let mut source = RandomAnchors { rng: &mut rng };
        let anchors = sample_anchors(&mask, 8, &mut source);
        let row = &anchors.positions[0];
        assert!(row.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(anchors.keep[0], vec![true; 8]);
        assert_eq!(anchors.positions[1][0], 1);
        assert_eq!(anchors.keep[1].iter().filter(|&&k| k).count(), 1);
    }
}
