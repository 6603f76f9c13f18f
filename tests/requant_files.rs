//! The default model re-quantized by llama.cpp's own `llama-quantize` into the formats
//! people download (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, Q5_0, Q5_1; see scripts/requantize,
//! which builds llama-quantize from the llama-cpp-python 0.3.36 sdist and writes
//! target/requant/*.gguf). Each file loads natively and as f32, dequantizes bit for bit as
//! the `gguf` package does, computes a prompt in one batch as token by token (the same top
//! token but for near-ties, logits within 2.5), and scores GPL-3 within 0.5% of llama.cpp's
//! perplexity on the same file (0.75%, the spread rounding alone causes).
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
/// windows of 512 as `sparsellm eval`): (all predictions, second half of each window).
const FILES: [(&str, &[&str], f64, f64); 7] = [
    (
        "Q4_K_M",
        &["Q4_K", "Q5_0", "Q6_K", "Q8_0"],
        24.5207,
        19.0397,
    ),
    (
        "Q5_K_M",
        &["Q5_1", "Q5_K", "Q6_K", "Q8_0"],
        25.9028,
        20.0885,
    ),
    ("Q6_K", &["Q6_K", "Q8_0"], 23.4769, 18.4894),
    (
        "Q3_K_M",
        &["Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"],
        27.2289,
        21.1383,
    ),
    ("Q2_K", &["Q3_K", "Q4_0", "Q8_0"], 31.7309, 25.1871),
    ("Q5_0", &["Q5_0", "Q8_0"], 24.9546, 19.5090),
    ("Q5_1", &["Q5_1", "Q8_0"], 27.2365, 20.8570),
];

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
    for (ty, types, _, _) in FILES {
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
    for (ty, _, _, _) in FILES {
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
        let rows = |v: &[f32], t: usize| v[t * vocab..(t + 1) * vocab].to_vec();
        let agree = (0..ids.len())
            .filter(|&t| top(&rows(&wide, t)) == top(&rows(&batched, t)))
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
            let b = rows(&batched, t);
            apart += max_diff(&b, &row);
            noise += max_diff(&b, &rows(&wide, t));
            let (ab, ar) = (top(&b) as usize, top(&row) as usize);
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
    for (ty, _, want_all, want_half) in FILES {
        let src = sparsellm::loader::open(&file(ty)).unwrap();
        let model = Llama::load(src.as_ref(), LoadDType::Native, pool::global()).unwrap();
        let tok = sparsellm::tokenizer::Tokenizer::load(&src.tokenizer_source().unwrap()).unwrap();
        let ids = tok.encode(&text).unwrap();
        let rep = sparsellm::eval::perplexity(&model, &ids, 512, None, |_, _| {}).unwrap();
        let (ra, rh) = (
            rep.ppl_all / want_all - 1.0,
            rep.ppl_second_half / want_half - 1.0,
        );
        eprintln!(
            "{ty}: ppl {:.4} / {:.4}, llama.cpp {want_all} / {want_half}: {:+.3}% / {:+.3}%",
            rep.ppl_all,
            rep.ppl_second_half,
            100.0 * ra,
            100.0 * rh
        );
        // llama.cpp's own measure (second half). Rounding alone moves these small
        // models' perplexity by tenths of a percent: our AVX2 and AVX-512 paths differ by
        // 0.28% on the default Q4_1 file (18.428 / 18.377) and 0.32% on Q3_K_M (21.099 /
        // 21.032, llama.cpp 21.138), so 0.75% is the bound for the low-bit files.
        assert!(rh.abs() < 0.0075, "{ty}: {rh} (all predictions: {ra})");
    }
}
