//! HuggingFace checkpoint directories: `config.json` -> [`ModelConfig`], the weights in
//! `model.safetensors` or shards listed by `model.safetensors.index.json`, the tokenizer
//! (`tokenizer.json`) and chat template (`tokenizer_config.json` or `chat_template.jinja`).
//!
//! Checkpoints of the families in [`MODEL_TYPES`] (`model_type` llama, mistral, qwen2,
//! qwen3, gemma3_text) with F32, F16 or BF16 weights are accepted. Tensor names are HuggingFace's own. Checking
//! tensor shapes against the config is the model builder's job; this module checks that
//! every tensor's bytes lie inside its file and match its shape and dtype.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::loader::safetensors::{SafetensorsFile, UniqueMap};
use crate::loader::{RawTensor, TokenizerSource, WeightSource};
use crate::model::config::{
    Activation, Family, Llama3RopeScaling, ModelConfig, RopeScaling, RopeStyle,
};

const CONFIG: &str = "config.json";
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const LM_HEAD: &str = "lm_head.weight";

/// A HuggingFace LLaMA checkpoint directory, opened and checked.
#[derive(Debug)]
pub struct HfModel {
    dir: PathBuf,
    config: ModelConfig,
    /// Each safetensors file, opened once.
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    /// The file a missing tensor is reported against: model.safetensors or the index.
    weights_path: PathBuf,
    chat_template: Option<String>,
    identity: String,
}

impl HfModel {
    /// Opens the checkpoint in `dir`: parses config.json, maps and checks every
    /// safetensors file, reads the chat template.
    pub fn open(dir: &Path) -> Result<HfModel> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::format(dir, "not a directory"));
        }
        let config_path = dir.join(CONFIG);
        if !config_path.is_file() {
            return Err(Error::format(dir, "not a model directory (no config.json)"));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        // Keep the Config variant (the file is readable but describes no model we run)
        // and name the file in the message.
        let config = parse_config(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", config_path.display())),
            other => other,
        })?;

        let (files, index, weights_path) = open_weights(dir)?;
        let has_lm_head = index.contains_key(LM_HEAD);
        if !config.tie_word_embeddings && !has_lm_head {
            return Err(Error::tensor(
                &weights_path,
                LM_HEAD,
                "missing, and config.json has tie_word_embeddings = false (the output \
                 projection is not the embedding)",
            ));
        }

        let chat_template = read_chat_template(dir)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                std::fs::canonicalize(dir)
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            })
            .unwrap_or_else(|| "model".into());
        let identity = format!(
            "hf:{name}:{}:{}x{}",
            config.family.name(),
            config.num_layers,
            config.hidden_size
        );
        Ok(HfModel {
            dir: dir.to_path_buf(),
            config,
            files,
            index,
            weights_path,
            chat_template,
            identity,
        })
    }

    /// Every tensor name in the checkpoint (unordered).
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The safetensors files, one per shard.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }
}

impl WeightSource for HfModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<RawTensor> {
        match self.index.get(name) {
            Some(&i) => self.files[i].tensor(name),
            None => Err(Error::tensor(
                &self.weights_path,
                name,
                "not found in the checkpoint",
            )),
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tokenizer_source(&self) -> Result<TokenizerSource> {
        let p = self.dir.join(TOKENIZER);
        if p.is_file() {
            Ok(TokenizerSource::Json(p))
        } else {
            Err(Error::Tokenizer(format!(
                "{}: not found (a HuggingFace directory needs tokenizer.json)",
                p.display()
            )))
        }
    }

    fn chat_template(&self) -> Option<String> {
        self.chat_template.clone()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

type Weights = (Vec<SafetensorsFile>, HashMap<String, usize>, PathBuf);

/// Opens `model.safetensors`, or else the shards named by `model.safetensors.index.json`
/// (the order transformers uses).
fn open_weights(dir: &Path) -> Result<Weights> {
    let single = dir.join(SINGLE);
    if single.is_file() {
        let f = SafetensorsFile::open(&single)?;
        let index = f.names().map(|n| (n.to_string(), 0)).collect();
        return Ok((vec![f], index, single));
    }
    let index_path = dir.join(INDEX);
    if !index_path.is_file() {
        return Err(Error::format(
            dir,
            format!("no weights: neither {SINGLE} nor {INDEX} is present"),
        ));
    }
    #[derive(Deserialize)]
    struct Index {
        weight_map: UniqueMap<String>,
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| Error::format(&index_path, format!("invalid index: {e}")))?;

    let mut files: Vec<SafetensorsFile> = Vec::new();
    let mut by_shard: HashMap<String, usize> = HashMap::new();
    let mut index = HashMap::new();
    for (name, shard) in idx.weight_map.0 {
        let fi = match by_shard.get(&shard) {
            Some(&i) => i,
            None => {
                let rel = Path::new(&shard);
                let safe = !shard.is_empty()
                    && rel
                        .components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
                if !safe {
                    return Err(Error::format(
                        &index_path,
                        format!(
                            "shard path '{shard}' (for tensor '{name}') must be a relative path inside the model directory"
                        ),
                    ));
                }
                files.push(SafetensorsFile::open(&dir.join(rel))?);
                by_shard.insert(shard.clone(), files.len() - 1);
                files.len() - 1
            }
        };
        if !files[fi].has_tensor(&name) {
            return Err(Error::tensor(
                files[fi].path(),
                &name,
                format!("listed in {INDEX} for this shard, but the shard does not hold it"),
            ));
        }
        index.insert(name, fi);
    }
    if files.is_empty() {
        return Err(Error::format(&index_path, "weight_map lists no tensors"));
    }
    Ok((files, index, index_path))
}

/// Field readers over config.json's object; every error names the field.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    /// The field, with JSON `null` treated as absent.
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::Config(format!("{k}: expected a non-negative integer, got {v}"))
                    })
            })
            .transpose()
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?
            .ok_or_else(|| Error::Config(format!("missing field {k}")))
    }
    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| Error::Config(format!("{k}: expected a number, got {v}")))
            })
            .transpose()
    }
    fn bool_opt(&self, k: &str) -> Result<Option<bool>> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Error::Config(format!("{k}: expected true or false, got {v}")))
            })
            .transpose()
    }
    fn str_opt(&self, k: &str) -> Result<Option<&str>> {
        self.get(k)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::Config(format!("{k}: expected a string, got {v}")))
            })
            .transpose()
    }
}

