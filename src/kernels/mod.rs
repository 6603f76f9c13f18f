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
pub mod linear;
pub mod ops;
pub mod pool;
pub mod sparse;

pub use linear::{WeightView, matmul, matvec};
pub use pool::ThreadPool;
