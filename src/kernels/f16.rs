//! Kernels on IEEE half-precision (f16) weights with f32 activations: dot products (decode
//! rows, sparse gate/up rows), `y += a·w` (sparse down rows), and widening a slice to f32
//! (embedding rows, the prefill GEMM's tiles). Each has a scalar reference and AVX-512F
//! (`vcvtph2ps` on 16 lanes) and AVX2+F16C (8 lanes) versions picked at run time by
//! [`isa`] (so `SPARSELLM_ISA=scalar|avx2` caps them too).
//!
//! Arithmetic: f16 -> f32 is exact, so every kernel computes in f32 on the exact weight
//! values, with one FMA per element; only the summation order differs between versions
//! (eight partial sums in the scalar dot, as in the SIMD ones).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::dot::{Isa, isa};

/// f16 bits to f32 (exact).
#[inline]
pub fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// f32 to f16 bits, rounding to nearest even (overflow to infinity, NaN stays NaN).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// The version the f16 kernels use: [`isa`], with AVX2 used only where the CPU also has
/// F16C (every AVX2 CPU so far does, but the instruction set does not imply it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2F16c,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Level::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if is_x86_feature_detected!("f16c") => Level::Avx2F16c,
        _ => Level::Scalar,
    })
}

/// Scalar reference: `sum(w[i] * x[i])` with `w` in f16 (eight partial sums).
pub fn dot_f16_scalar(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8 * 8;
    for i in (0..chunks).step_by(8) {
        for j in 0..8 {
            acc[j] += f16_to_f32(w[i + j]) * x[i + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks..w.len() {
        s += f16_to_f32(w[i]) * x[i];
    }
    s
}

/// Scalar reference: `y += a·w` with `w` in f16.
pub fn axpy_f16_scalar(a: f32, w: &[u16], y: &mut [f32]) {
    assert_eq!(w.len(), y.len());
    for (o, &v) in y.iter_mut().zip(w) {
        *o += a * f16_to_f32(v);
    }
}

/// Scalar reference: `out[i] = w[i]` widened to f32.
pub fn f16_to_f32_slice_scalar(w: &[u16], out: &mut [f32]) {
    assert_eq!(w.len(), out.len());
    for (o, &v) in out.iter_mut().zip(w) {
        *o = f16_to_f32(v);
    }
}

pub fn f32_to_f16_slice_scalar(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_f16(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_f16_avx512(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: full loads read 16 elements at i + 16 <= n (loop bounds); the tail loads are
    // masked to the n - i valid lanes (the masked 256-bit load needs AVX-512BW/VL, enabled).
    unsafe {
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(i + 16 * k) as *const __m256i));
                *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px.add(i + 16 * k)), *a);
            }
            i += 64;
        }
        while i + 16 <= n {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(i) as *const __m256i));
            acc[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px.add(i)), acc[0]);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, pw.add(i) as *const i16));
            acc[1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, px.add(i)), acc[1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 8 elements at i + 8 <= n (loop bounds); the tail is scalar.
    unsafe {
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(i + 8 * k) as *const __m128i));
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i + 8 * k)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(i) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum256(s);
        while i < n {
            s += f16_to_f32(*pw.add(i)) * *px.add(i);
            i += 1;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn axpy_f16_avx512(a: f32, w: &[u16], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm512_set1_ps(a);
    let mut i = 0;
    // SAFETY: full vectors at i + 16 <= n by the loop bound; the tail is masked to the
    // n - i valid lanes.
    unsafe {
        while i + 16 <= n {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(i) as *const __m256i));
            _mm512_storeu_ps(
                py.add(i),
                _mm512_fmadd_ps(va, wv, _mm512_loadu_ps(py.add(i))),
            );
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, pw.add(i) as *const i16));
            let v = _mm512_fmadd_ps(va, wv, _mm512_maskz_loadu_ps(m, py.add(i)));
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_avx2(a: f32, w: &[u16], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    // SAFETY: every access covers 8 elements at i + 8 <= n; the tail is scalar.
    unsafe {
        while i + 8 <= n {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(i) as *const __m128i));
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(va, wv, _mm256_loadu_ps(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) = a.mul_add(f16_to_f32(*pw.add(i)), *py.add(i));
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn f16_to_f32_slice_avx512(w: &[u16], out: &mut [f32]) {
    let n = w.len().min(out.len());
    let (pw, po) = (w.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: full vectors at i + 16 <= n by the loop bound; the tail is masked to the
    // n - i valid lanes.
    unsafe {
        while i + 16 <= n {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(i) as *const __m256i));
            _mm512_storeu_ps(po.add(i), v);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, pw.add(i) as *const i16));
            _mm512_mask_storeu_ps(po.add(i), m, v);
        }
    }
}

