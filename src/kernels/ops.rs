//! Element-wise and per-vector operations of the forward pass: RMSNorm, RoPE, softmax,
//! SiLU-times-up, the residual add.
//!
//! Each has a scalar reference (`*_scalar`) and AVX-512 / AVX2+FMA versions picked at run
//! time by [`isa`]; the row-wise ones also have drivers (`*_rows`, [`silu_mul_par`]) that
//! split the rows of a large batch over the thread pool (below `PAR_MIN_ELEMS` elements
//! they run on the calling thread: a pool job costs more than it saves there).

use std::ops::Range;

use super::SharedMut;
use super::dot::{Isa, isa};
use super::pool::ThreadPool;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

// ---------------------------------------------------------------------------------------
// RMSNorm

/// Scalar reference: `out = x / sqrt(mean(x^2) + eps) * weight`. x, weight, out: [n].
/// How many of `v` are at least `t`: the counting step of a selection by bisection
/// ([`crate::sparse::threshold::select_top_k`]); AVX-512 where the CPU has it (the same
/// loop, vectorised 16 lanes wide by the compiler), else the portable loop.
pub fn count_at_least(v: &[u32], t: u32) -> usize {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: isa() checked AVX-512F/BW; the function only reads `v`.
        return unsafe { count_at_least_avx512(v, t) };
    }
    count_at_least_scalar(v, t)
}

/// The indices of `v`'s elements at least `t`, ascending, into `out` (cleared first):
/// AVX-512 compress-stores where the CPU has them.
pub fn indices_at_least(v: &[u32], t: u32, out: &mut Vec<u32>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        out.resize(v.len(), 0);
        // SAFETY: isa() checked AVX-512F; `out` holds v.len() slots, at least the number
        // of indices written.
        let kept = unsafe { indices_at_least_avx512(v, t, out) };
        out.truncate(kept);
        return;
    }
    out.extend((0..v.len() as u32).filter(|&i| v[i as usize] >= t));
}

/// # Safety
/// AVX-512F; `out.len() >= v.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn indices_at_least_avx512(v: &[u32], t: u32, out: &mut [u32]) -> usize {
    let n = v.len();
    let tv = _mm512_set1_epi32(t as i32);
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let sixteen = _mm512_set1_epi32(16);
    let (mut kept, mut i) = (0, 0);
    while i < n {
        let lanes = lanes16(n - i);
        // SAFETY: the load is masked to the n - i valid lanes; the compressed store
        // writes popcount(m) <= n - i slots at out[kept..], and kept <= i.
        unsafe {
            let x = _mm512_maskz_loadu_epi32(lanes, v.as_ptr().add(i) as *const i32);
            let m = _mm512_mask_cmpge_epu32_mask(lanes, x, tv);
            _mm512_mask_compressstoreu_epi32(out.as_mut_ptr().add(kept) as *mut _, m, idx);
            kept += m.count_ones() as usize;
        }
        idx = _mm512_add_epi32(idx, sixteen);
        i += 16;
    }
    kept
}

#[inline(always)]
fn count_at_least_scalar(v: &[u32], t: u32) -> usize {
    v.iter().map(|&b| u32::from(b >= t)).sum::<u32>() as usize
}

/// # Safety
/// AVX-512F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn count_at_least_avx512(v: &[u32], t: u32) -> usize {
    count_at_least_scalar(v, t)
}

pub fn rmsnorm_scalar(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == weight.len() && out.len() == x.len());
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * weight`. x, weight, out: [n].
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == weight.len() && out.len() == x.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX-512F/BW/VL; the lengths are equal (asserted).
        Isa::Avx512 => unsafe { rmsnorm_avx512(x, weight, eps, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are equal (asserted).
        Isa::Avx2 => unsafe { rmsnorm_avx2(x, weight, eps, out) },
        _ => rmsnorm_scalar(x, weight, eps, out),
    }
}

/// The mask of the first `min(left, 16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn lanes16(left: usize) -> __mmask16 {
    if left >= 16 {
        0xFFFF
    } else {
        ((1u32 << left) - 1) as u16
    }
}

/// # Safety
/// AVX-512F/BW/VL; `weight` and `out` at least as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rmsnorm_avx512(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let (px, pw, po) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
    // SAFETY: full loads stay below n (loop bounds), tails are masked to the valid lanes;
    // weight and out hold n floats (the caller's contract).
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm512_loadu_ps(px.add(i + 16 * j));
                *a = _mm512_fmadd_ps(v, v, *a);
            }
            i += 64;
        }
        while i < n {
            let v = _mm512_maskz_loadu_ps(lanes16(n - i), px.add(i));
            acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
            i += 16;
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let ss = _mm512_reduce_add_ps(sum) / n as f32;
        let scale = _mm512_set1_ps(1.0 / (ss + eps).sqrt());
        let mut i = 0;
        while i < n {
            let m = lanes16(n - i);
            let v = _mm512_maskz_loadu_ps(m, px.add(i));
            let w = _mm512_maskz_loadu_ps(m, pw.add(i));
            _mm512_mask_storeu_ps(po.add(i), m, _mm512_mul_ps(_mm512_mul_ps(v, scale), w));
            i += 16;
        }
    }
}

/// Sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// Max of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hmax256(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// # Safety
/// AVX2 and FMA; `weight` and `out` at least as long as `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rmsnorm_avx2(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let body = n / 8 * 8;
    let (px, pw, po) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
    // SAFETY: vector loads/stores touch 8 floats below `body` <= n; weight and out hold
    // n floats (the caller's contract).
    let s = unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= body {
            for (j, a) in acc.iter_mut().enumerate() {
                let v = _mm256_loadu_ps(px.add(i + 8 * j));
                *a = _mm256_fmadd_ps(v, v, *a);
            }
            i += 32;
        }
        while i < body {
            let v = _mm256_loadu_ps(px.add(i));
            acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut ss = hsum256(sum);
        for &v in &x[body..] {
            ss += v * v;
        }
        let s = 1.0 / (ss / n as f32 + eps).sqrt();
        let scale = _mm256_set1_ps(s);
        let mut i = 0;
        while i < body {
            let v = _mm256_loadu_ps(px.add(i));
            let w = _mm256_loadu_ps(pw.add(i));
            _mm256_storeu_ps(po.add(i), _mm256_mul_ps(_mm256_mul_ps(v, scale), w));
            i += 8;
        }
        s
    };
    for ((o, &v), &w) in out[body..n].iter_mut().zip(&x[body..]).zip(&weight[body..]) {
        *o = v * s * w;
    }
}

/// Row-wise RMSNorm of `x` ([rows, dim], dim = weight.len()) into `out`, rows split over
/// the pool.
pub fn rmsnorm_rows(pool: &ThreadPool, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    assert!(dim > 0 && x.len() == out.len() && x.len().is_multiple_of(dim));
    let dst = SharedMut(out.as_mut_ptr());
    par_rows(pool, x.len() / dim, dim, &|rows| {
        // SAFETY: `par_rows` hands out disjoint row ranges inside 0..rows, and `out`
        // ([rows, dim]) outlives the call.
        let out = unsafe { rows_mut(dst, &rows, dim) };
        let x = &x[rows.start * dim..rows.end * dim];
        for (x, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            rmsnorm(x, weight, eps, o);
        }
    });
}

/// The residual add fused with the next norm: `x += delta`, then `out = rmsnorm(x)`, row
/// by row (x, delta, out: [rows, dim]), rows split over the pool.
pub fn add_rmsnorm_rows(
    pool: &ThreadPool,
    x: &mut [f32],
    delta: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let dim = weight.len();
    assert!(dim > 0 && x.len() == out.len() && x.len() == delta.len());
    assert!(x.len().is_multiple_of(dim));
    let (xs, dst) = (SharedMut(x.as_mut_ptr()), SharedMut(out.as_mut_ptr()));
    par_rows(pool, x.len() / dim, dim, &|rows| {
        // SAFETY: disjoint row ranges (par_rows) of two distinct buffers of [rows, dim]
        // that outlive the call.
        let (x, out) = unsafe { (rows_mut(xs, &rows, dim), rows_mut(dst, &rows, dim)) };
        let delta = &delta[rows.start * dim..rows.end * dim];
        add_assign(x, delta);
        for (x, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            rmsnorm(x, weight, eps, o);
        }
    });
}

/// Rows `rows` of a row-major buffer with `dim` columns.
///
/// # Safety
/// `p` points to a live buffer holding at least `rows.end * dim` floats, and no one else
/// accesses these rows while the slice lives.
unsafe fn rows_mut<'a>(p: SharedMut, rows: &Range<usize>, dim: usize) -> &'a mut [f32] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(p.get().add(rows.start * dim), rows.len() * dim) }
}

// ---------------------------------------------------------------------------------------
// RoPE

/// RoPE's cos and sin for positions `start..start + n`, expanded to one value per element
/// of a head, so that the rotation of each head is `x' = x * cos + partner(x) * sin` with
/// `partner(x)[j] = x[j ^ 1]` (interleaved pairs, GGUF's layout) or `x[(j + d/2) % d]`
/// (halves, HuggingFace's); the sign of the sine is folded into the table.
///
/// The angles are computed once per forward call (not per layer and head), in f32 as
/// transformers does (`inv_freq @ position` in f32).
#[derive(Default)]
pub struct RopeTable {
    head_dim: usize,
    interleaved: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(inv_freq: &[f32], start: usize, n: usize, interleaved: bool) -> RopeTable {
        let mut t = RopeTable::default();
        t.fill(inv_freq, start, n, interleaved);
        t
    }

