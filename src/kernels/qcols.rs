//! Q4_0 and Q4_1 matrices held by input column, losslessly: the layout of input sparsity
//! (TEAL/WINA) on 4-bit files (`Linear::by_column`; the loader repacks each projection
//! once and releases the file's pages, so the sparse modes hold one copy).
//!
//! A GGUF Q4 matrix `[out, in]` stores, per row, blocks of 32 inputs (a scale `d`, Q4_1's
//! minimum `m`, 32 nibbles). Skipping an input then saves nothing (its nibble shares a
//! block with 31 others), and re-quantizing the matrix along the other axis doubles its
//! quantization error (docs/sparsity.md). This layout moves the same numbers: per block
//! column (32 inputs), the scales of every output row (`d[out]`, then Q4_1's `m[out]`),
//! then, per 32 outputs, 16 bytes of nibbles for each input. An input's weights for 32
//! outputs are contiguous, so a kernel that skips it skips its bytes, and a thread that
//! computes a range of outputs reads one stretch per block column; the scales (a fifth
//! of a Q4_1 file, a ninth of Q4_0) are read for every block column with an input kept.
//!
//! Arithmetic: exactly the row-major kernels' ([`super::qdot`]): the kept inputs of a
//! block are quantized to 8 bits as the whole block with the dropped inputs zeroed would
//! be, each output's block sum is an exact integer, and `acc = fma(isum, d·dx, acc)`
//! (then Q4_1's `fma(m, dx·Σq, acc)`) runs block after block. So the product equals, bit
//! for bit, the row-major product of `x` with the dropped inputs zeroed (the tests check).
//!
//! Products: one token over its kept inputs ([`QColMatrix::matvec_pool`]); the matrices
//! of one input together, prepared once and in one pool job ([`matvec_group_pool`]:
//! q/k/v, gate/up); and several tokens with every input (prefill, [`matmul_group_pool`]),
//! each weight quad permuted once per 8 tokens. All three give each token the same bits.
//!
//! Nibble order within an input's 16 bytes: output `j` of the 32 in the low nibble of byte
//! `j`, output `j + 16` in the high one (ggml's order within a block), so one 128-bit load
//! and two masks give two vectors of 16 outputs.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::SharedMut;
use super::pool::ThreadPool;
use super::qdot::{QPair, quantize_activations};
use crate::quant::{QFormat, QK, f16_le};

/// A Q4_0 or Q4_1 matrix `[out, in]` held by input column (see the module docs).
pub struct QColMatrix {
    fmt: QFormat,
    out_dim: usize,
    in_dim: usize,
    /// Per block column: `d[out]` (f16 bits), then for Q4_1 `m[out]`.
    scales: Vec<u16>,
    /// The output tiles, as ranges of 32-output chunks: one per thread, fixed at load.
    tiles: Vec<(usize, usize)>,
    /// Per block column, per output tile, per input of the block: 16 bytes of nibbles per
    /// 32 outputs of the tile. A thread computes one tile: per block column it reads one
    /// stretch, in which each input's weights are contiguous (so a skipped input is a
    /// skipped run of bytes, several cache lines long).
    quants: Vec<u8>,
}

/// Reusable buffers of [`QColMatrix::matvec`].
#[derive(Default)]
pub struct QColScratch {
    /// The input with the dropped inputs zeroed.
    masked: Vec<f32>,
    pairs: Vec<QPair>,
    cols: Vec<PreparedColumn>,
    /// Several tokens' columns, token after token (every block of each).
    many: Vec<PreparedColumn>,
}

/// A block column with an input kept, ready for the kernels.
struct PreparedColumn {
    block: usize,
    /// Its 8-bit activations (the block with the dropped inputs zeroed): scale, scale times
    /// the quant sum, the integer quant sum, the quants.
    dx: f32,
    sx: f32,
    qsum: i32,
    qs: [i8; QK],
    /// The kept inputs (indices within the block), `len` of them, a multiple of 4.
    kept: [u8; QK],
    len: usize,
    /// Per quad of kept inputs: their four activation quants, as `vpdpbusd` takes them.
    words: [i32; QK / 4],
}

