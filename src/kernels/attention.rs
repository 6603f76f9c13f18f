//! Causal grouped-query attention of new tokens over the KV cache.

use super::SharedMut;
use super::dot::dot_f32;
#[cfg(target_arch = "x86_64")]
use super::ops::exp512;
use super::ops::softmax;
use super::pool::{ThreadPool, split_range};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// For each new token t (at position `start + t`) and head h: softmax(q·K^T / sqrt(d))·V
/// over positions `0..=start + t`, with KV head `h / (heads / kv_heads)`.
///
/// q: [n, heads * d]; keys, values: [start + n, kv_heads * d]; out: [n, heads * d].
#[allow(clippy::too_many_arguments)]
pub fn attend(
    pool: &ThreadPool,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [f32],
) {
    let kv_dim = kv_heads * d;
    assert_eq!(q.len(), n * heads * d);
    assert_eq!(out.len(), n * heads * d);
    assert!(keys.len() >= (start + n) * kv_dim && values.len() >= (start + n) * kv_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let dst = SharedMut(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if super::gemm_avx512::has_f32() && d.is_multiple_of(16) && heads.is_multiple_of(kv_heads) {
        // One item per (token, KV head): the `group` query heads sharing a KV head are
        // scored together, so each key and value row is loaded once for all of them.
        let items = n * kv_heads;
        pool.run(&|i, threads| {
            let range = split_range(items, 1, i, threads);
            let mut scores = vec![0f32; group * (start + n)];
            for item in range {
                let (t, kvh) = (item / kv_heads, item % kv_heads);
                let len = start + t + 1;
                let first = t * heads + kvh * group;
                // SAFETY: has_f32() checked the CPU. Item (t, kvh) owns the `group`
                // output rows of heads kvh * group.. of token t ([first * d..][..group *
                // d]); items are disjoint across threads (split_range) and `out`
                // outlives the call. q, keys and values hold the rows read (asserted
                // sizes above), and `scores` holds group * len floats.
                unsafe {
                    attend_item_avx512(
                        q.as_ptr().add(first * d),
                        keys.as_ptr().add(kvh * d),
                        values.as_ptr().add(kvh * d),
                        kv_dim,
                        len,
                        group,
                        d,
                        scale,
                        &mut scores[..group * len],
                        dst.get().add(first * d),
                    )
                };
            }
        });
        return;
    }
    let items = n * heads;
    pool.run(&|i, threads| {
        let range = split_range(items, 1, i, threads);
        let mut scores = Vec::with_capacity(start + n);
        for item in range {
            let (t, h) = (item / heads, item % heads);
            let kvh = h / group;
            let qh = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
            let len = start + t + 1;
            scores.clear();
            scores.extend((0..len).map(|p| {
                dot_f32(qh, &keys[p * kv_dim + kvh * d..p * kv_dim + (kvh + 1) * d]) * scale
            }));
            softmax(&mut scores);
            // SAFETY: item (t, h) owns out[(t * heads + h) * d ..][..d]; items are
            // disjoint across threads (split_range) and `out` outlives the call.
            let o =
                unsafe { std::slice::from_raw_parts_mut(dst.get().add((t * heads + h) * d), d) };
            o.fill(0.0);
            for (p, &s) in scores.iter().enumerate() {
                let vr = &values[p * kv_dim + kvh * d..p * kv_dim + (kvh + 1) * d];
                for (a, &b) in o.iter_mut().zip(vr) {
                    *a += s * b;
                }
            }
        }
    });
}

/// Attention of `group` query heads (rows of `q`, stride d) over `len` positions of one KV
/// head (rows of `k` and `v`, stride `kv_dim`), into `group` rows of `out` (stride d).
///
/// Scores are one small GEMM (group x len, reduction over d) with the prefill microkernel;
/// the softmax uses a vectorised exp; the weighted sum of values runs over positions with
/// d / 16 vector accumulators per head, two heads at a time so that each value row,
/// loaded once, feeds independent FMA chains.
///
/// # Safety
/// AVX-512F/BW/VL; q readable for group x d, k and v for `len` rows of stride kv_dim and
/// width d; scores holds group * len floats; out writable for group x d; d % 16 == 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_item_avx512(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    kv_dim: usize,
    len: usize,
    group: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: *mut f32,
) {
    debug_assert!(scores.len() >= group * len && d.is_multiple_of(16));
    let sp = scores.as_mut_ptr();
    // SAFETY: the caller's contract covers every pointer range used below.
    unsafe {
        super::gemm_avx512::gemm_f32_strided(group, len, d, q, d, k, kv_dim, sp, len);
        let mut inv = [0f32; 2];
        let mut g = 0;
        while g < group {
            let pair = if group - g >= 2 { 2 } else { 1 };
            for (h, inv) in inv.iter_mut().enumerate().take(pair) {
                *inv = 1.0 / softmax_unnormalised(sp.add((g + h) * len), len, scale);
            }
            let mut c = 0;
            while c < d {
                let chunks = ((d - c) / 16).min(4);
                let (s, o) = (sp.add(g * len) as *const f32, out.add(g * d + c));
                let args = (s, len, v.add(c), kv_dim, o, d, inv);
                match (pair, chunks) {
                    (1, 1) => weighted_rows::<1, 1>(args),
                    (1, 2) => weighted_rows::<1, 2>(args),
                    (1, 3) => weighted_rows::<1, 3>(args),
                    (1, 4) => weighted_rows::<1, 4>(args),
                    (2, 1) => weighted_rows::<2, 1>(args),
                    (2, 2) => weighted_rows::<2, 2>(args),
                    (2, 3) => weighted_rows::<2, 3>(args),
                    _ => weighted_rows::<2, 4>(args),
                }
                c += 16 * chunks;
            }
            g += pair;
        }
    }
}

/// (scores of G heads at stride len, len, values at stride kv_dim, outputs at stride d,
/// 1 / softmax sum per head).
#[cfg(target_arch = "x86_64")]
type WeightedArgs = (
    *const f32,
    usize,
    *const f32,
    usize,
    *mut f32,
    usize,
    [f32; 2],
);

/// `out[h][c * 16..] = inv[h] * sum_p s[h][p] * v[p][c * 16..]` for G heads and C
/// chunks of 16 values.
///
/// # Safety
/// AVX-512F; the pointer ranges of [`WeightedArgs`] are valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn weighted_rows<const G: usize, const C: usize>(a: WeightedArgs) {
    let (s, len, v, kv_dim, out, d, inv) = a;
    let mut acc = [[_mm512_setzero_ps(); C]; G];
    // SAFETY: per the caller, s[h * len + p] and v[p * kv_dim + 16 c ..][..16] are
    // readable and out[h * d + 16 c..][..16] writable for h < G, p < len, c < C.
    unsafe {
        for p in 0..len {
            let mut vv = [_mm512_setzero_ps(); C];
            for (c, x) in vv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(v.add(p * kv_dim + 16 * c));
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*s.add(h * len + p));
                for (a, &x) in acc.iter_mut().zip(&vv) {
                    *a = _mm512_fmadd_ps(w, x, *a);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let f = _mm512_set1_ps(inv[h]);
            for (c, &a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(h * d + 16 * c), _mm512_mul_ps(a, f));
            }
        }
    }
}

