//! ggml's Q5_0 and Q5_1 (32-element blocks) and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
//! (256-element blocks): their layouts, dequantization bit for bit as the `gguf` Python
//! package does it, simple quantizers, and the split of every block into 32-element
//! chunks that the dot-product kernels work on.
//!
//! Every chunk of every format has the same shape: 32 unsigned quants `u` (0..=63) in
//! element order, and per 16-element group `g` a multiplier `a_g` and an offset `b_g`
//! with weight `≈ a_g·u + b_g`. With 8-bit activations `(dx, q)` per 32-block, a chunk's
//! dot product is `Σ_g a_g·dx·Σ u·q + b_g·(dx·Σ q)`: an integer product per group, the
//! same for all formats (see `kernels::qdot`). The dequantizers follow each format's own
//! arithmetic instead (e.g. Q6_K is `(d·s)·(u - 32)`, not `a·u + b`), so they round as
//! ggml and gguf-py do.
//!
//! Layouts (little-endian f16 `d`, `dmin`, `m`), and where element `e` of a block lives:
//! - Q5_0 (22 B): `d`, `qh: u32`, `qs[16]`: low nibble of `qs[e % 16]` (high for e >= 16),
//!   bit `e` of `qh` as bit 4; `w = d·(u - 16)`.
//! - Q5_1 (24 B): `d`, `m`, `qh`, `qs[16]` as Q5_0; `w = d·u + m`.
//! - Q2_K (84 B): `scales[16]` (low nibble scale, high nibble min), `qs[64]`, `d`, `dmin`:
//!   chunk `c` = bits `2(c%4)` of `qs[32(c/4)..][..32]`; `w = d·sc·u - dmin·m`.
//! - Q3_K (110 B): `hmask[32]`, `qs[64]`, `scales[12]` (16 six-bit scales), `d`: low two
//!   bits as Q2_K, bit `c` of `hmask[l]` as bit 2; `w = d·(sc - 32)·(u - 4)`.
//! - Q4_K (144 B): `d`, `dmin`, `scales[12]` (8 six-bit scales and mins), `qs[128]`: chunk
//!   `c` = nibble `c % 2` of `qs[32(c/2)..][..32]`; `w = d·sc·u - dmin·m`.
//! - Q5_K (176 B): `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`: as Q4_K plus bit `c` of
//!   `qh[l]` as bit 4.
//! - Q6_K (210 B): `ql[128]`, `qh[64]`, `scales[16]` (i8), `d`: chunk `c = 4n + k` = nibble
//!   `k / 2` of `ql[64n + 32(k%2)..][..32]`, bits `2k` of `qh[32n..][..32]` as bits 4-5;
//!   `w = d·sc·(u - 32)`.

use half::f16;

use super::{QFormat, QK};

