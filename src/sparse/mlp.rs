//! [`SparseMlp`]: the sparse replacement of the dense SwiGLU MLP, plugged into
//! `Llama::forward` through `MlpOverride`. Owns per-layer state (transposed down
//! projection, weight cache, calibrated cut-off), the scoring pipeline of one token
//! (score -> select -> cache update -> sparse kernel) and the achieved-density statistics.

use std::path::Path;

use crate::error::{Error, Result};
use crate::kernels::WeightView;
use crate::kernels::qcols::QColScratch;
use crate::kernels::sparse::{
    Activation, Items, Strided, gate_up_activations, gather_gate_up, sparse_mlp,
};
use crate::kernels::{ThreadPool, matvec_blocks, ops::silu};
use crate::model::llama::{Llama, Mlp, MlpOverride};
use crate::profile::{Phase, lap};
use crate::quant::QK;
use crate::sparse::predictor::{Predictor, PredictorScratch};
use crate::sparse::threshold::{SelectScratch, Threshold, select_top_k, top_k_count};
use crate::sparse::weight_cache::{CacheSource, HugeMatrix, WeightCache, down_t_dtype};
use crate::sparse::{Mode, Scorer, SparsityConfig};
use crate::tensor::transpose_into;
use crate::tensor::{DType, Matrix};

/// `Mode::Cached` updates a layer's cache only when at most this fraction of the mask is
/// missing from it, or when the mask moved by at most this fraction since the previous
/// token (then an empty or stale cache is refilled once and stays close while masks are
/// stable); otherwise the token gathers its rows from the full matrices. Both ways compute
/// the same items in the same order, so the choice never changes the result.
///
/// Why 2%: an update copies the new rows (read, write) on one thread, and the compact
/// rows save little over the gather's prefetched scattered reads. Measured with
/// `bench --components` (2 threads, bf16): on SmolLM2 at `calibrated` (churn 9.4% per
/// token) updating cost 2.4 ms per token and the cached kernel was no faster than the
/// gather (4.80 vs 4.66 ms), so decode fell from 92 to 72 tok/s; at the Llama-3.2-1B
/// shape (density 0.25) updates cost 8.0 ms per token for 1.1 ms saved. About 0.26 ms
/// per token per 1% churn against at most ~1 ms saved: the cache pays below a few percent
/// of churn, and the churn of real text (`eval --json`'s `mask_churn`: 9% to 63%) is above.
pub const DEFAULT_MAX_CHURN: f64 = 0.02;

/// Where a layer's down rows are read from: down_proj transposed, [inter, hidden], row i =
/// neuron i's down column.
enum DownRows {
    /// The model's own down projection, held input-major
    /// ([`crate::model::WeightLayout::DownInputMajor`]): no copy.
    Model,
    /// A transposed copy: one extra copy of the down projection (a third of the MLP's
    /// weight bytes) per layer; Q8_0 for a quantized model other than Q4_0/Q4_1 (see
    /// `down_t_dtype`).
    Copy(HugeMatrix),
    /// `Mode::Blocks` reads the row-major down projection's blocks in place.
    InPlace,
    /// The model's own Q4 down projection held by input column (`Linear::by_column`,
    /// DownInputMajor): computed over the active neurons, exactly as the dense product
    /// of the activations with the inactive ones zeroed. No copy, no weight cache.
    ByColumn,
}

/// One layer's sparse state.
struct LayerState {
    down_t: DownRows,
    cache: WeightCache,
    /// Calibrated cut-off (`calibrated` only).
    cutoff: Option<f32>,
    /// Tokens processed sparsely and neurons kept over them.
    tokens: u64,
    active: u64,
    /// The previous token's mask as a bitset, and over consecutive tokens the neurons
    /// that entered the mask and the mask sizes: the churn the weight cache absorbs.
    prev_mask: Vec<u64>,
    churn_added: u64,
    churn_kept: u64,
}

