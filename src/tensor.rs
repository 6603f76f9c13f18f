//! Weight storage: a matrix or vector in a compute dtype (f32, bf16, f16, or one of GGUF's
//! quantized block formats), either borrowed from the file's memory map (when the file
//! already holds that dtype) or converted once at load into an owned 64-byte-aligned
//! buffer.

use std::sync::Arc;

use memmap2::Mmap;

use crate::error::Result;
use crate::kernels::WeightView;
use crate::kernels::dot::f32_to_bf16;
use crate::kernels::f16::f32_to_f16;
use crate::loader::{RawTensor, SourceDType};
use crate::quant::{self, QFormat};

/// The format a weight matrix is held in: a float dtype, or one of GGUF's quantized block
/// formats (kept as the file stores them, `--dtype native`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    /// IEEE half precision (GGUF's and safetensors' F16).
    F16,
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

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            q => q.qformat().expect("quantized").name(),
        }
    }
    /// The quantized block format, if this is one.
    pub fn qformat(self) -> Option<QFormat> {
        match self {
            DType::Q8_0 => Some(QFormat::Q8_0),
            DType::Q4_0 => Some(QFormat::Q4_0),
            DType::Q4_1 => Some(QFormat::Q4_1),
            DType::Q5_0 => Some(QFormat::Q5_0),
            DType::Q5_1 => Some(QFormat::Q5_1),
            DType::Q2K => Some(QFormat::Q2K),
            DType::Q3K => Some(QFormat::Q3K),
            DType::Q4K => Some(QFormat::Q4K),
            DType::Q5K => Some(QFormat::Q5K),
            DType::Q6K => Some(QFormat::Q6K),
            DType::F32 | DType::BF16 | DType::F16 => None,
        }
    }
    /// The dtype holding blocks of `f`.
    pub fn of_format(f: QFormat) -> DType {
        match f {
            QFormat::Q8_0 => DType::Q8_0,
            QFormat::Q4_0 => DType::Q4_0,
            QFormat::Q4_1 => DType::Q4_1,
            QFormat::Q5_0 => DType::Q5_0,
            QFormat::Q5_1 => DType::Q5_1,
            QFormat::Q2K => DType::Q2K,
            QFormat::Q3K => DType::Q3K,
            QFormat::Q4K => DType::Q4K,
            QFormat::Q5K => DType::Q5K,
            QFormat::Q6K => DType::Q6K,
        }
    }
    /// Bytes of `n` elements (for quantized formats `n` is a multiple of 32).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            DType::F32 => 4 * n,
            DType::BF16 | DType::F16 => 2 * n,
            _ => self.qformat().expect("quantized").row_bytes(n),
        }
    }
    /// Elements that must be kept together (a row length is a multiple of this).
    pub fn block_elems(self) -> usize {
        self.qformat().map_or(1, QFormat::block_elems)
    }
    /// The dtype a tensor stored as `src` is computed in under `--dtype native`: every
    /// source format has kernels, so each stays as it is (and memory-mapped).
    pub fn native_for(src: SourceDType) -> DType {
        match src {
            SourceDType::F32 => DType::F32,
            SourceDType::F16 => DType::F16,
            SourceDType::BF16 => DType::BF16,
            q => DType::of_format(q.qformat().expect("quantized")),
        }
    }
}

/// What `--dtype` asks for: every weight converted to one float dtype, or each kept in
/// the format the file stores it in (`native`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadDType {
    Native,
    To(DType),
}

impl LoadDType {
    pub fn name(self) -> &'static str {
        match self {
            LoadDType::Native => "native",
            LoadDType::To(d) => d.name(),
        }
    }
    /// The dtype a tensor stored as `src` is held in.
    pub fn resolve(self, src: SourceDType) -> DType {
        match self {
            LoadDType::Native => DType::native_for(src),
            LoadDType::To(d) => d,
        }
    }
}

impl From<DType> for LoadDType {
    fn from(d: DType) -> LoadDType {
        LoadDType::To(d)
    }
}

impl std::str::FromStr for LoadDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "native" => Ok(LoadDType::Native),
            "f32" => Ok(LoadDType::To(DType::F32)),
            "bf16" => Ok(LoadDType::To(DType::BF16)),
            "f16" => Ok(LoadDType::To(DType::F16)),
            _ => Err(format!(
                "unknown dtype '{s}' (expected native, f32, bf16 or f16)"
            )),
        }
    }
}

/// One 64-byte chunk: the unit of an aligned buffer.
#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Chunk([u8; 64]);

/// An owned byte buffer whose start is 64-byte aligned (a cache line, and an AVX-512 vector).
pub struct AlignedBuf {
    chunks: Vec<Chunk>,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf {
            chunks: vec![Chunk([0; 64]); len.div_ceil(64)],
            len,
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.chunks)[..self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.chunks)[..self.len]
    }
}

