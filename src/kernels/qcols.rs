//! Q4_0 and Q4_1 matrices held by input column, losslessly: the layout input sparsity
//! (TEAL/WINA) would need on 4-bit files, measured here before the engine adopts it.
//!
//! A GGUF Q4 matrix `[out, in]` stores, per row, blocks of 32 inputs (a scale `d`, Q4_1's
//! minimum `m`, 32 nibbles). Skipping an input then saves nothing (its nibble shares a
//! block with 31 others), and re-quantizing the matrix along the other axis doubles its
//! quantization error (docs/sparsity.md). This layout moves the same numbers: per block
//! column (32 inputs), the scales of every output row (`d[out]`, then Q4_1's `m[out]`),
//! then one row of `out` nibbles per input. An input's weights are contiguous, so a kernel
//! that skips it skips its bytes; the scales (a fifth of a Q4_1 file, a ninth of Q4_0)
//! are read for every block column with an input kept.
//!
//! Arithmetic: exactly the row-major kernels' ([`super::qdot`]): the kept inputs of a
//! block are quantized to 8 bits as the whole block with the dropped inputs zeroed would
//! be, each output's block sum is an exact integer, and `acc = fma(isum, d·dx, acc)`
//! (then Q4_1's `fma(m, dx·Σq, acc)`) runs block after block. So the product equals, bit
//! for bit, the row-major product of `x` with the dropped inputs zeroed (the tests check).
//!
//! Nibble order within an input's row: each 16 bytes hold 32 consecutive outputs, output
//! `j` in the low nibble of byte `j` and output `j + 16` in the high one (ggml's order
//! within a block), so one 128-bit load and two masks give two vectors of 16 outputs.

use bytemuck::Zeroable;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::qdot::{QPair, quantize_activations};
use crate::quant::{QFormat, QK, f16_le};

/// A Q4_0 or Q4_1 matrix `[out, in]` held by input column (see the module docs).
pub struct QColMatrix {
    fmt: QFormat,
    out_dim: usize,
    in_dim: usize,
    /// Per block column: `d[out]` (f16 bits), then for Q4_1 `m[out]`.
    scales: Vec<u16>,
    /// Per input: `out / 2` bytes of nibbles.
    quants: Vec<u8>,
}

/// Reusable buffers of [`QColMatrix::matvec`].
#[derive(Default)]
pub struct QColScratch {
    block: Vec<f32>,
    pairs: Vec<QPair>,
    /// The kept inputs of one block column (indices within it), padded to quads.
    kept: Vec<u8>,
}

