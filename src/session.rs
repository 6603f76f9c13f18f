//! A model loaded for a front end (the Python bindings; the CLI and a server can share
//! it): the weights, the tokenizer and chat template, and the sparse setting asked for,
//! checked and built from the same strings the CLI takes (`--sparsity`, `--scorer`,
//! `--predictor`, `--sparse-mode`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::eval::{self, EvalReport, MlpBytes};
use crate::kernels::pool;
use crate::loader::{self, fetch};
use crate::model::{Llama, MlpOverride, WeightLayout};
use crate::sparse::{
    InputSparsity, InputSpec, Mode, Predictor, Scorer, SparseMlp, Sparsity, SparsityConfig,
};
use crate::sweep;
use crate::tensor::LoadDType;
use crate::tokenizer::{CHATML_TEMPLATE, ChatTemplate, Tokenizer};

/// A loaded model with its tokenizer. The checkpoint itself is not kept: converted weights
/// no longer need the file's pages, and weights used in place hold their own reference to
/// the file's map.
pub struct LoadedModel {
    /// The file or directory it was loaded from (the default model's path when none was
    /// given).
    pub path: PathBuf,
    /// What the file says the model is (name, architecture).
    pub identity: String,
    /// The checkpoint's chat template, if it has one.
    pub chat_template: Option<String>,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

/// The process's thread pool, sized `threads` (None: physical cores) if this call creates
/// it; an error if it already exists with another size (the pool is process-wide).
pub fn thread_pool(threads: Option<usize>) -> Result<&'static pool::ThreadPool> {
    if threads == Some(0) {
        return Err(Error::Input("threads must be at least 1".into()));
    }
    let pool = pool::init_global(threads.unwrap_or_else(pool::default_threads));
    match threads {
        Some(t) if t != pool.threads() => Err(Error::Input(format!(
            "threads={t}: this process's thread pool already has {} threads (the first model loaded sizes it)",
            pool.threads()
        ))),
        _ => Ok(pool),
    }
}

impl LoadedModel {
    /// Loads `path` (None: the default model, fetched on first use as `sparsellm fetch`
    /// does) with its matrices held as `dtype` in `layout`, on the process's thread pool
    /// ([`thread_pool`]).
    pub fn load(
        path: Option<&Path>,
        dtype: LoadDType,
        threads: Option<usize>,
        layout: WeightLayout,
    ) -> Result<LoadedModel> {
        let pool = thread_pool(threads)?;
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => fetch::default_model_path()?,
        };
        let source = loader::open(&path)?;
        let tokenizer = Tokenizer::load(&source.tokenizer_source()?)?;
        let model = Llama::load_with_layout(source.as_ref(), dtype, pool, layout)?;
        Ok(LoadedModel {
            path,
            identity: source.identity(),
            chat_template: source.chat_template(),
            model,
            tokenizer,
        })
    }

    /// `messages` (role, content) rendered by the checkpoint's chat template (ChatML when
    /// it has none), with the assistant's turn opened when `add_generation_prompt`.
    pub fn render_chat(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        render_chat(
            &self.tokenizer,
            self.chat_template.as_deref(),
            messages,
            add_generation_prompt,
        )
    }
}

/// `messages` rendered by `template` (ChatML when None), as [`LoadedModel::render_chat`].
pub fn render_chat(
    tokenizer: &Tokenizer,
    template: Option<&str>,
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
) -> Result<String> {
    let token = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let t = ChatTemplate::new(
        template.unwrap_or(CHATML_TEMPLATE),
        &token(tokenizer.bos_token_id()),
        &token(tokenizer.eos_token_id()),
    )?;
    t.render(messages, add_generation_prompt)
}

/// A sparse setting as the CLI's flags spell it.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseSettings {
    /// `off`, `sigma:K`, `density:D`, `calibrated`, or an input-sparsity SPEC (`teal:...`).
    pub spec: String,
    /// `exact`, `lowrank`, `cascade[:F]` or `signed-gate` (None: from the predictor).
    pub scorer: Option<String>,
    /// A predictor file written by `sparsellm calibrate`.
    pub predictor: Option<PathBuf>,
    /// Where active neurons' rows are read from.
    pub mode: Mode,
}

