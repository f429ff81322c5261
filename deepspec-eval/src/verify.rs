//! Verification of a proposal (the reference's `eval.py`): greedy matching at temperature 0,
//! rejection sampling with the residual distribution otherwise, and the bonus token.

use deepspec_core::sampling::{argmax, is_greedy, softmax, Sampler};

/// A model's distribution over the vocabulary for one position at `temperature`.
pub fn probs(logits: &[f32], temperature: f32) -> Vec<f64> {
    if is_greedy(temperature) {
        let mut p = vec![0.0; logits.len()];
        p[argmax(logits)] = 1.0;
        p
    } else {
        softmax(logits, temperature)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Number of drafts accepted (`a`).
    pub accepted: usize,
    /// The correction or bonus token.
    pub next_token: u32,
    /// An accepted draft was a stop token: the round ends at it.
    pub terminated_by_stop: bool,
    /// Proposal length after stop-token truncation.
    pub effective_len: usize,
    /// The uniforms drawn for the acceptance test, one per draft.
    pub uniforms: Vec<f64>,
    /// Target and draft probability of each proposed token.
    pub p_target: Vec<f64>,
    pub q_draft: Vec<f64>,
}

/// Judges `drafts` (`d_1..d_k`) against the target's distributions `target[0..=k]` (row
/// `i-1` judges `d_i`; row `k` gives the bonus) and the drafter's `draft[0..k]`.
pub fn verify(
    drafts: &[u32],
    target: &[Vec<f64>],
    draft: &[Vec<f64>],
    stop_ids: &[u32],
    sampler: &mut dyn Sampler,
) -> Verdict {
    let k = drafts.len();
    assert_eq!(
        target.len(),
        k + 1,
        "one target row per draft plus the bonus row"
    );
    assert_eq!(draft.len(), k, "one draft row per draft");
    let mut uniforms = Vec::with_capacity(k);
    let mut p_target = Vec::with_capacity(k);
    let mut q_draft = Vec::with_capacity(k);
    let mut accepted = k;
    for (i, &d) in drafts.iter().enumerate() {
        let p = target[i][d as usize];
        let q = draft[i][d as usize];
        let u = sampler.uniform();
        uniforms.push(u);
        p_target.push(p);
        q_draft.push(q);
        if accepted == k && u >= (p / q.max(1e-8)).min(1.0) {
            accepted = i;
        }
    }
    let mut effective_len = k;
    let mut terminated_by_stop = false;
    if let Some(j) = drafts[..accepted].iter().position(|d| stop_ids.contains(d)) {
        accepted = j + 1;
        effective_len = j + 1;
        terminated_by_stop = true;
    }
    // As the reference, a stop-truncated round still samples at the shortened prefix.
    let next_token = if accepted < k {
        let residual: Vec<f64> = target[accepted]
            .iter()
            .zip(&draft[accepted])
            .map(|(p, q)| (p - q).max(0.0))
            .collect();
        if residual.iter().sum::<f64>() <= 1e-8 {
            sampler.sample(&target[accepted])
        } else {
            sampler.sample(&residual)
        }
    } else {
        sampler.sample(&target[accepted])
    };
    Verdict {
        accepted,
        next_token,
        terminated_by_stop,
        effective_len,
        uniforms,
        p_target,
        q_draft,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepspec_core::sampling::Rng;

    fn one_hot(i: usize, n: usize) -> Vec<f64> {
        let mut v = vec![0.0; n];
        v[i] = 1.0;
        v
    }

    #[test]
    fn greedy_accepts_matching_prefix_then_corrects() {
        let target = vec![one_hot(2, 4), one_hot(3, 4), one_hot(1, 4)];
        let draft = vec![one_hot(2, 4), one_hot(0, 4)];
        let v = verify(&[2, 0], &target, &draft, &[], &mut Rng::new(0));
        assert_eq!((v.accepted, v.next_token), (1, 3));
        let all = verify(
            &[2, 3],
            &target,
            &[one_hot(2, 4), one_hot(3, 4)],
            &[],
            &mut Rng::new(0),
        );
        assert_eq!(
            (all.accepted, all.next_token),
            (2, 1),
            "bonus token after a full accept"
        );
    }

    #[test]
    fn accepted_stop_token_ends_the_round() {
        let target = vec![one_hot(2, 4), one_hot(3, 4), one_hot(1, 4)];
        let draft = vec![one_hot(2, 4), one_hot(3, 4)];
        let v = verify(&[2, 3], &target, &draft, &[2], &mut Rng::new(0));
        assert!(v.terminated_by_stop);
        assert_eq!((v.accepted, v.effective_len), (1, 1));
    }

    /// Rejection sampling is lossless: the committed first token follows the target.
    #[test]
    fn first_committed_token_follows_the_target_distribution() {
        let target = vec![vec![0.5, 0.3, 0.2], vec![0.1, 0.1, 0.8]];
        let q = vec![0.2, 0.2, 0.6];
        let mut rng = Rng::new(11);
        let mut counts = [0usize; 3];
        let trials = 40000;
        for _ in 0..trials {
            let d = rng.sample(&q);
            let v = verify(&[d], &target, std::slice::from_ref(&q), &[], &mut rng);
            let first = if v.accepted == 1 { d } else { v.next_token };
            counts[first as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let f = c as f64 / trials as f64;
            assert!(
                (f - target[0][i]).abs() < 0.01,
                "token {i}: {f} vs {}",
                target[0][i]
            );
        }
    }
}
