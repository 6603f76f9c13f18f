//! Input sparsity (TEAL, WINA): per token and per projection group (q/k/v, o, gate/up,
//! down), skip the inputs whose score is small and read only the kept inputs' rows of the
//! input-major weights. No predictor: the input itself says which weights matter.
//!
//! Owns the SPECs `teal:S`, `wina:S` and `teal:calibrated`, the per-token selection (exact
//! top-k without a table; a threshold per layer and group with one), the tables a
//! calibration writes into the predictor file ([`InputTables`]), the calibration itself
//! ([`calibrate_input`]) and the statistics (`weight_bytes_ratio`).
//!
//! Scores: TEAL uses `|x_i|`; WINA uses `|x_i|·‖W[:, i]‖` (the column norm of the group's
//! matrices stacked, so q/k/v share one mask, as do gate/up).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::kernels::input_major::indices_above;
use crate::model::llama::{Layer, Linear};
use crate::model::{InputGroup, InputMask, KvCache, Llama, Logits, MlpOverride, WeightLayout};
use crate::sparse::threshold::{select_top_k, top_k_count};

/// Quantile levels of an [`InputTables`] table: sparsity `j / LEVELS` for j < LEVELS.
pub const LEVELS: usize = 40;

/// An input-sparsity SPEC.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputSpec {
    /// `teal:S`: skip the fraction S of each group's inputs with the smallest `|x_i|`.
    Teal(f64),
    /// `wina:S`: the same with `|x_i|·‖W[:, i]‖`.
    Wina(f64),
    /// `teal:calibrated`: per layer and group thresholds from the predictor file.
    TealCalibrated,
}

impl InputSpec {
    /// Whether a SPEC string names input sparsity (`teal:...`, `wina:...`).
    pub fn is_input_spec(s: &str) -> bool {
        let s = s.trim();
        s.starts_with("teal:") || s.starts_with("wina:")
    }
    fn wina(self) -> bool {
        matches!(self, InputSpec::Wina(_))
    }
}

impl FromStr for InputSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<InputSpec> {
        let bad = |why: &str| {
            Error::Input(format!(
                "bad sparsity spec '{s}': {why}expected teal:S, wina:S (S in [0, 1)) or teal:calibrated"
            ))
        };
        let frac = |v: &str| match v.trim().parse::<f64>() {
            Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
            _ => Err(bad(&format!("S '{v}' is not a number in [0, 1); "))),
        };
        match s.trim().split_once(':') {
            Some(("teal", "calibrated")) => Ok(InputSpec::TealCalibrated),
            Some(("teal", v)) => Ok(InputSpec::Teal(frac(v)?)),
            Some(("wina", v)) => Ok(InputSpec::Wina(frac(v)?)),
            _ => Err(bad("")),
        }
    }
}

impl fmt::Display for InputSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputSpec::Teal(s) => write!(f, "teal:{s}"),
            InputSpec::Wina(s) => write!(f, "wina:{s}"),
            InputSpec::TealCalibrated => f.write_str("teal:calibrated"),
        }
    }
}

/// What a calibration stores for input sparsity: for every layer and group, the score
/// thresholds at sparsities `j / LEVELS` (quantiles of calibration activations), for TEAL
/// and WINA scores, and optionally the calibrated allocation's thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTables {
    pub layers: usize,
    /// `[layer][group][level]`, flattened.
    pub teal: Vec<f32>,
    pub wina: Vec<f32>,
    /// `[layer][group]`: the thresholds of `teal:calibrated` (TEAL scores).
    pub calibrated: Option<Vec<f32>>,
    /// `[layer][group]`: the sparsity each calibrated threshold stands for.
    pub calibrated_sparsity: Option<Vec<f32>>,
}

impl InputTables {
    fn at(&self, table: &[f32], layer: usize, g: usize, s: f64) -> f32 {
        let row = &table[(layer * 4 + g) * LEVELS..(layer * 4 + g + 1) * LEVELS];
        let pos = (s * LEVELS as f64).clamp(0.0, (LEVELS - 1) as f64);
        let j = pos.floor() as usize;
        if j + 1 >= LEVELS {
            return row[LEVELS - 1];
        }
        let w = (pos - j as f64) as f32;
        row[j] * (1.0 - w) + row[j + 1] * w
    }
    /// Thresholds `[layer][group]` for `spec`.
    pub fn thresholds(&self, spec: InputSpec) -> Result<Vec<[f32; 4]>> {
        let per = |table: &[f32], s: f64| {
            (0..self.layers)
                .map(|l| std::array::from_fn(|g| self.at(table, l, g, s)))
                .collect()
        };
        Ok(match spec {
            InputSpec::Teal(s) => per(&self.teal, s),
            InputSpec::Wina(s) => per(&self.wina, s),
            InputSpec::TealCalibrated => {
                let c = self.calibrated.as_ref().ok_or_else(|| {
                    Error::Input(
                        "the predictor file has no teal:calibrated thresholds (calibrate wrote none)"
                            .into(),
                    )
                })?;
                (0..self.layers)
                    .map(|l| std::array::from_fn(|g| c[l * 4 + g]))
                    .collect()
            }
        })
    }
}

