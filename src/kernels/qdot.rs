//! Dot products of GGUF's quantized weight rows (Q8_0, Q4_0, Q4_1) with activations
//! quantized to 8 bits per 32-element block, as llama.cpp computes them: integer products
//! of the quants, scaled once per block.
//!
//! The activations are quantized once per matrix-vector product into [`QPair`]s (two
//! blocks each: 64 signed quants plus each block's scale `dx`, `s = dx·Σq` and the
//! integer `Σq`). For a weight block with scale `dw` and an activation block `(dx, q_j)`,
//! with `isum` the exact integer sum of the products of the quants:
//! - Q4_1 (`w = dw·n + m`, n a nibble): `isum = Σ n_j q_j`, adds `dw·dx·isum + m·s`
//! - Q4_0 (`w = dw·(n - 8)`):           `isum = Σ (n_j - 8) q_j`, adds `dw·dx·isum`
//! - Q8_0 (`w = dw·c`, c signed):       `isum = Σ c_j q_j`, adds `dw·dx·isum`
//!
//! Every kernel adds the blocks in row order with the same fused multiply-adds
//! ([`block_acc`]), and the integer sums are exact, so every kernel (decode, prefill,
//! batched decode, the scalar reference) gives the same result bit for bit.
//!
//! On AVX-512 VNNI, 16 rows run at once as outer products ([`group_vnni`]): each block's
//! quants are transposed into vectors of four bytes per row and `vpdpbusd` takes four of
//! an activation's quants broadcast, so each row's block sum lands in its own lane and
//! one convert and one FMA serve 16 rows (the weight side is unpacked once for up to 8
//! activation vectors). Q8_0's quants are offset by 128 (and Q4_0's nibbles by 8) to
//! make them unsigned; `Σq` takes the offset back in integers. AVX2 (`vpmaddubsw`, one
//! block at a time) and scalar code are the fallbacks, picked at run time. Quantizing the
//! activations is the only approximation beyond the weights' own: each activation moves
//! by at most `dx/2`, which bounds the error the tests check.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

use bytemuck::{Pod, Zeroable};

use super::dot::{Isa, isa};
use crate::quant::blocks;
use crate::quant::{QFormat, QK, f16_le};

/// Two consecutive 32-element blocks of quantized activations.
#[repr(C, align(16))]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct QPair {
    /// `[dx0, s0, dx1, s1]`: each block's scale and `scale · sum of its quants`.
    pub ds: [f32; 4],
    /// Block 0's quants, then block 1's.
    pub qs: [i8; 2 * QK],
    /// `scale · sum of the quants` of each 16-element half of each block (the offsets of
    /// the formats with one scale per 16 weights multiply these).
    pub s16: [f32; 4],
    /// Block 0's scale in lanes 0..8, block 1's in 8..16: the layout of `chunks_vnni`'s
    /// sums, stored once here rather than shuffled into place for every weight row.
    pub dx16: [f32; 16],
    /// `[Σq0, Σq1, 0, 0]`: each block's integer quant sum, which turns the legacy
    /// kernels' offset products (Q8_0's quants + 128, Q4_0's nibbles) back into exact
    /// signed sums.
    pub qsum: [i32; 4],
}

impl QPair {
    /// Records block `half`'s scale `d` and its 16-quant halves' sums (`ds`: d and d·Σq;
    /// `s16`: d·Σq per half).
    fn set_block(&mut self, half: usize, d: f32, sums: [i32; 2]) {
        self.ds[2 * half] = d;
        self.ds[2 * half + 1] = d * (sums[0] + sums[1]) as f32;
        self.s16[2 * half] = d * sums[0] as f32;
        self.s16[2 * half + 1] = d * sums[1] as f32;
        self.qsum[half] = sums[0].wrapping_add(sums[1]);
    }

    /// Fills `dx16` from the scales in `ds`.
    fn spread_scales(&mut self) {
        let (a, b) = self.dx16.split_at_mut(8);
        a.fill(self.ds[0]);
        b.fill(self.ds[2]);
    }
}

/// Quantizes `x` (a whole number of 32-element blocks) into `out`, resized to
/// `ceil(blocks / 2)` pairs; a missing second block of the last pair is zero.
///
/// Per block: `dx = max|x| / 127`, `q = round(x / dx)` rounding halves away from zero
/// (ggml's `quantize_row_q8_1`). The AVX-512 version gives the same quants and scales
/// bit for bit (the tests check), so decode and batched products agree whichever ran.
pub fn quantize_activations(x: &[f32], out: &mut Vec<QPair>) {
    assert!(
        x.len().is_multiple_of(QK),
        "activations of {} elements",
        x.len()
    );
    let blocks = x.len() / QK;
    out.clear();
    out.resize(blocks.div_ceil(2), QPair::zeroed());
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let pair = &mut out[b / 2];
        let half = b % 2;
        let qs = &mut pair.qs[half * QK..(half + 1) * QK];
        let (d, sums) = match isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: isa() checked AVX-512F/BW/VL; xb and qs hold QK elements each.
            Isa::Avx512 => unsafe { quantize_block_avx512(xb, qs) },
            _ => quantize_block_scalar(xb, qs),
        };
        pair.set_block(half, d, sums);
    }
    out.iter_mut().for_each(QPair::spread_scales);
}

/// One block of [`quantize_activations`]: the scale and the sums of each 16-quant half.
fn quantize_block_scalar(xb: &[f32], qs: &mut [i8]) -> (f32, [i32; 2]) {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sums = [0i32; 2];
    for (j, (q, &v)) in qs.iter_mut().zip(xb).enumerate() {
        *q = round_half_away(v * id) as i8;
        sums[j / 16] += *q as i32;
    }
    (d, sums)
}

/// `x.round()` for |x| < 2^23, without the libm call `round` compiles to on baseline
/// x86-64 (it was an eighth of a batched decode step): truncate, then step away from
/// zero when the dropped fraction (exact) is at least one half.
#[inline]
fn round_half_away(x: f32) -> f32 {
    let t = x as i32 as f32;
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// [`quantize_block_scalar`] on AVX-512, the same arithmetic lane by lane.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL; `xb` and `qs` hold [`QK`] elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block_avx512(xb: &[f32], qs: &mut [i8]) -> (f32, [i32; 2]) {
    assert!(xb.len() == QK && qs.len() == QK);
    // SAFETY: both slices hold 32 elements (asserted): two vectors of 16 each.
    unsafe {
        let v = [
            _mm512_loadu_ps(xb.as_ptr()),
            _mm512_loadu_ps(xb.as_ptr().add(16)),
        ];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_ps(1.0);
        let mut sums = [0i32; 2];
        for (h, &vh) in v.iter().enumerate() {
            let r = _mm512_mul_ps(vh, id);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(r, t)), half);
            // copysign(1, r): 1.0's bits with r's sign bit.
            let step = _mm512_or_ps(
                one,
                _mm512_and_ps(r, _mm512_castsi512_ps(_mm512_set1_epi32(i32::MIN))),
            );
            // NaN converts to i32::MIN; Rust's cast (the scalar path) gives 0.
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r);
            let q = _mm512_maskz_mov_epi32(
                ordered,
                _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step)),
            );
            sums[h] = _mm512_reduce_add_epi32(q);
            _mm_storeu_si128(
                qs.as_mut_ptr().add(16 * h) as *mut __m128i,
                _mm512_cvtsepi32_epi8(q),
            );
        }
        (amax / 127.0, sums)
    }
}

/// Quantizes `x` for products with weights of `fmt`, as ggml does: one scale per
/// 32-element block for the 32-element formats ([`quantize_activations`], ggml's q8_0 and
/// q8_1), one per 256 elements for the K-quants (ggml's q8_K: the value of largest
/// magnitude maps to -127, quants rounded half to even), written into the same
/// 32-element blocks. A last group shorter than 256 (a gathered vector) has its own scale.
pub fn quantize_activations_for(fmt: QFormat, x: &[f32], out: &mut Vec<QPair>) {
    if fmt.block_elems() == QK {
        return quantize_activations(x, out);
    }
    assert!(
        x.len().is_multiple_of(QK),
        "activations of {} elements",
        x.len()
    );
    out.clear();
    out.resize((x.len() / QK).div_ceil(2), QPair::zeroed());
    for (gi, xg) in x.chunks(crate::quant::QK_K).enumerate() {
        let max = match isa() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: isa() checked AVX-512F/BW/VL; xg is whole 32-element blocks.
            Isa::Avx512 => unsafe { first_abs_max_avx512(xg) },
            _ => first_abs_max(xg),
        };
        let (d, iscale) = if max == 0.0 {
            (0.0, 0.0)
        } else {
            let iscale = -127.0 / max;
            (1.0 / iscale, iscale)
        };
        for (bi, xb) in xg.chunks_exact(QK).enumerate() {
            let b = gi * (crate::quant::QK_K / QK) + bi;
            let pair = &mut out[b / 2];
            let half = b % 2;
            let qs = &mut pair.qs[half * QK..(half + 1) * QK];
            let sums = match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: isa() checked AVX-512F/BW/VL; xb and qs hold QK elements each.
                Isa::Avx512 => unsafe { quantize_block_k_avx512(xb, iscale, qs) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: isa() checked AVX2 (which implies SSE4.1).
                Isa::Avx2 => unsafe { quantize_block_k_sse41(xb, iscale, qs) },
                _ => quantize_block_k_scalar(xb, iscale, qs),
            };
            pair.set_block(half, d, sums);
        }
    }
    out.iter_mut().for_each(QPair::spread_scales);
}

/// The first element of largest magnitude (NaNs skipped; 0.0 when all are zero): q8_K's
/// reference value, which maps to -127.
fn first_abs_max(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// [`first_abs_max`] on AVX-512: the largest magnitude by vectors, then the first element
/// that has it.
///
/// # Safety
/// The CPU must have AVX-512 F; `x.len()` is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn first_abs_max_avx512(x: &[f32]) -> f32 {
    assert!(x.len().is_multiple_of(16));
    let mut m = _mm512_setzero_ps();
    for c in x.chunks_exact(16) {
        // SAFETY: c holds 16 floats. `max(v, m)` returns m when v is NaN, as the scalar
        // fold skips NaNs.
        m = _mm512_max_ps(_mm512_abs_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }), m);
    }
    let amax = _mm512_reduce_max_ps(m);
    if amax == 0.0 {
        return 0.0;
    }
    // The first element whose magnitude equals the maximum is the one the scalar fold
    // keeps (it replaces only on a strictly larger magnitude).
    x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
}

/// One 32-element block of q8_K: `q = round_half_even(v · iscale)` capped at 127, and the
/// sums of each 16-element half.
#[inline(always)]
fn quantize_block_k_scalar(xb: &[f32], iscale: f32, qs: &mut [i8]) -> [i32; 2] {
    let mut sums = [0i32; 2];
    for (j, (q, &v)) in qs.iter_mut().zip(xb).enumerate() {
        *q = ((v * iscale).round_ties_even() as i32).min(127) as i8;
        sums[j / 16] += *q as i32;
    }
    sums
}

/// [`quantize_block_k_scalar`] compiled with SSE4.1, where `round_ties_even` is one
/// `roundss` instead of a call to libm's `rintf`: the same code, so the same quants.
///
/// # Safety
/// The CPU must have SSE4.1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn quantize_block_k_sse41(xb: &[f32], iscale: f32, qs: &mut [i8]) -> [i32; 2] {
    quantize_block_k_scalar(xb, iscale, qs)
}

