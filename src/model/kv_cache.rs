//! The key/value cache of one sequence: per layer, the rotated keys and the values of
//! every position so far, `[position][kv_heads * head_dim]`, growing as tokens arrive
//! (memory is proportional to the tokens seen, not to the model's maximum context).
//!
//! Keys and values are held in f32 (the default: attention sees exactly what the
//! projections computed) or f16 ([`KvDType::F16`], as llama.cpp's default cache: half the
//! memory and half the bytes attention reads per position; each value rounded to nearest
//! even once, when its token's layer is done). The forward pass writes a layer's new rows
//! in f32 either way ([`KvCache::append_rows`]) and [`KvCache::seal`]s them before
//! attention reads the layer ([`KvCache::layer`]).
//!
//! The cache also carries the forward pass's working buffers ([`Scratch`]): it is the
//! state a sequence keeps between calls, and reusing the buffers spares each call (and
//! each layer) fresh allocations.

use std::sync::Mutex;

use crate::kernels::attention::KvRows;
use crate::kernels::f16::f32_to_f16_slice;
use crate::model::llama::Scratch;

/// The element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDType {
    #[default]
    F32,
    F16,
}

impl KvDType {
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
        }
    }

    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDType::F32),
            "f16" => Ok(KvDType::F16),
            _ => Err(format!("unknown KV cache type '{s}' (expected f32 or f16)")),
        }
    }
}

/// Buffers of dropped caches (emptied, capacity kept), taken by new caches of the same
/// shape. A 128-token prefill of SmolLM2 writes about 9 MB of fresh keys, values and
/// working buffers: as new memory that is ~2200 page faults, which cost 2-5 us each on
/// these VMs (5-10% of the prefill), where recycled buffers cost nothing. At most
/// `MAX_SPARE` caches are kept, so memory stays at what the process has used at its peak.
static SPARE: Mutex<Vec<KvBuffers>> = Mutex::new(Vec::new());
const MAX_SPARE: usize = 2;

/// One layer's keys or values, in the cache's element type.
#[derive(Clone)]
enum Rows {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl Rows {
    fn new(dtype: KvDType) -> Rows {
        match dtype {
            KvDType::F32 => Rows::F32(Vec::new()),
            KvDType::F16 => Rows::F16(Vec::new()),
        }
    }
    fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F16(v) => v.len(),
        }
    }
    fn truncate(&mut self, n: usize) {
        match self {
            Rows::F32(v) => v.truncate(n),
            Rows::F16(v) => v.truncate(n),
        }
    }
    fn capacity_bytes(&self) -> usize {
        match self {
            Rows::F32(v) => v.capacity() * 4,
            Rows::F16(v) => v.capacity() * 2,
        }
    }
    fn view(&self) -> KvRows<'_> {
        match self {
            Rows::F32(v) => KvRows::F32(v),
            Rows::F16(v) => KvRows::F16(v),
        }
    }
}

struct KvBuffers {
    kv_dim: usize,
    dtype: KvDType,
    keys: Vec<Rows>,
    values: Vec<Rows>,
    scratch: Scratch,
}

pub struct KvCache {
    kv_dim: usize,
    dtype: KvDType,
    keys: Vec<Rows>,
    values: Vec<Rows>,
    /// An f16 cache's new rows in f32, from `append_rows` until `seal` rounds them in.
    staged: (Vec<f32>, Vec<f32>),
    len: usize,
    pub(crate) scratch: Scratch,
}

impl KvCache {
    /// An empty f32 cache; see [`KvCache::with_dtype`].
    pub fn new(num_layers: usize, kv_dim: usize) -> KvCache {
        KvCache::with_dtype(num_layers, kv_dim, KvDType::F32)
    }

