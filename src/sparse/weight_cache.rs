//! The per-layer weight cache: the active neurons' weights copied into compact,
//! 64-byte-aligned buffers so the sparse kernel reads whole contiguous rows, kept equal to
//! the current mask by differential updates (paired replacement).
//!
//! Slot `s` holds neuron `neuron_of[s]`: its gate row and up row side by side in one
//! `[2*hidden]` block (padded to a multiple of 64 bytes), and its down column (a row of
//! the transposed down projection, `[hidden]`, padded likewise). Buffers are in the
//! model's dtype (f32, bf16, f16, or a quantized block format: rows are whole blocks). At density D the cache holds about D·3·hidden·inter values
//! per layer on top of the model's weights (less when only down rows are cached, for the
//! exact and cascade scorers, which compute g and u themselves).

use crate::kernels::WeightView;
use crate::kernels::sparse::{Activation, Strided};
use crate::tensor::DType;

/// A zeroed buffer in its own anonymous mapping, advised for transparent huge pages
/// (page-aligned, so 64-byte aligned). Streaming a buffer of 4 KiB pages costs a TLB
/// walk per page and stops the hardware prefetcher at every page boundary; the model's
/// weights live in such a mapping for the same reason. Pages are committed on first
/// touch, so a large reservation that is only partly used costs only what is touched.
pub struct HugeBuf {
    map: Option<memmap2::MmapMut>,
}

impl HugeBuf {
    /// `len` zero bytes. Panics when the system refuses the mapping (out of memory).
    pub fn zeroed(len: usize) -> HugeBuf {
        if len == 0 {
            return HugeBuf { map: None };
        }
        let map = memmap2::MmapMut::map_anon(len)
            .unwrap_or_else(|e| panic!("mapping {len} bytes for sparse weights: {e}"));
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        HugeBuf { map: Some(map) }
    }
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

/// An owned row-major `[rows, cols]` matrix in a [`HugeBuf`] (the transposed down
/// projections).
pub struct HugeMatrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    buf: HugeBuf,
}

impl HugeMatrix {
    pub fn zeroed(rows: usize, cols: usize, dtype: DType) -> HugeMatrix {
        HugeMatrix {
            rows,
            cols,
            dtype,
            buf: HugeBuf::zeroed(dtype.bytes_for(rows * cols)),
        }
    }
    pub fn view(&self) -> WeightView<'_> {
        view(&self.buf, self.dtype, self.rows * self.cols)
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.bytes_mut()
    }
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.rows * self.cols)
    }
}

/// The dtype the transposed down projection (and the cache's down rows) is held in for a
/// model whose MLP weights are in `dtype`. A quantized down projection's blocks run along
/// the neurons, so one neuron's down column is not a whole block: it is repacked
/// neuron-major and re-quantized to Q8_0 (8 bits keep the second rounding small next to
/// the 4-bit original's). Float dtypes stay as they are: a transpose moves their values
/// bit for bit (f16 keeps half the bytes of f32 per cached row, read by the f16 axpy).
pub fn down_t_dtype(dtype: DType) -> DType {
    if dtype.qformat().is_some() {
        DType::Q8_0
    } else {
        dtype
    }
}

/// Marks a neuron without a slot.
const NONE: u32 = u32::MAX;

/// The full weights rows are copied from: gate and up `[inter, hidden]`, and the down
/// projection transposed, `[inter, hidden]` (row i = neuron i's down column).
#[derive(Clone, Copy)]
pub struct CacheSource<'a> {
    pub gate: WeightView<'a>,
    pub up: WeightView<'a>,
    pub down_t: WeightView<'a>,
    pub hidden: usize,
}

/// How [`WeightCache::update_with`] reaches the new mask (all end in the same set of
/// rows; they differ in rows copied). `Paired` is what decoding uses; the others exist
/// for the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStrategy {
    /// Copy each added neuron over a removed one's slot; append / swap-remove the rest.
    Paired,
    /// Swap-remove every removed neuron, then append every added one.
    RemoveThenAppend,
    /// Forget everything and copy the whole mask.
    Rebuild,
}

