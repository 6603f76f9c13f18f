//! Quality evaluation: perplexity over non-overlapping windows by both common methods
//! (every prediction in the window; llama.cpp's second half only), and, for a sparse
//! setting, the mean KL divergence from the dense model, top-1 agreement with it, and the
//! MLP weight bytes each decoded token reads relative to dense ([`mlp_bytes`]).

use crate::error::{Error, Result};
use crate::model::{Llama, Logits, MlpOverride};
use crate::sparse::threshold::top_k_count;
use crate::sparse::weight_cache::down_t_dtype;
use crate::sparse::{Mode, Predictor, Scorer, SparseMlp};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EvalReport {
    /// Tokens scored over (whole windows only).
    pub tokens: usize,
    pub windows: usize,
    /// Tokens of the text after the last whole window: not scored.
    pub tokens_unscored: usize,
    /// exp(mean NLL) over every prediction in each window (positions 0..w-1 predicting 1..w).
    pub ppl_all: f64,
    /// llama.cpp's method: only predictions from the second half of each window.
    pub ppl_second_half: f64,
    /// Mean KL(dense || evaluated) per predicted token; only with a sparse setting.
    pub kl_vs_dense: Option<f64>,
    /// Fraction of predictions whose argmax equals the dense model's.
    pub top1_agreement: Option<f64>,
}

/// Log-softmax of `logits[target]` in f64.
fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits[target] as f64 - lse
}

/// KL(p || q) for logits p, q, in f64.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |x: &[f32]| {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

/// The ids to score when the vocabulary starts prompts with BOS: `ids` (which start with
/// BOS) with the first token of every `window` replaced by `bos`, as llama.cpp's
/// llama-perplexity scores each chunk; unchanged when `bos` is None.
pub fn with_bos_windows(mut ids: Vec<u32>, window: usize, bos: Option<u32>) -> Vec<u32> {
    if let Some(bos) = bos
        && window > 0
    {
        for w in ids.iter_mut().step_by(window) {
            *w = bos;
        }
    }
    ids
}

/// Perplexity of `ids` over non-overlapping windows of `window` tokens from the start, each
/// scored alone (fresh cache, no BOS). With `mlp`, the evaluated model uses that MLP, one
/// token at a time as in decoding, and the dense model is run beside it for KL and
/// agreement.
pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    window: usize,
    mlp: Option<&mut (dyn MlpOverride + '_)>,
    progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    perplexity_with(model, ids, window, mlp, false, progress)
}

/// As [`perplexity`]; with `dense_prefix`, each window's first half is run as one dense
/// forward call (a prompt's prefill: the override must run forward calls of several
/// tokens dense) and only its second half token by token through the override, as
/// generation decodes after a prompt. The KL and top-1 agreement are then measured on
/// the second half (the first is dense in both), and `ppl_second_half` scores exactly
/// the positions that ran sparse.
pub fn perplexity_with(
    model: &Llama,
    ids: &[u32],
    window: usize,
    mut mlp: Option<&mut (dyn MlpOverride + '_)>,
    dense_prefix: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if window < 4 {
        return Err(Error::Input(format!(
            "--window {window} is too small (at least 4)"
        )));
    }
    if window > model.config.max_position_embeddings {
        return Err(Error::Input(format!(
            "--window {window} exceeds the model's context ({})",
            model.config.max_position_embeddings
        )));
    }
    let windows = ids.len() / window;
    if windows == 0 {
        return Err(Error::Input(format!(
            "the text has {}, fewer than one window of {window}",
            crate::progress::count(ids.len(), "token")
        )));
    }
    let vocab = model.config.vocab_size;
    let (mut nll_all, mut n_all, mut nll_half, mut n_half) = (0f64, 0usize, 0f64, 0usize);
    let (mut kl_sum, mut agree) = (0f64, 0usize);
    let first = window / 2;
    for w in 0..windows {
        progress(w, windows);
        let chunk = &ids[w * window..(w + 1) * window];
        let mut cache = model.new_cache();
        let sparse = mlp.is_some();
        // A sparse setting is scored token by token, exactly as decoding runs it: a
        // batched pass computes the dense parts with other kernels (GEMM), whose last-bit
        // differences flip neurons sitting at a threshold's cut, so it would score a
        // slightly different model than the one that generates.
        let logits = match mlp.as_deref_mut() {
            Some(m) => {
                let mut all = Vec::with_capacity(window * vocab);
                let prefix = if dense_prefix { first } else { 0 };
                if prefix > 0 {
                    all.extend(model.forward(
                        &chunk[..prefix],
                        &mut cache,
                        Logits::All,
                        Some(&mut *m),
                    )?);
                }
                for &t in &chunk[prefix..] {
                    all.extend(model.forward(&[t], &mut cache, Logits::Last, Some(&mut *m))?);
                }
                all
            }
            None => model.forward(chunk, &mut cache, Logits::All, None)?,
        };
        let dense = if sparse {
            let mut c = model.new_cache();
            Some(model.forward(chunk, &mut c, Logits::All, None)?)
        } else {
            None
        };
        for i in 0..window - 1 {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let lp = log_prob(row, chunk[i + 1] as usize);
            nll_all -= lp;
            n_all += 1;
            if i >= first {
                nll_half -= lp;
                n_half += 1;
            }
            let compared = !dense_prefix || i >= first;
            if let (Some(d), true) = (&dense, compared) {
                let drow = &d[i * vocab..(i + 1) * vocab];
                kl_sum += kl(drow, row);
                agree += (crate::generate::argmax(drow) == crate::generate::argmax(row)) as usize;
            }
        }
    }
    progress(windows, windows);
    let sparse = mlp.is_some();
    let compared = if dense_prefix { n_half } else { n_all };
    Ok(EvalReport {
        tokens: windows * window,
        windows,
        tokens_unscored: ids.len() - windows * window,
        ppl_all: (nll_all / n_all as f64).exp(),
        ppl_second_half: (nll_half / n_half as f64).exp(),
        kl_vs_dense: sparse.then(|| kl_sum / compared as f64),
        top1_agreement: sparse.then(|| agree as f64 / compared as f64),
    })
}

/// MLP weight bytes one decoded token reads under a sparse setting, against dense.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MlpBytes {
    /// Dense: every layer's gate, up and down projections, as held (`Matrix::byte_len`).
    pub dense: f64,
    /// The sparse setting, averaged over the tokens processed sparsely: the scorer's reads
    /// (the predictor's factors; every gate and up row for exact scoring) plus the rows of
    /// the neurons it computes.
    pub sparse: f64,
    /// Of `sparse`, the predictor's factors (0 without a low-rank scorer).
    pub predictor: f64,
}

