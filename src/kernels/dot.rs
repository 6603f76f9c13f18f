//! Dot products of an f32 activation vector with a weight row (f32 or bf16), with scalar
//! references, AVX2+FMA and AVX-512 versions picked at run time.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Scalar reference: `sum(a[i] * b[i])`.
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // Eight partial sums, as the SIMD versions keep, so rounding stays comparable.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for i in (0..chunks).step_by(8) {
        for j in 0..8 {
            acc[j] += a[i + j] * b[i + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// bf16 bits to f32: bf16 is the upper half of an f32.
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Scalar reference: `sum(w[i] * x[i])` with `w` in bf16.
pub fn dot_bf16_scalar(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8 * 8;
    for i in (0..chunks).step_by(8) {
        for j in 0..8 {
            acc[j] += bf16_to_f32(w[i + j]) * x[i + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks..w.len() {
        s += bf16_to_f32(w[i]) * x[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 8 floats at i < n - 7 (checked by the loop bounds).
    unsafe {
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * k)),
                    _mm256_loadu_ps(pb.add(i + 8 * k)),
                    *a,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum256(s);
        while i < n {
            s += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: full loads stay below n by the loop bounds; the tail uses a masked load
    // that touches only the `n - i` valid lanes.
    unsafe {
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(
                    _mm512_loadu_ps(pa.add(i + 16 * k)),
                    _mm512_loadu_ps(pb.add(i + 16 * k)),
                    *a,
                );
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i)),
                _mm512_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            acc[1] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                acc[1],
            );
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }
}

/// Widens 16 bf16 values (as u16) to f32 by shifting them into the upper half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn bf16x16_to_f32(v: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_bf16_avx512(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: full loads stay below n by the loop bounds; the tail uses masked loads of
    // the valid lanes only.
    unsafe {
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = bf16x16_to_f32(_mm256_loadu_si256(pw.add(i + 16 * k) as *const __m256i));
                *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px.add(i + 16 * k)), *a);
            }
            i += 64;
        }
        while i + 16 <= n {
            let wv = bf16x16_to_f32(_mm256_loadu_si256(pw.add(i) as *const __m256i));
            acc[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(px.add(i)), acc[0]);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let wv = bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, pw.add(i) as *const i16));
            acc[1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, px.add(i)), acc[1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 8 elements at i <= n - 8 (loop bounds); the tail is scalar.
    unsafe {
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let raw = _mm_loadu_si128(pw.add(i + 8 * k) as *const __m128i);
                let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)));
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i + 8 * k)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let raw = _mm_loadu_si128(pw.add(i) as *const __m128i);
            let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum256(s);
        while i < n {
            s += bf16_to_f32(*pw.add(i)) * *px.add(i);
            i += 1;
        }
        s
    }
}

/// Which instruction set the dispatching kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// The best instruction set of this CPU; `SPARSELLM_ISA=scalar|avx2` caps it (for tests
/// and comparisons).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("SPARSELLM_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if cap != "scalar"
                && cap != "avx2"
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if cap != "scalar"
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        let _ = cap;
        Isa::Scalar
    })
}

/// `sum(a[i] * b[i])`, fastest available version.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX-512F/BW.
        Isa::Avx512 => unsafe { dot_f32_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { dot_f32_avx2(a, b) },
        _ => dot_f32_scalar(a, b),
    }
}

