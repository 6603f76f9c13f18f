//! `sparsellm._sparsellm`: the Python face of the engine. Only conversion lives here:
//! Python arguments to the library's option structs, its results and errors to Python
//! objects. Compute runs with the GIL released; calls on one `Model` are serialized (its
//! sparse state is shared); between tokens a generation re-takes the GIL for a moment to
//! check pending signals, so Ctrl-C stops it within one token.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use serde_json::json;

use sparsellm::bench;
use sparsellm::generate::{self, GenerateOptions, SamplingOptions, StopReason};
use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{KvDType, Logits};
use sparsellm::session::{self, LoadedModel, SparseSettings};
use sparsellm::sparse::Sparsity;
use sparsellm::tensor::LoadDType;
use sparsellm::tokenizer::Tokenizer as EngineTokenizer;

pyo3::create_exception!(
    _sparsellm,
    ModelError,
    PyException,
    "A model, tokenizer or predictor file that cannot be used: missing, truncated, malformed, \
     or of an unsupported architecture or type. The message names the file and what is wrong."
);

/// The engine's error as a Python exception: bad arguments are ValueError, everything
/// about files (missing, malformed, unsupported) is ModelError.
fn to_py(e: sparsellm::Error) -> PyErr {
    match e {
        sparsellm::Error::Input(_) => PyValueError::new_err(e.to_string()),
        _ => ModelError::new_err(e.to_string()),
    }
}

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// An argument that must be a whole number >= 0 (Python ints of any size arrive as i128).
fn count(name: &str, v: i128) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| value_error(format!("{name}={v} must be >= 0")))
}

/// A prompt: text, or token ids (a list, tuple or 1-d array of ints).
#[derive(FromPyObject)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// What `generate`, `stream` and `chat` take besides the prompt.
struct GenArgs {
    opts: GenerateOptions,
}

impl GenArgs {
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_tokens: i128,
        temperature: f32,
        top_p: f32,
        top_k: i128,
        seed: i128,
        stop: Option<Vec<String>>,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i128,
        ignore_eos: bool,
    ) -> PyResult<GenArgs> {
        let max_tokens = count("max_tokens", max_tokens)?;
        if max_tokens == 0 {
            return Err(value_error("max_tokens must be at least 1"));
        }
        let seed = u64::try_from(seed)
            .map_err(|_| value_error(format!("seed={seed} must be in [0, 2**64)")))?;
        let stop = stop.unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(value_error("a stop string must not be empty"));
        }
        let sampling = SamplingOptions {
            temperature,
            top_k: count("top_k", top_k)?,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: count("repeat_last_n", repeat_last_n)?,
            seed,
            ..SamplingOptions::default()
        };
        sampling.validate().map_err(to_py)?;
        Ok(GenArgs {
            opts: GenerateOptions {
                max_tokens,
                sampling,
                stop_at_eos: !ignore_eos,
                stop,
            },
        })
    }
}

/// A loaded model and the sparse state its calls share.
struct Engine {
    loaded: LoadedModel,
    settings: SparseSettings,
    dtype: LoadDType,
    /// The decode-time sparse mode (None: dense). Its mutex also serializes the calls on
    /// one model.
    sparse: Mutex<Option<Sparsity>>,
}

