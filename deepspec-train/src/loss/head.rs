//! "LM head + loss": the one place logits over the vocabulary are formed during training.
//!
//! [`head_loss`] takes the draft head's inputs (hidden states, Markov features), the frozen
//! target head and cached target hidden states, per-token loss weights and a [`HeadPlan`]
//! (which target row each draft row is compared with), and returns the weighted total plus
//! every token's values. It never holds `[tokens × vocab]` logits: tokens go through in chunks,
//! and each chunk's gradient with respect to the hidden states, the Markov features and
//! `markov_w2` is computed right there in the forward (the weights are known), so the
//! backward of the custom autodiff op only scales what was stored — nothing is replayed. The
//! LM head is the target's and frozen: no gradient is formed for it. Each target row's
//! distribution is computed once per chunk, however many draft rows compare with it (Eagle3's
//! seven steps share it).
//!
//! A fused GPU kernel replaces [`chunk_values_and_grads`]; the plan and the op stay.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use deepspec_core::drafter::HeadWeights;

/// `[rows × vocab]` buffers a chunk holds at once at its peak (logits or probabilities,
/// target probabilities, their difference and the gradient being formed).
const LIVE_BUFFERS: usize = 4;

/// Chunk size when the recipe sets none: a chunk's working set — its f32 logits and the
/// few buffers of the same size formed from them — stays under 256 MiB.
pub fn default_chunk_rows(vocab: usize) -> usize {
    ((256usize << 20) / (4 * LIVE_BUFFERS * vocab.max(1))).max(1)
}

/// What each draft row is scored against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMode {
    /// DSpark/DFlash: cross-entropy of the row's label and the L1 distance to the target's
    /// distribution, both with gradients.
    Labels,
    /// Eagle3: soft cross-entropy against the target's distribution (with gradient); the L1
    /// distance and argmax agreement as metrics.
    Soft,
}

/// Draft rows grouped into chunks; within a chunk each distinct target row is computed once.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadPlan {
    pub num_rows: usize,
    pub chunks: Vec<HeadChunk>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeadChunk {
    /// Draft rows of the chunk.
    pub rows: Vec<i64>,
    /// The distinct target rows they compare with.
    pub target_rows: Vec<i64>,
    /// For each draft row, its target row's index in `target_rows`.
    pub local: Vec<i64>,
}

impl HeadPlan {
    /// Draft row `i` compares with target row `target_of[i]`; rows with `needed[i]` false
    /// (zero weight everywhere) are skipped and read as zeros. At most `chunk_rows` draft
    /// rows per chunk; rows are taken in target order so rows sharing a target sit together.
    pub fn new(target_of: &[usize], needed: &[bool], chunk_rows: usize) -> Self {
        assert_eq!(target_of.len(), needed.len(), "head plan: one flag per row");
        let mut order: Vec<usize> = (0..target_of.len()).filter(|&i| needed[i]).collect();
        order.sort_by_key(|&i| (target_of[i], i));
        let chunks = order
            .chunks(chunk_rows.max(1))
            .map(|rows| {
                let mut chunk = HeadChunk {
                    rows: Vec::with_capacity(rows.len()),
                    target_rows: Vec::new(),
                    local: Vec::with_capacity(rows.len()),
                };
                for &i in rows {
                    let t = target_of[i] as i64;
                    if chunk.target_rows.last() != Some(&t) {
                        chunk.target_rows.push(t);
                    }
                    chunk.rows.push(i as i64);
                    chunk.local.push(chunk.target_rows.len() as i64 - 1);
                }
                chunk
            })
            .collect();
        HeadPlan {
            num_rows: target_of.len(),
            chunks,
        }
    }

    /// The plan for rows weighted `weights` (a row of weight 0 is skipped), chunks of
    /// `chunk_rows` (`None`: [`default_chunk_rows`] for `vocab`).
    pub fn weighted(
        target_of: &[usize],
        weights: &[f32],
        chunk_rows: Option<usize>,
        vocab: usize,
    ) -> Self {
        let needed: Vec<bool> = weights.iter().map(|&w| w > 0.0).collect();
        Self::new(
            target_of,
            &needed,
            chunk_rows.unwrap_or_else(|| default_chunk_rows(vocab)),
        )
    }

