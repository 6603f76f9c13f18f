//! `sparsellm eval --sweep`: quality and speed of a list of sparsity settings against the
//! MLP bytes each reads per token. Each setting is evaluated over the same text as
//! `sparsellm eval --sparsity` does it (perplexity, KL and top-1 agreement against dense,
//! achieved density, [`mlp_bytes`](crate::eval::mlp_bytes)); then every setting is timed
//! on short greedy generations in this same process, in rounds of one generation per
//! setting (so that drift hits all alike); the results go to `sweep.md` (a table), `sweep.json`
//! and `sweep.png` (perplexity and decode tokens/s against MLP bytes per token).
//!
//! The settings are [`DEFAULT_SETTINGS`] (one place to change them) or a list given on the
//! command line, each `SPEC[@SCORER]` (e.g. `density:0.5@exact`, `sigma:2@signed-gate`,
//! `calibrated`; `off` is the dense model) for MLP neurons, or an input-sparsity SPEC
//! (`teal:0.3`, `wina:0.3`, `teal:calibrated`), which runs on an input-major copy of the
//! weights. Both kinds are placed by the weight bytes a token reads (every layer and the
//! head), so the plot compares them on one axis.

use std::path::Path;

use serde::Serialize;

use crate::bench::{self, Stat};
use crate::error::{Error, Result};
use crate::eval::{self, EvalReport, MlpBytes};
use crate::model::{Llama, MlpOverride};
use crate::progress::count;
use crate::sparse::input::{InputSparsity, InputSpec};
use crate::sparse::{Mode, Predictor, Scorer, SparseMlp, SparsityConfig, Threshold};

/// The settings a sweep runs unless told otherwise, in order: dense; the oracle (exact
/// scores) at three densities; the one-pass sigma rule on exact scores; the original
/// project's rule (sigma:2 on the signed gate); and, with a predictor, the low-rank and
/// cascade scorers and the calibrated thresholds; then input sparsity, uniform (TEAL at
/// three fractions, WINA at one) and, with a predictor holding input tables, calibrated.
/// Those needing a predictor are skipped without one.
pub const DEFAULT_SETTINGS: &[&str] = &[
    "off",
    "density:0.25@exact",
    "density:0.5@exact",
    "density:0.75@exact",
    "sigma:0@exact",
    "sigma:0.5@exact",
    "sigma:1@exact",
    "sigma:2@exact",
    "sigma:2@signed-gate",
    "density:0.5@lowrank",
    "density:0.75@lowrank",
    "density:0.5@cascade",
    "calibrated@lowrank",
    "teal:0.2",
    "teal:0.3",
    "teal:0.4",
    "wina:0.3",
    "teal:calibrated",
];

/// One setting of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// MLP-neuron sparsity (or dense, `off`): a SPEC and a scorer (None for dense, or
    /// when not named: then as `--scorer`'s default, lowrank with a predictor, exact
    /// without).
    Neurons {
        config: SparsityConfig,
        scorer: Option<Scorer>,
    },
    /// Input sparsity of every projection (TEAL/WINA), on the input-major weights.
    Inputs(InputSpec),
}

impl std::str::FromStr for Setting {
    type Err = Error;
    /// `SPEC[@SCORER]`: `off`, `density:0.5@exact`, `sigma:2@signed-gate`, `calibrated`;
    /// or `teal:S`, `wina:S`, `teal:calibrated`.
    fn from_str(s: &str) -> Result<Setting> {
        let s = s.trim();
        if InputSpec::is_input_spec(s) {
            return Ok(Setting::Inputs(s.parse()?));
        }
        let (spec, scorer) = match s.split_once('@') {
            Some((a, b)) => (a, Some(b.parse::<Scorer>()?)),
            None => (s, None),
        };
        let config: SparsityConfig = spec.parse()?;
        if config.is_off() && scorer.is_some() {
            return Err(Error::Input(format!(
                "sweep setting '{s}': the dense model (off) has no scorer"
            )));
        }
        Ok(Setting::Neurons { config, scorer })
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Neurons { config, .. } if config.is_off() => f.write_str("dense"),
            Setting::Neurons { config, scorer } => {
                write!(f, "{}", config.threshold)?;
                if let Some(s) = scorer {
                    write!(f, " {s}")?;
                }
                Ok(())
            }
            Setting::Inputs(spec) => write!(f, "{spec}"),
        }
    }
}

impl Setting {
    /// The scorer this setting uses given whether a predictor is at hand (None: dense,
    /// and input sparsity, which scores inputs by magnitude).
    pub fn effective_scorer(&self, have_predictor: bool) -> Option<Scorer> {
        match self {
            Setting::Neurons { config, scorer } if !config.is_off() => {
                Some(scorer.unwrap_or(if have_predictor {
                    Scorer::LowRank
                } else {
                    Scorer::Exact
                }))
            }
            _ => None,
        }
    }