#[inline]
fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// The 32 quants of chunk `c` of block `blk` (unsigned, element order).
pub fn chunk_quants(fmt: QFormat, blk: &[u8], c: usize, u: &mut [u8; QK]) {
    match fmt {
        QFormat::Q5_0 | QFormat::Q5_1 => {
            let o = if fmt == QFormat::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
            let qs = &blk[o + 4..o + 20];
            for j in 0..16 {
                u[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        QFormat::Q2K => {
            let (n, j) = (c / 4, c % 4);
            let qs = &blk[16 + 32 * n..16 + 32 * n + 32];
            for l in 0..QK {
                u[l] = (qs[l] >> (2 * j)) & 3;
            }
        }
        QFormat::Q3K => {
            let (n, j) = (c / 4, c % 4);
            let hm = &blk[..32];
            let qs = &blk[32 + 32 * n..32 + 32 * n + 32];
            for l in 0..QK {
                u[l] = ((qs[l] >> (2 * j)) & 3) | (((hm[l] >> c) & 1) << 2);
            }
        }
        QFormat::Q4K | QFormat::Q5K => {
            let qs0 = if fmt == QFormat::Q4K { 16 } else { 48 };
            let qs = &blk[qs0 + 32 * (c / 2)..qs0 + 32 * (c / 2) + 32];
            for l in 0..QK {
                u[l] = (qs[l] >> (4 * (c % 2))) & 0x0f;
            }
            if fmt == QFormat::Q5K {
                let qh = &blk[16..48];
                for l in 0..QK {
                    u[l] |= ((qh[l] >> c) & 1) << 4;
                }
            }
        }
        QFormat::Q6K => {
            let (n, k) = (c / 4, c % 4);
            let ql = &blk[64 * n + 32 * (k % 2)..64 * n + 32 * (k % 2) + 32];
            let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
            for l in 0..QK {
                u[l] = ((ql[l] >> (4 * (k / 2))) & 0x0f) | (((qh[l] >> (2 * k)) & 3) << 4);
            }
        }
        QFormat::Q8_0 | QFormat::Q4_0 | QFormat::Q4_1 => {
            unreachable!("{} has its own kernels", fmt.name())
        }
    }
}

/// Q4_K/Q5_K's six-bit scale and min of sub-block `j` (gguf's `get_scale_min`).
#[inline]
fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 2) & 0x30),
            (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30),
        )
    }
}

/// Q3_K's six-bit scale `i` (0..16), minus 32, as ggml's reference spells it out: the
/// tests' check of [`scales_q3k`].
#[cfg(test)]
fn scale_q3k(s: &[u8], i: usize) -> i32 {
    let lo = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
    let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    (lo | (hi << 4)) as i32 - 32
}

/// All sixteen of Q3_K's six-bit scales, minus 32, unpacked four at a time in 32-bit words
/// as ggml does (decoding them one by one made Q3_K's decode the slowest format's).
#[inline]
fn scales_q3k(s: &[u8; 12]) -> [i8; 16] {
    let word = |k: usize| u32::from_le_bytes([s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]]);
    let (a0, a1, hi) = (word(0), word(1), word(2));
    let (m4, m2) = (0x0f0f_0f0f_u32, 0x0303_0303_u32);
    // Scales 0..8 are the low nibbles of bytes 0..8, 8..16 the high ones; byte 8 + j holds
    // the top two bits of scales j, 4 + j, 8 + j and 12 + j.
    let words = [
        (a0 & m4) | ((hi & m2) << 4),
        (a1 & m4) | (((hi >> 2) & m2) << 4),
        ((a0 >> 4) & m4) | (((hi >> 4) & m2) << 4),
        ((a1 >> 4) & m4) | (((hi >> 6) & m2) << 4),
    ];
    let mut out = [0i8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(words) {
        for (o, b) in o.iter_mut().zip(w.to_le_bytes()) {
            *o = (b as i32 - 32) as i8;
        }
    }
    out
}

/// How chunk `c`'s weights follow from its quants, per 16-element group `g`:
/// `w = a_g·(u - zero) + m_g`, where formats with a `zero` have no `m` (it is 0 and not
/// added, so dequantization rounds as ggml's does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkParams {
    pub a: [f32; 2],
    pub zero: i32,
    pub m: [f32; 2],
}

impl ChunkParams {
    /// The offsets `b_g` of the dot-product form `w = a_g·u + b_g`.
    #[inline]
    pub fn offsets(&self) -> [f32; 2] {
        let z = self.zero as f32;
        [self.m[0] - z * self.a[0], self.m[1] - z * self.a[1]]
    }
}