impl QColMatrix {
    /// Repacks row-major GGUF blocks (`out` rows of `in / 32` blocks) without changing a
    /// value. `out` must be a multiple of 32 (every projection of the models here is).
    pub fn from_row_major(fmt: QFormat, rows: &[u8], out_dim: usize, in_dim: usize) -> QColMatrix {
        assert!(matches!(fmt, QFormat::Q4_0 | QFormat::Q4_1), "{fmt:?}");
        assert!(out_dim.is_multiple_of(32) && in_dim.is_multiple_of(QK));
        let (bb, blocks) = (fmt.block_bytes(), in_dim / QK);
        assert_eq!(rows.len(), out_dim * blocks * bb, "row-major size");
        let per_col = if fmt == QFormat::Q4_1 { 2 } else { 1 } * out_dim;
        let mut scales = vec![0u16; blocks * per_col];
        let mut quants = vec![0u8; in_dim * out_dim / 2];
        for o in 0..out_dim {
            for b in 0..blocks {
                let blk = &rows[(o * blocks + b) * bb..][..bb];
                scales[b * per_col + o] = u16::from_le_bytes([blk[0], blk[1]]);
                if fmt == QFormat::Q4_1 {
                    scales[b * per_col + out_dim + o] = u16::from_le_bytes([blk[2], blk[3]]);
                }
                let qs = &blk[fmt.qs_offset()..][..QK / 2];
                for k in 0..QK {
                    let q = if k < 16 {
                        qs[k] & 0x0f
                    } else {
                        qs[k - 16] >> 4
                    };
                    let i = b * QK + k;
                    let byte = &mut quants[i * out_dim / 2 + (o / 32) * 16 + o % 16];
                    *byte |= if o % 32 < 16 { q } else { q << 4 };
                }
            }
        }
        QColMatrix {
            fmt,
            out_dim,
            in_dim,
            scales,
            quants,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes held (the same as the row-major blocks').
    pub fn byte_len(&self) -> usize {
        self.scales.len() * 2 + self.quants.len()
    }

    /// `out = W · x` over the inputs `kept` (ascending; None: every input), on one thread.
    pub fn matvec(&self, x: &[f32], kept: Option<&[u32]>, out: &mut [f32], s: &mut QColScratch) {
        assert_eq!(x.len(), self.in_dim, "QColMatrix::matvec: input size");
        assert_eq!(out.len(), self.out_dim, "QColMatrix::matvec: output size");
        if let Some(k) = kept {
            assert!(
                k.windows(2).all(|w| w[0] < w[1])
                    && k.last().is_none_or(|&i| (i as usize) < self.in_dim),
                "QColMatrix::matvec: kept inputs must ascend and lie below {}",
                self.in_dim
            );
        }
        out.fill(0.0);
        let mut next = 0;
        for b in 0..self.in_dim / QK {
            // This block column's kept inputs, and the block with the others zeroed.
            s.kept.clear();
            s.block.clear();
            s.block.resize(QK, 0.0);
            match kept {
                None => {
                    s.kept.extend(0..QK as u8);
                    s.block.copy_from_slice(&x[b * QK..][..QK]);
                }
                Some(k) => {
                    while next < k.len() && (k[next] as usize) < (b + 1) * QK {
                        let j = k[next] as usize - b * QK;
                        s.kept.push(j as u8);
                        s.block[j] = x[b * QK + j];
                        next += 1;
                    }
                }
            }
            if s.kept.is_empty() {
                continue;
            }
            quantize_activations(&s.block, &mut s.pairs);
            let pair = &s.pairs[0];
            // Pad to whole quads with an input whose quant is zero (a partial block has
            // one: its dropped inputs were quantized as zeros; a whole block needs none).
            let pad = (0..QK as u8)
                .find(|&j| pair.qs[j as usize] == 0)
                .unwrap_or(0);
            while !s.kept.len().is_multiple_of(4) {
                s.kept.push(pad);
            }
            let col = Column {
                fmt: self.fmt,
                out_dim: self.out_dim,
                scales: &self.scales[b * self.scales_per_col()..][..self.scales_per_col()],
                quants: &self.quants[b * QK * self.out_dim / 2..][..QK * self.out_dim / 2],
            };
            #[cfg(target_arch = "x86_64")]
            if has_vbmi_vnni() {
                // SAFETY: checked the CPU; `col` holds the block column's scales and 32
                // rows of out / 2 bytes, `kept` indices below 32, `out` out_dim floats.
                unsafe { column_vbmi(&col, &s.kept, pair, out) };
                continue;
            }
            column_scalar(&col, &s.kept, pair, out);
        }
    }

    fn scales_per_col(&self) -> usize {
        (if self.fmt == QFormat::Q4_1 { 2 } else { 1 }) * self.out_dim
    }
}

/// One block column of a [`QColMatrix`].
struct Column<'a> {
    fmt: QFormat,
    out_dim: usize,
    scales: &'a [u16],
    quants: &'a [u8],
}

impl Column<'_> {
    fn dm(&self, o: usize) -> (f32, f32) {
        let d = f16_le(self.scales[o].to_le_bytes());
        let m = if self.fmt == QFormat::Q4_1 {
            f16_le(self.scales[self.out_dim + o].to_le_bytes())
        } else {
            0.0
        };
        (d, m)
    }

    fn nibble(&self, input: usize, o: usize) -> i32 {
        let byte = self.quants[input * self.out_dim / 2 + (o / 32) * 16 + o % 16];
        (if o % 32 < 16 { byte & 0x0f } else { byte >> 4 }) as i32
    }
}

/// The row-major kernels' `unsigned_offset`: Q4_0's nibbles are `q + 8`.
fn offset(fmt: QFormat) -> i32 {
    if fmt == QFormat::Q4_0 { -8 } else { 0 }
}

/// [`column_vbmi`] in scalar code: the same integer sums and the same FMAs.
fn column_scalar(col: &Column<'_>, kept: &[u8], x: &QPair, out: &mut [f32]) {
    let (dx, s) = (x.ds[0], x.ds[1]);
    for (o, acc) in out.iter_mut().enumerate() {
        let mut isum = offset(col.fmt).wrapping_mul(x.qsum[0]);
        for &j in kept {
            isum += col.nibble(j as usize, o) * x.qs[j as usize] as i32;
        }
        // A padding input has quant 0: the sum above counts it for nothing.
        let (d, m) = col.dm(o);
        *acc = (isum as f32).mul_add(d * dx, *acc);
        if col.fmt == QFormat::Q4_1 {
            *acc = m.mul_add(s, *acc);
        }
    }
}

/// AVX-512 VBMI (`vpermb`) and VNNI (`vpdpbusd`), with F16C for the scales.
#[cfg(target_arch = "x86_64")]
pub fn has_vbmi_vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        super::dot::isa() == super::dot::Isa::Avx512
            && is_x86_feature_detected!("avx512vbmi")
            && super::qdot::has_vnni()
    })
}