impl Engine {
    fn lock(&self) -> MutexGuard<'_, Option<Sparsity>> {
        // A panic in an earlier call (reported to Python as PanicException) leaves the
        // state as valid as any finished call does: each call starts a fresh KV cache.
        self.sparse.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn prompt_ids(&self, prompt: Prompt, chat: bool) -> PyResult<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => {
                let text = if chat {
                    self.loaded
                        .render_chat(&[("user", &text)], true)
                        .map_err(to_py)?
                } else {
                    text
                };
                self.loaded.tokenizer.encode(&text).map_err(to_py)
            }
            Prompt::Ids(ids) => {
                if chat {
                    return Err(value_error(
                        "chat=True needs the prompt as text (token ids are used as they are)",
                    ));
                }
                self.check_ids(&ids)?;
                Ok(ids)
            }
        }
    }

    fn check_ids(&self, ids: &[u32]) -> PyResult<()> {
        let vocab = self.loaded.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(value_error(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        Ok(())
    }

    /// Generates; `on_text` gets each piece of text, `between_tokens` may stop the run.
    fn generate(
        &self,
        ids: &[u32],
        args: &GenArgs,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
        between_tokens: impl FnMut() -> ControlFlow<()>,
    ) -> sparsellm::Result<(generate::Generation, Option<f64>)> {
        let mut sparse = self.lock();
        if let Some(sp) = sparse.as_mut() {
            sp.reset_stats();
        }
        let g = generate::generate_interruptible(
            &self.loaded.model,
            Some(&self.loaded.tokenizer),
            ids,
            &args.opts,
            sparse.as_mut().map(|s| s.as_override()),
            on_text,
            between_tokens,
        )?;
        let density = sparse.as_ref().and_then(|s| s.density());
        Ok((g, density))
    }

    /// Generates with the GIL released, checking for signals (Ctrl-C) between tokens.
    fn generate_interruptible(
        &self,
        py: Python<'_>,
        ids: &[u32],
        args: &GenArgs,
    ) -> PyResult<(generate::Generation, Option<f64>)> {
        let mut signal: Option<PyErr> = None;
        let r = py.detach(|| {
            self.generate(
                ids,
                args,
                |_| ControlFlow::Continue(()),
                || match Python::attach(|py| py.check_signals()) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        signal = Some(e);
                        ControlFlow::Break(())
                    }
                },
            )
        });
        if let Some(e) = signal {
            return Err(e);
        }
        r.map_err(to_py)
    }
}

fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos => "eos",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ContextFull => "context_full",
        StopReason::Stop => "stop",
        StopReason::Cancelled => "cancelled",
    }
}

/// A serde_json value as the Python object `json.loads` makes of it.
fn to_python<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

/// Chat messages: dicts with "role" and "content" (as OpenAI's and transformers' chat
/// APIs take them) or (role, content) pairs.
fn messages(list: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in list.try_iter()? {
        let item = item?;
        let pair = if let Ok(d) = item.cast::<PyDict>() {
            let field = |k: &str| -> PyResult<String> {
                d.get_item(k)?
                    .ok_or_else(|| value_error(format!("a chat message has no '{k}'")))?
                    .extract()
            };
            (field("role")?, field("content")?)
        } else {
            item.extract::<(String, String)>().map_err(|_| {
                value_error(
                    "a chat message is a dict with 'role' and 'content', or a (role, content) pair",
                )
            })?
        };
        out.push(pair);
    }
    if out.is_empty() {
        return Err(value_error("no chat messages"));
    }
    Ok(out)
}

fn render(
    tokenizer: &EngineTokenizer,
    template: Option<&str>,
    list: &Bound<'_, PyAny>,
    add_generation_prompt: bool,
) -> PyResult<String> {
    let msgs = messages(list)?;
    let refs: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    session::render_chat(tokenizer, template, &refs, add_generation_prompt).map_err(to_py)
}

