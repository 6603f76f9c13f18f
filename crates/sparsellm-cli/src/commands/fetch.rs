//! `sparsellm fetch`: download the default model, verify it, print its path.

use anyhow::Result;
use sparsellm::loader::fetch;

pub(crate) fn cmd_fetch() -> Result<()> {
    let path = fetch::fetch_verified(&fetch::DEFAULT_MODEL, &fetch::FetchOptions::from_env())?;
    outln!("{}", path.display());
    Ok(())
}
