//! Loading a model and its sparsity strategy from the shared flags; reading input files.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use sparsellm::model::{Llama, MlpOverride, WeightLayout};
use sparsellm::progress::{Progress, Unit, count};
use sparsellm::session::{LoadedModel, SparseSettings};
use sparsellm::sparse::{InputSparsity, Sparsity};

use crate::args::*;

/// A loaded model with its tokenizer and chat template (the library's front-end type).
pub(crate) type Loaded = LoadedModel;

pub(crate) fn load(run: &RunArgs) -> Result<Loaded> {
    load_as(run, sparse_settings(run)?.layout())
}

pub(crate) fn load_as(run: &RunArgs, layout: WeightLayout) -> Result<Loaded> {
    let path = model_path(&run.model)?;
    let start = Instant::now();
    let mut l = LoadedModel::load(Some(&path), run.dtype, run.threads, layout)?;
    l.model.kv_dtype = run.kv_dtype;
    eprintln!(
        "sparsellm: {} ({}, {}, {}, KV cache {}) loaded in {:.2} s",
        path.display(),
        count(l.model.config.num_layers, "layer"),
        run.dtype.name(),
        count(l.model.pool.threads(), "thread"),
        run.kv_dtype.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(l)
}

/// The sparse setting the flags spell.
pub(crate) fn sparse_settings(run: &RunArgs) -> Result<SparseSettings> {
    Ok(SparseSettings {
        spec: run.sparsity.clone(),
        scorer: run.scorer.clone(),
        predictor: run.predictor.clone(),
        mode: run.sparse_mode.parse()?,
    })
}

/// The sparse mode the flags ask for, or None when `--sparsity off` (the flags checked
/// first, with errors that name them).
pub(crate) fn sparse_mlp(run: &RunArgs, model: &Llama) -> Result<Option<Sparsity>> {
    check_sparse_flags(run, false)?;
    Ok(sparse_settings(run)?.build(model)?)
}

/// The input-sparsity hook of a `teal:`/`wina:` SPEC (thresholds from --predictor).
pub(crate) fn input_sparsity(run: &RunArgs, model: &Llama) -> Result<InputSparsity> {
    check_sparse_flags(run, false)?;
    Ok(sparse_settings(run)?.input_sparsity(model)?)
}

pub(crate) fn as_override(sp: &mut Option<Sparsity>) -> Option<&mut (dyn MlpOverride + '_)> {
    sp.as_mut().map(|s| s.as_override())
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    utf8(bytes, &path.display().to_string())
}

/// `bytes` as text, or an error naming `what` and the first invalid byte.
pub(crate) fn utf8(bytes: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Progress of long work on stderr: a bar on a terminal, a plain line every few seconds
/// otherwise; `unit` names what is counted (plural).
pub(crate) fn progress_bar(len: u64, what: &str, unit: &'static str) -> Progress {
    Progress::new(what, Some(len), Unit::Items(unit))
}
