//! The only place with `unsafe`: SIMD kernels with runtime dispatch, their scalar
//! references, the thread pool, and memory-mapping.

use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Memory-maps a whole file read-only.
pub fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; model files are inputs nobody writes while we run
    // (the same contract every mmap-ing engine has). A file truncated underneath us
    // would fault, which no safe API can prevent.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(map))
}

pub mod attention;
pub mod dot;
pub mod gemm_avx512;
pub mod linear;
pub mod ops;
pub mod pool;
pub mod qdot;
pub mod sparse;

pub use linear::{WeightView, matmul, matvec, matvec_blocks};
pub use pool::ThreadPool;

/// A byte buffer that the pool's threads fill in disjoint ranges.
pub struct SharedBytes {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: threads only obtain disjoint ranges (the caller's contract on `range`).
unsafe impl Sync for SharedBytes {}

impl SharedBytes {
    pub fn new(buf: &mut [u8]) -> SharedBytes {
        SharedBytes {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// The sub-slice `offset..offset + len`. Callers on different threads must ask for
    /// disjoint ranges, and the buffer must outlive the returned slice.
    #[allow(clippy::mut_from_ref)]
    pub fn range(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "range outside the buffer"
        );
        // SAFETY: in bounds (asserted); exclusive because callers use disjoint ranges
        // while the owner of the buffer is blocked in `ThreadPool::run`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

/// A read-only anonymous map holding a copy of `bytes`: lets code that takes a file's map
/// (the loaders) run on bytes in memory (fuzzing, tests).
pub fn map_bytes(bytes: &[u8]) -> Result<Arc<Mmap>> {
    let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1))
        .map_err(|e| Error::Input(format!("allocating {} bytes: {e}", bytes.len())))?;
    m[..bytes.len()].copy_from_slice(bytes);
    let ro = m
        .make_read_only()
        .map_err(|e| Error::Input(format!("sealing a map: {e}")))?;
    Ok(Arc::new(ro))
}

/// A raw output pointer shared across the pool's threads, each of which writes a disjoint
/// part of the buffer (rows, columns or heads: see each use).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: only used to write disjoint ranges from different threads, while the owner of
// the buffer waits in `ThreadPool::run`.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the Sync wrapper, not the raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Deterministic test inputs shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_data {
    /// `n` values in [-1, 1) from a seeded xorshift.
    pub fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}
