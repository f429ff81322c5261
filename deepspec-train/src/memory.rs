//! What a training run needs in memory, from the drafter's config and the run's settings
//! alone (nothing allocated): `deepspec train --dry-run` prints it, and a real run checks it
//! against the device before it builds the drafter, so a job that cannot fit stops with this
//! plan instead of dying of out-of-memory mid-run.
//!
//! Parameters and optimizer state are exact ([`drafter_layout`] is tested against every
//! family's module). Activations are an estimate of what autodiff keeps for one micro-step,
//! counted per family from the tensors the forward saves (the dominant terms: per-layer
//! hidden states and projections, attention scores, MoE expert inputs, the LM-head chunks);
//! treat it as the right order of magnitude, not a byte count.

use crate::trainer::TrainSettings;
use deepspec_core::backend::Precision;
use deepspec_core::drafter::layout::drafter_layout;
use deepspec_core::drafter::{Algorithm, DrafterConfig};
use std::fmt::Write;

const GIB: f64 = (1u64 << 30) as f64;

/// Memory of one training process (one data-parallel rank: every rank holds all of it).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub trainable: u64,
    pub frozen: u64,
    /// Trainable parameters in routed experts (what expert parallelism would shard).
    pub expert: u64,
    /// Bytes per value at the compute precision.
    pub compute_bytes: u64,
    /// Every parameter at the compute precision.
    pub weights: u64,
    /// f32 master copies of the trainable parameters (when computing narrower than f32).
    pub masters: u64,
    /// AdamW's two f32 moments per trainable parameter.
    pub moments: u64,
    /// Gradients of the trainable parameters at the compute precision.
    pub grads: u64,
    /// Estimated activations autodiff keeps for one micro-step.
    pub activations: u64,
    /// Tokens of one micro-step whose activations those are (block slots, or positions).
    pub micro_tokens: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.masters + self.moments + self.grads + self.activations
    }

    /// Bytes tied to each trainable parameter: weight, master, moments, gradient.
    fn per_trainable(&self) -> u64 {
        self.compute_bytes * 2 + if self.masters > 0 { 4 } else { 0 } + 8
    }

    /// The smallest number of devices the routed experts (and their optimizer state) would
    /// have to be spread over for one device to hold the rest plus its share, with 10 % of
    /// `per_device` kept free; `None` when even one expert shard per routed expert does not
    /// fit.
    pub fn expert_shards_needed(&self, per_device: u64, experts: usize) -> Option<usize> {
        let budget = per_device as f64 * 0.9;
        let expert_bytes = (self.expert * self.per_trainable()) as f64;
        let rest = self.total() as f64 - expert_bytes;
        (1..=experts.max(1)).find(|&k| rest + expert_bytes / k as f64 <= budget)
    }

    /// Whether one device of `per_device` bytes holds the job (10 % kept free).
    pub fn fits(&self, per_device: u64) -> bool {
        self.total() as f64 <= per_device as f64 * 0.9
    }

    /// The plan as a user reads it, against devices of `per_device` bytes named `device`.
    pub fn report(&self, config: &DrafterConfig, per_device: u64, device: &str) -> String {
        let gib = |b: u64| b as f64 / GIB;
        let mut s = String::new();
        let params = |n: u64| {
            if n >= 1_000_000_000 {
                format!("{:.2} B", n as f64 / 1e9)
            } else {
                format!("{:.2} M", n as f64 / 1e6)
            }
        };
        let _ = writeln!(
            s,
            "parameters: {} trainable ({} in routed experts), {} frozen (the target's embedding and head)",
            params(self.trainable),
            params(self.expert),
            params(self.frozen)
        );
        let _ = writeln!(
            s,
            "weights {:.2} GiB | f32 master weights {:.2} GiB | AdamW moments {:.2} GiB | gradients {:.2} GiB | activations per micro-step ~{:.2} GiB ({} tokens) | total ~{:.2} GiB per process",
            gib(self.weights),
            gib(self.masters),
            gib(self.moments),
            gib(self.grads),
            gib(self.activations),
            self.micro_tokens,
            gib(self.total())
        );
        if self.fits(per_device) {
            let _ = writeln!(
                s,
                "fits on one {device} of {:.0} GiB; data parallel runs one copy per GPU, so GPUs needed: 1 (more only for speed)",
                gib(per_device)
            );
            return s;
        }
        let _ = writeln!(
            s,
            "one {device} of {:.0} GiB cannot hold this job: it needs ~{:.0} GiB, and data parallel keeps a whole copy on every GPU, so more GPUs of this size do not help",
            gib(per_device),
            gib(self.total())
        );
        let experts = config.v4.as_ref().map_or(0, |(v4, _)| v4.n_routed_experts);
        if self.expert > 0 {
            match self.expert_shards_needed(per_device, experts) {
                Some(k) => {
                    let _ = writeln!(
                        s,
                        "expert sharding would need the {experts} routed experts (and their optimizer state) spread over at least {k} GPUs of {:.0} GiB (~{:.0} GiB of experts each); deepspec does not shard experts yet",
                        gib(per_device),
                        (self.expert * self.per_trainable()) as f64 / k as f64 / GIB
                    );
                }
                None => {
                    let expert_bytes = self.expert * self.per_trainable();
                    let one_each =
                        self.total() - expert_bytes + expert_bytes / experts.max(1) as u64;
                    let _ = writeln!(
                        s,
                        "even one routed expert per GPU leaves ~{:.0} GiB per GPU: the rest must be sharded too (tensor parallel or sharded optimizer state)",
                        one_each as f64 / GIB
                    );
                }
            }
        } else {
            let _ = writeln!(
                s,
                "lower train.local_batch_size or model.num_anchors (activations), or train in bf16 (weights and gradients)"
            );
        }
        s
    }
}

