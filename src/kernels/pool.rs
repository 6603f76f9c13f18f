//! A persistent thread pool for row-split kernels.
//!
//! Decode issues a few hundred small parallel operations per token; spawning threads or
//! going through a work-stealing scheduler for each costs more than the operation. Workers
//! here wait for the next job by spinning briefly (jobs within a token follow each other
//! within microseconds) and then parking, so an idle pool does not burn a core (a spinning
//! worker halves speed on a 2-core host).

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// A job: called once per thread with (thread index, thread count).
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

struct Shared {
    /// Incremented for every job; workers run a job when they see a new value.
    generation: AtomicU64,
    /// The current job, as a fat pointer boxed behind a thin one.
    job: AtomicPtr<&'static Job<'static>>,
    /// Workers still running the current job.
    pending: AtomicUsize,
    /// The thread that posted the job, unparked by the last worker to finish.
    caller: Mutex<Option<Thread>>,
    shutdown: std::sync::atomic::AtomicBool,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    /// Serialises callers: one job at a time.
    lock: Mutex<()>,
}

/// How long a worker (or the caller) spins before parking.
const SPIN: Duration = Duration::from_micros(50);

impl ThreadPool {
    /// A pool that runs jobs on `threads` threads: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            caller: Mutex::new(None),
            shutdown: std::sync::atomic::AtomicBool::new(false),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let handle = thread::Builder::new()
                    .name(format!("sparsellm-{index}"))
                    .spawn(move || worker(shared, index, threads))
                    .expect("spawning a worker thread");
                let t = handle.thread().clone();
                (handle, t)
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            lock: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(thread_index, threads)` on every thread of the pool and returns when all
    /// have finished.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        if n == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        *self.shared.caller.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::current());
        // SAFETY: the job is only used by workers between the generation bump below and
        // `pending` reaching zero, which this function waits for before returning (and
        // before `job` goes out of scope); so the borrow outlives every use despite the
        // 'static lifetime written here.
        let job: &'static Job<'static> =
            unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(f) };
        let slot: *const &'static Job<'static> = &job;
        self.shared.pending.store(n - 1, Ordering::Release);
        self.shared.job.store(slot as *mut _, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        for (_, t) in &self.workers {
            t.unpark();
        }
        f(0, n);
        let start = Instant::now();
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::park_timeout(Duration::from_millis(1));
            }
        }
        self.shared
            .job
            .store(std::ptr::null_mut(), Ordering::Release);
    }

    /// Splits `0..len` into contiguous ranges, one per thread, each a multiple of `align`
    /// (except the last), and runs `f(range)` on each.
    pub fn for_ranges(
        &self,
        len: usize,
        align: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        if len == 0 {
            return;
        }
        let n = self.threads();
        if n == 1 || len <= align {
            f(0..len);
            return;
        }
        self.run(&|i, n| {
            let r = split_range(len, align, i, n);
            if !r.is_empty() {
                f(r);
            }
        });
    }
}

/// The `i`-th of `n` contiguous parts of `0..len`, part boundaries multiples of `align`.
pub fn split_range(len: usize, align: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let start = (units * i / n * align).min(len);
    let end = (units * (i + 1) / n * align).min(len);
    start..end
}

fn worker(shared: Arc<Shared>, index: usize, threads: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::park_timeout(Duration::from_millis(10));
            }
        }
        let job = shared.job.load(Ordering::Acquire);
        if !job.is_null() {
            // SAFETY: the caller keeps the job alive until `pending` reaches zero (see `run`).
            let f: &Job<'static> = unsafe { *job };
            f(index, threads);
        }
        if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(t) = shared
                .caller
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
        {
            t.unpark();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for (h, t) in self.workers.drain(..) {
            t.unpark();
            let _ = h.join();
        }
    }
}

static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();

/// Sets the global pool's size; only the first call (or first use) decides.
pub fn init_global(threads: usize) -> &'static ThreadPool {
    GLOBAL.get_or_init(|| ThreadPool::new(threads))
}

/// The global pool: sized by `init_global`, else by the number of physical cores.
pub fn global() -> &'static ThreadPool {
    GLOBAL.get_or_init(|| ThreadPool::new(default_threads()))
}

/// Physical cores (the `--threads` default): logical CPUs, halved when SMT siblings are
/// listed in sysfs.
pub fn default_threads() -> usize {
    let logical = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let smt = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
        .map(|s| s.trim().split([',', '-']).count().max(1))
        .unwrap_or(1);
    (logical / smt).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            let mask = AtomicUsize::new(0);
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits.fetch_add(1, Ordering::Relaxed);
                mask.fetch_or(1 << i, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 3);
            assert_eq!(mask.load(Ordering::Relaxed), 0b111);
        }
    }

    #[test]
    fn ranges_cover_exactly() {
        for len in [0, 1, 5, 31, 32, 33, 1000] {
            for n in 1..5 {
                let mut covered = vec![0u8; len];
                for i in 0..n {
                    for j in split_range(len, 8, i, n) {
                        covered[j] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "len {len} n {n}");
            }
        }
    }
}