    /// Refills the table (keeping its buffers) for positions `start..start + n`.
    pub fn fill(&mut self, inv_freq: &[f32], start: usize, n: usize, interleaved: bool) {
        self.fill_positions(inv_freq, start..start + n, interleaved);
    }

    /// Refills the table for `positions`, one row each (a batch of sequences: each
    /// token at its own position).
    pub fn fill_positions(
        &mut self,
        inv_freq: &[f32],
        positions: impl ExactSizeIterator<Item = usize>,
        interleaved: bool,
    ) {
        let half = inv_freq.len();
        let d = 2 * half;
        let n = positions.len();
        self.head_dim = d;
        self.interleaved = interleaved;
        self.cos.resize(n * d, 0.0);
        self.sin.resize(n * d, 0.0);
        for (t, pos) in positions.enumerate() {
            let (c, s) = (
                &mut self.cos[t * d..(t + 1) * d],
                &mut self.sin[t * d..(t + 1) * d],
            );
            for (i, &f) in inv_freq.iter().enumerate() {
                let a = pos as f32 * f;
                let (sin, cos) = (a.sin(), a.cos());
                let (lo, hi) = if interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                c[lo] = cos;
                c[hi] = cos;
                s[lo] = -sin;
                s[hi] = sin;
            }
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.cos.len().checked_div(self.head_dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotates every head of `x` ([heads * head_dim]) for the table's `t`-th position.
    pub fn apply(&self, t: usize, x: &mut [f32]) {
        let d = self.head_dim;
        assert!(t < self.len() && x.len().is_multiple_of(d));
        let (c, s) = (&self.cos[t * d..(t + 1) * d], &self.sin[t * d..(t + 1) * d]);
        // The SIMD versions move whole vectors: pairs never straddle one (interleaved, d
        // even) and each half is whole vectors (halves).
        let fits = |w: usize| {
            if self.interleaved {
                d.is_multiple_of(w)
            } else {
                (d / 2).is_multiple_of(w)
            }
        };
        match isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if fits(16) => {
                // SAFETY: isa() checked AVX-512F/BW/VL; c, s hold d floats, x whole heads
                // (asserted), and `fits` makes every vector access whole.
                unsafe { rope_avx512(x, c, s, d, self.interleaved) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 if fits(8) => {
                // SAFETY: isa() checked AVX2 and FMA (implied by AVX-512 here); as above.
                unsafe { rope_avx2(x, c, s, d, self.interleaved) }
            }
            _ => rope_apply_scalar(x, c, s, d, self.interleaved),
        }
    }
}

/// Scalar reference of [`RopeTable::apply`]: the classic pairwise rotation, bit for bit
/// (`x0 c + x1 (-s)` rounds as `x0 c - x1 s`).
pub fn rope_apply_scalar(x: &mut [f32], c: &[f32], s: &[f32], d: usize, interleaved: bool) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c[a] + x1 * s[a];
            head[b] = x1 * c[b] + x0 * s[b];
        }
    }
}

/// # Safety
/// AVX-512F/BW/VL; x holds whole heads of d; c, s hold d floats; d % 16 == 0
/// (interleaved) or (d / 2) % 16 == 0 (halves).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rope_avx512(x: &mut [f32], c: &[f32], s: &[f32], d: usize, interleaved: bool) {
    let half = d / 2;
    let (pc, ps) = (c.as_ptr(), s.as_ptr());
    for head in x.chunks_exact_mut(d) {
        let p = head.as_mut_ptr();
        // SAFETY: every access is a whole vector inside the head or the tables (the
        // caller's contract on d).
        unsafe {
            if interleaved {
                for j in (0..d).step_by(16) {
                    let v = _mm512_loadu_ps(p.add(j));
                    let sw = _mm512_permute_ps::<0b10_11_00_01>(v);
                    let r = _mm512_fmadd_ps(
                        v,
                        _mm512_loadu_ps(pc.add(j)),
                        _mm512_mul_ps(sw, _mm512_loadu_ps(ps.add(j))),
                    );
                    _mm512_storeu_ps(p.add(j), r);
                }
            } else {
                for j in (0..half).step_by(16) {
                    let lo = _mm512_loadu_ps(p.add(j));
                    let hi = _mm512_loadu_ps(p.add(j + half));
                    let l = _mm512_fmadd_ps(
                        lo,
                        _mm512_loadu_ps(pc.add(j)),
                        _mm512_mul_ps(hi, _mm512_loadu_ps(ps.add(j))),
                    );
                    let h = _mm512_fmadd_ps(
                        hi,
                        _mm512_loadu_ps(pc.add(j + half)),
                        _mm512_mul_ps(lo, _mm512_loadu_ps(ps.add(j + half))),
                    );
                    _mm512_storeu_ps(p.add(j), l);
                    _mm512_storeu_ps(p.add(j + half), h);
                }
            }
        }
    }
}

