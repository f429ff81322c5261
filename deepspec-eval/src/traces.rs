//! `deepspec eval --traces FILE.jsonl`: one JSON object per line, so a τ gap against another
//! engine or the reference can be found round by round (docs/eval-report.md lists the
//! fields). Written under a temporary name and renamed into place when the eval finishes.

use crate::engine::DecodeTrace;
use deepspec_core::io::atomic::PendingFile;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// One verification round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord<'a> {
    /// Always `"round"`.
    pub kind: &'static str,
    /// `"online"` or `"offline"`.
    pub mode: &'static str,
    pub set: &'a str,
    /// The prompt's index in its set (offline: the sample's index in the cache).
    pub prompt: usize,
    /// The conversation turn (always 0 offline).
    pub turn: usize,
    pub round: usize,
    /// Position of the token the round starts from.
    pub position: usize,
    /// The draft tokens verified.
    pub proposed: &'a [u32],
    /// Draft tokens accepted (offline: the greedy prefix, T = 0).
    pub accepted: usize,
    /// The target's token after the accepted ones (online; offline: the cache's token there).
    pub bonus: Option<u32>,
    /// σ of the confidence head at each slot (empty without one).
    pub confidences: Vec<f64>,
    /// Offline only: the expected accepted length at T = 1 and the per-slot acceptance
    /// probabilities behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_accepted: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_probability: Option<&'a [f64]>,
}

/// One prompt's (turn's) result.
#[derive(Debug, Clone, Serialize)]
pub struct PromptRecord<'a> {
    /// Always `"prompt"`.
    pub kind: &'static str,
    pub mode: &'static str,
    pub set: &'a str,
    pub prompt: usize,
    pub turn: usize,
    /// Prompt then output (offline: the cached sample).
    pub output_ids: &'a [u32],
    pub prompt_len: usize,
    /// The generated text (offline: the whole sample), special tokens kept.
    pub text: String,
    pub rounds: usize,
    pub tau: f64,
}

/// A traces file being written.
pub struct TraceWriter {
    pending: PendingFile,
    out: BufWriter<File>,
}

fn sigmoid(z: f32) -> f64 {
    1.0 / (1.0 + (-(z as f64)).exp())
}

impl TraceWriter {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let (pending, file) = PendingFile::create(path)?;
        Ok(TraceWriter {
            pending,
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &impl Serialize) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    /// An online decode: each round, then the prompt's line.
    pub fn online(
        &mut self,
        set: &str,
        prompt: usize,
        turn: usize,
        trace: &DecodeTrace,
        text: String,
    ) -> anyhow::Result<()> {
        for (i, r) in trace.rounds.iter().enumerate() {
            self.write(&RoundRecord {
                kind: "round",
                mode: "online",
                set,
                prompt,
                turn,
                round: i,
                position: r.start,
                proposed: r.verify_input_ids.get(1..).unwrap_or_default(),
                accepted: r.accepted,
                bonus: (!r.terminated_by_stop).then_some(r.next_token),
                confidences: r.confidence_logits.iter().map(|&z| sigmoid(z)).collect(),
                expected_accepted: None,
                accept_probability: None,
            })?;
        }
        let rounds = trace.rounds.len();
        let tokens: usize = trace.acceptance_lengths().iter().sum();
        self.write(&PromptRecord {
            kind: "prompt",
            mode: "online",
            set,
            prompt,
            turn,
            output_ids: &trace.output_ids,
            prompt_len: trace.prompt_len,
            text,
            rounds,
            tau: tokens as f64 / rounds.max(1) as f64,
        })
    }

    /// Flushes, makes the file durable and renames it into place.
    pub fn finish(self) -> anyhow::Result<()> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing traces: {}", e.error()))?;
        Ok(self.pending.commit(file)?)
    }
}