impl MlpBytes {
    /// `sparse / dense`: the MLP bytes read per token relative to dense, predictor included.
    pub fn ratio(&self) -> f64 {
        self.sparse / self.dense
    }
}

/// The MLP bytes per decoded token of `sp` over the tokens it has processed since its last
/// `reset_stats` (from each layer's achieved density and the matrices' byte sizes), per
/// layer, summed over layers:
///
/// - `exact`: the whole gate and up matrices (every g_i and u_i is computed), plus the
///   active neurons' down rows;
/// - `signed-gate`: as exact, plus the gate matrix a second time (the signed ranking is a
///   separate product with it);
/// - `lowrank`: the predictor's factors, plus the active neurons' gate, up and down rows;
/// - `cascade:F`: the predictor's factors, the gate and up rows of the ceil(F·n) candidates,
///   plus the active neurons' down rows.
///
/// A down row is read from the transposed copy (`down_t_dtype`: Q8_0 for a quantized
/// model, which is larger than its Q4 rows) except in block mode and from a down
/// projection held by column, which read the model's own blocks. Cache maintenance (rows
/// copied into the weight cache when the mask changes) is not counted. `predictor` must
/// be the predictor `sp` scores with, with the factors in the dtype `sp` holds them in
/// ([`Predictor::factor_dtype_for`]). None before any sparse token, or when the scorer
/// needs a predictor and none is given.
pub fn mlp_bytes(model: &Llama, sp: &SparseMlp, predictor: Option<&Predictor>) -> Option<MlpBytes> {
    let density = sp.layer_density();
    if density.len() != model.layers.len() || density.iter().any(|d| !d.is_finite()) {
        return None;
    }
    let scorer = sp.scorer();
    let blocks = sp.config().mode == Mode::Blocks;
    let (mut dense, mut sparse, mut pred) = (0f64, 0f64, 0f64);
    for (l, (layer, &d)) in model.layers.iter().zip(&density).enumerate() {
        let m = &layer.mlp;
        let (gate, up, down) = (
            m.gate_proj.weight.byte_len() as f64,
            m.up_proj.weight.byte_len() as f64,
            m.down_proj.weight.byte_len() as f64,
        );
        let inter = m.gate_proj.weight.rows;
        let hidden = m.gate_proj.weight.cols;
        let n = inter as f64;
        let (gate_row, up_row) = (gate / n, up / n);
        // Block mode reads the model's own blocks, and so does a down projection held
        // by column (its active neurons' columns, scales included: about down / n each).
        let down_row = if blocks || m.down_proj.by_column.is_some() {
            down / n
        } else {
            down_t_dtype(m.down_proj.weight.dtype).bytes_for(hidden) as f64
        };
        let active = d * n;
        let p = match scorer {
            Scorer::LowRank | Scorer::Cascade { .. } => predictor?.bytes_per_layer(l) as f64,
            Scorer::Exact | Scorer::SignedGate => 0.0,
        };
        let rows = match scorer {
            Scorer::Exact => gate + up + active * down_row,
            Scorer::SignedGate => 2.0 * gate + up + active * down_row,
            Scorer::LowRank => active * (gate_row + up_row + down_row),
            Scorer::Cascade { superset } => {
                top_k_count(superset, inter) as f64 * (gate_row + up_row) + active * down_row
            }
        };
        dense += gate + up + down;
        sparse += p + rows;
        pred += p;
    }
    Some(MlpBytes {
        dense,
        sparse,
        predictor: pred,
    })
}
