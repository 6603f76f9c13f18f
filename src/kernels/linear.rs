//! Linear layers over a weight matrix `w: [rows, cols]` (row-major, one row per output):
//! matrix-vector for decode and matrix-matrix for prefill, split by rows over the thread
//! pool.

use super::dot::{bf16_to_f32, dot_bf16, dot_f32, rows_bf16, rows_f32};
use super::pool::ThreadPool;

/// A borrowed weight matrix in one of the compute formats.
#[derive(Clone, Copy)]
pub enum WeightView<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
}

impl WeightView<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(w) => w.len(),
            WeightView::Bf16(w) => w.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            WeightView::F32(_) => 4,
            WeightView::Bf16(_) => 2,
        }
    }
    /// Dot product of row `r` (of width `cols`) with `x`.
    #[inline]
    pub fn row_dot(&self, r: usize, cols: usize, x: &[f32]) -> f32 {
        match self {
            WeightView::F32(w) => dot_f32(&w[r * cols..(r + 1) * cols], x),
            WeightView::Bf16(w) => dot_bf16(&w[r * cols..(r + 1) * cols], x),
        }
    }
    /// Row `r` widened to f32 into `out`.
    pub fn row_to_f32(&self, r: usize, cols: usize, out: &mut [f32]) {
        match self {
            WeightView::F32(w) => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            WeightView::Bf16(w) => {
                for (o, &b) in out.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                    *o = bf16_to_f32(b);
                }
            }
        }
    }
}

/// A raw pointer that may be shared across the pool's threads; each thread writes a
/// disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only to write disjoint ranges from different threads (see each use).
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the Sync wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows per unit of work: keeps each thread's range a whole number of cache lines of
/// output and enough rows to amortise the dispatch.
const ROW_ALIGN: usize = 16;

/// `out = w · x`. w: [rows, cols], x: [cols], out: [rows].
pub fn matvec(
    pool: &ThreadPool,
    w: WeightView<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    assert_eq!(w.len(), rows * cols, "matvec: weight size");
    assert_eq!(x.len(), cols, "matvec: input size");
    assert_eq!(out.len(), rows, "matvec: output size");
    let dst = SharedMut(out.as_mut_ptr());
    pool.for_ranges(rows, ROW_ALIGN, &|range| {
        // SAFETY: `for_ranges` hands each thread a disjoint sub-range of 0..rows, and
        // `out` has `rows` elements and outlives the call.
        let out =
            unsafe { std::slice::from_raw_parts_mut(dst.get().add(range.start), range.len()) };
        match w {
            WeightView::F32(w) => rows_f32(&w[range.start * cols..range.end * cols], x, out),
            WeightView::Bf16(w) => rows_bf16(&w[range.start * cols..range.end * cols], x, out),
        }
    });
}

/// Scalar reference for `matmul`.
pub fn matmul_scalar(
    w: WeightView<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        w.row_to_f32(r, cols, &mut row);
        for t in 0..n {
            out[t * rows + r] = super::dot::dot_f32_scalar(&row, &x[t * cols..(t + 1) * cols]);
        }
    }
}

/// Rows of a bf16 matrix widened at a time for the f32 GEMM: 64 rows of a 2048-wide
/// matrix is 512 KiB of f32, which stays in L2.
const BF16_TILE_ROWS: usize = 64;

