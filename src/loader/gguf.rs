//! GGUF files (v2 and v3): the header, metadata, tensor infos and data offsets, read from a
//! memory map with every length and offset checked before use; and the mapping from
//! GGUF's llama tensor names and metadata keys to the model's.
//!
//! Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64,
//! metadata key/values, tensor infos (name, n_dims u32, dims u64 fastest-first, type u32,
//! offset u64 relative to the data section), padding to `general.alignment` (default 32),
//! tensor data.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::loader::{GgufVocab, RawTensor, SourceDType, TokenizerSource, WeightSource};
use crate::model::config::{Activation, Family, ModelConfig, RopeScaling, RopeStyle};

const MAGIC: &[u8; 4] = b"GGUF";
/// Caps that no real file reaches; a larger count or length is a corrupt or hostile file.
const MAX_STRING_LEN: u64 = 16 << 20;
/// 4M entries: the largest vocabularies have about 256K tokens. Each parsed entry takes
/// ~32 bytes of memory however small it is in the file, so this cap (with the bytes-left
/// check) bounds a hostile array's memory at ~128 MB.
const MAX_ARRAY_LEN: u64 = 1 << 22;
/// All metadata arrays of a file together: 8M entries (~270 MB parsed, at ~32 bytes an
/// entry), so many arrays each under [`MAX_ARRAY_LEN`] cannot multiply a small file into
/// gigabytes. The default model holds about 150K.
const MAX_ARRAY_ELEMS_PER_FILE: u64 = 1 << 23;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_METADATA: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types by id; the ones we cannot compute on are kept for error messages.
fn ggml_type(id: u32) -> std::result::Result<SourceDType, String> {
    Ok(match id {
        0 => SourceDType::F32,
        1 => SourceDType::F16,
        2 => SourceDType::Q4_0,
        3 => SourceDType::Q4_1,
        6 => SourceDType::Q5_0,
        7 => SourceDType::Q5_1,
        8 => SourceDType::Q8_0,
        10 => SourceDType::Q2K,
        11 => SourceDType::Q3K,
        12 => SourceDType::Q4K,
        13 => SourceDType::Q5K,
        14 => SourceDType::Q6K,
        30 => SourceDType::BF16,
        _ => {
            let name = match id {
                9 => "Q8_1",
                15 => "Q8_K",
                16 => "IQ2_XXS",
                17 => "IQ2_XS",
                18 => "IQ3_XXS",
                19 => "IQ1_S",
                20 => "IQ4_NL",
                21 => "IQ3_S",
                22 => "IQ2_S",
                23 => "IQ4_XS",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                29 => "IQ1_M",
                34 => "TQ1_0",
                35 => "TQ2_0",
                39 => "MXFP4",
                40 => "NVFP4",
                41 => "Q1_0",
                42 => "Q2_0",
                _ => "unknown",
            };
            return Err(format!("{name} (ggml type {id})"));
        }
    })
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major, outermost first (GGUF's fastest-first dims reversed).
    pub shape: Vec<usize>,
    /// The type, or the name of an unsupported ggml type.
    pub dtype: std::result::Result<SourceDType, String>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Byte length (0 for unsupported types).
    pub len: usize,
}

/// A parsed GGUF file over its memory map.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    pub data_offset: usize,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Array entries the file may still declare (see [`MAX_ARRAY_ELEMS_PER_FILE`]).
    elems_left: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("{msg} (at byte offset {})", self.pos))
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let n =
            usize::try_from(n).map_err(|_| self.err(format!("{what}: length {n} too large")))?;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err(format!("truncated file: {what} needs {n} bytes")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > MAX_STRING_LEN {
            return Err(self.err(format!("{what}: string length {n} exceeds the limit")));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what}: invalid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("{key}: bool value {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("{key}: arrays nested too deep")));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte, so a count beyond the bytes left is a lie.
                let left = (self.buf.len() - self.pos) as u64;
                if n > MAX_ARRAY_LEN || n > left {
                    return Err(self.err(format!("{key}: array length {n} is impossible")));
                }
                if n > self.elems_left {
                    return Err(self.err(format!(
                        "{key}: the metadata arrays hold more than {MAX_ARRAY_ELEMS_PER_FILE} entries in all"
                    )));
                }
                self.elems_left -= n;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format!("{key}: unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = crate::loader::map_file(path)?;
        Self::parse(path, map)
    }

    /// Parses the header of a mapped file, validating every tensor's extent.
    pub fn parse(path: &Path, map: Arc<Mmap>) -> Result<GgufFile> {
        let buf: &[u8] = &map;
        let mut c = Cursor {
            buf,
            pos: 0,
            path,
            elems_left: MAX_ARRAY_ELEMS_PER_FILE,
        };
        let magic = c
            .take(4, "magic")
            .map_err(|_| Error::format(path, "not a GGUF file (shorter than its magic number)"))?;
        if magic != MAGIC {
            return Err(Error::format(
                path,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_meta = c.u64("metadata count")?;
        if n_tensors > MAX_TENSORS || n_meta > MAX_METADATA {
            return Err(Error::format(
                path,
                format!("absurd header: {n_tensors} tensors, {n_meta} metadata entries"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(c.err(format!("duplicate metadata key '{key}'")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(Error::format(
                        path,
                        format!("general.alignment {v:?} is invalid"),
                    ));
                }
            },
        };

        struct Pending {
            name: String,
            shape: Vec<usize>,
            numel: usize,
            dtype: std::result::Result<SourceDType, String>,
            rel_offset: u64,
        }
        let mut pending = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::tensor(path, &name, format!("{n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let numel = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
                .filter(|&n| n <= 1 << 40)
                .ok_or_else(|| Error::tensor(path, &name, format!("absurd dimensions {dims:?}")))?;
            let dtype = ggml_type(c.u32(&name)?);
            let rel_offset = c.u64(&name)?;
            if rel_offset % alignment != 0 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("data offset {rel_offset} is not aligned to {alignment}"),
                ));
            }
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            pending.push(Pending {
                name,
                shape,
                numel,
                dtype,
                rel_offset,
            });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        if data_offset > file_len && n_tensors > 0 {
            return Err(Error::format(
                path,
                "truncated file: no tensor data section",
            ));
        }

        let mut tensors = Vec::with_capacity(pending.len());
        let mut by_name = HashMap::with_capacity(pending.len());
        for p in pending {
            let len = match &p.dtype {
                Ok(dt) => dt.bytes_for(p.numel).ok_or_else(|| {
                    Error::tensor(
                        path,
                        &p.name,
                        format!(
                            "{} elements is not a whole number of {} blocks",
                            p.numel,
                            dt.name()
                        ),
                    )
                })?,
                Err(_) => 0,
            };
            let start = data_offset.checked_add(p.rel_offset);
            let end = start.and_then(|s| s.checked_add(len as u64));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => {
                    if by_name.insert(p.name.clone(), tensors.len()).is_some() {
                        return Err(Error::tensor(path, &p.name, "duplicate tensor name"));
                    }
                    tensors.push(TensorInfo {
                        name: p.name,
                        shape: p.shape,
                        dtype: p.dtype,
                        offset: s as usize,
                        len,
                    });
                }
                _ => {
                    return Err(Error::tensor(
                        path,
                        &p.name,
                        format!(
                            "data [{} + {}, +{len} bytes] lies outside the file ({file_len} bytes): truncated?",
                            data_offset, p.rel_offset
                        ),
                    ));
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
            by_name,
            data_offset: data_offset as usize,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, what: &str) -> Error {
        Error::format(&self.path, format!("metadata '{key}' {what}"))
    }

    /// A required unsigned integer.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| self.meta_err(key, "is missing"))?;
        v.as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.meta_err(key, &format!("is not an unsigned integer ({v:?})")))
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| self.meta_err(key, "is not a number")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "is not a string")),
        }
    }

    /// An optional array of strings (tokens, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect())
                .ok_or_else(|| self.meta_err(key, "is not an array of strings")),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor `name` (GGUF naming) as a view into the map.
    pub fn raw_tensor(&self, name: &str) -> Result<RawTensor> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not found in the file"))?;
        let dtype = t.dtype.clone().map_err(|ty| {
            Error::tensor(
                &self.path,
                name,
                format!("tensor type {ty} is not supported"),
            )
        })?;
        Ok(RawTensor {
            name: name.to_owned(),
            dtype,
            shape: t.shape.clone(),
            map: Arc::clone(&self.map),
            offset: t.offset,
            len: t.len,
            path: self.path.clone(),
        })
    }
}

/// A GGUF file holding a model of a LLaMA-like architecture (llama, qwen2, qwen3, gemma3).
pub struct GgufModel {
    file: GgufFile,
    config: ModelConfig,
}

/// The `general.architecture` values we run.
pub const ARCHITECTURES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

/// The RoPE scaling a GGUF file asks for, as llama.cpp reads it: per-frequency factors
/// (`rope_freqs.weight`, how the converter stores Llama 3.1+'s llama3 scaling), or
/// `rope.scaling.type` linear with `rope.scaling.factor` (or the older
/// `rope.scale_linear`); other scaling types are refused.
fn gguf_rope_scaling(file: &GgufFile, k: &dyn Fn(&str) -> String) -> Result<Option<RopeScaling>> {
    let path = file.path();
    if file.tensor_info("rope_freqs.weight").is_some() {
        let t = file.raw_tensor("rope_freqs.weight")?;
        if t.dtype != SourceDType::F32 || t.shape.len() != 1 {
            return Err(t.error(format!(
                "RoPE frequency factors must be a 1-D F32 tensor, got {:?} {:?}",
                t.dtype, t.shape
            )));
        }
        let factors = t
            .bytes()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        return Ok(Some(RopeScaling::Factors(factors)));
    }
    let kind = file.get_str(&k("rope.scaling.type"))?.unwrap_or("none");
    let factor = match file.get_f32(&k("rope.scaling.factor"))? {
        Some(f) => Some(f),
        None => file.get_f32(&k("rope.scale_linear"))?,
    };
    match kind {
        "none" => Ok(None),
        "linear" => match factor {
            None => Ok(None),
            Some(f) if f == 0.0 || f == 1.0 => Ok(None),
            Some(factor) => Ok(Some(RopeScaling::Linear { factor })),
        },
        other => Err(Error::Config(format!(
            "{}: RoPE scaling type '{other}' is not supported (linear and llama3 are)",
            path.display()
        ))),
    }
}

/// HuggingFace tensor name -> GGUF tensor name. `sandwich_norms`: Gemma's naming, where
/// `post_attention_layernorm` is the attention output's norm (`post_attention_norm`) and the
/// MLP's input norm is `pre_feedforward_layernorm` (`ffn_norm`).
pub fn gguf_tensor_name(hf: &str, sandwich_norms: bool) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let g = match part {
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" if sandwich_norms => "post_attention_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "pre_feedforward_layernorm.weight" => "ffn_norm",
        "post_feedforward_layernorm.weight" => "post_ffw_norm",
        "self_attn.q_norm.weight" => "attn_q_norm",
        "self_attn.k_norm.weight" => "attn_k_norm",
        "self_attn.q_proj.bias" => return Some(format!("blk.{layer}.attn_q.bias")),
        "self_attn.k_proj.bias" => return Some(format!("blk.{layer}.attn_k.bias")),
        "self_attn.v_proj.bias" => return Some(format!("blk.{layer}.attn_v.bias")),
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.weight"))
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<GgufModel> {
        let arch = file
            .get_str("general.architecture")?
            .ok_or_else(|| {
                Error::format(file.path(), "metadata 'general.architecture' is missing")
            })?
            .to_owned();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" => Family::Gemma3,
            _ => {
                return Err(Error::Config(format!(
                    "{}: architecture '{arch}' is not supported (supported: {})",
                    file.path().display(),
                    ARCHITECTURES.join(", ")
                )));
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let rope_scaling = gguf_rope_scaling(&file, &k)?;
        let hidden_size = file.get_usize(&k("embedding_length"))?;
        let num_heads = file.get_usize(&k("attention.head_count"))?;
        let num_kv_heads = match file.get(&k("attention.head_count_kv")) {
            None => num_heads,
            Some(_) => file.get_usize(&k("attention.head_count_kv"))?,
        };
        let head_dim = match file.get(&k("attention.key_length")) {
            Some(_) => file.get_usize(&k("attention.key_length"))?,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let tokens_len = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let vocab_size = match file.get(&k("vocab_size")) {
            Some(_) => file.get_usize(&k("vocab_size"))?,
            None => tokens_len.unwrap_or(0),
        };
        let opt_id = |key: &str| -> Result<Option<u32>> {
            match file.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        Error::format(file.path(), format!("metadata '{key}' is not a token id"))
                    }),
            }
        };
        let num_layers = file.get_usize(&k("block_count"))?;
        let gemma = family == Family::Gemma3;
        let head_bias = file.tensor_info("blk.0.attn_q.bias").is_some();
        if let Some(v) = file.get(&k("attention.value_length"))
            && v.as_u64() != Some(head_dim as u64)
        {
            return Err(Error::Config(format!(
                "{}: value heads of a different size than key heads ({v:?} != {head_dim}) are not supported",
                file.path().display()
            )));
        }
        let layer_windows = if gemma {
            gemma3_windows(&file, num_layers)?
        } else {
            Vec::new()
        };
        let config = ModelConfig {
            family,
            hidden_size,
            intermediate_size: file.get_usize(&k("feed_forward_length"))?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: file
                .get_f32(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: file.get_f32(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            // llama.cpp's converter permutes q/k rows for the llama architecture only
            // (LLAMA_ROPE_TYPE_NORM); qwen2/3 and gemma3 keep HF's rotate-half (NEOX).
            rope_style: if family == Family::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Halves
            },
            max_position_embeddings: file.get_usize(&k("context_length"))?,
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            bos_token_id: opt_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: end_of_generation_ids(&file, opt_id("tokenizer.ggml.eos_token_id")?)?,
            attention_bias: head_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            // llama.cpp's converter stores Gemma's norm weights as 1 + w.
            norm_weight_offset: 0.0,
            sandwich_norms: gemma,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embedding_scale: if gemma {
                (hidden_size as f32).sqrt()
            } else {
                1.0
            },
            layer_windows,
            rope_theta_local: if gemma {
                Some(file.get_f32(&k("rope.freq_base_swa"))?.unwrap_or(10000.0))
            } else {
                None
            },
            // As llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers), whose
            // query_pre_attn_scalar is hidden / heads.
            attention_scale: (gemma && num_layers == 62 && num_heads > 0)
                .then(|| 1.0 / ((hidden_size / num_heads) as f32).sqrt()),
            final_logit_softcapping: file
                .get_f32(&k("final_logit_softcapping"))?
                .filter(|&c| c != 0.0),
        };
        // Name the file in the message once (validate's errors are already Config).
        config.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", file.path().display())),
            other => other,
        })?;
        if let Some(rot) = file.get(&k("rope.dimension_count"))
            && rot.as_u64() != Some(head_dim as u64)
        {
            return Err(Error::Config(format!(
                "{}: partial RoPE (rope.dimension_count {rot:?} != head_dim {head_dim}) is not supported",
                file.path().display()
            )));
        }
        Ok(GgufModel { file, config })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// The ids that end generation: EOS, and the end-of-turn token a chat template closes
/// each turn with (`tokenizer.ggml.eot_token_id`, else found by its text as llama.cpp
/// does: Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`).
fn end_of_generation_ids(file: &GgufFile, eos: Option<u32>) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    let mut push = |id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    if let Some(v) = file.get("tokenizer.ggml.eot_token_id") {
        let id = v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                Error::format(
                    file.path(),
                    "metadata 'tokenizer.ggml.eot_token_id' is not a token id",
                )
            })?;
        push(id);
    } else if let Some(MetaValue::Array(tokens)) = file.get("tokenizer.ggml.tokens") {
        for (i, t) in tokens.iter().enumerate() {
            if let Some("<end_of_turn>" | "<|eot_id|>" | "<|im_end|>") = t.as_str()
                && let Ok(i) = u32::try_from(i)
            {
                push(i);
            }
        }
    }
    Ok(ids)
}

