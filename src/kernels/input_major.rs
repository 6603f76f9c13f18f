//! Linear layers over an input-major weight matrix `wt: [in_dim, out_dim]` (row `i` holds
//! input `i`'s weights for every output: the transpose of the usual `[out, in]`).
//!
//! This is the layout input sparsity (TEAL/WINA) needs: when a token's input `x` has
//! entries too small to matter, the rows of `wt` for those inputs are simply not read,
//! so `y = sum over kept i of x_i · wt[i, :]` reads only the kept rows, each contiguous.
//! The same kernel with every input kept is the dense decode on this layout, and prefill
//! multiplies whole tiles: no second copy of the matrix exists in the other layout.
//!
//! Arithmetic: decode accumulates in f32, one FMA per element and kept input, inputs in
//! ascending order within each thread's contiguous share of the kept list, the threads'
//! partial sums added in thread order (as [`super::sparse::sparse_mlp`], which it uses).
//! A dropped input contributes exactly nothing, so the result equals the dense product of
//! `x` with the dropped entries zeroed, up to summation order.

use super::SharedMut;
use super::WeightView;
use super::f16::f16_to_f32_slice;
use super::pool::ThreadPool;
use super::sparse::{Activation, Items, Strided, sparse_mlp};

/// Reusable buffers of [`matvec_input_major`].
#[derive(Default)]
pub struct InputMajorScratch {
    /// The kept inputs' values, in kept order.
    values: Vec<f32>,
    /// The per-thread accumulators.
    acc: Vec<f32>,
}

/// `out = x · wt` over the inputs `kept` (ascending indices into `x`; None: every input).
/// wt: [in_dim, out_dim] input-major, x: [in_dim], out: [out_dim].
#[allow(clippy::too_many_arguments)]
pub fn matvec_input_major(
    pool: &ThreadPool,
    wt: WeightView<'_>,
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    kept: Option<&[u32]>,
    out: &mut [f32],
    scratch: &mut InputMajorScratch,
) {
    assert_eq!(
        wt.len(),
        in_dim * out_dim,
        "matvec_input_major: weight size"
    );
    assert_eq!(x.len(), in_dim, "matvec_input_major: input size");
    assert_eq!(out.len(), out_dim, "matvec_input_major: output size");
    let down = Strided::matrix(wt, out_dim);
    match kept {
        None => sparse_mlp(
            pool,
            Items::Slots(in_dim),
            Activation::Given(x),
            down,
            &[],
            out,
            &mut scratch.acc,
        ),
        Some(kept) => {
            assert!(
                kept.iter().all(|&i| (i as usize) < in_dim),
                "matvec_input_major: kept index out of range"
            );
            scratch.values.clear();
            scratch.values.extend(kept.iter().map(|&i| x[i as usize]));
            if kept.is_empty() {
                out.fill(0.0);
                return;
            }
            sparse_mlp(
                pool,
                Items::Gather(kept),
                Activation::Given(&scratch.values),
                down,
                &[],
                out,
                &mut scratch.acc,
            )
        }
    }
}

/// Output features per tile of [`matmul_input_major`]: the tile's weights, transposed
/// back to `[64, in_dim]` row-major, stay in L2 while every token passes over them.
const TILE: usize = 64;

