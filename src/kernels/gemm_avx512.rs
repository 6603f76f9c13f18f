//! AVX-512 matrix-matrix kernels for prefill: `out[t, j] = sum_k x[t, k] * w[j, k]`.
//!
//! Both operands are row-major with the reduction index `k` contiguous (x: [n, k]
//! activations, w: [m, k] weight rows), so the microkernel is "dot-product style": a tile
//! of `T` tokens x `R` weight rows keeps `T * R` vector accumulators, streams `k` one
//! vector at a time (loading `T + R` vectors for `T * R` FMAs), and reduces each
//! accumulator horizontally at the end. This needs no packing of the weights (they are
//! read in place, which matters because prefill sees every weight matrix once per call),
//! and the horizontal reductions cost a few instructions per output against `k / 16`
//! FMAs.
//!
//! Loop order (see [`gemm_f32`]): weight-row tiles outer, token tiles inner. An R-row
//! weight tile (R x k elements, at most 4 x 1536 x 4 B = 24 KiB) stays in L1 while all
//! tokens stream past it; the activations (n x k, 128 x 1536 x 2 B = 384 KiB in bf16)
//! stay in L2. The other order would stream the whole weight matrix (up to megabytes,
//! more than L2) once per token tile.
//!
//! Two element types: f32 x f32 with `vfmadd231ps`, and bf16 x bf16 pairs with
//! `vdpbf16ps` (AVX-512 BF16: products exact, f32 accumulation), for which the
//! activations are rounded to bf16 once per call (as the decode path and llama.cpp do).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Tokens per microkernel tile.
pub const TILE_TOKENS: usize = 4;
/// Weight rows per microkernel tile (at most 4: the reduction packs 4 sums per lane).
pub const TILE_ROWS: usize = 4;

/// Whether the AVX-512 f32 kernel can run here (the dispatch level of `dot::isa`).
pub fn has_f32() -> bool {
    super::dot::isa() == super::dot::Isa::Avx512
}

/// Whether the AVX-512 BF16 kernel can run here.
pub fn has_bf16() -> bool {
    super::dot::has_avx512_bf16()
}

/// Scalar reference: `out[t * ld + j] = sum_k x[t * k + kk] * w[j * k + kk]`, t < n, j < m.
pub fn gemm_f32_scalar(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    ld: usize,
) {
    for t in 0..n {
        for j in 0..m {
            out[t * ld + j] =
                super::dot::dot_f32_scalar(&x[t * k..(t + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
}

/// Scalar reference of the bf16 kernel (both operands bf16 bit patterns, f32 sums).
pub fn gemm_bf16_scalar(
    n: usize,
    m: usize,
    k: usize,
    x: &[u16],
    w: &[u16],
    out: &mut [f32],
    ld: usize,
) {
    for t in 0..n {
        for j in 0..m {
            out[t * ld + j] =
                super::dot::dot_bf16_bf16_scalar(&w[j * k..(j + 1) * k], &x[t * k..(t + 1) * k]);
        }
    }
}

/// Rounds `x` to bf16 (nearest even) into `out`: `vcvtne2ps2bf16` where available.
pub fn to_bf16(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if has_bf16() {
        // SAFETY: has_bf16() checked AVX-512F/BW/VL/BF16; lengths are equal (asserted).
        unsafe { to_bf16_avx512(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = super::dot::f32_to_bf16(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn to_bf16_avx512(x: &[f32], out: &mut [u16]) {
    let n = x.len().min(out.len());
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: full loads/stores touch 32 elements below n (loop bound); the tail is
    // masked to the valid lanes. __m512bh and __m512i are both 64 plain bytes.
    unsafe {
        while i + 32 <= n {
            let lo = _mm512_loadu_ps(px.add(i));
            let hi = _mm512_loadu_ps(px.add(i + 16));
            // The second operand fills the low half of the result.
            let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(po.add(i) as *mut __m512i, b);
            i += 32;
        }
        while i < n {
            let left = (n - i).min(16);
            let m: __mmask16 = ((1u32 << left) - 1) as u16;
            let v = _mm512_maskz_loadu_ps(m, px.add(i));
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_mask_storeu_epi16(po.add(i) as *mut i16, m, b);
            i += left;
        }
    }
}

/// Sums each of `a[0..4]` horizontally: lane r of the result is `sum(a[r])`.
///
/// Two unpack/shuffle rounds put the four partial sums side by side in every 128-bit
/// lane, then two cross-lane shuffles add the four lanes: 11 instructions for 4 sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn reduce4(a: [__m512; 4]) -> __m128 {
    let t0 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[0], a[1]),
        _mm512_unpackhi_ps(a[0], a[1]),
    );
    let t1 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[2], a[3]),
        _mm512_unpackhi_ps(a[2], a[3]),
    );
    let u = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(t0, t1),
        _mm512_shuffle_ps::<0xEE>(t0, t1),
    );
    let v = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b01_00_11_10>(u, u));
    let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
    _mm512_castps512_ps128(v)
}

/// Stores the row sums of the accumulators `acc[t][0..R]` to `out[t * ld ..][..R]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn store_tile<const T: usize, const R: usize>(
    acc: &[[__m512; R]; T],
    out: *mut f32,
    ld: usize,
) {
    let mask: __mmask8 = ((1u32 << R) - 1) as u8;
    for (t, row) in acc.iter().enumerate() {
        let mut a4 = [_mm512_setzero_ps(); 4];
        a4[..R].copy_from_slice(row);
        // SAFETY: the caller guarantees out[t * ld + j] is writable for t < T, j < R;
        // the masked store touches those R floats only.
        unsafe { _mm_mask_storeu_ps(out.add(t * ld), mask, reduce4(a4)) };
    }
}

/// One T x R tile of the f32 kernel over the whole `k`.
///
/// # Safety
/// AVX-512F/BW/VL; x: T rows of stride sx, w: R rows of stride sw (each row k long), out writable at
/// `t * ld + j` for t < T, j < R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn tile_f32<const T: usize, const R: usize>(
    x: *const f32,
    sx: usize,
    w: *const f32,
    sw: usize,
    k: usize,
    out: *mut f32,
    ld: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut i = 0;
    // SAFETY: full loads read 16 elements at i + 16 <= k of rows inside x and w (the
    // caller's contract); the tail loads are masked to the k - i valid lanes.
    unsafe {
        while i + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(r * sw + i));
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(t * sx + i));
                for (r, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, wv[r], *a);
                }
            }
            i += 16;
        }
        if i < k {
            let m: __mmask16 = ((1u32 << (k - i)) - 1) as u16;
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(m, w.add(r * sw + i));
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(m, x.add(t * sx + i));
                for (r, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, wv[r], *a);
                }
            }
        }
        store_tile(&acc, out, ld);
    }
}

