//! The benchmark harness behind `sparsellm bench`: a fixed prompt (the first N tokens of
//! a text), a fixed generation length (no EOS stop), greedy, KV cache on; a warm-up, then
//! repeated runs reported as median, min and max.

use std::ops::ControlFlow;

use serde::Serialize;

use crate::error::Result;
use crate::generate::{GenerateOptions, generate};
use crate::model::{Llama, MlpOverride};
use crate::profile::{self, DecodeProfile, Phase};
use crate::sparse::Sparsity;

/// Median, min and max of a set of measurements.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Stat {
        assert!(!values.is_empty());
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// One measured generation.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Sample {
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub total_tok_s: f64,
    pub peak_rss_mb: f64,
    pub mlp_density: f64,
    pub weight_bytes_per_token: usize,
    /// Input sparsity: the fraction of projection inputs kept, and the weight bytes a
    /// token reads relative to dense (1 otherwise).
    #[serde(default = "one")]
    pub input_density: f64,
    #[serde(default = "one")]
    pub weight_bytes_ratio: f64,
}

fn one() -> f64 {
    1.0
}

/// Generates `gen_tokens` greedy tokens from `prompt` (no EOS stop) and times it.
pub fn measure(
    model: &Llama,
    prompt: &[u32],
    gen_tokens: usize,
    mlp: Option<&mut (dyn MlpOverride + '_)>,
) -> Result<Sample> {
    let opts = GenerateOptions::fixed_greedy(gen_tokens);
    let g = generate(model, None, prompt, &opts, mlp, |_| {
        ControlFlow::Continue(())
    })?;
    Ok(Sample {
        ttft_ms: g.ttft_ms,
        prefill_tok_s: g.prefill_tok_s,
        decode_tok_s: g.decode_tok_s,
        total_tok_s: (prompt.len() + g.output_ids.len()) as f64 / (g.total_ms / 1e3),
        input_density: 1.0,
        weight_bytes_ratio: 1.0,
        ..Sample::default()
    })
}

/// Dense and sparse runs interleaved in this process, on one loaded model: `warmup`
/// unmeasured generations per mode, then `runs` rounds of one measured generation per
/// mode. Returns the dense report and, with `sparse`, the sparse one. (The CLI runs each
/// generation in a child process so that peak RSS is per mode; here it is the process's.)
pub fn interleaved(
    model: &Llama,
    prompt: &[u32],
    gen_tokens: usize,
    runs: usize,
    warmup: usize,
    mut sparse: Option<&mut Sparsity>,
) -> Result<(ModeReport, Option<ModeReport>)> {
    if runs == 0 {
        return Err(crate::Error::Input("runs must be at least 1".into()));
    }
    let weight_bytes_per_token = model.weight_bytes_per_token();
    let run = |sp: Option<&mut Sparsity>| -> Result<Sample> {
        let mut s = measure(model, prompt, gen_tokens, sp.map(|s| s.as_override()))?;
        s.weight_bytes_per_token = weight_bytes_per_token;
        s.peak_rss_mb = peak_rss_mb();
        s.mlp_density = 1.0;
        Ok(s)
    };
    for _ in 0..warmup {
        run(None)?;
        if let Some(sp) = sparse.as_deref_mut() {
            run(Some(sp))?;
        }
    }
    if let Some(sp) = sparse.as_deref_mut() {
        sp.reset_stats();
    }
    let (mut dense, mut sparse_samples) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        dense.push(run(None)?);
        if let Some(sp) = sparse.as_deref_mut() {
            let mut s = run(Some(&mut *sp))?;
            match sp {
                Sparsity::Input(i) => {
                    s.input_density = i.density().unwrap_or(1.0);
                    s.weight_bytes_ratio = i.weight_bytes_ratio().unwrap_or(1.0);
                }
                Sparsity::Mlp(m) => s.mlp_density = m.density().unwrap_or(1.0),
            }
            sparse_samples.push(s);
        }
    }
    Ok((
        ModeReport::from_samples(&dense),
        sparse.map(|_| ModeReport::from_samples(&sparse_samples)),
    ))
}

/// One generation's decode steps by phase, and the decode time the generation measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeRun {
    pub profile: DecodeProfile,
    /// From the first sampled token to the end: every decode step's forward pass, plus
    /// sampling and the loop around it.
    pub decode_s: f64,
}