/// The parameters of chunk `c` of block `blk`.
#[inline]
pub fn chunk_params(fmt: QFormat, blk: &[u8], c: usize) -> ChunkParams {
    match fmt {
        QFormat::Q5_0 => {
            let d = f16_at(blk, 0);
            ChunkParams {
                a: [d, d],
                zero: 16,
                m: [0.0; 2],
            }
        }
        QFormat::Q5_1 => {
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            ChunkParams {
                a: [d, d],
                zero: 0,
                m: [m, m],
            }
        }
        QFormat::Q2K => {
            let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
            let g = |i: usize| {
                let sc = blk[2 * c + i];
                (d * (sc & 0x0f) as f32, -(dmin * (sc >> 4) as f32))
            };
            let ((a0, m0), (a1, m1)) = (g(0), g(1));
            ChunkParams {
                a: [a0, a1],
                zero: 0,
                m: [m0, m1],
            }
        }
        QFormat::Q3K => {
            let d = f16_at(blk, 108);
            let sc = scales_q3k(blk[96..108].try_into().expect("12 scale bytes"));
            ChunkParams {
                a: [d * sc[2 * c] as f32, d * sc[2 * c + 1] as f32],
                zero: 4,
                m: [0.0; 2],
            }
        }
        QFormat::Q4K | QFormat::Q5K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let (sc, m) = scale_min_k4(&blk[4..16], c);
            let (a, m) = (d * sc as f32, -(dmin * m as f32));
            ChunkParams {
                a: [a, a],
                zero: 0,
                m: [m, m],
            }
        }
        QFormat::Q6K => {
            let d = f16_at(blk, 208);
            let s = &blk[192..208];
            ChunkParams {
                a: [d * (s[2 * c] as i8) as f32, d * (s[2 * c + 1] as i8) as f32],
                zero: 32,
                m: [0.0; 2],
            }
        }
        QFormat::Q8_0 | QFormat::Q4_0 | QFormat::Q4_1 => {
            unreachable!("{} has its own kernels", fmt.name())
        }
    }
}

/// The dot-product form of every chunk of block `blk` at once: `a[2c + g]` and
/// `b[2c + g]` for chunk `c`, group `g` (as [`chunk_params`] and
/// [`ChunkParams::offsets`] give them, computed with the same operations), with `f16`
/// widening the block's f16 fields (the kernels pass a hardware conversion).
#[inline(always)]
pub fn block_params(
    fmt: QFormat,
    blk: &[u8],
    f16: impl Fn([u8; 2]) -> f32,
    a: &mut [f32; 16],
    b: &mut [f32; 16],
) {
    let h = |o: usize| f16([blk[o], blk[o + 1]]);
    match fmt {
        // One chunk: entries 0 and 1 only.
        QFormat::Q5_0 => {
            let d = h(0);
            (a[0], a[1]) = (d, d);
            (b[0], b[1]) = (0.0 - 16.0 * d, 0.0 - 16.0 * d);
        }
        QFormat::Q5_1 => {
            let (d, m) = (h(0), h(2));
            (a[0], a[1]) = (d, d);
            (b[0], b[1]) = (m - 0.0 * d, m - 0.0 * d);
        }
        QFormat::Q2K => {
            let (d, dmin) = (h(80), h(82));
            for i in 0..16 {
                let sc = blk[i];
                a[i] = d * (sc & 0x0f) as f32;
                b[i] = -(dmin * (sc >> 4) as f32) - 0.0 * a[i];
            }
        }
        QFormat::Q3K => {
            let d = h(108);
            let sc = scales_q3k(blk[96..108].try_into().expect("12 scale bytes"));
            for i in 0..16 {
                a[i] = d * sc[i] as f32;
                b[i] = 0.0 - 4.0 * a[i];
            }
        }
        QFormat::Q4K | QFormat::Q5K => {
            let (d, dmin) = (h(0), h(2));
            let s = &blk[4..16];
            for j in 0..8 {
                let (sc, m) = scale_min_k4(s, j);
                let (aj, mj) = (d * sc as f32, -(dmin * m as f32));
                a[2 * j] = aj;
                a[2 * j + 1] = aj;
                b[2 * j] = mj - 0.0 * aj;
                b[2 * j + 1] = mj - 0.0 * aj;
            }
        }
        QFormat::Q6K => {
            let d = h(208);
            for i in 0..16 {
                a[i] = d * (blk[192 + i] as i8) as f32;
                b[i] = 0.0 - 32.0 * a[i];
            }
        }
        QFormat::Q8_0 | QFormat::Q4_0 | QFormat::Q4_1 => {
            unreachable!("{} has its own kernels", fmt.name())
        }
    }
}