/// A LLaMA-family model on the CPU, optionally with contextual sparsity at decode.
///
/// Model(path=None, dtype="native", threads=None, sparsity=None, scorer=None,
///       predictor=None, sparse_mode="cached", kv_dtype="f32")
///
/// path: a GGUF file or a HuggingFace directory (config.json, safetensors,
///     tokenizer.json); None loads the default model (SmolLM2-135M-Instruct Q4_1),
///     downloading it into $SPARSELLM_MODELS_DIR (./models) on first use, as the CLI does.
/// dtype: how the matrices are held: "native" (as stored; GGUF Q8_0/Q4_0/Q4_1 stay
///     quantized), "f32", "bf16" or "f16".
/// threads: the process's compute threads (None: physical cores). The first model loaded
///     sizes the process-wide pool; asking another model for a different size is an error.
/// sparsity: None or "off" (dense), "sigma:K", "density:D", "calibrated", or an input
///     sparsity SPEC ("teal:S", ...), as the CLI's --sparsity.
/// scorer: "exact", "lowrank", "cascade[:F]" or "signed-gate", as --scorer.
/// predictor: a predictor file written by `sparsellm calibrate`, as --predictor.
/// sparse_mode: "cached", "gather" or "blocks", as --sparse-mode.
/// kv_dtype: the KV cache's element type, "f32" or "f16" (half the memory), as --kv-dtype.
///
/// Raises ValueError for bad arguments and sparsellm.ModelError for files that cannot be
/// used. Calls on one Model from several threads are serialized (each runs whole, in
/// turn); they release the GIL while they compute.
#[pyclass(frozen, module = "sparsellm._sparsellm")]
struct Model {
    engine: Arc<Engine>,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path=None, dtype="native", threads=None, sparsity=None, scorer=None, predictor=None, sparse_mode="cached", kv_dtype="f32"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        dtype: &str,
        threads: Option<i128>,
        sparsity: Option<String>,
        scorer: Option<String>,
        predictor: Option<PathBuf>,
        sparse_mode: &str,
        kv_dtype: &str,
    ) -> PyResult<Model> {
        let dtype: LoadDType = dtype.parse().map_err(value_error)?;
        let kv_dtype: KvDType = kv_dtype.parse().map_err(value_error)?;
        let threads = threads
            .map(|t| match usize::try_from(t) {
                Ok(t) if t >= 1 => Ok(t),
                _ => Err(value_error(format!("threads={t} must be at least 1"))),
            })
            .transpose()?;
        let settings = SparseSettings {
            spec: sparsity.unwrap_or_else(|| "off".into()),
            scorer,
            predictor,
            mode: sparse_mode.parse().map_err(to_py)?,
        };
        settings.check().map_err(to_py)?;
        let engine = py
            .detach(|| -> sparsellm::Result<Engine> {
                let mut loaded =
                    LoadedModel::load(path.as_deref(), dtype, threads, settings.layout())?;
                loaded.model.kv_dtype = kv_dtype;
                let sparse = settings.build(&loaded.model)?;
                Ok(Engine {
                    loaded,
                    settings,
                    dtype,
                    sparse: Mutex::new(sparse),
                })
            })
            .map_err(to_py)?;
        Ok(Model {
            engine: Arc::new(engine),
        })
    }

    /// Generates from `prompt` (text, or a list of token ids) and returns the new text.
    ///
    /// max_tokens: at most this many new tokens (>= 1). temperature: 0 is greedy (the
    /// default); top_p in (0, 1]; top_k (0: all tokens); seed: the sampler's seed (same
    /// seed, same text). stop: strings that end the generation (not included in the
    /// text). chat: wrap the prompt in the model's chat template as a user message.
    /// Keyword-only: min_p in [0, 1], repeat_penalty > 0 (1: off), repeat_last_n,
    /// ignore_eos (keep going past end-of-sequence tokens).
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, chat=false, *, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_tokens: i128,
        temperature: f32,
        top_p: f32,
        top_k: i128,
        seed: i128,
        stop: Option<Vec<String>>,
        chat: bool,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i128,
        ignore_eos: bool,
    ) -> PyResult<String> {
        let args = GenArgs::new(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            min_p,
            repeat_penalty,
            repeat_last_n,
            ignore_eos,
        )?;
        let ids = self.engine.prompt_ids(prompt, chat)?;
        let (g, _) = self.engine.generate_interruptible(py, &ids, &args)?;
        Ok(g.text)
    }

    /// As generate, but returns a dict like `sparsellm generate --json`: prompt_ids,
    /// output_ids, text, stop ("eos", "max_tokens", "stop", "context_full"), eos_id (the
    /// end-of-sequence id that stopped it, not in output_ids; else None), ttft_ms,
    /// decode_tok_s, mlp_density (the fraction of MLP neurons, or of projection inputs
    /// under input sparsity, kept; 1.0 dense).
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, chat=false, *, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate_detailed<'py>(
        &self,
        py: Python<'py>,
        prompt: Prompt,
        max_tokens: i128,
        temperature: f32,
        top_p: f32,
        top_k: i128,
        seed: i128,
        stop: Option<Vec<String>>,
        chat: bool,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i128,
        ignore_eos: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = GenArgs::new(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            min_p,
            repeat_penalty,
            repeat_last_n,
            ignore_eos,
        )?;
        let ids = self.engine.prompt_ids(prompt, chat)?;
        let (g, density) = self.engine.generate_interruptible(py, &ids, &args)?;
        to_python(
            py,
            &json!({
                "prompt_ids": ids,
                "output_ids": g.output_ids,
                "text": g.text,
                "stop": stop_name(g.stop),
                "eos_id": g.eos_id,
                "ttft_ms": g.ttft_ms,
                "decode_tok_s": g.decode_tok_s,
                "mlp_density": density.unwrap_or(1.0),
            }),
        )
    }

    /// As generate, but returns an iterator over the text as it is generated; the pieces
    /// concatenate to generate's text. Generation runs on a background thread; dropping
    /// the iterator (or Ctrl-C while it waits) stops it within one token. Arguments are
    /// checked when stream() is called.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, chat=false, *, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: Prompt,
        max_tokens: i128,
        temperature: f32,
        top_p: f32,
        top_k: i128,
        seed: i128,
        stop: Option<Vec<String>>,
        chat: bool,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i128,
        ignore_eos: bool,
    ) -> PyResult<TextStream> {
        let args = GenArgs::new(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            min_p,
            repeat_penalty,
            repeat_last_n,
            ignore_eos,
        )?;
        let ids = self.engine.prompt_ids(prompt, chat)?;
        Ok(TextStream::start(self.engine.clone(), ids, args))
    }

    /// Answers a conversation: `messages` is a list of {"role": ..., "content": ...}
    /// dicts (or (role, content) pairs), rendered by the model's chat template with the
    /// assistant's turn opened. Returns the reply's text. Sampling arguments as generate.
    #[pyo3(signature = (messages, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, *, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_tokens: i128,
        temperature: f32,
        top_p: f32,
        top_k: i128,
        seed: i128,
        stop: Option<Vec<String>>,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i128,
        ignore_eos: bool,
    ) -> PyResult<String> {
        let args = GenArgs::new(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            min_p,
            repeat_penalty,
            repeat_last_n,
            ignore_eos,
        )?;
        let text = self.apply_chat_template(messages, true)?;
        let ids = self.engine.prompt_ids(Prompt::Text(text), false)?;
        let (g, _) = self.engine.generate_interruptible(py, &ids, &args)?;
        Ok(g.text)
    }

    /// `messages` rendered by the model's chat template (ChatML if the file has none).
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let l = &self.engine.loaded;
        render(
            &l.tokenizer,
            l.chat_template.as_deref(),
            messages,
            add_generation_prompt,
        )
    }

    /// The token ids of `text` (no BOS added; special tokens written in the text map to
    /// their ids).
    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        self.engine.loaded.tokenizer.encode(text).map_err(to_py)
    }

    /// The text of token ids (special tokens included unless skip_special_tokens).
    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn detokenize(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        decode(&self.engine.loaded.tokenizer, &ids, skip_special_tokens)
    }

    /// The logits of every position of `ids` (a list or 1-d array of token ids): a numpy
    /// float32 array [len(ids), vocab_size], row i predicting the token after ids[i]. Dense
    /// models run one batched forward pass; with sparsity each position runs token by
    /// token with its own mask, as decoding (and `eval`) does.
    fn logits<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyAny>> {
        let e = &self.engine;
        let model = &e.loaded.model;
        let ctx = model.config.max_position_embeddings;
        if ids.is_empty() || ids.len() > ctx {
            return Err(value_error(format!(
                "logits needs 1 to {ctx} token ids (the model's context); got {}",
                ids.len()
            )));
        }
        e.check_ids(&ids)?;
        let vocab = model.config.vocab_size;
        let all = py
            .detach(|| -> sparsellm::Result<Vec<f32>> {
                let mut sparse = e.lock();
                let mut cache = model.new_cache();
                match sparse.as_mut() {
                    None => model.forward(&ids, &mut cache, Logits::All, None),
                    Some(sp) => {
                        sp.set_prefill_dense(false);
                        let mut all = Vec::with_capacity(ids.len() * vocab);
                        let mut r = Ok(());
                        for &t in &ids {
                            match model.forward(
                                &[t],
                                &mut cache,
                                Logits::Last,
                                Some(sp.as_override()),
                            ) {
                                Ok(l) => all.extend(l),
                                Err(err) => {
                                    r = Err(err);
                                    break;
                                }
                            }
                        }
                        sp.set_prefill_dense(true);
                        r.map(|()| all)
                    }
                }
            })
            .map_err(to_py)?;
        let bytes = PyByteArray::new(py, bytemuck::cast_slice(&all));
        py.import("numpy")?
            .call_method1("frombuffer", (bytes, "float32"))?
            .call_method1("reshape", ((ids.len(), vocab),))
    }

    /// Perplexity of `text` over non-overlapping windows of `window` tokens, as
    /// `sparsellm eval --json` reports it: a dict with tokens, tokens_unscored, windows,
    /// window, ppl_all, ppl_second_half, dtype; with sparsity also kl_vs_dense,
    /// top1_agreement, sparsity and the density figures.
    #[pyo3(signature = (text, window=512))]
    fn perplexity<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        window: i128,
    ) -> PyResult<Bound<'py, PyAny>> {
        let window = count("window", window)?;
        if text.is_empty() {
            return Err(value_error("the text is empty"));
        }
        let e = &self.engine;
        let mut signal: Option<PyErr> = None;
        let r = py.detach(|| -> sparsellm::Result<_> {
            let ids = e.loaded.tokenizer.encode(text)?;
            let _serial = e.lock();
            session::perplexity(&e.loaded.model, &ids, window, &e.settings, |_, _| {
                if signal.is_none()
                    && let Err(err) = Python::attach(|py| py.check_signals())
                {
                    signal = Some(err);
                }
            })
        });
        if let Some(err) = signal {
            return Err(err);
        }
        let r = r.map_err(to_py)?;
        let rep = &r.report;
        let mut v = json!({
            "tokens": rep.tokens,
            "tokens_unscored": rep.tokens_unscored,
            "windows": rep.windows,
            "window": window,
            "ppl_all": rep.ppl_all,
            "ppl_second_half": rep.ppl_second_half,
            "dtype": e.dtype.name(),
        });
        if let Some(kl) = rep.kl_vs_dense {
            v["kl_vs_dense"] = json!(kl);
            v["top1_agreement"] = json!(rep.top1_agreement);
            v["sparsity"] = json!(e.settings.spec);
            if r.dense_prefix {
                v["input_density"] = json!(r.density);
                v["weight_bytes_ratio"] = json!(r.weight_bytes_ratio);
                v["dense_prefix"] = json!(true);
            } else {
                v["mlp_density"] = json!(r.density);
                v["mask_churn"] = json!(r.churn);
                v["mlp_bytes_ratio"] = json!(r.mlp_bytes.map(|b| b.ratio()));
                v["predictor_bytes_ratio"] = json!(r.mlp_bytes.map(|b| b.predictor / b.dense));
                v["scorer"] = json!(r.scorer);
            }
        }
        to_python(py, &v)
    }

    /// Decode speed, dense and (with this model's sparsity) sparse, interleaved in this
    /// process: the first prompt_tokens tokens of text_file as the prompt, gen_tokens
    /// greedy tokens per run (no stop at EOS), warmup unmeasured runs then runs measured
    /// ones per mode. Returns a dict like `sparsellm bench --json` (model, dtype, threads,
    /// cpu, prompt_tokens, gen_tokens, runs, modes: {dense, sparse}, ratios); peak_rss_mb
    /// is this process's.
    #[pyo3(signature = (prompt_tokens=128, gen_tokens=64, runs=5, warmup=1, text_file=PathBuf::from("/usr/share/common-licenses/GPL-3")))]
    fn bench<'py>(
        &self,
        py: Python<'py>,
        prompt_tokens: i128,
        gen_tokens: i128,
        runs: i128,
        warmup: i128,
        text_file: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (prompt_tokens, gen_tokens) = (
            count("prompt_tokens", prompt_tokens)?,
            count("gen_tokens", gen_tokens)?,
        );
        let (runs, warmup) = (count("runs", runs)?, count("warmup", warmup)?);
        if prompt_tokens == 0 || gen_tokens == 0 || runs == 0 {
            return Err(value_error(
                "prompt_tokens, gen_tokens and runs must be at least 1",
            ));
        }
        let e = &self.engine;
        let ctx = e.loaded.model.config.max_position_embeddings;
        if prompt_tokens.saturating_add(gen_tokens) > ctx {
            return Err(value_error(format!(
                "prompt_tokens + gen_tokens = {} exceeds the model's context ({ctx})",
                prompt_tokens.saturating_add(gen_tokens)
            )));
        }
        let text = std::fs::read_to_string(&text_file)
            .map_err(|err| value_error(format!("text_file {}: {err}", text_file.display())))?;
        let (dense, sparse) = py
            .detach(|| -> sparsellm::Result<_> {
                let mut ids = e.loaded.tokenizer.encode(&text)?;
                if ids.len() < prompt_tokens {
                    return Err(sparsellm::Error::Input(format!(
                        "{} has {} tokens, fewer than prompt_tokens {prompt_tokens}",
                        text_file.display(),
                        ids.len()
                    )));
                }
                ids.truncate(prompt_tokens);
                let mut sp = e.lock();
                bench::interleaved(&e.loaded.model, &ids, gen_tokens, runs, warmup, sp.as_mut())
            })
            .map_err(to_py)?;
        let ratio = |f: fn(&bench::ModeReport) -> f64| sparse.as_ref().map(|s| f(s) / f(&dense));
        let mut modes = json!({ "dense": dense });
        if let Some(s) = &sparse {
            modes["sparse"] = json!(s);
        }
        let v = json!({
            "model": e.loaded.identity,
            "dtype": e.dtype.name(),
            "kv_dtype": e.loaded.model.kv_dtype.name(),
            "threads": pool::global().threads(),
            "cpu": bench::cpu_name(),
            "isa": format!("{:?}", sparsellm::kernels::dot::isa()),
            "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens,
            "runs": runs,
            "warmup": warmup,
            "sparsity": e.settings.spec,
            "modes": modes,
            "ratios": {
                "ttft": ratio(|r| r.ttft_ms.median),
                "decode": ratio(|r| r.decode_tok_s.median),
                "total": ratio(|r| r.total_tok_s.median),
            },
        });
        to_python(py, &v)
    }

    /// The file or directory the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.engine.loaded.path.clone()
    }
    /// What the file says the model is.
    #[getter]
    fn identity(&self) -> String {
        self.engine.loaded.identity.clone()
    }
    /// How the matrices are held: "native", "f32", "bf16" or "f16".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.engine.dtype.name()
    }
    /// The sparsity SPEC ("off" when dense).
    #[getter]
    fn sparsity(&self) -> String {
        self.engine.settings.spec.clone()
    }
    /// The process's compute threads.
    #[getter]
    fn threads(&self) -> usize {
        pool::global().threads()
    }
    /// Rows of the logits (the model's vocabulary, which may exceed the tokenizer's).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.loaded.model.config.vocab_size
    }
    /// The model's context in tokens.
    #[getter]
    fn context_length(&self) -> usize {
        self.engine.loaded.model.config.max_position_embeddings
    }
    /// The ids that end a generation.
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.engine.loaded.model.config.eos_token_ids.clone()
    }
    /// The checkpoint's chat template (None: ChatML is used).
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.engine.loaded.chat_template.clone()
    }
    /// The model's tokenizer.
    #[getter]
    fn tokenizer(&self) -> Tokenizer {
        Tokenizer {
            data: TokenizerData::Model(self.engine.clone()),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "sparsellm.Model({:?}, dtype={:?}, sparsity={:?})",
            self.engine.loaded.path.display().to_string(),
            self.engine.dtype.name(),
            self.engine.settings.spec
        )
    }
}

