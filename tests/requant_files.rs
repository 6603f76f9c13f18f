//! The default model re-quantized by llama.cpp's own `llama-quantize` into the formats
//! people download (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, Q5_0, Q5_1; see scripts/requantize,
//! which builds llama-quantize from the llama-cpp-python 0.3.36 sdist and writes
//! target/requant/*.gguf). Each file loads natively and as f32, dequantizes bit for bit as
//! the `gguf` package does, computes a prompt in one batch as token by token (the same top
//! token but for near-ties, within the 8-bit activation noise), and scores GPL-3 within
//! 0.5% of llama.cpp's perplexity on the same file (llama.cpp's KV cache in f32, as ours).
//!
//! Building llama-quantize takes several minutes even on an idle 2-core machine (most of
//! llama.cpp compiles), too much for every CI run, so these tests are `#[ignore]`d:
//!
//!     scripts/requantize && scripts/test --test requant_files -- --ignored

mod common;

use std::path::PathBuf;

use sparsellm::kernels::pool;
use sparsellm::loader::gguf::GgufFile;
use sparsellm::model::{Llama, Logits};
use sparsellm::quant;
use sparsellm::tensor::{DType, LoadDType};

/// Each file's type, the ggml types llama-quantize chose for its tensors (SmolLM2's 576
/// columns are not whole 256-blocks, so most of a K-quant file falls back to Q5_0, Q5_1,
/// Q4_0 or Q8_0), and llama.cpp's perplexity of GPL-3 on it (scripts/llamacpp_ppl.py,
/// windows of 512 as `sparsellm eval`; all predictions, second half of each window), with
/// llama.cpp's KV cache in f32 as ours (`--kv f32`) and in its default f16 (`--kv f16`).
struct Reference {
    ty: &'static str,
    types: &'static [&'static str],
    kv_f32: (f64, f64),
    kv_f16: (f64, f64),
}

const FILES: [Reference; 7] = [
    Reference {
        ty: "Q4_K_M",
        types: &["Q4_K", "Q5_0", "Q6_K", "Q8_0"],
        kv_f32: (24.5594, 19.0023),
        kv_f16: (24.5207, 19.0397),
    },
    Reference {
        ty: "Q5_K_M",
        types: &["Q5_1", "Q5_K", "Q6_K", "Q8_0"],
        kv_f32: (25.9998, 20.0763),
        kv_f16: (25.9028, 20.0885),
    },
    Reference {
        ty: "Q6_K",
        types: &["Q6_K", "Q8_0"],
        kv_f32: (23.4218, 18.4810),
        kv_f16: (23.4769, 18.4894),
    },
    Reference {
        ty: "Q3_K_M",
        types: &["Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"],
        kv_f32: (27.0363, 21.0841),
        kv_f16: (27.2289, 21.1383),
    },
    Reference {
        ty: "Q2_K",
        types: &["Q3_K", "Q4_0", "Q8_0"],
        kv_f32: (31.7512, 25.1938),
        kv_f16: (31.7309, 25.1871),
    },
    Reference {
        ty: "Q5_0",
        types: &["Q5_0", "Q8_0"],
        kv_f32: (24.9822, 19.5355),
        kv_f16: (24.9546, 19.5090),
    },
    Reference {
        ty: "Q5_1",
        types: &["Q5_1", "Q8_0"],
        kv_f32: (27.2299, 20.8005),
        kv_f16: (27.2365, 20.8570),
    },
];

/// Position `t`'s logits in `[positions, vocab]` logits.
fn position(logits: &[f32], t: usize, vocab: usize) -> &[f32] {
    &logits[t * vocab..(t + 1) * vocab]
}

fn file(ty: &str) -> PathBuf {
    let p = common::test_data_dir()
        .parent()
        .unwrap()
        .join("requant")
        .join(format!("SmolLM2-135M-Instruct.{ty}.gguf"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/requantize first",
        p.display()
    );
    p
}

/// Dumps gguf's dequantization of the first `per_type` tensors of each quantized type
/// into argv[2]/<name>.f32 and prints "name type".
const DUMP: &str = r#"
import sys, gguf, numpy as np, collections
r = gguf.GGUFReader(sys.argv[1])
seen = collections.Counter()
for t in r.tensors:
    ty = t.tensor_type.name
    if ty in ("F32", "F16") or seen[ty] >= int(sys.argv[3]):
        continue
    seen[ty] += 1
    gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).tofile(sys.argv[2] + "/" + t.name + ".f32")
    print(t.name, ty)
"#;

