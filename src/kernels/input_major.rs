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
use crate::quant::QFormat;

/// Reusable buffers of [`matvec_input_major`].
#[derive(Default)]
pub struct InputMajorScratch {
    /// The kept inputs' values, in kept order.
    values: Vec<f32>,
    /// The per-thread accumulators.
    acc: Vec<f32>,
    /// The by-column Q4 kernels' buffers.
    qcols: super::qcols::QColScratch,
}

impl InputMajorScratch {
    /// The buffers of [`super::qcols::QColMatrix`]'s products.
    pub fn qcols(&mut self) -> &mut super::qcols::QColScratch {
        &mut self.qcols
    }
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
    #[cfg(target_arch = "x86_64")]
    if let WeightView::Bf16(w) = wt
        && super::dot::has_avx512_bf16()
    {
        return pairs_bf16(pool, w, in_dim, out_dim, x, kept, out, scratch);
    }
    #[cfg(target_arch = "x86_64")]
    if let WeightView::Quant(QFormat::Q8_0, w) = wt
        && super::dot::isa() == super::dot::Isa::Avx512
        && super::qdot::has_avx2()
    {
        return rows_q8_0(pool, w, in_dim, out_dim, x, kept, out, scratch);
    }
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

/// Outputs per chunk of the paired bf16 kernel (one 64-byte line of bf16 per row).
const PAIR_CHUNK: usize = 32;

/// [`matvec_input_major`] for bf16 weights on AVX-512 BF16: the inputs are taken in pairs
/// (a, b), rows a and b interleaved element by element (`vpunpck{l,h}wd`) and multiplied
/// with the pair (x_a, x_b) rounded to bf16 by one `vdpbf16ps` per 16 outputs: half the
/// instructions per weight of widening to f32, which is what lets the kernel keep up with
/// memory (the row-major decode rounds x to bf16 the same way). The kept inputs are split
/// into contiguous ranges, one chunk per thread, each accumulating all outputs in the
/// interleave's lane order; the threads' sums are added in thread order and put back in
/// output order.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn pairs_bf16(
    pool: &ThreadPool,
    w: &[u16],
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    kept: Option<&[u32]>,
    out: &mut [f32],
    scratch: &mut InputMajorScratch,
) {
    pairs_bf16_group(pool, &[(w, out_dim)], in_dim, x, kept, &mut [out], scratch);
}

/// [`pairs_bf16`] for matrices that share one input (q/k/v, gate/up): the values packed
/// once and one pool job over (matrix, range of kept inputs); each output is what
/// [`pairs_bf16`] computes for its matrix alone (the same ranges, the same order).
#[cfg(target_arch = "x86_64")]
fn pairs_bf16_group(
    pool: &ThreadPool,
    mats: &[(&[u16], usize)],
    in_dim: usize,
    x: &[f32],
    kept: Option<&[u32]>,
    outs: &mut [&mut [f32]],
    scratch: &mut InputMajorScratch,
) {
    let n = kept.map_or(in_dim, |k| k.len());
    if n == 0 {
        outs.iter_mut().for_each(|o| o.fill(0.0));
        return;
    }
    // The kept inputs' values as bf16, packed two per f32 slot (items 2p, 2p + 1), the
    // last odd item paired with 0.
    scratch.values.clear();
    let value = |j: usize| {
        let i = kept.map_or(j, |k| k[j] as usize);
        super::dot::f32_to_bf16(x[i]) as u32
    };
    for p in 0..n.div_ceil(2) {
        let lo = value(2 * p);
        let hi = if 2 * p + 1 < n { value(2 * p + 1) } else { 0 };
        scratch.values.push(f32::from_bits(lo | (hi << 16)));
    }
    let xv = &scratch.values[..];
    // Per matrix, `per` contiguous ranges of the kept inputs (even boundaries: whole
    // pairs), each summed into its own `stride` accumulators.
    let per = pool.threads().min(n.div_ceil(16)).max(1);
    let mut offsets = Vec::with_capacity(mats.len() + 1);
    offsets.push(0);
    for &(_, out_dim) in mats {
        let last = offsets[offsets.len() - 1];
        offsets.push(last + per * out_dim.next_multiple_of(PAIR_CHUNK));
    }
    let acc = &mut scratch.acc;
    acc.clear();
    acc.resize(offsets[mats.len()], 0.0);
    let base = SharedMut(acc.as_mut_ptr());
    pool.for_chunks(mats.len() * per, &|c, _| {
        let (m, t) = (c / per, c % per);
        let (w, out_dim) = mats[m];
        let stride = out_dim.next_multiple_of(PAIR_CHUNK);
        // SAFETY: chunk c alone writes its `stride` slots of matrix m's accumulators
        // (offsets[m] + t * stride, inside acc, resized above).
        let a = unsafe {
            std::slice::from_raw_parts_mut(base.get().add(offsets[m] + t * stride), stride)
        };
        let r = super::pool::split_range(n, 2, t, per);
        // SAFETY: has_avx512_bf16() checked the CPU (the callers); every item's row (kept
        // indices are < in_dim) has out_dim elements in `w`; pairs r.start / 2 ..
        // r.end.div_ceil(2) are in `xv`; `a` has `stride` slots.
        unsafe { accumulate_pairs(w, out_dim, kept, r, xv, a) };
    });
    for (m, (&(_, out_dim), out)) in mats.iter().zip(outs.iter_mut()).enumerate() {
        assert_eq!(out.len(), out_dim, "matvec_input_major: output size");
        let stride = out_dim.next_multiple_of(PAIR_CHUNK);
        let (first, rest) = acc[offsets[m]..offsets[m + 1]].split_at_mut(stride);
        for t in 1..per {
            for (a, &b) in first.iter_mut().zip(&rest[(t - 1) * stride..t * stride]) {
                *a += b;
            }
        }
        // Lane order back to output order: in chunk c, slot 16 h + 4 k + e holds output
        // 32 c + 8 k + 4 h + e (k: 128-bit lane, h: low/high interleave).
        for (o, y) in out.iter_mut().enumerate() {
            let (c, r) = (o / PAIR_CHUNK, o % PAIR_CHUNK);
            let (k, h, e) = (r / 8, (r / 4) % 2, r % 4);
            *y = first[c * PAIR_CHUNK + 16 * h + 4 * k + e];
        }
    }
}

