//! Sparse MLP kernels: `out = sum over chosen neurons i of silu(g_i)·u_i · down_row_i`,
//! with `g_i = gate_row_i·h`, `u_i = up_row_i·h`, over f32, bf16, f16 or quantized weight
//! rows, split by neurons over the pool (each share of the split accumulates into a
//! private `[hidden]` buffer; the caller sums them). Two ways to address rows: compact
//! cached slots (contiguous, the hardware prefetcher suffices) or a gather by row index
//! (the full matrices, or cache slots visited in mask order), with software prefetch of
//! the rows a few neurons ahead.
//! Scalar references for the tests.
//!
//! Arithmetic: with bf16 weights on AVX-512 BF16, `h` is rounded to bf16 once and the
//! gate/up dots use `vdpbf16ps` (as the dense matvec does); the down rows are accumulated
//! in f32 with one FMA per element and neuron, in item order. The result therefore
//! depends on the item order and on the split (the pool's size; not on which thread runs
//! a share, nor on how items are grouped inside a share): callers that must agree bit for
//! bit (batched evaluation and token-by-token decoding) pass the same items in the same
//! order (mask order).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::WeightView;
use super::dot::{
    Isa, bf16_to_f32, dot_bf16, dot_bf16_bf16, dot_bf16_bf16_ahead, dot_f32, dot_f32_scalar,
    f32_to_bf16, has_avx512_bf16, isa, rows_bf16, rows_f32, to_bf16_into,
};
use super::f16::{axpy_f16, dot_f16, f16_to_f32_slice, rows_f16};
use super::ops::silu;
use super::pool::{ThreadPool, split_range};
use super::qdot::{QPair, axpy_q, dot_q, quantize_activations_for, rows_q};
use crate::quant::QFormat;

/// A set of rows inside a flat weight buffer: row `r` starts at `r * stride + offset`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub view: WeightView<'a>,
    pub stride: usize,
    pub offset: usize,
}

/// The activation vector `h` as the dots consume it: f32, plus its bf16 rounding when
/// bf16 rows use the bf16 x bf16 product.
#[derive(Clone, Copy)]
struct Input<'a> {
    f: &'a [f32],
    b: Option<&'a [u16]>,
    /// `h` quantized per 32-block, for quantized rows.
    q: Option<&'a [QPair]>,
}

