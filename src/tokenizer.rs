//! Text <-> token ids. Owns: building a tokenizer from a HuggingFace `tokenizer.json` or from
//! GGUF `tokenizer.ggml.*` metadata (gpt2-style byte-level BPE, or SentencePiece-style:
//! [`spm`]), the BOS/EOS ids, streaming decode of generated ids into text, and rendering
//! Jinja chat templates (HF style).
//!
//! [`Tokenizer::encode`] never inserts BOS or other special tokens by itself; special tokens
//! written in the text (`<|im_start|>`) are matched as whole tokens.
//! [`Tokenizer::encode_prompt`] adds BOS when the vocabulary asks for it (GGUF
//! `tokenizer.ggml.add_bos_token`, as llama.cpp does).

pub mod spm;

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::Value;
use tokenizers as hf;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::loader::{GgufVocab, TokenizerSource};

/// Llama-3's pre-tokenization regex (`tokenizer.ggml.pre = llama-bpe`), as in its tokenizer.json.
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` values that become added tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

/// A tokenizer: a `tokenizers::Tokenizer` (or a SentencePiece vocabulary) plus the BOS/EOS
/// ids of its checkpoint.
pub struct Tokenizer {
    inner: Backend,
    /// Number of ids (rows of the embedding the vocabulary indexes).
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether a prompt starts with BOS.
    add_bos: bool,
}

/// What does the encoding.
enum Backend {
    /// HuggingFace's tokenizers (tokenizer.json, GGUF byte-level BPE).
    Hf(Box<hf::Tokenizer>),
    /// GGUF's SentencePiece-style vocabulary, tokenized as llama.cpp does.
    Spm(spm::SpmTokenizer),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds from either source (a tokenizer.json path or GGUF metadata).
    pub fn load(source: &TokenizerSource) -> Result<Tokenizer> {
        match source {
            TokenizerSource::Json(path) => Tokenizer::from_json_file(path),
            TokenizerSource::Gguf(vocab) => Tokenizer::from_gguf_vocab(vocab),
        }
    }

    /// Reads a HuggingFace tokenizer.json. BOS/EOS come from `tokenizer_config.json` next to it
    /// (`bos_token`/`eos_token`), else from `config.json` next to it (`bos_token_id`/
    /// `eos_token_id`), else from the special tokens of the tokenizer's template post-processor
    /// (a leading special token is BOS, a trailing one EOS); otherwise they are unknown (None).
    pub fn from_json_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = hf::Tokenizer::from_bytes(&bytes)
            .map_err(|e| tok_err(&format!("{}: invalid tokenizer.json", path.display()), e))?;
        let vocab_size = inner.get_vocab_size(true);
        let mut tok = Tokenizer {
            inner: Backend::Hf(Box::new(inner)),
            vocab_size,
            bos: None,
            eos: None,
            add_bos: false,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let (bos, eos) = tok.special_ids_from_files(dir)?;
        let (pp_bos, pp_eos) = match (bos, eos) {
            (Some(_), Some(_)) => (None, None),
            _ => tok.special_ids_from_post_processor(&bytes, path)?,
        };
        tok.bos = bos.or(pp_bos);
        tok.eos = eos.or(pp_eos);
        Ok(tok)
    }

    /// Looks up BOS/EOS in `tokenizer_config.json`, then `config.json`, in `dir`. A file that
    /// exists but is malformed, or names a token the vocabulary lacks, is an error.
    fn special_ids_from_files(&self, dir: &Path) -> Result<(Option<u32>, Option<u32>)> {
        let mut bos = None;
        let mut eos = None;
        let cfg_path = dir.join("tokenizer_config.json");
        if let Some(cfg) = read_json_if_exists(&cfg_path)? {
            let lookup = |key: &str| -> Result<Option<u32>> {
                // `bos_token` is a string, or an AddedToken object `{"content": ...}`, or null.
                let name = match cfg.get(key) {
                    Some(serde_json::Value::String(s)) => Some(s.as_str()),
                    Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()),
                    _ => None,
                };
                match name {
                    None => Ok(None),
                    Some(name) => self.token_to_id(name).map(Some).ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "{}: {key} '{name}' is not in the vocabulary",
                            cfg_path.display()
                        ))
                    }),
                }
            };
            bos = lookup("bos_token")?;
            eos = lookup("eos_token")?;
        }
        let model_cfg_path = dir.join("config.json");
        if (bos.is_none() || eos.is_none())
            && let Some(cfg) = read_json_if_exists(&model_cfg_path)?
        {
            let lookup = |key: &str| -> Result<Option<u32>> {
                // An id, or a list of ids (several EOS tokens): the first one.
                let v = match cfg.get(key) {
                    Some(serde_json::Value::Array(a)) => a.first(),
                    other => other,
                };
                match v {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(v) => {
                        let id = v
                            .as_u64()
                            .and_then(|id| u32::try_from(id).ok())
                            .ok_or_else(|| {
                                Error::Tokenizer(format!(
                                    "{}: {key} is not a token id: {v}",
                                    model_cfg_path.display()
                                ))
                            })?;
                        self.check_id(id, key)?;
                        Ok(Some(id))
                    }
                }
            };
            bos = bos.or(lookup("bos_token_id")?);
            eos = eos.or(lookup("eos_token_id")?);
        }
        Ok((bos, eos))
    }

    /// BOS/EOS from a `TemplateProcessing` post-processor (possibly inside a `Sequence`):
    /// Llama-3 style tokenizers put `<|begin_of_text|>` in front of `$A`.
    fn special_ids_from_post_processor(
        &self,
        json: &[u8],
        path: &Path,
    ) -> Result<(Option<u32>, Option<u32>)> {
        #[derive(serde::Deserialize)]
        struct Partial {
            post_processor: Option<serde_json::Value>,
        }
        let partial: Partial = serde_json::from_slice(json)
            .map_err(|e| tok_err(&format!("{}: invalid tokenizer.json", path.display()), e))?;
        let Some(pp) = partial.post_processor else {
            return Ok((None, None));
        };
        let mut template = None;
        let mut stack = vec![&pp];
        while let Some(p) = stack.pop() {
            match p.get("type").and_then(|t| t.as_str()) {
                Some("TemplateProcessing") => template = Some(p),
                Some("Sequence") => {
                    if let Some(list) = p.get("processors").and_then(|l| l.as_array()) {
                        stack.extend(list.iter());
                    }
                }
                _ => {}
            }
        }
        let Some(template) = template else {
            return Ok((None, None));
        };
        let single = template.get("single").and_then(|s| s.as_array());
        let special_id = |piece: Option<&serde_json::Value>| -> Option<u32> {
            let name = piece?.get("SpecialToken")?.get("id")?.as_str()?;
            self.token_to_id(name)
        };
        let bos = special_id(single.and_then(|s| s.first()));
        let eos = match single {
            Some(s) if s.len() > 1 => special_id(s.last()),
            _ => None,
        };
        Ok((bos, eos))
    }

    /// Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model = gpt2`),
    /// mirroring what HuggingFace's tokenizer.json for the same model holds: BPE over the tokens
    /// (id = index) and merges, the pre-tokenizer named by `tokenizer.ggml.pre`, control
    /// (type 3) and user-defined (type 4) tokens as added tokens so text containing them maps to
    /// their ids, a ByteLevel decoder, and no BOS insertion.
    ///
    /// If a token string occurs twice, the later id wins for encoding (as in llama.cpp).
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Tokenizer> {
        if v.model == "llama" {
            return Tokenizer::from_spm_vocab(v);
        }
        if v.model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model '{}' is not supported yet (gpt2, llama)",
                v.model
            )));
        }
        let n = v.tokens.len();
        if n == 0 {
            return Err(Error::Tokenizer("GGUF vocabulary has no tokens".into()));
        }
        let n_u32 = u32::try_from(n)
            .map_err(|_| Error::Tokenizer(format!("GGUF vocabulary has too many tokens ({n})")))?;
        if !v.token_types.is_empty() && v.token_types.len() != n {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer.ggml.token_type has {} entries but there are {n} tokens",
                v.token_types.len()
            )));
        }
        for (name, id) in [
            ("bos_token_id", v.bos_token_id),
            ("eos_token_id", v.eos_token_id),
            ("unknown_token_id", v.unknown_token_id),
            ("padding_token_id", v.padding_token_id),
        ] {
            if let Some(id) = id
                && id >= n_u32
            {
                return Err(Error::Tokenizer(format!(
                    "GGUF tokenizer.ggml.{name} {id} is out of range (vocabulary of {n} tokens)"
                )));
            }
        }

        let pre_tokenizer = gguf_pre_tokenizer(v.pre.as_deref())?;

        let mut vocab = Vocab::with_capacity(n);
        for (id, token) in (0..n_u32).zip(&v.tokens) {
            vocab.insert(token.clone(), id);
        }
        let mut merges = Vec::with_capacity(v.merges.len());
        for (i, m) in v.merges.iter().enumerate() {
            let (a, b) = split_merge(m).ok_or_else(|| {
                Error::Tokenizer(format!("GGUF merge #{i} '{m}' is not two tokens 'a b'"))
            })?;
            for part in [a, b, &format!("{a}{b}")] {
                if !vocab.contains_key(part) {
                    return Err(Error::Tokenizer(format!(
                        "GGUF merge #{i} '{m}' names a token not in the vocabulary: '{part}'"
                    )));
                }
            }
            merges.push((a.to_owned(), b.to_owned()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err("building BPE from GGUF vocabulary", e))?;

        // HF's post-processor for these models: the sequence(s) as they are, no special tokens.
        let post = TemplateProcessing::builder()
            .try_single("$A")
            .and_then(|b| b.try_pair("$A $B:1"))
            .map_err(|e| tok_err("post-processor template", e))?
            .build()
            .map_err(|e| tok_err("post-processor template", e))?;

        let mut inner = hf::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_post_processor(Some(post))
            .with_decoder(Some(ByteLevel::default()));

        let added: Vec<AddedToken> = v
            .tokens
            .iter()
            .zip(&v.token_types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, t)| {
                AddedToken::from(tok.clone(), *t == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        inner
            .add_tokens(added)
            .map_err(|e| tok_err("adding special tokens from GGUF vocabulary", e))?;

        Ok(Tokenizer {
            inner: Backend::Hf(Box::new(inner)),
            vocab_size: n,
            bos: v.bos_token_id,
            eos: v.eos_token_id,
            add_bos: v.add_bos.unwrap_or(false),
        })
    }

    /// A SentencePiece-style GGUF vocabulary (`tokenizer.ggml.model = llama`; see [`spm`]).
    /// BOS, EOS and `add_bos` default as in llama.cpp (ids 1 and 2, add BOS).
    fn from_spm_vocab(v: &GgufVocab) -> Result<Tokenizer> {
        let inner = spm::SpmTokenizer::from_gguf_vocab(v)?;
        let n = inner.vocab_size();
        let check = |name: &str, id: Option<u32>| -> Result<Option<u32>> {
            match id {
                Some(id) if id as usize >= n => Err(Error::Tokenizer(format!(
                    "GGUF tokenizer.ggml.{name} {id} is out of range (vocabulary of {n} tokens)"
                ))),
                other => Ok(other),
            }
        };
        let bos = check("bos_token_id", v.bos_token_id.or(Some(1)))?;
        let eos = check("eos_token_id", v.eos_token_id.or(Some(2)))?;
        check("unknown_token_id", v.unknown_token_id)?;
        check("padding_token_id", v.padding_token_id)?;
        Ok(Tokenizer {
            inner: Backend::Spm(inner),
            vocab_size: n,
            bos,
            eos,
            add_bos: v.add_bos.unwrap_or(true),
        })
    }

    /// Encodes without adding any special tokens (no BOS); special tokens written in the text
    /// (e.g. `<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Backend::Hf(t) => {
                let enc = t
                    .encode_fast(text, false)
                    .map_err(|e| tok_err("encoding text", e))?;
                Ok(enc.get_ids().to_vec())
            }
            Backend::Spm(t) => t.encode(text),
        }
    }

    /// A prompt's ids: [`encode`](Self::encode), after BOS when the vocabulary asks for
    /// one ([`add_bos`](Self::add_bos)) and the text does not already start with it (a
    /// chat template that writes `<bos>` itself).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        match self.bos {
            Some(bos) if self.add_bos && ids.first() != Some(&bos) => {
                Ok(std::iter::once(bos).chain(ids).collect())
            }
            _ => Ok(ids),
        }
    }

    /// Whether prompts start with BOS (GGUF `tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Decodes ids to text, special tokens included (skip_special_tokens = false). Invalid UTF-8
    /// (a multi-byte character cut off) becomes U+FFFD. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// As [`decode`](Self::decode); with `skip_special_tokens`, special tokens (EOS, the
    /// chat markers) are left out, as HuggingFace's `decode(..., skip_special_tokens=True)`.
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        for &id in ids {
            self.check_id(id, "token id")?;
        }
        match &self.inner {
            Backend::Hf(t) => t
                .decode(ids, skip_special_tokens)
                .map_err(|e| tok_err("decoding ids", e)),
            Backend::Spm(t) => t.decode(ids, skip_special_tokens),
        }
    }

    fn check_id(&self, id: u32, what: &str) -> Result<()> {
        if self.id_to_token(id).is_none() {
            return Err(Error::Tokenizer(format!(
                "{what} {id} is not in the vocabulary (size {})",
                self.vocab_size
            )));
        }
        Ok(())
    }

    /// Writes the tokenizer as a HuggingFace tokenizer.json.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        match &self.inner {
            Backend::Hf(t) => t
                .save(path, false)
                .map_err(|e| Error::Tokenizer(format!("writing {}: {e}", path.display()))),
            Backend::Spm(_) => Err(Error::Tokenizer(format!(
                "writing {}: a SentencePiece GGUF vocabulary has no tokenizer.json form here",
                path.display()
            ))),
        }
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Spm(t) => t.token_to_id(token),
        }
    }

    /// The token's string as stored in the vocabulary (byte-level form, e.g. `Ġthe`;
    /// SentencePiece form, e.g. `▁the`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(t) => t.id_to_token(id).map(str::to_owned),
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// A decoder for generated ids, pushed one at a time.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value (ByteLevel never adds a prefix space).
fn gguf_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        // Digits one by one, then GPT-2's byte-level regex (SmolLM's tokenizer.json).
        Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        None | Some("gpt2" | "gpt-2" | "default") => byte_level(true),
        Some("llama-bpe" | "llama3" | "llama-v3") => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT_REGEX.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err("Llama-3 pre-tokenizer regex", e))?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                byte_level(false),
            ]))
        }
        Some(other) => {
            return Err(Error::Tokenizer(format!(
                "GGUF pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported"
            )));
        }
    })
}