impl QColMatrix {
    /// Repacks row-major GGUF blocks (`out` rows of `in / 32` blocks) without changing a
    /// value. `out` must be a multiple of 32 (every projection of the models here is).
    pub fn from_row_major(
        fmt: QFormat,
        rows: &[u8],
        out_dim: usize,
        in_dim: usize,
        tiles: usize,
    ) -> QColMatrix {
        let chunks = out_dim / 32;
        let n = tiles.clamp(1, chunks.max(1));
        let tiles: Vec<(usize, usize)> = (0..n)
            .map(|t| (chunks * t / n, chunks * (t + 1) / n))
            .collect();
        assert!(matches!(fmt, QFormat::Q4_0 | QFormat::Q4_1), "{fmt:?}");
        assert!(out_dim.is_multiple_of(32) && in_dim.is_multiple_of(QK));
        let (bb, blocks) = (fmt.block_bytes(), in_dim / QK);
        assert_eq!(rows.len(), out_dim * blocks * bb, "row-major size");
        let per_col = if fmt == QFormat::Q4_1 { 2 } else { 1 } * out_dim;
        let mut scales = vec![0u16; blocks * per_col];
        let mut quants = vec![0u8; in_dim * out_dim / 2];
        // Block column by block column, tile by tile: each tile's stretch (32 runs) is
        // written while it sits in cache.
        for b in 0..blocks {
            for &(c0, c1) in &tiles {
                let tile_row = (c1 - c0) * 16;
                for o in c0 * 32..c1 * 32 {
                    // Output o's nibbles: byte o % 16 of its chunk's 16, low or high half.
                    let shift = if o % 32 < 16 { 0 } else { 4 };
                    let at = c0 * QK * 16 + (o / 32 - c0) * 16 + o % 16;
                    let blk = &rows[(o * blocks + b) * bb..][..bb];
                    scales[b * per_col + o] = u16::from_le_bytes([blk[0], blk[1]]);
                    if fmt == QFormat::Q4_1 {
                        scales[b * per_col + out_dim + o] = u16::from_le_bytes([blk[2], blk[3]]);
                    }
                    let qs = &blk[fmt.qs_offset()..][..QK / 2];
                    let column = &mut quants[b * QK * out_dim / 2 + at..];
                    for (k, &q) in qs.iter().enumerate() {
                        // Inputs k and k + 16 of the block (ggml's order within a block).
                        column[k * tile_row] |= (q & 0x0f) << shift;
                        column[(k + 16) * tile_row] |= (q >> 4) << shift;
                    }
                }
            }
        }
        QColMatrix {
            fmt,
            out_dim,
            in_dim,
            scales,
            tiles,
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

    /// Adds to `acc[i]` the squares of input i's weights (as `quant::dequantize` gives
    /// them), in f64, outputs in ascending order: WINA's column norms, read from this
    /// layout (the file's pages stay released).
    pub fn add_column_squares(&self, acc: &mut [f64]) {
        assert_eq!(
            acc.len(),
            self.in_dim,
            "add_column_squares: one sum per input"
        );
        for (b, sums) in acc.chunks_exact_mut(QK).enumerate() {
            let col = self.column(b);
            let dm: Vec<(f32, f32)> = (0..self.out_dim).map(|o| col.dm(o)).collect();
            let q4_0 = self.fmt == QFormat::Q4_0;
            for &(c0, c1) in &self.tiles {
                let tile = &col.quants[c0 * QK * 16..][..QK * (c1 - c0) * 16];
                for (k, sum) in sums.iter_mut().enumerate() {
                    let run = &tile[k * (c1 - c0) * 16..][..(c1 - c0) * 16];
                    for (c, bytes) in (c0..c1).zip(run.chunks_exact(16)) {
                        // Outputs c * 32 .. + 16 (low nibbles), then + 16 .. + 32 (high).
                        let (lo, hi) = dm[c * 32..][..32].split_at(16);
                        for (shift, dm) in [(0, lo), (4, hi)] {
                            for (&byte, &(d, m)) in bytes.iter().zip(dm) {
                                let q = ((byte >> shift) & 0x0f) as i32;
                                let v = if q4_0 {
                                    d * (q - 8) as f32
                                } else {
                                    d * q as f32 + m
                                };
                                *sum += (v as f64) * (v as f64);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `out = W · x` over the inputs `kept` (ascending; None: every input), on one thread.
    pub fn matvec(&self, x: &[f32], kept: Option<&[u32]>, out: &mut [f32], s: &mut QColScratch) {
        assert_eq!(out.len(), self.out_dim, "QColMatrix::matvec: output size");
        prepare_input(self.in_dim, x, kept, s);
        for &(c0, c1) in &self.tiles {
            self.columns(&s.cols, c0, c1, &mut out[c0 * 32..c1 * 32]);
        }
    }

    /// [`QColMatrix::matvec`] on `pool`: a job per output tile, each running every block
    /// column over its own outputs; the same result on any thread count.
    pub fn matvec_pool(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        kept: Option<&[u32]>,
        out: &mut [f32],
        s: &mut QColScratch,
    ) {
        assert_eq!(out.len(), self.out_dim, "QColMatrix::matvec: output size");
        prepare_input(self.in_dim, x, kept, s);
        let dst = SharedMut(out.as_mut_ptr());
        let s = &*s;
        pool.for_chunks(self.tiles.len(), &|c, _| {
            let (c0, c1) = self.tiles[c];
            // SAFETY: job c writes tile c's outputs c0 * 32 .. c1 * 32 only (the tiles are
            // disjoint), inside `out`, which outlives the call.
            let part =
                unsafe { std::slice::from_raw_parts_mut(dst.get().add(c0 * 32), (c1 - c0) * 32) };
            self.columns(&s.cols, c0, c1, part);
        });
    }

    /// Tile `c0..c1`'s outputs `c0 * 32 .. c1 * 32` (into `out`, that long) from the
    /// prepared columns.
    fn columns(&self, cols: &[PreparedColumn], c0: usize, c1: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), (c1 - c0) * 32);
        out.fill(0.0);
        #[cfg(target_arch = "x86_64")]
        if has_vbmi_vnni() {
            // SAFETY: checked the CPU; every prepared column's kept inputs are a multiple
            // of 4 indices below 32, chunks c0..c1 lie in out_dim / 32 and `out` holds
            // their (c1 - c0) * 32 floats.
            unsafe { columns_vbmi(cols, self, c0, c1, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::qdot::has_avx2() {
            // SAFETY: checked the CPU (AVX2, FMA, F16C); the rest as above.
            unsafe { columns_avx2(cols, self, c0, c1, out) };
            return;
        }
        for p in cols {
            column_scalar(&self.column(p.block), p, c0, c1, out);
        }
    }

    /// Block column `b`.
    fn column(&self, b: usize) -> Column<'_> {
        let per_col = self.scales_per_col();
        Column {
            fmt: self.fmt,
            out_dim: self.out_dim,
            tiles: &self.tiles,
            scales: &self.scales[b * per_col..][..per_col],
            quants: &self.quants[b * QK * self.out_dim / 2..][..QK * self.out_dim / 2],
        }
    }

    /// `TOKENS` tokens' outputs `c0 * 32 .. c1 * 32` of tile `c0..c1` from their prepared
    /// columns (`cols`: every block of token 0, then of token 1, ...), into rows of
    /// `out_dim` at `out` (row t at `out + t * out_dim`): each token's as [`columns`]
    /// computes it alone.
    ///
    /// # Safety
    /// `out` must be valid for writes of `tokens` rows of `out_dim` floats, which nothing
    /// else accesses at outputs `c0 * 32 .. c1 * 32` during the call.
    unsafe fn columns_many(
        &self,
        cols: &[PreparedColumn],
        tokens: usize,
        c0: usize,
        c1: usize,
        out: *mut f32,
    ) {
        let blocks = self.in_dim / QK;
        debug_assert_eq!(cols.len(), tokens * blocks);
        let row = |t: usize| {
            // SAFETY: the caller's contract: row t's outputs c0 * 32 .. c1 * 32 are ours.
            unsafe {
                std::slice::from_raw_parts_mut(out.add(t * self.out_dim + c0 * 32), (c1 - c0) * 32)
            }
        };
        let mut t = 0;
        // Whole passes of the many-token kernel, the tokens left over one at a time.
        #[cfg(target_arch = "x86_64")]
        {
            let (vbmi, avx2) = (has_vbmi_vnni(), super::qdot::has_avx2());
            let step = if vbmi { MANY } else { MANY_AVX2 };
            while (vbmi || avx2) && t + step <= tokens {
                let cols = &cols[t * blocks..(t + step) * blocks];
                // SAFETY: checked the CPU (AVX-512 VBMI/VNNI, or AVX2/FMA/F16C); each
                // token's columns are every block of the matrix with all 32 inputs kept
                // (a dense preparation), in block order; rows t.. are ours.
                unsafe {
                    if vbmi {
                        let rows = std::array::from_fn(|k| row(t + k));
                        columns_vbmi_many(cols, blocks, self, c0, c1, rows)
                    } else {
                        let rows = std::array::from_fn(|k| row(t + k));
                        columns_avx2_many::<MANY_AVX2>(cols, blocks, self, c0, c1, rows)
                    }
                };
                t += step;
            }
        }
        for t in t..tokens {
            self.columns(&cols[t * blocks..(t + 1) * blocks], c0, c1, row(t));
        }
    }

    fn scales_per_col(&self) -> usize {
        (if self.fmt == QFormat::Q4_1 { 2 } else { 1 }) * self.out_dim
    }
}

/// Each block column with an input kept, for any matrix of `in_dim` inputs (the
/// preparation does not depend on the matrix), into `s.cols`: its 8-bit activations and
/// its kept inputs padded to whole quads. `x` with the dropped inputs zeroed is quantized
/// in one pass, each 32-input block on its own, as the row-major kernels quantize it.
fn prepare_input(in_dim: usize, x: &[f32], kept: Option<&[u32]>, s: &mut QColScratch) {
    assert_eq!(x.len(), in_dim, "QColMatrix::matvec: input size");
    match kept {
        None => quantize_activations(x, &mut s.pairs),
        Some(k) => {
            assert!(
                k.windows(2).all(|w| w[0] < w[1])
                    && k.last().is_none_or(|&i| (i as usize) < in_dim),
                "QColMatrix::matvec: kept inputs must ascend and lie below {in_dim}"
            );
            s.masked.clear();
            s.masked.resize(in_dim, 0.0);
            for &i in k {
                s.masked[i as usize] = x[i as usize];
            }
            quantize_activations(&s.masked, &mut s.pairs);
        }
    }
    s.cols.clear();
    let mut next = 0;
    for b in 0..in_dim / QK {
        let mut ks = [0u8; QK];
        let mut len = 0;
        match kept {
            None => {
                ks = std::array::from_fn(|j| j as u8);
                len = QK;
            }
            Some(k) => {
                while next < k.len() && (k[next] as usize) < (b + 1) * QK {
                    ks[len] = (k[next] as usize - b * QK) as u8;
                    len += 1;
                    next += 1;
                }
            }
        }
        if len == 0 {
            continue;
        }
        let (pair, half) = (&s.pairs[b / 2], b % 2);
        let qs: [i8; QK] = pair.qs[half * QK..][..QK].try_into().expect("a block");
        // Pad to whole quads with an input whose quant is zero (a partial block has one:
        // its dropped inputs were quantized as zeros; a whole block needs none).
        let pad = (0..QK as u8).find(|&j| qs[j as usize] == 0).unwrap_or(0);
        while !len.is_multiple_of(4) {
            ks[len] = pad;
            len += 1;
        }
        let mut words = [0i32; QK / 4];
        for (g, q) in ks[..len].chunks_exact(4).enumerate() {
            words[g] = i32::from_le_bytes([0, 1, 2, 3].map(|k| qs[q[k] as usize] as u8));
        }
        s.cols.push(PreparedColumn {
            block: b,
            dx: pair.ds[2 * half],
            sx: pair.ds[2 * half + 1],
            qsum: pair.qsum[half],
            qs,
            kept: ks,
            len,
            words,
        });
    }
}

/// `outs[m] = mats[m] · x` over the inputs `kept`, for matrices that share one input (q/k/v,
/// gate/up): the input prepared once, one pool job over every matrix's output tiles. Each
/// output equals [`QColMatrix::matvec`]'s.
pub fn matvec_group_pool(
    pool: &ThreadPool,
    mats: &[&QColMatrix],
    x: &[f32],
    kept: Option<&[u32]>,
    outs: &mut [&mut [f32]],
    s: &mut QColScratch,
) {
    assert_eq!(
        mats.len(),
        outs.len(),
        "matvec_group_pool: one output per matrix"
    );
    let Some(first) = mats.first() else { return };
    for (m, o) in mats.iter().zip(outs.iter()) {
        assert_eq!(m.in_dim, first.in_dim, "matvec_group_pool: one input size");
        assert_eq!(o.len(), m.out_dim, "QColMatrix::matvec: output size");
    }
    prepare_input(first.in_dim, x, kept, s);
    // (matrix, tile) per job chunk, the matrices in order.
    let jobs: Vec<(usize, usize)> = mats
        .iter()
        .enumerate()
        .flat_map(|(m, mat)| (0..mat.tiles.len()).map(move |t| (m, t)))
        .collect();
    let dsts: Vec<SharedMut> = outs.iter_mut().map(|o| SharedMut(o.as_mut_ptr())).collect();
    let s = &*s;
    pool.for_chunks(jobs.len(), &|c, _| {
        let (m, t) = jobs[c];
        let (mat, (c0, c1)) = (mats[m], mats[m].tiles[t]);
        // SAFETY: chunk c writes tile t of output m only (outputs c0 * 32 .. c1 * 32 of
        // outs[m], whose length is mats[m].out_dim, asserted); the tiles of one matrix are
        // disjoint and each (m, t) is one chunk; `outs` outlives the call.
        let part =
            unsafe { std::slice::from_raw_parts_mut(dsts[m].get().add(c0 * 32), (c1 - c0) * 32) };
        mat.columns(&s.cols, c0, c1, part);
    });
}

/// Tokens per pass of the many-token kernel: each quad of weights, once permuted into
/// place, serves this many tokens (two accumulators each).
const MANY: usize = 8;

/// [`MANY`] for the AVX2 kernel, whose 16 vector registers hold each token's four 16-bit
/// accumulators beside the four interleaved weight vectors.
const MANY_AVX2: usize = 2;

/// `outs[m] = x · mats[m]^T` for `n` tokens (`x`: `[n, in]`, `outs[m]`: `[n, out_m]`), every
/// input kept (prefill): each token's outputs equal [`QColMatrix::matvec`]'s bit for bit,
/// but each weight quad is loaded and permuted once per [`MANY`] tokens. One pool job:
/// a chunk per (matrix, tile, group of tokens).
pub fn matmul_group_pool(
    pool: &ThreadPool,
    mats: &[&QColMatrix],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
    s: &mut QColScratch,
) {
    assert_eq!(
        mats.len(),
        outs.len(),
        "matmul_group_pool: one output per matrix"
    );
    let Some(first) = mats.first() else { return };
    let in_dim = first.in_dim;
    assert_eq!(x.len(), n * in_dim, "matmul_group_pool: input size");
    for (m, o) in mats.iter().zip(outs.iter()) {
        assert_eq!(m.in_dim, in_dim, "matmul_group_pool: one input size");
        assert_eq!(o.len(), n * m.out_dim, "matmul_group_pool: output size");
    }
    let mut many = std::mem::take(&mut s.many);
    many.clear();
    for xt in x.chunks_exact(in_dim) {
        prepare_input(in_dim, xt, None, s);
        many.append(&mut s.cols);
    }
    let groups = n.div_ceil(MANY);
    let jobs: Vec<(usize, usize, usize)> = mats
        .iter()
        .enumerate()
        .flat_map(|(m, mat)| {
            (0..mat.tiles.len()).flat_map(move |t| (0..groups).map(move |g| (m, t, g)))
        })
        .collect();
    let dsts: Vec<SharedMut> = outs.iter_mut().map(|o| SharedMut(o.as_mut_ptr())).collect();
    let blocks = in_dim / QK;
    let cols = &many[..];
    pool.for_chunks(jobs.len(), &|c, _| {
        let (m, t, g) = jobs[c];
        let (mat, (c0, c1)) = (mats[m], mats[m].tiles[t]);
        let (t0, t1) = (g * MANY, ((g + 1) * MANY).min(n));
        // SAFETY: chunk c writes outputs c0 * 32 .. c1 * 32 of rows t0..t1 of outs[m]
        // (n rows of out_dim, asserted) and nothing else; each (matrix, tile, group) is
        // one chunk, the tiles of a matrix are disjoint, and `outs` outlives the call.
        unsafe {
            mat.columns_many(
                &cols[t0 * blocks..t1 * blocks],
                t1 - t0,
                c0,
                c1,
                dsts[m].get().add(t0 * mat.out_dim),
            )
        };
    });
    s.many = many;
}

/// One block column of a [`QColMatrix`].
struct Column<'a> {
    fmt: QFormat,
    out_dim: usize,
    tiles: &'a [(usize, usize)],
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
        let byte = self.quants[quant_at(self.out_dim, self.tiles, 0, input, o)];
        (if o % 32 < 16 { byte & 0x0f } else { byte >> 4 }) as i32
    }
}

/// Where output `o`'s nibble of input `k` of block column `b` lies in `quants` (within
/// one block column's bytes when `b` is 0).
fn quant_at(out_dim: usize, tiles: &[(usize, usize)], b: usize, k: usize, o: usize) -> usize {
    let c = o / 32;
    let &(c0, c1) = tiles
        .iter()
        .find(|t| t.0 <= c && c < t.1)
        .expect("a tile per chunk");
    b * QK * out_dim / 2 + c0 * QK * 16 + k * (c1 - c0) * 16 + (c - c0) * 16 + o % 16
}

/// The row-major kernels' `unsigned_offset`: Q4_0's nibbles are `q + 8`.
fn offset(fmt: QFormat) -> i32 {
    if fmt == QFormat::Q4_0 { -8 } else { 0 }
}

/// [`column_vbmi`] in scalar code: the same integer sums and the same FMAs.
fn column_scalar(col: &Column<'_>, p: &PreparedColumn, c0: usize, c1: usize, out: &mut [f32]) {
    let (dx, s, kept) = (p.dx, p.sx, &p.kept[..p.len]);
    for (o, acc) in (c0 * 32..c1 * 32).zip(out.iter_mut()) {
        let mut isum = offset(col.fmt).wrapping_mul(p.qsum);
        for &j in kept {
            isum += col.nibble(j as usize, o) * p.qs[j as usize] as i32;
        }
        // A padding input has quant 0: the sum above counts it for nothing.
        let (d, m) = col.dm(o);
        *acc = (isum as f32).mul_add(d * dx, *acc);
        if col.fmt == QFormat::Q4_1 {
            *acc = m.mul_add(s, *acc);
        }
    }
}

/// Prefetches the next prepared column's stretch in this tile: at the `k`-th chunk of the
/// current column, line `k` of each of its kept inputs' runs (`tile_row` bytes each, from
/// `tile_base`), so the stretch is requested over the current column's chunks (the
/// hardware prefetcher follows each run once it has started).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_next(
    next: &Option<(Column<'_>, &PreparedColumn)>,
    tile_base: usize,
    tile_row: usize,
    k: usize,
) {
    let Some((col, p)) = next else { return };
    let line = k * 64;
    if line < tile_row {
        for &j in &p.kept[..p.len] {
            let a = &col.quants[tile_base + j as usize * tile_row + line];
            // SAFETY: a prefetch of an element of the column's slice (SSE, in every
            // x86_64 CPU); it reads nothing architecturally.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(a as *const u8 as *const i8) };
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

/// Every prepared column into `out` (outputs `c0 * 32 .. c1 * 32`): for every 32 outputs,
/// two vectors of 16 integer sums over the kept inputs, four at a time (`vpermb` gathers
/// four inputs' nibbles of 16 outputs into the 4-byte lanes `vpdpbusd` multiplies by the
/// four activation quants), then the block's FMAs; columns in ascending order.
///
/// Accumulates into `out` (zeroed by the caller).
///
/// # Safety
/// AVX-512 F/BW/VL/VBMI/VNNI and F16C; `cols` prepared for `mat`'s inputs, every
/// column's kept inputs a multiple of 4 indices below 32, `c0 <= c1 <= out_dim / 32`,
/// `out` `(c1 - c0) * 32` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn columns_vbmi(
    cols: &[PreparedColumn],
    mat: &QColMatrix,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() == (c1 - c0) * 32);
    // Lane byte 4o + k takes byte 16k + o: input k's nibble of output o.
    let idx: [u8; 64] = std::array::from_fn(|i| ((i % 4) * 16 + i / 4) as u8);
    // SAFETY: every load below reads 16 bytes of a kept input's run in the tile c0..c1
    // (c1 <= out_dim / 32, the tile's layout), or 16 scales at output
    // `chunk * 32 (+ 16)`; stores write out's 32 floats of the chunk; all inside the
    // slices (sizes set by `from_row_major`).
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
        // This tile's bytes in a column, and one input's run in them.
        let (tile_base, tile_row) = (c0 * QK * 16, (c1 - c0) * 16);
        for (ci, p) in cols.iter().enumerate() {
            let col = mat.column(p.block);
            let next = cols.get(ci + 1).map(|n| (mat.column(n.block), n));
            let init = _mm512_set1_epi32(offset(col.fmt).wrapping_mul(p.qsum));
            let (dx, s) = (_mm512_set1_ps(p.dx), _mm512_set1_ps(p.sx));
            let quads = p.len / 4;
            let base = col.quants.as_ptr();
            for chunk in c0..c1 {
                prefetch_next(&next, tile_base, tile_row, chunk - c0);
                let cb = base.add(tile_base + (chunk - c0) * 16);
                let (mut lo, mut hi) = (init, init);
                for g in 0..quads {
                    let q = &p.kept[4 * g..4 * g + 4];
                    let (wl, wh) = quad_nibbles(
                        std::array::from_fn(|k| cb.add(q[k] as usize * tile_row)),
                        idx,
                    );
                    let b = _mm512_set1_epi32(p.words[g]);
                    lo = _mm512_dpbusd_epi32(lo, wl, b);
                    hi = _mm512_dpbusd_epi32(hi, wh, b);
                }
                for (half, isum) in [lo, hi].into_iter().enumerate() {
                    let o = chunk * 32 + half * 16;
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                        col.scales.as_ptr().add(o) as *const __m256i
                    ));
                    let po = out.as_mut_ptr().add(o - c0 * 32);
                    let mut acc = _mm512_loadu_ps(po);
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), acc);
                    if col.fmt == QFormat::Q4_1 {
                        let m = _mm512_cvtph_ps(_mm256_loadu_si256(
                            col.scales.as_ptr().add(col.out_dim + o) as *const __m256i,
                        ));
                        acc = _mm512_fmadd_ps(m, s, acc);
                    }
                    _mm512_storeu_ps(po, acc);
                }
            }
        }
    }
}

/// Four inputs' nibbles of 16 outputs (16 bytes at each of `rows`) as `vpdpbusd`'s
/// lanes: lane byte `4o + k` holds input k's weight of output o, low nibbles (outputs
/// 0..16 of the 32) in the first vector, high nibbles (16..32) in the second.
///
/// # Safety
/// AVX-512 F/BW/VBMI; each of `rows` readable for 16 bytes; `idx` the permutation
/// `idx[4o + k] = 16k + o`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
#[inline]
unsafe fn quad_nibbles(rows: [*const u8; 4], idx: __m512i) -> (__m512i, __m512i) {
    let nib = _mm512_set1_epi8(0x0f);
    // SAFETY: the caller's contract: 16 readable bytes at each row.
    let v = unsafe {
        let at = |k: usize| rows[k] as *const __m128i;
        let v = _mm512_castsi128_si512(_mm_loadu_si128(at(0)));
        let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(at(1)));
        let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(at(2)));
        _mm512_inserti32x4::<3>(v, _mm_loadu_si128(at(3)))
    };
    let lo = _mm512_permutexvar_epi8(idx, _mm512_and_si512(v, nib));
    let hi = _mm512_permutexvar_epi8(idx, _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib));
    (lo, hi)
}