impl<'a> Strided<'a> {
    /// A plain row-major matrix of row width `cols`.
    pub fn matrix(view: WeightView<'a>, cols: usize) -> Strided<'a> {
        Strided {
            view,
            stride: cols,
            offset: 0,
        }
    }
    #[inline]
    fn start(&self, r: usize) -> usize {
        r * self.stride + self.offset
    }
    /// The bytes of `len` elements of row `r` of quantized blocks (`stride`, `offset` and
    /// `len` are whole blocks).
    #[inline]
    fn qrow<'b>(&self, fmt: QFormat, w: &'b [u8], r: usize, len: usize) -> &'b [u8] {
        let (s, be, bb) = (self.start(r), fmt.block_elems(), fmt.block_bytes());
        debug_assert!(s.is_multiple_of(be) && len.is_multiple_of(be));
        &w[s / be * bb..(s + len) / be * bb]
    }
    #[inline]
    fn dot(&self, r: usize, x: Input<'_>) -> f32 {
        let s = self.start(r);
        let n = x.f.len();
        match (self.view, x.b) {
            (WeightView::F32(w), _) => dot_f32(&w[s..s + n], x.f),
            (WeightView::Bf16(w), Some(xb)) => dot_bf16_bf16(&w[s..s + n], xb),
            (WeightView::Bf16(w), None) => dot_bf16(&w[s..s + n], x.f),
            (WeightView::F16(w), _) => dot_f16(&w[s..s + n], x.f),
            (WeightView::Quant(f, w), _) => match x.q {
                Some(q) => dot_q(f, self.qrow(f, w, r, n), q),
                None => {
                    let mut row = vec![0f32; n];
                    self.row_f32(r, &mut row);
                    dot_f32(&row, x.f)
                }
            },
        }
    }
    /// As [`dot`](Self::dot), prefetching row `ahead` along the way where the kernel can
    /// (bf16 x bf16); elsewhere row `ahead` is prefetched in one burst first.
    #[inline]
    fn dot_ahead(&self, r: usize, x: Input<'_>, ahead: usize) -> f32 {
        let n = x.f.len();
        match (self.view, x.b) {
            (WeightView::Bf16(w), Some(xb)) => {
                let (s, a) = (self.start(r), self.start(ahead));
                dot_bf16_bf16_ahead(&w[s..s + n], xb, &w[a..a + n])
            }
            _ => {
                if ahead != r {
                    self.prefetch(ahead, n);
                }
                self.dot(r, x)
            }
        }
    }
    #[inline]
    fn axpy(&self, r: usize, a: f32, out: &mut [f32]) {
        let s = self.start(r);
        match self.view {
            WeightView::F32(w) => axpy_f32(a, &w[s..s + out.len()], out),
            WeightView::Bf16(w) => axpy_bf16(a, &w[s..s + out.len()], out),
            WeightView::F16(w) => axpy_f16(a, &w[s..s + out.len()], out),
            WeightView::Quant(f, w) => axpy_q(f, a, self.qrow(f, w, r, out.len()), out),
        }
    }
    /// `out += a[0]·row[r[0]] + ... + a[3]·row[r[3]]`, the same arithmetic as four
    /// [`axpy`](Self::axpy) calls in order (one FMA per element and row), reading and
    /// writing `out` once.
    /// Rows `ahead` are prefetched along the way (bf16 on AVX-512) or in a burst first.
    #[inline]
    fn axpy4(&self, r: [usize; 4], a: [f32; 4], out: &mut [f32], ahead: [usize; 4]) {
        let n = out.len();
        let s = r.map(|r| self.start(r));
        match self.view {
            WeightView::Quant(..) | WeightView::F16(_) => {
                for k in 0..4 {
                    if ahead[k] != r[k] {
                        self.prefetch(ahead[k], n);
                    }
                }
                for k in 0..4 {
                    self.axpy(r[k], a[k], out);
                }
            }
            WeightView::F32(w) => {
                for k in 0..4 {
                    if ahead[k] != r[k] {
                        self.prefetch(ahead[k], n);
                    }
                }
                let rows = s.map(|s| &w[s..s + n]);
                for k in 0..4 {
                    axpy_f32(a[k], rows[k], out);
                }
            }
            WeightView::Bf16(w) => {
                let rows = s.map(|s| &w[s..s + n]);
                #[cfg(target_arch = "x86_64")]
                if isa() == Isa::Avx512 {
                    let pf = ahead.map(|r| &w[self.start(r)..self.start(r) + n]);
                    // SAFETY: isa() checked AVX-512F/BW/VL; each row (and each prefetched
                    // row) has out.len() elements.
                    unsafe { axpy4_bf16_avx512(a, rows, out, pf) };
                    return;
                }
                for k in 0..4 {
                    axpy_bf16(a[k], rows[k], out);
                }
            }
        }
    }
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        let s = self.start(r);
        match self.view {
            WeightView::F32(w) => out.copy_from_slice(&w[s..s + out.len()]),
            WeightView::Bf16(w) => {
                let n = out.len();
                for (o, &b) in out.iter_mut().zip(&w[s..s + n]) {
                    *o = bf16_to_f32(b);
                }
            }
            WeightView::F16(w) => f16_to_f32_slice(&w[s..s + out.len()], out),
            WeightView::Quant(f, w) => {
                crate::quant::dequantize(f.source(), self.qrow(f, w, r, out.len()), out)
            }
        }
    }
    /// Prefetches the `len` elements of row `r` into L2 (a hint: no effect on results).
    #[inline]
    fn prefetch(&self, r: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let s = self.start(r);
            let (ptr, bytes) = match self.view {
                WeightView::F32(w) => (w[s..s + len].as_ptr() as *const i8, len * 4),
                WeightView::Bf16(w) => (w[s..s + len].as_ptr() as *const i8, len * 2),
                WeightView::F16(w) => (w[s..s + len].as_ptr() as *const i8, len * 2),
                WeightView::Quant(f, w) => {
                    let row = self.qrow(f, w, r, len);
                    (row.as_ptr() as *const i8, row.len())
                }
            };
            let mut off = 0;
            while off < bytes {
                // SAFETY: `ptr + off` lies inside the row just bounds-checked by slicing;
                // a prefetch never faults and does not change memory.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr.add(off)) };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r, len);
    }
    /// Whether dots over these rows take `h` in bf16.
    fn wants_bf16_input(&self) -> bool {
        matches!(self.view, WeightView::Bf16(_)) && has_avx512_bf16()
    }
    /// The block format, when dots over these rows take `h` quantized (h is quantized
    /// once for gate and up, as gate's format wants it: see `quantize_activations_for`).
    fn q_format(&self) -> Option<QFormat> {
        match self.view {
            WeightView::Quant(f, _) => Some(f),
            _ => None,
        }
    }
}

/// Where each neuron's activation `a_i = silu(g_i)·u_i` comes from.
#[derive(Clone, Copy)]
pub enum Activation<'a> {
    /// Computed from gate and up rows and `h`.
    Compute { gate: Strided<'a>, up: Strided<'a> },
    /// Given per item (the exact and cascade scorers computed g and u already).
    Given(&'a [f32]),
}

/// Which rows the items are.
#[derive(Clone, Copy)]
pub enum Items<'a> {
    /// Items 0..n are rows 0..n (cached slots).
    Slots(usize),
    /// Item j is row `idx[j]` (gather from the full matrices, or cache slots in mask order).
    Gather(&'a [u32]),
}

impl Items<'_> {
    fn len(&self) -> usize {
        match self {
            Items::Slots(n) => *n,
            Items::Gather(idx) => idx.len(),
        }
    }
    #[inline]
    fn row(&self, j: usize) -> usize {
        match self {
            Items::Slots(_) => j,
            Items::Gather(idx) => idx[j] as usize,
        }
    }
}

/// How many items ahead the gather prefetches (into L2: a few neurons' rows fit easily,
/// and the L1 prefetcher follows each row from there).
const PREFETCH_AHEAD: usize = 4;

