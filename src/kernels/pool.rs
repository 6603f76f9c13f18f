//! A persistent thread pool for row-split kernels.
//!
//! Decode issues a few hundred small parallel operations per token; spawning threads or
//! going through a work-stealing scheduler for each costs more than the operation. Workers
//! here wait for the next job by spinning briefly (jobs within a token follow each other
//! within microseconds) and then parking, so an idle pool does not burn a core (a spinning
//! worker halves speed on a 2-core host).
//!
//! Two kinds of job:
//! - [`ThreadPool::for_chunks`] (and [`ThreadPool::for_ranges`] on top of it): a job cut
//!   into numbered chunks that the caller and the workers claim one at a time from a shared
//!   counter. The caller works too, and waits only for chunks a worker has actually
//!   claimed: a worker that the OS has not scheduled yet (another process holds its core)
//!   does not hold the job up, it simply takes fewer chunks or none. Which thread runs a
//!   chunk never changes what the chunk computes, so results do not depend on timing.
//! - [`ThreadPool::run`]: every thread runs the job once with its own index, and the
//!   caller waits for all of them (for jobs whose threads wait for each other).
//!
//! Dynamic chunks alone do not make two threads on a shared core as fast as one thread
//! alone: a worker descheduled while it holds a chunk holds the job for a time slice of
//! the competing process (milliseconds), and two threads sharing a core spin on each
//! other's time. So chunked jobs adapt (unless [`ThreadPool::set_adaptive`] turns it off):
//! - they run on as many threads as other processes leave cores free, measured every
//!   200 ms from /proc/stat (`Others`; Linux): with another process busy on one core of
//!   two, the caller runs them alone, at one thread's speed;
//! - after a stall (the caller waited for a claimed chunk longer than it worked, and over
//!   300 us: [`Lag`]) the caller runs them alone for 20 ms, doubling while stalls keep
//!   coming back soon after (up to 1 s).
//!
//! An idle machine has no other load and no stalls, so it keeps every thread. `run` jobs
//! always use every thread (prefill's packed GEMM, whose threads wait for each other).

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// A job: called with (thread index, thread count) by [`ThreadPool::run`], with (chunk
/// index, chunk count) by [`ThreadPool::for_chunks`].
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// The current job's ticket, one atomic word: the generation (bits 32..64, a new value per
/// job), a flag for `run` jobs (bit 31), and for chunked jobs the chunk count (bits
/// 16..31) and the next chunk to claim (bits 0..16). Workers claim a chunk with a
/// compare-exchange of the whole word, so a claim can only succeed on the job it was meant
/// for, while that job is still running.
mod ticket {
    pub const BROADCAST: u64 = 1 << 31;
    /// Most chunks in one job (15 bits).
    pub const MAX_CHUNKS: usize = (1 << 15) - 1;
    pub fn gen_of(t: u64) -> u32 {
        (t >> 32) as u32
    }
    pub fn chunked(generation: u32, chunks: usize) -> u64 {
        debug_assert!(chunks <= MAX_CHUNKS);
        ((generation as u64) << 32) | ((chunks as u64) << 16)
    }
    pub fn broadcast(generation: u32) -> u64 {
        ((generation as u64) << 32) | BROADCAST
    }
    pub fn is_broadcast(t: u64) -> bool {
        t & BROADCAST != 0
    }
    /// (chunk count, next chunk) of a chunked ticket.
    pub fn chunks(t: u64) -> (usize, usize) {
        (((t >> 16) & 0x7fff) as usize, (t & 0xffff) as usize)
    }
}

struct Shared {
    ticket: AtomicU64,
    /// The current job, as a fat pointer boxed behind a thin one.
    job: AtomicPtr<&'static Job<'static>>,
    /// `run` jobs: workers still running the job.
    pending: AtomicUsize,
    /// Chunked jobs: chunks finished.
    done: AtomicUsize,
    /// Chunked jobs: threads taking part (workers with a higher index leave them alone).
    active: AtomicUsize,
    /// The thread that posted the job, unparked by the worker that finishes it.
    caller: Mutex<Option<Thread>>,
    shutdown: AtomicBool,
    /// Tests: a delay (microseconds) that makes workers late or slow; see
    /// [`ThreadPool::slow_workers`].
    #[cfg(test)]
    delay_us: AtomicU64,
}

