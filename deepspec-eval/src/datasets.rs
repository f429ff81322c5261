//! Prompt sets: `{"turns": [...]}` JSONL files. The nine reference sets are named after the
//! reference's evaluation (its `eval_datasets/`) and subset as its `eval.py` does: a file
//! with more rows than its set's maximum is shuffled with CPython's `random.Random(seed)` and
//! cut to the maximum, so the same seed (980406 by default) picks the reference's prompts in
//! the reference's order; `--limit N` then keeps the first N of that selection. Any other
//! `NAME.jsonl` is a custom set (a team's own traffic): every row in file order, its domain
//! given with `--domain NAME=...`, else `custom`.

use anyhow::{bail, Context};
use deepspec_core::sampling::PyRandom;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Math,
    Code,
    Chat,
    /// A custom set whose domain was not given.
    Custom,
}

impl Domain {
    /// As the report writes it.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Math => "math",
            Domain::Code => "code",
            Domain::Chat => "chat",
            Domain::Custom => "custom",
        }
    }
}

impl std::str::FromStr for Domain {
    type Err = String;

    /// The domains a custom set can be given (`custom` is what it has without one).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "math" => Ok(Domain::Math),
            "code" => Ok(Domain::Code),
            "chat" => Ok(Domain::Chat),
            "custom" => Ok(Domain::Custom),
            _ => Err(format!(
                "`{s}` is not a domain (math, code, chat or custom)"
            )),
        }
    }
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

/// The nine reference sets' names, for messages.
pub fn reference_names() -> String {
    SETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

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

/// A reference set's domain (`None`: not one of the nine).
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

/// A set to evaluate: its name, its file and its domain. A reference set (one of [`SETS`])
/// takes the reference's selection; a custom set every row in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub path: PathBuf,
    pub domain: Domain,
}

impl SetSpec {
    /// `name` in `dir`: a reference set with its domain, else a custom one with `domain`
    /// (`None`: [`Domain::Custom`]).
    pub fn in_dir(dir: &Path, name: &str, domain: Option<Domain>) -> SetSpec {
        SetSpec {
            name: name.to_string(),
            path: dir.join(format!("{name}.jsonl")),
            domain: domain_of(name).or(domain).unwrap_or(Domain::Custom),
        }
    }

    pub fn is_reference(&self) -> bool {
        domain_of(&self.name).is_some()
    }
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
/// its prompts: a reference set's selection, or a custom set's rows in file order (domain
/// [`Domain::Custom`]), then the first `limit`.
pub fn read_jsonl(name: &str, path: &Path, selection: Selection) -> anyhow::Result<Dataset> {
    let domain = domain_of(name).unwrap_or(Domain::Custom);
    read_set(
        &SetSpec {
            name: name.to_string(),
            path: path.to_path_buf(),
            domain,
        },
        selection,
    )
}

fn read_set(spec: &SetSpec, selection: Selection) -> anyhow::Result<Dataset> {
    let mut samples = read_rows(&spec.path)?;
    if spec.is_reference() {
        split_off_unused(&spec.name, &mut samples, selection.seed);
    }
    if let Some(limit) = selection.limit {
        samples.truncate(limit);
    }
    Ok(Dataset {
        name: spec.name.clone(),
        domain: spec.domain,
        path: spec.path.clone(),
        samples,
    })
}

/// The rows of a set that its evaluation never decodes (those past the set's maximum in the
/// seeded shuffle), at most `limit`: in-domain prompts that are safe to train on.
pub fn held_out(
    name: &str,
    path: &Path,
    seed: u64,
    limit: Option<usize>,
) -> anyhow::Result<Dataset> {
    let domain =
        domain_of(name).with_context(|| format!("`{name}` is not one of the benchmark sets"))?;
    let mut samples = read_rows(path)?;
    let rows = samples.len();
    let mut spare = split_off_unused(name, &mut samples, seed);
    if spare.is_empty() {
        bail!(
            "{}: the evaluation uses all {rows} rows of `{name}`, so none is held out (sets with spare rows: gsm8k, mbpp, livecodebench, alpaca, arena-hard-v2)",
            path.display(),
        );
    }
    if let Some(limit) = limit {
        spare.truncate(limit);
    }
    Ok(Dataset {
        name: name.to_string(),
        domain,
        path: path.to_path_buf(),
        samples: spare,
    })
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
fn read_rows(path: &Path) -> anyhow::Result<Vec<Sample>> {
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
    Ok(samples)
}

/// Reads each set of `specs`; a reference set without its file is [`Lookup::Missing`] (the
/// report lists it), a custom set without its file an error.
pub fn load_sets(specs: &[SetSpec], selection: Selection) -> anyhow::Result<Vec<Lookup>> {
    let mut out = Vec::new();
    for spec in specs {
        if spec.path.exists() {
            out.push(Lookup::Found(read_set(spec, selection)?));
        } else if spec.is_reference() {
            out.push(Lookup::Missing {
                name: spec.name.clone(),
                expected: spec.path.clone(),
            });
        } else {
            bail!(
                "set `{}`: {} does not exist (a custom set is a file of `{{\"turns\": [...]}}` lines)",
                spec.name,
                spec.path.display()
            );
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
        let sets = load_sets(&[SetSpec::in_dir(&dir, "alpaca", None)], all).unwrap();
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

    /// A file under any other name is a custom set: every row in file order (no reference
    /// shuffle, however long), the domain given or `custom`; without its file, an error
    /// naming the file.
    #[test]
    fn custom_sets_take_rows_in_file_order() {
        let dir = std::env::temp_dir().join(format!("deepspec-custom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines: Vec<String> = (0..600)
            .map(|i| format!("{{\"turns\": [\"prompt {i}\"]}}"))
            .collect();
        std::fs::write(dir.join("aime24.jsonl"), lines.join("\n")).unwrap();
        let all = Selection {
            seed: 980_406,
            limit: None,
        };
        let specs = [
            SetSpec::in_dir(&dir, "aime24", None),
            SetSpec::in_dir(&dir, "aime24", Some(Domain::Math)),
        ];
        assert_eq!(specs[0].domain, Domain::Custom);
        let sets = load_sets(&specs, all).unwrap();
        let Lookup::Found(set) = &sets[0] else {
            panic!("aime24 not found")
        };
        assert_eq!(set.samples.len(), 600);
        assert!(set.samples.iter().enumerate().all(|(i, s)| s.row == i));
        assert!(matches!(&sets[1], Lookup::Found(d) if d.domain == Domain::Math));
        let head = read_jsonl(
            "aime24",
            &dir.join("aime24.jsonl"),
            Selection {
                limit: Some(2),
                ..all
            },
        )
        .unwrap();
        assert_eq!(head.domain, Domain::Custom);
        assert_eq!(head.samples[1].turns, ["prompt 1"]);
        // A reference set's domain is its own, whatever is asked.
        assert_eq!(
            SetSpec::in_dir(&dir, "gsm8k", Some(Domain::Code)).domain,
            Domain::Math
        );
        let err = load_sets(&[SetSpec::in_dir(&dir, "lbpp", None)], all)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("set `lbpp`")
                && err.contains("lbpp.jsonl")
                && err.contains("does not exist"),
            "{err}"
        );
        assert_eq!("code".parse::<Domain>(), Ok(Domain::Code));
        assert!("poetry"
            .parse::<Domain>()
            .unwrap_err()
            .contains("math, code, chat"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
