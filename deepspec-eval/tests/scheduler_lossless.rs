//! The verification policies are lossless: with rejection sampling, the tokens a request
//! commits follow the target's distribution whatever the policy verifies. Checked on a tiny
//! synthetic world (4 tokens, Markov target and drafter, confidences that depend on the token
//! drafted before, as DSpark's Markov feature makes them) by a chi-square test over seeded
//! runs; the same test must fail for a broken sampler and for Algorithm 1 without its early
//! stop. The paper's Appendix A counter-example is reproduced exactly.

use deepspec_core::sampling::{Rng, Sampler};
use deepspec_eval::schedule::{
    prefix_schedule, AsyncScheduler, Candidate, CostModel, CostPoint, Fixed, PassShape,
    PrefixScheduler, SpsTable, Threshold, VerifyPolicy, SPS_FORMAT,
};
use deepspec_eval::verify::verify;

const V: usize = 4;
/// The state before the first token.
const START: usize = V;
const GAMMA: usize = 3;

/// Target `P[prev][next]`, drafter `Q[prev][next]` (row `START`: the first token), and the
/// confidence of the slot after `prev`.
struct World {
    p: [[f64; V]; V + 1],
    q: [[f64; V]; V + 1],
    confidence: [f64; V + 1],
}

const WORLD: World = World {
    p: [
        [0.5, 0.2, 0.2, 0.1],
        [0.1, 0.6, 0.2, 0.1],
        [0.3, 0.3, 0.3, 0.1],
        [0.25, 0.25, 0.1, 0.4],
        [0.4, 0.3, 0.2, 0.1],
    ],
    q: [
        [0.7, 0.1, 0.1, 0.1],
        [0.2, 0.4, 0.3, 0.1],
        [0.1, 0.5, 0.3, 0.1],
        [0.25, 0.25, 0.25, 0.25],
        [0.25, 0.25, 0.25, 0.25],
    ],
    confidence: [0.9, 0.6, 0.3, 0.05, 0.8],
};

fn table(seconds: &[(usize, f64)]) -> SpsTable {
    SpsTable {
        format: SPS_FORMAT.into(),
        backend: "synthetic".into(),
        target: "synthetic".into(),
        context_len: 0,
        repeats: 1,
        verify: seconds
            .iter()
            .map(|&(n, s)| CostPoint { n, seconds: s })
            .collect(),
        draft: Vec::new(),
    }
}

/// A pass that costs more with every token, so what is admitted depends on confidences.
fn rising() -> CostModel {
    CostModel {
        table: table(&[(1, 1.0), (2, 1.05), (4, 1.2), (8, 1.6), (16, 2.6)]),
        shape: PassShape::Packed,
    }
}

/// The paper's Appendix A profile: SPS(1) = 1, SPS(2) = 0.5, SPS(3) = 0.45.
fn appendix_a() -> CostModel {
    CostModel {
        table: table(&[(1, 1.0), (2, 2.0), (3, 1.0 / 0.45)]),
        shape: PassShape::Packed,
    }
}

/// Rejection sampling as it must be (`verify`), or with the classic bug: a rejected draft
/// resampled from the target instead of the residual `(p - q)+`.
#[derive(Clone, Copy, PartialEq)]
enum Verifier {
    Correct,
    ResampleFromTarget,
}

/// Verifies `drafts` against target rows; returns the committed tokens.
fn judge(
    verifier: Verifier,
    drafts: &[u32],
    target: &[Vec<f64>],
    draft: &[Vec<f64>],
    rng: &mut Rng,
) -> Vec<u32> {
    match verifier {
        Verifier::Correct => {
            let v = verify(drafts, target, draft, &[], rng);
            let mut out = drafts[..v.accepted].to_vec();
            out.push(v.next_token);
            out
        }
        Verifier::ResampleFromTarget => {
            let mut out = Vec::new();
            for (i, &d) in drafts.iter().enumerate() {
                let (p, q) = (target[i][d as usize], draft[i][d as usize]);
                if rng.uniform() < (p / q).min(1.0) {
                    out.push(d);
                } else {
                    out.push(rng.sample(&target[i]));
                    return out;
                }
            }
            out.push(rng.sample(&target[drafts.len()]));
            out
        }
    }
}

