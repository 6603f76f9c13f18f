//! Linear layers over a weight matrix `w: [rows, cols]` (row-major, one row per output):
//! matrix-vector for decode and matrix-matrix for prefill, split by rows over the thread
//! pool.

use super::SharedMut;
use super::dot::{bf16_to_f32, dot_bf16, dot_f32, rows_bf16, rows_f32};
use super::f16::{dot_f16, f16_to_f32_slice, rows_f16};
#[cfg(target_arch = "x86_64")]
use super::gemm_avx512;
use super::pool::ThreadPool;
use super::qdot::{
    QPair, TOKENS_PER_STEP, quantize_activations, quantize_activations_for, rows_q, rows_q_blocks,
    rows_q_tokens_by_row,
};
use crate::quant::{QFormat, QK};

/// `SPARSELLM_GEMM=crate` sends prefill GEMMs to the `gemm` crate (bf16 widened to f32)
/// even on AVX-512 CPUs: the previous path, kept for comparisons.
#[cfg(target_arch = "x86_64")]
fn use_gemm_crate() -> bool {
    static CRATE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CRATE.get_or_init(|| std::env::var("SPARSELLM_GEMM").is_ok_and(|v| v == "crate"))
}

/// A borrowed weight matrix in one of the compute formats.
#[derive(Clone, Copy)]
pub enum WeightView<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE f16 bit patterns.
    F16(&'a [u16]),
    /// GGUF quantized blocks, rows of whole blocks.
    Quant(QFormat, &'a [u8]),
}

impl WeightView<'_> {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            WeightView::F32(w) => w.len(),
            WeightView::Bf16(w) => w.len(),
            WeightView::F16(w) => w.len(),
            WeightView::Quant(f, w) => w.len() / f.block_bytes() * f.block_elems(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the weights occupy (what a matvec reads).
    pub fn byte_len(&self) -> usize {
        match self {
            WeightView::F32(w) => 4 * w.len(),
            WeightView::Bf16(w) => 2 * w.len(),
            WeightView::F16(w) => 2 * w.len(),
            WeightView::Quant(_, w) => w.len(),
        }
    }
    /// Dot product of row `r` (of width `cols`) with `x` (quantized rows are widened
    /// first: the exact product, for tests and cold paths; matvec quantizes `x` instead).
    #[inline]
    pub fn row_dot(&self, r: usize, cols: usize, x: &[f32]) -> f32 {
        match self {
            WeightView::F32(w) => dot_f32(&w[r * cols..(r + 1) * cols], x),
            WeightView::Bf16(w) => dot_bf16(&w[r * cols..(r + 1) * cols], x),
            WeightView::F16(w) => dot_f16(&w[r * cols..(r + 1) * cols], x),
            WeightView::Quant(..) => {
                let mut row = vec![0f32; cols];
                self.row_to_f32(r, cols, &mut row);
                dot_f32(&row, x)
            }
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
            WeightView::F16(w) => f16_to_f32_slice(&w[r * cols..(r + 1) * cols], out),
            WeightView::Quant(f, w) => {
                let rb = f.row_bytes(cols);
                crate::quant::dequantize(f.source(), &w[r * rb..(r + 1) * rb], out)
            }
        }
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
    let mut xq: Vec<QPair> = Vec::new();
    if let WeightView::Quant(f, _) = w {
        quantize_activations_for(f, x, &mut xq);
    }
    let xq = &xq[..];
    pool.for_ranges(rows, ROW_ALIGN, &|range| {
        // SAFETY: `for_ranges` hands each thread a disjoint sub-range of 0..rows, and
        // `out` has `rows` elements and outlives the call.
        let out =
            unsafe { std::slice::from_raw_parts_mut(dst.get().add(range.start), range.len()) };
        matvec_rows(w, range, cols, x, xq, out);
    });
}

/// Rows `range` of [`matvec`]'s product (`xq`: `x` quantized for quantized weights);
/// each row's dot product is computed on its own, so how the rows are split does not
/// change any result.
fn matvec_rows(
    w: WeightView<'_>,
    range: std::ops::Range<usize>,
    cols: usize,
    x: &[f32],
    xq: &[QPair],
    out: &mut [f32],
) {
    match w {
        WeightView::F32(w) => rows_f32(&w[range.start * cols..range.end * cols], x, out),
        WeightView::Bf16(w) => rows_bf16(&w[range.start * cols..range.end * cols], x, out),
        WeightView::F16(w) => rows_f16(&w[range.start * cols..range.end * cols], x, out),
        WeightView::Quant(f, w) => {
            let rb = f.row_bytes(cols);
            rows_q(f, &w[range.start * rb..range.end * rb], rb, xq, out)
        }
    }
}

/// [`matmul_many`] with every (row, token) product equal to decode's, as
/// [`matmul_per_token`]: quantized matrices share [`matmul_many`]'s one job (their
/// products are decode's in every kernel), float ones run [`matmul_per_token`] each.
pub fn matmul_many_per_token(
    pool: &ThreadPool,
    ws: &[(WeightView<'_>, usize)],
    cols: usize,
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
) {
    if ws.iter().all(|(w, _)| matches!(w, WeightView::Quant(..))) {
        return matmul_many(pool, ws, cols, x, n, outs);
    }
    for (&(w, rows), out) in ws.iter().zip(outs.iter_mut()) {
        matmul_per_token(pool, w, rows, cols, x, n, out);
    }
}

/// Rows per tile of [`matmul_per_token`]: 64 rows of a 2048-wide bf16 matrix are 256 KiB,
/// which stay in L2 while every token passes over them.
const PER_TOKEN_TILE_ROWS: usize = 64;

/// `out = x · w^T` (x: [n, cols], out: [n, rows]) with every (row, token) product equal,
/// bit for bit, to what [`matvec`] gives for that token alone, while each tile of rows is
/// read from memory once for all n tokens: a batch of decode steps of different
/// sequences, whose results must not depend on the batch. Quantized weights go to
/// [`matmul`] (whose products already equal decode's); float weights run decode's own
/// row kernels on each token over a tile that stays in cache.
pub fn matmul_per_token(
    pool: &ThreadPool,
    w: WeightView<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    if n == 1 || matches!(w, WeightView::Quant(..)) {
        return matmul(pool, w, rows, cols, x, n, out);
    }
    assert_eq!(w.len(), rows * cols, "matmul_per_token: weight size");
    assert_eq!(x.len(), n * cols, "matmul_per_token: input size");
    assert_eq!(out.len(), n * rows, "matmul_per_token: output size");
    let dst = SharedMut(out.as_mut_ptr());
    pool.for_ranges(rows, ROW_ALIGN, &|range| {
        let mut r0 = range.start;
        while r0 < range.end {
            let r1 = (r0 + PER_TOKEN_TILE_ROWS).min(range.end);
            for (t, xt) in x.chunks_exact(cols).enumerate() {
                // SAFETY: this thread writes columns r0..r1 (inside its range, disjoint
                // from other threads') of row t of `out` ([n, rows]); in bounds by the
                // asserted sizes; `out` outlives the call.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add(t * rows + r0), r1 - r0)
                };
                matvec_rows(w, r0..r1, cols, xt, &[], o);
            }
            r0 = r1;
        }
    });
}

/// `out = w[:, blocks] · x` for a quantized `w: [rows, cols]`: only the 32-column blocks
/// `blocks` of each row, `x` holding those blocks' 32 values each in the same order
/// (`x.len() == 32 · blocks.len()`). Rows split over the pool as in [`matvec`].
pub fn matvec_blocks(
    pool: &ThreadPool,
    w: WeightView<'_>,
    rows: usize,
    cols: usize,
    blocks: &[u32],
    x: &[f32],
    out: &mut [f32],
) {
    let WeightView::Quant(f, wq) = w else {
        panic!("matvec_blocks: the weights are not quantized blocks");
    };
    assert_eq!(w.len(), rows * cols, "matvec_blocks: weight size");
    assert_eq!(x.len(), blocks.len() * QK, "matvec_blocks: input size");
    assert_eq!(out.len(), rows, "matvec_blocks: output size");
    // One scale per 32-element block for every format: the gathered blocks are not
    // ggml's 256-element groups, and finer scales round less.
    let mut xq = Vec::new();
    quantize_activations(x, &mut xq);
    let rb = f.row_bytes(cols);
    let (xq, dst) = (&xq[..], SharedMut(out.as_mut_ptr()));
    pool.for_ranges(rows, ROW_ALIGN, &|range| {
        // SAFETY: `for_ranges` hands each thread a disjoint sub-range of 0..rows, and
        // `out` has `rows` elements and outlives the call.
        let out =
            unsafe { std::slice::from_raw_parts_mut(dst.get().add(range.start), range.len()) };
        rows_q_blocks(
            f,
            &wq[range.start * rb..range.end * rb],
            rb,
            blocks,
            xq,
            out,
        )
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

/// Rows of a bf16 matrix widened at a time for the f32 GEMM (the fallback without
/// AVX-512 BF16): 64 rows of a 2048-wide matrix is 512 KiB of f32, which stays in L2.
const BF16_TILE_ROWS: usize = 64;

/// `out = x · w^T`. x: [n, cols], w: [rows, cols], out: [n, rows].
///
/// Work is split over the pool by weight rows: each thread reads its own rows of `w` once
/// and writes its own columns of `out`, while all threads share `x` (small: n x cols).
/// n == 1 (decode) goes to [`matvec`]. Otherwise, by CPU and weight type:
/// - bf16 with AVX-512 BF16: `x` is rounded to bf16 once (as decode and llama.cpp do for
///   bf16 models) and [`gemm_avx512::gemm_bf16`] multiplies bf16 pairs with `vdpbf16ps`;
/// - f32 (or bf16 without AVX-512 BF16, widened to f32 a tile of rows at a time) with
///   AVX-512: [`gemm_avx512::gemm_f32`];
/// - elsewhere the `gemm` crate (AVX2/FMA or portable code).
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
    if let WeightView::Quant(f, wq) = w {
        return matmul_quant(pool, f, wq, rows, cols, x, n, out);
    }
    let dst = SharedMut(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if let WeightView::Bf16(wb) = w
        && use_packed_bf16(n)
    {
        return matmul_bf16_packed(pool, x, n, cols, &[(wb, rows, dst)]);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(w, WeightView::Bf16(_)) && gemm_avx512::has_bf16() && !use_gemm_crate() {
        let mut xb = vec![0u16; n * cols];
        gemm_avx512::to_bf16(x, &mut xb);
        let xb = &xb[..];
        pool.for_ranges(rows, ROW_ALIGN, &|range| {
            let WeightView::Bf16(wb) = w else {
                unreachable!("checked above")
            };
            // SAFETY: has_bf16() checked the CPU; this thread writes columns `range` of
            // `out` ([n, rows], row stride `rows`) only, disjoint from other threads';
            // `out` outlives the call (asserted sizes above).
            unsafe {
                gemm_avx512::gemm_bf16(
                    n,
                    range.len(),
                    cols,
                    xb,
                    &wb[range.start * cols..range.end * cols],
                    dst.get().add(range.start),
                    rows,
                )
            };
        });
        return;
    }
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
            WeightView::Quant(..) => unreachable!("quantized weights returned above"),
            // f16 widens exactly; per weight one conversion against n FMAs.
            WeightView::Bf16(_) | WeightView::F16(_) => {
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

/// `outs[i] = x · ws[i]^T` for weight matrices that share their input (a layer's q, k and
/// v projections; gate and up): x: [n, cols], `ws[i]`: [rows_i, cols], `outs[i]`:
/// [n, rows_i]. With bf16 weights on AVX-512 BF16 this is one pool job (the activations
/// packed once, the rows of all matrices dealt out in chunks), and with quantized weights
/// and several tokens too ([`matmul_quant_many`]); otherwise one [`matmul`] per matrix.
pub fn matmul_many(
    pool: &ThreadPool,
    ws: &[(WeightView<'_>, usize)],
    cols: usize,
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(ws.len(), outs.len(), "matmul_many: one output per matrix");
    #[cfg(target_arch = "x86_64")]
    if use_packed_bf16(n) && ws.iter().all(|(w, _)| matches!(w, WeightView::Bf16(_))) {
        let parts: Vec<(&[u16], usize, SharedMut)> = ws
            .iter()
            .zip(outs.iter_mut())
            .map(|(&(w, rows), out)| {
                let WeightView::Bf16(wb) = w else {
                    unreachable!("checked above")
                };
                assert_eq!(w.len(), rows * cols, "matmul_many: weight size");
                assert_eq!(out.len(), n * rows, "matmul_many: output size");
                (wb, rows, SharedMut(out.as_mut_ptr()))
            })
            .collect();
        assert_eq!(x.len(), n * cols, "matmul_many: input size");
        return matmul_bf16_packed(pool, x, n, cols, &parts);
    }
    if n > 1 && ws.iter().all(|(w, _)| matches!(w, WeightView::Quant(..))) {
        let parts: Vec<QuantPart<'_>> = ws
            .iter()
            .zip(outs.iter_mut())
            .map(|(&(w, rows), out)| {
                let WeightView::Quant(f, wq) = w else {
                    unreachable!("checked above")
                };
                assert_eq!(out.len(), n * rows, "matmul_many: output size");
                QuantPart {
                    f,
                    w: wq,
                    rows,
                    out: SharedMut(out.as_mut_ptr()),
                }
            })
            .collect();
        return matmul_quant_many(pool, &parts, cols, x, n);
    }
    for (&(w, rows), out) in ws.iter().zip(outs.iter_mut()) {
        matmul(pool, w, rows, cols, x, n, out);
    }
}

/// Fewest tokens for the packed bf16 kernel (16 tokens fill one group's lanes; below that
/// the row-tile kernel wastes less).
const PACKED_MIN_TOKENS: usize = 16;

/// Whether a bf16 matmul of `n` tokens goes to [`matmul_bf16_packed`].
#[cfg(target_arch = "x86_64")]
fn use_packed_bf16(n: usize) -> bool {
    n >= PACKED_MIN_TOKENS && gemm_avx512::has_bf16() && !use_gemm_crate()
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The packed activations of [`matmul_bf16_packed`], kept between calls (a prefill
    /// packs a few hundred KiB per matrix; reallocating would page-fault each time).
    static PACKED: std::cell::RefCell<gemm_avx512::PackedBf16> = Default::default();
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Row-major tiles of input-major weights for [`packed_job`]'s `GemmT`/`SwiGluT`.
    static TILES: std::cell::RefCell<(Vec<u16>, Vec<u16>)> = Default::default();
}

/// `outs[i] = x · ws[i]` for input-major bf16 matrices `ws[i]`: ([cols, rows_i]) sharing
/// their input x: [n, cols], with the packed kernel in one pool job. Returns false
/// (doing nothing) unless the packed kernel applies (AVX-512 BF16, n >= 16).
pub fn matmul_input_major_bf16(
    pool: &ThreadPool,
    ws: &[(&[u16], usize)],
    cols: usize,
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if use_packed_bf16(n) {
        let parts: Vec<Part<'_>> = ws
            .iter()
            .zip(outs.iter_mut())
            .map(|(&(w, rows), out)| {
                assert_eq!(w.len(), rows * cols, "matmul_input_major_bf16: weight size");
                assert_eq!(out.len(), n * rows, "matmul_input_major_bf16: output size");
                Part::GemmT(w, rows, SharedMut(out.as_mut_ptr()))
            })
            .collect();
        PACKED.with_borrow_mut(|xp| packed_job(pool, Some(x), xp, n, cols, &parts));
        return true;
    }
    let _ = (pool, ws, cols, x, n, outs);
    false
}

/// What one matrix of a [`packed_job`] computes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Part<'a> {
    /// `out = x · w^T`: [n, rows] f32, row stride `rows`.
    Gemm(&'a [u16], usize, SharedMut),
    /// SwiGLU of `gate` and `up` ([rows, cols] each) into the packed `h` ([n, rows]).
    SwiGlu(&'a [u16], &'a [u16], usize, gemm_avx512::PackedView),
    /// As `Gemm` for an input-major `w` ([cols, rows]): each chunk's rows are transposed
    /// back to row-major first (see `kernels::input_major`).
    GemmT(&'a [u16], usize, SharedMut),
    /// As `SwiGlu` for input-major `gate` and `up` ([cols, rows] each).
    SwiGluT(&'a [u16], &'a [u16], usize, gemm_avx512::PackedView),
}

#[cfg(target_arch = "x86_64")]
impl Part<'_> {
    fn rows(&self) -> usize {
        match *self {
            Part::Gemm(_, rows, _)
            | Part::SwiGlu(_, _, rows, _)
            | Part::GemmT(_, rows, _)
            | Part::SwiGluT(_, _, rows, _) => rows,
        }
    }
}

/// [`matmul`]s of bf16 weights with the packed kernel, in one pool job: the input `x`
/// ([n, cols] f32) is packed (rounded to bf16) by all threads, each its share of the
/// token groups, and they wait for each other's (a spin on a counter) — or `x` is None and
/// `packed` already holds the input; then the threads take chunks of rows of all parts in
/// turn from a shared counter until none are left, so a thread that was descheduled for a
/// while leaves its remaining chunks to the other.
#[cfg(target_arch = "x86_64")]
fn packed_job(
    pool: &ThreadPool,
    x: Option<&[f32]>,
    packed: &mut gemm_avx512::PackedBf16,
    n: usize,
    cols: usize,
    parts: &[Part<'_>],
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    if let Some(x) = x {
        assert_eq!(x.len(), n * cols, "packed matmul: input size");
        packed.reset(n, cols);
    }
    assert!(
        packed.n() == n && packed.k() == cols,
        "packed matmul: input shape"
    );
    let threads = pool.threads();
    // Chunks of rows: about 8 per thread over all parts, a multiple of 8 rows (the
    // kernel's row tiles), 16..=128.
    let total: usize = parts.iter().map(Part::rows).sum();
    let chunk = (total / (8 * threads) / 8 * 8).clamp(16, 128);
    let counts: Vec<usize> = parts.iter().map(|p| p.rows().div_ceil(chunk)).collect();
    let chunks: usize = counts.iter().sum();
    let view = packed.view();
    let groups = view.groups();
    let (ready, next) = (AtomicUsize::new(0), AtomicUsize::new(0));
    pool.run(&|i, nt| {
        if let Some(x) = x {
            let mine = super::pool::split_range(groups, 1, i, nt);
            // SAFETY: has_bf16() (use_packed_bf16); the buffer was reset to (n, cols) and
            // x is [n, cols] (asserted); threads pack disjoint groups.
            unsafe { gemm_avx512::pack_bf16(x, view, mine) };
            ready.fetch_add(1, Ordering::Release);
            let start = std::time::Instant::now();
            while ready.load(Ordering::Acquire) < nt {
                if start.elapsed() < std::time::Duration::from_micros(50) {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        loop {
            let mut c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            let mut part = 0;
            while c >= counts[part] {
                c -= counts[part];
                part += 1;
            }
            let rows = parts[part].rows();
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            // SAFETY: every group of the input is packed and published (the Acquire load
            // above saw all threads' Release increments, or the caller packed it before
            // the job); rows r0..r1 of this part's matrices are in bounds (asserted by
            // the callers); chunk c of part `part` is taken by this thread only, so its
            // outputs (columns r0..r1, even r0) are written by this thread only.
            unsafe {
                match parts[part] {
                    Part::Gemm(w, rows, out) => gemm_avx512::gemm_bf16_packed(
                        view,
                        r1 - r0,
                        &w[r0 * cols..r1 * cols],
                        out.get().add(r0),
                        rows,
                    ),
                    Part::SwiGlu(gate, up, _, h) => gemm_avx512::swiglu_bf16_packed(
                        view,
                        r1 - r0,
                        &gate[r0 * cols..r1 * cols],
                        &up[r0 * cols..r1 * cols],
                        h,
                        r0,
                    ),
                    Part::GemmT(wt, rows, out) => TILES.with_borrow_mut(|(t, _)| {
                        super::input_major::transpose_cols_u16(wt, rows, cols, r0, r1, t);
                        gemm_avx512::gemm_bf16_packed(view, r1 - r0, t, out.get().add(r0), rows)
                    }),
                    Part::SwiGluT(gate, up, rows, h) => TILES.with_borrow_mut(|(tg, tu)| {
                        super::input_major::transpose_cols_u16(gate, rows, cols, r0, r1, tg);
                        super::input_major::transpose_cols_u16(up, rows, cols, r0, r1, tu);
                        gemm_avx512::swiglu_bf16_packed(view, r1 - r0, tg, tu, h, r0)
                    }),
                }
            };
        }
    });
}

/// The first half of a prefill's SwiGLU MLP: `h = silu(x · gate^T) * (x · up^T)` (x:
/// [n, cols], gate and up: [inter, cols]) rounded to bf16 into `h`, packed for
/// [`matmul_packed`], in one pool job. Returns false (doing nothing) unless the weights
/// are bf16 and the packed kernel applies (AVX-512 BF16, n >= 16); the caller then runs
/// gate, up, `silu_mul` and down itself, with the same result.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_packed(
    pool: &ThreadPool,
    gate: WeightView<'_>,
    up: WeightView<'_>,
    inter: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    h: &mut super::gemm_avx512::PackedBf16,
    input_major: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let (WeightView::Bf16(g), WeightView::Bf16(u)) = (gate, up)
        && use_packed_bf16(n)
    {
        assert!(
            g.len() == inter * cols && u.len() == inter * cols,
            "swiglu: weight size"
        );
        h.reset(n, inter);
        let hv = h.view();
        let part = if input_major {
            Part::SwiGluT(g, u, inter, hv)
        } else {
            Part::SwiGlu(g, u, inter, hv)
        };
        PACKED.with_borrow_mut(|xp| packed_job(pool, Some(x), xp, n, cols, &[part]));
        return true;
    }
    let _ = (pool, gate, up, inter, cols, x, n, h, input_major);
    false
}

/// `out = h · w^T` for activations already packed by [`swiglu_packed`] (h: [n, cols],
/// w: [rows, cols] bf16, out: [n, rows]).
pub fn matmul_packed(
    pool: &ThreadPool,
    w: WeightView<'_>,
    rows: usize,
    h: &mut super::gemm_avx512::PackedBf16,
    out: &mut [f32],
    input_major: bool,
) {
    let (n, cols) = (h.n(), h.k());
    assert_eq!(w.len(), rows * cols, "matmul_packed: weight size");
    assert_eq!(out.len(), n * rows, "matmul_packed: output size");
    #[cfg(target_arch = "x86_64")]
    if let WeightView::Bf16(wb) = w
        && use_packed_bf16(n)
    {
        let dst = SharedMut(out.as_mut_ptr());
        let part = if input_major {
            Part::GemmT(wb, rows, dst)
        } else {
            Part::Gemm(wb, rows, dst)
        };
        return packed_job(pool, None, h, n, cols, &[part]);
    }
    let _ = input_major;
    panic!("matmul_packed: the input was packed by swiglu_packed, which needs bf16 weights");
}

/// `parts[i].2 = x · parts[i].0^T` with the packed kernel (see [`packed_job`]).
#[cfg(target_arch = "x86_64")]
fn matmul_bf16_packed(
    pool: &ThreadPool,
    x: &[f32],
    n: usize,
    cols: usize,
    parts: &[(&[u16], usize, SharedMut)],
) {
    let parts: Vec<Part<'_>> = parts.iter().map(|&(w, r, o)| Part::Gemm(w, r, o)).collect();
    PACKED.with_borrow_mut(|xp| packed_job(pool, Some(x), xp, n, cols, &parts));
}

/// Rows of quantized weights per step of [`matmul_quant`]: a few KiB of blocks that stay
/// in L1 while every token passes over them.
const QUANT_TILE_ROWS: usize = 32;

/// [`matmul`] on quantized blocks: each token's activations quantized to 8 bits per block
/// (as decode and llama.cpp do), then VNNI block products over a tile of rows for a few
/// tokens at a time. Each (row, token) product equals decode's matvec bit for bit, so a
/// prefill or batched evaluation computes what token-by-token decoding would.
#[allow(clippy::too_many_arguments)]
fn matmul_quant(
    pool: &ThreadPool,
    f: QFormat,
    wq: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), n * rows, "matmul: output size");
    let part = QuantPart {
        f,
        w: wq,
        rows,
        out: SharedMut(out.as_mut_ptr()),
    };
    matmul_quant_many(pool, &[part], cols, x, n);
}

/// One quantized matrix of [`matmul_quant_many`]: format, blocks (`rows` rows), and the
/// output `[n, rows]` it writes.
struct QuantPart<'a> {
    f: QFormat,
    w: &'a [u8],
    rows: usize,
    out: SharedMut,
}

/// [`matmul_quant`] for several matrices that share the input `x` ([n, cols]), as one pool
/// job over all their rows: q/k/v or gate/up of a prefill or a batched decode step pay one
/// fork and join, and each activation quantization the formats need is done once. Every
/// (row, token) product is still decode's, bit for bit.
fn matmul_quant_many(pool: &ThreadPool, parts: &[QuantPart<'_>], cols: usize, x: &[f32], n: usize) {
    assert_eq!(x.len(), n * cols, "matmul: input size");
    // The activations per quantization: one scale per 32 elements, or ggml's q8_K for the
    // 256-element formats (quantize_activations_for depends only on the block size).
    let mut kinds: Vec<(usize, Vec<Vec<QPair>>)> = Vec::new();
    for p in parts {
        assert_eq!(
            p.w.len(),
            p.rows * p.f.row_bytes(cols),
            "matmul: weight size"
        );
        let be = p.f.block_elems();
        if !kinds.iter().any(|k| k.0 == be) {
            let xq = x
                .chunks_exact(cols)
                .map(|r| {
                    let mut q = Vec::new();
                    quantize_activations_for(p.f, r, &mut q);
                    q
                })
                .collect();
            kinds.push((be, xq));
        }
    }
    let total: usize = parts.iter().map(|p| p.rows).sum();
    pool.for_ranges(total, ROW_ALIGN, &|range| {
        let mut first = 0;
        for p in parts {
            let (lo, hi) = (range.start.max(first), range.end.min(first + p.rows));
            if lo < hi {
                let xq = &kinds
                    .iter()
                    .find(|k| k.0 == p.f.block_elems())
                    .expect("quantized above")
                    .1;
                quant_rows(p, lo - first..hi - first, cols, xq, n);
            }
            first += p.rows;
        }
    });
}

/// Rows `range` of one [`QuantPart`] for all `n` tokens, tile by tile.
fn quant_rows(
    p: &QuantPart<'_>,
    range: std::ops::Range<usize>,
    cols: usize,
    xq: &[Vec<QPair>],
    n: usize,
) {
    let (f, rows, dst) = (p.f, p.rows, p.out);
    let rb = f.row_bytes(cols);
    // The tile's products by weight row (`buf[r * k + t]` for k tokens), on the stack.
    let mut buf = [0f32; QUANT_TILE_ROWS * TOKENS_PER_STEP];
    let mut r0 = range.start;
    while r0 < range.end {
        let r1 = (r0 + QUANT_TILE_ROWS).min(range.end);
        let tile = &p.w[r0 * rb..r1 * rb];
        for t0 in (0..n).step_by(TOKENS_PER_STEP) {
            let t1 = (t0 + TOKENS_PER_STEP).min(n);
            let k = t1 - t0;
            let xs: [&[QPair]; TOKENS_PER_STEP] =
                std::array::from_fn(|t| xq.get(t0 + t).map_or(&[][..], |v| &v[..]));
            let tb = &mut buf[..(r1 - r0) * k];
            rows_q_tokens_by_row(f, tile, rb, &xs[..k], tb);
            for t in 0..k {
                // SAFETY: this thread writes columns r0..r1 (inside its range, disjoint
                // from other threads') of row t0 + t of the part's output ([n, rows]); in
                // bounds by the asserted sizes; the output outlives the pool job.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(dst.get().add((t0 + t) * rows + r0), r1 - r0)
                };
                for (r, v) in o.iter_mut().enumerate() {
                    *v = tb[r * k + t];
                }
            }
        }
        r0 = r1;
    }
}

/// `dst[t, j] = sum_k x[t, k] * w[j, k]` for t < n, j < m; dst has row stride `ld`.
///
/// # Safety
/// `dst` must be valid for writes at `t * ld + j` for all t < n, j < m, and not be
/// accessed by anyone else during the call.
pub(crate) unsafe fn gemm_f32(
    n: usize,
    m: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    x: &[f32],
    w: &[f32],
) {
    debug_assert!(x.len() >= n * k && w.len() >= m * k);
    #[cfg(target_arch = "x86_64")]
    if gemm_avx512::has_f32() && !use_gemm_crate() {
        // SAFETY: has_f32() checked the CPU; the caller guarantees dst.
        unsafe { gemm_avx512::gemm_f32(n, m, k, x, w, dst, ld) };
        return;
    }
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

    use crate::kernels::test_data::data;

    /// The activations as the kernels see them: rounded to bf16 for bf16 weights where
    /// AVX-512 BF16 is used (matvec and, unless `SPARSELLM_GEMM=crate`, matmul).
    fn kernel_activations(w: WeightView<'_>, x: &[f32], n: usize) -> Vec<f32> {
        let rounds = super::super::dot::has_avx512_bf16() && (n == 1 || !gemm_crate());
        match w {
            WeightView::Bf16(_) if rounds => x
                .iter()
                .map(|&v| super::super::dot::bf16_to_f32(f32_to_bf16(v)))
                .collect(),
            _ => x.to_vec(),
        }
    }

    fn gemm_crate() -> bool {
        #[cfg(target_arch = "x86_64")]
        return use_gemm_crate();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    #[test]
    fn matvec_and_matmul_match_scalar_on_odd_sizes() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, cols) in [(1, 1), (17, 33), (65, 130), (200, 577), (33, 64)] {
                let wf = data(rows * cols, 1);
                let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
                for n in 1..=9 {
                    let x = data(n * cols, 2);
                    for w in [WeightView::F32(&wf), WeightView::Bf16(&wb)] {
                        let mut want = vec![0f32; n * rows];
                        let xr = kernel_activations(w, &x, n);
                        matmul_scalar(w, rows, cols, &xr, n, &mut want);
                        let mut got = vec![0f32; n * rows];
                        matmul(&pool, w, rows, cols, &x, n, &mut got);
                        for (a, b) in got.iter().zip(&want) {
                            assert!(
                                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                                "{threads} threads {rows}x{cols} n={n}: {a} vs {b}"
                            );
                        }
                        let mut mv = vec![0f32; rows];
                        matvec(&pool, w, rows, cols, &x[..cols], &mut mv);
                        let x1 = kernel_activations(w, &x[..cols], 1);
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

    /// Decode's matvec gives the same bits whatever the threads and their timing: every
    /// weight format, on 1-3 threads and with late or slow workers (dynamic chunks).
    #[test]
    fn matvec_is_bit_identical_across_threads_and_slow_workers() {
        let pools = crate::kernels::pool::test_pools();
        for (rows, cols) in [(1, 64), (17, 64), (192, 576), (1536, 576)] {
            let wf = data(rows * cols, 11);
            let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
            let wh: Vec<u16> = wf
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let quant = |f: QFormat| {
                let mut q = vec![0u8; rows * f.row_bytes(cols)];
                crate::quant::quantize(f, &wf, &mut q);
                q
            };
            let (q8, q4) = (quant(QFormat::Q8_0), quant(QFormat::Q4_1));
            let x = data(cols, 12);
            for w in [
                WeightView::F32(&wf),
                WeightView::Bf16(&wb),
                WeightView::F16(&wh),
                WeightView::Quant(QFormat::Q8_0, &q8),
                WeightView::Quant(QFormat::Q4_1, &q4),
            ] {
                let mut want = vec![0f32; rows];
                matvec(&pools[0].1, w, rows, cols, &x, &mut want);
                for (name, pool) in &pools[1..] {
                    for _ in 0..3 {
                        let mut got = vec![f32::NAN; rows];
                        matvec(pool, w, rows, cols, &x, &mut got);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{name}, {rows}x{cols}: differs from 1 thread");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_many_and_packed_sizes_match_scalar() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, cols) in [(17, 33), (200, 577), (40, 64)] {
                let wf: Vec<Vec<f32>> = (0..3)
                    .map(|i| data((rows + i) * cols, 7 + i as u64))
                    .collect();
                let wb: Vec<Vec<u16>> = wf
                    .iter()
                    .map(|w| w.iter().map(|&v| f32_to_bf16(v)).collect())
                    .collect();
                for n in [15, 16, 17, 40, 64, 130] {
                    let x = data(n * cols, 2);
                    for bf16 in [false, true] {
                        let ws: Vec<(WeightView<'_>, usize)> = (0..3)
                            .map(|i| {
                                let w = if bf16 {
                                    WeightView::Bf16(&wb[i])
                                } else {
                                    WeightView::F32(&wf[i])
                                };
                                (w, rows + i)
                            })
                            .collect();
                        let mut outs: Vec<Vec<f32>> =
                            (0..3).map(|i| vec![0f32; n * (rows + i)]).collect();
                        let mut views: Vec<&mut [f32]> =
                            outs.iter_mut().map(|o| &mut o[..]).collect();
                        matmul_many(&pool, &ws, cols, &x, n, &mut views);
                        for (i, &(w, r)) in ws.iter().enumerate() {
                            let xr = kernel_activations(w, &x, n);
                            let mut want = vec![0f32; n * r];
                            matmul_scalar(w, r, cols, &xr, n, &mut want);
                            let mut one = vec![0f32; n * r];
                            matmul(&pool, w, r, cols, &x, n, &mut one);
                            for ((a, b), c) in outs[i].iter().zip(&want).zip(&one) {
                                assert!(
                                    (a - b).abs() < 1e-4 * (1.0 + b.abs()) && a == c,
                                    "{threads} threads {r}x{cols} n={n} bf16 {bf16}: {a} vs {b}, {c}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_swiglu_and_packed_down_equal_the_unfused_mlp() {
        use crate::kernels::gemm_avx512::PackedBf16;
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (hidden, inter) in [(33, 50), (64, 200)] {
                let bf = |n: usize, seed: u64| -> Vec<u16> {
                    data(n, seed).iter().map(|&v| f32_to_bf16(v)).collect()
                };
                let (g, u, d) = (
                    bf(inter * hidden, 1),
                    bf(inter * hidden, 2),
                    bf(hidden * inter, 3),
                );
                let (gw, uw, dw) = (
                    WeightView::Bf16(&g),
                    WeightView::Bf16(&u),
                    WeightView::Bf16(&d),
                );
                for n in [16, 17, 50, 130] {
                    let x = data(n * hidden, 4);
                    let mut hp = PackedBf16::default();
                    if !swiglu_packed(&pool, gw, uw, inter, hidden, &x, n, &mut hp, false) {
                        return;
                    }
                    let mut got = vec![0f32; n * hidden];
                    matmul_packed(&pool, dw, hidden, &mut hp, &mut got, false);
                    let (mut a, mut b) = (vec![0f32; n * inter], vec![0f32; n * inter]);
                    matmul(&pool, gw, inter, hidden, &x, n, &mut a);
                    matmul(&pool, uw, inter, hidden, &x, n, &mut b);
                    crate::kernels::ops::silu_mul(&mut a, &b);
                    let mut want = vec![0f32; n * hidden];
                    matmul(&pool, dw, hidden, inter, &a, n, &mut want);
                    assert_eq!(got, want, "{threads} threads {hidden}x{inter} n={n}");
                }
            }
        }
    }

    /// Where a packed bf16 matmul's time goes (run with `--ignored --nocapture`): packing
    /// alone, the kernel alone on packed input, and the whole `matmul` on a 1-thread pool.
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn packed_matmul_timing() {
        use crate::kernels::gemm_avx512::{PackedBf16, gemm_bf16_packed, has_bf16, pack_bf16};
        if !has_bf16() {
            return;
        }
        let pool = ThreadPool::new(1);
        let n = 128;
        for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
            let wb: Vec<u16> = data(rows * cols, 1)
                .iter()
                .map(|&v| f32_to_bf16(v))
                .collect();
            // Copies to cycle through, so that the weights come from memory as in a
            // forward pass (about 100 MB).
            let copies: Vec<Vec<u16>> = (0..(100 << 20) / (2 * rows * cols))
                .map(|_| wb.clone())
                .collect();
            let x = data(n * cols, 2);
            let mut out = vec![0f32; n * rows];
            let mut p = PackedBf16::default();
            p.reset(n, cols);
            let v = p.view();
            let (mut tp, mut tk, mut tm, mut tc) = (vec![], vec![], vec![], vec![]);
            for i in 0..30 {
                let t0 = std::time::Instant::now();
                // SAFETY: has_bf16(); p reset to (n, cols); out is [n, rows].
                unsafe { pack_bf16(&x, v, 0..v.groups()) };
                let t1 = std::time::Instant::now();
                // SAFETY: as above.
                unsafe { gemm_bf16_packed(v, rows, &wb, out.as_mut_ptr(), rows) };
                let t2 = std::time::Instant::now();
                matmul(&pool, WeightView::Bf16(&wb), rows, cols, &x, n, &mut out);
                let t3 = std::time::Instant::now();
                let w = WeightView::Bf16(&copies[i % copies.len()]);
                matmul(&pool, w, rows, cols, &x, n, &mut out);
                tc.push(t3.elapsed().as_secs_f64());
                tp.push((t1 - t0).as_secs_f64());
                tk.push((t2 - t1).as_secs_f64());
                tm.push((t3 - t2).as_secs_f64());
            }
            for t in [&mut tp, &mut tk, &mut tm, &mut tc] {
                t.sort_by(f64::total_cmp);
            }
            let flop = 2.0 * (n * rows * cols) as f64;
            println!(
                "{rows}x{cols}: pack {:.1} us, kernel {:.1} us ({:.0} GFLOP/s), matmul {:.1} us ({:.0} GFLOP/s), cold weights {:.1} us ({:.0} GFLOP/s)",
                tp[15] * 1e6,
                tk[15] * 1e6,
                flop / tk[15] / 1e9,
                tm[15] * 1e6,
                flop / tm[15] / 1e9,
                tc[15] * 1e6,
                flop / tc[15] / 1e9
            );
        }
    }

    #[test]
    fn matmul_per_token_equals_matvec_per_token_bit_for_bit() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, cols) in [(1, 32), (37, 96), (200, 576), (131, 33)] {
                let wf = data(rows * cols, 4);
                let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
                let wh: Vec<u16> = wf
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect();
                let mut wq = vec![0u8; rows * QFormat::Q8_0.row_bytes(cols.div_ceil(32) * 32)];
                let quant = cols.is_multiple_of(32);
                if quant {
                    crate::quant::quantize(QFormat::Q8_0, &wf, &mut wq);
                }
                let mut views = vec![
                    WeightView::F32(&wf),
                    WeightView::Bf16(&wb),
                    WeightView::F16(&wh),
                ];
                if quant {
                    views.push(WeightView::Quant(QFormat::Q8_0, &wq));
                }
                for w in views {
                    for n in [2, 5, 9] {
                        let x = data(n * cols, 6);
                        let mut got = vec![0f32; n * rows];
                        matmul_per_token(&pool, w, rows, cols, &x, n, &mut got);
                        for t in 0..n {
                            let mut one = vec![0f32; rows];
                            matvec(&pool, w, rows, cols, &x[t * cols..(t + 1) * cols], &mut one);
                            assert_eq!(
                                &got[t * rows..(t + 1) * rows],
                                &one[..],
                                "{rows}x{cols} n={n} t={t}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_matmul_equals_matvec_per_token_bit_for_bit() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, cols) in [(1, 32), (37, 96), (200, 576), (19, 768)] {
                let wf = data(rows * cols, 4);
                let fits = |f: &QFormat| cols.is_multiple_of(f.block_elems());
                for f in QFormat::ALL.into_iter().filter(fits) {
                    let mut wq = vec![0u8; rows * f.row_bytes(cols)];
                    crate::quant::quantize(f, &wf, &mut wq);
                    let w = WeightView::Quant(f, &wq);
                    for n in [2, 5, 9] {
                        let x = data(n * cols, 6);
                        let mut got = vec![0f32; n * rows];
                        matmul(&pool, w, rows, cols, &x, n, &mut got);
                        for t in 0..n {
                            let mut one = vec![0f32; rows];
                            matvec(&pool, w, rows, cols, &x[t * cols..(t + 1) * cols], &mut one);
                            assert_eq!(
                                &got[t * rows..(t + 1) * rows],
                                &one[..],
                                "{f:?} {rows}x{cols} n={n} t={t}"
                            );
                        }
                    }
                }
            }
        }
    }
}
