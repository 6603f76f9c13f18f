//! The key/value cache of one sequence: per layer, the rotated keys and the values of
//! every position so far, `[position][kv_heads * head_dim]`, growing as tokens arrive
//! (memory is proportional to the tokens seen, not to the model's maximum context).
//!
//! The cache also carries the forward pass's working buffers ([`Scratch`]): it is the
//! state a sequence keeps between calls, and reusing the buffers spares each call (and
//! each layer) fresh allocations.

use std::sync::Mutex;

use crate::model::llama::Scratch;

/// Buffers of dropped caches (emptied, capacity kept), taken by new caches of the same
/// shape. A 128-token prefill of SmolLM2 writes about 9 MB of fresh keys, values and
/// working buffers: as new memory that is ~2200 page faults, which cost 2-5 us each on
/// these VMs (5-10% of the prefill), where recycled buffers cost nothing. At most
/// `MAX_SPARE` caches are kept, so memory stays at what the process has used at its peak.
static SPARE: Mutex<Vec<KvBuffers>> = Mutex::new(Vec::new());
const MAX_SPARE: usize = 2;

struct KvBuffers {
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    scratch: Scratch,
}

pub struct KvCache {
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    pub(crate) scratch: Scratch,
}

impl KvCache {
    /// An empty cache; it reuses the buffers of a dropped cache of the same shape if one
    /// is spare (see `SPARE`).
    pub fn new(num_layers: usize, kv_dim: usize) -> KvCache {
        let spare = {
            let mut s = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            s.iter()
                .position(|b| b.kv_dim == kv_dim && b.keys.len() == num_layers)
                .map(|i| s.swap_remove(i))
        };
        let b = spare.unwrap_or_else(|| KvBuffers {
            kv_dim,
            keys: vec![Vec::new(); num_layers],
            values: vec![Vec::new(); num_layers],
            scratch: Scratch::default(),
        });
        KvCache {
            kv_dim,
            keys: b.keys,
            values: b.values,
            len: 0,
            scratch: b.scratch,
        }
    }

    /// Positions stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` ([n, kv_dim]) to `layer`. The sequence length advances when
    /// `commit` is called after the last layer.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len() % self.kv_dim, 0);
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
    }

    /// Appends `n` zeroed positions to `layer` and returns their keys and values
    /// ([n, kv_dim] each) to be filled in place (as `append` without the copy). The
    /// sequence length advances when `commit` is called after the last layer.
    pub fn append_rows(&mut self, layer: usize, n: usize) -> (&mut [f32], &mut [f32]) {
        let (k, v) = (&mut self.keys[layer], &mut self.values[layer]);
        let old = k.len();
        k.resize(old + n * self.kv_dim, 0.0);
        v.resize(old + n * self.kv_dim, 0.0);
        (&mut k[old..], &mut v[old..])
    }

    /// Marks `n` appended positions as part of the sequence.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.keys.iter().all(|k| k.len() == self.len * self.kv_dim));
    }

    /// Keys and values of `layer` for all stored positions (including ones appended and
    /// not yet committed).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Drops every position from `len` on (to rewind a sequence).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for (k, v) in self.keys.iter_mut().zip(&mut self.values) {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
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
            .map(|v| v.capacity() * 4)
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
        keys.iter_mut().chain(&mut values).for_each(Vec::clear);
        s.push(KvBuffers {
            kv_dim: self.kv_dim,
            keys,
            values,
            scratch: std::mem::take(&mut self.scratch),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_rows_fills_like_append() {
        let (mut a, mut b) = (KvCache::new(2, 3), KvCache::new(2, 3));
        for (n, base) in [(2, 0.0), (1, 10.0)] {
            let k: Vec<f32> = (0..n * 3).map(|i| base + i as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            for layer in 0..2 {
                a.append(layer, &k, &v);
                let (ks, vs) = b.append_rows(layer, n);
                ks.copy_from_slice(&k);
                vs.copy_from_slice(&v);
            }
            a.commit(n);
            b.commit(n);
        }
        assert_eq!(b.len(), 3);
        for layer in 0..2 {
            assert_eq!(a.layer(layer), b.layer(layer));
        }
        b.truncate(1);
        assert_eq!(b.layer(1).0, &[0.0, 1.0, 2.0]);
    }

    #[test]
    fn a_new_cache_is_empty_even_with_recycled_buffers() {
        for _ in 0..4 {
            let mut c = KvCache::new(3, 5);
            assert!(c.is_empty());
            assert!((0..3).all(|l| c.layer(l).0.is_empty() && c.layer(l).1.is_empty()));
            for l in 0..3 {
                let (k, v) = c.append_rows(l, 2);
                assert!(k.iter().chain(v.iter()).all(|&x| x == 0.0));
                k.fill(1.0);
                v.fill(2.0);
            }
            c.commit(2);
        }
    }
}