/// A pointer shared across the pool's threads; each thread writes its own part.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: only used to write disjoint parts from different threads (see each use).
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer; a method (rather than `.0`) so closures capture the whole Sync wrapper.
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// The number of shares [`sparse_mlp`] splits `n` items into on `pool`: one per thread.
fn kernel_threads(pool: &ThreadPool, n: usize) -> usize {
    pool.threads().min(n.div_ceil(8)).max(1)
}

/// `out = sum_j a_j · down[row_j]`. h: [hidden], out: [hidden]. `scratch` holds the
/// per-share accumulators and `h` in bf16 (resized here; reuse it across calls).
///
/// Items are split into contiguous ranges, one per thread of the pool; the ranges are
/// chunks of a [`ThreadPool::for_chunks`] job (a thread that comes late leaves its range
/// to another); each range is accumulated in item order in f32 and the per-range sums are
/// added in range order. Same items in the same order on the same pool give bit-identical
/// results whatever buffer the rows are read from (see the module documentation).
pub fn sparse_mlp(
    pool: &ThreadPool,
    items: Items<'_>,
    act: Activation<'_>,
    down: Strided<'_>,
    h: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let hidden = out.len();
    let n = items.len();
    if let Activation::Given(a) = act {
        assert_eq!(a.len(), n, "sparse_mlp: one activation per item");
    }
    let threads = kernel_threads(pool, n);
    // Each thread's accumulator on its own cache lines, then h in bf16 (two per f32).
    let stride = hidden.next_multiple_of(16);
    let bf16_input = matches!(act, Activation::Compute { gate, .. } if gate.wants_bf16_input());
    scratch.clear();
    scratch.resize(threads * stride + h.len().div_ceil(2), 0.0);
    let (acc_buf, hb_buf) = scratch.split_at_mut(threads * stride);
    let hb: &mut [u16] = &mut bytemuck::cast_slice_mut(hb_buf)[..h.len()];
    let mut hq = Vec::new();
    if let Activation::Compute { gate, .. } = act
        && let Some(f) = gate.q_format()
    {
        quantize_activations_for(f, h, &mut hq);
    }
    let q = (!hq.is_empty()).then_some(&hq[..]);
    let input = if bf16_input {
        for (o, &v) in hb.iter_mut().zip(h) {
            *o = f32_to_bf16(v);
        }
        Input {
            f: h,
            b: Some(hb),
            q,
        }
    } else {
        Input { f: h, b: None, q }
    };
    let acc = SharedMut(acc_buf.as_mut_ptr());
    let gather = matches!(items, Items::Gather(_));
    // One chunk per share of the split (the split, not the thread that happens to run a
    // share, fixes the result): a late or descheduled thread leaves its share to another.
    pool.for_chunks(threads, &|t, _| {
        let range = split_range(n, 4, t, threads);
        // SAFETY: chunk t writes only acc[t*stride..t*stride+hidden], which exists
        // (resized to threads*stride) and outlives the run; each chunk runs once.
        let acc = unsafe { std::slice::from_raw_parts_mut(acc.ptr().add(t * stride), hidden) };
        // Rows are prefetched one group of four items ahead, spread over the current
        // group's work (see `dot_bf16_bf16_ahead`); the first group in a burst.
        let ahead_of = |jj: usize| {
            if gather && jj + 4 < range.end {
                items.row(jj + 4)
            } else {
                items.row(jj)
            }
        };
        if gather {
            for jj in range.start..(range.start + 4).min(range.end) {
                let r = items.row(jj);
                if let Activation::Compute { gate, up } = act {
                    gate.prefetch(r, h.len());
                    up.prefetch(r, h.len());
                }
                down.prefetch(r, hidden);
            }
        }
        let mut j = range.start;
        while j < range.end {
            let m = (range.end - j).min(4);
            let (mut rows, mut a, mut ahead) = ([0usize; 4], [0f32; 4], [0usize; 4]);
            for q in 0..m {
                let jj = j + q;
                rows[q] = items.row(jj);
                ahead[q] = ahead_of(jj);
                a[q] = match act {
                    Activation::Compute { gate, up } => {
                        silu(gate.dot_ahead(rows[q], input, ahead[q]))
                            * up.dot_ahead(rows[q], input, ahead[q])
                    }
                    Activation::Given(a) => a[jj],
                };
            }
            if m == 4 {
                down.axpy4(rows, a, acc, ahead);
            } else {
                for q in 0..m {
                    down.axpy(rows[q], a[q], acc);
                }
            }
            j += m;
        }
    });
    out.copy_from_slice(&acc_buf[..hidden]);
    for t in 1..threads {
        for (o, &v) in out
            .iter_mut()
            .zip(&acc_buf[t * stride..t * stride + hidden])
        {
            *o += v;
        }
    }
}

