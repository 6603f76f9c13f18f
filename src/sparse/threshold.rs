//! Threshold rules: which neurons of one layer stay active for one token, given their
//! scores. Owns the SPEC grammar (`off`, `sigma:K`, `density:D`, `calibrated`).

use crate::kernels::ops::{count_at_least, indices_at_least};
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A per-token, per-layer selection rule over a layer's neuron scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// No sparsity: the dense MLP runs.
    Off,
    /// Keep `s_i > mean + K·std` of the layer's scores (population std, one pass in f64).
    Sigma(f64),
    /// Keep exactly `ceil(D·n)` neurons, the top ones by score (ties broken by index).
    Density(f64),
    /// Keep `s_i > t_layer`, with per-layer cut-offs `t_layer` read from the predictor file.
    Calibrated,
}

impl FromStr for Threshold {
    type Err = Error;
    fn from_str(s: &str) -> Result<Threshold> {
        let bad = |why: &str| {
            Error::Input(format!(
                "bad sparsity spec '{s}': {why}expected off, sigma:K, density:D or calibrated"
            ))
        };
        let t = s.trim();
        match t.split_once(':') {
            None if t == "off" => Ok(Threshold::Off),
            None if t == "calibrated" => Ok(Threshold::Calibrated),
            Some(("sigma", k)) => match k.trim().parse::<f64>() {
                Ok(k) if k.is_finite() => Ok(Threshold::Sigma(k)),
                _ => Err(bad(&format!("K '{k}' is not a finite number; "))),
            },
            Some(("density", d)) => match d.trim().parse::<f64>() {
                Ok(d) if d > 0.0 && d <= 1.0 => Ok(Threshold::Density(d)),
                // density:0 would keep no neuron: the MLP would add nothing, silently.
                Ok(0.0) => Err(bad(&format!(
                    "D '{d}' keeps no neuron (D must be in (0, 1]); "
                ))),
                _ => Err(bad(&format!("D '{d}' is not a number in (0, 1]; "))),
            },
            _ => Err(bad("")),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Off => f.write_str("off"),
            Threshold::Sigma(k) => write!(f, "sigma:{k}"),
            Threshold::Density(d) => write!(f, "density:{d}"),
            Threshold::Calibrated => f.write_str("calibrated"),
        }
    }
}

/// Mean and population standard deviation in one pass (sum and sum of squares in f64:
/// scores are few thousand values of moderate size, so f64 leaves no cancellation problem).
pub fn mean_std(scores: &[f32]) -> (f64, f64) {
    if scores.is_empty() {
        return (0.0, 0.0);
    }
    let (mut s, mut ss) = (0f64, 0f64);
    for &v in scores {
        let v = v as f64;
        s += v;
        ss += v * v;
    }
    let n = scores.len() as f64;
    let mean = s / n;
    (mean, (ss / n - mean * mean).max(0.0).sqrt())
}

/// Number of neurons `density:D` keeps out of `n`: `ceil(D·n)`, at most `n`, and at
/// least one when `D > 0` (a positive density never empties a layer).
pub fn top_k_count(density: f64, n: usize) -> usize {
    // The small epsilon keeps e.g. 0.1 * 1000 (= 100.00000000000001) at 100.
    let k = ((density * n as f64) - 1e-9).ceil().max(0.0) as usize;
    let k = if density > 0.0 { k.max(1) } else { k };
    k.min(n)
}

/// Scratch buffers reused across tokens so selection does not allocate.
#[derive(Default)]
pub struct SelectScratch {
    keys: Vec<u32>,
}

impl Threshold {
    /// Writes into `out` the indices (ascending) of the neurons of `scores` this rule keeps.
    ///
    /// `cutoff` is the layer's calibrated threshold (used by `Calibrated` only; without one
    /// every neuron is kept). `Off` keeps all.
    pub fn select(
        &self,
        scores: &[f32],
        cutoff: Option<f32>,
        scratch: &mut SelectScratch,
        out: &mut Vec<u32>,
    ) {
        out.clear();
        let n = scores.len();
        match *self {
            Threshold::Off => out.extend(0..n as u32),
            Threshold::Sigma(k) => {
                let (mean, std) = mean_std(scores);
                let t = mean + k * std;
                out.extend((0..n as u32).filter(|&i| scores[i as usize] as f64 > t));
            }
            Threshold::Calibrated => match cutoff {
                Some(t) => out.extend((0..n as u32).filter(|&i| scores[i as usize] > t)),
                None => out.extend(0..n as u32),
            },
            Threshold::Density(d) => {
                let k = top_k_count(d, n);
                select_top_k(scores, k, &mut scratch.keys, out);
            }
        }
    }
}