    /// An empty cache of `dtype` elements; it reuses the buffers of a dropped cache of the
    /// same shape if one is spare (see `SPARE`).
    pub fn with_dtype(num_layers: usize, kv_dim: usize, dtype: KvDType) -> KvCache {
        let spare = {
            let mut s = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            s.iter()
                .position(|b| b.kv_dim == kv_dim && b.dtype == dtype && b.keys.len() == num_layers)
                .map(|i| s.swap_remove(i))
        };
        let b = spare.unwrap_or_else(|| KvBuffers {
            kv_dim,
            dtype,
            keys: vec![Rows::new(dtype); num_layers],
            values: vec![Rows::new(dtype); num_layers],
            scratch: Scratch::default(),
        });
        KvCache {
            kv_dim,
            dtype,
            keys: b.keys,
            values: b.values,
            staged: (Vec::new(), Vec::new()),
            len: 0,
            scratch: b.scratch,
        }
    }

    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Positions stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` ([n, kv_dim]) to `layer` (rounded to the cache's type). The
    /// sequence length advances when `commit` is called after the last layer.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len() % self.kv_dim, 0);
        debug_assert_eq!(k.len(), v.len());
        let (kr, vr) = self.append_rows(layer, k.len() / self.kv_dim);
        kr.copy_from_slice(k);
        vr.copy_from_slice(v);
        self.seal(layer);
    }

    /// Appends `n` zeroed positions to `layer` and returns their keys and values
    /// ([n, kv_dim] each, f32) to be filled in place; [`KvCache::seal`] must follow
    /// before the layer is read or another is appended to (an f32 cache's rows are its
    /// own, an f16 cache's are staged and rounded in by `seal`). The sequence length
    /// advances when `commit` is called after the last layer.
    pub fn append_rows(&mut self, layer: usize, n: usize) -> (&mut [f32], &mut [f32]) {
        let m = n * self.kv_dim;
        match (&mut self.keys[layer], &mut self.values[layer]) {
            (Rows::F32(k), Rows::F32(v)) => {
                let old = k.len();
                k.resize(old + m, 0.0);
                v.resize(old + m, 0.0);
                (&mut k[old..], &mut v[old..])
            }
            _ => {
                let (k, v) = &mut self.staged;
                debug_assert!(k.is_empty(), "append_rows without seal");
                k.clear();
                v.clear();
                k.resize(m, 0.0);
                v.resize(m, 0.0);
                (k, v)
            }
        }
    }

    /// Completes [`KvCache::append_rows`] on `layer`: an f16 cache rounds the staged rows
    /// into its own (an f32 cache has nothing to do).
    pub fn seal(&mut self, layer: usize) {
        let (sk, sv) = &mut self.staged;
        if let (Rows::F16(k), Rows::F16(v)) = (&mut self.keys[layer], &mut self.values[layer]) {
            for (dst, src) in [(k, &*sk), (v, &*sv)] {
                let old = dst.len();
                dst.resize(old + src.len(), 0);
                f32_to_f16_slice(src, &mut dst[old..]);
            }
            sk.clear();
            sv.clear();
        }
    }

    /// Marks `n` appended positions as part of the sequence.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.keys.iter().all(|k| k.len() == self.len * self.kv_dim));
    }

    /// Keys and values of `layer` for all stored positions (including ones appended,
    /// sealed and not yet committed).
    pub fn layer(&self, layer: usize) -> (KvRows<'_>, KvRows<'_>) {
        (self.keys[layer].view(), self.values[layer].view())
    }

    /// Drops every position from `len` on (to rewind a sequence).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for (k, v) in self.keys.iter_mut().zip(&mut self.values) {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
        self.staged.0.clear();
        self.staged.1.clear();
        self.len = len;
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes of keys and values held (the working buffers not included).
    pub fn byte_len(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(Rows::capacity_bytes)
            .sum()
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        let mut s = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= MAX_SPARE {
            return;
        }
        let (mut keys, mut values) = (
            std::mem::take(&mut self.keys),
            std::mem::take(&mut self.values),
        );
        keys.iter_mut()
            .chain(&mut values)
            .for_each(|r| r.truncate(0));
        s.push(KvBuffers {
            kv_dim: self.kv_dim,
            dtype: self.dtype,
            keys,
            values,
            scratch: std::mem::take(&mut self.scratch),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::f16::{f16_to_f32, f32_to_f16};

    /// A layer's keys as f32 (an f16 cache's widened).
    fn keys(c: &KvCache, layer: usize) -> Vec<f32> {
        match c.layer(layer).0 {
            KvRows::F32(k) => k.to_vec(),
            KvRows::F16(k) => k.iter().map(|&b| f16_to_f32(b)).collect(),
        }
    }

    #[test]
    fn append_rows_fills_like_append() {
        for dtype in [KvDType::F32, KvDType::F16] {
            let (mut a, mut b) = (
                KvCache::with_dtype(2, 3, dtype),
                KvCache::with_dtype(2, 3, dtype),
            );
            for (n, base) in [(2, 0.0), (1, 10.0)] {
                let k: Vec<f32> = (0..n * 3).map(|i| base + i as f32).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                for layer in 0..2 {
                    a.append(layer, &k, &v);
                    let (ks, vs) = b.append_rows(layer, n);
                    ks.copy_from_slice(&k);
                    vs.copy_from_slice(&v);
                    b.seal(layer);
                }
                a.commit(n);
                b.commit(n);
            }
            assert_eq!(b.len(), 3);
            for layer in 0..2 {
                assert_eq!(a.layer(layer), b.layer(layer), "{dtype:?}");
            }
            b.truncate(1);
            assert_eq!(keys(&b, 1), [0.0, 1.0, 2.0], "{dtype:?}");
        }
    }

    #[test]
    fn an_f16_cache_holds_each_value_rounded_to_nearest_even_at_half_the_bytes() {
        let x = [0.1f32, -2.71, 1.0 + 1.0 / 4096.0, 70000.0, 1e-6];
        let (mut c16, mut c32) = (
            KvCache::with_dtype(1, 5, KvDType::F16),
            KvCache::with_dtype(1, 5, KvDType::F32),
        );
        for c in [&mut c16, &mut c32] {
            let (k, v) = c.append_rows(0, 1);
            k.copy_from_slice(&x);
            v.copy_from_slice(&x);
            c.seal(0);
            c.commit(1);
        }
        let want: Vec<u16> = x.iter().map(|&v| f32_to_f16(v)).collect();
        assert_eq!(c16.layer(0), (KvRows::F16(&want), KvRows::F16(&want)));
        assert_eq!(c32.layer(0).0, KvRows::F32(&x));
        // 1 + 2^-12 ties to even (1.0); 70000 overflows f16 to infinity.
        assert_eq!(keys(&c16, 0)[2], 1.0);
        assert_eq!(keys(&c16, 0)[3], f32::INFINITY);
        assert!(c16.byte_len() * 2 <= c32.byte_len() + 16);
    }

    #[test]
    fn a_new_cache_is_empty_even_with_recycled_buffers() {
        for dtype in [KvDType::F32, KvDType::F16, KvDType::F32] {
            for _ in 0..4 {
                let mut c = KvCache::with_dtype(3, 5, dtype);
                assert_eq!(c.dtype(), dtype);
                assert!(c.is_empty());
                assert!((0..3).all(|l| c.layer(l).0.is_empty() && c.layer(l).1.is_empty()));
                for l in 0..3 {
                    let (k, v) = c.append_rows(l, 2);
                    assert!(k.iter().chain(v.iter()).all(|&x| x == 0.0));
                    k.fill(1.0);
                    v.fill(2.0);
                    c.seal(l);
                }
                c.commit(2);
            }
        }
    }
}
