//! The LLaMA-family forward pass: embedding, then per layer RMSNorm, attention with RoPE
//! and grouped-query heads over the KV cache, RMSNorm, gated MLP; final norm and output
//! head. The families' differences (q/k/v biases, q/k norms, sandwich norms, GeGLU,
//! embedding scale, sliding windows with their own RoPE base: see [`ModelConfig`]) are
//! switches read here, in the one pass.
//!
//! One `forward` serves decode (one token: matrix-vector kernels) and prefill (many tokens:
//! matrix-matrix kernels). Weight names mirror the HuggingFace checkpoint's.

use crate::error::{Error, Result};
use crate::kernels::input_major::{
    InputMajorScratch, matmul_input_major, matvec_input_major, matvec_input_major_group,
};
use crate::kernels::ops::{self, RopeTable};
use crate::kernels::qcols::{QColMatrix, matmul_group_pool, matvec_group_pool};
use crate::kernels::{self, ThreadPool, WeightView};
use crate::loader::WeightSource;
use crate::model::config::{Activation, ModelConfig, RopeStyle};
use crate::model::kv_cache::{KvCache, KvDType};
use crate::profile::{ForwardTimer, Phase};
use crate::tensor::{DType, LoadDType, Matrix, WeightPlan};

/// How a layer's projection matrices are held: chosen at load by the sparsity strategy,
/// one copy per matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// `[out, in]` as the checkpoint stores it: a row per output (dense decode, and the
    /// MLP-neuron sparsity, which selects rows of gate/up).
    #[default]
    RowMajor,
    /// `[in, out]`: a row per input, so that input sparsity (TEAL/WINA) reads only the
    /// rows of the inputs it keeps. Float dtypes and Q8_0; Q4_0 and Q4_1 blocks are held
    /// by input column instead, losslessly ([`crate::kernels::qcols`]).
    InputMajor,
    /// Row-major, except the MLP's down projection held input-major (`[inter, hidden]`,
    /// a row per neuron): the rows the MLP-neuron sparse modes read, so that they need no
    /// copy of their own. Float dtypes move bit for bit; Q4_0 and Q4_1 down projections
    /// are held by input column (losslessly, [`crate::kernels::qcols`]), and the sparse
    /// modes compute them over the active neurons. Other quantized down projections stay
    /// row-major (a re-quantized copy would change the dense model), and the sparse modes
    /// keep their Q8_0 copy.
    DownInputMajor,
}

/// How the loader holds one planned matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    AsStored,
    /// Transposed into the weight arena (`Linear::input_major`).
    Transposed,
    /// Q4_0/Q4_1 repacked by input column (`Linear::by_column`).
    ByColumn,
}

/// A linear layer `y = x · W^T` with `W: [out, in]`, held as `W` (`weight` is `[out, in]`)
/// or input-major (`weight` is `W^T`, `[in, out]`; see [`WeightLayout`]).
pub struct Linear {
    pub weight: Matrix,
    pub input_major: bool,
    /// Q4_0/Q4_1 blocks held by input column: the products run on this, and `weight` (the
    /// file's row-major blocks, memory-mapped, pages released) is read only by code that
    /// wants one output's row.
    pub by_column: Option<QColMatrix>,
}

impl Linear {
    /// Whether the layer computes over a subset of its inputs (input sparsity).
    pub fn takes_kept(&self) -> bool {
        self.input_major || self.by_column.is_some()
    }

    /// `outs[m] = x · lins[m]^T` over the inputs `kept` for layers that share one input
    /// (q/k/v, gate/up), when every one is held by column (the input prepared once per
    /// token and one pool job per token for all of them), or input-major in bf16 for one
    /// token (one pool job, `matvec_input_major_group`). Returns false (nothing done)
    /// otherwise.
    pub fn project_group(
        pool: &ThreadPool,
        lins: &[&Linear],
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        kept: Option<&[u32]>,
        scratch: &mut InputMajorScratch,
    ) -> bool {
        if n == 1 && lins.iter().all(|l| l.input_major) {
            let ws: Vec<_> = lins
                .iter()
                .map(|l| (l.weight.view(), l.weight.cols))
                .collect();
            let in_dim = lins[0].weight.rows;
            return lins.iter().all(|l| l.weight.rows == in_dim)
                && matvec_input_major_group(pool, &ws, in_dim, &x[..in_dim], kept, outs, scratch);
        }
        let Some(mats) = lins
            .iter()
            .map(|l| l.by_column.as_ref())
            .collect::<Option<Vec<&QColMatrix>>>()
        else {
            return false;
        };
        assert!(kept.is_none() || n == 1, "input sparsity needs one token");
        if n != 1 {
            matmul_group_pool(
                pool,
                &mats,
                &x[..n * mats[0].in_dim()],
                n,
                outs,
                scratch.qcols(),
            );
            return true;
        }
        let x = &x[..mats[0].in_dim()];
        matvec_group_pool(pool, &mats, x, kept, outs, scratch.qcols());
        true
    }

    pub fn out_features(&self) -> usize {
        if self.input_major {
            self.weight.cols
        } else {
            self.weight.rows
        }
    }
    pub fn in_features(&self) -> usize {
        if self.input_major {
            self.weight.rows
        } else {
            self.weight.cols
        }
    }

