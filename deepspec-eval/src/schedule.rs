//! How many of each request's drafts one target pass verifies: the verification policies
//! (target-only, fixed γ, a static confidence threshold, the paper's hardware-aware prefix
//! scheduler — Algorithm 1 — and its production, asynchronous variant) behind one trait, and
//! the step-cost profile (`bench sps`) the schedulers weigh tokens against.
//!
//! Every policy is lossless by construction: whether draft `j` of a request is verified may
//! depend on that request's drafts before `j` (through their confidences) and on anything
//! already decided, never on draft `j` itself or later ones. Algorithm 1 needs its early stop
//! for that (the scan stops at the first admission that does not pay); the production variant
//! gets it from a causal barrier (its capacity comes from confidences two rounds old, and the
//! current round's tokens are admitted in rank order).

use anyhow::{bail, Context};
use deepspec_core::drafter::DrafterConfig;
use deepspec_core::sampling::sigmoid;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The profile's format tag.
pub const SPS_FORMAT: &str = "deepspec-sps/1";

/// A measured cost: `n` tokens (verification) or requests (drafting) took `seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostPoint {
    pub n: usize,
    pub seconds: f64,
}

/// The step-cost profile `bench sps` writes and `--sps-table` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpsTable {
    /// [`SPS_FORMAT`].
    pub format: String,
    /// The burn backend it was measured on.
    pub backend: String,
    /// The target model's path.
    pub target: String,
    /// Tokens already in the target's cache when each pass was timed.
    pub context_len: usize,
    /// Timed repeats per point after warm-up (the median is kept).
    pub repeats: usize,
    /// One target pass over `n` new tokens, ascending in `n`, seconds non-decreasing.
    pub verify: Vec<CostPoint>,
    /// One drafting round for `n` requests, ascending in `n`; empty if not profiled.
    #[serde(default)]
    pub draft: Vec<CostPoint>,
}

/// Seconds at `n` read off `points` (ascending, non-empty): linear between measured points,
/// the first point's cost below it, proportional to `n` past the last.
fn interpolate(points: &[CostPoint], n: usize) -> f64 {
    let first = points[0];
    if n <= first.n {
        return first.seconds;
    }
    for w in points.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        if n <= hi.n {
            let t = (n - lo.n) as f64 / (hi.n - lo.n) as f64;
            return lo.seconds + t * (hi.seconds - lo.seconds);
        }
    }
    let last = points[points.len() - 1];
    last.seconds * n as f64 / last.n as f64
}

/// `values` with every element raised to the largest before it (a running maximum), so
/// that a longer pass never reads as cheaper than a shorter one.
pub fn monotone(points: &mut [CostPoint]) {
    let mut high = 0.0f64;
    for p in points.iter_mut() {
        high = high.max(p.seconds);
        p.seconds = high;
    }
}

impl SpsTable {
    /// Reads and checks a profile.
    pub fn load(path: &Path) -> anyhow::Result<SpsTable> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the step-cost profile {}", path.display()))?;
        let table: SpsTable = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a step-cost profile (write one with `deepspec bench sps --out FILE`)",
                path.display()
            )
        })?;
        table
            .check()
            .with_context(|| format!("in the step-cost profile {}", path.display()))?;
        Ok(table)
    }

    /// The checks [`SpsTable::load`] makes.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.format != SPS_FORMAT {
            bail!(
                "format is {:?}, expected {SPS_FORMAT:?}: profile again with this deepspec",
                self.format
            );
        }
        if self.verify.is_empty() {
            bail!("`verify` has no points: a profile needs at least one timed pass");
        }
        for (name, points) in [("verify", &self.verify), ("draft", &self.draft)] {
            for (i, p) in points.iter().enumerate() {
                if p.n == 0 || !(p.seconds.is_finite() && p.seconds > 0.0) {
                    bail!(
                        "`{name}[{i}]` is n = {}, seconds = {}: n must be at least 1 and \
                         seconds positive",
                        p.n,
                        p.seconds
                    );
                }
                if i > 0 && points[i - 1].n >= p.n {
                    bail!("`{name}` must be in ascending n (entry {i} is not)");
                }
            }
        }
        Ok(())
    }

    /// Seconds of one target pass over `tokens` new tokens.
    pub fn verify_seconds(&self, tokens: usize) -> f64 {
        interpolate(&self.verify, tokens.max(1))
    }

    /// Verification steps per second at a batch of `tokens`: SPS(B).
    pub fn sps(&self, tokens: usize) -> f64 {
        1.0 / self.verify_seconds(tokens)
    }

    /// Seconds of one drafting round for `requests`, if the profile has drafting costs.
    pub fn draft_seconds(&self, requests: usize) -> Option<f64> {
        (!self.draft.is_empty()).then(|| interpolate(&self.draft, requests.max(1)))
    }

    /// Expected tokens per second of a round committing `tau` tokens from `requests`
    /// requests through a pass of `tokens`: `τ·SPS(B)`, or `τ / (draft + verify)` when the
    /// profile knows what drafting costs.
    pub fn throughput(&self, tau: f64, tokens: usize, requests: usize) -> f64 {
        match self.draft_seconds(requests) {
            Some(draft) => tau / (draft + self.verify_seconds(tokens)),
            None => tau * self.sps(tokens),
        }
    }
}

