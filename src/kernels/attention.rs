//! Causal grouped-query attention of new tokens over the KV cache.
//!
//! Two AVX-512 paths: per (token, KV head) items for decode and short inputs, and for
//! prefill a blocked one (see [`attend_blocked`]) whose items are (block of tokens, KV
//! head) pairs, so that each key and value row, once loaded, serves every query row of
//! the block; the items are handed out largest first from a shared counter, which
//! balances the threads although later tokens attend to more positions.
//!
//! Keys and values come as the KV cache holds them ([`KvRows`]): f32 rows are read in
//! place; f16 rows are widened (exactly) into a per-thread buffer, one KV head's rows per
//! item, so that the same f32 kernels run on them while memory is read at 2 bytes per
//! element. The widened rows of an item are a few hundred KB at most at these models'
//! contexts, and stay in cache between the scores and the weighted sum.

use super::SharedMut;
use super::dot::dot_f32;
use super::f16::f16_rows_to_f32;
#[cfg(target_arch = "x86_64")]
use super::ops::exp512;
use super::ops::softmax;
use super::pool::{CHUNKS_PER_THREAD, ThreadPool, split_range};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
#[cfg(target_arch = "x86_64")]
use std::sync::atomic::{AtomicUsize, Ordering};

/// Keys or values of one sequence, `[positions, kv_heads * d]`, in the KV cache's
/// element type (f16 as IEEE half bits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl KvRows<'_> {
    /// Elements (positions x kv_heads x d).
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_f16(&self) -> bool {
        matches!(self, KvRows::F16(_))
    }
}

/// Rows `lo..hi` of KV head `kvh` (d wide) of `kv` as f32, and their stride: f32 rows in
/// place (stride `kv_dim`), f16 rows widened into `buf` (stride `d`).
fn head_rows<'b>(
    kv: KvRows<'b>,
    kv_dim: usize,
    kvh: usize,
    d: usize,
    (lo, hi): (usize, usize),
    buf: &'b mut Vec<f32>,
) -> (&'b [f32], usize) {
    match kv {
        KvRows::F32(v) => (&v[lo * kv_dim + kvh * d..], kv_dim),
        KvRows::F16(v) => {
            buf.resize((hi - lo) * d, 0.0);
            f16_rows_to_f32(&v[lo * kv_dim + kvh * d..], kv_dim, d, buf);
            (&buf[..], d)
        }
    }
}

/// For each new token t (at position `start + t`) and head h: softmax(scale·q·K^T)·V
/// over the positions `p <= start + t` with `start + t - p < window` (a sliding window;
/// `usize::MAX` for none), with KV head `h / (heads / kv_heads)`.
///
/// q: [n, heads * d]; keys, values: [start + n, kv_heads * d]; out: [n, heads * d].
pub fn attend(
    pool: &ThreadPool,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: Shape,
    out: &mut [f32],
) {
    attend_path(
        pool,
        q,
        KvRows::F32(keys),
        KvRows::F32(values),
        shape,
        true,
        out,
    );
}

/// [`attend`] on keys and values as a KV cache holds them (both of one type).
pub fn attend_kv(
    pool: &ThreadPool,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    shape: Shape,
    out: &mut [f32],
) {
    attend_path(pool, q, keys, values, shape, true, out);
}

/// One new token for each of several sequences (a batched decode step): token b's query
/// is row b of `q` ([seqs.len(), heads * d]) and it sits at the last position of
/// `seqs[b]` (its keys and values, `[positions, kv_heads * d]`, its own row included);
/// `shape` gives the heads, window and scale (its `n` and `start` are unused). Each row
/// of `out` equals, bit for bit, [`attend`] of that token alone on its sequence; the
/// tokens share one pool job.
pub fn attend_sequences(
    pool: &ThreadPool,
    q: &[f32],
    seqs: &[(KvRows<'_>, KvRows<'_>)],
    shape: Shape,
    out: &mut [f32],
) {
    let Shape {
        heads, kv_heads, d, ..
    } = shape;
    let (kv_dim, row) = (kv_heads * d, heads * d);
    assert_eq!(q.len(), seqs.len() * row);
    assert_eq!(out.len(), seqs.len() * row);
    assert!(shape.window > 0, "attention window of 0 positions");
    let mut max_len = 0;
    for (k, v) in seqs {
        assert!(k.len() == v.len() && k.len() >= kv_dim && k.len().is_multiple_of(kv_dim));
        assert_eq!(k.is_f16(), v.is_f16(), "keys and values of one type");
        max_len = max_len.max(k.len() / kv_dim);
    }
    let alone = |b: usize| Shape {
        n: 1,
        start: seqs[b].0.len() / kv_dim - 1,
        ..shape
    };
    // A token alone may take the blocked path when its group is that large: do as it.
    if heads.is_multiple_of(kv_heads) && heads / kv_heads >= 16 {
        for (b, (k, v)) in seqs.iter().enumerate() {
            let rows = b * row..(b + 1) * row;
            attend_kv(pool, &q[rows.clone()], *k, *v, alone(b), &mut out[rows]);
        }
        return;
    }
    let token = |b: usize| (seqs[b].0, seqs[b].1, alone(b).start);
    let shape = Shape {
        n: seqs.len(),
        ..shape
    };
    attend_tokens(pool, q, shape, max_len, &token, out);
}