/// `out = x · wt` for many tokens (prefill): x: [n, in_dim], wt: [in_dim, out_dim]
/// input-major, out: [n, out_dim]. The output features are split over the pool; each
/// thread transposes tiles of 64 features back to row-major (bf16 stays bf16, f16 widens
/// to f32) and runs the row-major GEMM kernels of [`super::linear`] on them. The transpose
/// reads each weight once per prefill, against `n` multiply-adds per weight.
pub fn matmul_input_major(
    pool: &ThreadPool,
    wt: WeightView<'_>,
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(
        wt.len(),
        in_dim * out_dim,
        "matmul_input_major: weight size"
    );
    assert_eq!(x.len(), n * in_dim, "matmul_input_major: input size");
    assert_eq!(out.len(), n * out_dim, "matmul_input_major: output size");
    if n == 1 {
        let mut s = InputMajorScratch::default();
        return matvec_input_major(pool, wt, in_dim, out_dim, x, None, out, &mut s);
    }
    if matches!(wt, WeightView::Quant(..)) {
        panic!("matmul_input_major: input-major weights are float (f32, bf16, f16)");
    }
    if let WeightView::Bf16(w) = wt
        && super::linear::matmul_input_major_bf16(pool, &[(w, out_dim)], in_dim, x, n, &mut [out])
    {
        return;
    }
    // bf16 with AVX-512 BF16: x rounded to bf16 once, as the row-major prefill does.
    #[cfg(target_arch = "x86_64")]
    let xb: Option<Vec<u16>> =
        (matches!(wt, WeightView::Bf16(_)) && super::gemm_avx512::has_bf16()).then(|| {
            let mut xb = vec![0u16; n * in_dim];
            super::gemm_avx512::to_bf16(x, &mut xb);
            xb
        });
    let dst = SharedMut(out.as_mut_ptr());
    pool.for_ranges(out_dim, 16, &|range| {
        let mut tile_f32: Vec<f32> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        let mut tile_bf16: Vec<u16> = Vec::new();
        let mut o0 = range.start;
        while o0 < range.end {
            let o1 = (o0 + TILE).min(range.end);
            let m = o1 - o0;
            #[cfg(target_arch = "x86_64")]
            if let (WeightView::Bf16(w), Some(xb)) = (wt, xb.as_deref()) {
                transpose_cols(w, out_dim, in_dim, o0, o1, &mut tile_bf16);
                // SAFETY: has_bf16() checked the CPU; this thread writes columns o0..o1 of
                // `out` ([n, out_dim], row stride out_dim) only, disjoint from other
                // threads' ranges; `out` outlives the call (asserted sizes above).
                unsafe {
                    super::gemm_avx512::gemm_bf16(
                        n,
                        m,
                        in_dim,
                        xb,
                        &tile_bf16,
                        dst.get().add(o0),
                        out_dim,
                    )
                };
                o0 = o1;
                continue;
            }
            match wt {
                WeightView::F32(w) => transpose_cols(w, out_dim, in_dim, o0, o1, &mut tile_f32),
                WeightView::Bf16(w) | WeightView::F16(w) => {
                    let mut t16 = Vec::new();
                    transpose_cols(w, out_dim, in_dim, o0, o1, &mut t16);
                    tile_f32.resize(m * in_dim, 0.0);
                    if matches!(wt, WeightView::Bf16(_)) {
                        for (o, &b) in tile_f32.iter_mut().zip(&t16) {
                            *o = super::dot::bf16_to_f32(b);
                        }
                    } else {
                        f16_to_f32_slice(&t16, &mut tile_f32);
                    }
                }
                WeightView::Quant(..) => unreachable!("rejected above"),
            }
            // SAFETY: as above: columns o0..o1 of `out` belong to this thread.
            unsafe {
                super::linear::gemm_f32(n, m, in_dim, dst.get().add(o0), out_dim, x, &tile_f32)
            };
            o0 = o1;
        }
    });
}

