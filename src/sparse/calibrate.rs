//! Calibration of the low-rank neuron-score predictors from text (DESIGN.md, "The sparse
//! MLP"). Owns the whole `calibrate` pipeline: recording the MLP inputs `h` of every layer
//! during a dense pass, the closed-form data-aware fit of `A`, `B`, the per-layer fit
//! report (relative error, recall, density), and the per-layer cut-offs of the `calibrated`
//! threshold together with the rule that picks them (see [`calibrate`]).
//!
//! The fit: with `C = E[h hᵀ] + λ·I` (`λ = ridge·tr(E[h hᵀ])/hidden`) `= L Lᵀ` and the thin
//! SVD `Lᵀ Wᵀ = P S Qᵀ` (`W`: a projection's weight [inter, hidden]), `A = L⁻ᵀ P_r S_r` and
//! `B = Q_rᵀ` minimise `E‖h Wᵀ − h A B‖²` over rank `r` (the regularised objective's exact
//! optimum). `faer` does the algebra in f64; nothing of faer is in the public API.

use std::collections::BTreeMap;
use std::fmt;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::kernels::{WeightView, ops::silu};
use crate::model::{Llama, Logits, MlpOverride};
use crate::sparse::predictor::{LayerPredictor, LowRank, Predictor, model_identity, transpose};
use crate::sparse::{Scorer, SparseMlp, SparsityConfig, Threshold};

/// What [`calibrate`] does; [`Default`] is the recommended setting.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationOptions {
    /// Rank of the gate predictors.
    pub rank: usize,
    /// Rank of the up predictors; 0 fits none (scores are then `|silu(ĝ)|`).
    pub up_rank: usize,
    /// At most this many tokens of the text are used (fit and held-out together).
    pub max_tokens: usize,
    /// Tokens per forward window (a fresh KV cache each); also the evaluation window of
    /// the held-out quality check.
    pub window: usize,
    /// Ridge, relative to the mean eigenvalue: `C + ridge·tr(C)/hidden·I`.
    pub ridge: f64,
    /// Quality budget of `calibrated`: allowed relative perplexity increase over dense on
    /// the held-out windows (0.05 = +5%).
    pub budget: f64,
    /// Fraction of the windows held out from the fit (at least one window): the report,
    /// the thresholds and the budget are measured on them only.
    pub heldout_fraction: f64,
    /// MLP inputs kept per layer from the held-out windows for the report and the score
    /// quantiles (evenly spaced tokens); memory: layers·this·hidden·4 bytes.
    pub sample_tokens: usize,
    /// The scorer the `calibrated` cut-offs are for (they are cut-offs on its scores):
    /// `lowrank` (the default scorer of a predictor file), `cascade` or `exact`.
    pub scorer: Scorer,
    /// Density at which the report's recall is measured (per-token top-k).
    pub report_density: f64,
    /// Multiply the up predictor's output of neuron i by `‖W_down[:, i]‖`, so that the
    /// score estimates the neuron's contribution to the MLP's output norm (needs an up
    /// predictor; folded into `B_up`, the file format is unchanged).
    pub weight_by_down_norm: bool,
    /// Lowest per-layer density the allocation may reach.
    pub min_density: f64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            rank: 128,
            up_rank: 128,
            max_tokens: 8192,
            window: 512,
            ridge: 1e-3,
            budget: 0.05,
            heldout_fraction: 0.25,
            sample_tokens: 1024,
            scorer: Scorer::LowRank,
            report_density: 0.5,
            weight_by_down_norm: true,
            min_density: 0.05,
        }
    }
}

/// The stages [`calibrate`] reports progress in (for a progress bar: `(stage, done, total)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Dense forward passes over the windows, recording MLP inputs.
    Record,
    /// Cholesky and SVD per layer.
    Fit,
    /// Fit quality and score quantiles on the held-out sample, per layer.
    Report,
    /// One sparse layer at a time on a held-out window (per-layer sensitivity).
    Sensitivity,
    /// Held-out perplexity of candidate allocations (bisection).
    Search,
    /// The final check through `SparseMlp` with the `calibrated` spec.
    Verify,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Record => "record",
            Stage::Fit => "fit",
            Stage::Report => "report",
            Stage::Sensitivity => "sensitivity",
            Stage::Search => "search",
            Stage::Verify => "verify",
        })
    }
}

/// Fit quality and calibrated cut-off of one layer, measured on the held-out sample.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub layer: usize,
    /// `‖g − ĝ‖ / ‖g‖` (Frobenius over the sample).
    pub gate_rel_err: f64,
    /// `‖u − û‖ / ‖u‖`, with an up predictor (before any down-norm weighting).
    pub up_rel_err: Option<f64>,
    /// Mean over tokens of |predicted top-k ∩ true top-k| / k at `report_density`, true
    /// ranking by `|silu(g_i)·u_i|`, predicted by the low-rank score.
    pub recall: f64,
    /// The layer's calibrated density (mean kept fraction on the sample).
    pub density: f64,
    /// Recall at the calibrated density: kept ∩ (true top |kept|) / |kept|, per token.
    pub recall_calibrated: f64,
    /// The cut-off on the scorer's scores (`-1`: keep all).
    pub threshold: f32,
    /// Held-out KL (dense ‖ sparse) per token with this layer alone sparse at the
    /// sensitivity density (NaN when not measured).
    pub sensitivity_kl: f64,
}