impl Shared {
    #[cfg(test)]
    fn test_delay(&self) {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            thread::sleep(Duration::from_micros(us));
        }
    }

    fn unpark_caller(&self) {
        if let Some(t) = self
            .caller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            t.unpark();
        }
    }

    /// Claims and runs chunks of the chunked job whose ticket was `t` until none are left
    /// (or the job is no longer current). Returns how many this thread ran.
    fn work_chunks(&self, mut t: u64, is_caller: bool) -> usize {
        let generation = ticket::gen_of(t);
        let mut ran = 0;
        loop {
            let (chunks, next) = ticket::chunks(t);
            if ticket::gen_of(t) != generation || ticket::is_broadcast(t) || next >= chunks {
                return ran;
            }
            match self
                .ticket
                .compare_exchange_weak(t, t + 1, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => {
                    let job = self.job.load(Ordering::Acquire);
                    // SAFETY: chunk `next` of this job is now ours, and the caller does not
                    // return (nor replace `job`) before `done` counts it; it stored `job`
                    // before publishing the ticket we just claimed from (Release/Acquire).
                    let f: &Job<'static> = unsafe { *job };
                    #[cfg(test)]
                    if !is_caller && ran == 0 && generation.is_multiple_of(2) {
                        // A worker descheduled while holding a chunk.
                        self.test_delay();
                    }
                    f(next, chunks);
                    ran += 1;
                    if self.done.fetch_add(1, Ordering::AcqRel) + 1 == chunks && !is_caller {
                        self.unpark_caller();
                    }
                    t = self.ticket.load(Ordering::Acquire);
                }
                Err(now) => t = now,
            }
        }
    }
}

/// Stall detection for chunked jobs. A stall: the caller, having run out of chunks to
/// claim, waited for a worker's claimed chunk longer than [`Lag::STALL`] and longer than
/// it worked on the job itself (the worker was descheduled mid-chunk). A stall now and
/// then (an idle machine has a few per second, of about 1 ms) costs less than giving up
/// the worker, which halves the speed; stalls that take a large share of the time (a
/// competing process: one per time slice, milliseconds each) cost more. So stalls fill
/// a leaky bucket (their waits in, [`Lag::LEAK`] of the time out); when it holds
/// [`Lag::BUCKET`], chunked jobs run on the caller alone for a serial period, of
/// [`Lag::START`], doubled (up to [`Lag::MAX`]) when it follows the previous one within
/// [`Lag::RECENT`].
#[derive(Debug, Clone)]
pub struct Lag {
    serial_until: Option<Instant>,
    backoff: Duration,
    debt: Duration,
    last: Option<Instant>,
}

impl Lag {
    pub const STALL: Duration = Duration::from_micros(300);
    /// The share of the time stalls may take in the long run (percent).
    pub const LEAK: u32 = 30;
    pub const BUCKET: Duration = Duration::from_millis(15);
    pub const START: Duration = Duration::from_millis(20);
    pub const MAX: Duration = Duration::from_secs(1);
    pub const RECENT: Duration = Duration::from_millis(200);

    pub fn new() -> Lag {
        Lag {
            serial_until: None,
            backoff: Lag::START,
            debt: Duration::ZERO,
            last: None,
        }
    }

    /// Whether chunked jobs run on the caller alone at `now`.
    pub fn serial(&self, now: Instant) -> bool {
        self.serial_until.is_some_and(|u| now < u)
    }

    /// Records a parallel job that ended at `now`: the caller worked `work`, then waited
    /// `wait` for the workers' chunks. Returns whether it was a stall.
    pub fn record(&mut self, now: Instant, work: Duration, wait: Duration) -> bool {
        let elapsed = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        self.debt = self.debt.saturating_sub(elapsed * Lag::LEAK / 100);
        let stall = wait > Lag::STALL && wait > work;
        if !stall {
            return false;
        }
        self.debt += wait;
        if self.debt >= Lag::BUCKET {
            let recent = self
                .serial_until
                .is_some_and(|u| now.saturating_duration_since(u) < Lag::RECENT);
            self.backoff = if recent {
                (self.backoff * 2).min(Lag::MAX)
            } else {
                Lag::START
            };
            self.serial_until = Some(now + self.backoff);
            self.debt = Duration::ZERO;
        }
        true
    }

    /// The current serial period's length.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }
}