/// [`columns_vbmi`] for [`MANY`] tokens whose columns are every block with every input
/// kept (`cols`: token after token, `blocks` each): each quad of weights is loaded and
/// permuted once, then multiplied by each token's four quants; per token, the integer
/// sums and the FMAs are [`columns_vbmi`]'s, in its order.
///
/// # Safety
/// As [`columns_vbmi`]; `cols` holds `MANY * blocks` dense columns in block order, and
/// each of `out` is `(c1 - c0) * 32` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")]
unsafe fn columns_vbmi_many(
    cols: &[PreparedColumn],
    blocks: usize,
    mat: &QColMatrix,
    c0: usize,
    c1: usize,
    mut out: [&mut [f32]; MANY],
) {
    let idx: [u8; 64] = std::array::from_fn(|i| ((i % 4) * 16 + i / 4) as u8);
    for o in out.iter_mut() {
        debug_assert_eq!(o.len(), (c1 - c0) * 32);
        o.fill(0.0);
    }
    // SAFETY: loads read 16 bytes of input k's run in tile c0..c1 of a block column (the
    // layout `from_row_major` built: 32 inputs per column, all kept here) or 16 scales at
    // output `chunk * 32 (+ 16)`; stores write each token's 32 floats of the chunk.
    unsafe {
        let idx = _mm512_loadu_si512(idx.as_ptr() as *const __m512i);
        let (tile_base, tile_row) = (c0 * QK * 16, (c1 - c0) * 16);
        for b in 0..blocks {
            let col = mat.column(b);
            let p: [&PreparedColumn; MANY] = std::array::from_fn(|t| &cols[t * blocks + b]);
            let init: [__m512i; MANY] =
                std::array::from_fn(|t| _mm512_set1_epi32(offset(col.fmt).wrapping_mul(p[t].qsum)));
            let base = col.quants.as_ptr();
            for chunk in c0..c1 {
                let cb = base.add(tile_base + (chunk - c0) * 16);
                let (mut lo, mut hi) = (init, init);
                for g in 0..QK / 4 {
                    let (wl, wh) =
                        quad_nibbles(std::array::from_fn(|k| cb.add((4 * g + k) * tile_row)), idx);
                    for t in 0..MANY {
                        let w = _mm512_set1_epi32(p[t].words[g]);
                        lo[t] = _mm512_dpbusd_epi32(lo[t], wl, w);
                        hi[t] = _mm512_dpbusd_epi32(hi[t], wh, w);
                    }
                }
                for half in 0..2 {
                    let o = chunk * 32 + half * 16;
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                        col.scales.as_ptr().add(o) as *const __m256i
                    ));
                    let m = (col.fmt == QFormat::Q4_1).then(|| {
                        _mm512_cvtph_ps(_mm256_loadu_si256(
                            col.scales.as_ptr().add(col.out_dim + o) as *const __m256i,
                        ))
                    });
                    for t in 0..MANY {
                        let isum = if half == 0 { lo[t] } else { hi[t] };
                        let po = out[t].as_mut_ptr().add(o - c0 * 32);
                        let mut acc = _mm512_loadu_ps(po);
                        acc = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(isum),
                            _mm512_mul_ps(d, _mm512_set1_ps(p[t].dx)),
                            acc,
                        );
                        if let Some(m) = m {
                            acc = _mm512_fmadd_ps(m, _mm512_set1_ps(p[t].sx), acc);
                        }
                        _mm512_storeu_ps(po, acc);
                    }
                }
            }
        }
    }
}