    /// x: [n, in] -> out: [n, out].
    pub fn forward(&self, pool: &ThreadPool, x: &[f32], n: usize, out: &mut [f32]) {
        let w = &self.weight;
        if self.by_column.is_some() {
            self.project(pool, x, n, out, None, &mut InputMajorScratch::default());
        } else if self.input_major {
            matmul_input_major(pool, w.view(), w.rows, w.cols, x, n, out);
        } else {
            kernels::matmul(pool, w.view(), w.rows, w.cols, x, n, out);
        }
    }

    /// The weights and output count, as [`kernels::matmul_many`] takes them (row-major).
    fn ws(&self) -> (WeightView<'_>, usize) {
        (self.weight.view(), self.weight.rows)
    }

    /// Row `r` of `W` (output r's weights, `[in]`) widened to f32, whatever the layout.
    pub fn output_row_to_f32(&self, r: usize, out: &mut [f32]) {
        if self.input_major {
            let mut row = vec![0f32; self.weight.cols];
            for (i, o) in out.iter_mut().enumerate().take(self.weight.rows) {
                self.weight.row_to_f32(i, &mut row);
                *o = row[r];
            }
        } else {
            self.weight.row_to_f32(r, out);
        }
    }

    /// As [`forward`](Self::forward), over the inputs `kept` only (ascending indices; one
    /// token, input-major weights) when given.
    pub fn project(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        kept: Option<&[u32]>,
        scratch: &mut InputMajorScratch,
    ) {
        let w = &self.weight;
        if let Some(c) = &self.by_column {
            let s = scratch.qcols();
            match kept {
                Some(kept) => {
                    assert_eq!(n, 1, "input sparsity needs one token");
                    c.matvec_pool(pool, x, Some(kept), out, s);
                }
                None => {
                    let (i, o) = (c.in_dim(), c.out_dim());
                    matmul_group_pool(pool, &[c], &x[..n * i], n, &mut [&mut out[..n * o]], s);
                }
            }
            return;
        }
        match kept {
            Some(kept) => {
                assert!(
                    self.input_major && n == 1,
                    "input sparsity needs one token and input-major weights"
                );
                matvec_input_major(pool, w.view(), w.rows, w.cols, x, Some(kept), out, scratch);
            }
            None if self.input_major && n == 1 => {
                matvec_input_major(pool, w.view(), w.rows, w.cols, x, None, out, scratch)
            }
            None => self.forward(pool, x, n, out),
        }
    }
}

/// [`Llama::identity`] from the file: FNV-1a over the bf16 bits of the first 64 weights
/// of the first 4 rows of layer 0's gate and of the last layer's down projection.
fn source_identity(src: &dyn WeightSource, c: &ModelConfig) -> Result<String> {
    let mut hash: u64 = 0xcbf29ce484222325;
    let last = c.num_layers - 1;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    for (name, shape) in [
        ("model.layers.0.mlp.gate_proj.weight".to_string(), [i, h]),
        (format!("model.layers.{last}.mlp.down_proj.weight"), [h, i]),
    ] {
        let raw = src.tensor(&name)?;
        // Checked here too, so that this never depends on the caller's checks.
        if raw.shape != shape {
            return Err(raw.error(format!("shape {:?}, expected {shape:?}", raw.shape)));
        }
        let (rows, cols) = (shape[0].min(4), shape[1]);
        let len = raw
            .dtype
            .bytes_for(rows * cols)
            .filter(|&l| l <= raw.len)
            .ok_or_else(|| raw.error("rows are not whole blocks".to_string()))?;
        let mut values = vec![0f32; rows * cols];
        crate::quant::dequantize(raw.dtype, &raw.bytes()[..len], &mut values);
        for row in values.chunks_exact(cols) {
            for &v in &row[..cols.min(64)] {
                for byte in kernels::dot::f32_to_bf16(v).to_le_bytes() {
                    hash = (hash ^ byte as u64).wrapping_mul(0x100000001b3);
                }
            }
        }
    }
    Ok(format!(
        "llama-h{}-i{}-l{}-v{}-{hash:016x}",
        c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    ))
}

/// The groups of projections that share an input, the unit of input sparsity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputGroup {
    /// q, k and v: the attention norm's output.
    Qkv = 0,
    /// o: the attention's output.
    O = 1,
    /// gate and up: the MLP norm's output.
    GateUp = 2,
    /// down: `silu(g)·u`.
    Down = 3,
}

impl InputGroup {
    pub const ALL: [InputGroup; 4] = [
        InputGroup::Qkv,
        InputGroup::O,
        InputGroup::GateUp,
        InputGroup::Down,
    ];
    pub fn name(self) -> &'static str {
        match self {
            InputGroup::Qkv => "qkv",
            InputGroup::O => "o",
            InputGroup::GateUp => "gate_up",
            InputGroup::Down => "down",
        }
    }
}

/// Which inputs of a projection group to use (see [`MlpOverride::input_mask`]).
pub enum InputMask<'a> {
    /// Every input (or, for several tokens, the input as the hook left it).
    Dense,
    /// One token: only these inputs (ascending).
    Kept(&'a [u32]),
}

impl InputMask<'_> {
    fn kept(&self) -> Option<&[u32]> {
        match self {
            InputMask::Dense => None,
            InputMask::Kept(k) => Some(k),
        }
    }
}