fn decode(t: &EngineTokenizer, ids: &[u32], skip_special_tokens: bool) -> PyResult<String> {
    // An id outside the vocabulary is a bad argument here, not a bad file.
    t.decode_with(ids, skip_special_tokens)
        .map_err(|e| value_error(e.to_string()))
}

/// A Tokenizer's data: loaded from a file alone, or a model's (shared, not copied).
enum TokenizerData {
    Alone {
        tokenizer: Box<EngineTokenizer>,
        chat_template: Option<String>,
    },
    Model(Arc<Engine>),
}

/// A model file's tokenizer alone (no weights loaded).
///
/// Tokenizer(path=None): path as Model's (None: the default model, fetched on first use).
#[pyclass(frozen, module = "sparsellm._sparsellm")]
struct Tokenizer {
    data: TokenizerData,
}

impl Tokenizer {
    fn tok(&self) -> &EngineTokenizer {
        match &self.data {
            TokenizerData::Alone { tokenizer, .. } => tokenizer,
            TokenizerData::Model(e) => &e.loaded.tokenizer,
        }
    }
    fn template(&self) -> Option<&str> {
        match &self.data {
            TokenizerData::Alone { chat_template, .. } => chat_template.as_deref(),
            TokenizerData::Model(e) => e.loaded.chat_template.as_deref(),
        }
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    #[pyo3(signature = (path=None))]
    fn new(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Tokenizer> {
        let data = py
            .detach(|| -> sparsellm::Result<TokenizerData> {
                let path = match path {
                    Some(p) => p,
                    None => sparsellm::loader::fetch::default_model_path()?,
                };
                let source = loader::open(&path)?;
                Ok(TokenizerData::Alone {
                    tokenizer: Box::new(EngineTokenizer::load(&source.tokenizer_source()?)?),
                    chat_template: source.chat_template(),
                })
            })
            .map_err(to_py)?;
        Ok(Tokenizer { data })
    }

    /// The token ids of `text` (no BOS added; special tokens in the text map to their ids).
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.tok().encode(text).map_err(to_py)
    }

    /// The text of `ids` (special tokens included unless skip_special_tokens).
    #[pyo3(signature = (ids, skip_special_tokens=false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        decode(self.tok(), &ids, skip_special_tokens)
    }

