//! Progress of long work (prepare, train, eval), one way for all three: a bar when stderr is
//! a terminal, plain lines otherwise. indicatif draws nothing when stderr is a file or a pipe
//! (a Slurm or CI log), so without the lines a nine-minute run would print nothing at all.
//!
//! A line reads `LABEL UNIT=POS/TOTAL FIELDS elapsed=… eta=…`, e.g.
//! `train step=10/60 loss=2.3100 draft_tok/s=3410 elapsed=1m05s eta=5m25s`.

use indicatif::{ProgressBar, ProgressStyle};
use std::cell::Cell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// Plain status lines on stderr (stderr is a file or a pipe).
    Lines,
    /// Nothing (`--quiet`, benchmarks).
    Silent,
}

impl ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

/// In [`ProgressMode::Lines`], [`Progress::update`] prints at most one line this often (the
/// first and the last update always print).
pub const LINE_INTERVAL: Duration = Duration::from_secs(10);

/// Progress over `total` units of one phase.
pub struct Progress {
    mode: ProgressMode,
    bar: ProgressBar,
    label: String,
    unit: String,
    /// Where this run started (a resumed run's ETA counts only what it did itself).
    start_position: u64,
    started: Instant,
    last_line: Cell<Option<Instant>>,
}

impl Progress {
    /// `label` names the phase (`train`, `prepare`, a set name), `unit` what is counted.
    pub fn new(mode: ProgressMode, label: &str, total: u64, unit: &str) -> Self {
        let bar = match mode {
            ProgressMode::Bar => ProgressBar::new(total),
            ProgressMode::Lines | ProgressMode::Silent => ProgressBar::hidden(),
        };
        bar.set_length(total);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{prefix:>13}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} (elapsed {{elapsed}}, ETA {{eta}})"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Progress {
            mode,
            bar,
            label: label.to_string(),
            unit: unit.to_string(),
            start_position: 0,
            started: Instant::now(),
            last_line: Cell::new(None),
        }
    }

    /// Work resumed at `position`: the bar starts there and the ETA counts from there.
    pub fn starting_at(self, position: u64) -> Self {
        self.bar.set_position(position);
        Progress {
            start_position: position,
            ..self
        }
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
    }

    pub fn inc(&self, units: u64) {
        self.bar.inc(units);
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    pub fn total(&self) -> u64 {
        self.bar.length().unwrap_or(0)
    }

    /// A status update: the bar's message on a terminal; a status line in a log (at most one
    /// per [`LINE_INTERVAL`], and always the last).
    pub fn update(&self, fields: &str) {
        match self.mode {
            ProgressMode::Bar => self.bar.set_message(fields.to_string()),
            ProgressMode::Lines => {
                let now = Instant::now();
                let due = self
                    .last_line
                    .get()
                    .is_none_or(|last| now - last >= LINE_INTERVAL)
                    || self.position() >= self.total();
                if due {
                    self.last_line.set(Some(now));
                    eprintln!("{}", self.status_line(fields));
                }
            }
            ProgressMode::Silent => {}
        }
    }

    /// A status line in every mode but silent (above the bar on a terminal): one per
    /// training logging step.
    pub fn log(&self, fields: &str) {
        self.println(&self.status_line(fields));
    }

    /// Free text (a warning) in every mode but silent, above the bar on a terminal.
    pub fn println(&self, text: &str) {
        match self.mode {
            ProgressMode::Bar => self.bar.println(text),
            ProgressMode::Lines => eprintln!("{text}"),
            ProgressMode::Silent => {}
        }
    }

    /// `LABEL UNIT=POS/TOTAL FIELDS elapsed=… eta=…`.
    pub fn status_line(&self, fields: &str) -> String {
        status_line(
            &self.label,
            &self.unit,
            self.position(),
            self.total(),
            self.start_position,
            self.started.elapsed(),
            fields,
        )
    }

    /// Clears the bar (the caller prints its own summary).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A status line; the ETA extrapolates this run's pace (`position - start` units in
/// `elapsed`) to the units left, and is `?` before the first unit.
pub fn status_line(
    label: &str,
    unit: &str,
    position: u64,
    total: u64,
    start: u64,
    elapsed: Duration,
    fields: &str,
) -> String {
    let done = position.saturating_sub(start);
    let eta = if done == 0 {
        "?".to_string()
    } else {
        let left = total.saturating_sub(position) as f64;
        duration(Duration::from_secs_f64(
            elapsed.as_secs_f64() / done as f64 * left,
        ))
    };
    let fields = if fields.is_empty() {
        String::new()
    } else {
        format!(" {fields}")
    };
    format!(
        "{label} {unit}={position}/{total}{fields} elapsed={} eta={eta}",
        duration(elapsed)
    )
}

/// `42s`, `5m07s`, `2h03m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_has_position_fields_elapsed_and_eta() {
        let line = status_line(
            "train",
            "step",
            10,
            60,
            0,
            Duration::from_secs(65),
            "loss=2.3100 draft_tok/s=3410",
        );
        assert_eq!(
            line,
            "train step=10/60 loss=2.3100 draft_tok/s=3410 elapsed=1m05s eta=5m25s"
        );
        // Resumed at step 40: 10 steps in 65 s, 10 left.
        let line = status_line("train", "step", 50, 60, 40, Duration::from_secs(65), "");
        assert_eq!(line, "train step=50/60 elapsed=1m05s eta=1m05s");
        let line = status_line("gsm8k", "turns", 0, 5, 0, Duration::ZERO, "tokens=0");
        assert_eq!(line, "gsm8k turns=0/5 tokens=0 elapsed=0s eta=?");
    }

    #[test]
    fn durations_read_as_seconds_minutes_hours() {
        assert_eq!(duration(Duration::from_secs(42)), "42s");
        assert_eq!(duration(Duration::from_secs(307)), "5m07s");
        assert_eq!(duration(Duration::from_secs(7380)), "2h03m");
    }

    #[test]
    fn resumed_progress_starts_at_its_position() {
        let p = Progress::new(ProgressMode::Silent, "train", 60, "step").starting_at(40);
        assert_eq!(p.position(), 40);
        p.set_position(45);
        assert!(p.status_line("").starts_with("train step=45/60 "));
    }
}