/// One layer's cache of active rows.
pub struct WeightCache {
    hidden: usize,
    /// Of the gate/up rows.
    dtype: DType,
    /// Of the down rows: [`down_t_dtype`]`(dtype)`.
    down_dtype: DType,
    with_gate_up: bool,
    /// Elements per slot in `gu` (>= 2*hidden) and in `down` (>= hidden).
    gu_stride: usize,
    down_stride: usize,
    /// Room for every neuron (`inter` slots), reserved once: pages are committed as slots
    /// are first used, so growth never copies and never faults in the middle of a stream.
    gu: HugeBuf,
    down: HugeBuf,
    capacity: usize,
    /// The most slots ever used (what the buffers have committed).
    high_water: usize,
    slot_of: Vec<u32>,
    neuron_of: Vec<u32>,
    /// The mask the cache holds, as a bitset over neurons.
    bits: Vec<u64>,
    new_bits: Vec<u64>,
    added: Vec<u32>,
    removed: Vec<u32>,
    /// Neurons whose rows were copied (into a slot or moved between slots) since creation.
    pub rows_copied: u64,
}

/// Rounds `n` float elements up to a whole number of 64-byte lines. Quantized rows (whole
/// blocks of 18, 20 or 34 bytes) stay as they are: their loads are unaligned anyway.
fn pad_to_line(n: usize, dtype: DType) -> usize {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => {
            let size = dtype.bytes_for(1);
            (n * size).div_ceil(64) * 64 / size
        }
        _ => n,
    }
}

impl WeightCache {
    /// An empty cache for a layer with `inter` neurons of width `hidden`. `with_gate_up`:
    /// also cache gate/up rows (not needed when g and u are computed elsewhere).
    /// `dtype` is the gate/up rows' (the model's) dtype; down rows are in
    /// [`down_t_dtype`]`(dtype)`, as the transposed down projection they are copied from.
    pub fn new(hidden: usize, inter: usize, dtype: DType, with_gate_up: bool) -> WeightCache {
        let down_dtype = down_t_dtype(dtype);
        WeightCache {
            hidden,
            dtype,
            down_dtype,
            with_gate_up,
            gu_stride: if with_gate_up {
                pad_to_line(2 * hidden, dtype)
            } else {
                0
            },
            down_stride: pad_to_line(hidden, down_dtype),
            gu: HugeBuf::zeroed(0),
            down: HugeBuf::zeroed(0),
            capacity: 0,
            high_water: 0,
            slot_of: vec![NONE; inter],
            neuron_of: Vec::new(),
            bits: vec![0; inter.div_ceil(64)],
            new_bits: vec![0; inter.div_ceil(64)],
            added: Vec::new(),
            removed: Vec::new(),
            rows_copied: 0,
        }
    }