/// # Safety
/// AVX2 and FMA; as for [`rope_avx512`] with 8 in place of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_avx2(x: &mut [f32], c: &[f32], s: &[f32], d: usize, interleaved: bool) {
    let half = d / 2;
    let (pc, ps) = (c.as_ptr(), s.as_ptr());
    for head in x.chunks_exact_mut(d) {
        let p = head.as_mut_ptr();
        // SAFETY: every access is a whole vector inside the head or the tables (the
        // caller's contract on d).
        unsafe {
            if interleaved {
                for j in (0..d).step_by(8) {
                    let v = _mm256_loadu_ps(p.add(j));
                    let sw = _mm256_permute_ps::<0b10_11_00_01>(v);
                    let r = _mm256_fmadd_ps(
                        v,
                        _mm256_loadu_ps(pc.add(j)),
                        _mm256_mul_ps(sw, _mm256_loadu_ps(ps.add(j))),
                    );
                    _mm256_storeu_ps(p.add(j), r);
                }
            } else {
                for j in (0..half).step_by(8) {
                    let lo = _mm256_loadu_ps(p.add(j));
                    let hi = _mm256_loadu_ps(p.add(j + half));
                    let l = _mm256_fmadd_ps(
                        lo,
                        _mm256_loadu_ps(pc.add(j)),
                        _mm256_mul_ps(hi, _mm256_loadu_ps(ps.add(j))),
                    );
                    let h = _mm256_fmadd_ps(
                        hi,
                        _mm256_loadu_ps(pc.add(j + half)),
                        _mm256_mul_ps(lo, _mm256_loadu_ps(ps.add(j + half))),
                    );
                    _mm256_storeu_ps(p.add(j), l);
                    _mm256_storeu_ps(p.add(j + half), h);
                }
            }
        }
    }
}

/// Rotates the heads in `x` ([heads * head_dim]) for position `pos`.
///
/// `inv_freq`: [head_dim / 2]. `interleaved`: rotate pairs (2i, 2i+1) (GGUF's layout)
/// rather than (i, i + head_dim/2) (HuggingFace's). (One position; the forward pass
/// builds a [`RopeTable`] for all its positions at once.)
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32], interleaved: bool) {
    assert_eq!(inv_freq.len() * 2, head_dim);
    RopeTable::new(inv_freq, pos, 1, interleaved).apply(0, x);
}

/// RoPE of the queries ([n, q_dim]) and keys ([n, kv_dim]) of `n` tokens at the table's
/// positions `0..n`, tokens split over the pool.
pub fn rope_rows(pool: &ThreadPool, table: &RopeTable, q: &mut [f32], k: &mut [f32], n: usize) {
    assert!(n <= table.len() && q.len().is_multiple_of(n) && k.len().is_multiple_of(n));
    let (qd, kd) = (q.len() / n, k.len() / n);
    let (qs, ks) = (SharedMut(q.as_mut_ptr()), SharedMut(k.as_mut_ptr()));
    par_rows(pool, n, qd + kd, &|rows| {
        // SAFETY: disjoint row ranges (par_rows) of two distinct buffers of n rows that
        // outlive the call.
        let (q, k) = unsafe { (rows_mut(qs, &rows, qd), rows_mut(ks, &rows, kd)) };
        for (i, t) in rows.enumerate() {
            table.apply(t, &mut q[i * qd..(i + 1) * qd]);
            table.apply(t, &mut k[i * kd..(i + 1) * kd]);
        }
    });
}

// ---------------------------------------------------------------------------------------
// exp, softmax, SiLU

/// `exp(x)`, 16 lanes, to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-6
/// Taylor polynomial of e^r, then `vscalefps` by 2^n (which underflows to 0 below about
/// -104 and overflows to +inf above about 88.7).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
pub(crate) fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `exp(x)`, 8 lanes, as [`exp512`] with the scaling by 2^n done on the exponent bits:
/// inputs are clamped to [-87, 88] (so 2^n stays a normal number) and lanes below -87
/// return 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn exp256(x: __m256) -> __m256 {
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))
}

/// Scalar reference: in-place softmax over `x`.
pub fn softmax_scalar(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// In-place softmax over `x`.
pub fn softmax(x: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX-512F/BW/VL.
        Isa::Avx512 => unsafe { softmax_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA.
        Isa::Avx2 => unsafe { softmax_avx2(x) },
        _ => softmax_scalar(x),
    }
}

/// # Safety
/// AVX-512F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn softmax_avx512(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    // SAFETY: every access is masked to the lanes below n.
    unsafe {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..n).step_by(16) {
            let m = lanes16(n - i);
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(i)));
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let m = lanes16(n - i);
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), mx));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..n).step_by(16) {
            let m = lanes16(n - i);
            let v = _mm512_maskz_loadu_ps(m, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(v, inv));
        }
    }
}

