//! Reading model checkpoints: GGUF files and HuggingFace directories, behind one seam
//! ([`WeightSource`]) that hands out tensor views borrowed from memory maps.

pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod safetensors;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// Storage type of a tensor as it lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceDType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl SourceDType {
    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            SourceDType::F32 => (1, 4),
            SourceDType::F16 | SourceDType::BF16 => (1, 2),
            q => {
                let f = q.qformat().expect("quantized");
                (f.block_elems(), f.block_bytes())
            }
        }
    }

    /// The quantized block format, if this is one.
    pub fn qformat(self) -> Option<crate::quant::QFormat> {
        use crate::quant::QFormat;
        Some(match self {
            SourceDType::F32 | SourceDType::F16 | SourceDType::BF16 => return None,
            SourceDType::Q8_0 => QFormat::Q8_0,
            SourceDType::Q4_0 => QFormat::Q4_0,
            SourceDType::Q4_1 => QFormat::Q4_1,
            SourceDType::Q5_0 => QFormat::Q5_0,
            SourceDType::Q5_1 => QFormat::Q5_1,
            SourceDType::Q2K => QFormat::Q2K,
            SourceDType::Q3K => QFormat::Q3K,
            SourceDType::Q4K => QFormat::Q4K,
            SourceDType::Q5K => QFormat::Q5K,
            SourceDType::Q6K => QFormat::Q6K,
        })
    }

    /// Bytes taken by `n` elements, or None if `n` is not a whole number of blocks or the
    /// product overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (be, bb) = self.block();
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(bb)
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceDType::F32 => "F32",
            SourceDType::F16 => "F16",
            SourceDType::BF16 => "BF16",
            SourceDType::Q8_0 => "Q8_0",
            SourceDType::Q4_0 => "Q4_0",
            SourceDType::Q4_1 => "Q4_1",
            SourceDType::Q5_0 => "Q5_0",
            SourceDType::Q5_1 => "Q5_1",
            SourceDType::Q2K => "Q2_K",
            SourceDType::Q3K => "Q3_K",
            SourceDType::Q4K => "Q4_K",
            SourceDType::Q5K => "Q5_K",
            SourceDType::Q6K => "Q6_K",
        }
    }
}

/// A tensor inside a memory-mapped file: its bytes are `map[offset..offset + len]`.
///
/// `shape` is row-major, outermost first (a linear layer's weight is `[out, in]`), for both
/// GGUF (whose on-disk dims list is fastest-first and is reversed by the reader) and
/// safetensors. The loader has checked that `offset + len` lies inside the map and that
/// `len` matches `shape` and `dtype`.
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: SourceDType,
    pub shape: Vec<usize>,
    pub map: Arc<Mmap>,
    pub offset: usize,
    pub len: usize,
    /// The file it came from, for error messages.
    pub path: PathBuf,
}

impl RawTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// An error about this tensor, naming file and tensor.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::tensor(&self.path, &self.name, msg)
    }
}

/// A checkpoint: its config, its tensors by HuggingFace name, its tokenizer.
///
/// Tensor names are HuggingFace's (`model.layers.3.mlp.gate_proj.weight`); a GGUF source
/// maps them to its own (`blk.3.ffn_gate.weight`).
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// The tensor called `name` (HF naming), or an error naming file and tensor.
    fn tensor(&self, name: &str) -> Result<RawTensor>;
    fn has_tensor(&self, name: &str) -> bool;
    /// Where the tokenizer comes from; `crate::tokenizer::Tokenizer::load` builds it.
    fn tokenizer_source(&self) -> Result<TokenizerSource>;
    /// A Jinja chat template, when the checkpoint ships one (GGUF
    /// `tokenizer.chat_template`, or tokenizer_config.json's `chat_template`).
    fn chat_template(&self) -> Option<String>;
    /// What to call this model in reports and predictor files (file name, architecture).
    fn identity(&self) -> String;
    fn path(&self) -> &Path;
}

/// Where a tokenizer is built from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// A HuggingFace tokenizer.json.
    Json(PathBuf),
    /// A vocabulary in GGUF metadata (`tokenizer.ggml.*`).
    Gguf(GgufVocab),
}

/// The `tokenizer.ggml.*` metadata of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" for byte-level BPE, "llama" for SentencePiece.
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer ("smollm", "llama-bpe", ...).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.scores` (SentencePiece: the merge priority of each token).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_bos_token`: whether a prompt starts with BOS.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece: a space before the text).
    pub add_space_prefix: Option<bool>,
}

/// Opens a GGUF file or a HuggingFace directory, deciding by what `path` is.
pub fn open(path: &Path) -> Result<Box<dyn WeightSource>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        Ok(Box::new(hf::HfModel::open(path)?))
    } else {
        Ok(Box::new(gguf::GgufModel::open(path)?))
    }
}

pub use crate::kernels::map_file;
