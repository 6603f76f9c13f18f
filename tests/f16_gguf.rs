//! F16 weights kept as stored: a GGUF whose matrices are F16 (the default model's weights
//! dequantized and rounded to f16 by the third-party `gguf` Python package, norms left in
//! F32) loads under `--dtype native` with every matrix F16 and memory-mapped, and computes
//! the logits of the same weights widened to f32 (`--dtype f32`), in decode and prefill,
//! dense and sparse.
//!
//! Needs Python with the `gguf` and `numpy` packages (`scripts/test` installs them).

mod common;

use std::path::PathBuf;
use std::sync::Mutex;

use sparsellm::kernels::pool;
use sparsellm::model::{Llama, Logits, MlpOverride};
use sparsellm::sparse::{Mode, Scorer, SparseMlp, SparsityConfig, Threshold};
use sparsellm::tensor::{DType, LoadDType, Matrix};

/// Rewrites a GGUF with every tensor of two or more dimensions as F16 (through f32:
/// `gguf.quants.dequantize`, then numpy's round-to-nearest-even) and the rest as F32,
/// every metadata field copied.
const TO_F16: &str = r#"
import sys, gguf, numpy as np
r = gguf.GGUFReader(sys.argv[1])
w = gguf.GGUFWriter(sys.argv[2], r.fields["general.architecture"].contents())
for f in r.fields.values():
    if f.name == "general.architecture" or f.name.startswith("GGUF."):
        continue
    t = f.types[0]
    w.add_key_value(f.name, f.contents(), t,
                    sub_type=f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
for t in r.tensors:
    d = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w.add_tensor(t.name, d.astype(np.float16) if len(t.shape) >= 2 else d)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"#;

/// The default model with F16 matrices, made once into `target/test-data/model-f16.gguf`
/// (written under a temporary name and renamed into place, so a half-written file is
/// never reused).
fn f16_model() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let data = common::test_data_dir();
    let out = data.join("model-f16.gguf");
    if out.is_file() {
        return out;
    }
    let tmp = data.join(format!("model-f16.gguf.tmp-{}", std::process::id()));
    common::python(
        TO_F16,
        [common::model_path().as_os_str(), tmp.as_os_str()],
        &["gguf", "numpy"],
    );
    if std::fs::rename(&tmp, &out).is_err() {
        let _ = std::fs::remove_file(&tmp);
        assert!(out.is_file(), "could not place {}", out.display());
    }
    out
}

fn load(dtype: LoadDType) -> Llama {
    let src = sparsellm::loader::open(&f16_model()).unwrap();
    Llama::load(src.as_ref(), dtype, pool::global()).unwrap()
}

fn matrices(m: &Llama) -> Vec<(String, &Matrix)> {
    let mut v = vec![("embed_tokens".to_string(), &m.embed_tokens)];
    for (l, layer) in m.layers.iter().enumerate() {
        let a = &layer.self_attn;
        let f = &layer.mlp;
        for (name, lin) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
            ("gate_proj", &f.gate_proj),
            ("up_proj", &f.up_proj),
            ("down_proj", &f.down_proj),
        ] {
            v.push((format!("layer {l} {name}"), &lin.weight));
        }
    }
    if let Some(h) = &m.lm_head {
        v.push(("lm_head".to_string(), &h.weight));
    }
    v
}

/// max |a - b| over the logits, and whether the argmax agrees.
fn compare(a: &[f32], b: &[f32]) -> (f32, bool) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (
        d,
        sparsellm::generate::argmax(a) == sparsellm::generate::argmax(b),
    )
}