    /// Whether this setting cannot run without a predictor file.
    pub fn needs_predictor(&self) -> bool {
        match self {
            Setting::Neurons { config, scorer } => {
                config.threshold == Threshold::Calibrated
                    || matches!(scorer, Some(Scorer::LowRank) | Some(Scorer::Cascade { .. }))
            }
            Setting::Inputs(spec) => *spec == InputSpec::TealCalibrated,
        }
    }

    /// Whether this setting runs on the input-major weights.
    pub fn is_input(&self) -> bool {
        matches!(self, Setting::Inputs(_))
    }

    /// The SPEC as `--sparsity` spells it (`off` for dense).
    pub fn spec(&self) -> String {
        match self {
            Setting::Neurons { config, .. } => config.threshold.to_string(),
            Setting::Inputs(spec) => spec.to_string(),
        }
    }
}

/// Parses a comma-separated list of `SPEC[@SCORER]` settings.
pub fn parse_settings(list: &str) -> Result<Vec<Setting>> {
    let v: Vec<Setting> = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(Error::Input("the list of sweep settings is empty".into()));
    }
    Ok(v)
}

/// The default settings, parsed.
pub fn default_settings() -> Vec<Setting> {
    DEFAULT_SETTINGS
        .iter()
        .map(|s| s.parse().expect("DEFAULT_SETTINGS parse"))
        .collect()
}

/// Builds the sparse MLP of a setting (None for dense) as `SparseMlp::from_spec` does, from
/// an already loaded predictor (cloned: each setting gets its own), with `mode`. The
/// predictor should hold its factors in [`Predictor::factor_dtype_for`] the model's MLP
/// dtype, so that it is the one [`eval::mlp_bytes`] is told about.
pub fn build_sparse(
    model: &Llama,
    config: SparsityConfig,
    scorer: Option<Scorer>,
    predictor: Option<&Predictor>,
    mode: Mode,
) -> Result<Option<SparseMlp>> {
    if config.is_off() {
        return Ok(None);
    }
    let mut config = config;
    config.scorer = scorer;
    config.mode = mode;
    SparseMlp::new(model, config, predictor.cloned()).map(Some)
}

/// Loads a predictor file for `model`, its factors converted to the dtype a sparse MLP of
/// this model holds them in (so that its byte count is what decoding reads).
pub fn load_predictor(path: &Path, model: &Llama) -> Result<Predictor> {
    let mut p = Predictor::load(path, model)?;
    let dtype = model
        .layers
        .first()
        .map(|l| l.mlp.gate_proj.weight.dtype)
        .ok_or_else(|| Error::Input("a model without layers".into()))?;
    p.convert_to(Predictor::factor_dtype_for(dtype));
    Ok(p)
}

/// How a sweep runs.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Evaluation window (tokens).
    pub window: usize,
    /// Decode timing: prompt = the first `prompt_tokens` tokens of the text, then
    /// `gen_tokens` greedy tokens (no EOS stop), `runs` measured runs after `warmup`.
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    pub warmup: usize,
    /// Where active rows are read from (`--sparse-mode`), for every setting.
    pub mode: Mode,
}

/// One setting's results.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SweepRow {
    /// Human-readable name: `dense`, `density:0.5 exact`, ...
    pub setting: String,
    /// The SPEC (`off` for dense) and the scorer used (null for dense).
    pub sparsity: String,
    pub scorer: Option<String>,
    /// Achieved MLP density over the evaluation (1 for dense and input sparsity, which
    /// computes every neuron).
    pub mlp_density: f64,
    /// MLP bytes read per token relative to dense, predictor included (1 for dense).
    pub mlp_bytes_ratio: f64,
    /// All weight bytes read per token (every layer and the head) relative to dense,
    /// predictor included: the plot's axis, common to neuron and input sparsity.
    #[serde(default)]
    pub weight_bytes_ratio: f64,
    /// Of which the predictor's factors.
    pub predictor_bytes_ratio: f64,
    pub ppl_all: f64,
    /// llama.cpp's method (second half of each window).
    pub ppl_second_half: f64,
    /// `ppl_second_half` over the dense row's (null when the sweep has no dense row).
    pub ppl_ratio: Option<f64>,
    /// Mean KL(dense || setting) per token (0 for dense).
    pub kl_vs_dense: f64,
    pub top1_agreement: f64,
    /// Decode tokens/s over the timing runs: median, min, max.
    pub decode_tok_s: Stat,
    /// `decode_tok_s.median` over the dense row's (null without a dense row).
    pub decode_ratio: Option<f64>,
    /// Achieved density per layer (empty for dense): of the MLP's neurons, or for input
    /// sparsity of the MLP's inputs (gate/up and down, by bytes).
    pub layer_density: Vec<f64>,
}

/// The whole sweep (`sweep.json`; [`plot`] draws it again from that file).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SweepReport {
    /// The model's file or directory name, and its identity (shape and weight fingerprint).
    pub model: String,
    pub model_identity: String,
    pub text: String,
    pub dtype: String,
    pub threads: usize,
    pub sparse_mode: String,
    pub predictor: Option<String>,
    pub window: usize,
    pub windows: usize,
    pub tokens: usize,
    /// How decode speed was measured.
    pub decode_prompt_tokens: usize,
    pub decode_gen_tokens: usize,
    pub decode_runs: usize,
    pub decode_note: String,
    pub rows: Vec<SweepRow>,
    /// Settings not run, with the reason.
    pub skipped: Vec<String>,
}