/// `sum(w[i] * x[i])` with bf16 weights, fastest available version.
#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX-512F/BW.
        Isa::Avx512 => unsafe { dot_bf16_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() checked the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { dot_bf16_avx2(w, x) },
        _ => dot_bf16_scalar(w, x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: f32, b: f32, n: usize) -> bool {
        (a - b).abs() <= 1e-5 * (n as f32).sqrt() * (1.0 + b.abs())
    }

    #[test]
    fn simd_dots_match_scalar_on_odd_sizes() {
        for n in [
            0, 1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 576, 1000, 1537,
        ] {
            let a = data(n, 1);
            let b = data(n, 2);
            let w: Vec<u16> = a.iter().map(|&x| f32_to_bf16(x)).collect();
            let r = dot_f32_scalar(&a, &b);
            let rb = dot_bf16_scalar(&w, &b);
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: features checked just above.
                    let (x, y) = unsafe { (dot_f32_avx2(&a, &b), dot_bf16_avx2(&w, &b)) };
                    assert!(close(x, r, n), "avx2 f32 n={n}: {x} vs {r}");
                    assert!(close(y, rb, n), "avx2 bf16 n={n}: {y} vs {rb}");
                }
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: features checked just above.
                    let (x, y) = unsafe { (dot_f32_avx512(&a, &b), dot_bf16_avx512(&w, &b)) };
                    assert!(close(x, r, n), "avx512 f32 n={n}: {x} vs {r}");
                    assert!(close(y, rb, n), "avx512 bf16 n={n}: {y} vs {rb}");
                }
            }
            assert!(close(dot_f32(&a, &b), r, n));
            assert!(close(dot_bf16(&w, &b), rb, n));
        }
    }
}

/// `out[r] = w[r, :] · x` for the `out.len()` rows of `w` (row-major, `x.len()` columns).
///
/// Row by row: one sequential stream through memory, which the hardware prefetchers
/// follow best (interleaving four rows measured 2x slower on Zen 5).
pub fn rows_f32(w: &[f32], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    assert_eq!(w.len(), out.len() * cols);
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_f32(&w[r * cols..(r + 1) * cols], x);
    }
}

/// `out[r] = w[r, :] · x` with bf16 weights.
///
/// On CPUs with AVX-512 BF16 the activations are rounded to bf16 once and each row is one
/// `vdpbf16ps` per 32 weights (bf16 products, f32 accumulation), as llama.cpp computes
/// bf16 models: the widening path costs more instructions than the memory system lets
/// through. Elsewhere the weights are widened to f32.
pub fn rows_bf16(w: &[u16], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    assert_eq!(w.len(), out.len() * cols);
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        let xb: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        for (r, o) in out.iter_mut().enumerate() {
            // SAFETY: has_avx512_bf16() checked the features; the row slice has `cols`
            // elements like `xb`.
            *o = unsafe { dot_bf16_bf16_avx512(&w[r * cols..(r + 1) * cols], &xb) };
        }
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_bf16(&w[r * cols..(r + 1) * cols], x);
    }
}

/// Whether the bf16 x bf16 dot product (AVX-512 BF16) is used; `SPARSELLM_ISA` below
/// avx512 turns it off.
pub fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            isa() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Scalar reference of the bf16 x bf16 product: both operands bf16, f32 accumulation.
pub fn dot_bf16_bf16_scalar(w: &[u16], x: &[u16]) -> f32 {
    let xf: Vec<f32> = x.iter().map(|&b| bf16_to_f32(b)).collect();
    dot_bf16_scalar(w, &xf)
}

/// How far ahead (in bf16 elements) the bf16 dot prefetches weights.
const PREFETCH_ELEMS: usize = 2048;

/// `sum(w[i] * x[i])`, both bf16, with `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot_bf16_bf16_avx512(w: &[u16], x: &[u16]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    // SAFETY: full loads read 32 elements below n (loop bounds); the tail load is masked
    // to the n - i valid elements. __m512i and __m512bh are both 64 plain bytes.
    unsafe {
        let bh = |v: __m512i| -> __m512bh { std::mem::transmute(v) };
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // Rows of a matrix are contiguous: prefetching a fixed distance ahead
                // runs into the next rows, which the hardware prefetcher (stopping at
                // page boundaries, ramping up per stream) fetches too late.
                _mm_prefetch::<_MM_HINT_T0>(
                    pw.wrapping_add(i + 32 * k + PREFETCH_ELEMS) as *const i8
                );
                let wv = _mm512_loadu_si512(pw.add(i + 32 * k) as *const __m512i);
                let xv = _mm512_loadu_si512(px.add(i + 32 * k) as *const __m512i);
                *a = _mm512_dpbf16_ps(*a, bh(wv), bh(xv));
            }
            i += 64;
        }
        while i < n {
            let left = n - i;
            let m: __mmask32 = if left >= 32 {
                u32::MAX
            } else {
                (1u32 << left) - 1
            };
            let wv = _mm512_maskz_loadu_epi16(m, pw.add(i) as *const i16);
            let xv = _mm512_maskz_loadu_epi16(m, px.add(i) as *const i16);
            acc[0] = _mm512_dpbf16_ps(acc[0], bh(wv), bh(xv));
            i += 32;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}