/// One T x R tile of the bf16 kernel: 32 bf16 (16 pairs) per `vdpbf16ps`.
///
/// # Safety
/// AVX-512F/BW/VL/BF16; as for [`tile_f32`] with u16 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn tile_bf16<const T: usize, const R: usize>(
    x: *const u16,
    w: *const u16,
    k: usize,
    out: *mut f32,
    ld: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    let mut i = 0;
    // SAFETY: full loads read 32 elements at i + 32 <= k of rows inside x and w (the
    // caller's contract); the tail loads are masked to the k - i valid lanes (zeros
    // contribute nothing). __m512i and __m512bh are both 64 plain bytes.
    unsafe {
        while i < k {
            let m: __mmask32 = if k - i >= 32 {
                u32::MAX
            } else {
                (1u32 << (k - i)) - 1
            };
            let full = m == u32::MAX;
            let mut wv: [__m512bh; R] = std::mem::zeroed();
            for (r, v) in wv.iter_mut().enumerate() {
                let p = w.add(r * k + i);
                *v = std::mem::transmute::<__m512i, __m512bh>(if full {
                    _mm512_loadu_si512(p as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi16(m, p as *const i16)
                });
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let p = x.add(t * k + i);
                let xv = std::mem::transmute::<__m512i, __m512bh>(if full {
                    _mm512_loadu_si512(p as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi16(m, p as *const i16)
                });
                for (r, a) in a.iter_mut().enumerate() {
                    *a = _mm512_dpbf16_ps(*a, xv, wv[r]);
                }
            }
            i += 32;
        }
        store_tile(&acc, out, ld);
    }
}

/// Calls `$f::<T, R>` for the runtime tile size (t, r), t in 1..=8, r in 1..=4.
macro_rules! dispatch {
    ($f:ident, $t:expr, $r:expr, $($arg:expr),*) => {
        match ($t, $r) {
            (1, 1) => $f::<1, 1>($($arg),*), (1, 2) => $f::<1, 2>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*), (1, 4) => $f::<1, 4>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*), (2, 2) => $f::<2, 2>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*), (2, 4) => $f::<2, 4>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*), (3, 2) => $f::<3, 2>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*), (3, 4) => $f::<3, 4>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*), (4, 2) => $f::<4, 2>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*), (4, 4) => $f::<4, 4>($($arg),*),
            (5, 1) => $f::<5, 1>($($arg),*), (5, 2) => $f::<5, 2>($($arg),*),
            (5, 3) => $f::<5, 3>($($arg),*), (5, 4) => $f::<5, 4>($($arg),*),
            (6, 1) => $f::<6, 1>($($arg),*), (6, 2) => $f::<6, 2>($($arg),*),
            (6, 3) => $f::<6, 3>($($arg),*), (6, 4) => $f::<6, 4>($($arg),*),
            (7, 1) => $f::<7, 1>($($arg),*), (7, 2) => $f::<7, 2>($($arg),*),
            (7, 3) => $f::<7, 3>($($arg),*), (7, 4) => $f::<7, 4>($($arg),*),
            (8, 1) => $f::<8, 1>($($arg),*), (8, 2) => $f::<8, 2>($($arg),*),
            (8, 3) => $f::<8, 3>($($arg),*), (8, 4) => $f::<8, 4>($($arg),*),
            _ => unreachable!("tile size"),
        }
    };
}

/// Cache blocking for a kernel with `tt x tr` tiles over rows of `k` elements of `elem`
/// bytes: (weight rows per block, tokens per block).
///
/// A block of tokens (`tb x k`) is sized to stay in L1 next to one weight tile, so each
/// weight tile, once loaded, serves `tb / tt` token tiles from L1; a block of weight rows
/// (`rb x k`) is sized to stay in L2 while every token block passes over it.
fn blocks(tt: usize, tr: usize, k: usize, elem: usize) -> (usize, usize) {
    let row = k * elem;
    let tb = (L1_BLOCK_BYTES / row / tt).max(1) * tt;
    let rb = (L2_BLOCK_BYTES / row / tr).max(1) * tr;
    (rb, tb)
}

/// Bytes of activations kept in L1 per token block (Zen 5: 48 KiB L1D).
const L1_BLOCK_BYTES: usize = 24 << 10;
/// Bytes of weights kept in L2 per row block (Zen 5: 1 MiB L2).
const L2_BLOCK_BYTES: usize = 384 << 10;