/// Progress of a sweep: setting `setting` of `settings` (its name), window `window` of
/// `windows` of its evaluation (`window == windows` while its decode is timed).
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub setting: usize,
    pub settings: usize,
    pub name: &'a str,
    pub window: usize,
    pub windows: usize,
}

/// What a setting decodes with: the row-major model with its sparse MLP (None: dense),
/// or the input-major model with its input-sparsity hook.
// A sweep holds one per setting: their sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Hook {
    Neurons(Option<SparseMlp>),
    Inputs(InputSparsity),
}

impl Hook {
    fn set_prefill_dense(&mut self, dense: bool) {
        match self {
            Hook::Neurons(sp) => sp.iter_mut().for_each(|s| s.set_prefill_dense(dense)),
            Hook::Inputs(h) => h.set_prefill_dense(dense),
        }
    }
    /// The model it runs on and the override to pass.
    fn parts<'a>(
        &'a mut self,
        model: &'a Llama,
        input_model: Option<&'a Llama>,
    ) -> (&'a Llama, Option<&'a mut dyn MlpOverride>) {
        match self {
            Hook::Neurons(sp) => (model, sp.as_mut().map(|s| s as &mut dyn MlpOverride)),
            Hook::Inputs(h) => (
                input_model.expect("input settings run with the input-major model"),
                Some(h as &mut dyn MlpOverride),
            ),
        }
    }
}

