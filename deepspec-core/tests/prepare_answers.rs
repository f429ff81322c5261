//! Answer regeneration on the golden target: the reference's turn rule, per-prompt seeding.

use deepspec_core::backend::Cpu;
use deepspec_core::fixtures::golden_dir;
use deepspec_core::generate::GenerateParams;
use deepspec_core::io::chat::{ChatTemplate, Message, TurnFormat};
use deepspec_core::model::load_target;
use deepspec_core::prepare::answer::{answer_batch, self_instruct, AnswerSettings};
use deepspec_core::sampling::SamplingParams;

fn settings(seed: u64) -> AnswerSettings {
    AnswerSettings {
        params: GenerateParams {
            max_new_tokens: 6,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            },
            stop_ids: vec![510],
        },
        enable_thinking: false,
        max_length: 512,
        seed,
    }
}

#[test]
fn every_user_turn_is_answered_with_the_new_history() {
    let target = load_target::<Cpu>(&golden_dir().join("target"), &Default::default()).unwrap();
    let template = ChatTemplate::for_tokenizer(&target.tokenizer).unwrap();
    let conversation = vec![
        Message::new("system", "sys"),
        Message::new("user", "<t5> first"),
        Message::new("assistant", "OLD ANSWER"),
        Message::new("user", "<t6> second"),
    ];
    let single = vec![Message::new("user", "<t7> only")];
    let (out, generated) = answer_batch(
        &target,
        &template,
        &[conversation.clone(), single.clone()],
        &[4, 9],
        &settings(3),
    )
    .unwrap();
    let roles: Vec<&str> = out[0].iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    assert!(out[0].iter().all(|m| m.content != "OLD ANSWER"));
    assert_eq!(out[0][1], conversation[1]);
    assert_eq!(out[0][3], conversation[3]);
    assert_eq!(out[1].len(), 2);
    assert!(generated > 0);

    // A prompt's answer depends on its index and the seed, not on its batch neighbours.
    let (alone, _) = answer_batch(
        &target,
        &template,
        std::slice::from_ref(&single),
        &[9],
        &settings(3),
    )
    .unwrap();
    assert_eq!(alone[0], out[1]);
    let (other_seed, _) = answer_batch(&target, &template, &[single], &[9], &settings(4)).unwrap();
    assert_ne!(other_seed[0], out[1]);
}

#[test]
fn self_instruct_writes_distinct_user_prompts() {
    let target = load_target::<Cpu>(&golden_dir().join("target"), &Default::default()).unwrap();
    let template = ChatTemplate::for_tokenizer(&target.tokenizer).unwrap();
    let prompts = self_instruct(
        &target,
        &template,
        &TurnFormat::CHATML,
        5,
        &settings(1),
        2,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(prompts.len(), 5);
    for p in &prompts {
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].role, "user");
        assert!(!p[0].content.trim().is_empty());
    }
    let mut contents: Vec<&str> = prompts.iter().map(|p| p[0].content.as_str()).collect();
    contents.sort();
    contents.dedup();
    assert_eq!(contents.len(), 5, "distinct");
}