/// A 1-D tensor of `n` elements (a norm's weight, a bias) widened to f32.
fn load_vector(src: &dyn WeightSource, name: &str, n: usize) -> Result<Vec<f32>> {
    let raw = src.tensor(name)?;
    if raw.numel() != n || raw.shape.len() != 1 {
        return Err(raw.error(format!("shape {:?}, expected [{n}]", raw.shape)));
    }
    Ok(Matrix::from_raw(&raw, 1, n, DType::F32)?.to_f32_vec())
}

/// An RMSNorm weight, with the config's offset added (Gemma's `1 + w`).
fn load_norm(src: &dyn WeightSource, name: &str, n: usize, offset: f32) -> Result<Vec<f32>> {
    let mut w = load_vector(src, name, n)?;
    if offset != 0.0 {
        w.iter_mut().for_each(|v| *v += offset);
    }
    Ok(w)
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// q/k/v biases (`attention_bias`), each `[out]`.
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of queries and keys (`qk_norm`), `[head_dim]`.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Activation,
}

impl Mlp {
    /// Dense gated MLP: h: [n, hidden] -> out: [n, hidden].
    pub fn forward(&self, pool: &ThreadPool, h: &[f32], n: usize, out: &mut [f32]) {
        let inter = self.gate_proj.out_features();
        let mut g = vec![0f32; n * inter];
        let mut u = vec![0f32; n * inter];
        self.gate_proj.forward(pool, h, n, &mut g);
        self.up_proj.forward(pool, h, n, &mut u);
        ops::act_mul_par(pool, self.activation, &mut g, &u);
        self.down_proj.forward(pool, &g, n, out);
    }
}

pub struct Layer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    /// The norm of the attention's output before the residual add (`sandwich_norms`;
    /// Gemma's `post_attention_layernorm`).
    pub attn_output_norm: Option<Vec<f32>>,
    /// The MLP's input norm (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: Mlp,
    /// The norm of the MLP's output before the residual add (Gemma's
    /// `post_feedforward_layernorm`).
    pub mlp_output_norm: Option<Vec<f32>>,
}

/// What `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Logits of the last position only: [vocab] (generation).
    Last,
    /// Logits of every position: [n, vocab] (evaluation).
    All,
    /// No logits (filling the cache).
    None,
}

/// The hooks of a sparse mode into the forward pass: replacing a layer's dense MLP (the
/// neuron-sparse MLP), or choosing the inputs of each projection group (input sparsity,
/// which needs input-major weights).
pub trait MlpOverride {
    /// Computes layer `layer`'s MLP for `h` ([n, hidden]) into `out`; returns false to
    /// fall back to the dense MLP (the default: a hook that only chooses inputs).
    fn forward(
        &mut self,
        _model: &Llama,
        _layer: usize,
        _h: &[f32],
        _n: usize,
        _out: &mut [f32],
    ) -> bool {
        false
    }

    /// Input sparsity: the inputs of projection group `group` of `layer` to use, given
    /// that group's input `x` ([n, width]). For one token it may return the kept inputs;
    /// for several it may zero the dropped entries of each row in place (the masked
    /// product, which equals the kept-input product up to summation order). Called only
    /// for input-major models.
    fn input_mask(
        &mut self,
        _layer: usize,
        _group: InputGroup,
        _x: &mut [f32],
        _n: usize,
    ) -> InputMask<'_> {
        InputMask::Dense
    }

    /// Whether [`input_mask`](Self::input_mask) may change inputs (then the forward pass
    /// gives it every group's input, and does not fuse what would hide one).
    fn masks_inputs(&self) -> bool {
        false
    }
}

/// One sequence's part of a batched decode step ([`Llama::forward_batch`]).
pub struct BatchItem<'a> {
    /// The sequence's next token.
    pub token: u32,
    /// The sequence's cache; the token goes at position `cache.len()`.
    pub cache: &'a mut KvCache,
}

pub struct Llama {
    pub config: ModelConfig,
    /// What the weights were loaded as (`native`: each as the file stores it).
    pub dtype: LoadDType,
    pub embed_tokens: Matrix,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// None when tied to the embedding.
    pub lm_head: Option<Linear>,
    inv_freq: Vec<f32>,
    /// The sliding-window layers' RoPE frequencies, when their base differs.
    inv_freq_local: Option<Vec<f32>>,
    /// A fingerprint of the file's weights (see [`Llama::identity`]).
    identity: String,
    pub pool: &'static ThreadPool,
    /// The element type of the KV caches [`Llama::new_cache`] makes (f32 unless set).
    pub kv_dtype: KvDType,
}

impl Llama {
    /// Loads every weight of `src` as `dtype` asks, checking each shape against the config.
    pub fn load(
        src: &dyn WeightSource,
        dtype: impl Into<LoadDType>,
        pool: &'static ThreadPool,
    ) -> Result<Llama> {
        Llama::load_with_layout(src, dtype, pool, WeightLayout::RowMajor)
    }