/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    let n = x.len();
    let body = n / 8 * 8;
    let p = x.as_mut_ptr();
    // SAFETY: vector accesses touch 8 floats below `body` <= n.
    unsafe {
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(8) {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i)));
        }
        let max = x[body..].iter().copied().fold(hmax256(mx), f32::max);
        let p = x.as_mut_ptr();
        let vmax = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut s = hsum256(sum);
        for v in x[body..].iter_mut() {
            *v = (*v - max).exp();
            s += *v;
        }
        let inv = 1.0 / s;
        let p = x.as_mut_ptr();
        let vinv = _mm256_set1_ps(inv);
        for i in (0..body).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
        }
        for v in x[body..].iter_mut() {
            *v *= inv;
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Scalar reference: `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`: SwiGLU's element-wise part.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX-512F/BW/VL; the lengths are equal (asserted).
        Isa::Avx512 => unsafe { silu_mul_avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are equal (asserted).
        Isa::Avx2 => unsafe { silu_mul_avx2(gate, up) },
        _ => silu_mul_scalar(gate, up),
    }
}

/// # Safety
/// AVX-512F/BW/VL; `up` at least as long as `gate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm512_set1_ps(1.0);
    // SAFETY: every access is masked to the lanes below n; up holds n floats.
    unsafe {
        for i in (0..n).step_by(16) {
            let m = lanes16(n - i);
            let g = _mm512_maskz_loadu_ps(m, pg.add(i));
            let u = _mm512_maskz_loadu_ps(m, pu.add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(pg.add(i), m, _mm512_mul_ps(s, u));
        }
    }
}

/// # Safety
/// AVX2 and FMA; `up` at least as long as `gate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let body = n / 8 * 8;
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    // SAFETY: vector accesses touch 8 floats below `body` <= n; up holds n floats.
    unsafe {
        for i in (0..body).step_by(8) {
            let g = _mm256_loadu_ps(pg.add(i));
            let u = _mm256_loadu_ps(pu.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(s, u));
        }
    }
    silu_mul_scalar(&mut gate[body..], &up[body..]);
}

/// [`silu_mul`] with the elements split over the pool (when there are enough of them to
/// pay for waking it: a decode step's few thousand are done in place).
pub fn silu_mul_par(pool: &ThreadPool, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    if gate.len() < PAR_MIN_ELEMS {
        return silu_mul(gate, up);
    }
    let dst = SharedMut(gate.as_mut_ptr());
    pool.for_ranges(gate.len(), 256, &|r| {
        // SAFETY: disjoint element ranges (for_ranges) of `gate`, which outlives the call.
        let g = unsafe { rows_mut(dst, &r, 1) };
        silu_mul(g, &up[r]);
    });
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation), for GeGLU MLPs

/// The MLP's gate activation: `act(x·Wg^T) * (x·Wu^T)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044715;

/// GELU with the tanh approximation (PyTorch's `gelu(x, approximate="tanh")`):
/// `0.5·x·(1 + tanh(sqrt(2/pi)·(x + 0.044715·x³)))`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_COEF_A * x * x * x)).tanh())
}

/// Scalar reference: `gate[i] = gelu_tanh(gate[i]) * up[i]`.
pub fn gelu_tanh_mul_scalar(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]`: GeGLU's element-wise part. The SIMD versions
/// use `0.5·x·(1 + tanh(z)) = x / (1 + exp(-2z))` on the vector exp.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX-512F/BW/VL; the lengths are equal (asserted).
        Isa::Avx512 => unsafe { gelu_tanh_mul_avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked AVX2 and FMA; the lengths are equal (asserted).
        Isa::Avx2 => unsafe { gelu_tanh_mul_avx2(gate, up) },
        _ => gelu_tanh_mul_scalar(gate, up),
    }
}

/// # Safety
/// AVX-512F/BW/VL; `up` at least as long as `gate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gelu_tanh_mul_avx512(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let k = _mm512_set1_ps(-2.0 * SQRT_2_OVER_PI);
    let a = _mm512_set1_ps(GELU_COEF_A);
    // SAFETY: every access is masked to the lanes below n; up holds n floats.
    unsafe {
        for i in (0..n).step_by(16) {
            let m = lanes16(n - i);
            let x = _mm512_maskz_loadu_ps(m, pg.add(i));
            let u = _mm512_maskz_loadu_ps(m, pu.add(i));
            // -2z = -2·sqrt(2/pi)·x·(1 + a·x²)
            let x2 = _mm512_mul_ps(x, x);
            let z = _mm512_mul_ps(_mm512_mul_ps(k, x), _mm512_fmadd_ps(a, x2, one));
            let e = exp512(z);
            let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(pg.add(i), m, _mm512_mul_ps(s, u));
        }
    }
}