    /// Where each row's values sit in the chunks' concatenation (skipped rows: one past the
    /// end, a zero row).
    fn gather_index(&self) -> Vec<i64> {
        let covered: usize = self.chunks.iter().map(|c| c.rows.len()).sum();
        let mut index = vec![covered as i64; self.num_rows];
        let mut at = 0;
        for chunk in &self.chunks {
            for &r in &chunk.rows {
                index[r as usize] = at;
                at += 1;
            }
        }
        index
    }
}

/// Inputs of one head loss.
pub struct HeadLossInput<B: Backend> {
    /// `[N, H]` the draft LM head's input (post-norm hidden states).
    pub hidden: Tensor<B, 2>,
    /// `[N, r]` Markov bias features (with `head.markov_w2`).
    pub markov: Option<Tensor<B, 2>>,
    pub head: HeadWeights<B>,
    /// `[M, H]` the target's final hidden states; the target head is `head.lm_head`.
    pub target_hidden: Tensor<B, 2>,
    /// `[N]` labels (mode `Labels`).
    pub labels: Option<Tensor<B, 1, Int>>,
    /// `[N]` weight of each row's loss (CE or soft CE) in the total.
    pub loss_weight: Tensor<B, 1>,
    /// `[N]` weight of each row's L1 distance in the total (mode `Labels`).
    pub l1_weight: Option<Tensor<B, 1>>,
    pub mode: HeadMode,
}

/// What the head loss gives back.
pub struct HeadLossOutput<B: Backend> {
    /// `[1]` `Σ loss_weight·loss + l1_weight·l1`, differentiable.
    pub total: Tensor<B, 1>,
    /// `[N, 4]` each row's loss, L1 distance, argmax agreement (0/1) and the draft's argmax
    /// token id (exact in f32 for vocabularies under 2^24); no gradient.
    pub per_token: Tensor<B, 2>,
}

/// A backend that can run the head loss: every autodiff backend (training).
pub trait HeadLossBackend: Backend {
    fn head_loss(input: HeadLossInput<Self>, plan: &HeadPlan) -> HeadLossOutput<Self>;
}

/// The head loss of `input` laid out by `plan`.
pub fn head_loss<B: HeadLossBackend>(
    input: HeadLossInput<B>,
    plan: &HeadPlan,
) -> HeadLossOutput<B> {
    B::head_loss(input, plan)
}

/// Per-token values, the total and the gradients of the total with respect to the hidden
/// states, the Markov features and `markov_w2`, chunk by chunk, on a backend without autodiff.
struct Computed<B: Backend> {
    total: Tensor<B, 1>,
    per_token: Tensor<B, 2>,
    grad_hidden: Tensor<B, 2>,
    grad_markov: Option<Tensor<B, 2>>,
    grad_w2: Option<Tensor<B, 2>>,
}

