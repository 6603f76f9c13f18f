//! GGUF's quantized block formats (ggml's Q8_0, Q4_0, Q4_1) and their scalar
//! dequantization: the reference every faster path is tested against.
//!
//! Blocks are `#[repr(C)]` plain-old-data read with `bytemuck`; every field is a byte array
//! so a block may sit at any address (GGUF only aligns tensors, and a 20-byte Q4_1 block
//! leaves later blocks at offsets that are not multiples of 4).

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

use crate::loader::SourceDType;

/// Elements per quantized block, for all of ggml's 32-wide formats.
pub const QK: usize = 32;

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
}