/// Where a tensor's bytes live.
enum Storage {
    Owned(AlignedBuf),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Owned(b) => b.bytes(),
            Storage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
}

/// A weight tensor `[rows, cols]` (a vector is `[1, n]`) in a compute dtype.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    storage: Storage,
}

impl Matrix {
    /// Takes `raw` as a `[rows, cols]` matrix in `dtype`: borrowed from the map when the
    /// file holds `dtype` at a suitable alignment, converted into an owned buffer otherwise.
    pub fn from_raw(raw: &RawTensor, rows: usize, cols: usize, dtype: DType) -> Result<Matrix> {
        check_shape(raw, rows, cols, dtype)?;
        let storage = if can_map(raw, dtype) {
            Storage::Mapped {
                map: Arc::clone(&raw.map),
                offset: raw.offset,
                len: raw.len,
            }
        } else {
            Storage::Owned(convert(raw, dtype))
        };
        Ok(Matrix {
            rows,
            cols,
            dtype,
            storage,
        })
    }

    /// An owned matrix from f32 values (tests, synthetic weights, repacked tensors);
    /// quantized dtypes quantize as ggml's reference quantizers do.
    pub fn from_f32(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        assert!(
            cols.is_multiple_of(dtype.block_elems()),
            "{cols} columns of {}",
            dtype.name()
        );
        let mut buf = AlignedBuf::zeroed(dtype.bytes_for(values.len()));
        encode_f32(values, dtype, buf.bytes_mut());
        Matrix {
            rows,
            cols,
            dtype,
            storage: Storage::Owned(buf),
        }
    }

    pub fn view(&self) -> WeightView<'_> {
        let b = self.storage.bytes();
        match self.dtype {
            DType::F32 => WeightView::F32(bytemuck::cast_slice(b)),
            DType::BF16 => WeightView::Bf16(bytemuck::cast_slice(b)),
            DType::F16 => WeightView::F16(bytemuck::cast_slice(b)),
            q => WeightView::Quant(q.qformat().expect("quantized"), b),
        }
    }

    /// Bytes the weights occupy (what a matvec reads).
    pub fn byte_len(&self) -> usize {
        self.storage.bytes().len()
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Drops the weights' pages from the RSS when they are a file's (a matrix the model
    /// holds in another layout too, whose rows are not read again): see
    /// [`crate::kernels::release_pages`].
    pub fn release_file_pages(&self) {
        if let Storage::Mapped { map, offset, len } = &self.storage {
            crate::kernels::release_pages(map, *offset, *len);
        }
    }

    /// Row `r` widened to f32.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        self.view().row_to_f32(r, self.cols, out)
    }

    /// All values widened to f32 (small tensors: norms).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_to_f32(r, &mut v[r * self.cols..(r + 1) * self.cols]);
        }
        v
    }
}

/// Writes `values` into `out` (exactly `dtype.bytes_for(values.len())` bytes) in `dtype`.
pub fn encode_f32(values: &[f32], dtype: DType, out: &mut [u8]) {
    assert_eq!(out.len(), dtype.bytes_for(values.len()));
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
        DType::BF16 => {
            for (d, &v) in out.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        DType::F16 => {
            for (d, &v) in out.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&f32_to_f16(v).to_le_bytes());
            }
        }
        q => quant::quantize(q.qformat().expect("quantized"), values, out),
    }
}

/// Converts a raw tensor into an owned buffer of `dtype`.
fn convert(raw: &RawTensor, dtype: DType) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(dtype.bytes_for(raw.numel()));
    convert_into(raw, dtype, buf.bytes_mut());
    buf
}

/// Converts `raw` into `out` (exactly `dtype.bytes_for(numel)` bytes, aligned for
/// `dtype`), 8192 elements at a time so the f32 intermediate stays small.
fn convert_into(raw: &RawTensor, dtype: DType, out: &mut [u8]) {
    let n = raw.numel();
    let bytes = raw.bytes();
    // A whole number of blocks (32 or 256 elements), in the source and in `dtype`.
    const STEP: usize = 8192;
    let mut tmp = vec![0f32; STEP];
    let mut done = 0;
    while done < n {
        let m = STEP.min(n - done);
        let b0 = raw.dtype.bytes_for(done).expect("validated size");
        let b1 = raw.dtype.bytes_for(done + m).expect("validated size");
        quant::dequantize(raw.dtype, &bytes[b0..b1], &mut tmp[..m]);
        let (o0, o1) = (dtype.bytes_for(done), dtype.bytes_for(done + m));
        encode_f32(&tmp[..m], dtype, &mut out[o0..o1]);
        done += m;
    }
}