    /// As [`load`](Self::load), with the layers' projections held in `layout` (the
    /// embedding and the output head stay row-major).
    pub fn load_with_layout(
        src: &dyn WeightSource,
        dtype: impl Into<LoadDType>,
        pool: &'static ThreadPool,
        layout: WeightLayout,
    ) -> Result<Llama> {
        let dtype = dtype.into();
        let c = src.config().clone();
        c.validate()?;
        let input_major = layout == WeightLayout::InputMajor;
        let down_input_major = layout == WeightLayout::DownInputMajor;
        let (h, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut plan = WeightPlan::default();
        let mut add = |name: &str, rows: usize, cols: usize, transpose: bool| -> Result<Held> {
            let raw = src.tensor(name)?;
            if raw.shape != [rows, cols] {
                return Err(raw.error(format!("shape {:?}, expected [{rows}, {cols}]", raw.shape)));
            }
            let held = dtype.resolve(raw.dtype);
            let by_column = matches!(held, DType::Q4_0 | DType::Q4_1) && rows.is_multiple_of(32);
            // DownInputMajor asks for a float down projection or a Q4 one held by column
            // (see there): other blocks stay as stored (the MLP-neuron modes copy them).
            let transpose =
                transpose && !(down_input_major && held.qformat().is_some() && !by_column);
            if transpose && by_column {
                // Held by input column, the same numbers (`kernels::qcols`); the file's
                // pages are released as each matrix is repacked, so that the load's peak
                // holds one matrix twice, not all of them.
                plan.add(raw, rows, cols, held)?;
                return Ok(Held::ByColumn);
            }
            if transpose {
                // Q8_0 is re-quantized along the inputs' rows at +0.35% perplexity; 5-bit
                // blocks would cost x1.06 that way, and skipping whole blocks in place x5
                // (docs/sparsity.md), so those are refused.
                if held.qformat().is_some() && held != DType::Q8_0 {
                    return Err(Error::Input(format!(
                        "input sparsity needs float, q8_0, q4_0 or q4_1 weights, but {name} \
                         would be held as {} (--dtype {}): use --dtype bf16, f32 or f16",
                        held.name(),
                        dtype.name()
                    )));
                }
                plan.add_transposed(raw, rows, cols, held)?;
                Ok(Held::Transposed)
            } else {
                plan.add(raw, rows, cols, held)?;
                Ok(Held::AsStored)
            }
        };
        add("model.embed_tokens.weight", c.vocab_size, h, false)?;
        const PARTS: [&str; 7] = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        let dims = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
        // Whether each planned matrix is held transposed, in plan order.
        let mut transposed = vec![Held::AsStored];
        for l in 0..c.num_layers {
            for (part, (rows, cols)) in PARTS.iter().zip(dims) {
                let down = *part == "mlp.down_proj";
                transposed.push(add(
                    &format!("model.layers.{l}.{part}.weight"),
                    rows,
                    cols,
                    input_major || (down_input_major && down),
                )?);
            }
        }
        let untied_head = src.has_tensor("lm_head.weight");
        if untied_head {
            transposed.push(add("lm_head.weight", c.vocab_size, h, false)?);
        } else if !c.tie_word_embeddings {
            return Err(Error::tensor(
                src.path(),
                "lm_head.weight",
                "missing, and the embeddings are not tied",
            ));
        }
        // After every tensor's checks (their errors come first), before the plan converts
        // anything: the pages this reads are then released with the rest of their matrix's.
        let identity = source_identity(src, &c)?;
        let mut mats = plan.finish(pool)?.into_iter().zip(transposed);
        let mut next = || {
            let (weight, held) = mats.next().expect("one matrix per planned tensor");
            let by_column = (held == Held::ByColumn).then(|| {
                let m = match weight.view() {
                    WeightView::Quant(fmt, bytes) => QColMatrix::from_row_major(
                        fmt,
                        bytes,
                        weight.rows,
                        weight.cols,
                        pool.threads(),
                    ),
                    _ => unreachable!("only Q4_0/Q4_1 are held by column"),
                };
                // The rows are not read again.
                weight.release_file_pages();
                m
            });
            Linear {
                weight,
                input_major: held == Held::Transposed,
                by_column,
            }
        };
        let embed_tokens = next().weight;
        let mut layers = Vec::with_capacity(c.num_layers);
        let off = c.norm_weight_offset;
        let d = c.head_dim;
        for l in 0..c.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            let bias = |s: &str, n: usize| -> Result<Option<Vec<f32>>> {
                c.attention_bias
                    .then(|| load_vector(src, &format!("model.layers.{l}.self_attn.{s}.bias"), n))
                    .transpose()
            };
            let qk_norm = |s: &str| -> Result<Option<Vec<f32>>> {
                c.qk_norm
                    .then(|| load_norm(src, &p(&format!("self_attn.{s}")), d, off))
                    .transpose()
            };
            let sandwich = |s: &str| -> Result<Option<Vec<f32>>> {
                c.sandwich_norms
                    .then(|| load_norm(src, &p(s), h, off))
                    .transpose()
            };
            let self_attn = Attention {
                q_proj: next(),
                k_proj: next(),
                v_proj: next(),
                o_proj: next(),
                q_bias: bias("q_proj", q)?,
                k_bias: bias("k_proj", kv)?,
                v_bias: bias("v_proj", kv)?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
            };
            let mlp = Mlp {
                gate_proj: next(),
                up_proj: next(),
                down_proj: next(),
                activation: c.activation,
            };
            // Gemma names its MLP input norm `pre_feedforward_layernorm` and uses
            // `post_attention_layernorm` for the attention's output.
            let (mlp_in, attn_out) = if c.sandwich_norms {
                (
                    "pre_feedforward_layernorm",
                    sandwich("post_attention_layernorm")?,
                )
            } else {
                ("post_attention_layernorm", None)
            };
            layers.push(Layer {
                input_layernorm: load_norm(src, &p("input_layernorm"), h, off)?,
                self_attn,
                attn_output_norm: attn_out,
                post_attention_layernorm: load_norm(src, &p(mlp_in), h, off)?,
                mlp,
                mlp_output_norm: sandwich("post_feedforward_layernorm")?,
            });
        }
        let lm_head = untied_head.then(&mut next);
        let norm = load_norm(src, "model.norm.weight", h, off)?;
        Ok(Llama {
            identity,
            kv_dtype: KvDType::F32,
            inv_freq: c.rope_inv_freq(),
            inv_freq_local: c.rope_inv_freq_local(),
            norm,
            config: c,
            dtype,
            embed_tokens,
            layers,
            lm_head,
            pool,
        })
    }