/// Runs `settings` over `ids`: MLP-neuron settings on `model` (row-major), input-sparsity
/// settings on `input_model` (the same weights held input-major; required when there are
/// such settings). Settings needing a predictor are skipped (and listed) when none is
/// given, and so are those the sparse mode or the predictor cannot run. The report's
/// descriptive fields (model, text, dtype, threads, predictor) are left empty for the
/// caller to fill.
pub fn run(
    model: &Llama,
    input_model: Option<&Llama>,
    ids: &[u32],
    settings: &[Setting],
    predictor: Option<&Predictor>,
    opts: &SweepOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<SweepReport> {
    if opts.runs == 0 || opts.gen_tokens == 0 || opts.prompt_tokens == 0 {
        return Err(Error::Input(
            "the sweep's decode timing needs at least one prompt token, one generated token and one run".into(),
        ));
    }
    if ids.len() < opts.prompt_tokens {
        return Err(Error::Input(format!(
            "the text has {}, fewer than the decode prompt's {}",
            count(ids.len(), "token"),
            opts.prompt_tokens
        )));
    }
    if opts.prompt_tokens + opts.gen_tokens > model.config.max_position_embeddings {
        return Err(Error::Input(format!(
            "decode prompt + generated tokens ({}) exceed the model's context ({})",
            opts.prompt_tokens + opts.gen_tokens,
            model.config.max_position_embeddings
        )));
    }
    if input_model.is_none()
        && let Some(s) = settings.iter().find(|s| s.is_input())
    {
        return Err(Error::Input(format!(
            "sweep setting '{s}' needs the weights held input-major"
        )));
    }
    let (run_list, skipped): (Vec<&Setting>, Vec<&Setting>) = settings
        .iter()
        .partition(|s| predictor.is_some() || !s.needs_predictor());
    let prompt = &ids[..opts.prompt_tokens];
    let mut rows = Vec::with_capacity(run_list.len());
    let mut skipped: Vec<String> = skipped
        .iter()
        .map(|s| format!("{s} (needs --predictor)"))
        .collect();
    let (mut windows, mut tokens) = (0, 0);
    let dense_bytes = model.weight_bytes_per_token() as f64;
    // Each evaluated setting's hook, kept for the timing rounds.
    let mut timed: Vec<Hook> = Vec::with_capacity(run_list.len());
    for (i, setting) in run_list.iter().enumerate() {
        let name = setting.to_string();
        // A setting this sparse mode or predictor cannot run (cascade in block mode,
        // block mode on float weights, teal:calibrated without input tables) is listed
        // as skipped, not the end of the sweep.
        let hook = match setting {
            Setting::Neurons { config, scorer } => {
                build_sparse(model, *config, *scorer, predictor, opts.mode).map(Hook::Neurons)
            }
            Setting::Inputs(spec) => InputSparsity::new(
                input_model.expect("checked above"),
                *spec,
                predictor.and_then(|p| p.input.as_ref()),
            )
            .map(Hook::Inputs),
        };
        let mut hook = match hook {
            Ok(h) => h,
            Err(e @ Error::Input(_)) => {
                skipped.push(format!("{name} ({e})"));
                continue;
            }
            Err(e) => return Err(e),
        };
        // Every position uses its own mask, as decoding would.
        hook.set_prefill_dense(false);
        let (m, over) = hook.parts(model, input_model);
        let r: EvalReport = eval::perplexity(m, ids, opts.window, over, |w, n| {
            progress(Progress {
                setting: i,
                settings: run_list.len(),
                name: &name,
                window: w,
                windows: n,
            })
        })?;
        (windows, tokens) = (r.windows, r.tokens);
        // Achieved density and bytes over the evaluation only (before the timing runs).
        let (density, bytes, layer_density) = match &hook {
            Hook::Neurons(Some(s)) => {
                let b = eval::mlp_bytes(model, s, predictor).ok_or_else(|| {
                    Error::Input(format!("{name}: no MLP byte count (no sparse token?)"))
                })?;
                (s.density().unwrap_or(1.0), b, s.layer_density())
            }
            Hook::Neurons(None) => (
                1.0,
                MlpBytes {
                    dense: 1.0,
                    sparse: 1.0,
                    predictor: 0.0,
                },
                Vec::new(),
            ),
            Hook::Inputs(h) => {
                // gate, up and down hold the same number of weights in one dtype, so the
                // MLP's bytes follow (2 gate/up + down) / 3 of the inputs kept.
                let layers: Vec<f64> = h
                    .layer_group_density()
                    .iter()
                    .map(|d| (2.0 * d[2] + d[3]) / 3.0)
                    .collect();
                let mean = layers.iter().sum::<f64>() / layers.len().max(1) as f64;
                let b = MlpBytes {
                    dense: 1.0,
                    sparse: mean,
                    predictor: 0.0,
                };
                (1.0, b, layers)
            }
        };
        let weight_bytes_ratio = match &hook {
            Hook::Inputs(h) => h.weight_bytes_ratio().unwrap_or(1.0),
            // `bytes` in bytes per token here: the MLP's dense bytes give way to its
            // sparse ones (predictor included).
            Hook::Neurons(Some(_)) => (dense_bytes - bytes.dense + bytes.sparse) / dense_bytes,
            Hook::Neurons(None) => 1.0,
        };
        rows.push(SweepRow {
            setting: name,
            sparsity: setting.spec(),
            scorer: setting
                .effective_scorer(predictor.is_some())
                .map(|s| s.to_string()),
            mlp_density: density,
            mlp_bytes_ratio: bytes.ratio(),
            predictor_bytes_ratio: bytes.predictor / bytes.dense,
            weight_bytes_ratio,
            ppl_all: r.ppl_all,
            ppl_second_half: r.ppl_second_half,
            ppl_ratio: None,
            kl_vs_dense: r.kl_vs_dense.unwrap_or(0.0),
            top1_agreement: r.top1_agreement.unwrap_or(1.0),
            decode_tok_s: Stat::of(&[0.0]),
            decode_ratio: None,
            layer_density,
        });
        // Decode timing with the same hook, prefill dense as generation runs it.
        hook.set_prefill_dense(true);
        timed.push(hook);
    }
    // Timing after every evaluation, in rounds that run each setting once, so that a
    // shared machine's drift over the minutes of a sweep hits every setting alike.
    let mut speeds: Vec<Vec<f64>> = vec![Vec::with_capacity(opts.runs); timed.len()];
    let settings = timed.len();
    for round in 0..opts.warmup + opts.runs {
        for (k, hook) in timed.iter_mut().enumerate() {
            progress(Progress {
                setting: k,
                settings,
                name: &rows[k].setting,
                window: windows,
                windows,
            });
            let (m, over) = hook.parts(model, input_model);
            let sample = bench::measure(m, prompt, opts.gen_tokens, over)?;
            if round >= opts.warmup {
                speeds[k].push(sample.decode_tok_s);
            }
        }
    }
    for (row, s) in rows.iter_mut().zip(&speeds) {
        row.decode_tok_s = Stat::of(s);
    }
    if let Some(d) = rows.iter().find(|r| r.sparsity == "off").cloned() {
        for r in &mut rows {
            r.ppl_ratio = Some(r.ppl_second_half / d.ppl_second_half);
            r.decode_ratio = Some(r.decode_tok_s.median / d.decode_tok_s.median);
        }
    }
    Ok(SweepReport {
        model: String::new(),
        model_identity: String::new(),
        text: String::new(),
        dtype: String::new(),
        threads: 0,
        sparse_mode: format!("{:?}", opts.mode).to_lowercase(),
        predictor: None,
        window: opts.window,
        windows,
        tokens,
        decode_prompt_tokens: opts.prompt_tokens,
        decode_gen_tokens: opts.gen_tokens,
        decode_runs: opts.runs,
        decode_note: format!(
            "decode tok/s: median of {} of {} after a {}-token prompt ({} warm-up), each setting timed in this process with its own sparse MLP or input hook, in rounds of one generation per setting",
            count(opts.runs, "greedy generation"),
            count(opts.gen_tokens, "token"),
            opts.prompt_tokens,
            opts.warmup
        ),
        rows,
        skipped,
    })
}

/// The report as a markdown document: a header naming what was run, the table, notes.
pub fn markdown(r: &SweepReport) -> String {
    let mut s = String::new();
    s.push_str("# Sparsity sweep\n\n");
    s.push_str(&format!(
        "model `{}` (`{}`), {}, {}, sparse mode {}{}; text `{}`: {} in {} of {}.\n\n",
        r.model,
        r.model_identity,
        r.dtype,
        count(r.threads, "thread"),
        r.sparse_mode,
        r.predictor
            .as_ref()
            .map(|p| format!(", predictor `{p}`"))
            .unwrap_or_default(),
        r.text,
        count(r.tokens, "token"),
        count(r.windows, "window"),
        r.window
    ));
    s.push_str(
        "| setting | MLP density | MLP bytes/token vs dense | of which predictor | weight bytes/token vs dense | ppl, second half | ppl, all | KL(dense‖sparse) | top-1 agreement | decode tok/s [min, max] |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for row in &r.rows {
        let ratio = |x: Option<f64>| x.map(|v| format!(" (x{v:.3})")).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3}{} | {:.3} | {:.4} | {:.3} | {:.1} [{:.1}, {:.1}]{} |\n",
            row.setting,
            row.mlp_density,
            row.mlp_bytes_ratio,
            row.predictor_bytes_ratio,
            row.weight_bytes_ratio,
            row.ppl_second_half,
            ratio(row.ppl_ratio),
            row.ppl_all,
            row.kl_vs_dense,
            row.top1_agreement,
            row.decode_tok_s.median,
            row.decode_tok_s.min,
            row.decode_tok_s.max,
            ratio(row.decode_ratio),
        ));
    }
    s.push('\n');
    s.push_str(
        "MLP bytes/token: the gate, up and down bytes a decoded token reads (exact scoring reads all of gate and up; a low-rank scorer its predictor's factors and the active rows; down rows from the transposed copy (Q8_0 for a quantized model), from a Q4 file's down held by input column, or in block mode from the model's own blocks; rows copied into the weight cache not counted), relative to the dense MLP's, from the achieved density over the evaluation; for input sparsity (teal, wina), gate/up and down rows of the inputs kept (every neuron is computed). Weight bytes/token: all the weights a token reads (every layer and the output head, predictor included) relative to dense: the plot's axis. Input sparsity runs on an input-major copy of the weights (Q8_0 re-quantized along the inputs' rows, floats as they are), against the same dense row.\n\n",
    );
    s.push_str(&format!("{}.\n", r.decode_note));
    if !r.skipped.is_empty() {
        s.push_str(&format!("\nSkipped: {}.\n", r.skipped.join(", ")));
    }
    s
}

