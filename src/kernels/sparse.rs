//! Sparse MLP kernels: `out = sum over chosen neurons i of silu(g_i)·u_i · down_row_i`,
//! with `g_i = gate_row_i·h`, `u_i = up_row_i·h`, over f32 or bf16 weight rows, split by
//! neurons over the pool (each thread accumulates into a private `[hidden]` buffer; the
//! caller sums them). Two ways to address rows: compact cached slots (contiguous, the
//! hardware prefetcher suffices) or a gather by neuron index from the full matrices (with
//! software prefetch of the rows a few neurons ahead). Scalar references for the tests.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::WeightView;
use super::dot::{Isa, bf16_to_f32, dot_f32_scalar, isa};
use super::ops::silu;
use super::pool::{ThreadPool, split_range};

/// A set of rows inside a flat weight buffer: row `r` starts at `r * stride + offset`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub view: WeightView<'a>,
    pub stride: usize,
    pub offset: usize,
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
    #[inline]
    fn dot(&self, r: usize, x: &[f32]) -> f32 {
        let s = self.start(r);
        match self.view {
            WeightView::F32(w) => super::dot::dot_f32(&w[s..s + x.len()], x),
            WeightView::Bf16(w) => super::dot::dot_bf16(&w[s..s + x.len()], x),
        }
    }
    #[inline]
    fn axpy(&self, r: usize, a: f32, out: &mut [f64]) {
        let s = self.start(r);
        match self.view {
            WeightView::F32(w) => axpy_f32(a, &w[s..s + out.len()], out),
            WeightView::Bf16(w) => axpy_bf16(a, &w[s..s + out.len()], out),
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
        }
    }
    /// Prefetches the `len` elements of row `r` into L1 (a hint: no effect on results).
    #[inline]
    fn prefetch(&self, r: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let s = self.start(r);
            let (ptr, bytes) = match self.view {
                WeightView::F32(w) => (w[s..s + len].as_ptr() as *const i8, len * 4),
                WeightView::Bf16(w) => (w[s..s + len].as_ptr() as *const i8, len * 2),
            };
            let mut off = 0;
            while off < bytes {
                // SAFETY: `ptr + off` lies inside the row just bounds-checked by slicing;
                // a prefetch never faults and does not change memory.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.add(off)) };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r, len);
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
    /// Item j is row `idx[j]` (gather from the full matrices).
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

/// How many items ahead the gather prefetches: far enough to cover DRAM latency at one
/// neuron's worth of work (3 rows), near enough to stay in L1.
const PREFETCH_AHEAD: usize = 2;

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

/// `out = sum_j a_j · down[row_j]`. h: [hidden], out: [hidden]. `scratch` holds the
/// per-thread accumulators (resized here).
///
/// Accumulation is in f64, so the result does not depend on the order of the items or
/// their split over threads (up to f64 rounding, far below f32's): cached slots, in
/// whatever order paired replacement left them, give the same f32 output as a gather in
/// neuron order. That keeps masks identical between batched evaluation and token-by-token
/// decoding, where an f32 rounding difference could flip a neuron at the threshold and
/// make the two diverge.
pub fn sparse_mlp(
    pool: &ThreadPool,
    items: Items<'_>,
    act: Activation<'_>,
    down: Strided<'_>,
    h: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f64>,
) {
    let hidden = out.len();
    let n = items.len();
    if let Activation::Given(a) = act {
        assert_eq!(a.len(), n, "sparse_mlp: one activation per item");
    }
    let threads = pool.threads().min(n.div_ceil(8)).max(1);
    scratch.clear();
    scratch.resize(threads * hidden, 0.0);
    let acc = SharedMut(scratch.as_mut_ptr());
    let gather = matches!(items, Items::Gather(_));
    pool.run(&|t, nt| {
        if t >= threads {
            return;
        }
        let range = split_range(n, 4, t, threads.min(nt));
        // SAFETY: thread t writes only scratch[t*hidden..(t+1)*hidden], which exists
        // (resized to threads*hidden) and outlives the run.
        let acc = unsafe { std::slice::from_raw_parts_mut(acc.ptr().add(t * hidden), hidden) };
        for j in range.clone() {
            if gather && j + PREFETCH_AHEAD < range.end {
                let r = items.row(j + PREFETCH_AHEAD);
                if let Activation::Compute { gate, up } = act {
                    gate.prefetch(r, h.len());
                    up.prefetch(r, h.len());
                }
                down.prefetch(r, hidden);
            }
            let r = items.row(j);
            let a = match act {
                Activation::Compute { gate, up } => silu(gate.dot(r, h)) * up.dot(r, h),
                Activation::Given(a) => a[j],
            };
            down.axpy(r, a, acc);
        }
    });
    for (k, o) in out.iter_mut().enumerate() {
        *o = scratch.iter().skip(k).step_by(hidden).sum::<f64>() as f32;
    }
}

/// Scalar reference for [`sparse_mlp`].
pub fn sparse_mlp_scalar(
    items: Items<'_>,
    act: Activation<'_>,
    down: Strided<'_>,
    h: &[f32],
    out: &mut [f32],
) {
    let hidden = out.len();
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
/// cascade scorer), split over the pool, with prefetch ahead.
pub fn gather_gate_up(
    pool: &ThreadPool,
    gate: Strided<'_>,
    up: Strided<'_>,
    idx: &[u32],
    h: &[f32],
    g: &mut [f32],
    u: &mut [f32],
) {
    assert!(g.len() == idx.len() && u.len() == idx.len());
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
            g[k] = gate.dot(r, h);
            u[k] = up.dot(r, h);
        }
    });
}