/// The input-sparsity hook of the forward pass: selection per token and group, and the
/// statistics of what it kept.
pub struct InputSparsity {
    spec: InputSpec,
    /// Per layer and group, the score threshold; None: exact top-k per token.
    thresholds: Option<Vec<[f32; 4]>>,
    /// WINA: per layer and group, the column norms of the group's matrices.
    col_norms: Option<Vec<[Vec<f32>; 4]>>,
    /// Forward calls of more than one token run dense (generation's prefill); evaluation
    /// sets this false to mask every row as decoding would.
    prefill_dense: bool,
    /// Bytes of each layer's groups (all the group's matrices).
    group_bytes: Vec<[f64; 4]>,
    /// Bytes a dense token reads (every projection and the head).
    dense_bytes: f64,
    /// Kept and total inputs per layer and group since the last reset.
    kept_count: Vec<[u64; 4]>,
    seen_count: Vec<[u64; 4]>,
    kept: Vec<u32>,
    scores: Vec<f32>,
    /// Selection keys of `select_top_k`.
    keys: Vec<u32>,
}

impl InputSparsity {
    /// The hook for `spec` on `model` (which must hold input-major weights), with
    /// thresholds from `tables` when given (required for `teal:calibrated`).
    pub fn new(model: &Llama, spec: InputSpec, tables: Option<&InputTables>) -> Result<Self> {
        if model.layout() != WeightLayout::InputMajor {
            return Err(Error::Input(
                "input sparsity needs the model loaded input-major (Llama::load_with_layout)"
                    .into(),
            ));
        }
        let thresholds = match (spec, tables) {
            (InputSpec::TealCalibrated, None) => {
                return Err(Error::Input(
                    "--sparsity teal:calibrated needs a predictor file with input thresholds (--predictor FILE, written by `sparsellm calibrate`)".into(),
                ));
            }
            (_, Some(t)) => {
                if t.layers != model.layers.len() {
                    return Err(Error::Input(format!(
                        "the predictor's input tables have {} layers, the model {}",
                        t.layers,
                        model.layers.len()
                    )));
                }
                Some(t.thresholds(spec)?)
            }
            (_, None) => None,
        };
        let col_norms = spec.wina().then(|| column_norms(model));
        let group_bytes = group_bytes(model);
        let nl = model.layers.len();
        Ok(InputSparsity {
            spec,
            thresholds,
            col_norms,
            prefill_dense: true,
            group_bytes,
            dense_bytes: model.weight_bytes_per_token() as f64,
            kept_count: vec![[0; 4]; nl],
            seen_count: vec![[0; 4]; nl],
            kept: Vec::new(),
            scores: Vec::new(),
            keys: Vec::new(),
        })
    }

    pub fn spec(&self) -> InputSpec {
        self.spec
    }
    pub fn set_prefill_dense(&mut self, dense: bool) {
        self.prefill_dense = dense;
    }
    pub fn reset_stats(&mut self) {
        self.kept_count.iter_mut().for_each(|c| *c = [0; 4]);
        self.seen_count.iter_mut().for_each(|c| *c = [0; 4]);
    }

    /// Fraction of inputs kept, over every layer and group, since the last reset.
    pub fn density(&self) -> Option<f64> {
        let (k, n) = self
            .kept_count
            .iter()
            .zip(&self.seen_count)
            .fold((0u64, 0u64), |(k, n), (a, b)| {
                (k + a.iter().sum::<u64>(), n + b.iter().sum::<u64>())
            });
        (n > 0).then(|| k as f64 / n as f64)
    }

    /// Fraction of inputs kept per group (summed over layers), since the last reset.
    pub fn group_density(&self) -> [Option<f64>; 4] {
        std::array::from_fn(|g| {
            let k: u64 = self.kept_count.iter().map(|c| c[g]).sum();
            let n: u64 = self.seen_count.iter().map(|c| c[g]).sum();
            (n > 0).then(|| k as f64 / n as f64)
        })
    }