impl Default for Lag {
    fn default() -> Lag {
        Lag::new()
    }
}

/// How many of the pool's threads can have a core of their own, from the CPU time the
/// rest of the machine used (Linux: `/proc/stat` minus this process's `/proc/self/stat`)
/// over the last [`Others::PERIOD`]. Two threads that share a core with another process
/// wait for each other at every job (a worker's chunk waits for its time slice), and spin
/// on each other's core; one thread with a core to itself is faster. So chunked jobs use
/// `round(cpus - others)` threads, at least one: a competing process that keeps one core
/// of two busy leaves the caller alone.
#[derive(Debug)]
struct Others {
    cpus: usize,
    last: Option<(Instant, CpuTicks)>,
    usable: usize,
}

/// Cumulative CPU ticks: all CPUs busy, all CPUs in total, this process.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    busy: u64,
    total: u64,
    ours: u64,
}

impl Others {
    const PERIOD: Duration = Duration::from_millis(200);

    /// Takes the first sample: the first decision comes PERIOD after the pool's creation
    /// (typically while the model loads).
    fn new(threads: usize) -> Others {
        let cpus = std::fs::read_to_string("/proc/stat")
            .map(|s| count_cpus(&s))
            .unwrap_or(0);
        Others {
            cpus,
            last: read_ticks().map(|t| (Instant::now(), t)),
            usable: threads,
        }
    }

    /// The threads chunked jobs use at `now` (re-sampled every PERIOD).
    fn usable(&mut self, now: Instant, threads: usize) -> usize {
        if self.cpus == 0 {
            return threads;
        }
        let fresh = self
            .last
            .is_none_or(|(t, _)| now.saturating_duration_since(t) >= Others::PERIOD);
        if fresh {
            let Some(ticks) = read_ticks() else {
                self.cpus = 0;
                return threads;
            };
            if let Some((_, old)) = self.last {
                self.usable = usable_threads(threads, self.cpus, old, ticks);
            }
            self.last = Some((now, ticks));
        }
        self.usable
    }
}

/// The CPUs listed in /proc/stat (lines `cpuN`).
fn count_cpus(stat: &str) -> usize {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
}

/// Parses the `cpu` line of /proc/stat and the utime and stime of /proc/self/stat.
fn parse_ticks(stat: &str, self_stat: &str) -> Option<CpuTicks> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    // user nice system idle iowait irq softirq steal
    let total: u64 = v.iter().sum();
    let busy = total - v[3] - v[4];
    // Fields after the command name (which may hold spaces and parentheses): state is the
    // third field, utime the 14th and stime the 15th.
    let rest = &self_stat[self_stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ours = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(CpuTicks { busy, total, ours })
}

fn read_ticks() -> Option<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_ticks(&stat, &me)
}

/// Threads (1..=threads) that fit in the CPUs the rest of the machine left free between
/// two samples: `round(cpus - others)`, where others = (busy - ours) in CPUs.
fn usable_threads(threads: usize, cpus: usize, old: CpuTicks, new: CpuTicks) -> usize {
    let total = new.total.saturating_sub(old.total);
    if total == 0 {
        return threads;
    }
    let per_cpu = total as f64 / cpus as f64;
    let others = new
        .busy
        .saturating_sub(old.busy)
        .saturating_sub(new.ours.saturating_sub(old.ours));
    let free = cpus as f64 - others as f64 / per_cpu;
    (free.round().max(1.0) as usize).min(threads)
}

/// What the job lock guards: the caller-side state.
struct CallerState {
    generation: u32,
    lag: Lag,
    others: Others,
    stats: PoolStats,
}

/// What the pool did with chunked jobs so far (see [`ThreadPool::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Chunked jobs of more than one chunk, on a pool of more than one thread.
    pub chunked_jobs: u64,
    /// Of those, jobs the caller ran alone during a serial period after stalls ([`Lag`]).
    pub serial_after_stalls: u64,
    /// Of those, jobs run on fewer threads than the pool has because other processes
    /// kept cores busy (on the caller alone, in a pool of 2).
    pub fewer_for_load: u64,
    /// Stalls: parallel jobs that waited for a descheduled worker (see [`Lag`]).
    pub stalls: u64,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    /// Serialises callers: one job at a time.
    lock: Mutex<CallerState>,
    /// Whether chunked jobs adapt to other processes' load and to stalls.
    adaptive: AtomicBool,
}