/// [`f16_rows_to_f32`]'s loop, compiled for AVX-512 so the row conversion inlines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn f16_rows_to_f32_avx512(src: &[u16], stride: usize, width: usize, out: &mut [f32]) {
    for (r, o) in out.chunks_exact_mut(width).enumerate() {
        // SAFETY: the caller's CPU check; slices are bounds-checked.
        unsafe { f16_to_f32_slice_avx512(&src[r * stride..][..width], o) };
    }
}

/// `vcvtps2ph` rounds to nearest even like [`f32_to_f16`]: equal on every finite input
/// and infinity (NaN stays NaN, its payload may differ).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn f32_to_f16_slice_avx512(x: &[f32], out: &mut [u16]) {
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let n = x.len().min(out.len());
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: full vectors at i + 16 <= n by the loop bound; the tail is masked to the
    // n - i valid lanes.
    unsafe {
        while i + 16 <= n {
            let h = _mm512_cvtps_ph::<RNE>(_mm512_loadu_ps(px.add(i)));
            _mm256_storeu_si256(po.add(i) as *mut __m256i, h);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let h = _mm512_cvtps_ph::<RNE>(_mm512_maskz_loadu_ps(m, px.add(i)));
            _mm256_mask_storeu_epi16(po.add(i) as *mut i16, m, h);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_to_f16_slice_avx2(x: &[f32], out: &mut [u16]) {
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;
    let n = x.len().min(out.len());
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: every access covers 8 elements at i + 8 <= n; the tail is scalar.
    unsafe {
        while i + 8 <= n {
            let h = _mm256_cvtps_ph::<RNE>(_mm256_loadu_ps(px.add(i)));
            _mm_storeu_si128(po.add(i) as *mut __m128i, h);
            i += 8;
        }
    }
    f32_to_f16_slice_scalar(&x[i..n], &mut out[i..n]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_slice_avx2(w: &[u16], out: &mut [f32]) {
    let n = w.len().min(out.len());
    let (pw, po) = (w.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: every access covers 8 elements at i + 8 <= n; the tail is scalar.
    unsafe {
        while i + 8 <= n {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(i) as *const __m128i));
            _mm256_storeu_ps(po.add(i), v);
            i += 8;
        }
        while i < n {
            *po.add(i) = f16_to_f32(*pw.add(i));
            i += 1;
        }
    }
}

/// `sum(w[i] * x[i])` with f16 weights, fastest available version.
#[inline]
pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX-512F/BW/VL.
        Level::Avx512 => unsafe { dot_f16_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX2, FMA and F16C.
        Level::Avx2F16c => unsafe { dot_f16_avx2(w, x) },
        Level::Scalar => dot_f16_scalar(w, x),
    }
}

/// `out[r] = w[r, :] · x` with f16 weights (row-major, `x.len()` columns), row by row:
/// one sequential stream. No software prefetch: unlike the bf16 row kernel's, it measured
/// slower here (the conversions, not the loads, set the pace: about 10% below the bf16
/// kernel's bytes per second on Zen 5).
pub fn rows_f16(w: &[u16], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    assert_eq!(w.len(), out.len() * cols);
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_f16(&w[r * cols..(r + 1) * cols], x);
    }
}

/// `y += a·w` with `w` in f16, in f32 (the SIMD versions fuse the multiply-add).
#[inline]
pub fn axpy_f16(a: f32, w: &[u16], y: &mut [f32]) {
    assert_eq!(w.len(), y.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX-512F/BW/VL.
        Level::Avx512 => unsafe { axpy_f16_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX2, FMA and F16C.
        Level::Avx2F16c => unsafe { axpy_f16_avx2(a, w, y) },
        Level::Scalar => axpy_f16_scalar(a, w, y),
    }
}

/// `out[i] = w[i]` widened to f32 (exact), fastest available version.
#[inline]
pub fn f16_to_f32_slice(w: &[u16], out: &mut [f32]) {
    assert_eq!(w.len(), out.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX-512F/BW/VL.
        Level::Avx512 => unsafe { f16_to_f32_slice_avx512(w, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX2 and F16C.
        Level::Avx2F16c => unsafe { f16_to_f32_slice_avx2(w, out) },
        Level::Scalar => f16_to_f32_slice_scalar(w, out),
    }
}

/// Rows of a strided f16 matrix widened to f32 (exact): row r of `out` (`width` wide,
/// packed) is `src[r * stride..][..width]`, for `out.len() / width` rows. One call for
/// many short rows (an f16 KV cache's head rows), so the version is chosen once.
pub fn f16_rows_to_f32(src: &[u16], stride: usize, width: usize, out: &mut [f32]) {
    if width == 0 {
        return;
    }
    let rows = out.len() / width;
    assert_eq!(out.len(), rows * width);
    assert!(
        rows == 0 || (rows - 1) * stride + width <= src.len(),
        "f16_rows_to_f32: source too short"
    );
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX-512F/BW/VL; every row read lies in
        // `src` (asserted above) and every row written in `out`.
        Level::Avx512 => unsafe { f16_rows_to_f32_avx512(src, stride, width, out) },
        _ => {
            for (r, o) in out.chunks_exact_mut(width).enumerate() {
                f16_to_f32_slice(&src[r * stride..][..width], o);
            }
        }
    }
}

/// `out[i] = x[i]` rounded to f16 (nearest even), fastest available version.
#[inline]
pub fn f32_to_f16_slice(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX-512F/BW/VL.
        Level::Avx512 => unsafe { f32_to_f16_slice_avx512(x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() checked the CPU has AVX2 and F16C.
        Level::Avx2F16c => unsafe { f32_to_f16_slice_avx2(x, out) },
        Level::Scalar => f32_to_f16_slice_scalar(x, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kernels::test_data::data;

    const SIZES: [usize; 16] = [
        0, 1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 577, 1000, 2049,
    ];

    /// f16 weights in [-3, 3), with the patterns a converter can get wrong mixed in.
    fn weights(n: usize, seed: u64) -> Vec<u16> {
        let mut w: Vec<u16> = data(n, seed).iter().map(|&v| f32_to_f16(v * 3.0)).collect();
        // A subnormal, the largest finite, negative zero, the smallest normal.
        for (i, s) in [0x0001u16, 0x7bff, 0x8000, 0x0400].into_iter().enumerate() {
            if i * 5 < n {
                w[i * 5] = s;
            }
        }
        w
    }

    /// Within the rounding of `n` terms whose largest product is `scale`.
    fn close(a: f32, b: f32, n: usize, scale: f32) -> bool {
        (a - b).abs() <= 1e-6 * (n as f32).sqrt().max(1.0) * (1.0 + b.abs() + scale)
    }

    /// The largest |w[i]·x[i]|: bounds the rounding of any summation order.
    fn max_product(w: &[u16], x: &[f32]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(&w, &x)| (f16_to_f32(w) * x).abs())
            .fold(0.0, f32::max)
    }

    /// What the machine offers, each version called directly (not through the cap).
    fn levels() -> Vec<Level> {
        let mut v = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Level::Avx2F16c);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                v.push(Level::Avx512);
            }
        }
        v
    }

    fn dot_at(l: Level, w: &[u16], x: &[f32]) -> f32 {
        match l {
            Level::Scalar => dot_f16_scalar(w, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `levels()` offered this level only after checking the features.
            Level::Avx2F16c => unsafe { dot_f16_avx2(w, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { dot_f16_avx512(w, x) },
        }
    }

    fn axpy_at(l: Level, a: f32, w: &[u16], y: &mut [f32]) {
        match l {
            Level::Scalar => axpy_f16_scalar(a, w, y),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `levels()` offered this level only after checking the features.
            Level::Avx2F16c => unsafe { axpy_f16_avx2(a, w, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { axpy_f16_avx512(a, w, y) },
        }
    }

    fn widen_at(l: Level, w: &[u16], out: &mut [f32]) {
        match l {
            Level::Scalar => f16_to_f32_slice_scalar(w, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `levels()` offered this level only after checking the features.
            Level::Avx2F16c => unsafe { f16_to_f32_slice_avx2(w, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { f16_to_f32_slice_avx512(w, out) },
        }
    }

    #[test]
    fn scalar_conversion_is_exact_for_every_pattern() {
        // Every f16 value is exactly an f32 (NaNs stay NaN), and rounds back to itself.
        for b in 0..=u16::MAX {
            let f = f16_to_f32(b);
            if f.is_nan() {
                assert!(half::f16::from_bits(b).is_nan());
                continue;
            }
            assert_eq!(f32_to_f16(f), b, "{b:#06x}");
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn widening_is_bit_exact_at_every_level() {
        // All 65536 patterns, then odd lengths and tails.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut want = vec![0f32; all.len()];
        f16_to_f32_slice_scalar(&all, &mut want);
        for l in levels() {
            let mut got = vec![0f32; all.len()];
            widen_at(l, &all, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{l:?} {i:#06x}: {a} vs {b}"
                );
            }
            for n in SIZES {
                let w = weights(n, 3);
                let mut got = vec![7f32; n + 1];
                widen_at(l, &w, &mut got[..n]);
                let mut want = vec![0f32; n];
                f16_to_f32_slice_scalar(&w, &mut want);
                assert_eq!(&got[..n], &want[..], "{l:?} n={n}");
                assert_eq!(got[n], 7.0, "{l:?} n={n}: wrote past the end");
            }
        }
        let w = weights(577, 4);
        let (mut a, mut b) = (vec![0f32; 577], vec![0f32; 577]);
        f16_to_f32_slice(&w, &mut a);
        f16_to_f32_slice_scalar(&w, &mut b);
        assert_eq!(a, b);
    }

    fn narrow_at(l: Level, x: &[f32], out: &mut [u16]) {
        match l {
            Level::Scalar => f32_to_f16_slice_scalar(x, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `levels()` lists only what the CPU has.
            Level::Avx2F16c => unsafe { f32_to_f16_slice_avx2(x, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { f32_to_f16_slice_avx512(x, out) },
        }
    }

    #[test]
    fn narrowing_rounds_as_the_scalar_reference_at_every_level() {
        // Values around every rounding case: halfway points (ties to even), subnormals,
        // overflow to infinity, signed zeros; then odd lengths and tails.
        let mut x: Vec<f32> = Vec::new();
        for b in (0..=u16::MAX).step_by(7) {
            let f = f16_to_f32(b);
            if f.is_finite() {
                let up = f32::from_bits(f.to_bits() + 1);
                x.extend([f, up, f + (up - f) * 4096.0, -f]);
            }
        }
        x.extend([
            65519.0,
            65520.0,
            1e9,
            -1e9,
            f32::INFINITY,
            -0.0,
            1e-30,
            2.9802322e-8,
        ]);
        x.extend(data(1000, 5).iter().map(|v| v * 100.0));
        let mut want = vec![0u16; x.len()];
        f32_to_f16_slice_scalar(&x, &mut want);
        for l in levels() {
            let mut got = vec![0u16; x.len()];
            narrow_at(l, &x, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a, b, "{l:?} {}: {a:#06x} vs {b:#06x}", x[i]);
            }
            let nan = [f32::NAN];
            let mut h = [0u16];
            narrow_at(l, &nan, &mut h);
            assert!(f16_to_f32(h[0]).is_nan(), "{l:?}: NaN");
            for n in SIZES {
                let v = data(n, 6);
                let mut got = vec![7u16; n + 1];
                narrow_at(l, &v, &mut got[..n]);
                let mut want = vec![0u16; n];
                f32_to_f16_slice_scalar(&v, &mut want);
                assert_eq!(&got[..n], &want[..], "{l:?} n={n}");
                assert_eq!(got[n], 7, "{l:?} n={n}: wrote past the end");
            }
        }
    }

    #[test]
    fn strided_rows_widen_as_each_row_alone() {
        for (width, stride, rows) in [(64, 192, 5), (17, 17, 3), (1, 4, 9), (33, 40, 1), (8, 8, 0)]
        {
            let src = weights(stride * rows.max(1), 8);
            let mut got = vec![0f32; width * rows];
            f16_rows_to_f32(&src, stride, width, &mut got);
            for r in 0..rows {
                let mut want = vec![0f32; width];
                f16_to_f32_slice_scalar(&src[r * stride..][..width], &mut want);
                assert_eq!(
                    &got[r * width..][..width],
                    &want[..],
                    "{width}/{stride} row {r}"
                );
            }
        }
    }

    #[test]
    fn dots_match_scalar_at_every_level_on_odd_sizes() {
        for n in SIZES {
            let w = weights(n, 1);
            let x = data(n, 2);
            let want = dot_f16_scalar(&w, &x);
            let scale = max_product(&w, &x);
            for l in levels() {
                let got = dot_at(l, &w, &x);
                assert!(close(got, want, n, scale), "{l:?} n={n}: {got} vs {want}");
            }
            let got = dot_f16(&w, &x);
            assert!(
                close(got, want, n, scale),
                "dispatch n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn rows_match_scalar_dots_on_odd_sizes() {
        for (rows, cols) in [
            (1, 1),
            (3, 7),
            (4, 16),
            (5, 33),
            (9, 577),
            (13, 1537),
            (2, 2049),
        ] {
            let w = weights(rows * cols, 5);
            let x = data(cols, 6);
            let mut out = vec![0f32; rows];
            rows_f16(&w, &x, &mut out);
            for r in 0..rows {
                let row = &w[r * cols..(r + 1) * cols];
                let want = dot_f16_scalar(row, &x);
                assert!(
                    close(out[r], want, cols, max_product(row, &x)),
                    "{rows}x{cols} row {r}: {} vs {want}",
                    out[r]
                );
            }
        }
    }

    /// One FMA against a rounded product then an add: a rounding of the product `p` and
    /// one of the sum apart.
    fn axpy_close(a: f32, b: f32, p: f32) -> bool {
        (a - b).abs() <= 1.2e-7 * (p.abs() + b.abs()) + f32::MIN_POSITIVE
    }

    #[test]
    fn axpy_matches_scalar_at_every_level_on_odd_sizes() {
        for n in SIZES {
            let w = weights(n, 7);
            let y0 = data(n, 8);
            let mut want = y0.clone();
            axpy_f16_scalar(-0.37, &w, &mut want);
            for l in levels() {
                let mut got = y0.clone();
                got.push(5.0);
                axpy_at(l, -0.37, &w, &mut got[..n]);
                assert_eq!(got[n], 5.0, "{l:?} n={n}: wrote past the end");
                for i in 0..n {
                    assert!(
                        axpy_close(got[i], want[i], -0.37 * f16_to_f32(w[i])),
                        "{l:?} n={n} [{i}]: {} vs {}",
                        got[i],
                        want[i]
                    );
                }
            }
            let mut got = y0.clone();
            axpy_f16(-0.37, &w, &mut got);
            for i in 0..n {
                assert!(axpy_close(got[i], want[i], -0.37 * f16_to_f32(w[i])));
            }
        }
    }
}

/// The linear layers on f16 weights against the f32 reference on the widened weights.
#[cfg(test)]
mod linear_tests {
    use super::*;

    use crate::kernels::linear::{WeightView, matmul, matmul_scalar, matvec};
    use crate::kernels::pool::ThreadPool;
    use crate::kernels::test_data::data;

    #[test]
    fn matvec_and_matmul_on_f16_match_the_widened_f32_reference() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (rows, cols) in [(1, 1), (7, 15), (17, 33), (65, 100), (200, 577), (33, 64)] {
                let wh: Vec<u16> = data(rows * cols, 1)
                    .iter()
                    .map(|&v| f32_to_f16(v))
                    .collect();
                let wf: Vec<f32> = wh.iter().map(|&b| f16_to_f32(b)).collect();
                let w = WeightView::F16(&wh);
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    w.row_to_f32(r, cols, &mut row);
                    assert_eq!(&row[..], &wf[r * cols..(r + 1) * cols], "row_to_f32");
                }
                for n in [1, 2, 3, 7, 9, 17] {
                    let x = data(n * cols, 2);
                    let mut want = vec![0f32; n * rows];
                    matmul_scalar(WeightView::F32(&wf), rows, cols, &x, n, &mut want);
                    let mut got = vec![0f32; n * rows];
                    matmul(&pool, w, rows, cols, &x, n, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "{threads} threads {rows}x{cols} n={n}: {a} vs {b}"
                        );
                    }
                    let mut mv = vec![0f32; rows];
                    matvec(&pool, w, rows, cols, &x[..cols], &mut mv);
                    for (r, (a, b)) in mv.iter().zip(&want[..rows]).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "matvec {rows}x{cols} row {r}: {a} vs {b}"
                        );
                        let d = w.row_dot(r, cols, &x[..cols]);
                        assert!((d - b).abs() < 1e-4 * (1.0 + b.abs()), "row_dot");
                    }
                }
            }
        }
    }
}
