//! `sparsellm synth`: a HuggingFace directory of seeded random weights at a real model's shape.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sparsellm::loader::{self, fetch};
use sparsellm::progress::{Progress, Unit};
use sparsellm::synth::SynthShape;
use sparsellm::tensor::DType;
use sparsellm::tokenizer::Tokenizer;

use crate::args::*;

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// The shape: llama-3.2-1b (hidden 2048, intermediate 8192, 16 layers) or llama-3.2-3b
    /// (hidden 3072, 28 layers); both 128256-token vocabularies, tied, llama3 RoPE scaling.
    #[arg(long, value_parser = parse_shape)]
    pub(crate) shape: SynthShape,
    /// Storage dtype of the weights: f32, bf16 or f16.
    #[arg(long, default_value = "bf16", value_parser = parse_float_dtype)]
    pub(crate) dtype: DType,
    /// Output directory (must not exist).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Seed of the random weights (same seed, same checkpoint).
    #[arg(long, default_value_t = 0, value_parser = parse_seed)]
    pub(crate) seed: u64,
}

pub(crate) fn parse_shape(s: &str) -> std::result::Result<SynthShape, String> {
    s.parse()
}

pub(crate) fn cmd_synth(a: SynthArgs) -> Result<()> {
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