/// The f32 kernel with tiles of `tt` tokens x `tr` rows (tt <= 8, tr <= 4).
///
/// # Safety
/// AVX-512F/BW/VL; `out` writable at `t * ld + j` for t < n, j < m and not accessed by
/// anyone else during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32_tiled(
    tt: usize,
    tr: usize,
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    out: *mut f32,
    ld: usize,
) {
    assert!(x.len() >= n * k && w.len() >= m * k && ld >= m);
    assert!((1..=8).contains(&tt) && (1..=4).contains(&tr));
    let (rb, tb) = blocks(tt, tr, k, 4);
    for r0 in (0..m).step_by(rb) {
        let r1 = (r0 + rb).min(m);
        for t0 in (0..n).step_by(tb) {
            let t1 = (t0 + tb).min(n);
            let mut j = r0;
            while j < r1 {
                let r = tr.min(r1 - j);
                let mut t = t0;
                while t < t1 {
                    let c = tt.min(t1 - t);
                    // SAFETY: rows t..t+c of x and j..j+r of w are in bounds (asserted
                    // sizes); outputs (t.., j..) are inside the caller's region.
                    unsafe {
                        dispatch!(
                            tile_f32,
                            c,
                            r,
                            x.as_ptr().add(t * k),
                            k,
                            w.as_ptr().add(j * k),
                            k,
                            k,
                            out.add(t * ld + j),
                            ld
                        )
                    };
                    t += c;
                }
                j += r;
            }
        }
    }
}

/// `out[t * ld + j] = sum_k x[t, k] * w[j, k]` for t < n, j < m with AVX-512 f32 FMAs.
/// x: [n, k], w: [m, k], both row-major.
///
/// # Safety
/// `has_f32()` must hold; `out` writable at `t * ld + j` for t < n, j < m and not
/// accessed by anyone else during the call.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_f32(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: forwarded contract.
    unsafe { gemm_f32_tiled(TILE_TOKENS, TILE_ROWS, n, m, k, x, w, out, ld) }
}

/// `out[t * ld + j] = sum_kk x[t * sx + kk] * w[j * sw + kk]` for t < n, j < m, kk < k:
/// the f32 kernel over strided rows, without cache blocking (for small operands such as
/// the queries and keys of one attention head).
///
/// # Safety
/// `has_f32()` must hold; x readable at `t * sx + kk`, w at `j * sw + kk` for the ranges
/// above; `out` writable at `t * ld + j` and not accessed by anyone else during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32_strided(
    n: usize,
    m: usize,
    k: usize,
    x: *const f32,
    sx: usize,
    w: *const f32,
    sw: usize,
    out: *mut f32,
    ld: usize,
) {
    let mut j = 0;
    while j < m {
        let r = TILE_ROWS.min(m - j);
        let mut t = 0;
        while t < n {
            let c = TILE_TOKENS.min(n - t);
            // SAFETY: the caller's contract covers rows t..t+c of x, j..j+r of w and
            // the outputs (t.., j..).
            unsafe {
                dispatch!(
                    tile_f32,
                    c,
                    r,
                    x.add(t * sx),
                    sx,
                    w.add(j * sw),
                    sw,
                    k,
                    out.add(t * ld + j),
                    ld
                )
            };
            t += c;
        }
        j += r;
    }
}

/// The bf16 kernel with tiles of `tt` tokens x `tr` rows (tt <= 8, tr <= 4).
///
/// # Safety
/// AVX-512F/BW/VL/BF16; `out` as for [`gemm_f32_tiled`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16_tiled(
    tt: usize,
    tr: usize,
    n: usize,
    m: usize,
    k: usize,
    x: &[u16],
    w: &[u16],
    out: *mut f32,
    ld: usize,
) {
    assert!(x.len() >= n * k && w.len() >= m * k && ld >= m);
    assert!((1..=8).contains(&tt) && (1..=4).contains(&tr));
    let (rb, tb) = blocks(tt, tr, k, 2);
    for r0 in (0..m).step_by(rb) {
        let r1 = (r0 + rb).min(m);
        for t0 in (0..n).step_by(tb) {
            let t1 = (t0 + tb).min(n);
            let mut j = r0;
            while j < r1 {
                let r = tr.min(r1 - j);
                let mut t = t0;
                while t < t1 {
                    let c = tt.min(t1 - t);
                    // SAFETY: rows t..t+c of x and j..j+r of w are in bounds (asserted
                    // sizes); outputs (t.., j..) are inside the caller's region.
                    unsafe {
                        dispatch!(
                            tile_bf16,
                            c,
                            r,
                            x.as_ptr().add(t * k),
                            w.as_ptr().add(j * k),
                            k,
                            out.add(t * ld + j),
                            ld
                        )
                    };
                    t += c;
                }
                j += r;
            }
        }
    }
}

/// `out[t * ld + j] = sum_k x[t, k] * w[j, k]` with bf16 x (already rounded, see
/// [`to_bf16`]) and bf16 w, f32 accumulation, via `vdpbf16ps`.
///
/// # Safety
/// `has_bf16()` must hold; `out` as for [`gemm_f32`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_bf16(
    n: usize,
    m: usize,
    k: usize,
    x: &[u16],
    w: &[u16],
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: forwarded contract.
    unsafe { gemm_bf16_tiled(TILE_TOKENS, TILE_ROWS, n, m, k, x, w, out, ld) }
}

