//! Progress of long work on stderr: an indicatif bar when stderr is a terminal, otherwise
//! (a log file, a pipe, CI) a plain line every few seconds, e.g.
//! `eval: 3/15 windows, 20 s`, so that long work is never silent and a log holds no
//! terminal control codes.
//!
//! [`count`] writes "1 window" / "3 windows" for messages.
//!
//! The interval of the plain lines is `SPARSELLM_PROGRESS_SECS` seconds (default 5; `0`
//! prints a line at every update, which tests use).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Default seconds between two plain progress lines.
pub const DEFAULT_INTERVAL_SECS: f64 = 5.0;

/// What the counts of a [`Progress`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Items, named in the plural (`"windows"`); a count of one uses the singular
    /// (the name without its final `s`).
    Items(&'static str),
    /// Bytes, shown in MB.
    Bytes,
}

/// A progress indicator: a bar on a terminal, plain lines elsewhere, or nothing.
pub struct Progress {
    kind: Kind,
}

enum Kind {
    Hidden,
    Bar(ProgressBar),
    Lines(Lines),
}

struct Lines {
    what: String,
    msg: Option<String>,
    unit: Unit,
    len: Option<u64>,
    pos: u64,
    start: Instant,
    last: Instant,
    interval: Duration,
    /// The position the last printed line showed (None: no line yet).
    printed: Option<u64>,
}

/// The plain lines' interval from `SPARSELLM_PROGRESS_SECS` (a number of seconds >= 0).
fn interval_from(value: Option<&str>) -> Duration {
    value
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs_f64(DEFAULT_INTERVAL_SECS), |s| {
            Duration::from_secs_f64(s.min(1e6))
        })
}

impl Progress {
    /// A bar on a terminal, plain lines every few seconds otherwise. `what` names the
    /// work (`"eval"`); `len` is the total (None: unknown).
    pub fn new(what: &str, len: Option<u64>, unit: Unit) -> Progress {
        let interval = interval_from(std::env::var("SPARSELLM_PROGRESS_SECS").ok().as_deref());
        Self::with(what, len, unit, std::io::stderr().is_terminal(), interval)
    }

    /// Shows nothing.
    pub fn hidden() -> Progress {
        Progress { kind: Kind::Hidden }
    }

    fn with(what: &str, len: Option<u64>, unit: Unit, terminal: bool, interval: Duration) -> Self {
        if terminal {
            let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
            let template = match (unit, len.is_some()) {
                (Unit::Bytes, true) => {
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
                }
                (Unit::Bytes, false) => "{msg} {bytes} {bytes_per_sec}",
                (Unit::Items(_), _) => "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_owned());
            return Progress {
                kind: Kind::Bar(bar),
            };
        }
        let now = Instant::now();
        Progress {
            kind: Kind::Lines(Lines {
                what: what.to_owned(),
                msg: None,
                unit,
                len,
                pos: 0,
                start: now,
                last: now,
                interval,
                printed: None,
            }),
        }
    }

    pub fn set_length(&mut self, len: u64) {
        match &mut self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_length(len),
            Kind::Lines(l) => l.len = Some(len),
        }
    }

