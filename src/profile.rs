//! Wall time per phase of a forward pass: printed to stderr after each multi-token call
//! when `SPARSELLM_PROFILE` is set, and accumulated over decode steps (one-token calls)
//! while [`record_decode`] is on (`sparsellm bench --components`).
//!
//! One clock per thread: the forward pass starts it ([`ForwardTimer::start`]) and every
//! boundary, in the model or in an MLP override such as the sparse MLP, charges the time
//! since the previous boundary to its phase ([`lap`]). The phases of one forward pass are
//! contiguous, so they add up to its wall time. Off, a boundary costs one branch on a
//! thread-local flag.

use std::cell::{Cell, RefCell};
use std::time::Instant;

/// A phase of the forward pass. The dense MLP is gate_up, silu_mul, down; the sparse MLP
/// is scorer, threshold, cache_update, sparse_kernel (and mlp_other for what an override
/// spends outside those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Embed,
    Norm,
    Qkv,
    Rope,
    Attention,
    OProj,
    GateUp,
    SiluMul,
    Down,
    /// Neuron scores: the low-rank predictor, or the exact gate/up products (the cascade's
    /// exact rescoring of its candidates too).
    Scorer,
    /// Selecting the kept neurons from the scores (sigma, top-k, calibrated cut).
    Threshold,
    /// The weight cache's paired replacement of rows that left and joined the mask.
    CacheUpdate,
    /// The sparse MLP kernel: gate/up (when not already computed) and down over the kept
    /// rows.
    SparseKernel,
    /// Time inside an MLP override not charged to one of its own phases.
    MlpOther,
    Head,
}

impl Phase {
    pub const COUNT: usize = 15;
    /// Every phase in the order of a forward pass.
    pub const ALL: [Phase; Phase::COUNT] = [
        Phase::Embed,
        Phase::Norm,
        Phase::Qkv,
        Phase::Rope,
        Phase::Attention,
        Phase::OProj,
        Phase::GateUp,
        Phase::SiluMul,
        Phase::Down,
        Phase::Scorer,
        Phase::Threshold,
        Phase::CacheUpdate,
        Phase::SparseKernel,
        Phase::MlpOther,
        Phase::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Embed => "embed",
            Phase::Norm => "norm",
            Phase::Qkv => "qkv",
            Phase::Rope => "rope",
            Phase::Attention => "attention",
            Phase::OProj => "o_proj",
            Phase::GateUp => "gate_up",
            Phase::SiluMul => "silu_mul",
            Phase::Down => "down",
            Phase::Scorer => "scorer",
            Phase::Threshold => "threshold",
            Phase::CacheUpdate => "cache_update",
            Phase::SparseKernel => "sparse_kernel",
            Phase::MlpOther => "mlp_other",
            Phase::Head => "head",
        }
    }
}

/// Seconds per phase, summed over forward passes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    pub seconds: [f64; Phase::COUNT],
    /// How many times each phase was charged (a phase never charged did not occur).
    pub laps: [u64; Phase::COUNT],
}

impl PhaseTimes {
    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }

    pub fn add(&mut self, other: &PhaseTimes) {
        for i in 0..Phase::COUNT {
            self.seconds[i] += other.seconds[i];
            self.laps[i] += other.laps[i];
        }
    }

    /// The phases that occurred, in forward order, with their seconds.
    pub fn occurred(&self) -> impl Iterator<Item = (Phase, f64)> + '_ {
        Phase::ALL
            .iter()
            .filter(|p| self.laps[**p as usize] > 0)
            .map(|&p| (p, self.seconds[p as usize]))
    }
}

/// The decode steps recorded since the last [`take_decode`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeProfile {
    pub steps: u64,
    pub phases: PhaseTimes,
}

struct Clock {
    last: Instant,
    times: PhaseTimes,
}

thread_local! {
    /// Whether this thread's clock runs: the only thing a boundary reads when off.
    static RUNNING: Cell<bool> = const { Cell::new(false) };
    static RECORD_DECODE: Cell<bool> = const { Cell::new(false) };
    static CLOCK: RefCell<Clock> = RefCell::new(Clock {
        last: Instant::now(),
        times: PhaseTimes::default(),
    });
    static DECODE: RefCell<DecodeProfile> = RefCell::new(DecodeProfile::default());
}