/// Loads many weights at once: tensors already in the compute dtype stay in the file's
/// map; the rest are converted into ONE anonymous mapping advised for transparent huge
/// pages.
///
/// Why one arena: decode streams every weight once per token, and with 4 KiB pages the
/// hardware prefetcher stops at every page boundary and every page costs a TLB walk; a
/// single 2 MiB-page arena measured much faster than one small buffer per matrix (most
/// SmolLM2 matrices are under 2 MiB, too small for a huge page of their own).
#[derive(Default)]
pub struct WeightPlan {
    items: Vec<PlanItem>,
    arena_len: usize,
}

/// One tensor of a [`WeightPlan`]: the source, its `[rows, cols]` shape in the file, the
/// dtype it is held in, its arena offset (None: used in place), and whether it is held
/// transposed (`[cols, rows]`, input-major: see [`WeightPlan::add_transposed`]).
struct PlanItem {
    raw: RawTensor,
    rows: usize,
    cols: usize,
    dtype: DType,
    offset: Option<usize>,
    transposed: bool,
}

impl WeightPlan {
    /// Adds `raw` as a `[rows, cols]` matrix in `dtype`; returns its index in `finish`'s output.
    pub fn add(&mut self, raw: RawTensor, rows: usize, cols: usize, dtype: DType) -> Result<usize> {
        check_shape(&raw, rows, cols, dtype)?;
        let offset = if can_map(&raw, dtype) {
            None
        } else {
            Some(self.reserve(dtype.bytes_for(rows * cols)))
        };
        self.items.push(PlanItem {
            raw,
            rows,
            cols,
            dtype,
            offset,
            transposed: false,
        });
        Ok(self.items.len() - 1)
    }