/// [`attend`], with the blocked prefill path allowed or not (for comparisons).
fn attend_path(
    pool: &ThreadPool,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    shape: Shape,
    blocked: bool,
    out: &mut [f32],
) {
    let Shape {
        n,
        start,
        heads,
        kv_heads,
        d,
        window,
        scale,
    } = shape;
    let kv_dim = kv_heads * d;
    assert_eq!(q.len(), n * heads * d);
    assert_eq!(out.len(), n * heads * d);
    assert!(keys.len() >= (start + n) * kv_dim && values.len() >= (start + n) * kv_dim);
    assert_eq!(
        keys.is_f16(),
        values.is_f16(),
        "keys and values of one type"
    );
    assert!(window > 0, "attention window of 0 positions");
    let group = heads / kv_heads;
    // The blocked path masks only the causal limit: it runs when no window cuts in.
    #[cfg(target_arch = "x86_64")]
    if blocked
        && start + n <= window
        && super::gemm_avx512::has_f32()
        && d.is_multiple_of(16)
        && heads.is_multiple_of(kv_heads)
        && group <= BLOCK_ROWS
        && n * group >= 16
    {
        return attend_blocked(pool, q, keys, values, shape, scale, out);
    }
    let _ = blocked;
    let token = |t: usize| (keys, values, start + t);
    attend_tokens(pool, q, shape, start + n, &token, out);
}

/// Where a token of [`attend_tokens`] looks: its sequence's keys and values (`[positions,
/// kv_heads * d]`) and its own position in them.
type TokenSeq<'a> = dyn Fn(usize) -> (KvRows<'a>, KvRows<'a>, usize) + Sync + 'a;

