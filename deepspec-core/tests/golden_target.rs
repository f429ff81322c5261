//! Parity of the target model with the reference's own outputs (golden `target/`).
//! Every size comes from the fixture files.

use burn::tensor::{Int, Tensor, TensorData};
use deepspec_core::backend::Cpu;
use deepspec_core::fixtures::{golden_dir, max_abs_diff};
use deepspec_core::io::safetensors::SafetensorsFile;
use deepspec_core::model::{load_target, to_host, KvCache, LogitsFor};

type B = Cpu;
const TOL: f32 = 1e-4;

struct Batch {
    ids: Vec<i64>,
    real: Vec<Vec<bool>>,
    batch: usize,
    seq: usize,
}

fn inputs() -> Batch {
    let file = SafetensorsFile::open(golden_dir().join("inputs.safetensors")).unwrap();
    let (shape, ids) = file.i64("input_ids").unwrap();
    let (_, mask) = file.i64("attention_mask").unwrap();
    let (batch, seq) = (shape[0], shape[1]);
    let real = (0..batch)
        .map(|b| {
            mask[b * seq..(b + 1) * seq]
                .iter()
                .map(|&m| m != 0)
                .collect()
        })
        .collect();
    Batch {
        ids,
        real,
        batch,
        seq,
    }
}

/// Compares `[batch, seq, width]` values at real positions only.
fn assert_close(name: &str, got: &[f32], want: &[f32], inputs: &Batch, width: usize) {
    let mut worst = 0.0f32;
    for b in 0..inputs.batch {
        for s in 0..inputs.seq {
            if !inputs.real[b][s] {
                continue;
            }
            let at = (b * inputs.seq + s) * width;
            let (d, i) = max_abs_diff(&got[at..at + width], &want[at..at + width]);
            assert!(
                d <= TOL,
                "{name}: |diff| {d} > {TOL} at row {b}, position {s}, feature {i}"
            );
            worst = worst.max(d);
        }
    }
    eprintln!("{name}: max |diff| {worst:.3e}");
}

fn run(logits: LogitsFor) -> (Batch, deepspec_core::model::TargetOutput<B>, Vec<usize>) {
    let dir = golden_dir();
    let device = Default::default();
    let target = load_target::<B>(&dir.join("target"), &device).unwrap();
    let inputs = inputs();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(inputs.ids.clone(), [inputs.batch, inputs.seq]),
        &device,
    );
    // Every decoder layer but the last has a stored output.
    let taps: Vec<usize> = (0..target.model.num_layers() - 1).collect();
    let out = target
        .model
        .forward_padded(&target.rope, ids, &inputs.real, &taps, logits);
    (inputs, out, taps)
}

#[test]
fn golden_target_logits() {
    let (inputs, out, _) = run(LogitsFor::All);
    let expected = SafetensorsFile::open(golden_dir().join("target/expected.safetensors")).unwrap();
    let want = expected.f32("logits").unwrap();
    let got = to_host(out.logits.unwrap());
    assert_eq!(got.shape, want.shape, "logits shape");
    assert_close("logits", &got.data, &want.data, &inputs, want.shape[2]);
}

#[test]
fn golden_target_hidden_states() {
    let (inputs, out, taps) = run(LogitsFor::None);
    let expected = SafetensorsFile::open(golden_dir().join("target/expected.safetensors")).unwrap();
    for (tensor, layer) in out.tapped.into_iter().zip(taps) {
        let name = format!("layer_output.{layer}");
        let want = expected.f32(&name).unwrap();
        let got = to_host(tensor);
        assert_eq!(got.shape, want.shape, "{name} shape");
        assert_close(&name, &got.data, &want.data, &inputs, want.shape[2]);
    }
    let want = expected.f32("final_norm_hidden").unwrap();
    let got = to_host(out.final_hidden);
    assert_close(
        "final_norm_hidden",
        &got.data,
        &want.data,
        &inputs,
        want.shape[2],
    );
}

/// Decoding token by token through the KV cache gives the full forward's logits, for rows of
/// different lengths decoded together, including after a rollback.
#[test]
fn golden_target_incremental_matches_full_forward() {
    let dir = golden_dir();
    let device = Default::default();
    let target = load_target::<B>(&dir.join("target"), &device).unwrap();
    let inputs = inputs();
    let (full_inputs, full, _) = run(LogitsFor::All);
    let full = to_host(full.logits.unwrap());
    let vocab = full.shape[2];
    let lens: Vec<usize> = inputs
        .real
        .iter()
        .map(|r| r.iter().filter(|&&x| x).count())
        .collect();
    // Prefill different amounts per row, then one token at a time; row 0 also rolls back
    // three tokens midway and re-decodes them.
    let prefill = [lens[0] / 3, lens[inputs.batch - 1] / 2];
    let mut cache = KvCache::<B>::new(target.model.num_layers(), inputs.batch);
    let mut next = vec![0usize; inputs.batch];
    let mut rolled_back = false;
    let token = |b: usize, s: usize| inputs.ids[b * inputs.seq + s] as u32;
    let mut compared = 0;
    loop {
        let rows: Vec<Vec<Option<u32>>> = (0..inputs.batch)
            .map(|b| {
                let want = if next[b] == 0 {
                    prefill[b.min(1)].max(1)
                } else {
                    1
                };
                (0..want.max(1))
                    .map(|k| (next[b] + k < lens[b]).then(|| token(b, next[b] + k)))
                    .collect()
            })
            .collect();
        let width = rows.iter().map(Vec::len).max().unwrap();
        let rows: Vec<Vec<Option<u32>>> = rows
            .into_iter()
            .map(|mut r| {
                r.resize(width, None);
                r
            })
            .collect();
        if rows.iter().all(|r| r.iter().all(Option::is_none)) {
            break;
        }
        let out = target
            .model
            .step(&target.rope, &rows, &mut cache, &[], LogitsFor::All);
        let got = to_host(out.logits.unwrap());
        for (b, row) in rows.iter().enumerate() {
            for (k, t) in row.iter().enumerate() {
                if t.is_none() {
                    continue;
                }
                let at_got = (b * width + k) * vocab;
                let at_full = (b * full_inputs.seq + next[b] + k) * vocab;
                let (d, _) = max_abs_diff(
                    &got.data[at_got..at_got + vocab],
                    &full.data[at_full..at_full + vocab],
                );
                assert!(
                    d <= TOL,
                    "row {b} position {}: incremental differs by {d}",
                    next[b] + k
                );
                compared += 1;
            }
            next[b] += row.iter().filter(|t| t.is_some()).count();
        }
        if !rolled_back && next[0] > lens[0] / 2 {
            next[0] -= 3;
            cache.truncate(0, next[0]);
            assert_eq!(cache.len(0), next[0]);
            rolled_back = true;
        }
    }
    assert!(rolled_back);
    assert_eq!(compared, lens.iter().sum::<usize>() + 3);
}
