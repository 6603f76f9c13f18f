//! sparsellm: a LLaMA-family inference engine for CPUs that computes, for each decoded
//! token, only the MLP neurons that matter for it.

pub mod bench;
pub mod error;
pub mod eval;
pub mod generate;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod profile;
pub mod progress;
pub mod quant;
pub mod session;
pub mod sparse;
pub mod sweep;
pub mod synth;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};