/// # Safety
/// AVX2 and FMA; `up` at least as long as `gate`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_mul_avx2(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let body = n / 8 * 8;
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let k = _mm256_set1_ps(-2.0 * SQRT_2_OVER_PI);
    let a = _mm256_set1_ps(GELU_COEF_A);
    // SAFETY: vector accesses touch 8 floats below `body` <= n; up holds n floats.
    unsafe {
        for i in (0..body).step_by(8) {
            let x = _mm256_loadu_ps(pg.add(i));
            let u = _mm256_loadu_ps(pu.add(i));
            let x2 = _mm256_mul_ps(x, x);
            let z = _mm256_mul_ps(_mm256_mul_ps(k, x), _mm256_fmadd_ps(a, x2, one));
            let e = exp256(z);
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(s, u));
        }
    }
    gelu_tanh_mul_scalar(&mut gate[body..], &up[body..]);
}

/// `gate[i] = act(gate[i]) * up[i]` for the MLP's activation, split over the pool as
/// [`silu_mul_par`].
pub fn act_mul_par(pool: &ThreadPool, act: Activation, gate: &mut [f32], up: &[f32]) {
    let f: fn(&mut [f32], &[f32]) = match act {
        Activation::Silu => silu_mul,
        Activation::GeluTanh => gelu_tanh_mul,
    };
    assert_eq!(gate.len(), up.len());
    if gate.len() < PAR_MIN_ELEMS {
        return f(gate, up);
    }
    let dst = SharedMut(gate.as_mut_ptr());
    pool.for_ranges(gate.len(), 256, &|r| {
        // SAFETY: disjoint element ranges (for_ranges) of `gate`, which outlives the call.
        let g = unsafe { rows_mut(dst, &r, 1) };
        f(g, &up[r]);
    });
}

/// RMSNorm of every head of every row of `x` ([rows, heads * d], d = `weight.len()`)
/// in place: Qwen 3's and Gemma 3's q/k norms.
pub fn rmsnorm_heads(pool: &ThreadPool, x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    assert!(d > 0 && x.len().is_multiple_of(d));
    let heads = x.len() / d;
    let dst = SharedMut(x.as_mut_ptr());
    par_rows(pool, heads, d, &|r| {
        // SAFETY: disjoint head ranges (par_rows) of `x`, which outlives the call.
        let x = unsafe { rows_mut(dst, &r, d) };
        let mut buf = vec![0f32; d];
        for head in x.chunks_exact_mut(d) {
            rmsnorm(head, weight, eps, &mut buf);
            head.copy_from_slice(&buf);
        }
    });
}

/// Fewer elements than this (about 20 us of work) are not worth a pool job: splitting a
/// 128-token RMSNorm (74K elements, ~12 us) saves a few microseconds on a quiet machine
/// but adds a synchronisation, which on a shared one costs far more whenever the other
/// thread has been descheduled.
const PAR_MIN_ELEMS: usize = 1 << 17;