/// One block column into `out`: for every 32 outputs, two vectors of 16 integer sums
/// over the kept inputs, four at a time (`vpermb` gathers four inputs' nibbles of 16
/// outputs into the 4-byte lanes `vpdpbusd` multiplies by the four activation quants).
///
/// # Safety
/// AVX-512 F/BW/VL/VBMI/VNNI and F16C; `col` as [`QColMatrix`] builds it, `kept` a
/// multiple of 4 indices below 32, `out` `col.out_dim` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn column_vbmi(col: &Column<'_>, kept: &[u8], x: &QPair, out: &mut [f32]) {
    debug_assert!(kept.len().is_multiple_of(4) && out.len() == col.out_dim);
    let row = col.out_dim / 2;
    // Lane byte 4o + k takes byte 16k + o: input k's nibble of output o.
    let idx: [u8; 64] = std::array::from_fn(|i| ((i % 4) * 16 + i / 4) as u8);
    // SAFETY: every load below reads 16 bytes at `chunk * 16` of an input row (chunk <
    // out_dim / 32) or 16 scales at output `chunk * 32 (+ 16)`; stores write out's 32
    // floats of the chunk; all inside the slices (sizes set by `from_row_major`).
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
        let nib = _mm512_set1_epi8(0x0f);
        let init = _mm512_set1_epi32(offset(col.fmt).wrapping_mul(x.qsum[0]));
        let (dx, s) = (_mm512_set1_ps(x.ds[0]), _mm512_set1_ps(x.ds[1]));
        let quads = kept.len() / 4;
        let mut words = [0i32; QK / 4];
        let mut rows = [std::ptr::null::<u8>(); QK];
        for (g, q) in kept.chunks_exact(4).enumerate() {
            words[g] = i32::from_le_bytes([0, 1, 2, 3].map(|k| x.qs[q[k] as usize] as u8));
        }
        for (r, &j) in rows.iter_mut().zip(kept) {
            *r = col.quants.as_ptr().add(j as usize * row);
        }
        for chunk in 0..col.out_dim / 32 {
            let (mut lo, mut hi) = (init, init);
            for (g, &w) in words[..quads].iter().enumerate() {
                let r = &rows[4 * g..4 * g + 4];
                let v =
                    _mm512_castsi128_si512(_mm_loadu_si128(r[0].add(chunk * 16) as *const __m128i));
                let v = _mm512_inserti32x4::<1>(
                    v,
                    _mm_loadu_si128(r[1].add(chunk * 16) as *const __m128i),
                );
                let v = _mm512_inserti32x4::<2>(
                    v,
                    _mm_loadu_si128(r[2].add(chunk * 16) as *const __m128i),
                );
                let v = _mm512_inserti32x4::<3>(
                    v,
                    _mm_loadu_si128(r[3].add(chunk * 16) as *const __m128i),
                );
                let wl = _mm512_permutexvar_epi8(idx, _mm512_and_si512(v, nib));
                let wh =
                    _mm512_permutexvar_epi8(idx, _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib));
                let b = _mm512_set1_epi32(w);
                lo = _mm512_dpbusd_epi32(lo, wl, b);
                hi = _mm512_dpbusd_epi32(hi, wh, b);
            }
            for (half, isum) in [lo, hi].into_iter().enumerate() {
                let o = chunk * 32 + half * 16;
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                    col.scales.as_ptr().add(o) as *const __m256i
                ));
                let p = out.as_mut_ptr().add(o);
                let mut acc = _mm512_loadu_ps(p);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), acc);
                if col.fmt == QFormat::Q4_1 {
                    let m = _mm512_cvtph_ps(_mm256_loadu_si256(
                        col.scales.as_ptr().add(col.out_dim + o) as *const __m256i,
                    ));
                    acc = _mm512_fmadd_ps(m, s, acc);
                }
                _mm512_storeu_ps(p, acc);
            }
        }
    }
}