    /// Fraction kept per layer and group, since the last reset.
    pub fn layer_group_density(&self) -> Vec<[f64; 4]> {
        self.kept_count
            .iter()
            .zip(&self.seen_count)
            .map(|(k, n)| std::array::from_fn(|g| k[g] as f64 / n[g].max(1) as f64))
            .collect()
    }

    /// Weight bytes one sparse token reads relative to a dense token (the output head,
    /// read whole, included), since the last reset.
    pub fn weight_bytes_ratio(&self) -> Option<f64> {
        let mut skipped = 0.0;
        let mut any = false;
        for ((k, n), gb) in self
            .kept_count
            .iter()
            .zip(&self.seen_count)
            .zip(&self.group_bytes)
        {
            for g in 0..4 {
                if n[g] > 0 {
                    any = true;
                    // The fraction of the group's rows dropped, averaged over tokens.
                    skipped += (n[g] - k[g]) as f64 / n[g] as f64 * gb[g];
                }
            }
        }
        any.then(|| 1.0 - skipped / self.dense_bytes)
    }

    /// Selects the kept inputs of one token's `x` for (layer, group) into `self.kept`.
    fn select(&mut self, layer: usize, g: usize, x: &[f32]) {
        let n = x.len();
        self.kept.clear();
        match &self.thresholds {
            Some(t) => {
                let norms = self.col_norms.as_ref().map(|c| &c[layer][g][..]);
                indices_above(x, norms, t[layer][g], &mut self.kept);
            }
            None => {
                let s = match self.spec {
                    InputSpec::Teal(s) | InputSpec::Wina(s) => s,
                    InputSpec::TealCalibrated => unreachable!("has thresholds"),
                };
                self.scores.clear();
                match &self.col_norms {
                    Some(norms) => {
                        let w = &norms[layer][g];
                        self.scores
                            .extend(x.iter().zip(w).map(|(&v, &c)| v.abs() * c));
                    }
                    None => self.scores.extend(x.iter().map(|v| v.abs())),
                }
                let k = top_k_count(1.0 - s, n);
                select_top_k(&self.scores, k, &mut self.keys, &mut self.kept);
            }
        }
        self.kept_count[layer][g] += self.kept.len() as u64;
        self.seen_count[layer][g] += n as u64;
    }
}

impl MlpOverride for InputSparsity {
    fn masks_inputs(&self) -> bool {
        true
    }

    fn input_mask(
        &mut self,
        layer: usize,
        group: InputGroup,
        x: &mut [f32],
        n: usize,
    ) -> InputMask<'_> {
        let g = group as usize;
        if n == 1 {
            self.select(layer, g, x);
            return InputMask::Kept(&self.kept);
        }
        if !self.prefill_dense {
            // Evaluation of many positions: each row masked as its token's decode would.
            let width = x.len() / n;
            let mut row = vec![0f32; width];
            for t in 0..n {
                let r = &mut x[t * width..(t + 1) * width];
                row.copy_from_slice(r);
                self.select(layer, g, &row);
                r.fill(0.0);
                for &i in &self.kept {
                    r[i as usize] = row[i as usize];
                }
            }
        }
        InputMask::Dense
    }
}

/// The matrices of each projection group of `layer`, in [`InputGroup`] order: q/k/v
/// (one input), o, gate/up (one input), down.
pub fn group_matrices(layer: &Layer) -> [Vec<&Linear>; 4] {
    let (a, m) = (&layer.self_attn, &layer.mlp);
    [
        vec![&a.q_proj, &a.k_proj, &a.v_proj],
        vec![&a.o_proj],
        vec![&m.gate_proj, &m.up_proj],
        vec![&m.down_proj],
    ]
}