/// Scalar reference for [`sparse_mlp`] (f64 accumulation; `h` rounded to bf16 for bf16
/// gate/up rows where the kernel does so).
pub fn sparse_mlp_scalar(
    items: Items<'_>,
    act: Activation<'_>,
    down: Strided<'_>,
    h: &[f32],
    out: &mut [f32],
) {
    let hidden = out.len();
    let hr: Vec<f32> = match act {
        Activation::Compute { gate, .. } if gate.wants_bf16_input() => {
            h.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect()
        }
        _ => h.to_vec(),
    };
    let h = &hr[..];
    let mut acc = vec![0f64; hidden];
    let mut row = vec![0f32; h.len().max(hidden)];
    for j in 0..items.len() {
        let r = items.row(j);
        let a = match act {
            Activation::Compute { gate, up } => {
                gate.row_f32(r, &mut row[..h.len()]);
                let g = dot_f32_scalar(&row[..h.len()], h);
                up.row_f32(r, &mut row[..h.len()]);
                silu(g) * dot_f32_scalar(&row[..h.len()], h)
            }
            Activation::Given(a) => a[j],
        };
        down.row_f32(r, &mut row[..hidden]);
        for (o, &w) in acc.iter_mut().zip(&row[..hidden]) {
            *o += a as f64 * w as f64;
        }
    }
    for (o, &v) in out.iter_mut().zip(&acc) {
        *o = v as f32;
    }
}

/// `g[j] = gate[idx[j]]·h`, `u[j] = up[idx[j]]·h`: exact g and u of chosen neurons (the
/// cascade scorer), split over the pool, with prefetch ahead. `hb`: scratch for `h` in bf16.
#[allow(clippy::too_many_arguments)]
pub fn gather_gate_up(
    pool: &ThreadPool,
    gate: Strided<'_>,
    up: Strided<'_>,
    idx: &[u32],
    h: &[f32],
    g: &mut [f32],
    u: &mut [f32],
    hb: &mut Vec<u16>,
) {
    assert!(g.len() == idx.len() && u.len() == idx.len());
    let mut hq = Vec::new();
    if let Some(f) = gate.q_format() {
        quantize_activations_for(f, h, &mut hq);
    }
    let q = (!hq.is_empty()).then_some(&hq[..]);
    let input = if gate.wants_bf16_input() {
        to_bf16_into(h, hb);
        Input {
            f: h,
            b: Some(hb),
            q,
        }
    } else {
        Input { f: h, b: None, q }
    };
    let (pg, pu) = (SharedMut(g.as_mut_ptr()), SharedMut(u.as_mut_ptr()));
    pool.for_ranges(idx.len(), 16, &|range| {
        // SAFETY: for_ranges hands out disjoint sub-ranges of 0..idx.len(); g and u have
        // idx.len() elements and outlive the call.
        let (g, u) = unsafe {
            (
                std::slice::from_raw_parts_mut(pg.ptr().add(range.start), range.len()),
                std::slice::from_raw_parts_mut(pu.ptr().add(range.start), range.len()),
            )
        };
        for (k, j) in range.clone().enumerate() {
            if j + PREFETCH_AHEAD < range.end {
                let r = idx[j + PREFETCH_AHEAD] as usize;
                gate.prefetch(r, h.len());
                up.prefetch(r, h.len());
            }
            let r = idx[j] as usize;
            g[k] = gate.dot(r, input);
            u[k] = up.dot(r, input);
        }
    });
}

/// `y = sum_r coefs[r] · row_r` over the rows `0..coefs.len()` of `w` (row r starts at
/// `r * stride + offset`, `y.len()` elements): a vector-matrix product by columns, for a
/// low-rank predictor's second factor (each thread takes a range of columns). f32
/// accumulation, rows in order.
pub fn combine_rows(w: WeightView<'_>, stride: usize, offset: usize, coefs: &[f32], y: &mut [f32]) {
    y.fill(0.0);
    let m = Strided {
        view: w,
        stride,
        offset,
    };
    let mut r = 0;
    while r + 4 <= coefs.len() {
        let rows = [r, r + 1, r + 2, r + 3];
        let a = [coefs[r], coefs[r + 1], coefs[r + 2], coefs[r + 3]];
        m.axpy4(rows, a, y, rows);
        r += 4;
    }
    for (k, &a) in coefs.iter().enumerate().skip(r) {
        m.axpy(k, a, y);
    }
}

/// Every neuron's activation `a[i] = silu(gate[i]·h)·(up[i]·h)` and score `|a[i]|`, in
/// one parallel step (rows split over the threads; the products are the dense matvec's,
/// bit for bit). gate, up: [inter, hidden]; `u` is scratch of `inter` elements.
pub fn gate_up_activations(
    pool: &ThreadPool,
    gate: WeightView<'_>,
    up: WeightView<'_>,
    h: &[f32],
    a: &mut [f32],
    u: &mut [f32],
    scores: &mut [f32],
) {
    let (hidden, inter) = (h.len(), a.len());
    assert!(u.len() == inter && scores.len() == inter);
    assert!(gate.len() == inter * hidden && up.len() == inter * hidden);
    let (pa, pu, ps) = (
        SharedMut(a.as_mut_ptr()),
        SharedMut(u.as_mut_ptr()),
        SharedMut(scores.as_mut_ptr()),
    );
    // h quantized as each of gate's and up's formats wants it (as the dense matvec does).
    let (mut hq, mut hq_up) = (Vec::new(), Vec::new());
    if let WeightView::Quant(f, _) = gate {
        quantize_activations_for(f, h, &mut hq);
    }
    if let WeightView::Quant(f, _) = up {
        quantize_activations_for(f, h, &mut hq_up);
    }
    let (hq, hq_up) = (&hq[..], &hq_up[..]);
    pool.for_ranges(inter, 16, &|range| {
        // SAFETY: for_ranges hands out disjoint sub-ranges of 0..inter; a, u and scores
        // have inter elements and outlive the call.
        let (a, u, sc) = unsafe {
            (
                std::slice::from_raw_parts_mut(pa.ptr().add(range.start), range.len()),
                std::slice::from_raw_parts_mut(pu.ptr().add(range.start), range.len()),
                std::slice::from_raw_parts_mut(ps.ptr().add(range.start), range.len()),
            )
        };
        let rows = range.start * hidden..range.end * hidden;
        for (w, wq, out) in [(gate, hq, &mut *a), (up, hq_up, &mut *u)] {
            match w {
                WeightView::F32(w) => rows_f32(&w[rows.clone()], h, out),
                WeightView::Bf16(w) => rows_bf16(&w[rows.clone()], h, out),
                WeightView::F16(w) => rows_f16(&w[rows.clone()], h, out),
                WeightView::Quant(f, w) => {
                    let rb = f.row_bytes(hidden);
                    rows_q(f, &w[range.start * rb..range.end * rb], rb, wq, out)
                }
            }
        }
        // The dense MLP's SiLU (`ops::silu_mul`: on AVX-512 each element's bits do not
        // depend on its position), so that a neuron's activation is the dense one's.
        super::ops::silu_mul(a, u);
        for (a, s) in a.iter().zip(sc.iter_mut()) {
            *s = a.abs();
        }
    });
}

