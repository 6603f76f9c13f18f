//! Loading a model and its sparsity strategy from the shared flags; reading input files.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{Llama, MlpOverride, WeightLayout};
use sparsellm::progress::{Progress, Unit, count};
use sparsellm::sparse::{InputSparsity, InputSpec, Predictor, SparseMlp, Sparsity};
use sparsellm::tokenizer::Tokenizer;

use crate::args::*;

/// A loaded model with its tokenizer. The checkpoint itself is not kept: weights that
/// were converted no longer need the file's pages (they would count in peak RSS), and
/// weights used in place keep their own reference to the file's map.
pub(crate) struct Loaded {
    pub(crate) identity: String,
    pub(crate) chat_template: Option<String>,
    pub(crate) model: Llama,
    pub(crate) tokenizer: Tokenizer,
}

pub(crate) fn load(run: &RunArgs) -> Result<Loaded> {
    // Input sparsity reads weights by input: every projection is held input-major.
    let layout = if InputSpec::is_input_spec(&run.sparsity) {
        WeightLayout::InputMajor
    } else {
        WeightLayout::RowMajor
    };
    load_as(run, layout)
}

pub(crate) fn load_as(run: &RunArgs, layout: WeightLayout) -> Result<Loaded> {
    let path = model_path(&run.model)?;
    let pool = pool::init_global(run.threads.unwrap_or_else(pool::default_threads));
    let start = Instant::now();
    let source = loader::open(&path)?;
    let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
    let model = Llama::load_with_layout(source.as_ref(), run.dtype, pool, layout)?;
    eprintln!(
        "sparsellm: {} ({}, {}, {}) loaded in {:.2} s",
        path.display(),
        count(model.config.num_layers, "layer"),
        run.dtype.name(),
        count(pool.threads(), "thread"),
        start.elapsed().as_secs_f64()
    );
    Ok(Loaded {
        identity: source.identity(),
        chat_template: source.chat_template(),
        model,
        tokenizer,
    })
}

/// The sparse mode the flags ask for, or None when `--sparsity off`.
pub(crate) fn sparse_mlp(run: &RunArgs, model: &Llama) -> Result<Option<Sparsity>> {
    check_sparse_flags(run, false)?;
    if run.sparsity == "off" {
        return Ok(None);
    }
    if InputSpec::is_input_spec(&run.sparsity) {
        return input_sparsity(run, model).map(|s| Some(Sparsity::Input(s)));
    }
    let sp = SparseMlp::from_spec(
        model,
        &run.sparsity,
        run.scorer.as_deref(),
        run.predictor.as_deref(),
        run.sparse_mode.parse()?,
    )?;
    Ok(Some(Sparsity::Mlp(sp)))
}

/// The input-sparsity hook of a `teal:`/`wina:` SPEC (thresholds from --predictor).
pub(crate) fn input_sparsity(run: &RunArgs, model: &Llama) -> Result<InputSparsity> {
    if run.scorer.is_some() {
        bail!(
            "--scorer applies to MLP-neuron sparsity, not to {}",
            run.sparsity
        );
    }
    let spec: InputSpec = run.sparsity.parse()?;
    let predictor = run
        .predictor
        .as_deref()
        .map(|p| Predictor::load(p, model))
        .transpose()?;
    let tables = match &predictor {
        Some(p) => Some(p.input.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the predictor file has no input-sparsity tables (calibrate it again)",
                run.predictor.as_ref().expect("loaded").display()
            )
        })?),
        None => None,
    };
    Ok(InputSparsity::new(model, spec, tables)?)
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