    /// `messages` rendered by the model's chat template (ChatML if the file has none).
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        render(self.tok(), self.template(), messages, add_generation_prompt)
    }

    /// The id of a token string as the vocabulary stores it, or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok().token_to_id(token)
    }
    /// The vocabulary's string for an id, or None.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.tok().id_to_token(id)
    }
    /// Number of token ids, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.tok().vocab_size()
    }
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.tok().bos_token_id()
    }
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.tok().eos_token_id()
    }
    /// The file's chat template (None: ChatML is used).
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.template().map(str::to_owned)
    }
}

/// What the generating thread sends a [`TextStream`].
enum Event {
    Text(String),
    Done(sparsellm::Result<()>),
}

/// An iterator over generated text, from Model.stream().
#[pyclass(frozen, module = "sparsellm._sparsellm")]
struct TextStream {
    events: Mutex<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
    finished: AtomicBool,
}

impl TextStream {
    fn start(engine: Arc<Engine>, ids: Vec<u32>, args: GenArgs) -> TextStream {
        let (tx, rx): (Sender<Event>, Receiver<Event>) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        // Unbounded: the generation never waits for the reader, so the model is not held
        // by a stream nobody reads (its length is bounded by max_tokens anyway).
        std::thread::spawn(move || {
            let r = engine.generate(
                &ids,
                &args,
                |piece| match tx.send(Event::Text(piece.to_owned())) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                },
                || {
                    if stop.load(Ordering::Relaxed) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            );
            let _ = tx.send(Event::Done(r.map(|_| ())));
        });
        TextStream {
            events: Mutex::new(rx),
            cancel,
            finished: AtomicBool::new(false),
        }
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        if self.finished.load(Ordering::Relaxed) {
            return Ok(None);
        }
        loop {
            let event = py.detach(|| {
                let rx = self.events.lock().unwrap_or_else(|e| e.into_inner());
                rx.recv_timeout(Duration::from_millis(50))
            });
            match event {
                Ok(Event::Text(t)) => return Ok(Some(t)),
                Ok(Event::Done(r)) => {
                    self.finished.store(true, Ordering::Relaxed);
                    return r.map(|()| None).map_err(to_py);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.close();
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.finished.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
            }
        }
    }

    /// Stops the generation (within one token); the iterator then ends.
    fn close(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.finished.store(true, Ordering::Relaxed);
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The default model's path (SmolLM2-135M-Instruct Q4_1 in $SPARSELLM_MODELS_DIR, default
/// ./models), downloaded and checked first if it is not there, as `sparsellm fetch` does.
#[pyfunction]
fn default_model_path(py: Python<'_>) -> PyResult<PathBuf> {
    py.detach(sparsellm::loader::fetch::default_model_path)
        .map_err(to_py)
}

/// sparsellm's engine: Model, Tokenizer, TextStream and ModelError. Import `sparsellm`,
/// not this module.
#[pymodule]
fn _sparsellm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(default_model_path, m)?)?;
    m.add_class::<Tokenizer>()?;
    m.add_class::<TextStream>()?;
    m.add("ModelError", m.py().get_type::<ModelError>())?;
    Ok(())
}