/// [`columns_vbmi`] with AVX2: per quad of kept inputs, the four inputs' nibbles are
/// interleaved into `vpmaddubsw`'s byte order ([`quad_nibbles_avx2`]), multiplied by the
/// four activation quants into 16-bit pair sums, and added up over the block's quads in
/// 16 bits; `vpmaddwd` by ones then gives each output's 32-bit block sum. The sums are
/// exact integers (a pair sum is at most 2 · 15 · 128 = 3840, a block has at most 8
/// quads: 30720 < 2^15), so they equal [`columns_vbmi`]'s and the FMAs that follow are
/// the same, in the same order.
///
/// # Safety
/// AVX2, FMA and F16C; the rest as [`columns_vbmi`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2(
    cols: &[PreparedColumn],
    mat: &QColMatrix,
    c0: usize,
    c1: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() == (c1 - c0) * 32);
    // SAFETY: as in `columns_vbmi`: 16-byte loads of a kept input's run in tile c0..c1,
    // 8 scales at output `chunk * 32 + 8h`, 8 floats of `out` per store, all inside the
    // slices.
    unsafe {
        let (tile_base, tile_row) = (c0 * QK * 16, (c1 - c0) * 16);
        for (ci, p) in cols.iter().enumerate() {
            let col = mat.column(p.block);
            let next = cols.get(ci + 1).map(|n| (mat.column(n.block), n));
            let quads = p.len / 4;
            let base = col.quants.as_ptr();
            for chunk in c0..c1 {
                prefetch_next(&next, tile_base, tile_row, chunk - c0);
                let cb = base.add(tile_base + (chunk - c0) * 16);
                let mut pairs = [_mm256_setzero_si256(); 4];
                for g in 0..quads {
                    let q = &p.kept[4 * g..4 * g + 4];
                    let w = quad_nibbles_avx2(std::array::from_fn(|k| {
                        cb.add(q[k] as usize * tile_row)
                    }));
                    let b = _mm256_set1_epi32(p.words[g]);
                    for (acc, w) in pairs.iter_mut().zip(w) {
                        *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(w, b));
                    }
                }
                let po = out.as_mut_ptr().add((chunk - c0) * 32);
                add_chunk_avx2(&col, chunk, pairs, p, po);
            }
        }
    }
}

