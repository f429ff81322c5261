//! The reference's decoding traces (golden `<algo>/eval_traces.json`, and the Gemma4 set's):
//! greedy runs reproduced exactly, temperature-1 runs replayed with the recorded draws.

use burn::backend::Flex;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::fixtures::{golden_dir, golden_gemma4_dir};
use deepspec_core::model::{load_target, LoadedTarget};
use deepspec_core::sampling::{Rng, Sampler};
use deepspec_eval::engine::{decode, decode_batch, DecodeParams, DecodeTrace};
use deepspec_eval::proposer::{DSparkProposer, Eagle3Proposer, Proposer};
use serde_json::Value;
use std::collections::VecDeque;
use std::path::Path;

type B = Flex;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Replays a recorded run: every token draw returns the recorded token, every uniform the
/// recorded `u`; the probabilities our models give those tokens are kept for comparison.
struct Replay {
    tokens: VecDeque<u32>,
    uniforms: VecDeque<f64>,
}

impl Sampler for Replay {
    fn uniform(&mut self) -> f64 {
        self.uniforms
            .pop_front()
            .expect("more uniforms drawn than recorded")
    }
    fn sample(&mut self, _probs: &[f64]) -> u32 {
        self.tokens
            .pop_front()
            .expect("more tokens drawn than recorded")
    }
}

fn decode_params(run: &Value, config: &DrafterConfig) -> DecodeParams {
    DecodeParams {
        max_new_tokens: run["max_new_tokens"].as_u64().unwrap() as usize,
        temperature: run["temperature"].as_f64().unwrap() as f32,
        confidence_threshold: run["confidence_threshold"].as_f64().unwrap_or(0.0),
        stop_ids: run["stop_token_ids"]
            .as_array()
            .map(|_| ids(&run["stop_token_ids"]))
            .unwrap_or_default(),
        target_layer_ids: config.target_layer_ids.to_vec(),
    }
}

fn new_proposer<'m>(drafter: &'m Drafter<B>, config: &DrafterConfig) -> Box<dyn Proposer<B> + 'm> {
    let rope = config.base.rope();
    match drafter {
        Drafter::DSpark(m) => Box::new(DSparkProposer::new(
            m,
            rope,
            config.block_size,
            config.mask_token_id.unwrap(),
        )),
        Drafter::DSparkGemma4(m) => Box::new(DSparkProposer::new(
            m,
            rope,
            config.block_size,
            config.mask_token_id.unwrap(),
        )),
        Drafter::Eagle3(m) => Box::new(Eagle3Proposer::new(m, rope, config.block_size)),
        Drafter::Eagle3Gemma4(m) => Box::new(Eagle3Proposer::new(m, rope, config.block_size)),
        Drafter::DSparkV4(_) => unreachable!("no DeepSeek-V4 fixture has decoding traces"),
    }
}

fn run_decode(
    target: &LoadedTarget<B>,
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    run: &Value,
    prompt: &Value,
    sampler: &mut dyn Sampler,
) -> DecodeTrace {
    let mut proposer = new_proposer(drafter, config);
    decode(
        target,
        proposer.as_mut(),
        &ids(&prompt["prompt_ids"]),
        &decode_params(run, config),
        sampler,
    )
}

/// The draws a recorded run made, in order: the first token, then per round the drafts, the
/// next token and the acceptance uniforms.
fn replay_of(prompt: &Value) -> Replay {
    let prompt_len = prompt["prompt_ids"].as_array().unwrap().len();
    let output = ids(&prompt["output_ids"]);
    let mut tokens = VecDeque::from([output[prompt_len]]);
    let mut uniforms = VecDeque::new();
    for r in prompt["rounds"].as_array().unwrap() {
        tokens.extend(ids(&r["verify_input_ids"])[1..].iter().copied());
        tokens.push_back(r["next_token"].as_u64().unwrap() as u32);
        uniforms.extend(
            r["u"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_f64().unwrap()),
        );
    }
    Replay { tokens, uniforms }
}

/// The golden target, one algorithm's drafter and config, and its recorded traces.
fn fixture(golden: &Path, algo: &str) -> (LoadedTarget<B>, Drafter<B>, DrafterConfig, Value) {
    let target = load_target::<B>(&golden.join("target"), &Default::default()).unwrap();
    let (drafter, config) = Drafter::<B>::load(&golden.join(algo), &Default::default()).unwrap();
    let traces: Value = serde_json::from_str(
        &std::fs::read_to_string(golden.join(algo).join("eval_traces.json")).unwrap(),
    )
    .unwrap();
    (target, drafter, config, traces)
}