/// WINA's column norms: for every layer and group, `‖W[:, i]‖` over the group's matrices
/// stacked (q/k/v; o; gate/up; down), from the input-major rows.
fn column_norms(model: &Llama) -> Vec<[Vec<f32>; 4]> {
    let norms = |ls: &[&Linear]| {
        let n = ls[0].in_features();
        let mut acc = vec![0f64; n];
        for lin in ls {
            if lin.input_major {
                let mut row = vec![0f32; lin.out_features()];
                for (i, a) in acc.iter_mut().enumerate() {
                    // Input-major: row i of the held matrix is input i's weights.
                    lin.weight.row_to_f32(i, &mut row);
                    *a += row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
                }
            } else if let Some(by_column) = &lin.by_column {
                by_column.add_column_squares(&mut acc);
            } else {
                let mut row = vec![0f32; n];
                for r in 0..lin.out_features() {
                    lin.weight.row_to_f32(r, &mut row);
                    for (a, &v) in acc.iter_mut().zip(&row) {
                        *a += (v as f64) * (v as f64);
                    }
                }
            }
        }
        acc.into_iter().map(|v| v.sqrt() as f32).collect()
    };
    model
        .layers
        .iter()
        .map(|l| group_matrices(l).map(|ls| norms(&ls)))
        .collect()
}

/// Records a sample of every group's input during dense forward passes (every
/// `stride`-th token of each call), for the quantile tables.
struct InputRecorder {
    stride: usize,
    /// `[layer][group]`: sampled TEAL scores `|x_i|`.
    teal: Vec<[Vec<f32>; 4]>,
    /// `[layer][group]`: sampled WINA scores.
    wina: Vec<[Vec<f32>; 4]>,
    norms: Vec<[Vec<f32>; 4]>,
}

impl MlpOverride for InputRecorder {
    fn masks_inputs(&self) -> bool {
        true
    }
    fn input_mask(
        &mut self,
        layer: usize,
        group: InputGroup,
        x: &mut [f32],
        n: usize,
    ) -> InputMask<'_> {
        let g = group as usize;
        let width = x.len() / n;
        let norms = &self.norms[layer][g];
        for t in (0..n).step_by(self.stride) {
            let row = &x[t * width..(t + 1) * width];
            self.teal[layer][g].extend(row.iter().map(|v| v.abs()));
            self.wina[layer][g].extend(row.iter().zip(norms).map(|(v, c)| v.abs() * c));
        }
        InputMask::Dense
    }
}

/// The thresholds at sparsities `j / LEVELS` of `values` (sorted in place): level 0 keeps
/// everything (-1 is below every score).
fn quantile_row(values: &mut [f32]) -> [f32; LEVELS] {
    values.sort_unstable_by(|a, b| a.total_cmp(b));
    std::array::from_fn(|j| {
        if j == 0 || values.is_empty() {
            -1.0
        } else {
            // Dropping the fraction j / LEVELS: the threshold is the largest dropped score.
            let k = (j * values.len() / LEVELS).max(1);
            values[k - 1]
        }
    })
}

/// What [`calibrate_input`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct InputCalibrationOptions {
    /// Tokens per window (a fresh KV cache each; also the held-out evaluation window).
    pub window: usize,
    /// Windows recorded for the quantile tables.
    pub record_windows: usize,
    /// Held-out windows the allocation is judged on (after the recorded ones): at most
    /// this many, as many as the text has. Three 512-token windows judged perplexity
    /// changes of a few percent with about ±1.5% of noise.
    pub heldout_windows: usize,
    /// Every `stride`-th token's inputs are kept for the quantiles.
    pub stride: usize,
    /// Allowed perplexity increase over dense on the held-out windows, each window's first
    /// half dense (the prompt) and its second half sparse (decoding), scored on the second
    /// half. Smaller than the +5% the setting should hold on other text: the margin.
    pub budget: f64,
    /// The sparsities each projection of each layer is probed at, alone.
    pub levels: Vec<f64>,
    /// Probe windows (the first tokens of as many recorded windows) and their length:
    /// the first half dense, the second half sparse.
    pub probe_windows: usize,
    pub probe_window: usize,
}

impl Default for InputCalibrationOptions {
    fn default() -> Self {
        InputCalibrationOptions {
            window: 512,
            record_windows: 6,
            heldout_windows: 8,
            stride: 8,
            budget: 0.03,
            levels: vec![0.2, 0.4, 0.6, 0.8],
            probe_windows: 2,
            probe_window: 256,
        }
    }
}

/// One allocation's figures on the held-out windows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AllocationReport {
    /// Sparsity per group type (qkv, o, gate_up, down): the mean over layers, weighted by
    /// bytes.
    pub sparsity: [f64; 4],
    /// The KL the probes predict for it (the sum of each projection's KL alone).
    pub predicted_kl: f64,
    pub ppl_ratio: f64,
    /// Mean KL divergence from dense over the scored predictions.
    pub kl: f64,
    /// Weight bytes per token relative to dense (head included).
    pub weight_bytes_ratio: f64,
}