/// Writes `dir/sweep.md`, `dir/sweep.json` and `dir/sweep.png` (creating `dir`).
pub fn write_outputs(r: &SweepReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let md = dir.join("sweep.md");
    std::fs::write(&md, markdown(r)).map_err(|e| Error::io(&md, e))?;
    let js = dir.join("sweep.json");
    let text = serde_json::to_string_pretty(r).expect("the report serializes");
    std::fs::write(&js, text + "\n").map_err(|e| Error::io(&js, e))?;
    plot(r, &dir.join("sweep.png"))
}

/// The family a row belongs to in the plot (one colour and line each): the scorer and the
/// kind of threshold.
fn family(row: &SweepRow) -> String {
    match row.sparsity.as_str() {
        "off" => return "dense".into(),
        "teal:calibrated" => return "input |x|, calibrated".into(),
        s if s.starts_with("teal:") => return "input |x|, teal:S".into(),
        s if s.starts_with("wina:") => return "input |x|·‖W‖, wina:S".into(),
        _ => {}
    }
    let kind = match row.sparsity.split(':').next().unwrap_or("") {
        "density" => "density:D",
        "sigma" => "sigma:K",
        k => k,
    };
    let scorer = match row.scorer.as_deref().unwrap_or("") {
        "exact" => "exact scores",
        "signed-gate" => "signed gate",
        s => s,
    };
    format!("{scorer}, {kind}")
}

/// Family colours: black for dense, then Tableau's ten (dark enough on white).
const COLORS: [(u8, u8, u8); 11] = [
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// The font the plot's text is drawn with: bundled (a subset of DejaVu Sans, printable
/// ASCII), so that no system font library is needed.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans-subset.ttf");

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Input("the bundled plot font does not parse".into()))
    }
}

/// Draws the sweep: perplexity (second half, log scale) and decode tokens/s against MLP
/// bytes per token relative to dense, one point per setting, a line and colour per family.
pub fn plot(r: &SweepReport, path: &Path) -> Result<()> {
    register_font()?;
    draw(r, path).map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
}