/// One low-rank factorisation `W^T ≈ A·B` in the layout [`lowrank_scores`] reads: `at` is
/// A^T `[rank, hidden]`, `b` is B `[rank, inter]`.
#[derive(Clone, Copy)]
pub struct LowRankView<'a> {
    pub at: WeightView<'a>,
    pub b: WeightView<'a>,
    pub rank: usize,
}

/// Predicted neuron scores `out[i] = |silu(ĝ_i)·û_i|` (or `|silu(ĝ_i)|` without `up`),
/// with `ĝ = (h·A_g)·B_g`, `û = (h·A_u)·B_u`, in two parallel steps: the z's (rows of
/// A^T split over the threads), then ĝ, û and the scores (columns split over the
/// threads). bf16 factors use the bf16 x bf16 dot where available. `hb`, `z`, `g`, `u`
/// are scratch (resized here).
#[allow(clippy::too_many_arguments)]
pub fn lowrank_scores(
    pool: &ThreadPool,
    gate: LowRankView<'_>,
    up: Option<LowRankView<'_>>,
    h: &[f32],
    hb: &mut Vec<u16>,
    z: &mut Vec<f32>,
    g: &mut Vec<f32>,
    u: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hidden, inter) = (h.len(), out.len());
    let (rg, ru) = (gate.rank, up.map_or(0, |u| u.rank));
    z.clear();
    z.resize(rg + ru, 0.0);
    g.resize(inter, 0.0);
    u.resize(inter, 0.0);
    let bf16 = has_avx512_bf16() && matches!(gate.at, WeightView::Bf16(_));
    if bf16 {
        to_bf16_into(h, hb);
    }
    let input = Input {
        f: h,
        b: if bf16 { Some(&hb[..]) } else { None },
        q: None,
    };
    let pz = SharedMut(z.as_mut_ptr());
    pool.for_ranges(rg + ru, 16, &|range| {
        for r in range {
            let (f, row) = match up {
                Some(up) if r >= rg => (up, r - rg),
                _ => (gate, r),
            };
            let v = Strided::matrix(f.at, hidden).dot(row, input);
            // SAFETY: ranges of different threads are disjoint and below rg + ru = z.len().
            unsafe { *pz.ptr().add(r) = v };
        }
    });
    let (zg, zu) = z.split_at(rg);
    let (pg, pu, po) = (
        SharedMut(g.as_mut_ptr()),
        SharedMut(u.as_mut_ptr()),
        SharedMut(out.as_mut_ptr()),
    );
    pool.for_ranges(inter, 64, &|range| {
        // SAFETY: for_ranges hands out disjoint sub-ranges of 0..inter; g, u and out have
        // inter elements and outlive the call.
        let (g, u, o) = unsafe {
            (
                std::slice::from_raw_parts_mut(pg.ptr().add(range.start), range.len()),
                std::slice::from_raw_parts_mut(pu.ptr().add(range.start), range.len()),
                std::slice::from_raw_parts_mut(po.ptr().add(range.start), range.len()),
            )
        };
        combine_rows(gate.b, inter, range.start, zg, g);
        match up {
            Some(up) => {
                combine_rows(up.b, inter, range.start, zu, u);
                for ((o, &g), &u) in o.iter_mut().zip(g.iter()).zip(u.iter()) {
                    *o = (silu(g) * u).abs();
                }
            }
            None => {
                for (o, &g) in o.iter_mut().zip(g.iter()) {
                    *o = silu(g).abs();
                }
            }
        }
    });
}

/// Scalar reference: `y += a·w`.
pub fn axpy_f32_scalar(a: f32, w: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(w) {
        *o += a * v;
    }
}

/// Scalar reference: `y += a·w` with `w` in bf16.
pub fn axpy_bf16_scalar(a: f32, w: &[u16], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(w) {
        *o += a * bf16_to_f32(v);
    }
}