/// [`quantize_block_k_scalar`] on AVX-512, the same arithmetic lane by lane (libm's
/// `rintf` per element was a seventh of a Gemma 3 prefill).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL; `xb` and `qs` hold [`QK`] elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block_k_avx512(xb: &[f32], iscale: f32, qs: &mut [i8]) -> [i32; 2] {
    assert!(xb.len() == QK && qs.len() == QK);
    let is = _mm512_set1_ps(iscale);
    let mut sums = [0i32; 2];
    for (h, sum) in sums.iter_mut().enumerate() {
        // SAFETY: both slices hold 32 elements (asserted): vector h of two.
        unsafe {
            let r = _mm512_mul_ps(_mm512_loadu_ps(xb.as_ptr().add(16 * h)), is);
            let q =
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
            // Rust's `as i32` takes NaN to 0 (the instruction gives i32::MIN).
            let q = _mm512_mask_mov_epi32(
                q,
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(r, r),
                _mm512_setzero_si512(),
            );
            let q = _mm512_min_epi32(q, _mm512_set1_epi32(127));
            *sum = _mm512_reduce_add_epi32(q);
            _mm_storeu_si128(
                qs.as_mut_ptr().add(16 * h) as *mut __m128i,
                _mm512_cvtsepi32_epi8(q),
            );
        }
    }
    sums
}

/// The activation block `b` of `x`: (dx, s, quants).
#[inline]
fn act_block(x: &[QPair], b: usize) -> (f32, f32, &[i8]) {
    let p = &x[b / 2];
    let h = b % 2;
    (p.ds[2 * h], p.ds[2 * h + 1], &p.qs[h * QK..(h + 1) * QK])
}

/// The activation block `b` of `x` for the chunk kernels: (dx, the two 16-element
/// halves' `dx · Σq`, quants).
#[inline]
fn act_chunk(x: &[QPair], b: usize) -> (f32, [f32; 2], &[i8]) {
    let p = &x[b / 2];
    let h = b % 2;
    (
        p.ds[2 * h],
        [p.s16[2 * h], p.s16[2 * h + 1]],
        &p.qs[h * QK..(h + 1) * QK],
    )
}

/// Chunk `c` of the block `blk` (a Q5_0, Q5_1 or K-quant block) times one activation
/// block, in scalar code: per 16-element group `a·dx·Σ u·q + b·(dx·Σq)`.
#[inline]
fn chunk_dot_scalar(fmt: QFormat, blk: &[u8], c: usize, dx: f32, xs: [f32; 2], q: &[i8]) -> f32 {
    let mut u = [0u8; QK];
    blocks::chunk_quants(fmt, blk, c, &mut u);
    let p = blocks::chunk_params(fmt, blk, c);
    let b = p.offsets();
    let mut s = 0f32;
    for g in 0..2 {
        let i: i32 = (16 * g..16 * g + 16)
            .map(|l| u[l] as i32 * q[l] as i32)
            .sum();
        s += p.a[g] * dx * i as f32 + b[g] * xs[g];
    }
    s
}

/// Chunk `k` of a row of `fmt` (32-element chunks counted along the row): its block's
/// bytes and its index inside the block.
#[inline]
fn row_chunk(fmt: QFormat, row: &[u8], k: usize) -> (&[u8], usize) {
    let (bb, cpb) = (fmt.block_bytes(), fmt.chunks_per_block());
    let b = k / cpb;
    (&row[b * bb..(b + 1) * bb], k % cpb)
}

/// Chunks (of 32 elements) in a row of `row_bytes` bytes.
#[inline]
fn row_chunks(fmt: QFormat, row_bytes: usize) -> usize {
    row_bytes / fmt.block_bytes() * fmt.chunks_per_block()
}

/// The exact signed integer product of one legacy weight block's quants with one
/// activation block's: `Σ c·q` (Q8_0), `Σ (n - 8)·q` (Q4_0), `Σ n·q` (Q4_1).
#[inline]
fn block_isum_scalar(fmt: QFormat, wb: &[u8], q: &[i8]) -> i32 {
    let qs = &wb[fmt.qs_offset()..fmt.block_bytes()];
    match fmt {
        QFormat::Q8_0 => qs
            .iter()
            .zip(q)
            .map(|(&c, &q)| c as i8 as i32 * q as i32)
            .sum(),
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let off = if fmt == QFormat::Q4_0 { 8 } else { 0 };
            (0..QK / 2)
                .map(|j| {
                    ((qs[j] & 0x0f) as i32 - off) * q[j] as i32
                        + ((qs[j] >> 4) as i32 - off) * q[j + QK / 2] as i32
                })
                .sum()
        }
        _ => unreachable!("{} runs on the chunk kernels", fmt.name()),
    }
}

/// One legacy weight block times one activation block `(dx, s, isum)`, added to `acc`
/// in the one order every legacy kernel follows: `acc = fma(isum, dw·dx, acc)`, then for
/// Q4_1 `acc = fma(m, s, acc)`. The integer sum is exact, so this order (and the order
/// of the blocks) fixes the result bit for bit, whichever kernel computed the sum.
#[inline(always)]
fn block_acc(fmt: QFormat, dw: f32, m: f32, dx: f32, s: f32, isum: i32, acc: f32) -> f32 {
    let acc = (isum as f32).mul_add(dw * dx, acc);
    if fmt == QFormat::Q4_1 {
        m.mul_add(s, acc)
    } else {
        acc
    }
}

/// A legacy block's scale `dw` and Q4_1's minimum `m` (0 for the others), from its first
/// four bytes.
#[inline(always)]
fn block_dm(fmt: QFormat, head: [u8; 4]) -> (f32, f32) {
    let m = if fmt == QFormat::Q4_1 {
        f16_le([head[2], head[3]])
    } else {
        0.0
    };
    (f16_le([head[0], head[1]]), m)
}

/// [`block_acc`] on a weight block's bytes, in scalar code.
#[inline]
fn block_acc_scalar(fmt: QFormat, wb: &[u8], dx: f32, s: f32, q: &[i8], acc: f32) -> f32 {
    let (dw, m) = block_dm(fmt, [wb[0], wb[1], wb[2], wb[3]]);
    block_acc(fmt, dw, m, dx, s, block_isum_scalar(fmt, wb, q), acc)
}

/// Scalar reference: the dot product of one quantized row (`w`: whole blocks) with the
/// quantized activations `x` (at least as many blocks).
pub fn dot_scalar(fmt: QFormat, w: &[u8], x: &[QPair]) -> f32 {
    let bb = fmt.block_bytes();
    assert!(w.len().is_multiple_of(bb));
    if !fmt.is_legacy() {
        let chunks = row_chunks(fmt, w.len());
        assert!(x.len() * 2 >= chunks, "activations shorter than the row");
        return (0..chunks)
            .map(|k| {
                let (blk, c) = row_chunk(fmt, w, k);
                let (dx, xs, q) = act_chunk(x, k);
                chunk_dot_scalar(fmt, blk, c, dx, xs, q)
            })
            .sum();
    }
    let blocks = w.len() / bb;
    assert!(x.len() * 2 >= blocks, "activations shorter than the row");
    (0..blocks).fold(0.0, |acc, b| {
        let (dx, s, q) = act_block(x, b);
        block_acc_scalar(fmt, &w[b * bb..(b + 1) * bb], dx, s, q, acc)
    })
}

/// Whether the AVX-512 VNNI kernels run (AVX-512 F/BW/VL + VNNI + F16C); `SPARSELLM_ISA`
/// below avx512 turns them off.
pub fn has_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            isa() == Isa::Avx512
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the AVX2 kernels run (AVX2 + FMA + F16C), when VNNI does not.
pub(crate) fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            isa() != Isa::Scalar && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// How far ahead of the current weight pair the chunk kernel prefetches: the hardware
/// prefetcher fell behind a compute-bound 8-token pass (its weight loads stalled for a
/// quarter of its time), and behind one vector's decode on this host too.
const PREFETCH_BYTES: usize = 1024;

/// Unaligned little-endian u16 at `p`.
///
/// # Safety
/// `p..p + 2` must be readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn read_u16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes; read_unaligned has no alignment need.
    unsafe { std::ptr::read_unaligned(p as *const u16) }
}

/// Unaligned little-endian u32 at `p`.
///
/// # Safety
/// `p..p + 4` must be readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn read_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes; read_unaligned has no alignment need.
    unsafe { std::ptr::read_unaligned(p as *const u32) }
}

/// What the VNNI kernels add per unit of an activation block's `Σq` to turn their
/// unsigned products back into the signed ones: Q8_0's quants enter `vpdpbusd` as
/// c + 128, Q4_0's as n = c + 8; Q4_1's nibbles are its own quants.
#[cfg(target_arch = "x86_64")]
const fn unsigned_offset(fmt: QFormat) -> i32 {
    match fmt {
        QFormat::Q8_0 => -128,
        QFormat::Q4_0 => -8,
        _ => 0,
    }
}

/// Weight rows per group of [`group_vnni`]: one 512-bit vector holds a block's integer
/// sum for each of 16 rows.
#[cfg(target_arch = "x86_64")]
const GROUP_ROWS: usize = 16;

/// Rows of `w` (each `row_bytes` long) dotted with the `T` activation vectors `x`, AVX-512
/// VNNI: `out[r·T + t] = row r · x[t]` for `out.len() / T` rows. Every (row, vector)
/// product is [`block_acc`] over the blocks in turn on exact integer sums, so it is the
/// same bit for bit whatever `T` is, whichever rows share its group and whichever kernel
/// ran: a prefill or batched product equals decode's, and equals [`dot_scalar`].
///
/// Whole groups of 16 rows run as outer products ([`group_vnni`]), the rows left over
/// one at a time ([`row_vnni`]).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, VNNI and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
unsafe fn rows_vnni<const F: u8, const GATHER: bool, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    idx: &[u32],
    x: [&[QPair]; T],
    out: &mut [f32],
) {
    let bb = format_of(F).block_bytes();
    let blocks = if GATHER { idx.len() } else { row_bytes / bb };
    let rows = out.len() / T;
    assert!(w.len() >= rows * row_bytes && x.iter().all(|x| x.len() * 2 >= blocks));
    assert!(!GATHER || idx.iter().all(|&b| (b as usize + 1) * bb <= row_bytes));
    let groups = rows / GROUP_ROWS;
    assert!(
        groups == 0 || row_bytes * GROUP_ROWS <= i32::MAX as usize,
        "rows_q: row too long"
    );
    for (g, o) in out.chunks_exact_mut(GROUP_ROWS * T).enumerate() {
        // SAFETY: group g's 16 rows lie inside w (asserted above), each with `blocks`
        // blocks (or the asserted indices); the features are the caller's.
        unsafe {
            group_vnni::<F, GATHER, T>(
                w.as_ptr().add(g * GROUP_ROWS * row_bytes),
                row_bytes,
                idx,
                blocks,
                x,
                o,
            )
        }
    }
    for r in groups * GROUP_ROWS..rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for t in 0..T {
            // SAFETY: as above, for one row.
            out[r * T + t] = unsafe { row_vnni::<F, GATHER>(row, idx, blocks, x[t]) };
        }
    }
}

/// The 16-byte runs at `p + r·row_bytes` (r < 16) transposed by 32-bit words: word i of
/// the result's lane r is word i of run r.
///
/// # Safety
/// AVX-512F; the 16 runs must be readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn words_by_row(p: *const u8, row_bytes: usize) -> [__m512i; 4] {
    // SAFETY: the caller guarantees the 16 runs.
    let ld = |r: usize| unsafe { _mm_loadu_si128(p.add(r * row_bytes) as *const __m128i) };
    // Lane L of z[j] holds run 4L + j; a 4x4 transpose within each lane follows.
    let z: [__m512i; 4] = std::array::from_fn(|j| {
        let v = _mm512_castsi128_si512(ld(j));
        let v = _mm512_inserti32x4::<1>(v, ld(4 + j));
        let v = _mm512_inserti32x4::<2>(v, ld(8 + j));
        _mm512_inserti32x4::<3>(v, ld(12 + j))
    });
    let t0 = _mm512_unpacklo_epi32(z[0], z[1]);
    let t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    let t2 = _mm512_unpacklo_epi32(z[2], z[3]);
    let t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// 16 rows from `w` (`row_bytes` apart) times the `T` vectors `x` as outer products: for
