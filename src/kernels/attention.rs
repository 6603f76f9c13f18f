//! Causal grouped-query attention of new tokens over the KV cache.

use super::dot::dot_f32;
use super::ops::softmax;
use super::pool::{ThreadPool, split_range};

#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: each (token, head) pair writes only its own head_dim slice of the output.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the Sync wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

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