/// `outs[m] = x · wts[m]` over the inputs `kept` for input-major matrices that share one
/// input (q/k/v, gate/up), as [`matvec_input_major`] computes each alone, in one pool job
/// where the kernel allows it (bf16 on AVX-512 BF16). Returns false, computing nothing,
/// for the other weights (the caller then runs [`matvec_input_major`] per matrix).
pub fn matvec_input_major_group(
    pool: &ThreadPool,
    wts: &[(WeightView<'_>, usize)],
    in_dim: usize,
    x: &[f32],
    kept: Option<&[u32]>,
    outs: &mut [&mut [f32]],
    scratch: &mut InputMajorScratch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::dot::has_avx512_bf16() {
        let mats: Option<Vec<(&[u16], usize)>> = wts
            .iter()
            .map(|&(w, out_dim)| match w {
                WeightView::Bf16(w) if w.len() == in_dim * out_dim => Some((w, out_dim)),
                _ => None,
            })
            .collect();
        if let Some(mats) = mats {
            assert_eq!(x.len(), in_dim, "matvec_input_major: input size");
            assert_eq!(mats.len(), outs.len(), "one output per matrix");
            assert!(
                kept.is_none_or(|k| k.iter().all(|&i| (i as usize) < in_dim)),
                "matvec_input_major: kept index out of range"
            );
            pairs_bf16_group(pool, &mats, in_dim, x, kept, outs, scratch);
            return true;
        }
    }
    let _ = (pool, wts, in_dim, x, kept, outs, scratch);
    false
}

/// [`matvec_input_major`] for Q8_0 weights on AVX-512: four kept inputs at a time, each
/// output block's 32 sums held in two registers while the four rows' blocks are added
/// (`acc += (x_i · d) · q` per element, one FMA, inputs in ascending order), so the
/// accumulators are read and written once per four rows. The kept inputs are split into
/// contiguous ranges, one chunk per thread; the threads' sums are added in thread order.
/// Same arithmetic per element as [`super::qdot::axpy_q`] on the rows in order.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn rows_q8_0(
    pool: &ThreadPool,
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    kept: Option<&[u32]>,
    out: &mut [f32],
    scratch: &mut InputMajorScratch,
) {
    let n = kept.map_or(in_dim, |k| k.len());
    let row_bytes = QFormat::Q8_0.row_bytes(out_dim);
    assert!(w.len() == in_dim * row_bytes && out_dim.is_multiple_of(QK));
    if n == 0 {
        out.fill(0.0);
        return;
    }
    scratch.values.clear();
    scratch
        .values
        .extend((0..n).map(|j| x[kept.map_or(j, |k| k[j] as usize)]));
    let xv = &scratch.values[..];
    let first = sum_by_chunks(pool, n, 1, out_dim, &mut scratch.acc, &|r, acc| {
        // SAFETY: isa() is Avx512 (F/BW/VL) and qdot::has_avx2() checked F16C; every
        // item's row (kept indices are < in_dim, asserted by the caller) is inside `w`
        // (asserted); acc has out_dim slots.
        unsafe { accumulate_q8_0(w, row_bytes, kept, r, xv, acc) };
    });
    out.copy_from_slice(first);
}

/// Splits `n` items into contiguous ranges (boundaries multiples of `align`), one chunk
/// per thread (at most one per 16 items), each adding its items' products into its own
/// `stride` slots of `acc` through `body`; returns the chunks' sums added in chunk order.
/// A chunked job: under a competing load the caller runs the chunks a descheduled worker
/// has not claimed, and which thread ran a chunk never changes the result.
fn sum_by_chunks<'a>(
    pool: &ThreadPool,
    n: usize,
    align: usize,
    stride: usize,
    acc: &'a mut Vec<f32>,
    body: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) -> &'a [f32] {
    let chunks = pool.threads().min(n.div_ceil(16)).max(1);
    acc.clear();
    acc.resize(chunks * stride, 0.0);
    let base = SharedMut(acc.as_mut_ptr());
    pool.for_chunks(chunks, &|t, nt| {
        // SAFETY: chunk t alone writes acc[t * stride..(t + 1) * stride] (resized above).
        let a = unsafe { std::slice::from_raw_parts_mut(base.get().add(t * stride), stride) };
        body(super::pool::split_range(n, align, t, nt), a);
    });
    let (first, rest) = acc.split_at_mut(stride);
    for t in 1..chunks {
        for (a, &b) in first.iter_mut().zip(&rest[(t - 1) * stride..t * stride]) {
            *a += b;
        }
    }
    first
}