/// The `k` highest-scoring indices, ascending, in O(n) (no sort). Order: score
/// descending (`total_cmp`), then index ascending, a total order, so the set is exactly
/// `k` and deterministic even with ties. The k-th score is found by bisection on the
/// scores' total-order bits (held in `keys`; at most 32 vectorised counting passes); a
/// last pass lists the indices above it, and as many of those equal to it as the count
/// asks for, lowest index first.
pub fn select_top_k(scores: &[f32], k: usize, keys: &mut Vec<u32>, out: &mut Vec<u32>) {
    out.clear();
    let n = scores.len();
    if k == 0 {
        return;
    }
    if k >= n {
        out.extend(0..n as u32);
        return;
    }
    keys.clear();
    keys.extend(scores.iter().map(|&v| order_bits(v)));
    let (mut lo, mut hi) = keys
        .iter()
        .fold((u32::MAX, 0), |(lo, hi), &o| (lo.min(o), hi.max(o)));
    // The largest t with at least k scores >= t: the k-th score's bits; `at_lo` counts
    // the scores >= lo (all of them at the minimum).
    let mut at_lo = n;
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let at_mid = count_at_least(keys, mid);
        if at_mid >= k {
            (lo, at_lo) = (mid, at_mid);
        } else {
            hi = mid - 1;
        }
    }
    let kth = lo;
    // Of the scores equal to the k-th, the lowest indices fill the count: usually that
    // is all of them (one compress pass), else a scan takes the first few.
    if at_lo == k {
        return indices_at_least(keys, kth, out);
    }
    let mut ties = k - kth.checked_add(1).map_or(0, |t| count_at_least(keys, t));
    for (i, &o) in keys.iter().enumerate() {
        if o > kth {
            out.push(i as u32);
        } else if o == kth && ties > 0 {
            ties -= 1;
            out.push(i as u32);
        }
    }
}

/// `total_cmp`'s order as an unsigned integer: all bits of negatives flipped, the sign
/// bit of the rest set.
#[inline]
fn order_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// The selection [`select_top_k`] makes, by sorting (the tests' reference).
#[cfg(test)]
fn select_top_k_sorted(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_selection_equals_the_sorted_one_with_ties_signs_and_nans() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut keys, mut out) = (Vec::new(), Vec::new());
        for n in [1usize, 2, 3, 17, 64, 577, 1536] {
            for case in 0..6 {
                let scores: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = next();
                        match case {
                            // Few distinct values: many ties.
                            0 => (r % 4) as f32,
                            // Signed, spread over exponents.
                            1 => f32::from_bits(
                                (r as u32 & 0x3fff_ffff) | ((r >> 40) as u32 & 1) << 31,
                            ),
                            // Values close together (one top byte).
                            2 => 1.0 + (r % 1000) as f32 * 1e-6,
                            3 if r % 7 == 0 => f32::NAN,
                            // The largest order bits there are: a tie at the top.
                            3 if r % 5 == 0 => f32::from_bits(0x7fff_ffff),
                            3 if r % 11 == 0 => -0.0,
                            4 => 0.0,
                            _ => (r % 100_000) as f32 / 997.0,
                        }
                    })
                    .collect();
                for k in [0, 1, n / 3, n / 2, n.saturating_sub(1), n] {
                    select_top_k(&scores, k, &mut keys, &mut out);
                    assert_eq!(
                        out,
                        select_top_k_sorted(&scores, k),
                        "n {n} case {case} k {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn parses_specs() {
        assert_eq!("off".parse::<Threshold>().unwrap(), Threshold::Off);
        assert_eq!(
            "sigma:-0.5".parse::<Threshold>().unwrap(),
            Threshold::Sigma(-0.5)
        );
        assert_eq!(
            "density:0.25".parse::<Threshold>().unwrap(),
            Threshold::Density(0.25)
        );
        assert_eq!(
            "calibrated".parse::<Threshold>().unwrap(),
            Threshold::Calibrated
        );
        for bad in [
            "x",
            "sigma",
            "sigma:abc",
            "sigma:inf",
            "density:1.5",
            "density:-0.1",
            "density:0",
            "density:0.0",
            "density:-0",
            "density:nan",
            "",
        ] {
            let e = bad.parse::<Threshold>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad sparsity spec '{bad}'")), "{e}");
            assert!(
                e.contains("expected off, sigma:K, density:D or calibrated"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_density_that_keeps_no_neuron_is_refused_by_name() {
        let e = "density:0".parse::<Threshold>().unwrap_err().to_string();
        assert_eq!(
            e,
            "bad sparsity spec 'density:0': D '0' keeps no neuron (D must be in (0, 1]); expected off, sigma:K, density:D or calibrated"
        );
        // The smallest positive density keeps one neuron per layer (ceil), never none.
        match "density:1e-9".parse::<Threshold>().unwrap() {
            Threshold::Density(d) => assert_eq!(top_k_count(d, 1536), 1),
            t => panic!("{t}"),
        }
    }

    #[test]
    fn top_k_count_is_ceil() {
        assert_eq!(top_k_count(0.1, 1000), 100);
        assert_eq!(top_k_count(0.1, 1001), 101);
        assert_eq!(top_k_count(0.0, 10), 0);
        assert_eq!(top_k_count(1.0, 10), 10);
        assert_eq!(top_k_count(0.05, 1536), 77);
        assert_eq!(top_k_count(1e-12, 1536), 1);
        assert_eq!(top_k_count(1e-12, 0), 0);
    }
}