    /// A string naming the model's shape and (by a fingerprint of a few MLP rows as the
    /// file stores them, rounded to bf16) its weights, e.g.
    /// `llama-h576-i1536-l30-v49152-3f9a0c1d2e4b5a69`: the same for every dtype and
    /// layout the file is loaded in (a Q8_0 file held input-major is re-quantized, yet
    /// the same model), so a predictor fitted to one load serves the others, and is
    /// refused by any other model.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How the layers' projections are held.
    pub fn layout(&self) -> WeightLayout {
        match self.layers.first() {
            Some(l) if l.self_attn.q_proj.takes_kept() => WeightLayout::InputMajor,
            Some(l) if l.mlp.down_proj.takes_kept() => WeightLayout::DownInputMajor,
            _ => WeightLayout::RowMajor,
        }
    }

    /// An empty KV cache for one sequence, of [`Llama::kv_dtype`] elements.
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_dtype(self.config.num_layers, self.config.kv_dim(), self.kv_dtype)
    }

    /// Bytes of keys and values one position takes in the caches [`Llama::new_cache`]
    /// makes (every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.config.num_layers * self.config.kv_dim() * 2 * self.kv_dtype.size()
    }

    /// Bytes of weights one decode step reads: every layer, the final norm and the output
    /// head (the embedding row read is negligible; a tied head reads the embedding).
    pub fn weight_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .iter()
                .map(|x| x.weight.byte_len())
                .sum::<usize>()
            })
            .sum();
        layers + self.head().byte_len()
    }

    /// Total bytes of all weights held.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes_per_token()
            + if self.lm_head.is_some() {
                self.embed_tokens.byte_len()
            } else {
                0
            }
    }

    fn head(&self) -> &Matrix {
        self.lm_head
            .as_ref()
            .map(|l| &l.weight)
            .unwrap_or(&self.embed_tokens)
    }

    /// One decode step for several sequences at once (continuous batching): each item's
    /// token at position `item.cache.len()`, appended to its own cache. Returns the
    /// logits `[items.len(), vocab]`, row b for item b.
    ///
    /// Each row equals what [`forward`](Self::forward) of that token alone on that cache
    /// returns, bit for bit, whatever else is in the batch: a request's greedy output
    /// never depends on what runs beside it.
    ///
    /// With row-major weights the batch is one pass: each tile of weight rows is read
    /// from memory once for all B tokens by kernels whose per-token products equal
    /// decode's bit for bit ([`kernels::matmul_per_token`]), and attention runs per
    /// sequence over its own cache in one pool job. A sparse hook chooses weights per
    /// token, and input-major weights serve it, so those batches run sequence by
    /// sequence (the same results, without the shared weight read).
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem<'_>],
        mut hook: Option<&mut (dyn MlpOverride + '_)>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        for item in items.iter() {
            self.check_input(&[item.token], item.cache.len())?;
        }
        if items.len() <= 1 || hook.is_some() || !self.batches_in_one_pass() {
            let mut out = Vec::with_capacity(items.len() * c.vocab_size);
            for item in items.iter_mut() {
                let h = hook.as_deref_mut();
                out.extend(self.forward(&[item.token], item.cache, Logits::Last, h)?);
            }
            return Ok(out);
        }
        let tokens: Vec<u32> = items.iter().map(|i| i.token).collect();
        let mut scratch = std::mem::take(&mut items[0].cache.scratch);
        let out = self.forward_layers(
            &tokens,
            &mut Seqs::Many(items),
            Logits::All,
            None,
            &mut scratch,
        );
        items[0].cache.scratch = scratch;
        Ok(out)
    }

    /// Whether [`forward_batch`](Self::forward_batch) without a hook runs a batch as one
    /// pass (row-major weights).
    pub fn batches_in_one_pass(&self) -> bool {
        self.layout() == WeightLayout::RowMajor
    }

    /// Runs `tokens` at positions `cache.len()..`, appending to the cache.
    ///
    /// Returns the logits asked for (see [`Logits`]); `mlp` may replace the dense MLP.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        mlp: Option<&mut (dyn MlpOverride + '_)>,
    ) -> Result<Vec<f32>> {
        self.check_input(tokens, cache.len())?;
        // The working buffers live in the cache between calls (see `Scratch`).
        let mut scratch = std::mem::take(&mut cache.scratch);
        let out = self.forward_layers(tokens, &mut Seqs::One(cache), logits, mlp, &mut scratch);
        cache.scratch = scratch;
        Ok(out)
    }

    /// An error unless `tokens` are in the vocabulary and fit the context after `start`
    /// positions.
    fn check_input(&self, tokens: &[u32], start: usize) -> Result<()> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Input("no tokens to process".into()));
        }
        if start + n > c.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {} tokens exceeds the model's context of {} tokens",
                start + n,
                c.max_position_embeddings
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Input(format!(
                "token id {id} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        Ok(())
    }

    fn forward_layers(
        &self,
        tokens: &[u32],
        seqs: &mut Seqs<'_, '_>,
        logits: Logits,
        mut mlp: Option<&mut (dyn MlpOverride + '_)>,
        s: &mut Scratch,
    ) -> Vec<f32> {
        let c = &self.config;
        let n = tokens.len();
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let kv_dim = c.kv_dim();
        let pool = self.pool;
        let inter = c.intermediate_size;
        let timer = ForwardTimer::start(n);
        let masks = mlp.as_deref().is_some_and(|o| o.masks_inputs());
        // A batch of sequences: every product as decode computes it, token by token.
        let per_token = matches!(seqs, Seqs::Many(_));
        let Scratch {
            x,
            xn,
            q,
            att,
            tmp,
            normed,
            g,
            u,
            hp,
            rope,
            rope_local,
            im,
            k_new,
            v_new,
        } = s;
        let x = grow(x, n * h);
        let xn = grow(xn, n * h);
        let q = grow(q, n * c.q_dim());
        let att = grow(att, n * c.q_dim());
        let tmp = grow(tmp, n * h);
        for (t, &id) in tokens.iter().enumerate() {
            let row = &mut x[t * h..(t + 1) * h];
            self.embed_tokens.row_to_f32(id as usize, row);
            if c.embedding_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embedding_scale);
            }
        }
        let interleaved = c.rope_style == RopeStyle::Interleaved;
        let mut fill_rope = |table: &mut RopeTable, inv_freq: &[f32]| match seqs {
            Seqs::One(cache) => table.fill(inv_freq, cache.len(), n, interleaved),
            Seqs::Many(items) => {
                table.fill_positions(inv_freq, items.iter().map(|i| i.cache.len()), interleaved)
            }
        };
        fill_rope(rope, &self.inv_freq);
        if let Some(f) = &self.inv_freq_local {
            fill_rope(rope_local, f);
        }
        timer.end(Phase::Embed);
        for (li, layer) in self.layers.iter().enumerate() {
            // The previous layer's MLP output (in `tmp`) joins the residual stream here,
            // fused with this layer's first norm.
            if li == 0 {
                ops::rmsnorm_rows(pool, x, &layer.input_layernorm, eps, xn);
            } else {
                ops::add_rmsnorm_rows(pool, x, tmp, &layer.input_layernorm, eps, xn);
            }
            timer.end(Phase::Norm);
            let a = &layer.self_attn;
            // One sequence's keys and values go straight into its cache's new rows (a
            // batch's wait in `k_new`, `v_new` for their caches); the three projections
            // share their input (one pool job for bf16 weights).
            let (k, v) = match seqs {
                Seqs::One(cache) => cache.append_rows(li, n),
                Seqs::Many(_) => (grow(k_new, n * kv_dim), grow(v_new, n * kv_dim)),
            };
            if a.q_proj.takes_kept() {
                let mask = input_mask(&mut mlp, li, InputGroup::Qkv, xn, n);
                timer.end(Phase::Threshold);
                let kept = mask.kept();
                // Several tokens of bf16: one packed job for the three (as row-major).
                let packed = match [&a.q_proj, &a.k_proj, &a.v_proj].map(|l| l.weight.view()) {
                    [
                        WeightView::Bf16(wq),
                        WeightView::Bf16(wk),
                        WeightView::Bf16(wv),
                    ] if n > 1 => {
                        let ws = [(wq, q.len() / n), (wk, k.len() / n), (wv, v.len() / n)];
                        kernels::linear::matmul_input_major_bf16(
                            pool,
                            &ws,
                            h,
                            xn,
                            n,
                            &mut [&mut *q, &mut *k, &mut *v],
                        )
                    }
                    _ => false,
                };
                if !packed
                    && !Linear::project_group(
                        pool,
                        &[&a.q_proj, &a.k_proj, &a.v_proj],
                        xn,
                        n,
                        &mut [&mut *q, &mut *k, &mut *v],
                        kept,
                        im,
                    )
                {
                    a.q_proj.project(pool, xn, n, q, kept, im);
                    a.k_proj.project(pool, xn, n, k, kept, im);
                    a.v_proj.project(pool, xn, n, v, kept, im);
                }
            } else {
                row_major_mask(&mut mlp, li, InputGroup::Qkv, xn, n);
                let ws =
                    [&a.q_proj, &a.k_proj, &a.v_proj].map(|l| (l.weight.view(), l.weight.rows));
                matmul_many(
                    pool,
                    per_token,
                    &ws,
                    h,
                    xn,
                    n,
                    &mut [&mut *q, &mut *k, &mut *v],
                );
            }
            add_bias(q, a.q_bias.as_deref());
            add_bias(k, a.k_bias.as_deref());
            add_bias(v, a.v_bias.as_deref());
            timer.end(Phase::Qkv);
            let window = c.window(li);
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                ops::rmsnorm_heads(pool, q, qn, eps);
                ops::rmsnorm_heads(pool, k, kn, eps);
            }
            let table = match (window, &self.inv_freq_local) {
                (Some(_), Some(_)) => &*rope_local,
                _ => &*rope,
            };
            ops::rope_rows(pool, table, q, k, n);
            timer.end(Phase::Rope);
            let shape = |n, start| kernels::attention::Shape {
                n,
                start,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                d: c.head_dim,
                window: window.unwrap_or(usize::MAX),
                scale: c.attention_scale(),
            };
            match seqs {
                Seqs::One(cache) => {
                    let start = cache.len();
                    cache.seal(li);
                    let (kc, vc) = cache.layer(li);
                    kernels::attention::attend_kv(pool, q, kc, vc, shape(n, start), att);
                }
                Seqs::Many(items) => {
                    for (b, item) in items.iter_mut().enumerate() {
                        let rows = b * kv_dim..(b + 1) * kv_dim;
                        item.cache.append(li, &k_new[rows.clone()], &v_new[rows]);
                    }
                    let seqs: Vec<_> = items.iter().map(|i| i.cache.layer(li)).collect();
                    kernels::attention::attend_sequences(pool, q, &seqs, shape(1, 0), att);
                }
            }
            timer.end(Phase::Attention);
            if a.o_proj.takes_kept() {
                let mask = input_mask(&mut mlp, li, InputGroup::O, att, n);
                timer.end(Phase::Threshold);
                a.o_proj.project(pool, att, n, tmp, mask.kept(), im);
            } else {
                row_major_mask(&mut mlp, li, InputGroup::O, att, n);
                matmul_many(
                    pool,
                    per_token,
                    &[a.o_proj.ws()],
                    c.q_dim(),
                    att,
                    n,
                    &mut [tmp],
                );
            }
            timer.end(Phase::OProj);
            if let Some(w) = &layer.attn_output_norm {
                norm_in_place(pool, tmp, w, eps, grow(normed, n * h));
            }
            ops::add_rmsnorm_rows(pool, x, tmp, &layer.post_attention_layernorm, eps, xn);
            timer.end(Phase::Norm);
            let done = match mlp.as_deref_mut() {
                Some(o) => o.forward(self, li, xn, n, tmp),
                None => false,
            };
            let m = &layer.mlp;
            if done {
                // The override charges its own phases (the sparse MLP's scorer,
                // threshold, ...); what it spent outside them lands here.
                timer.end(Phase::MlpOther);
            } else if !masks
                && !per_token
                && m.activation == Activation::Silu
                && kernels::linear::swiglu_packed(
                    pool,
                    m.gate_proj.weight.view(),
                    m.up_proj.weight.view(),
                    inter,
                    h,
                    xn,
                    n,
                    hp,
                    m.gate_proj.input_major,
                )
            {
                // bf16: SwiGLU's element-wise part is fused into gate/up, whose output is
                // packed for down (see `swiglu_packed`); either layout.
                timer.end(Phase::GateUp);
                kernels::linear::matmul_packed(
                    pool,
                    m.down_proj.weight.view(),
                    h,
                    hp,
                    tmp,
                    m.down_proj.input_major,
                );
                timer.end(Phase::Down);
            } else if m.gate_proj.takes_kept() {
                let (g, u) = (grow(g, n * inter), grow(u, n * inter));
                let mask = input_mask(&mut mlp, li, InputGroup::GateUp, xn, n);
                timer.end(Phase::Threshold);
                let kept = mask.kept();
                if !Linear::project_group(
                    pool,
                    &[&m.gate_proj, &m.up_proj],
                    xn,
                    n,
                    &mut [&mut *g, &mut *u],
                    kept,
                    im,
                ) {
                    m.gate_proj.project(pool, xn, n, g, kept, im);
                    m.up_proj.project(pool, xn, n, u, kept, im);
                }
                timer.end(Phase::GateUp);
                ops::act_mul_par(pool, m.activation, g, u);
                timer.end(Phase::SiluMul);
                let mask = input_mask(&mut mlp, li, InputGroup::Down, g, n);
                timer.end(Phase::Threshold);
                m.down_proj.project(pool, g, n, tmp, mask.kept(), im);
                timer.end(Phase::Down);
            } else {
                // `Mlp::forward`, with the cache's buffers and a timer.
                let (g, u) = (grow(g, n * inter), grow(u, n * inter));
                row_major_mask(&mut mlp, li, InputGroup::GateUp, xn, n);
                let ws = [&m.gate_proj, &m.up_proj].map(|l| (l.weight.view(), l.weight.rows));
                matmul_many(pool, per_token, &ws, h, xn, n, &mut [&mut *g, &mut *u]);
                timer.end(Phase::GateUp);
                if per_token {
                    // Row by row, as decode does it: the SIMD body and scalar tail of
                    // each row then cover the same elements.
                    for (g, u) in g.chunks_exact_mut(inter).zip(u.chunks_exact(inter)) {
                        ops::act_mul_par(pool, m.activation, g, u);
                    }
                } else {
                    ops::act_mul_par(pool, m.activation, g, u);
                }
                timer.end(Phase::SiluMul);
                row_major_mask(&mut mlp, li, InputGroup::Down, g, n);
                if !m.down_proj.takes_kept() {
                    matmul_many(
                        pool,
                        per_token,
                        &[m.down_proj.ws()],
                        inter,
                        g,
                        n,
                        &mut [tmp],
                    );
                } else if per_token {
                    // Token by token, as decode computes each (DownInputMajor).
                    for (gt, yt) in g.chunks_exact(inter).zip(tmp.chunks_exact_mut(h)) {
                        m.down_proj.project(pool, gt, 1, yt, None, im);
                    }
                } else {
                    m.down_proj.forward(pool, g, n, tmp);
                }
                timer.end(Phase::Down);
            }
            if let Some(w) = &layer.mlp_output_norm {
                norm_in_place(pool, tmp, w, eps, grow(normed, n * h));
                timer.end(Phase::Norm);
            }
        }
        match seqs {
            Seqs::One(cache) => cache.commit(n),
            Seqs::Many(items) => items.iter_mut().for_each(|i| i.cache.commit(1)),
        }
        let rows: std::ops::Range<usize> = match logits {
            Logits::None => {
                timer.finish();
                return Vec::new();
            }
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let m = rows.len();
        let rows = rows.start * h..rows.end * h;
        ops::add_rmsnorm_rows(
            pool,
            &mut x[rows.clone()],
            &tmp[rows],
            &self.norm,
            eps,
            &mut xn[..m * h],
        );
        let head = self.head();
        let mut out = vec![0f32; m * c.vocab_size];
        matmul_many(
            pool,
            per_token,
            &[(head.view(), head.rows)],
            h,
            &xn[..m * h],
            m,
            &mut [&mut out],
        );
        if let Some(cap) = c.final_logit_softcapping {
            out.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        timer.end(Phase::Head);
        timer.finish();
        out
    }
}