/// One request: committed tokens so far, admitted after `delay` rounds.
struct Req {
    tokens: Vec<u32>,
    delay: usize,
    want: usize,
}

impl Req {
    fn prev(&self) -> usize {
        self.tokens.last().map_or(START, |&t| t as usize)
    }
}

/// Runs requests through rounds of drafting, `policy` and verification until every request
/// has `want` tokens; returns each request's tokens.
fn simulate(
    policy: &mut dyn VerifyPolicy,
    verifier: Verifier,
    plan: &[(usize, usize)],
    rng: &mut Rng,
) -> Vec<Vec<u32>> {
    let mut reqs: Vec<Req> = plan
        .iter()
        .map(|&(delay, want)| Req {
            tokens: Vec::new(),
            delay,
            want,
        })
        .collect();
    let mut round = 0;
    while reqs.iter().any(|r| r.tokens.len() < r.want) {
        let active: Vec<usize> = (0..reqs.len())
            .filter(|&i| reqs[i].delay <= round && reqs[i].tokens.len() < reqs[i].want)
            .collect();
        round += 1;
        if active.is_empty() {
            continue;
        }
        let mut drafts = Vec::new();
        let mut candidates = Vec::new();
        for &i in &active {
            let mut prev = reqs[i].prev();
            let (mut tokens, mut rows, mut conf) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..GAMMA {
                conf.push(WORLD.confidence[prev]);
                let row = WORLD.q[prev].to_vec();
                let t = rng.sample(&row);
                tokens.push(t);
                rows.push(row);
                prev = t as usize;
            }
            candidates.push(Candidate {
                request: i,
                drafted: GAMMA,
                confidences: conf,
            });
            drafts.push((tokens, rows));
        }
        let lengths = policy.choose(&candidates);
        for ((&i, (tokens, rows)), &l) in active.iter().zip(drafts).zip(&lengths) {
            let mut prev = reqs[i].prev();
            let mut target = vec![WORLD.p[prev].to_vec()];
            for &t in &tokens[..l] {
                prev = t as usize;
                target.push(WORLD.p[prev].to_vec());
            }
            let committed = judge(verifier, &tokens[..l], &target, &rows[..l], rng);
            reqs[i].tokens.extend(committed);
        }
    }
    reqs.into_iter().map(|r| r.tokens).collect()
}

/// `P(x_{k+1}, x_{k+2})` of the target chain after `k` tokens, as `V*V` cells.
fn target_pair(k: usize) -> Vec<f64> {
    let mut marginal = WORLD.p[START].to_vec();
    let mut prev_row: Vec<f64> = vec![0.0; V];
    // marginal of x_1 is P[START]; step to x_{k+1}.
    for _ in 0..k {
        prev_row.iter_mut().for_each(|x| *x = 0.0);
        for (a, &pa) in marginal.iter().enumerate() {
            for (b, cell) in prev_row.iter_mut().enumerate() {
                *cell += pa * WORLD.p[a][b];
            }
        }
        marginal.clone_from(&prev_row);
    }
    let mut cells = vec![0.0; V * V];
    for a in 0..V {
        for b in 0..V {
            cells[a * V + b] = marginal[a] * WORLD.p[a][b];
        }
    }
    cells
}

/// ln Γ(x) (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, &g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The upper regularised incomplete gamma `Q(s, x)`: the chi-square survival function at
/// `Q(df/2, x/2)`.
fn upper_gamma(s: f64, x: f64) -> f64 {
    if x < s + 1.0 {
        // Series for the lower function.
        let (mut sum, mut term, mut n) = (1.0 / s, 1.0 / s, s);
        for _ in 0..1000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * (-x + s * x.ln() - ln_gamma(s)).exp()
    } else {
        // Continued fraction (modified Lentz).
        let tiny = 1e-300;
        let mut b = x + 1.0 - s;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - s);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (-x + s * x.ln() - ln_gamma(s)).exp() * h
    }
}

