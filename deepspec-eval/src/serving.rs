//! The serving benchmark's report (`deepspec bench serve`): per policy and load, aggregate
//! and per-user tokens/s (also as ratios to target-only at the same load, same run), τ, the
//! verified budget per request, and what a round spent drafting, verifying and on the host.

use crate::schedule::{PassShape, SpsTable};
use crate::serve::ServeRun;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Per-user decode speed over the requests of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UserSpeed {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
}

/// Mean seconds per round.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundSplit {
    pub draft_s: f64,
    pub verify_s: f64,
    pub host_s: f64,
    pub total_s: f64,
}

/// One policy at one load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServePoint {
    pub policy: String,
    /// Slots (the most requests decoding at once).
    pub concurrency: usize,
    /// Poisson arrival rate (requests/s), or `None` when every request waits from the start.
    pub rate: Option<f64>,
    pub requests: usize,
    /// Tokens generated over all requests.
    pub tokens: usize,
    pub wall_s: f64,
    /// Tokens generated per second of the run.
    pub aggregate_tokens_per_s: f64,
    /// Each request's decode speed (tokens after its first over the time they took).
    pub per_user_tokens_per_s: UserSpeed,
    /// Accepted length per verification round (the bonus included).
    pub tau: f64,
    /// Tokens each request verifies per round: its anchor plus the drafts admitted (MTP-1 = 2).
    pub verified_per_request: f64,
    pub rounds: usize,
    pub round: RoundSplit,
    pub prefill_s: f64,
    /// Aggregate and mean per-user tokens/s over target-only's at this load, in this run.
    pub aggregate_ratio: f64,
    pub per_user_ratio: f64,
    /// A round's mean cost over target-only's (one plain decoding step) at this load.
    pub round_over_target_step: f64,
    /// SHA-256 of every request's output ids, in request order.
    pub outputs_sha256: String,
    /// At temperature 0: whether the outputs equal target-only's token for token.
    pub identical_to_target_only: Option<bool>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Digest of the outputs (little-endian u32 ids, each request prefixed by its length).
pub fn outputs_digest(run: &ServeRun) -> String {
    let mut h = Sha256::new();
    for r in &run.requests {
        let out = &r.trace.output_ids[r.trace.prompt_len..];
        h.update((out.len() as u64).to_le_bytes());
        for t in out {
            h.update(t.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// The point of `run` before ratios (filled by [`fill_ratios`]).
pub fn summarize(
    policy: &str,
    concurrency: usize,
    rate: Option<f64>,
    run: &ServeRun,
) -> ServePoint {
    let tokens: usize = run.requests.iter().map(|r| r.new_tokens()).sum();
    let mut speeds: Vec<f64> = run
        .requests
        .iter()
        .filter_map(|r| r.decode_tokens_per_s())
        .collect();
    speeds.sort_by(f64::total_cmp);
    let mean = if speeds.is_empty() {
        0.0
    } else {
        speeds.iter().sum::<f64>() / speeds.len() as f64
    };
    let (mut accepted, mut request_rounds, mut verified) = (0usize, 0usize, 0usize);
    for r in &run.requests {
        accepted += r.trace.acceptance_lengths().iter().sum::<usize>();
        request_rounds += r.trace.rounds.len();
        verified += r
            .trace
            .rounds
            .iter()
            .map(|x| x.verify_input_ids.len())
            .sum::<usize>();
    }
    let rounds = run.rounds.len();
    let per_round = |f: fn(&crate::serve::RoundCost) -> f64| {
        if rounds == 0 {
            0.0
        } else {
            run.rounds.iter().map(f).sum::<f64>() / rounds as f64
        }
    };
    let round = RoundSplit {
        draft_s: per_round(|r| r.draft_s),
        verify_s: per_round(|r| r.verify_s),
        host_s: per_round(|r| r.host_s),
        total_s: per_round(|r| r.draft_s + r.verify_s + r.host_s),
    };
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    ServePoint {
        policy: policy.to_string(),
        concurrency,
        rate,
        requests: run.requests.len(),
        tokens,
        wall_s: run.wall_s,
        aggregate_tokens_per_s: if run.wall_s > 0.0 {
            tokens as f64 / run.wall_s
        } else {
            0.0
        },
        per_user_tokens_per_s: UserSpeed {
            mean,
            p50: quantile(&speeds, 0.5),
            p90: quantile(&speeds, 0.9),
        },
        tau: ratio(accepted, request_rounds),
        verified_per_request: ratio(verified, request_rounds),
        rounds,
        round,
        prefill_s: run.prefill_s,
        aggregate_ratio: 0.0,
        per_user_ratio: 0.0,
        round_over_target_step: 0.0,
        outputs_sha256: outputs_digest(run),
        identical_to_target_only: None,
    }
}

/// Ratios of every point to the target-only point at the same load (left 0 where there is
/// none); at temperature 0, whether the outputs are target-only's.
pub fn fill_ratios(points: &mut [ServePoint], greedy: bool) {
    let baselines: Vec<ServePoint> = points
        .iter()
        .filter(|p| p.policy == "none")
        .cloned()
        .collect();
    for p in points.iter_mut() {
        let Some(base) = baselines
            .iter()
            .find(|b| b.concurrency == p.concurrency && b.rate == p.rate)
        else {
            continue;
        };
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        p.aggregate_ratio = div(p.aggregate_tokens_per_s, base.aggregate_tokens_per_s);
        p.per_user_ratio = div(
            p.per_user_tokens_per_s.mean,
            base.per_user_tokens_per_s.mean,
        );
        p.round_over_target_step = div(p.round.total_s, base.round.total_s);
        if greedy {
            p.identical_to_target_only = Some(p.outputs_sha256 == base.outputs_sha256);
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ServeReport {
    pub bench: &'static str,
    pub backend: String,
    pub target: String,
    pub drafter: String,
    pub sets: Vec<String>,
    pub limit: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// The STS temperatures confidences were read through (empty: raw confidences).
    pub sts_temperatures: Vec<f64>,
    /// How the schedulers count a pass's tokens.
    pub pass_shape: PassShape,
    pub sps_table: SpsTable,
    pub points: Vec<ServePoint>,
}

impl ServeReport {
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        deepspec_core::io::atomic::write_atomically(path, text.as_bytes())?;
        Ok(())
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "policy               C  agg tok/s  ×none  user tok/s (p50 p90)   ×none     τ  verified/req  round ms (draft verify host)  ×step\n",
        );
        for p in &self.points {
            out += &format!(
                "{:<16} {:>5} {:>10.1} {:>6.2} {:>10.1} ({:>5.1} {:>5.1}) {:>7.2} {:>5.2} {:>13.2} {:>8.1} ({:>5.1} {:>5.1} {:>5.1}) {:>6.2}{}\n",
                p.policy,
                p.concurrency,
                p.aggregate_tokens_per_s,
                p.aggregate_ratio,
                p.per_user_tokens_per_s.mean,
                p.per_user_tokens_per_s.p50,
                p.per_user_tokens_per_s.p90,
                p.per_user_ratio,
                p.tau,
                p.verified_per_request,
                p.round.total_s * 1e3,
                p.round.draft_s * 1e3,
                p.round.verify_s * 1e3,
                p.round.host_s * 1e3,
                p.round_over_target_step,
                match p.identical_to_target_only {
                    Some(false) => "  OUTPUT DIFFERS FROM TARGET-ONLY",
                    _ => "",
                }
            );
        }
        out
    }
}