/// What [`calibrate`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibrationReport {
    pub fit_tokens: usize,
    pub heldout_tokens: usize,
    /// sha256 of the calibration token ids (little-endian u32s), see [`ids_sha256`].
    pub ids_sha256: String,
    pub scorer: String,
    pub budget: f64,
    /// Dense perplexity of the held-out windows (second-half method).
    pub heldout_ppl_dense: f64,
    /// `calibrated` through `SparseMlp` on the held-out windows (second-half method).
    pub heldout_ppl_sparse: f64,
    /// `heldout_ppl_sparse / heldout_ppl_dense`.
    pub heldout_ppl_ratio: f64,
    pub heldout_kl: f64,
    pub heldout_top1: f64,
    /// Achieved MLP density of that run (mean over layers and tokens).
    pub mean_density: f64,
    /// False when even the densest allocation misses the budget (the file then holds it).
    pub budget_met: bool,
    pub layers: Vec<LayerReport>,
}

/// Lower-case hex sha256 of token ids, each as 4 little-endian bytes.
pub fn ids_sha256(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Running `Σ h hᵀ` (f64) over rows `h` of width `hidden`.
pub struct Covariance {
    hidden: usize,
    sum: Mat<f64>,
    count: usize,
}

impl Covariance {
    pub fn new(hidden: usize) -> Covariance {
        Covariance {
            hidden,
            sum: Mat::zeros(hidden, hidden),
            count: 0,
        }
    }

    /// Adds rows `h` ([n, hidden], row-major).
    pub fn add_rows(&mut self, h: &[f32], n: usize) {
        let d = self.hidden;
        assert_eq!(h.len(), n * d, "add_rows: size");
        const CHUNK: usize = 1024;
        for start in (0..n).step_by(CHUNK) {
            let m = CHUNK.min(n - start);
            let x = Mat::<f64>::from_fn(m, d, |i, j| h[(start + i) * d + j] as f64);
            matmul(
                self.sum.as_mut(),
                Accum::Add,
                x.transpose(),
                x.as_ref(),
                1.0,
                Par::rayon(0),
            );
        }
        self.count += n;
    }

    /// Rows added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `E[h hᵀ]`, row-major [hidden, hidden] (zeros before any row).
    pub fn second_moment(&self) -> Vec<f64> {
        let d = self.hidden;
        let s = 1.0 / self.count.max(1) as f64;
        let mut out = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                out[i * d + j] = self.sum[(i, j)] * s;
            }
        }
        out
    }
}

/// A fitted factorisation `Wᵀ ≈ A·B` in the predictor file layout.
pub struct LowRankFit {
    pub rank: usize,
    /// [hidden, rank], row-major.
    pub a: Vec<f32>,
    /// [rank, out], row-major.
    pub b: Vec<f32>,
    /// The singular values of `Lᵀ Wᵀ` (all of them, descending).
    pub singular_values: Vec<f64>,
}

/// The data-aware rank-`rank` fit of `w` ([out, hidden], row-major) for inputs with second
/// moment `second_moment` ([hidden, hidden], row-major, e.g. [`Covariance::second_moment`]).
/// With the identity as second moment and no ridge this is the plain truncated SVD of `W`.
pub fn fit_low_rank(
    second_moment: &[f64],
    hidden: usize,
    w: &[f32],
    out: usize,
    rank: usize,
    ridge: f64,
) -> Result<LowRankFit> {
    if second_moment.len() != hidden * hidden || w.len() != out * hidden {
        return Err(Error::Input(format!(
            "fit_low_rank: sizes {} and {} do not match hidden {hidden}, out {out}",
            second_moment.len(),
            w.len()
        )));
    }
    if rank == 0 || rank > hidden.min(out) {
        return Err(Error::Input(format!(
            "rank {rank} is not in 1..={}",
            hidden.min(out)
        )));
    }
    let trace: f64 = (0..hidden).map(|i| second_moment[i * hidden + i]).sum();
    if !(trace > 0.0 && trace.is_finite()) {
        return Err(Error::Predictor(format!(
            "the inputs' second moment has trace {trace}: no (finite) calibration data"
        )));
    }
    let lambda = ridge.max(0.0) * trace / hidden as f64;
    let c = Mat::<f64>::from_fn(hidden, hidden, |i, j| {
        // Symmetrised: the accumulated sum is symmetric up to rounding.
        0.5 * (second_moment[i * hidden + j] + second_moment[j * hidden + i])
            + if i == j { lambda } else { 0.0 }
    });
    let llt = c.llt(Side::Lower).map_err(|e| {
        Error::Predictor(format!(
            "the inputs' second moment is not positive definite ({e:?}); raise the ridge"
        ))
    })?;
    let l = llt.L();
    let wt = Mat::<f64>::from_fn(hidden, out, |i, j| w[j * hidden + i] as f64);
    let mut m = Mat::<f64>::zeros(hidden, out);
    matmul(
        m.as_mut(),
        Accum::Replace,
        l.transpose(),
        wt.as_ref(),
        1.0,
        Par::rayon(0),
    );
    let svd = m
        .thin_svd()
        .map_err(|e| Error::Predictor(format!("SVD did not converge ({e:?})")))?;
    let (p, s, q) = (svd.U(), svd.S().column_vector(), svd.V());
    let singular_values: Vec<f64> = (0..s.nrows()).map(|k| s[k]).collect();
    // A = L^-T P_r S_r: solve Lᵀ X = P_r S_r (Lᵀ is upper triangular).
    let mut x = Mat::<f64>::from_fn(hidden, rank, |i, k| p[(i, k)] * s[k]);
    l.transpose().solve_upper_triangular_in_place(x.as_mut());
    let mut a = vec![0f32; hidden * rank];
    for i in 0..hidden {
        for k in 0..rank {
            a[i * rank + k] = x[(i, k)] as f32;
        }
    }
    let mut b = vec![0f32; rank * out];
    for k in 0..rank {
        for j in 0..out {
            b[k * out + j] = q[(j, k)] as f32;
        }
    }
    if a.iter().chain(&b).any(|v| !v.is_finite()) {
        return Err(Error::Predictor(
            "the fit produced non-finite values; raise the ridge".into(),
        ));
    }
    Ok(LowRankFit {
        rank,
        a,
        b,
        singular_values,
    })
}