/// Pearson's chi-square p-value of `counts` against `probs`.
fn chi_square_p(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    let stat: f64 = counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum();
    upper_gamma((counts.len() - 1) as f64 / 2.0, stat / 2.0)
}

const RUNS: usize = 20_000;

/// Two requests, the second admitted two rounds after the first.
const STAGGERED: &[(usize, usize)] = &[(0, 6), (2, 2)];
/// One request alone (the setting of the paper's Appendix A).
const ALONE: &[(usize, usize)] = &[(0, 6)];

/// Chi-square p-values over `RUNS` seeded runs of `plan`: the first request's first two
/// tokens and its tokens 5 and 6, then every later request's first two.
fn p_values(
    make: &dyn Fn() -> Box<dyn VerifyPolicy>,
    verifier: Verifier,
    plan: &[(usize, usize)],
) -> Vec<f64> {
    let mut counts = vec![vec![0; V * V]; plan.len() + 1];
    for seed in 0..RUNS {
        let mut rng = Rng::for_item(2026, seed as u64);
        let mut policy = make();
        let out = simulate(policy.as_mut(), verifier, plan, &mut rng);
        let cell = |t: &[u32], k: usize| t[k] as usize * V + t[k + 1] as usize;
        counts[0][cell(&out[0], 0)] += 1;
        counts[1][cell(&out[0], 4)] += 1;
        for (r, tokens) in out.iter().enumerate().skip(1) {
            counts[r + 1][cell(tokens, 0)] += 1;
        }
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| chi_square_p(c, &target_pair(if i == 1 { 4 } else { 0 })))
        .collect()
}

#[test]
fn chi_square_helper_matches_known_quantiles() {
    // chi2(15) at its 0.99 / 0.5 / 0.01 quantiles.
    for (x, p) in [(5.229, 0.99), (14.339, 0.5), (30.578, 0.01)] {
        let got = upper_gamma(7.5, x / 2.0);
        assert!((got - p).abs() < 1e-3, "Q(7.5, {x}/2) = {got}, want {p}");
    }
}

#[test]
fn algorithm_1_with_early_stop_is_lossless() {
    let make = || -> Box<dyn VerifyPolicy> {
        Box::new(PrefixScheduler {
            cost: rising(),
            early_stop: true,
            gate: Default::default(),
        })
    };
    // The policy admits a confidence-dependent mix of lengths, or the test shows nothing.
    let mut rng = Rng::new(7);
    let mut lengths = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let cands: Vec<Candidate> = (0..2)
            .map(|r| {
                let mut prev = START;
                let conf = (0..GAMMA)
                    .map(|_| {
                        let c = WORLD.confidence[prev];
                        prev = rng.sample(&WORLD.q[prev]) as usize;
                        c
                    })
                    .collect();
                Candidate {
                    request: r,
                    drafted: GAMMA,
                    confidences: conf,
                }
            })
            .collect();
        lengths.extend(prefix_schedule(&cands, &rising(), true));
    }
    assert!(lengths.len() >= 3, "lengths admitted: {lengths:?}");
    for p in p_values(&make, Verifier::Correct, STAGGERED) {
        assert!(p > 0.01, "alg1: chi-square p = {p}");
    }
}

#[test]
fn production_variant_is_lossless() {
    let make = || -> Box<dyn VerifyPolicy> { Box::new(AsyncScheduler::new(rising())) };
    for p in p_values(&make, Verifier::Correct, STAGGERED) {
        assert!(p > 0.01, "async: chi-square p = {p}");
    }
}

#[test]
fn fixed_and_threshold_policies_are_lossless() {
    let fixed = || -> Box<dyn VerifyPolicy> { Box::new(Fixed(2)) };
    let threshold = || -> Box<dyn VerifyPolicy> { Box::new(Threshold(0.5)) };
    for make in [&fixed as &dyn Fn() -> Box<dyn VerifyPolicy>, &threshold] {
        for p in p_values(make, Verifier::Correct, STAGGERED) {
            assert!(p > 0.01, "chi-square p = {p}");
        }
    }
}