/// Splits a GGUF merge "a b" at its first space after the first byte (as llama.cpp does, so a
/// token that is itself a space can be the left side).
fn split_merge(m: &str) -> Option<(&str, &str)> {
    let pos = m.as_bytes().iter().skip(1).position(|&b| b == b' ')? + 1;
    let (a, b) = (&m[..pos], &m[pos + 1..]);
    (!b.is_empty()).then_some((a, b))
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::format(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Streams generated text: push ids one at a time, get back the newly completed text. An
/// incomplete UTF-8 sequence (byte-level BPE splits multi-byte characters across tokens) is
/// held back until it completes, so the concatenated output never has a U+FFFD that decoding
/// all ids at once would not have. `finish()` flushes whatever remains (lossy).
///
/// It decodes a short window of ids each time (the previous chunk's ids as context, then the
/// new ones) and returns what extends the previous chunk's text, so decoders that depend on
/// neighbouring tokens stay correct.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// The window: ids of the last returned chunk, then the ids not yet returned.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`, already returned.
    prefix: String,
    prefix_index: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.check_id(id, "token id")?;
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = self.new_text(&text)?;
        // The ids just returned become the context of the next window.
        self.ids.drain(..self.prefix_index);
        self.prefix_index = self.ids.len();
        self.prefix = self.tokenizer.decode(&self.ids)?;
        Ok(new)
    }

    /// Returns the text of the ids still held back (an incomplete character becomes U+FFFD),
    /// and resets the decoder.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = if text.len() > self.prefix.len() {
            self.new_text(&text)?
        } else {
            String::new()
        };
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(rest)
    }

    fn new_text(&self, text: &str) -> Result<String> {
        text.strip_prefix(self.prefix.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "stream decode: text of ids {:?} ({text:?}) does not extend the text already \
                     returned ({:?})",
                    self.ids, self.prefix
                ))
            })
    }
}

