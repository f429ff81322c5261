//! `x · wᵀ` for a few rows of `x` against a PyTorch-layout weight `w [out, in]`, on the CPU.
//!
//! Decoding and verification multiply 1–16 token rows by every weight. burn-flex hands
//! that to the `gemm` crate, whose kernels for a few rows cost several times its
//! one-row path (measured on SmolLM2's shapes: 2–8 rows of the 576×49152 head took
//! 10–11 ms against 4–5 ms for one row), so a verification round cost far more than the
//! memory traffic says. Here each output is a dot product of an `x` row and a `w` row,
//! tiles of rows sharing their loads, the weight read once per call.
//!
//! Every output is summed the same way whatever the number of rows, so a row's result
//! does not depend on what else is in the batch: a token verified in a block of eight
//! gets bit for bit the logits it gets alone (greedy verification stays token-identical
//! to greedy decoding).

use burn::tensor::{backend::Backend, Tensor, TensorData, TensorPrimitive};
use std::any::Any;

/// Up to this many rows take this path; more go to the backend's matmul.
pub const MAX_ROWS: usize = 16;

/// Weights of at least this many elements are split across threads.
const PARALLEL_ELEMENTS: usize = 1 << 18;

/// `x [m, k] · w [n, k]ᵀ -> [m, n]`. On burn-flex, f32, at most [`MAX_ROWS`] rows and
/// contiguous operands: the kernel below; anywhere else (other backends, autodiff,
/// other dtypes): the backend's `matmul`.
pub fn matmul_wt<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let [m, k] = x.dims();
    let [n, kw] = w.dims();
    assert_eq!(k, kw, "x · wᵀ: x has {k} columns, w {kw}");
    if (1..=MAX_ROWS).contains(&m) && k > 0 {
        if let Some(out) = flex_matmul_wt::<B>(&x, &w, m, k, n) {
            return out;
        }
    }
    x.matmul(w.transpose())
}

fn flex_matmul_wt<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Tensor<B, 2>> {
    use burn::backend::flex::FlexTensor;
    let device = x.device();
    let TensorPrimitive::Float(xp) = x.clone().into_primitive() else {
        return None;
    };
    let TensorPrimitive::Float(wp) = w.clone().into_primitive() else {
        return None;
    };
    let xf = (&xp as &dyn Any).downcast_ref::<FlexTensor>()?;
    let wf = (&wp as &dyn Any).downcast_ref::<FlexTensor>()?;
    let xs = xf.as_slice::<f32>()?;
    let ws = wf.as_slice::<f32>()?;
    let out = rows_times_weight_t(xs, m, k, ws, n);
    Some(Tensor::from_data(TensorData::new(out, [m, n]), &device))
}

/// `x [m, k]` times `w [n, k]` transposed, row-major `[m, n]`.
pub fn rows_times_weight_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "w is not [{n}, {k}]");
    // Computed as [n, m] (contiguous per weight row, so threads own disjoint chunks).
    let mut out_t = vec![0f32; n * m];
    if n * k >= PARALLEL_ELEMENTS {
        use rayon::prelude::*;
        let rows = n.div_ceil(2 * rayon::current_num_threads()).max(1);
        out_t
            .par_chunks_mut(rows * m)
            .zip(w.par_chunks(rows * k))
            .for_each(|(o, wc)| block(x, m, k, wc, o));
    } else {
        block(x, m, k, w, &mut out_t);
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// `out_t[j * m + i] = x_i · w_j` for every row `j` of `w`.
fn block(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: both features were detected on this CPU.
        unsafe { avx2::block(x, m, k, w, out_t) };
        return;
    }
    portable_block(x, m, k, w, out_t)
}

/// Eight lanes summed in `k` order, then pairwise, then the tail: the order of the AVX2
/// path, without fused multiply-adds.
fn portable_block(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    let full = k / 8 * 8;
    for (wr, o) in w.chunks_exact(k).zip(out_t.chunks_exact_mut(m)) {
        for (i, oi) in o.iter_mut().enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; 8];
            for (xc, wc) in xr[..full].chunks_exact(8).zip(wr[..full].chunks_exact(8)) {
                for l in 0..8 {
                    acc[l] += xc[l] * wc[l];
                }
            }
            let mut s = lanes_sum(&acc);
            for c in full..k {
                s += xr[c] * wr[c];
            }
            *oi = s;
        }
    }
}