/// Places point labels (pixel boxes) so that they do not overlap one another: for each
/// point, the first of a few offsets whose box is free, else the first offset.
fn place_labels(points: &[((i32, i32), usize)]) -> Vec<(i32, i32)> {
    const H: i32 = 14;
    let mut taken: Vec<(i32, i32, i32, i32)> = Vec::new();
    points
        .iter()
        .map(|&((x, y), chars)| {
            let w = 7 * chars as i32;
            let candidates = [
                (8, -18),
                (8, 4),
                (-8 - w, -18),
                (-8 - w, 4),
                (8, -32),
                (8, 18),
            ];
            let free = |&(dx, dy): &(i32, i32)| {
                let (x0, y0) = (x + dx, y + dy);
                !taken
                    .iter()
                    .any(|&(a, b, c, d)| x0 < c && a < x0 + w && y0 < d && b < y0 + H)
            };
            let (dx, dy) = candidates
                .iter()
                .copied()
                .find(|c| free(c))
                .unwrap_or(candidates[0]);
            taken.push((x + dx, y + dy, x + dx + w, y + dy + H));
            (dx, dy)
        })
        .collect()
}

/// The y axes' most labelled ticks.
const Y_LABELS: usize = 10;

/// The fewest decimals (at most 6) that write every tick exactly and consecutive ticks
/// differently (a perplexity axis from 25.6 to 27.4 has ticks 0.2 apart: "26, 26, 26,
/// 27" with none; ticks 0.25 apart need two, not "26.2" for 26.25).
fn tick_decimals(ticks: &[f64]) -> usize {
    let exact = |d: usize| {
        let scale = 10f64.powi(d as i32);
        ticks.iter().all(|&v| {
            let x = v * scale;
            (x - x.round()).abs() <= 1e-6 * x.abs().max(1.0)
        })
    };
    let distinct = |d: usize| {
        ticks
            .windows(2)
            .all(|w| format!("{:.d$}", w[0]) != format!("{:.d$}", w[1]))
    };
    (0..=6).find(|&d| exact(d) && distinct(d)).unwrap_or(6)
}

/// [`tick_decimals`] of the labelled ticks plotters draws on a linear axis over `range`.
fn linear_tick_decimals(range: std::ops::Range<f64>) -> usize {
    use plotters::coord::ranged1d::Ranged;
    use plotters::coord::types::RangedCoordf64;
    tick_decimals(&RangedCoordf64::from(range).key_points(Y_LABELS))
}