#[cfg(test)]
mod rows_tests {
    use super::*;

    #[test]
    fn row_blocks_match_scalar_dots_on_odd_sizes() {
        for (rows, cols) in [(1, 1), (3, 17), (4, 16), (5, 33), (9, 576), (13, 1537)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1013) as f32 / 507.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 104729) % 997) as f32 / 498.0 - 1.0)
                .collect();
            let wb: Vec<u16> = w.iter().map(|&v| f32_to_bf16(v)).collect();
            let mut o = vec![0f32; rows];
            let mut ob = vec![0f32; rows];
            rows_f32(&w, &x, &mut o);
            rows_bf16(&wb, &x, &mut ob);
            for r in 0..rows {
                let want = dot_f32_scalar(&w[r * cols..(r + 1) * cols], &x);
                let wantb = if has_avx512_bf16() {
                    let xb: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
                    dot_bf16_bf16_scalar(&wb[r * cols..(r + 1) * cols], &xb)
                } else {
                    dot_bf16_scalar(&wb[r * cols..(r + 1) * cols], &x)
                };
                let tol = 1e-4 * (cols as f32).sqrt();
                assert!(
                    (o[r] - want).abs() <= tol * (1.0 + want.abs()),
                    "f32 {rows}x{cols} row {r}"
                );
                assert!(
                    (ob[r] - wantb).abs() <= tol * (1.0 + wantb.abs()),
                    "bf16 {rows}x{cols} row {r}"
                );
            }
        }
    }
}