/// each block, the rows' quants are transposed into eight vectors of four bytes per row,
/// and each holds against four of a vector's quants broadcast (`vpdpbusd`), which leaves
/// every row's exact block sum in its own lane; one scale per lane follows.
/// `out[r·T + t]` for r < 16.
///
/// # Safety
/// AVX-512 F/BW/VL, VNNI and F16C; the 16 rows of `row_bytes` bytes at `w` are readable
/// and hold `blocks` blocks each (or the blocks `idx`, inside the row); every `x[t]` has
/// `blocks` blocks; `row_bytes · 16` fits an i32; `out` has `16·T` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
unsafe fn group_vnni<const F: u8, const GATHER: bool, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    idx: &[u32],
    blocks: usize,
    x: [&[QPair]; T],
    out: &mut [f32],
) {
    let fmt = format_of(F);
    let (bb, qo) = (fmt.block_bytes(), fmt.qs_offset());
    let offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(row_bytes as i32),
    );
    let nib = _mm512_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(-128);
    let offset = unsigned_offset(fmt);
    let mut acc = [_mm512_setzero_ps(); T];
    for j in 0..blocks {
        // SAFETY: block b of each of the 16 rows is inside the rows (the caller's
        // guarantee); pair j / 2 inside every x[t]; every load below stays in those.
        unsafe {
            let b = if GATHER {
                *idx.get_unchecked(j) as usize
            } else {
                j
            };
            let p = w.add(b * bb);
            if !GATHER {
                // The next group's bytes, a block's share per block: the group's rows
                // are read as 16 streams at once, which the hardware prefetcher follows
                // too late (one vector: 200 -> 260 tok/s decode; 8 vectors: 550 -> 700;
                // wrapping_add keeps the address defined past the slice's end, and a
                // prefetch never faults).
                let ahead = w.wrapping_add(GROUP_ROWS * row_bytes + j * GROUP_ROWS * bb);
                for l in (0..GROUP_ROWS * bb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                }
            }
            // Each row's first four bytes: d, then Q4_1's m (the others' first quants).
            let head = _mm512_i32gather_epi32::<1>(offsets, p as *const _);
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
            let m = if fmt == QFormat::Q4_1 {
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head)))
            } else {
                _mm512_setzero_ps()
            };
            // wv[k]: the quants k·4 .. k·4 + 4 of each row, as unsigned bytes.
            let wv: [__m512i; 8] = if fmt == QFormat::Q8_0 {
                let lo = words_by_row(p.add(qo), row_bytes);
                let hi = words_by_row(p.add(qo + 16), row_bytes);
                std::array::from_fn(|k| {
                    _mm512_xor_si512(if k < 4 { lo[k] } else { hi[k - 4] }, flip)
                })
            } else {
                // Byte i holds quant i (low nibble) and quant i + 16 (high nibble).
                let v = words_by_row(p.add(qo), row_bytes);
                std::array::from_fn(|k| {
                    if k < 4 {
                        _mm512_and_si512(v[k], nib)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v[k - 4]), nib)
                    }
                })
            };
            let h = j % 2;
            for t in 0..T {
                let xp = x[t].get_unchecked(j / 2);
                let xq = xp.qs.as_ptr().add(h * QK);
                let bc = |k: usize| _mm512_set1_epi32(read_u32(xq.add(4 * k) as *const u8) as i32);
                // Two chains of four, so one vector's sums need not wait on eight in turn.
                let mut i0 = _mm512_set1_epi32(offset * xp.qsum[h]);
                let mut i1 = _mm512_setzero_si512();
                for k in 0..4 {
                    i0 = _mm512_dpbusd_epi32(i0, wv[k], bc(k));
                    i1 = _mm512_dpbusd_epi32(i1, wv[k + 4], bc(k + 4));
                }
                let isum = _mm512_add_epi32(i0, i1);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(xp.ds[2 * h]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[t]);
                if fmt == QFormat::Q4_1 {
                    acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xp.ds[2 * h + 1]), acc[t]);
                }
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        let mut v = [0f32; GROUP_ROWS];
        // SAFETY: v holds 16 floats.
        unsafe { _mm512_storeu_ps(v.as_mut_ptr(), *a) };
        for (r, &s) in v.iter().enumerate() {
            out[r * T + t] = s;
        }
    }
}

/// One row of [`rows_vnni`] times one vector: each pair of blocks' integer sums from one
/// `vpdpbusd`, then [`block_acc`] per block, the same arithmetic as [`group_vnni`]'s lanes.
///
/// # Safety
/// AVX-512 F/BW/VL, VNNI and F16C; `row` holds `blocks` blocks (or the blocks `idx`,
/// inside it) and `x` at least `blocks` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
unsafe fn row_vnni<const F: u8, const GATHER: bool>(
    row: &[u8],
    idx: &[u32],
    blocks: usize,
    x: &[QPair],
) -> f32 {
    let fmt = format_of(F);
    let (bb, qo) = (fmt.block_bytes(), fmt.qs_offset());
    let nib = _mm256_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(-128);
    let offset = unsigned_offset(fmt);
    let block_at = |j: usize| if GATHER { idx[j] as usize } else { j };
    let mut acc = 0f32;
    for (p, xp) in x[..blocks / 2].iter().enumerate() {
        let (b0, b1) = (block_at(2 * p) * bb, block_at(2 * p + 1) * bb);
        let (w0, w1) = (&row[b0..b0 + bb], &row[b1..b1 + bb]);
        // SAFETY: w0 and w1 are whole blocks (slices checked above), xp holds 64 quants.
        let sums = unsafe {
            let (q0, q1) = (w0.as_ptr().add(qo), w1.as_ptr().add(qo));
            let wq = if fmt == QFormat::Q8_0 {
                _mm512_xor_si512(
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(q0 as *const _)),
                        _mm256_loadu_si256(q1 as *const _),
                    ),
                    flip,
                )
            } else {
                let q = _mm256_loadu2_m128i(q1 as *const __m128i, q0 as *const __m128i);
                let lo = _mm256_and_si256(q, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), nib);
                // [lo0, lo1, hi0, hi1] -> [lo0, hi0, lo1, hi1]: block order.
                let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z)
            };
            let xq = _mm512_loadu_si512(xp.qs.as_ptr() as *const _);
            let v = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xq);
            [
                _mm512_mask_reduce_add_epi32(0x00ff, v),
                _mm512_mask_reduce_add_epi32(0xff00, v),
            ]
        };
        for (h, wb) in [w0, w1].into_iter().enumerate() {
            let (dw, m) = block_dm(fmt, [wb[0], wb[1], wb[2], wb[3]]);
            let isum = sums[h] + offset * xp.qsum[h];
            acc = block_acc(fmt, dw, m, xp.ds[2 * h], xp.ds[2 * h + 1], isum, acc);
        }
    }
    if blocks % 2 == 1 {
        let j = blocks - 1;
        let b = block_at(j) * bb;
        let (dx, s, q) = act_block(x, j);
        acc = block_acc_scalar(fmt, &row[b..b + bb], dx, s, q, acc);
    }
    acc
}

/// As [`rows_vnni`] with AVX2: one block per step, `vpmaddubsw` on unsigned x signed
/// bytes (Q8_0 by the sign trick: |w| times x with w's sign).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `out.len()` rows of `row_bytes`
/// bytes, a whole number of blocks, and `x` at least as many blocks (or `idx.len()`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<const F: u8, const GATHER: bool>(
    w: &[u8],
    row_bytes: usize,
    idx: &[u32],
    x: &[QPair],
    out: &mut [f32],
) {
    let fmt = format_of(F);
    let bb = fmt.block_bytes();
    let qo = fmt.qs_offset();
    let blocks = if GATHER { idx.len() } else { row_bytes / bb };
    assert!(w.len() >= out.len() * row_bytes && x.len() * 2 >= blocks);
    assert!(!GATHER || idx.iter().all(|&b| (b as usize + 1) * bb <= row_bytes));
    let nib = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let offset = if fmt == QFormat::Q4_0 { -8 } else { 0 };
    for (r, o) in out.iter_mut().enumerate() {
        let row = w[r * row_bytes..(r + 1) * row_bytes].as_ptr();
        let mut acc = 0f32;
        for b in 0..blocks {
            let (dx, sx, q) = act_block(x, b);
            let h = b % 2;
            // SAFETY: block b (or idx[b], asserted) lies inside the row; q has 32 quants.
            unsafe {
                let blk = row.add(
                    if GATHER {
                        *idx.get_unchecked(b) as usize
                    } else {
                        b
                    } * bb,
                );
                let xq = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
                let prod16 = match fmt {
                    QFormat::Q8_0 => {
                        // |w| times x with w's sign: the signed products, exactly.
                        let wq = _mm256_loadu_si256(blk.add(qo) as *const __m256i);
                        _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq))
                    }
                    _ => {
                        let q16 = _mm_loadu_si128(blk.add(qo) as *const __m128i);
                        let q = _mm256_set_m128i(_mm_srli_epi16::<4>(q16), q16);
                        _mm256_maddubs_epi16(_mm256_and_si256(q, nib), xq)
                    }
                };
                let v = _mm256_madd_epi16(prod16, ones);
                let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
                let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01>(v));
                let isum = _mm_cvtsi128_si32(v).wrapping_add(offset * x[b / 2].qsum[h]);
                let (dw, m) = block_dm(fmt, read_u32(blk).to_le_bytes());
                acc = block_acc(fmt, dw, m, dx, sx, isum, acc);
            }
        }
        *o = acc;
    }
}