/// `s[p] = exp((s[p] - max) * scale)` over `len` scores; returns their sum.
///
/// # Safety
/// AVX-512F; `s` valid for `len` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn softmax_unnormalised(s: *mut f32, len: usize, scale: f32) -> f32 {
    // SAFETY: full loads/stores stay below len (loop bounds); tails are masked.
    unsafe {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < len {
            let m: __mmask16 = if len - i >= 16 {
                0xFFFF
            } else {
                ((1u32 << (len - i)) - 1) as u16
            };
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s.add(i)));
            i += 16;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let sc = _mm512_set1_ps(scale);
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < len {
            let m: __mmask16 = if len - i >= 16 {
                0xFFFF
            } else {
                ((1u32 << (len - i)) - 1) as u16
            };
            let x = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s.add(i)), mx), sc);
            let e = exp512(x);
            _mm512_mask_storeu_ps(s.add(i), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            i += 16;
        }
        _mm512_reduce_add_ps(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar path, as `attend` runs it without AVX-512.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
        start: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
    ) -> Vec<f32> {
        let kv_dim = kv_heads * d;
        let group = heads / kv_heads;
        let mut out = vec![0f32; n * heads * d];
        for t in 0..n {
            for h in 0..heads {
                let kvh = h / group;
                let qh = &q[(t * heads + h) * d..][..d];
                let mut s: Vec<f32> = (0..start + t + 1)
                    .map(|p| {
                        super::super::dot::dot_f32_scalar(qh, &keys[p * kv_dim + kvh * d..][..d])
                            / (d as f32).sqrt()
                    })
                    .collect();
                softmax(&mut s);
                let o = &mut out[(t * heads + h) * d..][..d];
                for (p, &w) in s.iter().enumerate() {
                    for (a, &b) in o.iter_mut().zip(&values[p * kv_dim + kvh * d..][..d]) {
                        *a += w * b;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            })
            .collect()
    }

    #[test]
    fn attend_matches_reference() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (heads, kv_heads, d) in [(9, 3, 64), (4, 4, 16), (6, 2, 48), (8, 2, 128), (3, 1, 8)]
            {
                for (n, start) in [(1, 0), (1, 37), (9, 0), (17, 5), (40, 0)] {
                    let q = data(n * heads * d, 1);
                    let k = data((start + n) * kv_heads * d, 2);
                    let v = data((start + n) * kv_heads * d, 3);
                    let want = reference(&q, &k, &v, n, start, heads, kv_heads, d);
                    let mut got = vec![0f32; want.len()];
                    attend(&pool, &q, &k, &v, n, start, heads, kv_heads, d, &mut got);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                            "heads {heads}/{kv_heads} d {d} n {n} start {start} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
