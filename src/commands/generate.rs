//! `deepspec generate`: chat-template a prompt and stream the reply.

use crate::device::{dispatch, DeviceKind, OnBackend};
use anyhow::Context;
use burn::tensor::backend::Backend;
use deepspec_core::generate::{generate, stop_ids, GenerateParams};
use deepspec_core::io::chat::{ChatTemplate, Message};
use deepspec_core::model::load_target;
use deepspec_core::sampling::{Rng, SamplingParams};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Target model: a .gguf file or a Hugging Face folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// A system message (default: the chat template's own default, if any).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Qwen3-style templates: render with thinking disabled (the reference's mode).
    #[arg(long)]
    pub no_thinking: bool,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    dispatch(args.device, args)
}

impl OnBackend for GenerateArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let target = load_target::<B>(&self.model, &device)
            .with_context(|| format!("loading target model {}", self.model.display()))?;
        let template = ChatTemplate::for_tokenizer(&target.tokenizer)
            .context("compiling the model's chat template")?;
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &self.prompt));
        let prompt_ids = template.prompt_ids(
            &target.tokenizer,
            &messages,
            self.no_thinking.then_some(false),
        )?;
        let params = GenerateParams {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
            },
            stop_ids: stop_ids(&target.tokenizer, template.format.as_ref(), &[])?,
        };
        let mut generated: Vec<u32> = Vec::new();
        let mut printed = 0usize;
        let mut stdout = std::io::stdout();
        let tok = &target.tokenizer;
        generate(
            &target,
            &[prompt_ids],
            &params,
            &mut [Rng::new(self.seed)],
            |_, id| {
                generated.push(id);
                // Print only whole characters: a token may end inside a multi-byte character.
                if let Ok(text) = tok.decode(&generated, true) {
                    if !text.ends_with('\u{FFFD}') && text.len() > printed {
                        let _ = write!(stdout, "{}", &text[printed..]);
                        let _ = stdout.flush();
                        printed = text.len();
                    }
                }
            },
        );
        let text = tok.decode(&generated, true)?;
        if text.len() > printed {
            print!("{}", &text[printed..]);
        }
        println!();
        Ok(())
    }
}