/// [`matmul_input_major`] for Q8_0 on AVX-512, reading the input-major blocks as they
/// are (no transpose): the output blocks are split over the pool, and each block of 32
/// outputs is computed for up to 8 tokens at a time as a sum of outer products,
/// `acc[t] += x[t, i] · (d_i · q_i)` over the inputs i in order (the block's weights, one
/// 34-byte block per input, stay in cache across the token blocks).
#[cfg(target_arch = "x86_64")]
fn prefill_q8_0(
    pool: &ThreadPool,
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let row_bytes = QFormat::Q8_0.row_bytes(out_dim);
    assert!(w.len() == in_dim * row_bytes && out_dim.is_multiple_of(QK));
    assert!(x.len() == n * in_dim && out.len() == n * out_dim);
    let dst = SharedMut(out.as_mut_ptr());
    pool.for_ranges(out_dim / QK, 1, &|blocks| {
        for c in blocks {
            let mut t0 = 0;
            while t0 < n {
                let tt = (n - t0).min(8);
                // SAFETY: isa() is Avx512 and has_avx2() checked F16C; block column c <
                // out_dim / 32 of every row is inside `w` (asserted); tokens t0..t0 + tt
                // are rows of x and out; this thread alone writes out's block column c.
                unsafe {
                    let args = (
                        w.as_ptr().add(c * Q8_0_BLOCK),
                        row_bytes,
                        in_dim,
                        x.as_ptr().add(t0 * in_dim),
                        dst.get().add(t0 * out_dim + c * QK),
                        out_dim,
                    );
                    match tt {
                        1 => outer_q8_0::<1>(args),
                        2 => outer_q8_0::<2>(args),
                        3 => outer_q8_0::<3>(args),
                        4 => outer_q8_0::<4>(args),
                        5 => outer_q8_0::<5>(args),
                        6 => outer_q8_0::<6>(args),
                        7 => outer_q8_0::<7>(args),
                        _ => outer_q8_0::<8>(args),
                    }
                };
                t0 += tt;
            }
        }
    });
}

/// `out[t, 0..32] = sum over i < k of x[t, i] · (d_i · q_i[0..32])` for t < TT (<= 8):
/// one Q8_0 block column (block i at `w + i * stride`), x rows of k, out row stride `ld`.
///
/// # Safety
/// AVX-512F/BW/VL and F16C; the k blocks, TT rows of x and TT rows of 32 outputs are
/// valid as described.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn outer_q8_0<const TT: usize>(
    (w, stride, k, x, out, ld): (*const u8, usize, usize, *const f32, *mut f32, usize),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; TT];
    // SAFETY: the caller's contract; prefetches never fault (their address is computed
    // with wrapping arithmetic, as it may pass the last block).
    unsafe {
        for i in 0..k {
            let blk = w.add(i * stride);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(8 * stride) as *const i8);
            let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                *blk,
                *blk.add(1),
            ]) as i32)));
            let qs = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let q0 = _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(qs))),
            );
            let q1 = _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(qs))),
            );
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(t * k + i));
                a[0] = _mm512_fmadd_ps(xv, q0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, q1, a[1]);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(t * ld), a[0]);
            _mm512_storeu_ps(out.add(t * ld + 16), a[1]);
        }
    }
}