fn check_greedy_runs(golden: &Path, algo: &str) {
    let (target, drafter, config, traces) = fixture(golden, algo);
    let mut runs = 0;
    for (name, run) in traces.as_object().unwrap() {
        if run["temperature"].as_f64().unwrap() != 0.0 {
            continue;
        }
        runs += 1;
        for prompt in run["prompts"].as_array().unwrap() {
            let mut rng = Rng::new(prompt["seed"].as_u64().unwrap());
            let trace = run_decode(&target, &drafter, &config, run, prompt, &mut rng);
            for (i, (ours, theirs)) in trace
                .rounds
                .iter()
                .zip(prompt["rounds"].as_array().unwrap())
                .enumerate()
            {
                assert_eq!(
                    ours.start,
                    theirs["start"].as_u64().unwrap() as usize,
                    "{algo}/{name} round {i}: start"
                );
                assert_eq!(
                    ours.verify_input_ids,
                    ids(&theirs["verify_input_ids"]),
                    "{algo}/{name} round {i}: proposal"
                );
                if let Some(conf) = theirs["confidence_logits"].as_array() {
                    for (a, b) in ours.confidence_logits.iter().zip(conf) {
                        assert!(
                            (*a as f64 - b.as_f64().unwrap()).abs() < 1e-4,
                            "{algo}/{name} round {i}: confidence logit {a} vs {b}"
                        );
                    }
                }
            }
            assert_eq!(
                trace.output_ids,
                ids(&prompt["output_ids"]),
                "{algo}/{name}: output ids"
            );
            assert_eq!(
                trace.acceptance_lengths(),
                usizes(&prompt["acceptance_lengths"]),
                "{algo}/{name}: acceptance lengths"
            );
            let proposal_lengths: Vec<usize> = trace
                .rounds
                .iter()
                .map(|r| r.effective_proposal_length)
                .collect();
            assert_eq!(
                proposal_lengths,
                usizes(&prompt["proposal_lengths"]),
                "{algo}/{name}: proposal lengths"
            );
        }
    }
    assert!(runs >= 2, "{algo}: expected greedy runs in the traces");
}

fn check_temperature_replay(golden: &Path, algo: &str) {
    let (target, drafter, config, traces) = fixture(golden, algo);
    let run = &traces["temp1"];
    let mut worst = 0.0f64;
    for prompt in run["prompts"].as_array().unwrap() {
        let output = ids(&prompt["output_ids"]);
        let mut replay = replay_of(prompt);
        let trace = run_decode(&target, &drafter, &config, run, prompt, &mut replay);
        let recorded = prompt["rounds"].as_array().unwrap();
        assert_eq!(
            trace.rounds.len(),
            recorded.len(),
            "{algo}: number of rounds"
        );
        for (i, (ours, theirs)) in trace.rounds.iter().zip(recorded).enumerate() {
            assert_eq!(
                ours.accepted,
                theirs["accepted_draft_tokens"].as_u64().unwrap() as usize,
                "{algo} temp1 round {i}: accepted"
            );
            for (key, values) in [
                ("p_target_at_proposed", &ours.p_target),
                ("q_draft_at_proposed", &ours.q_draft),
            ] {
                for (a, b) in values.iter().zip(theirs[key].as_array().unwrap()) {
                    let b = b.as_f64().unwrap();
                    let rel = (a - b).abs() / b.abs().max(1e-6);
                    worst = worst.max(rel);
                    assert!(rel < 1e-3, "{algo} temp1 round {i}: {key} {a} vs {b}");
                }
            }
        }
        assert_eq!(trace.output_ids, output, "{algo} temp1: output ids");
    }
    eprintln!("{algo} temp1: worst relative difference of p/q {worst:.2e}");
}