#[test]
fn native_f16_weights_are_mapped_and_compute_the_f32_logits() {
    let native = load(LoadDType::Native);
    let wide = load(LoadDType::To(DType::F32));
    let (mn, mw) = (matrices(&native), matrices(&wide));
    assert_eq!(mn.len(), 1 + 7 * native.layers.len(), "tied head");
    for ((name, n), (_, w)) in mn.iter().zip(&mw) {
        assert_eq!(n.dtype, DType::F16, "{name}: native keeps F16");
        assert!(n.is_mapped(), "{name}: F16 is memory-mapped, not converted");
        assert_eq!(n.byte_len(), 2 * n.rows * n.cols, "{name}");
        assert_eq!(w.dtype, DType::F32, "{name}: --dtype f32 widens");
    }
    // Same values: every row widens to the f32 copy's bits.
    let (e16, e32) = (&native.embed_tokens, &wide.embed_tokens);
    let (mut a, mut b) = (vec![0f32; e16.cols], vec![0f32; e16.cols]);
    for r in [0, 1, 17, 4999, e16.rows - 1] {
        e16.row_to_f32(r, &mut a);
        e32.row_to_f32(r, &mut b);
        assert_eq!(a, b, "embedding row {r}");
    }

    // Decode token by token (f16 matvec) and prefill whole prompts (f16 tiles widened for
    // the f32 GEMM) against the f32 weights: only the summation order may differ.
    let r = common::reference();
    let (mut worst, mut flips, mut total) = (0f32, 0, 0);
    for case in r["forward"].as_array().unwrap() {
        let ids = common::ids(&case["ids"]);
        let (mut cn, mut cw) = (native.new_cache(), wide.new_cache());
        for t in 0..ids.len() {
            let ln = native
                .forward(&ids[t..t + 1], &mut cn, Logits::Last, None)
                .unwrap();
            let lw = wide
                .forward(&ids[t..t + 1], &mut cw, Logits::Last, None)
                .unwrap();
            let (d, same) = compare(&ln, &lw);
            worst = worst.max(d);
            flips += !same as usize;
            total += 1;
        }
        let ln = native
            .forward(&ids, &mut native.new_cache(), Logits::All, None)
            .unwrap();
        let lw = wide
            .forward(&ids, &mut wide.new_cache(), Logits::All, None)
            .unwrap();
        let (d, _) = compare(&ln, &lw);
        eprintln!("prefill of {} tokens: max logit difference {d}", ids.len());
        assert!(d < 1e-3, "prefill: {d}");
    }
    eprintln!("decode, {total} positions: max logit difference {worst}, {flips} argmax flips");
    assert!(worst < 1e-3, "decode: {worst}");
    assert_eq!(flips, 0);
}

#[test]
fn sparse_decoding_on_f16_weights_matches_f32() {
    // The sparse MLP's cached rows and transposed down projection stay f16; at the same
    // mask the result must equal the f32 weights' up to summation order.
    let native = load(LoadDType::Native);
    let wide = load(LoadDType::To(DType::F32));
    let ids = common::ids(&common::reference()["forward"][1]["ids"]);
    for mode in [Mode::Cached, Mode::Gather] {
        let config = SparsityConfig {
            threshold: Threshold::Density(0.3),
            scorer: Some(Scorer::Exact),
            mode,
            prefill_dense: false,
        };
        let mut sn = SparseMlp::new(&native, config, None).unwrap();
        let mut sw = SparseMlp::new(&wide, config, None).unwrap();
        let (mut cn, mut cw) = (native.new_cache(), wide.new_cache());
        let mut worst = 0f32;
        for t in 0..ids.len() {
            let ln = native
                .forward(
                    &ids[t..t + 1],
                    &mut cn,
                    Logits::Last,
                    Some(&mut sn as &mut dyn MlpOverride),
                )
                .unwrap();
            let lw = wide
                .forward(
                    &ids[t..t + 1],
                    &mut cw,
                    Logits::Last,
                    Some(&mut sw as &mut dyn MlpOverride),
                )
                .unwrap();
            worst = worst.max(compare(&ln, &lw).0);
        }
        eprintln!("sparse {mode:?} density 0.3: max logit difference {worst}");
        assert!(worst < 1e-2, "{mode:?}: {worst}");
    }
}

#[test]
fn synthetic_f16_checkpoint_loads_mapped_as_f16() {
    use sparsellm::synth::{SynthShape, write_checkpoint};
    use sparsellm::tokenizer::Tokenizer;
    // A small shape (the default model's vocabulary, so its tokenizer fits).
    let shape = SynthShape {
        name: "tiny",
        hidden: 64,
        intermediate: 160,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 49152,
    };
    let source = sparsellm::loader::open(&common::model_path()).unwrap();
    let tokenizer = Tokenizer::load(&source.tokenizer_source().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth-f16");
    write_checkpoint(&shape, DType::F16, &out, &tokenizer, 3, |_, _| {}).unwrap();
    let src = sparsellm::loader::open(&out).unwrap();
    let native = Llama::load(src.as_ref(), LoadDType::Native, pool::global()).unwrap();
    let wide = Llama::load(src.as_ref(), LoadDType::To(DType::F32), pool::global()).unwrap();
    for (name, m) in matrices(&native) {
        assert_eq!(m.dtype, DType::F16, "{name}");
        assert!(m.is_mapped(), "{name}: an f16 safetensors file is mapped");
    }
    let ids = [1u32, 200, 3000, 45000, 7, 7, 9];
    let ln = native
        .forward(&ids, &mut native.new_cache(), Logits::All, None)
        .unwrap();
    let lw = wide
        .forward(&ids, &mut wide.new_cache(), Logits::All, None)
        .unwrap();
    let (d, _) = compare(&ln, &lw);
    assert!(d < 1e-3, "{d}");
}