/// How long a worker (or the caller) spins before parking.
const SPIN: Duration = Duration::from_micros(50);

/// Chunks per thread in [`ThreadPool::for_ranges`]: enough that a thread that starts late
/// or runs slowly leaves a fair share to the others, few enough that each chunk is long
/// next to the cost of claiming it.
pub const CHUNKS_PER_THREAD: usize = 4;

impl ThreadPool {
    /// A pool that runs jobs on `threads` threads: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> ThreadPool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(threads),
            caller: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            #[cfg(test)]
            delay_us: AtomicU64::new(0),
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
            lock: Mutex::new(CallerState {
                generation: 0,
                lag: Lag::new(),
                others: Others::new(threads),
                stats: PoolStats::default(),
            }),
            adaptive: AtomicBool::new(true),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Tests: makes the workers late (on odd-numbered jobs they sleep `delay` before
    /// claiming chunks) or slow (on even-numbered jobs they sleep `delay` inside their
    /// first chunk), and turns adaptation off so that chunked jobs stay parallel.
    #[cfg(test)]
    pub(crate) fn slow_workers(&self, delay: Duration) {
        self.set_adaptive(false);
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// What the pool did with chunked jobs so far.
    pub fn stats(&self) -> PoolStats {
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// Whether chunked jobs may run on fewer threads than the pool has: on the caller
    /// alone for a while after a stall ([`Lag`]), and on as many threads as other
    /// processes leave cores free (`Others`, Linux). On by default; off, every chunked
    /// job is offered to every thread (for measuring the kernels' scaling).
    pub fn set_adaptive(&self, on: bool) {
        self.adaptive.store(on, Ordering::Relaxed);
    }

    /// Posts `job` under a new ticket made by `make` and wakes the first `threads - 1`
    /// workers.
    fn post(
        &self,
        state: &mut CallerState,
        slot: *const &'static Job<'static>,
        threads: usize,
        make: impl Fn(u32) -> u64,
    ) {
        *self.shared.caller.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::current());
        state.generation = state.generation.wrapping_add(1);
        self.shared.job.store(slot as *mut _, Ordering::Release);
        self.shared
            .ticket
            .store(make(state.generation), Ordering::Release);
        for (_, t) in &self.workers[..threads - 1] {
            t.unpark();
        }
    }

    /// Waits (spinning, then parking) until `finished()`.
    fn wait(&self, finished: impl Fn() -> bool) {
        let start = Instant::now();
        while !finished() {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::park_timeout(Duration::from_millis(1));
            }
        }
    }

    /// Runs `f(thread_index, threads)` on every thread of the pool and returns when all
    /// have finished. Every thread takes part, however late: use this only for jobs that
    /// need it (threads that wait for each other inside the job); row-split work goes
    /// through [`for_chunks`](Self::for_chunks) or [`for_ranges`](Self::for_ranges).
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        if n == 1 {
            f(0, 1);
            return;
        }
        let mut state = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the job is only used by workers between the ticket published below and
        // `pending` reaching zero, which this function waits for before returning (and
        // before `job` goes out of scope); so the borrow outlives every use despite the
        // 'static lifetime written here.
        let job: &'static Job<'static> =
            unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(f) };
        let slot: *const &'static Job<'static> = &job;
        self.shared.pending.store(n - 1, Ordering::Release);
        self.post(&mut state, slot, n, ticket::broadcast);
        f(0, n);
        self.wait(|| self.shared.pending.load(Ordering::Acquire) == 0);
        self.shared
            .job
            .store(std::ptr::null_mut(), Ordering::Release);
    }

    /// Runs `f(chunk, chunks)` once for every chunk in `0..chunks`, on whichever thread
    /// claims it first (the caller included), and returns when all have finished. Chunks
    /// are claimed in increasing order; a chunk's result must not depend on the thread.
    pub fn for_chunks(&self, chunks: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if chunks > ticket::MAX_CHUNKS {
            // Group consecutive chunks: still each exactly once, in order within a group.
            let groups = ticket::MAX_CHUNKS;
            return self.for_chunks(groups, &|g, _| {
                let r = split_range(chunks, 1, g, groups);
                r.for_each(|c| f(c, chunks));
            });
        }
        self.chunked(chunks, f);
    }

    /// Splits `0..len` into contiguous ranges, each a multiple of `align` (except the
    /// last), about [`CHUNKS_PER_THREAD`] per thread of the pool, and runs `f(range)` on
    /// each (see [`for_chunks`](Self::for_chunks)). The ranges depend on `len`, `align`
    /// and the pool's size only: when the job runs on the caller alone (an adaptive pool
    /// under load or after a stall), it runs the same ranges in turn. So a kernel whose
    /// result for an index depends on the range that holds it (a GEMM's tiles and blocks)
    /// still gives the same bits whatever the timing.
    pub fn for_ranges(
        &self,
        len: usize,
        align: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        if len == 0 {
            return;
        }
        if self.threads() == 1 {
            return f(0..len);
        }
        let chunks = len
            .div_ceil(align.max(1))
            .min(self.threads() * CHUNKS_PER_THREAD)
            .min(ticket::MAX_CHUNKS);
        self.chunked(chunks, &|c, chunks| f(split_range(len, align, c, chunks)));
    }

    /// A chunked job: `f(chunk, chunks)` for every chunk, over the threads that take part
    /// (on the caller alone, in order, when only one does).
    fn chunked(&self, chunks: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let alone = || (0..chunks).for_each(|c| f(c, chunks));
        if chunks <= 1 || self.threads() == 1 {
            return alone();
        }
        let mut state = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let adaptive = self.adaptive.load(Ordering::Relaxed);
        let start = Instant::now();
        state.stats.chunked_jobs += 1;
        let active = if !adaptive {
            self.threads()
        } else if state.lag.serial(start) {
            state.stats.serial_after_stalls += 1;
            1
        } else {
            let usable = state.others.usable(start, self.threads());
            state.stats.fewer_for_load += (usable < self.threads()) as u64;
            usable
        };
        if active == 1 {
            drop(state);
            return alone();
        }
        // SAFETY: workers use the job only while holding a claimed chunk, and this function
        // returns (and `job` goes out of scope) only after `done` counts every chunk; so the
        // borrow outlives every use despite the 'static lifetime written here.
        let job: &'static Job<'static> =
            unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(f) };
        let slot: *const &'static Job<'static> = &job;
        self.shared.done.store(0, Ordering::Relaxed);
        self.shared.active.store(active, Ordering::Relaxed);
        self.post(&mut state, slot, active, |g| ticket::chunked(g, chunks));
        let t = self.shared.ticket.load(Ordering::Acquire);
        self.shared.work_chunks(t, true);
        let worked = Instant::now();
        self.wait(|| self.shared.done.load(Ordering::Acquire) == chunks);
        let end = Instant::now();
        self.shared
            .job
            .store(std::ptr::null_mut(), Ordering::Release);
        if adaptive && state.lag.record(end, worked - start, end - worked) {
            state.stats.stalls += 1;
        }
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
    let mut seen = 0u32;
    // When this worker last took part in a job: it spins for SPIN after that, then parks
    // (jobs it leaves alone do not keep it spinning).
    let mut start = Instant::now();
    loop {
        let t = loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let t = shared.ticket.load(Ordering::Acquire);
            if ticket::gen_of(t) != seen {
                break t;
            }
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::park_timeout(Duration::from_millis(10));
            }
        };
        seen = ticket::gen_of(t);
        if !ticket::is_broadcast(t) && index >= shared.active.load(Ordering::Relaxed) {
            // Not taking part in this chunked job (see `Others`).
            continue;
        }
        if !ticket::is_broadcast(t) {
            #[cfg(test)]
            if !seen.is_multiple_of(2) {
                // A worker scheduled late: it may find the job done, or a later one posted.
                shared.test_delay();
            }
            shared.work_chunks(t, false);
        } else {
            let job = shared.job.load(Ordering::Acquire);
            // SAFETY: a `run` job waits for every worker (`pending`) before returning, so
            // the job published with this ticket is still alive.
            let f: &Job<'static> = unsafe { *job };
            f(index, threads);
            if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                shared.unpark_caller();
            }
        }
        start = Instant::now();
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