impl LayerState {
    /// Counts `added`, the neurons of `mask` absent from the previous token's mask
    /// ([`added_since_previous`](Self::added_since_previous), None on this layer's first
    /// token), then remembers `mask`.
    fn record_mask(&mut self, mask: &[u32], added: Option<usize>) {
        if let Some(added) = added {
            self.churn_added += added as u64;
            self.churn_kept += mask.len() as u64;
        }
        self.prev_mask.fill(0);
        for &i in mask {
            self.prev_mask[i as usize / 64] |= 1 << (i % 64);
        }
        self.tokens += 1;
        self.active += mask.len() as u64;
    }

    /// Neurons of `mask` absent from the previous token's mask (None on the first token).
    fn added_since_previous(&self, mask: &[u32]) -> Option<usize> {
        (self.tokens > 0).then(|| {
            mask.iter()
                .filter(|&&i| self.prev_mask[i as usize / 64] >> (i % 64) & 1 == 0)
                .count()
        })
    }
}

/// Reusable per-token buffers.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    cand: Vec<u32>,
    local: Vec<u32>,
    keys: Vec<u32>,
    coefs: Vec<f32>,
    slots: Vec<u32>,
    acc: Vec<f32>,
    hb: Vec<u16>,
    /// Block mode: each 32-neuron group's score, the kept groups, their activations.
    group_scores: Vec<f32>,
    groups: Vec<u32>,
    acts: Vec<f32>,
    select: SelectScratch,
    predictor: PredictorScratch,
    /// A down projection held by column: its kernel's buffers.
    qcols: QColScratch,
}

/// The sparse MLP of a whole model. See the crate's DESIGN.md, "The sparse MLP".
pub struct SparseMlp {
    config: SparsityConfig,
    scorer: Scorer,
    predictor: Option<Predictor>,
    hidden: usize,
    inter: usize,
    layers: Vec<LayerState>,
    /// The mask of the last token processed (ascending neuron indices).
    mask: Vec<u32>,
    /// See [`DEFAULT_MAX_CHURN`].
    max_churn: f64,
    s: Scratch,
}

impl SparseMlp {
    /// Builds the sparse MLP for `model`. Errors (`Error::Input`) when the setting needs a
    /// predictor and none is given, or `calibrated` finds no thresholds in it.
    pub fn new(
        model: &Llama,
        config: SparsityConfig,
        predictor: Option<Predictor>,
    ) -> Result<SparseMlp> {
        let mlps: Vec<&Mlp> = model.layers.iter().map(|l| &l.mlp).collect();
        Self::for_layers(&mlps, config, predictor)
    }

    /// What the CLI calls: `spec` is the SPEC string, `scorer` the `--scorer` value,
    /// `predictor` the `--predictor` file (checked against the model's identity).
    pub fn from_spec(
        model: &Llama,
        spec: &str,
        scorer: Option<&str>,
        predictor: Option<&Path>,
        mode: Mode,
    ) -> Result<SparseMlp> {
        let mut config: SparsityConfig = spec.parse()?;
        config.scorer = scorer.map(str::parse).transpose()?;
        config.mode = mode;
        let predictor = predictor.map(|p| Predictor::load(p, model)).transpose()?;
        Self::new(model, config, predictor)
    }

