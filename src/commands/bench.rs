//! `deepspec bench ...`: throughput measurements. Figures are printed, never asserted.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::Context;
use burn::tensor::backend::Backend;
use deepspec_core::model::{load_target, KvCache, LogitsFor};
use deepspec_core::sampling::argmax;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Target prefill and single-stream decode tokens/s.
    Target(TargetBench),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Target(args) => dispatch(args.device, args),
    }
}

#[derive(clap::Args, Debug)]
pub struct TargetBench {
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens decoded one at a time after the prefill.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Timed repetitions (after one untimed warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

impl OnBackend for TargetBench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let target = load_target::<B>(&self.model, &device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let text = "Speculative decoding drafts several tokens cheaply and lets the target verify them in one pass. ";
        let mut prompt = Vec::new();
        while prompt.len() < self.prompt_tokens {
            prompt.extend(target.tokenizer.encode(text)?);
        }
        prompt.truncate(self.prompt_tokens);
        let layers = target.model.num_layers();
        let run_once = || -> (f64, f64) {
            let mut cache = KvCache::<B>::new(layers, 1);
            let row: Vec<Option<u32>> = prompt.iter().copied().map(Some).collect();
            let start = Instant::now();
            let out = target
                .model
                .step(&target.rope, &[row], &mut cache, &[], LogitsFor::Last);
            let logits = out
                .logits
                .unwrap()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap();
            let prefill = start.elapsed().as_secs_f64();
            let mut token = argmax(&logits) as u32;
            let start = Instant::now();
            for _ in 0..self.decode_tokens {
                let out = target.model.step(
                    &target.rope,
                    &[vec![Some(token)]],
                    &mut cache,
                    &[],
                    LogitsFor::Last,
                );
                let logits = out
                    .logits
                    .unwrap()
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .unwrap();
                token = argmax(&logits) as u32;
            }
            let decode = start.elapsed().as_secs_f64();
            (prefill, decode)
        };
        run_once();
        let mut prefill_rates = Vec::new();
        let mut decode_rates = Vec::new();
        for _ in 0..self.repeats.max(1) {
            let (prefill, decode) = run_once();
            prefill_rates.push(self.prompt_tokens as f64 / prefill);
            decode_rates.push(self.decode_tokens as f64 / decode);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let prefill = median(&mut prefill_rates);
        let decode = median(&mut decode_rates);
        println!("model            {}", self.model.display());
        println!("backend          {}", std::any::type_name::<B>());
        println!(
            "prefill          {:.1} tokens/s ({} tokens, median of {})",
            prefill,
            self.prompt_tokens,
            self.repeats.max(1)
        );
        println!(
            "decode           {:.1} tokens/s ({} tokens, batch 1)",
            decode, self.decode_tokens
        );
        println!(
            "{}",
            serde_json::json!({"bench": "target", "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                               "prompt_tokens": self.prompt_tokens, "decode_tokens": self.decode_tokens})
        );
        Ok(())
    }
}
