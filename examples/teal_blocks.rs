//! How much of input sparsity survives at the granularity of quantized blocks: GGUF's
//! Q4_0/Q4_1/Q8_0 blocks run along a row's inputs, 32 at a time, so a row-major quantized
//! matvec can skip only whole blocks of inputs. This compares, at equal fractions of
//! inputs skipped, perplexity and KL of
//!
//! - `element`: TEAL, the fraction S of inputs with the smallest |x_i| per token and group;
//! - `block`: the fraction S of 32-input blocks with the smallest ‖x_block‖ (what a
//!   row-major block kernel could skip);
//!
//! with the dense engine's own eval (each window's first half a dense prompt, the second
//! half decoded token by token with the mask), weights in bf16, masks applied by zeroing
//! the dropped inputs (the masked product):
//!
//!     cargo run --release --example teal_blocks -- [MODEL|-] [TEXT] [WINDOWS] [S,S,...]
//!
//! Defaults: the default model, GPL-3, 4 windows of 512 tokens, S = 0.1,0.2,0.3,0.4.

use sparsellm::eval::perplexity_with;
use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{InputGroup, InputMask, Llama, MlpOverride};
use sparsellm::tensor::{DType, LoadDType};
use sparsellm::tokenizer::Tokenizer;

const BLOCK: usize = 32;

/// Zeroes, in a decoded token's input to every projection group, the inputs (or whole
/// 32-input blocks) with the smallest magnitudes; prompts (several tokens) pass dense.
struct Mask {
    skip: f64,
    blocks: bool,
    skipped: u64,
    seen: u64,
}

impl MlpOverride for Mask {
    fn masks_inputs(&self) -> bool {
        true
    }

    fn input_mask(&mut self, _: usize, _: InputGroup, x: &mut [f32], n: usize) -> InputMask<'_> {
        if n != 1 {
            return InputMask::Dense;
        }
        let unit = if self.blocks { BLOCK } else { 1 };
        let units = x.len().div_ceil(unit);
        let mut score: Vec<(f32, usize)> = (0..units)
            .map(|b| {
                let r = b * unit..((b + 1) * unit).min(x.len());
                (x[r].iter().map(|v| v * v).sum::<f32>(), b)
            })
            .collect();
        let drop = (self.skip * units as f64).round() as usize;
        score.select_nth_unstable_by(drop.min(units - 1), |a, b| a.0.total_cmp(&b.0));
        for &(_, b) in &score[..drop] {
            let r = b * unit..((b + 1) * unit).min(x.len());
            self.skipped += r.len() as u64;
            x[r].fill(0.0);
        }
        self.seen += x.len() as u64;
        InputMask::Dense
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = match args.first().map(String::as_str) {
        None | Some("-") => loader::fetch::default_model_path()?,
        Some(p) => p.into(),
    };
    let text = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "/usr/share/common-licenses/GPL-3".into());
    let windows: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let levels: Vec<f64> = args
        .get(3)
        .map_or("0.1,0.2,0.3,0.4", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let pool = pool::init_global(pool::default_threads());
    let src = loader::open(&model_path)?;
    let tok = Tokenizer::load(&src.tokenizer_source()?)?;
    let model = Llama::load(src.as_ref(), LoadDType::To(DType::BF16), pool)?;
    let window = 512;
    let ids = tok.encode(&std::fs::read_to_string(&text)?)?;
    let ids = &ids[..(windows * window).min(ids.len())];
    let dense = perplexity_with(&model, ids, window, None, true, |_, _| {})?;
    println!(
        "{} | {text} | {} windows of {window} | dense ppl (second halves) {:.4}",
        model_path.display(),
        ids.len() / window,
        dense.ppl_second_half
    );
    println!("| S | granularity | inputs skipped | ppl x | KL | top-1 agreement |");
    println!("|---|---|---|---|---|---|");
    for &s in &levels {
        for blocks in [false, true] {
            let mut m = Mask {
                skip: s,
                blocks,
                skipped: 0,
                seen: 0,
            };
            let r = perplexity_with(&model, ids, window, Some(&mut m), true, |_, _| {})?;
            println!(
                "| {s:.2} | {} | {:.3} | {:.4} | {:.4} | {:.4} |",
                if blocks { "32-input blocks" } else { "inputs" },
                m.skipped as f64 / m.seen.max(1) as f64,
                r.ppl_second_half / dense.ppl_second_half,
                r.kl_vs_dense.unwrap_or(0.0),
                r.top1_agreement.unwrap_or(1.0)
            );
        }
    }
    Ok(())
}