impl QColScratch {
    pub fn new() -> QColScratch {
        QColScratch {
            block: Vec::new(),
            pairs: vec![QPair::zeroed()],
            kept: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qdot::rows_q;
    use crate::kernels::test_data::data;

    /// Random Q4 row-major blocks with finite scales.
    fn blocks(fmt: QFormat, out_dim: usize, in_dim: usize, seed: u64) -> Vec<u8> {
        let bb = fmt.block_bytes();
        let n = out_dim * in_dim / QK;
        let vals = data(n * bb, seed);
        let mut w = vec![0u8; n * bb];
        for (b, blk) in w.chunks_exact_mut(bb).enumerate() {
            let d = half::f16::from_f32(0.01 + vals[b * bb].abs() * 0.02).to_bits();
            blk[..2].copy_from_slice(&d.to_le_bytes());
            if fmt == QFormat::Q4_1 {
                let m = half::f16::from_f32(vals[b * bb + 1] * 0.1).to_bits();
                blk[2..4].copy_from_slice(&m.to_le_bytes());
            }
            for (j, q) in blk[fmt.qs_offset()..].iter_mut().enumerate() {
                *q = ((vals[b * bb + 2 + j] + 3.0) * 42.0) as u8;
            }
        }
        w
    }

    /// The row-major product of `x` with every input not in `kept` zeroed.
    fn masked_reference(
        fmt: QFormat,
        w: &[u8],
        out_dim: usize,
        x: &[f32],
        kept: Option<&[u32]>,
    ) -> Vec<f32> {
        let mut xm = vec![0f32; x.len()];
        match kept {
            None => xm.copy_from_slice(x),
            Some(k) => k.iter().for_each(|&i| xm[i as usize] = x[i as usize]),
        }
        let mut pairs = Vec::new();
        quantize_activations(&xm, &mut pairs);
        let mut out = vec![0f32; out_dim];
        rows_q(fmt, w, w.len() / out_dim, &pairs, &mut out);
        out
    }

    #[test]
    fn the_repacked_product_equals_the_row_major_one_on_masked_inputs_bit_for_bit() {
        for fmt in [QFormat::Q4_0, QFormat::Q4_1] {
            for (out_dim, in_dim) in [(32, 32), (96, 160), (576, 192), (64, 1536)] {
                let w = blocks(fmt, out_dim, in_dim, out_dim as u64 + in_dim as u64);
                let m = QColMatrix::from_row_major(fmt, &w, out_dim, in_dim);
                assert_eq!(m.byte_len(), w.len(), "{fmt:?}: same bytes");
                let x = data(in_dim, 7);
                let mut s = QColScratch::new();
                for keep in [1.0, 0.6, 0.3, 0.02, 0.0] {
                    // Keep the largest |x| (as TEAL does), a fraction `keep` of them.
                    let mut order: Vec<u32> = (0..in_dim as u32).collect();
                    order.sort_by(|&a, &b| x[b as usize].abs().total_cmp(&x[a as usize].abs()));
                    let mut kept: Vec<u32> = order[..(keep * in_dim as f64) as usize].to_vec();
                    kept.sort_unstable();
                    let kept = (keep < 1.0).then_some(&kept[..]);
                    let want = masked_reference(fmt, &w, out_dim, &x, kept);
                    let mut got = vec![f32::NAN; out_dim];
                    m.matvec(&x, kept, &mut got, &mut s);
                    assert_eq!(got, want, "{fmt:?} {out_dim}x{in_dim} keep {keep}");
                    let mut scalar = vec![0f32; out_dim];
                    scalar_matvec(&m, &x, kept, &mut scalar);
                    assert_eq!(
                        scalar, want,
                        "{fmt:?} {out_dim}x{in_dim} keep {keep}: scalar"
                    );
                }
            }
        }
    }

    /// [`QColMatrix::matvec`] forced onto the scalar column kernel.
    fn scalar_matvec(m: &QColMatrix, x: &[f32], kept: Option<&[u32]>, out: &mut [f32]) {
        out.fill(0.0);
        for b in 0..m.in_dim / QK {
            let mut block = vec![0f32; QK];
            let mut ks: Vec<u8> = Vec::new();
            for (j, v) in block.iter_mut().enumerate() {
                let i = (b * QK + j) as u32;
                if kept.is_none_or(|k| k.contains(&i)) {
                    *v = x[i as usize];
                    ks.push(j as u8);
                }
            }
            if ks.is_empty() {
                continue;
            }
            let mut pairs = Vec::new();
            quantize_activations(&block, &mut pairs);
            let col = Column {
                fmt: m.fmt,
                out_dim: m.out_dim,
                scales: &m.scales[b * m.scales_per_col()..][..m.scales_per_col()],
                quants: &m.quants[b * QK * m.out_dim / 2..][..QK * m.out_dim / 2],
            };
            column_scalar(&col, &ks, &pairs[0], out);
        }
    }
}