fn ints<B: Backend>(values: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// One chunk: values `[d, 4]`, the weighted sum `[1]`, `dZ [d, V]`. Written so that at
/// most [`LIVE_BUFFERS`] `[d, V]` tensors are alive at once (each op takes its input by
/// value, so a backend may reuse the buffer).
pub fn chunk_values_and_grads<B: Backend>(
    logits: Tensor<B, 2>,
    target_probs: Tensor<B, 2>,
    labels: Option<Tensor<B, 1, Int>>,
    loss_weight: Tensor<B, 1>,
    l1_weight: Option<Tensor<B, 1>>,
    mode: HeadMode,
) -> (Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 2>) {
    let [d, _] = logits.dims();
    let pick = logits.clone().argmax(1);
    let agree = pick.clone().equal(target_probs.clone().argmax(1)).float();
    let c0 = loss_weight.reshape([d, 1]);
    let log_p = log_softmax(logits, 1);
    let (loss, mass) = match mode {
        HeadMode::Labels => {
            let labels = labels.as_ref().expect("labels in Labels mode").clone();
            (log_p.clone().gather(1, labels.reshape([d, 1])).neg(), None)
        }
        HeadMode::Soft => (
            (target_probs.clone() * log_p.clone()).sum_dim(1).neg(),
            Some(target_probs.clone().sum_dim(1)),
        ),
    };
    let p = log_p.exp();
    let diff = p.clone() - target_probs.clone();
    let l1 = diff.clone().abs().sum_dim(1);
    let mut total = (loss.clone() * c0.clone()).sum();
    let grad = match mode {
        HeadMode::Labels => {
            // c0 · (p - onehot(label)): subtract c0 at each row's label.
            let labels = labels.expect("labels in Labels mode").reshape([d, 1]);
            let grad = (p.clone() * c0.clone()).scatter(
                1,
                labels,
                c0.neg(),
                burn::tensor::IndexingUpdateOp::Add,
            );
            drop(target_probs);
            match l1_weight {
                Some(c1) => {
                    let c1 = c1.reshape([d, 1]);
                    total = total + (l1.clone() * c1.clone()).sum();
                    // d/dz Σ_v |p_v - t_v| = s ⊙ p - p · Σ_v s_v p_v, with s = sign(p - t).
                    let sp = diff.sign() * p.clone();
                    let spread = sp.clone().sum_dim(1);
                    grad + (sp - p * spread) * c1
                }
                None => grad,
            }
        }
        // d/dz of -Σ_v t_v log p_v is p · Σ_v t_v - t.
        HeadMode::Soft => (p * mass.expect("soft mode") - target_probs) * c0,
    };
    (
        Tensor::cat(vec![loss, l1, agree, pick.float()], 1),
        total,
        grad,
    )
}

/// `c · tanh(z / c)` and its slope `1 − tanh²(z / c)`, or `z` unchanged without a cap.
fn capped<B: Backend>(z: Tensor<B, 2>, cap: Option<f64>) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    match cap {
        Some(c) => {
            let t = (z / c).tanh();
            (t.clone() * c, Some(t.powi_scalar(2).neg() + 1.0))
        }
        None => (z, None),
    }
}

fn compute<B: Backend>(input: &HeadLossInput<B>, plan: &HeadPlan) -> Computed<B> {
    let device = input.hidden.device();
    let [n, h] = input.hidden.dims();
    assert_eq!(n, plan.num_rows, "head loss: plan rows vs hidden rows");
    let w = input.head.lm_head.clone();
    let w2 = input.head.markov_w2.clone();
    let cap = input.head.softcap.filter(|&c| c > 0.0);
    let markov = input.markov.clone().filter(|_| w2.is_some());
    let r = markov.as_ref().map_or(0, |m| m.dims()[1]);
    let mut values = Vec::with_capacity(plan.chunks.len() + 1);
    let mut grad_rows = Vec::with_capacity(plan.chunks.len() + 1);
    let mut grad_markov_rows = Vec::with_capacity(plan.chunks.len() + 1);
    let mut grad_w2: Option<Tensor<B, 2>> = None;
    let mut total = Tensor::<B, 1>::zeros([1], &device);
    for chunk in &plan.chunks {
        let rows = ints::<B>(&chunk.rows, &device);
        let x = input.hidden.clone().select(0, rows.clone());
        // Gemma4 caps `x·Wᵀ` (both the draft's and the target's) before the Markov bias;
        // `cap_slope` is the cap's derivative, which the hidden-state gradient carries.
        let (mut logits, cap_slope) = capped(x.matmul(w.clone().transpose()), cap);
        let f = markov.as_ref().map(|m| m.clone().select(0, rows.clone()));
        if let (Some(f), Some(w2)) = (&f, &w2) {
            logits = logits + f.clone().matmul(w2.clone().transpose());
        }
        let target = input
            .target_hidden
            .clone()
            .select(0, ints::<B>(&chunk.target_rows, &device));
        let mut target_probs = softmax(capped(target.matmul(w.clone().transpose()), cap).0, 1);
        let identity = chunk.target_rows.len() == chunk.rows.len();
        if !identity {
            target_probs = target_probs.select(0, ints::<B>(&chunk.local, &device));
        }
        let (v, t, dz) = chunk_values_and_grads(
            logits,
            target_probs,
            input.labels.clone().map(|l| l.select(0, rows.clone())),
            input.loss_weight.clone().select(0, rows.clone()),
            input.l1_weight.clone().map(|c| c.select(0, rows.clone())),
            input.mode,
        );
        values.push(v);
        total = total + t;
        let dz_uncapped = match cap_slope {
            Some(slope) => dz.clone() * slope,
            None => dz.clone(),
        };
        grad_rows.push(dz_uncapped.matmul(w.clone()));
        if let (Some(f), Some(w2)) = (f, &w2) {
            grad_markov_rows.push(dz.clone().matmul(w2.clone()));
            let g = dz.transpose().matmul(f);
            grad_w2 = Some(match grad_w2 {
                Some(acc) => acc + g,
                None => g,
            });
        }
    }
    let index = ints::<B>(&plan.gather_index(), &device);
    let spread = |mut parts: Vec<Tensor<B, 2>>, width: usize| -> Tensor<B, 2> {
        parts.push(Tensor::zeros([1, width], &device));
        Tensor::cat(parts, 0).select(0, index.clone())
    };
    Computed {
        total,
        per_token: spread(values, 4),
        grad_hidden: spread(grad_rows, h),
        grad_markov: markov.as_ref().map(|_| spread(grad_markov_rows, r)),
        grad_w2: w2
            .as_ref()
            .map(|w2| grad_w2.unwrap_or_else(|| w2.zeros_like())),
    }
}