/// One chunk's 32 outputs at `po` += the block column's products: the 16-bit pair sums
/// `pairs` (in [`quad_nibbles_avx2`]'s output order) widened and offset into exact block
/// sums, then `fma(isum, d·dx, acc)` and Q4_1's `fma(m, s, acc)` per output.
///
/// # Safety
/// AVX2, FMA and F16C; `chunk < col.out_dim / 32`; `po` valid for 32 floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_chunk_avx2(
    col: &Column<'_>,
    chunk: usize,
    pairs: [__m256i; 4],
    p: &PreparedColumn,
    po: *mut f32,
) {
    let init = _mm256_set1_epi32(offset(col.fmt).wrapping_mul(p.qsum));
    let (dx, s) = (_mm256_set1_ps(p.dx), _mm256_set1_ps(p.sx));
    let ones = _mm256_set1_epi16(1);
    // Vector v holds outputs 4v..4v+4 and 16+4v..16+4v+4 (lanes 0 and 1): back to output
    // order, 8 at a time.
    let v = pairs.map(|p| _mm256_add_epi32(init, _mm256_madd_epi16(p, ones)));
    let sums = [
        _mm256_permute2x128_si256::<0x20>(v[0], v[1]),
        _mm256_permute2x128_si256::<0x20>(v[2], v[3]),
        _mm256_permute2x128_si256::<0x31>(v[0], v[1]),
        _mm256_permute2x128_si256::<0x31>(v[2], v[3]),
    ];
    // SAFETY: outputs chunk * 32 .. + 32 lie inside the column's scales (the caller's
    // chunk); `po` holds their 32 floats (the caller's contract).
    unsafe {
        for (h, isum) in sums.into_iter().enumerate() {
            let o = chunk * 32 + h * 8;
            let d = _mm256_cvtph_ps(_mm_loadu_si128(col.scales.as_ptr().add(o) as *const __m128i));
            let po = po.add(h * 8);
            let mut acc = _mm256_loadu_ps(po);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, dx), acc);
            if col.fmt == QFormat::Q4_1 {
                let m = _mm256_cvtph_ps(_mm_loadu_si128(
                    col.scales.as_ptr().add(col.out_dim + o) as *const __m128i
                ));
                acc = _mm256_fmadd_ps(m, s, acc);
            }
            _mm256_storeu_ps(po, acc);
        }
    }
}