/// Every recorded run with all its prompts decoded as one batch, plus the first prompt cut
/// short by one token so that the batch mixes prompt lengths whatever the fixture holds:
/// each recorded row reproduces its recorded trace, and every row (the extra one included)
/// makes the same token decisions as it does alone.
fn check_batched(golden: &Path, algo: &str) {
    let (target, drafter, config, traces) = fixture(golden, algo);
    for (name, run) in traces.as_object().unwrap() {
        let params = decode_params(run, &config);
        let prompts = run["prompts"].as_array().unwrap();
        let mut prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["prompt_ids"])).collect();
        let shorter = prompt_ids[0][..prompt_ids[0].len() - 1].to_vec();
        prompt_ids.push(shorter);
        let greedy = run["temperature"].as_f64().unwrap() == 0.0;
        // Row i draws as prompt i was recorded; the extra row from a seeded generator.
        let sampler = |i: usize| -> Box<dyn Sampler> {
            match prompts.get(i) {
                Some(p) if greedy => Box::new(Rng::new(p["seed"].as_u64().unwrap())),
                Some(p) => Box::new(replay_of(p)),
                None => Box::new(Rng::new(7)),
            }
        };
        let mut samplers: Vec<Box<dyn Sampler>> = (0..prompt_ids.len()).map(sampler).collect();
        let mut boxed: Vec<_> = prompt_ids
            .iter()
            .map(|_| new_proposer(&drafter, &config))
            .collect();
        let mut proposers: Vec<&mut dyn Proposer<B>> =
            boxed.iter_mut().map(|p| p.as_mut() as _).collect();
        let mut sampler_refs: Vec<&mut dyn Sampler> =
            samplers.iter_mut().map(|s| s.as_mut() as _).collect();
        let decoded = decode_batch(
            &target,
            &mut proposers,
            &prompt_ids,
            &params,
            &mut sampler_refs,
        );
        for (i, trace) in decoded.iter().enumerate() {
            let mut proposer = new_proposer(&drafter, &config);
            let alone = decode(
                &target,
                proposer.as_mut(),
                &prompt_ids[i],
                &params,
                sampler(i).as_mut(),
            );
            // Token decisions must agree exactly; probabilities may differ in the last bits
            // (the batched matmuls block differently).
            let decisions = |t: &DecodeTrace| {
                let rounds: Vec<_> = t
                    .rounds
                    .iter()
                    .map(|r| {
                        (
                            r.start,
                            r.verify_input_ids.clone(),
                            r.accepted,
                            r.next_token,
                        )
                    })
                    .collect();
                (t.output_ids.clone(), rounds)
            };
            assert_eq!(
                decisions(trace),
                decisions(&alone),
                "{algo}/{name} row {i}: batched differs from alone"
            );
            let Some(prompt) = prompts.get(i) else {
                continue;
            };
            assert_eq!(
                trace.output_ids,
                ids(&prompt["output_ids"]),
                "{algo}/{name} row {i}: output ids"
            );
            assert_eq!(
                trace.acceptance_lengths(),
                usizes(&prompt["acceptance_lengths"]),
                "{algo}/{name} row {i}: acceptance lengths"
            );
            let proposed: Vec<Vec<u32>> = trace
                .rounds
                .iter()
                .map(|r| r.verify_input_ids.clone())
                .collect();
            let recorded: Vec<Vec<u32>> = prompt["rounds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| ids(&r["verify_input_ids"]))
                .collect();
            assert_eq!(proposed, recorded, "{algo}/{name} row {i}: proposals");
        }
    }
}

#[test]
fn golden_dspark_trace_batched() {
    check_batched(&golden_dir(), "dspark");
}

#[test]
fn golden_dflash_trace_batched() {
    check_batched(&golden_dir(), "dflash");
}

#[test]
fn golden_eagle3_trace_batched() {
    check_batched(&golden_dir(), "eagle3");
}

#[test]
fn golden_dspark_trace_greedy() {
    check_greedy_runs(&golden_dir(), "dspark");
}

#[test]
fn golden_dflash_trace_greedy() {
    check_greedy_runs(&golden_dir(), "dflash");
}

#[test]
fn golden_eagle3_trace_greedy() {
    check_greedy_runs(&golden_dir(), "eagle3");
}

#[test]
fn golden_dspark_trace_temperature_replay() {
    check_temperature_replay(&golden_dir(), "dspark");
}

#[test]
fn golden_dflash_trace_temperature_replay() {
    check_temperature_replay(&golden_dir(), "dflash");
}

#[test]
fn golden_eagle3_trace_temperature_replay() {
    check_temperature_replay(&golden_dir(), "eagle3");
}

#[test]
fn golden_gemma4_dspark_trace_greedy() {
    check_greedy_runs(&golden_gemma4_dir(), "dspark");
}

#[test]
fn golden_gemma4_dflash_trace_greedy() {
    check_greedy_runs(&golden_gemma4_dir(), "dflash");
}

#[test]
fn golden_gemma4_dspark_trace_temperature_replay() {
    check_temperature_replay(&golden_gemma4_dir(), "dspark");
}

#[test]
fn golden_gemma4_dflash_trace_temperature_replay() {
    check_temperature_replay(&golden_gemma4_dir(), "dflash");
}

#[test]
fn golden_gemma4_dspark_trace_batched() {
    check_batched(&golden_gemma4_dir(), "dspark");
}

#[test]
fn golden_gemma4_eagle3_trace_greedy() {
    check_greedy_runs(&golden_gemma4_dir(), "eagle3");
}

#[test]
fn golden_gemma4_eagle3_trace_temperature_replay() {
    check_temperature_replay(&golden_gemma4_dir(), "eagle3");
}
