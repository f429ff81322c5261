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
    /// Drafter training step time on synthetic data of a target's shape.
    Train(TrainBench),
    /// Speculative decoding against target-only decoding, same engine, one run.
    Eval(EvalBench),
    /// The step-cost profile: target pass time per verified token count, drafting time per
    /// number of requests (a JSON table for `--sps-table`).
    Sps(crate::commands::serving::SpsBench),
    /// Verification policies × loads through the continuous-batching engine: throughput,
    /// per-user speed, τ, verified budget, each round's split (JSON report, table, plots).
    Serve(crate::commands::serving::ServeBench),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Target(args) => dispatch(args.device, args),
        BenchCommand::Train(args) => dispatch(args.device, args),
        BenchCommand::Eval(args) => dispatch(args.device, args),
        BenchCommand::Sps(args) => dispatch(args.device, args),
        BenchCommand::Serve(args) => dispatch(args.device, args),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Qwen3-4B shapes (the reference's DSpark step: 512 anchors x block 7, sequence 4096).
    Qwen3_4b,
    /// SmolLM2-135M shapes.
    Smollm2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algo {
    Dspark,
    Dflash,
    Eagle3,
}

#[derive(clap::Args, Debug)]
pub struct TrainBench {
    #[arg(long, value_enum, default_value_t = Preset::Smollm2)]
    pub preset: Preset,
    #[arg(long, value_enum, default_value_t = Algo::Dspark)]
    pub algo: Algo,
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 64)]
    pub anchors: usize,
    /// Draft layers (DSpark/DFlash; Eagle3 always has one).
    #[arg(long, default_value_t = 5)]
    pub layers: usize,
    /// Timed steps, after `--warmup` untimed ones.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Tokens per LM-head chunk in the loss (default: sized for the vocabulary, as
    /// `train.head_chunk_tokens` unset).
    #[arg(long)]
    pub head_chunk_tokens: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

