//! Block construction for DSpark/DFlash training (the reference's block sampling in
//! `dspark_trainer.py`): block inputs, RoPE positions, anchors (what each block sees is
//! described by them — `Visibility::Blocks` — never spelled out as a mask), labels,
//! supervised prefix and teacher-forced previous tokens. Pure host arithmetic, so every rule
//! is testable on its own.

use crate::anchors::Anchors;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    /// `[b][N*B]` block input tokens: the anchor token in slot 0 of a kept block, else mask.
    pub block_tokens: Vec<Vec<i64>>,
    /// `[b][L + N*B]` RoPE positions: context `0..L`, then `anchor + j` (dummies: `j`).
    pub positions: Vec<Vec<i64>>,
    /// `[b][N]` each block's anchor, `-1` for a dropped block: a slot sees the context
    /// before its anchor and its own block.
    pub anchors: Vec<Vec<i64>>,
    /// `[b][N][B]` label of each slot.
    pub target_ids: Vec<Vec<Vec<i64>>>,
    /// `[b][N][B]` supervised slots (a contiguous prefix of each block).
    pub eval_mask: Vec<Vec<Vec<bool>>>,
    /// `[b][N][B]` the token before each slot (teacher forcing).
    pub prev_tokens: Vec<Vec<Vec<i64>>>,
    /// `[b][N][B]` where the target predicted each label: the row of
    /// `target_last_hidden_states` whose LM-head output is the slot's target distribution.
    pub target_rows: Vec<Vec<Vec<usize>>>,
}

pub fn build_blocks(
    input_ids: &[Vec<i64>],
    loss_mask: &[Vec<u8>],
    anchors: &Anchors,
    block_size: usize,
    mask_token_id: u32,
) -> BlockLayout {
    let batch = input_ids.len();
    let len = input_ids.first().map_or(0, Vec::len);
    let num_blocks = anchors.positions.first().map_or(0, Vec::len);
    let slots = num_blocks * block_size;
    let mask = mask_token_id as i64;
    let mut layout = BlockLayout {
        num_blocks,
        block_size,
        block_tokens: Vec::with_capacity(batch),
        positions: Vec::with_capacity(batch),
        anchors: Vec::with_capacity(batch),
        target_ids: Vec::with_capacity(batch),
        eval_mask: Vec::with_capacity(batch),
        prev_tokens: Vec::with_capacity(batch),
        target_rows: Vec::with_capacity(batch),
    };
    for b in 0..batch {
        let ids = &input_ids[b];
        let mut tokens = vec![mask; slots];
        let mut positions: Vec<i64> = (0..len as i64).collect();
        let mut block_anchors = Vec::with_capacity(num_blocks);
        let mut targets = Vec::with_capacity(num_blocks);
        let mut evals = Vec::with_capacity(num_blocks);
        let mut prevs = Vec::with_capacity(num_blocks);
        let mut rows = Vec::with_capacity(num_blocks);
        for m in 0..num_blocks {
            let anchor = anchors.positions[b][m];
            let keep = anchors.keep[b][m];
            if keep {
                tokens[m * block_size] = ids[anchor];
            }
            block_anchors.push(if keep { anchor as i64 } else { -1 });
            let mut target = Vec::with_capacity(block_size);
            let mut eval = Vec::with_capacity(block_size);
            let mut row = Vec::with_capacity(block_size);
            let mut prefix = true;
            for j in 0..block_size {
                positions.push(if keep { (anchor + j) as i64 } else { j as i64 });
                let label = anchor + j + 1;
                let safe = if keep { label.min(len - 1) } else { 0 };
                target.push(ids[safe]);
                prefix = prefix && keep && label < len && loss_mask[b][safe] == 1;
                eval.push(prefix);
                row.push(if keep { safe.saturating_sub(1) } else { 0 });
            }
            let mut prev = Vec::with_capacity(block_size);
            prev.push(ids[anchor]);
            prev.extend_from_slice(&target[..block_size - 1]);
            targets.push(target);
            evals.push(eval);
            prevs.push(prev);
            rows.push(row);
        }
        layout.block_tokens.push(tokens);
        layout.positions.push(positions);
        layout.anchors.push(block_anchors);
        layout.target_ids.push(targets);
        layout.eval_mask.push(evals);
        layout.prev_tokens.push(prevs);
        layout.target_rows.push(rows);
    }
    layout
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData};
    use deepspec_core::model::attention::Visibility;

    /// The dense mask the layout's description stands for, `[N*B][L + N*B]`.
    fn dense(layout: &BlockLayout, len: usize) -> Vec<Vec<bool>> {
        let device = Default::default();
        let n = layout.num_blocks;
        let slots = n * layout.block_size;
        let visibility = Visibility::<Flex>::Blocks {
            anchors: Tensor::<Flex, 2, Int>::from_data(
                TensorData::new(layout.anchors[0].clone(), [1, n]),
                &device,
            ),
            block_size: layout.block_size,
            context_len: len,
            window: None,
        };
        let flat = visibility
            .dense_mask(1, slots, len + slots, &device)
            .into_data()
            .into_vec::<bool>()
            .unwrap();
        flat.chunks(len + slots).map(<[bool]>::to_vec).collect()
    }

    /// The reference's worked example: L = 10, B = 3, anchors [2, 5].
    #[test]
    fn worked_example_visibility_and_labels() {
        let ids: Vec<i64> = (100..110).collect();
        let anchors = Anchors {
            positions: vec![vec![2, 5, 0]],
            keep: vec![vec![true, true, false]],
            candidates: vec![2],
        };
        let layout = build_blocks(&[ids], &[vec![1; 10]], &anchors, 3, 999);
        assert_eq!(
            layout.block_tokens[0],
            vec![102, 999, 999, 105, 999, 999, 999, 999, 999]
        );
        assert_eq!(&layout.positions[0][10..], &[2, 3, 4, 5, 6, 7, 0, 1, 2]);
        assert_eq!(layout.target_ids[0][0], vec![103, 104, 105]);
        assert_eq!(layout.target_ids[0][1], vec![106, 107, 108]);
        let visible = dense(&layout, 10);
        let seen = |q: usize| -> Vec<usize> { (0..19).filter(|&k| visible[q][k]).collect() };
        assert_eq!(seen(0), vec![0, 1, 10, 11, 12]);
        assert_eq!(seen(4), vec![0, 1, 2, 3, 4, 13, 14, 15]);
        assert!(seen(7).is_empty(), "dummy blocks see nothing");
        assert_eq!(layout.prev_tokens[0][1], vec![105, 106, 107]);
        assert_eq!(layout.eval_mask[0][2], vec![false; 3]);
    }

    #[test]
    fn supervision_stops_at_the_first_unsupervised_label() {
        let anchors = Anchors {
            positions: vec![vec![1]],
            keep: vec![vec![true]],
            candidates: vec![1],
        };
        let layout = build_blocks(
            &[(0..6).collect()],
            &[vec![0, 1, 1, 0, 1, 1]],
            &anchors,
            4,
            9,
        );
        assert_eq!(layout.eval_mask[0][0], vec![true, false, false, false]);
    }
}
