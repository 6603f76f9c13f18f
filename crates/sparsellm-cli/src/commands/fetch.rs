//! `sparsellm fetch [NAME]`: download the default model (or a named one, with its terms),
//! verify it, print its path.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sparsellm::loader::fetch;

pub(crate) fn cmd_fetch(model: Option<String>) -> Result<()> {
    let path = match model {
        None => fetch::fetch_verified(&fetch::DEFAULT_MODEL, &fetch::FetchOptions::from_env())?,
        Some(name) => {
            let spec = fetch::named_model(&name).with_context(|| {
                format!("no model called '{name}' to fetch (known: gemma3-270m)")
            })?;
            fetch_named(spec, true)?
        }
    };
    outln!("{}", path.display());
    Ok(())
}

/// Fetches a named model (re-hashing an existing file with `verify`), and says under
/// which terms it comes.
pub(crate) fn fetch_named(spec: &fetch::ChunkedModelSpec, verify: bool) -> Result<PathBuf> {
    let opts = fetch::FetchOptions::from_env();
    let path = fetch::fetch_chunked(spec, &opts, verify)?;
    eprintln!(
        "sparsellm: {}; a copy of the terms: {}",
        spec.terms_notice,
        opts.models_dir.join(spec.terms.file_name).display()
    );
    Ok(path)
}