/// acc += the products of items `range` (rows `kept[j]`, or j, of `row_bytes` bytes) with
/// their values `xv[j]`, four rows per pass over the output blocks.
///
/// # Safety
/// AVX-512F/BW/VL and F16C; every item's row is inside `w`; `xv` covers `range`; `acc`
/// has one slot per output (`row_bytes / 34 * 32`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn accumulate_q8_0(
    w: &[u8],
    row_bytes: usize,
    kept: Option<&[u32]>,
    range: std::ops::Range<usize>,
    xv: &[f32],
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let blocks = row_bytes / Q8_0_BLOCK;
    debug_assert_eq!(acc.len(), blocks * QK);
    let base = w.as_ptr();
    let pa = acc.as_mut_ptr();
    let mut j = range.start;
    // SAFETY: (for the whole loop) row pointers are row * row_bytes into `w`, each block
    // read (34 bytes at c * 34) lies inside its row; accumulator slots c * 32 .. c * 32 +
    // 32 < acc.len(); prefetches never fault.
    unsafe {
        while j < range.end {
            // Up to four items; a missing item repeats the last row with value 0.
            let (m, rows, ahead) = four_rows(base, row_bytes, kept, j, range.end);
            let vals: [f32; 4] = std::array::from_fn(|q| if q < m { xv[j + q] } else { 0.0 });
            for c in 0..blocks {
                let off = c * Q8_0_BLOCK;
                let y = pa.add(c * QK);
                let mut lo = _mm512_loadu_ps(y);
                let mut hi = _mm512_loadu_ps(y.add(16));
                for q in 0..m {
                    let blk = rows[q].add(off);
                    // One prefetch per 64-byte line of the row ahead (blocks are 34 bytes).
                    if (off & 63) < Q8_0_BLOCK {
                        _mm_prefetch::<_MM_HINT_T0>(ahead[q].add(off) as *const i8);
                    }
                    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
                        (blk as *const u16).read_unaligned() as i32
                    ));
                    let s = _mm512_broadcastss_ps(_mm_mul_ss(d, _mm_set_ss(vals[q])));
                    // Sign-extending loads straight from memory (no 256-bit extract).
                    let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(2) as *const __m128i
                    )));
                    let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(18) as *const __m128i
                    )));
                    lo = _mm512_fmadd_ps(s, q0, lo);
                    hi = _mm512_fmadd_ps(s, q1, hi);
                }
                _mm512_storeu_ps(y, lo);
                _mm512_storeu_ps(y.add(16), hi);
            }
            j += m;
        }
    }
}

/// The next group of the input-major kernels: items `j..j + m` (m = min(4, end - j)),
/// their rows (`kept[i]`, or i, `stride` elements apart from `base`; a missing item
/// repeats the group's last row) and the rows of the four items after them, to prefetch
/// (a missing one repeats its own group's row).
///
/// # Safety
/// Every item's row start lies inside the allocation `base` points into.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn four_rows<T>(
    base: *const T,
    stride: usize,
    kept: Option<&[u32]>,
    j: usize,
    end: usize,
) -> (usize, [*const T; 4], [*const T; 4]) {
    let row = |i: usize| kept.map_or(i, |k| k[i] as usize);
    let m = (end - j).min(4);
    // SAFETY: the caller's contract: each item's row start is inside the allocation.
    let at = |i: usize| unsafe { base.add(row(i) * stride) };
    let rows: [*const T; 4] = std::array::from_fn(|q| at(j + q.min(m - 1)));
    let ahead = std::array::from_fn(|q| {
        if j + 4 + q < end {
            at(j + 4 + q)
        } else {
            rows[q]
        }
    });
    (m, rows, ahead)
}