fn preset_config(preset: Preset) -> deepspec_core::model::TargetConfig {
    use deepspec_core::model::{Family, TargetConfig};
    let (vocab, hidden, inter, layers, heads, kv, head_dim, theta, eps) = match preset {
        Preset::Qwen3_4b => (151936, 2560, 9728, 36, 32, 8, 128, 1e6, 1e-6),
        Preset::Smollm2 => (49152, 576, 1536, 30, 9, 3, 64, 1e5, 1e-5),
    };
    TargetConfig {
        family: Family::Qwen3,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        rope_theta: theta,
        partial_rotary_factor: 1.0,
        rms_norm_eps: eps,
        tie_word_embeddings: true,
        attention_bias: false,
        max_position_embeddings: 40960,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

impl OnBackend for TrainBench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        use deepspec_core::drafter::init::{random_drafter, DrafterSpec};
        use deepspec_core::drafter::{Algorithm, MarkovKind};
        use deepspec_core::sampling::Rng;
        use deepspec_train::data::{collate, Sample};
        use deepspec_train::optim::{AdamW, AdamWConfig};
        type AB<B> = burn::backend::Autodiff<B>;
        let target = preset_config(self.preset);
        let (algorithm, rank, confidence, layers) = match self.algo {
            Algo::Dspark => (
                Algorithm::DSpark,
                256.min(target.hidden_size / 2),
                true,
                self.layers,
            ),
            Algo::Dflash => (Algorithm::DFlash, 0, false, self.layers),
            Algo::Eagle3 => (Algorithm::Eagle3, 0, false, 1),
        };
        let h = target.hidden_size;
        let taps: Vec<usize> = (0..5)
            .map(|i| 1 + i * (target.num_hidden_layers - 3) / 4)
            .collect();
        let spec = DrafterSpec {
            algorithm,
            num_draft_layers: layers,
            target_layer_ids: deepspec_core::layers::TargetLayerIds::new(taps.clone())?,
            block_size: 7,
            mask_token_id: (target.vocab_size - 1) as u32,
            num_anchors: self.anchors,
            markov_rank: rank,
            markov_kind: MarkovKind::Vanilla,
            confidence_head: confidence,
            confidence_with_markov: confidence,
            step_loss_decay: 0.8,
            dtype: "float32".into(),
            initializer_range: 0.02,
            seed: 0,
            target_model_name_or_path: "synthetic".into(),
        };
        eprintln!(
            "building a random {:?} drafter of {:?} shape...",
            self.algo, self.preset
        );
        let (mut drafter, config) = random_drafter::<AB<B>>(&target, &spec, &device)?;
        let mut rng = Rng::new(1);
        let len = self.seq_len;
        let normal = |rng: &mut Rng, n: usize| -> Vec<f32> {
            (0..n).map(|_| (rng.uniform() as f32 - 0.5) * 2.0).collect()
        };
        let sample = Sample {
            input_ids: (0..len)
                .map(|_| (rng.next_u64() % (target.vocab_size as u64 - 1)) as i64)
                .collect(),
            loss_mask: (0..len).map(|i| (i >= 16) as u8).collect(),
            target_hidden: normal(&mut rng, len * taps.len() * h),
            target_last_hidden: normal(&mut rng, len * h),
        };
        let batch = collate(&[sample], (taps.len() * h, h), len);
        let mut settings = deepspec_train::plan::bench_settings(algorithm, len);
        settings.head_chunk_tokens = self.head_chunk_tokens;
        let mut host_batch = batch;
        let features = host_batch.upload::<AB<B>>(&device);
        let mut optim = AdamW::<AB<B>>::new(AdamWConfig::default());
        let mut times = Vec::new();
        let mut predictions = 0;
        for step in 0..self.warmup + self.steps {
            let start = Instant::now();
            let (loss, _, supervised) = deepspec_train::trainer::micro_loss(
                &drafter,
                &config,
                &host_batch,
                &features,
                &[step as u64],
                &settings,
            );
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &drafter);
            let (next, report) = optim.step(drafter, &grads, 6e-4);
            drafter = next;
            let elapsed = start.elapsed().as_secs_f64();
            eprintln!(
                "step {step}: {:.1} ms (grad norm {:.3})",
                elapsed * 1e3,
                report.grad_norm
            );
            if step >= self.warmup {
                times.push(elapsed);
                predictions += supervised;
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let total: f64 = times.iter().sum();
        println!("backend          {}", std::any::type_name::<B>());
        println!(
            "preset           {:?}, {:?}, {} layers, seq {}, {} anchors x block 7",
            self.preset, self.algo, layers, len, self.anchors
        );
        println!(
            "step             {:.1} ms median of {}",
            median * 1e3,
            times.len()
        );
        println!(
            "draft tokens/s   {:.0} (supervised predictions)",
            predictions as f64 / total
        );
        // Host memory: the whole process's high-water mark (weights, batch and every step).
        let peak_rss = deepspec_core::backend::peak_rss_bytes();
        match peak_rss {
            Some(bytes) => println!(
                "peak memory      {:.1} MiB max RSS",
                bytes as f64 / (1 << 20) as f64
            ),
            None => println!("peak memory      not reported by this system (no /proc/self/status)"),
        }
        let device_peak = deepspec_core::backend::device_memory_reserved_bytes::<B>(&device);
        if let Some(bytes) = device_peak {
            println!(
                "device memory    {:.1} MiB reserved by the allocator (its high-water mark)",
                bytes as f64 / (1 << 20) as f64
            );
        }
        println!(
            "{}",
            serde_json::json!({"bench": "train", "preset": format!("{:?}", self.preset), "algo": format!("{:?}", self.algo),
                               "step_ms_median": median * 1e3, "draft_tokens_per_s": predictions as f64 / total,
                               "seq_len": len, "anchors": self.anchors, "layers": layers,
                               "peak_rss_bytes": peak_rss, "device_reserved_bytes": device_peak})
        );
        Ok(())
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
            let logits = deepspec_core::model::to_host(out.logits.unwrap()).data;
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
                let logits = deepspec_core::model::to_host(out.logits.unwrap()).data;
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

#[derive(clap::Args, Debug)]
pub struct EvalBench {
    /// Recipe naming the target.
    #[arg(long)]
    pub recipe: String,
    #[arg(long)]
    pub drafter: PathBuf,
    #[arg(long)]
    pub datasets: PathBuf,
    #[arg(long, default_value = "gsm8k")]
    pub set: String,
    #[arg(long, default_value_t = 3)]
    pub prompts: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Also time speculative decoding with this many prompts per batch (1 = only batch 1).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

impl OnBackend for EvalBench {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        use deepspec_core::drafter::Drafter;
        use deepspec_core::io::chat::{ChatTemplate, Message};
        use deepspec_core::sampling::Rng;
        use deepspec_core::sampling::Sampler;
        use deepspec_eval::engine::{decode, decode_batch};
        use deepspec_eval::plan::{EvalChoices, EvalPlan};
        use deepspec_eval::proposer::{NoDraft, Proposer};
        let recipe_path = crate::commands::train::resolve_recipe(&self.recipe)?;
        let recipe = deepspec_core::recipe::Recipe::load(&recipe_path)?;
        let plan = EvalPlan::from_recipe(
            Some((&recipe_path, &recipe)),
            EvalChoices {
                datasets: Some(self.datasets.clone()),
                sets: vec![self.set.clone()],
                limit: Some(self.prompts),
                temperature: Some(self.temperature),
                max_new_tokens: Some(self.max_new_tokens),
                // Full blocks: the speed-up of the drafter itself, not of a tuned threshold.
                confidence_threshold: Some(0.0),
                batch_size: self.batch_size,
                ..Default::default()
            },
        )?;
        crate::commands::require_checkpoint_dir(&self.drafter, "--drafter")?;
        let target = load_target::<B>(&plan.target, &device)?;
        let (drafter, config) = Drafter::<B>::load(&self.drafter, &device)?;
        config.check_target(&target.config, &plan.target)?;
        let template = ChatTemplate::for_tokenizer(&target.tokenizer)?;
        let set = deepspec_eval::datasets::read_jsonl(
            &self.set,
            &self.datasets.join(format!("{}.jsonl", self.set)),
            plan.selection(),
        )?;
        let params = plan.decode_params(&target.tokenizer, &template, &config)?;
        let prompts: Vec<Vec<u32>> = set
            .samples
            .iter()
            .map(|s| {
                deepspec_eval::runner::turn_prompt(
                    &template,
                    &target.tokenizer,
                    &[Message::new("user", &s.turns[0])],
                )
            })
            .collect::<anyhow::Result<_>>()?;
        deepspec_eval::runner::check_online(&drafter)?;
        // Warm up both paths once.
        let mut warm = deepspec_eval::runner::proposer(&drafter, &config);
        decode(
            &target,
            warm.as_mut(),
            &prompts[0],
            &params,
            &mut Rng::new(0),
        );
        let run = |speculative: bool, batch: usize| -> (usize, usize, f64) {
            let (mut tokens, mut rounds) = (0, 0);
            let start = Instant::now();
            for (c, chunk) in prompts.chunks(batch).enumerate() {
                let mut boxed: Vec<Box<dyn Proposer<B> + '_>> = chunk
                    .iter()
                    .map(|_| -> Box<dyn Proposer<B> + '_> {
                        if speculative {
                            deepspec_eval::runner::proposer(&drafter, &config)
                        } else {
                            Box::new(NoDraft)
                        }
                    })
                    .collect();
                let mut proposers: Vec<&mut dyn Proposer<B>> =
                    boxed.iter_mut().map(|p| p.as_mut() as _).collect();
                let mut rngs: Vec<Rng> = (0..chunk.len())
                    .map(|i| Rng::for_item(0, (c * batch + i) as u64))
                    .collect();
                let mut samplers: Vec<&mut dyn Sampler> =
                    rngs.iter_mut().map(|r| r as &mut dyn Sampler).collect();
                for trace in decode_batch(&target, &mut proposers, chunk, &params, &mut samplers) {
                    tokens += trace.output_ids.len() - trace.prompt_len;
                    rounds += trace.rounds.len();
                }
            }
            (tokens, rounds, start.elapsed().as_secs_f64())
        };
        let (base_tokens, _, base_time) = run(false, 1);
        let (spec_tokens, rounds, spec_time) = run(true, 1);
        let base_rate = base_tokens as f64 / base_time;
        let spec_rate = spec_tokens as f64 / spec_time;
        let tau = (spec_tokens as f64 / rounds.max(1) as f64).max(0.0);
        println!("backend              {}", std::any::type_name::<B>());
        println!("target-only          {base_rate:.1} tokens/s ({base_tokens} tokens)");
        println!("speculative ({})  {spec_rate:.1} tokens/s ({spec_tokens} tokens, {rounds} rounds, about τ {tau:.2})", config.algorithm.name());
        println!("speed-up             {:.2}x", spec_rate / base_rate);
        let mut json = serde_json::json!({"bench": "eval", "target_only_tokens_per_s": base_rate, "speculative_tokens_per_s": spec_rate,
                               "speedup": spec_rate / base_rate, "rounds": rounds, "tokens": spec_tokens});
        if self.batch_size > 1 {
            let (batch_tokens, _, batch_time) = run(true, self.batch_size);
            let batch_rate = batch_tokens as f64 / batch_time;
            println!(
                "speculative, batch {}  {batch_rate:.1} tokens/s ({batch_tokens} tokens): {:.2}x target-only, {:.2}x batch 1",
                self.batch_size,
                batch_rate / base_rate,
                batch_rate / spec_rate
            );
            json["batch_size"] = self.batch_size.into();
            json["speculative_batched_tokens_per_s"] = batch_rate.into();
        }
        println!("{json}");
        Ok(())
    }
}