/// Gemma 3's per-layer attention as llama.cpp reads it: a window of
/// `gemma3.attention.sliding_window` positions on the local layers, which are given by
/// `attention.sliding_window_pattern` (a bool per layer, or a period n: every n-th layer
/// global, default 6); no window key: every layer global.
fn gemma3_windows(file: &GgufFile, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = match file.get("gemma3.attention.sliding_window") {
        None => return Ok(Vec::new()),
        Some(_) => file.get_usize("gemma3.attention.sliding_window")?,
    };
    if window == 0 {
        return Ok(Vec::new());
    }
    let key = "gemma3.attention.sliding_window_pattern";
    let local: Vec<bool> = match file.get(key) {
        Some(MetaValue::Array(a)) => {
            if a.len() < layers {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "metadata '{key}' has {} entries for {layers} layers",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .take(layers)
                .map(|v| match v {
                    MetaValue::Bool(b) => Ok(*b),
                    other => other.as_u64().map(|x| x != 0).ok_or_else(|| {
                        Error::format(file.path(), format!("metadata '{key}' is not a bool array"))
                    }),
                })
                .collect::<Result<_>>()?
        }
        Some(_) => {
            let n = file.get_usize(key)?.max(1);
            (0..layers).map(|l| l % n < n - 1).collect()
        }
        None => (0..layers).map(|l| l % 6 < 5).collect(),
    };
    Ok(local.into_iter().map(|l| l.then_some(window)).collect())
}

impl WeightSource for GgufModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<RawTensor> {
        let g = gguf_tensor_name(name, self.config.sandwich_norms)
            .ok_or_else(|| Error::tensor(self.file.path(), name, "no GGUF counterpart"))?;
        let mut t = self.file.raw_tensor(&g)?;
        if t.shape.len() == 1 {
            t.shape = vec![t.shape[0]];
        }
        Ok(t)
    }

    fn has_tensor(&self, name: &str) -> bool {
        gguf_tensor_name(name, self.config.sandwich_norms)
            .is_some_and(|g| self.file.tensor_info(&g).is_some())
    }

    fn tokenizer_source(&self) -> Result<TokenizerSource> {
        let f = &self.file;
        let model = f
            .get_str("tokenizer.ggml.model")?
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no tokenizer in the GGUF metadata",
                    f.path().display()
                ))
            })?
            .to_owned();
        let token_types = match f.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_i64().and_then(|i| i32::try_from(i).ok()))
                        .collect()
                })
                .ok_or_else(|| {
                    Error::format(
                        f.path(),
                        "metadata 'tokenizer.ggml.token_type' is not an integer array",
                    )
                })?,
        };
        let id = |key: &str| -> Option<u32> {
            f.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let scores = match f.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                .ok_or_else(|| {
                    Error::format(
                        f.path(),
                        "metadata 'tokenizer.ggml.scores' is not a number array",
                    )
                })?,
        };
        let flag = |key: &str| match f.get(key) {
            Some(MetaValue::Bool(b)) => Some(*b),
            _ => None,
        };
        let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
        Ok(TokenizerSource::Gguf(GgufVocab {
            scores,
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            model,
            pre: f.get_str("tokenizer.ggml.pre")?.map(str::to_owned),
            tokens,
            merges: f.get_str_array("tokenizer.ggml.merges")?,
            token_types,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_id: id("tokenizer.ggml.eos_token_id"),
            unknown_token_id: id("tokenizer.ggml.unknown_token_id"),
            padding_token_id: id("tokenizer.ggml.padding_token_id"),
        }))
    }

    fn chat_template(&self) -> Option<String> {
        let own = self
            .file
            .get_str("tokenizer.chat_template")
            .ok()
            .flatten()
            .map(str::to_owned);
        match own {
            None if self.config.family == Family::Gemma3 => {
                Some(crate::tokenizer::GEMMA_CHAT_TEMPLATE.to_owned())
            }
            other => other,
        }
    }

    fn identity(&self) -> String {
        let name = self
            .file
            .get_str("general.name")
            .ok()
            .flatten()
            .unwrap_or("");
        let file = self
            .file
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let c = &self.config;
        format!(
            "gguf:{file}:{name}:{}:{}x{}x{}",
            c.family.name(),
            c.num_layers,
            c.hidden_size,
            c.intermediate_size
        )
    }

    fn path(&self) -> &Path {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metadata-only GGUF with `arrays` u8 arrays of `n` entries each.
    fn arrays_file(arrays: usize, n: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((arrays as u64).to_le_bytes());
        for a in 0..arrays {
            let key = format!("junk.{a}");
            b.extend((key.len() as u64).to_le_bytes());
            b.extend(key.as_bytes());
            b.extend(9u32.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend((n as u64).to_le_bytes());
            b.extend(std::iter::repeat_n(7u8, n));
        }
        b
    }

    #[test]
    fn many_large_arrays_are_refused_before_they_multiply_memory() {
        let path = Path::new("arrays.gguf");
        let ok = crate::kernels::map_bytes(&arrays_file(2, 1000)).unwrap();
        assert!(GgufFile::parse(path, ok).is_ok());
        // Each array is under the per-array cap; together they pass the per-file one.
        let n = (MAX_ARRAY_LEN - 1) as usize;
        let bytes = arrays_file(3, n);
        let e = GgufFile::parse(path, crate::kernels::map_bytes(&bytes).unwrap())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("entries in all") && e.contains("junk.2"), "{e}");
    }
}