/// acc (lane order, see [`pairs_bf16`]) += the products of items `range` (rows `kept[j]`,
/// or j) with their bf16 values, two items per `vdpbf16ps`.
///
/// # Safety
/// AVX-512F/BW/BF16; rows of the items have `out_dim` elements in `w`; `xv` holds the
/// value pairs of every pair the range touches; acc has out_dim rounded up to 32 slots;
/// `range.start` is even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn accumulate_pairs(
    w: &[u16],
    out_dim: usize,
    kept: Option<&[u32]>,
    range: std::ops::Range<usize>,
    xv: &[f32],
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let chunks = out_dim.div_ceil(PAIR_CHUNK);
    let tail = out_dim - (chunks - 1) * PAIR_CHUNK;
    let tail_mask: __mmask32 = if tail == PAIR_CHUNK {
        u32::MAX
    } else {
        (1u32 << tail) - 1
    };
    let base = w.as_ptr();
    let pa = acc.as_mut_ptr();
    let mut j = range.start;
    // SAFETY: (for the whole loop) row pointers are row * out_dim into `w`, and each load
    // reads 32 elements at c * 32 < out_dim, masked to the tail's elements in the last
    // chunk; accumulator slots c * 32 .. c * 32 + 32 < acc.len(); prefetches never fault.
    unsafe {
        while j < range.end {
            // Up to four items: pairs (j, j + 1) and (j + 2, j + 3); a missing item's row
            // is its partner's, with value 0 (the pair's packed value has 0 there).
            let (m, rows, ahead) = four_rows(base, out_dim, kept, j, range.end);
            let x01 = _mm512_castps_si512(_mm512_set1_ps(xv[j / 2]));
            let x23 = if m > 2 {
                _mm512_castps_si512(_mm512_set1_ps(xv[j / 2 + 1]))
            } else {
                _mm512_setzero_si512()
            };
            for c in 0..chunks {
                let mask = if c + 1 == chunks { tail_mask } else { u32::MAX };
                let off = c * PAIR_CHUNK;
                let ld = |p: *const u16| _mm512_maskz_loadu_epi16(mask, p.add(off) as *const i16);
                for p in ahead {
                    _mm_prefetch::<_MM_HINT_T1>(p.add(off) as *const i8);
                }
                let (a0, a1) = (ld(rows[0]), ld(rows[1]));
                let mut lo = _mm512_loadu_ps(pa.add(off));
                let mut hi = _mm512_loadu_ps(pa.add(off + 16));
                lo = _mm512_dpbf16_ps(
                    lo,
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi16(a0, a1)),
                    std::mem::transmute::<__m512i, __m512bh>(x01),
                );
                hi = _mm512_dpbf16_ps(
                    hi,
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi16(a0, a1)),
                    std::mem::transmute::<__m512i, __m512bh>(x01),
                );
                if m > 2 {
                    let (a2, a3) = (ld(rows[2]), ld(rows[3]));
                    lo = _mm512_dpbf16_ps(
                        lo,
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi16(a2, a3)),
                        std::mem::transmute::<__m512i, __m512bh>(x23),
                    );
                    hi = _mm512_dpbf16_ps(
                        hi,
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi16(a2, a3)),
                        std::mem::transmute::<__m512i, __m512bh>(x23),
                    );
                }
                _mm512_storeu_ps(pa.add(off), lo);
                _mm512_storeu_ps(pa.add(off + 16), hi);
            }
            j += m;
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
    if let WeightView::Quant(f, w) = wt {
        assert!(
            f == QFormat::Q8_0,
            "matmul_input_major: input-major weights are float (f32, bf16, f16) or q8_0"
        );
        #[cfg(target_arch = "x86_64")]
        if super::dot::isa() == super::dot::Isa::Avx512 && super::qdot::has_avx2() {
            return prefill_q8_0(pool, w, in_dim, out_dim, x, n, out);
        }
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
    // Q8_0 tiles start on block boundaries.
    let align = if matches!(wt, WeightView::Quant(..)) {
        QK
    } else {
        16
    };
    pool.for_ranges(out_dim, align, &|range| {
        let mut tile_f32: Vec<f32> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        let mut tile_bf16: Vec<u16> = Vec::new();
        let mut o0 = range.start;
        while o0 < range.end {
            let o1 = (o0 + TILE).min(range.end);
            let m = o1 - o0;
            #[cfg(target_arch = "x86_64")]
            if let (WeightView::Bf16(w), Some(xb)) = (wt, xb.as_deref()) {
                transpose_cols_u16(w, out_dim, in_dim, o0, o1, &mut tile_bf16);
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
                    transpose_cols_u16(w, out_dim, in_dim, o0, o1, &mut t16);
                    tile_f32.resize(m * in_dim, 0.0);
                    if matches!(wt, WeightView::Bf16(_)) {
                        for (o, &b) in tile_f32.iter_mut().zip(&t16) {
                            *o = super::dot::bf16_to_f32(b);
                        }
                    } else {
                        f16_to_f32_slice(&t16, &mut tile_f32);
                    }
                }
                WeightView::Quant(_, w) => {
                    transpose_cols_q8_0(w, out_dim, in_dim, o0, o1, &mut tile_f32)
                }
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
    assert!(w.len() == rows * cols && o0 <= o1 && o1 <= cols);
    for (i, row) in w.chunks_exact(cols).enumerate() {
        for (j, &v) in row[o0..o1].iter().enumerate() {
            dst[j * rows + i] = v;
        }
    }
}

/// Columns `o0..o1` (whole 32-element blocks) of the Q8_0 matrix `w` ([rows, cols])
/// dequantized and transposed into `dst` (resized to [o1 - o0, rows] row-major).
pub fn transpose_cols_q8_0(
    w: &[u8],
    cols: usize,
    rows: usize,
    o0: usize,
    o1: usize,
    dst: &mut Vec<f32>,
) {
    let m = o1 - o0;
    let row_bytes = QFormat::Q8_0.row_bytes(cols);
    assert!(w.len() == rows * row_bytes && o0 <= o1 && o1 <= cols);
    assert!(o0.is_multiple_of(QK) && m.is_multiple_of(QK));
    dst.resize(m * rows, 0.0);
    let mut values = vec![0f32; m];
    for (i, row) in w.chunks_exact(row_bytes).enumerate() {
        let blocks = &row[o0 / QK * Q8_0_BLOCK..o1 / QK * Q8_0_BLOCK];
        crate::quant::dequantize(QFormat::Q8_0.source(), blocks, &mut values);
        for (j, &v) in values.iter().enumerate() {
            dst[j * rows + i] = v;
        }
    }
}

/// Elements and bytes of a Q8_0 block.
const QK: usize = crate::quant::QK;
const Q8_0_BLOCK: usize = QFormat::Q8_0.block_bytes();

/// [`transpose_cols`] for 16-bit elements (bf16, f16), in 8 x 8 blocks with SSE2
/// unpacks where the CPU has them (every x86_64): the prefill of an input-major model
/// transposes every weight once per forward call, so this is on its critical path.
pub fn transpose_cols_u16(
    w: &[u16],
    cols: usize,
    rows: usize,
    o0: usize,
    o1: usize,
    dst: &mut Vec<u16>,
) {
    let m = o1 - o0;
    dst.resize(m * rows, 0);
    assert!(w.len() == rows * cols && o0 <= o1 && o1 <= cols);
    #[cfg(target_arch = "x86_64")]
    {
        let (rb, mb) = (rows / 8 * 8, m / 8 * 8);
        for i0 in (0..rb).step_by(8) {
            for j0 in (0..mb).step_by(8) {
                // SAFETY: rows i0..i0 + 8 < rows and columns o0 + j0..o0 + j0 + 8 <= o1 <=
                // cols are inside `w` (asserted); dst rows j0..j0 + 8 < m, columns
                // i0..i0 + 8 < rows are inside `dst` (resized to m * rows).
                unsafe {
                    transpose8x8(
                        w.as_ptr().add(i0 * cols + o0 + j0),
                        cols,
                        dst.as_mut_ptr().add(j0 * rows + i0),
                        rows,
                    )
                };
            }
        }
        // The edges: columns past the last whole block of 8, rows likewise.
        for i in 0..rows {
            let row = &w[i * cols + o0..i * cols + o1];
            let js = if i < rb { mb..m } else { 0..m };
            for j in js {
                dst[j * rows + i] = row[j];
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    transpose_cols(w, cols, rows, o0, o1, dst);
}

/// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < 8.
///
/// # Safety
/// 8 rows of 8 u16 at `src` (stride `ld_src`) readable, 8 rows of 8 at `dst` (stride
/// `ld_dst`) writable.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn transpose8x8(src: *const u16, ld_src: usize, dst: *mut u16, ld_dst: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract; SSE2 is part of x86_64.
    unsafe {
        let r: [__m128i; 8] =
            std::array::from_fn(|i| _mm_loadu_si128(src.add(i * ld_src) as *const __m128i));
        // 16-bit, then 32-bit, then 64-bit interleaves.
        let a0 = _mm_unpacklo_epi16(r[0], r[1]);
        let a1 = _mm_unpackhi_epi16(r[0], r[1]);
        let a2 = _mm_unpacklo_epi16(r[2], r[3]);
        let a3 = _mm_unpackhi_epi16(r[2], r[3]);
        let a4 = _mm_unpacklo_epi16(r[4], r[5]);
        let a5 = _mm_unpackhi_epi16(r[4], r[5]);
        let a6 = _mm_unpacklo_epi16(r[6], r[7]);
        let a7 = _mm_unpackhi_epi16(r[6], r[7]);
        let b0 = _mm_unpacklo_epi32(a0, a2);
        let b1 = _mm_unpackhi_epi32(a0, a2);
        let b2 = _mm_unpacklo_epi32(a1, a3);
        let b3 = _mm_unpackhi_epi32(a1, a3);
        let b4 = _mm_unpacklo_epi32(a4, a6);
        let b5 = _mm_unpackhi_epi32(a4, a6);
        let b6 = _mm_unpacklo_epi32(a5, a7);
        let b7 = _mm_unpackhi_epi32(a5, a7);
        let out = [
            _mm_unpacklo_epi64(b0, b4),
            _mm_unpackhi_epi64(b0, b4),
            _mm_unpacklo_epi64(b1, b5),
            _mm_unpackhi_epi64(b1, b5),
            _mm_unpacklo_epi64(b2, b6),
            _mm_unpackhi_epi64(b2, b6),
            _mm_unpacklo_epi64(b3, b7),
            _mm_unpackhi_epi64(b3, b7),
        ];
        for (j, v) in out.iter().enumerate() {
            _mm_storeu_si128(dst.add(j * ld_dst) as *mut __m128i, *v);
        }
    }
}

/// The inputs whose score passes a threshold, ascending: `out = [i : |x_i| · w_i > t]`
/// (`w` None: `|x_i| > t`), a calibrated input mask's selection (NaN scores are never
/// kept). On AVX-512 sixteen inputs per compare, their indices compressed into `out`;
/// the same comparisons as the scalar loop, so the same list.
pub fn indices_above(x: &[f32], w: Option<&[f32]>, t: f32, out: &mut Vec<u32>) {
    if let Some(w) = w {
        assert_eq!(w.len(), x.len(), "indices_above: weights");
    }
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if super::dot::isa() == super::dot::Isa::Avx512 {
        out.resize(x.len(), 0);
        // SAFETY: isa() checked AVX-512F; `out` holds x.len() slots, at least the
        // number of kept inputs; `w` (when given) is as long as `x` (asserted).
        let kept = unsafe { indices_above_avx512(x, w, t, out) };
        out.truncate(kept);
        return;
    }
    indices_above_scalar(x, w, t, out);
}

/// Scalar [`indices_above`].
pub fn indices_above_scalar(x: &[f32], w: Option<&[f32]>, t: f32, out: &mut Vec<u32>) {
    out.clear();
    match w {
        Some(w) => out.extend(
            x.iter()
                .zip(w)
                .enumerate()
                .filter(|&(_, (&v, &c))| v.abs() * c > t)
                .map(|(i, _)| i as u32),
        ),
        None => out.extend(
            x.iter()
                .enumerate()
                .filter(|&(_, &v)| v.abs() > t)
                .map(|(i, _)| i as u32),
        ),
    }
}

/// [`indices_above`] on AVX-512; returns how many indices it wrote to `out`.
///
/// # Safety
/// AVX-512F; `out.len() >= x.len()`, and `w` as long as `x` when given.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn indices_above_avx512(x: &[f32], w: Option<&[f32]>, t: f32, out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len();
    let tv = _mm512_set1_ps(t);
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let sixteen = _mm512_set1_epi32(16);
    let mut kept = 0;
    let mut i = 0;
    while i < n {
        let lanes = super::ops::lanes16(n - i);
        // SAFETY: the loads are masked to the n - i valid lanes of x (and w); the
        // compressed store writes popcount(m) <= n - i slots at out[kept..], and
        // kept + (n - i) <= n <= out.len() because kept <= i.
        unsafe {
            let mut s = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, x.as_ptr().add(i)));
            if let Some(w) = w {
                s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes, w.as_ptr().add(i)));
            }
            let m = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(lanes, s, tv);
            _mm512_mask_compressstoreu_epi32(out.as_mut_ptr().add(kept) as *mut _, m, idx);
            kept += m.count_ones() as usize;
        }
        idx = _mm512_add_epi32(idx, sixteen);
        i += 16;
    }
    kept
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

    /// `w` ([rows, out_dim]) quantized to Q8_0 along its rows (out_dim whole blocks, or
    /// nothing), and its dequantized values.
    fn q8_0_of(w: &[f32], out_dim: usize) -> (Vec<u8>, Vec<f32>) {
        if !out_dim.is_multiple_of(QK) {
            return (Vec::new(), Vec::new());
        }
        let mut q = vec![0u8; QFormat::Q8_0.row_bytes(w.len())];
        crate::quant::quantize(QFormat::Q8_0, w, &mut q);
        let mut f = vec![0f32; w.len()];
        crate::quant::dequantize(QFormat::Q8_0.source(), &q, &mut f);
        (q, f)
    }

    /// Every third input dropped plus a run at the start: kept indices ascending.
    fn kept_of(in_dim: usize, s: usize) -> Vec<u32> {
        (0..in_dim as u32)
            .filter(|&i| i >= (s as u32).min(5) && i % 3 != 1)
            .collect()
    }

    #[test]
    fn sparse_matvec_equals_masked_reference_on_odd_sizes() {
        let sizes = [(1, 1), (7, 5), (33, 17), (64, 48), (129, 257), (577, 95)];
        // Q8_0 rows are whole 32-output blocks; 1, 5 and 7 kept inputs end the 4-row
        // passes of the AVX-512 kernel at every remainder.
        let q8_sizes = [(1, 32), (6, 64), (7, 96), (33, 32), (129, 288), (577, 64)];
        for (in_dim, out_dim) in sizes.into_iter().chain(q8_sizes) {
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
            let (wq, wqf) = q8_0_of(&w, out_dim);
            let mut cases: Vec<(WeightView<'_>, &[f32], &str)> = vec![
                (WeightView::F32(&w), &w, "f32"),
                (WeightView::Bf16(&wb), &wbf, "bf16"),
                (WeightView::F16(&wh), &whf, "f16"),
            ];
            if out_dim % 32 == 0 {
                cases.push((WeightView::Quant(QFormat::Q8_0, &wq), &wqf, "q8_0"));
            }
            for threads in 1..=3 {
                let pool = ThreadPool::new(threads);
                let mut s = InputMajorScratch::default();
                for &(view, widened, name) in &cases {
                    // bf16 on AVX-512 BF16 multiplies x rounded to bf16 (as the row-major
                    // decode does).
                    let round = name == "bf16" && crate::kernels::dot::has_avx512_bf16();
                    let masked: Vec<f32> = if round {
                        masked
                            .iter()
                            .map(|&v| bf16_to_f32(f32_to_bf16(v)))
                            .collect()
                    } else {
                        masked.clone()
                    };
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
    fn a_bf16_group_equals_each_matrix_alone_at_1_to_3_threads() {
        // q/k/v-like: one input of odd size, three output sizes (one past a 32 chunk).
        let in_dim = 77;
        let outs_dims = [96, 33, 33];
        let ws: Vec<Vec<u16>> = outs_dims
            .iter()
            .enumerate()
            .map(|(m, &o)| {
                data(in_dim * o, 40 + m as u64)
                    .iter()
                    .map(|&v| f32_to_bf16(v))
                    .collect()
            })
            .collect();
        let x = data(in_dim, 3);
        let kept: Vec<u32> = (0..in_dim as u32).filter(|i| i % 3 != 1).collect();
        let views: Vec<(WeightView<'_>, usize)> = ws
            .iter()
            .zip(outs_dims)
            .map(|(w, o)| (WeightView::Bf16(w), o))
            .collect();
        let mut s = InputMajorScratch::default();
        for pool in [1, 2, 3].map(ThreadPool::new) {
            for kept in [None, Some(&kept[..]), Some(&kept[..1])] {
                let want: Vec<Vec<f32>> = views
                    .iter()
                    .map(|&(w, o)| {
                        let mut y = vec![f32::NAN; o];
                        matvec_input_major(&pool, w, in_dim, o, &x, kept, &mut y, &mut s);
                        y
                    })
                    .collect();
                let mut got: Vec<Vec<f32>> = outs_dims.iter().map(|&o| vec![f32::NAN; o]).collect();
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| &mut v[..]).collect();
                let done =
                    matvec_input_major_group(&pool, &views, in_dim, &x, kept, &mut outs, &mut s);
                // The grouped kernel is the bf16 one (AVX-512 BF16); elsewhere the caller
                // runs each matrix alone.
                assert_eq!(done, crate::kernels::dot::has_avx512_bf16());
                if done {
                    assert_eq!(
                        got,
                        want,
                        "{} threads, kept {:?}",
                        pool.threads(),
                        kept.map(<[u32]>::len)
                    );
                }
            }
        }
        // Other weights are left to the caller.
        let f: Vec<f32> = data(in_dim * 32, 9);
        let mut y = [0f32; 32];
        assert!(!matvec_input_major_group(
            &ThreadPool::new(2),
            &[(WeightView::F32(&f), 32)],
            in_dim,
            &x,
            None,
            &mut [&mut y[..]],
            &mut s
        ));
    }

    #[test]
    fn u16_transpose_matches_scalar_on_odd_sizes() {
        for (rows, cols) in [(1, 1), (7, 9), (8, 8), (17, 33), (64, 130), (129, 71)] {
            let w: Vec<u16> = (0..rows * cols).map(|v| (v * 7 + 3) as u16).collect();
            for (o0, o1) in [(0, cols), (cols / 3, cols), (1.min(cols), cols / 2 + 1)] {
                let (mut a, mut b) = (vec![9u16; 5], Vec::new());
                transpose_cols_u16(&w, cols, rows, o0, o1, &mut a);
                transpose_cols(&w, cols, rows, o0, o1, &mut b);
                assert_eq!(a, b, "{rows}x{cols} cols {o0}..{o1}");
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
        let sizes = [(7, 5, 2), (33, 70, 3), (64, 129, 17), (130, 65, 20)];
        let q8_sizes = [(7, 32, 2), (33, 96, 3), (130, 160, 17)];
        for (in_dim, out_dim, n) in sizes.into_iter().chain(q8_sizes) {
            let w = data(in_dim * out_dim, 5);
            let x = data(n * in_dim, 6);
            let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let wh: Vec<u16> = w.iter().map(|&v| f32_to_f16(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
            let whf: Vec<f32> = wh.iter().map(|&b| f16_to_f32(b)).collect();
            let (wq, wqf) = q8_0_of(&w, out_dim);
            // The bf16 GEMM rounds x to bf16 (as the row-major prefill does).
            let bf16_x = crate::kernels::gemm_avx512::has_bf16();
            let mut cases: Vec<(WeightView<'_>, &[f32], bool, &str)> = vec![
                (WeightView::F32(&w), &w, false, "f32"),
                (WeightView::Bf16(&wb), &wbf, bf16_x, "bf16"),
                (WeightView::F16(&wh), &whf, false, "f16"),
            ];
            if out_dim % 32 == 0 {
                cases.push((WeightView::Quant(QFormat::Q8_0, &wq), &wqf, false, "q8_0"));
            }
            for threads in 1..=3 {
                let pool = ThreadPool::new(threads);
                for &(view, widened, round_x, name) in &cases {
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

    #[test]
    fn indices_above_equals_the_scalar_selection_on_odd_sizes() {
        for n in [1, 15, 16, 17, 33, 576, 1537] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
                .collect();
            let mut x = x;
            x[n / 2] = f32::NAN;
            let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 13) as f32 / 7.0).collect();
            for t in [-1.0, 0.0, 1.0, 2.5, 1e9] {
                for w in [None, Some(&w[..])] {
                    let (mut got, mut want) = (Vec::new(), Vec::new());
                    indices_above(&x, w, t, &mut got);
                    indices_above_scalar(&x, w, t, &mut want);
                    assert_eq!(got, want, "n {n} t {t} weighted {}", w.is_some());
                    assert!(!want.contains(&((n / 2) as u32)), "NaN kept");
                }
            }
        }
    }
}