    /// Active neurons (slots in use).
    pub fn len(&self) -> usize {
        self.neuron_of.len()
    }
    pub fn is_empty(&self) -> bool {
        self.neuron_of.is_empty()
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Neuron held by each slot.
    pub fn neurons(&self) -> &[u32] {
        &self.neuron_of
    }
    /// The slot of `neuron`, if cached.
    pub fn slot_of(&self, neuron: usize) -> Option<usize> {
        match self.slot_of[neuron] {
            NONE => None,
            s => Some(s as usize),
        }
    }
    pub fn has_gate_up(&self) -> bool {
        self.with_gate_up
    }
    /// Gate/up blocks of the used slots: slot s at `[s*stride .. s*stride + 2*hidden]`
    /// (gate first). Empty without gate/up.
    pub fn gate_up(&self) -> (WeightView<'_>, usize) {
        (
            view(&self.gu, self.dtype, self.len() * self.gu_stride),
            self.gu_stride,
        )
    }
    /// Down rows of the used slots: slot s at `[s*stride .. s*stride + hidden]`.
    pub fn down(&self) -> (WeightView<'_>, usize) {
        (
            view(&self.down, self.down_dtype, self.len() * self.down_stride),
            self.down_stride,
        )
    }
    /// The used slots' gate and up rows as the sparse kernel computes activations from.
    pub fn activation(&self) -> Activation<'_> {
        let (view, stride) = self.gate_up();
        Activation::Compute {
            gate: Strided {
                view,
                stride,
                offset: 0,
            },
            up: Strided {
                view,
                stride,
                offset: self.hidden,
            },
        }
    }
    /// The used slots' down rows as the sparse kernel reads them.
    pub fn down_rows(&self) -> Strided<'_> {
        let (view, stride) = self.down();
        Strided {
            view,
            stride,
            offset: 0,
        }
    }
    /// Bytes the buffers have committed (the most slots ever used; the reservation of
    /// untouched slots costs address space only).
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.high_water * self.gu_stride)
            + self
                .down_dtype
                .bytes_for(self.high_water * self.down_stride)
    }

    /// How many neurons of `mask` are not cached (the rows an update would copy).
    pub fn missing(&self, mask: &[u32]) -> usize {
        mask.iter()
            .filter(|&&n| self.slot_of[n as usize] == NONE)
            .count()
    }

    /// The slot of each neuron of `mask`, in mask order, into `out` (every neuron must
    /// be cached: call after [`update`](Self::update) with the same mask).
    pub fn slots_of(&self, mask: &[u32], out: &mut Vec<u32>) {
        out.clear();
        out.extend(mask.iter().map(|&n| {
            let s = self.slot_of[n as usize];
            assert!(s != NONE, "neuron {n} is not cached");
            s
        }));
    }

    /// Brings the cache to hold exactly `mask` (neuron indices, each < inter, no
    /// duplicates) by paired replacement.
    pub fn update(&mut self, src: &CacheSource<'_>, mask: &[u32]) {
        self.update_with(src, mask, UpdateStrategy::Paired)
    }

    /// As [`update`](Self::update), with a chosen strategy.
    pub fn update_with(&mut self, src: &CacheSource<'_>, mask: &[u32], strategy: UpdateStrategy) {
        debug_assert_eq!(src.hidden, self.hidden);
        self.new_bits.iter_mut().for_each(|w| *w = 0);
        for &n in mask {
            self.new_bits[n as usize / 64] |= 1 << (n % 64);
        }
        if strategy == UpdateStrategy::Rebuild {
            for &n in &self.neuron_of {
                self.slot_of[n as usize] = NONE;
            }
            self.neuron_of.clear();
            self.bits.iter_mut().for_each(|w| *w = 0);
        }
        // removed = old \ new, added = new \ old, from the bitsets (ascending order).
        self.added.clear();
        self.removed.clear();
        for (w, (&old, &new)) in self.bits.iter().zip(&self.new_bits).enumerate() {
            push_bits(&mut self.added, w, new & !old);
            push_bits(&mut self.removed, w, old & !new);
        }
        let added = std::mem::take(&mut self.added);
        let removed = std::mem::take(&mut self.removed);
        let pairs = if strategy == UpdateStrategy::Paired {
            added.len().min(removed.len())
        } else {
            0
        };
        for (&a, &r) in added[..pairs].iter().zip(&removed[..pairs]) {
            let slot = self.slot_of[r as usize];
            self.slot_of[r as usize] = NONE;
            self.write_slot(src, slot as usize, a as usize);
            self.slot_of[a as usize] = slot;
            self.neuron_of[slot as usize] = a;
        }
        for &r in &removed[pairs..] {
            self.swap_remove(r as usize);
        }
        let extra = added.len() - pairs;
        self.reserve(self.len() + extra);
        for &a in &added[pairs..] {
            let slot = self.neuron_of.len();
            self.neuron_of.push(a);
            self.slot_of[a as usize] = slot as u32;
            self.write_slot(src, slot, a as usize);
        }
        self.added = added;
        self.removed = removed;
        std::mem::swap(&mut self.bits, &mut self.new_bits);
    }

    /// Makes room for `slots` slots: the first call reserves every neuron's slot (address
    /// space only); never shrinks, never copies.
    fn reserve(&mut self, slots: usize) {
        self.high_water = self.high_water.max(slots);
        if slots <= self.capacity {
            return;
        }
        let cap = self.slot_of.len();
        assert!(slots <= cap, "more slots than neurons");
        for (buf, stride, dt) in [
            (&mut self.gu, self.gu_stride, self.dtype),
            (&mut self.down, self.down_stride, self.down_dtype),
        ] {
            let mut nb = HugeBuf::zeroed(dt.bytes_for(cap * stride));
            let used = dt.bytes_for(self.neuron_of.len() * stride);
            nb.bytes_mut()[..used].copy_from_slice(&buf.bytes()[..used]);
            *buf = nb;
        }
        self.capacity = cap;
    }

    /// Removes `neuron`, filling its slot with the last one.
    fn swap_remove(&mut self, neuron: usize) {
        let slot = self.slot_of[neuron] as usize;
        let last = self.neuron_of.len() - 1;
        if slot != last {
            for (buf, stride, dt) in [
                (&mut self.gu, self.gu_stride, self.dtype),
                (&mut self.down, self.down_stride, self.down_dtype),
            ] {
                let b = dt.bytes_for(stride);
                buf.bytes_mut()
                    .copy_within(last * b..(last + 1) * b, slot * b);
            }
            let moved = self.neuron_of[last];
            self.neuron_of[slot] = moved;
            self.slot_of[moved as usize] = slot as u32;
            self.rows_copied += 1;
        }
        self.neuron_of.pop();
        self.slot_of[neuron] = NONE;
    }

    /// Copies neuron `n`'s gate, up and down rows into `slot`.
    fn write_slot(&mut self, src: &CacheSource<'_>, slot: usize, n: usize) {
        let (h, dt) = (self.hidden, self.dtype);
        let row = dt.bytes_for(h);
        if self.with_gate_up {
            let b = dt.bytes_for(slot * self.gu_stride);
            let dst = &mut self.gu.bytes_mut()[b..b + 2 * row];
            let (dg, du) = dst.split_at_mut(row);
            copy_row(src.gate, n, h, dg);
            copy_row(src.up, n, h, du);
        }
        let (dd, b) = (
            self.down_dtype,
            self.down_dtype.bytes_for(slot * self.down_stride),
        );
        let row = dd.bytes_for(h);
        copy_row(src.down_t, n, h, &mut self.down.bytes_mut()[b..b + row]);
        self.rows_copied += 1;
    }
}

