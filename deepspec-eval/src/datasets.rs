//! Benchmark prompt sets: `{"turns": [...]}` JSONL files named after the nine sets of the
//! reference's evaluation (its `eval_datasets/`), subset as its `eval.py` does: a file
//! with more rows than its set's maximum is shuffled with CPython's `random.Random(seed)` and
//! cut to the maximum, so the same seed (980406 by default) picks the reference's prompts in
//! the reference's order; `--limit N` then keeps the first N of that selection.

use anyhow::{bail, Context};
use deepspec_core::sampling::PyRandom;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Math,
    Code,
    Chat,
}

/// The nine sets and their domains, in report order.
pub const SETS: [(&str, Domain); 9] = [
    ("gsm8k", Domain::Math),
    ("math500", Domain::Math),
    ("aime25", Domain::Math),
    ("humaneval", Domain::Code),
    ("mbpp", Domain::Code),
    ("livecodebench", Domain::Code),
    ("mt-bench", Domain::Chat),
    ("alpaca", Domain::Chat),
    ("arena-hard-v2", Domain::Chat),
];

/// The reference's maximum number of samples per set (its `eval.py` task list).
pub fn max_samples(name: &str) -> usize {
    match name {
        "aime25" => 30,
        "humaneval" => 164,
        "mbpp" => 256,
        "mt-bench" => 80,
        _ => 500,
    }
}

pub fn domain_of(name: &str) -> Option<Domain> {
    SETS.iter().find(|(n, _)| *n == name).map(|&(_, d)| d)
}

/// One prompt: its user turns (multi-turn sets feed each answer back before the next turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub turns: Vec<String>,
    /// 0-based row of the file (blank lines not counted), as the reference's Appendix A
    /// lists its selections.
    pub row: usize,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub domain: Domain,
    pub path: PathBuf,
    pub samples: Vec<Sample>,
}

/// Where each requested set stands: loaded, or missing from `dir`.
pub enum Lookup {
    Found(Dataset),
    Missing { name: String, expected: PathBuf },
}

/// Which prompts of a set to decode: the reference's seeded subset, then the first `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub seed: u64,
    pub limit: Option<usize>,
}

/// Parses one JSONL file (a malformed line is an error naming the file and line) and selects
/// its prompts.
pub fn read_jsonl(name: &str, path: &Path, selection: Selection) -> anyhow::Result<Dataset> {
    let mut set = read_rows(name, path)?;
    split_off_unused(name, &mut set.samples, selection.seed);
    if let Some(limit) = selection.limit {
        set.samples.truncate(limit);
    }
    Ok(set)
}

/// The rows of a set that its evaluation never decodes (those past the set's maximum in the
/// seeded shuffle), at most `limit`: in-domain prompts that are safe to train on.
pub fn held_out(
    name: &str,
    path: &Path,
    seed: u64,
    limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    let mut set = read_rows(name, path)?;
    let rows = set.samples.len();
    let mut spare = split_off_unused(name, &mut set.samples, seed);
    if spare.is_empty() {
        bail!(
            "{}: the evaluation uses all {rows} rows of `{name}`, so none is held out (sets with spare rows: gsm8k, mbpp, livecodebench, alpaca, arena-hard-v2)",
            path.display(),
        );
    }
    if let Some(limit) = limit {
        spare.truncate(limit);
    }
    set.samples = spare;
    Ok(set)
}

/// Cuts `samples` to the reference's selection (as its `eval.py` subsets): when there are more than the set's
/// maximum, shuffled with CPython's `random.Random(seed)` and cut to the maximum. Returns the
/// rows cut off, in shuffled order (empty when the whole file is used).
fn split_off_unused(name: &str, samples: &mut Vec<Sample>, seed: u64) -> Vec<Sample> {
    let max = max_samples(name);
    if samples.len() <= max {
        return Vec::new();
    }
    PyRandom::new(seed).shuffle(samples);
    samples.split_off(max)
}