/// Charges the time since the previous boundary of this thread's forward pass to `p`
/// (nothing when no profiled forward pass is running on this thread).
#[inline]
pub fn lap(p: Phase) {
    if RUNNING.with(Cell::get) {
        lap_running(p);
    }
}

#[cold]
fn lap_running(p: Phase) {
    let now = Instant::now();
    CLOCK.with_borrow_mut(|c| {
        c.times.seconds[p as usize] += (now - c.last).as_secs_f64();
        c.times.laps[p as usize] += 1;
        c.last = now;
    });
}

/// Turns accumulating decode steps (forward passes of one token) on this thread on or
/// off; [`take_decode`] reads and clears what was accumulated.
pub fn record_decode(on: bool) {
    RECORD_DECODE.with(|r| r.set(on));
}

/// The decode steps recorded on this thread since the last call, and clears them.
pub fn take_decode() -> DecodeProfile {
    DECODE.with_borrow_mut(std::mem::take)
}

/// One forward pass's clock (see the module documentation).
pub struct ForwardTimer {
    /// Whether this pass is profiled; `end` is one branch on it.
    on: bool,
    tokens: usize,
}

impl ForwardTimer {
    /// Starts the clock for a pass over `tokens` tokens if it is to be profiled: printed
    /// (`SPARSELLM_PROFILE`, several tokens) or recorded (a decode step under
    /// [`record_decode`]). A pass nested in a profiled one (none today) is not profiled.
    pub fn start(tokens: usize) -> ForwardTimer {
        static PRINT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let print =
            tokens >= 2 && *PRINT.get_or_init(|| std::env::var_os("SPARSELLM_PROFILE").is_some());
        let record = tokens == 1 && RECORD_DECODE.with(Cell::get);
        let on = (print || record) && !RUNNING.with(Cell::get);
        if on {
            CLOCK.with_borrow_mut(|c| {
                c.last = Instant::now();
                c.times = PhaseTimes::default();
            });
            RUNNING.with(|r| r.set(true));
        }
        ForwardTimer { on, tokens }
    }

    /// Charges the time since the previous boundary to `p`.
    #[inline]
    pub fn end(&self, p: Phase) {
        if self.on {
            lap_running(p);
        }
    }

    /// Stops the clock: prints the pass's phases (several tokens) or adds them to the
    /// decode record (one token).
    pub fn finish(mut self) {
        if !self.on {
            return;
        }
        self.on = false;
        RUNNING.with(|r| r.set(false));
        let times = CLOCK.with_borrow(|c| c.times);
        if self.tokens == 1 {
            DECODE.with_borrow_mut(|d| {
                d.steps += 1;
                d.phases.add(&times);
            });
            return;
        }
        let parts: Vec<String> = times
            .occurred()
            .map(|(p, s)| format!("{} {:.2}", p.name(), s * 1e3))
            .collect();
        eprintln!(
            "profile: {} tokens, {:.2} ms: {} (ms)",
            self.tokens,
            times.total() * 1e3,
            parts.join(", ")
        );
    }
}

impl Drop for ForwardTimer {
    /// A pass that ends without `finish` (a panic) stops the clock unreported, so the
    /// thread's next pass can be profiled.
    fn drop(&mut self) {
        if self.on {
            RUNNING.with(|r| r.set(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_steps_accumulate_only_while_recording() {
        // Not recording: nothing.
        let t = ForwardTimer::start(1);
        t.end(Phase::Embed);
        t.finish();
        assert_eq!(take_decode().steps, 0);
        record_decode(true);
        for _ in 0..3 {
            let t = ForwardTimer::start(1);
            t.end(Phase::Embed);
            std::thread::sleep(std::time::Duration::from_millis(1));
            lap(Phase::Scorer);
            t.end(Phase::Head);
            t.finish();
        }
        // A multi-token pass is not a decode step (and prints only with the env var).
        ForwardTimer::start(4).finish();
        // Outside a pass, a boundary charges nothing.
        lap(Phase::Threshold);
        record_decode(false);
        let d = take_decode();
        assert_eq!(d.steps, 3);
        let names: Vec<&str> = d.phases.occurred().map(|(p, _)| p.name()).collect();
        assert_eq!(names, ["embed", "scorer", "head"]);
        assert!(d.phases.seconds[Phase::Scorer as usize] >= 3e-3);
        assert_eq!(take_decode(), DecodeProfile::default());
    }
}