    /// Adds `raw`, a `[rows, cols]` matrix in the file, to be held transposed as a
    /// `[cols, rows]` matrix in `dtype`, a float dtype or Q8_0 (input-major: row `i` holds
    /// input `i`'s weights for every output, which is what a column-sparse matvec reads).
    /// Always converted into the arena (a transpose cannot be used in place); values move
    /// through f32, so a float dtype that the file already holds is moved bit for bit, and
    /// Q8_0 is quantized again along the new rows (ggml's reference quantizer: the
    /// measured cost is in docs/sparsity.md, "Input sparsity on quantized weights").
    pub fn add_transposed(
        &mut self,
        raw: RawTensor,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<usize> {
        check_shape(&raw, cols, rows, DType::F32)?;
        if dtype.qformat().is_some() && dtype != DType::Q8_0 {
            return Err(raw.error(format!(
                "an input-major layout needs a float dtype (f32, bf16 or f16) or q8_0, not {}",
                dtype.name()
            )));
        }
        if !rows.is_multiple_of(dtype.block_elems()) {
            return Err(raw.error(format!(
                "held input-major, its rows of {rows} elements are not whole {}-element \
                 blocks of {}",
                dtype.block_elems(),
                dtype.name()
            )));
        }
        let offset = Some(self.reserve(dtype.bytes_for(rows * cols)));
        self.items.push(PlanItem {
            raw,
            rows,
            cols,
            dtype,
            offset,
            transposed: true,
        });
        Ok(self.items.len() - 1)
    }

    /// Reserves `len` bytes of the arena, 64-byte aligned; returns their offset.
    fn reserve(&mut self, len: usize) -> usize {
        let off = self.arena_len.next_multiple_of(64);
        self.arena_len = off + len;
        off
    }

    /// Converts what needs converting (split over the pool) and returns the matrices in
    /// the order they were added.
    pub fn finish(self, pool: &crate::kernels::ThreadPool) -> Result<Vec<Matrix>> {
        let arena = if self.arena_len > 0 {
            let mut map = memmap2::MmapMut::map_anon(self.arena_len).map_err(|e| {
                crate::error::Error::Input(format!(
                    "allocating {} bytes for the weights: {e}",
                    self.arena_len
                ))
            })?;
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            let items = &self.items;
            let base = crate::kernels::SharedBytes::new(&mut map);
            pool.run(&|t, threads| {
                for (i, it) in items.iter().enumerate() {
                    if let (Some(off), true) = (it.offset, i % threads == t) {
                        let raw = &it.raw;
                        // Each item owns a disjoint range of the arena.
                        let out = base.range(off, it.dtype.bytes_for(it.rows * it.cols));
                        if it.transposed {
                            convert_transposed_into(raw, it.rows, it.cols, it.dtype, out);
                        } else {
                            convert_into(raw, it.dtype, out);
                        }
                        // The source is not read again: drop its pages from the RSS.
                        crate::kernels::release_pages(&raw.map, raw.offset, raw.len);
                    }
                }
            });
            let ro = map.make_read_only().map_err(|e| {
                crate::error::Error::Input(format!("sealing the weight arena: {e}"))
            })?;
            Some(Arc::new(ro))
        } else {
            None
        };
        Ok(self
            .items
            .into_iter()
            .map(|it| {
                let PlanItem {
                    raw,
                    rows,
                    cols,
                    dtype,
                    offset: off,
                    transposed,
                } = it;
                let (rows, cols) = if transposed {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                let storage = match (off, &arena) {
                    (Some(off), Some(a)) => Storage::Mapped {
                        map: Arc::clone(a),
                        offset: off,
                        len: dtype.bytes_for(rows * cols),
                    },
                    // Read from the file: through a map of its own range, so that
                    // its faults map no page of a neighbour held elsewhere.
                    _ => {
                        let (map, offset) =
                            crate::kernels::file_submap(&raw.map, raw.offset, raw.len)
                                .map_or_else(|| (Arc::clone(&raw.map), raw.offset), |m| (m, 0));
                        Storage::Mapped {
                            map,
                            offset,
                            len: raw.len,
                        }
                    }
                };
                Matrix {
                    rows,
                    cols,
                    dtype,
                    storage,
                }
            })
            .collect())
    }
}

/// Converts `raw` (`[rows, cols]`) into `out` as its transpose (`[cols, rows]`) in
/// `dtype` (float, or Q8_0 when `rows` is whole blocks), through f32, 32 source rows at a
/// time: each output row then receives 32 consecutive values (one Q8_0 block), and the
/// f32 intermediate stays at 32 rows (a whole-matrix copy per converting thread would
/// raise the load's peak memory above the weights' own).
fn convert_transposed_into(
    raw: &RawTensor,
    rows: usize,
    cols: usize,
    dtype: DType,
    out: &mut [u8],
) {
    const STRIP: usize = 32;
    let bytes = raw.bytes();
    let src_row = raw.dtype.bytes_for(cols).expect("validated size");
    let out_row = dtype.bytes_for(rows);
    let mut strip = vec![0f32; STRIP * cols];
    let mut column = [0f32; STRIP];
    for r0 in (0..rows).step_by(STRIP) {
        let r1 = (r0 + STRIP).min(rows);
        let h = r1 - r0;
        quant::dequantize(
            raw.dtype,
            &bytes[r0 * src_row..r1 * src_row],
            &mut strip[..h * cols],
        );
        let (o0, o1) = (dtype.bytes_for(r0), dtype.bytes_for(r1));
        for (c, dst) in out.chunks_exact_mut(out_row).enumerate() {
            for (k, v) in column[..h].iter_mut().enumerate() {
                *v = strip[k * cols + c];
            }
            encode_f32(&column[..h], dtype, &mut dst[o0..o1]);
        }
    }
}

/// `dst = src^T`: `src` is `[rows, cols]` row-major, `dst` `[cols, rows]`; in 64 x 64
/// tiles so both sides stay in cache.
pub fn transpose_into<T: Copy>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    const B: usize = 64;
    assert!(src.len() == rows * cols && dst.len() == rows * cols);
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for r in r0..r1 {
                let row = &src[r * cols + c0..r * cols + c1];
                for (c, &v) in (c0..c1).zip(row) {
                    dst[c * rows + r] = v;
                }
            }
        }
    }
}

/// Whether `raw` can be used in place as `dtype`.
fn can_map(raw: &RawTensor, dtype: DType) -> bool {
    let (same, align) = match (raw.dtype, dtype) {
        (SourceDType::F32, DType::F32) => (true, 4),
        (SourceDType::BF16, DType::BF16) | (SourceDType::F16, DType::F16) => (true, 2),
        // Blocks are byte arrays: any address will do.
        (s, d) if s.qformat().is_some() && s.qformat() == d.qformat() => (true, 1),
        _ => (false, 1),
    };
    let aligned = (raw.map.as_ptr() as usize + raw.offset).is_multiple_of(align);
    same && aligned && cfg!(target_endian = "little")
}

/// Checks that `raw` holds a `[rows, cols]` matrix whose rows can be held in `dtype`.
fn check_shape(raw: &RawTensor, rows: usize, cols: usize, dtype: DType) -> Result<()> {
    if raw.numel() != rows * cols {
        return Err(raw.error(format!(
            "shape {:?} does not hold a [{rows}, {cols}] matrix",
            raw.shape
        )));
    }
    if !cols.is_multiple_of(dtype.block_elems()) {
        return Err(raw.error(format!(
            "rows of {cols} elements are not whole {}-element blocks of {}",
            dtype.block_elems(),
            dtype.name()
        )));
    }
    Ok(())
}