    /// Builds the sparse MLP over explicit layers (tests and benchmarks use random ones).
    pub fn for_layers(
        mlps: &[&Mlp],
        config: SparsityConfig,
        predictor: Option<Predictor>,
    ) -> Result<SparseMlp> {
        let first = mlps
            .first()
            .ok_or_else(|| Error::Input("a model without layers".into()))?;
        // The scorers, predictors and sparse kernels compute silu(g)·u.
        if first.activation != crate::kernels::ops::Activation::Silu {
            return Err(Error::Input(format!(
                "MLP-neuron sparsity supports SiLU MLPs only, and this model's is {}: use input sparsity (--sparsity teal:S)",
                first.activation.name()
            )));
        }
        let (hidden, inter) = (
            first.gate_proj.in_features(),
            first.gate_proj.out_features(),
        );
        // The cache holds gate/up rows as the model does and the transposed down rows in
        // `down_t_dtype` (Q8_0 for a quantized model: see `WeightCache`).
        let dtype = first.gate_proj.weight.dtype;
        let scorer = match (config.scorer, &predictor) {
            (Some(s), _) => s,
            (None, Some(_)) => Scorer::LowRank,
            (None, None) => Scorer::Exact,
        };
        if config.mode == Mode::Blocks {
            let down = &first.down_proj.weight;
            if down.dtype.qformat().is_none() {
                return Err(Error::Input(format!(
                    "--sparse-mode blocks reads quantized down blocks in place; these weights are {} (use --dtype native with a quantized GGUF, or cached/gather)",
                    down.dtype.name()
                )));
            }
            if let Scorer::Cascade { .. } = scorer {
                return Err(Error::Input(
                    "--sparse-mode blocks works with the exact, lowrank and signed-gate scorers, not cascade".into(),
                ));
            }
        }
        if first.gate_proj.input_major {
            return Err(Error::Input(
                "MLP-neuron sparsity needs the weights row-major (this model was loaded input-major for teal/wina)".into(),
            ));
        }
        let needs_predictor = !matches!(scorer, Scorer::Exact | Scorer::SignedGate);
        if needs_predictor && predictor.as_ref().is_some_and(|p| p.rank == 0) {
            return Err(Error::Input(format!(
                "scorer {scorer} needs low-rank factors, but the predictor file holds only input-sparsity tables"
            )));
        }
        // A file of input-sparsity tables alone has nothing for the MLP: exact scoring
        // does without it, calibrated cut-offs cannot.
        let predictor = match predictor {
            Some(p) if p.layers.is_empty() && p.input.is_some() => {
                if config.threshold == Threshold::Calibrated {
                    return Err(Error::Input(
                        "calibrated (MLP neurons) needs a predictor file with MLP thresholds, but this one holds only input-sparsity tables (calibrate without --input-only)".into(),
                    ));
                }
                None
            }
            p => p,
        };
        if needs_predictor && predictor.is_none() && !config.is_off() {
            return Err(Error::Input(format!(
                "scorer {scorer} needs a predictor file (--predictor)"
            )));
        }
        if let Some(p) = &predictor
            && (p.hidden != hidden || p.intermediate != inter || p.layers.len() != mlps.len())
        {
            return Err(Error::Predictor(format!(
                "predictor shape (hidden {}, intermediate {}, {} layers) does not fit the model (hidden {hidden}, intermediate {inter}, {} layers)",
                p.hidden,
                p.intermediate,
                p.layers.len(),
                mlps.len()
            )));
        }
        let cutoffs: Vec<Option<f32>> = if config.threshold == Threshold::Calibrated {
            match predictor.as_ref().and_then(|p| p.thresholds.as_ref()) {
                Some(t) => t.iter().map(|&v| Some(v)).collect(),
                None => {
                    return Err(Error::Input(
                        "calibrated needs a predictor file with thresholds".into(),
                    ));
                }
            }
        } else {
            vec![None; mlps.len()]
        };
        // The predictor's factors in the model's float dtype (bf16 halves its bytes per
        // token; quantized models use bf16 factors).
        let predictor = predictor.map(|mut p| {
            p.convert_to(Predictor::factor_dtype_for(dtype));
            p
        });
        // Off runs dense: no per-layer state, no transposed copies.
        let layers = if config.is_off() {
            Vec::new()
        } else {
            let with_gate_up = scorer == Scorer::LowRank;
            mlps.iter()
                .zip(cutoffs)
                .map(|(m, cutoff)| LayerState {
                    down_t: if config.mode == Mode::Blocks {
                        DownRows::InPlace
                    } else if m.down_proj.by_column.is_some() {
                        DownRows::ByColumn
                    } else if m.down_proj.input_major {
                        // Only float down projections are held so, in the MLP's dtype.
                        debug_assert_eq!(m.down_proj.weight.dtype, down_t_dtype(dtype));
                        DownRows::Model
                    } else {
                        DownRows::Copy(transpose_matrix(&m.down_proj.weight, down_t_dtype(dtype)))
                    },
                    cache: WeightCache::new(hidden, inter, dtype, with_gate_up),
                    cutoff,
                    tokens: 0,
                    active: 0,
                    prev_mask: vec![0; inter.div_ceil(64)],
                    churn_added: 0,
                    churn_kept: 0,
                })
                .collect()
        };
        Ok(SparseMlp {
            config,
            scorer,
            predictor,
            hidden,
            inter,
            layers,
            mask: Vec::new(),
            max_churn: DEFAULT_MAX_CHURN,
            s: Scratch::default(),
        })
    }