/// Rows in the lanes on AVX2: [`rows_avx2`]'s products for `T` activation vectors, 8 rows
/// at a time, `out[r·stride + t] = row r · x[t]` for `rows` rows. Per block, the 8 rows'
/// quants are transposed into vectors of four bytes per row, multiplied by four of a
/// vector's quants broadcast (`vpmaddubsw`, then `vpmaddwd` by ones), which leaves each
/// row's exact block sum in its own lane; [`block_acc`]'s FMAs then run on 8 rows at once,
/// so the dependent FMA chain of one row (the latency that bounds [`rows_avx2`]) is shared
/// by 8, and the weights are read once for `T` vectors. The sums are exact integers
/// (Q4: 8 pair sums of at most 2·15·128 add up in 16 bits below 2^15; Q8_0: each pair sum
/// of at most 2·128·127 widened at once), so every product equals [`rows_avx2`]'s and
/// [`dot_scalar`]'s bit for bit. Rows past the last whole 8 run in [`rows_avx2`].
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `rows` rows of `row_bytes` bytes, a
/// whole number of blocks; each `x[t]` holds as many blocks; `out` has
/// `(rows - 1)·stride + T` elements, `T <= stride`; `8·row_bytes` fits an i32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2_lanes<const F: u8, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: [&[QPair]; T],
    out: &mut [f32],
    stride: usize,
) {
    let fmt = format_of(F);
    let (bb, qo) = (fmt.block_bytes(), fmt.qs_offset());
    let blocks = row_bytes / bb;
    assert!(T <= stride && (rows == 0 || out.len() >= (rows - 1) * stride + T));
    assert!(w.len() >= rows * row_bytes && x.iter().all(|x| x.len() * 2 >= blocks));
    assert!(row_bytes * 8 <= i32::MAX as usize, "rows_q: row too long");
    let nib = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let offset = if fmt == QFormat::Q4_0 { -8 } else { 0 };
    let rb = row_bytes as i32;
    let row_offsets = _mm256_setr_epi32(0, rb, 2 * rb, 3 * rb, 4 * rb, 5 * rb, 6 * rb, 7 * rb);
    let groups = rows / 8;
    for g in 0..groups {
        // SAFETY: group g's 8 rows lie inside w (asserted); every load below reads block b
        // of one of them (its 4 head bytes, or its quants at qo), every x[t] holds block b.
        unsafe {
            let base = w.as_ptr().add(g * 8 * row_bytes);
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..blocks {
                let blk = base.add(b * bb);
                // Each row's scale (low 16 bits) and Q4_1's minimum (high 16 bits).
                let head = _mm256_i32gather_epi32::<1>(blk as *const i32, row_offsets);
                let half = |v: __m256i| {
                    _mm256_cvtph_ps(_mm_packus_epi32(
                        _mm256_castsi256_si128(v),
                        _mm256_extracti128_si256::<1>(v),
                    ))
                };
                let dw = half(_mm256_and_si256(head, _mm256_set1_epi32(0xffff)));
                let m = half(_mm256_srli_epi32::<16>(head));
                // words[i]: lane r holds word i (bytes 4i..4i+4) of row r's quants.
                let words = |at: usize| {
                    let ld = |r: usize| blk.add(r * row_bytes + at);
                    let z: [__m256i; 4] = std::array::from_fn(|j| {
                        _mm256_loadu2_m128i(ld(4 + j) as *const __m128i, ld(j) as *const __m128i)
                    });
                    let t0 = _mm256_unpacklo_epi32(z[0], z[1]);
                    let t1 = _mm256_unpackhi_epi32(z[0], z[1]);
                    let t2 = _mm256_unpacklo_epi32(z[2], z[3]);
                    let t3 = _mm256_unpackhi_epi32(z[2], z[3]);
                    [
                        _mm256_unpacklo_epi64(t0, t2),
                        _mm256_unpackhi_epi64(t0, t2),
                        _mm256_unpacklo_epi64(t1, t3),
                        _mm256_unpackhi_epi64(t1, t3),
                    ]
                };
                // Per row, the weights of the block's inputs 4i..4i+4 in lane bytes.
                let quads: [__m256i; 8] = if fmt == QFormat::Q8_0 {
                    let (a, b) = (words(qo), words(qo + 16));
                    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
                } else {
                    // Byte k of word i: input 4i + k (low nibble) and 16 + 4i + k (high).
                    let a = words(qo);
                    let hi = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                    let lo = |v: __m256i| _mm256_and_si256(v, nib);
                    [
                        lo(a[0]),
                        lo(a[1]),
                        lo(a[2]),
                        lo(a[3]),
                        hi(a[0]),
                        hi(a[1]),
                        hi(a[2]),
                        hi(a[3]),
                    ]
                };
                for t in 0..T {
                    let (dx, s, q) = act_block(x[t], b);
                    let xw = |i: usize| {
                        _mm256_set1_epi32(read_u32(q.as_ptr().add(4 * i) as *const u8) as i32)
                    };
                    let mut isum = if fmt == QFormat::Q8_0 {
                        let mut isum = _mm256_setzero_si256();
                        for (i, &wq) in quads.iter().enumerate() {
                            let p = _mm256_maddubs_epi16(
                                _mm256_sign_epi8(wq, wq),
                                _mm256_sign_epi8(xw(i), wq),
                            );
                            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                        }
                        isum
                    } else {
                        let mut p16 = _mm256_setzero_si256();
                        for (i, &wq) in quads.iter().enumerate() {
                            p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(wq, xw(i)));
                        }
                        _mm256_madd_epi16(p16, ones)
                    };
                    if offset != 0 {
                        let qsum = x[t][b / 2].qsum[b % 2];
                        isum = _mm256_add_epi32(isum, _mm256_set1_epi32(offset * qsum));
                    }
                    let a = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_mul_ps(dw, _mm256_set1_ps(dx)),
                        acc[t],
                    );
                    acc[t] = if fmt == QFormat::Q4_1 {
                        _mm256_fmadd_ps(m, _mm256_set1_ps(s), a)
                    } else {
                        a
                    };
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                for (r, v) in lanes.into_iter().enumerate() {
                    out[(g * 8 + r) * stride + t] = v;
                }
            }
        }
    }
    let mut one = [0f32; 1];
    for r in groups * 8..rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for t in 0..T {
            // SAFETY: the caller's features; one row of whole blocks, x[t] as long.
            unsafe { rows_avx2::<F, false>(row, row_bytes, &[], x[t], &mut one) };
            out[r * stride + t] = one[0];
        }
    }
}

const fn format_of(f: u8) -> QFormat {
    match f {
        0 => QFormat::Q8_0,
        1 => QFormat::Q4_0,
        _ => QFormat::Q4_1,
    }
}

/// `out[r] = row r of w · x` for `out.len()` consecutive rows of `row_bytes` bytes each,
/// the fastest available version. `x` comes from [`quantize_activations`].
pub fn rows_q(fmt: QFormat, w: &[u8], row_bytes: usize, x: &[QPair], out: &mut [f32]) {
    rows_q_impl::<false>(fmt, w, row_bytes, &[], x, out)
}

/// As [`rows_q`] over the blocks `blocks` of each row only: block `j` of `x` multiplies
/// block `blocks[j]` of every row. The sparse MLP's block mode: the down projection's
/// blocks run along the neurons, so 32-neuron groups select whole blocks in place.
pub fn rows_q_blocks(
    fmt: QFormat,
    w: &[u8],
    row_bytes: usize,
    blocks: &[u32],
    x: &[QPair],
    out: &mut [f32],
) {
    rows_q_impl::<true>(fmt, w, row_bytes, blocks, x, out)
}

fn rows_q_impl<const GATHER: bool>(
    fmt: QFormat,
    w: &[u8],
    row_bytes: usize,
    idx: &[u32],
    x: &[QPair],
    out: &mut [f32],
) {
    let bb = fmt.block_bytes();
    assert!(row_bytes.is_multiple_of(bb), "row of {row_bytes} bytes");
    assert!(w.len() >= out.len() * row_bytes, "rows_q: weight size");
    let blocks = if GATHER {
        idx.len()
    } else {
        row_chunks(fmt, row_bytes)
    };
    assert!(x.len() * 2 >= blocks, "rows_q: activation size");
    if !fmt.is_legacy() {
        return rows_chunks_impl::<GATHER>(fmt, w, row_bytes, idx, x, out);
    }
    assert!(
        idx.iter().all(|&b| (b as usize + 1) * bb <= row_bytes),
        "rows_q: block index outside the row"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if has_vnni() {
            // SAFETY: has_vnni() checked the features; sizes and indices asserted above.
            unsafe {
                match fmt {
                    QFormat::Q8_0 => rows_vnni::<0, GATHER, 1>(w, row_bytes, idx, [x], out),
                    QFormat::Q4_0 => rows_vnni::<1, GATHER, 1>(w, row_bytes, idx, [x], out),
                    _ => rows_vnni::<2, GATHER, 1>(w, row_bytes, idx, [x], out),
                }
            }
            return;
        }
        if has_avx2() && !GATHER {
            let rows = out.len();
            // SAFETY: has_avx2() checked AVX2/FMA/F16C; sizes asserted above (stride 1).
            unsafe {
                match fmt {
                    QFormat::Q8_0 => rows_avx2_lanes::<0, 1>(w, row_bytes, rows, [x], out, 1),
                    QFormat::Q4_0 => rows_avx2_lanes::<1, 1>(w, row_bytes, rows, [x], out, 1),
                    _ => rows_avx2_lanes::<2, 1>(w, row_bytes, rows, [x], out, 1),
                }
            }
            return;
        }
        if has_avx2() {
            // SAFETY: has_avx2() checked AVX2/FMA/F16C; sizes and indices asserted above.
            unsafe {
                match fmt {
                    QFormat::Q8_0 => rows_avx2::<0, GATHER>(w, row_bytes, idx, x, out),
                    QFormat::Q4_0 => rows_avx2::<1, GATHER>(w, row_bytes, idx, x, out),
                    _ => rows_avx2::<2, GATHER>(w, row_bytes, idx, x, out),
                }
            }
            return;
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        *o = if GATHER {
            dot_blocks_scalar(fmt, row, idx, x)
        } else {
            dot_scalar(fmt, row, x)
        };
    }
}

/// [`rows_q_impl`] for the formats of [`blocks`] (Q5_0, Q5_1, K-quants): 32-element
/// chunks, each an integer product per 16-element group (see [`chunk_dot_scalar`]); block
/// indices (`GATHER`) count chunks along the row.
fn rows_chunks_impl<const GATHER: bool>(
    fmt: QFormat,
    w: &[u8],
    row_bytes: usize,
    idx: &[u32],
    x: &[QPair],
    out: &mut [f32],
) {
    let chunks = row_chunks(fmt, row_bytes);
    assert!(
        idx.iter().all(|&k| (k as usize) < chunks),
        "rows_q: block index outside the row"
    );
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! run {
            ($kernel:ident) => {{
                // SAFETY: the kernel's CPU features were checked by the caller's branch;
                // sizes and indices asserted above and in rows_q_impl.
                unsafe {
                    match fmt {
                        QFormat::Q5_0 => $kernel::<5, GATHER, 1>(w, row_bytes, idx, [x], out),
                        QFormat::Q5_1 => $kernel::<6, GATHER, 1>(w, row_bytes, idx, [x], out),
                        QFormat::Q2K => $kernel::<10, GATHER, 1>(w, row_bytes, idx, [x], out),
                        QFormat::Q3K => $kernel::<11, GATHER, 1>(w, row_bytes, idx, [x], out),
                        QFormat::Q4K => $kernel::<12, GATHER, 1>(w, row_bytes, idx, [x], out),
                        QFormat::Q5K => $kernel::<13, GATHER, 1>(w, row_bytes, idx, [x], out),
                        _ => $kernel::<14, GATHER, 1>(w, row_bytes, idx, [x], out),
                    }
                }
                return;
            }};
        }
        if has_vnni() {
            run!(chunks_vnni);
        }
        if has_avx2() {
            run!(chunks_avx2);
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        *o = if GATHER {
            dot_blocks_scalar(fmt, row, idx, x)
        } else {
            dot_scalar(fmt, row, x)
        };
    }
}

/// The chunk format with ggml type id `f` (the kernels' const parameter).
const fn chunk_format_of(f: u8) -> QFormat {
    match f {
        5 => QFormat::Q5_0,
        6 => QFormat::Q5_1,
        10 => QFormat::Q2K,
        11 => QFormat::Q3K,
        12 => QFormat::Q4K,
        13 => QFormat::Q5K,
        _ => QFormat::Q6K,
    }
}

/// `v >> n` in each 16-bit lane.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// The 32 unsigned quants of chunk `c` of the block at `blk`, in element order (as
/// [`blocks::chunk_quants`]).
///
/// # Safety
/// The CPU must have AVX2; `blk` points at a whole block of format `F`, `c` is below its
/// chunk count.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_chunk<const F: u8>(blk: *const u8, c: usize) -> __m256i {
    let fmt = chunk_format_of(F);
    let load = |o: usize| {
        // SAFETY: every offset below leaves 32 bytes inside the block (see the layouts
        // in quant::blocks).
        unsafe { _mm256_loadu_si256(blk.add(o) as *const __m256i) }
    };
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let m1 = _mm256_set1_epi8(1);
    match fmt {
        QFormat::Q5_0 | QFormat::Q5_1 => {
            let o = if fmt == QFormat::Q5_0 { 2 } else { 4 };
            // SAFETY: qh (4 bytes) and qs (16 bytes) lie inside the block.
            let (qh, q16) = unsafe {
                (
                    read_u32(blk.add(o)),
                    _mm_loadu_si128(blk.add(o + 4) as *const __m128i),
                )
            };
            let lo = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q16), q16), m4);
            // Bit j of qh -> byte j: broadcast byte j/8 to byte j, keep bit j%8.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(qh as i32),
                _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let hi = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(0x10)))
        }
        QFormat::Q2K => _mm256_and_si256(srl16(load(16 + 32 * (c / 4)), 2 * (c % 4)), m3),
        QFormat::Q3K => {
            let lo = _mm256_and_si256(srl16(load(32 + 32 * (c / 4)), 2 * (c % 4)), m3);
            let hb = _mm256_and_si256(srl16(load(0), c), m1);
            _mm256_or_si256(lo, _mm256_slli_epi16::<2>(hb))
        }
        QFormat::Q4K => _mm256_and_si256(srl16(load(16 + 32 * (c / 2)), 4 * (c % 2)), m4),
        QFormat::Q5K => {
            let lo = _mm256_and_si256(srl16(load(48 + 32 * (c / 2)), 4 * (c % 2)), m4);
            let hb = _mm256_and_si256(srl16(load(16), c), m1);
            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hb))
        }
        _ => {
            let (n, k) = (c / 4, c % 4);
            let lo = _mm256_and_si256(srl16(load(64 * n + 32 * (k % 2)), 4 * (k / 2)), m4);
            let hb = _mm256_and_si256(srl16(load(128 + 32 * n), 2 * k), m3);
            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hb))
        }
    }
}