    pub fn set_position(&mut self, pos: u64) {
        match &mut self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_position(pos),
            Kind::Lines(l) => {
                l.pos = pos;
                l.tick();
            }
        }
    }

    pub fn inc(&mut self, delta: u64) {
        match &mut self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.inc(delta),
            Kind::Lines(l) => {
                l.pos += delta;
                l.tick();
            }
        }
    }

    /// Changes what the counts are (a new stage counting other things).
    pub fn set_unit(&mut self, unit: Unit) {
        if let Kind::Lines(l) = &mut self.kind {
            l.unit = unit;
        }
    }

    /// What is being done now (a stage, a setting). On a terminal it replaces the bar's
    /// label; a plain line shows it in parentheses after the count.
    pub fn set_message(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        match &mut self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_message(msg),
            Kind::Lines(l) => l.msg = Some(msg),
        }
    }

    /// Clears the bar; plain lines end with a final line when any was printed and it
    /// showed another position (a log shows when the work ended).
    pub fn finish(&mut self) {
        match std::mem::replace(&mut self.kind, Kind::Hidden) {
            Kind::Hidden => {}
            Kind::Bar(b) => b.finish_and_clear(),
            Kind::Lines(mut l) => {
                if l.printed.is_some_and(|p| p != l.pos) {
                    l.print();
                }
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Kind::Bar(b) = &self.kind {
            b.finish_and_clear();
        }
    }
}

impl Lines {
    fn tick(&mut self) {
        let now = Instant::now();
        if now - self.last >= self.interval {
            self.last = now;
            self.print();
        }
    }

    fn print(&mut self) {
        self.printed = Some(self.pos);
        let line = self.line(self.start.elapsed());
        // Progress is a courtesy: a closed stderr must not end the work.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn line(&self, elapsed: Duration) -> String {
        let count = match self.unit {
            Unit::Items(name) => {
                let n = self.len.unwrap_or(self.pos);
                let name = if n == 1 {
                    name.strip_suffix('s').unwrap_or(name)
                } else {
                    name
                };
                match self.len {
                    Some(len) => format!("{}/{len} {name}", self.pos),
                    None => format!("{} {name}", self.pos),
                }
            }
            Unit::Bytes => match self.len {
                Some(len) => format!("{:.1}/{:.1} MB", self.pos as f64 / 1e6, len as f64 / 1e6),
                None => format!("{:.1} MB", self.pos as f64 / 1e6),
            },
        };
        // The message in parentheses, without a leading repetition of the work's name (a
        // bar's label such as "calibrate: fit" reads "calibrate: 7/30 layers (fit)").
        let detail = self.msg.as_deref().map(|m| {
            m.strip_prefix(self.what.as_str())
                .map_or(m, |r| r.trim_start_matches([':', ' ']))
        });
        let detail = match detail {
            Some(d) if !d.is_empty() => format!(" ({d})"),
            _ => String::new(),
        };
        format!(
            "{}: {count}{detail}, {:.0} s",
            self.what,
            elapsed.as_secs_f64()
        )
    }
}

/// `n` and the noun, in the plural unless `n` is 1: "1 window", "3 windows".
pub fn count(n: usize, singular: &str) -> String {
    if n == 1 {
        format!("1 {singular}")
    } else {
        format!("{n} {singular}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(what: &str, len: Option<u64>, unit: Unit) -> Lines {
        let mut p = Progress::with(what, len, unit, false, Duration::from_secs(3600));
        match std::mem::replace(&mut p.kind, Kind::Hidden) {
            Kind::Lines(l) => l,
            _ => unreachable!("not a terminal: plain lines"),
        }
    }

    #[test]
    fn plain_lines_say_what_how_far_and_how_long() {
        let mut l = lines("eval", Some(15), Unit::Items("windows"));
        l.pos = 3;
        assert_eq!(l.line(Duration::from_secs(20)), "eval: 3/15 windows, 20 s");
        let mut l = lines("eval", Some(1), Unit::Items("windows"));
        l.pos = 0;
        assert_eq!(l.line(Duration::from_millis(400)), "eval: 0/1 window, 0 s");
        let mut l = lines("fetch", Some(98_000_000), Unit::Bytes);
        l.pos = 12_300_000;
        assert_eq!(l.line(Duration::from_secs(5)), "fetch: 12.3/98.0 MB, 5 s");
        l.len = None;
        assert_eq!(l.line(Duration::from_secs(5)), "fetch: 12.3 MB, 5 s");
        // A stage as the message, with or without the work's name in front.
        let mut l = lines("calibrate", Some(30), Unit::Items("layers"));
        l.msg = Some("fit".into());
        l.pos = 7;
        assert_eq!(
            l.line(Duration::from_secs(61)),
            "calibrate: 7/30 layers (fit), 61 s"
        );
        l.msg = Some("calibrate: fit".into());
        assert_eq!(
            l.line(Duration::from_secs(61)),
            "calibrate: 7/30 layers (fit), 61 s"
        );
        l.msg = Some("calibrate".into());
        assert_eq!(
            l.line(Duration::from_secs(61)),
            "calibrate: 7/30 layers, 61 s"
        );
        assert_eq!(count(1, "window"), "1 window");
        assert_eq!(count(0, "thread"), "0 threads");
        assert_eq!(count(2, "thread"), "2 threads");
    }

    #[test]
    fn lines_are_throttled_and_finish_only_after_one() {
        // An hour's interval: no update prints, so finishing prints nothing either.
        let mut p = Progress::with(
            "eval",
            Some(3),
            Unit::Items("windows"),
            false,
            Duration::from_secs(3600),
        );
        p.set_position(1);
        p.inc(1);
        match &p.kind {
            Kind::Lines(l) => assert!(l.printed.is_none() && l.pos == 2),
            _ => unreachable!(),
        }
        // A zero interval: every update prints.
        let mut p = Progress::with(
            "eval",
            Some(3),
            Unit::Items("windows"),
            false,
            Duration::ZERO,
        );
        p.set_position(1);
        match &p.kind {
            Kind::Lines(l) => assert_eq!(l.printed, Some(1)),
            _ => unreachable!(),
        }
        p.finish();
        assert!(matches!(p.kind, Kind::Hidden));
    }

    #[test]
    fn interval_from_the_environment() {
        assert_eq!(interval_from(None), Duration::from_secs(5));
        assert_eq!(interval_from(Some("0")), Duration::ZERO);
        assert_eq!(interval_from(Some(" 2.5 ")), Duration::from_millis(2500));
        for bad in ["-1", "x", "nan", ""] {
            assert_eq!(interval_from(Some(bad)), Duration::from_secs(5), "{bad}");
        }
    }
}
