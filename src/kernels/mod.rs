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
    let map = Arc::new(map);
    register_file_map(&map, Arc::new(file), 0);
    Ok(map)
}

/// A map of `map[offset..offset + len]` alone, when `map` is a file map from [`map_file`]
/// (`None` for other maps, an empty range, or when the system refuses). A tensor read
/// through its own map faults in its own pages only: read through the whole file's map,
/// each fault also maps the file's cached pages around it (64 KiB of fault-around, or a
/// whole large folio), which include pages of neighbouring tensors the model holds
/// elsewhere (repacked or converted), and those would count in the RSS a second time.
pub fn file_submap(map: &Arc<Mmap>, offset: usize, len: usize) -> Option<Arc<Mmap>> {
    if len == 0 || offset.checked_add(len).is_none_or(|e| e > map.len()) {
        return None;
    }
    let (file, base) = {
        let maps = FILE_MAPS.lock().unwrap_or_else(|e| e.into_inner());
        let entry = maps
            .iter()
            .find(|e| std::ptr::eq(e.map.as_ptr(), Arc::as_ptr(map)))?;
        (Arc::clone(&entry.file), entry.file_offset)
    };
    let file_offset = base.checked_add(offset as u64)?;
    // SAFETY: as in `map_file`: a read-only map of a model file nobody writes while we
    // run; the range lies inside the file (it lies inside `map`, a map of that file).
    let sub = unsafe {
        memmap2::MmapOptions::new()
            .offset(file_offset)
            .len(len)
            .map(&*file)
    }
    .ok()?;
    let sub = Arc::new(sub);
    register_file_map(&sub, file, file_offset);
    Some(sub)
}

fn register_file_map(map: &Arc<Mmap>, file: Arc<std::fs::File>, file_offset: u64) {
    let mut maps = FILE_MAPS.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|e| e.map.strong_count() > 0);
    maps.push(FileMap {
        map: Arc::downgrade(map),
        file,
        file_offset,
    });
}

/// A map made by [`map_file`] or [`file_submap`]: the file it maps, from `file_offset`.
struct FileMap {
    /// Weak: the registry keeps no map alive. A live `Arc` equal to a registered pointer
    /// is that map: a dead entry still holds its allocation, so no other map can take
    /// its address.
    map: std::sync::Weak<Mmap>,
    file: Arc<std::fs::File>,
    file_offset: u64,
}

static FILE_MAPS: std::sync::Mutex<Vec<FileMap>> = std::sync::Mutex::new(Vec::new());

/// Drops the pages of `map[offset..offset + len]` from this process's resident memory
/// when `map` is a file map from [`map_file`] or [`file_submap`] (tensors converted at
/// load are read once: keeping their source pages would count the model twice in the peak
/// RSS). Later reads fault the pages back in from the page cache. Anonymous maps are left
/// alone (dropping their pages would zero them). Best effort: errors are ignored.
pub fn release_pages(map: &Arc<Mmap>, offset: usize, len: usize) {
    let is_file = FILE_MAPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|e| std::ptr::eq(e.map.as_ptr(), Arc::as_ptr(map)));
    #[cfg(unix)]
    if is_file && offset.checked_add(len).is_some_and(|e| e <= map.len()) {
        // SAFETY: the map is a read-only mapping of a file (registered by map_file), so
        // MADV_DONTNEED only drops resident pages: the next access re-reads the same bytes
        // from the page cache; no reference into the map observes any change. The range
        // is inside the map (checked).
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (is_file, offset, len);
}

pub mod attention;
pub mod dot;
pub mod f16;
pub mod gemm_avx512;
pub mod input_major;
pub mod linear;
pub mod ops;
pub mod pool;
pub mod qcols;
pub mod qdot;
pub mod sparse;

pub use linear::{
    WeightView, matmul, matmul_many, matmul_many_per_token, matmul_per_token, matvec, matvec_blocks,
};
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

/// Deterministic test inputs shared by the kernels' tests, the examples and the
/// benchmarks (not part of the engine's API).
#[doc(hidden)]
pub mod test_data {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let bytes: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("sparsellm-release-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let file_map = map_file(&path).unwrap();
        let anon_map = map_bytes(&bytes).unwrap();
        for map in [&file_map, &anon_map] {
            assert_eq!(&map[..], &bytes[..]);
            release_pages(map, 4000, 5000);
            release_pages(map, 0, map.len());
            release_pages(map, map.len(), 1); // out of range: ignored
            assert_eq!(&map[..], &bytes[..], "contents survive");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_submap_holds_exactly_its_range() {
        let bytes: Vec<u8> = (0..5 * 4096 + 77).map(|i| (i * 13 % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("sparsellm-submap-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let file_map = map_file(&path).unwrap();
        // Unaligned starts, a range crossing pages, the last byte, a sub-range of a submap.
        for (offset, len) in [
            (0, 1),
            (4095, 2),
            (1234, 3 * 4096 + 5),
            (bytes.len() - 1, 1),
        ] {
            let sub = file_submap(&file_map, offset, len).expect("a file map's range");
            assert_eq!(&sub[..], &bytes[offset..offset + len]);
            release_pages(&sub, 0, len);
            assert_eq!(&sub[..], &bytes[offset..offset + len], "contents survive");
            if len > 2 {
                let inner = file_submap(&sub, 1, len - 2).expect("a submap's range");
                assert_eq!(&inner[..], &bytes[offset + 1..offset + len - 1]);
            }
        }
        // Empty and out-of-range requests, and maps of no file, have no submap.
        assert!(file_submap(&file_map, 10, 0).is_none());
        assert!(file_submap(&file_map, bytes.len() - 1, 2).is_none());
        assert!(file_submap(&file_map, usize::MAX, 2).is_none());
        assert!(file_submap(&map_bytes(&bytes).unwrap(), 0, 10).is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