/// Columns `o0..o1` of `w` ([rows, cols] row-major) transposed into `dst` (resized to
/// [o1 - o0, rows] row-major).
pub fn transpose_cols<T: Copy + Default>(
    w: &[T],
    cols: usize,
    rows: usize,
    o0: usize,
    o1: usize,
    dst: &mut Vec<T>,
) {
    let m = o1 - o0;
    dst.resize(m * rows, T::default());
    debug_assert!(w.len() == rows * cols);
    for (i, row) in w.chunks_exact(cols).enumerate() {
        for (j, &v) in row[o0..o1].iter().enumerate() {
            dst[j * rows + i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot::{bf16_to_f32, f32_to_bf16};
    use crate::kernels::f16::{f16_to_f32, f32_to_f16};
    use crate::kernels::test_data::data;

    /// f64 reference: `y = sum_i x_i · wt[i, :]` over the weights widened to f32.
    fn reference(wt: &[f32], in_dim: usize, out_dim: usize, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f64; out_dim];
        for i in 0..in_dim {
            for o in 0..out_dim {
                y[o] += x[i] as f64 * wt[i * out_dim + o] as f64;
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= rel * scale, "{what}[{i}]: {a} vs {b}");
        }
    }

    /// Every third input dropped plus a run at the start: kept indices ascending.
    fn kept_of(in_dim: usize, s: usize) -> Vec<u32> {
        (0..in_dim as u32)
            .filter(|&i| i >= (s as u32).min(5) && i % 3 != 1)
            .collect()
    }

    #[test]
    fn sparse_matvec_equals_masked_reference_on_odd_sizes() {
        for (in_dim, out_dim) in [(1, 1), (7, 5), (33, 17), (64, 48), (129, 257), (577, 95)] {
            let w = data(in_dim * out_dim, 1);
            let x = data(in_dim, 2);
            let kept = kept_of(in_dim, 3);
            let mut masked = vec![0f32; in_dim];
            for &i in &kept {
                masked[i as usize] = x[i as usize];
            }
            let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let wh: Vec<u16> = w.iter().map(|&v| f32_to_f16(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
            let whf: Vec<f32> = wh.iter().map(|&b| f16_to_f32(b)).collect();
            let cases: [(WeightView<'_>, &[f32], &str); 3] = [
                (WeightView::F32(&w), &w, "f32"),
                (WeightView::Bf16(&wb), &wbf, "bf16"),
                (WeightView::F16(&wh), &whf, "f16"),
            ];
            for threads in 1..=3 {
                let pool = ThreadPool::new(threads);
                let mut s = InputMajorScratch::default();
                for (view, widened, name) in cases {
                    let want = reference(widened, in_dim, out_dim, &masked);
                    let mut got = vec![f32::NAN; out_dim];
                    matvec_input_major(
                        &pool,
                        view,
                        in_dim,
                        out_dim,
                        &x,
                        Some(&kept),
                        &mut got,
                        &mut s,
                    );
                    let what = format!("{name} {in_dim}x{out_dim} t{threads} sparse");
                    assert_close(&got, &want, 1e-5, &what);
                    // The dense path on the masked input computes the same products.
                    let mut dense = vec![f32::NAN; out_dim];
                    matvec_input_major(
                        &pool, view, in_dim, out_dim, &masked, None, &mut dense, &mut s,
                    );
                    assert_close(&dense, &want, 1e-5, &format!("{what} masked dense"));
                    // Every input kept is the dense path, bit for bit.
                    let all: Vec<u32> = (0..in_dim as u32).collect();
                    let mut a = vec![0f32; out_dim];
                    let mut b = vec![0f32; out_dim];
                    matvec_input_major(
                        &pool,
                        view,
                        in_dim,
                        out_dim,
                        &x,
                        Some(&all),
                        &mut a,
                        &mut s,
                    );
                    matvec_input_major(&pool, view, in_dim, out_dim, &x, None, &mut b, &mut s);
                    assert_eq!(a, b, "{what}: all kept == dense");
                }
            }
        }
    }

    #[test]
    fn nothing_kept_gives_zero() {
        let pool = ThreadPool::new(2);
        let w = data(12, 1);
        let mut out = vec![1f32; 4];
        let mut s = InputMajorScratch::default();
        matvec_input_major(
            &pool,
            WeightView::F32(&w),
            3,
            4,
            &[1.0, 2.0, 3.0],
            Some(&[]),
            &mut out,
            &mut s,
        );
        assert_eq!(out, vec![0.0; 4]);
    }

    #[test]
    fn prefill_matches_reference_on_odd_sizes() {
        for (in_dim, out_dim, n) in [(7, 5, 2), (33, 70, 3), (64, 129, 17), (130, 65, 20)] {
            let w = data(in_dim * out_dim, 5);
            let x = data(n * in_dim, 6);
            let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let wh: Vec<u16> = w.iter().map(|&v| f32_to_f16(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
            let whf: Vec<f32> = wh.iter().map(|&b| f16_to_f32(b)).collect();
            // The bf16 GEMM rounds x to bf16 (as the row-major prefill does).
            let bf16_x = crate::kernels::gemm_avx512::has_bf16();
            let cases: [(WeightView<'_>, &[f32], bool, &str); 3] = [
                (WeightView::F32(&w), &w, false, "f32"),
                (WeightView::Bf16(&wb), &wbf, bf16_x, "bf16"),
                (WeightView::F16(&wh), &whf, false, "f16"),
            ];
            for threads in 1..=3 {
                let pool = ThreadPool::new(threads);
                for (view, widened, round_x, name) in cases {
                    let mut got = vec![f32::NAN; n * out_dim];
                    matmul_input_major(&pool, view, in_dim, out_dim, &x, n, &mut got);
                    for t in 0..n {
                        let mut xt = x[t * in_dim..(t + 1) * in_dim].to_vec();
                        if round_x {
                            xt.iter_mut()
                                .for_each(|v| *v = bf16_to_f32(f32_to_bf16(*v)));
                        }
                        let want = reference(widened, in_dim, out_dim, &xt);
                        let what = format!("{name} {in_dim}x{out_dim} n{n} t{threads} token {t}");
                        assert_close(&got[t * out_dim..(t + 1) * out_dim], &want, 1e-5, &what);
                    }
                }
            }
        }
    }
}
