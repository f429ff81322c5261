//! Benchmark prompt sets: `{"turns": [...]}` JSONL files named after the nine sets of the
//! reference's evaluation (DEEPSPEC-SPEC §7).

use anyhow::{bail, Context};
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

pub fn domain_of(name: &str) -> Option<Domain> {
    SETS.iter().find(|(n, _)| *n == name).map(|&(_, d)| d)
}

/// One prompt: its user turns (multi-turn sets feed each answer back before the next turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub turns: Vec<String>,
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

/// Parses one JSONL file; a malformed line is an error naming the file and line.
pub fn read_jsonl(name: &str, path: &Path, limit: Option<usize>) -> anyhow::Result<Dataset> {
    let domain =
        domain_of(name).with_context(|| format!("`{name}` is not one of the benchmark sets"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if limit.is_some_and(|l| samples.len() >= l) {
            break;
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
            Some(turns) => samples.push(Sample { turns }),
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
    limit: Option<usize>,
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
            out.push(Lookup::Found(read_jsonl(&name, &path, limit)?));
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
        let err = read_jsonl("gsm8k", &path, None).unwrap_err().to_string();
        assert!(
            err.contains("gsm8k.jsonl:2") && err.contains("turns"),
            "{err}"
        );
        std::fs::write(&path, "{\"turns\": [\"a\"]}\nnot json\n").unwrap();
        let err = format!("{:#}", read_jsonl("gsm8k", &path, None).unwrap_err());
        assert!(
            err.contains("gsm8k.jsonl:2") && err.contains("not valid JSON"),
            "{err}"
        );
        let sets = load_sets(&dir, &["alpaca".into()], None).unwrap();
        assert!(matches!(&sets[0], Lookup::Missing { name, .. } if name == "alpaca"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