// ---------------------------------------------------------------------------------------
// The packed bf16 kernel: vector lanes over tokens.
//
// The kernels above reduce each accumulator horizontally at the end of `k` (about three
// shuffles and adds per output: 14% of a k = 576 GEMM's instructions). This one keeps 16
// tokens in the lanes of an accumulator instead, so no reduction is needed: the
// activations are packed once per call (they are rounded to bf16 then anyway) as
// `[group of 16 tokens][k pair][token][2]`, one 64-byte line per (group, pair), and each
// `vdpbf16ps` multiplies a line by one weight row's pair broadcast to all lanes (the
// weights are still read in place). A tile of R weight rows x G groups keeps R x G
// accumulators and loads G lines plus R broadcasts per step.

/// Tokens per group of the packed layout (the f32 lanes of one accumulator).
pub const GROUP: usize = 16;

/// One (group, pair) line of packed activations: 16 tokens x 2 bf16.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u16; 32]);

/// Activations `[n, k]` rounded to bf16 and packed for [`gemm_bf16_packed`]: line
/// `g * pairs + p` holds `(x[16 g + l, 2 p], x[16 g + l, 2 p + 1])` in lanes `l`; tokens
/// past `n` and the odd `k`'s last element are zeros.
#[derive(Default)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl PackedBf16 {
    /// Sets the shape (the lines' contents are stale until packed).
    pub fn reset(&mut self, n: usize, k: usize) {
        self.n = n;
        self.k = k;
        let len = n.div_ceil(GROUP) * k.div_ceil(2);
        if self.lines.len() < len {
            self.lines.resize(len, Line([0; 32]));
        }
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }
    pub fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }
    /// Element (t, kk) as bf16 bits.
    pub fn get(&self, t: usize, kk: usize) -> u16 {
        self.lines[t / GROUP * self.pairs() + kk / 2].0[t % GROUP * 2 + kk % 2]
    }
    /// A raw view for kernels that pack and read from several threads.
    pub fn view(&mut self) -> PackedView {
        PackedView {
            lines: self.lines.as_mut_ptr(),
            n: self.n,
            k: self.k,
        }
    }
}

/// Raw parts of a [`PackedBf16`], shareable across the pool's threads (which pack
/// disjoint groups, then only read).
#[derive(Clone, Copy)]
pub struct PackedView {
    lines: *mut Line,
    pub n: usize,
    pub k: usize,
}
// SAFETY: the buffer outlives the jobs that use a view; threads write disjoint groups
// (see `pack_bf16`) and read only after every write has been published.
unsafe impl Send for PackedView {}
// SAFETY: as above.
unsafe impl Sync for PackedView {}

impl PackedView {
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }
    pub fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }
}

/// Scalar reference of [`pack_bf16`] (all groups).
pub fn pack_bf16_scalar(x: &[f32], n: usize, k: usize, out: &mut PackedBf16) {
    assert!(x.len() >= n * k);
    out.reset(n, k);
    let pairs = out.pairs();
    for g in 0..out.groups() {
        for p in 0..pairs {
            let line = &mut out.lines[g * pairs + p].0;
            for l in 0..GROUP {
                for h in 0..2 {
                    let (t, kk) = (g * GROUP + l, 2 * p + h);
                    line[2 * l + h] = if t < n && kk < k {
                        super::dot::f32_to_bf16(x[t * k + kk])
                    } else {
                        0
                    };
                }
            }
        }
    }
}

/// Packs the token groups `groups` of `x` (`[v.n, v.k]` f32) into `v`.
///
/// # Safety
/// `has_bf16()` must hold; `v` views a buffer reset to `(n, k)` with `x.len() >= n * k`;
/// no other thread accesses these groups' lines during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn pack_bf16(x: &[f32], v: PackedView, groups: std::ops::Range<usize>) {
    let (n, k, pairs) = (v.n, v.k, v.pairs());
    assert!(x.len() >= n * k && groups.end <= v.groups());
    let px = x.as_ptr();
    for g in groups {
        for p0 in (0..pairs).step_by(16) {
            let k0 = 2 * p0;
            let kn = (k - k0).min(32);
            let lo: __mmask16 = ((1u32 << kn.min(16)) - 1) as u16;
            let hi: __mmask16 = ((1u32 << kn.saturating_sub(16)) - 1) as u16;
            let mut r = [_mm512_setzero_si512(); 16];
            for (l, r) in r.iter_mut().enumerate() {
                let t = g * GROUP + l;
                if t < n {
                    // SAFETY: masked loads of the kn valid elements of row t (t < n,
                    // k0 + kn <= k); __m512bh and __m512i are both 64 plain bytes.
                    unsafe {
                        let a = _mm512_maskz_loadu_ps(lo, px.add(t * k + k0));
                        let b = _mm512_maskz_loadu_ps(hi, px.add(t * k + k0 + 16));
                        *r = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
                    }
                }
            }
            // Row l (token), dword q (pair p0 + q) -> line q, dword l.
            transpose16(&mut r);
            for (q, r) in r.iter().enumerate().take((pairs - p0).min(16)) {
                // SAFETY: line g * pairs + p0 + q is inside the buffer (g < groups, pair
                // < pairs) and 64-byte aligned (Line's alignment).
                unsafe { _mm512_store_si512(v.lines.add(g * pairs + p0 + q) as *mut __m512i, *r) };
            }
        }
    }
}

/// Transposes a 16 x 16 matrix of dwords held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4 i + c], 128-bit lane L: rows 4 i..4 i + 4 of column 4 L + c.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xDD>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_i32x4::<0xDD>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        r[4 + c] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        r[8 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        r[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
}