impl Default for SparseSettings {
    fn default() -> Self {
        SparseSettings {
            spec: "off".into(),
            scorer: None,
            predictor: None,
            mode: Mode::Cached,
        }
    }
}

impl SparseSettings {
    pub fn is_off(&self) -> bool {
        self.spec.trim() == "off"
    }

    pub fn is_input(&self) -> bool {
        InputSpec::is_input_spec(&self.spec)
    }

    /// The weight layout the setting decodes with: input sparsity reads every projection
    /// by input; the MLP-neuron modes read down by neuron (float down projections held so,
    /// instead of a copy; block mode reads the quantized blocks in place).
    pub fn layout(&self) -> WeightLayout {
        if self.is_input() {
            WeightLayout::InputMajor
        } else if self.is_off() || self.mode == Mode::Blocks {
            WeightLayout::RowMajor
        } else {
            WeightLayout::DownInputMajor
        }
    }

    /// Everything that can be checked without the model, so that a mistake costs no
    /// loading time: the spellings, the combinations, the predictor file's existence.
    pub fn check(&self) -> Result<()> {
        let scorer: Option<Scorer> = self.scorer.as_deref().map(str::parse).transpose()?;
        if self.is_off() {
            if self.predictor.is_some() || self.scorer.is_some() {
                return Err(Error::Input(
                    "a predictor and a scorer need a sparsity setting other than off".into(),
                ));
            }
            return Ok(());
        }
        if let Some(p) = &self.predictor {
            std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        }
        if self.is_input() {
            self.spec.parse::<InputSpec>()?;
            if scorer.is_some() {
                return Err(Error::Input(format!(
                    "a scorer applies to MLP-neuron sparsity, not to {}",
                    self.spec
                )));
            }
            if self.spec.trim() == "teal:calibrated" && self.predictor.is_none() {
                return Err(Error::Input(
                    "sparsity teal:calibrated needs a predictor file (input thresholds from `sparsellm calibrate`)".into(),
                ));
            }
            return Ok(());
        }
        let config: SparsityConfig = self.spec.parse()?;
        if self.predictor.is_some() {
            return Ok(());
        }
        if config.threshold == crate::sparse::Threshold::Calibrated {
            return Err(Error::Input(
                "sparsity calibrated needs a predictor file (per-layer thresholds from `sparsellm calibrate`)".into(),
            ));
        }
        if let Some(s @ (Scorer::LowRank | Scorer::Cascade { .. })) = scorer {
            return Err(Error::Input(format!(
                "scorer {s} needs a predictor file (low-rank predictors from `sparsellm calibrate`)"
            )));
        }
        Ok(())
    }

    /// The sparse mode for decoding (`generate`), None when off.
    pub fn build(&self, model: &Llama) -> Result<Option<Sparsity>> {
        self.check()?;
        if self.is_off() {
            return Ok(None);
        }
        if self.is_input() {
            return self.input_sparsity(model).map(|s| Some(Sparsity::Input(s)));
        }
        let sp = SparseMlp::from_spec(
            model,
            &self.spec,
            self.scorer.as_deref(),
            self.predictor.as_deref(),
            self.mode,
        )?;
        Ok(Some(Sparsity::Mlp(sp)))
    }

    /// The input-sparsity hook of an input SPEC (`teal:`, `wina:`), with the predictor
    /// file's thresholds when one is given.
    pub fn input_sparsity(&self, model: &Llama) -> Result<InputSparsity> {
        let spec: InputSpec = self.spec.parse()?;
        let predictor = self
            .predictor
            .as_deref()
            .map(|p| Predictor::load(p, model))
            .transpose()?;
        let tables = match (&predictor, &self.predictor) {
            (Some(p), Some(path)) => Some(p.input.as_ref().ok_or_else(|| {
                Error::Predictor(format!(
                    "{}: the predictor file has no input-sparsity tables (calibrate it again)",
                    path.display()
                ))
            })?),
            _ => None,
        };
        InputSparsity::new(model, spec, tables)
    }
}