/// Dequantizes one block of `fmt` (not Q8_0/Q4_0/Q4_1) into `out`
/// (`fmt.block_elems()` values), bit for bit as gguf-py's `dequantize`.
pub fn dequantize_block(fmt: QFormat, blk: &[u8], out: &mut [f32]) {
    let mut u = [0u8; QK];
    for (c, o) in out[..fmt.block_elems()].chunks_exact_mut(QK).enumerate() {
        chunk_quants(fmt, blk, c, &mut u);
        let p = chunk_params(fmt, blk, c);
        for (l, (o, &q)) in o.iter_mut().zip(&u).enumerate() {
            let g = l / 16;
            *o = if p.zero != 0 {
                p.a[g] * (q as i32 - p.zero) as f32
            } else {
                p.a[g] * q as f32 + p.m[g]
            };
        }
    }
}

/// Rounds `v` to the nearest integer in `lo..=hi` (0 for NaN).
#[inline]
fn q_round(v: f32, lo: i32, hi: i32) -> i32 {
    if v.is_nan() {
        0
    } else {
        (v.round() as i32).clamp(lo, hi)
    }
}

/// A group's values as `scale·q - min` with q in `0..=levels`: (scale, min >= 0).
fn affine(x: &[f32], levels: f32) -> (f32, f32) {
    let lo = x.iter().fold(0f32, |m, &v| m.min(v));
    let hi = x.iter().fold(lo, |m, &v| m.max(v));
    ((hi - lo) / levels, -lo)
}

/// A group's values as `scale·q` with q in `-half..half` (the largest magnitude, with its
/// sign, maps to `-half`).
fn symmetric(x: &[f32], half: f32) -> f32 {
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    max / -half
}

