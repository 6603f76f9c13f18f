//! The model's hyper-parameters, read from GGUF metadata or a HuggingFace config.json.
//!
//! The families we run (Llama, Mistral, Qwen 2/3, Gemma 3) differ by a handful of
//! switches held here (biases, q/k norms, norm offset, sandwich norms, activation,
//! embedding scale, sliding windows with their own RoPE base, attention scale, logit
//! softcapping); one forward pass reads them.

use crate::error::{Error, Result};
pub use crate::kernels::ops::Activation;

/// How the RoPE frequencies of the (global) attention layers are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1+ (`rope_scaling.rope_type == "llama3"` in config.json).
    Llama3(Llama3RopeScaling),
    /// Positions divided by `factor` (`"linear"`; Gemma 3 4B and larger use 8).
    Linear { factor: f32 },
    /// Each frequency divided by its own factor, `[head_dim / 2]`: how GGUF files store
    /// llama3 scaling (llama.cpp's `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// How RoPE pairs the dimensions of a head.
///
/// GGUF files store the q/k projection rows permuted so that llama.cpp can rotate
/// adjacent pairs (2i, 2i+1); HuggingFace checkpoints rotate (i, i + d/2). Rather than
/// permuting rows at load (which would defeat memory-mapping), the forward pass rotates
/// the pairs the checkpoint was written for: both give the same logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): GGUF's layout.
    Interleaved,
    /// Pairs (i, i + head_dim/2): HuggingFace's "rotate_half".
    Halves,
}

/// The model family a checkpoint declares (for messages and identities; the forward pass
/// reads the switches, never this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// Scaling of the global layers' RoPE frequencies (never the sliding-window layers',
    /// as transformers and llama.cpp do for Gemma 3).
    pub rope_scaling: Option<RopeScaling>,
    pub rope_style: RopeStyle,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Biases on the q, k and v projections (Qwen 2).
    pub attention_bias: bool,
    /// RMSNorm of each query and key head (weights `[head_dim]`) before RoPE (Qwen 3,
    /// Gemma 3).
    pub qk_norm: bool,
    /// Added to every RMSNorm weight at load: Gemma's HF checkpoints store `w` for a
    /// norm that scales by `1 + w` (its GGUF files store `1 + w` already: offset 0).
    pub norm_weight_offset: f32,
    /// RMSNorms on the attention's output and on the MLP's output before each joins the
    /// residual stream (Gemma 3's post-attention and post-feed-forward norms).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// The token embedding is multiplied by this (Gemma: sqrt(hidden_size)).
    pub embedding_scale: f32,
    /// Per layer: the sliding window (positions a query sees, itself included) of a
    /// local-attention layer, None for a global one. Empty: every layer global.
    pub layer_windows: Vec<Option<usize>>,
    /// The RoPE base of the sliding-window layers, when it differs from `rope_theta`
    /// (Gemma 3: 10000 locally, 1e6 globally).
    pub rope_theta_local: Option<f32>,
    /// The factor on q·k (default 1/sqrt(head_dim); Gemma 3: query_pre_attn_scalar^-0.5).
    pub attention_scale: Option<f32>,
    /// `cap * tanh(logits / cap)` on the output logits, when set.
    pub final_logit_softcapping: Option<f32>,
}

/// Upper bounds that no real LLaMA-family model exceeds; anything larger is a corrupt or
/// hostile file and is refused before it can drive an allocation.
pub const MAX_DIM: usize = 1 << 20;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_CONTEXT: usize = 1 << 24;

impl ModelConfig {
    /// Checks that the numbers describe a model that can be run; the loaders call this
    /// before any allocation sized by the config.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_DIM),
            ("num_key_value_heads", self.num_kv_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} is out of range (1..={max})"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !(factor.is_finite() && *factor > 0.0) => {
                return bad(format!("rope scaling factor {factor} must be positive"));
            }
            Some(RopeScaling::Factors(v))
                if v.len() != self.head_dim / 2 || !v.iter().all(|f| f.is_finite() && *f > 0.0) =>
            {
                return bad(format!(
                    "RoPE frequency factors: {} positive numbers expected (head_dim / 2), got {:?}",
                    self.head_dim / 2,
                    &v[..v.len().min(8)]
                ));
            }
            _ => {}
        }
        if self
            .num_heads
            .checked_mul(self.head_dim)
            .is_none_or(|d| d > MAX_DIM)
        {
            return bad("num_attention_heads * head_dim is too large".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps = {} is not a valid epsilon",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta = {} must be positive", self.rope_theta));
        }
        if let Some(t) = self.rope_theta_local
            && !(t.is_finite() && t > 0.0)
        {
            return bad(format!("local RoPE base = {t} must be positive"));
        }
        if !self.layer_windows.is_empty() && self.layer_windows.len() != self.num_layers {
            return bad(format!(
                "{} per-layer attention types for {} layers",
                self.layer_windows.len(),
                self.num_layers
            ));
        }
        if self.layer_windows.contains(&Some(0)) {
            return bad("sliding_window = 0".into());
        }
        for (name, v) in [
            ("embedding scale", Some(self.embedding_scale)),
            ("attention scale", self.attention_scale),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return bad(format!("{name} = {v} must be positive"));
            }
        }
        if !self.norm_weight_offset.is_finite() {
            return bad("norm weight offset is not finite".into());
        }
        Ok(())
    }

    /// Layer `layer`'s sliding window (None: it attends to every position).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.layer_windows.get(layer).copied().flatten()
    }

    /// The factor on q·k.
    pub fn attention_scale(&self) -> f32 {
        self.attention_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// RoPE inverse frequencies of the sliding-window layers, when their base differs.
    pub fn rope_inv_freq_local(&self) -> Option<Vec<f32>> {
        let theta = self.rope_theta_local?;
        let mut c = self.clone();
        c.rope_theta = theta;
        // transformers' Gemma 3 applies rope_scaling to the global layers only.
        c.rope_scaling = None;
        Some(c.rope_inv_freq())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies for one head, scaled as configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / d as f64);
                match &self.rope_scaling {
                    None => f as f32,
                    Some(RopeScaling::Llama3(s)) => llama3_scale(f, s) as f32,
                    Some(RopeScaling::Linear { factor }) => (f / *factor as f64) as f32,
                    Some(RopeScaling::Factors(v)) => (f / v[i] as f64) as f32,
                }
            })
            .collect()
    }
}

/// transformers' `_compute_llama3_parameters`, one frequency at a time.
fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / s.low_freq_factor as f64;
    let high_wavelen = old_ctx / s.high_freq_factor as f64;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor as f64
    } else {
        let smooth = (old_ctx / wavelen - s.low_freq_factor as f64)
            / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
        (1.0 - smooth) * freq / s.factor as f64 + smooth * freq
    }
}
