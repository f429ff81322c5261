//! An evaluation as typed parts, translated once (ripgrep's `LowArgs` → `HiArgs`): the
//! command line's choices win, then the recipe's `[eval]` section, then the reference's
//! defaults. [`EvalPlan::from_recipe`] decides everything that needs no weights;
//! [`EvalPlan::decode_params`] finishes the engine's parameters once the target's tokenizer
//! and the drafter's config are loaded.

use crate::datasets::{domain_of, reference_names, Domain, Selection, SetSpec, SETS};
use crate::engine::DecodeParams;
use deepspec_core::drafter::DrafterConfig;
use deepspec_core::generate::{stop_ids, StopTokenError};
use deepspec_core::io::chat::ChatTemplate;
use deepspec_core::io::tokenizer::Tok;
use deepspec_core::recipe::{EvalSection, Recipe};
use std::path::{Path, PathBuf};

/// Why the choices and the recipe do not make an evaluation. Each names the flag or recipe
/// field to fix.
#[derive(Debug, thiserror::Error)]
pub enum EvalPlanError {
    #[error("name the target with --recipe (its [model] target_model_name_or_path) or --target")]
    NoTarget,
    #[error("name the prompts to decode with --datasets DIR (its sets, or those --sets names) or --prompts FILE")]
    NoPrompts,
    #[error("{source_name}: {detail}")]
    Invalid { source_name: String, detail: String },
    #[error("{recipe}: {source}")]
    StopToken {
        recipe: String,
        #[source]
        source: StopTokenError,
    },
}

/// What the command line chose; `None` (and an empty `sets`) defer to the recipe, then the
/// defaults.
#[derive(Debug, Clone, Default)]
pub struct EvalChoices {
    /// `--target`, else the recipe's `model.target_model_name_or_path`.
    pub target: Option<PathBuf>,
    /// `--datasets`: the folder of `NAME.jsonl` files `sets` names.
    pub datasets: Option<PathBuf>,
    /// Set names in `datasets`; empty: all nine reference sets.
    pub sets: Vec<String>,
    /// `--prompts`: one more set, named by the file's stem.
    pub prompts: Option<PathBuf>,
    /// `--domain NAME=DOMAIN`: custom sets' domains (others are `custom`).
    pub domains: Vec<(String, Domain)>,
    pub limit: Option<usize>,
    pub temperature: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub confidence_threshold: Option<f64>,
    pub seed: Option<u64>,
    /// Prompts decoded together (0 is read as 1).
    pub batch_size: usize,
}

/// Everything an evaluation needs besides the device and the loaded models.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPlan {
    pub target: PathBuf,
    /// The recipe the plan was made from, for error messages.
    pub recipe_path: Option<PathBuf>,
    /// The sets, in the order given: reference sets (possibly missing, then reported as
    /// such) and custom sets whose files exist.
    pub sets: Vec<SetSpec>,
    /// At most this many prompts per set (see [`EvalPlan::selection`]).
    pub limit: Option<usize>,
    /// 0 = greedy.
    pub temperature: f32,
    pub max_new_tokens: usize,
    /// DSpark: a block stops at the first slot whose confidence is below this.
    pub confidence_threshold: f64,
    /// Seeds the prompt selection and each prompt's generator.
    pub seed: u64,
    pub batch_size: usize,
    /// The recipe's `prepare.stop_tokens`: answers end where the training answers ended.
    pub stop_tokens: Vec<String>,
    /// Confidence thresholds of the report's sweep (0, 0.05, …, 1).
    pub sweep_thresholds: Vec<f64>,
}

