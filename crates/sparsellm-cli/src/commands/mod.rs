//! One module per subcommand.

mod bench;
mod calibrate;
mod eval;
pub(crate) mod fetch;
mod generate;
mod serve;
mod synth;
mod tokenize;

pub(crate) use bench::*;
pub(crate) use calibrate::*;
pub(crate) use eval::*;
pub(crate) use fetch::*;
pub(crate) use generate::*;
pub(crate) use serve::*;
pub(crate) use synth::*;
pub(crate) use tokenize::*;