/// The per-token paths of [`attend`] (every path but the blocked one): `shape.n` tokens,
/// token t over `token(t)`, which sees at most `max_len` positions.
fn attend_tokens(
    pool: &ThreadPool,
    q: &[f32],
    shape: Shape,
    max_len: usize,
    token: &TokenSeq<'_>,
    out: &mut [f32],
) {
    let Shape {
        n,
        heads,
        kv_heads,
        d,
        window,
        scale,
        ..
    } = shape;
    let kv_dim = kv_heads * d;
    let group = heads / kv_heads;
    // The first position token t sees.
    let first_pos = |pos: usize| (pos + 1).saturating_sub(window);
    let dst = SharedMut(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if super::gemm_avx512::has_f32()
        && d.is_multiple_of(16)
        && heads.is_multiple_of(kv_heads)
        && (0..n).any(|t| {
            let pos = token(t).2;
            pos + 1 - first_pos(pos) > SPLIT_POSITIONS
        })
    {
        return attend_split(pool, q, shape, token, out);
    }
    #[cfg(target_arch = "x86_64")]
    if super::gemm_avx512::has_f32() && d.is_multiple_of(16) && heads.is_multiple_of(kv_heads) {
        // One item per (token, KV head): the `group` query heads sharing a KV head are
        // scored together, so each key and value row is loaded once for all of them.
        let items = n * kv_heads;
        pool.for_chunks(chunks(pool, items), &|c, chunks| {
            let range = split_range(items, 1, c, chunks);
            let mut scores = vec![0f32; group * max_len];
            let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
            for item in range {
                let (t, kvh) = (item / kv_heads, item % kv_heads);
                let (keys, values, pos) = token(t);
                let lo = first_pos(pos);
                let len = pos + 1 - lo;
                let first = t * heads + kvh * group;
                let (k, stride) = head_rows(keys, kv_dim, kvh, d, (lo, pos + 1), &mut kbuf);
                let (v, _) = head_rows(values, kv_dim, kvh, d, (lo, pos + 1), &mut vbuf);
                // SAFETY: has_f32() checked the CPU. Item (t, kvh) owns the `group`
                // output rows of heads kvh * group.. of token t ([first * d..][..group *
                // d]); items are disjoint across chunks (split_range) and `out`
                // outlives the call. q holds the query rows, k and v the positions
                // lo..=pos of head kvh at `stride` (asserted sizes in the callers, or
                // widened by head_rows), and `scores` holds group * len <= group *
                // max_len floats.
                unsafe {
                    attend_item_avx512(
                        q.as_ptr().add(first * d),
                        k.as_ptr(),
                        v.as_ptr(),
                        stride,
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
    pool.for_chunks(chunks(pool, items), &|c, chunks| {
        let range = split_range(items, 1, c, chunks);
        let mut scores = Vec::with_capacity(max_len);
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        for item in range {
            let (t, h) = (item / heads, item % heads);
            let (keys, values, pos) = token(t);
            let kvh = h / group;
            let qh = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
            let lo = first_pos(pos);
            let (keys, stride) = head_rows(keys, kv_dim, kvh, d, (lo, pos + 1), &mut kbuf);
            let (values, _) = head_rows(values, kv_dim, kvh, d, (lo, pos + 1), &mut vbuf);
            scores.clear();
            scores.extend((0..pos + 1 - lo).map(|r| dot_f32(qh, &keys[r * stride..][..d]) * scale));
            softmax(&mut scores);
            // SAFETY: item (t, h) owns out[(t * heads + h) * d ..][..d]; items are
            // disjoint across chunks (split_range) and `out` outlives the call.
            let o =
                unsafe { std::slice::from_raw_parts_mut(dst.get().add((t * heads + h) * d), d) };
            o.fill(0.0);
            for (r, &s) in scores.iter().enumerate() {
                let vr = &values[r * stride..][..d];
                for (a, &b) in o.iter_mut().zip(vr) {
                    *a += s * b;
                }
            }
        }
    });
}

/// Positions per item of [`attend_split`]: a token that sees more is split.
const SPLIT_POSITIONS: usize = 256;

/// The per-token AVX-512 path of [`attend_tokens`] when some token sees more than
/// [`SPLIT_POSITIONS`] positions (long contexts): an item is (token, KV head, run of at
/// most `SPLIT_POSITIONS` positions), so that one token's attention spreads over every
/// thread (with one token and three KV heads, two threads would otherwise share three
/// items), and an f16 item's widened rows stay in L1/L2. Each run leaves its
/// unnormalised softmax (maximum, sum, weighted values) per query head; the runs of a
/// (token, KV head) are then merged in position order. Runs start at fixed positions,
/// so the result does not depend on the thread count or on the other tokens.
#[cfg(target_arch = "x86_64")]
fn attend_split(pool: &ThreadPool, q: &[f32], shape: Shape, token: &TokenSeq<'_>, out: &mut [f32]) {
    let Shape {
        n,
        heads,
        kv_heads,
        d,
        window,
        scale,
        ..
    } = shape;
    assert!(
        scale > 0.0,
        "attention scale {scale}: the split softmax needs a positive one"
    );
    let kv_dim = kv_heads * d;
    let group = heads / kv_heads;
    let first_pos = |pos: usize| (pos + 1).saturating_sub(window);
    // Items (t, kvh, run), runs in position order; a partial is group x (d + 2) floats:
    // the weighted values, then the scaled maximum and the sum of each head.
    let mut items: Vec<(u32, u32, u32)> = Vec::new();
    for t in 0..n {
        let pos = token(t).2;
        let runs = (pos + 1 - first_pos(pos)).div_ceil(SPLIT_POSITIONS);
        for kvh in 0..kv_heads {
            items.extend((0..runs).map(|r| (t as u32, kvh as u32, r as u32)));
        }
    }
    let part = group * (d + 2);
    let mut partials = vec![0f32; items.len() * part];
    let parts = SharedMut(partials.as_mut_ptr());
    pool.for_chunks(chunks(pool, items.len()), &|c, chunks| {
        let range = split_range(items.len(), 1, c, chunks);
        let mut scores = vec![0f32; group * SPLIT_POSITIONS];
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        for i in range {
            let (t, kvh, run) = items[i];
            let (t, kvh) = (t as usize, kvh as usize);
            let (keys, values, pos) = token(t);
            let lo = first_pos(pos) + run as usize * SPLIT_POSITIONS;
            let hi = (lo + SPLIT_POSITIONS).min(pos + 1);
            let (k, stride) = head_rows(keys, kv_dim, kvh, d, (lo, hi), &mut kbuf);
            let (v, _) = head_rows(values, kv_dim, kvh, d, (lo, hi), &mut vbuf);
            // SAFETY: has_f32() was checked by the caller. Item i owns partial i
            // ([i * part..][..part], disjoint across items); `partials` outlives the
            // job. q holds the query rows of token t; k and v the positions lo..hi of
            // head kvh at `stride`; `scores` holds group * (hi - lo) floats.
            unsafe {
                let p = parts.get().add(i * part);
                attend_run_avx512(
                    q.as_ptr().add((t * heads + kvh * group) * d),
                    k.as_ptr(),
                    v.as_ptr(),
                    stride,
                    hi - lo,
                    group,
                    d,
                    scale,
                    &mut scores[..group * (hi - lo)],
                    p,
                );
            }
        }
    });
    // Merge each (token, KV head)'s runs, in order.
    let mut i = 0;
    while i < items.len() {
        let (t, kvh, _) = items[i];
        let runs = items[i..]
            .iter()
            .take_while(|x| (x.0, x.1) == (t, kvh))
            .count();
        let (t, kvh) = (t as usize, kvh as usize);
        for h in 0..group {
            let at = |r: usize| &partials[(i + r) * part..][..part];
            let stat = |r: usize, j: usize| at(r)[group * d + 2 * h + j];
            let m = (0..runs)
                .map(|r| stat(r, 0))
                .fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = (0..runs).map(|r| (stat(r, 0) - m).exp()).collect();
            let sum: f32 = (0..runs).map(|r| w[r] * stat(r, 1)).sum();
            let o = &mut out[(t * heads + kvh * group + h) * d..][..d];
            o.fill(0.0);
            for (r, &wr) in w.iter().enumerate() {
                for (a, &b) in o.iter_mut().zip(&at(r)[h * d..][..d]) {
                    *a += wr * b;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|a| *a *= inv);
        }
        i += runs;
    }
}

/// One run of [`attend_split`]: `group` query heads over `len` positions of one KV head,
/// unnormalised: `part[h * d..][..d] = sum_p e_hp v_p` with `e_hp = exp(scale * (s_hp -
/// max_h))`, then `part[group * d + 2h] = scale * max_h` and `[.. + 1] = sum_p e_hp`.
///
/// # Safety
/// As [`attend_item_avx512`], with `part` writable for group x (d + 2) floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_run_avx512(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    kv_dim: usize,
    len: usize,
    group: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    part: *mut f32,
) {
    debug_assert!(scores.len() >= group * len && d.is_multiple_of(16));
    let sp = scores.as_mut_ptr();
    // SAFETY: the caller's contract covers every pointer range used below.
    unsafe {
        super::gemm_avx512::gemm_f32_strided(group, len, d, q, d, k, kv_dim, sp, len);
        let stats = part.add(group * d);
        // Unnormalised: the merge of the runs divides.
        let softmax = |h: usize| {
            let (mx, sum) = softmax_run(sp.add(h * len), len, scale);
            *stats.add(2 * h) = mx;
            *stats.add(2 * h + 1) = sum;
            1.0
        };
        weighted_heads(sp, len, v, kv_dim, group, d, &softmax, part);
    }
}

/// Chunks for `items` independent items on `pool` (each chunk a contiguous run of items,
/// taken by whichever thread is free; see [`ThreadPool::for_chunks`]).
fn chunks(pool: &ThreadPool, items: usize) -> usize {
    items.min(pool.threads() * CHUNKS_PER_THREAD)
}

/// Query rows (tokens x the heads of a group) per item of the blocked path: three vectors
/// of 16, so that a score tile of 8 positions x 48 rows fits in 24 registers.
#[cfg(target_arch = "x86_64")]
const BLOCK_ROWS: usize = 48;

/// The sizes of one `attend` call, and what each query sees.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// New tokens, at positions `start..start + n`.
    pub n: usize,
    pub start: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Head dimension.
    pub d: usize,
    /// Positions a query sees, itself included (a sliding window); `usize::MAX`: all.
    pub window: usize,
    /// The factor on q·k (usually 1/sqrt(d)).
    pub scale: f32,
}

/// Prefill attention, blocked: an item is a block of `tb` tokens x one KV head, whose
/// `tb * group` query rows (r = token-in-block * group + head-in-group) are processed
/// together, in three steps with no horizontal reductions:
///
/// 1. scores, transposed: `st[p][r] = (q_r / sqrt(d)) · k_p` for every position p the
///    block can see, as outer products: the queries are gathered once per item into
///    `qt[dd][r]` (d x 48 floats), each key element is broadcast against 3 vectors of 16
///    rows ([`scores_tile`]);
/// 2. softmax down each column of `st` (16 rows per vector, the causal limit of each row
///    as a lane mask), leaving unnormalised weights and 1 / sum per row;
/// 3. outputs, `out_r = inv_r * sum_p st[p][r] * v_p`, as outer products again: each row
///    of V, loaded once per 6 query rows, feeds 6 x 4 accumulators ([`pv_tile`]).
///
/// Items run largest first (later blocks see more positions) off a shared counter.
#[cfg(target_arch = "x86_64")]
fn attend_blocked(
    pool: &ThreadPool,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    sh: Shape,
    scale: f32,
    out: &mut [f32],
) {
    let Shape {
        n,
        start,
        heads,
        kv_heads,
        d,
        ..
    } = sh;
    let kv_dim = kv_heads * d;
    let group = heads / kv_heads;
    let tb = (BLOCK_ROWS / group).max(1);
    let rs = (tb * group).div_ceil(16) * 16;
    let blocks = n.div_ceil(tb);
    let items = blocks * kv_heads;
    let next = AtomicUsize::new(0);
    let dst = SharedMut(out.as_mut_ptr());
    pool.run(&|_, _| {
        let mut qt = vec![0f32; d * rs];
        let mut st = vec![0f32; (start + n) * rs];
        let mut pos = vec![-1i32; rs];
        let mut inv = vec![0f32; rs];
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        loop {
            let it = next.fetch_add(1, Ordering::Relaxed);
            if it >= items {
                break;
            }
            let (b, kvh) = (blocks - 1 - it / kv_heads, it % kv_heads);
            let t0 = b * tb;
            let t1 = (t0 + tb).min(n);
            let rows = (t1 - t0) * group;
            let len = start + t1;
            let (k, stride) = head_rows(keys, kv_dim, kvh, d, (0, len), &mut kbuf);
            let (v, _) = head_rows(values, kv_dim, kvh, d, (0, len), &mut vbuf);
            let item = Item {
                rs,
                rv: rows.div_ceil(16),
                rows,
                len,
                kv_dim: stride,
                d,
                group,
                heads,
                first_row: start + t0,
                scale,
            };
            let first = (t0 * heads + kvh * group) * d;
            // SAFETY: has_f32() was checked by `attend`. The item reads the query rows
            // of heads kvh * group.. of tokens t0..t1 (inside q, [n, heads * d]) and
            // writes the same rows of `out` only (disjoint across items, each taken once
            // off the counter); `out` outlives the call. k and v hold len <= start + n
            // rows of head kvh at `stride` (asserted by `attend`, or widened by
            // head_rows); qt, st, pos and inv are sized for rs rows above.
            unsafe {
                item_blocked(
                    &item,
                    q.as_ptr().add(first),
                    qt.as_mut_ptr(),
                    k.as_ptr(),
                    v.as_ptr(),
                    st.as_mut_ptr(),
                    pos.as_mut_ptr(),
                    inv.as_mut_ptr(),
                    dst.get().add(first),
                )
            };
        }
    });
}

/// One item of [`attend_blocked`].
#[cfg(target_arch = "x86_64")]
struct Item {
    /// Row stride of `qt`, `st` (and length of `pos`, `inv`): a multiple of 16.
    rs: usize,
    /// Vectors of 16 rows in use, and rows in use.
    rv: usize,
    rows: usize,
    /// Positions the item's last row sees.
    len: usize,
    /// Row stride of the keys and values.
    kv_dim: usize,
    d: usize,
    group: usize,
    heads: usize,
    /// Position of the item's first token.
    first_row: usize,
    /// 1 / sqrt(d), folded into the packed queries.
    scale: f32,
}

/// # Safety
/// AVX-512F/BW/VL; `qt` holds d x rs floats, `st` len x rs, `pos` and `inv` rs; `k` and
/// `v` `len` rows of stride kv_dim (d wide); `q` and `out` point at row 0 of the item
/// (token t0, head kvh * group) of the queries and outputs, readable / writable for the
/// item's rows: row r at `((r / group) * heads + r % group) * d`, d wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn item_blocked(
    it: &Item,
    q: *const f32,
    qt: *mut f32,
    k: *const f32,
    v: *const f32,
    st: *mut f32,
    pos: *mut i32,
    inv: *mut f32,
    out: *mut f32,
) {
    let &Item {
        rs,
        rv,
        rows,
        len,
        kv_dim,
        d,
        group,
        heads,
        first_row,
        scale,
    } = it;
    // SAFETY: the caller's contract covers every range below: query and output rows
    // below `rows` (gathers are masked to them), scores for p < len, columns below
    // rv * 16 <= rs.
    unsafe {
        // Pack the queries transposed and scaled, qt[dd][r], 16 rows per gather; padding
        // rows get zeros and position -1 (masked everywhere).
        let sc = _mm512_set1_ps(scale);
        for c in 0..rv {
            let mut offs = [0i32; 16];
            let mut ps = [-1i32; 16];
            let lanes = (rows - 16 * c).min(16);
            for (j, (o, p)) in offs.iter_mut().zip(&mut ps).enumerate().take(lanes) {
                let r = 16 * c + j;
                *o = (((r / group) * heads + r % group) * d) as i32;
                *p = (first_row + r / group) as i32;
            }
            let m = ((1u32 << lanes) - 1) as u16;
            let ov = _mm512_loadu_si512(offs.as_ptr() as *const __m512i);
            _mm512_storeu_si512(
                pos.add(16 * c) as *mut __m512i,
                _mm512_loadu_si512(ps.as_ptr() as *const __m512i),
            );
            for dd in 0..d {
                let g = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, ov, q.add(dd));
                _mm512_storeu_ps(qt.add(dd * rs + 16 * c), _mm512_mul_ps(g, sc));
            }
        }
        let qt = qt as *const f32;
        let pos = pos as *const i32;
        let mut p = 0;
        while p < len {
            let pb = (len - p).min(8);
            let a = (qt, rs, k.add(p * kv_dim), kv_dim, d, st.add(p * rs));
            tile_dispatch!(scores_tile, pb, rv, a);
            p += pb;
        }
        let neg = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in 0..rv {
            let pv = _mm512_loadu_si512(pos.add(16 * c) as *const __m512i);
            let col = st.add(16 * c);
            let mut mx = neg;
            for p in 0..len {
                let m = _mm512_cmpge_epi32_mask(pv, _mm512_set1_epi32(p as i32));
                mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(col.add(p * rs)));
            }
            let mut sum = _mm512_setzero_ps();
            for p in 0..len {
                let m = _mm512_cmpge_epi32_mask(pv, _mm512_set1_epi32(p as i32));
                let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(col.add(p * rs)), mx));
                let e = _mm512_maskz_mov_ps(m, e);
                _mm512_storeu_ps(col.add(p * rs), e);
                sum = _mm512_add_ps(sum, e);
            }
            // Padding rows (all lanes masked) get 1 / 0 = inf and are never stored.
            _mm512_storeu_ps(inv.add(16 * c), _mm512_div_ps(_mm512_set1_ps(1.0), sum));
        }
        let mut r0 = 0;
        while r0 < rows {
            let rb = (rows - r0).min(6);
            // Positions the last of these rows sees (the others' weights beyond their
            // own limit are zeros).
            let plen = (first_row + (r0 + rb - 1) / group + 1).min(len);
            let mut outs = [std::ptr::null_mut::<f32>(); 8];
            for (j, o) in outs.iter_mut().enumerate().take(rb) {
                let r = r0 + j;
                *o = out.add(((r / group) * heads + r % group) * d);
            }
            let mut c = 0;
            while c < d {
                let cc = ((d - c) / 16).min(4);
                let mut o = outs;
                for x in o.iter_mut().take(rb) {
                    *x = x.add(c);
                }
                let a = (
                    st.add(r0) as *const f32,
                    rs,
                    v.add(c),
                    kv_dim,
                    plen,
                    inv.add(r0) as *const f32,
                    o,
                );
                tile_dispatch!(pv_tile, rb, cc, a);
                c += 16 * cc;
            }
            r0 += rb;
        }
    }
}

/// Calls `$f::<A, B>(args)` for the runtime (a, b), a in 1..=8, b in 1..=4.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_dispatch {
    ($f:ident, $a:expr, $b:expr, $args:expr) => {
        match ($a, $b) {
            (1, 1) => $f::<1, 1>($args),
            (1, 2) => $f::<1, 2>($args),
            (1, 3) => $f::<1, 3>($args),
            (1, 4) => $f::<1, 4>($args),
            (2, 1) => $f::<2, 1>($args),
            (2, 2) => $f::<2, 2>($args),
            (2, 3) => $f::<2, 3>($args),
            (2, 4) => $f::<2, 4>($args),
            (3, 1) => $f::<3, 1>($args),
            (3, 2) => $f::<3, 2>($args),
            (3, 3) => $f::<3, 3>($args),
            (3, 4) => $f::<3, 4>($args),
            (4, 1) => $f::<4, 1>($args),
            (4, 2) => $f::<4, 2>($args),
            (4, 3) => $f::<4, 3>($args),
            (4, 4) => $f::<4, 4>($args),
            (5, 1) => $f::<5, 1>($args),
            (5, 2) => $f::<5, 2>($args),
            (5, 3) => $f::<5, 3>($args),
            (5, 4) => $f::<5, 4>($args),
            (6, 1) => $f::<6, 1>($args),
            (6, 2) => $f::<6, 2>($args),
            (6, 3) => $f::<6, 3>($args),
            (6, 4) => $f::<6, 4>($args),
            (7, 1) => $f::<7, 1>($args),
            (7, 2) => $f::<7, 2>($args),
            (7, 3) => $f::<7, 3>($args),
            (7, 4) => $f::<7, 4>($args),
            (8, 1) => $f::<8, 1>($args),
            (8, 2) => $f::<8, 2>($args),
            (8, 3) => $f::<8, 3>($args),
            (8, 4) => $f::<8, 4>($args),
            _ => unreachable!("tile size"),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use tile_dispatch;

/// (qt, its row stride, key row 0, key stride, d, score row 0).
#[cfg(target_arch = "x86_64")]
type ScoresArgs = (*const f32, usize, *const f32, usize, usize, *mut f32);

/// `st[j][16 c..][..16] = sum_dd k[j][dd] * qt[dd][16 c..][..16]` for P positions j and
/// V vectors c of 16 rows: P broadcasts and V loads per dd for P x V FMAs.
///
/// # Safety
/// AVX-512F; qt readable for d rows of stride rs (V vectors wide), k for P rows of stride
/// kv_dim (d wide), st writable for P rows of stride rs (V vectors wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn scores_tile<const P: usize, const V: usize>(a: ScoresArgs) {
    let (qt, rs, k, kv_dim, d, st) = a;
    let mut acc = [[_mm512_setzero_ps(); V]; P];
    // SAFETY: the caller's contract.
    unsafe {
        for dd in 0..d {
            let mut qv = [_mm512_setzero_ps(); V];
            for (c, x) in qv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(qt.add(dd * rs + 16 * c));
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                let kb = _mm512_set1_ps(*k.add(j * kv_dim + dd));
                for (a, &x) in acc.iter_mut().zip(&qv) {
                    *a = _mm512_fmadd_ps(kb, x, *a);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                _mm512_storeu_ps(st.add(j * rs + 16 * c), a);
            }
        }
    }
}

/// (weights of row 0 at stride rs (position-major), rs, value row 0, value stride,
/// positions, 1 / sum of row 0.., output row pointers).
#[cfg(target_arch = "x86_64")]
type PvArgs = (
    *const f32,
    usize,
    *const f32,
    usize,
    usize,
    *const f32,
    [*mut f32; 8],
);

/// `out[r][16 c..][..16] = inv[r] * sum_p w[p][r] * v[p][16 c..][..16]` for R rows and C
/// vectors: C loads and R broadcasts per position for R x C FMAs.
///
/// # Safety
/// AVX-512F; w readable at `p * rs + r`, v for `len` rows of stride kv_dim (16 C wide),
/// inv for R floats, out[r] writable for 16 C floats, r < R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn pv_tile<const R: usize, const C: usize>(a: PvArgs) {
    let (w, rs, v, kv_dim, len, inv, out) = a;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    // SAFETY: the caller's contract.
    unsafe {
        for p in 0..len {
            let mut vv = [_mm512_setzero_ps(); C];
            for (c, x) in vv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(v.add(p * kv_dim + 16 * c));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wb = _mm512_set1_ps(*w.add(p * rs + r));
                for (a, &x) in acc.iter_mut().zip(&vv) {
                    *a = _mm512_fmadd_ps(wb, x, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let f = _mm512_set1_ps(*inv.add(r));
            for (c, &a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[r].add(16 * c), _mm512_mul_ps(a, f));
            }
        }
    }
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
        let softmax = |h: usize| 1.0 / softmax_unnormalised(sp.add(h * len), len, scale);
        weighted_heads(sp, len, v, kv_dim, group, d, &softmax, out);
    }
}

/// `out[h] = w(h) * sum_p s[h][p] * v[p]` for the `group` heads' score rows `s` (stride
/// `len`), two heads at a time so that each value row, loaded once, feeds independent FMA
/// chains; `w(h)` runs just before head h's sums (the callers' softmax of its row).
///
/// # Safety
/// AVX-512F; s holds group x len floats, v `len` rows of stride kv_dim (d wide, d % 16 ==
/// 0), out group x d floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_heads(
    s: *mut f32,
    len: usize,
    v: *const f32,
    kv_dim: usize,
    group: usize,
    d: usize,
    w: &dyn Fn(usize) -> f32,
    out: *mut f32,
) {
    // SAFETY: the caller's contract covers every range read and written.
    unsafe {
        let mut inv = [0f32; 2];
        let mut g = 0;
        while g < group {
            let pair = if group - g >= 2 { 2 } else { 1 };
            for (h, inv) in inv.iter_mut().enumerate().take(pair) {
                *inv = w(g + h);
            }
            let mut c = 0;
            while c < d {
                let chunks = ((d - c) / 16).min(4);
                let (sg, o) = (s.add(g * len) as *const f32, out.add(g * d + c));
                let args = (sg, len, v.add(c), kv_dim, o, d, inv);
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
    // SAFETY: forwarded contract.
    unsafe { softmax_run(s, len, scale).1 }
}

/// [`softmax_unnormalised`], also returning `max * scale` (the exponent's offset).
///
/// # Safety
/// AVX-512F; `s` valid for `len` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn softmax_run(s: *mut f32, len: usize, scale: f32) -> (f32, f32) {
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
        let top = _mm512_reduce_max_ps(mx);
        let mx = _mm512_set1_ps(top);
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
        (top * scale, _mm512_reduce_add_ps(sum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar path, as `attend` runs it without AVX-512.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], sh: Shape) -> Vec<f32> {
        let Shape {
            n,
            start,
            heads,
            kv_heads,
            d,
            window,
            scale,
        } = sh;
        let kv_dim = kv_heads * d;
        let group = heads / kv_heads;
        let mut out = vec![0f32; n * heads * d];
        for t in 0..n {
            for h in 0..heads {
                let kvh = h / group;
                let qh = &q[(t * heads + h) * d..][..d];
                let lo = (start + t + 1).saturating_sub(window);
                let mut s: Vec<f32> = (lo..start + t + 1)
                    .map(|p| {
                        super::super::dot::dot_f32_scalar(qh, &keys[p * kv_dim + kvh * d..][..d])
                            * scale
                    })
                    .collect();
                softmax(&mut s);
                let o = &mut out[(t * heads + h) * d..][..d];
                for (p, &w) in (lo..).zip(s.iter()) {
                    for (a, &b) in o.iter_mut().zip(&values[p * kv_dim + kvh * d..][..d]) {
                        *a += w * b;
                    }
                }
            }
        }
        out
    }

    /// Seeded values in [-3, 3).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let data = crate::kernels::test_data::data(n, seed);
        data.into_iter().map(|v| v * 3.0).collect()
    }

    #[test]
    fn attend_sequences_equals_each_token_alone() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            // (9, 3): the AVX-512 item path; (32, 2): a group of 16, which alone may
            // take the blocked path; (6, 2, 24): d not a multiple of 16 (scalar path).
            for (heads, kv_heads, d) in [(9, 3, 64), (32, 2, 32), (6, 2, 24)] {
                for window in [usize::MAX, 5] {
                    let kv_dim = kv_heads * d;
                    let lens = [1, 7, 33, 2, 18];
                    let kv: Vec<(Vec<f32>, Vec<f32>)> = lens
                        .iter()
                        .enumerate()
                        .map(|(b, &len)| {
                            let seed = 10 * b as u64;
                            (data(len * kv_dim, seed + 1), data(len * kv_dim, seed + 2))
                        })
                        .collect();
                    let seqs: Vec<(&[f32], &[f32])> =
                        kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
                    let rows: Vec<_> = seqs
                        .iter()
                        .map(|&(k, v)| (KvRows::F32(k), KvRows::F32(v)))
                        .collect();
                    let row = heads * d;
                    let q = data(lens.len() * row, 99);
                    let shape = |n, start| Shape {
                        n,
                        start,
                        heads,
                        kv_heads,
                        d,
                        window,
                        scale: 0.125,
                    };
                    let mut got = vec![0f32; lens.len() * row];
                    attend_sequences(&pool, &q, &rows, shape(0, 0), &mut got);
                    for (b, &len) in lens.iter().enumerate() {
                        let mut one = vec![0f32; row];
                        let (k, v) = seqs[b];
                        let qb = &q[b * row..(b + 1) * row];
                        attend(&pool, qb, k, v, shape(1, len - 1), &mut one);
                        assert_eq!(
                            &got[b * row..(b + 1) * row],
                            &one[..],
                            "{heads}/{kv_heads}x{d} window {window} sequence {b}"
                        );
                        let want = reference(qb, k, v, shape(1, len - 1));
                        for (a, w) in one.iter().zip(&want) {
                            assert!((a - w).abs() < 1e-4, "{a} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attend_matches_reference() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (heads, kv_heads, d) in [
                (9, 3, 64),
                (4, 4, 16),
                (6, 2, 48),
                (8, 2, 128),
                (3, 1, 8),
                (16, 2, 64),
                (5, 1, 16),
                (64, 1, 16),
            ] {
                // Decode past SPLIT_POSITIONS (runs merged), a short prefill beyond it.
                for (n, start) in [
                    (1, 0),
                    (1, 37),
                    (9, 0),
                    (17, 5),
                    (40, 0),
                    (100, 7),
                    (1, 700),
                    (3, 520),
                ] {
                    // No window, one that cuts in, one that cuts in only late, one that
                    // leaves exactly two runs.
                    for window in [usize::MAX, 1, 7, 60, 512] {
                        let sh = Shape {
                            n,
                            start,
                            heads,
                            kv_heads,
                            d,
                            window,
                            scale: 0.7 / (d as f32).sqrt(),
                        };
                        let q = data(n * heads * d, 1);
                        let k = data((start + n) * kv_heads * d, 2);
                        let v = data((start + n) * kv_heads * d, 3);
                        let want = reference(&q, &k, &v, sh);
                        let mut got = vec![0f32; want.len()];
                        attend(&pool, &q, &k, &v, sh, &mut got);
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                                "heads {heads}/{kv_heads} d {d} n {n} start {start} window {window} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// f16 keys and values (as an f16 KV cache holds them) give, bit for bit, what the
    /// same values widened to f32 give: on every path (per-token items, the blocked
    /// prefill, windows that cut in, batched sequences) and at 1-3 threads.
    #[test]
    fn f16_rows_attend_exactly_as_their_f32_values() {
        let narrow = |x: &[f32]| -> (Vec<u16>, Vec<f32>) {
            let h: Vec<u16> = x
                .iter()
                .map(|&v| crate::kernels::f16::f32_to_f16(v))
                .collect();
            let f = h
                .iter()
                .map(|&b| crate::kernels::f16::f16_to_f32(b))
                .collect();
            (h, f)
        };
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (heads, kv_heads, d) in [(9, 3, 64), (6, 2, 48), (5, 1, 16), (3, 1, 8)] {
                for (n, start) in [(1, 0), (1, 37), (17, 5), (40, 0), (1, 600)] {
                    for window in [usize::MAX, 7] {
                        let sh = Shape {
                            n,
                            start,
                            heads,
                            kv_heads,
                            d,
                            window,
                            scale: 0.7 / (d as f32).sqrt(),
                        };
                        let q = data(n * heads * d, 1);
                        let (kh, kf) = narrow(&data((start + n) * kv_heads * d, 2));
                        let (vh, vf) = narrow(&data((start + n) * kv_heads * d, 3));
                        let mut want = vec![0f32; n * heads * d];
                        attend(&pool, &q, &kf, &vf, sh, &mut want);
                        let mut got = vec![f32::NAN; want.len()];
                        let (k16, v16) = (KvRows::F16(&kh), KvRows::F16(&vh));
                        attend_kv(&pool, &q, k16, v16, sh, &mut got);
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{threads} threads, {heads}/{kv_heads}x{d} n {n} start {start} window {window}"
                        );
                    }
                }
                // A batched step over sequences of several lengths.
                let kv_dim = kv_heads * d;
                let lens = [1, 7, 33, 300];
                let kv: Vec<_> = lens
                    .iter()
                    .map(|&len| {
                        let (k, _) = narrow(&data(len * kv_dim, len as u64));
                        let (v, _) = narrow(&data(len * kv_dim, len as u64 + 50));
                        (k, v)
                    })
                    .collect();
                let rows: Vec<_> = kv
                    .iter()
                    .map(|(k, v)| (KvRows::F16(k), KvRows::F16(v)))
                    .collect();
                let row = heads * d;
                let q = data(lens.len() * row, 9);
                let sh = Shape {
                    n: 0,
                    start: 0,
                    heads,
                    kv_heads,
                    d,
                    window: usize::MAX,
                    scale: 0.125,
                };
                let mut got = vec![0f32; lens.len() * row];
                attend_sequences(&pool, &q, &rows, sh, &mut got);
                for (b, &len) in lens.iter().enumerate() {
                    let mut one = vec![0f32; row];
                    let alone = Shape {
                        n: 1,
                        start: len - 1,
                        ..sh
                    };
                    let (k, v) = rows[b];
                    attend_kv(&pool, &q[b * row..][..row], k, v, alone, &mut one);
                    assert_eq!(&got[b * row..][..row], &one[..], "sequence {b}");
                }
            }
        }
    }

    /// Decode attention (and the per-token items of short prefills) gives the same bits
    /// on 1-3 threads and with late or slow workers.
    #[test]
    fn attend_is_bit_identical_across_threads_and_slow_workers() {
        let pools = crate::kernels::pool::test_pools();
        for (heads, kv_heads, d) in [(9, 3, 64), (5, 1, 16), (8, 4, 8)] {
            for (n, start) in [(1, 0), (1, 300), (3, 20)] {
                let q = data(n * heads * d, 1);
                let k = data((start + n) * kv_heads * d, 2);
                let v = data((start + n) * kv_heads * d, 3);
                let sh = Shape {
                    n,
                    start,
                    heads,
                    kv_heads,
                    d,
                    window: usize::MAX,
                    scale: 1.0 / (d as f32).sqrt(),
                };
                let run = |pool: &ThreadPool| {
                    let mut out = vec![f32::NAN; n * heads * d];
                    attend(pool, &q, &k, &v, sh, &mut out);
                    out
                };
                let want = run(&pools[0].1);
                for (name, pool) in &pools[1..] {
                    let same = run(pool)
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{name}: heads {heads}/{kv_heads} n {n} start {start}");
                }
            }
        }
    }

    /// Timing of the blocked prefill path against the per-token items at SmolLM2's
    /// shape (run with `--ignored --nocapture`): min of interleaved repetitions.
    #[test]
    #[ignore]
    fn blocked_attention_timing() {
        let (heads, kv_heads, d, n) = (9, 3, 64, 128);
        let q = data(n * heads * d, 1);
        let k = data(n * kv_heads * d, 2);
        let v = data(n * kv_heads * d, 3);
        let mut out = vec![0f32; n * heads * d];
        let shape = Shape {
            n,
            start: 0,
            heads,
            kv_heads,
            d,
            window: usize::MAX,
            scale: 1.0 / (d as f32).sqrt(),
        };
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads);
            let mut best = [f64::MAX; 2];
            for _ in 0..200 {
                for (b, best) in best.iter_mut().enumerate() {
                    let t0 = std::time::Instant::now();
                    let (kr, vr) = (KvRows::F32(&k), KvRows::F32(&v));
                    attend_path(&pool, &q, kr, vr, shape, b == 1, &mut out);
                    *best = best.min(t0.elapsed().as_secs_f64());
                }
            }
            println!(
                "{threads} threads: items {:.1} us, blocked {:.1} us (x30 layers: {:.2} / {:.2} ms)",
                best[0] * 1e6,
                best[1] * 1e6,
                best[0] * 30e3,
                best[1] * 30e3
            );
        }
    }
}