/// Quantizes one block of `x` (`fmt.block_elems()` values) into `out`, rounding each
/// value to the nearest level of simple per-group scales (round to nearest; not ggml's
/// scale search): valid blocks for tests and synthetic models.
pub fn quantize_block(fmt: QFormat, x: &[f32], out: &mut [u8]) {
    out.fill(0);
    let inv = |s: f32| if s != 0.0 { 1.0 / s } else { 0.0 };
    let h = |v: f32| f16::from_f32(v).to_le_bytes();
    match fmt {
        QFormat::Q5_0 | QFormat::Q5_1 => {
            let (o, d, base) = if fmt == QFormat::Q5_0 {
                let d = symmetric(x, 16.0);
                out[0..2].copy_from_slice(&h(d));
                (2, f16::from_f32(d).to_f32(), 0.0)
            } else {
                let (d, min) = affine(x, 31.0);
                out[0..2].copy_from_slice(&h(d));
                out[2..4].copy_from_slice(&h(-min));
                (4, f16::from_f32(d).to_f32(), f16::from_f32(-min).to_f32())
            };
            let zero = if fmt == QFormat::Q5_0 { 16.0 } else { 0.0 };
            let mut qh = 0u32;
            for j in 0..QK {
                let q = q_round((x[j] - base) * inv(d) + zero, 0, 31) as u8;
                qh |= ((q >> 4) as u32) << j;
                out[o + 4 + j % 16] |= (q & 0x0f) << (4 * (j / 16));
            }
            out[o..o + 4].copy_from_slice(&qh.to_le_bytes());
        }
        QFormat::Q2K | QFormat::Q4K | QFormat::Q5K => {
            // Per group: scale and min, then both quantized against the block's d, dmin.
            let (glen, levels, sbits) = match fmt {
                QFormat::Q2K => (16, 3.0, 15.0),
                QFormat::Q4K => (32, 15.0, 63.0),
                _ => (32, 31.0, 63.0),
            };
            let groups: Vec<(f32, f32)> = x.chunks(glen).map(|g| affine(g, levels)).collect();
            let smax = groups.iter().fold(0f32, |m, g| m.max(g.0));
            let mmax = groups.iter().fold(0f32, |m, g| m.max(g.1));
            let (d, dmin) = (
                f16::from_f32(smax / sbits).to_f32(),
                f16::from_f32(mmax / sbits).to_f32(),
            );
            let sc: Vec<(u8, u8)> = groups
                .iter()
                .map(|&(s, m)| {
                    (
                        q_round(s * inv(d), 0, sbits as i32) as u8,
                        q_round(m * inv(dmin), 0, sbits as i32) as u8,
                    )
                })
                .collect();
            let (do_, qs0) = match fmt {
                QFormat::Q2K => (80, 16),
                QFormat::Q4K => (0, 16),
                _ => (0, 48),
            };
            out[do_..do_ + 2].copy_from_slice(&h(d));
            out[do_ + 2..do_ + 4].copy_from_slice(&h(dmin));
            if fmt == QFormat::Q2K {
                for (i, &(s, m)) in sc.iter().enumerate() {
                    out[i] = s | (m << 4);
                }
            } else {
                let s = &mut out[4..16];
                for j in 0..4 {
                    let (lo, hi) = (sc[j], sc[j + 4]);
                    s[j] = lo.0 | ((hi.0 >> 4) << 6);
                    s[j + 4] = lo.1 | ((hi.1 >> 4) << 6);
                    s[j + 8] = (hi.0 & 0x0f) | ((hi.1 & 0x0f) << 4);
                }
            }
            for (e, &v) in x.iter().enumerate() {
                let (s, m) = sc[e / glen];
                let step = d * s as f32;
                let q = q_round((v + dmin * m as f32) * inv(step), 0, levels as i32) as u8;
                let (c, l) = (e / QK, e % QK);
                match fmt {
                    QFormat::Q2K => out[qs0 + 32 * (c / 4) + l] |= q << (2 * (c % 4)),
                    _ => {
                        out[qs0 + 32 * (c / 2) + l] |= (q & 0x0f) << (4 * (c % 2));
                        if fmt == QFormat::Q5K {
                            out[16 + l] |= (q >> 4) << c;
                        }
                    }
                }
            }
        }
        QFormat::Q3K | QFormat::Q6K => {
            let (half, smax_q) = if fmt == QFormat::Q3K {
                (4.0, 31.0)
            } else {
                (32.0, 127.0)
            };
            let scales: Vec<f32> = x.chunks(16).map(|g| symmetric(g, half)).collect();
            let amax = scales.iter().fold(0f32, |m, &s| m.max(s.abs()));
            let d = f16::from_f32(amax / smax_q).to_f32();
            let sc: Vec<i32> = scales
                .iter()
                .map(|&s| q_round(s * inv(d), -(smax_q as i32) - 1, smax_q as i32))
                .collect();
            if fmt == QFormat::Q3K {
                out[108..110].copy_from_slice(&h(d));
                for (i, &s) in sc.iter().enumerate() {
                    let v = (s + 32) as u8;
                    if i < 8 {
                        out[96 + i] |= v & 0x0f;
                    } else {
                        out[96 + i - 8] |= (v & 0x0f) << 4;
                    }
                    out[96 + 8 + i % 4] |= ((v >> 4) & 3) << (2 * (i / 4));
                }
            } else {
                out[208..210].copy_from_slice(&h(d));
                for (i, &s) in sc.iter().enumerate() {
                    out[192 + i] = s as i8 as u8;
                }
            }
            let hq = half as i32;
            for (e, &v) in x.iter().enumerate() {
                let step = d * sc[e / 16] as f32;
                let u = (q_round(v * inv(step), -hq, hq - 1) + hq) as u8;
                let (c, l) = (e / QK, e % QK);
                if fmt == QFormat::Q3K {
                    out[32 + 32 * (c / 4) + l] |= (u & 3) << (2 * (c % 4));
                    out[l] |= (u >> 2) << c;
                } else {
                    let (n, k) = (c / 4, c % 4);
                    out[64 * n + 32 * (k % 2) + l] |= (u & 0x0f) << (4 * (k / 2));
                    out[128 + 32 * n + l] |= (u >> 4) << (2 * k);
                }
            }
        }
        QFormat::Q8_0 | QFormat::Q4_0 | QFormat::Q4_1 => {
            unreachable!("{} has its own quantizer", fmt.name())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantizers_round_trip_within_a_step_of_each_group() {
        for fmt in QFormat::ALL.into_iter().filter(|f| !f.is_legacy()) {
            let n = 2 * fmt.block_elems();
            let x = values(n, 7);
            let mut b = vec![0u8; fmt.row_bytes(n)];
            quantize(fmt, &x, &mut b);
            let mut y = vec![0f32; n];
            dequantize(fmt.source(), &b, &mut y);
            // Values span [-1, 1]. Symmetric formats: up to one step of amax/half (the
            // value opposite the largest clips at half - 1); affine ones: half a step of
            // range/levels, plus the rounding of the 6- or 4-bit scales and mins.
            let tol = match fmt {
                QFormat::Q5_0 => 1.1 / 16.0,
                QFormat::Q3K => 1.1 / 4.0,
                QFormat::Q6K => 1.1 / 32.0,
                QFormat::Q2K => 0.5 * 2.0 / 3.0 + 0.15,
                QFormat::Q4K => 0.5 * 2.0 / 15.0 + 0.05,
                _ => 0.5 * 2.0 / 31.0 + 0.05,
            };
            let worst = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= tol, "{fmt:?}: worst {worst} > {tol}");
        }
    }

    #[test]
    fn block_params_equal_chunk_params_bit_for_bit() {
        for fmt in QFormat::ALL.into_iter().filter(|f| !f.is_legacy()) {
            let x = values(fmt.block_elems(), 5);
            let mut blk = vec![0u8; fmt.block_bytes()];
            quantize_block(fmt, &x, &mut blk);
            let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
            block_params(
                fmt,
                &blk,
                |h| f16::from_le_bytes(h).to_f32(),
                &mut a,
                &mut b,
            );
            for c in 0..fmt.chunks_per_block() {
                let p = chunk_params(fmt, &blk, c);
                let off = p.offsets();
                for g in 0..2 {
                    assert_eq!(a[2 * c + g].to_bits(), p.a[g].to_bits(), "{fmt:?}");
                    assert_eq!(b[2 * c + g].to_bits(), off[g].to_bits(), "{fmt:?}");
                }
            }
        }
    }

    #[test]
    fn chunk_form_equals_the_dequantized_values() {
        for fmt in QFormat::ALL.into_iter().filter(|f| !f.is_legacy()) {
            let x = values(fmt.block_elems(), 3);
            let mut b = vec![0u8; fmt.block_bytes()];
            quantize_block(fmt, &x, &mut b);
            let mut y = vec![0f32; x.len()];
            dequantize_block(fmt, &b, &mut y);
            let mut u = [0u8; QK];
            for c in 0..fmt.chunks_per_block() {
                chunk_quants(fmt, &b, c, &mut u);
                let p = chunk_params(fmt, &b, c);
                let off = p.offsets();
                for l in 0..QK {
                    let w = p.a[l / 16] * u[l] as f32 + off[l / 16];
                    let want = y[c * QK + l];
                    assert!((w - want).abs() <= 1e-5 * (1.0 + want.abs()), "{fmt:?}");
                }
            }
        }
    }

    #[test]
    fn q3k_scales_unpacked_together_equal_one_by_one() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..1000 {
            let mut s = [0u8; 12];
            for b in &mut s {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let all = scales_q3k(&s);
            for (i, &v) in all.iter().enumerate() {
                assert_eq!(v as i32, scale_q3k(&s, i), "scale {i} of {s:?}");
            }
        }
    }
}