#[test]
fn the_test_catches_a_broken_sampler() {
    let make = || -> Box<dyn VerifyPolicy> {
        Box::new(PrefixScheduler {
            cost: rising(),
            early_stop: true,
            gate: Default::default(),
        })
    };
    let p = p_values(&make, Verifier::ResampleFromTarget, STAGGERED);
    assert!(p.iter().any(|&p| p < 1e-6), "broken sampler passed: {p:?}");
}

#[test]
fn the_test_catches_algorithm_1_without_early_stop() {
    // Appendix A's profile, where admitting the first draft alone never pays but admitting
    // two does when the second is confident — which depends on the first draft's value.
    let make = || -> Box<dyn VerifyPolicy> {
        Box::new(PrefixScheduler {
            cost: appendix_a(),
            early_stop: false,
            gate: Default::default(),
        })
    };
    let p = p_values(&make, Verifier::Correct, ALONE);
    assert!(p.iter().any(|&p| p < 1e-6), "biased scan passed: {p:?}");
    let safe = || -> Box<dyn VerifyPolicy> {
        Box::new(PrefixScheduler {
            cost: appendix_a(),
            early_stop: true,
            gate: Default::default(),
        })
    };
    for p in p_values(&safe, Verifier::Correct, ALONE) {
        assert!(p > 0.01, "alg1 on the Appendix A profile: p = {p}");
    }
}

/// The exact first-token distribution of one request under rejection sampling: draft
/// `x_1 ~ q`, verify the prefix the policy picks, `P(output = A)`.
fn appendix_a_probability_of_a(early_stop: bool) -> f64 {
    // Tokens: A = 0, B = 1.
    let (p, q) = ([0.7, 0.3], [0.5, 0.5]);
    let c2 = |x1: usize| if x1 == 0 { 0.9 } else { 0.0 };
    let mut prob_a = 0.0;
    for x1 in 0..2 {
        let cand = [Candidate {
            request: 0,
            drafted: 2,
            confidences: vec![0.8, c2(x1)],
        }];
        let l = prefix_schedule(&cand, &appendix_a(), early_stop)[0];
        let a_given_x1 = if l == 0 {
            p[0]
        } else {
            let accept = f64::min(1.0, p[x1] / q[x1]);
            let residual = [(p[0] - q[0]).max(0.0), (p[1] - q[1]).max(0.0)];
            let residual_a = residual[0] / (residual[0] + residual[1]);
            (if x1 == 0 { accept } else { 0.0 }) + (1.0 - accept) * residual_a
        };
        prob_a += q[x1] * a_given_x1;
    }
    prob_a
}

#[test]
fn appendix_a_counter_example_is_reproduced() {
    let without = appendix_a_probability_of_a(false);
    let with = appendix_a_probability_of_a(true);
    assert!(
        (without - 0.85).abs() < 1e-12,
        "without early stop P(A) = {without}"
    );
    assert!((with - 0.7).abs() < 1e-12, "with early stop P(A) = {with}");
    // The same through the real verifier, sampled.
    for (early_stop, want) in [(false, 0.85), (true, 0.7)] {
        let mut rng = Rng::new(11);
        let n = 40_000;
        let mut a = 0;
        for _ in 0..n {
            let x1 = rng.sample(&[0.5, 0.5]);
            let cand = [Candidate {
                request: 0,
                drafted: 2,
                confidences: vec![0.8, if x1 == 0 { 0.9 } else { 0.0 }],
            }];
            let l = prefix_schedule(&cand, &appendix_a(), early_stop)[0].min(1);
            let drafts = [x1];
            let out = verify(
                &drafts[..l],
                &[vec![0.7, 0.3], vec![0.7, 0.3]][..l + 1],
                &[vec![0.5, 0.5]][..l],
                &[],
                &mut rng,
            );
            let first = if out.accepted > 0 { x1 } else { out.next_token };
            a += (first == 0) as usize;
        }
        let freq = a as f64 / n as f64;
        assert!(
            (freq - want).abs() < 0.01,
            "sampled P(A) = {freq}, want {want}"
        );
    }
}