/// `y += a·w` in f32, fastest available version (the SIMD versions fuse the multiply-add).
#[inline]
pub fn axpy_f32(a: f32, w: &[f32], y: &mut [f32]) {
    assert_eq!(w.len(), y.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX-512F/BW/VL.
        Isa::Avx512 => unsafe { axpy_f32_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { axpy_f32_avx2(a, w, y) },
        _ => axpy_f32_scalar(a, w, y),
    }
}

/// `y += a·w` with `w` in bf16, in f32, fastest available version.
#[inline]
pub fn axpy_bf16(a: f32, w: &[u16], y: &mut [f32]) {
    assert_eq!(w.len(), y.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX-512F/BW/VL.
        Isa::Avx512 => unsafe { axpy_bf16_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { axpy_bf16_avx2(a, w, y) },
        _ => axpy_bf16_scalar(a, w, y),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn axpy_f32_avx512(a: f32, w: &[f32], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_ps(a);
    let mut i = 0;
    // SAFETY: full vectors at i + 16 <= n by the loop bound; the tail is masked to the
    // n - i valid lanes.
    unsafe {
        while i + 16 <= n {
            let v = _mm512_fmadd_ps(va, _mm512_loadu_ps(pw.add(i)), _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), v);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let v = _mm512_fmadd_ps(
                va,
                _mm512_maskz_loadu_ps(m, pw.add(i)),
                _mm512_maskz_loadu_ps(m, py.add(i)),
            );
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }
}

/// `y += a·w` with `w` in bf16 (one FMA per element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn axpy_bf16_avx512(a: f32, w: &[u16], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_ps(a);
    let mut i = 0;
    // SAFETY: full vectors at i + 16 <= n by the loop bound; the tail is masked to the
    // n - i valid lanes.
    unsafe {
        while i + 16 <= n {
            let wv = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(pw.add(i) as *const __m256i),
            )));
            let v = _mm512_fmadd_ps(va, wv, _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), v);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let wv = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16(m, pw.add(i) as *const i16),
            )));
            let v = _mm512_fmadd_ps(va, wv, _mm512_maskz_loadu_ps(m, py.add(i)));
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }
}