/// Generates `gen_tokens` greedy tokens from `prompt` (no EOS stop) with the decode steps
/// profiled by phase (see [`crate::profile`]).
pub fn measure_decode_phases(
    model: &Llama,
    prompt: &[u32],
    gen_tokens: usize,
    mlp: Option<&mut (dyn MlpOverride + '_)>,
) -> Result<DecodeRun> {
    let opts = GenerateOptions::fixed_greedy(gen_tokens);
    profile::take_decode();
    profile::record_decode(true);
    let g = generate(model, None, prompt, &opts, mlp, |_| {
        ControlFlow::Continue(())
    });
    profile::record_decode(false);
    let profile = profile::take_decode();
    let g = g?;
    let steps = g.output_ids.len().saturating_sub(1);
    Ok(DecodeRun {
        profile,
        decode_s: if g.decode_tok_s > 0.0 {
            steps as f64 / g.decode_tok_s
        } else {
            0.0
        },
    })
}

/// Where a decode step's time goes: milliseconds per token of each phase that occurred,
/// over every measured step.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeComponents {
    /// Phase name -> ms per token.
    pub phases: serde_json::Map<String, serde_json::Value>,
    /// The phases in forward order (for tables).
    #[serde(skip)]
    pub ordered: Vec<(Phase, f64)>,
    /// The sum of the phases: the forward pass's time per token.
    pub phases_ms: f64,
    /// The decode step as generation measures it (1000 / decode tok/s): the forward pass
    /// plus sampling, the loop, and the timer's own cost.
    pub step_ms: f64,
    /// step_ms - phases_ms.
    pub unaccounted_ms: f64,
    /// Decode steps measured.
    pub tokens: u64,
    pub mlp_density: f64,
}

impl DecodeComponents {
    pub fn from_runs(runs: &[DecodeRun], mlp_density: f64) -> DecodeComponents {
        let mut total = DecodeProfile::default();
        let mut decode_s = 0.0;
        for r in runs {
            total.steps += r.profile.steps;
            total.phases.add(&r.profile.phases);
            decode_s += r.decode_s;
        }
        let per_token = |s: f64| {
            if total.steps > 0 {
                s * 1e3 / total.steps as f64
            } else {
                0.0
            }
        };
        let ordered: Vec<(Phase, f64)> = total
            .phases
            .occurred()
            .map(|(p, s)| (p, per_token(s)))
            .collect();
        let phases = ordered
            .iter()
            .map(|&(p, ms)| (p.name().to_owned(), serde_json::json!(ms)))
            .collect();
        let phases_ms = per_token(total.phases.total());
        let step_ms = per_token(decode_s);
        DecodeComponents {
            phases,
            ordered,
            phases_ms,
            step_ms,
            unaccounted_ms: step_ms - phases_ms,
            tokens: total.steps,
            mlp_density,
        }
    }
}

/// One mode's figures (dense or sparse), as in the CLI contract.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub ttft_ms: Stat,
    pub prefill_tok_s: Stat,
    pub decode_tok_s: Stat,
    pub total_tok_s: Stat,
    /// The largest peak RSS over this mode's runs (each run is its own process).
    pub peak_rss_mb: f64,
    pub mlp_density: f64,
    /// Weight bytes one dense decode step reads, and the rate the median decode moves
    /// them at (for a sparse mode: the dense bytes over the sparse time, an upper bound
    /// on the effective rate, not bytes actually read).
    pub weight_bytes_per_token: usize,
    pub decode_gb_s: f64,
    /// Input sparsity's kept fraction and weight bytes per token relative to dense.
    pub input_density: f64,
    pub weight_bytes_ratio: f64,
}

impl ModeReport {
    pub fn from_samples(s: &[Sample]) -> ModeReport {
        let col = |f: fn(&Sample) -> f64| Stat::of(&s.iter().map(f).collect::<Vec<_>>());
        let decode = col(|x| x.decode_tok_s);
        let bytes = s.first().map_or(0, |x| x.weight_bytes_per_token);
        ModeReport {
            ttft_ms: col(|x| x.ttft_ms),
            prefill_tok_s: col(|x| x.prefill_tok_s),
            decode_gb_s: bytes as f64 * decode.median / 1e9,
            decode_tok_s: decode,
            total_tok_s: col(|x| x.total_tok_s),
            peak_rss_mb: s.iter().map(|x| x.peak_rss_mb).fold(0.0, f64::max),
            mlp_density: Stat::of(&s.iter().map(|x| x.mlp_density).collect::<Vec<_>>()).median,
            weight_bytes_per_token: bytes,
            input_density: col(|x| x.input_density).median,
            weight_bytes_ratio: col(|x| x.weight_bytes_ratio).median,
        }
    }
}

/// This process's peak resident set size in MB (VmHWM), or 0 where /proc is absent.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }
}
