//! The evaluation report: JSON (documented in docs/eval-report.md), a Markdown table, and
//! the regression gate against a baseline report.

use crate::calibration::Calibration;
use crate::datasets::{Domain, SETS};
use crate::metrics::{AcceptanceStats, SweepPoint};
use anyhow::Context;
use deepspec_core::io::atomic::write_atomically;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    pub domain: Domain,
    pub samples: usize,
    /// Committed tokens per verification, bonus token included.
    pub tau: f64,
    pub rounds: usize,
    pub tokens: usize,
    /// Acceptance at slot k given slots 0..k-1 were accepted.
    pub conditional_acceptance: Vec<f64>,
    pub wall_seconds: f64,
}

impl SetReport {
    pub fn new(domain: Domain, samples: usize, stats: &AcceptanceStats, wall_seconds: f64) -> Self {
        SetReport {
            domain,
            samples,
            tau: stats.tau(),
            rounds: stats.rounds,
            tokens: stats.tokens,
            conditional_acceptance: stats.conditional_acceptance(),
            wall_seconds,
        }
    }
}

/// The confidence head's prefix survival before and after Sequential Temperature Scaling,
/// and the threshold sweep.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    #[serde(flatten)]
    pub prefix_survival: Calibration,
    pub threshold_sweep: Vec<SweepPoint>,
}

/// What an offline eval measured besides the report's τ (which is the one at the report's
/// temperature).
#[derive(Debug, Clone, Serialize)]
pub struct OfflineSummary {
    /// The cache the target's hidden states came from.
    pub cache: String,
    pub samples: usize,
    /// Anchors scored (would-be verification rounds).
    pub rounds: usize,
    pub anchor_seed: u64,
    /// τ at T = 0: the greedy-agreement prefix plus the bonus token.
    pub tau_greedy: f64,
    /// τ at T = 1: the expected accepted length under rejection sampling plus the bonus.
    pub tau_expected: f64,
    pub conditional_acceptance_greedy: Vec<f64>,
    pub conditional_acceptance_expected: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `online` (the drafter verified against the running target) or `offline`
    /// (teacher-forced against a cache's target hidden states; see `offline`).
    pub mode: String,
    /// Mean of the per-set τ over the sets evaluated.
    pub macro_tau: f64,
    /// Mean of the per-set τ within each domain.
    pub domain_tau: BTreeMap<Domain, f64>,
    pub sets: BTreeMap<String, SetReport>,
    /// Requested sets with no file in the datasets folder (never substituted).
    pub missing_sets: Vec<String>,
    pub target: String,
    pub drafter: String,
    pub algorithm: String,
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub confidence_threshold: f64,
    /// The verification policy (`full`, `threshold:T`, `fixed:N`, `alg1`, `async`, `none`).
    pub policy: String,
    pub calibration: Option<CalibrationReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineSummary>,
}

impl Report {
    pub fn aggregate(&mut self) {
        let taus: Vec<f64> = self.sets.values().map(|s| s.tau).collect();
        self.macro_tau = if taus.is_empty() {
            0.0
        } else {
            taus.iter().sum::<f64>() / taus.len() as f64
        };
        let mut by_domain: BTreeMap<Domain, Vec<f64>> = BTreeMap::new();
        for s in self.sets.values() {
            by_domain.entry(s.domain).or_default().push(s.tau);
        }
        self.domain_tau = by_domain
            .into_iter()
            .map(|(d, v)| (d, v.iter().sum::<f64>() / v.len() as f64))
            .collect();
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(self)? + "\n";
        Ok(write_atomically(path, text.as_bytes())?)
    }

    /// The table printed after a run.
    pub fn markdown(&self) -> String {
        let mut out = String::from("| set | domain | samples | rounds | τ | acceptance by position |\n|---|---|---|---|---|---|\n");
        // The reference sets in their order, then custom sets by name.
        let custom = self
            .sets
            .keys()
            .map(String::as_str)
            .filter(|n| SETS.iter().all(|(r, _)| r != n));
        for name in SETS.iter().map(|(n, _)| *n).chain(custom) {
            if let Some(s) = self.sets.get(name) {
                let acc: Vec<String> = s
                    .conditional_acceptance
                    .iter()
                    .map(|a| format!("{a:.2}"))
                    .collect();
                out += &format!(
                    "| {name} | {:?} | {} | {} | {:.3} | {} |\n",
                    s.domain,
                    s.samples,
                    s.rounds,
                    s.tau,
                    acc.join(" ")
                );
            } else if self.missing_sets.iter().any(|m| m == name) {
                out += &format!("| {name} | | missing | | | |\n");
            }
        }
        for (domain, tau) in &self.domain_tau {
            out += &format!("| macro ({domain:?}) | | | | {tau:.3} | |\n");
        }
        out += &format!("| **macro** | | | | **{:.3}** | |\n", self.macro_tau);
        out
    }
}

/// Compares `report` with a baseline report (same JSON schema): returns the lines to print
/// and whether every τ held within `tolerance` (relative drop).
pub fn regression_gate(
    report: &Report,
    baseline_path: &Path,
    tolerance: f64,
) -> anyhow::Result<(Vec<String>, bool)> {
    let text = std::fs::read_to_string(baseline_path)
        .with_context(|| format!("reading baseline {}", baseline_path.display()))?;
    let whole: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", baseline_path.display()))?;
    // A baseline holds one report, or one per algorithm (`{"dspark": {...}, "dflash": {...}}`).
    let baseline = if whole.get("macro_tau").is_some() {
        &whole
    } else {
        whole.get(&report.algorithm).with_context(|| {
            format!(
                "{}: no `macro_tau` and no `{}` section (a baseline is an eval report, or reports keyed by algorithm)",
                baseline_path.display(),
                report.algorithm
            )
        })?
    };
    let base_macro = baseline["macro_tau"].as_f64().with_context(|| {
        format!(
            "{}: field `macro_tau` missing or not a number",
            baseline_path.display()
        )
    })?;
    // (name, baseline τ, current τ or None when the set was not evaluated)
    let mut pairs: Vec<(String, f64, Option<f64>)> =
        vec![("macro_tau".into(), base_macro, Some(report.macro_tau))];
    if let Some(sets) = baseline["sets"].as_object() {
        for (name, set) in sets {
            if let Some(base) = set["tau"].as_f64() {
                pairs.push((name.clone(), base, report.sets.get(name).map(|s| s.tau)));
            }
        }
    }
    let mut lines = Vec::new();
    let mut ok = true;
    for (name, base, now) in pairs {
        let Some(now) = now else {
            ok = false;
            lines.push(format!(
                "FAIL {name}: in the baseline but not evaluated now"
            ));
            continue;
        };
        let drop = if base > 0.0 { (base - now) / base } else { 0.0 };
        let pass = drop <= tolerance;
        ok &= pass;
        lines.push(format!(
            "{} {name}: baseline {base:.4} now {now:.4} ({:+.2}%)",
            if pass { "ok  " } else { "FAIL" },
            -drop * 100.0
        ));
    }
    Ok((lines, ok))
}