/// How a verification pass's size follows from the chosen prefix lengths `ℓ_r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassShape {
    /// Tokens of all requests packed: `B = Σ (1 + ℓ_r)` (the paper's ragged kernels).
    Packed,
    /// Every row padded to the widest: `B = R · (1 + max ℓ_r)` (what deepspec's engine runs:
    /// one left-padded pass over the batch).
    Padded,
}

impl PassShape {
    pub fn tokens(self, lengths: &[usize]) -> usize {
        match self {
            PassShape::Packed => lengths.iter().map(|l| 1 + l).sum(),
            PassShape::Padded => lengths.len() * (1 + lengths.iter().copied().max().unwrap_or(0)),
        }
    }
}

/// What a policy weighs: the profile and the shape of the pass it buys.
#[derive(Debug, Clone)]
pub struct CostModel {
    pub table: SpsTable,
    pub shape: PassShape,
}

impl CostModel {
    /// `Θ` of verifying `lengths` with `tau` expected tokens.
    pub fn objective(&self, tau: f64, lengths: &[usize]) -> f64 {
        self.table
            .throughput(tau, self.shape.tokens(lengths), lengths.len())
    }
}

/// One active request's drafts as a policy sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The request's id (stable over its rounds).
    pub request: usize,
    /// Draft tokens on offer this round.
    pub drafted: usize,
    /// Per drafted slot, the (calibrated) probability that it is accepted given the ones
    /// before it: `c_{r,1..}`; empty for a drafter without a confidence head.
    pub confidences: Vec<f64>,
}

impl Candidate {
    /// Prefix survival `a_{r,j} = Π_{i≤j} c_{r,i}` for `j = 1..drafted`.
    pub fn survival(&self) -> Vec<f64> {
        let mut a = 1.0;
        self.confidences
            .iter()
            .take(self.drafted)
            .map(|&c| {
                a *= c;
                a
            })
            .collect()
    }
}

/// Per-slot confidences `σ(z_j / T_j)` from a proposal's confidence logits, with the STS
/// temperatures a calibration stored (1 past their end, or when there are none).
pub fn confidences(logits: &[f32], temperatures: &[f64]) -> Vec<f64> {
    logits
        .iter()
        .enumerate()
        .map(|(j, &z)| sigmoid(z as f64 / temperatures.get(j).copied().unwrap_or(1.0)))
        .collect()
}

/// The admission path: every `(request index, j, a_{r,j})` in descending `a`, ties broken by
/// `(r, j)` so that a request's slots keep their order.
fn admission_path(candidates: &[Candidate]) -> Vec<(usize, usize, f64)> {
    let mut path: Vec<(usize, usize, f64)> = candidates
        .iter()
        .enumerate()
        .flat_map(|(r, c)| {
            c.survival()
                .into_iter()
                .enumerate()
                .map(move |(j, a)| (r, j + 1, a))
        })
        .filter(|&(_, _, a)| a > 0.0)
        .collect();
    path.sort_by(|x, y| y.2.total_cmp(&x.2).then(x.0.cmp(&y.0)).then(x.1.cmp(&y.1)));
    path
}