/// Four inputs' nibbles of 32 outputs (16 bytes at each of `rows`) in `vpmaddubsw`'s
/// order: vector v's 32-bit lane holds the four inputs' weights (input k in byte k) of
/// outputs `4v..4v+4` (lanes 0-3, the low nibbles) and `16+4v..16+4v+4` (lanes 4-7, the
/// high nibbles).
///
/// # Safety
/// AVX2; each of `rows` readable for 16 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn quad_nibbles_avx2(rows: [*const u8; 4]) -> [__m256i; 4] {
    let nib = _mm256_set1_epi8(0x0f);
    // The low 128-bit lane keeps the low nibbles, the high lane the high ones.
    let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    // SAFETY: the caller's contract: 16 readable bytes at each row.
    let n: [__m256i; 4] = std::array::from_fn(|k| unsafe {
        let r = _mm256_broadcastsi128_si256(_mm_loadu_si128(rows[k] as *const __m128i));
        _mm256_and_si256(_mm256_srlv_epi32(r, shift), nib)
    });
    // Bytes (input 0, input 1) per output, then the two pairs per output.
    let (lo01, hi01) = (
        _mm256_unpacklo_epi8(n[0], n[1]),
        _mm256_unpackhi_epi8(n[0], n[1]),
    );
    let (lo23, hi23) = (
        _mm256_unpacklo_epi8(n[2], n[3]),
        _mm256_unpackhi_epi8(n[2], n[3]),
    );
    [
        _mm256_unpacklo_epi16(lo01, lo23),
        _mm256_unpackhi_epi16(lo01, lo23),
        _mm256_unpacklo_epi16(hi01, hi23),
        _mm256_unpackhi_epi16(hi01, hi23),
    ]
}