/// Unsigned x signed bytes summed in groups of 4 into 8 i32 lanes, AVX2 (exact: the
/// chunk quants are at most 63, so `vpmaddubsw`'s pairs never saturate).
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn idot_avx2(u: __m256i, q: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1))
}

/// Horizontal sum of 8 floats.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn hsum256(acc: __m256) -> f32 {
    let v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// The chunks a chunk kernel reads per row (`idx.len()` when gathering), after checking
/// that `rows` rows of `w`, the indices and every activation vector hold them.
#[cfg(target_arch = "x86_64")]
fn checked_chunks(
    fmt: QFormat,
    gather: bool,
    w: &[u8],
    row_bytes: usize,
    idx: &[u32],
    x: &[&[QPair]],
    rows: usize,
) -> usize {
    let per_row = row_chunks(fmt, row_bytes);
    let chunks = if gather { idx.len() } else { per_row };
    assert!(w.len() >= rows * row_bytes && x.iter().all(|x| x.len() * 2 >= chunks));
    assert!(idx.iter().all(|&k| (k as usize) < per_row));
    chunks
}

/// Chunk `$k` of `$row` for the chunk kernels (`$gather`: the `$k`-th of the indices
/// `$idx`): its block, its index in the block, and its two multipliers and offsets. A
/// block's parameters are decoded into `$pa`, `$pb` (per 16 weights) at its first chunk
/// and read from there for the others. A macro, not a function or closure: expanded in
/// the kernels, under their CPU features, with their registers live across it (as a
/// closure the AVX-512 kernel ran 3x slower).
#[cfg(target_arch = "x86_64")]
macro_rules! chunk_params {
    ($fmt:expr, $row:expr, $gather:expr, $idx:expr, $k:expr, $pa:expr, $pb:expr) => {{
        let ck = if $gather { $idx[$k] as usize } else { $k };
        let (blk, c) = row_chunk($fmt, $row, ck);
        if $gather {
            let p = blocks::chunk_params($fmt, blk, c);
            (blk, c, p.a, p.offsets())
        } else {
            if c == 0 {
                blocks::block_params(
                    $fmt,
                    blk,
                    |h| {
                        let v = _mm_cvtsi32_si128(u16::from_le_bytes(h) as i32);
                        _mm_cvtss_f32(_mm_cvtph_ps(v))
                    },
                    $pa,
                    $pb,
                );
            }
            (
                blk,
                c,
                [$pa[2 * c], $pa[2 * c + 1]],
                [$pb[2 * c], $pb[2 * c + 1]],
            )
        }
    }};
}

/// The chunk kernel on AVX2 (`chunks_avx2`; AVX-512 VNNI has [`chunks_vnni`]): for each
/// chunk, its quants unpacked to 32 bytes, the integer sums of each 4 products (`$idot`),
/// scaled per 16-element group by `a·dx`; the groups' offsets `b·(dx·Σq)` summed in scalar
/// code.
macro_rules! chunk_kernel {
    ($name:ident, $features:literal, $idot:ident) => {
        /// Rows of `w` dotted with the `T` activation vectors `x` by the chunk kernel
        /// (see `chunk_kernel!`): `out[r·T + t] = row r · x[t]`. Each chunk's quants and
        /// scales are unpacked once for the `T` vectors (prefill), and the arithmetic of
        /// each (row, vector) is the same whatever `T` is, so prefill equals decode.
        ///
        /// # Safety
        /// The CPU must have the enabled features; sizes and chunk indices as checked by
        /// [`rows_chunks_impl`].
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const F: u8, const GATHER: bool, const T: usize>(
            w: &[u8],
            row_bytes: usize,
            idx: &[u32],
            x: [&[QPair]; T],
            out: &mut [f32],
        ) {
            let fmt = chunk_format_of(F);
            let chunks = checked_chunks(fmt, GATHER, w, row_bytes, idx, &x, out.len() / T);
            for (r, o) in out.chunks_exact_mut(T).enumerate() {
                let row = &w[r * row_bytes..(r + 1) * row_bytes];
                let mut acc = [_mm256_setzero_ps(); T];
                let mut cst = [0f32; T];
                // The current block's multipliers and offsets per 16 weights.
                let (mut pa, mut pb) = ([0f32; 16], [0f32; 16]);
                for k in 0..chunks {
                    let (blk, c, a, b) = chunk_params!(fmt, row, GATHER, idx, k, &mut pa, &mut pb);
                    // SAFETY: `blk` is a whole block and `c` one of its chunks
                    // (row_chunk).
                    let u = unsafe { unpack_chunk::<F>(blk.as_ptr(), c) };
                    for t in 0..T {
                        let (dx, xs, q) = act_chunk(x[t], k);
                        // SAFETY: `q` holds 32 quants.
                        let xq = unsafe { _mm256_loadu_si256(q.as_ptr() as *const __m256i) };
                        let isum = $idot(u, xq);
                        let scale = _mm256_set_m128(_mm_set1_ps(a[1] * dx), _mm_set1_ps(a[0] * dx));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
                        cst[t] += b[0] * xs[0] + b[1] * xs[1];
                    }
                }
                for t in 0..T {
                    o[t] = hsum256(acc[t]) + cst[t];
                }
            }
        }
    };
}

chunk_kernel!(chunks_avx2, "avx2,fma,f16c", idot_avx2);

/// Two consecutive Q5_0 (`F` = 5) or Q5_1 (6) blocks at `b0` for [`chunks_vnni`]: the 64
/// quants (block 0 in bytes 0..32, each block's low nibbles then high nibbles, bit 4 from
/// `qh`), and the multipliers (spread as the kernel's lanes want them) and offsets of the
/// four 16-weight groups, equal to what `block_params` computes (the same operations and
/// hardware f16 conversion). Decode went from 26 to 16 ns per 256 weights (Q5_0) and from
/// 22 to 16 (Q5_1), one thread; building the f16 scales with 16-bit lane inserts cost more
/// than it saved.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C; two whole blocks readable at `b0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn q5_pair<const F: u8>(b0: *const u8, spread4: __m512i) -> (__m512i, __m512, __m128) {
    let q51 = F == 6;
    let fmt = if q51 { QFormat::Q5_1 } else { QFormat::Q5_0 };
    // Layouts: Q5_0 d (f16), qh (4 bytes), qs (16); Q5_1 d, m (f16 each), qh, qs.
    let qh_at = if q51 { 4 } else { 2 };
    // [v0, v0, v1, v1] of the two blocks' f16 at `o`, widened, in one 64-bit move.
    let f16x4 = |b0: *const u8, b1: *const u8, o: usize| {
        // SAFETY: o + 2 <= the block's header size (the caller's blocks).
        let (v0, v1) = unsafe { (read_u16(b0.add(o)), read_u16(b1.add(o))) };
        let v = (v0 as u64 * 0x1_0001) | (v1 as u64 * 0x1_0001) << 32;
        _mm_cvtph_ps(_mm_cvtsi64_si128(v as i64))
    };
    // SAFETY: every read lies inside the two blocks (the caller's guarantee).
    unsafe {
        let b1 = b0.add(fmt.block_bytes());
        let q = _mm256_loadu2_m128i(
            b1.add(qh_at + 4) as *const __m128i,
            b0.add(qh_at + 4) as *const __m128i,
        );
        let hi4 = _mm256_srli_epi16::<4>(q);
        // [q0, q1, q0 >> 4, q1 >> 4] -> [q0, q0 >> 4, q1, q1 >> 4]: each block's 32 quants.
        let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), hi4);
        let lo = _mm512_and_si512(
            _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z),
            _mm512_set1_epi8(0x0f),
        );
        // Bit j of block k's qh is bit 4 of quant 32k + j.
        let qh = read_u32(b0.add(qh_at)) as u64 | (read_u32(b1.add(qh_at)) as u64) << 32;
        let u = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(qh, _mm512_set1_epi8(0x10)));
        let d = f16x4(b0, b1, 0);
        let av = _mm512_permutexvar_ps(spread4, _mm512_castps128_ps512(d));
        // block_params: b = m - 0·d (Q5_1), 0 - 16·d (Q5_0).
        let bv = if q51 {
            _mm_sub_ps(f16x4(b0, b1, 2), _mm_mul_ps(_mm_setzero_ps(), d))
        } else {
            _mm_sub_ps(_mm_setzero_ps(), _mm_mul_ps(_mm_set1_ps(16.0), d))
        };
        (u, av, bv)
    }
}