/// Algorithm 1: walk the admission path, keep the lengths with the best `Θ = τ·SPS(B)`;
/// with `early_stop`, stop at the first admission that does not improve it (what keeps the
/// scheduler lossless), else scan to the end for the global maximum.
pub fn prefix_schedule(candidates: &[Candidate], cost: &CostModel, early_stop: bool) -> Vec<usize> {
    best_admission(candidates, cost, early_stop).0
}

/// [`prefix_schedule`]'s lengths and their `Θ`.
fn best_admission(
    candidates: &[Candidate],
    cost: &CostModel,
    early_stop: bool,
) -> (Vec<usize>, f64) {
    let mut lengths = vec![0; candidates.len()];
    let mut tau = candidates.len() as f64;
    let mut best = cost.objective(tau, &lengths);
    let mut best_lengths = lengths.clone();
    for (r, j, a) in admission_path(candidates) {
        lengths[r] = j;
        tau += a;
        let theta = cost.objective(tau, &lengths);
        if theta > best {
            best = theta;
            best_lengths.clone_from(&lengths);
        } else if early_stop {
            break;
        }
    }
    (best_lengths, best)
}

/// The top `k` of the admission path, as per-request lengths.
fn top_k(candidates: &[Candidate], k: usize) -> Vec<usize> {
    let mut lengths = vec![0; candidates.len()];
    for (r, j, _) in admission_path(candidates).into_iter().take(k) {
        lengths[r] = lengths[r].max(j);
    }
    lengths
}

/// A verification policy: per round, how many drafts of each active request to verify.
pub trait VerifyPolicy {
    /// The name reports use (`none`, `fixed:7`, `threshold:0.5`, `alg1`, `async`).
    fn name(&self) -> String;
    /// Whether requests draft at all (target-only does not).
    fn drafts(&self) -> bool {
        true
    }
    /// Whether this round's requests (by id) draft at all; decided before drafting, from
    /// earlier rounds only. A scheduler that expects no draft to pay skips the drafting cost.
    fn draft_this_round(&mut self, _requests: &[usize]) -> bool {
        self.drafts()
    }
    /// Prefix lengths `ℓ_r ≤ drafted_r`, one per candidate, in order.
    fn choose(&mut self, candidates: &[Candidate]) -> Vec<usize>;
}

/// γ = 0: plain decoding through the same engine.
pub struct TargetOnly;

impl VerifyPolicy for TargetOnly {
    fn name(&self) -> String {
        "none".into()
    }
    fn drafts(&self) -> bool {
        false
    }
    fn choose(&mut self, candidates: &[Candidate]) -> Vec<usize> {
        vec![0; candidates.len()]
    }
}

/// Every request verifies its first `γ` drafts (all of them with `usize::MAX`).
pub struct Fixed(pub usize);

impl VerifyPolicy for Fixed {
    fn name(&self) -> String {
        if self.0 == usize::MAX {
            "full".into()
        } else {
            format!("fixed:{}", self.0)
        }
    }
    fn drafts(&self) -> bool {
        self.0 > 0
    }
    fn choose(&mut self, candidates: &[Candidate]) -> Vec<usize> {
        candidates.iter().map(|c| c.drafted.min(self.0)).collect()
    }
}

/// A request verifies its drafts up to the first whose confidence is below the threshold
/// (the reference's `--confidence-threshold`; 0 verifies every draft).
pub struct Threshold(pub f64);

impl VerifyPolicy for Threshold {
    fn name(&self) -> String {
        format!("threshold:{}", self.0)
    }
    fn choose(&mut self, candidates: &[Candidate]) -> Vec<usize> {
        candidates
            .iter()
            .map(|c| {
                if self.0 <= 0.0 || c.confidences.is_empty() {
                    return c.drafted;
                }
                c.confidences
                    .iter()
                    .take(c.drafted)
                    .position(|&p| p < self.0)
                    .unwrap_or(c.drafted)
            })
            .collect()
    }
}

