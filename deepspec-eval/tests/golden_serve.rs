//! The serving loop on the golden target and DSpark drafter: at temperature 0 every
//! verification policy, at every load, outputs exactly what target-only greedy decoding
//! outputs; continuous batching (more requests than slots, requests arriving late) leaves
//! every request's output as it is alone; the profile reads back as a valid table.

use burn::backend::Flex;
use deepspec_core::drafter::{Drafter, DrafterConfig};
use deepspec_core::fixtures::golden_dir;
use deepspec_core::model::{load_target, LoadedTarget};
use deepspec_core::sampling::{Rng, Sampler};
use deepspec_eval::engine::DecodeParams;
use deepspec_eval::profile::{profile, ProfileSpec};
use deepspec_eval::proposer::{NoDraft, Proposer};
use deepspec_eval::schedule::{CostModel, PassShape, PolicySpec, SpsTable};
use deepspec_eval::serve::{serve, Request, ServeRun};
use serde_json::Value;

type B = Flex;

fn fixture() -> (LoadedTarget<B>, Drafter<B>, DrafterConfig, Vec<Vec<u32>>) {
    let golden = golden_dir();
    let target = load_target::<B>(&golden.join("target"), &Default::default()).unwrap();
    let (drafter, config) =
        Drafter::<B>::load(&golden.join("dspark"), &Default::default()).unwrap();
    let traces: Value = serde_json::from_str(
        &std::fs::read_to_string(golden.join("dspark").join("eval_traces.json")).unwrap(),
    )
    .unwrap();
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for run in traces.as_object().unwrap().values() {
        for p in run["prompts"].as_array().unwrap() {
            let ids: Vec<u32> = p["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            if !prompts.contains(&ids) {
                prompts.push(ids);
            }
        }
    }
    // Different lengths in one batch whatever the fixture holds.
    let shorter = prompts[0][..prompts[0].len() - 1].to_vec();
    prompts.push(shorter);
    (target, drafter, config, prompts)
}

fn params(config: &DrafterConfig) -> DecodeParams {
    DecodeParams {
        max_new_tokens: 24,
        temperature: 0.0,
        confidence_threshold: 0.0,
        stop_ids: Vec::new(),
        target_layer_ids: config.target_layer_ids.to_vec(),
    }
}

fn table(target: &LoadedTarget<B>, drafter: &Drafter<B>, config: &DrafterConfig) -> SpsTable {
    let make = || deepspec_eval::runner::proposer(drafter, config);
    let spec = ProfileSpec {
        context: (1..40).collect(),
        max_tokens: 16,
        max_requests: 2,
        repeats: 1,
        target_layer_ids: config.target_layer_ids.to_vec(),
        temperature: 0.0,
    };
    profile(target, Some(&make), &spec, &mut |_, _| {})
}

#[allow(clippy::too_many_arguments)]
fn run(
    target: &LoadedTarget<B>,
    drafter: &Drafter<B>,
    config: &DrafterConfig,
    requests: &[Request],
    spec: &PolicySpec,
    cost: &CostModel,
    slots: usize,
) -> ServeRun {
    let mut policy = spec.build(Some(cost)).unwrap();
    let mut boxed: Vec<Box<dyn Proposer<B> + '_>> = requests
        .iter()
        .map(|_| -> Box<dyn Proposer<B> + '_> {
            if policy.drafts() {
                deepspec_eval::runner::proposer(drafter, config)
            } else {
                Box::new(NoDraft)
            }
        })
        .collect();
    let mut proposers: Vec<&mut dyn Proposer<B>> =
        boxed.iter_mut().map(|p| p.as_mut() as _).collect();
    let mut rngs: Vec<Rng> = (0..requests.len())
        .map(|i| Rng::for_item(0, i as u64))
        .collect();
    let mut samplers: Vec<&mut dyn Sampler> =
        rngs.iter_mut().map(|r| r as &mut dyn Sampler).collect();
    serve(
        target,
        &mut proposers,
        requests,
        &mut samplers,
        policy.as_mut(),
        &params(config),
        &[],
        slots,
    )
}

fn outputs(run: &ServeRun) -> Vec<Vec<u32>> {
    run.requests
        .iter()
        .map(|r| r.trace.output_ids.clone())
        .collect()
}

#[test]
fn golden_serve_every_policy_is_greedy_target_decoding() {
    let (target, drafter, config, prompts) = fixture();
    let table = table(&target, &drafter, &config);
    table.check().unwrap();
    assert!(!table.draft.is_empty());
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            arrival: 0.0,
        })
        .collect();
    // A flat profile makes the schedulers verify many drafts, a steep one few: both orders.
    let mut flat = table.clone();
    flat.verify.iter_mut().for_each(|p| p.seconds = 1.0);
    flat.draft.clear();
    let costs = [
        CostModel {
            table: table.clone(),
            shape: PassShape::Padded,
        },
        CostModel {
            table: flat,
            shape: PassShape::Packed,
        },
    ];
    let baseline = outputs(&run(
        &target,
        &drafter,
        &config,
        &requests,
        &PolicySpec::TargetOnly,
        &costs[0],
        1,
    ));
    let mut verified_any = false;
    for spec in ["fixed:1", "fixed:7", "threshold:0.5", "alg1", "async"] {
        let spec: PolicySpec = spec.parse().unwrap();
        for cost in &costs {
            for slots in [1, 2, requests.len()] {
                let served = run(&target, &drafter, &config, &requests, &spec, cost, slots);
                assert_eq!(
                    outputs(&served),
                    baseline,
                    "{spec} at {slots} slots ({:?}): outputs differ from target-only",
                    cost.shape
                );
                verified_any |= served.rounds.iter().any(|r| r.verified > 0);
                assert!(served.rounds.iter().all(|r| r.requests <= slots));
            }
        }
    }
    assert!(
        verified_any,
        "no policy verified a draft: the test shows nothing"
    );
}

#[test]
fn golden_serve_continuous_batching_keeps_each_request_as_alone() {
    let (target, drafter, config, prompts) = fixture();
    let cost = CostModel {
        table: table(&target, &drafter, &config),
        shape: PassShape::Padded,
    };
    // Twice the prompts through two slots, half of them arriving after the start.
    let requests: Vec<Request> = prompts
        .iter()
        .chain(&prompts)
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            arrival: if i % 2 == 1 { 0.05 * i as f64 } else { 0.0 },
        })
        .collect();
    let spec = PolicySpec::Fixed(config.block_size);
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let one = [Request {
                prompt: r.prompt.clone(),
                arrival: 0.0,
            }];
            outputs(&run(&target, &drafter, &config, &one, &spec, &cost, 1)).remove(0)
        })
        .collect();
    let served = run(&target, &drafter, &config, &requests, &spec, &cost, 2);
    assert_eq!(outputs(&served), alone);
    assert!(served.rounds.iter().all(|r| r.requests <= 2));
    assert!(served.rounds.iter().any(|r| r.requests == 2));
    for r in &served.requests {
        assert!(r.admitted >= r.arrival && r.first_token >= r.admitted);
        assert!(r.finished >= r.first_token);
    }
}
