//! The flags several commands share (model, run and sparsity options), their value
//! parsers, and the checks made before any model loads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use sparsellm::loader::fetch;
use sparsellm::model::KvDType;
use sparsellm::sparse::{InputSpec, Scorer, SparsityConfig};
use sparsellm::tensor::{DType, LoadDType};

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// A GGUF file or a HuggingFace directory (config.json + safetensors + tokenizer.json).
    /// Default: the default model, fetched on first use into $SPARSELLM_MODELS_DIR (./models).
    #[arg(long, value_name = "PATH")]
    pub(crate) model: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// How the weights are held: native (as the file stores them: GGUF's Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1 and K-quant blocks stay quantized and memory-mapped, F32/BF16/F16 stay as
    /// they are), or every matrix converted to f32, bf16 or f16.
    #[arg(long, default_value = "native", value_parser = parse_load_dtype)]
    pub(crate) dtype: LoadDType,
    /// KV cache element type: f32 (attention sees exactly what the projections computed)
    /// or f16 (as llama.cpp's default: half the cache memory and half the bytes attention
    /// reads per position; each key and value rounded once).
    #[arg(long, default_value = "f32", value_parser = parse_kv_dtype)]
    pub(crate) kv_dtype: KvDType,
    /// Worker threads (default: the number of physical cores).
    #[arg(long, value_parser = parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Sparsity at decode. Input sparsity (every projection skips the weight columns of
    /// its smallest inputs): teal:S (skip the fraction S of inputs with the smallest
    /// |x|), wina:S (smallest |x|·column norm), teal:calibrated (per-projection
    /// thresholds from --predictor). MLP-neuron sparsity: sigma:K (keep scores > mean +
    /// K std), density:D (keep the top D fraction), calibrated (per-layer thresholds from
    /// --predictor). Or off.
    #[arg(long, default_value = "off", value_parser = parse_sparsity)]
    pub(crate) sparsity: String,
    /// How neurons are scored: exact (|silu(g)·u| from the full gate and up), lowrank
    /// (a --predictor's low-rank estimate), cascade[:F] (lowrank picks the top F, default
    /// 0.7, exact inside it) or signed-gate (the original SparseLLM's signed g; for
    /// comparison only). Default: lowrank with a --predictor, exact without.
    #[arg(long, value_parser = parse_scorer)]
    pub(crate) scorer: Option<String>,
    /// Predictor file written by `sparsellm calibrate` (low-rank scorers, thresholds).
    #[arg(long, value_name = "FILE")]
    pub(crate) predictor: Option<PathBuf>,
    /// Where active neurons' weights are read from: a differential cache of compact rows,
    /// a gather from the full matrices, or (quantized models) whole 32-neuron groups whose
    /// down-projection blocks are read in place.
    #[arg(long, default_value = "cached", value_parser = ["cached", "gather", "blocks"])]
    pub(crate) sparse_mode: String,
}

pub(crate) fn parse_load_dtype(s: &str) -> std::result::Result<LoadDType, String> {
    s.parse()
}

pub(crate) fn parse_kv_dtype(s: &str) -> std::result::Result<KvDType, String> {
    s.parse()
}

pub(crate) fn parse_float_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.parse::<LoadDType>()? {
        LoadDType::To(d) => Ok(d),
        LoadDType::Native => Err("synth writes f32, bf16 or f16".into()),
    }
}

pub(crate) fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("--threads must be at least 1".into()),
        Ok(n) if n > 1024 => Err(format!("--threads {n} is absurd")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a thread count")),
    }
}

pub(crate) fn parse_positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

pub(crate) fn parse_count(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("'{s}' is not an integer >= 0"))
}

pub(crate) fn parse_seed(s: &str) -> std::result::Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("'{s}' is not a seed: an integer from 0 to {}", u64::MAX))
}

pub(crate) fn parse_window(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 4 => Ok(n),
        Ok(n) => Err(format!("{n} is too small: at least 4 tokens")),
        Err(_) => Err(format!("'{s}' is not an integer >= 4")),
    }
}

/// A finite number satisfying `ok`, else `range` says what is allowed.
pub(crate) fn parse_float(
    s: &str,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && ok(x) => Ok(x),
        Ok(x) if x.is_finite() => Err(format!("{s} is out of range: must be {range}")),
        Ok(_) => Err(format!("'{s}' is not a finite number (must be {range})")),
        Err(_) => Err(format!("'{s}' is not a number (must be {range})")),
    }
}

pub(crate) fn parse_temperature(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |t| t >= 0.0, ">= 0 (0 is greedy)").map(|x| x as f32)
}

pub(crate) fn parse_top_p(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |p| p > 0.0 && p <= 1.0, "in (0, 1]").map(|x| x as f32)
}

pub(crate) fn parse_min_p(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |p| (0.0..=1.0).contains(&p), "in [0, 1]").map(|x| x as f32)
}

