//! `sparsellm generate`: text from a prompt, streamed as it is decoded.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use serde_json::json;
use sparsellm::generate::{self, GenerateOptions, SamplingOptions};
use sparsellm::progress::count;
use sparsellm::sparse::Sparsity;
use sparsellm::tokenizer::{CHATML_TEMPLATE, ChatTemplate};

use crate::args::*;
use crate::load::*;
use crate::output::*;

#[derive(Args)]
#[command(group(ArgGroup::new("prompt_source").required(true).args(["prompt", "prompt_file"])))]
pub(crate) struct GenerateArgs {
    /// The prompt text; `-` reads it from stdin (as is, up to end of input).
    #[arg(long, value_name = "TEXT")]
    pub(crate) prompt: Option<String>,
    /// Read the prompt from a UTF-8 file (as is).
    #[arg(long, value_name = "FILE")]
    pub(crate) prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub(crate) chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    pub(crate) max_tokens: usize,
    /// Sampling temperature, >= 0; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_temperature)]
    pub(crate) temperature: f32,
    /// Sample among the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0, value_parser = parse_count)]
    pub(crate) top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1].
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = parse_top_p)]
    pub(crate) top_p: f32,
    /// Keep only tokens with probability >= P times the most likely one's, in [0, 1]
    /// (0: off).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_min_p)]
    pub(crate) min_p: f32,
    /// Repetition penalty (llama.cpp's): the logit of each token among the last
    /// --repeat-last-n tokens (prompt included) is divided by F when positive, multiplied
    /// by F when negative; applies to greedy decoding too. 1.0: off; 1.1 is typical.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = parse_penalty)]
    pub(crate) repeat_penalty: f32,
    /// How many recent tokens --repeat-penalty looks at.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_count)]
    pub(crate) repeat_last_n: usize,
    /// End the generation when the output contains STRING (repeatable); the stop string
    /// itself is not printed.
    #[arg(long, value_name = "STRING", value_parser = parse_stop)]
    pub(crate) stop: Vec<String>,
    /// Random seed for sampling (same seed, same text).
    #[arg(long, default_value_t = 0, value_parser = parse_seed)]
    pub(crate) seed: u64,
    /// Keep generating past end-of-sequence tokens (up to --max-tokens or the context).
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// The prompt: --prompt TEXT, --prompt - (stdin) or --prompt-file FILE, as is.
pub(crate) fn read_prompt(a: &GenerateArgs) -> Result<String> {
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

pub(crate) fn cmd_generate(a: GenerateArgs) -> Result<()> {
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
            ..SamplingOptions::default()
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