/// Every row of a set's file, in file order.
fn read_rows(name: &str, path: &Path) -> anyhow::Result<Dataset> {
    let domain =
        domain_of(name).with_context(|| format!("`{name}` is not one of the benchmark sets"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let turns = value["turns"]
            .as_array()
            .and_then(|t| {
                t.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|t| !t.is_empty());
        match turns {
            Some(turns) => samples.push(Sample {
                turns,
                row: samples.len(),
            }),
            None => bail!(
                "{}:{}: field `turns` must be a non-empty list of strings (one user message per turn)",
                path.display(),
                i + 1
            ),
        }
    }
    if samples.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(Dataset {
        name: name.to_string(),
        domain,
        path: path.to_path_buf(),
        samples,
    })
}

/// Looks up `names` (all nine when empty) as `<dir>/<name>.jsonl`.
pub fn load_sets(
    dir: &Path,
    names: &[String],
    selection: Selection,
) -> anyhow::Result<Vec<Lookup>> {
    let names: Vec<String> = if names.is_empty() {
        SETS.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        names.to_vec()
    };
    let mut out = Vec::new();
    for name in names {
        if domain_of(&name).is_none() {
            bail!(
                "unknown set `{name}` (known: {})",
                SETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            );
        }
        let path = dir.join(format!("{name}.jsonl"));
        if path.exists() {
            out.push(Lookup::Found(read_jsonl(&name, &path, selection)?));
        } else {
            out.push(Lookup::Missing {
                name,
                expected: path,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = std::env::temp_dir().join(format!("deepspec-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gsm8k.jsonl");
        std::fs::write(&path, "{\"turns\": [\"a\"]}\n{\"turns\": 3}\n").unwrap();
        let all = Selection {
            seed: 980_406,
            limit: None,
        };
        let err = read_jsonl("gsm8k", &path, all).unwrap_err().to_string();
        assert!(
            err.contains("gsm8k.jsonl:2") && err.contains("turns"),
            "{err}"
        );
        std::fs::write(&path, "{\"turns\": [\"a\"]}\nnot json\n").unwrap();
        let err = format!("{:#}", read_jsonl("gsm8k", &path, all).unwrap_err());
        assert!(
            err.contains("gsm8k.jsonl:2") && err.contains("not valid JSON"),
            "{err}"
        );
        let sets = load_sets(&dir, &["alpaca".into()], all).unwrap();
        assert!(matches!(&sets[0], Lookup::Missing { name, .. } if name == "alpaca"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file longer than its set's maximum is cut to the reference's seeded selection
    /// (as the reference's `eval.py` selects: mbpp keeps 256 of 257 rows, leaving out row 121), and
    /// `limit` keeps the head of that selection.
    #[test]
    fn oversized_sets_take_the_reference_selection() {
        let dir = std::env::temp_dir().join(format!("deepspec-sel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mbpp.jsonl");
        let lines: Vec<String> = (0..257)
            .map(|i| format!("{{\"turns\": [\"prompt {i}\"]}}"))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let seed = 980_406;
        let set = read_jsonl("mbpp", &path, Selection { seed, limit: None }).unwrap();
        let rows: Vec<usize> = set.samples.iter().map(|s| s.row).collect();
        assert_eq!(rows.len(), 256);
        assert_eq!(rows[..5], [94, 116, 115, 25, 150]);
        assert!(!rows.contains(&121));
        assert_eq!(set.samples[0].turns, ["prompt 94"]);
        let head = read_jsonl(
            "mbpp",
            &path,
            Selection {
                seed,
                limit: Some(3),
            },
        )
        .unwrap();
        assert_eq!(head.samples, set.samples[..3]);
        let spare = held_out("mbpp", &path, seed, None).unwrap();
        assert_eq!(
            spare.samples.iter().map(|s| s.row).collect::<Vec<_>>(),
            [121]
        );
        // humaneval's maximum is its whole file: file order.
        let path = dir.join("humaneval.jsonl");
        std::fs::write(&path, lines[..10].join("\n")).unwrap();
        let set = read_jsonl(
            "humaneval",
            &path,
            Selection {
                seed,
                limit: Some(4),
            },
        )
        .unwrap();
        assert_eq!(
            set.samples.iter().map(|s| s.row).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let err = held_out("humaneval", &path, seed, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("none is held out"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