/// Parses a config.json text (transformers' LlamaConfig) into a validated [`ModelConfig`];
/// errors are `Error::Config` naming the field. Absent fields take LlamaConfig's defaults
/// (`num_key_value_heads` = heads, `head_dim` = hidden / heads, `rms_norm_eps` 1e-6,
/// `rope_theta` 10000, `max_position_embeddings` 2048, `tie_word_embeddings` false), except
/// the core dimensions, which must be present; absent token ids stay absent.
///
/// The other families add their switches: mistral a `sliding_window`; qwen2 q/k/v biases
/// (and a window on layers from `max_window_layers` when `use_sliding_window`); qwen3 q/k
/// norms (biases when `attention_bias`); gemma3_text GeGLU (`hidden_activation`),
/// q/k norms, sandwich norms, `1 + w` norm weights, embeddings scaled by
/// sqrt(hidden_size), `query_pre_attn_scalar`, sliding windows on the layers
/// `layer_types` (or every `sliding_window_pattern`-th layer global) with RoPE base
/// `rope_local_base_freq`, and `final_logit_softcapping`.
pub fn parse_config(text: &str) -> Result<ModelConfig> {
    let raw: Value =
        serde_json::from_str(text).map_err(|e| Error::Config(format!("invalid JSON: {e}")))?;
    let obj = raw
        .as_object()
        .ok_or_else(|| Error::Config("expected a JSON object".into()))?;
    let family = check_architecture(&raw)?;
    let f = Fields(obj);
    let gemma = family == Family::Gemma3;

    let act_field = if gemma {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let activation = match f.str_opt(act_field)?.or(f.str_opt("hidden_act")?) {
        None if gemma => Activation::GeluTanh,
        None | Some("silu" | "swish") => Activation::Silu,
        Some("gelu_pytorch_tanh" | "gelu_tanh") => Activation::GeluTanh,
        Some(act) => {
            return Err(Error::Config(format!(
                "{act_field} '{act}' is not supported (silu, gelu_pytorch_tanh)"
            )));
        }
    };
    if f.bool_opt("mlp_bias")? == Some(true) {
        return Err(Error::Config("mlp_bias = true is not supported".into()));
    }
    let attention_bias = match family {
        // Qwen 2's q/k/v projections always carry biases (its o_proj none).
        Family::Qwen2 => true,
        _ => f.bool_opt("attention_bias")?.unwrap_or(false),
    };
    if attention_bias && family != Family::Qwen2 && family != Family::Qwen3 {
        return Err(Error::Config(format!(
            "attention_bias = true is not supported for {} (its o_proj would have one too)",
            family.name()
        )));
    }
    if let Some(cap) = f.f64_opt("attn_logit_softcapping")? {
        return Err(Error::Config(format!(
            "attn_logit_softcapping = {cap} is not supported"
        )));
    }
    if f.get("quantization_config").is_some() {
        return Err(Error::Config(
            "quantized checkpoints (quantization_config) are not supported; use F32, F16 or BF16 weights".into(),
        ));
    }

    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_attention_heads")?;
    let head_dim = match f.usize_opt("head_dim")? {
        Some(d) => d,
        None if heads == 0 => 0, // validate() reports num_attention_heads = 0
        None if !hidden.is_multiple_of(heads) => {
            return Err(Error::Config(format!(
                "hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and no head_dim is given"
            )));
        }
        None => hidden / heads,
    };

    let (rope_theta, rope_scaling, rope_theta_local) = rope(&f, gemma)?;
    let num_layers = f.usize("num_hidden_layers")?;
    let layer_windows = layer_windows(&f, family, num_layers)?;
    let config = ModelConfig {
        family,
        hidden_size: hidden,
        intermediate_size: f.usize("intermediate_size")?,
        num_layers,
        num_heads: heads,
        num_kv_heads: f.usize_opt("num_key_value_heads")?.unwrap_or(heads),
        head_dim,
        vocab_size: f.usize("vocab_size")?,
        rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope_theta: rope_theta as f32,
        rope_scaling,
        rope_style: RopeStyle::Halves,
        max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
        // Gemma's configs tie by default (transformers' Gemma3TextConfig).
        tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(gemma),
        bos_token_id: token_ids("bos_token_id", f.get("bos_token_id"))?
            .first()
            .copied(),
        eos_token_ids: token_ids("eos_token_id", f.get("eos_token_id"))?,
        attention_bias,
        qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
        norm_weight_offset: if gemma { 1.0 } else { 0.0 },
        sandwich_norms: gemma,
        activation,
        embedding_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
        layer_windows,
        rope_theta_local: rope_theta_local.map(|t| t as f32),
        attention_scale: match f.f64_opt("query_pre_attn_scalar")? {
            Some(s) if gemma && s > 0.0 => Some((1.0 / s.sqrt()) as f32),
            Some(s) if gemma => {
                return Err(Error::Config(format!(
                    "query_pre_attn_scalar = {s} must be positive"
                )));
            }
            _ => None,
        },
        final_logit_softcapping: f.f64_opt("final_logit_softcapping")?.map(|c| c as f32),
    };
    config.validate()?;
    Ok(config)
}

/// The `model_type` values we run, with their `architectures` class names.
pub const MODEL_TYPES: [(&str, &str, Family); 5] = [
    ("llama", "LlamaForCausalLM", Family::Llama),
    ("mistral", "MistralForCausalLM", Family::Mistral),
    ("qwen2", "Qwen2ForCausalLM", Family::Qwen2),
    ("qwen3", "Qwen3ForCausalLM", Family::Qwen3),
    ("gemma3_text", "Gemma3ForCausalLM", Family::Gemma3),
];

/// The family of `model_type` (or of the first known `architectures` entry).
fn check_architecture(raw: &Value) -> Result<Family> {
    let model_type = raw.get("model_type").and_then(Value::as_str);
    let archs: Vec<&str> = raw
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (t, class, family) in MODEL_TYPES {
        if model_type == Some(t) || (model_type.is_none() && archs.contains(&class)) {
            return Ok(family);
        }
    }
    let what = match (model_type, archs.first()) {
        (Some(t), _) => t.to_string(),
        (None, Some(a)) => a.to_string(),
        (None, None) => "(config.json names neither model_type nor architectures)".to_string(),
    };
    let known: Vec<&str> = MODEL_TYPES.iter().map(|m| m.0).collect();
    Err(Error::Config(format!(
        "unsupported architecture {what} (supported model_type: {})",
        known.join(", ")
    )))
}

/// Per layer: the sliding window of a local-attention layer, None for a global one
/// (empty when every layer is global).
fn layer_windows(f: &Fields, family: Family, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.usize_opt("sliding_window")?;
    let types = match f.get("layer_types") {
        None => None,
        Some(v) => Some(
            v.as_array()
                .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    Error::Config(format!("layer_types: expected a list of strings, got {v}"))
                })?,
        ),
    };
    let local: Vec<bool> = match (family, &types) {
        (_, Some(t)) => {
            if t.len() != layers {
                return Err(Error::Config(format!(
                    "layer_types has {} entries for {layers} layers",
                    t.len()
                )));
            }
            t.iter()
                .map(|&t| match t {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(Error::Config(format!(
                        "layer_types: '{other}' is not supported (sliding_attention, full_attention)"
                    ))),
                })
                .collect::<Result<_>>()?
        }
        (Family::Gemma3, None) => {
            let n = f.usize_opt("sliding_window_pattern")?.unwrap_or(6).max(1);
            (0..layers).map(|l| (l + 1) % n != 0).collect()
        }
        (Family::Mistral, None) => vec![true; layers],
        (Family::Qwen2 | Family::Qwen3, None) => {
            if f.bool_opt("use_sliding_window")? == Some(true) {
                let from = f.usize_opt("max_window_layers")?.unwrap_or(layers);
                (0..layers).map(|l| l >= from).collect()
            } else {
                vec![false; layers]
            }
        }
        (Family::Llama, None) => vec![false; layers],
    };
    // Qwen's layer_types name sliding layers even when use_sliding_window is off.
    let qwen_off = matches!(family, Family::Qwen2 | Family::Qwen3)
        && f.bool_opt("use_sliding_window")? != Some(true);
    match window {
        Some(w) if !qwen_off && local.iter().any(|&l| l) => {
            Ok(local.into_iter().map(|l| l.then_some(w)).collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// `rope_theta` (default 10000), llama3 scaling, and the RoPE base of sliding-window
/// layers when they have their own (Gemma 3: `rope_local_base_freq`, default 10000), from
/// the fields or transformers 5's `rope_parameters` (flat, or per layer type).
fn rope(f: &Fields, gemma: bool) -> Result<(f64, Option<RopeScaling>, Option<f64>)> {
    let params = f.get("rope_parameters");
    let theta_of = |p: Option<&Value>, what: &str| -> Result<Option<f64>> {
        match p.and_then(|p| p.get("rope_theta")) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::Config(format!("{what}.rope_theta: expected a number, got {v}"))
            }),
        }
    };
    // transformers 5's Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}.
    let full = params.and_then(|p| p.get("full_attention"));
    let sliding = params.and_then(|p| p.get("sliding_attention"));
    let global = full.or(params);
    let theta = match f.f64_opt("rope_theta")? {
        Some(t) => t,
        None => theta_of(global, "rope_parameters")?.unwrap_or(10000.0),
    };
    let scaling = match f.get("rope_scaling").or(global) {
        None => None,
        Some(s) => rope_scaling(s)?,
    };
    let local = match (
        f.f64_opt("rope_local_base_freq")?,
        theta_of(sliding, "rope_parameters.sliding_attention")?,
    ) {
        (Some(t), _) | (None, Some(t)) => Some(t),
        (None, None) if gemma => Some(10000.0),
        (None, None) => None,
    };
    if let Some(s) = sliding
        && rope_scaling(s)?.is_some()
    {
        return Err(Error::Config(
            "rope scaling on sliding-window layers is not supported".into(),
        ));
    }
    Ok((theta, scaling, local))
}