/// ChatML, the fallback when a checkpoint has no chat template:
/// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Gemma 3's chat template (its tokenizer_config.json's, text only), the fallback for a
/// Gemma GGUF without `tokenizer.chat_template` (as llama.cpp recognises Gemma's turns).
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\
{%- set loop_messages = messages[1:] -%}\
{%- else -%}\
{%- set first_user_prefix = '' -%}\
{%- set loop_messages = messages -%}\
{%- endif -%}\
{%- for message in loop_messages -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
{%- endif -%}\
{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}\
{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}\
{{- message['content'] | trim }}{{ '<end_of_turn>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// A Jinja chat template (HF style) rendered with minijinja, configured like HF's
/// `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, `raise_exception(msg)` as a
/// function, Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...), and
/// `messages`, `add_generation_prompt`, `bos_token`, `eos_token` in the context.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `template`; a syntax error is an `Error::Tokenizer` naming the line.
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| tok_err("chat template syntax config", e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("raise_exception: {msg}"),
                ))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(|e| tok_err("chat template does not compile", e))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders `(role, content)` messages; `add_generation_prompt` appends the opening of an
    /// assistant turn, as in HF. A template that raises (e.g. on an unexpected role) is an
    /// error carrying its message.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|&(role, content)| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(role)),
                    ("content", Value::from(content)),
                ]))
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| tok_err("chat template", e))?;
        tmpl.render(ctx)
            .map_err(|e| tok_err("rendering chat template", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_template_renders_turns_after_one_bos() {
        let t = ChatTemplate::new(GEMMA_CHAT_TEMPLATE, "<bos>", "<eos>").unwrap();
        let s = t
            .render(
                &[
                    ("system", "Be brief."),
                    ("user", " Hi "),
                    ("assistant", "Hello."),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>model\n"
        );
        let e = t
            .render(&[("user", "a"), ("user", "b")], false)
            .unwrap_err();
        assert!(e.to_string().contains("alternate"), "{e}");
    }

    #[test]
    fn split_merge_cases() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
        assert_eq!(split_merge(""), None);
        assert_eq!(split_merge("é x"), Some(("é", "x")));
    }
}
