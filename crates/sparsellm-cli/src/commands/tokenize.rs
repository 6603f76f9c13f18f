//! `sparsellm tokenize`: the token ids of a text.

use anyhow::Result;
use serde_json::json;
use sparsellm::loader::{self};
use sparsellm::tokenizer::Tokenizer;

use crate::args::*;

pub(crate) fn cmd_tokenize(text: String, model: ModelArgs, as_json: bool) -> Result<()> {
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