/// Rounds a scheduler first goes without drafting before it drafts once more to see whether
/// the requests' confidences have changed; each probe that finds no gain doubles the wait
/// (up to [`MAX_REPROBE_ROUNDS`]), a round where drafting pays resets it.
const REPROBE_ROUNDS: usize = 8;
const MAX_REPROBE_ROUNDS: usize = 256;

/// Whether drafting pays this round, judged on each request's last seen confidences: only
/// when the profile knows what drafting costs, every request has been seen drafting, and the
/// best admission over those confidences (drafting paid) beats verifying the anchors alone
/// (nothing drafted). A round skipped that way costs a plain decoding step; after
/// [`REPROBE_ROUNDS`] skipped rounds one drafts again, and the wait doubles while probes
/// find nothing.
#[derive(Debug, Clone, Default)]
pub struct DraftGate {
    last: HashMap<usize, Vec<f64>>,
    skipped: usize,
    /// Skipped rounds before the next probe (0: not yet set, [`REPROBE_ROUNDS`]).
    interval: usize,
}

impl DraftGate {
    pub fn decide(&mut self, cost: &CostModel, requests: &[usize]) -> bool {
        if cost.table.draft_seconds(requests.len()).is_none() {
            return true;
        }
        let mut seen = Vec::with_capacity(requests.len());
        for id in requests {
            match self.last.get(id) {
                Some(c) => seen.push(Candidate {
                    request: *id,
                    drafted: c.len(),
                    confidences: c.clone(),
                }),
                None => return true,
            }
        }
        let anchors = vec![0; requests.len()];
        let anchors_only =
            requests.len() as f64 / cost.table.verify_seconds(cost.shape.tokens(&anchors));
        // Θ of the best admission, drafting paid (the profile has its cost).
        let (_, with_drafts) = best_admission(&seen, cost, false);
        if self.interval == 0 {
            self.interval = REPROBE_ROUNDS;
        }
        if with_drafts > anchors_only {
            self.skipped = 0;
            self.interval = REPROBE_ROUNDS;
            true
        } else if self.skipped + 1 >= self.interval {
            self.skipped = 0;
            self.interval = (self.interval * 2).min(MAX_REPROBE_ROUNDS);
            true
        } else {
            self.skipped += 1;
            false
        }
    }

    /// Remembers the confidences of the requests that drafted this round.
    pub fn observe(&mut self, candidates: &[Candidate]) {
        self.last
            .retain(|id, _| candidates.iter().any(|c| c.request == *id));
        for c in candidates.iter().filter(|c| c.drafted > 0) {
            self.last.insert(
                c.request,
                c.confidences.iter().take(c.drafted).copied().collect(),
            );
        }
    }
}

/// Algorithm 1 (synchronous), early stop on; `early_stop: false` is the unsafe scan of the
/// paper's Appendix A, kept for the test that shows it is not lossless.
pub struct PrefixScheduler {
    pub cost: CostModel,
    pub early_stop: bool,
    pub gate: DraftGate,
}

impl VerifyPolicy for PrefixScheduler {
    fn name(&self) -> String {
        if self.early_stop {
            "alg1".into()
        } else {
            "alg1-no-early-stop".into()
        }
    }
    fn draft_this_round(&mut self, requests: &[usize]) -> bool {
        self.gate.decide(&self.cost, requests)
    }
    fn choose(&mut self, candidates: &[Candidate]) -> Vec<usize> {
        self.gate.observe(candidates);
        prefix_schedule(candidates, &self.cost, self.early_stop)
    }
}

/// The production variant (§5.2): the capacity `K` for this round is the global maximum of
/// the whole admission path over the confidences of two rounds before (each active request's
/// own, a request without them counting its anchor only); this round's tokens are ranked by
/// their current prefix survival and the top `K` verified.
pub struct AsyncScheduler {
    pub cost: CostModel,
    /// Per request, the confidences of its last two rounds (oldest first).
    history: HashMap<usize, Vec<Vec<f64>>>,
    gate: DraftGate,
}