/// The memory plan of training `config` with `settings` at `precision`.
pub fn plan_memory(
    config: &DrafterConfig,
    settings: &TrainSettings,
    precision: Precision,
) -> MemoryPlan {
    let compute_bytes: u64 = match precision {
        Precision::Fp32 => 4,
        _ => 2,
    };
    let layout = drafter_layout(config);
    let sum = |f: &dyn Fn(&deepspec_core::drafter::layout::TensorSlot) -> bool| -> u64 {
        layout.iter().filter(|s| f(s)).map(|s| s.numel()).sum()
    };
    let trainable = sum(&|s| s.trainable);
    let frozen = sum(&|s| !s.trainable);
    let expert = sum(&|s| s.trainable && s.expert);
    let (activations, micro_tokens) = activation_bytes(config, settings, compute_bytes);
    MemoryPlan {
        trainable,
        frozen,
        expert,
        compute_bytes,
        weights: (trainable + frozen) * compute_bytes,
        masters: if compute_bytes < 4 { trainable * 4 } else { 0 },
        moments: trainable * 8,
        grads: trainable * compute_bytes,
        activations,
        micro_tokens,
    }
}

/// (estimated bytes, tokens) of one micro-step's saved activations.
fn activation_bytes(config: &DrafterConfig, settings: &TrainSettings, bytes: u64) -> (u64, u64) {
    let c = &config.base;
    let b = settings.local_batch_size.max(1) as u64;
    let len = settings.max_length as u64;
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let taps = config.target_layer_ids.len() as u64;
    // The LM head + loss runs in chunks of at most 256 MiB of logits, four buffers live.
    let head = |rows: u64| -> u64 {
        let chunk = settings
            .head_chunk_tokens
            .map_or((256u64 << 20) / (v * 4).max(1), |c| c as u64)
            .clamp(1, rows.max(1));
        chunk * v * 4 * 4
    };
    if let Some((v4, keys)) = &config.v4 {
        let s = b * config.num_anchors as u64 * config.block_size as u64;
        let (n, d) = (v4.hc_mult as u64, v4.head_dim as u64);
        let heads = v4.num_attention_heads as u64;
        let per_stage = s * n * h * 8
            + s * (2 * v4.q_lora_rank as u64
                + 3 * heads * d
                + (v4.o_groups * v4.o_lora_rank) as u64
                + 6 * h)
            + s * (v4.num_experts_per_tok as u64 + 1) * v4.moe_intermediate_size as u64 * 4
            + s * v4.n_routed_experts as u64 * 3
            // Context scores are formed over the whole context and masked to the window.
            + s * heads * (len + config.block_size as u64) * 2
            + b * len * d * 2;
        let context = b * len * (taps + 2) * h;
        let total = per_stage * keys.num_stages as u64 + context + s * h * 4;
        return (total * bytes + head(s), s);
    }
    let (heads, kv, d) = (
        c.num_attention_heads as u64,
        c.num_key_value_heads as u64,
        c.head_dim as u64,
    );
    let i = c.intermediate_size as u64;
    let layer = |tokens: u64, keys: u64| -> u64 {
        tokens * (6 * h + 2 * heads * d + 4 * kv * d + 3 * i) + tokens * heads * keys * 2
    };
    match config.algorithm {
        Algorithm::Eagle3 => {
            let t = b * len;
            let steps = config.block_size as u64;
            let total = (0..steps).map(|k| layer(t, len + k)).sum::<u64>() + t * taps * h;
            (total * bytes + head(t), t * steps)
        }
        _ => {
            let s = b * config.num_anchors as u64 * config.block_size as u64;
            let total = layer(s, len + config.block_size as u64) * c.num_hidden_layers as u64
                + b * len * (taps + 2) * h
                + b * len * kv * d * 2 * c.num_hidden_layers as u64;
            (total * bytes + head(s), s)
        }
    }
}
