//! Synthetic checkpoints: HuggingFace directories with seeded random weights of a real
//! model's shape (Llama-3.2-1B, Llama-3.2-3B), for benchmarks at realistic sizes. The
//! weights are meaningless; the bytes a decode step reads are real.
//!
//! Written tensor by tensor through a buffered writer (never the whole model in memory),
//! into a temporary directory renamed into place at the end, so a failed run never leaves
//! a directory that looks complete.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::kernels::dot::f32_to_bf16;
use crate::kernels::f16::f32_to_f16;
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;

/// A real model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthShape {
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

pub const LLAMA_3_2_1B: SynthShape = SynthShape {
    name: "llama-3.2-1b",
    hidden: 2048,
    intermediate: 8192,
    layers: 16,
    heads: 32,
    kv_heads: 8,
    vocab: 128256,
};

pub const LLAMA_3_2_3B: SynthShape = SynthShape {
    name: "llama-3.2-3b",
    hidden: 3072,
    intermediate: 8192,
    layers: 28,
    heads: 24,
    kv_heads: 8,
    vocab: 128256,
};

impl std::str::FromStr for SynthShape {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "llama-3.2-1b" => Ok(LLAMA_3_2_1B),
            "llama-3.2-3b" => Ok(LLAMA_3_2_3B),
            _ => Err(format!(
                "unknown shape '{s}' (expected llama-3.2-1b or llama-3.2-3b)"
            )),
        }
    }
}

impl SynthShape {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// (name, [rows, cols]) of every tensor, in file order. Tied embeddings (as the real
    /// 1B and 3B models): no lm_head.
    pub fn tensors(&self) -> Vec<(String, [usize; 2])> {
        let (h, i, kv) = (
            self.hidden,
            self.intermediate,
            self.kv_heads * self.head_dim(),
        );
        let mut t = vec![("model.embed_tokens.weight".to_owned(), [self.vocab, h])];
        for l in 0..self.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            t.push((p("input_layernorm"), [1, h]));
            t.push((p("self_attn.q_proj"), [h, h]));
            t.push((p("self_attn.k_proj"), [kv, h]));
            t.push((p("self_attn.v_proj"), [kv, h]));
            t.push((p("self_attn.o_proj"), [h, h]));
            t.push((p("post_attention_layernorm"), [1, h]));
            t.push((p("mlp.gate_proj"), [i, h]));
            t.push((p("mlp.up_proj"), [i, h]));
            t.push((p("mlp.down_proj"), [h, i]));
        }
        t.push(("model.norm.weight".to_owned(), [1, h]));
        t
    }

    fn config_json(&self, dtype: DType) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192
            },
            "max_position_embeddings": 131072,
            "vocab_size": self.vocab,
            "tie_word_embeddings": true,
            "torch_dtype": match dtype {
                DType::F32 => "float32",
                DType::F16 => "float16",
                _ => "bfloat16",
            },
            "_sparsellm_synthetic": format!("seeded random weights of the {} shape; not a trained model", self.name),
        })
    }
}

/// xorshift64*: fast, seeded, good enough for weights nobody will read for meaning.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Roughly normal (sum of 4 uniforms), unit variance.
    fn normalish(&mut self) -> f32 {
        let r = self.next();
        let s: f32 = (0..4)
            .map(|k| ((r >> (16 * k)) & 0xffff) as f32 / 65535.0)
            .sum();
        (s - 2.0) * (3.0f32).sqrt()
    }
}

/// Writes a synthetic HuggingFace checkpoint of `shape` into `out` (which must not exist).
/// `tokenizer` is saved as its tokenizer.json (ids stay below its vocabulary).
pub fn write_checkpoint(
    shape: &SynthShape,
    dtype: DType,
    out: &Path,
    tokenizer: &Tokenizer,
    seed: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    if out.exists() {
        return Err(Error::Input(format!(
            "{} already exists; choose a new --out",
            out.display()
        )));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synth".into());
    let tmp = parent.join(format!(".{name}.part-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_into(shape, dtype, &tmp, tokenizer, seed, &mut progress);
    match result.and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_into(
    shape: &SynthShape,
    dtype: DType,
    dir: &Path,
    tokenizer: &Tokenizer,
    seed: u64,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&shape.config_json(dtype))
            .expect("json")
            .as_bytes(),
    )?;
    tokenizer.save_json(&dir.join("tokenizer.json"))?;

    // safetensors: u64 header length, JSON header (padded with spaces to 8 bytes), data.
    let (st_dtype, esize) = match dtype {
        DType::F32 => ("F32", 4),
        DType::BF16 => ("BF16", 2),
        DType::F16 => ("F16", 2),
        _ => {
            return Err(Error::Input(format!(
                "synth writes f32, bf16 or f16 weights, not {}",
                dtype.name()
            )));
        }
    };
    let tensors = shape.tensors();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, [rows, cols]) in &tensors {
        let n = rows * cols * esize;
        let shape_json = if *rows == 1 {
            serde_json::json!([cols])
        } else {
            serde_json::json!([rows, cols])
        };
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": st_dtype, "shape": shape_json, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "synthetic": "sparsellm synth" }),
    );
    let mut hjson = serde_json::to_string(&header).expect("json");
    while !hjson.len().is_multiple_of(8) {
        hjson.push(' ');
    }
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(&path, e);
    w.write_all(&(hjson.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(hjson.as_bytes()).map_err(io)?;
    let total = offset as u64;
    let mut done = 0u64;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut buf = Vec::with_capacity(1 << 16);
    for (name, [rows, cols]) in &tensors {
        let is_norm = *rows == 1;
        // Norm weights 1; matrices with std 1/sqrt(fan_in), so activations keep their scale.
        let std = 1.0 / (*cols as f32).sqrt();
        let n = rows * cols;
        let mut left = n;
        while left > 0 {
            let m = left.min(1 << 14);
            buf.clear();
            for _ in 0..m {
                let v = if is_norm { 1.0 } else { rng.normalish() * std };
                match dtype {
                    DType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    DType::F16 => buf.extend_from_slice(&f32_to_f16(v).to_le_bytes()),
                    _ => buf.extend_from_slice(&f32_to_bf16(v).to_le_bytes()),
                }
            }
            w.write_all(&buf).map_err(io)?;
            left -= m;
            done += (m * esize) as u64;
        }
        progress(done, total);
        let _ = name;
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}