impl AsyncScheduler {
    pub fn new(cost: CostModel) -> Self {
        AsyncScheduler {
            cost,
            history: HashMap::new(),
            gate: DraftGate::default(),
        }
    }

    /// `K` from the confidences two rounds before this one.
    fn capacity(&self, candidates: &[Candidate]) -> usize {
        let old: Vec<Candidate> = candidates
            .iter()
            .map(|c| {
                let confidences = match self.history.get(&c.request) {
                    Some(h) if h.len() == 2 => h[0].clone(),
                    _ => Vec::new(),
                };
                Candidate {
                    request: c.request,
                    drafted: confidences.len(),
                    confidences,
                }
            })
            .collect();
        prefix_schedule(&old, &self.cost, false).iter().sum()
    }
}

impl VerifyPolicy for AsyncScheduler {
    fn name(&self) -> String {
        "async".into()
    }
    fn draft_this_round(&mut self, requests: &[usize]) -> bool {
        self.gate.decide(&self.cost, requests)
    }
    fn choose(&mut self, candidates: &[Candidate]) -> Vec<usize> {
        self.gate.observe(candidates);
        let k = self.capacity(candidates);
        let lengths = top_k(candidates, k);
        self.history
            .retain(|id, _| candidates.iter().any(|c| c.request == *id));
        for c in candidates {
            let h = self.history.entry(c.request).or_default();
            h.push(c.confidences.iter().take(c.drafted).copied().collect());
            if h.len() > 2 {
                h.remove(0);
            }
        }
        lengths
    }
}

/// A policy as named on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicySpec {
    TargetOnly,
    /// Every draft (the reference's fixed blocks).
    Full,
    Fixed(usize),
    Threshold(f64),
    Alg1,
    Async,
}

impl FromStr for PolicySpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<PolicySpec> {
        let s = s.trim();
        let bad = || {
            anyhow::anyhow!(
                "unknown policy {s:?}: use none, full, fixed:N (N ≥ 1 drafts), threshold:T (0 < T < 1), \
                 alg1 or async"
            )
        };
        Ok(match s {
            "none" => PolicySpec::TargetOnly,
            "full" => PolicySpec::Full,
            "alg1" => PolicySpec::Alg1,
            "async" => PolicySpec::Async,
            _ => match s.split_once(':') {
                Some(("fixed", n)) => match n.parse::<usize>() {
                    Ok(n) if n >= 1 => PolicySpec::Fixed(n),
                    _ => return Err(bad()),
                },
                Some(("threshold", t)) => match t.parse::<f64>() {
                    Ok(t) if t > 0.0 && t < 1.0 => PolicySpec::Threshold(t),
                    _ => return Err(bad()),
                },
                _ => return Err(bad()),
            },
        })
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySpec::TargetOnly => write!(f, "none"),
            PolicySpec::Full => write!(f, "full"),
            PolicySpec::Fixed(n) => write!(f, "fixed:{n}"),
            PolicySpec::Threshold(t) => write!(f, "threshold:{t}"),
            PolicySpec::Alg1 => write!(f, "alg1"),
            PolicySpec::Async => write!(f, "async"),
        }
    }
}

impl PolicySpec {
    /// Whether the policy reads confidences, so needs a drafter with a confidence head.
    pub fn reads_confidence(&self) -> bool {
        matches!(
            self,
            PolicySpec::Threshold(_) | PolicySpec::Alg1 | PolicySpec::Async
        )
    }

    /// Refuses a policy that reads confidences for a drafter without a confidence head,
    /// naming the drafter `dir` and the policies that work.
    pub fn check_drafter(&self, config: &DrafterConfig, dir: &Path) -> anyhow::Result<()> {
        if self.reads_confidence() && !config.confidence_head {
            bail!(
                "policy {self} reads confidences, and {} has no confidence head ({}): use \
                 none, full or fixed:N",
                dir.display(),
                config.algorithm.name()
            );
        }
        Ok(())
    }