    pub fn config(&self) -> &SparsityConfig {
        &self.config
    }
    pub fn scorer(&self) -> Scorer {
        self.scorer
    }
    pub fn set_prefill_dense(&mut self, dense: bool) {
        self.config.prefill_dense = dense;
    }
    /// Sets the cached mode's churn limit (see [`DEFAULT_MAX_CHURN`]); 1.0 always updates
    /// the cache, 0.0 uses it only when the mask did not change.
    pub fn set_max_churn(&mut self, churn: f64) {
        self.max_churn = churn;
    }

    /// Achieved density over every token and layer processed sparsely since the last
    /// reset (kept neurons / (tokens · layers · intermediate)); None before any.
    pub fn density(&self) -> Option<f64> {
        let tokens: u64 = self.layers.iter().map(|l| l.tokens).sum();
        let active: u64 = self.layers.iter().map(|l| l.active).sum();
        (tokens > 0).then(|| active as f64 / (tokens as f64 * self.inter as f64))
    }

    /// Achieved density per layer (NaN for a layer not yet run sparsely).
    pub fn layer_density(&self) -> Vec<f64> {
        self.layers
            .iter()
            .map(|l| l.active as f64 / (l.tokens as f64 * self.inter as f64))
            .collect()
    }

    /// Neuron row sets copied by the weight caches since creation.
    pub fn rows_copied(&self) -> u64 {
        self.layers.iter().map(|l| l.cache.rows_copied).sum()
    }