/// `out = x · w^T`. x: [n, cols], w: [rows, cols], out: [n, rows].
///
/// f32 weights go straight to the `gemm` crate; bf16 weights are widened to f32 one tile
/// of rows at a time (the widening costs one pass over the tile, amortised over `n`
/// tokens), so bf16 prefill runs at f32 GEMM speed instead of falling off a cliff.
pub fn matmul(
    pool: &ThreadPool,
    w: WeightView<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(w.len(), rows * cols, "matmul: weight size");
    assert_eq!(x.len(), n * cols, "matmul: input size");
    assert_eq!(out.len(), n * rows, "matmul: output size");
    if n == 1 {
        return matvec(pool, w, rows, cols, x, out);
    }
    let dst = SharedMut(out.as_mut_ptr());
    pool.for_ranges(rows, ROW_ALIGN, &|range| {
        match w {
            WeightView::F32(wf) => {
                // SAFETY: this thread writes columns `range` of `out` ([n, rows]) only;
                // ranges of different threads are disjoint; pointers and strides describe
                // in-bounds matrices (asserted sizes above).
                unsafe {
                    gemm_f32(
                        n,
                        range.len(),
                        cols,
                        dst.get().add(range.start),
                        rows,
                        x,
                        &wf[range.start * cols..range.end * cols],
                    )
                };
            }
            WeightView::Bf16(_) => {
                let mut tile = vec![0f32; BF16_TILE_ROWS.min(range.len()) * cols];
                let mut r0 = range.start;
                while r0 < range.end {
                    let r1 = (r0 + BF16_TILE_ROWS).min(range.end);
                    for (i, r) in (r0..r1).enumerate() {
                        w.row_to_f32(r, cols, &mut tile[i * cols..(i + 1) * cols]);
                    }
                    // SAFETY: as for f32: columns r0..r1 of `out` belong to this thread.
                    unsafe {
                        gemm_f32(
                            n,
                            r1 - r0,
                            cols,
                            dst.get().add(r0),
                            rows,
                            x,
                            &tile[..(r1 - r0) * cols],
                        )
                    };
                    r0 = r1;
                }
            }
        }
    });
}

/// `dst[t, j] = sum_k x[t, k] * w[j, k]` for t < n, j < m; dst has row stride `ld`.
///
/// # Safety
/// `dst` must be valid for writes at `t * ld + j` for all t < n, j < m, and not be
/// accessed by anyone else during the call.
unsafe fn gemm_f32(n: usize, m: usize, k: usize, dst: *mut f32, ld: usize, x: &[f32], w: &[f32]) {
    debug_assert!(x.len() >= n * k && w.len() >= m * k);
    // SAFETY: the caller guarantees dst; x is [n, k] row-major (row stride k, col stride
    // 1); w^T as [k, m] reads w[j, kk] at j * k + kk (row stride 1, col stride k).
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            dst,
            1,
            ld as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::dot::f32_to_bf16;
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The activations as the matvec kernel sees them.
    fn matvec_activations(w: WeightView<'_>, x: &[f32]) -> Vec<f32> {
        match w {
            WeightView::Bf16(_) if super::super::dot::has_avx512_bf16() => x
                .iter()
                .map(|&v| super::super::dot::bf16_to_f32(f32_to_bf16(v)))
                .collect(),
            _ => x.to_vec(),
        }
    }

    #[test]
    fn matvec_and_matmul_match_scalar_on_odd_sizes() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, cols, n) in [
                (1, 1, 1),
                (17, 33, 3),
                (65, 130, 5),
                (200, 577, 2),
                (33, 64, 1),
            ] {
                let wf = data(rows * cols, 1);
                let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
                let x = data(n * cols, 2);
                for w in [WeightView::F32(&wf), WeightView::Bf16(&wb)] {
                    let mut want = vec![0f32; n * rows];
                    let xr = if n == 1 {
                        matvec_activations(w, &x)
                    } else {
                        x.clone()
                    };
                    matmul_scalar(w, rows, cols, &xr, n, &mut want);
                    let mut got = vec![0f32; n * rows];
                    matmul(&pool, w, rows, cols, &x, n, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "{rows}x{cols} n={n}: {a} vs {b}"
                        );
                    }
                    let mut mv = vec![0f32; rows];
                    matvec(&pool, w, rows, cols, &x[..cols], &mut mv);
                    // The bf16 matvec rounds the activations to bf16 where AVX-512 BF16
                    // is used: the reference does the same.
                    let x1 = matvec_activations(w, &x[..cols]);
                    let mut want1 = vec![0f32; rows];
                    matmul_scalar(w, rows, cols, &x1, 1, &mut want1);
                    for (a, b) in mv.iter().zip(&want1) {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "matvec {rows}x{cols}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