/// The sets `--datasets`/`--sets` and `--prompts` name, with the domains `--domain` gives.
fn plan_sets(choices: &EvalChoices) -> Result<Vec<SetSpec>, EvalPlanError> {
    let invalid = |flag: &str, detail: String| EvalPlanError::Invalid {
        source_name: flag.to_string(),
        detail,
    };
    let domain_for = |name: &str| {
        choices
            .domains
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|&(_, d)| d)
    };
    let mut sets = Vec::new();
    match &choices.datasets {
        Some(dir) => {
            let names: Vec<String> = if choices.sets.is_empty() {
                SETS.iter().map(|(n, _)| n.to_string()).collect()
            } else {
                choices.sets.clone()
            };
            for name in names {
                let spec = SetSpec::in_dir(dir, &name, domain_for(&name));
                if !spec.is_reference() && !spec.path.exists() {
                    return Err(invalid(
                        "--sets",
                        format!(
                            "unknown set `{name}`: {} does not exist (reference sets: {}; any NAME.jsonl in --datasets is evaluated as a custom set)",
                            spec.path.display(),
                            reference_names()
                        ),
                    ));
                }
                sets.push(spec);
            }
        }
        None if !choices.sets.is_empty() => {
            return Err(invalid(
                "--sets",
                "names files of --datasets DIR, which is not given (a single file: --prompts FILE)"
                    .into(),
            ))
        }
        None => {}
    }
    if let Some(file) = &choices.prompts {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                invalid(
                    "--prompts",
                    format!(
                        "{}: the file's name names the set; give it one",
                        file.display()
                    ),
                )
            })?
            .to_string();
        if !file.is_file() {
            return Err(invalid(
                "--prompts",
                format!("{} does not exist", file.display()),
            ));
        }
        if sets.iter().any(|s| s.name == name) {
            return Err(invalid(
                "--prompts",
                format!(
                    "{}: a set named `{name}` already comes from --datasets; rename the file or leave `{name}` out of --sets",
                    file.display()
                ),
            ));
        }
        sets.push(SetSpec {
            domain: domain_of(&name)
                .or(domain_for(&name))
                .unwrap_or(Domain::Custom),
            name,
            path: file.clone(),
        });
    }
    if sets.is_empty() {
        return Err(EvalPlanError::NoPrompts);
    }
    for (name, _) in &choices.domains {
        if let Some(domain) = domain_of(name) {
            return Err(invalid(
                "--domain",
                format!(
                    "`{name}` is a reference set (domain {}); --domain gives a custom set's domain",
                    domain.name()
                ),
            ));
        }
        if !sets.iter().any(|s| &s.name == name) {
            return Err(invalid(
                "--domain",
                format!(
                    "no set `{name}` is evaluated (sets: {})",
                    sets.iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(sets)
}

impl EvalPlan {
    /// `recipe` is the recipe and its path, when one was given.
    pub fn from_recipe(
        recipe: Option<(&Path, &Recipe)>,
        choices: EvalChoices,
    ) -> Result<EvalPlan, EvalPlanError> {
        let defaults = recipe.map(|(_, r)| r.eval.clone()).unwrap_or_default();
        let target = match (choices.target.clone(), recipe) {
            (Some(t), _) => t,
            (None, Some((_, r))) => r.model.target_model_name_or_path.clone(),
            (None, None) => return Err(EvalPlanError::NoTarget),
        };
        // Names where a value came from, so an error says which flag or field to change.
        let from = |flag: &str, field: &str, chosen: bool| -> String {
            match (chosen, recipe) {
                (true, _) => flag.to_string(),
                (false, Some((path, _))) => format!("{}: field `eval.{field}`", path.display()),
                (false, None) => format!("the default {field}"),
            }
        };
        let invalid = |source_name: String, detail: String| EvalPlanError::Invalid {
            source_name,
            detail,
        };
        let EvalSection {
            temperature,
            max_new_tokens,
            confidence_threshold,
            seed,
        } = defaults;
        let plan = EvalPlan {
            target,
            recipe_path: recipe.map(|(p, _)| p.to_path_buf()),
            sets: plan_sets(&choices)?,
            limit: choices.limit,
            temperature: choices.temperature.unwrap_or(temperature),
            max_new_tokens: choices.max_new_tokens.unwrap_or(max_new_tokens),
            confidence_threshold: choices.confidence_threshold.unwrap_or(confidence_threshold),
            seed: choices.seed.unwrap_or(seed),
            batch_size: choices.batch_size.max(1),
            stop_tokens: recipe
                .map(|(_, r)| r.prepare.stop_tokens.clone())
                .unwrap_or_default(),
            sweep_thresholds: (0..=20).map(|i| i as f64 / 20.0).collect(),
        };
        if !(plan.temperature.is_finite() && plan.temperature >= 0.0) {
            return Err(invalid(
                from(
                    "--temperature",
                    "temperature",
                    choices.temperature.is_some(),
                ),
                format!("{} must be 0 (greedy) or positive", plan.temperature),
            ));
        }
        if plan.max_new_tokens == 0 {
            return Err(invalid(
                from(
                    "--max-new-tokens",
                    "max_new_tokens",
                    choices.max_new_tokens.is_some(),
                ),
                "must be positive".into(),
            ));
        }
        if !(0.0..=1.0).contains(&plan.confidence_threshold) {
            return Err(invalid(
                from(
                    "--confidence-threshold",
                    "confidence_threshold",
                    choices.confidence_threshold.is_some(),
                ),
                format!(
                    "{} is outside [0, 1] (0 = full blocks)",
                    plan.confidence_threshold
                ),
            ));
        }
        Ok(plan)
    }

    /// Which prompts of each set: the reference's subset shuffled with `seed`, then the
    /// first `limit`.
    pub fn selection(&self) -> Selection {
        Selection {
            seed: self.seed,
            limit: self.limit,
        }
    }

    /// The engine's parameters for the loaded target (its stop ids) and drafter (the layers
    /// it reads).
    pub fn decode_params(
        &self,
        tok: &Tok,
        template: &ChatTemplate,
        drafter: &DrafterConfig,
    ) -> Result<DecodeParams, EvalPlanError> {
        let stop_ids =
            stop_ids(tok, template.format.as_ref(), &self.stop_tokens).map_err(|source| {
                EvalPlanError::StopToken {
                    recipe: self
                        .recipe_path
                        .as_ref()
                        .map_or("the recipe".into(), |p| p.display().to_string()),
                    source,
                }
            })?;
        Ok(DecodeParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            confidence_threshold: self.confidence_threshold,
            stop_ids,
            target_layer_ids: drafter.target_layer_ids.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = "[model]\ntarget_model_name_or_path = \"t.gguf\"\ntarget_layer_ids = [0, 2]\n[eval]\ntemperature = 0.0\nmax_new_tokens = 64\n";

    fn recipe() -> Recipe {
        Recipe::parse(Path::new("r.toml"), RECIPE).unwrap()
    }

    #[test]
    fn flags_win_over_the_recipe_which_wins_over_defaults() {
        let r = recipe();
        let plan = EvalPlan::from_recipe(
            Some((Path::new("r.toml"), &r)),
            EvalChoices {
                max_new_tokens: Some(8),
                datasets: Some("sets".into()),
                sets: vec!["gsm8k".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plan.target, Path::new("t.gguf"));
        assert_eq!(plan.temperature, 0.0);
        assert_eq!(plan.max_new_tokens, 8);
        assert_eq!(plan.seed, 980406);
        assert_eq!(plan.selection().seed, 980406);
        assert_eq!(
            plan.sets,
            [SetSpec {
                name: "gsm8k".into(),
                path: Path::new("sets").join("gsm8k.jsonl"),
                domain: Domain::Math,
            }]
        );
        assert_eq!(plan.batch_size, 1);
        assert_eq!(plan.sweep_thresholds.len(), 21);
    }

    #[test]
    fn no_recipe_needs_a_target_and_takes_all_sets() {
        assert!(matches!(
            EvalPlan::from_recipe(None, EvalChoices::default()),
            Err(EvalPlanError::NoTarget)
        ));
        let plan = EvalPlan::from_recipe(
            None,
            EvalChoices {
                target: Some("m.gguf".into()),
                datasets: Some("sets".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plan.sets.len(), 9);
        assert_eq!(plan.temperature, 1.0);
    }

    #[test]
    fn bad_values_name_the_flag_or_the_field() {
        let r = recipe();
        let with = |choices: EvalChoices| {
            EvalPlan::from_recipe(Some((Path::new("r.toml"), &r)), choices)
                .unwrap_err()
                .to_string()
        };
        let err = with(EvalChoices {
            datasets: Some("no-such-dir".into()),
            sets: vec!["gsm9k".into()],
            ..Default::default()
        });
        assert!(
            err.contains("--sets") && err.contains("unknown set `gsm9k`") && err.contains("gsm8k"),
            "{err}"
        );
        let err = with(EvalChoices {
            datasets: Some("d".into()),
            temperature: Some(-1.0),
            ..Default::default()
        });
        assert!(err.contains("--temperature"), "{err}");
        let bad = Recipe::parse(
            Path::new("r.toml"),
            &format!("{RECIPE}confidence_threshold = 2.0\n"),
        )
        .unwrap();
        let err = EvalPlan::from_recipe(
            Some((Path::new("r.toml"), &bad)),
            EvalChoices {
                datasets: Some("d".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("r.toml") && err.contains("eval.confidence_threshold"),
            "{err}"
        );
    }

    /// Any `NAME.jsonl` in `--datasets` and a `--prompts FILE` are custom sets, with the
    /// domain `--domain` gives or `custom`; reference sets keep theirs.
    #[test]
    fn custom_sets_from_the_folder_and_a_prompts_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["aime24", "lbpp", "traffic"] {
            std::fs::write(
                dir.path().join(format!("{name}.jsonl")),
                "{\"turns\": [\"q\"]}\n",
            )
            .unwrap();
        }
        let file = dir.path().join("traffic.jsonl");
        let choose = |choices: EvalChoices| {
            EvalPlan::from_recipe(
                None,
                EvalChoices {
                    target: Some("m.gguf".into()),
                    ..choices
                },
            )
        };
        let plan = choose(EvalChoices {
            datasets: Some(dir.path().into()),
            sets: vec!["aime24".into(), "lbpp".into(), "gsm8k".into()],
            domains: vec![("lbpp".into(), Domain::Code)],
            ..Default::default()
        })
        .unwrap();
        let got: Vec<(&str, Domain)> = plan
            .sets
            .iter()
            .map(|s| (s.name.as_str(), s.domain))
            .collect();
        assert_eq!(
            got,
            [
                ("aime24", Domain::Custom),
                ("lbpp", Domain::Code),
                ("gsm8k", Domain::Math)
            ]
        );
        let plan = choose(EvalChoices {
            prompts: Some(file.clone()),
            domains: vec![("traffic".into(), Domain::Chat)],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            plan.sets,
            [SetSpec {
                name: "traffic".into(),
                path: file.clone(),
                domain: Domain::Chat
            }]
        );
        let err = |choices: EvalChoices| choose(choices).unwrap_err().to_string();
        let e = err(EvalChoices {
            datasets: Some(dir.path().into()),
            sets: vec!["aime24".into()],
            domains: vec![("gsm8k".into(), Domain::Code)],
            ..Default::default()
        });
        assert!(
            e.contains("--domain") && e.contains("`gsm8k` is a reference set"),
            "{e}"
        );
        let e = err(EvalChoices {
            prompts: Some(file.clone()),
            domains: vec![("lbpp".into(), Domain::Code)],
            ..Default::default()
        });
        assert!(
            e.contains("--domain") && e.contains("no set `lbpp`") && e.contains("traffic"),
            "{e}"
        );
        let e = err(EvalChoices {
            sets: vec!["aime24".into()],
            ..Default::default()
        });
        assert!(e.contains("--sets") && e.contains("--datasets"), "{e}");
        let e = err(EvalChoices::default());
        assert!(
            e.contains("--datasets DIR") && e.contains("--prompts FILE"),
            "{e}"
        );
        let e = err(EvalChoices {
            prompts: Some(dir.path().join("nope.jsonl")),
            ..Default::default()
        });
        assert!(
            e.contains("--prompts") && e.contains("nope.jsonl does not exist"),
            "{e}"
        );
        let e = err(EvalChoices {
            datasets: Some(dir.path().into()),
            sets: vec!["traffic".into()],
            prompts: Some(file),
            ..Default::default()
        });
        assert!(
            e.contains("a set named `traffic` already comes from --datasets"),
            "{e}"
        );
    }
}