/// Scalar reference: `y += a·w`, accumulated in f64.
pub fn axpy_f32_scalar(a: f32, w: &[f32], y: &mut [f64]) {
    for (o, &v) in y.iter_mut().zip(w) {
        *o += a as f64 * v as f64;
    }
}

/// Scalar reference: `y += a·w` with `w` in bf16, accumulated in f64.
pub fn axpy_bf16_scalar(a: f32, w: &[u16], y: &mut [f64]) {
    for (o, &v) in y.iter_mut().zip(w) {
        *o += a as f64 * bf16_to_f32(v) as f64;
    }
}

/// `y += a·w` into an f64 accumulator, fastest available version. Every version gives
/// bit-identical results: the product of two f32 values is exact in f64, so only the
/// (single) rounding of each add remains, the same with or without FMA.
#[inline]
pub fn axpy_f32(a: f32, w: &[f32], y: &mut [f64]) {
    assert_eq!(w.len(), y.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX-512F/BW.
        Isa::Avx512 => unsafe { axpy_f32_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { axpy_f32_avx2(a, w, y) },
        _ => axpy_f32_scalar(a, w, y),
    }
}

/// `y += a·w` with `w` in bf16 into an f64 accumulator, fastest available version.
#[inline]
pub fn axpy_bf16(a: f32, w: &[u16], y: &mut [f64]) {
    assert_eq!(w.len(), y.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX-512F/BW.
        Isa::Avx512 => unsafe { axpy_bf16_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { axpy_bf16_avx2(a, w, y) },
        _ => axpy_bf16_scalar(a, w, y),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_f32_avx512(a: f32, w: &[f32], y: &mut [f64]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_pd(a as f64);
    let mut i = 0;
    // SAFETY: full vectors at i + 8 <= n by the loop bound; the tail is scalar.
    unsafe {
        while i + 8 <= n {
            let wv = _mm512_cvtps_pd(_mm256_loadu_ps(pw.add(i)));
            _mm512_storeu_pd(
                py.add(i),
                _mm512_fmadd_pd(va, wv, _mm512_loadu_pd(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) += a as f64 * *pw.add(i) as f64;
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn axpy_bf16_avx512(a: f32, w: &[u16], y: &mut [f64]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_pd(a as f64);
    let mut i = 0;
    // SAFETY: every access covers 16 elements at i + 16 <= n (loop bound); the tail is scalar.
    unsafe {
        while i + 16 <= n {
            let raw = _mm256_loadu_si256(pw.add(i) as *const __m256i);
            let wv = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)));
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(wv));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(wv),
            )));
            _mm512_storeu_pd(
                py.add(i),
                _mm512_fmadd_pd(va, lo, _mm512_loadu_pd(py.add(i))),
            );
            _mm512_storeu_pd(
                py.add(i + 8),
                _mm512_fmadd_pd(va, hi, _mm512_loadu_pd(py.add(i + 8))),
            );
            i += 16;
        }
        while i < n {
            *py.add(i) += a as f64 * bf16_to_f32(*pw.add(i)) as f64;
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_f32_avx2(a: f32, w: &[f32], y: &mut [f64]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_pd(a as f64);
    let mut i = 0;
    // SAFETY: every access covers 4 elements at i + 4 <= n; the tail is scalar.
    unsafe {
        while i + 4 <= n {
            let wv = _mm256_cvtps_pd(_mm_loadu_ps(pw.add(i)));
            _mm256_storeu_pd(
                py.add(i),
                _mm256_fmadd_pd(va, wv, _mm256_loadu_pd(py.add(i))),
            );
            i += 4;
        }
        while i < n {
            *py.add(i) += a as f64 * *pw.add(i) as f64;
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_bf16_avx2(a: f32, w: &[u16], y: &mut [f64]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_pd(a as f64);
    let mut i = 0;
    // SAFETY: every access covers 4 elements at i + 4 <= n; the tail is scalar.
    unsafe {
        while i + 4 <= n {
            let raw = _mm_loadl_epi64(pw.add(i) as *const __m128i);
            let wf = _mm_castsi128_ps(_mm_slli_epi32::<16>(_mm_cvtepu16_epi32(raw)));
            let wv = _mm256_cvtps_pd(wf);
            _mm256_storeu_pd(
                py.add(i),
                _mm256_fmadd_pd(va, wv, _mm256_loadu_pd(py.add(i))),
            );
            i += 4;
        }
        while i < n {
            *py.add(i) += a as f64 * bf16_to_f32(*pw.add(i)) as f64;
            i += 1;
        }
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
            let y0: Vec<f64> = data(n, 4).iter().map(|&v| v as f64).collect();
            let (mut a, mut b) = (y0.clone(), y0.clone());
            axpy_f32(0.7, &w, &mut a);
            axpy_f32_scalar(0.7, &w, &mut b);
            assert_eq!(a, b, "axpy f32 n={n}: bit-identical");
            let (mut a, mut b) = (y0.clone(), y0.clone());
            axpy_bf16(-1.3, &wb, &mut a);
            axpy_bf16_scalar(-1.3, &wb, &mut b);
            assert_eq!(a, b, "axpy bf16 n={n}: bit-identical");
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
                    gather_gate_up(&pool, g, u, &idx, &h, &mut gg, &mut uu);
                    let mut row = vec![0f32; hidden];
                    for (k, &r) in idx.iter().enumerate() {
                        g.row_f32(r as usize, &mut row);
                        let want = dot_f32_scalar(&row, &h);
                        assert!((gg[k] - want).abs() < 1e-5 * (1.0 + want.abs()));
                        u.row_f32(r as usize, &mut row);
                        let want = dot_f32_scalar(&row, &h);
                        assert!((uu[k] - want).abs() < 1e-5 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn output_does_not_depend_on_item_order_or_threads() {
        let (hidden, inter) = (37, 300);
        let gate = data(inter * hidden, 1);
        let up = data(inter * hidden, 2);
        let down_t = data(inter * hidden, 3);
        let h = data(hidden, 4);
        let idx: Vec<u32> = (0..inter as u32).filter(|i| i % 5 != 2).collect();
        let mut rev = idx.clone();
        rev.reverse();
        rev.rotate_left(17);
        let g = Strided::matrix(WeightView::F32(&gate), hidden);
        let u = Strided::matrix(WeightView::F32(&up), hidden);
        let d = Strided::matrix(WeightView::F32(&down_t), hidden);
        let mut outs = Vec::new();
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for order in [&idx, &rev] {
                let mut out = vec![0f32; hidden];
                let act = Activation::Compute { gate: g, up: u };
                sparse_mlp(
                    &pool,
                    Items::Gather(order),
                    act,
                    d,
                    &h,
                    &mut out,
                    &mut Vec::new(),
                );
                outs.push(out);
            }
        }
        assert!(
            outs.windows(2).all(|w| w[0] == w[1]),
            "bit-identical across orders and splits"
        );
    }
}