    /// Extra bytes this sparse MLP holds: transposed down projections and caches.
    pub fn extra_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let copy = match &l.down_t {
                    DownRows::Copy(d) => d.byte_len(),
                    DownRows::Model | DownRows::InPlace | DownRows::ByColumn => 0,
                };
                copy + l.cache.byte_len()
            })
            .sum()
    }

    /// Mask churn between consecutive tokens: the fraction of a token's active neurons
    /// that were not active for the previous token, over every layer (None before two
    /// tokens). This is what the weight cache copies per token.
    pub fn churn(&self) -> Option<f64> {
        let added: u64 = self.layers.iter().map(|l| l.churn_added).sum();
        let kept: u64 = self.layers.iter().map(|l| l.churn_kept).sum();
        (kept > 0).then(|| added as f64 / kept as f64)
    }

    pub fn reset_stats(&mut self) {
        for l in &mut self.layers {
            l.tokens = 0;
            l.active = 0;
            l.churn_added = 0;
            l.churn_kept = 0;
        }
    }

    /// The mask of the last token processed (ascending neuron indices).
    pub fn last_mask(&self) -> &[u32] {
        &self.mask
    }

    /// Layer `layer`'s MLP on `h` ([n, hidden]) into `out`; false when it should run
    /// dense (`off`, or a multi-token call with `prefill_dense`). One token uses the
    /// configured mode; several tokens each use their own mask, gathered (the cache tracks
    /// the decode stream only).
    pub fn forward(
        &mut self,
        pool: &ThreadPool,
        mlp: &Mlp,
        layer: usize,
        h: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> bool {
        if self.config.is_off() || (n > 1 && self.config.prefill_dense) {
            return false;
        }
        let hd = self.hidden;
        assert_eq!(h.len(), n * hd);
        assert_eq!(out.len(), n * hd);
        let cached = n == 1 && self.config.mode == Mode::Cached;
        for t in 0..n {
            if self.config.mode == Mode::Blocks {
                self.token_blocks(
                    pool,
                    mlp,
                    layer,
                    &h[t * hd..(t + 1) * hd],
                    &mut out[t * hd..(t + 1) * hd],
                );
                continue;
            }
            self.token(
                pool,
                mlp,
                layer,
                &h[t * hd..(t + 1) * hd],
                &mut out[t * hd..(t + 1) * hd],
                cached,
            );
        }
        true
    }

    /// One token: score, select, (update the cache), run the sparse kernel.
    fn token(
        &mut self,
        pool: &ThreadPool,
        mlp: &Mlp,
        layer: usize,
        h: &[f32],
        out: &mut [f32],
        cached: bool,
    ) {
        let (hd, inter) = (self.hidden, self.inter);
        let s = &mut self.s;
        let st = &mut self.layers[layer];
        let gate = Strided::matrix(mlp.gate_proj.weight.view(), hd);
        let up = Strided::matrix(mlp.up_proj.weight.view(), hd);
        let down_view = match &st.down_t {
            DownRows::Model => Some(mlp.down_proj.weight.view()),
            DownRows::Copy(d) => Some(d.view()),
            DownRows::ByColumn => None,
            DownRows::InPlace => unreachable!("block mode does not run token()"),
        };
        s.scores.resize(inter, 0.0);
        // Exact and cascade fill `coefs` (a_i of each kept neuron, in mask order).
        let have_coefs = match self.scorer {
            Scorer::Exact | Scorer::SignedGate => {
                exact_scores(pool, mlp, h, self.scorer, s);
                lap(Phase::Scorer);
                self.config
                    .threshold
                    .select(&s.scores, st.cutoff, &mut s.select, &mut self.mask);
                s.coefs.clear();
                s.coefs.extend(self.mask.iter().map(|&i| s.g[i as usize]));
                lap(Phase::Threshold);
                true
            }
            Scorer::LowRank => {
                let p = self.predictor.as_ref().expect("checked at construction");
                p.scores(pool, layer, h, &mut s.predictor, &mut s.scores);
                lap(Phase::Scorer);
                self.config
                    .threshold
                    .select(&s.scores, st.cutoff, &mut s.select, &mut self.mask);
                lap(Phase::Threshold);
                false
            }
            Scorer::Cascade { superset } => {
                let p = self.predictor.as_ref().expect("checked at construction");
                p.scores(pool, layer, h, &mut s.predictor, &mut s.scores);
                lap(Phase::Scorer);
                let c = top_k_count(superset, inter);
                select_top_k(&s.scores, c, &mut s.keys, &mut s.cand);
                lap(Phase::Threshold);
                s.g.resize(c, 0.0);
                s.u.resize(c, 0.0);
                gather_gate_up(
                    pool,
                    gate,
                    up,
                    &s.cand,
                    h,
                    &mut s.g[..c],
                    &mut s.u[..c],
                    &mut s.hb,
                );
                for k in 0..c {
                    s.scores[k] = (silu(s.g[k]) * s.u[k]).abs();
                }
                lap(Phase::Scorer);
                // The threshold sees the candidates' exact scores; density:D still means
                // ceil(D·inter) neurons of the layer (at most the candidates).
                match self.config.threshold {
                    Threshold::Density(d) => {
                        let k = top_k_count(d, inter).min(c);
                        select_top_k(&s.scores[..c], k, &mut s.keys, &mut s.local);
                    }
                    t => t.select(&s.scores[..c], st.cutoff, &mut s.select, &mut s.local),
                }
                self.mask.clear();
                self.mask
                    .extend(s.local.iter().map(|&k| s.cand[k as usize]));
                s.coefs.clear();
                s.coefs.extend(
                    s.local
                        .iter()
                        .map(|&k| silu(s.g[k as usize]) * s.u[k as usize]),
                );
                lap(Phase::Threshold);
                true
            }
        };
        let Some(down_view) = down_view else {
            // By column: the active neurons' activations, then down over them.
            let by_column = mlp
                .down_proj
                .by_column
                .as_ref()
                .expect("DownRows::ByColumn");
            if !have_coefs {
                let k = self.mask.len();
                s.g.resize(k, 0.0);
                s.u.resize(k, 0.0);
                gather_gate_up(pool, gate, up, &self.mask, h, &mut s.g, &mut s.u, &mut s.hb);
                crate::kernels::ops::silu_mul(&mut s.g, &s.u);
                s.coefs.clear();
                s.coefs.extend_from_slice(&s.g);
            }
            s.acts.clear();
            s.acts.resize(inter, 0.0);
            for (&i, &a) in self.mask.iter().zip(&s.coefs) {
                s.acts[i as usize] = a;
            }
            by_column.matvec_pool(pool, &s.acts, Some(&self.mask), out, &mut s.qcols);
            let added = st.added_since_previous(&self.mask);
            st.record_mask(&self.mask, added);
            lap(Phase::SparseKernel);
            return;
        };
        let down_t = Strided::matrix(down_view, hd);
        // Items in mask order in both paths (and in batched calls), so the cached and
        // the gathered computation agree bit for bit.
        // Use (and update) the cache when it is close to this mask, or when the masks
        // are stable from token to token: then the cache may be far from the mask
        // (empty at first, or stale after a burst of churn that sent tokens to the
        // gather path) but refilling it pays off on the tokens that follow. With churn
        // above the limit on every token, it is never filled.
        let limit = self.max_churn * self.mask.len() as f64;
        let added = st.added_since_previous(&self.mask);
        let use_cache = cached
            && (st.cache.missing(&self.mask) as f64 <= limit
                || added.is_some_and(|added| added as f64 <= limit));
        if cached {
            lap(Phase::CacheUpdate);
        }
        if use_cache {
            let src = CacheSource {
                gate: mlp.gate_proj.weight.view(),
                up: mlp.up_proj.weight.view(),
                down_t: down_t.view,
                hidden: hd,
            };
            st.cache.update(&src, &self.mask);
            st.cache.slots_of(&self.mask, &mut s.slots);
            lap(Phase::CacheUpdate);
            let down = st.cache.down_rows();
            let items = Items::Gather(&s.slots);
            let act = if have_coefs {
                Activation::Given(&s.coefs)
            } else {
                st.cache.activation()
            };
            sparse_mlp(pool, items, act, down, h, out, &mut s.acc);
        } else {
            let items = Items::Gather(&self.mask);
            let act = if have_coefs {
                Activation::Given(&s.coefs)
            } else {
                Activation::Compute { gate, up }
            };
            sparse_mlp(pool, items, act, down_t, h, out, &mut s.acc);
        }
        st.record_mask(&self.mask, added);
        lap(Phase::SparseKernel);
    }

    /// One token in block mode: score neurons, keep whole 32-neuron groups by their summed
    /// scores, compute the kept neurons' activations and read the down projection's blocks
    /// of those groups in place.
    fn token_blocks(
        &mut self,
        pool: &ThreadPool,
        mlp: &Mlp,
        layer: usize,
        h: &[f32],
        out: &mut [f32],
    ) {
        let (hd, inter) = (self.hidden, self.inter);
        let s = &mut self.s;
        let st = &mut self.layers[layer];
        s.scores.resize(inter, 0.0);
        let exact = matches!(self.scorer, Scorer::Exact | Scorer::SignedGate);
        if exact {
            exact_scores(pool, mlp, h, self.scorer, s);
        } else {
            let p = self.predictor.as_ref().expect("checked at construction");
            p.scores(pool, layer, h, &mut s.predictor, &mut s.scores);
        }
        lap(Phase::Scorer);
        s.group_scores.clear();
        s.group_scores
            .extend(s.scores.chunks_exact(QK).map(|c| c.iter().sum::<f32>()));
        match (self.config.threshold, st.cutoff) {
            // As many groups as the calibrated cut keeps neurons, rounded up.
            (Threshold::Calibrated, Some(cut)) => {
                let k = s.scores.iter().filter(|&&v| v > cut).count();
                select_top_k(&s.group_scores, k.div_ceil(QK), &mut s.keys, &mut s.groups);
            }
            (t, cut) => t.select(&s.group_scores, cut, &mut s.select, &mut s.groups),
        }
        self.mask.clear();
        self.mask.extend(
            s.groups
                .iter()
                .flat_map(|&g| g * QK as u32..(g + 1) * QK as u32),
        );
        lap(Phase::Threshold);
        let m = self.mask.len();
        s.acts.clear();
        if exact {
            s.acts.extend(self.mask.iter().map(|&i| s.g[i as usize]));
        } else {
            s.g.resize(m, 0.0);
            s.u.resize(m, 0.0);
            let gate = Strided::matrix(mlp.gate_proj.weight.view(), hd);
            let up = Strided::matrix(mlp.up_proj.weight.view(), hd);
            gather_gate_up(
                pool,
                gate,
                up,
                &self.mask,
                h,
                &mut s.g[..m],
                &mut s.u[..m],
                &mut s.hb,
            );
            s.acts
                .extend(s.g[..m].iter().zip(&s.u[..m]).map(|(&g, &u)| silu(g) * u));
        }
        let down = &mlp.down_proj.weight;
        matvec_blocks(pool, down.view(), hd, inter, &s.groups, &s.acts, out);
        let added = st.added_since_previous(&self.mask);
        st.record_mask(&self.mask, added);
        lap(Phase::SparseKernel);
    }
}

