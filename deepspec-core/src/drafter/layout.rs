//! Every tensor a drafter holds, as names and shapes computed from its config alone (nothing
//! is allocated): what `deepspec train --dry-run` counts, and what a test checks against
//! the real modules of each family.

use super::config::{Algorithm, DrafterConfig, MarkovKind};
use super::dspark_v4::v4_layout;

/// One tensor of a drafter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    pub name: String,
    pub shape: Vec<usize>,
    /// Receives gradients and optimizer state (the frozen target embedding and head, and
    /// V4's routing bias, do not).
    pub trainable: bool,
    /// A routed expert's weight (what expert parallelism would shard).
    pub expert: bool,
}

impl TensorSlot {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Every tensor of the drafter `config` describes, frozen ones included.
pub fn drafter_layout(config: &DrafterConfig) -> Vec<TensorSlot> {
    if let Some((v4, keys)) = &config.v4 {
        return v4_layout(v4, keys, config.target_layer_ids.len(), true)
            .into_iter()
            .map(|(name, shape)| TensorSlot {
                trainable: !(name == "embed.weight"
                    || name == "head.weight"
                    || name.ends_with(".ffn.gate.bias")),
                expert: name.contains(".ffn.experts."),
                name,
                shape,
            })
            .collect();
    }
    let c = &config.base;
    let (h, v, d) = (c.hidden_size, c.vocab_size, c.head_dim);
    let (q, kv, i) = (
        c.num_attention_heads * d,
        c.num_key_value_heads * d,
        c.intermediate_size,
    );
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, trainable: bool| {
        out.push(TensorSlot {
            name,
            shape,
            trainable,
            expert: false,
        })
    };
    push("embed_tokens.weight".into(), vec![v, h], false);
    push("lm_head.weight".into(), vec![v, h], false);
    push("fc.weight".into(), vec![h, config.context_width()], true);
    push("norm.weight".into(), vec![h], true);
    let (layers, input) = match config.algorithm {
        Algorithm::Eagle3 => (1, 2 * h),
        _ => (c.num_hidden_layers, h),
    };
    // Gemma4: two more norms and a `layer_scalar` buffer per layer, no `v_proj` where keys
    // are values, and the double-wide MLP rule.
    let gemma4 = config.gemma4.as_ref();
    for l in 0..layers {
        let p = format!("layers.{l}");
        if config.algorithm == Algorithm::Eagle3 {
            push(format!("{p}.hidden_norm.weight"), vec![h], true);
        }
        push(format!("{p}.input_layernorm.weight"), vec![h], true);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        );
        let i = match gemma4 {
            Some(g) => {
                push(
                    format!("{p}.pre_feedforward_layernorm.weight"),
                    vec![h],
                    true,
                );
                push(
                    format!("{p}.post_feedforward_layernorm.weight"),
                    vec![h],
                    true,
                );
                push(format!("{p}.layer_scalar"), vec![1], false);
                g.mlp_width(l, layers)
            }
            None => i,
        };
        let v_proj = !gemma4.is_some_and(|g| g.attention_k_eq_v);
        let a = format!("{p}.self_attn");
        for (proj, rows, cols) in [
            ("q_proj", q, input),
            ("k_proj", kv, input),
            ("v_proj", kv, input),
            ("o_proj", h, q),
        ]
        .into_iter()
        .filter(|(proj, _, _)| v_proj || *proj != "v_proj")
        {
            push(format!("{a}.{proj}.weight"), vec![rows, cols], true);
            if c.attention_bias {
                push(format!("{a}.{proj}.bias"), vec![rows], true);
            }
        }
        push(format!("{a}.q_norm.weight"), vec![d], true);
        push(format!("{a}.k_norm.weight"), vec![d], true);
        push(format!("{p}.mlp.gate_proj.weight"), vec![i, h], true);
        push(format!("{p}.mlp.up_proj.weight"), vec![i, h], true);
        push(format!("{p}.mlp.down_proj.weight"), vec![h, i], true);
    }
    if config.algorithm == Algorithm::Eagle3 {
        return out;
    }
    push("hidden_norm.weight".into(), vec![h], true);
    let r = config.markov_rank;
    if r > 0 {
        push("markov_head.markov_w1.weight".into(), vec![v, r], true);
        push("markov_head.markov_w2.weight".into(), vec![v, r], true);
        match config.markov_kind {
            MarkovKind::Gated => {
                push("markov_head.gate_proj.weight".into(), vec![r, h + r], true);
                push("markov_head.gate_proj.bias".into(), vec![r], true);
            }
            MarkovKind::Rnn => {
                push(
                    "markov_head.joint_proj.weight".into(),
                    vec![3 * r, 2 * r + h],
                    true,
                );
                push("markov_head.joint_proj.bias".into(), vec![3 * r], true);
            }
            MarkovKind::Vanilla => {}
        }
    }
    if config.confidence_head {
        let width = if config.confidence_with_markov {
            h + r
        } else {
            h
        };
        push("confidence_head.proj.weight".into(), vec![1, width], true);
        push("confidence_head.proj.bias".into(), vec![1], true);
    }
    out
}