fn push_bits(out: &mut Vec<u32>, word: usize, mut bits: u64) {
    while bits != 0 {
        out.push((word * 64) as u32 + bits.trailing_zeros());
        bits &= bits - 1;
    }
}

fn copy_row(src: WeightView<'_>, row: usize, cols: usize, dst: &mut [u8]) {
    match src {
        WeightView::F32(w) => {
            dst.copy_from_slice(bytemuck::cast_slice(&w[row * cols..(row + 1) * cols]))
        }
        WeightView::Bf16(w) => {
            dst.copy_from_slice(bytemuck::cast_slice(&w[row * cols..(row + 1) * cols]))
        }
        WeightView::F16(w) => {
            dst.copy_from_slice(bytemuck::cast_slice(&w[row * cols..(row + 1) * cols]))
        }
        WeightView::Quant(_, w) => dst.copy_from_slice(&w[row * dst.len()..(row + 1) * dst.len()]),
    }
}

fn view(buf: &HugeBuf, dtype: DType, elems: usize) -> WeightView<'_> {
    if elems == 0 {
        // An unmapped buffer's empty slice need not be aligned for the element type.
        return match dtype {
            DType::F32 => WeightView::F32(&[]),
            DType::BF16 => WeightView::Bf16(&[]),
            DType::F16 => WeightView::F16(&[]),
            q => WeightView::Quant(q.qformat().expect("quantized"), &[]),
        };
    }
    let b = &buf.bytes()[..dtype.bytes_for(elems)];
    match dtype {
        DType::F32 => WeightView::F32(bytemuck::cast_slice(b)),
        DType::BF16 => WeightView::Bf16(bytemuck::cast_slice(b)),
        DType::F16 => WeightView::F16(bytemuck::cast_slice(b)),
        q => WeightView::Quant(q.qformat().expect("quantized"), b),
    }
}