fn rope_scaling(s: &Value) -> Result<Option<RopeScaling>> {
    let err = |m: String| Error::Config(format!("rope_scaling: {m}"));
    if !s.is_object() {
        return Err(err(format!("expected an object, got {s}")));
    }
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str);
    match kind {
        None | Some("default") => return Ok(None),
        Some("llama3") => {}
        Some("linear") => {
            let factor = s
                .get("factor")
                .and_then(Value::as_f64)
                .ok_or_else(|| err("linear scaling needs a numeric 'factor'".into()))?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(err(format!("factor = {factor} must be positive")));
            }
            return Ok(Some(RopeScaling::Linear {
                factor: factor as f32,
            }));
        }
        Some(other) => {
            return Err(err(format!(
                "rope type '{other}' is not supported (llama3 and linear are)"
            )));
        }
    }
    let num = |k: &str| -> Result<f64> {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| err(format!("llama3 scaling needs a numeric '{k}'")))
    };
    let factor = num("factor")?;
    let low = num("low_freq_factor")?;
    let high = num("high_freq_factor")?;
    let orig = s
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            err("llama3 scaling needs an integer 'original_max_position_embeddings'".into())
        })?;
    if !(factor.is_finite() && factor > 0.0) {
        return Err(err(format!("factor = {factor} must be positive")));
    }
    if !(low.is_finite() && high.is_finite() && 0.0 < low && low < high) {
        return Err(err(format!(
            "need 0 < low_freq_factor < high_freq_factor, got {low} and {high}"
        )));
    }
    let orig = usize::try_from(orig)
        .ok()
        .filter(|&o| o > 0 && o <= crate::model::config::MAX_CONTEXT)
        .ok_or_else(|| {
            err(format!(
                "original_max_position_embeddings = {orig} is out of range"
            ))
        })?;
    Ok(Some(RopeScaling::Llama3(Llama3RopeScaling {
        factor: factor as f32,
        low_freq_factor: low as f32,
        high_freq_factor: high as f32,
        original_max_position_embeddings: orig,
    })))
}

/// A token id field: absent/null, an integer, or a list of integers.
fn token_ids(field: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::Config(format!("{field}: {x} is not a token id")))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// The chat template: `chat_template.jinja` if present, else tokenizer_config.json's
/// `chat_template` (a string, or a list of `{name, template}` of which "default" is taken).
fn read_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join(CHAT_TEMPLATE_JINJA);
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let p = dir.join(TOKENIZER_CONFIG);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&p, format!("invalid JSON: {e}")))?;
    Ok(match v.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}