/// The chunk formats' kernel on AVX-512 VNNI: two chunks (64 weights) per `vpdpbusd`
/// against an activation pair, the pair's scales pre-spread (`QPair::dx16`) times the
/// chunks' four 16-weight multipliers, and the four offset terms in one `vfmadd`: five
/// vector instructions per vector and chunk pair, which the AVX2 kernel spends on one
/// chunk. Each chunk's parameters are decoded once for the `T` vectors, and the
/// arithmetic of each (row, vector) does not depend on `T` (prefill and batched decode
/// equal decode). A last odd chunk goes through the scalar chunk product.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, VNNI, AVX2, FMA and F16C; sizes and chunk indices
/// as checked by [`rows_chunks_impl`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn chunks_vnni<const F: u8, const GATHER: bool, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    idx: &[u32],
    x: [&[QPair]; T],
    out: &mut [f32],
) {
    let fmt = chunk_format_of(F);
    let chunks = checked_chunks(fmt, GATHER, w, row_bytes, idx, &x, out.len() / T);
    // Lanes 4g..4g + 4 hold the sums of 16-weight group g of the pair.
    let spread4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (r, o) in out.chunks_exact_mut(T).enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut acc = [_mm512_setzero_ps(); T];
        let mut cst = [_mm_setzero_ps(); T];
        // The current block's multipliers and offsets per 16 weights.
        let (mut pa, mut pb) = ([0f32; 16], [0f32; 16]);
        macro_rules! chunk {
            ($k:expr) => {
                chunk_params!(fmt, row, GATHER, idx, $k, &mut pa, &mut pb)
            };
        }
        for p in 0..chunks / 2 {
            if !GATHER {
                // Fetch the contiguous rows ahead of the work, from pair p's offset in
                // the row so that every line gets fetched (the format's constants: no
                // division at run time). Decode too: Q4_K_M 85-95 -> 105-127 tok/s.
                let at = 2 * p * fmt.block_bytes() / fmt.chunks_per_block() + PREFETCH_BYTES;
                _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(at) as *const i8);
            }
            let (u, av, bv) = if !GATHER && (F == 5 || F == 6) {
                // Q5_0, Q5_1: one block per chunk, so the pair is two whole blocks,
                // unpacked together and their parameters computed as `block_params` does.
                // SAFETY: blocks 2p and 2p + 1 lie inside the row (p < chunks / 2).
                unsafe { q5_pair::<F>(row.as_ptr().add(2 * p * fmt.block_bytes()), spread4) }
            } else {
                let (blk0, c0, a0, b0) = chunk!(2 * p);
                // SAFETY: a whole block and one of its chunks (row_chunk).
                let u0 = unsafe { unpack_chunk::<F>(blk0.as_ptr(), c0) };
                let (blk1, c1, a1, b1) = chunk!(2 * p + 1);
                // SAFETY: as for u0.
                let u1 = unsafe { unpack_chunk::<F>(blk1.as_ptr(), c1) };
                let u = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(u0), u1);
                let av = _mm512_permutexvar_ps(
                    spread4,
                    _mm512_castps128_ps512(_mm_set_ps(a1[1], a1[0], a0[1], a0[0])),
                );
                (u, av, _mm_set_ps(b1[1], b1[0], b0[1], b0[0]))
            };
            for t in 0..T {
                // SAFETY: pair p lies inside every x[t] (asserted: 2·len >= chunks).
                let xp = unsafe { x[t].get_unchecked(p) };
                // SAFETY: qs holds 64 quants, dx16 16 floats, s16 4.
                let (xq, dx, xs) = unsafe {
                    (
                        _mm512_loadu_si512(xp.qs.as_ptr() as *const _),
                        _mm512_loadu_ps(xp.dx16.as_ptr()),
                        _mm_loadu_ps(xp.s16.as_ptr()),
                    )
                };
                let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xq);
                let scale = _mm512_mul_ps(av, dx);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[t]);
                cst[t] = _mm_fmadd_ps(bv, xs, cst[t]);
            }
        }
        let tail = if chunks % 2 == 1 {
            let (blk, c, _, _) = chunk!(chunks - 1);
            Some((blk, c))
        } else {
            None
        };
        for t in 0..T {
            let mut c = [0f32; 4];
            // SAFETY: c has 4 floats.
            unsafe { _mm_storeu_ps(c.as_mut_ptr(), cst[t]) };
            let mut s = _mm512_reduce_add_ps(acc[t]) + ((c[0] + c[1]) + (c[2] + c[3]));
            if let Some((blk, ck)) = tail {
                let (dx, xs, q) = act_chunk(x[t], chunks - 1);
                s += chunk_dot_scalar(fmt, blk, ck, dx, xs, q);
            }
            o[t] = s;
        }
    }
}

/// Tokens per step of [`rows_q_tokens`]: each unpacked weight block serves this many
/// activation vectors (the chunk kernel's registers hold 2 accumulators per token).
pub const TOKENS_PER_STEP: usize = 8;

/// `out[t][r] = row r of w · x[t]` for up to [`TOKENS_PER_STEP`] activation vectors (each
/// from [`quantize_activations`]) and `rows` consecutive rows: prefill's product, equal to
/// [`rows_q`] on each vector alone (the same arithmetic, bit for bit). `out[t]` has `rows`
/// elements.
pub fn rows_q_tokens(
    fmt: QFormat,
    w: &[u8],
    row_bytes: usize,
    x: &[&[QPair]],
    out: &mut [&mut [f32]],
) {
    let n = x.len();
    assert!(n == out.len() && (1..=TOKENS_PER_STEP).contains(&n));
    let rows = out[0].len();
    assert!(
        out.iter().all(|o| o.len() == rows),
        "rows_q_tokens: output sizes"
    );
    let mut buf = vec![0f32; rows * n];
    rows_q_tokens_by_row(fmt, w, row_bytes, x, &mut buf);
    for (t, o) in out.iter_mut().enumerate() {
        for (r, v) in o.iter_mut().enumerate() {
            *v = buf[r * n + t];
        }
    }
}

/// [`rows_q_tokens`] into one buffer laid out by weight row, `out[r * n + t]` for `n =
/// x.len()` vectors and `out.len() / n` rows: the kernels' own layout, so prefill's tiles
/// need no transposition and no allocation.
pub fn rows_q_tokens_by_row(
    fmt: QFormat,
    w: &[u8],
    row_bytes: usize,
    x: &[&[QPair]],
    out: &mut [f32],
) {
    let n = x.len();
    assert!((1..=TOKENS_PER_STEP).contains(&n) && out.len().is_multiple_of(n));
    let rows = out.len() / n;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return rows_tokens_simd(has_vnni(), fmt, w, row_bytes, x, out);
    }
    let mut one = vec![0f32; rows];
    for (t, xt) in x.iter().enumerate() {
        rows_q(fmt, w, row_bytes, xt, &mut one);
        for (r, &v) in one.iter().enumerate() {
            out[r * n + t] = v;
        }
    }
}

/// Runs `$body` with the constant `$t` equal to `$n` (1 to [`TOKENS_PER_STEP`]): the
/// multi-token kernels take their token count as a const generic.
macro_rules! with_tokens {
    ($n:expr, $t:ident => $body:expr) => {
        match $n {
            1 => {
                const $t: usize = 1;
                $body
            }
            2 => {
                const $t: usize = 2;
                $body
            }
            3 => {
                const $t: usize = 3;
                $body
            }
            4 => {
                const $t: usize = 4;
                $body
            }
            5 => {
                const $t: usize = 5;
                $body
            }
            6 => {
                const $t: usize = 6;
                $body
            }
            7 => {
                const $t: usize = 7;
                $body
            }
            _ => {
                const $t: usize = 8;
                $body
            }
        }
    };
}

/// [`rows_q_tokens_by_row`] on `x.len()` vectors at once, `out[r * n + t]` (the caller
/// checked AVX2, and VNNI if `vnni`): the legacy formats on [`rows_vnni`] or
/// [`rows_avx2_lanes`], the others on the chunk kernel [`rows_chunks_impl`] picks for
/// decode.
#[cfg(target_arch = "x86_64")]
fn rows_tokens_simd(
    vnni: bool,
    fmt: QFormat,
    w: &[u8],
    row_bytes: usize,
    x: &[&[QPair]],
    out: &mut [f32],
) {
    let n = x.len();
    let rows = out.len() / n;
    assert!(
        row_bytes.is_multiple_of(fmt.block_bytes()),
        "row of {row_bytes} bytes"
    );
    assert!(w.len() >= rows * row_bytes, "rows_q_tokens: weight size");
    let chunks = row_chunks(fmt, row_bytes);
    assert!(
        x.iter().all(|x| x.len() * 2 >= chunks),
        "rows_q_tokens: activation size"
    );
    with_tokens!(n, T => {
        let xs: [&[QPair]; T] = std::array::from_fn(|t| x[t]);
        macro_rules! chunk_kernel {
            ($kernel:ident) => {
                match fmt {
                    QFormat::Q5_0 => $kernel::<5, false, T>(w, row_bytes, &[], xs, out),
                    QFormat::Q5_1 => $kernel::<6, false, T>(w, row_bytes, &[], xs, out),
                    QFormat::Q2K => $kernel::<10, false, T>(w, row_bytes, &[], xs, out),
                    QFormat::Q3K => $kernel::<11, false, T>(w, row_bytes, &[], xs, out),
                    QFormat::Q4K => $kernel::<12, false, T>(w, row_bytes, &[], xs, out),
                    QFormat::Q5K => $kernel::<13, false, T>(w, row_bytes, &[], xs, out),
                    _ => $kernel::<14, false, T>(w, row_bytes, &[], xs, out),
                }
            };
        }
        // SAFETY: the caller checked AVX2/FMA/F16C, and VNNI when `vnni`; sizes asserted
        // above (every kernel's output is by row, `out[r * n + t]`, stride n).
        unsafe {
            match (vnni, fmt) {
                (true, QFormat::Q8_0) => rows_vnni::<0, false, T>(w, row_bytes, &[], xs, out),
                (true, QFormat::Q4_0) => rows_vnni::<1, false, T>(w, row_bytes, &[], xs, out),
                (true, QFormat::Q4_1) => rows_vnni::<2, false, T>(w, row_bytes, &[], xs, out),
                (false, QFormat::Q8_0) => rows_avx2_lanes::<0, T>(w, row_bytes, rows, xs, out, n),
                (false, QFormat::Q4_0) => rows_avx2_lanes::<1, T>(w, row_bytes, rows, xs, out, n),
                (false, QFormat::Q4_1) => rows_avx2_lanes::<2, T>(w, row_bytes, rows, xs, out, n),
                (true, _) => chunk_kernel!(chunks_vnni),
                (false, _) => chunk_kernel!(chunks_avx2),
            }
        }
    })
}

/// Scalar reference of one row of [`rows_q_blocks`].
pub fn dot_blocks_scalar(fmt: QFormat, w: &[u8], blocks: &[u32], x: &[QPair]) -> f32 {
    if !fmt.is_legacy() {
        return blocks
            .iter()
            .enumerate()
            .map(|(j, &k)| {
                let (blk, c) = row_chunk(fmt, w, k as usize);
                let (dx, xs, q) = act_chunk(x, j);
                chunk_dot_scalar(fmt, blk, c, dx, xs, q)
            })
            .sum();
    }
    let bb = fmt.block_bytes();
    blocks.iter().enumerate().fold(0.0, |acc, (j, &b)| {
        let (dx, s, q) = act_block(x, j);
        block_acc_scalar(
            fmt,
            &w[b as usize * bb..(b as usize + 1) * bb],
            dx,
            s,
            q,
            acc,
        )
    })
}

/// The dot product of one quantized row with `x`, the fastest available version.
#[inline]
pub fn dot_q(fmt: QFormat, w: &[u8], x: &[QPair]) -> f32 {
    let mut o = [0f32];
    rows_q(fmt, w, w.len(), x, &mut o);
    o[0]
}

/// Scalar reference: `y += a · row` for one quantized row of `y.len()` elements.
pub fn axpy_q_scalar(fmt: QFormat, a: f32, w: &[u8], y: &mut [f32]) {
    let mut tmp = [0f32; crate::quant::QK_K];
    let tmp = &mut tmp[..fmt.block_elems()];
    for (blk, yb) in w
        .chunks_exact(fmt.block_bytes())
        .zip(y.chunks_exact_mut(fmt.block_elems()))
    {
        crate::quant::dequantize(fmt.source(), blk, tmp);
        for (o, &v) in yb.iter_mut().zip(tmp.iter()) {
            *o += a * v;
        }
    }
}

/// `y += a · row` for one Q8_0 row, AVX-512 (one FMA per element with `a·d` per block).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL and F16C; `w` holds `y.len() / 32` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn axpy_q8_0_avx512(a: f32, w: &[u8], y: &mut [f32]) {
    let blocks = y.len() / QK;
    assert!(w.len() >= blocks * 34);
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    for b in 0..blocks {
        // SAFETY: block b's 34 bytes and y[32b..32b + 32] are in bounds (asserted).
        unsafe {
            let blk = pw.add(b * 34);
            let d = f16_le([*blk, *blk.add(1)]);
            let s = _mm512_set1_ps(a * d);
            let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q)));
            let y0 = py.add(b * QK);
            _mm512_storeu_ps(y0, _mm512_fmadd_ps(s, lo, _mm512_loadu_ps(y0)));
            _mm512_storeu_ps(
                y0.add(16),
                _mm512_fmadd_ps(s, hi, _mm512_loadu_ps(y0.add(16))),
            );
        }
    }
}