/// Runs `f` over row ranges of `0..rows` split across the pool, or over all rows on this
/// thread when they hold fewer than `PAR_MIN_ELEMS` elements (`row_len` each).
fn par_rows(pool: &ThreadPool, rows: usize, row_len: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    if rows * row_len < PAR_MIN_ELEMS {
        if rows > 0 {
            f(0..rows);
        }
        return;
    }
    pool.for_ranges(rows, 1, f);
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `log(sum(exp(x)))`, stable.
pub fn logsumexp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + s.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::data;

    /// The SIMD levels this CPU can run, besides the scalar reference.
    fn levels() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what} [{i}]: {a} vs {b}"
            );
        }
    }

    const SIZES: [usize; 12] = [1, 3, 7, 8, 9, 15, 16, 17, 33, 63, 65, 577];

    #[test]
    fn rmsnorm_matches_scalar_on_odd_sizes() {
        for n in SIZES {
            let x = data(n, 1);
            let w = data(n, 2);
            let mut want = vec![0f32; n];
            rmsnorm_scalar(&x, &w, 1e-5, &mut want);
            for isa in levels() {
                let mut got = vec![0f32; n];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: levels() checked the features; equal lengths.
                    Isa::Avx512 => unsafe { rmsnorm_avx512(&x, &w, 1e-5, &mut got) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe { rmsnorm_avx2(&x, &w, 1e-5, &mut got) },
                    _ => unreachable!(),
                }
                close(&got, &want, 1e-6, &format!("rmsnorm {isa:?} n={n}"));
            }
        }
    }

    #[test]
    fn row_drivers_match_per_row_ops() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            // The last shapes are above PAR_MIN_ELEMS: split over the pool.
            for (rows, dim) in [(1, 9), (5, 33), (17, 64), (40, 577), (300, 577)] {
                let x0 = data(rows * dim, 3);
                let delta = data(rows * dim, 4);
                let w = data(dim, 5);
                let mut want = vec![0f32; rows * dim];
                let mut sum = x0.clone();
                add_assign(&mut sum, &delta);
                for r in 0..rows {
                    let s = r * dim..(r + 1) * dim;
                    rmsnorm_scalar(&sum[s.clone()], &w, 1e-6, &mut want[s]);
                }
                let mut x = x0.clone();
                let mut got = vec![0f32; rows * dim];
                add_rmsnorm_rows(&pool, &mut x, &delta, &w, 1e-6, &mut got);
                assert_eq!(x, sum);
                close(&got, &want, 1e-6, "add_rmsnorm_rows");
                let mut got2 = vec![0f32; rows * dim];
                rmsnorm_rows(&pool, &sum, &w, 1e-6, &mut got2);
                assert_eq!(got, got2);

                let mut g = x0.clone();
                silu_mul_scalar(&mut g, &delta);
                let mut g2 = x0.clone();
                silu_mul_par(&pool, &mut g2, &delta);
                close(&g2, &g, 1e-6, "silu_mul_par");
            }
        }
    }

    #[test]
    fn silu_mul_and_softmax_match_scalar_on_odd_sizes() {
        for n in SIZES {
            // Wide arguments: exp over- and underflows inside silu.
            let g0: Vec<f32> = data(n, 6).iter().map(|v| v * 120.0).collect();
            let u = data(n, 7);
            let mut want = g0.clone();
            silu_mul_scalar(&mut want, &u);
            let s0: Vec<f32> = data(n, 8).iter().map(|v| v * 30.0).collect();
            let mut want_s = s0.clone();
            softmax_scalar(&mut want_s);
            for isa in levels() {
                let mut got = g0.clone();
                let mut got_s = s0.clone();
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: levels() checked the features; equal lengths.
                    Isa::Avx512 => unsafe {
                        silu_mul_avx512(&mut got, &u);
                        softmax_avx512(&mut got_s);
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe {
                        silu_mul_avx2(&mut got, &u);
                        softmax_avx2(&mut got_s);
                    },
                    _ => unreachable!(),
                }
                close(&got, &want, 2e-6, &format!("silu_mul {isa:?} n={n}"));
                close(&got_s, &want_s, 2e-6, &format!("softmax {isa:?} n={n}"));
            }
        }
    }

    #[test]
    fn count_at_least_matches_the_scalar_count_on_odd_sizes() {
        for n in [0usize, 1, 15, 16, 17, 577, 1537] {
            let v: Vec<u32> = (0..n as u32)
                .map(|i| i.wrapping_mul(2_654_435_761))
                .collect();
            for t in [0, 1, u32::MAX / 3, u32::MAX / 2, u32::MAX] {
                let want = v.iter().filter(|&&b| b >= t).count();
                assert_eq!(count_at_least(&v, t), want, "n {n} t {t}");
                let mut got = Vec::new();
                indices_at_least(&v, t, &mut got);
                let want: Vec<u32> = (0..n as u32).filter(|&i| v[i as usize] >= t).collect();
                assert_eq!(got, want, "indices: n {n} t {t}");
            }
        }
    }

    #[test]
    fn gelu_tanh_mul_matches_scalar_on_odd_sizes() {
        for n in SIZES {
            // Wide arguments: exp over- and underflows; and the range where GELU bends.
            let g0: Vec<f32> = data(n, 9)
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % 2 == 0 { v * 40.0 } else { v })
                .collect();
            let u = data(n, 10);
            let mut want = g0.clone();
            gelu_tanh_mul_scalar(&mut want, &u);
            for isa in levels() {
                let mut got = g0.clone();
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: levels() checked the features; equal lengths.
                    Isa::Avx512 => unsafe { gelu_tanh_mul_avx512(&mut got, &u) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe { gelu_tanh_mul_avx2(&mut got, &u) },
                    _ => unreachable!(),
                }
                close(&got, &want, 3e-6, &format!("gelu_tanh_mul {isa:?} n={n}"));
            }
        }
        // The reference itself, at points PyTorch's tanh-GELU gives.
        for (x, want) in [
            (1.0f32, 0.841_192),
            (-1.0, -0.158_808),
            (3.0, 2.996_363),
            (0.0, 0.0),
        ] {
            assert!((gelu_tanh(x) - want).abs() < 1e-5, "gelu_tanh({x})");
        }
    }

    #[test]
    fn rmsnorm_heads_normalises_each_head() {
        let pool = ThreadPool::new(2);
        let (d, heads, rows) = (8, 3, 5);
        let mut x = data(rows * heads * d, 11);
        let w = data(d, 12);
        let mut want = vec![0f32; x.len()];
        for (o, h) in want.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            rmsnorm_scalar(h, &w, 1e-6, o);
        }
        rmsnorm_heads(&pool, &mut x, &w, 1e-6);
        close(&x, &want, 1e-6, "rmsnorm_heads");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_is_accurate_over_its_range() {
        let xs: Vec<f32> = (0..16 * 1200).map(|i| 88.0 - i as f32 * 0.0097).collect();
        for isa in levels() {
            for c in xs.chunks(16) {
                let mut got = [0f32; 16];
                match isa {
                    // SAFETY: levels() checked AVX-512; c and got hold 16 floats.
                    Isa::Avx512 => unsafe {
                        _mm512_storeu_ps(got.as_mut_ptr(), exp512(_mm512_loadu_ps(c.as_ptr())))
                    },
                    // SAFETY: levels() checked AVX2/FMA; two halves of 8 floats.
                    Isa::Avx2 => unsafe {
                        for h in 0..2 {
                            let v = exp256(_mm256_loadu_ps(c.as_ptr().add(8 * h)));
                            _mm256_storeu_ps(got.as_mut_ptr().add(8 * h), v);
                        }
                    },
                    Isa::Scalar => unreachable!(),
                }
                for (&x, &g) in c.iter().zip(&got) {
                    let want = (x as f64).exp();
                    // Below about -87 a normal f32 result ends (AVX2 flushes to 0).
                    let tol = if x < -87.0 { 2e-38 } else { 3e-7 * want };
                    assert!(
                        ((g as f64) - want).abs() <= tol,
                        "{isa:?} exp({x}) = {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_simd_matches_scalar() {
        for (d, heads) in [(64, 3), (16, 2), (32, 1), (8, 5), (12, 2), (128, 2)] {
            let half = d / 2;
            let inv: Vec<f32> = (0..half)
                .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
                .collect();
            for interleaved in [false, true] {
                let table = RopeTable::new(&inv, 1000, 3, interleaved);
                assert_eq!(table.len(), 3);
                for t in 0..3 {
                    let x0 = data(heads * d, t as u64 + 9);
                    let (c, s) = (
                        &table.cos[t * d..(t + 1) * d],
                        &table.sin[t * d..(t + 1) * d],
                    );
                    let mut want = x0.clone();
                    rope_apply_scalar(&mut want, c, s, d, interleaved);
                    // The reference is the classic rotation, bit for bit.
                    let mut classic = x0.clone();
                    for head in classic.chunks_exact_mut(d) {
                        for (i, &f) in inv.iter().enumerate() {
                            let a = (1000 + t) as f32 * f;
                            let (sn, cs) = (a.sin(), a.cos());
                            let (p, q) = if interleaved {
                                (2 * i, 2 * i + 1)
                            } else {
                                (i, i + half)
                            };
                            let (x0, x1) = (head[p], head[q]);
                            head[p] = x0 * cs - x1 * sn;
                            head[q] = x0 * sn + x1 * cs;
                        }
                    }
                    assert_eq!(want, classic);
                    for isa in levels() {
                        let w = if isa == Isa::Avx512 { 16 } else { 8 };
                        let fits = if interleaved {
                            d % w == 0
                        } else {
                            half % w == 0
                        };
                        if !fits {
                            continue;
                        }
                        let mut got = x0.clone();
                        match isa {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: levels() checked the features; `fits` holds.
                            Isa::Avx512 => unsafe { rope_avx512(&mut got, c, s, d, interleaved) },
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: as above.
                            Isa::Avx2 => unsafe { rope_avx2(&mut got, c, s, d, interleaved) },
                            _ => unreachable!(),
                        }
                        close(&got, &want, 1e-6, &format!("rope {isa:?} d={d}"));
                    }
                }
            }
        }
    }

    #[test]
    fn rope_styles_agree_under_permutation() {
        // GGUF's interleaved layout is HF's halves layout with rows permuted: rotating the
        // permuted vector interleaved equals permuting the halves-rotated one.
        let d = 8;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let hf: Vec<f32> = (0..d).map(|i| i as f32 + 0.5).collect();
        // interleaved position 2i <- hf i, 2i+1 <- hf i + d/2
        let perm = |v: &[f32]| -> Vec<f32> {
            (0..d)
                .map(|j| {
                    if j % 2 == 0 {
                        v[j / 2]
                    } else {
                        v[j / 2 + d / 2]
                    }
                })
                .collect()
        };
        let mut a = hf.clone();
        rope(&mut a, d, 7, &inv, false);
        let mut b = perm(&hf);
        rope(&mut b, d, 7, &inv, true);
        for (x, y) in perm(&a).iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0, -1e9];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}
