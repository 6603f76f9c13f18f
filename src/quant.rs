//! GGUF's quantized block formats and their scalar dequantization: the reference every
//! faster path is tested against. ggml's 32-element formats Q8_0, Q4_0, Q4_1 live here;
//! Q5_0, Q5_1 and the 256-element K-quants (Q2_K..Q6_K) in [`blocks`], which also splits
//! each of their blocks into 32-element chunks for the kernels.
//!
//! Blocks are `#[repr(C)]` plain-old-data read with `bytemuck`; every field is a byte array
//! so a block may sit at any address (GGUF only aligns tensors, and a 20-byte Q4_1 block
//! leaves later blocks at offsets that are not multiples of 4).

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

use crate::loader::SourceDType;

pub mod blocks;

/// Elements per quantized block of ggml's 32-wide formats, and per chunk of the
/// K-quants' 256-element blocks: the unit activations are quantized in.
pub const QK: usize = 32;
/// Elements per K-quant block.
pub const QK_K: usize = 256;

/// A quantized weight format: the block layout the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl QFormat {
    /// Bytes of one block ([`block_elems`](Self::block_elems) elements).
    pub const fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 34,
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q5_0 => 22,
            QFormat::Q5_1 => 24,
            QFormat::Q2K => 84,
            QFormat::Q3K => 110,
            QFormat::Q4K => 144,
            QFormat::Q5K => 176,
            QFormat::Q6K => 210,
        }
    }
    /// Elements of one block: 32, or 256 for the K-quants.
    pub const fn block_elems(self) -> usize {
        match self {
            QFormat::Q2K | QFormat::Q3K | QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => QK_K,
            _ => QK,
        }
    }
    /// 32-element chunks per block (1, or 8 for the K-quants).
    pub const fn chunks_per_block(self) -> usize {
        self.block_elems() / QK
    }
    /// Bytes of a row of `cols` elements (a multiple of [`block_elems`](Self::block_elems)).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }
    /// Whether the format runs on the original Q8_0/Q4_0/Q4_1 kernels (one scale per
    /// 32-block); the others run on the chunk kernels of [`blocks`].
    pub const fn is_legacy(self) -> bool {
        matches!(self, QFormat::Q8_0 | QFormat::Q4_0 | QFormat::Q4_1)
    }
    /// Where the quants start inside a block (after the f16 scale, and Q4_1's f16 min).
    pub(crate) const fn qs_offset(self) -> usize {
        match self {
            QFormat::Q4_1 => 4,
            _ => 2,
        }
    }
    /// The loader's name for this storage type.
    pub fn source(self) -> SourceDType {
        match self {
            QFormat::Q8_0 => SourceDType::Q8_0,
            QFormat::Q4_0 => SourceDType::Q4_0,
            QFormat::Q4_1 => SourceDType::Q4_1,
            QFormat::Q5_0 => SourceDType::Q5_0,
            QFormat::Q5_1 => SourceDType::Q5_1,
            QFormat::Q2K => SourceDType::Q2K,
            QFormat::Q3K => SourceDType::Q3K,
            QFormat::Q4K => SourceDType::Q4K,
            QFormat::Q5K => SourceDType::Q5K,
            QFormat::Q6K => SourceDType::Q6K,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8_0 => "q8_0",
            QFormat::Q4_0 => "q4_0",
            QFormat::Q4_1 => "q4_1",
            QFormat::Q5_0 => "q5_0",
            QFormat::Q5_1 => "q5_1",
            QFormat::Q2K => "q2_k",
            QFormat::Q3K => "q3_k",
            QFormat::Q4K => "q4_k",
            QFormat::Q5K => "q5_k",
            QFormat::Q6K => "q6_k",
        }
    }
    /// Every format, for tests.
    pub const ALL: [QFormat; 10] = [
        QFormat::Q8_0,
        QFormat::Q4_0,
        QFormat::Q4_1,
        QFormat::Q5_0,
        QFormat::Q5_1,
        QFormat::Q2K,
        QFormat::Q3K,
        QFormat::Q4K,
        QFormat::Q5K,
        QFormat::Q6K,
    ];
}

/// `x = d * q`, q in -128..=127.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; QK],
}

/// `x = d * (q - 8)`, q a nibble; byte j holds element j (low nibble) and j + 16 (high).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; QK / 2],
}

/// `x = d * q + m`, q a nibble; same nibble order as Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; QK / 2],
}

#[inline]
pub fn f16_le(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

impl BlockQ8_0 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = f16_le(self.d);
        for (o, &q) in out[..QK].iter_mut().zip(&self.qs) {
            *o = d * q as f32;
        }
    }
}

impl BlockQ4_0 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = f16_le(self.d);
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = d * ((q & 0x0f) as i32 - 8) as f32;
            out[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
        }
    }
}

impl BlockQ4_1 {
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = f16_le(self.d);
        let m = f16_le(self.m);
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = d * (q & 0x0f) as f32 + m;
            out[j + QK / 2] = d * (q >> 4) as f32 + m;
        }
    }
}