/// Tests: pools of 1-3 threads (not adaptive, so that jobs are offered to every thread
/// however busy the machine), then of 2 and 3 threads whose workers are late or slow (see
/// [`ThreadPool::slow_workers`]), then an adaptive pool of 2; each with a name for
/// messages. Kernels must give the same results on all pools of the same size.
#[cfg(test)]
pub(crate) fn test_pools() -> Vec<(String, ThreadPool)> {
    let mut v: Vec<(String, ThreadPool)> = (1..=3)
        .map(|t| {
            let p = ThreadPool::new(t);
            p.set_adaptive(false);
            (format!("{t} threads"), p)
        })
        .collect();
    for t in [2, 3] {
        let p = ThreadPool::new(t);
        p.slow_workers(Duration::from_micros(300));
        v.push((format!("{t} threads, slowed workers"), p));
    }
    v.push(("2 threads, adaptive".into(), ThreadPool::new(2)));
    v
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

    /// Counts how often each chunk (or element) is visited.
    fn counts(len: usize) -> Vec<AtomicUsize> {
        (0..len).map(|_| AtomicUsize::new(0)).collect()
    }

    fn assert_once(c: &[AtomicUsize], what: &str) {
        for (i, v) in c.iter().enumerate() {
            assert_eq!(v.load(Ordering::Relaxed), 1, "{what}: element {i}");
        }
    }

    #[test]
    fn every_chunk_runs_exactly_once() {
        for (name, pool) in test_pools() {
            for chunks in [0, 1, 2, 3, 7, 8, 64, ticket::MAX_CHUNKS + 5] {
                for _ in 0..if chunks > 100 { 2 } else { 30 } {
                    let c = counts(chunks);
                    pool.for_chunks(chunks, &|i, n| {
                        assert_eq!(n, chunks);
                        c[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert_once(&c, &format!("{name}, {chunks} chunks"));
                }
            }
        }
    }

    #[test]
    fn for_ranges_covers_each_index_once_in_aligned_ranges() {
        for (name, pool) in test_pools() {
            for (len, align) in [(1, 16), (15, 16), (16, 16), (17, 16), (576, 16), (1000, 1)] {
                for (len, align) in [(len, align), (49152, 16)] {
                    let c = counts(len);
                    pool.for_ranges(len, align, &|r| {
                        assert!(r.start.is_multiple_of(align), "{name}: start {r:?}");
                        assert!(r.end.is_multiple_of(align) || r.end == len, "{name}: {r:?}");
                        for i in r {
                            c[i].fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    assert_once(&c, &format!("{name}, len {len}"));
                }
            }
        }
    }

    /// Chunked jobs mixed with `run` jobs and nested results: a late worker that wakes
    /// after its job has finished must neither run a stale chunk nor miss the next job.
    #[test]
    fn late_and_slow_workers_give_identical_results() {
        let data: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.37 - 150.0)
            .collect();
        // Per-chunk sums in a fixed order: what a kernel computes, independent of threads.
        let sums = |pool: &ThreadPool, chunks: usize| -> Vec<f32> {
            let out: Vec<Mutex<f32>> = (0..chunks).map(|_| Mutex::new(0.0)).collect();
            pool.for_chunks(chunks, &|c, n| {
                let r = split_range(data.len(), 4, c, n);
                *out[c].lock().unwrap() = data[r].iter().fold(0.0, |a, &b| a * 0.999 + b);
            });
            out.into_iter().map(|m| m.into_inner().unwrap()).collect()
        };
        let reference = ThreadPool::new(1);
        for (name, pool) in test_pools() {
            for round in 0..200 {
                let chunks = 1 + round % 13;
                assert_eq!(
                    sums(&pool, chunks),
                    sums(&reference, chunks),
                    "{name} {chunks}"
                );
                if round % 5 == 0 {
                    let hits = AtomicUsize::new(0);
                    pool.run(&|_, _| {
                        hits.fetch_add(1, Ordering::Relaxed);
                    });
                    assert_eq!(hits.load(Ordering::Relaxed), pool.threads());
                }
            }
        }
    }

    /// The adaptive pool runs a job on the caller alone after stalls: with the same ranges
    /// as on every thread, so a kernel whose result depends on its ranges' bounds (a GEMM)
    /// gives the same bits whatever the timing (it did not: prefill differed by ulps).
    #[test]
    fn a_job_run_on_the_caller_alone_keeps_its_ranges() {
        let ranges = |pool: &ThreadPool| {
            let seen = Mutex::new(Vec::new());
            pool.for_ranges(1000, 16, &|r| seen.lock().unwrap().push(r));
            let mut seen = seen.into_inner().unwrap();
            seen.sort_by_key(|r| r.start);
            seen
        };
        let pool = ThreadPool::new(2);
        pool.set_adaptive(false);
        let parallel = ranges(&pool);
        assert_eq!(parallel.len(), 2 * CHUNKS_PER_THREAD);
        pool.set_adaptive(true);
        pool.lock.lock().unwrap().lag.serial_until = Some(Instant::now() + Duration::from_secs(60));
        let before = pool.stats().serial_after_stalls;
        assert_eq!(ranges(&pool), parallel);
        assert_eq!(pool.stats().serial_after_stalls, before + 1, "ran alone");
        assert_eq!(ranges(&ThreadPool::new(1)), vec![0..1000], "a pool of one");
    }

    #[test]
    fn other_processes_load_decides_the_usable_threads() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n\
                    cpu1 50 3 25 500 10 2 1 0 0 0\nintr 1 2 3\nctxt 9\n";
        assert_eq!(count_cpus(stat), 2);
        // A command name with spaces and parentheses; utime 40, stime 7.
        let me = "1234 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 40 7 0 0 20 0 3 0 100";
        let t = parse_ticks(stat, me).unwrap();
        assert_eq!((t.busy, t.total, t.ours), (160, 1180, 47));
        assert!(parse_ticks("cpu0 1 2\n", me).is_none());
        assert!(parse_ticks(stat, "garbage").is_none());
        // 2 CPUs, 200 ticks of each over the window; ours used 200 of the 400.
        let old = CpuTicks {
            busy: 0,
            total: 0,
            ours: 0,
        };
        let window = |others: u64| CpuTicks {
            busy: 200 + others,
            total: 400,
            ours: 200,
        };
        assert_eq!(usable_threads(2, 2, old, window(0)), 2);
        assert_eq!(usable_threads(2, 2, old, window(80)), 2);
        // Another process busy on a whole core (200 ticks), or on 60% of one.
        assert_eq!(usable_threads(2, 2, old, window(200)), 1);
        assert_eq!(usable_threads(2, 2, old, window(120)), 1);
        // Never below one, never above the pool.
        assert_eq!(usable_threads(2, 2, old, window(400)), 1);
        assert_eq!(usable_threads(8, 16, old, window(0)), 8);
        assert_eq!(usable_threads(2, 2, old, old), 2);
    }

    #[test]
    fn lag_goes_serial_when_stalls_take_a_large_share_and_backs_off() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let ms = Duration::from_millis;
        let mut lag = Lag::new();
        assert!(!lag.serial(t0));
        // Normal waits: shorter than STALL, or shorter than the caller's own work.
        assert!(!lag.record(t0, us(50), us(40)));
        assert!(!lag.record(t0, ms(5), ms(2)));
        // Stalls of 5 ms once every 100 ms, for a second: never serial.
        let mut t = t0;
        for _ in 0..10 {
            t += ms(100);
            assert!(lag.record(t, us(50), ms(5)));
            assert!(!lag.serial(t));
        }
        // Stalls of 3 ms every 4 ms (a competing process's time slices): serial within
        // a few of them, for START.
        let mut n = 0;
        while !lag.serial(t) {
            t += ms(4);
            assert!(lag.record(t, us(80), ms(3)));
            n += 1;
            assert!(n < 20, "never went serial");
        }
        assert!(n > 3, "went serial after {n} stalls");
        assert_eq!(lag.backoff(), Lag::START);
        assert!(lag.serial(t + Lag::START - us(1)));
        assert!(!lag.serial(t + Lag::START));
        // The same again right after the serial period: twice as long; and so on, up
        // to MAX.
        let mut last = lag.backoff();
        for _ in 0..20 {
            t += lag.backoff() + ms(1);
            while !lag.serial(t) {
                t += ms(4);
                lag.record(t, us(80), ms(3));
            }
            assert_eq!(lag.backoff(), (last * 2).min(Lag::MAX));
            last = lag.backoff();
        }
        assert_eq!(lag.backoff(), Lag::MAX);
        // Long after the last serial period: back to START.
        t += Lag::MAX + Lag::RECENT + ms(1);
        while !lag.serial(t) {
            t += ms(4);
            lag.record(t, us(80), ms(3));
        }
        assert_eq!(lag.backoff(), Lag::START);
    }
}