/// The accumulators of one tile of R weight rows x G token groups over the whole `k`:
/// `acc[r][g]` lane l is row r's product with token 16 g + l.
///
/// # Safety
/// AVX-512F/BW/VL/BF16; `x` points at G groups' lines (group stride `pairs`), `w` at R
/// rows of `k` bf16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn accumulate<const R: usize, const G: usize>(
    x: *const Line,
    pairs: usize,
    w: *const u16,
    k: usize,
    pf: *const u16,
    pf_len: usize,
) -> [[__m512; G]; R] {
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    // SAFETY: lines g * pairs + p (p < pairs) of G groups and the pairs 2 p, 2 p + 1 < k
    // of R rows are in bounds (the caller's contract); an odd k's last element is read
    // alone (its pair partner in x is zero). __m512i and __m512bh are both 64 plain bytes.
    unsafe {
        let step = |acc: &mut [[__m512; G]; R], p: usize, b: [__m512i; R]| {
            let mut xv = [_mm512_setzero_si512(); G];
            for (g, v) in xv.iter_mut().enumerate() {
                *v = _mm512_load_si512(x.add(g * pairs + p) as *const __m512i);
            }
            for (a, b) in acc.iter_mut().zip(b) {
                let b = std::mem::transmute::<__m512i, __m512bh>(b);
                for (a, xv) in a.iter_mut().zip(xv) {
                    *a = _mm512_dpbf16_ps(*a, std::mem::transmute::<__m512i, __m512bh>(xv), b);
                }
            }
        };
        let full = k / 2;
        // One cache line of `pf` (the next tile's rows, R x k bf16 = R k / 32 lines) per
        // R / 4 steps of the k / 2.
        let per = R.div_ceil(4);
        for p in 0..full {
            if p % 4 == 0 {
                for q in 0..per {
                    let off = (p / 4 * per + q) * 32;
                    if off < pf_len {
                        _mm_prefetch::<_MM_HINT_T0>(pf.add(off) as *const i8);
                    }
                }
            }
            let mut b = [_mm512_setzero_si512(); R];
            for (r, b) in b.iter_mut().enumerate() {
                *b = _mm512_set1_epi32((w.add(r * k + 2 * p) as *const i32).read_unaligned());
            }
            step(&mut acc, p, b);
        }
        if k % 2 == 1 {
            let mut b = [_mm512_setzero_si512(); R];
            for (r, b) in b.iter_mut().enumerate() {
                *b = _mm512_set1_epi32(*w.add(r * k + k - 1) as i32);
            }
            step(&mut acc, full, b);
        }
    }
    acc
}

/// One tile of R weight rows x G token groups of the packed kernel: [`accumulate`], then
/// each row's column of outputs.
///
/// # Safety
/// As for [`accumulate`]; `out` writable at `t * ld + r` for t < min(tokens, 16 G), r < R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_packed<const R: usize, const G: usize>(
    x: *const Line,
    pairs: usize,
    w: *const u16,
    k: usize,
    out: *mut f32,
    ld: usize,
    tokens: usize,
    pf: *const u16,
    pf_len: usize,
) {
    // SAFETY: forwarded contract.
    let acc = unsafe { accumulate::<R, G>(x, pairs, w, k, pf, pf_len) };
    // Lanes are tokens: write each row's column through a small buffer.
    let mut buf = [[0f32; 4 * GROUP]; R];
    for (a, b) in acc.iter().zip(buf.iter_mut()) {
        for (g, a) in a.iter().enumerate() {
            // SAFETY: g < G <= 4: 16 floats inside b.
            unsafe { _mm512_storeu_ps(b.as_mut_ptr().add(g * GROUP), *a) };
        }
    }
    for t in 0..tokens.min(G * GROUP) {
        for (r, b) in buf.iter().enumerate() {
            // SAFETY: t < tokens and r < R: inside the caller's region.
            unsafe { *out.add(t * ld + r) = b[t] };
        }
    }
}

/// One SwiGLU tile: R rows of `gate` and of `up` x G groups, `h = silu(gate) * up` (as
/// `ops::silu_mul` computes it) rounded to bf16 and stored packed: rows (2 i, 2 i + 1) of
/// the tile form pair line i of each group (an odd R's last row pairs with zero).
///
/// # Safety
/// As for [`accumulate`] for both matrices; `out` points at the first tile row's pair
/// line of the first group of a packed buffer with `out_pairs` lines per group, and the
/// lines `g * out_pairs + i` for g < G, i < ceil(R / 2) are writable by this thread.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_swiglu<const R: usize, const G: usize>(
    x: *const Line,
    pairs: usize,
    gate: *const u16,
    up: *const u16,
    k: usize,
    out: *mut Line,
    out_pairs: usize,
    pf: [*const u16; 2],
    pf_len: usize,
) {
    // SAFETY: forwarded contract.
    let (g, u) = unsafe {
        (
            accumulate::<R, G>(x, pairs, gate, k, pf[0], pf_len),
            accumulate::<R, G>(x, pairs, up, k, pf[1], pf_len),
        )
    };
    let one = _mm512_set1_ps(1.0);
    let h = |r: usize, grp: usize| -> __m256i {
        if r >= R {
            return _mm256_setzero_si256();
        }
        let (g, u) = (g[r][grp], u[r][grp]);
        let e = super::ops::exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let s = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
        // SAFETY: __m256bh and __m256i are both 32 plain bytes.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(s)) }
    };
    for grp in 0..G {
        for i in 0..R.div_ceil(2) {
            let lo = _mm512_cvtepu16_epi32(h(2 * i, grp));
            let hi = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h(2 * i + 1, grp)));
            // SAFETY: line grp * out_pairs + i is writable (the caller's contract) and
            // 64-byte aligned.
            unsafe {
                _mm512_store_si512(
                    out.add(grp * out_pairs + i) as *mut __m512i,
                    _mm512_or_si512(lo, hi),
                )
            };
        }
    }
}