/// Dequantizes `bytes` holding `out.len()` elements of type `dtype` into `out`.
///
/// Panics if the lengths disagree: callers (the loaders) have validated tensor sizes.
pub fn dequantize(dtype: SourceDType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        dtype.bytes_for(out.len()),
        Some(bytes.len()),
        "dequantize: {} bytes for {} {} elements",
        bytes.len(),
        out.len(),
        dtype.name()
    );
    match dtype {
        SourceDType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        SourceDType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        SourceDType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        SourceDType::Q8_0 => {
            let blocks: &[BlockQ8_0] = bytemuck::cast_slice(bytes);
            for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
                b.dequantize(o);
            }
        }
        SourceDType::Q4_0 => {
            let blocks: &[BlockQ4_0] = bytemuck::cast_slice(bytes);
            for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
                b.dequantize(o);
            }
        }
        SourceDType::Q4_1 => {
            let blocks: &[BlockQ4_1] = bytemuck::cast_slice(bytes);
            for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
                b.dequantize(o);
            }
        }
        q => {
            let f = q.qformat().expect("quantized");
            for (b, o) in bytes
                .chunks_exact(f.block_bytes())
                .zip(out.chunks_exact_mut(f.block_elems()))
            {
                blocks::dequantize_block(f, b, o);
            }
        }
    }
}

/// Quantizes `values` (a whole number of blocks) into `out` in `fmt`, as ggml's reference
/// quantizers do (`quantize_row_q8_0_ref`, `_q4_0_ref`, `_q4_1_ref`).
///
/// The other formats get simple round-to-nearest quantizers (see [`blocks::quantize_block`]):
/// valid blocks for tests and synthetic models, not llama.cpp's search for the best scales.
pub fn quantize(fmt: QFormat, values: &[f32], out: &mut [u8]) {
    assert!(values.len().is_multiple_of(fmt.block_elems()));
    assert_eq!(out.len(), fmt.row_bytes(values.len()));
    if !fmt.is_legacy() {
        for (x, o) in values
            .chunks_exact(fmt.block_elems())
            .zip(out.chunks_exact_mut(fmt.block_bytes()))
        {
            blocks::quantize_block(fmt, x, o);
        }
        return;
    }
    for (x, o) in values
        .chunks_exact(QK)
        .zip(out.chunks_exact_mut(fmt.block_bytes()))
    {
        match fmt {
            QFormat::Q8_0 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let b = BlockQ8_0 {
                    d: f16::from_f32(d).to_le_bytes(),
                    qs: std::array::from_fn(|j| (x[j] * id).round() as i8),
                };
                o.copy_from_slice(bytemuck::bytes_of(&b));
            }
            QFormat::Q4_0 => {
                // The value of largest magnitude, with its sign, maps to -8.
                let max = x
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
                let b = BlockQ4_0 {
                    d: f16::from_f32(d).to_le_bytes(),
                    qs: std::array::from_fn(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)),
                };
                o.copy_from_slice(bytemuck::bytes_of(&b));
            }
            QFormat::Q4_1 => {
                let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| (((v - min) * id + 0.5) as i32).min(15) as u8;
                let b = BlockQ4_1 {
                    d: f16::from_f32(d).to_le_bytes(),
                    m: f16::from_f32(min).to_le_bytes(),
                    qs: std::array::from_fn(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)),
                };
                o.copy_from_slice(bytemuck::bytes_of(&b));
            }
            _ => unreachable!("legacy formats only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
        assert_eq!(std::mem::size_of::<BlockQ4_1>(), 20);
        assert_eq!(std::mem::align_of::<BlockQ4_1>(), 1);
    }

    #[test]
    fn q4_1_low_nibbles_first() {
        let mut b = BlockQ4_1::zeroed();
        b.d = f16::from_f32(0.5).to_le_bytes();
        b.m = f16::from_f32(-1.0).to_le_bytes();
        b.qs[0] = 0x3a; // element 0 <- 0xa, element 16 <- 0x3
        let mut out = [0f32; QK];
        b.dequantize(&mut out);
        assert_eq!(out[0], 0.5 * 10.0 - 1.0);
        assert_eq!(out[16], 0.5 * 3.0 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q4_0_and_q8_0_scales() {
        let mut b = BlockQ4_0::zeroed();
        b.d = f16::from_f32(2.0).to_le_bytes();
        b.qs[15] = 0xf0;
        let mut out = [0f32; QK];
        b.dequantize(&mut out);
        assert_eq!(out[15], -16.0);
        assert_eq!(out[31], 14.0);
        let mut q = BlockQ8_0::zeroed();
        q.d = f16::from_f32(0.25).to_le_bytes();
        q.qs[3] = -128;
        q.dequantize(&mut out);
        assert_eq!(out[3], -32.0);
    }

    #[test]
    fn quantizers_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..3 * QK)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        for (fmt, src, steps) in [
            (QFormat::Q8_0, SourceDType::Q8_0, 127.0),
            (QFormat::Q4_0, SourceDType::Q4_0, 8.0),
            (QFormat::Q4_1, SourceDType::Q4_1, 15.0),
        ] {
            let mut bytes = vec![0u8; 3 * fmt.block_bytes()];
            quantize(fmt, &x, &mut bytes);
            let mut back = vec![0f32; x.len()];
            dequantize(src, &bytes, &mut back);
            for (blk, (a, b)) in x.chunks(QK).zip(back.chunks(QK)).enumerate() {
                let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let range = a.iter().cloned().fold(f32::MIN, f32::max)
                    - a.iter().cloned().fold(f32::MAX, f32::min);
                let step = if fmt == QFormat::Q4_1 {
                    range / steps
                } else {
                    amax / steps
                };
                // Q4_0's 16 levels run from -8 to 7 steps: values of the sign opposite to
                // the largest one clip at 7, up to one whole step away.
                let step = if fmt == QFormat::Q4_0 {
                    2.0 * step
                } else {
                    step
                };
                for (u, v) in a.iter().zip(b) {
                    // Half a step, plus the f16 rounding of the scale (and min).
                    assert!(
                        (u - v).abs() <= 0.5 * step + 2e-3 * amax,
                        "{fmt:?} block {blk}: {u} -> {v}"
                    );
                }
            }
        }
    }
}