/// [`columns_avx2`] for `T` tokens whose columns are every block with every input kept
/// (`cols`: token after token, `blocks` each): each quad of weights is loaded and
/// interleaved once, then multiplied by each token's four quants; per token, the integer
/// sums and the FMAs are [`columns_avx2`]'s, in its order.
///
/// # Safety
/// AVX2, FMA and F16C; `cols` holds `T * blocks` dense columns in block order, each of
/// `out` is `(c1 - c0) * 32` floats; the rest as [`columns_vbmi`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2_many<const T: usize>(
    cols: &[PreparedColumn],
    blocks: usize,
    mat: &QColMatrix,
    c0: usize,
    c1: usize,
    mut out: [&mut [f32]; T],
) {
    for o in out.iter_mut() {
        debug_assert_eq!(o.len(), (c1 - c0) * 32);
        o.fill(0.0);
    }
    // SAFETY: loads read 16 bytes of input k's run in tile c0..c1 of a block column (all
    // 32 inputs kept here) or 8 scales at output `chunk * 32 + 8h`; stores write each
    // token's 8 floats there.
    unsafe {
        let (tile_base, tile_row) = (c0 * QK * 16, (c1 - c0) * 16);
        for b in 0..blocks {
            let col = mat.column(b);
            let p: [&PreparedColumn; T] = std::array::from_fn(|t| &cols[t * blocks + b]);
            let base = col.quants.as_ptr();
            for chunk in c0..c1 {
                let cb = base.add(tile_base + (chunk - c0) * 16);
                let mut pairs = [[_mm256_setzero_si256(); 4]; T];
                for g in 0..QK / 4 {
                    let w =
                        quad_nibbles_avx2(std::array::from_fn(|k| cb.add((4 * g + k) * tile_row)));
                    for t in 0..T {
                        let x = _mm256_set1_epi32(p[t].words[g]);
                        for (acc, &w) in pairs[t].iter_mut().zip(&w) {
                            *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(w, x));
                        }
                    }
                }
                for t in 0..T {
                    let po = out[t].as_mut_ptr().add((chunk - c0) * 32);
                    add_chunk_avx2(&col, chunk, pairs[t], p[t], po);
                }
            }
        }
    }
}

impl QColScratch {
    pub fn new() -> QColScratch {
        QColScratch::default()
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
                for tiles in [1, 2, 3] {
                    let m = QColMatrix::from_row_major(fmt, &w, out_dim, in_dim, tiles);
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
                        for pool in [1, 2, 3].map(crate::kernels::pool::ThreadPool::new) {
                            let mut par = vec![f32::NAN; out_dim];
                            m.matvec_pool(&pool, &x, kept, &mut par, &mut s);
                            assert_eq!(
                                par,
                                want,
                                "{fmt:?} {out_dim}x{in_dim} keep {keep}: {} threads",
                                pool.threads()
                            );
                        }
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
    }

    /// Random matrices of one input size, each `(format, outputs, tiles)`.
    fn matrices(shapes: &[(QFormat, usize, usize)], in_dim: usize, seed: u64) -> Vec<QColMatrix> {
        shapes
            .iter()
            .map(|&(f, o, t)| {
                QColMatrix::from_row_major(f, &blocks(f, o, in_dim, o as u64 + seed), o, in_dim, t)
            })
            .collect()
    }

    #[test]
    fn a_group_product_equals_each_matrix_alone_at_1_to_3_threads() {
        // q/k/v-like: one input, three output sizes, mixed formats and tile counts.
        let in_dim = 192;
        let shapes = [
            (QFormat::Q4_1, 96, 2),
            (QFormat::Q4_0, 32, 1),
            (QFormat::Q4_1, 64, 3),
        ];
        let mats = matrices(&shapes, in_dim, 3);
        let refs: Vec<&QColMatrix> = mats.iter().collect();
        let x = data(in_dim, 11);
        let kept: Vec<u32> = (0..in_dim as u32).filter(|i| i % 3 != 1).collect();
        let mut s = QColScratch::new();
        for kept in [None, Some(&kept[..])] {
            let want: Vec<Vec<f32>> = mats
                .iter()
                .map(|m| {
                    let mut y = vec![0f32; m.out_dim()];
                    m.matvec(&x, kept, &mut y, &mut s);
                    y
                })
                .collect();
            for pool in [1, 2, 3].map(crate::kernels::pool::ThreadPool::new) {
                let mut got: Vec<Vec<f32>> =
                    mats.iter().map(|m| vec![f32::NAN; m.out_dim()]).collect();
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| &mut v[..]).collect();
                matvec_group_pool(&pool, &refs, &x, kept, &mut outs, &mut s);
                assert_eq!(
                    got,
                    want,
                    "{} threads, kept {}",
                    pool.threads(),
                    kept.is_some()
                );
            }
        }
    }

