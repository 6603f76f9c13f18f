//! Contextual MLP sparsity at decode: per token and layer, score the neurons, keep those a
//! threshold selects, and compute the MLP over them only. This module owns the sparsity
//! configuration (the SPEC grammar's front door); the parts live in submodules:
//! `threshold` (selection rules), `predictor` (low-rank scorers and their files), `calibrate`
//! (fitting predictors and `calibrated` cut-offs from text),
//! `weight_cache` (compact active rows), `mlp` (the [`SparseMlp`] override of the dense
//! MLP), `bench` (component benchmarks). The kernels are in `crate::kernels::sparse`.

pub mod bench;
pub mod calibrate;
pub mod input;
pub mod mlp;
pub mod predictor;
pub mod threshold;
pub mod weight_cache;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

pub use input::{InputSparsity, InputSpec};
pub use mlp::SparseMlp;
pub use predictor::{Predictor, model_identity};
pub use threshold::Threshold;
pub use weight_cache::WeightCache;

/// How neurons are scored (an estimate of `|silu(g_i)·u_i|`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scorer {
    /// g and u of every neuron, exactly; sparsifies only the down projection.
    Exact,
    /// Low-rank predictors `(h·A)·B` of g (and u) from a predictor file.
    LowRank,
    /// The original SparseLLM's ranking: the signed gate pre-activation g_i (exact).
    /// Kept to measure what that choice costs; DESIGN.md shows it destroys the output.
    SignedGate,
    /// Low-rank scores pick the top `superset` fraction; exact g and u inside it only,
    /// and the threshold applies to those exact scores.
    Cascade { superset: f64 },
}

/// The cascade's default superset: 70% (the design's measured setting).
pub const DEFAULT_CASCADE_SUPERSET: f64 = 0.7;

impl FromStr for Scorer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Scorer> {
        let bad = || {
            Error::Input(format!(
                "bad scorer '{s}': expected exact, lowrank, cascade[:FRACTION] (fraction in (0, 1]) or signed-gate"
            ))
        };
        match s.trim().split_once(':') {
            None => match s.trim() {
                "exact" => Ok(Scorer::Exact),
                "lowrank" => Ok(Scorer::LowRank),
                "signed-gate" => Ok(Scorer::SignedGate),
                "cascade" => Ok(Scorer::Cascade {
                    superset: DEFAULT_CASCADE_SUPERSET,
                }),
                _ => Err(bad()),
            },
            Some(("cascade", f)) => match f.trim().parse::<f64>() {
                Ok(c) if c > 0.0 && c <= 1.0 => Ok(Scorer::Cascade { superset: c }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Scorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scorer::Exact => f.write_str("exact"),
            Scorer::LowRank => f.write_str("lowrank"),
            Scorer::SignedGate => f.write_str("signed-gate"),
            Scorer::Cascade { superset } => write!(f, "cascade:{superset}"),
        }
    }
}

/// Where the active neurons' weights are read from at decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From a per-layer [`WeightCache`] updated differentially each token.
    Cached,
    /// Gathered by index from the full matrices, with software prefetch.
    Gather,
    /// Quantized models only: neurons are selected in groups of 32 (a group's score is the
    /// sum of its neurons'), and the down projection's blocks, which run along the neurons,
    /// are read in place: no repacked copy, the file's own blocks, but a coarser choice.
    Blocks,
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "cached" => Ok(Mode::Cached),
            "gather" => Ok(Mode::Gather),
            "blocks" => Ok(Mode::Blocks),
            _ => Err(Error::Input(format!(
                "bad sparse mode '{s}': expected cached, gather or blocks"
            ))),
        }
    }
}

/// A sparsity setting: `SPEC` (the threshold) plus how to score and where to read rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparsityConfig {
    pub threshold: Threshold,
    /// None: `lowrank` when a predictor is given, `exact` otherwise.
    pub scorer: Option<Scorer>,
    pub mode: Mode,
    /// Run forward calls of more than one token (prefill) dense. Generation wants this
    /// (the default); evaluation of a sparse setting sets it false so that every position
    /// uses its own mask, as decoding would.
    pub prefill_dense: bool,
}

impl SparsityConfig {
    pub fn new(threshold: Threshold) -> SparsityConfig {
        SparsityConfig {
            threshold,
            scorer: None,
            mode: Mode::Cached,
            prefill_dense: true,
        }
    }
    pub fn is_off(&self) -> bool {
        self.threshold == Threshold::Off
    }
}

impl FromStr for SparsityConfig {
    type Err = Error;
    /// Parses a SPEC: `off`, `sigma:K`, `density:D` or `calibrated`.
    fn from_str(s: &str) -> Result<SparsityConfig> {
        Ok(SparsityConfig::new(s.parse()?))
    }
}

/// A sparse mode at decode: MLP neurons ([`SparseMlp`]) or the inputs of every
/// projection ([`InputSparsity`]). The common surface of both for the commands.
// One per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Sparsity {
    Mlp(SparseMlp),
    Input(InputSparsity),
}

impl Sparsity {
    /// The forward pass's hook.
    pub fn as_override(&mut self) -> &mut (dyn crate::model::MlpOverride + '_) {
        match self {
            Sparsity::Mlp(s) => s,
            Sparsity::Input(s) => s,
        }
    }
    pub fn as_mlp(&self) -> Option<&SparseMlp> {
        match self {
            Sparsity::Mlp(s) => Some(s),
            Sparsity::Input(_) => None,
        }
    }
    pub fn as_input(&self) -> Option<&InputSparsity> {
        match self {
            Sparsity::Input(s) => Some(s),
            Sparsity::Mlp(_) => None,
        }
    }
    /// The fraction of neurons (MLP) or of projection inputs (input sparsity) kept.
    pub fn density(&self) -> Option<f64> {
        match self {
            Sparsity::Mlp(s) => s.density(),
            Sparsity::Input(s) => s.density(),
        }
    }
    pub fn set_prefill_dense(&mut self, dense: bool) {
        match self {
            Sparsity::Mlp(s) => s.set_prefill_dense(dense),
            Sparsity::Input(s) => s.set_prefill_dense(dense),
        }
    }
    pub fn reset_stats(&mut self) {
        match self {
            Sparsity::Mlp(s) => s.reset_stats(),
            Sparsity::Input(s) => s.reset_stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config_and_scorer() {
        let c: SparsityConfig = "density:0.3".parse().unwrap();
        assert_eq!(c.threshold, Threshold::Density(0.3));
        assert!(c.prefill_dense && c.mode == Mode::Cached && c.scorer.is_none());
        let e = "x".parse::<SparsityConfig>().unwrap_err().to_string();
        assert_eq!(
            e,
            "bad sparsity spec 'x': expected off, sigma:K, density:D or calibrated"
        );
        assert_eq!(
            "cascade:0.5".parse::<Scorer>().unwrap(),
            Scorer::Cascade { superset: 0.5 }
        );
        assert_eq!("lowrank".parse::<Scorer>().unwrap(), Scorer::LowRank);
        assert!("cascade:0".parse::<Scorer>().is_err());
        assert!("dense".parse::<Scorer>().is_err());
    }
}