/// Fits the input-sparsity tables of `model` on `ids`: quantiles of every group's input
/// scores (TEAL and WINA), then `teal:calibrated`, a sparsity for every projection group
/// of every layer, allocated greedily:
///
/// 1. Probe: each (layer, group) alone at each of `levels`, its KL from dense measured on
///    probe windows (first half dense, second half sparse, as decoding).
/// 2. Allocate: taking each projection's KL curve at its lower convex hull, raise
///    sparsity where it costs the least KL per skipped byte first (TEAL's greedy, with
///    the model's output as the objective and the probes' costs added up). That orders
///    every allocation by its predicted KL.
/// 3. Verify: the allocation with the largest predicted KL whose measured perplexity on
///    the held-out windows stays within the budget (a bracket on the predicted KL, then
///    bisection).
///
/// `progress(stage, done, total)`.
pub fn calibrate_input(
    model: &Llama,
    ids: &[u32],
    opts: &InputCalibrationOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(InputTables, Vec<AllocationReport>)> {
    if model.layout() != WeightLayout::InputMajor {
        return Err(Error::Input(
            "input calibration needs the model loaded input-major".into(),
        ));
    }
    let w = opts.window;
    if w < 8 || w > model.config.max_position_embeddings {
        return Err(Error::Input(format!(
            "calibration window {w} is not in 8..=context"
        )));
    }
    let windows: Vec<&[u32]> = ids.chunks_exact(w).collect();
    let least = opts.record_windows + 1;
    if windows.len() < least || opts.heldout_windows == 0 || opts.record_windows == 0 {
        return Err(Error::Input(format!(
            "input calibration needs at least {least} windows of {w} tokens; the text has {} tokens",
            ids.len()
        )));
    }
    // Recorded windows, then as many held-out ones as the text has (up to the option).
    let need = (opts.record_windows + opts.heldout_windows).min(windows.len());
    let pw = opts.probe_window.clamp(4, w);
    if opts.probe_windows == 0 || opts.probe_windows > opts.record_windows {
        return Err(Error::Input(format!(
            "input calibration probes 1..={} of the recorded windows, not {}",
            opts.record_windows, opts.probe_windows
        )));
    }
    if opts.levels.is_empty() || opts.levels.iter().any(|&l| !(l > 0.0 && l < 1.0)) {
        return Err(Error::Input(format!(
            "input calibration levels must be in (0, 1): {:?}",
            opts.levels
        )));
    }
    let nl = model.layers.len();
    // 1. Record.
    let mut rec = InputRecorder {
        stride: opts.stride.max(1),
        teal: (0..nl).map(|_| Default::default()).collect(),
        wina: (0..nl).map(|_| Default::default()).collect(),
        norms: column_norms(model),
    };
    for (k, win) in windows[..opts.record_windows].iter().enumerate() {
        progress("record", k, opts.record_windows);
        let mut cache = model.new_cache();
        model.forward(win, &mut cache, Logits::None, Some(&mut rec))?;
    }
    let mut teal = Vec::with_capacity(nl * 4 * LEVELS);
    let mut wina = Vec::with_capacity(nl * 4 * LEVELS);
    for l in 0..nl {
        for g in 0..4 {
            teal.extend(quantile_row(&mut rec.teal[l][g]));
            wina.extend(quantile_row(&mut rec.wina[l][g]));
        }
    }
    drop(rec);
    let mut tables = InputTables {
        layers: nl,
        teal,
        wina,
        calibrated: None,
        calibrated_sparsity: None,
    };
    // 2. Probe each (layer, group) alone.
    let bytes: Vec<[f64; 4]> = group_bytes(model);
    let total = model.weight_bytes_per_token() as f64;
    let probe_ids: Vec<&[u32]> = windows[..opts.probe_windows]
        .iter()
        .map(|w| &w[..pw])
        .collect();
    let mut probe = Probe::new(model, &probe_ids)?;
    let units = nl * 4;
    let probes = units * opts.levels.len();
    let mut curves = Vec::with_capacity(units);
    for u in 0..units {
        let mut points = vec![(0.0, 0.0)];
        for (j, &lv) in opts.levels.iter().enumerate() {
            progress("probe", u * opts.levels.len() + j, probes);
            let mut s = vec![[0.0; 4]; nl];
            s[u / 4][u % 4] = lv;
            set_allocation(&mut tables, &s);
            points.push((lv, probe.kl(model, &tables)?));
        }
        curves.push(points);
    }
    progress("probe", probes, probes);
    let path = AllocationPath::new(&curves, &bytes);
    // 3. Verify on held-out windows: the largest predicted KL within the budget.
    let held = &windows[opts.record_windows..need];
    let heldout = Heldout::new(model, held)?;
    let limit = (1.0 + opts.budget).ln();
    let bytes_ratio = |s: &[[f64; 4]]| {
        1.0 - s
            .iter()
            .zip(&bytes)
            .map(|(s, b)| (0..4).map(|g| s[g] * b[g]).sum::<f64>())
            .sum::<f64>()
            / total
    };
    let mean_sparsity = |s: &[[f64; 4]]| -> [f64; 4] {
        std::array::from_fn(|g| {
            let b: f64 = bytes.iter().map(|b| b[g]).sum();
            s.iter().zip(&bytes).map(|(s, b)| s[g] * b[g]).sum::<f64>() / b
        })
    };
    const SEARCH: usize = 7;
    let mut reports = Vec::new();
    let mut done = 0;
    let mut verify = |tables: &mut InputTables, allow: f64| -> Result<(f64, f64, Vec<[f64; 4]>)> {
        progress("verify", done.min(SEARCH), SEARCH + 1);
        done += 1;
        let s = path.at(allow, nl);
        set_allocation(tables, &s);
        let (nll, kl) = heldout.score(model, tables)?;
        Ok((nll, kl, s))
    };
    let (dense, _, _) = verify(&mut tables, 0.0)?;
    // KL and the log-perplexity change are of one size on this kind of text, so the
    // bracket starts at twice the budget's log and moves by factors of 2.
    let max_kl = path.total_kl();
    let (mut lo, mut hi) = (0.0f64, f64::INFINITY);
    let mut best = vec![[0.0; 4]; nl];
    let mut allow = (2.0 * limit).min(max_kl);
    for _ in 0..SEARCH {
        let (nll, kl, s) = verify(&mut tables, allow)?;
        reports.push(AllocationReport {
            sparsity: mean_sparsity(&s),
            predicted_kl: path.kl_at(allow),
            ppl_ratio: (nll - dense).exp(),
            kl,
            weight_bytes_ratio: bytes_ratio(&s),
        });
        if nll - dense <= limit {
            lo = allow;
            best = s;
        } else {
            hi = allow;
        }
        allow = if hi.is_infinite() {
            if lo >= max_kl {
                break;
            }
            (2.0 * lo).min(max_kl)
        } else {
            0.5 * (lo + hi)
        };
    }
    set_allocation(&mut tables, &best);
    progress("verify", SEARCH + 1, SEARCH + 1);
    Ok((tables, reports))
}

/// Bytes of each layer's projection groups (all the group's matrices).
fn group_bytes(model: &Llama) -> Vec<[f64; 4]> {
    model
        .layers
        .iter()
        .map(|l| group_matrices(l).map(|ls| ls.iter().map(|x| x.weight.byte_len() as f64).sum()))
        .collect()
}

/// Every allocation the greedy passes through, in order of predicted KL: the segments of
/// each (layer, group)'s KL curve (lower convex hull over its probed sparsities, KL made
/// non-decreasing), sorted by KL per skipped byte.
struct AllocationPath {
    /// (unit = layer * 4 + group, sparsity from, sparsity to, KL from, KL to), cheapest
    /// per byte first.
    segments: Vec<(usize, f64, f64, f64, f64)>,
}

impl AllocationPath {
    fn new(curves: &[Vec<(f64, f64)>], bytes: &[[f64; 4]]) -> AllocationPath {
        let mut segments = Vec::new();
        for (u, points) in curves.iter().enumerate() {
            let mut pts = points.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut top = 0f64;
            for p in &mut pts {
                top = top.max(p.1);
                p.1 = top;
            }
            let hull = lower_hull(&pts);
            for w in hull.windows(2) {
                segments.push((u, w[0].0, w[1].0, w[0].1, w[1].1));
            }
        }
        let per_byte = |&(u, s0, s1, k0, k1): &(usize, f64, f64, f64, f64)| {
            (k1 - k0) / ((s1 - s0) * bytes[u / 4][u % 4]).max(f64::MIN_POSITIVE)
        };
        // The hull's slopes rise within a unit, so a stable sort keeps each unit's
        // segments in order.
        segments.sort_by(|a, b| per_byte(a).total_cmp(&per_byte(b)));
        AllocationPath { segments }
    }

    fn total_kl(&self) -> f64 {
        self.segments.iter().map(|s| s.4 - s.3).sum()
    }

    /// The predicted KL of [`at`](Self::at)`(allow)` (allow capped at the total).
    fn kl_at(&self, allow: f64) -> f64 {
        allow.min(self.total_kl())
    }

    /// The allocation `[layer][group]` whose predicted KL is `allow`: whole segments in
    /// order, then the part of the next one that fits.
    fn at(&self, allow: f64, layers: usize) -> Vec<[f64; 4]> {
        let mut s = vec![[0.0; 4]; layers];
        let mut left = allow;
        for &(u, s0, s1, k0, k1) in &self.segments {
            let dk = k1 - k0;
            if dk <= left {
                s[u / 4][u % 4] = s1;
                left -= dk;
            } else {
                s[u / 4][u % 4] = s0 + (s1 - s0) * (left / dk);
                break;
            }
        }
        s
    }
}

/// The lower convex hull of points sorted by x (Andrew's monotone chain).
fn lower_hull(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut hull: Vec<(f64, f64)> = Vec::with_capacity(pts.len());
    for &p in pts {
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            // Drop b when it lies on or above the line from a to p.
            if (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0) <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(p);
    }
    hull
}

/// Sets `tables`' calibrated thresholds to sparsity `s[layer][group]`.
fn set_allocation(tables: &mut InputTables, s: &[[f64; 4]]) {
    let mut th = Vec::with_capacity(tables.layers * 4);
    let mut sp = Vec::with_capacity(tables.layers * 4);
    for (l, row) in s.iter().enumerate().take(tables.layers) {
        for (g, &sg) in row.iter().enumerate() {
            th.push(if sg > 0.0 {
                tables.at(&tables.teal, l, g, sg)
            } else {
                -1.0
            });
            sp.push(sg as f32);
        }
    }
    tables.calibrated = Some(th);
    tables.calibrated_sparsity = Some(sp);
}

/// Probe windows: each window's first half run dense once and kept in its cache; a probe
/// runs the second half with the thresholds under test and measures the KL from dense.
struct Probe<'a> {
    windows: Vec<(&'a [u32], KvCache, Vec<f32>)>,
}

impl<'a> Probe<'a> {
    fn new(model: &Llama, windows: &[&'a [u32]]) -> Result<Probe<'a>> {
        let vocab = model.config.vocab_size;
        let mut out = Vec::with_capacity(windows.len());
        for &win in windows {
            let half = win.len() / 2;
            let mut cache = model.new_cache();
            let all = model.forward(win, &mut cache, Logits::All, None)?;
            cache.truncate(half);
            // The predictions made at the sparse positions half..len-1.
            out.push((
                win,
                cache,
                all[half * vocab..(win.len() - 1) * vocab].to_vec(),
            ));
        }
        Ok(Probe { windows: out })
    }

    /// Mean KL from dense over the sparse positions' predictions.
    fn kl(&mut self, model: &Llama, tables: &InputTables) -> Result<f64> {
        let mut hook = InputSparsity::new(model, InputSpec::TealCalibrated, Some(tables))?;
        hook.set_prefill_dense(false);
        let vocab = model.config.vocab_size;
        let (mut kl, mut count) = (0f64, 0usize);
        for (win, cache, dense) in &mut self.windows {
            let half = win.len() / 2;
            cache.truncate(half);
            let rest = model.forward(&win[half..], cache, Logits::All, Some(&mut hook))?;
            for (row, d) in rest.chunks_exact(vocab).zip(dense.chunks_exact(vocab)) {
                kl += kl_div(d, row);
                count += 1;
            }
        }
        Ok(kl / count.max(1) as f64)
    }
}

/// Held-out windows and their dense logits: each window's first half is run dense (a
/// prompt), its second half with the thresholds under test on every row (as decoding
/// would select, computed batched).
struct Heldout<'a> {
    windows: Vec<&'a [u32]>,
    /// Per window, the dense model's logits of the predictions scored (see `score`).
    dense: Vec<Vec<f32>>,
}

impl<'a> Heldout<'a> {
    fn new(model: &Llama, windows: &[&'a [u32]]) -> Result<Heldout<'a>> {
        let mut dense = Vec::with_capacity(windows.len());
        for win in windows {
            let mut cache = model.new_cache();
            let all = model.forward(win, &mut cache, Logits::All, None)?;
            let vocab = model.config.vocab_size;
            let half = win.len() / 2;
            // Predictions of tokens half..len come from positions half-1..len-1.
            dense.push(all[(half - 1) * vocab..(win.len() - 1) * vocab].to_vec());
        }
        Ok(Heldout {
            windows: windows.to_vec(),
            dense,
        })
    }

    /// (mean NLL, mean KL from dense) over the second halves, with `tables`' calibrated
    /// thresholds.
    fn score(&self, model: &Llama, tables: &InputTables) -> Result<(f64, f64)> {
        let mut hook = InputSparsity::new(model, InputSpec::TealCalibrated, Some(tables))?;
        let vocab = model.config.vocab_size;
        let (mut nll, mut kl, mut count) = (0f64, 0f64, 0usize);
        for (win, dense) in self.windows.iter().zip(&self.dense) {
            let half = win.len() / 2;
            let mut cache = model.new_cache();
            hook.set_prefill_dense(true);
            let first = model.forward(&win[..half], &mut cache, Logits::Last, Some(&mut hook))?;
            hook.set_prefill_dense(false);
            let rest = model.forward(&win[half..], &mut cache, Logits::All, Some(&mut hook))?;
            let rows = std::iter::once(&first[..])
                .chain(rest.chunks_exact(vocab).take(win.len() - half - 1));
            for ((row, &target), d) in rows.zip(&win[half..]).zip(dense.chunks_exact(vocab)) {
                let lse = crate::kernels::ops::logsumexp(row) as f64;
                nll += lse - row[target as usize] as f64;
                kl += kl_div(d, row);
                count += 1;
            }
        }
        let c = count.max(1) as f64;
        Ok((nll / c, kl / c))
    }
}

/// KL(p || q) of two logit rows, in f64.
fn kl_div(p: &[f32], q: &[f32]) -> f64 {
    let lp = crate::kernels::ops::logsumexp(p) as f64;
    let lq = crate::kernels::ops::logsumexp(q) as f64;
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_hull_drops_points_above_the_chords() {
        let pts = [(0.0, 0.0), (0.2, 0.5), (0.4, 0.6), (0.6, 0.7), (0.8, 3.0)];
        // (0.2, 0.5) lies above the chord from (0, 0) to (0.4, 0.6); (0.4, 0.6) above
        // the chord from (0, 0) to (0.6, 0.7).
        assert_eq!(lower_hull(&pts), vec![(0.0, 0.0), (0.6, 0.7), (0.8, 3.0)]);
        // Convex points stay; collinear middles go.
        let convex = [(0.0, 0.0), (0.5, 0.1), (1.0, 1.0)];
        assert_eq!(lower_hull(&convex), convex.to_vec());
        assert_eq!(
            lower_hull(&[(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)]),
            vec![(0.0, 0.0), (1.0, 1.0)]
        );
    }

    #[test]
    fn the_path_takes_the_cheapest_kl_per_byte_first() {
        // Two layers; unit (0, qkv) is cheap, (1, down) dear, the rest never probed
        // beyond zero cost curves that are steep.
        let steep = vec![(0.0, 0.0), (0.5, 10.0)];
        let mut curves = vec![steep.clone(); 8];
        curves[0] = vec![(0.0, 0.0), (0.5, 0.1), (0.8, 0.4)];
        curves[7] = vec![(0.0, 0.0), (0.5, 0.3)];
        let bytes = vec![[1.0; 4]; 2];
        let path = AllocationPath::new(&curves, &bytes);
        assert!((path.total_kl() - (0.4 + 0.3 + 6.0 * 10.0)).abs() < 1e-12);
        // 0.1 of KL: unit 0 to 0.5 exactly.
        let s = path.at(0.1, 2);
        assert_eq!(s[0][0], 0.5);
        assert_eq!(s[1][3], 0.0);
        // Then unit 7 (0.6 KL per unit of sparsity) before unit 0's second segment (1.0).
        let s = path.at(0.25, 2);
        assert_eq!(s[0][0], 0.5);
        assert!((s[1][3] - 0.25).abs() < 1e-12, "{s:?}");
        let s = path.at(0.5, 2);
        assert_eq!(s[1][3], 0.5);
        assert!((s[0][0] - (0.5 + 0.3 * (0.1 / 0.3))).abs() < 1e-12, "{s:?}");
        // A non-monotone probe (noise) is made non-decreasing.
        let path = AllocationPath::new(&[vec![(0.0, 0.0), (0.4, 0.2), (0.8, 0.1)]], &[[1.0; 4]]);
        assert!((path.total_kl() - 0.2).abs() < 1e-12);
    }
}