    #[test]
    fn a_many_token_product_equals_each_token_alone_at_1_to_3_threads() {
        let in_dim = 96;
        let shapes = [(QFormat::Q4_1, 64, 2), (QFormat::Q4_0, 96, 3)];
        let mats = matrices(&shapes, in_dim, 5);
        let refs: Vec<&QColMatrix> = mats.iter().collect();
        let mut s = QColScratch::new();
        for n in [1, 7, 8, 9, 17] {
            let x = data(n * in_dim, n as u64);
            let want: Vec<Vec<f32>> = mats
                .iter()
                .map(|m| {
                    let mut y = vec![0f32; n * m.out_dim()];
                    for (xt, yt) in x.chunks_exact(in_dim).zip(y.chunks_exact_mut(m.out_dim())) {
                        m.matvec(xt, None, yt, &mut s);
                    }
                    y
                })
                .collect();
            for pool in [1, 2, 3].map(crate::kernels::pool::ThreadPool::new) {
                let mut got: Vec<Vec<f32>> = mats
                    .iter()
                    .map(|m| vec![f32::NAN; n * m.out_dim()])
                    .collect();
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| &mut v[..]).collect();
                matmul_group_pool(&pool, &refs, &x, n, &mut outs, &mut s);
                assert_eq!(got, want, "{n} tokens, {} threads", pool.threads());
            }
        }
    }

    /// [`QColMatrix::matvec`] forced onto the scalar column kernel.
    fn scalar_matvec(m: &QColMatrix, x: &[f32], kept: Option<&[u32]>, out: &mut [f32]) {
        out.fill(0.0);
        let mut s = QColScratch::new();
        prepare_input(m.in_dim, x, kept, &mut s);
        for p in &s.cols {
            column_scalar(&m.column(p.block), p, 0, m.out_dim / 32, out);
        }
    }

    /// [`QColMatrix::matvec`] forced onto the AVX2 column kernel, tile by tile; None
    /// without AVX2, FMA and F16C.
    fn avx2_matvec(m: &QColMatrix, x: &[f32], kept: Option<&[u32]>) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::qdot::has_avx2() {
            let mut out = vec![f32::NAN; m.out_dim];
            let mut s = QColScratch::new();
            prepare_input(m.in_dim, x, kept, &mut s);
            for &(c0, c1) in &m.tiles {
                let part = &mut out[c0 * 32..c1 * 32];
                part.fill(0.0);
                // SAFETY: checked the CPU; columns prepared for m, tile c0..c1 of m,
                // `part` its (c1 - c0) * 32 outputs.
                unsafe { columns_avx2(&s.cols, m, c0, c1, part) };
            }
            return Some(out);
        }
        let _ = (m, x, kept);
        None
    }

    /// Two tokens through the AVX2 many-token kernel, every input kept; None without
    /// AVX2, FMA and F16C.
    fn avx2_two_tokens(m: &QColMatrix, x: [&[f32]; 2]) -> Option<[Vec<f32>; 2]> {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::qdot::has_avx2() {
            let mut s = QColScratch::new();
            let mut cols = Vec::new();
            for xt in x {
                prepare_input(m.in_dim, xt, None, &mut s);
                cols.append(&mut s.cols);
            }
            let mut out = [vec![f32::NAN; m.out_dim], vec![f32::NAN; m.out_dim]];
            for &(c0, c1) in &m.tiles {
                let [a, b] = &mut out;
                // SAFETY: checked the CPU; two tokens' dense columns for m, tile c0..c1,
                // each output its (c1 - c0) * 32 floats.
                unsafe {
                    columns_avx2_many::<2>(
                        &cols,
                        m.in_dim / QK,
                        m,
                        c0,
                        c1,
                        [&mut a[c0 * 32..c1 * 32], &mut b[c0 * 32..c1 * 32]],
                    )
                };
            }
            return Some(out);
        }
        let _ = (m, x);
        None
    }

    #[test]
    fn the_avx2_column_kernel_equals_the_scalar_one_bit_for_bit() {
        // Odd shapes: a single 32-output chunk, tiles of unequal sizes, one block column.
        for fmt in [QFormat::Q4_0, QFormat::Q4_1] {
            for (out_dim, in_dim) in [(32, 32), (96, 160), (224, 96), (64, 1056)] {
                let w = blocks(fmt, out_dim, in_dim, 3 * out_dim as u64 + in_dim as u64);
                for tiles in [1, 2, 3] {
                    let m = QColMatrix::from_row_major(fmt, &w, out_dim, in_dim, tiles);
                    let x = data(in_dim, 13);
                    for kept in [
                        None,
                        Some(
                            (0..in_dim as u32)
                                .filter(|i| i % 3 != 1)
                                .collect::<Vec<_>>(),
                        ),
                        Some((0..in_dim as u32).filter(|i| i % 7 == 5).collect()),
                        Some(vec![in_dim as u32 - 1]),
                        Some(vec![]),
                    ] {
                        let mut want = vec![0f32; out_dim];
                        scalar_matvec(&m, &x, kept.as_deref(), &mut want);
                        let Some(got) = avx2_matvec(&m, &x, kept.as_deref()) else {
                            eprintln!("no AVX2/FMA/F16C here: only the scalar kernel runs");
                            return;
                        };
                        let n = kept.as_ref().map_or(in_dim, |k| k.len());
                        assert_eq!(
                            got, want,
                            "{fmt:?} {out_dim}x{in_dim}, {tiles} tiles, {n} kept"
                        );
                    }
                    let x2 = data(in_dim, 17);
                    if let Some(got) = avx2_two_tokens(&m, [&x, &x2]) {
                        for (t, xt) in [&x, &x2].into_iter().enumerate() {
                            let mut want = vec![0f32; out_dim];
                            scalar_matvec(&m, xt, None, &mut want);
                            assert_eq!(got[t], want, "{fmt:?} {out_dim}x{in_dim}: token {t} of 2");
                        }
                    }
                }
            }
            // The largest 16-bit pair sums: every nibble 15, every activation quant +-127.
            let (out_dim, in_dim) = (64, 64);
            let mut w = blocks(fmt, out_dim, in_dim, 1);
            for blk in w.chunks_exact_mut(fmt.block_bytes()) {
                blk[fmt.qs_offset()..].fill(0xff);
            }
            let m = QColMatrix::from_row_major(fmt, &w, out_dim, in_dim, 2);
            for sign in [1.0, -1.0] {
                let x = vec![sign; in_dim];
                let mut want = vec![0f32; out_dim];
                scalar_matvec(&m, &x, None, &mut want);
                if let Some(got) = avx2_matvec(&m, &x, None) {
                    assert_eq!(got, want, "{fmt:?}: extreme sums, sign {sign}");
                }
            }
        }
    }

    #[test]
    fn column_squares_equal_the_dequantized_row_major_columns() {
        for fmt in [QFormat::Q4_0, QFormat::Q4_1] {
            for (out_dim, in_dim, tiles) in [(32, 32, 1), (96, 160, 2), (160, 64, 3)] {
                let w = blocks(fmt, out_dim, in_dim, 9 + out_dim as u64);
                let m = QColMatrix::from_row_major(fmt, &w, out_dim, in_dim, tiles);
                let mut rows = vec![0f32; out_dim * in_dim];
                crate::quant::dequantize(fmt.source(), &w, &mut rows);
                let mut want = vec![0.5f64; in_dim];
                for row in rows.chunks_exact(in_dim) {
                    for (a, &v) in want.iter_mut().zip(row) {
                        *a += (v as f64) * (v as f64);
                    }
                }
                let mut got = vec![0.5f64; in_dim];
                m.add_column_squares(&mut got);
                assert_eq!(got, want, "{fmt:?} {out_dim}x{in_dim}, {tiles} tiles");
            }
        }
    }
}