/// Calls `$f::<R, G>` for the runtime tile size (r, g), r in 1..=8, g in 1..=4.
macro_rules! dispatch_packed {
    ($f:ident, $r:expr, $g:expr, $($arg:expr),*) => {
        match ($r, $g) {
            (1, 1) => $f::<1, 1>($($arg),*), (1, 2) => $f::<1, 2>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*), (1, 4) => $f::<1, 4>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*), (2, 2) => $f::<2, 2>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*), (2, 4) => $f::<2, 4>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*), (3, 2) => $f::<3, 2>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*), (3, 4) => $f::<3, 4>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*), (4, 2) => $f::<4, 2>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*), (4, 4) => $f::<4, 4>($($arg),*),
            (5, 1) => $f::<5, 1>($($arg),*), (5, 2) => $f::<5, 2>($($arg),*),
            (6, 1) => $f::<6, 1>($($arg),*), (6, 2) => $f::<6, 2>($($arg),*),
            (7, 1) => $f::<7, 1>($($arg),*), (7, 2) => $f::<7, 2>($($arg),*),
            (8, 1) => $f::<8, 1>($($arg),*), (8, 2) => $f::<8, 2>($($arg),*),
            _ => unreachable!("packed tile size"),
        }
    };
}

/// `out[t * ld + j] = sum_kk x[t, kk] * w[j * k + kk]` for t < x.n, j < m: the packed
/// kernel (see [`PackedBf16`]). Tiles are 4 rows x 4 groups (64 tokens), or 8 rows x up
/// to 2 groups for short inputs, so that a tile keeps at least 8 accumulators in flight
/// (`vdpbf16ps` latency); each tile's weight rows stay in L1 while every group passes.
///
/// # Safety
/// `has_bf16()` must hold; `x` views a packed buffer (every group packed and published);
/// `w` holds `m` rows of `x.k`; `out` writable at `t * ld + j` for t < x.n, j < m and not
/// accessed by anyone else during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn gemm_bf16_packed(x: PackedView, m: usize, w: &[u16], out: *mut f32, ld: usize) {
    let (k, pairs, groups) = (x.k, x.pairs(), x.groups());
    assert!(w.len() >= m * k && ld >= m);
    let (tr, tg) = if groups >= 3 { (4, 4) } else { (8, 2) };
    let mut j = 0;
    while j < m {
        let r = tr.min(m - j);
        let next = tr.min(m - j - r);
        let mut g = 0;
        while g < groups {
            // Short row tails take single groups (the dispatch has r > 4 for g <= 2 only).
            let c = if r > 4 {
                tg.min(groups - g).min(2)
            } else {
                tg.min(groups - g)
            };
            // SAFETY: groups g..g + c and rows j..j + r are in bounds; outputs (t, j..)
            // for t < n are inside the caller's region.
            unsafe {
                dispatch_packed!(
                    tile_packed,
                    r,
                    c,
                    x.lines.add(g * pairs) as *const Line,
                    pairs,
                    w.as_ptr().add(j * k),
                    k,
                    out.add(g * GROUP * ld + j),
                    ld,
                    x.n - g * GROUP,
                    w.as_ptr().add((j + r) * k),
                    if g == 0 { next * k } else { 0 }
                )
            };
            g += c;
        }
        j += r;
    }
}