/// `sum(w[i] * x[i])` with both operands bf16 (f32 accumulation), fastest available
/// version. Unlike the matvec's row kernel this one does not prefetch past the row: it is
/// meant for gathered rows (the sparse MLP), where the memory after a row is not read next.
#[inline]
pub fn dot_bf16_bf16(w: &[u16], x: &[u16]) -> f32 {
    assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: has_avx512_bf16() checked the CPU features; lengths are equal.
        return unsafe { dot_bf16_bf16_gather_avx512(w, x) };
    }
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8 * 8;
    for i in (0..chunks).step_by(8) {
        for j in 0..8 {
            acc[j] += bf16_to_f32(w[i + j]) * bf16_to_f32(x[i + j]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks..w.len() {
        s += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    }
    s
}

/// As `dot_bf16_bf16_avx512`, without the prefetch ahead (gathered rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot_bf16_bf16_gather_avx512(w: &[u16], x: &[u16]) -> f32 {
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    // SAFETY: full loads read 32 elements below n (loop bounds); the tail load is masked
    // to the n - i valid elements. __m512i and __m512bh are both 64 plain bytes.
    unsafe {
        while i + 64 <= n {
            let w0 = _mm512_loadu_si512(pw.add(i) as *const __m512i);
            let x0 = _mm512_loadu_si512(px.add(i) as *const __m512i);
            let w1 = _mm512_loadu_si512(pw.add(i + 32) as *const __m512i);
            let x1 = _mm512_loadu_si512(px.add(i + 32) as *const __m512i);
            acc[0] = _mm512_dpbf16_ps(
                acc[0],
                std::mem::transmute::<__m512i, __m512bh>(w0),
                std::mem::transmute::<__m512i, __m512bh>(x0),
            );
            acc[1] = _mm512_dpbf16_ps(
                acc[1],
                std::mem::transmute::<__m512i, __m512bh>(w1),
                std::mem::transmute::<__m512i, __m512bh>(x1),
            );
            i += 64;
        }
        while i < n {
            let left = n - i;
            let m: __mmask32 = if left >= 32 {
                u32::MAX
            } else {
                (1u32 << left) - 1
            };
            let wv = _mm512_maskz_loadu_epi16(m, pw.add(i) as *const i16);
            let xv = _mm512_maskz_loadu_epi16(m, px.add(i) as *const i16);
            acc[0] = _mm512_dpbf16_ps(
                acc[0],
                std::mem::transmute::<__m512i, __m512bh>(wv),
                std::mem::transmute::<__m512i, __m512bh>(xv),
            );
            i += 32;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}

/// Rounds `x` to bf16 into `out` (resized), as the bf16 x bf16 kernels consume it.
pub fn to_bf16_into(x: &[f32], out: &mut Vec<u16>) {
    out.clear();
    out.extend(x.iter().map(|&v| f32_to_bf16(v)));
}

#[cfg(test)]
mod bf16_bf16_tests {
    use super::*;

    #[test]
    fn gather_dot_matches_scalar_on_odd_sizes() {
        for n in [0, 1, 31, 32, 33, 63, 64, 65, 127, 576, 2049] {
            let w: Vec<u16> = (0..n)
                .map(|i| f32_to_bf16(((i * 7919) % 1013) as f32 / 507.0 - 1.0))
                .collect();
            let x: Vec<u16> = (0..n)
                .map(|i| f32_to_bf16(((i * 104729) % 997) as f32 / 498.0 - 1.0))
                .collect();
            let want = dot_bf16_bf16_scalar(&w, &x);
            let got = dot_bf16_bf16(&w, &x);
            assert!(
                (got - want).abs() <= 1e-4 * (n as f32).sqrt() * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
        }
    }
}

/// As [`dot_bf16_bf16`], also prefetching (into L2) `ahead` at the offsets it reads of `w`:
/// a gathered row is followed by an unrelated one, so the caller names the row it will
/// read next, and the prefetches spread over this row's work instead of stalling in a
/// burst. `ahead` must have `w.len()` elements; it is only prefetched, never read.
#[inline]
pub fn dot_bf16_bf16_ahead(w: &[u16], x: &[u16], ahead: &[u16]) -> f32 {
    assert_eq!(w.len(), x.len());
    assert_eq!(ahead.len(), w.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: has_avx512_bf16() checked the CPU features; lengths are equal.
        return unsafe { dot_bf16_bf16_ahead_avx512(w, x, ahead) };
    }
    dot_bf16_bf16(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot_bf16_bf16_ahead_avx512(w: &[u16], x: &[u16], ahead: &[u16]) -> f32 {
    let n = w.len().min(x.len()).min(ahead.len());
    let (pw, px, pa) = (w.as_ptr(), x.as_ptr(), ahead.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    // SAFETY: full loads read 32 elements below n (loop bounds); the tail load is masked
    // to the n - i valid elements; prefetches stay inside `ahead` (same length) and never
    // fault. __m512i and __m512bh are both 64 plain bytes.
    unsafe {
        while i + 64 <= n {
            _mm_prefetch::<_MM_HINT_T1>(pa.add(i) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(pa.add(i + 32) as *const i8);
            let w0 = _mm512_loadu_si512(pw.add(i) as *const __m512i);
            let x0 = _mm512_loadu_si512(px.add(i) as *const __m512i);
            let w1 = _mm512_loadu_si512(pw.add(i + 32) as *const __m512i);
            let x1 = _mm512_loadu_si512(px.add(i + 32) as *const __m512i);
            acc[0] = _mm512_dpbf16_ps(
                acc[0],
                std::mem::transmute::<__m512i, __m512bh>(w0),
                std::mem::transmute::<__m512i, __m512bh>(x0),
            );
            acc[1] = _mm512_dpbf16_ps(
                acc[1],
                std::mem::transmute::<__m512i, __m512bh>(w1),
                std::mem::transmute::<__m512i, __m512bh>(x1),
            );
            i += 64;
        }
        while i < n {
            let left = n - i;
            let m: __mmask32 = if left >= 32 {
                u32::MAX
            } else {
                (1u32 << left) - 1
            };
            _mm_prefetch::<_MM_HINT_T1>(pa.add(i) as *const i8);
            let wv = _mm512_maskz_loadu_epi16(m, pw.add(i) as *const i16);
            let xv = _mm512_maskz_loadu_epi16(m, px.add(i) as *const i16);
            acc[0] = _mm512_dpbf16_ps(
                acc[0],
                std::mem::transmute::<__m512i, __m512bh>(wv),
                std::mem::transmute::<__m512i, __m512bh>(xv),
            );
            i += 32;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }
}