/// Records MLP inputs during dense forward passes (always lets the dense MLP run).
struct Recorder {
    /// Accumulate into `covs` (fit windows) or keep rows `keep` into `sample`.
    fit: bool,
    covs: Vec<Covariance>,
    keep: Vec<bool>,
    sample: Vec<Vec<f32>>,
}

impl MlpOverride for Recorder {
    fn forward(&mut self, _: &Llama, layer: usize, h: &[f32], n: usize, _: &mut [f32]) -> bool {
        if self.fit {
            self.covs[layer].add_rows(h, n);
        } else {
            let d = h.len() / n;
            for t in (0..n).filter(|&t| self.keep[t]) {
                self.sample[layer].extend_from_slice(&h[t * d..(t + 1) * d]);
            }
        }
        false
    }
}

/// One layer's fitted predictors in matmul layout (`Aᵀ` [r, hidden], `Bᵀ` [inter, r]).
struct Factors {
    rank: usize,
    at: Vec<f32>,
    bt: Vec<f32>,
}

impl Factors {
    fn from_fit(f: &LowRankFit, hidden: usize, inter: usize) -> Factors {
        let r = f.rank;
        Factors {
            rank: r,
            at: transpose(&f.a, hidden, r),
            bt: transpose(&f.b, r, inter),
        }
    }

    /// `(h·A)·B` for `n` rows: [n, inter].
    fn apply(&self, model: &Llama, h: &[f32], n: usize) -> Vec<f32> {
        let hidden = h.len() / n;
        let inter = self.bt.len() / self.rank;
        let mut z = vec![0f32; n * self.rank];
        crate::kernels::matmul(
            model.pool,
            WeightView::F32(&self.at),
            self.rank,
            hidden,
            h,
            n,
            &mut z,
        );
        let mut out = vec![0f32; n * inter];
        crate::kernels::matmul(
            model.pool,
            WeightView::F32(&self.bt),
            inter,
            self.rank,
            &z,
            n,
            &mut out,
        );
        out
    }

    fn to_low_rank(&self, hidden: usize, inter: usize) -> LowRank {
        let r = self.rank;
        let a = transpose(&self.at, r, hidden);
        let b = transpose(&self.bt, inter, r);
        LowRank::from_ab(&a, &b, hidden, r, inter)
    }
}

struct LayerFactors {
    gate: Factors,
    up: Option<Factors>,
}

/// Exact `g` and `u` of `n` rows through a layer's dense projections: ([n, inter] twice).
fn exact_gu(model: &Llama, layer: usize, h: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let mlp = &model.layers[layer].mlp;
    let inter = mlp.gate_proj.out_features();
    let (mut g, mut u) = (vec![0f32; n * inter], vec![0f32; n * inter]);
    mlp.gate_proj.forward(model.pool, h, n, &mut g);
    mlp.up_proj.forward(model.pool, h, n, &mut u);
    (g, u)
}

/// The low-rank scores `|silu(ĝ)·û|` (or `|silu(ĝ)|`) of `n` rows: [n, inter].
fn lowrank_scores(model: &Llama, f: &LayerFactors, h: &[f32], n: usize) -> Vec<f32> {
    let mut s = f.gate.apply(model, h, n);
    match &f.up {
        Some(up) => {
            let u = up.apply(model, h, n);
            for (s, u) in s.iter_mut().zip(&u) {
                *s = (silu(*s) * u).abs();
            }
        }
        None => s.iter_mut().for_each(|s| *s = silu(*s).abs()),
    }
    s
}