fn lanes_sum(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Tiles of up to 2 rows of `x` by 4 rows of `w`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
        let n = w.len() / k;
        let mut j = 0;
        while j < n {
            let rw = (n - j).min(4);
            let mut i = 0;
            while i < m {
                let rx = (m - i).min(2);
                // SAFETY (all four): the tile lies inside x ([m, k]) and w ([n, k]).
                unsafe {
                    match (rx, rw) {
                        (2, 4) => tile::<2, 4>(x, m, k, w, out_t, i, j),
                        (1, 4) => tile::<1, 4>(x, m, k, w, out_t, i, j),
                        (2, _) => (j..j + rw).for_each(|jj| tile::<2, 1>(x, m, k, w, out_t, i, jj)),
                        _ => (j..j + rw).for_each(|jj| tile::<1, 1>(x, m, k, w, out_t, i, jj)),
                    }
                }
                i += rx;
            }
            j += rw;
        }
    }

    /// Outputs `(i..i+RX) × (j..j+RW)`: each dot product summed in eight lanes in `k`
    /// order, then the lanes pairwise, then the tail — the same for every tile shape.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const RX: usize, const RW: usize>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        out_t: &mut [f32],
        i: usize,
        j: usize,
    ) {
        assert!((i + RX) * k <= x.len() && (j + RW) * k <= w.len());
        let full = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); RW]; RX];
        let mut c = 0;
        while c < full {
            let mut wv = [_mm256_setzero_ps(); RW];
            for (b, v) in wv.iter_mut().enumerate() {
                // SAFETY: (j + b) * k + c + 8 <= (j + RW) * k <= w.len().
                *v = unsafe { _mm256_loadu_ps(w.as_ptr().add((j + b) * k + c)) };
            }
            for (a, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + a) * k + c + 8 <= (i + RX) * k <= x.len().
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add((i + a) * k + c)) };
                for (acc, &wv) in row.iter_mut().zip(&wv) {
                    *acc = _mm256_fmadd_ps(xv, wv, *acc);
                }
            }
            c += 8;
        }
        for (a, row) in acc.iter().enumerate() {
            let xr = &x[(i + a) * k..(i + a + 1) * k];
            for (b, &v) in row.iter().enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: eight floats into an eight-float array.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                let mut s = super::lanes_sum(&lanes);
                let wr = &w[(j + b) * k..(j + b + 1) * k];
                for c in full..k {
                    s = xr[c].mul_add(wr[c], s);
                }
                out_t[(j + b) * m + i + a] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::sampling::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        rng.normal_f32(n, 1.0)
    }

    #[test]
    fn few_rows_times_a_weight_match_the_backend_matmul() {
        let device = Default::default();
        let mut rng = Rng::new(7);
        // Tails below eight columns, odd row and weight-row counts, one call above the
        // threading threshold, and 17 rows (the backend's path).
        for (m, k, n) in [
            (1, 5, 3),
            (3, 13, 7),
            (2, 64, 9),
            (8, 576, 1536),
            (16, 33, 513),
            (17, 40, 6),
        ] {
            let (x, w) = (random(&mut rng, m * k), random(&mut rng, n * k));
            let xt = Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
            let wt = Tensor::<Cpu, 2>::from_data(TensorData::new(w.clone(), [n, k]), &device);
            let ours = crate::model::to_host(matmul_wt(xt.clone(), wt.clone())).data;
            let theirs = crate::model::to_host(xt.matmul(wt.transpose())).data;
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}: {a} vs {b}"
                );
            }
            if m <= MAX_ROWS {
                assert_eq!(ours, rows_times_weight_t(&x, m, k, &w, n));
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_a_batch() {
        let mut rng = Rng::new(3);
        let (m, k, n) = (7, 579, 1031);
        let (x, w) = (random(&mut rng, m * k), random(&mut rng, n * k));
        let batch = rows_times_weight_t(&x, m, k, &w, n);
        for i in 0..m {
            let alone = rows_times_weight_t(&x[i * k..(i + 1) * k], 1, k, &w, n);
            assert_eq!(alone, batch[i * n..(i + 1) * n], "row {i}");
        }
        let pair = rows_times_weight_t(&x[2 * k..4 * k], 2, k, &w, n);
        assert_eq!(pair, batch[2 * n..4 * n]);
    }
}