pub(crate) fn parse_penalty(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |f| f > 0.0, "> 0 (1 is off)").map(|x| x as f32)
}

pub(crate) fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    parse_float(s, |b| b > 0.0, "> 0 (0.05 allows +5% perplexity)")
}

pub(crate) fn parse_stop(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() {
        Err("a stop string must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

pub(crate) fn parse_sparsity(s: &str) -> std::result::Result<String, String> {
    if InputSpec::is_input_spec(s) {
        return s
            .parse::<InputSpec>()
            .map(|_| s.to_owned())
            .map_err(|e| e.to_string());
    }
    s.parse::<SparsityConfig>()
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

pub(crate) fn parse_scorer(s: &str) -> std::result::Result<String, String> {
    s.parse::<Scorer>()
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// The sparsity flags that can be checked without the model: before it loads, so a
/// mistake costs no loading time. `random_predictor`: bench's `--random-predictor`
/// stands in for a predictor file.
pub(crate) fn check_sparse_flags(run: &RunArgs, random_predictor: bool) -> Result<()> {
    if run.sparsity == "off" {
        if run.predictor.is_some() || run.scorer.is_some() {
            bail!("--predictor and --scorer need a --sparsity setting other than off");
        }
        return Ok(());
    }
    if let Some(p) = &run.predictor {
        std::fs::metadata(p).with_context(|| format!("--predictor {}", p.display()))?;
    }
    if InputSpec::is_input_spec(&run.sparsity) {
        if run.scorer.is_some() || random_predictor {
            bail!(
                "--scorer and --random-predictor apply to MLP-neuron sparsity, not to {}",
                run.sparsity
            );
        }
        if run.sparsity.trim() == "teal:calibrated" && run.predictor.is_none() {
            bail!(
                "--sparsity teal:calibrated needs --predictor FILE (input thresholds from `sparsellm calibrate`)"
            );
        }
        return Ok(());
    }
    if run.predictor.is_some() || random_predictor {
        return Ok(());
    }
    if run.sparsity == "calibrated" {
        bail!(
            "--sparsity calibrated needs --predictor FILE (per-layer thresholds from `sparsellm calibrate`)"
        );
    }
    if let Some(scorer) = &run.scorer {
        let needs_file = matches!(
            scorer.parse::<Scorer>()?,
            Scorer::LowRank | Scorer::Cascade { .. }
        );
        if needs_file {
            bail!(
                "--scorer {scorer} needs --predictor FILE (low-rank predictors from `sparsellm calibrate`)"
            );
        }
    }
    Ok(())
}

/// The directory a new file `path` goes into (`.` for a bare name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether files can be created in the existing directory `dir`: creates and removes a
/// probe file (permissions, read-only mounts and full quotas all show).
pub(crate) fn check_writable_dir(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".sparsellm-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Checks, before any work, that an output file can be written at `path` (`flag` names
/// it in the message): not a directory, its directory exists and is writable.
pub(crate) fn check_output_file(flag: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    if path.is_dir() {
        bail!("{flag} {shown} is a directory; give a file name");
    }
    let dir = parent_dir(path);
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {shown}: {} is not a directory", dir.display());
    }
    if !dir.is_dir() {
        bail!(
            "{flag} {shown}: the directory {} does not exist",
            dir.display()
        );
    }
    check_writable_dir(dir)
        .map_err(|e| anyhow::anyhow!("{flag} {shown}: cannot write in {}: {e}", dir.display()))
}

/// Checks, before any work, that an output directory can be made at `path` (missing
/// directories are created later): `path` is a writable directory, or (when
/// `must_be_new` or it is missing) its nearest existing ancestor is one.
pub(crate) fn check_output_dir(flag: &str, path: &Path, must_be_new: bool) -> Result<()> {
    let shown = path.display();
    if path.exists() {
        if must_be_new {
            bail!("{flag} {shown} already exists; choose a new directory");
        }
        if !path.is_dir() {
            bail!("{flag} {shown} exists and is not a directory");
        }
        return check_writable_dir(path)
            .map_err(|e| anyhow::anyhow!("{flag} {shown}: cannot write in it: {e}"));
    }
    let mut dir = parent_dir(path);
    while !dir.exists() {
        dir = parent_dir(dir);
    }
    if !dir.is_dir() {
        bail!("{flag} {shown}: {} is not a directory", dir.display());
    }
    check_writable_dir(dir)
        .map_err(|e| anyhow::anyhow!("{flag} {shown}: cannot write in {}: {e}", dir.display()))
}

pub(crate) fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        // A model name (`--model gemma3-270m`) unless a file of that name is there.
        Some(p) if !p.exists() => match p.to_str().and_then(fetch::named_model) {
            Some(spec) => crate::commands::fetch::fetch_named(spec, false),
            None => Ok(p.clone()),
        },
        Some(p) => Ok(p.clone()),
        None => Ok(fetch::default_model_path()?),
    }
}