/// The scores a scorer thresholds, for `n` rows: [n, inter]. Cascade: exact scores of the
/// candidates (top `superset` by low-rank score), `-inf` elsewhere (never kept).
fn scorer_scores(
    model: &Llama,
    scorer: Scorer,
    f: &LayerFactors,
    h: &[f32],
    n: usize,
    g: &[f32],
    u: &[f32],
) -> Vec<f32> {
    let exact = || -> Vec<f32> {
        g.iter()
            .zip(u)
            .map(|(&g, &u)| (silu(g) * u).abs())
            .collect()
    };
    match scorer {
        Scorer::Exact => exact(),
        // The original project's ranking: the signed gate pre-activation.
        Scorer::SignedGate => g.to_vec(),
        Scorer::LowRank => lowrank_scores(model, f, h, n),
        Scorer::Cascade { superset } => {
            let inter = g.len() / n;
            let pred = lowrank_scores(model, f, h, n);
            let c = crate::sparse::threshold::top_k_count(superset, inter);
            let mut s = vec![f32::NEG_INFINITY; n * inter];
            let (mut idx, mut cand) = (Vec::new(), Vec::new());
            for t in 0..n {
                let row = t * inter..(t + 1) * inter;
                crate::sparse::threshold::select_top_k(&pred[row], c, &mut idx, &mut cand);
                for &i in &cand {
                    let i = t * inter + i as usize;
                    s[i] = (silu(g[i]) * u[i]).abs();
                }
            }
            s
        }
    }
}

/// The sparse MLP as a masked dense one, batched: per row, neurons with score > cut-off
/// keep `silu(g)·u`, the others are zeroed. Computes what `SparseMlp` with per-layer
/// cut-offs computes (up to rounding), at prefill speed; used to search the allocation.
struct MaskedMlp<'a> {
    factors: &'a [LayerFactors],
    scorer: Scorer,
    cutoffs: Vec<f32>,
    /// Only this layer is sparse (sensitivity runs).
    only: Option<usize>,
    kept: u64,
    total: u64,
}

impl MlpOverride for MaskedMlp<'_> {
    fn forward(
        &mut self,
        model: &Llama,
        layer: usize,
        h: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> bool {
        if self.only.is_some_and(|l| l != layer) {
            return false;
        }
        let cut = self.cutoffs[layer];
        let mlp = &model.layers[layer].mlp;
        let inter = mlp.gate_proj.out_features();
        self.total += (n * inter) as u64;
        if cut < 0.0 && !matches!(self.scorer, Scorer::Cascade { .. }) {
            self.kept += (n * inter) as u64;
            return false;
        }
        let (mut g, u) = exact_gu(model, layer, h, n);
        let s = scorer_scores(model, self.scorer, &self.factors[layer], h, n, &g, &u);
        let mut kept = 0u64;
        for ((g, &u), &s) in g.iter_mut().zip(&u).zip(&s) {
            if s > cut {
                *g = silu(*g) * u;
                kept += 1;
            } else {
                *g = 0.0;
            }
        }
        self.kept += kept;
        mlp.down_proj.forward(model.pool, &g, n, out);
        true
    }
}

/// Log-softmax of each row of `logits` ([rows, vocab]) in place.
fn log_softmax_rows(logits: &mut [f32], vocab: usize) {
    for row in logits.chunks_mut(vocab) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        row.iter_mut().for_each(|l| *l = (*l as f64 - lse) as f32);
    }
}

/// Second-half NLL sum and count of one window (eval.rs's method), from its logits.
fn second_half_nll(logits: &mut [f32], chunk: &[u32], vocab: usize) -> (f64, usize) {
    log_softmax_rows(logits, vocab);
    let w = chunk.len();
    let (mut nll, mut n) = (0f64, 0usize);
    for i in w / 2..w - 1 {
        nll -= logits[i * vocab + chunk[i + 1] as usize] as f64;
        n += 1;
    }
    (nll, n)
}

/// Per-layer data of the allocation: on a density grid `j/GRID`, the proxy error of
/// keeping the top `j/GRID` of the sample's scores and the cut-off that keeps them.
const GRID: usize = 40;
struct LayerCurve {
    /// E over tokens of Σ over dropped neurons (a_i·‖W_down[:, i]‖)², by grid index.
    err: Vec<f64>,
    /// The cut-off keeping that fraction (`-1`: keep everything scorable).
    cut: Vec<f32>,
}

fn layer_curve(scores: &[f32], cost: &[f32], tokens: usize) -> LayerCurve {
    let total = scores.len();
    let mut order: Vec<u32> = (0..total as u32).collect();
    order.sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
    let mut prefix = vec![0f64; total + 1];
    for (k, &i) in order.iter().enumerate() {
        prefix[k + 1] = prefix[k] + cost[i as usize] as f64;
    }
    let all = prefix[total];
    let (mut err, mut cut) = (Vec::new(), Vec::new());
    for j in 0..=GRID {
        let k = ((j as f64 / GRID as f64) * total as f64).round() as usize;
        err.push((all - prefix[k.min(total)]) / tokens as f64);
        let c = if k >= total {
            -1.0
        } else {
            let v = scores[order[k] as usize];
            if v.is_finite() { v.max(0.0) } else { -1.0 }
        };
        cut.push(c);
    }
    LayerCurve { err, cut }
}