/// The forward pass's working buffers. They are kept in the sequence's [`KvCache`]
/// between calls, so that a prefill or a decode step allocates (and page-faults) nothing
/// once the buffers have grown to its size.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    /// A sandwich norm's output (then copied back over its input).
    normed: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// The MLP's hidden activations packed as bf16 (see `kernels::linear::swiglu_packed`).
    hp: kernels::gemm_avx512::PackedBf16,
    rope: RopeTable,
    /// The sliding-window layers' table, when their RoPE base differs.
    rope_local: RopeTable,
    /// The input-major decode kernel's buffers.
    im: InputMajorScratch,
    /// A batch's new keys and values, before they go to their sequences' caches.
    k_new: Vec<f32>,
    v_new: Vec<f32>,
}

/// The sequences a forward pass advances.
enum Seqs<'a, 'b> {
    /// One sequence: its tokens at positions `cache.len()..`.
    One(&'a mut KvCache),
    /// One token for each of several sequences (a batched decode step).
    Many(&'a mut [BatchItem<'b>]),
}

/// [`kernels::matmul_many`], or with `per_token` [`kernels::matmul_many_per_token`] (a
/// batch of sequences: each token's products as its decode step alone computes them).
fn matmul_many(
    pool: &ThreadPool,
    per_token: bool,
    ws: &[(WeightView<'_>, usize)],
    cols: usize,
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
) {
    if per_token {
        kernels::matmul_many_per_token(pool, ws, cols, x, n, outs)
    } else {
        kernels::matmul_many(pool, ws, cols, x, n, outs)
    }
}

/// `x[t] += bias` for every row t of x ([n, bias.len()]).
fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            ops::add_assign(row, b);
        }
    }
}