    /// The policy, with `cost` for the schedulers (an error naming the flag without it).
    pub fn build(&self, cost: Option<&CostModel>) -> anyhow::Result<Box<dyn VerifyPolicy>> {
        let cost = || {
            cost.cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "policy {self} weighs tokens against a step-cost profile: pass --sps-table \
                     FILE (from `deepspec bench sps`)"
                )
            })
        };
        Ok(match self {
            PolicySpec::TargetOnly => Box::new(TargetOnly),
            PolicySpec::Full => Box::new(Fixed(usize::MAX)),
            PolicySpec::Fixed(n) => Box::new(Fixed(*n)),
            PolicySpec::Threshold(t) => Box::new(Threshold(*t)),
            PolicySpec::Alg1 => Box::new(PrefixScheduler {
                cost: cost()?,
                early_stop: true,
                gate: DraftGate::default(),
            }),
            PolicySpec::Async => Box::new(AsyncScheduler::new(cost()?)),
        })
    }
}

/// The drafter's STS temperatures from `calibration.json` beside it (`eval --calibrate`).
pub fn sts_temperatures(drafter: &Path) -> anyhow::Result<Vec<f64>> {
    let path = drafter.join("calibration.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let temps = value["temperatures"].as_array().with_context(|| {
        format!(
            "{}: `temperatures` must be a list of numbers (rewrite it with `deepspec eval --calibrate`)",
            path.display()
        )
    })?;
    temps
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_f64() {
            Some(t) if t.is_finite() && t > 0.0 => Ok(t),
            _ => bail!(
                "{}: temperatures[{i}] is {t}, not a positive number",
                path.display()
            ),
        })
        .collect()
}

/// What an evaluation verifies with: a policy, the profile it weighs (schedulers only) and
/// the STS temperatures its confidences are read through.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: PolicySpec,
    pub cost: Option<CostModel>,
    pub temperatures: Vec<f64>,
}