/// The exact scorers: a_i = silu(g_i)·u_i of every neuron into `s.g`, |a_i| into
/// `s.scores` (`SignedGate`: the signed gate pre-activation instead, the original's rank).
fn exact_scores(pool: &ThreadPool, mlp: &Mlp, h: &[f32], scorer: Scorer, s: &mut Scratch) {
    let inter = mlp.gate_proj.out_features();
    s.g.resize(inter, 0.0);
    s.u.resize(inter, 0.0);
    s.scores.resize(inter, 0.0);
    gate_up_activations(
        pool,
        mlp.gate_proj.weight.view(),
        mlp.up_proj.weight.view(),
        h,
        &mut s.g,
        &mut s.u,
        &mut s.scores,
    );
    if scorer == Scorer::SignedGate {
        let w = &mlp.gate_proj.weight;
        crate::kernels::matvec(pool, w.view(), inter, h.len(), h, &mut s.scores);
    }
}

impl MlpOverride for SparseMlp {
    fn forward(
        &mut self,
        model: &Llama,
        layer: usize,
        h: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> bool {
        SparseMlp::forward(self, model.pool, &model.layers[layer].mlp, layer, h, n, out)
    }
}

/// `w` ([rows, cols]) transposed into a new owned [cols, rows] matrix in `dtype` (in a
/// huge-page mapping), in 64 x 64 tiles so both sides stay in cache. Same float dtype:
/// the values are moved bit for bit; otherwise they go through f32 (bf16 survives
/// exactly; a quantized target is quantized from the transposed values).
pub fn transpose_matrix(w: &Matrix, dtype: DType) -> HugeMatrix {
    let (rows, cols) = (w.rows, w.cols);
    let mut t = HugeMatrix::zeroed(cols, rows, dtype);
    match (w.view(), dtype) {
        (WeightView::F32(src), DType::F32) => {
            transpose_into(src, rows, cols, bytemuck::cast_slice_mut(t.bytes_mut()))
        }
        (WeightView::Bf16(src), DType::BF16) => {
            transpose_into(src, rows, cols, bytemuck::cast_slice_mut(t.bytes_mut()))
        }
        (WeightView::F16(src), DType::F16) => {
            transpose_into(src, rows, cols, bytemuck::cast_slice_mut(t.bytes_mut()))
        }
        _ => {
            // Through f32: quantized targets are quantized from the transposed values.
            let mut tf = vec![0f32; rows * cols];
            transpose_into(&w.to_f32_vec(), rows, cols, &mut tf);
            crate::tensor::encode_f32(&tf, dtype, t.bytes_mut());
        }
    }
    t
}