/// Mean per-token recall of `pred` against `truth` ([n, inter] each): for each token, the
/// fraction of the true top-k (k = `k_of(token)`) that the predicted top-k contains.
fn recall(pred: &[f32], truth: &[f32], inter: usize, k_of: impl Fn(usize) -> usize) -> f64 {
    let n = pred.len() / inter;
    let (mut idx, mut p, mut t) = (Vec::new(), Vec::new(), Vec::new());
    let mut sum = 0f64;
    let mut counted = 0usize;
    for tok in 0..n {
        let k = k_of(tok);
        if k == 0 {
            continue;
        }
        let row = tok * inter..(tok + 1) * inter;
        crate::sparse::threshold::select_top_k(&pred[row.clone()], k, &mut idx, &mut p);
        crate::sparse::threshold::select_top_k(&truth[row], k, &mut idx, &mut t);
        // Both ascending: count the intersection by merging.
        let (mut i, mut j, mut both) = (0, 0, 0usize);
        while i < p.len() && j < t.len() {
            match p[i].cmp(&t[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    both += 1;
                    i += 1;
                    j += 1;
                }
            }
        }
        sum += both as f64 / k as f64;
        counted += 1;
    }
    if counted == 0 {
        1.0
    } else {
        sum / counted as f64
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (x as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Fits low-rank predictors of gate (and up) for every layer of `model` from the token ids
/// of a calibration text, chooses the `calibrated` cut-offs, and verifies them.
///
/// The ids (at most `max_tokens`) are cut into windows of `window` tokens, each run alone
/// (fresh cache). The last `heldout_fraction` of the windows (at least one) are held out:
/// the fit sees only the others; the report, the cut-offs and the budget are measured on the
/// held-out ones only. Never calibrate on the text you evaluate on.
///
/// **The rule for `calibrated`** (cut-offs on the scores of `opts.scorer`): a per-layer
/// density allocation is chosen greedily, TEAL-style, then each layer's density becomes the
/// cut-off `t_l` = the score quantile of the held-out sample that keeps that fraction (so
/// `s_i > t_l` keeps about `d_l` of the neurons on average, more on tokens with many large
/// scores, fewer on others). The greedy: every layer starts dense (at the cascade's superset
/// for `cascade`); each step lowers by 1/40 the density of the layer whose step adds the
/// least estimated quality loss, where a layer's loss at density d is its proxy error
/// `E Σ_dropped (a_i·‖W_down[:, i]‖)²` (`a_i = silu(g_i)·u_i`, exact, on the held-out
/// sample) scaled by the layer's measured sensitivity (held-out KL with that layer alone at
/// density 0.5, divided by its proxy error there). Along this sequence of allocations
/// (mean density falling), a bisection on the measured held-out perplexity (second-half
/// method, sparse at every position) picks the lowest-density allocation within
/// `1 + budget` times the dense perplexity; no layer goes below `min_density`. The result is
/// checked through [`SparseMlp`] (`calibrated`, prefill not dense) on the held-out windows
/// and the allocation backed off while that check misses the budget.
///
/// `progress(stage, done, total)` is called as each stage advances.
pub fn calibrate(
    model: &Llama,
    ids: &[u32],
    opts: &CalibrationOptions,
    mut progress: impl FnMut(Stage, usize, usize),
) -> Result<(Predictor, CalibrationReport)> {
    let cfg = &model.config;
    let (hidden, inter, nl) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers);
    if cfg.activation != crate::kernels::ops::Activation::Silu {
        return Err(Error::Input(format!(
            "calibration fits predictors of silu(g)·u; this model's MLP uses {}",
            cfg.activation.name()
        )));
    }
    let max_rank = hidden.min(inter);
    if opts.rank == 0 || opts.rank > max_rank || opts.up_rank > max_rank {
        return Err(Error::Input(format!(
            "ranks {} / {} (gate / up) must be in 1..={max_rank} / 0..={max_rank}",
            opts.rank, opts.up_rank
        )));
    }
    if opts.window < 4 || opts.window > cfg.max_position_embeddings {
        return Err(Error::Input(format!(
            "calibration window {} is not in 4..={}",
            opts.window, cfg.max_position_embeddings
        )));
    }
    let valid_budget = opts.budget > 0.0 && opts.budget.is_finite();
    if !valid_budget || opts.ridge.is_nan() || opts.ridge < 0.0 {
        return Err(Error::Input(format!(
            "budget {} must be > 0 and ridge {} >= 0",
            opts.budget, opts.ridge
        )));
    }
    let unit = |x: f64| x > 0.0 && x <= 1.0;
    if !(0.0..1.0).contains(&opts.heldout_fraction)
        || !unit(opts.min_density)
        || !unit(opts.report_density)
    {
        return Err(Error::Input(
            "heldout_fraction must be in [0, 1), min_density and report_density in (0, 1]".into(),
        ));
    }
    if let Scorer::Cascade { superset } = opts.scorer
        && superset < opts.min_density
    {
        return Err(Error::Input(format!(
            "cascade superset {superset} is below min_density {}",
            opts.min_density
        )));
    }
    let ids = &ids[..ids.len().min(opts.max_tokens)];
    let windows: Vec<&[u32]> = ids.chunks_exact(opts.window).collect();
    if windows.len() < 2 {
        return Err(Error::Input(format!(
            "the calibration text has {}: at least 2 windows of {} are needed (one to fit, one held out)",
            crate::progress::count(ids.len(), "token"),
            opts.window
        )));
    }
    let n_held = ((windows.len() as f64 * opts.heldout_fraction).round() as usize)
        .clamp(1, windows.len() - 1);
    let (fit_w, held_w) = windows.split_at(windows.len() - n_held);
    let used = &ids[..windows.len() * opts.window];

    // 1. Record: Σ h hᵀ over the fit windows, a token sample of the held-out ones.
    let held_tokens = n_held * opts.window;
    let stride = held_tokens.div_ceil(opts.sample_tokens.max(1));
    let mut rec = Recorder {
        fit: true,
        covs: (0..nl).map(|_| Covariance::new(hidden)).collect(),
        keep: Vec::new(),
        sample: vec![Vec::new(); nl],
    };
    let mut dense_nll = Vec::with_capacity(n_held);
    for (w, chunk) in windows.iter().enumerate() {
        progress(Stage::Record, w, windows.len());
        rec.fit = w < fit_w.len();
        let logits = if rec.fit {
            Logits::None
        } else {
            let base = (w - fit_w.len()) * opts.window;
            rec.keep = (0..opts.window)
                .map(|t| (base + t).is_multiple_of(stride))
                .collect();
            Logits::All
        };
        let mut cache = model.new_cache();
        let mut out = model.forward(chunk, &mut cache, logits, Some(&mut rec))?;
        if !rec.fit {
            dense_nll.push(second_half_nll(&mut out, chunk, cfg.vocab_size));
        }
    }
    progress(Stage::Record, windows.len(), windows.len());
    let n_sample = rec.sample[0].len() / hidden;

    // 2. Fit.
    let mut factors = Vec::with_capacity(nl);
    let mut wbuf = vec![0f32; inter * hidden];
    let mut row = vec![0f32; hidden.max(inter)];
    let mut down_norms = Vec::with_capacity(nl);
    for (l, cov) in rec.covs.iter().enumerate() {
        progress(Stage::Fit, l, nl);
        let c = cov.second_moment();
        let mlp = &model.layers[l].mlp;
        let mut fit = |m: &crate::tensor::Matrix, rank: usize| -> Result<Factors> {
            for r in 0..inter {
                m.row_to_f32(r, &mut wbuf[r * hidden..(r + 1) * hidden]);
            }
            let f = fit_low_rank(&c, hidden, &wbuf, inter, rank, opts.ridge)
                .map_err(|e| Error::Predictor(format!("layer {l}: {e}")))?;
            Ok(Factors::from_fit(&f, hidden, inter))
        };
        let gate = fit(&mlp.gate_proj.weight, opts.rank)?;
        let up = (opts.up_rank > 0)
            .then(|| fit(&mlp.up_proj.weight, opts.up_rank))
            .transpose()?;
        // ‖W_down[:, i]‖ from the rows of W_down [hidden, inter].
        let mut norms = vec![0f64; inter];
        for r in 0..hidden {
            mlp.down_proj.weight.row_to_f32(r, &mut row[..inter]);
            for (n, &v) in norms.iter_mut().zip(&row[..inter]) {
                *n += (v as f64).powi(2);
            }
        }
        down_norms.push(norms.iter().map(|v| v.sqrt() as f32).collect::<Vec<f32>>());
        factors.push(LayerFactors { gate, up });
    }
    progress(Stage::Fit, nl, nl);
    drop(rec.covs);

    // 3. Report and score curves on the held-out sample (before weighting: true û errors).
    let mut reports = Vec::with_capacity(nl);
    let mut curves = Vec::with_capacity(nl);
    let k_report = crate::sparse::threshold::top_k_count(opts.report_density, inter);
    for l in 0..nl {
        progress(Stage::Report, l, nl);
        let h = &rec.sample[l];
        let f = &mut factors[l];
        let (g, u) = exact_gu(model, l, h, n_sample);
        let gate_rel_err = rel_err(&g, &f.gate.apply(model, h, n_sample));
        let up_rel_err =
            f.up.as_ref()
                .map(|up| rel_err(&u, &up.apply(model, h, n_sample)));
        if opts.weight_by_down_norm
            && let Some(up) = &mut f.up
        {
            for (j, &n) in down_norms[l].iter().enumerate() {
                up.bt[j * up.rank..(j + 1) * up.rank]
                    .iter_mut()
                    .for_each(|v| *v *= n);
            }
        }
        let truth: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| (silu(g) * u).abs())
            .collect();
        let pred = lowrank_scores(model, f, h, n_sample);
        let rec_at = recall(&pred, &truth, inter, |_| k_report);
        let s = scorer_scores(model, opts.scorer, f, h, n_sample, &g, &u);
        let cost: Vec<f32> = truth
            .chunks(inter)
            .flat_map(|t| t.iter().zip(&down_norms[l]).map(|(&a, &n)| (a * n).powi(2)))
            .collect();
        curves.push(layer_curve(&s, &cost, n_sample));
        reports.push(LayerReport {
            layer: l,
            gate_rel_err,
            up_rel_err,
            recall: rec_at,
            density: 1.0,
            recall_calibrated: 1.0,
            threshold: -1.0,
            sensitivity_kl: f64::NAN,
        });
    }
    progress(Stage::Report, nl, nl);

    // 4a. Sensitivity: each layer alone at density 0.5 (of the scorable range) on the
    // start of the first held-out window, KL to dense.
    let top = match opts.scorer {
        Scorer::Cascade { superset } => ((superset * GRID as f64).floor() as usize).min(GRID),
        _ => GRID,
    };
    let bottom = ((opts.min_density * GRID as f64).ceil() as usize).clamp(1, top);
    let j_probe = (GRID / 2).clamp(bottom, top);
    // At most 256 tokens: the sensitivity only has to rank the layers.
    let sens_chunk = &held_w[0][..opts.window.min(256)];
    let vocab = cfg.vocab_size;
    let mut dense_lp = model.forward(sens_chunk, &mut model.new_cache(), Logits::All, None)?;
    log_softmax_rows(&mut dense_lp, vocab);
    let base_cut: Vec<f32> = curves.iter().map(|c| c.cut[top]).collect();
    let mut weights = vec![1f64; nl];
    for l in 0..nl {
        progress(Stage::Sensitivity, l, nl);
        let mut cutoffs = base_cut.clone();
        cutoffs[l] = curves[l].cut[j_probe];
        let mut o = MaskedMlp {
            factors: &factors,
            scorer: opts.scorer,
            cutoffs,
            only: Some(l),
            kept: 0,
            total: 0,
        };
        let mut lp = model.forward(
            sens_chunk,
            &mut model.new_cache(),
            Logits::All,
            Some(&mut o),
        )?;
        log_softmax_rows(&mut lp, vocab);
        let mut kl = 0f64;
        for (p, q) in dense_lp.chunks(vocab).zip(lp.chunks(vocab)) {
            kl += p
                .iter()
                .zip(q)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum::<f64>();
        }
        let kl = (kl / sens_chunk.len() as f64).max(1e-9);
        reports[l].sensitivity_kl = kl;
        let proxy = curves[l].err[j_probe] - curves[l].err[top];
        weights[l] = if proxy > 0.0 { kl / proxy } else { 0.0 };
    }
    progress(Stage::Sensitivity, nl, nl);
    // Layers whose proxy said nothing borrow the median factor.
    let mut ws: Vec<f64> = weights.iter().copied().filter(|&w| w > 0.0).collect();
    ws.sort_by(f64::total_cmp);
    let median = ws.get(ws.len() / 2).copied().unwrap_or(1.0);
    weights
        .iter_mut()
        .filter(|w| **w <= 0.0)
        .for_each(|w| *w = median);

    // 4b. Greedy sequence of allocations.
    let mut j = vec![top; nl];
    let mut steps = Vec::new();
    loop {
        let best = (0..nl)
            .filter(|&l| j[l] > bottom)
            .map(|l| {
                let c = &curves[l].err;
                (l, weights[l] * (c[j[l] - 1] - c[j[l]]))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        match best {
            Some((l, _)) => {
                j[l] -= 1;
                steps.push(l);
            }
            None => break,
        }
    }
    let alloc = |k: usize| -> Vec<usize> {
        let mut j = vec![top; nl];
        steps[..k].iter().for_each(|&l| j[l] -= 1);
        j
    };
    let cutoffs_of =
        |j: &[usize]| -> Vec<f32> { j.iter().zip(&curves).map(|(&j, c)| c.cut[j]).collect() };
    let dense_half: (f64, usize) = dense_nll
        .iter()
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let ppl_dense = (dense_half.0 / dense_half.1 as f64).exp();
    let search_ratio = |k: usize| -> Result<f64> {
        let mut o = MaskedMlp {
            factors: &factors,
            scorer: opts.scorer,
            cutoffs: cutoffs_of(&alloc(k)),
            only: None,
            kept: 0,
            total: 0,
        };
        let (mut nll, mut n) = (0f64, 0usize);
        for chunk in held_w {
            let mut lg = model.forward(chunk, &mut model.new_cache(), Logits::All, Some(&mut o))?;
            let (a, b) = second_half_nll(&mut lg, chunk, vocab);
            nll += a;
            n += b;
        }
        Ok((nll / n as f64).exp() / ppl_dense)
    };
    // 4c. Bisection: the largest k whose ratio is within budget (ratio(0) assumed the best).
    let limit = 1.0 + opts.budget;
    let (mut lo, mut hi) = (0usize, steps.len());
    let total_evals = (steps.len() + 1).ilog2() as usize + 2;
    let mut evals = 0;
    let mut budget_met = true;
    progress(Stage::Search, 0, total_evals);
    if search_ratio(hi)? <= limit {
        lo = hi;
    } else {
        evals += 1;
        if search_ratio(0)? > limit {
            budget_met = false;
            hi = 0;
        }
        while hi - lo > 1 {
            evals += 1;
            progress(Stage::Search, evals.min(total_evals - 1), total_evals);
            let mid = (lo + hi) / 2;
            if search_ratio(mid)? <= limit {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    progress(Stage::Search, total_evals, total_evals);

    // 5. Build the predictor; verify through SparseMlp, backing off while over budget.
    let layers: Vec<LayerPredictor> = factors
        .iter()
        .map(|f| LayerPredictor {
            gate: f.gate.to_low_rank(hidden, inter),
            up: f.up.as_ref().map(|u| u.to_low_rank(hidden, inter)),
        })
        .collect();
    let mut metadata = BTreeMap::new();
    let sha = ids_sha256(used);
    metadata.insert("calibration_ids_sha256".into(), sha.clone());
    metadata.insert("calibration_tokens".into(), used.len().to_string());
    metadata.insert(
        "calibration_fit_tokens".into(),
        (fit_w.len() * opts.window).to_string(),
    );
    metadata.insert("budget".into(), opts.budget.to_string());
    metadata.insert("ridge".into(), opts.ridge.to_string());
    metadata.insert("thresholds_scorer".into(), opts.scorer.to_string());
    metadata.insert(
        "score_weight".into(),
        if opts.weight_by_down_norm && opts.up_rank > 0 {
            "down_norm"
        } else {
            "none"
        }
        .into(),
    );
    let mut predictor = Predictor {
        model: model_identity(model),
        hidden,
        intermediate: inter,
        rank: opts.rank,
        up_rank: opts.up_rank,
        layers,
        thresholds: None,
        input: None,
        metadata,
    };
    let held_ids: Vec<u32> = held_w.concat();
    let mut k = lo;
    let mut tries = 0;
    let (verified, cuts, mean_density) = loop {
        progress(Stage::Verify, tries, 3);
        let cuts = cutoffs_of(&alloc(k));
        predictor.thresholds = Some(cuts.clone());
        let mut config = SparsityConfig::new(Threshold::Calibrated);
        config.scorer = Some(opts.scorer);
        config.prefill_dense = false;
        let mut sparse = SparseMlp::new(model, config, Some(predictor.clone()))?;
        let r =
            crate::eval::perplexity(model, &held_ids, opts.window, Some(&mut sparse), |_, _| {})?;
        let density = sparse.density().unwrap_or(1.0);
        tries += 1;
        if r.ppl_second_half / ppl_dense <= limit || k == 0 || tries == 3 {
            break (r, cuts, density);
        }
        k -= (k / 10).max(1).min(k);
    };
    progress(Stage::Verify, 3, 3);
    let ratio = verified.ppl_second_half / ppl_dense;
    budget_met &= ratio <= limit;
    predictor
        .metadata
        .insert("heldout_ppl_ratio".into(), format!("{ratio:.5}"));
    predictor
        .metadata
        .insert("heldout_mlp_density".into(), format!("{mean_density:.5}"));

    // Report: calibrated densities and recall under the final cut-offs.
    let final_j = alloc(k);
    for l in 0..nl {
        let h = &rec.sample[l];
        let f = &factors[l];
        let (g, u) = exact_gu(model, l, h, n_sample);
        let truth: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| (silu(g) * u).abs())
            .collect();
        let s = scorer_scores(model, opts.scorer, f, h, n_sample, &g, &u);
        let kept: Vec<usize> = s
            .chunks(inter)
            .map(|r| r.iter().filter(|&&v| v > cuts[l]).count())
            .collect();
        let r = &mut reports[l];
        r.threshold = cuts[l];
        r.density = kept.iter().sum::<usize>() as f64 / (n_sample * inter) as f64;
        debug_assert!(final_j[l] <= GRID);
        r.recall_calibrated = recall(&s, &truth, inter, |t| kept[t]);
    }
    let report = CalibrationReport {
        fit_tokens: fit_w.len() * opts.window,
        heldout_tokens: held_tokens,
        ids_sha256: sha,
        scorer: opts.scorer.to_string(),
        budget: opts.budget,
        heldout_ppl_dense: ppl_dense,
        heldout_ppl_sparse: verified.ppl_second_half,
        heldout_ppl_ratio: ratio,
        heldout_kl: verified.kl_vs_dense.unwrap_or(0.0),
        heldout_top1: verified.top1_agreement.unwrap_or(1.0),
        mean_density,
        budget_met,
        layers: reports,
    };
    Ok((predictor, report))
}