/// `y += a[0]·w[0]; y += a[1]·w[1]; ...` with bf16 rows: one FMA per element and row, in
/// order, so bit-identical to four [`axpy_bf16`] calls, but `y` is read and written once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn axpy4_bf16_avx512(a: [f32; 4], w: [&[u16]; 4], y: &mut [f32], pf: [&[u16]; 4]) {
    let n = y.len();
    let py = y.as_mut_ptr();
    for k in 0..4 {
        assert!(w[k].len() >= n && pf[k].len() >= n);
    }
    let pw = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
    let pp = [
        pf[0].as_ptr(),
        pf[1].as_ptr(),
        pf[2].as_ptr(),
        pf[3].as_ptr(),
    ];
    let va = [
        _mm512_set1_ps(a[0]),
        _mm512_set1_ps(a[1]),
        _mm512_set1_ps(a[2]),
        _mm512_set1_ps(a[3]),
    ];
    let mut i = 0;
    // SAFETY: full vectors at i + 32 <= n or i + 16 <= n (loop bounds; every row has at
    // least n elements, asserted); the tail is masked to the n - i valid lanes; prefetches
    // stay inside rows of n elements and never fault.
    unsafe {
        while i + 32 <= n {
            let mut v0 = _mm512_loadu_ps(py.add(i));
            let mut v1 = _mm512_loadu_ps(py.add(i + 16));
            for k in 0..4 {
                _mm_prefetch::<_MM_HINT_T1>(pp[k].add(i) as *const i8);
                let raw = _mm512_loadu_si512(pw[k].add(i) as *const __m512i);
                let lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm512_castsi512_si256(raw),
                )));
                let hi = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm512_extracti64x4_epi64::<1>(raw),
                )));
                v0 = _mm512_fmadd_ps(va[k], lo, v0);
                v1 = _mm512_fmadd_ps(va[k], hi, v1);
            }
            _mm512_storeu_ps(py.add(i), v0);
            _mm512_storeu_ps(py.add(i + 16), v1);
            i += 32;
        }
        while i < n {
            let m: __mmask16 = if n - i >= 16 {
                u16::MAX
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            let mut v = _mm512_maskz_loadu_ps(m, py.add(i));
            for k in 0..4 {
                let wk = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_maskz_loadu_epi16(m, pw[k].add(i) as *const i16),
                )));
                v = _mm512_fmadd_ps(va[k], wk, v);
            }
            _mm512_mask_storeu_ps(py.add(i), m, v);
            i += 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_f32_avx2(a: f32, w: &[f32], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    // SAFETY: every access covers 8 elements at i + 8 <= n; the tail is scalar.
    unsafe {
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            *py.add(i) = a.mul_add(*pw.add(i), *py.add(i));
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_bf16_avx2(a: f32, w: &[u16], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    // SAFETY: every access covers 8 elements at i + 8 <= n; the tail is scalar.
    unsafe {
        while i + 8 <= n {
            let raw = _mm_loadu_si128(pw.add(i) as *const __m128i);
            let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)));
            let v = _mm256_fmadd_ps(va, wv, _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            *py.add(i) = a.mul_add(bf16_to_f32(*pw.add(i)), *py.add(i));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::f16::f32_to_f16;
    use crate::kernels::test_data::data;

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale * 4.0,
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn axpy_matches_scalar_on_odd_sizes() {
        for n in [0, 1, 7, 8, 15, 16, 17, 31, 33, 100, 577] {
            let w = data(n, 3);
            let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let y0 = data(n, 4);
            let (mut a, mut b) = (y0.clone(), y0.clone());
            axpy_f32(0.7, &w, &mut a);
            axpy_f32_scalar(0.7, &w, &mut b);
            assert_close(&a, &b, &format!("axpy f32 n={n}"));
            let (mut a, mut b) = (y0.clone(), y0.clone());
            axpy_bf16(-1.3, &wb, &mut a);
            axpy_bf16_scalar(-1.3, &wb, &mut b);
            assert_close(&a, &b, &format!("axpy bf16 n={n}"));
            // Four rows at once: bit-identical to four single axpys in order.
            let rows: Vec<Vec<u16>> = (0..4)
                .map(|k| data(n, 10 + k).iter().map(|&v| f32_to_bf16(v)).collect())
                .collect();
            let coef = [0.3, -2.0, 1.7, 0.01];
            let (mut a, mut b) = (y0.clone(), y0.clone());
            for k in 0..4 {
                axpy_bf16(coef[k], &rows[k], &mut a);
            }
            let flat: Vec<u16> = rows.concat();
            Strided::matrix(WeightView::Bf16(&flat), n).axpy4(
                [0, 1, 2, 3],
                coef,
                &mut b,
                [3, 2, 1, 0],
            );
            assert_eq!(a, b, "axpy4 bf16 n={n}: bit-identical to four axpys");
            let rows: Vec<Vec<u16>> = (0..4)
                .map(|k| data(n, 20 + k).iter().map(|&v| f32_to_f16(v)).collect())
                .collect();
            let (mut a, mut b) = (y0.clone(), y0.clone());
            for k in 0..4 {
                axpy_f16(coef[k], &rows[k], &mut a);
            }
            let flat: Vec<u16> = rows.concat();
            Strided::matrix(WeightView::F16(&flat), n).axpy4(
                [0, 1, 2, 3],
                coef,
                &mut b,
                [3, 2, 1, 0],
            );
            assert_eq!(a, b, "axpy4 f16 n={n}: bit-identical to four axpys");
            let mut c = vec![0f32; n];
            combine_rows(WeightView::F16(&flat), n, 0, &coef[..3], &mut c);
            let mut want = vec![0f32; n];
            for k in 0..3 {
                super::super::f16::axpy_f16_scalar(coef[k], &rows[k], &mut want);
            }
            assert_close(&c, &want, &format!("combine_rows f16 n={n}"));
        }
    }

    #[test]
    fn sparse_kernels_match_scalar_on_odd_sizes() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (hidden, inter) in [(1, 1), (17, 33), (33, 70), (65, 257)] {
                let gate = data(inter * hidden, 1);
                let up = data(inter * hidden, 2);
                let down_t = data(inter * hidden, 5);
                let bf = |v: &[f32]| v.iter().map(|&x| f32_to_bf16(x)).collect::<Vec<u16>>();
                let (gb, ub, db) = (bf(&gate), bf(&up), bf(&down_t));
                let hf = |v: &[f32]| v.iter().map(|&x| f32_to_f16(x)).collect::<Vec<u16>>();
                let (gh, uh, dh) = (hf(&gate), hf(&up), hf(&down_t));
                let h = data(hidden, 6);
                let idx: Vec<u32> = (0..inter as u32).filter(|i| i % 3 != 1).collect();
                let given = data(idx.len(), 7);
                for (g, u, d) in [
                    (
                        WeightView::F32(&gate),
                        WeightView::F32(&up),
                        WeightView::F32(&down_t),
                    ),
                    (
                        WeightView::Bf16(&gb),
                        WeightView::Bf16(&ub),
                        WeightView::Bf16(&db),
                    ),
                    (
                        WeightView::F16(&gh),
                        WeightView::F16(&uh),
                        WeightView::F16(&dh),
                    ),
                ] {
                    let (g, u, d) = (
                        Strided::matrix(g, hidden),
                        Strided::matrix(u, hidden),
                        Strided::matrix(d, hidden),
                    );
                    for items in [Items::Gather(&idx), Items::Slots(inter), Items::Slots(0)] {
                        for act in [
                            Activation::Compute { gate: g, up: u },
                            Activation::Given(&given[..items.len().min(given.len())]),
                        ] {
                            if let (Activation::Given(a), n) = (act, items.len())
                                && a.len() != n
                            {
                                continue;
                            }
                            let mut want = vec![0f32; hidden];
                            sparse_mlp_scalar(items, act, d, &h, &mut want);
                            let mut got = vec![1f32; hidden];
                            let mut scratch = Vec::new();
                            sparse_mlp(&pool, items, act, d, &h, &mut got, &mut scratch);
                            assert_close(&got, &want, &format!("{hidden}x{inter} t={threads}"));
                        }
                    }
                    let (mut gg, mut uu) = (vec![0f32; idx.len()], vec![0f32; idx.len()]);
                    gather_gate_up(&pool, g, u, &idx, &h, &mut gg, &mut uu, &mut Vec::new());
                    let mut row = vec![0f32; hidden];
                    // The kernel rounds h to bf16 where it uses the bf16 x bf16 product.
                    let hr: Vec<f32> = if g.wants_bf16_input() {
                        h.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect()
                    } else {
                        h.clone()
                    };
                    for (k, &r) in idx.iter().enumerate() {
                        g.row_f32(r as usize, &mut row);
                        let want = dot_f32_scalar(&row, &hr);
                        assert!((gg[k] - want).abs() < 1e-5 * (1.0 + want.abs()));
                        u.row_f32(r as usize, &mut row);
                        let want = dot_f32_scalar(&row, &hr);
                        assert!((uu[k] - want).abs() < 1e-5 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }

    /// The split fixes the result, not the threads' timing: on pools of the same size,
    /// late or slow workers give the same bits (bf16 and f32 rows, gathered and cached).
    #[test]
    fn sparse_mlp_is_bit_identical_with_slow_workers() {
        let (hidden, inter) = (64, 600);
        let gf = data(inter * hidden, 1);
        let uf = data(inter * hidden, 2);
        let df = data(inter * hidden, 3);
        let bf = |v: &[f32]| v.iter().map(|&x| f32_to_bf16(x)).collect::<Vec<u16>>();
        let (gb, ub, db) = (bf(&gf), bf(&uf), bf(&df));
        let h = data(hidden, 4);
        let idx: Vec<u32> = (0..inter as u32).filter(|i| i % 3 != 1).collect();
        let pools = crate::kernels::pool::test_pools();
        for (g, u, d) in [
            (
                WeightView::F32(&gf),
                WeightView::F32(&uf),
                WeightView::F32(&df),
            ),
            (
                WeightView::Bf16(&gb),
                WeightView::Bf16(&ub),
                WeightView::Bf16(&db),
            ),
        ] {
            let (g, u, d) = (
                Strided::matrix(g, hidden),
                Strided::matrix(u, hidden),
                Strided::matrix(d, hidden),
            );
            for items in [Items::Gather(&idx), Items::Slots(inter), Items::Slots(5)] {
                let act = Activation::Compute { gate: g, up: u };
                let run = |pool: &ThreadPool| {
                    let mut out = vec![f32::NAN; hidden];
                    sparse_mlp(pool, items, act, d, &h, &mut out, &mut Vec::new());
                    out
                };
                for threads in [2, 3] {
                    let want = run(&pools[threads - 1].1);
                    for (name, pool) in pools.iter().filter(|(_, p)| p.threads() == threads) {
                        for _ in 0..3 {
                            assert!(
                                run(pool)
                                    .iter()
                                    .zip(&want)
                                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{name}: differs from an unslowed pool of the same size"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The same items in the same order give bit-identical results whichever buffer the
    /// rows come from (the cache's slots or the full matrices); another order or split
    /// agrees to rounding.
    #[test]
    fn same_order_is_bit_identical_across_buffers() {
        let (hidden, inter) = (37, 300);
        let bf = |v: &[f32]| v.iter().map(|&x| f32_to_bf16(x)).collect::<Vec<u16>>();
        let (gate, up, down_t) = (
            bf(&data(inter * hidden, 1)),
            bf(&data(inter * hidden, 2)),
            bf(&data(inter * hidden, 3)),
        );
        let h = data(hidden, 4);
        let idx: Vec<u32> = (0..inter as u32).filter(|i| i % 5 != 2).collect();
        // A "cache": the chosen rows copied into a shuffled slot order.
        let mut slot_of = vec![0u32; inter];
        let mut order = idx.clone();
        order.reverse();
        order.rotate_left(17);
        let copy = |m: &[u16]| {
            let mut c = Vec::new();
            for (s, &n) in order.iter().enumerate() {
                c.extend_from_slice(&m[n as usize * hidden..(n as usize + 1) * hidden]);
                let _ = s;
            }
            c
        };
        for (s, &n) in order.iter().enumerate() {
            slot_of[n as usize] = s as u32;
        }
        let (cg, cu, cd) = (copy(&gate), copy(&up), copy(&down_t));
        let slots: Vec<u32> = idx.iter().map(|&n| slot_of[n as usize]).collect();
        fn m(v: &[u16]) -> Strided<'_> {
            Strided::matrix(WeightView::Bf16(v), 37)
        }
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            let mut outs = Vec::new();
            for (g, u, d, items) in [
                (m(&gate), m(&up), m(&down_t), Items::Gather(&idx)),
                (m(&cg), m(&cu), m(&cd), Items::Gather(&slots)),
            ] {
                let mut out = vec![0f32; hidden];
                let act = Activation::Compute { gate: g, up: u };
                let mut scratch = Vec::new();
                sparse_mlp(&pool, items, act, d, &h, &mut out, &mut scratch);
                outs.push(out);
            }
            assert_eq!(outs[0], outs[1], "t={threads}: bit-identical");
            let mut other = vec![0f32; hidden];
            let act = Activation::Compute {
                gate: m(&gate),
                up: m(&up),
            };
            let mut scratch = Vec::new();
            sparse_mlp(
                &pool,
                Items::Gather(&order),
                act,
                m(&down_t),
                &h,
                &mut other,
                &mut scratch,
            );
            assert_close(&other, &outs[0], &format!("t={threads}: other order"));
        }
    }
}