impl Schedule {
    /// A fresh policy (the production variant keeps per-request history).
    pub fn policy(&self) -> anyhow::Result<Box<dyn VerifyPolicy>> {
        self.spec.build(self.cost.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(verify: &[(usize, f64)]) -> SpsTable {
        SpsTable {
            format: SPS_FORMAT.into(),
            backend: "test".into(),
            target: "test".into(),
            context_len: 0,
            repeats: 1,
            verify: verify
                .iter()
                .map(|&(n, s)| CostPoint { n, seconds: s })
                .collect(),
            draft: Vec::new(),
        }
    }

    fn candidate(request: usize, confidences: &[f64]) -> Candidate {
        Candidate {
            request,
            drafted: confidences.len(),
            confidences: confidences.to_vec(),
        }
    }

    /// SPS(1)=1, SPS(2)=0.5, SPS(3)=0.45 from the paper's Appendix A, as seconds per pass.
    fn appendix_a() -> CostModel {
        CostModel {
            table: table(&[(1, 1.0), (2, 2.0), (3, 1.0 / 0.45)]),
            shape: PassShape::Packed,
        }
    }

    #[test]
    fn profile_interpolates_and_extrapolates_in_proportion() {
        let t = table(&[(1, 1.0), (4, 2.5), (8, 4.0)]);
        assert_eq!(t.verify_seconds(1), 1.0);
        assert_eq!(t.verify_seconds(2), 1.5);
        assert_eq!(t.verify_seconds(6), 3.25);
        assert_eq!(t.verify_seconds(16), 8.0);
        let mut points = vec![
            CostPoint { n: 1, seconds: 2.0 },
            CostPoint { n: 2, seconds: 1.0 },
            CostPoint { n: 4, seconds: 3.0 },
        ];
        monotone(&mut points);
        assert_eq!(
            points.iter().map(|p| p.seconds).collect::<Vec<_>>(),
            [2.0, 2.0, 3.0]
        );
    }

    #[test]
    fn appendix_a_scan_with_and_without_early_stop() {
        let cost = appendix_a();
        // High-confidence branch: c_2 = 0.9.
        let high = [candidate(0, &[0.8, 0.9])];
        assert_eq!(prefix_schedule(&high, &cost, true), vec![0]);
        assert_eq!(prefix_schedule(&high, &cost, false), vec![2]);
        let low = [candidate(0, &[0.8, 0.0])];
        assert_eq!(prefix_schedule(&low, &cost, false), vec![0]);
    }

    #[test]
    fn admission_follows_survival_with_ties_in_request_then_slot_order() {
        let cands = [candidate(7, &[0.9, 1.0, 0.5]), candidate(3, &[0.9, 0.9])];
        let path = admission_path(&cands);
        let order: Vec<(usize, usize)> = path.iter().map(|&(r, j, _)| (r, j)).collect();
        assert_eq!(order, vec![(0, 1), (0, 2), (1, 1), (1, 2), (0, 3)]);
        assert_eq!(top_k(&cands, 3), vec![2, 1]);
        // Flat SPS: every token pays, all are admitted.
        let flat = CostModel {
            table: table(&[(1, 1.0), (64, 1.0)]),
            shape: PassShape::Packed,
        };
        assert_eq!(prefix_schedule(&cands, &flat, true), vec![3, 2]);
        // Cost proportional to tokens: nothing beats verifying the anchors alone.
        let linear = CostModel {
            table: table(&[(1, 1.0), (64, 64.0)]),
            shape: PassShape::Packed,
        };
        assert_eq!(prefix_schedule(&cands, &linear, true), vec![0, 0]);
    }

    #[test]
    fn async_capacity_comes_from_two_rounds_before() {
        let flat = CostModel {
            table: table(&[(1, 1.0), (64, 1.0)]),
            shape: PassShape::Packed,
        };
        let mut policy = AsyncScheduler::new(flat);
        let round = |c: &[f64]| vec![candidate(1, c)];
        // No history: anchors only, for two rounds.
        assert_eq!(policy.choose(&round(&[0.9, 0.9])), vec![0]);
        assert_eq!(policy.choose(&round(&[0.9])), vec![0]);
        // Round 3 reads round 1 (two slots on offer then): K = 2, and this round has three.
        assert_eq!(policy.choose(&round(&[0.5, 0.5, 0.5])), vec![2]);
        // Round 4 reads round 2 (one slot): K = 1.
        assert_eq!(policy.choose(&round(&[0.9, 0.9])), vec![1]);
    }

    /// Drafting that cannot pay is skipped, with probes at doubling intervals; drafting that
    /// pays is never skipped.
    #[test]
    fn the_draft_gate_skips_what_cannot_pay_and_probes_less_and_less() {
        let mut steep = table(&[(1, 1.0), (2, 3.0), (16, 24.0)]);
        steep.draft = vec![CostPoint { n: 1, seconds: 2.0 }];
        let cost = CostModel {
            table: steep,
            shape: PassShape::Packed,
        };
        let mut gate = DraftGate::default();
        assert!(gate.decide(&cost, &[5]), "an unseen request drafts");
        gate.observe(&[candidate(5, &[0.5, 0.5])]);
        let drafted: Vec<usize> = (0..40).filter(|_| gate.decide(&cost, &[5])).collect();
        assert_eq!(
            drafted.len(),
            2,
            "probes after 8 and then 16 skipped rounds"
        );
        let mut cheap = cost.clone();
        cheap.table.draft = vec![CostPoint {
            n: 1,
            seconds: 1e-3,
        }];
        cheap.table.verify = vec![
            CostPoint { n: 1, seconds: 1.0 },
            CostPoint {
                n: 16,
                seconds: 1.0,
            },
        ];
        assert!((0..20).all(|_| gate.decide(&cheap, &[5])));
    }

    #[test]
    fn policy_names_parse_and_refuse_clearly() {
        for name in [
            "none",
            "full",
            "fixed:1",
            "fixed:7",
            "threshold:0.5",
            "alg1",
            "async",
        ] {
            assert_eq!(name.parse::<PolicySpec>().unwrap().to_string(), name);
        }
        for bad in ["fixed:0", "threshold:1.5", "greedy", "fixed:x"] {
            let err = bad.parse::<PolicySpec>().unwrap_err().to_string();
            assert!(
                err.contains("unknown policy") && err.contains("alg1"),
                "{err}"
            );
        }
        let err = PolicySpec::Alg1.build(None).err().unwrap().to_string();
        assert!(err.contains("--sps-table"), "{err}");
    }
}
