//! Gradients across ranks: flattened in the module's own parameter order (the same in
//! every process, unlike parameter ids) into buckets, summed by the collective, and split
//! back. Every trainable parameter has a slot whether or not this rank's batch reached it
//! (zeros then), so the buckets line up on every rank.

use super::collective::Comm;
use super::{DistSettings, ReduceDtype};
use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, Tensor};

/// One trainable parameter's place in the flat gradient.
#[derive(Debug, Clone)]
struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    rank: usize,
}

struct Layout(Vec<Slot>);

impl<B: AutodiffBackend> ModuleVisitor<B> for Layout {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if value.is_require_grad() {
            self.0.push(Slot {
                id: param.id,
                shape: value.dims().to_vec(),
                rank: D,
            });
        }
    }
}

fn take<B: burn::tensor::backend::Backend, const D: usize>(
    grads: &mut GradientsParams,
    slot: &Slot,
    device: &B::Device,
) -> Tensor<B, 1> {
    let n: usize = slot.shape.iter().product();
    match grads.remove::<B, D>(slot.id) {
        Some(g) => g.reshape([n]).cast(FloatDType::F32),
        None => Tensor::zeros([n], device),
    }
}

fn put<B: burn::tensor::backend::Backend, const D: usize>(
    grads: &mut GradientsParams,
    slot: &Slot,
    flat: Tensor<B, 1>,
) {
    let shape: [usize; D] = slot.shape.clone().try_into().expect("slot rank");
    grads.register::<B, D>(slot.id, flat.reshape(shape));
}

macro_rules! by_rank {
    ($rank:expr, $f:ident, $($arg:expr),*) => {
        match $rank {
            1 => $f::<_, 1>($($arg),*),
            2 => $f::<_, 2>($($arg),*),
            3 => $f::<_, 3>($($arg),*),
            4 => $f::<_, 4>($($arg),*),
            r => panic!("a rank-{r} parameter"),
        }
    };
}

/// Sums `grads` (for `module`'s trainable parameters) and `extras` (step values that must
/// be summed too, such as the step's loss) over every rank. Gradients come back f32
/// whatever their dtype; with [`ReduceDtype::Bf16`] they travel, and are summed, in bf16
/// while `extras` stay f32 in a collective of their own. One collective per bucket of
/// [`DistSettings::bucket_elements`]; with f32, `extras` ride in the last.
pub fn all_reduce_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    extras: Tensor<B::InnerBackend, 1>,
    comm: &Comm<B::InnerBackend>,
    settings: &DistSettings,
) -> anyhow::Result<(GradientsParams, Tensor<B::InnerBackend, 1>)> {
    if comm.is_solo() {
        return Ok((grads, extras));
    }
    let mut layout = Layout(Vec::new());
    module.visit(&mut layout);
    let device = extras.device();
    let flats: Vec<Tensor<B::InnerBackend, 1>> = layout
        .0
        .iter()
        .map(|s| by_rank!(s.rank, take, &mut grads, s, &device))
        .collect();
    let extras = extras.cast(FloatDType::F32);
    let (flats, extras) = match settings.reduce_dtype {
        ReduceDtype::F32 => {
            let mut all = flats;
            all.push(extras);
            (all, None)
        }
        ReduceDtype::Bf16 => (flats, Some(extras)),
    };
    let wire = match settings.reduce_dtype {
        ReduceDtype::F32 => FloatDType::F32,
        ReduceDtype::Bf16 => FloatDType::BF16,
    };
    let mut summed: Vec<Tensor<B::InnerBackend, 1>> = Vec::with_capacity(flats.len() + 1);
    let limit = settings.bucket_elements.max(1);
    let mut rest = flats.into_iter().peekable();
    while let Some(first) = rest.next() {
        let mut elements = first.dims()[0];
        let mut group = vec![first];
        while let Some(next) = rest.next_if(|t| elements + t.dims()[0] <= limit) {
            elements += next.dims()[0];
            group.push(next);
        }
        let parts: Vec<usize> = group.iter().map(|t| t.dims()[0]).collect();
        let total = comm
            .all_reduce_sum(Tensor::cat(group, 0).cast(wire))?
            .cast(FloatDType::F32);
        let mut offset = 0;
        for n in parts {
            summed.push(total.clone().narrow(0, offset, n));
            offset += n;
        }
    }
    let extras = match extras {
        Some(e) => comm.all_reduce_sum(e)?,
        None => summed.pop().expect("the extras' slot"),
    };
    for (slot, flat) in layout.0.iter().zip(summed) {
        by_rank!(slot.rank, put, &mut grads, slot, flat);
    }
    Ok((grads, extras))
}