/// `x = rmsnorm(x) * w` row by row ([n, w.len()]), through `buf` (as long as x).
fn norm_in_place(pool: &ThreadPool, x: &mut [f32], w: &[f32], eps: f32, buf: &mut [f32]) {
    ops::rmsnorm_rows(pool, x, w, eps, buf);
    x.copy_from_slice(buf);
}

/// Row-major weights: the hook may mask inputs in place (several tokens), not skip them.
fn row_major_mask(
    hook: &mut Option<&mut (dyn MlpOverride + '_)>,
    layer: usize,
    group: InputGroup,
    x: &mut [f32],
    n: usize,
) {
    if let Some(o) = hook.as_deref_mut()
        && o.masks_inputs()
    {
        let mask = o.input_mask(layer, group, x, n);
        assert!(
            mask.kept().is_none(),
            "input sparsity at decode needs input-major weights"
        );
    }
}

/// The hook's choice of inputs for `group` (dense without a hook).
fn input_mask<'a>(
    hook: &'a mut Option<&mut (dyn MlpOverride + '_)>,
    layer: usize,
    group: InputGroup,
    x: &mut [f32],
    n: usize,
) -> InputMask<'a> {
    match hook.as_deref_mut() {
        Some(o) => o.input_mask(layer, group, x, n),
        None => InputMask::Dense,
    }
}

/// The first `len` elements of `buf`, grown (never shrunk) to hold them; the contents are
/// whatever the last use left.
fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}