/// Perplexity of a text under a setting, as `sparsellm eval --json` reports it.
#[derive(Debug, Clone)]
pub struct PerplexityReport {
    pub report: EvalReport,
    /// Input sparsity: each window's first half ran dense (a prompt), the second half
    /// token by token sparse; MLP sparsity scores every position sparse.
    pub dense_prefix: bool,
    /// The fraction of MLP neurons (or, input sparsity, of projection inputs) kept.
    pub density: Option<f64>,
    /// MLP sparsity: neurons entering the mask per token, as a fraction.
    pub churn: Option<f64>,
    /// MLP sparsity: the scorer used.
    pub scorer: Option<String>,
    /// MLP sparsity: weight bytes per token against dense.
    pub mlp_bytes: Option<MlpBytes>,
    /// Input sparsity: weight bytes per token against dense.
    pub weight_bytes_ratio: Option<f64>,
}

/// Scores `ids` over windows of `window` tokens under `settings` exactly as `sparsellm
/// eval` does: MLP sparsity with every position's own mask and the predictor's factors
/// in the dtype decoding reads them in; input sparsity after a dense half window.
pub fn perplexity(
    model: &Llama,
    ids: &[u32],
    window: usize,
    settings: &SparseSettings,
    progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport> {
    settings.check()?;
    let empty = |report| PerplexityReport {
        report,
        dense_prefix: false,
        density: None,
        churn: None,
        scorer: None,
        mlp_bytes: None,
        weight_bytes_ratio: None,
    };
    if settings.is_off() {
        return Ok(empty(eval::perplexity(model, ids, window, None, progress)?));
    }
    if settings.is_input() {
        let mut sp = settings.input_sparsity(model)?;
        let report = eval::perplexity_with(model, ids, window, Some(&mut sp), true, progress)?;
        return Ok(PerplexityReport {
            dense_prefix: true,
            density: sp.density(),
            weight_bytes_ratio: sp.weight_bytes_ratio(),
            ..empty(report)
        });
    }
    let predictor = settings
        .predictor
        .as_deref()
        .map(|p| sweep::load_predictor(p, model))
        .transpose()?;
    let config: SparsityConfig = settings.spec.parse()?;
    let scorer = settings.scorer.as_deref().map(str::parse).transpose()?;
    let mut sp = sweep::build_sparse(model, config, scorer, predictor.as_ref(), settings.mode)?
        .ok_or_else(|| Error::Input(format!("sparsity {} is off", settings.spec)))?;
    // Every position uses its own mask, as decoding would.
    sp.set_prefill_dense(false);
    let report = eval::perplexity(
        model,
        ids,
        window,
        Some(&mut sp as &mut dyn MlpOverride),
        progress,
    )?;
    Ok(PerplexityReport {
        density: sp.density(),
        churn: sp.churn(),
        scorer: Some(sp.scorer().to_string()),
        mlp_bytes: eval::mlp_bytes(model, &sp, predictor.as_ref()),
        ..empty(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(spec: &str, scorer: Option<&str>) -> SparseSettings {
        SparseSettings {
            spec: spec.into(),
            scorer: scorer.map(Into::into),
            ..SparseSettings::default()
        }
    }

    #[test]
    fn settings_are_checked_before_loading() {
        assert!(settings("off", None).check().is_ok());
        assert!(settings("density:0.5", Some("exact")).check().is_ok());
        assert!(settings("sigma:1", None).check().is_ok());
        for (spec, scorer, needle) in [
            ("dense:0.5", None, "bad sparsity spec"),
            ("off", Some("exact"), "need a sparsity setting"),
            ("density:0.5", Some("magic"), "scorer"),
            ("density:0.5", Some("lowrank"), "needs a predictor"),
            ("calibrated", None, "needs a predictor"),
        ] {
            let e = settings(spec, scorer).check().unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{spec} {scorer:?}: {e:?}");
            assert!(e.to_string().contains(needle), "{spec} {scorer:?}: {e}");
        }
        let missing = SparseSettings {
            predictor: Some("/nonexistent/p.safetensors".into()),
            ..settings("density:0.5", None)
        };
        assert!(matches!(missing.check(), Err(Error::Io { .. })));
    }

    #[test]
    fn a_thread_pool_of_zero_is_refused() {
        assert!(matches!(thread_pool(Some(0)), Err(Error::Input(_))));
    }
}