/// The backward of the head loss: the stored gradients, scaled by the upstream gradient.
#[derive(Debug)]
struct HeadLossBackward;

impl<B: Backend> Backward<B, 3> for HeadLossBackward {
    /// Gradients for (hidden, Markov features, markov_w2), as inner-backend primitives.
    type State = [Option<B::FloatTensorPrimitive>; 3];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream: Tensor<B, 1> =
            Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let scale = upstream.reshape([1, 1]);
        for (parent, grad) in ops.parents.into_iter().zip(ops.state) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                let grad: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(grad));
                grads.register::<B>(node.id, (grad * scale.clone()).into_primitive().tensor());
            }
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> HeadLossBackend for Autodiff<B, C> {
    fn head_loss(input: HeadLossInput<Self>, plan: &HeadPlan) -> HeadLossOutput<Self> {
        let inner = |t: Tensor<Self, 2>| t.inner();
        let computed = compute::<B>(
            &HeadLossInput {
                hidden: inner(input.hidden.clone()),
                markov: input.markov.clone().map(inner),
                head: HeadWeights {
                    lm_head: inner(input.head.lm_head.clone()),
                    markov_w2: input.head.markov_w2.clone().map(inner),
                    softcap: input.head.softcap,
                },
                target_hidden: inner(input.target_hidden.clone()),
                labels: input.labels.clone().map(|l| l.inner()),
                loss_weight: input.loss_weight.clone().inner(),
                l1_weight: input.l1_weight.clone().map(|c| c.inner()),
                mode: input.mode,
            },
            plan,
        );
        // Absent inputs stand in as the hidden states: their slot gets no gradient.
        let hidden = input.hidden.into_primitive().tensor();
        let markov = input
            .markov
            .zip(input.head.markov_w2)
            .map(|(m, w2)| (m.into_primitive().tensor(), w2.into_primitive().tensor()));
        let (markov_node, w2_node) = match &markov {
            Some((m, w2)) => (m.node.clone(), w2.node.clone()),
            None => (hidden.node.clone(), hidden.node.clone()),
        };
        let prim = |t: Option<Tensor<B, 2>>| t.map(|t| t.into_primitive().tensor());
        let state = [
            Some(computed.grad_hidden.into_primitive().tensor()),
            prim(computed.grad_markov),
            prim(computed.grad_w2),
        ];
        let total = match HeadLossBackward
            .prepare::<C>([hidden.node.clone(), markov_node, w2_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, computed.total.into_primitive().tensor()),
            OpsKind::UnTracked(prep) => prep.finish(computed.total.into_primitive().tensor()),
        };
        HeadLossOutput {
            total: Tensor::from_primitive(TensorPrimitive::Float(total)),
            per_token: Tensor::from_inner(computed.per_token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    /// Reference: the whole-vocabulary loss through burn's own autodiff.
    #[allow(clippy::too_many_arguments)]
    fn dense(
        x: Tensor<A, 2>,
        f: Tensor<A, 2>,
        w: Tensor<A, 2>,
        w2: Tensor<A, 2>,
        t: Tensor<A, 2>,
        labels: Tensor<A, 1, Int>,
        c0: Tensor<A, 1>,
        c1: Tensor<A, 1>,
        mode: HeadMode,
    ) -> Tensor<A, 1> {
        let n = x.dims()[0];
        let logits = x.matmul(w.clone().transpose()) + f.matmul(w2.transpose());
        let log_p = log_softmax(logits, 1);
        let p_t = softmax(t.matmul(w.transpose()), 1).detach();
        match mode {
            HeadMode::Labels => {
                let ce = log_p
                    .clone()
                    .gather(1, labels.reshape([n, 1]))
                    .neg()
                    .reshape([n]);
                let l1 = (log_p.exp() - p_t).abs().sum_dim(1).reshape([n]);
                (ce * c0).sum() + (l1 * c1).sum()
            }
            HeadMode::Soft => ((p_t * log_p).sum_dim(1).neg().reshape([n]) * c0).sum(),
        }
    }

    fn check(mode: HeadMode, chunk_rows: usize) {
        let device = Default::default();
        let (n, m, h, r, v) = (9, 6, 5, 3, 17);
        let rand = |shape: [usize; 2]| {
            Tensor::<A, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let x = rand([n, h]).require_grad();
        let f = rand([n, r]).require_grad();
        let w = rand([v, h]);
        let w2 = rand([v, r]).require_grad();
        let t = rand([m, h]);
        let target_of: Vec<usize> = (0..n).map(|i| (i * 5) % m).collect();
        let needed: Vec<bool> = (0..n).map(|i| i != 4).collect();
        let weights: Vec<f32> = (0..n)
            .map(|i| if needed[i] { 0.1 * (i + 1) as f32 } else { 0.0 })
            .collect();
        let c0 = Tensor::<A, 1>::from_data(TensorData::new(weights.clone(), [n]), &device);
        let c1 = c0.clone() * 0.7;
        let labels = Tensor::<A, 1, Int>::from_data(
            TensorData::new(
                (0..n as i64)
                    .map(|i| (i * 3) % v as i64)
                    .collect::<Vec<_>>(),
                [n],
            ),
            &device,
        );
        let index = Tensor::<A, 1, Int>::from_data(
            TensorData::new(target_of.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let want = dense(
            x.clone(),
            f.clone(),
            w.clone(),
            w2.clone(),
            t.clone().select(0, index),
            labels.clone(),
            c0.clone(),
            c1.clone(),
            mode,
        );
        let want_grads = want.backward();
        let plan = HeadPlan::new(&target_of, &needed, chunk_rows);
        let out = head_loss(
            HeadLossInput {
                hidden: x.clone(),
                markov: Some(f.clone()),
                head: HeadWeights {
                    lm_head: w,
                    markov_w2: Some(w2.clone()),
                    softcap: None,
                },
                target_hidden: t,
                labels: Some(labels),
                loss_weight: c0,
                l1_weight: (mode == HeadMode::Labels).then_some(c1),
                mode,
            },
            &plan,
        );
        let close = |name: &str, a: Vec<f32>, b: Vec<f32>| {
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{name}: worst |diff| {worst}");
        };
        let host = |t: Tensor<Flex, 2>| t.into_data().into_vec::<f32>().unwrap();
        close(
            "total",
            out.total.clone().into_data().into_vec::<f32>().unwrap(),
            want.clone().into_data().into_vec::<f32>().unwrap(),
        );
        let got_grads = (out.total * 2.0).backward();
        for (name, p) in [("hidden", &x), ("markov", &f), ("markov_w2", &w2)] {
            let doubled = p.grad(&want_grads).unwrap() * 2.0;
            close(name, host(p.grad(&got_grads).unwrap()), host(doubled));
        }
        let skipped = out
            .per_token
            .narrow(0, 4, 1)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        assert_eq!(skipped, vec![0.0; 4], "a row nobody weighs is skipped");
    }

    #[test]
    fn chunked_head_loss_equals_the_dense_loss_and_its_gradients() {
        for chunk_rows in [1, 4, 100] {
            check(HeadMode::Labels, chunk_rows);
            check(HeadMode::Soft, chunk_rows);
        }
    }

    #[test]
    fn plan_shares_target_rows_within_a_chunk() {
        let plan = HeadPlan::new(&[3, 1, 3, 1, 2], &[true; 5], 4);
        assert_eq!(plan.chunks[0].rows, vec![1, 3, 4, 0]);
        assert_eq!(plan.chunks[0].target_rows, vec![1, 2, 3]);
        assert_eq!(plan.chunks[0].local, vec![0, 0, 1, 2]);
        assert_eq!(plan.chunks[1].rows, vec![2]);
    }
}