#[test]
#[ignore = "needs scripts/requantize (builds llama.cpp's llama-quantize)"]
fn requantized_files_dequantize_bit_for_bit_as_gguf() {
    for &Reference { ty, types, .. } in &FILES {
        let path = file(ty);
        let dir = common::test_data_dir().join(format!("requant-dq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listing = common::python(
            DUMP,
            [path.as_os_str(), dir.as_os_str(), "3".as_ref()],
            &["gguf", "numpy"],
        );
        let f = GgufFile::open(&path).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for line in listing.lines() {
            let (name, gty) = line.split_once(' ').unwrap();
            let raw = f.raw_tensor(name).unwrap();
            assert_eq!(raw.dtype.name(), gty, "{ty} {name}");
            let bytes = std::fs::read(dir.join(format!("{name}.f32"))).unwrap();
            let mut got = vec![0f32; raw.numel()];
            quant::dequantize(raw.dtype, raw.bytes(), &mut got);
            assert_eq!(got.len() * 4, bytes.len(), "{ty} {name}");
            let differ = got
                .iter()
                .zip(bytes.chunks_exact(4))
                .filter(|(a, b)| a.to_le_bytes() != [b[0], b[1], b[2], b[3]])
                .count();
            assert_eq!(differ, 0, "{ty} {name} ({gty}): {differ} values differ");
            seen.insert(gty.to_string());
        }
        assert_eq!(seen.iter().collect::<Vec<_>>(), types.to_vec(), "{ty}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
#[ignore = "needs scripts/requantize (builds llama.cpp's llama-quantize)"]
fn requantized_files_load_and_prefill_equals_decode() {
    let ids = common::ids(&common::reference()["perplexity"]["ids"]);
    let ids = &ids[..24];
    for &Reference { ty, .. } in &FILES {
        let src = sparsellm::loader::open(&file(ty)).unwrap();
        let native = Llama::load(src.as_ref(), LoadDType::Native, pool::global()).unwrap();
        let vocab = native.config.vocab_size;
        let batched = native
            .forward(ids, &mut native.new_cache(), Logits::All, None)
            .unwrap();
        // The same weights dequantized to f32: how far 8-bit activations alone move the
        // logits (their noise), and the top-1 agreement that noise leaves.
        let f32m = Llama::load(src.as_ref(), LoadDType::To(DType::F32), pool::global()).unwrap();
        let wide = f32m
            .forward(ids, &mut f32m.new_cache(), Logits::All, None)
            .unwrap();
        let max_diff =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let top = |v: &[f32]| sparsellm::generate::argmax(v);
        let agree = (0..ids.len())
            .filter(|&t| top(position(&wide, t, vocab)) == top(position(&batched, t, vocab)))
            .count();
        assert!(
            agree * 10 >= ids.len() * 8,
            "{ty}: top-1 {agree}/{}",
            ids.len()
        );
        // Each layer's products are bit-identical between prefill and decode (the lib
        // tests check every format; with SPARSELLM_ISA=avx2 the logits are equal). The
        // AVX-512 prefill attention sums in another order (blocked, for long prompts),
        // and its last bits move some 8-bit activation roundings: from there prefill and
        // decode are two roundings of the same computation, which must stay within the
        // 8-bit noise (measured on AVX-512: 0.69-0.99 apart on average against a noise of
        // 0.78-1.27, and 0-3 of 24 top tokens flipped, at gaps up to 0.6).
        let mut cache = native.new_cache();
        let (mut apart, mut noise, mut flips) = (0f32, 0f32, 0);
        for (t, &id) in ids.iter().enumerate() {
            let row = native
                .forward(&[id], &mut cache, Logits::Last, None)
                .unwrap();
            let b = position(&batched, t, vocab);
            apart += max_diff(b, &row);
            noise += max_diff(b, position(&wide, t, vocab));
            let (ab, ar) = (top(b) as usize, top(&row) as usize);
            if ab != ar {
                let gaps = (b[ab] - b[ar], row[ar] - row[ab]);
                eprintln!("{ty}: position {t}: top token {ab} vs {ar}, gaps {gaps:?}");
                flips += 1;
            }
        }
        let n = ids.len() as f32;
        eprintln!(
            "{ty}: prefill vs decode {:.3} apart (mean of each position's largest logit \
             difference), 8-bit noise {:.3}; top token flipped at {flips} of {}",
            apart / n,
            noise / n,
            ids.len()
        );
        assert!(
            apart <= noise,
            "{ty}: prefill and decode {apart} apart, more than the 8-bit noise {noise}"
        );
        assert!(
            flips * 10 <= ids.len() * 2,
            "{ty}: the top token differs at {flips} of {} positions",
            ids.len()
        );
    }
}

#[test]
#[ignore = "needs scripts/requantize (builds llama.cpp's llama-quantize); ~1 min a file"]
fn requantized_perplexity_within_half_a_percent_of_llama_cpp() {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    for r in &FILES {
        let src = sparsellm::loader::open(&file(r.ty)).unwrap();
        let model = Llama::load(src.as_ref(), LoadDType::Native, pool::global()).unwrap();
        let tok = sparsellm::tokenizer::Tokenizer::load(&src.tokenizer_source().unwrap()).unwrap();
        let ids = tok.encode(&text).unwrap();
        let rep = sparsellm::eval::perplexity(&model, &ids, 512, None, |_, _| {}).unwrap();
        let rel =
            |(all, half): (f64, f64)| (rep.ppl_all / all - 1.0, rep.ppl_second_half / half - 1.0);
        let (ra, rh) = rel(r.kv_f32);
        let (fa, fh) = rel(r.kv_f16);
        eprintln!(
            "{}: ppl {:.4} / {:.4} (all / second half); against llama.cpp with an f32 KV \
             cache {:+.3}% / {:+.3}%, with its default f16 {:+.3}% / {:+.3}%",
            r.ty,
            rep.ppl_all,
            rep.ppl_second_half,
            100.0 * ra,
            100.0 * rh,
            100.0 * fa,
            100.0 * fh
        );
        // Like with like: llama.cpp's f16 KV cache alone moves these small models'
        // perplexity by up to 0.7% (Q3_K_M: 27.229 against 27.036), so the bound holds
        // against llama.cpp with its cache in f32, as ours is (measured within 0.27%).
        assert!(
            ra.abs() < 0.005 && rh.abs() < 0.005,
            "{}: {:+.3}% / {:+.3}% from llama.cpp",
            r.ty,
            100.0 * ra,
            100.0 * rh
        );
    }
}