/// `h[t, j] = silu(x[t] · gate[j]) * (x[t] · up[j])` for t < x.n and rows j < m of
/// `gate` and `up` (`[m, x.k]` each), rounded to bf16 into the packed buffer `h` (reset to
/// `(x.n, inter)`) at columns `j0 + j`: SwiGLU's element-wise part fused into its two
/// projections, and its output packed for the down projection.
///
/// # Safety
/// `has_bf16()` must hold; `x` as for [`gemm_bf16_packed`]; `j0` even, `j0 + m <= h.k`,
/// `h.n == x.n`; h's pair lines `j0 / 2..(j0 + m).div_ceil(2)` of every group are not
/// accessed by anyone else during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn swiglu_bf16_packed(
    x: PackedView,
    m: usize,
    gate: &[u16],
    up: &[u16],
    h: PackedView,
    j0: usize,
) {
    let (k, pairs, groups) = (x.k, x.pairs(), x.groups());
    assert!(gate.len() >= m * k && up.len() >= m * k);
    assert!(j0.is_multiple_of(2) && j0 + m <= h.k && h.n == x.n);
    let hp = h.pairs();
    let mut j = 0;
    while j < m {
        // 4 rows (2 pair lines) x 4 groups per tile; the kernel's choice for short inputs
        // (8 rows x 2 groups) is kept too.
        let tr = if groups >= 3 { 4 } else { 8 };
        let r = tr.min(m - j);
        let next = tr.min(m - j - r);
        let mut g = 0;
        while g < groups {
            let c = if r > 4 {
                groups - g
            } else {
                (groups - g).min(4)
            };
            // SAFETY: groups g..g + c of x and rows j..j + r of gate and up are in
            // bounds; h's lines (g.., (j0 + j) / 2..) are inside this call's columns.
            unsafe {
                dispatch_packed!(
                    tile_swiglu,
                    r,
                    c,
                    x.lines.add(g * pairs) as *const Line,
                    pairs,
                    gate.as_ptr().add(j * k),
                    up.as_ptr().add(j * k),
                    k,
                    h.lines.add(g * hp + (j0 + j) / 2),
                    hp,
                    [gate.as_ptr().add((j + r) * k), up.as_ptr().add((j + r) * k)],
                    if g == 0 { next * k } else { 0 }
                )
            };
            g += c;
        }
        j += r;
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    use crate::kernels::test_data::data;

    fn check(got: &[f32], want: &[f32], what: &str) {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{what} [{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn to_bf16_rounds_like_half() {
        let mut x = data(1000, 5);
        x.extend([0.0, -0.0, 1.0, f32::INFINITY, 3.0e38, 1.0 + 1.0 / 256.0]);
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 100, x.len()] {
            let mut got = vec![0u16; len];
            to_bf16(&x[..len], &mut got);
            for (g, &v) in got.iter().zip(&x) {
                assert_eq!(*g, super::super::dot::f32_to_bf16(v), "{v}");
            }
        }
    }

    #[test]
    fn tiles_match_scalar_on_odd_sizes() {
        for (m, k) in [
            (1, 1),
            (17, 33),
            (65, 130),
            (200, 577),
            (5, 16),
            (7, 32),
            (3, 64),
        ] {
            let w = data(m * k, 1);
            let wb: Vec<u16> = w
                .iter()
                .map(|&v| super::super::dot::f32_to_bf16(v))
                .collect();
            for n in 1..=9 {
                let x = data(n * k, 2);
                let xb: Vec<u16> = x
                    .iter()
                    .map(|&v| super::super::dot::f32_to_bf16(v))
                    .collect();
                let ld = m + 3;
                let mut want = vec![7f32; n * ld];
                let mut wantb = vec![7f32; n * ld];
                gemm_f32_scalar(n, m, k, &x, &w, &mut want, ld);
                gemm_bf16_scalar(n, m, k, &xb, &wb, &mut wantb, ld);
                for tt in [1, 3, 4, 6, 8] {
                    for tr in 1..=4 {
                        if has_f32() {
                            let mut got = vec![7f32; n * ld];
                            // SAFETY: has_f32(); got holds n rows of stride ld >= m.
                            unsafe {
                                gemm_f32_tiled(tt, tr, n, m, k, &x, &w, got.as_mut_ptr(), ld)
                            };
                            check(&got, &want, &format!("f32 {n}x{m}x{k} tile {tt}x{tr}"));
                        }
                        if has_bf16() {
                            let mut got = vec![7f32; n * ld];
                            // SAFETY: has_bf16(); as above.
                            unsafe {
                                gemm_bf16_tiled(tt, tr, n, m, k, &xb, &wb, got.as_mut_ptr(), ld)
                            };
                            check(&got, &wantb, &format!("bf16 {n}x{m}x{k} tile {tt}x{tr}"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packing_matches_scalar() {
        if !has_bf16() {
            return;
        }
        for (n, k) in [
            (1, 1),
            (5, 3),
            (16, 32),
            (17, 33),
            (33, 64),
            (40, 65),
            (128, 576),
        ] {
            let x = data(n * k, 3);
            let mut want = PackedBf16::default();
            pack_bf16_scalar(&x, n, k, &mut want);
            let mut got = PackedBf16::default();
            got.reset(n, k);
            let v = got.view();
            let g = v.groups();
            // SAFETY: has_bf16(); got was reset to (n, k); two calls on disjoint groups.
            unsafe {
                pack_bf16(&x, v, 0..g / 2);
                pack_bf16(&x, v, g / 2..g);
            }
            let len = got.groups() * got.pairs();
            for (i, (a, b)) in got.lines[..len].iter().zip(&want.lines[..len]).enumerate() {
                assert_eq!(a.0, b.0, "{n}x{k} line {i}");
            }
            assert_eq!(
                got.get(n - 1, k - 1),
                super::super::dot::f32_to_bf16(x[n * k - 1])
            );
        }
    }

    #[test]
    fn packed_kernel_matches_scalar_on_odd_sizes() {
        if !has_bf16() {
            return;
        }
        for (m, k) in [
            (1, 1),
            (17, 33),
            (9, 130),
            (200, 577),
            (5, 16),
            (13, 32),
            (3, 64),
        ] {
            let wb: Vec<u16> = data(m * k, 1)
                .iter()
                .map(|&v| super::super::dot::f32_to_bf16(v))
                .collect();
            for n in [1, 2, 15, 16, 17, 31, 33, 48, 50, 64, 65, 100] {
                let x = data(n * k, 2);
                let xb: Vec<u16> = x
                    .iter()
                    .map(|&v| super::super::dot::f32_to_bf16(v))
                    .collect();
                let ld = m + 3;
                let mut want = vec![7f32; n * ld];
                gemm_bf16_scalar(n, m, k, &xb, &wb, &mut want, ld);
                let mut p = PackedBf16::default();
                p.reset(n, k);
                let v = p.view();
                let mut got = vec![7f32; n * ld];
                // SAFETY: has_bf16(); p reset to (n, k) and fully packed before the
                // kernel reads it; got holds n rows of stride ld >= m.
                unsafe {
                    pack_bf16(&x, v, 0..v.groups());
                    gemm_bf16_packed(v, m, &wb, got.as_mut_ptr(), ld);
                }
                check(&got, &want, &format!("packed {n}x{m}x{k}"));
            }
        }
    }

    #[test]
    fn swiglu_matches_unfused_bit_for_bit() {
        if !has_bf16() {
            return;
        }
        let pool_free = |x: &[f32], n: usize, k: usize| {
            let mut p = PackedBf16::default();
            p.reset(n, k);
            let v = p.view();
            // SAFETY: has_bf16(); p reset to (n, k).
            unsafe { pack_bf16(x, v, 0..v.groups()) };
            p
        };
        for (inter, k) in [(2, 1), (18, 33), (9, 130), (64, 64), (13, 576)] {
            let gate: Vec<u16> = data(inter * k, 1)
                .iter()
                .map(|&v| super::super::dot::f32_to_bf16(v * 3.0))
                .collect();
            let up: Vec<u16> = data(inter * k, 4)
                .iter()
                .map(|&v| super::super::dot::f32_to_bf16(v))
                .collect();
            for n in [1, 16, 17, 40, 64, 100] {
                let x = data(n * k, 2);
                let mut xp = pool_free(&x, n, k);
                let xv = xp.view();
                let (mut g, mut u) = (vec![0f32; n * inter], vec![0f32; n * inter]);
                let mut h = PackedBf16::default();
                h.reset(n, inter);
                let hv = h.view();
                // SAFETY: has_bf16(); x packed; g and u are [n, inter]; two calls write
                // disjoint column ranges of h (the first ends at an even column).
                unsafe {
                    gemm_bf16_packed(xv, inter, &gate, g.as_mut_ptr(), inter);
                    gemm_bf16_packed(xv, inter, &up, u.as_mut_ptr(), inter);
                    let split = inter / 4 * 2;
                    swiglu_bf16_packed(xv, split, &gate, &up, hv, 0);
                    swiglu_bf16_packed(
                        xv,
                        inter - split,
                        &gate[split * k..],
                        &up[split * k..],
                        hv,
                        split,
                    );
                }
                crate::kernels::ops::silu_mul(&mut g, &u);
                let want = pool_free(&g, n, inter);
                let len = want.groups() * want.pairs();
                for (i, (a, b)) in h.lines[..len].iter().zip(&want.lines[..len]).enumerate() {
                    assert_eq!(a.0, b.0, "{n}x{inter}x{k} line {i}");
                }
            }
        }
    }

    /// Timing of tile shapes (run with `--ignored --nocapture`): the interleaved medians
    /// that picked TILE_TOKENS x TILE_ROWS.
    #[test]
    #[ignore]
    fn tile_shapes_timing() {
        let (n, m, k) = (128, 1536, 576);
        let w = data(m * k, 1);
        let x = data(n * k, 2);
        let wb: Vec<u16> = w
            .iter()
            .map(|&v| super::super::dot::f32_to_bf16(v))
            .collect();
        let xb: Vec<u16> = x
            .iter()
            .map(|&v| super::super::dot::f32_to_bf16(v))
            .collect();
        let mut out = vec![0f32; n * m];
        let shapes = [
            (4, 4),
            (6, 4),
            (8, 3),
            (8, 2),
            (5, 4),
            (4, 3),
            (3, 4),
            (2, 4),
        ];
        let mut times = vec![(Vec::new(), Vec::new()); shapes.len()];
        for _ in 0..15 {
            for (s, &(tt, tr)) in shapes.iter().enumerate() {
                let t0 = std::time::Instant::now();
                // SAFETY: out is [n, m].
                unsafe { gemm_f32_tiled(tt, tr, n, m, k, &x, &w, out.as_mut_ptr(), m) };
                let t1 = std::time::Instant::now();
                if has_bf16() {
                    // SAFETY: out is [n, m].
                    unsafe { gemm_bf16_tiled(tt, tr, n, m, k, &xb, &wb, out.as_mut_ptr(), m) };
                }
                let t2 = std::time::Instant::now();
                times[s].0.push((t1 - t0).as_secs_f64());
                times[s].1.push((t2 - t1).as_secs_f64());
            }
        }
        let flop = 2.0 * (n * m * k) as f64;
        let mut crate_t = Vec::new();
        let mut l1 = (Vec::new(), Vec::new());
        for _ in 0..15 {
            let t0 = std::time::Instant::now();
            // SAFETY: out is [n, m] with row stride m; x is [n, k] and w is [m, k].
            unsafe { crate::kernels::linear::gemm_f32(n, m, k, out.as_mut_ptr(), m, &x, &w) };
            crate_t.push(t0.elapsed().as_secs_f64());
            // In-L1 peak: a 4x4 tile over k = 512, repeated.
            let t0 = std::time::Instant::now();
            for _ in 0..2000 {
                // SAFETY: out holds 4 rows of stride m.
                unsafe { gemm_f32_tiled(4, 4, 4, 4, 512, &x, &w, out.as_mut_ptr(), m) };
            }
            let t1 = std::time::Instant::now();
            for _ in 0..2000 {
                // SAFETY: as above.
                unsafe { gemm_bf16_tiled(4, 4, 4, 4, 512, &xb, &wb, out.as_mut_ptr(), m) };
            }
            let t2 = std::time::Instant::now();
            l1.0.push((t1 - t0).as_secs_f64());
            l1.1.push((t2 - t1).as_secs_f64());
        }
        crate_t.sort_by(f64::total_cmp);
        l1.0.sort_by(f64::total_cmp);
        l1.1.sort_by(f64::total_cmp);
        let f1 = 2000.0 * 2.0 * 16.0 * 512.0;
        println!(
            "gemm crate f32 {:.1} GFLOP/s; in-L1 4x4 f32 {:.1}, bf16 {:.1} GFLOP/s",
            flop / crate_t[7] / 1e9,
            f1 / l1.0[7] / 1e9,
            f1 / l1.1[7] / 1e9
        );
        for (s, (a, b)) in shapes.iter().zip(times.iter_mut()) {
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            println!(
                "tile {}x{}: f32 {:.1} GFLOP/s, bf16 {:.1} GFLOP/s",
                s.0,
                s.1,
                flop / a[a.len() / 2] / 1e9,
                flop / b[b.len() / 2] / 1e9
            );
        }
    }
}