fn draw(r: &SweepReport, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1600, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} ({}): {}, windows of {}; decode {} after {}, median of {}",
        r.model,
        r.dtype,
        count(r.tokens, "token"),
        r.window,
        count(r.decode_gen_tokens, "token"),
        r.decode_prompt_tokens,
        count(r.decode_runs, "run")
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (body, legend) = root.split_vertically(root.dim_in_pixel().1 - 50);
    let panels = body.split_evenly((1, 2));
    let mut families: Vec<String> = Vec::new();
    for row in &r.rows {
        let f = family(row);
        if !families.contains(&f) {
            families.push(f);
        }
    }
    // Dense first (black) when present; the other families in order of appearance.
    families.sort_by_key(|f| f != "dense");
    let color_of = |f: &str| {
        let i = families.iter().position(|x| x == f).unwrap_or(0);
        let i = if families[0] == "dense" { i } else { i + 1 };
        let (r, g, b) = COLORS[i % COLORS.len()];
        RGBColor(r, g, b)
    };
    // A report written before weight bytes were recorded places rows by MLP bytes.
    let old_report = r.rows.iter().all(|x| x.weight_bytes_ratio == 0.0);
    let x_of = |x: &SweepRow| {
        if old_report {
            x.mlp_bytes_ratio
        } else {
            x.weight_bytes_ratio
        }
    };
    let xmax = r.rows.iter().map(x_of).fold(1.0f64, f64::max) * 1.1;
    let label_of = |x: &SweepRow| {
        if x.sparsity == "off" {
            "dense".to_string()
        } else {
            x.sparsity.clone()
        }
    };
    type Pick = fn(&SweepRow) -> f64;
    let panels_spec: [(&str, &str, Pick, bool); 2] = [
        (
            "Perplexity (second half of each window)",
            "perplexity (above 4x dense: on the top edge)",
            |x| x.ppl_second_half,
            true,
        ),
        (
            "Decode tokens/s (this process, settings interleaved)",
            "decode tokens/s (median)",
            |x| x.decode_tok_s.median,
            false,
        ),
    ];
    // Perplexity axis: up to 4x dense, so the settings worth choosing are not squashed
    // under the ruinous ones; points above are drawn on the top edge, labelled with
    // their perplexity ratio.
    let dense_ppl = r
        .rows
        .iter()
        .find(|x| x.sparsity == "off")
        .map(|x| x.ppl_second_half);
    for (area, (caption, ydesc, pick, log)) in panels.iter().zip(panels_spec) {
        let cap = match (log, dense_ppl) {
            (true, Some(d)) => 4.0 * d,
            _ => f64::INFINITY,
        };
        let y_of = |x: &SweepRow| pick(x).min(cap);
        let text_of = |x: &SweepRow| {
            if pick(x) > cap {
                format!("{} (x{:.0}, off scale)", label_of(x), pick(x) / (cap / 4.0))
            } else {
                label_of(x)
            }
        };
        let ys: Vec<f64> = r.rows.iter().map(y_of).collect();
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let ymax = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(caption, ("sans-serif", 19))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80);
        // The same drawing for both kinds of y axis (log for perplexity). `$decimals`:
        // the y labels' decimals, enough that consecutive ticks read differently.
        macro_rules! body {
            ($chart:ident, $decimals:expr) => {{
                let decimals: usize = $decimals;
                $chart
                    .configure_mesh()
                    .x_desc(
                        "weight bytes read per token (all layers and the head), relative to dense (predictor included)",
                    )
                    .y_desc(ydesc)
                    .label_style(("sans-serif", 15))
                    .axis_desc_style(("sans-serif", 16))
                    .light_line_style(RGBColor(235, 235, 235))
                    .x_label_formatter(&|v| format!("{v:.1}"))
                    .y_labels(Y_LABELS)
                    .y_label_formatter(&|v| format!("{v:.decimals$}"))
                    .draw()?;
                for f in &families {
                    let c = color_of(f);
                    let mut pts: Vec<(f64, f64)> = r
                        .rows
                        .iter()
                        .filter(|x| &family(x) == f)
                        .map(|x| (x_of(x), y_of(x)))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    if pts.len() > 1 {
                        $chart.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?;
                    }
                    $chart.draw_series(pts.iter().map(|&p| Circle::new(p, 6, c.filled())))?;
                }
                let pixels: Vec<((i32, i32), usize)> = r
                    .rows
                    .iter()
                    .map(|x| {
                        let p = $chart.backend_coord(&(x_of(x), y_of(x)));
                        (p, text_of(x).len())
                    })
                    .collect();
                let offsets = place_labels(&pixels);
                $chart.draw_series(r.rows.iter().zip(offsets).map(|(x, off)| {
                    EmptyElement::at((x_of(x), y_of(x)))
                        + Text::new(text_of(x), off, ("sans-serif", 13).into_font())
                }))?;
            }};
        }
        if log && cap.is_finite() {
            // Capped at 4x dense: a narrow range, where a log axis would have no labelled
            // tick (plotters labels powers of ten), so a linear one.
            let range = (ymin * 0.95)..(ymax * 1.05);
            let d = linear_tick_decimals(range.clone());
            let mut chart = builder.build_cartesian_2d(0f64..xmax, range)?;
            body!(chart, d);
        } else if log {
            let range = (ymin / 1.1)..(ymax * 1.25);
            let coord: LogCoord<f64> = range.clone().log_scale().into();
            let d = tick_decimals(&coord.key_points(Y_LABELS));
            let mut chart = builder.build_cartesian_2d(0f64..xmax, range.log_scale())?;
            body!(chart, d);
        } else {
            let range = 0f64..(ymax * 1.15).max(1.0);
            let d = linear_tick_decimals(range.clone());
            let mut chart = builder.build_cartesian_2d(0f64..xmax, range)?;
            body!(chart, d);
        }
    }
    // One legend for both panels, below them: a marker and the family's name each.
    let mut x = 100;
    let font: TextStyle = ("sans-serif", 16).into_font().into();
    for f in &families {
        let c = color_of(f);
        legend.draw(&Circle::new((x, 25), 7, c.filled()))?;
        legend.draw(&Text::new(f.clone(), (x + 14, 16), font.clone()))?;
        let (w, _) = legend.estimate_text_size(f, &font)?;
        x += w as i32 + 50;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_name() {
        for s in DEFAULT_SETTINGS {
            s.parse::<Setting>().unwrap();
        }
        let v = parse_settings("off, density:0.5@exact,sigma:2@signed-gate,calibrated").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].to_string(), "dense");
        assert_eq!(v[1].to_string(), "density:0.5 exact");
        assert_eq!(v[2].effective_scorer(false), Some(Scorer::SignedGate));
        assert!(v[3].needs_predictor() && !v[1].needs_predictor());
        assert_eq!(v[3].effective_scorer(true), Some(Scorer::LowRank));
        assert_eq!(v[1].effective_scorer(true), Some(Scorer::Exact));
        let t = parse_settings("teal:0.3,wina:0.4,teal:calibrated").unwrap();
        assert_eq!(t[0], Setting::Inputs(InputSpec::Teal(0.3)));
        assert_eq!(
            (t[1].to_string(), t[1].spec()),
            ("wina:0.4".into(), "wina:0.4".into())
        );
        assert!(t.iter().all(Setting::is_input) && !v.iter().any(Setting::is_input));
        assert!(t[2].needs_predictor() && !t[0].needs_predictor());
        assert_eq!(t[0].effective_scorer(true), None);
        assert!(parse_settings("teal:1").is_err());
        assert!(parse_settings("off@exact").is_err());
        assert!(parse_settings("density:2").is_err());
        assert!(parse_settings(" , ").is_err());
    }

    #[test]
    fn perplexity_tick_labels_differ_from_one_to_the_next() {
        // The axis: perplexities 26-27 capped at 4x dense, ticks 0.2 apart.
        let labels = |range: std::ops::Range<f64>| {
            use plotters::coord::ranged1d::Ranged;
            use plotters::coord::types::RangedCoordf64;
            let ticks = RangedCoordf64::from(range.clone()).key_points(Y_LABELS);
            let d = linear_tick_decimals(range);
            ticks.iter().map(|v| format!("{v:.d$}")).collect::<Vec<_>>()
        };
        for range in [
            (25.6 * 0.95)..(27.4 * 1.05),
            18.2..18.6,
            18.29..18.31,
            0.0..160.0,
            10.0..1000.0,
        ] {
            let l = labels(range.clone());
            assert!(l.len() >= 3, "{range:?}: {l:?}");
            for w in l.windows(2) {
                assert_ne!(w[0], w[1], "{range:?}: {l:?}");
            }
        }
        assert_eq!(labels(24.32..28.77)[0], "24.5");
        // Whole numbers where they suffice.
        assert_eq!(linear_tick_decimals(0.0..160.0), 0);
        assert_eq!(tick_decimals(&[26.0, 26.2, 26.4]), 1);
        assert_eq!(tick_decimals(&[26.0, 26.25, 26.5]), 2);
        // The log axis too.
        use plotters::coord::ranged1d::Ranged;
        use plotters::prelude::{IntoLogRange, LogCoord};
        let coord: LogCoord<f64> = (18.0..80.0).log_scale().into();
        let ticks = coord.key_points(Y_LABELS);
        let d = tick_decimals(&ticks);
        let l: Vec<String> = ticks.iter().map(|v| format!("{v:.d$}")).collect();
        assert!(l.windows(2).all(|w| w[0] != w[1]), "{l:?}");
    }

    fn row(sparsity: &str, scorer: Option<&str>, bytes: f64, ppl: f64, tok_s: f64) -> SweepRow {
        SweepRow {
            setting: sparsity.into(),
            sparsity: sparsity.into(),
            scorer: scorer.map(Into::into),
            mlp_density: 0.5,
            mlp_bytes_ratio: bytes,
            predictor_bytes_ratio: 0.0,
            weight_bytes_ratio: 0.4 + 0.6 * bytes,
            ppl_all: ppl * 1.3,
            ppl_second_half: ppl,
            ppl_ratio: None,
            kl_vs_dense: 0.1,
            top1_agreement: 0.9,
            decode_tok_s: Stat::of(&[tok_s]),
            decode_ratio: None,
            layer_density: vec![0.5; 2],
        }
    }

    #[test]
    fn writes_table_json_and_png_of_a_report() {
        let rows = vec![
            row("off", None, 1.0, 18.3, 140.0),
            row("density:0.5", Some("exact"), 0.95, 18.9, 141.0),
            row("density:0.25", Some("exact"), 0.81, 21.0, 150.0),
            row("sigma:1", Some("exact"), 0.72, 90.0, 152.0),
            row("sigma:2", Some("signed-gate"), 1.01, 46867.0, 120.0),
            row("density:0.5", Some("lowrank"), 1.12, 22.0, 100.0),
            row("density:0.5", Some("cascade:0.7"), 1.3, 21.4, 95.0),
            row("calibrated", Some("lowrank"), 1.4, 18.9, 90.0),
            row("teal:0.3", None, 0.7, 19.3, 160.0),
            row("teal:0.4", None, 0.6, 21.0, 170.0),
            row("wina:0.3", None, 0.7, 19.4, 158.0),
            row("teal:calibrated", None, 0.72, 18.8, 165.0),
        ];
        let r = SweepReport {
            model: "m.gguf".into(),
            model_identity: "llama-test".into(),
            text: "t.txt".into(),
            dtype: "native".into(),
            threads: 2,
            sparse_mode: "cached".into(),
            predictor: Some("p.safetensors".into()),
            window: 64,
            windows: 2,
            tokens: 128,
            decode_prompt_tokens: 32,
            decode_gen_tokens: 32,
            decode_runs: 3,
            decode_note: "note".into(),
            rows,
            skipped: vec![],
        };
        // SWEEP_PLOT_DIR keeps the files for a look at the plot.
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("SWEEP_PLOT_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| tmp.path().to_path_buf());
        write_outputs(&r, &dir).unwrap();
        let png = std::fs::read(dir.join("sweep.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        let md = std::fs::read_to_string(dir.join("sweep.md")).unwrap();
        assert!(md.contains("| sigma:2 |"), "{md}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap())
                .unwrap();
        assert_eq!(v["rows"].as_array().unwrap().len(), 12);
        assert_eq!(family(&r.rows[8]), "input |x|, teal:S");
        assert_eq!(family(&r.rows[10]), "input |x|·‖W‖, wina:S");
        assert_eq!(family(&r.rows[11]), "input |x|, calibrated");
        assert_eq!(family(&r.rows[1]), "exact scores, density:D");
        assert_eq!(family(&r.rows[0]), "dense");
    }
}