/// `y += a · row` for one quantized row (`w`: `y.len() / 32` blocks), fastest version.
#[inline]
pub fn axpy_q(fmt: QFormat, a: f32, w: &[u8], y: &mut [f32]) {
    assert!(y.len().is_multiple_of(fmt.block_elems()) && w.len() == fmt.row_bytes(y.len()));
    #[cfg(target_arch = "x86_64")]
    if fmt == QFormat::Q8_0 && isa() == Isa::Avx512 && has_avx2() {
        // SAFETY: isa() checked AVX-512 F/BW/VL and has_avx2() F16C; sizes asserted.
        unsafe { axpy_q8_0_avx512(a, w, y) };
        return;
    }
    axpy_q_scalar(fmt, a, w, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::data;
    use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0};
    use half::f16;

    #[test]
    fn quantize_activations_simd_equals_scalar_bit_for_bit() {
        let mut x = data(32 * 41, 7);
        // Halves and near-halves after scaling, zeros, a zero block, huge and tiny values.
        for (i, v) in x.iter_mut().enumerate().take(32 * 8) {
            *v = match i % 7 {
                0 => (i as f32 - 100.0) * 0.5,
                1 => 0.0,
                2 => 127.0,
                3 => -63.5,
                4 => 1e-30,
                5 => -2.5,
                _ => *v,
            };
        }
        x[32 * 9..32 * 10].fill(0.0);
        x[32 * 11] = 3e38;
        let mut got = Vec::new();
        quantize_activations(&x, &mut got);
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let mut qs = [0i8; QK];
            let (d, sums) = quantize_block_scalar(xb, &mut qs);
            let p = &got[b / 2];
            let h = b % 2;
            assert_eq!(&p.qs[h * QK..(h + 1) * QK], &qs[..], "block {b}");
            assert_eq!(p.ds[2 * h].to_bits(), d.to_bits(), "block {b}");
            assert_eq!(p.s16[2 * h], d * sums[0] as f32, "block {b}");
            for (&q, &v) in qs.iter().zip(xb) {
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                assert_eq!(q, (v * id).round() as i8, "{v} in block {b}");
            }
        }
    }

    #[test]
    fn k_quant_activation_quantization_simd_equals_scalar_bit_for_bit() {
        // Eight 256-groups and a short last one (a gathered vector): random values; a group
        // whose extremes tie in magnitude with both signs (the first one wins); values that
        // scale to exact halves (ties go to even); a zero group; a NaN; a group whose
        // extreme is positive (quants reach +127 after rounding).
        let mut x = data(256 * 8 + 96, 11);
        x[256] = -3.0;
        x[300] = 3.0;
        for (i, v) in x[512..768].iter_mut().enumerate() {
            // max 127 → iscale -1: v = k + 0.5 lands on ties.
            *v = if i == 0 {
                127.0
            } else {
                (i % 60) as f32 - 29.5
            };
        }
        x[768..1024].fill(0.0);
        x[1030] = f32::NAN;
        x[1300] = 1e6;
        let scalar = |x: &[f32]| {
            let mut out = vec![QPair::zeroed(); (x.len() / QK).div_ceil(2)];
            for (gi, xg) in x.chunks(crate::quant::QK_K).enumerate() {
                let max = first_abs_max(xg);
                let (d, iscale) = if max == 0.0 {
                    (0.0, 0.0)
                } else {
                    (-max / 127.0, -127.0 / max)
                };
                for (bi, xb) in xg.chunks_exact(QK).enumerate() {
                    let b = gi * 8 + bi;
                    let h = b % 2;
                    let sums = quantize_block_k_scalar(
                        xb,
                        iscale,
                        &mut out[b / 2].qs[h * QK..(h + 1) * QK],
                    );
                    out[b / 2].s16[2 * h] = sums[0] as f32;
                    out[b / 2].s16[2 * h + 1] = sums[1] as f32;
                    let _ = d;
                }
            }
            out
        };
        let want = scalar(&x);
        let mut got = Vec::new();
        quantize_activations_for(QFormat::Q4K, &x, &mut got);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.qs, w.qs, "pair {b}");
        }
        // The tie group: 127 maps to -127 and k + 0.5 to the even neighbour of -(k + 0.5).
        let tie = &got[512 / 64];
        assert_eq!(tie.qs[0], -127);
        assert_eq!(tie.qs[1], 28, "-(-28.5) rounds to even 28");
        // The group with ±3 extremes keys on the first (-3.0, quant -127): +3.0 gets +127.
        assert_eq!(got[256 / 64].qs[0], -127);
        assert_eq!(got[256 / 64].qs[300 - 256], 127);
        // The NaN quantizes to 0, as Rust's saturating cast does.
        assert_eq!(got[1024 / 64].qs[6], 0);
    }

    /// `blocks` random blocks of `fmt` (scales of mixed magnitude, all quant values used).
    fn random_row(fmt: QFormat, blocks: usize, seed: u64) -> Vec<u8> {
        if !fmt.is_legacy() {
            return random_chunk_row(fmt, blocks, seed);
        }
        let v = data(blocks * 40, seed);
        let mut out = Vec::new();
        for b in 0..blocks {
            let r = &v[b * 40..(b + 1) * 40];
            let d = f16::from_f32(r[0].abs() * 0.05 + 1e-3).to_le_bytes();
            let byte = |i: usize| ((r[4 + i % 36] * 0.5 + 0.5) * 255.0) as u8 ^ (i as u8 * 37);
            match fmt {
                QFormat::Q8_0 => {
                    let mut blk = BlockQ8_0::zeroed();
                    blk.d = d;
                    for (i, q) in blk.qs.iter_mut().enumerate() {
                        *q = byte(i) as i8;
                    }
                    out.extend(bytemuck::bytes_of(&blk));
                }
                QFormat::Q4_0 => {
                    let mut blk = BlockQ4_0::zeroed();
                    blk.d = d;
                    for (i, q) in blk.qs.iter_mut().enumerate() {
                        *q = byte(i);
                    }
                    out.extend(bytemuck::bytes_of(&blk));
                }
                QFormat::Q4_1 => {
                    let mut blk = BlockQ4_1::zeroed();
                    blk.d = d;
                    blk.m = f16::from_f32(r[1] * 0.3).to_le_bytes();
                    for (i, q) in blk.qs.iter_mut().enumerate() {
                        *q = byte(i);
                    }
                    out.extend(bytemuck::bytes_of(&blk));
                }
                _ => unreachable!(),
            }
        }
        out
    }

    /// `blocks` blocks of a chunk format: random bytes (every quant bit pattern), with
    /// the f16 scales set to finite values of mixed sign and magnitude.
    fn random_chunk_row(fmt: QFormat, blocks: usize, seed: u64) -> Vec<u8> {
        let bb = fmt.block_bytes();
        let v = data(blocks * bb, seed);
        let mut out: Vec<u8> = v
            .iter()
            .enumerate()
            .map(|(i, x)| ((x * 0.5 + 0.5) * 255.0) as u8 ^ (i as u8).wrapping_mul(37))
            .collect();
        let f16s: &[usize] = match fmt {
            QFormat::Q5_0 => &[0],
            QFormat::Q5_1 | QFormat::Q4K | QFormat::Q5K => &[0, 2],
            QFormat::Q2K => &[80, 82],
            QFormat::Q3K => &[108],
            _ => &[208],
        };
        for b in 0..blocks {
            for (k, &o) in f16s.iter().enumerate() {
                let x = v[b * bb + k];
                let h = f16::from_f32(x * if fmt.block_elems() == QK { 0.05 } else { 0.005 });
                out[b * bb + o..b * bb + o + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn chunk_kernels_match_scalar_on_odd_sizes() {
        for fmt in QFormat::ALL.into_iter().filter(|f| !f.is_legacy()) {
            let id = match fmt {
                QFormat::Q5_0 => 5,
                QFormat::Q5_1 => 6,
                QFormat::Q2K => 10,
                QFormat::Q3K => 11,
                QFormat::Q4K => 12,
                QFormat::Q5K => 13,
                _ => 14,
            };
            assert_eq!(chunk_format_of(id), fmt);
            for blocks in [1, 3, 7] {
                let rows = 5;
                let rb = blocks * fmt.block_bytes();
                let w = random_chunk_row(fmt, blocks * rows, 40 + blocks as u64);
                let n = blocks * fmt.block_elems();
                let mut xq = Vec::new();
                quantize_activations(&data(n, 41), &mut xq);
                let chunks = n / QK;
                let idx: Vec<u32> = (0..chunks as u32).rev().step_by(3).collect();
                let mut gq = Vec::new();
                quantize_activations(&data(idx.len() * QK, 42), &mut gq);
                let want: Vec<f32> = (0..rows)
                    .map(|r| dot_scalar(fmt, &w[r * rb..(r + 1) * rb], &xq))
                    .collect();
                let want_g: Vec<f32> = (0..rows)
                    .map(|r| dot_blocks_scalar(fmt, &w[r * rb..(r + 1) * rb], &idx, &gq))
                    .collect();
                type Kernel = unsafe fn(&[u8], usize, &[u32], [&[QPair]; 1], &mut [f32]);
                let kernels: [(bool, [Kernel; 2]); 2] = [
                    (
                        has_avx2(),
                        match id {
                            5 => [chunks_avx2::<5, false, 1>, chunks_avx2::<5, true, 1>],
                            6 => [chunks_avx2::<6, false, 1>, chunks_avx2::<6, true, 1>],
                            10 => [chunks_avx2::<10, false, 1>, chunks_avx2::<10, true, 1>],
                            11 => [chunks_avx2::<11, false, 1>, chunks_avx2::<11, true, 1>],
                            12 => [chunks_avx2::<12, false, 1>, chunks_avx2::<12, true, 1>],
                            13 => [chunks_avx2::<13, false, 1>, chunks_avx2::<13, true, 1>],
                            _ => [chunks_avx2::<14, false, 1>, chunks_avx2::<14, true, 1>],
                        },
                    ),
                    (
                        has_vnni(),
                        match id {
                            5 => [chunks_vnni::<5, false, 1>, chunks_vnni::<5, true, 1>],
                            6 => [chunks_vnni::<6, false, 1>, chunks_vnni::<6, true, 1>],
                            10 => [chunks_vnni::<10, false, 1>, chunks_vnni::<10, true, 1>],
                            11 => [chunks_vnni::<11, false, 1>, chunks_vnni::<11, true, 1>],
                            12 => [chunks_vnni::<12, false, 1>, chunks_vnni::<12, true, 1>],
                            13 => [chunks_vnni::<13, false, 1>, chunks_vnni::<13, true, 1>],
                            _ => [chunks_vnni::<14, false, 1>, chunks_vnni::<14, true, 1>],
                        },
                    ),
                ];
                let mut seen = Vec::new();
                for (available, [dense, gather]) in kernels {
                    if !available {
                        continue;
                    }
                    let mut got = vec![0f32; rows];
                    let mut got_g = vec![0f32; rows];
                    let mut got_all = vec![0f32; rows];
                    let all: Vec<u32> = (0..chunks as u32).collect();
                    // SAFETY: the kernel's features were checked; sizes are whole rows
                    // of whole blocks, activations as long as the row / the index list.
                    unsafe {
                        dense(&w, rb, &[], [&xq], &mut got);
                        gather(&w, rb, &idx, [&gq], &mut got_g);
                        gather(&w, rb, &all, [&xq], &mut got_all);
                    }
                    // Gathering every chunk in order is the dense product, bit for bit
                    // (the dense kernels' shortcuts, such as Q5's whole-pair unpacking,
                    // against the gather's chunk-by-chunk parameters).
                    for r in 0..rows {
                        assert_eq!(
                            got[r].to_bits(),
                            got_all[r].to_bits(),
                            "{fmt:?} {blocks} blocks row {r}"
                        );
                    }
                    for r in 0..rows {
                        let tol = |v: f32| 1e-4 * (1.0 + v.abs());
                        assert!(
                            (got[r] - want[r]).abs() <= tol(want[r]),
                            "{fmt:?} {blocks} blocks row {r}: {} vs scalar {}",
                            got[r],
                            want[r]
                        );
                        assert!(
                            (got_g[r] - want_g[r]).abs() <= tol(want_g[r]),
                            "{fmt:?} gather row {r}: {} vs scalar {}",
                            got_g[r],
                            want_g[r]
                        );
                    }
                    seen.push((got, got_g));
                }
                // AVX2 and VNNI sum in different orders: each is checked against the
                // scalar reference above; here they agree with each other as closely.
                if let [(a, ag), (b, bg)] = &seen[..] {
                    for (x, y) in a.iter().chain(ag).zip(b.iter().chain(bg)) {
                        assert!(
                            (x - y).abs() <= 2e-4 * (1.0 + y.abs()),
                            "{fmt:?}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_dots_are_within_the_activation_rounding_bound_of_f32() {
        for fmt in QFormat::ALL {
            for blocks in [1, 2, 3, 5, 18, 19, 48] {
                let n = blocks * fmt.block_elems();
                let rows = 7;
                let w = random_row(fmt, blocks * rows, blocks as u64);
                let x = data(n, 99 + blocks as u64);
                let mut xq = Vec::new();
                quantize_activations(&x, &mut xq);
                let rb = blocks * fmt.block_bytes();
                let mut got = vec![0f32; rows];
                rows_q(fmt, &w, rb, &xq, &mut got);
                for r in 0..rows {
                    let mut wf = vec![0f32; n];
                    crate::quant::dequantize(fmt.source(), &w[r * rb..(r + 1) * rb], &mut wf);
                    let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
                    // Each activation moves by at most dx/2 when quantized.
                    let bound: f32 = (0..n)
                        .map(|i| {
                            let (dx, _, _) = act_block(&xq, i / QK);
                            wf[i].abs() * dx * 0.5
                        })
                        .sum();
                    let slack = 1e-4 * (1.0 + exact.abs());
                    let reference = dot_scalar(fmt, &w[r * rb..(r + 1) * rb], &xq);
                    assert!(
                        (reference - exact).abs() <= bound + slack,
                        "{fmt:?} {blocks} blocks: scalar {reference} vs f32 {exact} (bound {bound})"
                    );
                    assert!(
                        (got[r] - reference).abs() <= 1e-4 * (1.0 + reference.abs()),
                        "{fmt:?} {blocks} blocks row {r}: kernel {} vs scalar {reference}",
                        got[r]
                    );
                }
            }
        }
    }

    #[test]
    fn k_quant_activations_share_one_scale_per_256() {
        let mut x = data(2 * 256 + 64, 9);
        x[300] = -3.0; // the largest magnitude of the second group
        let mut q = Vec::new();
        quantize_activations_for(QFormat::Q4K, &x, &mut q);
        assert_eq!(q.len(), 9);
        let groups = [(0usize, 256usize), (256, 512), (512, 576)];
        for (g0, g1) in groups {
            let (d0, _, _) = act_block(&q, g0 / QK);
            for i in g0..g1 {
                let (dx, s, qs) = act_block(&q, i / QK);
                assert_eq!(dx, d0, "one scale per group");
                assert!((qs[i % QK] as f32 * dx - x[i]).abs() <= dx.abs() * 0.5 + 1e-6);
                let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                assert_eq!(s, dx * sum as f32);
            }
        }
        // The largest magnitude maps to -127 (dx negative when it is positive, as q8_K).
        let (dx, _, qs) = act_block(&q, 300 / QK);
        assert_eq!(qs[300 % QK], -127);
        assert!((dx * -127.0 - -3.0).abs() < 1e-6);
        // 32-element formats keep one scale per block.
        let mut p = Vec::new();
        quantize_activations_for(QFormat::Q5_0, &x, &mut p);
        let mut want = Vec::new();
        quantize_activations(&x, &mut want);
        assert_eq!(
            bytemuck::cast_slice::<_, u8>(&p),
            bytemuck::cast_slice::<_, u8>(&want)
        );
    }

    #[test]
    fn activation_quantization_round_trips_within_half_a_step() {
        let x = data(5 * QK, 3);
        let mut q = Vec::new();
        quantize_activations(&x, &mut q);
        assert_eq!(q.len(), 3);
        for (i, &v) in x.iter().enumerate() {
            let (dx, s, qs) = act_block(&q, i / QK);
            assert!((qs[i % QK] as f32 * dx - v).abs() <= dx * 0.5 + 1e-7);
            let sum: i32 = qs.iter().map(|&q| q as i32).sum();
            assert_eq!(s, dx * sum as f32);
        }
        // The padding block of the last pair is zero.
        assert_eq!(q[2].ds[2], 0.0);
        assert!(q[2].qs[QK..].iter().all(|&v| v == 0));
    }

    #[test]
    fn quantized_axpy_matches_scalar_on_odd_sizes() {
        for fmt in QFormat::ALL {
            for blocks in [1, 3, 18, 19] {
                let w = random_row(fmt, blocks, 7 + blocks as u64);
                let y0 = data(blocks * fmt.block_elems(), 8);
                let (mut want, mut got) = (y0.clone(), y0.clone());
                axpy_q_scalar(fmt, 0.7, &w, &mut want);
                axpy_q(fmt, 0.7, &w, &mut got);
                let mut wf = vec![0f32; blocks * fmt.block_elems()];
                crate::quant::dequantize(fmt.source(), &w, &mut wf);
                for i in 0..y0.len() {
                    assert!(
                        (want[i] - (y0[i] + 0.7 * wf[i])).abs() <= 1e-5 * (1.0 + want[i].abs())
                    );
                    assert!(
                        (got[i] - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                        "{fmt:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_gathers_match_scalar_on_odd_counts() {
        for fmt in QFormat::ALL {
            let (blocks_per_row, rows) = (11, 5);
            let w = random_row(fmt, blocks_per_row * rows, 3);
            let rb = blocks_per_row * fmt.block_bytes();
            for idx in [vec![], vec![4], vec![0, 10, 3], vec![1, 2, 5, 7, 8, 9, 10]] {
                let x = data(idx.len().max(1) * QK, 5);
                let mut xq = Vec::new();
                quantize_activations(&x[..idx.len() * QK], &mut xq);
                let mut got = vec![0f32; rows];
                rows_q_blocks(fmt, &w, rb, &idx, &xq, &mut got);
                for r in 0..rows {
                    let want = dot_blocks_scalar(fmt, &w[r * rb..(r + 1) * rb], &idx, &xq);
                    // The same blocks gathered into a dense row give the same product
                    // (32-element formats: a K-quant's chunks are not whole blocks).
                    if fmt.block_elems() == QK {
                        let mut packed = Vec::new();
                        for &b in &idx {
                            let s = r * rb + b as usize * fmt.block_bytes();
                            packed.extend_from_slice(&w[s..s + fmt.block_bytes()]);
                        }
                        let dense = dot_scalar(fmt, &packed, &xq);
                        assert!((want - dense).abs() <= 1e-5 * (1.0 + dense.abs()));
                    }
                    assert!(
                        (got[r] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{fmt:?} {idx:?} row {r}: {} vs {want}",
                        got[r]
                    );
                }
            }
        }
    }

    /// The legacy formats' kernels (groups of 16 rows, the rows left over, gathered
    /// blocks, 1 to 8 vectors) against the scalar reference, bit for bit: every kernel
    /// adds exact block sums in one order, so no tolerance is needed. Rows 37 = two
    /// groups and five single rows; activations of mixed sign and scale.
    #[test]
    fn legacy_kernels_equal_the_scalar_reference_bit_for_bit() {
        for fmt in [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1] {
            for (blocks, rows) in [(1, 16), (2, 37), (5, 17), (18, 32), (7, 3)] {
                let w = random_row(fmt, blocks * rows, 41);
                let rb = blocks * fmt.block_bytes();
                let xs: Vec<Vec<QPair>> = (0..TOKENS_PER_STEP)
                    .map(|t| {
                        let mut v = data(blocks * QK, 50 + t as u64);
                        v.iter_mut()
                            .enumerate()
                            .for_each(|(i, e)| *e *= (1 + i % 7) as f32);
                        let mut q = Vec::new();
                        quantize_activations(&v, &mut q);
                        q
                    })
                    .collect();
                let want: Vec<Vec<f32>> = xs
                    .iter()
                    .map(|x| {
                        (0..rows)
                            .map(|r| dot_scalar(fmt, &w[r * rb..(r + 1) * rb], x))
                            .collect()
                    })
                    .collect();
                for n in 1..=TOKENS_PER_STEP {
                    let refs: Vec<&[QPair]> = xs[..n].iter().map(|x| &x[..]).collect();
                    let mut got = vec![0f32; rows * n];
                    rows_q_tokens_by_row(fmt, &w, rb, &refs, &mut got);
                    // The AVX2 kernel also where VNNI would be chosen.
                    #[cfg(target_arch = "x86_64")]
                    let avx2 = has_avx2().then(|| {
                        let mut v = vec![0f32; rows * n];
                        rows_tokens_simd(false, fmt, &w, rb, &refs, &mut v);
                        v
                    });
                    #[cfg(not(target_arch = "x86_64"))]
                    let avx2: Option<Vec<f32>> = None;
                    for (kernel, got) in [("dispatched", Some(got)), ("avx2", avx2)] {
                        let Some(got) = got else { continue };
                        for t in 0..n {
                            for r in 0..rows {
                                assert_eq!(
                                    got[r * n + t].to_bits(),
                                    want[t][r].to_bits(),
                                    "{kernel}: {fmt:?} {blocks} blocks, row {r} of {rows}, token {t} of {n}: {} vs {}",
                                    got[r * n + t],
                                    want[t][r]
                                );
                            }
                        }
                    }
                }
                let idx: Vec<u32> = (0..blocks as u32).rev().step_by(2).collect();
                let mut got = vec![0f32; rows];
                rows_q_blocks(fmt, &w, rb, &idx, &xs[0], &mut got);
                for r in 0..rows {
                    let want = dot_blocks_scalar(fmt, &w[r * rb..(r + 1) * rb], &idx, &xs[0]);
                    assert_eq!(
                        got[r].to_bits(),
                        want.to_bits(),
                        "{fmt:?} gathered, row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn multi_token_products_equal_single_token_ones_bit_for_bit() {
        for fmt in QFormat::ALL {
            for blocks in [1, 2, 5, 18] {
                let rows = 9;
                let w = random_row(fmt, blocks * rows, 11);
                let rb = blocks * fmt.block_bytes();
                for n in 1..=TOKENS_PER_STEP {
                    let xs: Vec<Vec<QPair>> = (0..n)
                        .map(|t| {
                            let mut q = Vec::new();
                            quantize_activations(
                                &data(blocks * fmt.block_elems(), 20 + t as u64),
                                &mut q,
                            );
                            q
                        })
                        .collect();
                    let refs: Vec<&[QPair]> = xs.iter().map(|x| &x[..]).collect();
                    let mut outs = vec![vec![0f32; rows]; n];
                    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                    rows_q_tokens(fmt, &w, rb, &refs, &mut views);
                    for t in 0..n {
                        let mut one = vec![0f32; rows];
                        rows_q(fmt, &w, rb, &xs[t], &mut one);
                        assert_eq!(outs[t], one, "{fmt:?} {blocks} blocks, token {t} of {n}");
                    }
                }
            }
        }
    }
}
